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
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_reg._batch import (
    PLAN_ATTRIBUTE,
    BatchAdapter,
    GetBatch,
    SetBatch,
    TrainBatchTransform,
)
from lightning_reg.label_smoothing import smooth_targets, smoothed_rows

__all__ = ["MixPlan", "Mixup", "draw_mix_plan", "mix_inputs", "mixup_batch"]

MixMode = Literal["batch", "elem"]


@dataclass
class MixPlan:
    """The random draws for one batch, made and kept on the host as NumPy arrays.

    Every decision (whether to mix, which path to take) reads these arrays, never a tensor, so
    applying a plan adds no host-device synchronisation.

    Attributes:
        perm: partner of each sample, ``(N,)`` int.
        lam: weight of each sample's own content (1 = unmixed), ``(N,)`` float. For CutMix it is
            the fraction of the image left unpasted.
        boxes: CutMix rectangles ``(N, 4)`` as ``(y0, y1, x0, x1)``; rows of zeros where a sample
            is not cut. ``None`` when no sample of the batch is cut.
        cut: which samples are CutMix samples, ``(N,)`` bool (their pixels are pasted, never
            blended, even when their box is empty).
        shared: whether all samples share one decision, coefficient and box (batch mode).
        num_classes: number of classes of integer targets (``None`` for soft targets only).
        smoothing: label smoothing fused into the targets.
        partners: ``perm`` as a tensor, kept once made (on the device of the last batch the plan
            was applied to), so the inputs and the targets share one copy.
        class_rows: a table of smoothed one-hot rows (``smoothed_rows``) for integer targets,
            when the caller keeps one; otherwise the rows are built per batch.
    """

    perm: np.ndarray
    lam: np.ndarray
    boxes: np.ndarray | None
    cut: np.ndarray
    shared: bool
    num_classes: int | None
    smoothing: float
    partners: Tensor | None = field(default=None, repr=False, compare=False)
    class_rows: Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def identity(cls, n: int, num_classes: int | None, smoothing: float) -> MixPlan:
        """A plan that mixes nothing (smoothing only)."""
        no = np.zeros(n, dtype=bool)
        return cls(np.arange(n), np.ones(n, np.float32), None, no, True, num_classes, smoothing)

    @property
    def mixes(self) -> bool:
        """Whether any sample is mixed."""
        if self.shared:  # per-call overhead matters on the batch-mode hot path
            return bool(self.lam[0] < 1 or self.cut[0])
        return self.boxes is not None or bool((self.lam < 1).any())

    def partner_index(self, device: torch.device) -> Tensor:
        """``perm`` as an int64 tensor on ``device`` (made once, then reused)."""
        partners = self.partners
        if partners is None or partners.device != device:
            partners = self.partners = _to(self.perm, device)
        return partners

    def targets(self, targets: Tensor) -> Tensor:
        """Soft targets for this plan: smoothed, then mixed with the same partners and weights."""
        if not targets.is_floating_point() and self.num_classes is None:
            raise ValueError(
                "Integer class targets need `num_classes=` to become probability rows; pass it "
                "to the callback."
            )
        soft = self._smooth(targets)
        if not self.mixes:
            return soft
        partner = soft.index_select(0, self.partner_index(soft.device))
        if self.shared:
            return partner.lerp_(soft, float(self.lam[0]))  # in place: one allocation
        return partner.lerp_(soft, _to(self.lam, soft.device, soft.dtype).unsqueeze(1))

    def _smooth(self, targets: Tensor) -> Tensor:
        rows = self.class_rows
        if rows is None or targets.is_floating_point() or targets.ndim != 1:
            return smooth_targets(targets, self.num_classes or 0, self.smoothing)
        if rows.device != targets.device:
            rows = rows.to(targets.device)
        try:
            return rows.index_select(0, targets)
        except (IndexError, RuntimeError) as error:  # CPU checks the range; CUDA asserts
            raise ValueError(
                f"Class targets must lie in [0, {rows.shape[0]}) for num_classes="
                f"{rows.shape[0]}: {error}. Check `num_classes=`."
            ) from error


