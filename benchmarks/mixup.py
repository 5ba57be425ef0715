"""What mixing one batch with ``lightning_reg`` costs, against the cheapest possible mix.

``Mixup`` draws a plan for each training batch on the host (``draw_mix_plan``: partners,
coefficients, CutMix boxes), mixes the inputs with it (``mix_inputs``) and turns the integer
targets into mixed, smoothed probability rows (``MixPlan.targets``). This script times, in one
run and on one CPU batch ``x`` of shape 256x3x32x32 float32 with integer targets ``y`` in 0..9:

1. the floor: ``x.index_select(0, perm).lerp_(x, lam)`` with a permutation tensor drawn
   beforehand and a Python float ``lam``: one gather of the batch plus one lerp written over the
   gathered copy (one allocation). For reference, its two halves alone, the out-of-place
   ``torch.lerp(x.index_select(0, perm), x, lam)`` (a second 3 MiB allocation), and advanced
   indexing, ``torch.lerp(x[perm], x, lam)``, which is not used as the floor: on CPU ``x[perm]``
   runs the generic ``index`` kernel, about 3x slower than ``index_select``'s row copies, and
   would flatter every ratio;
2. batch mode (``mode="batch"``, one coefficient per batch, ``mixup_alpha=1.0, prob=1.0``);
3. per-element mode (``mode="elem"``, one coefficient per sample), mixup only, and mixup+CutMix
   (``cutmix_alpha=1.0, switch_prob=0.5``);
4. batch CutMix (``cutmix_alpha=1.0, mixup_alpha=0``, one box per batch);
5. the callback's hook, ``Mixup.on_train_batch_start`` on a ``[x, y]`` list batch in batch mode
   (plan from the current block, input mixing, soft targets, entries replaced in place): the
   per-step work of the ``Mixup`` callback itself, outside a Trainer (a stub stands in for it);
6. a plain per-sample Python loop, ``out[i] = lam[i] * x[i] + (1 - lam[i]) * x[perm[i]]``: what
   per-element mixup costs when it is not vectorised.

Each mode of our package is timed twice: the input mixing alone, ``mix_inputs(x, plan)``, cycling
through plans drawn beforehand; and all in, ``mixup_batch(x, y, 10, label_smoothing=0.1, ...)``,
which draws a fresh plan, mixes the inputs and builds the soft targets (what ``Mixup`` does per
batch; it also creates one seeded generator per block of 64 batches, timed separately for
reference, and in batch mode draws a whole block's plans at once). The goals are
checked on the input mixing (batch mode at most 1.2x the floor, per-element mixup at most 2x);
the all-in ratios are printed for information.

Before timing, every timed variant is run once and its result compared with an independent
per-sample reference (float64 for the targets), so a fast but wrong variant is caught. Each
repetition round then runs every variant once, in an order shuffled (seeded) from round to round,
so machine noise hits all of them alike (a plain rotation keeps each variant behind the same
predecessor, and the caches a predecessor leaves move these ~100 us timings by 10-20%); the
warm-up rounds are dropped and the median of the rest is reported with its ratio to the floor.
Even so, ratios near 1 move by about +-0.05 from run to run. Times are machine-dependent and
never asserted.

Every variant allocates fresh 3 MiB outputs. By default glibc hands such blocks back to the
kernel when they are freed, so the next call page-faults them in again, which on some (virtual)
machines costs more than the arithmetic and makes the medians bimodal from run to run. The
script therefore asks glibc (``mallopt``) to keep freed memory in the heap, like the caching
allocators of GPU back ends; ``--system-malloc`` leaves glibc's defaults, and the ``faults``
column (minor page faults per call) shows what that costs. Other busy processes distort the
timings too: with 2 threads, a preempted worker stalls a kernel for a whole scheduler tick
(times then jump to multiples of ~4-8 ms). Run it on an otherwise idle machine; the load average
is printed in the header, and variants whose median is far above their minimum are flagged.

Run it from the repository root::

    .venv/bin/python benchmarks/mixup.py                    # 500 rounds, ~10 s
    .venv/bin/python benchmarks/mixup.py --quick            # 50 rounds
    .venv/bin/python benchmarks/mixup.py --system-malloc    # glibc's default heap trimming
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import itertools
import os
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_reg import Mixup
from lightning_reg.mixing import MixPlan, draw_mix_plan, mix_inputs, mixup_batch

N, CHANNELS, SIZE, CLASSES, SMOOTHING = 256, 3, 32, 10, 0.1
WARMUP, ROUNDS = 20, 500
QUICK_WARMUP, QUICK_ROUNDS = 5, 50
POOL = 16  # plans drawn beforehand per mode, cycled through by the mix-only timings
BATCH_GOAL = 1.2  # batch mode mix_inputs / floor: at most this
ELEM_GOAL = 2.0  # per-element mixup mix_inputs / floor: at most this
NOISY = 2.0  # flag variants whose median exceeds their minimum by more than this factor

FLOOR = "floor: x.index_select(0, perm).lerp_(x, lam)"
HOOK = "batch mixup: Mixup.on_train_batch_start, [x, y] list"
LOOP = "python loop, elem mixup"
MIX, ALL_IN = "mix_inputs", "draw+mix+targets"


@dataclass(frozen=True)
class Mode:
    """One configuration of ``draw_mix_plan`` / ``mixup_batch``."""

    label: str
    options: dict[str, Any]

    def key(self, part: str) -> str:
        return f"{self.label}: {part}"


BATCH = Mode("batch mixup", dict(mode="batch", mixup_alpha=1.0))
ELEM = Mode("elem mixup", dict(mode="elem", mixup_alpha=1.0))
ELEM_CUT = Mode(
    "elem mixup+cutmix", dict(mode="elem", mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5)
)
BATCH_CUT = Mode("batch cutmix", dict(mode="batch", mixup_alpha=0.0, cutmix_alpha=1.0))
MODES = (BATCH, ELEM, ELEM_CUT, BATCH_CUT)


def draw(mode: Mode, rng: np.random.Generator) -> MixPlan:
    """The plan ``mixup_batch`` draws for ``x``, ``y`` with these options."""
    return draw_mix_plan(
        N, rng, image_size=(SIZE, SIZE), prob=1.0, num_classes=CLASSES, smoothing=SMOOTHING,
        **mode.options,
    )  # fmt: skip


# ------------------------------------------------------------------------------------- variants
@dataclass
class Variant:
    """A timed callable and the check of its one verification run."""

    fn: Callable[[], Any]
    check: Callable[[], str]  # runs ``fn`` once, raises if wrong, returns what was compared


def python_loop(x: Tensor, plan: MixPlan) -> Tensor:
    """Per-element mixup, one sample at a time."""
    lam, perm = plan.lam.tolist(), plan.perm.tolist()
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = lam[i] * x[i] + (1 - lam[i]) * x[perm[i]]
    return out


def reference_inputs(x: Tensor, plan: MixPlan) -> Tensor:
    """Mixed inputs of any plan, built sample by sample in float64 (checks only)."""
    x64 = x.double()
    out = torch.empty_like(x64)
    boxes = plan.boxes if plan.boxes is not None else np.zeros((N, 4), np.int64)
    perm, lams, cuts = plan.perm.tolist(), plan.lam.tolist(), plan.cut.tolist()
    rows = zip(perm, lams, cuts, boxes.tolist(), strict=True)
    for i, (j, lam, cut, (y0, y1, x0, x1)) in enumerate(rows):
        if cut:  # CutMix: own pixels, the partner's inside the (possibly empty) box
            out[i] = x64[i]
            out[i, :, y0:y1, x0:x1] = x64[j, :, y0:y1, x0:x1]
            area = max(y1 - y0, 0) * max(x1 - x0, 0) / (SIZE * SIZE)
            if abs(lam - (1 - area)) > 1e-6:  # correct_lam: weight = unpasted fraction
                raise AssertionError(f"sample {i}: lam {lam} but the box leaves {1 - area}")
        elif y1 > y0 and x1 > x0:
            raise AssertionError(f"sample {i} is not cut but has the box {(y0, y1, x0, x1)}")
        else:
            out[i] = lam * x64[i] + (1 - lam) * x64[j]
    return out


def reference_targets(y: Tensor, plan: MixPlan) -> Tensor:
    """Smoothed one-hot rows mixed with the plan's partners and weights, in float64."""
    soft = torch.full((N, CLASSES), SMOOTHING / CLASSES, dtype=torch.float64)
    soft[torch.arange(N), y] += 1 - SMOOTHING
    lam = torch.from_numpy(plan.lam).double().unsqueeze(1)
    return lam * soft + (1 - lam) * soft[torch.from_numpy(plan.perm)]


