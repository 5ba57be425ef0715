"""What the whole ``lightning_reg`` stack costs per ``Trainer.fit``, against no callbacks and code.

The other benchmarks time one mechanism in isolation (a snapshot, one mixed batch). This one times
what a user pays end to end: ``Trainer.fit`` of the same model on the same data, in one run, with

1. ``bare``: no callbacks at all (``logger=False``, no checkpointing, progress bar or model
   summary, no sanity check); ``training_step`` is ``F.cross_entropy(self(x), y)`` and
   ``configure_optimizers`` returns ``AdamW(self.parameters(), weight_decay=0.05)``;
2. ``stack``: the same module with ``EarlyStopping("val_loss", patience=<never stops>)``,
   ``WeightDecayExclusion()``, ``Mixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=10)``
   and ``RegularizationMonitor()``; ``stack+gap`` adds
   ``GeneralizationGapMonitor(subset_size=1024)``;
3. ``hand-written``: the same techniques the way users write them today, without our package:
   ``ModelCheckpoint(monitor="val_loss", save_top_k=1)`` into a temporary directory plus
   ``torch.load`` + ``load_state_dict`` of the best checkpoint after ``fit`` (counted in its
   time), mixup in ``training_step`` (a NumPy Beta draw, ``torch.randperm``, ``lerp`` with
   ``x[perm]``, one-hot soft targets with smoothing 0.1, mixed with the same partners) and
   decay/no-decay param groups split by ``ndim`` in ``configure_optimizers``;
4. ``bare, no val`` and ``stack, no val``: (1) and (2) with ``limit_val_batches=0``, so only the
   per-step path and the cheap epoch ends remain (``EarlyStopping`` gets ``strict=False`` there,
   as it would otherwise raise for the missing ``val_loss``; nothing per step changes); and, to
   tell the cost of mixing itself from that of the callbacks, ``stack - Mixup, no val``.

Model and data: an MLP 256 -> 512 (LayerNorm, ReLU) -> 512 (ReLU) -> 10 on 8192 synthetic training
samples (a noisy linear teacher labels Gaussian inputs; 2048 validation samples), batch 128: 64
optimizer steps of about 3 ms per epoch, where the per-step path dominates the fit and any fixed
per-step cost of the callbacks shows. Two experiments: the per-step one fits (4) for 2 epochs,
the whole-fit one (1)-(3) for 4 epochs with a validation after each. Every fit starts from
``seed_everything(0)``, so all configurations start from the same weights and see the batches in
the same order.

Besides the wall time of ``fit``, the module clocks itself with its own hooks (which Lightning
calls whatever callbacks are attached, so the clock costs every configuration the same, a few
``perf_counter`` calls): the training loop (``on_train_epoch_start`` to the epoch's last
``on_train_batch_end``: data loading, batch transfer, ``Mixup``, forward, backward, optimizer
step and every per-step callback hook), each step (from one ``on_train_batch_end`` to the next),
validation, and the end of validation (from the module's ``on_validation_epoch_end`` to its
``on_validation_end``, where ``GeneralizationGapMonitor`` runs its extra evaluation). The goals:
the stack's per-step path within 5% of bare (no-validation fits: training-loop time and median
step time, ratio <= 1.05 for both), the stack no slower than the hand-written version (whole fit,
ratio <= 1.0); the gap monitor's extra evaluation is reported per validation and as a fraction of
the fit.

Each round of an experiment runs its configurations once each, in an order rotated from round to
round (each configuration runs in each position equally often); the first round is a warm-up and
is dropped. This machine is noisy in a particular way: the same fit
varies by +-10% from one run to the next (a slow drift shared by fits that run close together),
far more than the differences measured here. So the verdicts read the median over rounds of the
ratio within each round (the two fits of a ratio ran seconds apart), and the ratio of the
per-configuration medians is printed beside it; the per-round ratios of the per-step goal are
printed too. Before timing, the restored weights are checked: after ``fit``, both the stack and
the hand-written version must hold the weights of their best validation epoch. Times are
machine-dependent and never asserted. With 2 threads on 2 cores, any other busy process stalls
torch's worker threads and multiplies fit times (the load average is printed in the header, and
rounds much slower than the fastest are flagged): run it on an otherwise idle machine.

``--breakdown`` then clocks the pieces of the per-step path inside 3-epoch fits without
validation (bare, stack, hand-written): ``training_step``, the optimizer's arithmetic, Lightning's
dispatch of the per-step callback hooks, and ``Mixup``'s batch transform. It wraps them with
``perf_counter`` calls rather than using cProfile, which inflates the many small NumPy and torch
calls of a batch transform several-fold. Note that host code right after an optimizer step runs
cold (caches and TLBs refilled): a per-batch transform costs several times what a hot
microbenchmark such as ``benchmarks/mixup.py`` reports.

Run it from the repository root::

    .venv/bin/python benchmarks/whole_stack.py               # ~2 min
    .venv/bin/python benchmarks/whole_stack.py --quick       # a smoke run, ~30 s
    .venv/bin/python benchmarks/whole_stack.py --breakdown   # + where the per-step time goes
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import random
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg import (
    EarlyStopping,
    GeneralizationGapMonitor,
    Mixup,
    RegularizationMonitor,
    WeightDecayExclusion,
)
from lightning_reg._utils import PER_STEP_HOOKS

N_TRAIN, N_VAL, FEATURES, HIDDEN, CLASSES, BATCH = 8192, 2048, 256, 512, 10, 128
LR, WEIGHT_DECAY, MIXUP_ALPHA, SMOOTHING, SUBSET = 1e-3, 0.05, 1.0, 0.1, 1024
# (epochs per fit, rounds) of the two experiments; the first round of each is a warm-up
STEP_RUN, FIT_RUN = (2, 25), (4, 13)
QUICK_STEP_RUN, QUICK_FIT_RUN = (2, 7), (3, 4)
STEP_GOAL = 1.05  # stack / bare, training-loop time per step without validation: at most this
HAND_GOAL = 1.0  # stack / hand-written, whole fit: at most this

BARE, STACK, GAP, HAND = "bare", "stack", "stack+gap", "hand-written"
BARE_NOVAL, STACK_NOVAL, NO_MIXUP = "bare, no val", "stack, no val", "stack - Mixup, no val"
PER_STEP = (BARE_NOVAL, STACK_NOVAL, NO_MIXUP)  # the per-step experiment
WHOLE_FIT = (BARE, STACK, GAP, HAND)  # the whole-fit experiment
BUSY = 1.3  # flag rounds slower than this multiple of the fastest one


# --------------------------------------------------------------------------------- model, data
def make_data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Gaussian inputs labelled by a noisy linear teacher: learnable, with room to overfit."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_VAL, FEATURES, generator=g)
    teacher = torch.randn(FEATURES, CLASSES, generator=g)
    y = (x @ teacher * 0.25 + torch.randn(N_TRAIN + N_VAL, CLASSES, generator=g)).argmax(1)
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


@dataclass
class Clock:
    """Seconds spent in each part of one fit, measured from the module's own hooks."""

    train_loop: float = 0.0  # on_train_epoch_start -> the epoch's last on_train_batch_end
    validation: float = 0.0  # on_validation_start -> on_validation_end (module hooks)
    validation_end: float = 0.0  # on_validation_epoch_end -> on_validation_end (module hooks)
    steps: int = 0
    step_times: list[float] = field(default_factory=list)  # previous batch end -> this one's end
    validations: int = 0
    val_losses: list[float] = field(default_factory=list)
    _epoch: float = 0.0
    _last: float = 0.0
    _val: float = 0.0
    _val_end: float = 0.0


