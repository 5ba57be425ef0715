"""MC-dropout prediction: the callback's batched passes vs N separate ``trainer.predict`` loops.

Same model (an MLP with dropout), same data, same ``N``, side by side in one run; prints wall
times and ratios (no asserts). Settings:

- ``N loops``: what a user writes without the callback: a module that keeps its dropout on at
  prediction (``on_predict_model_eval``) and ``N`` calls of ``trainer.predict``, averaged;
- ``callback, sequential``: :class:`~lightning_reg.MCDropoutPrediction` with ``max_batch_size=1``
  (one forward per pass, one predict loop);
- ``callback, batched``: the default, all ``N`` copies of a batch in one forward (and the chunked
  variant with ``--max-batch-size``).

Both callback settings also run Lightning's own deterministic pass (``N + 1`` forwards' worth).
Run from the repository root::

    .venv/bin/python benchmarks/mc_dropout.py             # CPU, well under a minute
    .venv/bin/python benchmarks/mc_dropout.py --device cuda
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_reg import MCDropoutPrediction
from lightning_reg.uncertainty import dropout_modules


class DropoutMLP(pl.LightningModule):
    def __init__(self, dim: int, hidden: int, p: float = 0.3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(p), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Dropout(p), nn.Linear(hidden, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AlwaysDropout(DropoutMLP):
    """The hand-written way: dropout stays on in ``trainer.predict``."""

    def on_predict_model_eval(self) -> None:
        self.eval()
        for module in dropout_modules(self).values():
            module.train()


def _trainer(device: str, callbacks: list[Any]) -> pl.Trainer:
    return pl.Trainer(
        accelerator=device, devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
    )  # fmt: skip


def _seconds(run: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-samples", type=int, default=20)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--max-batch-size", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    weights = DropoutMLP(64, args.hidden).state_dict()
    loader = DataLoader(torch.randn(args.samples, 64), batch_size=args.batch_size)
    n, device = args.num_samples, args.device

    def loops() -> torch.Tensor:
        model = AlwaysDropout(64, args.hidden)
        model.load_state_dict(weights)
        trainer = _trainer(device, [])
        passes = [torch.cat(trainer.predict(model, loader)).softmax(-1) for _ in range(n)]  # type: ignore[arg-type]
        return torch.stack(passes).mean(0)

    def callback(max_batch_size: int | None) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            model = DropoutMLP(64, args.hidden)
            model.load_state_dict(weights)
            mc = MCDropoutPrediction(num_samples=n, max_batch_size=max_batch_size)
            _trainer(device, [mc]).predict(model, loader, return_predictions=False)
            assert not isinstance(mc.predictions, list) and mc.predictions is not None
            return mc.predictions.probs

        return run

    settings: dict[str, Callable[[], torch.Tensor]] = {
        f"{n} loops of trainer.predict": loops,
        "callback, sequential (max_batch_size=1)": callback(1),
        f"callback, batched (max_batch_size={args.max_batch_size})": callback(args.max_batch_size),
        "callback, batched (all N in one forward)": callback(None),
    }
    for run in settings.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every setting alike
        for name, run in settings.items():
            times[name].append(_seconds(run, device))
    base = min(times[next(iter(settings))])
    print(
        f"MC-dropout, N={n}, {args.samples} samples in batches of {args.batch_size}, "
        f"MLP 64-{args.hidden}-{args.hidden}-10, device={device}, best of {args.repeats}"
    )
    print(f"{'setting':<48} {'seconds':>8} {'vs N loops':>10}")
    for name, values in times.items():
        best = min(values)
        print(f"{name:<48} {best:8.3f} {best / base:10.2f}x")


if __name__ == "__main__":
    main()