def compare(got: Tensor, want: Tensor, what: str, atol: float = 1e-5) -> str:
    diff = (got.double() - want.double()).abs().max().item()
    if got.shape != want.shape or not diff <= atol:
        raise AssertionError(f"{what}: max |diff| {diff:.3g} (shape {tuple(got.shape)})")
    return f"{what} (max |diff| {diff:.1e})"


def floor_variants(x: Tensor) -> dict[str, Variant]:
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    lam = 0.3
    partner = x[perm]
    want = lam * x.double() + (1 - lam) * x.double()[perm]

    def floor() -> Tensor:
        return x.index_select(0, perm).lerp_(x, lam)  # in place: one 3 MiB allocation, not two

    def indexing() -> Tensor:
        return torch.lerp(x[perm], x, lam)

    def formula(fn: Callable[[], Tensor]) -> Callable[[], str]:
        return lambda: compare(fn(), want, "== lam*x + (1-lam)*x[perm]")

    return {
        FLOOR: Variant(floor, formula(floor)),
        "  (x.index_select(0, perm) alone)": Variant(
            lambda: x.index_select(0, perm),
            lambda: compare(x.index_select(0, perm), x[perm], "== x[perm]", atol=0),
        ),
        "  (lerp alone, partner gathered before)": Variant(
            lambda: torch.lerp(partner, x, lam), formula(lambda: torch.lerp(partner, x, lam))
        ),
        "  (torch.lerp(x.index_select(0, perm), x, lam): out of place)": Variant(
            lambda: torch.lerp(x.index_select(0, perm), x, lam),
            formula(lambda: torch.lerp(x.index_select(0, perm), x, lam)),
        ),
        "  (lerp(x[perm], x, lam): advanced indexing)": Variant(indexing, formula(indexing)),
    }


