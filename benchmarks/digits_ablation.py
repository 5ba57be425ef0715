"""Which regularizer helps how much on the digits demo: one technique added at a time.

Every row starts from the demo's baseline with best-weight restore (``EarlyStopping``) and adds
one ingredient of the demo's regularized recipe, on the same three seeds, with 30% of the training
labels flipped. Prints mean test accuracy, test calibration (expected calibration error and mean
confidence minus accuracy), the honest gap and the membership-inference AUC of the final model.
Run from the repository root::

    .venv/bin/python benchmarks/digits_ablation.py            # three seeds, about 2 minutes
    .venv/bin/python benchmarks/digits_ablation.py --seeds 0  # one seed
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import warnings
from pathlib import Path

import torch

from lightning_reg import (
    SAM,
    EarlyStopping,
    LabelSmoothing,
    Mixup,
    ProximalSparsity,
    WeightDecayExclusion,
)

DEMO = Path(__file__).resolve().parents[1] / "examples" / "digits.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("digits_demo", DEMO)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def recipes(demo):
    """The demo's recipe built up one ingredient at a time (callbacks made fresh per run)."""
    plain, reg = dict(dropout=0.0, weight_decay=0.0), dict(dropout=0.3, weight_decay=0.05)

    def stack(*extra):
        return lambda: [EarlyStopping("val_loss", patience=15), *(make() for make in extra)]

    def mixup():
        return Mixup(1.0, label_smoothing=0.1, num_classes=10)

    return [
        demo.Run("baseline (no restore)", plain),
        demo.Run("restore only", plain, stack()),
        demo.Run("+ dropout 0.3, AdamW wd 0.05", reg, stack()),
        demo.Run("+ WeightDecayExclusion", reg, stack(WeightDecayExclusion)),
        demo.Run(
            "+ label smoothing 0.1 only", reg,
            stack(WeightDecayExclusion, lambda: LabelSmoothing(0.1, num_classes=10)),
        ),
        demo.Run(
            "+ Mixup 1.0 only", reg,
            stack(WeightDecayExclusion, lambda: Mixup(1.0, num_classes=10)),
        ),
        demo.Run("+ Mixup 1.0 + smoothing 0.1 (demo)", reg, stack(WeightDecayExclusion, mixup)),
        demo.Run(
            "+ ProximalSparsity l1=1e-3", reg,
            stack(WeightDecayExclusion, mixup, lambda: ProximalSparsity(1e-3)),
        ),
        demo.Run("restore + SAM rho=0.05 (nothing else)", plain, stack(lambda: SAM(rho=0.05))),
        demo.Run(
            "demo recipe + SAM rho=0.05", reg,
            stack(WeightDecayExclusion, mixup, lambda: SAM(rho=0.05)),
        ),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", default="", help="run only the recipes whose name contains this")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    demo = load_demo()
    demo.monitors = list  # only the recipes: no monitors, no TensorBoard needed
    seeds = [str(seed) for seed in args.seeds]
    demo_args = demo.parse_args(["--logdir", "/tmp/lightning_reg_ablation", "--seeds", *seeds])
    chosen = [run for run in recipes(demo) if args.only in run.name]
    rows = demo.train_all(chosen, demo_args)  # one progress bar, as in the demo
    summary = demo.summarize(rows)
    for row in summary:
        row.pop("seconds", None)
    print(f"\nDigits MLP, 30% train labels flipped, mean over seeds {args.seeds}:\n")
    print(demo.format_table(summary))


if __name__ == "__main__":
    main()
