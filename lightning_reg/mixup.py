"""Mixup and CutMix, fused with label smoothing, for an unchanged ``F.cross_entropy`` step.

Method card:
    What it does: trains on convex combinations of pairs of examples (mixup, Zhang et al. 2018)
    or on images with a rectangle pasted from another image (CutMix, Yun et al. 2019); the target
    is mixed with the same coefficient (the pasted area for CutMix), with label smoothing fused
    in so it is applied once.
    Suggested values: ``mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
    label_smoothing=0.1`` (DeiT/timm ImageNet recipe); ``mixup_alpha=0.2`` for small data sets.
    When it hurts: short schedules and small models underfit with it; switch it off for the last
    epochs (``off_epoch``/``off_fraction``) as strong recipes do.

The math (:func:`~lightning_reg.mixing.draw_mix_plan`, :func:`~lightning_reg.mixing.mix_inputs`,
:func:`~lightning_reg.mixing.mixup_batch`) lives in :mod:`lightning_reg.mixing`; this module is
the callback that applies it to training batches.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_reg._batch import BatchAdapter, GetBatch, SetBatch, TrainBatchTransform
from lightning_reg._plan_blocks import PlanSource
from lightning_reg.mixing import MixMode, MixPlan, draw_mix_plan, mix_inputs, mixup_batch

__all__ = ["MixPlan", "Mixup", "draw_mix_plan", "mix_inputs", "mixup_batch"]


class Mixup(TrainBatchTransform):
    """Mixup/CutMix (and fused label smoothing) on every training batch.

    The inputs of each training batch are mixed with a permuted copy of the batch and the targets
    become the matching probability rows, so ``F.cross_entropy(logits, y)`` in an unchanged
    ``training_step`` trains on them. The batch is changed in place in ``on_train_batch_start``
    (after device transfer and ``on_after_batch_transfer``; Lightning passes that same object to
    ``training_step`` and ``on_train_batch_end``): the inputs and targets entries of a list or a
    dict (``[x, y]``, ``{"pixel_values": x, "labels": y}``) are replaced. Tuples and other
    immutable batches are refused at the first batch (return a list or dict from ``collate_fn``,
    or pass ``get_batch``/``set_batch``). Validation, test and predict batches are untouched, and
    nothing is set on the module or the datamodule.

    The draws of each block of 64 consecutive batches come from one generator, seeded from
    ``seed`` (default: the seed of ``seed_everything``), the global rank, the epoch, the block
    and the batch size, and the position in the epoch is kept in checkpoints: runs are
    reproducible and resume mid-epoch with the draws of an uninterrupted run, and ranks do not
    share partners or coefficients. The draws are made on the host (a block at a time in batch
    mode), so mixing adds no host-device synchronisation.

    Args:
        mixup_alpha: Beta(alpha, alpha) parameter of the mixup coefficient; 0 disables mixup.
        cutmix_alpha: Beta parameter of the CutMix area; 0 disables CutMix (unless
            ``cutmix_minmax`` is set).
        cutmix_minmax: bounds ``(min, max)`` of the CutMix box side as a fraction of the image
            side; when set, the box size is drawn uniformly within them (``cutmix_alpha`` unused).
        prob: probability of mixing a batch (``mode="batch"``) or a sample (``"elem"``).
        switch_prob: probability of CutMix rather than mixup when both are enabled.
        mode: ``"batch"`` (one coefficient per batch) or ``"elem"`` (one per sample).
        correct_lam: use the pasted area after clipping the CutMix box at the image border.
        label_smoothing: smoothing fused into the targets (applied once).
        num_classes: number of classes; required for integer targets.
        off_epoch: stop mixing from this epoch on (label smoothing continues).
        off_fraction: stop mixing after this fraction of the training steps.
        keep_targets: mix the inputs only and leave the integer targets in the batch;
            ``RegularizedModule.cross_entropy(logits, y)`` applies the mixing and smoothing.
        seed: base seed of the draws (default: ``seed_everything``'s, else torch's initial seed).
        input_key: where the inputs are in the batch (index or key; see ``BatchAdapter``).
        target_key: where the targets are.
        get_batch: a function ``batch -> (inputs, targets)`` for other layouts.
        set_batch: a function ``(batch, inputs, targets) -> None`` that changes ``batch`` in
            place (see :class:`~lightning_reg.BatchAdapter`).

    Raises:
        ValueError: for invalid arguments (in ``__init__``); at the first training batch, for
            integer targets without ``num_classes``, soft targets whose width is not
            ``num_classes``, a layout where the inputs and targets are not found, or (on CPU) a
            label outside ``[0, num_classes)``.
        TypeError: at the first training batch, for a batch that cannot be changed in place.
        RuntimeError: in ``setup``, when another training-batch transform is attached.

    When the user's loss then fails because the model's number of classes is not
    ``num_classes`` (or, on CUDA, a label is out of range), the exception gets a note naming
    ``num_classes`` and the fix (added in ``on_exception``; nothing is checked per step).

    Example:
        >>> import lightning.pytorch as pl
        >>> import torch.nn.functional as F
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> class Net(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(4, 3)
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch  # y: (N, 3) probability rows here, class indices in validation
        ...         return F.cross_entropy(self.layer(x), y)
        ...
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> mix = Mixup(mixup_alpha=0.4, label_smoothing=0.1, num_classes=3)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[mix], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(Net(), DataLoader(data, batch_size=8))
        >>> mix.batches_seen, mix.current_plan is None  # the plan is withdrawn after the epoch
        (4, True)

    Logged metrics:
        - ``reg/mixup/lambda``: mean mixing coefficient of the epoch's training samples (1 for
          unmixed samples), averaged over ranks.
    """

    def __init__(
        self,
        mixup_alpha: float = 1.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: tuple[float, float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: MixMode = "batch",
        correct_lam: bool = True,
        label_smoothing: float = 0.0,
        num_classes: int | None = None,
        *,
        off_epoch: int | None = None,
        off_fraction: float | None = None,
        keep_targets: bool = False,
        seed: int | None = None,
        input_key: int | str | None = None,
        target_key: int | str | None = None,
        get_batch: GetBatch | None = None,
        set_batch: SetBatch | None = None,
    ) -> None:
        _validate(mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode,
                  label_smoothing, num_classes, off_epoch, off_fraction)  # fmt: skip
        super().__init__(BatchAdapter(input_key, target_key, get_batch, set_batch))
        self.options: dict[str, Any] = dict(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=cutmix_minmax,
            prob=prob, switch_prob=switch_prob, mode=mode, correct_lam=correct_lam,
        )  # fmt: skip
        self.label_smoothing, self.num_classes = label_smoothing, num_classes
        self.off_epoch, self.off_fraction = off_epoch, off_fraction
        self.keep_targets, self.seed = keep_targets, seed
        self.batches_seen, self.batch_in_epoch = 0, 0
        self._seed = seed  # this fit's base seed: `seed`, else seed_everything's (set in setup)
        self._plans = PlanSource(self)
        self._lam_sum, self._lam_count = 0.0, 0
        self._state_key = self._generate_state_key(**self.options)  # read by Lightning per hook

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    def regularization_settings(self) -> dict[str, Any]:
        """This callback's settings, for the TensorBoard hparams view."""
        settings = {f"Mixup/{k}": v for k, v in self.options.items()}
        settings["Mixup/label_smoothing"] = self.label_smoothing
        return settings

    @override
    def reset(self) -> None:
        """Start a fit afresh: counters, kept plan blocks and the seed of ``seed_everything``."""
        super().reset()
        self.batches_seen, self.batch_in_epoch = 0, 0
        self._lam_sum, self._lam_count = 0.0, 0
        self._plans.clear()
        seed = self.seed
        self._seed = (
            int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())) if seed is None else seed
        )

    def mixing_on(self, trainer: pl.Trainer) -> bool:
        """Whether mixing is still on at the current epoch/step."""
        if self.off_epoch is not None and trainer.current_epoch >= self.off_epoch:
            return False
        if self.off_fraction is not None:
            total = trainer.estimated_stepping_batches
            return not (math.isfinite(total) and trainer.global_step >= self.off_fraction * total)
        return True

    @override
    def transform(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Tensor, targets: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Return the training batch's mixed inputs and soft targets (or its labels, if kept)."""
        n = inputs.shape[0]
        if self.mixing_on(trainer):
            image_size = (inputs.shape[-2], inputs.shape[-1]) if inputs.ndim == 4 else None
            key = (self._seed or 0, trainer.global_rank, trainer.current_epoch)
            plan = self._plans.plan(key, self.batch_in_epoch, n, image_size, inputs.device)
        else:
            plan = MixPlan.identity(n, self.num_classes, self.label_smoothing)
        self.batches_seen += 1
        self.batch_in_epoch += 1
        self._lam_sum += float(plan.lam[0]) * n if plan.shared else float(plan.lam.sum())
        self._lam_count += n
        self._plan = plan  # for RegularizedModule.cross_entropy (keep_targets=True)
        mixed = mix_inputs(inputs, plan)  # a new tensor: the batch's may be shared with the data
        return (mixed, targets) if self.keep_targets else (mixed, plan.targets(targets))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self.batch_in_epoch = 0
        if self._lam_count:
            mean = self._lam_sum / self._lam_count
            pl_module.log("reg/mixup/lambda", mean, on_step=False, on_epoch=True, sync_dist=True)
        self._lam_sum, self._lam_count = 0.0, 0

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit":
            self._plans.clear()  # no device tensors kept after fit

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._plans.clear()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "batches_seen": self.batches_seen, "batch_in_epoch": self.batch_in_epoch,
            "seed": self._seed,
        }  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = int(state_dict["batches_seen"])
        self.batch_in_epoch = int(state_dict.get("batch_in_epoch", 0))
        seed = state_dict.get("seed")
        self._seed = self._seed if seed is None else int(seed)


