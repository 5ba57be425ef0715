"""Tests of the functional core of mixup/CutMix and label smoothing (no Trainer).

Covers ``draw_mix_plan``, ``MixPlan``, ``mix_inputs``, ``mixup_batch``, ``_boxes`` and
``smooth_targets``. Property tests draw whole configurations (batch size, classes, smoothing,
mode, mixup/CutMix/both, prob, box bounds, ``correct_lam``, integer or soft targets) and check the
results against identities that hold by construction and against a per-sample reference loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from lightning_reg.mixing import (
    MixPlan,
    _boxes,
    draw_mix_plan,
    mix_inputs,
    mixup_batch,
    smooth_targets,
    smoothed_rows,
)

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("mixup", "cutmix", "both")


# ---------------------------------------------------------------------------------------------
# Configurations and hand-written references
# ---------------------------------------------------------------------------------------------


@dataclass
class Config:
    n: int
    num_classes: int
    smoothing: float
    mode: str
    kind: str
    prob: float
    switch_prob: float
    cutmix_minmax: tuple[float, float] | None
    correct_lam: bool
    image_size: tuple[int, int]
    seed: int

    def options(self) -> dict[str, Any]:
        mixup_alpha = 0.0 if self.kind == "cutmix" else 0.8
        cutmix_alpha = 0.0 if self.kind == "mixup" else 1.0
        if self.kind != "mixup" and self.cutmix_minmax is not None and self.seed % 2:
            cutmix_alpha = 0.0  # the bounds alone enable CutMix
        return dict(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=self.cutmix_minmax,
            prob=self.prob, switch_prob=self.switch_prob, mode=self.mode,
            correct_lam=self.correct_lam,
        )  # fmt: skip

    def plan(self) -> MixPlan:
        return draw_mix_plan(
            self.n, np.random.default_rng(self.seed), image_size=self.image_size,
            num_classes=self.num_classes, smoothing=self.smoothing, **self.options(),
        )  # fmt: skip

    @property
    def lam_is_area(self) -> bool:
        """Whether every CutMix lambda is the un-pasted area (so inputs and targets agree)."""
        return self.correct_lam or self.cutmix_minmax is not None or self.kind == "mixup"


@st.composite
def configs(draw: st.DrawFn, **fixed: Any) -> Config:
    kind = fixed.get("kind") or draw(st.sampled_from(KINDS))
    minmax = None
    if kind != "mixup":
        minmax = draw(st.none() | st.sampled_from([(0.2, 0.8), (0.5, 0.5), (0.1, 1.0)]))
    values: dict[str, Any] = dict(
        n=draw(st.integers(1, 33)),
        num_classes=draw(st.integers(2, 12)),
        smoothing=draw(st.floats(0.0, 0.5)),
        mode=draw(st.sampled_from(["batch", "elem"])),
        kind=kind,
        prob=draw(st.sampled_from([0.0, 0.5, 1.0])),
        switch_prob=draw(st.sampled_from([0.0, 0.5, 1.0])),
        cutmix_minmax=minmax,
        correct_lam=draw(st.booleans()),
        image_size=(draw(st.integers(1, 9)), draw(st.integers(1, 9))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )
    values.update(fixed)
    return Config(**values)


def ref_smooth(y: Tensor, num_classes: int, eps: float) -> Tensor:
    """``(1 - eps) * one_hot + eps / C`` in float64, computed entry by entry."""
    out = torch.full((len(y), num_classes), eps / num_classes, dtype=torch.float64)
    for i, c in enumerate(y.tolist()):
        out[i, c] = 1.0 - eps + eps / num_classes
    return out


def nonempty(box: np.ndarray) -> bool:
    y0, y1, x0, x1 = (int(v) for v in box)
    return y1 > y0 and x1 > x0


def ref_mix_inputs(x: Tensor, plan: MixPlan) -> Tensor:
    """Per-sample loop: paste the partner's box into cut samples, interpolate the others.

    ``plan.cut`` says which samples are CutMix samples; an empty box then pastes nothing.
    """
    out = x.clone().double()
    xd = x.double()
    for i in range(x.shape[0]):
        j, lam = int(plan.perm[i]), float(plan.lam[i])
        if plan.cut[i]:
            y0, y1, x0, x1 = (int(v) for v in plan.boxes[i])
            out[i, :, y0:y1, x0:x1] = xd[j, :, y0:y1, x0:x1]
        else:
            out[i] = lam * xd[i] + (1.0 - lam) * xd[j]
    return out


def ref_mix_targets(soft: Tensor, plan: MixPlan) -> Tensor:
    out = torch.empty_like(soft, dtype=torch.float64)
    for i in range(soft.shape[0]):
        j, lam = int(plan.perm[i]), float(plan.lam[i])
        out[i] = lam * soft[i].double() + (1.0 - lam) * soft[j].double()
    return out


def random_soft(n: int, c: int, seed: int) -> Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.dirichlet(np.ones(c), size=n)).float()


def constant_images(n: int, size: tuple[int, int], channels: int = 2) -> Tensor:
    """Sample ``i`` is an image of constant value ``i``."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, channels, *size).clone()


