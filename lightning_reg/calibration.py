"""Expected calibration error and reliability-diagram bins: pure functions, no Lightning.

The definition is torchmetrics' ``MulticlassCalibrationError(norm="l1")`` (top-label calibration
error, Guo et al. 2017): the top-label confidence ``max_k p_k`` of each sample falls into one of
``n_bins`` equal-width bins ``[i / n_bins, (i + 1) / n_bins)`` (a confidence of exactly 1 gets a bin
of its own, as in torchmetrics); the error is the sample-weighted mean, over the bins, of
``|accuracy(bin) - mean confidence(bin)|``. Inputs are logits (a softmax is applied) unless
``outputs="probs"`` says they are probabilities; the caller decides, not the values (torchmetrics
guesses from the value range, which takes logits that happen to lie in ``[0, 1]`` for
probabilities).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "CalibrationBins",
    "ClassOutputs",
    "calibration_bins",
    "check_class_outputs",
    "expected_calibration_error",
    "to_probabilities",
]

ClassOutputs = Literal["logits", "probs"]
"""What the predictions are: class logits (a softmax is applied) or class probabilities."""


class CalibrationBins(NamedTuple):
    """Per-bin statistics of a reliability diagram (``n_bins + 1`` entries, the last for 1.0).

    Attributes:
        lower: lower edge of each bin (the last entry is 1.0, the bin of confidences equal to 1).
        samples: number of samples in each bin.
        confidence: mean top-label confidence in each bin (0 for an empty bin).
        accuracy: fraction of correct top-label predictions in each bin (0 for an empty bin).
    """

    lower: Tensor
    samples: Tensor
    confidence: Tensor
    accuracy: Tensor


def to_probabilities(values: Tensor, outputs: ClassOutputs = "logits") -> Tensor:
    """Class probabilities of ``(N, C)`` rows: a softmax of logits, or the probabilities checked.

    Computed in float32 at least. Reads one flag on the host (:func:`check_class_outputs`).

    Raises:
        ValueError: if the input is not a floating ``(N, C)`` tensor with ``C >= 2``, or does
            not match ``outputs`` (see :func:`check_class_outputs`).
    """
    if outputs not in ("logits", "probs"):
        raise ValueError(f"`outputs` must be 'logits' or 'probs', got {outputs!r}.")
    if not values.is_floating_point() or values.ndim != 2:
        raise ValueError(
            "Expected `(N, C)` floating-point class probabilities or logits, got a "
            f"{tuple(values.shape)} tensor of {values.dtype}."
        )
    if values.shape[1] < 2:
        raise ValueError(
            f"Expected at least 2 classes (columns), got {values.shape[1]}: calibration "
            "error here is for multiclass outputs (give two columns for a binary classifier)."
        )
    values = values.float() if values.dtype != torch.float64 else values
    check_class_outputs(values, outputs)
    return values if outputs == "probs" else values.softmax(dim=1)


def check_class_outputs(values: Tensor, outputs: ClassOutputs, tolerance: float = 1e-2) -> None:
    """Refuse ``(N, C)`` values that contradict ``outputs`` (one read on the host).

    ``"probs"`` must lie in ``[0, 1]``; ``"logits"`` whose rows all lie in ``[0, 1]`` and sum to
    1 (within ``tolerance``) are probabilities, and a softmax of them would be wrong.
    """
    with torch.no_grad():
        values = values.detach()
        in_unit = ((values >= 0) & (values <= 1)).all()
        if outputs == "probs":
            if not bool(in_unit):
                raise ValueError(
                    "Expected class probabilities (`outputs='probs'`), but some values lie "
                    "outside [0, 1]. Pass `outputs='logits'` for unnormalised scores."
                )
            return
        rows_sum_to_one = ((values.float().sum(1) - 1).abs() <= tolerance).all()
        if bool(in_unit & rows_sum_to_one):
            raise ValueError(
                "Expected class logits (`outputs='logits'`), but every row lies in [0, 1] and "
                "sums to 1: these are probabilities, and a softmax of them would flatten them. "
                "Pass `outputs='probs'` (or give the logits, before the softmax)."
            )


def _confidences_and_hits(
    probs_or_logits: Tensor, targets: Tensor, outputs: ClassOutputs
) -> tuple[Tensor, Tensor]:
    if targets.is_floating_point() or targets.ndim != 1:
        raise ValueError(
            "Expected targets of class indices, an integer tensor of shape (N,), got a "
            f"{tuple(targets.shape)} tensor of {targets.dtype}. Soft targets (probability rows "
            "from mixup or label smoothing) have no single true class: score the hard labels."
        )
    if targets.shape[0] != probs_or_logits.shape[0]:
        raise ValueError(
            f"Got {probs_or_logits.shape[0]} prediction rows but {targets.shape[0]} targets."
        )
    confidence, prediction = to_probabilities(probs_or_logits, outputs).max(dim=1)
    return confidence, prediction.eq(targets.to(prediction.device)).to(confidence.dtype)


def calibration_bins(
    probs_or_logits: Tensor, targets: Tensor, n_bins: int = 15, outputs: ClassOutputs = "logits"
) -> CalibrationBins:
    """Reliability-diagram statistics of equal-width top-label confidence bins.

    Args:
        probs_or_logits: ``(N, C)`` class logits, or probabilities with ``outputs="probs"``.
        targets: ``(N,)`` class indices.
        n_bins: number of equal-width bins over ``[0, 1]``.
        outputs: ``"logits"`` (a softmax is applied) or ``"probs"``.

    Raises:
        ValueError: for a bad ``n_bins``, inputs of the wrong shape or type, or values that
            contradict ``outputs`` (see :func:`check_class_outputs`).

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
        >>> bins = calibration_bins(probs, torch.tensor([0, 1, 1]), n_bins=2, outputs="probs")
        >>> bins.samples.tolist(), [round(a, 4) for a in bins.accuracy.tolist()]
        ([0.0, 3.0, 0.0], [0.0, 0.6667, 0.0])
    """
    if type(n_bins) is not int or n_bins < 1:
        raise ValueError(f"`n_bins` must be an int >= 1, got {n_bins!r}.")
    confidence, hits = _confidences_and_hits(probs_or_logits, targets, outputs)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype, device=confidence.device)
    index = torch.bucketize(confidence, edges, right=True) - 1  # 1.0 lands in bin n_bins
    count = torch.zeros_like(edges).scatter_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros_like(edges).scatter_add_(0, index, confidence)
    hit_sum = torch.zeros_like(edges).scatter_add_(0, index, hits)
    return CalibrationBins(
        lower=edges,
        samples=count,
        confidence=torch.nan_to_num(conf_sum / count),
        accuracy=torch.nan_to_num(hit_sum / count),
    )


def expected_calibration_error(
    probs_or_logits: Tensor, targets: Tensor, n_bins: int = 15, outputs: ClassOutputs = "logits"
) -> Tensor:
    """Expected (top-label, L1) calibration error, as torchmetrics' ``MulticlassCalibrationError``.

    Args:
        probs_or_logits: ``(N, C)`` class logits, or probabilities with ``outputs="probs"``.
        targets: ``(N,)`` class indices.
        n_bins: number of equal-width confidence bins.
        outputs: ``"logits"`` (a softmax is applied, whatever the values) or ``"probs"``.

    Returns:
        A scalar tensor in ``[0, 1]``; 0 for a perfectly calibrated model.

    Raises:
        ValueError: for a bad ``n_bins``, targets that are not ``(N,)`` class indices,
            predictions that are not ``(N, C)`` floating rows with ``C >= 2``, or values that
            contradict ``outputs``: probabilities outside ``[0, 1]``, or "logits" whose rows all
            lie in ``[0, 1]`` and sum to 1 (probabilities: pass ``outputs="probs"``).

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
        >>> # 15 bins: |1 - 0.9|, |0 - 0.6| and |1 - 0.7|, one sample each
        >>> targets = torch.tensor([0, 1, 1])
        >>> round(expected_calibration_error(probs, targets, outputs="probs").item(), 4)
        0.3333
    """
    bins = calibration_bins(probs_or_logits, targets, n_bins, outputs)
    weight = bins.samples / bins.samples.sum()
    return ((bins.accuracy - bins.confidence).abs() * weight).sum()