def _to(array: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    return torch.from_numpy(array).to(device, dtype, non_blocking=True)


def draw_mix_plan(
    n: int,
    rng: np.random.Generator,
    *,
    image_size: tuple[int, int] | None = None,
    mixup_alpha: float = 1.0,
    cutmix_alpha: float = 0.0,
    cutmix_minmax: tuple[float, float] | None = None,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: MixMode = "batch",
    correct_lam: bool = True,
    num_classes: int | None = None,
    smoothing: float = 0.0,
) -> MixPlan:
    """Draw partners, coefficients and CutMix boxes for a batch of ``n`` samples.

    ``mode="batch"`` draws one decision and one coefficient for the whole batch; ``"elem"``
    draws them per sample. CutMix needs ``image_size=(H, W)``.

    Raises:
        ValueError: for an unknown ``mode``, negative alphas, or CutMix without ``image_size``.
    """
    if mode not in ("batch", "elem"):
        raise ValueError(f"`mode` must be 'batch' or 'elem', got {mode!r}.")
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"alphas must be >= 0, got mixup {mixup_alpha}, cutmix {cutmix_alpha}.")
    use_cutmix_kind = cutmix_alpha > 0 or cutmix_minmax is not None
    if _mixup_every_batch(mode, prob, cutmix_alpha, cutmix_minmax):  # the common case, kept cheap
        lam_value = rng.beta(mixup_alpha, mixup_alpha)
        return MixPlan(
            perm=rng.permutation(n), lam=np.full(n, lam_value, dtype=np.float32), boxes=None,
            cut=np.zeros(n, dtype=bool), shared=True, num_classes=num_classes,
            smoothing=smoothing,
        )  # fmt: skip
    size = 1 if mode == "batch" else n
    apply = rng.random(size) < prob
    cut = (
        (rng.random(size) < switch_prob) if mixup_alpha > 0 and use_cutmix_kind
        else np.full(size, use_cutmix_kind)
    )  # fmt: skip
    lam = np.ones(size)
    if mixup_alpha > 0:
        lam = np.where(~cut, rng.beta(mixup_alpha, mixup_alpha, size), lam)
    boxes = None
    if use_cutmix_kind and (apply & cut).any():
        if image_size is None:
            raise ValueError("CutMix needs image inputs of shape (N, C, H, W).")
        cut_lam = rng.beta(cutmix_alpha, cutmix_alpha, size) if cutmix_alpha > 0 else np.ones(size)
        box, area_lam = _boxes(rng, image_size, cut_lam, cutmix_minmax)
        lam = np.where(cut, area_lam if correct_lam or cutmix_minmax else cut_lam, lam)
        boxes = np.where((apply & cut)[:, None], box, 0)
    lam = np.where(apply, lam, 1.0)
    cut = apply & cut if boxes is not None else np.zeros(size, dtype=bool)
    if mode == "batch":
        lam, cut = np.repeat(lam, n), np.repeat(cut, n)
        boxes = None if boxes is None else np.repeat(boxes, n, axis=0)
    return MixPlan(
        perm=rng.permutation(n),
        lam=lam.astype(np.float32),
        boxes=None if boxes is None else boxes.astype(np.int64),
        cut=cut,
        shared=mode == "batch",
        num_classes=num_classes,
        smoothing=smoothing,
    )


def _mixup_every_batch(
    mode: str, prob: float, cutmix_alpha: float, cutmix_minmax: tuple[float, float] | None
) -> bool:
    """Batch mode, mixup only, every batch mixed: one coefficient and permutation per batch."""
    return mode == "batch" and prob >= 1.0 and cutmix_alpha <= 0 and cutmix_minmax is None


