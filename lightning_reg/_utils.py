"""Small helpers shared by the callbacks."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

PER_STEP_HOOKS = (
    "on_train_batch_start", "on_before_backward", "on_after_backward",
    "on_before_optimizer_step", "on_before_zero_grad", "on_train_batch_end",
)  # fmt: skip


def trainer_callbacks(trainer: pl.Trainer) -> list[Callback]:
    """The trainer's callback list (read only: callbacks never edit it)."""
    return trainer.callbacks  # type: ignore[attr-defined]