# ---------------------------------------------------------------------------------------------
# Properties over whole configurations
# ---------------------------------------------------------------------------------------------


@PROPERTY
@given(configs(), st.booleans())
def test_soft_rows_are_distributions_and_inputs_untouched(cfg: Config, soft_in: bool):
    g = torch.Generator().manual_seed(cfg.seed % 2**31)
    x = torch.randn(cfg.n, 3, *cfg.image_size, generator=g)
    if soft_in:
        targets = random_soft(cfg.n, cfg.num_classes, cfg.seed)
    else:
        targets = torch.randint(0, cfg.num_classes, (cfg.n,), generator=g)
    x_before, t_before = x.clone(), targets.clone()
    rng = np.random.default_rng(cfg.seed)
    xm, soft = mixup_batch(
        x, targets, cfg.num_classes, generator=rng, label_smoothing=cfg.smoothing,
        **cfg.options(),
    )  # fmt: skip
    assert xm.shape == x.shape and xm.dtype == x.dtype
    assert soft.shape == (cfg.n, cfg.num_classes) and soft.is_floating_point()
    torch.testing.assert_close(soft.sum(1), torch.ones(cfg.n, dtype=soft.dtype), atol=1e-6, rtol=0)
    assert (soft >= 0).all()
    assert torch.equal(x, x_before) and torch.equal(targets, t_before)  # not modified in place

    # mixup_batch is draw_mix_plan + mix_inputs + MixPlan.targets with the same generator.
    plan = cfg.plan()
    assert torch.equal(mix_inputs(x, plan), xm) and torch.equal(plan.targets(targets), soft)
    # Soft inputs are mixed as they are (never smoothed); integer ones are smoothed once.
    base = targets.double() if soft_in else ref_smooth(targets, cfg.num_classes, cfg.smoothing)
    torch.testing.assert_close(soft.double(), ref_mix_targets(base, plan), atol=1e-6, rtol=0)


@PROPERTY
@given(configs(), st.booleans())
def test_targets_are_the_class_composition_of_the_mixed_input(cfg: Config, soft_in: bool):
    """With inputs that encode their own target at every pixel, mixing the inputs mixes targets.

    The pixel mean of the mixed image is the mixed (unsmoothed) target when lambda is the
    un-pasted area; this ties the target to the same lambda, partner and box as the input.
    """
    assume(cfg.lam_is_area)
    if soft_in:
        base = random_soft(cfg.n, cfg.num_classes, cfg.seed)
        targets: Tensor = base
    else:
        targets = torch.from_numpy(
            np.random.default_rng(cfg.seed).integers(0, cfg.num_classes, cfg.n)
        )
        base = torch.nn.functional.one_hot(targets, cfg.num_classes).float()
    x = base[:, :, None, None].expand(-1, -1, *cfg.image_size).contiguous()
    plan = cfg.plan()
    composition = mix_inputs(x, plan).double().mean((2, 3))
    expected = (
        composition
        if soft_in
        else composition * (1 - cfg.smoothing) + cfg.smoothing / cfg.num_classes
    )
    torch.testing.assert_close(plan.targets(targets).double(), expected, atol=1e-5, rtol=0)