def _boxes(
    rng: np.random.Generator,
    image_size: tuple[int, int],
    lam: np.ndarray,
    minmax: tuple[float, float] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """CutMix rectangles ``(y0, y1, x0, x1)`` per draw, and ``1 - pasted area`` after clipping."""
    h, w = image_size
    size = lam.shape[0]
    y0: np.ndarray
    x0: np.ndarray
    y1: np.ndarray
    x1: np.ndarray
    if minmax is not None:  # box sides drawn uniformly within the bounds; box inside the image
        cut_h = rng.integers(int(h * minmax[0]), int(h * minmax[1]) + 1, size)
        cut_w = rng.integers(int(w * minmax[0]), int(w * minmax[1]) + 1, size)
        y0, x0 = rng.integers(0, h - cut_h + 1), rng.integers(0, w - cut_w + 1)
        y1, x1 = y0 + cut_h, x0 + cut_w
    else:  # timm/CutMix paper: side ratio sqrt(1 - lam), centre uniform, box clipped
        ratio = np.sqrt(1.0 - lam)
        half_h, half_w = (h * ratio).astype(int) // 2, (w * ratio).astype(int) // 2
        cy, cx = rng.integers(0, h, size), rng.integers(0, w, size)
        y0, y1 = np.clip(cy - half_h, 0, h), np.clip(cy + half_h, 0, h)
        x0, x1 = np.clip(cx - half_w, 0, w), np.clip(cx + half_w, 0, w)
    area_lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    return np.stack([y0, y1, x0, x1], axis=1), area_lam


def mix_inputs(x: Tensor, plan: MixPlan) -> Tensor:
    """Apply ``plan`` to a batch of inputs (a new tensor; ``x`` is left as it was)."""
    if not plan.mixes:
        return x
    if plan.boxes is not None and x.ndim != 4:
        raise ValueError(f"CutMix needs image inputs of shape (N, C, H, W), got {tuple(x.shape)}.")
    perm = plan.partner_index(x.device)
    if plan.shared:
        if plan.cut[0]:  # one box for the batch: paste the partners' slice
            y0, y1, x0, x1 = (int(v) for v in plan.boxes[0])  # type: ignore[index]
            out = x.clone()
            out[..., y0:y1, x0:x1] = x[..., y0:y1, x0:x1].index_select(0, perm)
            return out
        if x.is_floating_point():  # one coefficient for the batch: a single lerp, the floor
            # in place on the gathered partners: one allocation (lerp_(x, w) = p + w (x - p))
            return x.index_select(0, perm).lerp_(x, float(plan.lam[0]))
    blended = ~plan.cut & (plan.lam < 1)
    if not x.is_floating_point():
        if blended.any():
            raise ValueError(f"Mixup needs floating-point inputs, got {x.dtype}; convert them.")
        mask = _box_mask(_to(plan.boxes, x.device), x.shape[-2:])  # type: ignore[arg-type]
        return torch.where(mask.unsqueeze(1), x.index_select(0, perm), x)
    partner = x.index_select(0, perm)
    # Weight of each sample's own pixels: lam for blended samples, 1 for cut ones; the pasted
    # rectangle gets weight 0, which lerp turns into the partner's pixels exactly.
    weight = _to(np.where(blended, plan.lam, 1.0).astype(np.float32), x.device, x.dtype)
    if plan.boxes is None or not plan.cut.any():
        return partner.lerp_(x, weight.view((-1,) + (1,) * (x.ndim - 1)))
    # only cut samples have non-empty boxes, and their weight is 1: weight - inside is exact
    in_rows, in_cols = _box_bands(_to(plan.boxes, x.device), x.shape[-2:])
    inside = in_rows.to(x.dtype).unsqueeze(2) * in_cols.to(x.dtype).unsqueeze(1)
    weight_map = inside.neg_().add_(weight.view(-1, 1, 1))
    return partner.lerp_(x, weight_map.unsqueeze(1))


def _box_bands(boxes: Tensor, size: torch.Size) -> tuple[Tensor, Tensor]:
    """``(N, H)`` and ``(N, W)`` bool: the rows and columns each sample's box spans."""
    rows = torch.arange(size[0], device=boxes.device)
    cols = torch.arange(size[1], device=boxes.device)
    in_rows = (rows >= boxes[:, 0:1]) & (rows < boxes[:, 1:2])
    in_cols = (cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])
    return in_rows, in_cols


def _box_mask(boxes: Tensor, size: torch.Size) -> Tensor:
    """``(N, H, W)`` bool: inside each sample's box (empty boxes give all False)."""
    in_rows, in_cols = _box_bands(boxes, size)
    return in_rows.unsqueeze(2) & in_cols.unsqueeze(1)


def mixup_batch(
    x: Tensor,
    targets: Tensor,
    num_classes: int | None = None,
    *,
    generator: np.random.Generator | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor]:
    """Mix a batch and return ``(mixed inputs, soft targets)`` (options of :class:`Mixup`).

    Example:
        >>> x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
        >>> rng = np.random.default_rng(0)
        >>> xm, ym = mixup_batch(x, y, 3, generator=rng, cutmix_alpha=1.0, label_smoothing=0.1)
        >>> xm.shape, ym.shape, torch.allclose(ym.sum(1), torch.ones(4))
        (torch.Size([4, 3, 8, 8]), torch.Size([4, 3]), True)
    """
    smoothing = options.pop("label_smoothing", 0.0)
    image_size = (x.shape[-2], x.shape[-1]) if x.ndim == 4 else None
    plan = draw_mix_plan(
        x.shape[0], generator or np.random.default_rng(), image_size=image_size,
        num_classes=num_classes, smoothing=smoothing, **options,
    )  # fmt: skip
    return mix_inputs(x, plan), plan.targets(targets)


def publish_plan(module: torch.nn.Module, plan: MixPlan | None) -> None:
    """Make the current batch's plan available to ``RegularizedModule.cross_entropy``."""
    module.__dict__[PLAN_ATTRIBUTE] = plan