def _validate(
    mixup_alpha: float, cutmix_alpha: float, cutmix_minmax: tuple[float, float] | None,
    prob: float, switch_prob: float, mode: str, label_smoothing: float,
    num_classes: int | None, off_epoch: int | None, off_fraction: float | None,
) -> None:  # fmt: skip
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"alphas must be >= 0, got mixup {mixup_alpha}, cutmix {cutmix_alpha}.")
    if mixup_alpha == 0 and cutmix_alpha == 0 and cutmix_minmax is None:
        raise ValueError(
            "Both mixup_alpha and cutmix_alpha are 0, so nothing would be mixed; for label "
            "smoothing alone use the LabelSmoothing callback."
        )
    if cutmix_minmax is not None and not 0 < cutmix_minmax[0] <= cutmix_minmax[1] <= 1:
        raise ValueError(f"`cutmix_minmax` must satisfy 0 < min <= max <= 1, got {cutmix_minmax}.")
    for name, value in (("prob", prob), ("switch_prob", switch_prob)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must be a probability in [0, 1], got {value}.")
    if mode not in ("batch", "elem"):
        raise ValueError(f"`mode` must be 'batch' or 'elem', got {mode!r}.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing}.")
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"`num_classes` must be >= 2, got {num_classes}.")
    if off_epoch is not None and off_epoch < 0:
        raise ValueError(f"`off_epoch` must be >= 0, got {off_epoch}.")
    if off_fraction is not None and not 0.0 <= off_fraction <= 1.0:
        raise ValueError(f"`off_fraction` must be in [0, 1], got {off_fraction}.")
