"""A test-only Axolotl plugin that records the model's logits on a fixed input, inside the training run.

`post_model_load` saves `probe_init.pt` (adapted and base logits, right after the adapter is built or
loaded) and `post_train` saves `probe_trained.pt` (logits of the trained in-memory model), both in
`output_dir`. The CLI tests compare them with a fresh `PeftModel.from_pretrained` reload.

For preference training (`rl:`), where TRL builds the PEFT model inside the trainer, `post_trainer_create`
counts the trainer's `disable_adapter()` contexts (TRL's reference forwards when it has no `ref_model`),
and `post_train` saves them with the trainer's reference setup in `probe_ref.json`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from axolotl.integrations.base import BasePlugin

PROBE_IDS = [[1, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120]]


def probe_logits(model) -> torch.Tensor:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROBE_IDS, device=device)).logits.float().cpu()
    model.train(was_training)
    return logits


class ProbePlugin(BasePlugin):
    trainer = None
    disable_adapter_calls = 0

    def post_model_load(self, cfg, model):
        if cfg.adapter != "rlora" or not hasattr(model, "disable_adapter"):
            return
        adapted = probe_logits(model)
        with model.disable_adapter():
            base = probe_logits(model)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        torch.save({"adapted": adapted, "base": base}, Path(cfg.output_dir) / "probe_init.pt")

    def post_trainer_create(self, cfg, trainer):
        if cfg.adapter != "rlora" or not cfg.rl:
            return
        self.trainer, original = trainer, trainer.model.disable_adapter

        @contextmanager
        def counted_disable_adapter():
            self.disable_adapter_calls += 1
            with original():
                yield

        trainer.model.disable_adapter = counted_disable_adapter

    def post_train(self, cfg, model):  # called twice by Axolotl: idempotent
        if cfg.adapter != "rlora":
            return
        torch.save({"trained": probe_logits(model)}, Path(cfg.output_dir) / "probe_trained.pt")
        if self.trainer is not None:
            ref = {
                "ref_model": type(self.trainer.ref_model).__name__ if self.trainer.ref_model is not None else None,
                "adapters": sorted(self.trainer.model.peft_config),
                "disable_adapter_calls": self.disable_adapter_calls,
            }
            (Path(cfg.output_dir) / "probe_ref.json").write_text(json.dumps(ref))


class SeedInitPlugin(BasePlugin):
    """Seeds torch from the run's `seed` before the model loads, as Axolotl 0.21 does itself
    (`seed_model_initialization`) and 0.19 does not: there a plain LoRA's initialization is unseeded, so two
    runs of one YAML differ. With it, two `adapter: lora` runs can be compared on either version."""

    def pre_model_load(self, cfg):
        torch.manual_seed(cfg.seed)