class Net(pl.LightningModule):
    """The MLP, as a user writes it: plain cross-entropy, AdamW over ``self.parameters()``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(FEATURES, HIDDEN), nn.LayerNorm(HIDDEN), nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES),
        )  # fmt: skip
        self.clock = Clock()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    # the clock: Lightning calls these module hooks in every configuration
    def on_train_epoch_start(self) -> None:
        self.clock._epoch = self.clock._last = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        now, clock = time.perf_counter(), self.clock
        clock.step_times.append(now - clock._last)
        clock._last = now
        clock.steps += 1

    def on_validation_start(self) -> None:
        clock = self.clock
        clock.train_loop += clock._last - clock._epoch
        clock._epoch = clock._last  # validation runs after the epoch's last batch: count it once
        clock._val = time.perf_counter()

    def on_validation_epoch_end(self) -> None:
        self.clock._val_end = time.perf_counter()

    def on_validation_end(self) -> None:
        now, clock = time.perf_counter(), self.clock
        clock.validation += now - clock._val
        clock.validation_end += now - clock._val_end
        clock.validations += 1
        clock.val_losses.append(float(self.trainer.callback_metrics["val_loss"]))

    def on_train_epoch_end(self) -> None:
        self.clock.train_loop += self.clock._last - self.clock._epoch
        self.clock._epoch = self.clock._last


class HandWrittenNet(Net):
    """Mixup with label smoothing and decay/no-decay groups written by hand, as users do today."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        lam = float(np.random.beta(MIXUP_ALPHA, MIXUP_ALPHA))
        perm = torch.randperm(x.shape[0], device=x.device)
        mixed = torch.lerp(x[perm], x, lam)
        soft = F.one_hot(y, CLASSES).float() * (1 - SMOOTHING) + SMOOTHING / CLASSES
        target = torch.lerp(soft[perm], soft, lam)
        return F.cross_entropy(self(mixed), target)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=LR)


