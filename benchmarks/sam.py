"""Step time of SharpnessAwareMinimization against a plain step, as printed ratios (no asserts).

Times whole training steps (``on_train_batch_start`` to ``on_train_batch_end``: forward,
backward, the SAM pass, the optimizer step) of an MLP on random data through ``Trainer.fit``, and
prints the mean step time of each setting relative to the plain step. Goals from the issue:
SAM <= 2.1x, ``interval=k`` <= 1 + 1.1 / k. Run from the repository root::

    .venv/bin/python benchmarks/sam.py               # CPU, about a minute
    .venv/bin/python benchmarks/sam.py --device cuda
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg import SharpnessAwareMinimization


class MLP(pl.LightningModule):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )  # fmt: skip

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class StepTimer(pl.Callback):
    def __init__(self, sync: bool) -> None:
        self.sync, self.times, self._t0 = sync, [], 0.0

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self._t0 = self._now()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, out: Any, batch: Any, idx: int):
        self.times.append(self._now() - self._t0)


def mean_step(callbacks: list[Any], args: argparse.Namespace) -> float:
    pl.seed_everything(0, verbose=False)
    x = torch.randn(args.batch * args.steps, args.dim)
    y = torch.randint(0, 10, (len(x),))
    timer = StepTimer(sync=args.device == "cuda")
    trainer = pl.Trainer(
        accelerator=args.device, devices=1, max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*callbacks, timer],
    )  # fmt: skip
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch)
    trainer.fit(MLP(args.dim, args.hidden), loader)
    # the mean, not the median: with interval=k only every k-th step pays the second pass
    return statistics.mean(timer.times[args.warmup :])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    plain = mean_step([], args)
    print(f"plain step: {plain * 1e3:.2f} ms ({args.device})")
    for label, make, goal in (
        ("SAM", lambda: SharpnessAwareMinimization(), 2.1),
        ("ASAM", lambda: SharpnessAwareMinimization(rho=0.5, adaptive=True), 2.1),
        ("SAM interval=2", lambda: SharpnessAwareMinimization(interval=2), 1 + 1.1 / 2),
        ("SAM interval=4", lambda: SharpnessAwareMinimization(interval=4), 1 + 1.1 / 4),
    ):
        step = mean_step([make()], args)
        print(f"{label:>16}: {step / plain:.2f}x a plain step (goal <= {goal:.2f}x)")


if __name__ == "__main__":
    main()
