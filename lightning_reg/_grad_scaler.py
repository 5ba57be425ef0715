"""SAM's second gradient under a ``torch.amp.GradScaler`` (``precision="16-mixed"``).

A SAM step takes two scaled backward passes before one ``scaler.step``. The scaler's public API
allows one ``unscale_`` per optimizer and step, and Lightning has already spent it on the first
gradient when ``on_before_optimizer_step`` runs (it unscales before that hook so clipping sees true
values). There is no public way to unscale a second gradient and make ``scaler.step`` honour its
inf/NaN check, so this module touches one private attribute of the scaler,
``_per_optimizer_states[id(optimizer)]`` (the same dictionary ``unscale_``/``step``/``update``
use):

1. before the second pass, the first gradient's inf flags are kept (and the first gradient is
   unscaled with the public ``unscale_`` if Lightning left it scaled, as it does for optimizers
   that unscale inside ``step``: fused AdamW);
2. after it, only this optimizer's stage is set back to "ready" and the public ``unscale_``
   unscales and checks the second gradient;
3. the first gradient's flags are added to the second's, so a non-finite value in *either* pass
   skips ``scaler.step`` and backs the scale off in ``scaler.update`` exactly as one non-finite
   gradient does in plain training. Nothing is read on the host.

:func:`check_scaler_supported` refuses, at fit start, a scaler without that attribute (a torch
that changed its internals) rather than stepping with an unchecked gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["ScaledSecondGradient", "active_scaler", "check_scaler_supported"]


def active_scaler(precision_plugin: Any) -> torch.amp.GradScaler | None:
    """The enabled ``GradScaler`` of Lightning's precision plugin, or ``None`` (32, bf16)."""
    scaler = getattr(precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler


def check_scaler_supported(scaler: torch.amp.GradScaler) -> None:
    """Raise if this torch's ``GradScaler`` lacks the per-optimizer state SAM relies on."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict) or not hasattr(torch.amp.grad_scaler, "OptState"):
        raise RuntimeError(
            f"SAM under precision='16-mixed' needs to unscale and inf-check its second gradient "
            f"inside {type(scaler).__name__}'s per-optimizer state, which this torch version "
            f"({torch.__version__}) does not have. Use precision='bf16-mixed' or 32, or a torch "
            f"release between 2.3 and the one this library was tested with."
        )


class ScaledSecondGradient:
    """Unscale and inf-check SAM's second gradient so ``scaler.step`` honours both passes.

    Call :meth:`before_second_pass` once the first gradient is complete, scale the second loss
    with :meth:`scale`, backpropagate it, then call :meth:`after_second_pass`.
    """

    def __init__(self, scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
        self.scaler, self.optimizer = scaler, optimizer
        self._first_flags: dict[torch.device, Tensor] = {}

    def _state(self) -> dict[str, Any]:
        return self.scaler._per_optimizer_states[id(self.optimizer)]

    def before_second_pass(self) -> None:
        """Unscale the first gradient if still scaled (fused optimizers); keep its inf flags."""
        if self._state()["stage"] is torch.amp.grad_scaler.OptState.READY:
            self.scaler.unscale_(self.optimizer)
        self._first_flags = dict(self._state()["found_inf_per_device"])

    def scale(self, loss: Tensor) -> Tensor:
        """The second loss, scaled like the first (public ``GradScaler.scale``)."""
        return self.scaler.scale(loss)

    def after_second_pass(self) -> None:
        """Unscale and check the second gradient; merge the first gradient's inf flags into it."""
        self._state()["stage"] = torch.amp.grad_scaler.OptState.READY
        self.scaler.unscale_(self.optimizer)
        flags = self._state()["found_inf_per_device"]
        for device, first in self._first_flags.items():
            flags[device] = flags[device] + first if device in flags else first
        self._first_flags = {}