def mode_variants(x: Tensor, y: Tensor, mode: Mode, seed: int) -> dict[str, Variant]:
    pool = [draw(mode, np.random.default_rng([seed, i])) for i in range(POOL)]
    plans = itertools.cycle(pool)
    rng = np.random.default_rng([seed, POOL])

    def mix_only() -> Tensor:
        return mix_inputs(x, next(plans))

    def check_mix() -> str:
        plan = pool[0]
        return compare(mix_inputs(x, plan), reference_inputs(x, plan), "== per-sample reference")

    def all_in() -> tuple[Tensor, Tensor]:
        return mixup_batch(x, y, CLASSES, generator=rng, label_smoothing=SMOOTHING, **mode.options)

    def check_all_in() -> str:
        plan = draw(mode, copy.deepcopy(rng))  # the plan all_in is about to draw
        mixed, targets = all_in()
        if not torch.allclose(targets.sum(1), torch.ones(N)):
            raise AssertionError("target rows do not sum to 1")
        inputs = compare(mixed, reference_inputs(x, plan), "inputs == reference")
        return f"{inputs}, {compare(targets, reference_targets(y, plan), 'targets == reference')}"

    return {
        mode.key(MIX): Variant(mix_only, check_mix),
        mode.key(ALL_IN): Variant(all_in, check_all_in),
    }


