"""The gap monitor's functional core: metric names, trend and the plain-words diagnosis.

No Lightning import: these functions take plain sequences of values (oldest first) and are what
:class:`lightning_reg.GeneralizationGapMonitor` applies after every validation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = [
    "ADVICE", "Diagnosis", "diagnose", "lower_is_better", "short_name", "split_dataloader_suffix",
    "trend",
]  # fmt: skip

Diagnosis = Literal["warming up", "healthy", "overfitting", "underfitting"]
_LOWER_IS_BETTER = ("loss", "err", "mse", "mae", "rmse", "nll", "perplexity", "ce", "bpd")
ADVICE = {
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


_SUFFIX = re.compile(r"/dataloader_idx_(\d+)$")


def split_dataloader_suffix(name: str) -> tuple[str, int | None]:
    """A logged name and the dataloader index of its ``/dataloader_idx_N`` suffix, if any.

    Example:
        >>> split_dataloader_suffix("val_loss/dataloader_idx_1"), split_dataloader_suffix("val_acc")
        (('val_loss', 1), ('val_acc', None))
    """
    match = _SUFFIX.search(name)
    return (name[: match.start()], int(match.group(1))) if match else (name, None)


def short_name(name: str) -> str:
    """The metric's name without validation prefix and dataloader suffix: ``val_loss`` -> ``loss``.

    Example:
        >>> short_name("val_loss"), short_name("val/acc/dataloader_idx_0")
        ('loss', 'acc')
    """
    name = split_dataloader_suffix(name)[0]
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