# ------------------------------------------------------------------------------ configurations
@dataclass
class Config:
    """One way of training: the module class, its callbacks and Trainer options."""

    name: str
    module: type[Net]
    callbacks: Callable[[Path], list[Callback]]
    validate: bool = True
    checkpointing: bool = False
    reload_best: bool = False  # hand-written: torch.load + load_state_dict after fit


def stack(strict: bool = True, mixup: bool = True) -> list[Callback]:
    mix = Mixup(mixup_alpha=MIXUP_ALPHA, label_smoothing=SMOOTHING, num_classes=CLASSES)
    return [
        EarlyStopping("val_loss", patience=10_000, strict=strict),
        WeightDecayExclusion(verbose=False),
        *([mix] if mixup else []),
        RegularizationMonitor(),
    ]


def configs() -> dict[str, Config]:
    def hand(root: Path) -> list[Callback]:
        return [ModelCheckpoint(dirpath=root / "ckpt", monitor="val_loss", save_top_k=1)]

    return {
        c.name: c
        for c in (
            Config(BARE, Net, lambda root: []),
            Config(STACK, Net, lambda root: stack()),
            Config(GAP, Net, lambda root: [*stack(), GeneralizationGapMonitor(subset_size=SUBSET)]),
            Config(HAND, HandWrittenNet, hand, checkpointing=True, reload_best=True),
            Config(BARE_NOVAL, Net, lambda root: [], validate=False),
            Config(STACK_NOVAL, Net, lambda root: stack(strict=False), validate=False),
            Config(NO_MIXUP, Net, lambda root: stack(strict=False, mixup=False), validate=False),
        )
    }


@dataclass
class Result:
    """One timed fit."""

    fit: float  # seconds: Trainer.fit (+ the reload of the best checkpoint for hand-written)
    reload: float
    clock: Clock
    model: Net


def run_fit(config: Config, data: tuple[TensorDataset, TensorDataset], epochs: int) -> Result:
    train_set, val_set = data
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pl.seed_everything(0, verbose=False)
        model = config.module()
        callbacks = config.callbacks(root)
        trainer = pl.Trainer(
            max_epochs=epochs, logger=False, enable_checkpointing=config.checkpointing,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            limit_val_batches=None if config.validate else 0, callbacks=callbacks,
            default_root_dir=root, accelerator="cpu", devices=1,
        )  # fmt: skip
        train = DataLoader(train_set, batch_size=BATCH, shuffle=True)
        val = DataLoader(val_set, batch_size=BATCH)
        start = time.perf_counter()
        trainer.fit(model, train, val)
        fitted = time.perf_counter()
        if config.reload_best:
            best = next(cb for cb in callbacks if isinstance(cb, ModelCheckpoint)).best_model_path
            checkpoint = torch.load(best, map_location="cpu", weights_only=True)
            model.load_state_dict(checkpoint["state_dict"])
        end = time.perf_counter()
    return Result(end - start, end - fitted, model.clock, model)


# --------------------------------------------------------------------------------------- checks
def val_loss_of(model: Net, val_set: TensorDataset) -> float:
    """The validation loss of the model's current weights, as validation_step logs it."""
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x), y) for x, y in DataLoader(val_set, batch_size=BATCH)]
    return float(torch.stack(losses).mean())


