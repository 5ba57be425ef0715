"""What ``StochasticDepth`` costs per training step on a ResNet, against the same model without it.

The issue's goal: "not slower than the unmodified model, since skipped branches save compute".
This script measures whether the goal is met. On CPU, in one run, it times training steps
(forward, backward, SGD step) of torchvision's ``resnet18(num_classes=10)`` on random images
(``--size``, 32x32 by default, CIFAR-sized), batch 32 by default, through a real
``Trainer.fit``:

1. ``bare``: the unmodified model;
2. ``skip``: ``StochasticDepth(rate=0.5)`` (the deepest block's rate; block ``l`` of 8 gets
   ``0.5 * l / 8``, mean 0.28): a forward pre-hook on each block's ``conv1`` passes it the kept
   samples only and a forward hook on ``bn2`` scatters the branch output back (dropped rows zero),
   so a dropped sample's branch is not computed, forward or backward;
3. ``mask``: the same rates through ``blocks=["model.layer*.*.bn2"]``, i.e. the mask-multiply
   hook used for blocks the callback does not know (every branch computed: timm's ``DropPath``
   behaves the same), for comparison;
4. the variants alternate for ``--rounds`` rounds of ``--steps`` steps each, so machine noise hits
   all alike. A callback times each step from ``on_train_batch_start`` to ``on_train_batch_end``
   (wall clock and the process's CPU time, which other jobs on a shared machine disturb less);
   the first 3 steps of each fit are dropped and the medians of the rest reported, with the
   ratios to ``bare``.

Expected ``skip/bare``: about ``1 - mean rate x branch share of the step`` (resnet18's branches
are most of its compute, the stem and the 3 downsample convolutions the rest), i.e. roughly
0.75-0.8, less the gather/scatter and the per-block draws. ``mask/bare`` is about 1.0-1.07.
At 16x16 a resnet18 step on CPU is dominated by batch-independent work (the 11M weights are read
in forward, backward and the optimizer step; layer3/layer4 run on 1x1 maps), so fewer rows save
little there: the saving grows with the activations' share of the step (image size, batch).

Usage: ``python benchmarks/stochastic_depth.py [--steps 13] [--rounds 3] [--batch 32] [--size 16]
[--threads 1]``.
Times are machine-dependent and never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg import StochasticDepth


class ResNetModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = torchvision.models.resnet18(num_classes=10)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class StepTimer(pl.Callback):
    """Wall-clock and process CPU time of each training step."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []
        self._start = (0.0, 0.0)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer: Any, pl_module: Any, out: Any, b: Any, i: int) -> None:
        wall, cpu = self._start
        self.times.append((time.perf_counter() - wall, time.process_time() - cpu))


VARIANTS = {
    "bare": None,
    "skip": lambda: StochasticDepth(rate=0.5),
    "mask": lambda: StochasticDepth(rate=0.5, blocks=["model.layer*.*.bn2"]),
}


def timed_fit(variant: str, steps: int, batch: int, size: int) -> list[tuple[float, float]]:
    pl.seed_everything(0, verbose=False)
    data = TensorDataset(
        torch.randn(steps * batch, 3, size, size), torch.randint(0, 10, (steps * batch,))
    )
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    make = VARIANTS[variant]
    if make is not None:
        callbacks.insert(0, make())
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(ResNetModule(), DataLoader(data, batch_size=batch))
    return timer.times[3:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=13)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # on a busy 2-core machine, 2 threads collapse (spin-waits)
    warnings.filterwarnings("ignore")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            times[name] += timed_fit(name, args.steps, args.batch, args.size)
    wall = {name: statistics.median(t for t, _ in values) for name, values in times.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in times.items()}
    threads = torch.get_num_threads()
    print(f"resnet18, {args.size}x{args.size}, batch {args.batch}, CPU threads {threads}")
    print(f"{'variant':<8} {'wall (ms)':>10} {'ratio':>7} {'CPU (ms)':>10} {'ratio':>7}")
    for name in VARIANTS:
        print(
            f"{name:<8} {wall[name] * 1e3:>10.1f} {wall[name] / wall['bare']:>7.3f}"
            f" {cpu[name] * 1e3:>10.1f} {cpu[name] / cpu['bare']:>7.3f}"
        )
    for label, measure in (("wall", wall), ("CPU", cpu)):
        ratio = measure["skip"] / measure["bare"]
        if ratio < 0.95:
            verdict = "met: faster than the bare model (dropped branches are not computed)"
        elif ratio <= 1.05:
            verdict = "met within noise: as fast as the bare model, no saving measured"
        else:
            verdict = "not met: slower than the bare model"
        print(f"goal 'not slower than the unmodified model', skip/bare {label} time: {verdict}")


if __name__ == "__main__":
    main()
