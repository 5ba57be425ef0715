"""Expected calibration error and reliability-diagram bins: pure functions, no Lightning.

The definition is torchmetrics' ``MulticlassCalibrationError(norm="l1")`` (top-label calibration
error, Guo et al. 2017): the top-label confidence ``max_k p_k`` of each sample falls into one of
``n_bins`` equal-width bins ``[i / n_bins, (i + 1) / n_bins)`` (a confidence of exactly 1 gets a bin
of its own, as in torchmetrics); the error is the sample-weighted mean, over the bins, of
``|accuracy(bin) - mean confidence(bin)|``. Inputs with a value outside ``[0, 1]`` are logits and
go through a softmax first, as in torchmetrics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["CalibrationBins", "calibration_bins", "expected_calibration_error", "to_probabilities"]


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


def to_probabilities(probs_or_logits: Tensor) -> Tensor:
    """Class probabilities of ``(N, C)`` rows: a softmax unless every value is in ``[0, 1]``.

    The same rule as torchmetrics (``normalize_logits_if_needed``); computed in float32 at least.

    Raises:
        ValueError: if the input is not a floating ``(N, C)`` tensor with ``C >= 2``.
    """
    if not probs_or_logits.is_floating_point() or probs_or_logits.ndim != 2:
        raise ValueError(
            "Expected `(N, C)` floating-point class probabilities or logits, got a "
            f"{tuple(probs_or_logits.shape)} tensor of {probs_or_logits.dtype}."
        )
    if probs_or_logits.shape[1] < 2:
        raise ValueError(
            f"Expected at least 2 classes (columns), got {probs_or_logits.shape[1]}: calibration "
            "error here is for multiclass outputs (give two columns for a binary classifier)."
        )
    values = probs_or_logits.float() if probs_or_logits.dtype != torch.float64 else probs_or_logits
    probability = ((values >= 0) & (values <= 1)).all()
    return torch.where(probability, values, values.softmax(dim=1))


def _confidences_and_hits(probs_or_logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
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
    confidence, prediction = to_probabilities(probs_or_logits).max(dim=1)
    return confidence, prediction.eq(targets.to(prediction.device)).to(confidence.dtype)


def calibration_bins(probs_or_logits: Tensor, targets: Tensor, n_bins: int = 15) -> CalibrationBins:
    """Reliability-diagram statistics of equal-width top-label confidence bins.

    Args:
        probs_or_logits: ``(N, C)`` class probabilities or logits.
        targets: ``(N,)`` class indices.
        n_bins: number of equal-width bins over ``[0, 1]``.

    Raises:
        ValueError: for a bad ``n_bins`` or inputs of the wrong shape or type.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
        >>> bins = calibration_bins(probs, torch.tensor([0, 1, 1]), n_bins=2)
        >>> bins.samples.tolist(), [round(a, 4) for a in bins.accuracy.tolist()]
        ([0.0, 3.0, 0.0], [0.0, 0.6667, 0.0])
    """
    if type(n_bins) is not int or n_bins < 1:
        raise ValueError(f"`n_bins` must be an int >= 1, got {n_bins!r}.")
    confidence, hits = _confidences_and_hits(probs_or_logits, targets)
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
    probs_or_logits: Tensor, targets: Tensor, n_bins: int = 15
) -> Tensor:
    """Expected (top-label, L1) calibration error, as torchmetrics' ``MulticlassCalibrationError``.

    Args:
        probs_or_logits: ``(N, C)`` class probabilities or logits (softmax applied when any value
            is outside ``[0, 1]``).
        targets: ``(N,)`` class indices.
        n_bins: number of equal-width confidence bins.

    Returns:
        A scalar tensor in ``[0, 1]``; 0 for a perfectly calibrated model.

    Raises:
        ValueError: for a bad ``n_bins``, targets that are not ``(N,)`` class indices, or
            predictions that are not ``(N, C)`` floating rows with ``C >= 2``.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
        >>> # 15 bins: |1 - 0.9|, |0 - 0.6| and |1 - 0.7|, one sample each
        >>> round(expected_calibration_error(probs, torch.tensor([0, 1, 1])).item(), 4)
        0.3333
    """
    bins = calibration_bins(probs_or_logits, targets, n_bins)
    weight = bins.samples / bins.samples.sum()
    return ((bins.accuracy - bins.confidence).abs() * weight).sum()
