"""Label smoothing as soft targets, so an unchanged ``F.cross_entropy`` step trains on them.

Method card:
    What it does: replaces the one-hot target by ``(1 - smoothing) * one_hot + smoothing / C``,
    which keeps the logits from growing without bound on (possibly mislabeled) examples.
    Suggested values: 0.1 (ImageNet recipes); up to 0.2-0.3 with noisy labels.
    When it hurts: it makes probabilities less calibrated for knowledge distillation teachers, and
    it can raise membership-inference leakage even when it narrows the train/val gap.

The math (:func:`~lightning_reg.mixing.smooth_targets`) lives in :mod:`lightning_reg.mixing`;
this module is the callback that applies it to training batches.
"""

from __future__ import annotations

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from lightning_reg._batch import BatchAdapter, GetBatch, SetBatch, TrainBatchTransform
from lightning_reg.mixing import MixPlan, smooth_targets, smoothed_rows

__all__ = ["LabelSmoothing", "smooth_targets"]

_TABLE_CLASSES = 1024  # a table of smoothed rows holds at most 1024 x 1024 values


class LabelSmoothing(TrainBatchTransform):
    """Replace the targets of every training batch by smoothed probability rows.

    The batch is changed in place in ``on_train_batch_start`` (Lightning passes that same object
    to ``training_step``): the targets entry of a list or a dict (``[x, y]``,
    ``{"pixel_values": x, "labels": y}``) is replaced; tuples and other immutable batches are
    refused at the first batch. Validation, test and predict batches are untouched, so
    validation metrics still see the hard labels, and nothing is set on the module or the
    datamodule. ``F.cross_entropy(logits, targets)`` accepts the soft rows as they are. To
    combine with :class:`~lightning_reg.Mixup`, pass ``label_smoothing=`` to ``Mixup`` instead
    (smoothing is then applied once, fused with the mixing).

    Args:
        smoothing: mass spread uniformly over all classes, in ``[0, 1)``.
        num_classes: number of classes; required for integer targets.
        keep_targets: leave the integer targets in the batch; ``RegularizedModule.cross_entropy``
            then applies the smoothing (for modules that need the labels, e.g. for metrics).
        input_key: where the inputs are in the batch (index or key; see ``BatchAdapter``).
        target_key: where the targets are.
        get_batch: a function ``batch -> (inputs, targets)`` for other layouts.
        set_batch: a function ``(batch, inputs, targets) -> None`` that changes ``batch`` in
            place (see :class:`~lightning_reg.BatchAdapter`).

    Raises:
        ValueError: for a bad ``smoothing`` or ``num_classes`` (in ``__init__``); at the first
            training batch, for integer targets without ``num_classes``, soft targets whose
            width is not ``num_classes``, or (on CPU) a label outside ``[0, num_classes)``.
        TypeError: at the first training batch, for a batch that cannot be changed in place.
        RuntimeError: in ``setup``, when another training-batch transform is attached.

    When the user's loss then fails because the model's number of classes is not
    ``num_classes``, the exception gets a note naming ``num_classes`` and the fix.

    Example:
        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> smoothing = LabelSmoothing(0.1, num_classes=10)
        >>> trainer = Trainer(callbacks=[smoothing], logger=False)
        >>> batch = [torch.zeros(2, 5), torch.tensor([0, 9])]  # what training_step would get
        >>> smoothing.on_train_batch_start(trainer, None, batch, 0)
        >>> batch[1][:, [0, 9]]
        tensor([[0.9100, 0.0100],
                [0.0100, 0.9100]])

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
        self._identity: MixPlan | None = None  # the last batch size's plan, reused

    def regularization_settings(self) -> dict[str, float]:
        """This callback's settings, for the TensorBoard hparams view."""
        return {"LabelSmoothing/smoothing": self.smoothing}

    @override
    def reset(self) -> None:
        """Start a fit afresh: forget the previous fit's batch-size plan."""
        super().reset()
        self._identity = None

    @override
    def transform(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Tensor, targets: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Return the training batch's inputs and smoothed targets (or its labels, if kept)."""
        plan = self._plan_for(targets)
        self._plan = plan
        return (inputs, targets) if self.keep_targets else (inputs, plan.targets(targets))

    def _plan_for(self, targets: Tensor) -> MixPlan:
        """A smoothing-only plan with a table of smoothed rows, kept while nothing changes."""
        n, classes, smoothing = targets.shape[0], self.num_classes, self.smoothing
        plan = self._identity
        rows = None if plan is None else plan.class_rows
        if (
            plan is None
            or plan.perm.shape[0] != n
            or plan.num_classes != classes
            or plan.smoothing != smoothing
            or (rows is not None and rows.device != targets.device)
        ):
            plan = self._identity = MixPlan.identity(n, classes, smoothing)
            if classes is not None and classes <= _TABLE_CLASSES:
                plan.class_rows = smoothed_rows(classes, smoothing, targets.device)
        return plan

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit":
            self._identity = None  # no device tensors kept after fit

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._identity = None
