"""The GPU benchmarks of issue 14 in one run, ending with one table (``gpu_check.sh`` runs it).

Three parts, each against its floor and its peers, on one CUDA GPU:

1. ``snapshot``: ``StateSnapshot("cpu").capture`` (pinned host memory, non-blocking copies and an
   event) against a plain host copy (``[p.to("cpu") for p in params]``) and a copy into pinned
   buffers allocated beforehand, ``StateSnapshot("device")`` against ``p.clone()`` on the GPU, and
   the usual workaround (``trainer.save_checkpoint`` of the ``ModelCheckpoint`` kind, weights +
   Adam state, plus ``torch.load`` + ``load_state_dict``), for an MLP of 25 M and one of 350 M
   parameters; with the extra GPU memory of a host capture. Goals: host capture within 1.5x of the
   plain host copy, save + reload at least 10x slower, 0 extra GPU bytes.
2. ``mixup``: ``mix_inputs`` in batch and per-element mode and batch CutMix on a 256x3x224x224
   float32 batch against the in-place floor ``x.index_select(0, perm).lerp_(x, lam)`` (goals: at
   most 1.2x and 2x), and all in (plan draw + mix + soft targets, ``mixup_batch``) against timm's
   ``Mixup`` and torchvision's ``v2.MixUp``/``v2.CutMix`` doing the same (goal: faster than both).
3. ``stack``: ``Trainer.fit`` of a ResNet-18 on synthetic 224x224 images and of a small
   transformer encoder, bare and with the stack (EarlyStopping, WeightDecayExclusion, Mixup,
   RegularizationMonitor, ProximalSparsity), without validation: training-loop time per step
   (epoch 0 dropped as warm-up; goal at most 1.03x bare). The GeneralizationGapMonitor's cost per
   validation is timed apart (validation with and without it).

Each timing synchronises the GPU before reading the clock. Medians are reported; times are never
asserted. ``--cpu-dry-run`` runs every part with tiny sizes on the CPU, so that a typo cannot cost
GPU time: its numbers mean nothing.

    python benchmarks/gpu_check.py                 # on a GPU machine, a few minutes
    python benchmarks/gpu_check.py --cpu-dry-run   # anywhere, ~1 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from early_stopping_snapshot import MLP, fit_one_step, state_bytes

from lightning_reg import (
    EarlyStopping,
    GeneralizationGapMonitor,
    Mixup,
    ProximalSparsity,
    RegularizationMonitor,
    WeightDecayExclusion,
)
from lightning_reg._snapshot import StateSnapshot
from lightning_reg.mixing import draw_mix_plan, mix_inputs, mixup_batch


# ------------------------------------------------------------------------------------ results
@dataclass
class Row:
    part: str
    what: str
    value: str
    goal: str = ""
    verdict: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def add(self, part: str, what: str, value: str, goal: str = "", ok: bool | None = None) -> None:
        verdict = "" if ok is None else ("met" if ok else "NOT met")
        self.rows.append(Row(part, what, value, goal, verdict))
        print(f"  [{part}] {what}: {value}" + (f"  (goal {goal}: {verdict})" if goal else ""))

    def markdown(self) -> str:
        lines = ["| part | measurement | value | goal | verdict |", "|---|---|---|---|---|"]
        lines += [
            f"| {r.part} | {r.what} | {r.value} | {r.goal} | {r.verdict} |" for r in self.rows
        ]
        return "\n".join(lines)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], Any], device: str, reps: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + reps):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        del result
    return 1e3 * statistics.median(times)


def interleaved_ms(
    fns: dict[str, Callable[[], Any]], device: str, reps: int, warmup: int = 2
) -> dict[str, float]:
    """Every function once per round, in an order rotated each round; medians in ms."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(warmup + reps):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            start = time.perf_counter()
            result = fns[name]()
            sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
            del result
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


# ----------------------------------------------------------------------------------- snapshot
@dataclass(frozen=True)
class SnapshotSize:
    label: str
    in_features: int
    width: int
    depth: int
    reps: int
    disk_reps: int


