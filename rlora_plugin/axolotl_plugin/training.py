"""The load-balancing loss in trainers that compute their loss from the logits (the TRL preference trainers that
`rl:` selects, such as DPO): the model returns no loss there, so `RLoraModel.forward` cannot add it and keeps it for
the trainer (`pop_unadded_aux_loss`). Everywhere else the model adds it itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlora_plugin.model import with_unadded_aux_loss
from rlora_plugin.patching import Checked, HostChanged, qualified_name, wrap_once

CHECKED = Checked("axolotl", "0.19.0 and 0.21.0 (TRL 1.9.0 and 1.14.1)")


def add_unadded_aux_loss(trainer: Any) -> None:
    """Wrap `trainer.compute_loss` (per instance, with `wrap_once`) so that its loss includes the load-balancing
    loss of the forwards it ran. That term is a micro-batch mean like the preference loss, so the trainer must
    divide what compute_loss returns by the accumulation steps, as these trainers make it do
    (`model_accepts_loss_kwargs = False`, no `compute_loss_func`; transformers 5.x): refuse one that does not."""
    if trainer.model_accepts_loss_kwargs or getattr(trainer, "compute_loss_func", None) is not None:
        raise HostChanged(
            CHECKED,
            f"`{qualified_name(trainer)}`, which computes its loss from the logits, to let the HF Trainer divide "
            "that loss by the gradient accumulation steps (`model_accepts_loss_kwargs` false, no "
            "`compute_loss_func`), so that the load-balancing loss is weighted like it",
            "set `rlora.router_aux_loss_coef: 0` for this trainer, and report it at rlora-plugin",
        )

    def with_aux_loss(original: Callable) -> Callable:
        def compute_loss(*args: Any, **kwargs: Any) -> Any:
            return with_unadded_aux_loss(original(*args, **kwargs), trainer.model)

        return compute_loss

    wrap_once(trainer, "compute_loss", with_aux_loss, CHECKED)
