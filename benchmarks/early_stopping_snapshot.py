"""What one best-state snapshot of ``lightning_reg.EarlyStopping`` costs, against the alternatives.

``EarlyStopping(restore_best_weights=True)`` copies the model's state aside on every improvement
of the monitored metric (``StateSnapshot.capture``) and puts it back once when training ends
(``StateSnapshot.restore``). This script times, in one run and on the same model, the cost of
taking that copy once with:

1. the floor: a plain tensor copy of the parameters, both as ``p.detach().clone()`` (fresh memory
   every time) and as ``copy_`` into tensors allocated beforehand;
2. ``StateSnapshot("cpu" | "device" | "disk").capture(model)`` in steady state (after a first
   capture, so its buffers are reused; "device" is the same as "cpu" on a CPU model), plus
   ``StateSnapshot("cpu").restore(model)`` for reference;
3. ``copy.deepcopy(model.state_dict())``;
4. the usual workaround, ``ModelCheckpoint(save_top_k=1)`` plus reloading the best file at the
   end: ``trainer.save_checkpoint(path)`` on a real ``Trainer`` fitted for one step with Adam
   (so the file holds the optimizer state too, as ``ModelCheckpoint`` writes it by default) per
   improvement, and ``torch.load(path)`` + ``model.load_state_dict(...)`` once at the end.

Two models are used: an MLP with BatchNorm of ~38 M parameters (~150 MB fp32), where the time is
memory (and disk) bandwidth, and one of ~1 M parameters, where per-tensor overhead shows. Each
repetition round runs every method once, in an order rotated from round to round, so machine noise
hits all of them alike; 2 warm-up rounds are dropped and the median of the rest is reported
together with its ratio to the ``clone`` floor. The disk methods run in fewer rounds. Times are
machine-dependent and never asserted. The checkpoint and the disk snapshot go to a temporary
directory, i.e. mostly to the page cache: a slower disk only widens the gap.

Run it from the repository root::

    .venv/bin/python benchmarks/early_stopping_snapshot.py            # both models, < ~2 min
    .venv/bin/python benchmarks/early_stopping_snapshot.py --quick    # small model, few reps

(``--device cuda`` runs the same comparison on a GPU, synchronizing before each clock read.)
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg._snapshot import StateSnapshot

WARMUP = 2
SNAPSHOT_GOAL = 1.5  # StateSnapshot("cpu").capture / clone floor: at most this
WORKAROUND_GOAL = 10.0  # trainer.save_checkpoint / StateSnapshot("cpu").capture: at least this

FLOOR = "floor: clone parameters"
COPY_FLOOR = "floor: copy_ into preallocated"
SNAPSHOT = 'StateSnapshot("cpu").capture'
SAVE = "workaround: trainer.save_checkpoint"
SAVE_WEIGHTS = "  (same, save_weights_only=True)"
RELOAD = "workaround: torch.load + load_state_dict"
SAVE_RELOAD = "workaround: save + reload (sum of medians)"


# ------------------------------------------------------------------------------------- models
class MLP(pl.LightningModule):
    """``depth`` blocks of Linear + BatchNorm1d + ReLU, then a linear classifier; Adam."""

    def __init__(self, in_features: int, width: int, depth: int, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else width, width), nn.BatchNorm1d(width)]
            layers.append(nn.ReLU())
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)
        self.in_features = in_features
        self.classes = classes

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@dataclass(frozen=True)
class ModelSize:
    name: str
    in_features: int
    width: int
    depth: int
    reps: int  # rounds for the in-memory methods
    disk_reps: int  # rounds for the methods that write or read a file


LARGE = ModelSize("large", in_features=1024, width=4096, depth=3, reps=15, disk_reps=5)
SMALL = ModelSize("small", in_features=256, width=512, depth=4, reps=50, disk_reps=10)
QUICK = ModelSize("small", in_features=256, width=512, depth=4, reps=5, disk_reps=2)


def fit_one_step(model: MLP, root: Path, device: str) -> pl.Trainer:
    """A real ``Trainer`` attached to ``model``: one Adam step on a tiny batch, checkpointing on."""
    x = torch.randn(8, model.in_features)
    y = torch.randint(0, model.classes, (8,))
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", monitor="train_loss", save_top_k=1)
    trainer = pl.Trainer(
        accelerator=device, devices=1, max_steps=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[checkpoint], default_root_dir=root,
    )  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    model.to(device)  # Lightning moves the model back to the CPU after fit
    return trainer


# ------------------------------------------------------------------------------------- methods
def state_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and persistent buffers (what ``state_dict`` holds)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def floor_methods(model: nn.Module) -> dict[str, Callable[[], Any]]:
    params = list(model.parameters())
    preallocated = [torch.empty_like(p) for p in params]

    def clone() -> list[Tensor]:
        return [p.detach().clone() for p in params]

    def copy_into() -> None:
        with torch.no_grad():
            for dst, src in zip(preallocated, params, strict=True):
                dst.copy_(src)

    def clone_state() -> list[Tensor]:  # same tensors as the snapshot: BatchNorm buffers too
        return [t.detach().clone() for t in model.state_dict().values()]

    return {
        FLOOR: clone,
        COPY_FLOOR: copy_into,
        "  (floor: clone params + buffers)": clone_state,
    }


def snapshot_methods(model: nn.Module, root: Path) -> dict[str, Callable[[], Any]]:
    cpu, device, disk = (
        StateSnapshot("cpu"),
        StateSnapshot("device"),
        StateSnapshot("disk", path=root / "snapshot" / "best.pt"),
    )
    for snapshot in (cpu, device, disk):
        snapshot.capture(model)  # first capture allocates; the timed ones reuse the buffers
    return {
        SNAPSHOT: lambda: cpu.capture(model),
        'StateSnapshot("device").capture': lambda: device.capture(model),
        'StateSnapshot("disk").capture': lambda: disk.capture(model),
        'StateSnapshot("cpu").restore': lambda: cpu.restore(model),
    }


def workaround_methods(
    model: pl.LightningModule, trainer: pl.Trainer, root: Path
) -> dict[str, Callable[[], Any]]:
    path, weights_path = root / "best.ckpt", root / "weights.ckpt"
    trainer.save_checkpoint(path, weights_only=False)  # a reload timed first finds a file

    def reload() -> None:
        checkpoint = torch.load(path, map_location=str(model.device), weights_only=True)
        model.load_state_dict(checkpoint["state_dict"])

    return {
        # ModelCheckpoint calls this with its `save_weights_only` (default False)
        SAVE: lambda: trainer.save_checkpoint(path, weights_only=False),
        SAVE_WEIGHTS: lambda: trainer.save_checkpoint(weights_path, weights_only=True),
        RELOAD: reload,
    }


def all_methods(model: MLP, trainer: pl.Trainer, root: Path) -> dict[str, Callable[[], Any]]:
    return {
        **floor_methods(model),
        **snapshot_methods(model, root),
        "copy.deepcopy(state_dict())": lambda: copy.deepcopy(model.state_dict()),
        **workaround_methods(model, trainer, root),
    }


# -------------------------------------------------------------------------------------- timing
def is_disk(name: str) -> bool:
    return "disk" in name or name.startswith("workaround") or name == SAVE_WEIGHTS


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable[[], Any], device: str) -> float:
    """Seconds for one call; its result is freed only after the clock is read."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def run_rounds(
    methods: dict[str, Callable[[], Any]], size: ModelSize, device: str
) -> dict[str, list[float]]:
    """Interleaved rounds: every method once per round, in an order rotated each round."""
    reps = {name: size.disk_reps if is_disk(name) else size.reps for name in methods}
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for round_ in range(WARMUP + max(reps.values())):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            if round_ >= WARMUP + reps[name]:
                continue
            elapsed = time_once(methods[name], device)
            if round_ >= WARMUP:
                times[name].append(elapsed)
    return times


