"""Honest train/val generalization gap: same weights, eval mode, no augmentation, hard targets.

Method card:
    What it does: after every validation, runs your ``validation_step`` on a fixed, seeded subset
    of the *training* data with the weights that were just validated, and logs the train value,
    the gap and its trend, plus a plain-words diagnosis (overfitting / underfitting / healthy).
    Why: the running train loss is averaged while weights change, computed with dropout and
    augmentation (mixup, label smoothing) on, and one epoch stale when validation ends; comparing
    it with the validation loss measures the regularizer as much as the generalization.
    Cost: one extra evaluation pass over ``subset_size`` samples per validation.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_reg._eval_pass import evaluate_like_validation
from lightning_reg._lightning import is_overridden, validated_weights
from lightning_reg._subset import train_subset_loader
from lightning_reg._utils import trainer_callbacks
from lightning_reg.diagnosis import (
    ADVICE,
    Diagnosis,
    diagnose,
    lower_is_better,
    short_name,
    split_dataloader_suffix,
    trend,
)
from lightning_reg.tensorboard import (
    gap_layout,
    log_scalars,
    regularization_settings,
    tensorboard_writer,
    write_hparams,
    write_layout,
    write_text,
)

__all__ = ["GeneralizationGapMonitor"]


class GeneralizationGapMonitor(Callback):
    """Log the honest train/val gap after every validation, its trend, and a diagnosis.

    After each (non-sanity) validation of ``fit``, your own ``validation_step`` runs on a fixed,
    seeded subset of the training set, in eval mode and without gradients, with the weights that
    were just validated. It runs the way Lightning runs validation: the precision plugin's input
    conversion and autocast (``bf16-mixed``, ``16-mixed``, ``bf16-true``), your batch-transfer
    hooks, and the strategy's wrapper (DDP, FSDP). What it logs is captured by Lightning's own
    logging code into a result collection of the monitor's, so nothing reaches the validation
    results, and torchmetrics objects it updates are set aside and restored around the pass.
    ``Mixup``/``LabelSmoothing`` act on training batches only and never touch the subset. Under DDP
    each rank evaluates its own part of the subset (no duplicates, the same number of batches on
    every rank) and the values are reduced across ranks, so they equal a single-process
    evaluation.

    With several validation dataloaders, the monitor compares with dataloader
    ``val_dataloader_idx``: the pass hands that index to ``validation_step`` and Lightning appends
    ``/dataloader_idx_N`` to the names, just as in validation. ``metrics=`` and ``monitor=`` take
    names with or without that suffix.

    If your training *dataset* applies random augmentation itself (torchvision transforms), pass
    ``dataset=`` with the validation transforms: the subset must be evaluated like validation.

    A callback that reads ``reg/gap/...`` in its own ``on_validation_end`` (e.g. an early stopping
    placed before this monitor) calls :meth:`evaluate_after_validation` first; the pass runs once
    per validation whoever asks first.

    Args:
        subset_size: number of training samples evaluated per validation.
        metrics: validation metric names to compare (default: every metric ``validation_step``
            logs).
        monitor: the metric the diagnosis is based on (default: ``val_loss`` if logged, else the
            first one).
        higher_is_better: names of metrics where higher is better (default: guessed from the
            name: losses and errors go down, everything else up).
        dataset: the training data to sample from (default: the train dataloader's dataset).
        batch_size: the largest batch size of the pass (default: the train dataloader's).
        seed: seed of the subset's indices: ``randperm(len(dataset))[:subset_size]`` drawn with
            a generator seeded with it.
        window: evaluations the trend and the diagnosis look at.
        patience: evaluations without validation improvement that count as stalled.
        log_text: write the diagnosis as a TensorBoard text card.
        val_dataloader_idx: with several validation dataloaders, the one to compare with.

    With a ``TensorBoardLogger``: the run's hparams (the module's plus every regularization
    setting, with the gap metrics of ``metrics``, default ``val_loss``, as hparams metrics), a
    custom-scalars layout (train_eval and val on one chart, the gap on another, per metric) and a
    text card with the configuration and the latest diagnosis are written on rank 0.

    Raises:
        ValueError: for a bad ``subset_size``, ``window``, ``patience``, ``batch_size`` or
            ``val_dataloader_idx``, or a name in ``metrics``/``monitor`` whose
            ``/dataloader_idx_N`` suffix names another dataloader.
        RuntimeError: at fit start, when the module has no ``validation_step``, or when no subset
            can be drawn (an iterable training dataset without ``dataset=``); after the first
            validation, when ``val_dataloader_idx`` is out of range or ``validation_step`` logs
            none of the requested metrics.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> gap = GeneralizationGapMonitor(subset_size=1024)
        >>> trainer = Trainer(callbacks=[gap], logger=False)
        >>> GeneralizationGapMonitor(subset_size=1024).state_key == gap.state_key
        True
        >>> GeneralizationGapMonitor(subset_size=256).state_key == gap.state_key  # own checkpoint
        False

    Logged metrics (``<m>`` is the validation name without ``val_``/``val/`` and without a
    ``/dataloader_idx_N`` suffix):
        - ``reg/train_eval/<m>``: the metric on the training subset, evaluated like validation.
        - ``reg/gap/<m>``: validation minus train_eval for losses, train_eval minus validation
          for scores, so that > 0 always means overfitting.
        - ``reg/gap_trend/<m>``: least-squares slope of the gap over the last ``window``
          evaluations (per evaluation).
        - ``reg/overfitting``: 1 while the diagnosis is "overfitting", else 0 (a new diagnosis
          is adopted once it holds for two evaluations in a row).
    """

    def __init__(
        self,
        subset_size: int = 1000,
        metrics: Sequence[str] | None = None,
        monitor: str | None = None,
        higher_is_better: Sequence[str] = (),
        dataset: Dataset | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        window: int = 5,
        patience: int = 3,
        log_text: bool = True,
        val_dataloader_idx: int = 0,
    ) -> None:
        if subset_size < 1:
            raise ValueError(f"`subset_size` must be >= 1, got {subset_size}.")
        if window < 2 or not 1 <= patience < window:
            raise ValueError(
                f"Need window >= 2 and 1 <= patience < window, got {window} and {patience}."
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if type(val_dataloader_idx) is not int or val_dataloader_idx < 0:
            raise ValueError(
                f"`val_dataloader_idx` must be an int >= 0, got {val_dataloader_idx!r}."
            )
        self.subset_size, self.seed = subset_size, seed
        self.val_dataloader_idx = val_dataloader_idx
        self.metrics = list(metrics) if metrics is not None else None
        self.monitor, self.higher_is_better = monitor, set(higher_is_better)
        names = [*(self.metrics or []), *([monitor] if monitor else []), *higher_is_better]
        for name in names:
            idx = split_dataloader_suffix(name)[1]
            if idx is not None and idx != val_dataloader_idx:
                raise ValueError(
                    f"{name!r} names validation dataloader {idx}, but the monitor compares with "
                    f"dataloader {val_dataloader_idx}: pass `val_dataloader_idx={idx}` or drop "
                    "the suffix."
                )
        self._wanted_names = (
            None if self.metrics is None else {split_dataloader_suffix(m)[0] for m in self.metrics}
        )
        self._higher = {split_dataloader_suffix(n)[0] for n in higher_is_better}
        self.dataset, self.batch_size = dataset, batch_size
        self.window, self.patience, self.log_text = window, patience, log_text
        # Lightning reads `state_key` at every hook call: built once
        self._state_key = self._generate_state_key(
            subset_size=subset_size, seed=seed, metrics=self.metrics, monitor=monitor,
            val_dataloader_idx=val_dataloader_idx,
        )  # fmt: skip
        self._reset_run()

    def _reset_run(self) -> None:
        """Forget everything of a previous fit (its history, its data)."""
        self.history: dict[str, dict[str, list[float]]] = {}
        self.diagnosis: Diagnosis = "warming up"
        self._candidate: Diagnosis = "warming up"
        self._streak = 0
        self.advice = ADVICE["warming up"].format(w=self.window)
        self._loader: DataLoader | None = None
        self._layout_written = False
        self._validations = 0  # validations of this fit so far (not sanity checks)
        self._evaluated: tuple[int, int] | None = None  # the validation the pass last ran for

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    def regularization_settings(self) -> dict[str, Any]:
        """This callback's settings, for the TensorBoard hparams view."""
        return {"GeneralizationGapMonitor/subset_size": self.subset_size}

    # ----------------------------------------------------------------------------- lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # A new fit starts clean; a resumed one gets its history back from the checkpoint, which
        # Lightning loads after `setup`.
        self._reset_run()
        if not is_overridden("validation_step", pl_module):
            raise RuntimeError(
                "GeneralizationGapMonitor runs your `validation_step` on a training subset after "
                f"each validation, but {type(pl_module).__name__} defines no `validation_step`. "
                "Add one that logs your validation metrics (e.g. `self.log('val_loss', loss)`), "
                "or remove the monitor."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The earliest hook where the train dataloader is loaded: a subset that cannot be drawn
        # fails here, before the first training step.
        self._subset_loader(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._loader = None  # nothing of this fit's data is kept

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._validations += 1

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.evaluate_after_validation(trainer, pl_module)

    # -------------------------------------------------------------------------------- the pass
    def evaluate_after_validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the pass for the latest validation of ``fit``, unless it already ran for it.

        Called by this monitor's own ``on_validation_end``. A callback that reads ``reg/gap/...``
        or ``reg/train_eval/...`` in its ``on_validation_end`` (such as
        :class:`lightning_reg.EarlyStopping` checking mid-epoch with ``val_check_interval < 1``)
        calls it first, so that it sees this validation's values whatever the order of the
        callbacks. It is idempotent: the pass runs once per validation, keyed on
        ``trainer.global_step`` and a count of validations. It does nothing during the sanity
        check, outside ``fit`` or before the first validation. Call it once the validation's
        metrics are in ``trainer.callback_metrics`` (``on_validation_end`` or later).

        Args:
            trainer: the running trainer.
            pl_module: the module being fitted.
        """
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        key = (trainer.global_step, self._validations)
        if self._validations == 0 or key == self._evaluated:
            return
        self._run_pass(trainer, pl_module)
        self._evaluated = key

    def _subset_loader(self, trainer: pl.Trainer) -> DataLoader:
        if self._loader is None:
            self._loader = train_subset_loader(
                "GeneralizationGapMonitor", trainer, self.dataset, self.subset_size, self.seed,
                self.batch_size,
            )  # fmt: skip
        return self._loader

    def _dataloader_idx(self, trainer: pl.Trainer) -> int | None:
        """The index the pass hands to ``validation_step``: ``None`` with one validation loader."""
        count = len(trainer.num_val_batches)
        if self.val_dataloader_idx >= max(count, 1):
            raise RuntimeError(
                f"GeneralizationGapMonitor: `val_dataloader_idx={self.val_dataloader_idx}`, but "
                f"there {'is' if count == 1 else 'are'} {count} validation dataloader(s)."
            )
        return self.val_dataloader_idx if count > 1 else None

    def _wanted(self, name: str) -> bool:
        return self._wanted_names is None or name in self._wanted_names

    def _run_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        idx = self._dataloader_idx(trainer)
        # the weights validation scored: the average, beside Lightning's weight averaging
        with validated_weights(trainer_callbacks(trainer), pl_module):
            train_values = evaluate_like_validation(
                trainer, pl_module, self._subset_loader(trainer), self._wanted, idx
            )
        pairs: dict[str, str] = {}  # logged name -> name without the dataloader suffix
        for name in train_values:
            if trainer.callback_metrics.get(name) is not None:
                pairs[name] = split_dataloader_suffix(name)[0]
        if not pairs:
            requested = self.metrics or "its metrics"
            raise RuntimeError(
                f"GeneralizationGapMonitor: validation_step logged none of {requested} on the "
                f"training subset (it logged {sorted(train_values)}); check `metrics=`."
            )
        scalars: dict[str, float] = {}
        for name, base in pairs.items():
            val = float(trainer.callback_metrics[name])
            scalars.update(self._record(base, val, float(train_values[name])))
        self._update_diagnosis(list(pairs.values()))
        scalars["reg/overfitting"] = float(self.diagnosis == "overfitting")
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scalars.items()})
        log_scalars(trainer, scalars)
        self._write_tensorboard(trainer, pairs)

    def _record(self, name: str, val: float, train: float) -> dict[str, float]:
        higher = name in self._higher or not lower_is_better(name)
        gap = (train - val) if higher else (val - train)
        series = self.history.setdefault(name, {"val": [], "train": [], "gap": []})
        for key, value in (("val", val), ("train", train), ("gap", gap)):
            series[key].append(value)
        short = short_name(name)
        return {
            f"reg/train_eval/{short}": train,
            f"reg/gap/{short}": gap,
            f"reg/gap_trend/{short}": trend(series["gap"][-self.window :]),
        }

    # ----------------------------------------------------------------------------- diagnosis
    def _primary(self, names: Sequence[str]) -> str:
        if self.monitor is not None:
            monitor = split_dataloader_suffix(self.monitor)[0]
            if monitor not in names:
                raise RuntimeError(
                    f"GeneralizationGapMonitor: `monitor={self.monitor!r}` is not among the "
                    f"compared metrics {list(names)}."
                )
            return monitor
        return next((n for n in names if short_name(n) == "loss"), names[0])

    def _update_diagnosis(self, names: list[str]) -> None:
        name = self._primary(names)
        series = self.history[name]
        higher = name in self._higher or not lower_is_better(name)
        candidate = diagnose(
            series["val"], series["train"], series["gap"], lower_better=not higher,
            window=self.window, patience=self.patience,
        )  # fmt: skip
        # A new diagnosis is adopted once it holds for two evaluations in a row, so a noisy
        # validation value near its best does not flip it back and forth.
        self._streak = self._streak + 1 if candidate == self._candidate else 1
        self._candidate = candidate
        settled = self.diagnosis == "warming up" or self._streak >= 2
        new = candidate if settled else self.diagnosis
        train = series["train"]
        self.advice = ADVICE[new].format(
            m=short_name(name), val=name, w=self.window, p=self.patience, t=train[-1],
            f=train[-1] / train[0] if train[0] else float("nan"),
        )  # fmt: skip
        if new != self.diagnosis:
            if new in ("overfitting", "underfitting"):
                rank_zero_warn(f"GeneralizationGapMonitor: {self.advice}", category=UserWarning)
            elif self.diagnosis != "warming up" or new != "healthy":
                rank_zero_info(f"GeneralizationGapMonitor: {self.advice}")
        self.diagnosis = new

    # --------------------------------------------------------------------------- TensorBoard
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Written before Lightning logs the module's hparams (right after this hook): TensorBoard
        # keeps the first hparams summary of a run, so ours, which includes the module's, wins.
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        params = {**dict(pl_module.hparams_initial), **regularization_settings(trainer)}
        names = self.metrics or ["val_loss"]
        kinds = ("gap", "train_eval")
        tags = [f"reg/{kind}/{short_name(n)}" for n in names for kind in kinds]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_hparams(writer, params, [*tags, "reg/overfitting"])

    def _write_tensorboard(self, trainer: pl.Trainer, pairs: dict[str, str]) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        if not self._layout_written:
            write_layout(writer, gap_layout({short_name(name): name for name in pairs}))
            self._layout_written = True
        if self.log_text:
            rows = "\n".join(f"| {k} | {v} |" for k, v in regularization_settings(trainer).items())
            card = (
                f"**Diagnosis (epoch {trainer.current_epoch}): {self.diagnosis}**\n\n{self.advice}"
                f"\n\n| setting | value |\n|---|---|\n{rows}"
            )
            write_text(writer, "reg/diagnosis", card, trainer.global_step)

    # ----------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history, "diagnosis": self.diagnosis, "candidate": self._candidate,
            "streak": self._streak,
        }  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = state_dict.get("history", {})
        self.diagnosis = state_dict.get("diagnosis", "warming up")
        self._candidate = state_dict.get("candidate", self.diagnosis)
        self._streak = int(state_dict.get("streak", 0))
