"""EarlyStopping with best-state restore: Lightning's EarlyStopping plus ``restore_best_weights``.

Method card:
    What it does: stops training when the monitored metric stops improving (exactly as Lightning's
    ``EarlyStopping``) and puts the weights and buffers that scored the best check back into the
    model when ``fit`` ends, however it ends.
    Suggested values: ``patience`` of 5-20 validation checks; ``min_delta`` around the noise level
    of the monitored metric.
    When it hurts: a very noisy validation set makes "best" a lucky draw; use a larger validation
    set or ``min_delta``.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping as _LightningEarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_reg._best_state import (
    held_in_memory,
    host_copy,
    put_back_reached_weights,
    snapshot_file,
    validate_arguments,
    validated_averaging,
    warn_if_not_synced,
)
from lightning_reg._lightning import (
    averaged_module,
    checkpoint_savers_after,
    is_replicated,
    require_same_package,
)
from lightning_reg._snapshot import SnapshotLocation, StateSnapshot
from lightning_reg._utils import trainer_callbacks

__all__ = ["CHECKPOINT_KEY", "EarlyStopping"]

CHECKPOINT_KEY = "lightning_reg_best_state"
"""Top-level checkpoint key holding each EarlyStopping's snapshot, by ``state_key``."""

if TYPE_CHECKING:  # the mixin is checked against lightning.pytorch's class, whose API it extends
    _MixinBase = _LightningEarlyStopping
else:
    _MixinBase = object