def current_plan(module: torch.nn.Module) -> MixPlan | None:
    """The plan of the batch being trained on (``None`` outside training or without a callback)."""
    plan = module.__dict__.get(PLAN_ATTRIBUTE)
    return plan if isinstance(plan, MixPlan) else None


class Mixup(TrainBatchTransform):
    """Mixup/CutMix (and fused label smoothing) on every training batch.

    The inputs of each training batch are mixed with a permuted copy of the batch and the targets
    become the matching probability rows, so ``F.cross_entropy(logits, y)`` in an unchanged
    ``training_step`` trains on them. Validation, test and predict batches are untouched.

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
        set_batch: a function ``(batch, inputs, targets) -> new batch``.

    Raises:
        ValueError: for invalid arguments.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
        >>> trainer = Trainer(callbacks=[mix], logger=False)

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
        self._plans = _PlanSource(self)
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
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))

    def mixing_on(self, trainer: pl.Trainer) -> bool:
        """Whether mixing is still on at the current epoch/step."""
        if self.off_epoch is not None and trainer.current_epoch >= self.off_epoch:
            return False
        if self.off_fraction is not None:
            total = trainer.estimated_stepping_batches
            return not (math.isfinite(total) and trainer.global_step >= self.off_fraction * total)
        return True

    def transform(self, trainer, pl_module, inputs, targets):  # type: ignore[no-untyped-def]  # noqa: D102
        n = inputs.shape[0]
        if self.mixing_on(trainer):
            image_size = (inputs.shape[-2], inputs.shape[-1]) if inputs.ndim == 4 else None
            key = (self.seed or 0, trainer.global_rank, trainer.current_epoch)
            plan = self._plans.plan(key, self.batch_in_epoch, n, image_size, inputs.device)
        else:
            plan = MixPlan.identity(n, self.num_classes, self.label_smoothing)
        self.batches_seen += 1
        self.batch_in_epoch += 1
        self._lam_sum += float(plan.lam[0]) * n if plan.shared else float(plan.lam.sum())
        self._lam_count += n
        mixed = mix_inputs(inputs, plan)
        if self.keep_targets:
            publish_plan(pl_module, plan)
            return mixed, targets
        return mixed, plan.targets(targets)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.batch_in_epoch = 0
        if self._lam_count:
            mean = self._lam_sum / self._lam_count
            pl_module.log("reg/mixup/lambda", mean, on_step=False, on_epoch=True, sync_dist=True)
        self._lam_sum, self._lam_count = 0.0, 0
        publish_plan(pl_module, None)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)  # also withdraws the published plan
        self._plans.clear()

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
            "seed": self.seed,
        }  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = int(state_dict["batches_seen"])
        self.batch_in_epoch = int(state_dict.get("batch_in_epoch", 0))
        self.seed = state_dict.get("seed", self.seed)


BLOCK_BATCHES = 64
"""Consecutive batch positions whose plans are drawn from one generator (and, in the common
case, in one go)."""
_BLOCK_ELEMENTS = 1 << 18  # at most this many permutation entries per block


class _Block:
    """The plans of one block of batch positions: its generator, settings and what was drawn."""

    def __init__(self, rng: np.random.Generator, num_classes: int | None, smoothing: float) -> None:
        self.rng = rng
        self.num_classes, self.smoothing = num_classes, smoothing
        self.drawn = 0  # plans drawn one by one so far
        self.perms: np.ndarray | None = None  # whole-block draws: (rows, n) permutations
        self.lams: list[np.ndarray] = []
        self.no_cut = np.zeros(0, dtype=bool)
        self.device: torch.device | None = None  # where partners and class_rows are
        self.partners: list[Tensor] = []
        self.class_rows: Tensor | None = None


class _PlanSource:
    """One rank's plans, each a function of its epoch key, position in the epoch and batch size.

    Positions are grouped in blocks of ``BLOCK_BATCHES``; each block has its own generator,
    seeded from ``(seed, rank, epoch, block, batch size)``. A resumed run therefore draws the
    plans of an uninterrupted one without replaying the epoch, and a short last batch does not
    shift the draws of the others. In the common case (batch mode, mixup only, every batch mixed)
    a block's coefficients and permutations are drawn in two NumPy calls and its permutations
    reach the device in one copy, so a batch costs a few list look-ups; otherwise the block's
    plans are drawn one by one with :func:`draw_mix_plan`. The last few blocks are kept, so
    batches of alternating sizes do not redraw them. The callback's settings are read when a
    block is made, so changing them (``mix.num_classes = ...``) takes effect at the next block.
    """

    def __init__(self, owner: Mixup) -> None:
        self.owner = owner
        self._whole: bool | None = None  # whether whole blocks are drawn (set at first use)
        self._blocks: OrderedDict[tuple[Any, ...], _Block] = OrderedDict()
        self._rows_key: tuple[Any, ...] | None = None
        self._rows: Tensor | None = None

    def clear(self) -> None:
        """Drop the kept blocks and tables (device tensors included)."""
        self._whole = None
        self._blocks.clear()
        self._rows_key, self._rows = None, None

    def __getstate__(self) -> dict[str, Any]:
        return {"owner": self.owner}  # kept blocks and device tensors stay behind

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["owner"])  # type: ignore[misc]

    def plan(
        self,
        epoch_key: tuple[int, int, int],
        position: int,
        n: int,
        image_size: tuple[int, int] | None,
        device: torch.device,
    ) -> MixPlan:
        """The plan of the batch at ``position`` in the epoch, ``n`` samples, on ``device``."""
        whole = self._whole
        if whole is None:
            options = self.owner.options
            whole = self._whole = _mixup_every_batch(
                options["mode"], options["prob"], options["cutmix_alpha"], options["cutmix_minmax"]
            )
        rows = max(1, min(BLOCK_BATCHES, _BLOCK_ELEMENTS // max(n, 1)))
        index, row = divmod(position, rows)
        key = (*epoch_key, index, n, None if whole else image_size)
        block = self._blocks.get(key)
        if block is None or (not whole and row < block.drawn):  # new, or going back: afresh
            block = self._blocks[key] = _Block(
                np.random.default_rng([*epoch_key, index, n]),
                self.owner.num_classes, self.owner.label_smoothing,
            )  # fmt: skip
            if whole:
                self._draw_block(block, rows, n)
            while len(self._blocks) > _KEPT_BLOCKS:
                self._blocks.popitem(last=False)
        if device != block.device:
            self._place(block, device)
        if whole:
            return MixPlan(
                perm=block.perms[row], lam=block.lams[row], boxes=None,  # type: ignore[index]
                cut=block.no_cut, shared=True, num_classes=block.num_classes,
                smoothing=block.smoothing, partners=block.partners[row],
                class_rows=block.class_rows,
            )  # fmt: skip
        for _ in range(block.drawn, row):  # replay the block's earlier draws after a resume
            self._draw(block, n, image_size)
        block.drawn = row + 1
        plan = self._draw(block, n, image_size)
        plan.class_rows = block.class_rows
        return plan

    def _draw(self, block: _Block, n: int, image_size: tuple[int, int] | None) -> MixPlan:
        return draw_mix_plan(
            n, block.rng, image_size=image_size, num_classes=block.num_classes,
            smoothing=block.smoothing, **self.owner.options,
        )  # fmt: skip

    def _draw_block(self, block: _Block, rows: int, n: int) -> None:
        alpha = self.owner.options["mixup_alpha"]
        lam = block.rng.beta(alpha, alpha, rows).astype(np.float32)
        block.perms = np.tile(np.arange(n), (rows, 1))
        block.rng.permuted(block.perms, axis=1, out=block.perms)
        block.lams = list(np.repeat(lam[:, None], n, axis=1))
        block.no_cut = np.zeros(n, dtype=bool)

    def _place(self, block: _Block, device: torch.device) -> None:
        """Put the block's partners and class table on ``device`` (pinned, non-blocking on CUDA)."""
        if block.perms is not None:
            perms = torch.from_numpy(block.perms)
            if device.type == "cuda":
                perms = perms.pin_memory()
            block.partners = list(perms.to(device, non_blocking=True).unbind(0))
        block.class_rows = self._class_rows(block.num_classes, block.smoothing, device)
        block.device = device

    def _class_rows(
        self, classes: int | None, smoothing: float, device: torch.device
    ) -> Tensor | None:
        """A table of smoothed one-hot rows on ``device`` (the last one made is kept)."""
        if classes is None or classes > _TABLE_CLASSES:
            return None
        key = (classes, smoothing, device, torch.get_default_dtype())
        if key != self._rows_key:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None  # a table made now would live in the graph's private pool
            self._rows_key, self._rows = key, smoothed_rows(classes, smoothing, device)
        return self._rows


_KEPT_BLOCKS = 4  # blocks kept per callback (batches of alternating sizes use two)
_TABLE_CLASSES = 1024  # a table of smoothed rows holds at most 1024 x 1024 values


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