SNAPSHOT_SIZES = (
    SnapshotSize("25M", 1024, 3328, 3, reps=20, disk_reps=3),  # 25.6 M parameters
    SnapshotSize("350M", 1024, 8320, 6, reps=10, disk_reps=2),  # 354.7 M parameters
)
DRY_SNAPSHOT_SIZES = (
    SnapshotSize("tiny-a", 64, 128, 2, reps=2, disk_reps=1),
    SnapshotSize("tiny-b", 64, 256, 3, reps=2, disk_reps=1),
)


def snapshot_part(size: SnapshotSize, device: str, report: Report) -> None:
    torch.manual_seed(0)
    model = MLP(size.in_features, size.width, size.depth)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    part = f"snapshot {size.label} ({numel / 1e6:.1f} M params, {state_bytes(model) >> 20} MiB)"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        trainer = fit_one_step(model, root, device)
        params = list(model.parameters())  # on `device` now
        tensors = [t for t in model.state_dict().values()]
        pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda) for t in tensors]
        host, on_device = StateSnapshot("cpu"), StateSnapshot("device")
        host.capture(model)
        on_device.capture(model)

        def pinned_copy() -> None:
            for dst, src in zip(pinned, tensors, strict=True):
                dst.copy_(src, non_blocking=True)

        memory = {
            "plain host copy [t.to('cpu')]": lambda: [t.to("cpu") for t in tensors],
            "copy_ into pinned (preallocated)": pinned_copy,
            'StateSnapshot("cpu").capture': lambda: host.capture(model),
            "device clone [t.clone()]": lambda: [t.clone() for t in tensors],
            'StateSnapshot("device").capture': lambda: on_device.capture(model),
            'StateSnapshot("cpu").restore': lambda: host.restore(model),
        }
        ms = interleaved_ms(memory, device, size.reps)
        path = root / "best.ckpt"
        save = median_ms(lambda: trainer.save_checkpoint(path), device, size.disk_reps, warmup=1)

        def reload() -> None:
            checkpoint = torch.load(path, map_location=device, weights_only=True)
            model.load_state_dict(checkpoint["state_dict"])

        load = median_ms(reload, device, size.disk_reps, warmup=1)
        extra = gpu_bytes_of_a_capture(model, device)
    for name, value in ms.items():
        report.add(part, name, f"{value:.2f} ms")
    report.add(part, "ModelCheckpoint save + reload", f"{save:.1f} + {load:.1f} ms")
    capture, plain = ms['StateSnapshot("cpu").capture'], ms["plain host copy [t.to('cpu')]"]
    ratio = capture / plain
    report.add(part, "host capture / plain host copy", f"{ratio:.2f}x", "<= 1.5x", ratio <= 1.5)
    disk = (save + load) / capture
    report.add(part, "save+reload / host capture", f"{disk:.1f}x", ">= 10x", disk >= 10)
    device_ratio = ms['StateSnapshot("device").capture'] / ms["device clone [t.clone()]"]
    report.add(part, "device capture / device clone", f"{device_ratio:.2f}x")
    if extra is None:
        report.add(part, "extra GPU memory of a host capture", "n/a on CPU")
    else:
        report.add(part, "extra GPU memory of a host capture", f"{extra} B", "0 B", extra == 0)


def gpu_bytes_of_a_capture(model: nn.Module, device: str) -> int | None:
    """Peak GPU bytes a fresh host snapshot adds over what is allocated (first capture)."""
    if device != "cuda":
        return None
    fresh = StateSnapshot("cpu")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fresh.capture(model)
    fresh.capture(model)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# -------------------------------------------------------------------------------------- mixup
@dataclass(frozen=True)
class MixSize:
    n: int
    size: int
    reps: int
    classes: int = 1000


