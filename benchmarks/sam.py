"""Step time of SharpnessAwareMinimization against a plain step, as printed ratios (no asserts).

Times whole training steps (``on_train_batch_start`` to ``on_train_batch_end``: forward,
backward, the SAM pass, the optimizer step) of an MLP on random data through ``Trainer.fit``, and
prints the mean step time of each setting relative to the plain step. Goals from the issue:
SAM <= 2.1x, ``interval=k`` <= 1 + 1.1 / k. Run from the repository root::

    .venv/bin/python benchmarks/sam.py               # CPU, about a minute
    .venv/bin/python benchmarks/sam.py --device cuda

``--memory`` measures SAM's extra memory instead (goal: at most one copy of the weights), as the
peak of a SAM fit minus the peak of a plain fit of a model whose weights dominate its memory
(activations are small), divided by the weights' bytes. On CUDA the peaks are
``torch.cuda.max_memory_allocated``; on CPU each fit runs in its own process and the peak is the
process's maximum resident set size (large tensors are mmapped by the allocator and returned to
the system when freed, so it follows the live tensors to within a few MiB)::

    .venv/bin/python benchmarks/sam.py --memory
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import subprocess
import sys
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


MEMORY_SETTINGS = {"plain": list, "SAM": lambda: [SharpnessAwareMinimization()]}


def peak_bytes(setting: str, args: argparse.Namespace) -> tuple[int, int]:
    """Peak memory of a short fit with ``setting``, and the model's weight bytes."""
    pl.seed_everything(0, verbose=False)
    cuda = args.device == "cuda"
    x = torch.randn(args.batch * 4, args.dim)
    y = torch.randint(0, 10, (len(x),))
    model = MLP(args.dim, args.hidden)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainer = pl.Trainer(
        accelerator=args.device, devices=1, max_steps=4, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=MEMORY_SETTINGS[setting](),
    )  # fmt: skip
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=args.batch))
    if cuda:
        return torch.cuda.max_memory_allocated(), weights
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, weights


def memory(args: argparse.Namespace) -> None:
    peaks: dict[str, int] = {}
    for setting in MEMORY_SETTINGS:
        if args.device == "cuda":
            peaks[setting], weights = peak_bytes(setting, args)
            continue
        command = [sys.executable, __file__, "--memory-child", setting, "--dim", str(args.dim),
                   "--hidden", str(args.hidden), "--batch", str(args.batch)]  # fmt: skip
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
        peaks[setting], weights = int(out[-2]), int(out[-1])
    extra = peaks["SAM"] - peaks["plain"]
    print(f"weights: {weights / 2**20:.0f} MiB; peak of a plain fit {peaks['plain'] / 2**20:.0f} "
          f"MiB, with SAM {peaks['SAM'] / 2**20:.0f} MiB ({args.device})")  # fmt: skip
    print(f"SAM's extra memory: {extra / weights:.2f}x the weights (goal <= 1.00x)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--memory", action="store_true", help="extra memory instead of time")
    parser.add_argument("--memory-child", choices=list(MEMORY_SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.memory_child:
        print(*peak_bytes(args.memory_child, args))
        return
    if args.memory:
        # weights (2 x 2048^2 x 4 B = 32 MiB) dominate: activations of 32 rows are small
        defaults = {"dim": 512, "hidden": 1024, "batch": 256}
        if (args.dim, args.hidden, args.batch) == tuple(defaults.values()):
            args.dim, args.hidden, args.batch = 2048, 2048, 32
        memory(args)
        return
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
