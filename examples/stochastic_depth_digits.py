"""Stochastic depth on a residual MLP: scikit-learn's digits with 30% noisy training labels.

A residual MLP (6 blocks ``h = h + branch(h)``, width 128) learns the bundled 8x8 digits (no
download), split 60/20/20 like ``examples/digits.py`` (whose ``DigitsData`` it uses), with 30% of
the *training* labels flipped; validation and test labels are clean. Each seed trains the model
twice for the same number of epochs, without and with ``StochasticDepth(rate=0.3,
blocks=["blocks.*.branch"])`` (the model is one the callback does not know, so ``blocks=`` points
it at the residual branches), and the table reports the final model's test accuracy, mean and
standard deviation over three seeds.

Run: ``python examples/stochastic_depth_digits.py [--epochs 30] [--seeds 0 1 2] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsData

from lightning_reg import StochasticDepth


def _branch(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)
    )


class ResidualMLP(pl.LightningModule):
    """``stem -> blocks (h + branch(h)) -> head``; a branch is LayerNorm-Linear-ReLU-Linear."""

    def __init__(self, width: int = 128, depth: int = 6, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stem = nn.Linear(64, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({"branch": _branch(width)}) for _ in range(depth))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 10))

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block["branch"](h)
        return self.head(h)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.0)


def run(seed: int, epochs: int, stochastic_depth: bool) -> float:
    """Train once; return the final model's test accuracy."""
    pl.seed_everything(seed, verbose=False)
    data = DigitsData(label_noise=0.3, seed=seed)
    model = ResidualMLP()
    callbacks = [StochasticDepth(rate=0.3, blocks=["blocks.*.branch"])] if stochastic_depth else []
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, deterministic=True,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    return float(result["test_acc"])


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (small model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    results: dict[str, list[float]] = {"plain": [], "stochastic depth 0.3": []}
    for seed in args.seeds:
        for name, on in (("plain", False), ("stochastic depth 0.3", True)):
            results[name].append(run(seed, args.epochs, on))
    print(
        f"\nresidual MLP, digits, 30% noisy train labels, {args.epochs} epochs, seeds {args.seeds}"
    )
    print(f"{'run':<22} {'test acc mean':>13} {'std':>7}   per seed")
    for name, accs in results.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        per_seed = " ".join(f"{a:.3f}" for a in accs)
        print(f"{name:<22} {statistics.mean(accs):>13.4f} {std:>7.4f}   {per_seed}")
    print(f"({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