def verify(data: tuple[TensorDataset, TensorDataset], epochs: int) -> None:
    """Fit the stack and the hand-written version once; both must end at their best epoch."""
    print("Checks (one fit each, not timed):")
    for config in (configs()[STACK], configs()[HAND]):
        result = run_fit(config, data, epochs)
        losses = result.clock.val_losses
        best = min(losses)
        now = val_loss_of(result.model, data[1])
        if not abs(now - best) <= 1e-5 * max(1.0, abs(best)):
            raise AssertionError(f"{config.name}: val_loss after fit {now:.6f} != best {best:.6f}")
        improvements = sum(1 for i, v in enumerate(losses) if all(v < w for w in losses[:i]))
        trail = " ".join(f"{v:.3f}" for v in losses)
        print(
            f"  ok  {config.name}: weights after fit give val_loss {now:.4f} == best of "
            f"[{trail}] (epoch {losses.index(best)}); {improvements} improvements "
            f"({'snapshots' if config.name == STACK else 'checkpoint saves'})"
        )


# --------------------------------------------------------------------------------------- timing
def run_rounds(
    names: tuple[str, ...], data: tuple[TensorDataset, TensorDataset], epochs: int, rounds: int
) -> dict[str, list[Result]]:
    """Every configuration of ``names`` once per round, the order rotated from round to round."""
    table = configs()
    results: dict[str, list[Result]] = {name: [] for name in names}
    durations = []
    for round_ in range(rounds):
        start = time.perf_counter()
        shift = round_ % len(names)  # each configuration runs in each position equally often
        for name in names[shift:] + names[:shift]:
            gc.collect()  # no configuration pays for the garbage of the previous one
            result = run_fit(table[name], data, epochs)
            result.model = None  # type: ignore[assignment]  # free the weights
            if round_ > 0:  # round 0 is the warm-up
                results[name].append(result)
        durations.append(time.perf_counter() - start)
    fastest = min(durations)
    busy = [f"{i} ({d / fastest:.1f}x)" for i, d in enumerate(durations) if d > BUSY * fastest]
    print(
        f"  {rounds} rounds of {len(names)} fits ({epochs} epochs each): "
        f"{sum(durations):.0f} s, fastest round {fastest:.1f} s"
        + (f"; slower than {BUSY}x the fastest (kept): {', '.join(busy)}" if busy else "")
    )
    return results


def median(results: list[Result], value: Callable[[Result], float]) -> float:
    return statistics.median(value(r) for r in results)


def median_step(result: Result) -> float:
    """The fit's median step: robust to the stalls a busy 2-core machine inflicts on a few."""
    return statistics.median(result.clock.step_times)


# -------------------------------------------------------------------------------------- reports
def print_table(results: dict[str, list[Result]], base: str) -> dict[str, dict[str, float]]:
    """Medians per configuration (fit, its parts, per-step times) and paired ratios to ``base``."""
    rows: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        rows[name] = {
            "fit": median(runs, lambda r: r.fit),
            "loop": median(runs, lambda r: r.clock.train_loop),
            "val": median(runs, lambda r: r.clock.validation),
            "val_end": median(runs, lambda r: r.clock.validation_end),
            "rest": median(runs, lambda r: r.fit - r.clock.train_loop - r.clock.validation),
            "reload": median(runs, lambda r: r.reload),
            "step": median(runs, median_step),
            "steps": runs[0].clock.steps,
            "validations": runs[0].clock.validations,
        }
    print(
        f"  {'configuration':<22}{'fit s':>8}{'x ' + base:>15}{'loop s':>8}{'val s':>7}"
        f"{'val-end s':>10}{'rest s':>8}{'loop/step ms':>13}{'x ' + base:>15}"
        f"{'median step ms':>15}{'x ' + base:>15}"
    )
    for name, row in rows.items():
        getters = (fit_time, loop_time, median_step)
        ratios = [paired(results, name, base, value) for value in getters]
        print(
            f"  {name:<22}{row['fit']:8.3f}{ratios[0]:14.3f}x{row['loop']:8.3f}{row['val']:7.3f}"
            f"{row['val_end']:10.3f}{row['rest']:8.3f}{1e3 * row['loop'] / row['steps']:13.3f}"
            f"{ratios[1]:14.3f}x{1e3 * row['step']:15.3f}{ratios[2]:14.3f}x"
        )
    print(
        f"  ({rows[base]['steps']:.0f} steps and {rows[base]['validations']:.0f} validations per "
        f"fit; medians over rounds; x {base}: median over rounds of the ratio within the round; "
        "loop = training loop, val = validation incl. val-end, rest = fit - loop - val: set-up, "
        "epoch ends, checkpoints, restore, teardown)"
    )
    return rows


def fit_time(result: Result) -> float:
    return result.fit


def loop_time(result: Result) -> float:
    return result.clock.train_loop