MIX_SIZE = MixSize(256, 224, reps=30)
DRY_MIX_SIZE = MixSize(8, 32, reps=2, classes=10)
SMOOTHING = 0.1
MODES = {
    "batch mixup": dict(mode="batch", mixup_alpha=1.0),
    "elem mixup": dict(mode="elem", mixup_alpha=1.0),
    "batch cutmix": dict(mode="batch", mixup_alpha=0.0, cutmix_alpha=1.0),
}


def peers(size: MixSize) -> dict[str, dict[str, Callable[[Tensor, Tensor], Any]]]:
    """timm's and torchvision's mixers per mode (None where a peer has no such mode)."""
    from timm.data import Mixup as TimmMixup
    from torchvision.transforms import v2

    common = dict(label_smoothing=SMOOTHING, num_classes=size.classes, prob=1.0)
    timm_batch = TimmMixup(mixup_alpha=1.0, cutmix_alpha=0.0, mode="batch", **common)
    timm_elem = TimmMixup(mixup_alpha=1.0, cutmix_alpha=0.0, mode="elem", **common)
    timm_cut = TimmMixup(mixup_alpha=0.0, cutmix_alpha=1.0, mode="batch", **common)
    tv_mix = v2.MixUp(alpha=1.0, num_classes=size.classes)
    tv_cut = v2.CutMix(alpha=1.0, num_classes=size.classes)
    return {
        "batch mixup": {"timm Mixup": timm_batch, "torchvision v2.MixUp": tv_mix},
        "elem mixup": {"timm Mixup": timm_elem},
        "batch cutmix": {"timm Mixup": timm_cut, "torchvision v2.CutMix": tv_cut},
    }


def mixup_part(size: MixSize, device: str, report: Report) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size.n, 3, size.size, size.size, generator=gen).to(device)
    y = torch.randint(0, size.classes, (size.n,), generator=gen).to(device)
    scratch = x.clone()  # timm mixes in place
    part = f"mixup {size.n}x3x{size.size}x{size.size}"
    perm = torch.randperm(size.n, generator=gen).to(device)
    floor = median_ms(lambda: x.index_select(0, perm).lerp_(x, 0.3), device, size.reps)
    report.add(part, "floor: x.index_select(0, perm).lerp_(x, lam)", f"{floor:.3f} ms")
    rng = np.random.default_rng(0)
    goals = {"batch mixup": 1.2, "elem mixup": 2.0}
    for label, options in MODES.items():
        plans = [
            draw_mix_plan(
                size.n, rng, image_size=(size.size, size.size), num_classes=size.classes,
                smoothing=SMOOTHING, **options,  # type: ignore[arg-type]
            )
            for _ in range(4)
        ]  # fmt: skip
        # the GPU mix is the CPU mix of the same plan
        torch.testing.assert_close(mix_inputs(x, plans[0]).cpu(), mix_inputs(x.cpu(), plans[0]))
        cycle = iter(range(10**9))
        mix = median_ms(lambda: mix_inputs(x, plans[next(cycle) % 4]), device, size.reps)  # noqa: B023
        ratio = mix / floor
        goal = goals.get(label)
        report.add(
            part, f"{label}: mix_inputs / floor", f"{ratio:.2f}x ({mix:.3f} ms)",
            f"<= {goal}x" if goal else "", (ratio <= goal) if goal else None,
        )  # fmt: skip
        ours = median_ms(
            lambda o=options: mixup_batch(
                x, y, size.classes, generator=rng, label_smoothing=SMOOTHING, **o
            ),
            device, size.reps,
        )  # fmt: skip
        report.add(part, f"{label}: ours all in (draw + mix + targets)", f"{ours:.3f} ms")
        for peer, fn in peers(size)[label].items():
            theirs = median_ms(lambda: fn(scratch, y), device, size.reps)  # noqa: B023
            report.add(
                part, f"{label}: {peer} / ours all in", f"{theirs / ours:.2f}x ({theirs:.3f} ms)",
                "> 1x", theirs > ours,
            )  # fmt: skip


