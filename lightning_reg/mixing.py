"""The math of mixup, CutMix and label smoothing, as pure functions (no Lightning here).

The callbacks :class:`~lightning_reg.Mixup` and :class:`~lightning_reg.LabelSmoothing` apply these
functions to training batches; call them directly in a plain PyTorch loop or in your own step:

- :func:`draw_mix_plan` draws, on the host, the partners, coefficients and CutMix boxes of a
  batch as a :class:`MixPlan`;
- :func:`mix_inputs` applies a plan to the inputs and :meth:`MixPlan.targets` to the targets
  (smoothed, then mixed with the same partners and weights);
- :func:`mixup_batch` does the three in one call;
- :func:`smooth_targets` turns class indices into smoothed probability rows, and
  :func:`smoothed_rows` builds the ``C x C`` table a callback indexes instead.

Nothing here reads a tensor's value on the host, so none of it synchronises with the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MixMode",
    "MixPlan",
    "draw_mix_plan",
    "mix_inputs",
    "mixup_batch",
    "smooth_targets",
    "smoothed_rows",
]

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
        """Soft targets for this plan: smoothed, then mixed with the same partners and weights.

        Raises:
            ValueError: for integer targets without ``num_classes``, soft targets whose number of
                columns is not ``num_classes``, or (on CPU) a class index out of range.
        """
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
        except (IndexError, RuntimeError) as error:  # CPU checks the range; CUDA asserts later
            raise ValueError(_range_message(rows.shape[0])) from error


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
            raise ValueError(
                f"Mixup blends inputs, so they must be floating-point; got {x.dtype} inputs of "
                f"shape {tuple(x.shape)}. Convert integer images (uint8) to float first. Token "
                "ids cannot be blended: Mixup does not apply to them (remove it; for a language "
                "model, smooth in the loss with `F.cross_entropy(..., label_smoothing=...)`)."
            )
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
    """Mix a batch and return ``(mixed inputs, soft targets)``.

    The functional twin of :class:`~lightning_reg.Mixup`: ``options`` are its mixing arguments
    (``mixup_alpha``, ``cutmix_alpha``, ``cutmix_minmax``, ``prob``, ``switch_prob``, ``mode``,
    ``correct_lam``, ``label_smoothing``). ``x`` is left as it was.

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


def smooth_targets(targets: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """Turn integer class targets ``(N,)`` into smoothed probability rows ``(N, num_classes)``.

    Built with ``scatter_`` rather than ``F.one_hot``, which checks the class range on the host
    (a device synchronisation per call). Already-soft targets ``(N, C)`` are returned as they are.

    Args:
        targets: integer class indices, or float probability rows.
        num_classes: number of classes ``C``.
        smoothing: mass spread uniformly over all classes, in ``[0, 1)``.

    Raises:
        ValueError: for a bad ``smoothing``/``num_classes``, targets of another shape, or (on
            CPU) a class index outside ``[0, num_classes)``. On CUDA such an index trips a
            device-side assert at the next synchronisation instead (the range is not checked on
            the host, which would synchronise).

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
            "smoothing here handle classification (one label per sample); per-token or per-pixel "
            "targets (language models, segmentation) are not supported. Remove the callback; to "
            "smooth such targets, use `F.cross_entropy(..., label_smoothing=...)` in your step."
        )
    if num_classes is None or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
    off = smoothing / num_classes
    soft = torch.full((targets.shape[0], num_classes), off, device=targets.device)
    try:
        return soft.scatter_(1, targets.unsqueeze(1), 1.0 - smoothing + off)
    except (IndexError, RuntimeError) as error:  # CPU checks the range; CUDA asserts later
        raise ValueError(_range_message(num_classes)) from error


def _range_message(num_classes: int) -> str:
    return (
        f"A class target lies outside [0, {num_classes}) for num_classes={num_classes}. Set "
        "`num_classes=` to the number of classes of your data and model (the model's number of "
        "outputs)."
    )


def smoothed_rows(num_classes: int, smoothing: float, device: torch.device) -> Tensor:
    """A ``C x C`` table whose row ``c`` is ``smooth_targets`` of class ``c``.

    A callback keeps one and indexes it (``rows.index_select(0, targets)``): one op per batch
    instead of two, with the same values.
    """
    return smooth_targets(torch.arange(num_classes, device=device), num_classes, smoothing)
