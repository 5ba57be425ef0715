"""Small helpers shared by the callbacks."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


def trainer_callbacks(trainer: pl.Trainer) -> list[Callback]:
    """The trainer's live callback list (an attribute Lightning's callback connector sets)."""
    return trainer.callbacks  # type: ignore[attr-defined]
