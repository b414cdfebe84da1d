"""Offline test assets: a tiny random Llama, a local fast tokenizer with a chat template, and datasets.

Nothing is downloaded: the tokenizer is a byte-level BPE trained with the `tokenizers` library on the
datasets' own text, and the model is a randomly initialized `LlamaForCausalLM` (hidden 64, 2 layers).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from torch import nn

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_COLORS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]
_ANIMALS = ["cat", "dog", "bird", "fish", "horse", "mouse", "lion", "bear"]


def _pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Simple, learnable question/answer pairs (the answer repeats words of the question)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        color, animal = rng.choice(_COLORS), rng.choice(_ANIMALS)
        out.append((f"What color is the {animal}?", f"The {animal} is {color}. The {color} {animal} is happy."))
    return out


def alpaca_rows(n: int = 64, seed: int = 0) -> list[dict]:
    return [{"instruction": q, "input": "", "output": a} for q, a in _pairs(n, seed)]


def chat_rows(n: int = 64, seed: int = 1) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in _pairs(n, seed)
    ]


def preference_rows(n: int = 32, seed: int = 2) -> list[dict]:
    """`prompt` / `chosen` / `rejected` rows (Axolotl's `chatml.prompt_pairs` fields): the chosen answer
    names the animal of the question, the rejected one another animal."""
    rng = random.Random(seed)
    rows = []
    for question, answer in _pairs(n, seed):
        animal = question.removeprefix("What color is the ").removesuffix("?")
        other = rng.choice([a for a in _ANIMALS if a != animal])
        rows.append({"prompt": question, "chosen": answer, "rejected": answer.replace(animal, other)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_tokenizer(out_dir: Path, corpus: list[str]):
    """A byte-level BPE fast tokenizer with bos/eos/pad/unk and a chat template, saved in out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[UNK, BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir: Path, tokenizer, seed: int = 0):
    """A random `LlamaForCausalLM` (hidden 64, 2 layers, GQA) saved as safetensors in out_dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def build_assets(root: Path) -> dict[str, Path]:
    """Write model + tokenizer (one directory) and the datasets under root; return their paths."""
    root.mkdir(parents=True, exist_ok=True)
    alpaca, chat = alpaca_rows(), chat_rows()
    corpus = [r["instruction"] + "\n" + r["output"] for r in alpaca]
    corpus += ["### Instruction:\n### Input:\n### Response:\nBelow is an instruction that describes a task."]
    model_dir = root / "tiny-llama"
    tokenizer = build_tokenizer(model_dir, corpus)
    build_model(model_dir, tokenizer)
    return {
        "model": model_dir,
        "alpaca": write_jsonl(root / "alpaca.jsonl", alpaca),
        "chat": write_jsonl(root / "chat.jsonl", chat),
        "preference": write_jsonl(root / "preference.jsonl", preference_rows()),
    }


if __name__ == "__main__":
    import sys

    print(build_assets(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny_assets")))


def perturb(model: nn.Module, seed: int = 3) -> None:
    """Move every trainable adapter weight away from its initial value, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