# ------------------------------------------------------------------------------------- reports
def medians_ms(times: dict[str, list[float]]) -> dict[str, float]:
    result = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    result[SAVE_RELOAD] = result[SAVE] + result[RELOAD]
    return result


def print_table(medians: dict[str, float], times: dict[str, list[float]]) -> None:
    floor = medians[FLOOR]
    print(f"  {'method':<44}{'median ms':>11}{'x floor':>10}{'min ms':>10}{'reps':>6}")
    for name, median in medians.items():
        values = times.get(name)
        low = f"{1e3 * min(values):10.2f}" if values else f"{'':>10}"
        reps = f"{len(values):6d}" if values else f"{'':>6}"
        print(f"  {name:<44}{median:11.2f}{median / floor:9.2f}x{low}{reps}")


def goal_checks(medians: dict[str, float]) -> tuple[float, float]:
    snapshot_ratio = medians[SNAPSHOT] / medians[FLOOR]
    workaround_ratio = medians[SAVE] / medians[SNAPSHOT]
    vs_copy = medians[SNAPSHOT] / medians[COPY_FLOOR]
    print(f"  snapshot / floor = {snapshot_ratio:.2f}x (goal <= {SNAPSHOT_GOAL}x)", end="")
    print(f"  [{_verdict(snapshot_ratio <= SNAPSHOT_GOAL)}; vs the copy_ floor: {vs_copy:.2f}x]")
    print(f"  disk workaround (save) / snapshot = {workaround_ratio:.1f}x", end="")
    print(f" (goal >= {WORKAROUND_GOAL:.0f}x)  [{_verdict(workaround_ratio >= WORKAROUND_GOAL)}]")
    save_reload = medians[SAVE_RELOAD] / medians[SNAPSHOT]
    print(f"  disk workaround (save + reload) / snapshot = {save_reload:.1f}x")
    return snapshot_ratio, workaround_ratio


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_memory(model: nn.Module, device: str) -> None:
    """The snapshot holds exactly one extra copy of the state, in host memory by default."""
    fresh = StateSnapshot("cpu")
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    fresh.capture(model)
    synchronize(device)
    extra_device = (torch.cuda.memory_allocated() - before) if device == "cuda" else 0
    expected = state_bytes(model)
    places = {str(t.device) for t in fresh.state_dict().values()}
    print(
        f"  memory: snapshot nbytes = {fresh.nbytes / 2**20:.1f} MiB vs parameters + buffers = "
        f"{expected / 2**20:.1f} MiB -> {fresh.nbytes / expected:.2f} extra copy"
    )
    if device == "cuda":
        print(f"  default location 'cpu': extra GPU memory from a capture = {extra_device} bytes")
    else:
        print(f"  default location 'cpu': the copy lives in host memory ({', '.join(places)})")


