"""The CUDA paths, on one GPU: skipped (with the reason) on machines without one, CI included.

Run by ``benchmarks/gpu_check.sh`` on a GPU machine; ``pytest -m cuda`` selects them. They fit for
real on one GPU and check what the CPU suite checks, plus what only a GPU shows:

- the whole stack under ``precision="16-mixed"`` (GradScaler) and ``"bf16-mixed"``: restored
  weights exact, decay/no-decay groups split, mixing equal to the CPU reference of the same plan;
- no host-device synchronisation added to training steps: ``torch.cuda.set_sync_debug_mode``
  around the training batches (a bare fit first, to know Lightning's own), and the dispatch-mode
  count of ``aten._local_scalar_dense`` the CPU suite uses;
- EarlyStopping's host snapshot (pinned, non-blocking, ordered by an event): exact restore, no
  extra GPU memory; the ``"device"`` and ``"disk"`` locations;
- one-GPU ``FSDPStrategy`` (FSDP1) with ``use_orig_params=True`` (Lightning's default: the stack
  works on the original parameters) and ``False`` (flattened parameters: ``WeightDecayExclusion``
  refuses at fit start), and ``ModelParallelStrategy`` (FSDP2) with the stack.

The last test runs on CPU too: the refusal of FSDP1's flattened parameters, on a real
``FullyShardedDataParallel`` over gloo, which the FSDP1 GPU test relies on.
"""

from __future__ import annotations

import os
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_reg import EarlyStopping, Mixup, WeightDecayExclusion
from lightning_reg._optim import SOURCE_KEY
from lightning_reg._snapshot import StateSnapshot
from lightning_reg.mixing import mix_inputs
from tests.helpers import (
    BlobsDataModule,
    ScriptedClassifier,
    StateRecorder,
    TinyClassifier,
    same_state,
    trainer_kwargs,
)
from tests.test_stack import _CountScalarReadsInTrainingSteps, build

HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = (
    f"no CUDA GPU here (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
    "torch.cuda.is_available() is False); these tests run on a GPU machine through "
    "benchmarks/gpu_check.sh"
)


def needs_cuda(test: Callable[..., Any]) -> Callable[..., Any]:
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)(test))


# Scripted val_loss: epoch 2 is best; epochs 3-5 do not improve, so patience 3 stops after epoch 5.
SCRIPT = [0.9, 0.5, 0.2, 0.4, 0.3, 0.6, 0.7, 0.8]
BEST_EPOCH = 2


def gpu_kwargs(root: Path, **overrides: Any) -> dict[str, Any]:
    return trainer_kwargs(root, **{"accelerator": "cuda", "devices": 1, **overrides})


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """``state_dict`` as CPU tensors (a DTensor's local shard: one rank holds all of it here)."""
    out = {}
    for name, tensor in module.state_dict().items():
        local = getattr(tensor, "to_local", None)
        out[name] = (local() if callable(local) else tensor).detach().cpu().clone()
    return out


class CpuStateRecorder(StateRecorder):
    """``StateRecorder`` holding CPU copies (comparable with the model after ``fit`` wherever)."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        super().on_validation_end(trainer, pl_module)
        self.states[trainer.current_epoch] = cpu_state(pl_module)


def assert_restored(model: nn.Module, recorder: StateRecorder, early: EarlyStopping) -> None:
    assert early.best_epoch == BEST_EPOCH, early.best_epoch
    assert same_state(cpu_state(model), recorder.states[BEST_EPOCH]), "restored weights differ"
    assert not same_state(cpu_state(model), recorder.states[max(recorder.states)])


def assert_split(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Matrices decay in group 0; every vector (biases, norms) sits in the split-off group 1."""
    groups = optimizer.param_groups
    assert len(groups) == 2, [len(g["params"]) for g in groups]
    assert groups[0]["weight_decay"] > 0 and groups[1]["weight_decay"] == 0
    assert groups[1][SOURCE_KEY] == 0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    excluded = sorted(names[id(p)] for p in groups[1]["params"])
    assert decayed and all(n.endswith("weight") for n in decayed), decayed
    assert excluded and all(n.endswith("bias") or ".1." in n for n in excluded), excluded
    assert len(decayed) + len(excluded) == len(names)


def stack_with(early: EarlyStopping) -> list[pl.Callback]:
    """The canonical stack of tests/test_stack.py with ``early`` as its EarlyStopping."""
    return [early if isinstance(cb, EarlyStopping) else cb for cb in build("stack")]