def loop_variant(x: Tensor, seed: int) -> dict[str, Variant]:
    pool = [draw(ELEM, np.random.default_rng([seed, i])) for i in range(POOL)]
    plans = itertools.cycle(pool)

    def check() -> str:
        plan = pool[0]
        loop = compare(python_loop(x, plan), reference_inputs(x, plan), "== float64 reference")
        ours = compare(mix_inputs(x, plan), python_loop(x, plan), "elem mix_inputs == loop")
        return f"{loop}; {ours}"

    return {LOOP: Variant(lambda: python_loop(x, next(plans)), check)}


def generator_variant() -> dict[str, Variant]:
    step = itertools.count()

    def check() -> str:
        a, b = (np.random.default_rng([1, 0, 0, 7, N]).permutation(N) for _ in range(2))
        if not np.array_equal(a, b):
            raise AssertionError("same key, different draws")
        return "same key -> same draws"

    return {
        "  (Mixup's per-block default_rng([seed, rank, epoch, block, n]))": Variant(
            lambda: np.random.default_rng([1234, 0, 0, next(step), N]), check
        )
    }


def hook_variant(x: Tensor, y: Tensor) -> dict[str, Variant]:
    mix = Mixup(1.0, label_smoothing=SMOOTHING, num_classes=CLASSES, seed=7)
    mix.reset()  # what setup(stage="fit") does
    trainer: Any = SimpleNamespace(global_rank=0, current_epoch=0)  # what the hook reads
    pl_module: Any = None

    def hook() -> list[Tensor]:
        batch = [x, y]
        mix.on_train_batch_start(trainer, pl_module, batch, 0)
        return batch

    def check() -> str:
        batch = hook()
        plan = mix.current_plan
        assert plan is not None
        inputs = compare(batch[0], reference_inputs(x, plan), "inputs == reference")
        return f"{inputs}, {compare(batch[1], reference_targets(y, plan), 'targets == reference')}"

    return {HOOK: Variant(hook, check)}


def all_variants(x: Tensor, y: Tensor) -> dict[str, Variant]:
    variants = floor_variants(x)
    for seed, mode in enumerate(MODES, start=1):
        variants |= mode_variants(x, y, mode, seed)
    elem_seed = MODES.index(ELEM) + 1  # the loop mixes with the same plans as elem mix_inputs
    return variants | hook_variant(x, y) | loop_variant(x, elem_seed) | generator_variant()


# -------------------------------------------------------------------------------------- timing
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks in the heap instead of returning them to the kernel."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: leave the allocator as it is
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MiB is glibc's largest mmap threshold on 64-bit: our 3 MiB blocks come from the heap
    kept = libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
    return bool(kept)