def describe(model: nn.Module, size: ModelSize, checkpoint: Path) -> str:
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    return (
        f"{size.name} MLP + BatchNorm ({size.in_features}->{size.width}x{size.depth}): "
        f"{numel / 1e6:.1f} M params, {state_bytes(model) / 2**20:.1f} MiB state in "
        f"{len(model.state_dict())} tensors ({len(params)} parameters); checkpoint file "
        f"{checkpoint.stat().st_size / 2**20:.1f} MiB (weights + Adam state)"
    )


# ---------------------------------------------------------------------------------------- main
def bench_size(size: ModelSize, device: str) -> tuple[float, float]:
    torch.manual_seed(0)
    model = MLP(size.in_features, size.width, size.depth)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        trainer = fit_one_step(model, root, device)
        methods = all_methods(model, trainer, root)
        print(f"\n{describe(model, size, root / 'best.ckpt')}")
        times = run_rounds(methods, size, device)
        medians = medians_ms(times)
        print_table(medians, times)
        ratios = goal_checks(medians)
        print_memory(model, device)
    return ratios


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter and tips out of the tables."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for message in ("does not have many workers", "smaller than the logging interval", "LeafSpec"):
        warnings.filterwarnings("ignore", f".*{message}.*")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model only, few reps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    quiet_lightning()
    sizes = [QUICK] if args.quick else [LARGE, SMALL]
    print(
        f"torch {torch.__version__}, lightning {pl.__version__}, device {args.device}, "
        f"{torch.get_num_threads()} threads, warm-up {WARMUP} rounds, medians of the rest"
    )
    results = {size.name: bench_size(size, args.device) for size in sizes}
    name = sizes[0].name
    snapshot_ratio, workaround_ratio = results[name]
    print(f"\nGoal checks ({name} model):")
    print(f"  snapshot / floor = {snapshot_ratio:.2f}x (goal <= {SNAPSHOT_GOAL}x)")
    print(f"  disk workaround (save) / snapshot = {workaround_ratio:.1f}x (goal >= 10x)")


if __name__ == "__main__":
    main()
