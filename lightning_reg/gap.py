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
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from typing_extensions import override

from lightning_reg._eval_pass import evaluate_like_validation
from lightning_reg.tensorboard import (
    gap_layout,
    log_scalars,
    regularization_settings,
    tensorboard_writer,
    write_hparams,
    write_layout,
    write_text,
)

__all__ = ["Diagnosis", "GeneralizationGapMonitor", "diagnose", "short_name"]

Diagnosis = Literal["warming up", "healthy", "overfitting", "underfitting"]
_LOWER_IS_BETTER = ("loss", "err", "mse", "mae", "rmse", "nll", "perplexity", "ce", "bpd")
_ADVICE = {
    "overfitting": (
        "{val} has not improved for {p} or more evaluations and the gap on {m} has grown since "
        "its best: the model is overfitting. Strengthen regularization: raise weight decay or "
        "dropout, add Mixup/CutMix or label smoothing or more data augmentation, or stop earlier "
        "(lightning_reg.EarlyStopping restores the best weights)."
    ),
    "underfitting": (
        "train_eval {m} is high ({t:.4g}, {f:.0%} of its first value) and flat over the last {w} "
        "evaluations, with a small gap: the model is underfitting. Weaken regularization (lower "
        "weight decay, dropout, mixup alpha or label smoothing), train longer or with a higher "
        "learning rate, or use a larger model."
    ),
    "healthy": "The gap on {m} is stable and {val} is still improving or holding: healthy.",
    "warming up": "Collecting evaluations: a diagnosis needs {w} of them.",
}