# -------------------------------------------------------------------------------------- stack
class BatchSet(Dataset):
    """Whole batches of tensors kept on the device: ``DataLoader(batch_size=None)`` over it."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return self.x.shape[0] // self.batch_size

    def __getitem__(self, i: int) -> list[Tensor]:
        rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return [self.x[rows], self.y[rows]]


class Classifier(pl.LightningModule):
    """Soft-target-aware cross entropy, AdamW(weight_decay=0.05); clocks its own epochs."""

    def __init__(self, net: nn.Module, device: str) -> None:
        super().__init__()
        self.net, self.clock_device = net, device
        self.epoch_ms: list[float] = []
        self.steps = 0
        self.val_ms: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.steps += 1
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.05)

    def on_train_epoch_start(self) -> None:
        sync(self.clock_device)
        self._start, self.steps = time.perf_counter(), 0

    def on_train_epoch_end(self) -> None:
        sync(self.clock_device)
        self.epoch_ms.append(1e3 * (time.perf_counter() - self._start) / max(self.steps, 1))

    def on_validation_end(self) -> None:  # runs after every callback's on_validation_end
        sync(self.clock_device)
        self.val_ms.append(1e3 * (time.perf_counter() - self._val_start))


class ValidationStart(pl.Callback):
    """Listed first: starts the module's validation clock before any callback's hook."""

    def on_validation_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        sync(pl_module.clock_device)
        pl_module._val_start = time.perf_counter()


class TinyTransformer(nn.Module):
    def __init__(self, features: int, width: int, layers: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        layer = nn.TransformerEncoderLayer(width, 8, 4 * width, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.encoder(self.embed(x)).mean(1)))


@dataclass(frozen=True)
class StackCase:
    label: str
    make_net: Callable[[], nn.Module]
    shape: tuple[int, ...]  # one input sample
    batch: int
    steps: int  # per epoch
    epochs: int
    rounds: int
    precision: str


def stack_cases(dry: bool) -> list[StackCase]:
    from torchvision.models import resnet18

    if dry:
        return [
            StackCase("ResNet-18", lambda: resnet18(num_classes=10), (3, 32, 32), 4, 3, 2, 1,
                      "32-true"),
            StackCase("transformer", lambda: TinyTransformer(8, 32, 1, 10), (16, 8), 4, 3, 2, 1,
                      "32-true"),
        ]  # fmt: skip
    return [
        StackCase("ResNet-18 224x224", lambda: resnet18(num_classes=10), (3, 224, 224), 128, 24,
                  3, 3, "bf16-mixed"),
        StackCase("transformer 4x256, seq 256", lambda: TinyTransformer(64, 256, 4, 10),
                  (256, 64), 64, 40, 3, 3, "bf16-mixed"),
    ]  # fmt: skip


def stack_callbacks(
    gap: bool, subset: TensorDataset | None = None, batch_size: int = 0
) -> list[pl.Callback]:
    callbacks: list[pl.Callback] = [
        EarlyStopping("val_loss", patience=10**6, strict=False),
        WeightDecayExclusion(verbose=False),
        Mixup(1.0, label_smoothing=0.1, num_classes=10),
        RegularizationMonitor(),
        ProximalSparsity(l1=1e-6),
    ]
    if gap:
        size = len(subset or [])
        callbacks.append(
            GeneralizationGapMonitor(dataset=subset, subset_size=size, batch_size=batch_size)
        )
    return callbacks


def fit(case: StackCase, device: str, callbacks: list[pl.Callback], validate: bool) -> Classifier:
    pl.seed_everything(0, verbose=False)
    gen = torch.Generator().manual_seed(0)
    n = case.batch * case.steps
    x = torch.randn(n, *case.shape, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    if validate:  # the gap pass copies the train loader's collate_fn: it must batch samples
        train = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=case.batch)
    else:  # batches ready on the device: the per-step time is not the host's data copying
        train = DataLoader(BatchSet(x, y, case.batch), batch_size=None, shuffle=False)
    val = DataLoader(BatchSet(x[: 4 * case.batch], y[: 4 * case.batch], case.batch),
                     batch_size=None)  # fmt: skip
    model = Classifier(case.make_net(), device)
    trainer = pl.Trainer(
        accelerator=device, devices=1, max_epochs=case.epochs, precision=case.precision,  # type: ignore[arg-type]
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=1.0 if validate else 0, callbacks=[ValidationStart(), *callbacks],
        default_root_dir=tempfile.mkdtemp(),
    )  # fmt: skip
    trainer.fit(model, train, val if validate else None)
    return model


def stack_part(case: StackCase, device: str, report: Report) -> None:
    part = f"stack {case.label} ({case.precision}, batch {case.batch})"
    ratios, bare_ms, stack_ms = [], [], []
    for round_ in range(case.rounds):
        order = [False, True] if round_ % 2 == 0 else [True, False]
        per_step = {}
        for ours in order:
            model = fit(case, device, stack_callbacks(gap=False) if ours else [], validate=False)
            per_step[ours] = statistics.median(model.epoch_ms[1:] or model.epoch_ms)
        ratios.append(per_step[True] / per_step[False])
        bare_ms.append(per_step[False])
        stack_ms.append(per_step[True])
    ratio = statistics.median(ratios)
    report.add(part, "bare fit, per step", f"{statistics.median(bare_ms):.2f} ms")
    report.add(part, "stack, per step", f"{statistics.median(stack_ms):.2f} ms")
    report.add(part, "stack / bare per step (median of rounds)", f"{ratio:.3f}x", "<= 1.03x",
               ratio <= 1.03)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    subset = TensorDataset(torch.randn(2 * case.batch, *case.shape, generator=gen),
                           torch.randint(0, 10, (2 * case.batch,), generator=gen))  # fmt: skip
    without = fit(case, device, stack_callbacks(gap=False), validate=True)
    with_gap = fit(case, device, stack_callbacks(True, subset, case.batch), validate=True)
    base = statistics.median(without.val_ms[1:] or without.val_ms)
    gap = statistics.median(with_gap.val_ms[1:] or with_gap.val_ms)
    report.add(part, f"gap monitor cost per validation ({len(subset)} train samples)",
               f"{gap - base:+.1f} ms (validation {base:.1f} -> {gap:.1f} ms)")  # fmt: skip


# --------------------------------------------------------------------------------------- main
def quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--parts", default="snapshot,mixup,stack")
    parser.add_argument("--table", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    quiet()
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("No CUDA GPU: run on a GPU machine, or pass --cpu-dry-run.", file=sys.stderr)
        return 2
    device = "cpu" if dry else "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run: sizes are tiny)"
    print(f"torch {torch.__version__}, lightning {pl.__version__}, device {name}")
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    report, parts, started = Report(), args.parts.split(","), time.perf_counter()
    failed = []
    jobs: list[tuple[str, Callable[[], None]]] = []
    if "snapshot" in parts:
        for size in DRY_SNAPSHOT_SIZES if dry else SNAPSHOT_SIZES:
            jobs.append((f"snapshot {size.label}", lambda s=size: snapshot_part(s, device, report)))
    if "mixup" in parts:
        size = DRY_MIX_SIZE if dry else MIX_SIZE
        jobs.append(("mixup", lambda: mixup_part(size, device, report)))
    if "stack" in parts:
        for case in stack_cases(dry):
            jobs.append((f"stack {case.label}", lambda c=case: stack_part(c, device, report)))
    for label, job in jobs:
        print(f"\n== {label} ({time.perf_counter() - started:.0f} s)", flush=True)
        try:
            job()
        except Exception as error:  # one broken part must not hide the others' numbers
            failed.append(label)
            report.add(label, "FAILED", f"{type(error).__name__}: {error}"[:300])
            import traceback

            traceback.print_exc()
        if device == "cuda":
            torch.cuda.empty_cache()
    table = report.markdown()
    print(f"\n== table ({name}, {time.perf_counter() - started:.0f} s)\n{table}")
    if args.table:
        args.table.write_text(f"device: {name}\n\n{table}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