def time_once(fn: Callable[[], Any]) -> tuple[float, int]:
    """Seconds and minor page faults for one call; its result is freed after the clock is read."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    del result
    return elapsed, faults


@dataclass
class Timings:
    seconds: list[float]
    faults: list[int]


def run_rounds(variants: dict[str, Variant], warmup: int, rounds: int) -> dict[str, Timings]:
    """Interleaved rounds: every variant once per round, in an order shuffled each round."""
    times = {name: Timings([], []) for name in variants}
    names, order = list(variants), random.Random(0)
    for round_ in range(warmup + rounds):
        for name in order.sample(names, len(names)):
            elapsed, faults = time_once(variants[name].fn)
            if round_ >= warmup:
                times[name].seconds.append(elapsed)
                times[name].faults.append(faults)
    return times


# ------------------------------------------------------------------------------------- reports
def verify(variants: dict[str, Variant]) -> None:
    print("Checks (one run of each timed variant against an independent reference):")
    for name, variant in variants.items():
        print(f"  ok  {name.strip()}: {variant.check()}")


def print_table(times: dict[str, Timings]) -> dict[str, float]:
    medians = {name: 1e6 * statistics.median(t.seconds) for name, t in times.items()}
    floor = medians[FLOOR]
    print(f"  {'variant':<66}{'median us':>10}{'x floor':>9}{'min us':>9}{'faults':>8}{'reps':>6}")
    for name, median in medians.items():
        low, faults = 1e6 * min(times[name].seconds), statistics.mean(times[name].faults)
        print(
            f"  {name:<66}{median:10.1f}{median / floor:8.2f}x{low:9.1f}{faults:8.1f}"
            f"{len(times[name].seconds):6d}"
        )
    noisy = [name.strip() for name, median in medians.items() if median > NOISY * 1e6 * min(
        times[name].seconds)]  # fmt: skip
    if noisy:
        print(f"  median > {NOISY}x min (cold caches, or a busy machine): {', '.join(noisy)}")
    return medians


def goal_checks(medians: dict[str, float]) -> None:
    floor = medians[FLOOR]
    batch = medians[BATCH.key(MIX)] / floor
    elem = medians[ELEM.key(MIX)] / floor
    print("\nGoal checks (input mixing, mix_inputs, against the floor):")
    print(f"  batch mode / floor = {batch:.2f}x (goal <= {BATCH_GOAL}x)", end="")
    print(f"  [{_verdict(batch, BATCH_GOAL)}]")
    print(f"  per-element mode / floor = {elem:.2f}x (goal <= {ELEM_GOAL}x)", end="")
    print(f"  [{_verdict(elem, ELEM_GOAL)}]")
    print("For information (all in: draw + mix + targets, via mixup_batch):")
    for mode in MODES:
        ratio = medians[mode.key(ALL_IN)] / floor
        over = medians[mode.key(ALL_IN)] - medians[mode.key(MIX)]
        print(f"  {mode.label} all-in / floor = {ratio:.2f}x  (draw + targets add {over:.0f} us)")
    hook, over = medians[HOOK] / floor, medians[HOOK] - medians[BATCH.key(MIX)]
    print(f"  Mixup hook (batch mode, list batch) / floor = {hook:.2f}x  (adds {over:.0f} us "
          "to batch mix_inputs)")  # fmt: skip
    loop = medians[LOOP] / medians[ELEM.key(MIX)]
    print(f"  python loop / elem mix_inputs = {loop:.0f}x")


def _verdict(ratio: float, goal: float) -> str:
    return "met" if ratio <= goal else "NOT met"


# ---------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument(
        "--system-malloc", action="store_true", help="keep glibc's default heap trimming"
    )
    args = parser.parse_args()
    kept = False if args.system_malloc else keep_freed_memory()
    torch.set_num_threads(2)
    warmup, rounds = (QUICK_WARMUP, QUICK_ROUNDS) if args.quick else (WARMUP, ROUNDS)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, CHANNELS, SIZE, SIZE, generator=gen)
    y = torch.randint(0, CLASSES, (N,), generator=gen)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} threads, "
        f"load average {load}; x {tuple(x.shape)} {x.dtype} ({x.nbytes / 2**20:.1f} MiB), "
        f"{CLASSES} classes, smoothing {SMOOTHING}; warm-up {warmup} rounds, medians of {rounds}; "
        f"freed memory {'kept in the heap (mallopt)' if kept else 'left to the system malloc'}"
    )
    variants = all_variants(x, y)
    verify(variants)
    start = time.perf_counter()
    times = run_rounds(variants, warmup, rounds)
    print(f"\nTimings ({time.perf_counter() - start:.1f} s):")
    medians = print_table(times)
    goal_checks(medians)


if __name__ == "__main__":
    main()
