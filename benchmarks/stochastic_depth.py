"""What ``StochasticDepth`` costs per training step on a ResNet, against the same model without it.

The issue's goal: "not slower than the unmodified model, since skipped branches save compute".
This script measures whether the goal is met. On CPU, in one run, it times training steps
(forward, backward, SGD step) of torchvision's ``resnet18(num_classes=10)`` on random 16x16
images, batch 32 by default, through a real ``Trainer.fit``:

1. ``bare``: the unmodified model;
2. ``hooks``: ``StochasticDepth(rate=0.5)`` (the deepest block's rate; linear in depth): forward
   hooks on the 8 blocks' ``bn2`` that multiply the branch output by a per-sample mask;
3. ``bare`` again, and so on: the variants alternate for ``--rounds`` rounds of ``--steps`` steps
   each, so machine noise hits both alike. A callback times each step from
   ``on_train_batch_start`` to ``on_train_batch_end``; the first 3 steps of each fit are dropped
   and the median of the rest reported, with the ratio hooks/bare.

A mask-multiply drop (timm's ``DropPath`` and these hooks alike) still computes every dropped
sample's branch, so it cannot be faster than the bare model: the ratio printed is the overhead of
drawing the masks and multiplying, plus the backward through the multiplication. Skipping the
compute would need the block's forward to run the branch on the kept samples only (gather them,
run the branch, scatter-add into the shortcut), i.e. a different ``forward``; a forward hook cannot
prevent the hooked module from running and a forward pre-hook cannot return an output, so without
replacing a method (which this library does not do) the compute is not saved.

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
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, out: Any, b: Any, i: int) -> None:
        self.times.append(time.perf_counter() - self._start)


def timed_fit(with_drop: bool, steps: int, batch: int, size: int) -> list[float]:
    pl.seed_everything(0, verbose=False)
    data = TensorDataset(
        torch.randn(steps * batch, 3, 32, 32), torch.randint(0, 10, (steps * batch,))
    )
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if with_drop:
        callbacks.insert(0, StochasticDepth(rate=0.5))
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
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # on a busy 2-core machine, 2 threads collapse (spin-waits)
    warnings.filterwarnings("ignore")
    times: dict[str, list[float]] = {"bare": [], "hooks": []}
    for _ in range(args.rounds):
        times["bare"] += timed_fit(False, args.steps, args.batch, args.size)
        times["hooks"] += timed_fit(True, args.steps, args.batch, args.size)
    bare, hooks = (statistics.median(times[k]) for k in ("bare", "hooks"))
    threads = torch.get_num_threads()
    print(f"resnet18, {args.size}x{args.size}, batch {args.batch}, CPU threads {threads}")
    print(f"{'variant':<8} {'median step (ms)':>17} {'ratio':>7}")
    print(f"{'bare':<8} {bare * 1e3:>17.1f} {1.0:>7.3f}")
    print(f"{'hooks':<8} {hooks * 1e3:>17.1f} {hooks / bare:>7.3f}")
    ratio = hooks / bare
    if ratio < 0.95:
        verdict = "met: faster than the bare model"
    elif ratio <= 1.05:
        verdict = "not met as a saving: the same cost within noise (every branch is computed)"
    else:
        verdict = "not met: slower (every branch is computed, plus the masks)"
    print(f"goal 'not slower than the unmodified model': {verdict}")


if __name__ == "__main__":
    main()
