"""EarlyStopping with best-state restore: Lightning's EarlyStopping plus ``restore_best_weights``.

Method card:
    What it does: stops training when the monitored metric stops improving (exactly as Lightning's
    ``EarlyStopping``) and puts the weights and buffers of the best check back into the model when
    training ends, however it ends.
    Suggested values: ``patience`` of 5-20 validation checks; ``min_delta`` around the noise level
    of the monitored metric.
    When it hurts: a very noisy validation set makes "best" a lucky draw; use a larger validation
    set or ``min_delta``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import EarlyStopping as _LightningEarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_reg._snapshot import SNAPSHOT_LOCATIONS, SnapshotLocation, StateSnapshot
from lightning_reg._utils import trainer_callbacks

__all__ = ["EarlyStopping"]


class EarlyStopping(_LightningEarlyStopping):
    r"""Lightning's ``EarlyStopping`` that also restores the best weights when training ends.

    Same name, arguments, defaults and stopping behaviour as
    :class:`lightning.pytorch.callbacks.EarlyStopping`: swapping the import is the whole migration,
    and checkpoints written by either class resume with the other. On top of it, whenever the
    monitored value improves, the full local module state (parameters and persistent buffers such
    as BatchNorm running statistics) is copied aside; the copy is put back when training stops
    early, when it ends normally (``max_epochs``/``max_steps``) and, with ``restore_on_exception``,
    when ``fit`` raises (``KeyboardInterrupt`` included). Exactly one copy is kept.

    "Best" is tracked on its own: a non-finite value is never copied, a stop by
    ``divergence_threshold`` never restores a worse check, and a value that reaches
    ``stopping_threshold`` is copied if it is the best so far. The weights are put back in
    ``on_train_end`` (or ``on_exception``) *after* every checkpoint callback has run that hook, so
    ``last.ckpt`` and exception checkpoints hold the weights training actually reached, and while
    the model is still wrapped by the strategy with its process group alive.

    Args:
        monitor: quantity to be monitored.
        min_delta: minimum change of the monitored quantity that counts as an improvement.
        patience: number of checks with no improvement after which training stops.
        verbose: log improvements and the stopping reason.
        mode: ``"min"`` or ``"max"``.
        strict: raise if ``monitor`` is not among the logged metrics.
        check_finite: stop when the monitored value becomes NaN or infinite.
        stopping_threshold: stop as soon as the monitored value reaches this threshold.
        divergence_threshold: stop as soon as the monitored value is worse than this threshold.
        check_on_train_epoch_end: check at the end of the training epoch (default when validation
            runs once per epoch) instead of at the end of validation.
        log_rank_zero_only: log the stopping messages on rank 0 only.
        restore_best_weights: put the best state back when training ends.
        restore_on_exception: also put it back when ``fit`` raises or is interrupted.
        snapshot_to: where the copy lives: ``"cpu"`` (host memory, pinned and copied without
            blocking when the model is on a GPU), ``"device"`` (fastest, costs device memory) or
            ``"disk"`` (one file per rank, no extra memory).
        snapshot_dir: directory for ``snapshot_to="disk"``; defaults to
            ``<trainer.default_root_dir>/best_state``.
        checkpoint_snapshot: include the copy in Lightning checkpoints, so a resumed run restores
            the same weights as an uninterrupted one. Without it, a resumed run tracks the best
            state afresh from where it resumed.
        start_from_epoch: epochs before this one neither count towards ``patience`` nor take a
            snapshot (only the non-finite check runs); for warm-up phases.
        baseline: a value the monitored quantity must beat: checks that do not beat it count as
            no improvement, so training stops after ``patience`` checks that never reach it.

    Attributes:
        best_value: the monitored value of the snapshot (``inf``/``-inf`` before the first one).
        best_epoch: the epoch of the snapshot (``-1`` before the first one).
        best_step: the global step of the snapshot (``-1`` before the first one).

    Raises:
        ValueError: for invalid arguments (negative ``patience``/``min_delta``/``start_from_epoch``,
            unknown ``snapshot_to``, thresholds the wrong way round, non-finite ``baseline``).
        MisconfigurationException: if ``mode`` is neither ``"min"`` nor ``"max"``.
        RuntimeError: if the monitored metric is not logged and ``strict=True``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_reg import EarlyStopping
        >>> early_stopping = EarlyStopping("val_loss", patience=5)
        >>> trainer = Trainer(callbacks=[early_stopping], logger=False)
        >>> # after trainer.fit(model): the model holds the weights of early_stopping.best_epoch
        >>> # (with strategy="ddp_spawn" the model comes back restored, but the attributes of
        >>> # this callback object in the launching process are not updated, as in Lightning)

    Logged metrics:
        - ``reg/early_stopping/best``: the monitored value of the snapshot.
        - ``reg/early_stopping/wait``: checks without improvement (Lightning's ``wait_count``).
        - ``reg/early_stopping/best_epoch``: the epoch of the snapshot.
    """

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
        *,
        restore_best_weights: bool = True,
        restore_on_exception: bool = True,
        snapshot_to: SnapshotLocation = "cpu",
        snapshot_dir: str | os.PathLike | None = None,
        checkpoint_snapshot: bool = True,
        start_from_epoch: int = 0,
        baseline: float | None = None,
    ) -> None:
        _validate_arguments(
            monitor, min_delta, patience, mode, stopping_threshold, divergence_threshold,
            snapshot_to, start_from_epoch, baseline,
        )  # fmt: skip
        super().__init__(
            monitor, min_delta, patience, verbose, mode, strict, check_finite,
            stopping_threshold, divergence_threshold, check_on_train_epoch_end,
            log_rank_zero_only,
        )  # fmt: skip
        self.restore_best_weights = restore_best_weights
        self.restore_on_exception = restore_on_exception
        self.snapshot_to = snapshot_to
        self.snapshot_dir = snapshot_dir
        self.checkpoint_snapshot = checkpoint_snapshot
        self.start_from_epoch = start_from_epoch
        self.baseline = baseline
        if baseline is not None:
            # Lightning's improvement test compares with `best_score`: starting it at the baseline
            # makes only checks that beat the baseline reset `wait_count`.
            self.best_score = torch.tensor(float(baseline))
        self.best_value = math.inf if mode == "min" else -math.inf
        self.best_epoch = -1
        self.best_step = -1
        self._snapshot: StateSnapshot | None = None
        self._state_key = super().state_key  # Lightning reads it at every hook call
        self._restorer = _RestoreAfterCheckpoints(self)
        self._fitting = False  # between setup("fit") and teardown/on_exception
        self._sync_checked = False
        self._replicated = True

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    def regularization_settings(self) -> dict[str, Any]:
        """This callback's settings, for the TensorBoard hparams view."""
        prefix = f"EarlyStopping[{self.monitor}]"
        return {
            f"{prefix}/patience": self.patience, f"{prefix}/mode": self.mode,
            f"{prefix}/min_delta": abs(self.min_delta),
            f"{prefix}/restore_best_weights": self.restore_best_weights,
        }  # fmt: skip

    # ----------------------------------------------------------------------------------- set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._remove_restorer(trainer)  # left behind by a fit that raised
        self._fitting = stage == "fit"
        if stage != "fit" or not self.restore_best_weights:
            return
        self._replicated = isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy))
        path = self._snapshot_path(trainer)
        old = self._snapshot
        if old is None or old.location != self.snapshot_to or old.path != path:
            self._snapshot = StateSnapshot(self.snapshot_to, path)
            if old is not None and not old.empty:  # e.g. loaded before this fit: move it over
                self._snapshot.load_state_dict(old.state_dict())
        if self.checkpoint_snapshot and not self._replicated:
            rank_zero_warn(
                f"EarlyStopping: {type(trainer.strategy).__name__} shards the model, and a "
                "checkpoint holds one rank's callback state, so the best-state snapshot is left "
                "out of checkpoints. A resumed run tracks the best state afresh from where it "
                "resumed."
            )
        restoring = [
            cb for cb in trainer_callbacks(trainer)
            if isinstance(cb, EarlyStopping) and cb.restore_best_weights
        ]  # fmt: skip
        if len(restoring) > 1 and restoring[0] is self:
            rank_zero_warn(
                f"{len(restoring)} EarlyStopping callbacks restore best weights; the last one in "
                "the callback list wins. Pass `restore_best_weights=False` to the others."
            )

    def _snapshot_path(self, trainer: pl.Trainer) -> Path | None:
        if self.snapshot_to != "disk":
            return None
        directory = Path(self.snapshot_dir or Path(trainer.default_root_dir) / "best_state")
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.monitor}-{self.mode}")
        return directory / f"{tag}.rank{trainer.global_rank}.pt"

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._remove_restorer(trainer)
        self._fitting = False

    # --------------------------------------------------------------------------------- restoring
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._queue_restore(trainer)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        if self.restore_on_exception:
            self._queue_restore(trainer)
        self._fitting = False  # `teardown` does not follow an exception

    def _queue_restore(self, trainer: pl.Trainer) -> None:
        """Append the restorer behind every callback, in the hook Lightning is dispatching.

        Restoring must come after the checkpoint callbacks (Lightning runs them last), so that
        ``last.ckpt`` and exception checkpoints keep the weights training reached. Lightning
        iterates the live callback list, so a callback appended now runs in this same hook.
        It is added only here, not in ``setup``, so it costs the per-step hooks nothing. Only a
        fit that went through ``setup`` restores (not ``validate``/``test``, nor a fit that
        failed before it started).
        """
        if not (self._fitting and self.restore_best_weights):
            return
        if self._restorer not in trainer_callbacks(trainer):
            trainer_callbacks(trainer).append(self._restorer)

    def _remove_restorer(self, trainer: pl.Trainer) -> None:
        if self._restorer in trainer_callbacks(trainer):
            trainer_callbacks(trainer).remove(self._restorer)

    # ---------------------------------------------------------------------------------- checking
    @override
    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        logs = trainer.callback_metrics
        if getattr(trainer, "fast_dev_run", False) or self.monitor not in logs:
            super()._run_early_stopping_check(trainer)  # Lightning's missing-metric handling
            return
        current = logs[self.monitor].squeeze()
        if trainer.world_size > 1 and not self._sync_checked:
            self._warn_if_not_synced(trainer, current)
        if trainer.current_epoch < self.start_from_epoch:
            self._warm_up_check(trainer, current)
        else:
            super()._run_early_stopping_check(trainer)
            self._track_best(trainer, float(current))
        self._log_state(trainer)

    def _warm_up_check(self, trainer: pl.Trainer, current: torch.Tensor) -> None:
        """Before ``start_from_epoch`` only a non-finite value stops training."""
        diverged = self.check_finite and not bool(torch.isfinite(current))
        # every rank takes part in the same collective, whatever it saw
        if trainer.strategy.reduce_boolean_decision(diverged, all=False):
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason = EarlyStoppingReason.NON_FINITE_METRIC
            self.stopping_reason_message = (
                f"Monitored metric {self.monitor} = {current} is not finite during warm-up "
                f"(epoch {trainer.current_epoch} < start_from_epoch={self.start_from_epoch})."
            )

    def _track_best(self, trainer: pl.Trainer, value: float) -> None:
        """Snapshot when every rank sees an improvement (identical decision on all ranks)."""
        candidate = math.isfinite(value) and self._is_better(value) and not self._diverged(value)
        if not trainer.strategy.reduce_boolean_decision(candidate, all=True):
            return
        self.best_value = value
        self.best_epoch = trainer.current_epoch
        self.best_step = trainer.global_step
        if self._snapshot is not None:
            self._snapshot.capture(trainer.lightning_module)

    def _is_better(self, value: float) -> bool:
        # Lightning stores min_delta with the sign that makes `op(current - min_delta, best)` work
        shifted = value - self.min_delta
        return shifted < self.best_value if self.mode == "min" else shifted > self.best_value

    def _diverged(self, value: float) -> bool:
        threshold = self.divergence_threshold
        if threshold is None:
            return False
        return value > threshold if self.mode == "min" else value < threshold

    def _warn_if_not_synced(self, trainer: pl.Trainer, current: torch.Tensor) -> None:
        self._sync_checked = True
        gathered = trainer.strategy.all_gather(current.detach().float().reshape(1))
        values = gathered.flatten()
        same = bool(torch.all(values == values[0])) or bool(torch.all(torch.isnan(values)))
        if not same:
            rank_zero_warn(
                f"EarlyStopping: `{self.monitor}` differs across ranks ({values.tolist()}), so "
                "each rank judges improvement on its own data. Log it with "
                f"`self.log('{self.monitor}', ..., sync_dist=True)` or use a torchmetrics metric"
                " so every rank sees the same value. Until then a snapshot is taken only when"
                " every rank sees an improvement."
            )

    def _log_state(self, trainer: pl.Trainer) -> None:
        metrics: dict[str, float] = {"reg/early_stopping/wait": float(self.wait_count)}
        if self.best_epoch >= 0:
            metrics["reg/early_stopping/best"] = self.best_value
            metrics["reg/early_stopping/best_epoch"] = float(self.best_epoch)
        if self._check_on_train_epoch_end:
            for name, value in metrics.items():
                trainer.lightning_module.log(
                    name, value, on_step=False, on_epoch=True, sync_dist=True
                )
        elif trainer.is_global_zero:
            # `on_validation_end` does not allow `self.log`; send straight to the loggers
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # --------------------------------------------------------------------------------- restoring
    def _restore(self, trainer: pl.Trainer, why: str) -> None:
        if not self.restore_best_weights or self._snapshot is None:
            return
        if self._snapshot.empty:
            rank_zero_info(
                f"EarlyStopping: no best weights to restore ({why}): `{self.monitor}` never "
                "improved on a finite value; the model keeps its last weights."
            )
            return
        self._snapshot.restore(trainer.lightning_module)
        rank_zero_info(
            f"Restored best weights from epoch {self.best_epoch} "
            f"({self.monitor}={self.best_value:.4f}) {why}."
        )

    # ----------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            best_value=self.best_value, best_epoch=self.best_epoch, best_step=self.best_step
        )
        if self.checkpoint_snapshot and self._replicated and self._snapshot is not None:
            state["snapshot"] = self._snapshot.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        snapshot = state_dict.get("snapshot") or {}
        if "best_epoch" not in state_dict or not snapshot:
            # A checkpoint from Lightning's EarlyStopping, or one without the copy: the best state
            # is tracked afresh from here; Lightning's counters above carry on.
            return
        self.best_value = float(state_dict["best_value"])
        self.best_epoch = int(state_dict["best_epoch"])
        self.best_step = int(state_dict["best_step"])
        if self.restore_best_weights:
            if self._snapshot is None:  # loaded outside `fit`: keep it in memory until `setup`
                self._snapshot = StateSnapshot("cpu")
            self._snapshot.load_state_dict(snapshot)


class _RestoreAfterCheckpoints(Callback):
    """Runs the restore after the checkpoint callbacks (appended behind them at the end)."""

    def __init__(self, owner: EarlyStopping) -> None:
        self.owner = owner
        self._state_key = f"{type(self).__qualname__}[{owner.state_key}]"

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stopped = trainer.should_stop and self.owner.stopping_reason_message is not None
        why = "after early stopping" if stopped else "at the end of training"
        self.owner._restore(trainer, why)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.owner.restore_on_exception:
            self.owner._restore(trainer, f"after {type(exception).__name__}")


def _validate_arguments(
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