class _RestoreBestState(_MixinBase):
    """Everything our ``EarlyStopping`` adds to Lightning's, for either package's base class.

    Mixed in before ``lightning.pytorch``'s or ``pytorch_lightning``'s ``EarlyStopping``: every
    ``super()`` call reaches that package's own implementation, so both classes behave exactly
    like their package's ``EarlyStopping`` plus the restore. ``_reasons`` is the base package's
    ``EarlyStoppingReason`` (the two packages' enums do not compare equal).
    """

    _reasons: ClassVar[Any] = EarlyStoppingReason

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
        validate_arguments(
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
        self._check_on_train_epoch_end_arg = check_on_train_epoch_end
        self._reset_run_state()
        self._state_key = super().state_key  # Lightning reads it at every hook call

    def _reset_run_state(self) -> None:
        """What one ``fit`` learns; cleared at the start of every ``fit`` (plain values only)."""
        self.wait_count = 0
        self.stopped_epoch = 0
        self.stopping_reason = self._reasons.NOT_STOPPED
        self.stopping_reason_message = None
        start = self.baseline if self.baseline is not None else math.inf * self._sign
        # Lightning's improvement test compares with `best_score`: starting it at the baseline
        # makes only checks that beat the baseline reset `wait_count`.
        self.best_score = torch.tensor(float(start))
        self.best_value = math.inf * self._sign
        self.best_epoch = -1
        self.best_step = -1
        self._snapshot: StateSnapshot | None = None
        self._reached: dict[str, torch.Tensor] | None = None  # weights at an exception
        self._fitting = False  # between setup("fit") and the end of that fit
        self._sync_checked = False
        self._replicated = True
        self._averaging: Any = None  # the WeightAveraging callback whose weights are validated

    @property
    def _sign(self) -> float:
        return 1.0 if self.mode == "min" else -1.0

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
        require_same_package(self, trainer)
        if stage != "fit":
            super().setup(trainer, pl_module, stage)
            return
        self._reset_run_state()  # a resumed fit loads its checkpoint's state after `setup`
        self._check_on_train_epoch_end = self._check_on_train_epoch_end_arg
        callbacks = trainer_callbacks(trainer)
        if self.restore_best_weights:
            self._averaging = validated_averaging(callbacks, self._check_on_train_epoch_end_arg)
            if self._averaging is not None:
                self._check_on_train_epoch_end = False  # see `validated_averaging`
        super().setup(trainer, pl_module, stage)
        self._fitting = True
        if not self.restore_best_weights:
            return
        self._replicated = is_replicated(trainer.strategy)
        path = snapshot_file(trainer, self.snapshot_dir, self.monitor, self.mode)
        self._snapshot = StateSnapshot(
            self.snapshot_to, path if self.snapshot_to == "disk" else None
        )
        if self.checkpoint_snapshot and not self._replicated:
            rank_zero_warn(
                f"EarlyStopping: {type(trainer.strategy).__name__} shards the model, and a "
                "checkpoint holds one rank's callback state, so the best-state snapshot is left "
                "out of checkpoints. A resumed run tracks the best state afresh from where it "
                "resumed."
            )
        restoring = [
            cb for cb in callbacks if isinstance(cb, _RestoreBestState) and cb.restore_best_weights
        ]
        if len(restoring) > 1 and restoring[0] is self:
            rank_zero_warn(
                f"{len(restoring)} EarlyStopping callbacks restore best weights; the last one in "
                "the callback list wins. Pass `restore_best_weights=False` to the others."
            )

    # ---------------------------------------------------------------------------------- checking
    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor.startswith("reg/") and not self._check_on_train_epoch_end:
            # metrics of our evaluation callbacks exist once their pass ran: run it now if it is
            # listed after us, so the callback order does not matter
            for callback in trainer_callbacks(trainer):
                evaluate = getattr(callback, "evaluate_after_validation", None)
                if callable(evaluate) and type(callback).__module__.startswith("lightning_reg"):
                    evaluate(trainer, pl_module)
        super().on_validation_end(trainer, pl_module)

    @override
    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        logs = trainer.callback_metrics
        if getattr(trainer, "fast_dev_run", False) or self.monitor not in logs:
            super()._run_early_stopping_check(trainer)  # Lightning's missing-metric handling
            return
        current = logs[self.monitor].squeeze()
        if trainer.world_size > 1 and not self._sync_checked:
            self._sync_checked = True
            warn_if_not_synced(trainer, self.monitor, current)
        if trainer.current_epoch < self.start_from_epoch:
            self._warm_up_check(trainer, current)
        else:
            super()._run_early_stopping_check(trainer)
            self._track_best(trainer, float(current))
        if self._fitting:  # a check called by hand outside `fit` logs nothing
            self._log_state(trainer)

    def _warm_up_check(self, trainer: pl.Trainer, current: torch.Tensor) -> None:
        """Before ``start_from_epoch`` only a non-finite value stops training."""
        diverged = self.check_finite and not bool(torch.isfinite(current))
        # every rank takes part in the same collective, whatever it saw
        if trainer.strategy.reduce_boolean_decision(diverged, all=False):
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason = self._reasons.NON_FINITE_METRIC
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
            self._snapshot.capture(self._validated_module(trainer))

    def _validated_module(self, trainer: pl.Trainer) -> nn.Module:
        """The module whose tensors the last validation scored."""
        if self._averaging is not None:
            averaged = averaged_module(self._averaging)
            if averaged is not None:
                return averaged
        return trainer.lightning_module

    def _is_better(self, value: float) -> bool:
        # Lightning stores min_delta with the sign that makes `op(current - min_delta, best)` work
        shifted = value - self.min_delta
        return shifted < self.best_value if self.mode == "min" else shifted > self.best_value

    def _diverged(self, value: float) -> bool:
        threshold = self.divergence_threshold
        if threshold is None:
            return False
        return value > threshold if self.mode == "min" else value < threshold

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
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every `on_train_end` (checkpoint callbacks save what training reached, weight
        # averaging copies its average in) and after the strategy's teardown.
        if self._fitting:
            stopped = trainer.should_stop and self.stopping_reason_message is not None
            self._restore(pl_module, "after early stopping" if stopped else "at the end of fit")
            self._align_averaged_model()
        self._end_fit()

    def _align_averaged_model(self) -> None:
        """Give weight averaging's model the restored weights too.

        Its averaged model outlives ``fit``, and a later ``trainer.validate`` on the same Trainer
        swaps it in: without this, that validation would score the final average instead of
        the weights the model now holds.
        """
        averaged = averaged_module(self._averaging) if self._averaging is not None else None
        if averaged is not None and self._has_snapshot():
            assert self._snapshot is not None
            self._snapshot.restore(averaged)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        if self._fitting and self.restore_on_exception and self._has_snapshot():
            savers = checkpoint_savers_after(trainer_callbacks(trainer), self)
            if savers and not self._replicated:
                rank_zero_warn(
                    f"EarlyStopping: not restoring the best weights after "
                    f"{type(exception).__name__}: {type(savers[0]).__name__} saves a checkpoint "
                    f"after this callback, and under {type(trainer.strategy).__name__} its "
                    "weights cannot be told apart from the restored ones."
                )
            else:
                if savers:  # they must still save the weights training reached
                    self._reached = host_copy(pl_module)
                    self._snapshot = held_in_memory(self._snapshot)  # the file goes below
                self._restore(pl_module, f"after {type(exception).__name__}")
        self._end_fit()  # Lightning calls neither `on_fit_end` nor `teardown` after an exception

    def _has_snapshot(self) -> bool:
        return self._snapshot is not None and not self._snapshot.empty

    def _restore(self, module: nn.Module, why: str) -> None:
        if not self.restore_best_weights or self._snapshot is None:
            return
        if self._snapshot.empty:
            rank_zero_info(
                f"EarlyStopping: no best weights to restore ({why}): `{self.monitor}` never "
                "improved on a finite value; the model keeps its last weights."
            )
            return
        self._snapshot.restore(module)
        rank_zero_info(
            f"Restored best weights from epoch {self.best_epoch} "
            f"({self.monitor}={self.best_value:.4f}) {why}."
        )

    def _end_fit(self) -> None:
        self._fitting = False
        self._averaging = None
        if self._snapshot is not None and self._snapshot.location == "disk":
            self._snapshot.clear()  # deletes this fit's file

    # ----------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            best_value=self.best_value, best_epoch=self.best_epoch, best_step=self.best_step
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "snapshot" in state_dict:  # written by lightning-reg 0.1 inside the callback state
            self._load_snapshot(state_dict["snapshot"])
        if "best_epoch" not in state_dict:
            return  # a checkpoint of Lightning's EarlyStopping: the best state is tracked afresh
        if self.restore_best_weights and not self._has_snapshot():
            return  # saved without the copy: tracked afresh from here; Lightning's counters go on
        self.best_value = float(state_dict["best_value"])
        self.best_epoch = int(state_dict["best_epoch"])
        self.best_step = int(state_dict["best_step"])

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._reached is not None:  # saved after an exception restored the best weights
            put_back_reached_weights(checkpoint, pl_module, self._reached)
        if self.checkpoint_snapshot and self._replicated and self._has_snapshot():
            assert self._snapshot is not None
            snapshots = checkpoint.setdefault(CHECKPOINT_KEY, {})
            snapshots[self.state_key] = self._snapshot.state_dict()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        snapshot = checkpoint.get(CHECKPOINT_KEY, {}).get(self.state_key)
        if snapshot:
            self._load_snapshot(snapshot)

    def _load_snapshot(self, tensors: dict[str, torch.Tensor]) -> None:
        if not (self.restore_best_weights and tensors):
            return
        if self._snapshot is None:  # loaded outside `fit`
            self._snapshot = StateSnapshot("cpu")
        self._snapshot.load_state_dict(tensors)


class EarlyStopping(_RestoreBestState, _LightningEarlyStopping):
    r"""Lightning's ``EarlyStopping`` that also restores the best weights when ``fit`` ends.

    Same name, arguments, defaults, attributes, messages, ``state_key`` and callback state as
    :class:`lightning.pytorch.callbacks.EarlyStopping`: swapping the import is the whole migration,
    and checkpoints written by either class resume with the other. On top of it, whenever the
    monitored value improves, the local state of the weights that were just validated
    (parameters and persistent buffers such as BatchNorm running statistics) is copied aside; the
    copy is put back in ``on_fit_end`` (after every ``on_train_end`` hook, checkpoint callbacks
    and weight averaging included) when training stops early or ends normally, and, with
    ``restore_on_exception``, in ``on_exception`` when ``fit`` raises. Exactly one copy is kept.

    "Best" is tracked on its own: a non-finite value is never copied, a stop by
    ``divergence_threshold`` never restores a worse check, and a value that reaches
    ``stopping_threshold`` is copied if it is the best so far.

    Every ``fit`` starts afresh: counters, best value and snapshot are reset in ``setup``, so a
    callback reused for another model (a sweep) never puts one model's weights into another. A fit
    resumed from a checkpoint (``ckpt_path=``) then loads the checkpoint's state, snapshot included.

    Built on ``lightning.pytorch``'s ``EarlyStopping``: with a Trainer of the standalone
    ``pytorch_lightning`` package use :class:`lightning_reg.pytorch_lightning.EarlyStopping`, the
    same code built on that package's class (the Trainer recognises only its own package's
    ``EarlyStopping``: it runs it after the module's ``on_train_epoch_end``). Each class refuses the
    other package's Trainer at ``setup``, so the mix-up can never be a silent difference.

    With Lightning's ``WeightAveraging``/``EMAWeightAveraging``, validation scores the averaged
    weights, so the snapshot is taken from the averaged model and the check runs at the end of
    validation (before the average moves on); the model ends with the averaged weights of the best
    check. With ``StochasticWeightAveraging`` (which validates the live weights and copies its
    never-validated average in at the end) the best validated weights win, with a warning.

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
        restore_on_exception: also put it back when ``fit`` raises. A checkpoint callback that
            saves on exception (``OnExceptionCheckpoint``, ``ModelCheckpoint(save_on_exception=
            True)``) still saves the weights training reached.
        snapshot_to: where the copy lives: ``"cpu"`` (host memory, pinned and copied without
            blocking when the model is on a GPU), ``"device"`` (fastest, costs device memory) or
            ``"disk"`` (one file per rank and fit, deleted when ``fit`` ends).
        snapshot_dir: directory for ``snapshot_to="disk"``; defaults to
            ``<trainer.default_root_dir>/best_state``.
        checkpoint_snapshot: include the copy in Lightning checkpoints (under the top-level key
            ``"lightning_reg_best_state"``), so a resumed run restores the same weights as an
            uninterrupted one. Without it, a resumed run tracks the best state afresh.
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
        RuntimeError: if the monitored metric is not logged and ``strict=True``; at ``setup``, with
            ``check_on_train_epoch_end=True`` beside a ``WeightAveraging`` callback, or with two
            of them.
        TypeError: at ``setup``, with a ``pytorch_lightning`` Trainer (see above).

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