@PROPERTY
@given(configs())
def test_matches_per_sample_reference_loop(cfg: Config):
    g = torch.Generator().manual_seed(cfg.seed % 2**31)
    x = torch.randn(cfg.n, 3, *cfg.image_size, generator=g)
    y = torch.randint(0, cfg.num_classes, (cfg.n,), generator=g)
    plan = cfg.plan()
    torch.testing.assert_close(
        mix_inputs(x, plan).double(), ref_mix_inputs(x, plan), atol=1e-6, rtol=1e-5
    )
    expected = ref_mix_targets(ref_smooth(y, cfg.num_classes, cfg.smoothing), plan)
    torch.testing.assert_close(plan.targets(y).double(), expected, atol=1e-6, rtol=0)


@PROPERTY
@given(configs(kind="mixup"))
def test_mixup_on_flat_one_hot_inputs(cfg: Config):
    y = torch.from_numpy(np.random.default_rng(cfg.seed).integers(0, cfg.num_classes, cfg.n))
    x = torch.nn.functional.one_hot(y, cfg.num_classes).float()  # (N, C), no image needed
    rng = np.random.default_rng(cfg.seed)
    opts = cfg.options()
    xm, soft = mixup_batch(
        x, y, cfg.num_classes, generator=rng, label_smoothing=cfg.smoothing, **opts
    )
    plan = draw_mix_plan(
        cfg.n, np.random.default_rng(cfg.seed), num_classes=cfg.num_classes,
        smoothing=cfg.smoothing, **opts,
    )  # fmt: skip
    assert plan.boxes is None
    s = ref_smooth(y, cfg.num_classes, cfg.smoothing)
    lam = torch.from_numpy(plan.lam).double().unsqueeze(1)
    perm = torch.from_numpy(plan.perm)
    ref_x = lam * x.double() + (1 - lam) * x.double()[perm]
    torch.testing.assert_close(xm.double(), ref_x, atol=1e-6, rtol=0)
    torch.testing.assert_close(soft.double(), lam * s + (1 - lam) * s[perm], atol=1e-6, rtol=0)
    # The input row is the unsmoothed target row: one lambda, one partner for both.
    expected = xm.double() * (1 - cfg.smoothing) + cfg.smoothing / cfg.num_classes
    torch.testing.assert_close(soft.double(), expected, atol=1e-6, rtol=0)