# ---------------------------------------------------------------------------- mixed precision
class BatchBefore(pl.Callback):
    """Listed before ``Mixup``: keeps a copy of the batch as it arrives."""

    def __init__(self) -> None:
        self.batch: list[Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = [batch[0].detach().clone(), batch[1].detach().clone()]


class MixingCheck(pl.Callback):
    """Listed after ``Mixup``: the mixed GPU batch equals the CPU mix of the same plan."""

    def __init__(self, before: BatchBefore) -> None:
        self.before = before
        self.checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        mixup = next(cb for cb in trainer.callbacks if isinstance(cb, Mixup))
        if batch_idx >= 3 or mixup.current_plan is None:
            return
        x, y = self.before.batch
        plan = mixup.current_plan
        assert batch[0].is_cuda and batch[1].is_cuda
        torch.testing.assert_close(batch[0].cpu(), mix_inputs(x.cpu(), plan))
        torch.testing.assert_close(batch[1].cpu(), plan.targets(y.cpu()))
        torch.testing.assert_close(batch[1].sum(1).cpu(), torch.ones(len(y)))
        self.checked += 1


@needs_cuda
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_stack_fits_on_one_gpu_with_mixed_precision(tmp_path, precision):
    pl.seed_everything(0, verbose=False)
    model = ScriptedClassifier(SCRIPT, hidden=32, lr=0.1, optimizer="adamw", weight_decay=0.05)
    early = EarlyStopping("val_loss", patience=3)
    before = BatchBefore()
    check = MixingCheck(before)
    recorder = CpuStateRecorder()
    callbacks = [before, *stack_with(early), check, recorder]
    trainer = pl.Trainer(**gpu_kwargs(
        tmp_path, callbacks=callbacks, max_epochs=len(SCRIPT), precision=precision,
    ))  # fmt: skip
    trainer.fit(model, datamodule=BlobsDataModule(shuffle=False))
    if precision == "16-mixed":
        scaler = trainer.precision_plugin.scaler  # type: ignore[attr-defined]
        assert scaler is not None and scaler.is_enabled()
    assert early.stopped_epoch == BEST_EPOCH + 3, early.stopped_epoch
    assert_restored(model, recorder, early)
    assert_split(trainer.optimizers[0], model)
    assert check.checked >= 3, check.checked  # the first 3 batches of every mixed epoch
    assert next(model.parameters()).dtype == torch.float32


# ------------------------------------------------------------------ host-device synchronisation
class SyncDebug:
    """``torch.cuda.set_sync_debug_mode`` from the first ``on_train_batch_start`` hook of a batch
    to its last ``on_train_batch_end`` hook: our per-batch hooks, the training step, backward and
    the optimizer step. In ``"warn"`` mode each synchronising call is recorded with its stack."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.syncs: list[str] = []
        self.first, self.last = _SyncOn(self), _SyncOff(self)

    @contextmanager
    def recording(self) -> Iterator[None]:
        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                self.syncs.append(f"{message}\n{''.join(traceback.format_stack(limit=12))}")

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(0)

    def ours(self) -> list[str]:
        return [s for s in self.syncs if f"lightning_reg{os.sep}" in s]


class _SyncOn(pl.Callback):
    def __init__(self, owner: SyncDebug) -> None:
        self.owner = owner

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.set_sync_debug_mode(self.owner.mode)


class _SyncOff(_SyncOn):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.set_sync_debug_mode(0)


def synced_fit(root: Path, precision: str, mode: str, ours: bool) -> SyncDebug:
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier(hidden=32, lr=0.1, optimizer="adamw", weight_decay=0.05)
    debug = SyncDebug(mode)
    callbacks = [debug.first, *(build("stack") if ours else []), debug.last]
    trainer = pl.Trainer(**gpu_kwargs(
        root, callbacks=callbacks, max_epochs=2, precision=precision,
    ))  # fmt: skip
    with debug.recording():
        trainer.fit(model, datamodule=BlobsDataModule(shuffle=False))
    return debug


@needs_cuda
@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_no_sync_added_to_training_steps_sync_debug_mode(tmp_path, precision):
    bare = synced_fit(tmp_path / "bare", precision, "warn", ours=False)
    stack = synced_fit(tmp_path / "stack", precision, "warn", ours=True)
    assert not stack.ours(), "synchronising calls in lightning_reg:\n" + "\n".join(stack.ours())
    assert len(stack.syncs) == len(bare.syncs), (
        f"bare fit (Lightning's own): {len(bare.syncs)} synchronising calls, with the stack: "
        f"{len(stack.syncs)}; first with the stack:\n" + "\n".join(stack.syncs[:3])
    )
    if not bare.syncs:  # Lightning's own steps do not synchronise: the strict check applies
        synced_fit(tmp_path / "strict", precision, "error", ours=True)


@needs_cuda
@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_no_scalar_read_added_to_training_steps_dispatch_count(tmp_path, precision):
    counts = {}
    for label, callbacks in (("bare", []), ("ours", build("stack"))):
        pl.seed_everything(0, verbose=False)
        model = TinyClassifier(hidden=32, lr=0.1, optimizer="adamw", weight_decay=0.05)
        counter = _CountScalarReadsInTrainingSteps()
        trainer = pl.Trainer(**gpu_kwargs(
            tmp_path / label, callbacks=[*callbacks, counter], max_epochs=2, precision=precision,
        ))  # fmt: skip
        trainer.fit(model, datamodule=BlobsDataModule(shuffle=False))
        counts[label] = counter.count
    assert counts["ours"] == counts["bare"], counts


# ---------------------------------------------------------------------------- snapshot on GPU
@needs_cuda
def test_host_snapshot_is_pinned_non_blocking_and_event_ordered():
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(4)], nn.BatchNorm1d(2048)).cuda()
    want = {name: t.detach().cpu().clone() for name, t in net.state_dict().items()}
    snapshot = StateSnapshot("cpu")
    snapshot.capture(net)  # the first capture allocates the pinned buffers
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    torch.cuda._sleep(500_000_000)  # keep the stream busy: the copy cannot have finished yet
    snapshot.capture(net)
    assert snapshot._pending is not None and not snapshot._pending.query(), "capture blocked"
    with torch.no_grad():  # queued after the copy on the same stream: must not leak into it
        for p in net.parameters():
            p.add_(1.0)
    assert torch.cuda.memory_allocated() == allocated, "a host snapshot used GPU memory"
    assert all(t.is_pinned() for t in snapshot._tensors.values())
    held = snapshot.state_dict()  # waits on the event
    assert snapshot._pending is None
    assert same_state(held, {k: want[k] for k in held})
    snapshot.restore(net)
    assert same_state(cpu_state(net), want)


def early_stopping_fit(
    root: Path, snapshot_to: str | None, hidden: int = 32, dim: int = 16
) -> tuple[nn.Module, EarlyStopping | None, CpuStateRecorder, int]:
    """A scripted fit on the GPU; returns the model, the callback, the recorder, the peak bytes."""
    pl.seed_everything(0, verbose=False)
    model = ScriptedClassifier(SCRIPT, dim=dim, hidden=hidden, lr=0.05, batchnorm=True)
    early = EarlyStopping("val_loss", patience=3, snapshot_to=snapshot_to) if snapshot_to else None
    recorder = CpuStateRecorder()
    trainer = pl.Trainer(**gpu_kwargs(
        root, callbacks=[*([early] if early else []), recorder], max_epochs=len(SCRIPT),
    ))  # fmt: skip
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, datamodule=BlobsDataModule(dim=dim, shuffle=False))
    torch.cuda.synchronize()
    return model, early, recorder, torch.cuda.max_memory_allocated()


@needs_cuda
@pytest.mark.parametrize("snapshot_to", ["cpu", "device", "disk"])
def test_early_stopping_restores_exactly_on_gpu(tmp_path, snapshot_to):
    model, early, recorder, _ = early_stopping_fit(tmp_path, snapshot_to)
    assert early is not None
    assert_restored(model, recorder, early)
    assert next(model.parameters()).is_cuda
    if snapshot_to == "disk":
        assert not list((tmp_path / "best_state").glob("*.pt")), "the snapshot file was left"


@needs_cuda
def test_host_snapshot_adds_no_gpu_memory(tmp_path):
    dim, hidden = 512, 4096  # 2.1 M parameters: 8 MiB that a device copy would add
    _, _, _, bare = early_stopping_fit(tmp_path / "bare", None, hidden, dim)
    _, _, _, host = early_stopping_fit(tmp_path / "cpu", "cpu", hidden, dim)
    model, _, _, device = early_stopping_fit(tmp_path / "device", "device", hidden, dim)
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # logged scalars (a few 512-byte blocks) are all that may differ
    assert host - bare <= 64 * 1024, f"host snapshot: {host - bare} extra bytes (state {state})"
    assert device - bare >= state, f"the peak does not see a device copy: {device - bare}"


# -------------------------------------------------------------------------------------- FSDP
@pytest.fixture
def process_group_cleanup() -> Iterator[None]:
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@needs_cuda
@pytest.mark.usefixtures("process_group_cleanup")
def test_fsdp1_use_orig_params_fits_with_the_stack(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    pl.seed_everything(0, verbose=False)
    model = ScriptedClassifier(SCRIPT, hidden=32, lr=0.1, optimizer="adamw", weight_decay=0.05)
    early, recorder = EarlyStopping("val_loss", patience=3), CpuStateRecorder()
    strategy = FSDPStrategy(use_orig_params=True)
    trainer = pl.Trainer(**gpu_kwargs(
        tmp_path, strategy=strategy, callbacks=[*stack_with(early), recorder],
        max_epochs=len(SCRIPT),
    ))  # fmt: skip
    trainer.fit(model, datamodule=BlobsDataModule(shuffle=False))
    assert_restored(model, recorder, early)
    assert_split(trainer.optimizers[0], model)


@needs_cuda
@pytest.mark.usefixtures("process_group_cleanup")
def test_fsdp1_flattened_parameters_are_refused_at_fit_start(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    pl.seed_everything(0, verbose=False)
    model = ScriptedClassifier(SCRIPT, hidden=32, optimizer="adamw", weight_decay=0.05)
    trainer = pl.Trainer(**gpu_kwargs(
        tmp_path, strategy=FSDPStrategy(use_orig_params=False),
        callbacks=[WeightDecayExclusion(verbose=False)], max_epochs=1,
    ))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"flattened.*none of them is"):
        trainer.fit(model, datamodule=BlobsDataModule())


@needs_cuda
@pytest.mark.usefixtures("process_group_cleanup")
def test_fsdp2_model_parallel_fits_with_the_stack(tmp_path):
    from lightning.pytorch.strategies import ModelParallelStrategy

    from tests.compat.distributed_helpers import ShardedClassifier

    class Scripted(ShardedClassifier):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            super().validation_step(batch, batch_idx)
            self.log("val_loss", torch.tensor(SCRIPT[min(self.current_epoch, 7)]), sync_dist=True)

    pl.seed_everything(0, verbose=False)
    model = Scripted()
    early, recorder = EarlyStopping("val_loss", patience=3), CpuStateRecorder()
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    trainer = pl.Trainer(**gpu_kwargs(
        tmp_path, strategy=strategy, callbacks=[*stack_with(early), recorder],
        max_epochs=len(SCRIPT),
    ))  # fmt: skip
    trainer.fit(model, datamodule=BlobsDataModule(shuffle=False))
    assert_restored(model, recorder, early)
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0
    assert [len(g["params"]) for g in groups] == [2, 4]  # 2 Linear weights | biases + LayerNorm


# ------------------------------------------------------------------------ runs on CPU as well
def test_flattened_fsdp1_parameters_are_refused_not_silently_undecayed(tmp_path):
    """FSDP1 without ``use_orig_params`` registers a 1-d FlatParameter on the module itself.

    Counted as a module parameter it would land in the no-decay part (rule "1d") and turn decay
    off for the whole group; it must be refused instead. Real FSDP1 on one CPU process (gloo).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29000 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FSDP1's deprecation and NO_SHARD notices
            module = TinyClassifier()
            FullyShardedDataParallel(module, use_orig_params=False, device_id=torch.device("cpu"))
        assert [type(p).__name__ for p in module.parameters()] == ["Parameter"]  # the flat one
        optimizer = torch.optim.AdamW(module.parameters(), weight_decay=0.05)
        trainer: Any = SimpleNamespace(
            optimizers=[optimizer], lr_scheduler_configs=[], strategy=None, world_size=1
        )
        callback = WeightDecayExclusion(verbose=False)
        with pytest.raises(RuntimeError, match=r"flattened.*none of them is"):
            callback.on_fit_start(trainer, module)
        assert optimizer.param_groups[0]["weight_decay"] == 0.05
    finally:
        dist.destroy_process_group()