def paired(
    results: dict[str, list[Result]], a: str, b: str, value: Callable[[Result], float]
) -> float:
    """Median over rounds of the ratio a / b within each round (robust to slow drifts)."""
    pairs = zip(results[a], results[b], strict=True)
    return statistics.median(value(x) / value(y) for x, y in pairs)


def goal_checks(
    step_rows: dict[str, dict[str, float]],
    step_results: dict[str, list[Result]],
    fit_rows: dict[str, dict[str, float]],
    fit_results: dict[str, list[Result]],
) -> None:
    print("\nGoal checks (medians over rounds of the ratio within each round):")
    loop = paired(step_results, STACK_NOVAL, BARE_NOVAL, loop_time)
    step = paired(step_results, STACK_NOVAL, BARE_NOVAL, median_step)
    steps = step_rows[BARE_NOVAL]["steps"]
    extra_us = 1e6 * (step_rows[STACK_NOVAL]["loop"] - step_rows[BARE_NOVAL]["loop"]) / steps
    print(
        f"  per-step path, stack / bare (no validation): training loop {loop:.3f}x, median step "
        f"{step:.3f}x; goal <= {STEP_GOAL}x for both  [{_verdict(max(loop, step) <= STEP_GOAL)}; "
        f"{extra_us:+.0f} us per step]"
    )
    rounds = zip(step_results[STACK_NOVAL], step_results[BARE_NOVAL], strict=True)
    per_round = " ".join(f"{loop_time(a) / loop_time(b):.3f}" for a, b in rounds)
    print(f"    per-round ratios of the training loop: {per_round}")
    no_mix = paired(step_results, NO_MIXUP, BARE_NOVAL, loop_time)
    no_mix_us = 1e6 * (step_rows[NO_MIXUP]["loop"] - step_rows[BARE_NOVAL]["loop"]) / steps
    print(f"    without Mixup (stack - Mixup) / bare: {no_mix:.3f}x ({no_mix_us:+.0f} us per step)")
    hand = paired(fit_results, STACK, HAND, fit_time)
    print(
        f"  stack / hand-written (whole fit, hand-written incl. reload) = {hand:.3f}x "
        f"(goal <= {HAND_GOAL}x)  [{_verdict(hand <= HAND_GOAL)}]"
    )
    print(
        f"    training loop alone = {paired(fit_results, STACK, HAND, loop_time):.3f}x; "
        f"stack+gap / hand-written = {paired(fit_results, GAP, HAND, fit_time):.3f}x; "
        f"hand-written reload of the best checkpoint {1e3 * fit_rows[HAND]['reload']:.1f} ms"
    )
    print(
        "  for information: with validation, stack / bare = "
        f"{paired(fit_results, STACK, BARE, fit_time):.3f}x (whole fit), "
        f"{paired(fit_results, STACK, BARE, loop_time):.3f}x (training loop); hand-written / "
        f"bare = {paired(fit_results, HAND, BARE, loop_time):.3f}x (training loop: mixup in "
        "training_step, two param groups)"
    )
    validations = fit_rows[GAP]["validations"]
    extra = fit_rows[GAP]["val_end"] - fit_rows[STACK]["val_end"]
    pass_share = extra / (fit_rows[STACK]["val"] - fit_rows[STACK]["val_end"])
    print(
        f"  GeneralizationGapMonitor(subset_size={SUBSET}): extra {1e3 * extra / validations:.1f} "
        f"ms per validation ({extra / fit_rows[GAP]['fit']:.1%} of the stack+gap fit; "
        f"{pass_share:.0%} of a validation pass over {N_VAL} samples)"
    )


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


# ----------------------------------------------------------------------------------- breakdown
DISPATCH, TRANSFORM, STEP, OPTIMIZER = (
    "callback dispatch, 6 per-step hooks (includes the transform)",
    "batch transform (Mixup's on_train_batch_start)",
    "training_step (forward + loss)", "optimizer math (torch.optim.adam.adam, all groups)",
)  # fmt: skip