@PROPERTY
@given(configs(kind="cutmix", correct_lam=True, prob=1.0), st.integers(4, 16), st.integers(4, 16))
def test_cutmix_pasted_fraction_is_exactly_one_minus_lambda(cfg: Config, h: int, w: int):
    cfg.image_size = (h, w)
    num_classes = cfg.n + 1  # distinct classes, so the weight on the partner's class is readable
    y = torch.arange(cfg.n)
    x = constant_images(cfg.n, (h, w))
    plan = draw_mix_plan(
        cfg.n, np.random.default_rng(cfg.seed), image_size=(h, w), num_classes=num_classes,
        **cfg.options(),
    )  # fmt: skip
    xm, soft = mix_inputs(x, plan), plan.targets(y)
    assert plan.boxes is not None
    for i in range(cfg.n):
        j = int(plan.perm[i])
        y0, y1, x0, x1 = (int(v) for v in plan.boxes[i])
        inside = torch.zeros(h, w, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(xm[i][:, inside], torch.full_like(xm[i][:, inside], float(j)))
        assert torch.equal(xm[i][:, ~inside], torch.full_like(xm[i][:, ~inside], float(i)))
        if j == i:
            continue
        pasted = int((xm[i, 0] == j).sum())
        assert pasted == round((1.0 - float(plan.lam[i])) * h * w)  # exact pixel count
        assert abs(pasted / (h * w) - (1.0 - float(plan.lam[i]))) < 1e-6
        assert abs(float(soft[i, j]) - pasted / (h * w)) < 1e-6  # partner's class weight
        assert abs(float(soft[i, i]) - (1 - pasted / (h * w))) < 1e-6
    if cfg.mode == "batch":
        assert (plan.boxes == plan.boxes[0]).all()


# ---------------------------------------------------------------------------------------------
# CutMix examples: per-element and batch boxes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("minmax", [None, (0.25, 0.75)])
@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_cutmix_boxes_and_target_weights(mode: str, minmax: tuple[float, float] | None):
    n, h, w, eps = 12, 10, 14, 0.1
    num_classes = n
    x, y = constant_images(n, (h, w), channels=3), torch.arange(n)
    rng = np.random.default_rng(7)
    plan = draw_mix_plan(
        n, rng, image_size=(h, w), mixup_alpha=0.0, cutmix_alpha=1.0, cutmix_minmax=minmax,
        mode=mode, num_classes=num_classes, smoothing=eps,
    )  # fmt: skip
    assert plan.boxes is not None and plan.shared == (mode == "batch")
    distinct_boxes = {tuple(b) for b in plan.boxes.tolist()}
    assert len(distinct_boxes) == 1 if mode == "batch" else len(distinct_boxes) > 1
    xm, soft = mix_inputs(x, plan), plan.targets(y)
    off = eps / num_classes
    for i in range(n):
        j = int(plan.perm[i])
        area = 1.0 - float(plan.lam[i])
        if j == i:
            assert torch.equal(xm[i], x[i])
            continue
        assert abs(float((xm[i] == j).float().mean()) - area) < 1e-6
        assert abs(float(soft[i, j]) - (area * (1 - eps) + off)) < 1e-6
        assert abs(float(soft[i, i]) - ((1 - area) * (1 - eps) + off)) < 1e-6


@pytest.mark.parametrize(
    "mode",
    ["batch", "elem"],
)
def test_cutmix_never_blends(mode: str):
    """CutMix only: every output pixel is the sample's own pixel or its partner's."""
    n, size = 16, (4, 4)  # small images: boxes of lambda near 1 round to empty
    x = constant_images(n, size)
    for seed in range(20):
        plan = draw_mix_plan(
            n, np.random.default_rng(seed), image_size=size, mixup_alpha=0.0, cutmix_alpha=1.0,
            mode=mode, correct_lam=False,
        )  # fmt: skip
        xm = mix_inputs(x, plan)
        own = xm == x
        partner = xm == x[torch.from_numpy(plan.perm)]
        assert (own | partner).all(), f"seed {seed}: blended pixels"


def test_cutmix_without_correct_lam_keeps_drawn_lambda():
    """correct_lam=False: the box is pasted, but lambda is the Beta draw, not the area."""
    n, size = 16, (32, 32)
    x, y = constant_images(n, size), torch.arange(n)
    plan = draw_mix_plan(
        n, np.random.default_rng(3), image_size=size, mixup_alpha=0.0, cutmix_alpha=1.0,
        mode="elem", correct_lam=False, num_classes=n,
    )  # fmt: skip
    assert plan.boxes is not None
    xm, soft = mix_inputs(x, plan), plan.targets(y)
    cut = [i for i in range(n) if nonempty(plan.boxes[i]) and plan.perm[i] != i]
    assert cut
    differs = 0
    for i in cut:
        y0, y1, x0, x1 = (int(v) for v in plan.boxes[i])
        assert torch.equal(xm[i, :, y0:y1, x0:x1], x[plan.perm[i], :, y0:y1, x0:x1])
        area = (y1 - y0) * (x1 - x0) / (size[0] * size[1])
        assert abs(float(soft[i, i]) - float(plan.lam[i])) < 1e-6
        differs += abs((1 - area) - float(plan.lam[i])) > 1e-3
    assert differs  # the Beta draw, not the clipped area


@PROPERTY
@given(
    st.integers(1, 40), st.integers(1, 40), st.integers(1, 20), st.integers(0, 2**32 - 1),
    st.none() | st.tuples(st.floats(0.05, 1.0), st.floats(0.05, 1.0)).map(sorted).map(tuple),
)  # fmt: skip
def test_boxes_inside_image_and_area_lambda(h, w, size, seed, minmax):
    rng = np.random.default_rng(seed)
    lam = rng.beta(1.0, 1.0, size)
    boxes, area_lam = _boxes(rng, (h, w), lam, minmax)
    assert boxes.shape == (size, 4) and area_lam.shape == (size,)
    y0, y1, x0, x1 = boxes.T
    assert ((y0 >= 0) & (y0 <= y1) & (y1 <= h) & (x0 >= 0) & (x0 <= x1) & (x1 <= w)).all()
    np.testing.assert_allclose(area_lam, 1.0 - (y1 - y0) * (x1 - x0) / (h * w), atol=1e-12)
    if minmax is not None:  # sides drawn within the bounds, box never clipped
        lo, hi = minmax
        assert ((int(h * lo) <= y1 - y0) & (y1 - y0 <= int(h * hi))).all()
        assert ((int(w * lo) <= x1 - x0) & (x1 - x0 <= int(w * hi))).all()
    else:  # side ratio sqrt(1 - lam) before clipping: clipping only shrinks the box
        assert ((y1 - y0) <= (h * np.sqrt(1 - lam)).astype(int) // 2 * 2).all()
        assert ((x1 - x0) <= (w * np.sqrt(1 - lam)).astype(int) // 2 * 2).all()


# ---------------------------------------------------------------------------------------------
# Label smoothing applied once
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_smoothing_without_mixing_is_exact(eps: float):
    c = 5
    y = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    x = torch.randn(7, 3, 6, 6)
    xm, soft = mixup_batch(
        x, y, c, generator=np.random.default_rng(0), label_smoothing=eps, prob=0.0,
        cutmix_alpha=1.0,
    )  # fmt: skip
    assert torch.equal(xm, x)
    expected = (1 - eps) * torch.nn.functional.one_hot(y, c).double() + eps / c
    torch.testing.assert_close(soft.double(), expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(smooth_targets(y, c, eps).double(), expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("c", [3, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_plan_with_a_class_table_gives_the_same_targets(c: int, dtype: torch.dtype):
    y = torch.tensor([0, c - 1, 1, 0])
    torch.set_default_dtype(dtype)  # soft rows take the default dtype, as torch.full does
    try:
        rows = smoothed_rows(c, 0.2, torch.device("cpu"))
        plain = MixPlan.identity(4, c, 0.2)
        tabled = MixPlan.identity(4, c, 0.2)
        tabled.class_rows = rows
        expected = plain.targets(y)
        out = tabled.targets(y)
    finally:
        torch.set_default_dtype(torch.float32)
    assert out.dtype == dtype and torch.equal(out, expected)
    out[0, 0] = -1.0  # the result is a new tensor: the table is unchanged
    assert torch.equal(tabled.targets(y), expected)
    with pytest.raises(ValueError, match=r"\[0, \d+\).*num_classes"):
        tabled.targets(torch.tensor([0, c]))


def test_smooth_targets_docstring_values():
    out = smooth_targets(torch.tensor([0, 2]), num_classes=3, smoothing=0.3)
    torch.testing.assert_close(out, torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]]))


@pytest.mark.parametrize("eps", [0.0, 0.2, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_smooth_targets_leaves_soft_targets_unchanged(eps: float, dtype: torch.dtype):
    soft = random_soft(6, 4, 1).to(dtype)
    before = soft.clone()
    out = smooth_targets(soft, 4, eps)
    assert torch.equal(out, before) and out.dtype == dtype


@PROPERTY
@given(configs(num_classes=6, prob=1.0), st.floats(0.05, 0.5))
def test_smoothing_applied_once_with_mixing(cfg: Config, eps: float):
    cfg.smoothing = eps
    c = cfg.num_classes
    y = torch.from_numpy(np.random.default_rng(cfg.seed).integers(0, c, cfg.n))
    x = torch.randn(cfg.n, 2, *cfg.image_size)
    _, soft = mixup_batch(
        x, y, c, generator=np.random.default_rng(cfg.seed), label_smoothing=eps, **cfg.options()
    )
    off = eps / c
    assert float(soft.min()) >= off - 1e-7
    plan = cfg.plan()
    for i in range(cfg.n):
        untouched = set(range(c)) - {int(y[i]), int(y[plan.perm[i]])}
        for k in untouched:  # smoothing twice would put off * (2 - eps) here
            assert abs(float(soft[i, k]) - off) < 1e-7
    ref = ref_mix_targets(ref_smooth(y, c, eps), plan)
    torch.testing.assert_close(soft.double(), ref, atol=1e-6, rtol=0)
    twice = ref_mix_targets((1 - eps) * ref_smooth(y, c, eps) + eps / c, plan)
    assert not torch.allclose(soft.double(), twice, atol=1e-6, rtol=0)


def test_soft_targets_mixed_but_never_smoothed():
    n, c = 8, 5
    soft_in = random_soft(n, c, 2)
    x = torch.randn(n, c)
    plan = draw_mix_plan(n, np.random.default_rng(4), mode="elem", smoothing=0.3)
    out = plan.targets(soft_in)
    torch.testing.assert_close(out.double(), ref_mix_targets(soft_in, plan), atol=1e-6, rtol=0)
    # no mixing: the soft rows come back as they are, still unsmoothed
    _, same = mixup_batch(x, soft_in, generator=np.random.default_rng(0), prob=0.0,
                          label_smoothing=0.3)  # fmt: skip
    assert torch.equal(same, soft_in)


# ---------------------------------------------------------------------------------------------
# Determinism, degenerate batches, modes
# ---------------------------------------------------------------------------------------------


def _plans_equal(a: MixPlan, b: MixPlan) -> bool:
    same_boxes = (a.boxes is None and b.boxes is None) or (
        a.boxes is not None and b.boxes is not None and np.array_equal(a.boxes, b.boxes)
    )
    return (
        np.array_equal(a.perm, b.perm) and np.array_equal(a.lam, b.lam) and same_boxes
        and a.shared == b.shared
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["batch", "elem"])
@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_plan_and_outputs_different_seed_different_plan(mode: str, kind: str):
    n = 8
    x, y = torch.randn(n, 3, 8, 8), torch.randint(0, 4, (n,))
    opts = dict(
        mixup_alpha=0.0 if kind == "cutmix" else 1.0,
        cutmix_alpha=0.0 if kind == "mixup" else 1.0, mode=mode, label_smoothing=0.1,
    )  # fmt: skip
    plan_opts: dict[str, Any] = dict(
        image_size=(8, 8), mode=mode, mixup_alpha=opts["mixup_alpha"],
        cutmix_alpha=opts["cutmix_alpha"],
    )  # fmt: skip
    plans = []
    for seed in range(12):
        a, b = (draw_mix_plan(n, np.random.default_rng(seed), **plan_opts) for _ in range(2))
        assert _plans_equal(a, b)
        plans.append(a)
        out1 = mixup_batch(x, y, 4, generator=np.random.default_rng(seed), **opts)
        out2 = mixup_batch(x, y, 4, generator=np.random.default_rng(seed), **opts)
        assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1], out2[1])
    for i in range(len(plans)):
        for j in range(i + 1, len(plans)):
            assert not _plans_equal(plans[i], plans[j]), (i, j)


@pytest.mark.parametrize("mode", ["batch", "elem"])
@pytest.mark.parametrize(
    ("kind", "shape"),
    [("mixup", (1, 5)), *((kind, (1, 3, 8, 8)) for kind in KINDS)],
)
def test_batch_of_one_is_unchanged(mode: str, kind: str, shape: tuple[int, ...]):
    x, y = torch.randn(*shape), torch.tensor([2])
    opts = dict(
        mixup_alpha=0.0 if kind == "cutmix" else 1.0,
        cutmix_alpha=0.0 if kind == "mixup" else 1.0, mode=mode,
    )  # fmt: skip
    for seed in range(5):
        xm, soft = mixup_batch(x, y, 4, generator=np.random.default_rng(seed),
                               label_smoothing=0.2, **opts)  # fmt: skip
        assert torch.equal(xm, x)
        torch.testing.assert_close(soft.double(), ref_smooth(y, 4, 0.2), atol=1e-7, rtol=0)


@pytest.mark.parametrize("mode", ["batch", "elem"])
@pytest.mark.parametrize("kind", KINDS)
def test_prob_zero_mixes_nothing(mode: str, kind: str):
    x = torch.randn(9, 3, 6, 6)
    x_before = x.clone()
    plan = draw_mix_plan(
        9, np.random.default_rng(0), image_size=(6, 6), prob=0.0, mode=mode,
        mixup_alpha=0.0 if kind == "cutmix" else 1.0, cutmix_alpha=0.0 if kind == "mixup" else 1.0,
    )  # fmt: skip
    assert (plan.lam == 1).all() and plan.boxes is None and not plan.mixes
    assert torch.equal(mix_inputs(x, plan), x_before)
    assert torch.equal(x, x_before)


def test_identity_plan():
    plan = MixPlan.identity(5, 3, 0.1)
    assert not plan.mixes and np.array_equal(plan.perm, np.arange(5)) and (plan.lam == 1).all()
    x = torch.randn(5, 4)
    assert torch.equal(mix_inputs(x, plan), x)
    y = torch.tensor([0, 1, 2, 1, 0])
    torch.testing.assert_close(plan.targets(y).double(), ref_smooth(y, 3, 0.1), atol=1e-7, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_mode_shares_lambda_elem_mode_does_not(kind: str):
    n = 16
    opts = dict(
        image_size=(16, 16), mixup_alpha=0.0 if kind == "cutmix" else 1.0,
        cutmix_alpha=0.0 if kind == "mixup" else 1.0, switch_prob=0.5,
    )  # fmt: skip
    for seed in range(5):
        batch = draw_mix_plan(n, np.random.default_rng(seed), mode="batch", **opts)
        assert batch.shared and len(set(batch.lam.tolist())) == 1
        if batch.boxes is not None:
            assert (batch.boxes == batch.boxes[0]).all()
        elem = draw_mix_plan(n, np.random.default_rng(seed), mode="elem", **opts)
        assert not elem.shared and len(set(elem.lam.tolist())) > n // 2
    assert batch.lam.dtype == np.float32 and batch.perm.shape == (n,)


def test_elem_mode_with_prob_half_leaves_some_samples_unmixed():
    n = 32
    plan = draw_mix_plan(n, np.random.default_rng(0), image_size=(8, 8), mode="elem", prob=0.5,
                         mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=4)  # fmt: skip
    x, y = torch.randn(n, 3, 8, 8), torch.arange(n) % 4
    xm = mix_inputs(x, plan)
    unmixed = plan.lam == 1
    assert 0 < unmixed.sum() < n
    for i in np.flatnonzero(unmixed):
        assert torch.equal(xm[i], x[i])
        assert plan.boxes is None or not plan.boxes[i].any()
    soft = plan.targets(y)
    torch.testing.assert_close(
        soft[torch.from_numpy(unmixed)].double(),
        ref_smooth(y[torch.from_numpy(unmixed)], 4, 0.0), atol=1e-7, rtol=0,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_cutmix_needs_4d_inputs(mode: str):
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        mixup_batch(torch.randn(4, 10), torch.arange(4), 4, generator=np.random.default_rng(0),
                    mixup_alpha=0.0, cutmix_alpha=1.0, mode=mode)  # fmt: skip
    plan = draw_mix_plan(4, np.random.default_rng(0), image_size=(8, 8), mixup_alpha=0.0,
                         cutmix_alpha=1.0, mode=mode)  # fmt: skip
    for bad in (torch.randn(4, 8, 8), torch.randn(4, 1, 3, 8, 8)):
        with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
            mix_inputs(bad, plan)


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_integer_targets_need_num_classes(prob: float):
    with pytest.raises(ValueError, match="num_classes"):
        mixup_batch(torch.randn(4, 3), torch.arange(4), generator=np.random.default_rng(0),
                    prob=prob)  # fmt: skip
    with pytest.raises(ValueError, match="num_classes"):
        MixPlan.identity(4, None, 0.1).targets(torch.arange(4))


@pytest.mark.parametrize("mode", ["batch", "elem"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_mixup_needs_floating_point_inputs(mode: str, dtype: torch.dtype):
    x = torch.randint(0, 100, (6, 3, 4, 4)).to(dtype)
    with pytest.raises(ValueError, match="floating-point"):
        mixup_batch(x, torch.arange(6), 6, generator=np.random.default_rng(0), mode=mode)


@pytest.mark.parametrize("smoothing", [-0.1, 1.0, 1.5, float("nan")])
def test_smooth_targets_rejects_bad_smoothing(smoothing: float):
    with pytest.raises(ValueError, match="smoothing"):
        smooth_targets(torch.arange(3), 3, smoothing)
    with pytest.raises(ValueError, match="smoothing"):
        smooth_targets(random_soft(3, 3, 0), 3, smoothing)


@pytest.mark.parametrize(
    "targets",
    [
        torch.zeros(4, 5, dtype=torch.long),  # (N, H) integer, e.g. segmentation rows
        torch.zeros(4, 5, 6, dtype=torch.long),
        torch.zeros(4),  # float (N,): neither class indices nor probability rows
        torch.zeros(4, 3, 5),
    ],
)
def test_smooth_targets_rejects_other_shapes(targets: Tensor):
    with pytest.raises(ValueError, match="shape"):
        smooth_targets(targets, 3, 0.1)


@pytest.mark.parametrize("num_classes", [0, 1])
def test_smooth_targets_rejects_too_few_classes(num_classes: int):
    with pytest.raises(ValueError, match="num_classes"):
        smooth_targets(torch.zeros(3, dtype=torch.long), num_classes, 0.1)
