"""EarlyStopping's helpers: argument checks, weight averaging, exception-time checkpoints.

Kept apart from the callback so that ``early_stopping.py`` holds only the Lightning lifecycle.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_reg._lightning import alias_names, averaging_callbacks, swa_callbacks
from lightning_reg._snapshot import SNAPSHOT_LOCATIONS, StateSnapshot, module_state


def validated_averaging(callbacks: list[Any], check_on_train_epoch_end: bool | None) -> Any:
    """The ``WeightAveraging`` callback whose averaged weights validation scores, if any.

    Beside one, EarlyStopping snapshots the averaged model and checks at the end of validation:
    at the end of the training epoch the average may already have moved on (epoch-wise updates
    run in ``on_train_epoch_end``), and the weights snapshotted there were not the ones validated.

    Raises:
        RuntimeError: with two averaging callbacks, or with ``check_on_train_epoch_end=True``.
    """
    averaging = averaging_callbacks(callbacks)
    if swa_callbacks(callbacks):
        rank_zero_warn(
            "EarlyStopping with StochasticWeightAveraging: validation scores the live "
            "weights, and SWA's average (copied in when training ends) is never validated. "
            "EarlyStopping restores the best validated weights over it. Pass "
            "`restore_best_weights=False` to keep SWA's average instead."
        )
    if not averaging:
        return None
    if len(averaging) > 1:
        raise RuntimeError(
            f"{len(averaging)} WeightAveraging callbacks are attached; validation would score a "
            "swap of a swap. Keep one."
        )
    if check_on_train_epoch_end:
        raise RuntimeError(
            f"EarlyStopping(check_on_train_epoch_end=True) with {type(averaging[0]).__name__}: "
            "validation scores the averaged weights, which can change again before the training "
            "epoch ends, so the weights snapshotted there would not be the ones validated. Leave "
            "`check_on_train_epoch_end` unset (the check then runs at the end of validation)."
        )
    return averaging[0]


def snapshot_file(
    trainer: pl.Trainer, directory: str | os.PathLike | None, monitor: str, mode: str
) -> Path:
    """A file for one rank's snapshot, unique to this fit: two runs in one folder never share it."""
    folder = Path(directory or Path(trainer.default_root_dir) / "best_state")
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{monitor}-{mode}")
    return folder / f"{tag}.{uuid.uuid4().hex[:12]}.rank{trainer.global_rank}.pt"


def warn_if_not_synced(trainer: pl.Trainer, monitor: str, current: torch.Tensor) -> None:
    """Warn once if ranks see different values of the monitored metric (not synced)."""
    values = trainer.strategy.all_gather(current.detach().float().reshape(1)).flatten()
    same = bool(torch.all(values == values[0])) or bool(torch.all(torch.isnan(values)))
    if not same:
        rank_zero_warn(
            f"EarlyStopping: `{monitor}` differs across ranks ({values.tolist()}), so each rank "
            f"judges improvement on its own data. Log it with `self.log('{monitor}', ..., "
            "sync_dist=True)` or use a torchmetrics metric so every rank sees the same value. "
            "Until then a snapshot is taken only when every rank sees an improvement."
        )


def host_copy(module: nn.Module) -> dict[str, Tensor]:
    """A host copy of ``module``'s local parameters and persistent buffers, by snapshot name."""
    return {name: tensor.detach().cpu().clone() for name, tensor in module_state(module)}


def held_in_memory(snapshot: StateSnapshot | None) -> StateSnapshot | None:
    """The same copy held in host memory (a copy on disk is deleted when ``fit`` ends)."""
    if snapshot is None or snapshot.location != "disk":
        return snapshot
    held = StateSnapshot("cpu")
    held.load_state_dict(snapshot.state_dict())
    snapshot.clear()
    return held


def put_back_reached_weights(
    checkpoint: dict[str, Any], module: nn.Module, reached: dict[str, Tensor]
) -> None:
    """Make a checkpoint saved after an exception-time restore hold the weights training reached.

    ``WeightAveraging`` moves the module's weights to ``current_model_state`` in its own
    ``on_save_checkpoint``; whichever runs first, the module's weights are replaced there.
    """
    key = "current_model_state" if "current_model_state" in checkpoint else "state_dict"
    names = alias_names(module)
    weights = checkpoint[key]
    for name in list(weights):
        if names.get(name) in reached:
            weights[name] = reached[names[name]]


def validate_arguments(
    monitor: str, min_delta: float, patience: int, mode: str,
    stopping_threshold: float | None, divergence_threshold: float | None,
    snapshot_to: str, start_from_epoch: int, baseline: float | None,
) -> None:  # fmt: skip
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(f"`monitor` must be a logged metric's name, got {monitor!r}.")
    if min_delta < 0:
        raise ValueError(
            f"`min_delta` must be >= 0, got {min_delta}; `mode` already says which direction "
            "counts as an improvement."
        )
    if not isinstance(patience, int) or patience < 0:
        raise ValueError(f"`patience` must be an integer >= 0 (checks), got {patience!r}.")
    if snapshot_to not in SNAPSHOT_LOCATIONS:
        raise ValueError(
            f"`snapshot_to` must be one of {', '.join(map(repr, SNAPSHOT_LOCATIONS))}, "
            f"got {snapshot_to!r}."
        )
    if not isinstance(start_from_epoch, int) or start_from_epoch < 0:
        raise ValueError(f"`start_from_epoch` must be an integer >= 0, got {start_from_epoch!r}.")
    if baseline is not None and not math.isfinite(baseline):
        raise ValueError(f"`baseline` must be a finite number, got {baseline!r}.")
    if stopping_threshold is not None and divergence_threshold is not None:
        wrong_way = (
            stopping_threshold >= divergence_threshold
            if mode == "min"
            else stopping_threshold <= divergence_threshold
        )
        if wrong_way:
            raise ValueError(
                f"With mode={mode!r}, `stopping_threshold` ({stopping_threshold}) must be "
                f"{'below' if mode == 'min' else 'above'} `divergence_threshold` "
                f"({divergence_threshold}); did you swap them?"
            )
