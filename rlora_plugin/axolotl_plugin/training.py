"""The load-balancing loss in trainers that compute their loss from the logits (the TRL preference trainers that
`rl:` selects, such as DPO): the model returns no loss there, so `RLoraModel.forward` cannot add it and keeps it for
the trainer (`pop_unadded_aux_loss`). Everywhere else the model adds it itself."""

from __future__ import annotations

from typing import Any

from rlora_plugin.model import with_unadded_aux_loss


def add_unadded_aux_loss(trainer: Any) -> None:
    """Wrap `trainer.compute_loss` (per instance) so that its loss includes the load-balancing loss of the forwards
    it ran. That term is a micro-batch mean like the preference loss, so the trainer must divide what compute_loss
    returns by the accumulation steps, as these trainers make it do (`model_accepts_loss_kwargs = False`, no
    `compute_loss_func`; transformers 5.x): refuse one that does not."""
    if trainer.model_accepts_loss_kwargs or getattr(trainer, "compute_loss_func", None) is not None:
        raise RuntimeError(
            f"R-LoRA: {type(trainer).__name__} computes its loss from the logits but does not let the HF Trainer "
            "divide it by the gradient accumulation steps (model_accepts_loss_kwargs or compute_loss_func is set), "
            "so the load-balancing loss cannot be weighted like it. Set `rlora.router_aux_loss_coef: 0` for this "
            "trainer, and report it to the rlora_plugin maintainers."
        )
    original = trainer.compute_loss

    def compute_loss(*args: Any, **kwargs: Any) -> Any:
        return with_unadded_aux_loss(original(*args, **kwargs), trainer.model)

    trainer.compute_loss = compute_loss