@contextmanager
def timers(spent: dict[str, float]) -> Iterator[None]:
    """Wrap the pieces of the per-step path with clocks that add to ``spent`` (seconds).

    Wraps Lightning's ``_call_callback_hooks`` (per-step hooks only), the hook through which
    ``Mixup`` transforms training batches (a per-step callback hook, so its time is also part
    of the dispatch time), and torch's functional ``adam`` (AdamW's math, called
    once per param group). These are internals: a piece that is not found is left unwrapped.
    """
    import lightning.pytorch.trainer.call as call
    import torch.optim.adam as adam_module

    import lightning_reg._batch as batch_module

    def clocked(fn: Callable[..., Any], name: str, when: Callable[..., bool]) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not when(*args):
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        return wrapper

    patches = [
        (call, "_call_callback_hooks", DISPATCH, lambda _, hook, *a: hook in PER_STEP_HOOKS),
        (adam_module, "adam", OPTIMIZER, lambda *a: True),
        (batch_module.TrainBatchTransform, "on_train_batch_start", TRANSFORM, lambda *a: True),
    ]
    saved = []
    for owner, attribute, name, when in patches:
        original = owner.__dict__.get(attribute)
        if callable(original):
            saved.append((owner, attribute, original))
            setattr(owner, attribute, clocked(original, name, when))
    try:
        yield
    finally:
        for owner, attribute, original in saved:
            setattr(owner, attribute, original)


def timed_training_step(module: type[Net], spent: dict[str, float]) -> type[Net]:
    class Timed(module):  # type: ignore[valid-type,misc]
        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            start = time.perf_counter()
            try:
                return super().training_step(batch, batch_idx)
            finally:
                spent[STEP] += time.perf_counter() - start

    return Timed


def breakdown(data: tuple[TensorDataset, TensorDataset], epochs: int, rounds: int) -> None:
    """Where the per-step time goes: bare, stack and hand-written, no validation, clocked inside.

    Unlike cProfile, which inflates the many small NumPy and torch calls of a batch transform
    several-fold, these clocks add a few ``perf_counter`` calls per step.
    """
    spent: dict[str, float] = defaultdict(float)
    table = configs()
    chosen = {
        BARE_NOVAL: table[BARE_NOVAL], STACK_NOVAL: table[STACK_NOVAL],
        "hand, no val": Config("hand, no val", HandWrittenNet, lambda root: [], validate=False),
    }  # fmt: skip
    for config in chosen.values():
        config.module = timed_training_step(config.module, spent)
    parts: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in chosen}
    order = random.Random(1)
    with timers(spent):
        for round_ in range(rounds):
            for name in order.sample(list(chosen), len(chosen)):
                spent.clear()
                gc.collect()
                result = run_fit(chosen[name], data, epochs)
                steps = result.clock.steps
                if round_ > 0:
                    parts[name]["training loop"].append(result.clock.train_loop / steps)
                    for part in (STEP, OPTIMIZER, DISPATCH, TRANSFORM):
                        parts[name][part].append(spent[part] / steps)
    print(
        f"\nBreakdown of the per-step path (no validation, {epochs} epochs, medians of "
        f"{rounds - 1} rounds, us per step):"
    )
    print(f"  {'':<52}" + "".join(f"{name:>15}" for name in chosen))
    for part in ("training loop", STEP, OPTIMIZER, DISPATCH, TRANSFORM):
        values = [statistics.median(parts[name][part]) for name in chosen]
        print(f"  {part:<52}" + "".join(f"{1e6 * value:15.0f}" for value in values))


# ----------------------------------------------------------------------------------------- main
def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter, tips and our diagnosis warnings out of the tables."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_reg"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning.*")
    for message in ("does not have many workers", "GeneralizationGapMonitor", "LeafSpec"):
        warnings.filterwarnings("ignore", f".*{message}.*")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument(
        "--breakdown", action="store_true", help="also clock the pieces of the per-step path"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    quiet_lightning()
    step_run, fit_run = (QUICK_STEP_RUN, QUICK_FIT_RUN) if args.quick else (STEP_RUN, FIT_RUN)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__}, lightning {pl.__version__}, {torch.get_num_threads()} "
        f"threads, load average {load}; MLP {FEATURES}-{HIDDEN}-{HIDDEN}-{CLASSES}, {N_TRAIN} "
        f"train / {N_VAL} val samples, batch {BATCH}"
    )
    data = make_data()
    start = time.perf_counter()
    verify(data, fit_run[0])
    print("\nPer-step experiment (no validation):")
    step_results = run_rounds(PER_STEP, data, *step_run)
    step_rows = print_table(step_results, BARE_NOVAL)
    print("\nWhole-fit experiment (with validation):")
    fit_results = run_rounds(WHOLE_FIT, data, *fit_run)
    fit_rows = print_table(fit_results, BARE)
    goal_checks(step_rows, step_results, fit_rows, fit_results)
    if args.breakdown:
        breakdown(data, *step_run)
    print(f"\nTotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
