"""Label smoothing as soft targets, so an unchanged ``F.cross_entropy`` step trains on them.

Method card:
    What it does: replaces the one-hot target by ``(1 - smoothing) * one_hot + smoothing / C``,
    which keeps the logits from growing without bound on (possibly mislabeled) examples.
    Suggested values: 0.1 (ImageNet recipes); up to 0.2-0.3 with noisy labels.
    When it hurts: it makes probabilities less calibrated for knowledge distillation teachers, and
    it can raise membership-inference leakage even when it narrows the train/val gap.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_reg._batch import BatchAdapter, GetBatch, SetBatch, TrainBatchTransform

__all__ = ["LabelSmoothing", "smooth_targets"]


def smooth_targets(targets: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """Turn integer class targets ``(N,)`` into smoothed probability rows ``(N, num_classes)``.

    Built with ``scatter_`` rather than ``F.one_hot``, which checks the class range on the host
    (a device synchronisation per call). Already-soft targets ``(N, C)`` are returned as they are.

    Args:
        targets: integer class indices, or float probability rows.
        num_classes: number of classes ``C``.
        smoothing: mass spread uniformly over all classes, in ``[0, 1)``.

    Raises:
        ValueError: for a bad ``smoothing``/``num_classes`` or targets of another shape.

    Example:
        >>> smooth_targets(torch.tensor([0, 2]), num_classes=3, smoothing=0.3)
        tensor([[0.8000, 0.1000, 0.1000],
                [0.1000, 0.1000, 0.8000]])
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"`smoothing` must be in [0, 1), got {smoothing}.")
    if targets.is_floating_point():
        if targets.ndim != 2:
            raise ValueError(
                f"Soft targets must have shape (N, C), got {tuple(targets.shape)}; integer class "
                "targets must have shape (N,)."
            )
        if num_classes and targets.shape[1] != num_classes:
            raise ValueError(
                f"Soft targets have {targets.shape[1]} columns but num_classes={num_classes}."
            )
        return targets
    if targets.ndim != 1:
        raise ValueError(
            f"Class targets must have shape (N,), got {tuple(targets.shape)}. Mixup and label "
            "smoothing here handle classification (one label per sample)."
        )
    if num_classes is None or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
    off = smoothing / num_classes
    soft = torch.full((targets.shape[0], num_classes), off, device=targets.device)
    return soft.scatter_(1, targets.unsqueeze(1), 1.0 - smoothing + off)


def smoothed_rows(num_classes: int, smoothing: float, device: torch.device) -> Tensor:
    """A ``C x C`` table whose row ``c`` is ``smooth_targets`` of class ``c``.

    A callback keeps one and indexes it (``rows.index_select(0, targets)``): one op per batch
    instead of two, with the same values.
    """
    return smooth_targets(torch.arange(num_classes, device=device), num_classes, smoothing)


class LabelSmoothing(TrainBatchTransform):
    """Replace the targets of every training batch by smoothed probability rows.

    Validation, test and predict batches are untouched, so validation metrics still see the hard
    labels. ``F.cross_entropy(logits, targets)`` accepts the soft rows as they are. To combine with
    :class:`~lightning_reg.Mixup`, pass ``label_smoothing=`` to ``Mixup`` instead (smoothing is
    then applied once, fused with the mixing).

    Args:
        smoothing: mass spread uniformly over all classes, in ``[0, 1)``.
        num_classes: number of classes.
        keep_targets: leave the integer targets in the batch; ``RegularizedModule.cross_entropy``
            then applies the smoothing (for modules that need the labels, e.g. for metrics).
        input_key: where the inputs are in the batch (index or key; see ``BatchAdapter``).
        target_key: where the targets are.
        get_batch: a function ``batch -> (inputs, targets)`` for other layouts.
        set_batch: a function ``(batch, inputs, targets) -> new batch``.

    Raises:
        ValueError: for a bad ``smoothing`` or ``num_classes``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[LabelSmoothing(0.1, num_classes=10)], logger=False)

    Logged metrics:
        None.
    """

    def __init__(
        self,
        smoothing: float = 0.1,
        num_classes: int | None = None,
        *,
        keep_targets: bool = False,
        input_key: int | str | None = None,
        target_key: int | str | None = None,
        get_batch: GetBatch | None = None,
        set_batch: SetBatch | None = None,
    ) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"`smoothing` must be in [0, 1), got {smoothing}.")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2, got {num_classes}.")
        super().__init__(BatchAdapter(input_key, target_key, get_batch, set_batch))
        self.smoothing, self.num_classes, self.keep_targets = smoothing, num_classes, keep_targets

    def regularization_settings(self) -> dict[str, float]:
        """This callback's settings, for the TensorBoard hparams view."""
        return {"LabelSmoothing/smoothing": self.smoothing}

    def transform(self, trainer, pl_module, inputs, targets):  # type: ignore[no-untyped-def]  # noqa: D102
        from lightning_reg.mixup import MixPlan, publish_plan

        plan = MixPlan.identity(targets.shape[0], self.num_classes, self.smoothing)
        if self.keep_targets:
            publish_plan(pl_module, plan)
            return inputs, targets
        return inputs, plan.targets(targets)