def short_name(name: str) -> str:
    """The metric's name without its validation prefix: ``val_loss`` -> ``loss``."""
    for prefix in ("val_", "val/", "validation_", "validation/", "valid_", "valid/"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def lower_is_better(name: str) -> bool:
    """Guess a metric's direction from its name (losses and errors go down)."""
    words = short_name(name).lower().replace("/", "_").split("_")
    return any(w in _LOWER_IS_BETTER or w.endswith("loss") for w in words)


def trend(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` per evaluation (0 for fewer than two)."""
    if len(values) < 2:
        return 0.0
    x = np.arange(len(values), dtype=float)
    return float(np.polyfit(x, np.asarray(values, dtype=float), 1)[0])


def diagnose(
    val: Sequence[float],
    train: Sequence[float],
    gap: Sequence[float],
    *,
    lower_better: bool = True,
    window: int = 5,
    patience: int = 3,
    growth_tolerance: float = 0.05,
    flat_tolerance: float = 0.02,
    underfit_fraction: float = 0.5,
) -> Diagnosis:
    """Plain-words diagnosis from the history of one metric (oldest first).

    - ``overfitting``: the validation value has not improved on its best for the last
      ``patience`` evaluations, the gap has grown since that best evaluation by more than
      ``growth_tolerance`` times the metric's scale, and the train value has improved since then
      (by more than ``flat_tolerance``, relative): the model keeps fitting the training set
      without generalizing. It stays so until validation improves again.
    - ``underfitting`` (lower-is-better metrics): the train value moved by less than
      ``flat_tolerance`` (relative) over the window, is still above ``underfit_fraction`` of its
      first value, and the gap is under 10% of it.
    - ``healthy`` otherwise; ``warming up`` until ``window`` evaluations exist.

    Example:
        >>> val = [1.0, 0.8, 0.7, 0.72, 0.75, 0.8, 0.9]
        >>> train = [1.0, 0.7, 0.5, 0.35, 0.2, 0.1, 0.05]
        >>> gap = [v - t for v, t in zip(val, train)]
        >>> diagnose(val, train, gap)
        'overfitting'
    """
    if len(gap) < window:
        return "warming up"
    scale = max(float(np.mean(np.abs(val[-window:]))), 1e-12)
    sign = 1.0 if lower_better else -1.0
    best = int(np.argmin([sign * v for v in val]))
    stalled = len(val) - 1 - best >= patience
    grown = gap[-1] - gap[best] > growth_tolerance * scale
    fitting = sign * (train[best] - train[-1]) > flat_tolerance * max(abs(train[best]), 1e-12)
    if stalled and grown and fitting:
        return "overfitting"
    if lower_better:
        recent = train[-window:]
        flat = abs(recent[0] - recent[-1]) <= flat_tolerance * max(abs(recent[0]), 1e-12)
        high = recent[-1] > underfit_fraction * train[0]
        small_gap = abs(gap[-1]) < 0.1 * max(abs(recent[-1]), 1e-12)
        if flat and high and small_gap:
            return "underfitting"
    return "healthy"


class GeneralizationGapMonitor(Callback):
    """Log the honest train/val gap after every validation, its trend, and a diagnosis.

    After each (non-sanity) validation, your own ``validation_step`` runs on a fixed, seeded subset
    of the training set, in eval mode and without gradients, with the weights that were just
    validated. Nothing it logs reaches Lightning's validation results, and torchmetrics objects it
    updates are saved and restored around the pass. Batches go through the same device transfer
    as validation batches, so ``Mixup``/``LabelSmoothing`` never touch them. Under DDP each rank
    evaluates its own part of the subset (no duplicates) and the values are reduced with
    torchmetrics, so they equal a single-process evaluation.

    If your training *dataset* applies random augmentation itself (torchvision transforms), pass
    ``dataset=`` with the validation transforms: the subset must be evaluated like validation.

    Args:
        subset_size: number of training samples evaluated per validation.
        metrics: validation metric names to compare (default: every metric ``validation_step``
            logs).
        monitor: the metric the diagnosis is based on (default: ``val_loss`` if logged, else the
            first one).
        higher_is_better: names of metrics where higher is better (default: guessed from the
            name: losses and errors go down, everything else up).
        dataset: the training data to sample from (default: the train dataloader's dataset).
        batch_size: batch size of the pass (default: the train dataloader's).
        seed: seed of the subset's indices.
        window: evaluations the trend and the diagnosis look at.
        patience: evaluations without validation improvement that count as stalled.
        log_text: write the diagnosis as a TensorBoard text card.

    With a ``TensorBoardLogger``: the run's hparams (the module's plus every regularization
    setting, with the gap metrics of ``metrics``, default ``val_loss``, as hparams metrics), a
    custom-scalars layout (train_eval and val on one chart, the gap on another, per metric) and a
    text card with the configuration and the latest diagnosis are written on rank 0.

    Raises:
        ValueError: for a bad ``subset_size``, ``window`` or ``patience``.
        RuntimeError: when no subset can be drawn (iterable dataset without ``dataset=``), or when
            ``validation_step`` logs none of the requested metrics.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> gap = GeneralizationGapMonitor(subset_size=1024)
        >>> trainer = Trainer(callbacks=[gap], logger=False)

    Logged metrics (``<m>`` is the validation name without ``val_``/``val/``):
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
    ) -> None:
        if subset_size < 1:
            raise ValueError(f"`subset_size` must be >= 1, got {subset_size}.")
        if window < 2 or not 1 <= patience < window:
            raise ValueError(
                f"Need window >= 2 and 1 <= patience < window, got {window} and {patience}."
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        self.subset_size, self.seed = subset_size, seed
        self.metrics = list(metrics) if metrics is not None else None
        self.monitor, self.higher_is_better = monitor, set(higher_is_better)
        self.dataset, self.batch_size = dataset, batch_size
        self.window, self.patience, self.log_text = window, patience, log_text
        self.history: dict[str, dict[str, list[float]]] = {}
        self.diagnosis: Diagnosis = "warming up"
        self._candidate: Diagnosis = "warming up"
        self._streak = 0
        self.advice = _ADVICE["warming up"].format(w=window)
        self._loader: DataLoader | None = None
        self._layout_written = False

    def regularization_settings(self) -> dict[str, Any]:
        """This callback's settings, for the TensorBoard hparams view."""
        return {"GeneralizationGapMonitor/subset_size": self.subset_size}

    # -------------------------------------------------------------------------------- the pass
    def _subset_loader(self, trainer: pl.Trainer) -> DataLoader:
        if self._loader is not None:
            return self._loader
        train_loader = trainer.train_dataloader
        dataset: Any = self.dataset
        if dataset is None:
            dataset = getattr(train_loader, "dataset", None)
        if not hasattr(dataset, "__len__") or isinstance(dataset, IterableDataset):
            raise RuntimeError(
                "GeneralizationGapMonitor needs a map-style training dataset to draw a fixed "
                "subset from; pass `dataset=` (the training data with validation transforms)."
            )
        n = min(self.subset_size, len(dataset))
        if n < trainer.world_size:
            raise RuntimeError(
                f"The subset ({n} samples) is smaller than the {trainer.world_size} ranks."
            )
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))
        indices = order[:n][trainer.global_rank :: trainer.world_size].tolist()
        self._loader = DataLoader(
            Subset(dataset, indices),
            batch_size=self.batch_size or getattr(train_loader, "batch_size", None) or 64,
            shuffle=False,
            collate_fn=getattr(train_loader, "collate_fn", None),
            # its own generator: iterating must not consume the global RNG that training uses
            generator=torch.Generator().manual_seed(self.seed),
        )
        return self._loader

    def _wanted(self, name: str) -> bool:
        return self.metrics is None or name in self.metrics

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        train_values = evaluate_like_validation(
            trainer, pl_module, self._subset_loader(trainer), self._wanted
        )
        val_values = {n: trainer.callback_metrics.get(n) for n in train_values}
        pairs = {n: short_name(n) for n, v in val_values.items() if v is not None}
        if not pairs:
            raise RuntimeError(
                "GeneralizationGapMonitor: validation_step logged none of "
                f"{self.metrics or 'its metrics'} on the training subset; check `metrics=`."
            )
        scalars: dict[str, float] = {}
        for name, short in pairs.items():
            val, train = float(val_values[name]), float(train_values[name])  # type: ignore[arg-type]
            scalars.update(self._record(name, short, val, train))
        self._update_diagnosis(pairs)
        scalars["reg/overfitting"] = float(self.diagnosis == "overfitting")
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scalars.items()})
        log_scalars(trainer, scalars)
        self._write_tensorboard(trainer, pairs)

    def _record(self, name: str, short: str, val: float, train: float) -> dict[str, float]:
        higher = name in self.higher_is_better or not lower_is_better(name)
        gap = (train - val) if higher else (val - train)
        series = self.history.setdefault(name, {"val": [], "train": [], "gap": []})
        for key, value in (("val", val), ("train", train), ("gap", gap)):
            series[key].append(value)
        return {
            f"reg/train_eval/{short}": train,
            f"reg/gap/{short}": gap,
            f"reg/gap_trend/{short}": trend(series["gap"][-self.window :]),
        }

    # ----------------------------------------------------------------------------- diagnosis
    def _primary(self, names: Sequence[str]) -> str:
        if self.monitor is not None:
            if self.monitor not in names:
                raise RuntimeError(
                    f"GeneralizationGapMonitor: `monitor={self.monitor!r}` is not among the "
                    f"compared metrics {list(names)}."
                )
            return self.monitor
        return next((n for n in names if short_name(n) == "loss"), names[0])

    def _update_diagnosis(self, pairs: dict[str, str]) -> None:
        name = self._primary(list(pairs))
        series = self.history[name]
        higher = name in self.higher_is_better or not lower_is_better(name)
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
        self.advice = _ADVICE[new].format(
            m=pairs[name], val=name, w=self.window, p=self.patience, t=train[-1],
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
            write_layout(writer, gap_layout({short: name for name, short in pairs.items()}))
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
        return {"history": self.history, "diagnosis": self.diagnosis}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = state_dict.get("history", {})
        self.diagnosis = state_dict.get("diagnosis", "warming up")
