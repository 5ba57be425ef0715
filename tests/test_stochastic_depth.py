"""StochasticDepth: the functional core against direct implementations, and the callback through
real fits on timm and torchvision models.

``tests/test_stack.py``'s ``CANONICAL`` table builds ``TinyClassifier`` (an MLP without residual
blocks), which this callback refuses by design; the table's generic checks (fit + logged metric,
bitwise resume from a mid-fit checkpoint, DDP with 2 processes, pickle, ``weights_only`` loading,
no host-device sync, "objects as found" of ``test_attach.py``) are written here on a small
torchvision ResNet instead.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint
from timm.layers import drop_path as timm_drop_path
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from lightning_reg import StochasticDepth
from lightning_reg.drop_path import (
    BranchDrop,
    BranchSkip,
    RandomSource,
    depth_rates,
    drop_path,
    find_residual_branches,
    scheduled_rate,
    step_seed,
    torchvision_branch,
)
from tests.helpers import (
    BlobsDataModule,
    CountScalarReads,
    CrashAt,
    TinyClassifier,
    same_state,
    trainer_kwargs,
)

# ---------------------------------------------------------------------------------------------
# models and data


class Classifier(pl.LightningModule):
    """Wraps any image classifier built by ``factory`` (picklable for ``ddp_spawn``)."""

    def __init__(self, factory: str = "tiny_resnet", lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.model = MODELS[factory]()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def tiny_resnet() -> nn.Module:
    """Three torchvision ``BasicBlock``s, 8 channels: a ResNet small enough for many CPU fits."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        BasicBlock(8, 8), BasicBlock(8, 8), BasicBlock(8, 8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


MODELS = {
    "tiny_resnet": tiny_resnet,
    "resnet18": lambda: torchvision.models.resnet18(num_classes=4),
    "resnet10t": lambda: timm.create_model("resnet10t", num_classes=4, drop_path_rate=0.05),
    "resnet10t_no_drop": lambda: timm.create_model("resnet10t", num_classes=4),
}


def images(n: int = 32, size: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,)))


def loaders(n: int = 32, size: int = 16) -> tuple[DataLoader, DataLoader]:
    return DataLoader(images(n, size), batch_size=8), DataLoader(images(16, size, 1), batch_size=8)


def fit(root, factory="tiny_resnet", callbacks=(), max_epochs=2, n=32, size=16, **kwargs):
    pl.seed_everything(0, verbose=False)
    module = Classifier(factory)
    train, val = loaders(n, size)
    trainer = pl.Trainer(**trainer_kwargs(
        root, callbacks=list(callbacks), max_epochs=max_epochs, **kwargs
    ))  # fmt: skip
    trainer.fit(module, train, val)
    return module, trainer


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# functional core


def test_drop_path_equals_a_direct_implementation_and_timm():
    x = torch.randn(64, 3, 4, 4)
    out = drop_path(x, 0.3, True, torch.Generator().manual_seed(1))
    mask = torch.empty(64).bernoulli_(0.7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, x * (mask / 0.7).view(64, 1, 1, 1))
    torch.manual_seed(5)
    ours = drop_path(x, 0.3, True)
    torch.manual_seed(5)
    assert torch.equal(ours, timm_drop_path(x, 0.3, True))


def test_drop_path_mask_statistics_and_expectation():
    x = torch.randn(8, 5).abs() + 0.5
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([drop_path(x, 0.25, True, g) for _ in range(4000)])
    dropped = (draws == 0).all(dim=-1).float()  # whole samples, never single entries
    assert ((draws == 0).any(dim=-1) == (draws == 0).all(dim=-1)).all()
    assert abs(dropped.mean().item() - 0.25) < 0.01
    kept = ~dropped.bool()
    torch.testing.assert_close(draws[kept], (x / 0.75).expand_as(draws)[kept])
    assert torch.allclose(draws.mean(0), x, rtol=0.03)


def test_drop_path_identity_outside_training_and_edge_rates():
    x = torch.randn(4, 3)
    assert drop_path(x, 0.5, training=False) is x
    assert drop_path(x, 0.0) is x
    assert torch.equal(drop_path(x, 1.0), torch.zeros_like(x))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            drop_path(x, bad)


def test_depth_rates_and_epoch_schedule():
    assert depth_rates(0.5, 4) == [0.5 * l / 4 for l in (1, 2, 3, 4)]  # noqa: E741
    assert depth_rates(0.5, 0) == []
    expected = [0.0, 0.0, 0.1, 0.2, 0.30000000000000004, 0.3, 0.3]
    got = [scheduled_rate(e, 0.3, start_epoch=2, warmup_epochs=3) for e in range(7)]
    assert got == pytest.approx(expected)
    assert [scheduled_rate(e, 0.3, start_epoch=1) for e in range(3)] == [0.0, 0.3, 0.3]
    assert scheduled_rate(0, 0.3) == 0.3


def test_branch_drop_hook_is_inactive_in_eval_and_at_rate_zero():
    bn = nn.BatchNorm1d(3)
    hook = BranchDrop(RandomSource(0), rate=0.5)
    bn.register_forward_hook(hook)
    x = torch.randn(16, 3)
    bn.eval()
    assert torch.equal(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))
    bn.train()
    hook.rate = 0.0
    assert not (bn(x) == 0).all(dim=1).any()


def test_torchvision_blocks_found_by_name_and_package():
    names = [name for name, _ in find_residual_branches(torchvision.models.resnet18())]
    assert names == [f"layer{i}.{j}.bn2" for i in (1, 2, 3, 4) for j in (0, 1)]
    names = [name for name, _ in find_residual_branches(torchvision.models.resnet50())]
    assert len(names) == 16 and all(name.endswith(".bn3") for name in names)

    class BasicBlock(nn.Module):  # same name, not torchvision's: not recognised
        def __init__(self):
            super().__init__()
            self.bn2 = nn.BatchNorm2d(2)

    assert find_residual_branches(nn.Sequential(BasicBlock())) == []


# ---------------------------------------------------------------------------------------------
# torchvision blocks: the branch runs on the kept rows only (BranchSkip)

BLOCKS = {
    "basic": lambda: BasicBlock(8, 8),
    "basic-downsample": lambda: BasicBlock(
        8, 16, stride=2, downsample=nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    ),
    "bottleneck": lambda: Bottleneck(16, 4),
}


def skipping_block(kind: str, seed: int, rate: float, index: int = 0):
    """A torchvision block with BranchSkip's hooks, its hook-free twin, and conv2's batch sizes."""
    torch.manual_seed(0)
    block = BLOCKS[kind]()
    twin = copy.deepcopy(block)
    skip = BranchSkip(RandomSource(seed), rate, index)
    first, last = torchvision_branch(block)
    first.register_forward_pre_hook(skip.before)
    last.register_forward_hook(skip.after)
    sizes: list[int] = []
    block.conv2.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    return block, twin, sizes


def keep_mask(seed: int, index: int, rows: int, rate: float) -> Tensor:
    """The documented draw: a CPU generator seeded from the step's seed and the block's index."""
    g = torch.Generator().manual_seed(step_seed(seed, index, 0, 0))
    return torch.empty(rows).bernoulli_(1 - rate, generator=g).bool()


def direct_block(twin: nn.Module, x: Tensor, rows: Tensor, rate: float, skip: bool) -> Tensor:
    """The block written out: branch on ``x[rows]`` (skip) or on ``x`` times the mask."""
    h = x[rows] if skip else x
    h = twin.relu(twin.bn1(twin.conv1(h)))
    if isinstance(twin, Bottleneck):
        h = twin.bn3(twin.conv3(twin.relu(twin.bn2(twin.conv2(h)))))
    else:
        h = twin.bn2(twin.conv2(h))
    if skip:
        branch = torch.zeros(x.shape[0], *h.shape[1:]).index_put((rows,), h / (1 - rate))
    else:
        mask = torch.zeros(x.shape[0]).index_fill(0, rows, 1 / (1 - rate))
        branch = h * mask.view(-1, 1, 1, 1)
    identity = x if twin.downsample is None else twin.downsample(x)
    return torch.relu(branch + identity)


def first_seed(condition, rows: int, rate: float) -> int:
    return next(s for s in range(10_000) if condition(int(keep_mask(s, 0, rows, rate).sum())))


def assert_same_step(block, twin, x, rows, rate, skip):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = block(xa)
    expected = direct_block(twin, xb, rows, rate, skip)
    torch.testing.assert_close(out, expected)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    (expected * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    for (name, p), q in zip(block.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(block.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(b, c, msg=name)  # BatchNorm statistics: kept rows only


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_branch_skip_equals_the_block_run_on_the_kept_rows(kind):
    rate, rows = 0.5, 16
    seed = first_seed(lambda kept: 4 <= kept <= 12, rows, rate)
    block, twin, sizes = skipping_block(kind, seed, rate, index=0)
    x = torch.randn(rows, 16 if kind == "bottleneck" else 8, 6, 6)
    kept = keep_mask(seed, 0, rows, rate).nonzero().flatten()
    assert_same_step(block, twin, x, kept, rate, skip=True)
    assert sizes == [len(kept)]  # the branch computed the kept rows only
    block.eval(), twin.eval()  # inference: the whole block, untouched
    with torch.no_grad():
        assert torch.equal(block(x), twin(x)) and sizes == [len(kept), rows]


@pytest.mark.parametrize("kept_rows", ["all", "none", "one"])
def test_branch_skip_falls_back_to_the_mask_below_two_rows_and_when_all_are_kept(kept_rows):
    rate, rows = 0.5, 4
    wanted = {"all": lambda k: k == rows, "none": lambda k: k == 0, "one": lambda k: k == 1}
    seed = first_seed(wanted[kept_rows], rows, rate)
    block, twin, sizes = skipping_block("basic", seed, rate)
    x = torch.randn(rows, 8, 6, 6)
    kept = keep_mask(seed, 0, rows, rate).nonzero().flatten()
    assert_same_step(block, twin, x, kept, rate, skip=False)
    assert sizes == [rows]  # the whole batch ran the branch: BatchNorm never sees 0 or 1 row


def test_branch_skip_draws_the_same_rows_again_within_a_step_and_new_ones_after():
    rate, rows = 0.5, 16
    seed = first_seed(lambda kept: 4 <= kept <= 12, rows, rate)
    x = torch.randn(rows, 8, 6, 6)
    # gradient checkpointing recomputes the block in backward: the same kept rows, same gradients
    plain, _, _ = skipping_block("basic", seed, rate)
    ckpt, _, sizes = skipping_block("basic", seed, rate)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain(xa).square().sum().backward()
    checkpoint(ckpt, xb, use_reentrant=False).square().sum().backward()
    assert sizes[0] == sizes[1] < rows  # forward, then the recomputation
    torch.testing.assert_close(xa.grad, xb.grad)
    for p, q in zip(plain.parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    # a second pass in the same step (SAM) drops the same rows; the next step draws anew
    source, block = RandomSource(seed), BasicBlock(8, 8)
    skip = BranchSkip(source, rate)
    block.conv1.register_forward_pre_hook(skip.before)
    block.bn2.register_forward_hook(skip.after)

    def dropped() -> Tensor:  # rows whose output is the shortcut alone
        with torch.no_grad():
            return (block(x) == torch.relu(x)).flatten(1).all(dim=1)

    first = dropped()
    assert torch.equal(first, dropped())
    source.reseed(seed + 1)
    assert not torch.equal(first, dropped())


# ---------------------------------------------------------------------------------------------
# arguments and refusals


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rate": 0.0}, "rate"), ({"rate": 1.0}, "rate"), ({"start_epoch": -1}, "start_epoch"),
        ({"warmup_epochs": 1.5}, "warmup_epochs"), ({"blocks": []}, "blocks"),
    ],
)  # fmt: skip
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StochasticDepth(**kwargs)


def test_unknown_architecture_is_refused_with_the_fix(tmp_path):
    model = TinyClassifier()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[StochasticDepth()], max_epochs=1))
    with pytest.raises(RuntimeError, match=r"found nothing to drop.*BasicBlock.*`blocks=`"):
        trainer.fit(model, datamodule=BlobsDataModule())
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, callbacks=[StochasticDepth(blocks=["nope.*"])], max_epochs=1
    ))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"matches no module.*net\.0"):
        trainer.fit(model, datamodule=BlobsDataModule())


def test_timm_model_without_drop_path_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match=r"drop_path_rate>0.*drop_path_rate=0\.1"):
        fit(tmp_path, "resnet10t_no_drop", [StochasticDepth()], max_epochs=1)


# ---------------------------------------------------------------------------------------------
# timm: the callback schedules the DropPath modules' rates


class RecordRates(pl.Callback):
    def __init__(self):
        self.rates: dict[int, dict[str, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.rates[trainer.current_epoch] = {
                name: m.drop_prob
                for name, m in pl_module.named_modules()
                if type(m).__name__ == "DropPath"
            }


def test_timm_rates_scheduled_each_epoch_and_restored(tmp_path):
    recorder = RecordRates()
    callback = StochasticDepth(rate=0.4, start_epoch=1, warmup_epochs=2)
    module, trainer = fit(
        tmp_path, "resnet10t", [callback, recorder], max_epochs=4, n=16,
        logger=pl.loggers.CSVLogger(tmp_path),
    )  # fmt: skip
    # 4 blocks; timm leaves the first without DropPath (its own rate is 0 there)
    for epoch, final in enumerate([0.0, 0.2, 0.4, 0.4]):
        expected = {f"layer{i}.0.drop_path.": final * i / 4 for i in (2, 3, 4)}
        got = {name[len("model.") :] + ".": rate for name, rate in recorder.rates[epoch].items()}
        assert got == pytest.approx(expected), epoch
    originals = [0.05 * i / 3 for i in (1, 2, 3)]  # timm's own linear rule
    restored = [m.drop_prob for m in module.modules() if type(m).__name__ == "DropPath"]
    assert restored == pytest.approx(originals)
    assert trainer.callback_metrics["reg/stochastic_depth/rate"] == pytest.approx(0.4)
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "reg/stochastic_depth/rate" in logged.splitlines()[0]


def test_timm_rates_restored_when_fit_raises(tmp_path):
    module = Classifier("resnet10t")
    recorder = RecordRates()
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, max_epochs=3, callbacks=[StochasticDepth(rate=0.4), recorder, CrashAt(1)]
    ))  # fmt: skip
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(module, loaders(n=16)[0])
    assert max(recorder.rates[0].values()) == pytest.approx(0.4)  # the callback did act
    restored = [m.drop_prob for m in module.modules() if type(m).__name__ == "DropPath"]
    assert restored == pytest.approx([0.05 * i / 3 for i in (1, 2, 3)])


# ---------------------------------------------------------------------------------------------
# torchvision: hooks on the residual branches


class MeasureBranch(pl.Callback):
    """Captures ``layer4.1.bn2``'s output before (raw) and after our hook, in training steps."""

    def __init__(self):
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self.eval_pairs: list[tuple[Tensor, Tensor]] = []
        self._raw: Tensor | None = None

    def on_fit_start(self, trainer, pl_module):  # runs after StochasticDepth's (list order)
        bn = pl_module.model.layer4[1].bn2
        self.handles = [
            bn.register_forward_hook(self._before, prepend=True),
            bn.register_forward_hook(self._after),
        ]

    def _before(self, module, args, output):
        self._raw = output.detach().clone()

    def _after(self, module, args, output):
        target = self.pairs if module.training else self.eval_pairs
        target.append((self._raw, output.detach().clone()))

    def on_fit_end(self, trainer, pl_module):
        for handle in self.handles:
            handle.remove()


def test_resnet18_branches_dropped_in_training_only_and_checkpoint_loads(tmp_path):
    measure = MeasureBranch()
    callback = StochasticDepth(rate=0.5)
    callbacks = [callback, measure, ModelCheckpoint(tmp_path / "ck")]
    module, _ = fit(tmp_path, "resnet18", callbacks, max_epochs=1, enable_checkpointing=True)
    # layer4.1 is block 8 of 8: rate 0.5; kept samples are scaled by 1 / (1 - 0.5)
    # the raw output holds the kept rows only (the branch ran on them), or every row when the
    # block fell back to the mask (fewer than 2 kept) or kept them all
    dropped = kept = skipped = 0
    for raw, out in measure.pairs:
        zero = (out.flatten(1) == 0).all(dim=1)
        dropped += int(zero.sum())
        kept += int((~zero).sum())
        if raw.shape[0] < out.shape[0]:
            skipped += 1
            torch.testing.assert_close(out[~zero], raw / 0.5)
        else:
            torch.testing.assert_close(out[~zero], raw[~zero] / 0.5)
    assert dropped > 0 and kept > 0 and skipped > 0
    assert 0.3 < dropped / (dropped + kept) < 0.7
    assert measure.eval_pairs and all(torch.equal(raw, out) for raw, out in measure.eval_pairs)
    # nothing left: same keys, no hooks; eval outputs equal the unmodified architecture's
    assert hooks_left(module) == 0
    checkpoint = torch.load(next((tmp_path / "ck").glob("*.ckpt")), weights_only=True)
    fresh = torchvision.models.resnet18(num_classes=4)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    fresh.load_state_dict(state, strict=True)
    fresh.load_state_dict(module.model.state_dict(), strict=True)
    x = images(8)[:][0]
    module.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(module(x), fresh(x))


class ResidualMLP(pl.LightningModule):
    """A model the callback does not know: residual MLP blocks, branch output ``branch``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"branch": nn.Sequential(nn.ReLU(), nn.Linear(32, 32))}) for _ in range(3)
        )
        self.head = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block["branch"](h)
        return self.head(h)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("blocks", [["blocks.*.branch"], lambda name, m: name.endswith("branch")])
def test_blocks_argument_points_the_hooks_at_unknown_blocks(tmp_path, blocks):
    seen: list[Tensor] = []
    model = ResidualMLP()
    model.blocks[2]["branch"].register_forward_hook(
        lambda m, a, out: seen.append(out.detach()) if m.training else None
    )

    class After(pl.Callback):  # the last block's output after our hook (registered later)
        def on_fit_start(self, trainer, pl_module):
            self.handle = pl_module.blocks[2]["branch"].register_forward_hook(
                lambda m, a, out: seen.append(out.detach())
            )

        def on_fit_end(self, trainer, pl_module):
            self.handle.remove()

    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, callbacks=[StochasticDepth(rate=0.5, blocks=blocks), After()], max_epochs=1
    ))  # fmt: skip
    trainer.fit(model, datamodule=BlobsDataModule())
    after = seen[1::2]
    rows = torch.cat([(out == 0).all(dim=1) for out in after])
    assert 0.3 < rows.float().mean().item() < 0.7
    assert len(model.blocks[2]["branch"]._forward_hooks) == 1  # the test's own, ours removed


# ---------------------------------------------------------------------------------------------
# the generic checks of tests/test_stack.py and tests/test_attach.py, on a torchvision ResNet


def run(root, max_epochs=3, crash_at=None, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    module = Classifier("tiny_resnet")
    train, val = loaders(n=32, size=8)
    callbacks = [
        StochasticDepth(rate=0.3, warmup_epochs=2),
        ModelCheckpoint(root / "ck", save_last=True),
    ]
    callbacks += [CrashAt(crash_at)] if crash_at is not None else []
    trainer = pl.Trainer(**trainer_kwargs(
        root, callbacks=callbacks, max_epochs=max_epochs, enable_checkpointing=True,
    ))  # fmt: skip
    if crash_at is None:
        trainer.fit(module, train, val, ckpt_path=ckpt_path)
    else:
        with pytest.raises(RuntimeError, match="simulated crash"):
            trainer.fit(module, train, val)
    return module, trainer


def test_resume_from_a_mid_training_checkpoint_is_bitwise_identical(tmp_path):
    full, _ = run(tmp_path / "full")
    run(tmp_path / "part", crash_at=2)
    resumed, _ = run(tmp_path / "resumed", ckpt_path=tmp_path / "part" / "ck" / "last.ckpt")
    assert same_state(full.state_dict(), resumed.state_dict())
    # and the drop changed training: a run without it ends elsewhere
    bare, _ = fit(tmp_path / "bare", max_epochs=3, size=8)
    assert not same_state(full.state_dict(), bare.state_dict())


def test_checkpoint_loads_weights_only_pickle_and_seeded_reproducibility(tmp_path):
    callback = StochasticDepth(rate=0.3, blocks=["model.[35].bn2"], seed=3)
    pickle.loads(pickle.dumps(callback))
    first, _ = fit(tmp_path / "a", callbacks=[callback], size=8, enable_checkpointing=True)
    (path,) = (tmp_path / "a").glob("**/*.ckpt")
    torch.load(path, weights_only=True)
    assert callback.state_dict() == {}  # the schedule depends on the epoch only
    restored = pickle.loads(pickle.dumps(callback))
    assert restored._hooks == [] and restored.rate == 0.3
    pickle.loads(pickle.dumps(first))  # no hook or callback left on the module
    copy.deepcopy(first)
    again, _ = fit(tmp_path / "b", callbacks=[restored], size=8)  # same seed: the same run
    assert same_state(first.state_dict(), again.state_dict())


class _CountReads(pl.Callback):
    def __init__(self):
        self.count, self.mode = 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.mode = CountScalarReads()
        self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.mode.__exit__(None, None, None)
        self.count += self.mode.count


def test_no_host_device_sync_added_to_training_steps(tmp_path):
    counts = {}
    for label, callbacks in (("bare", []), ("ours", [StochasticDepth(rate=0.3)])):
        counter = _CountReads()
        fit(tmp_path / label, callbacks=[*callbacks, counter], max_epochs=1, size=8)
        counts[label] = counter.count
    assert counts["ours"] == counts["bare"]


class _Probe(pl.Callback):
    """What ``test_attach.py``'s probe checks: callbacks list, hooks, deep copy and pickle."""

    def __init__(self):
        self.seen: dict[str, Any] = {}

    def setup(self, trainer, pl_module, stage):
        self.callbacks = list(trainer.callbacks)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen["hooks_during_fit"] = hooks_left(pl_module)
        self.seen["same_callbacks"] = list(trainer.callbacks) == self.callbacks
        twin = copy.deepcopy(pl_module)  # what WeightAveraging does mid-fit
        self.seen["twin_ours"] = [k for k, v in vars(twin).items() if _ours(v)]
        pickle.dumps(pl_module.model)


def _ours(value: Any) -> bool:
    return type(value).__module__.startswith("lightning_reg")


def _fit_and_probe(root, callbacks, crash):
    pl.seed_everything(0, verbose=False)
    module = Classifier("tiny_resnet")
    probe = _Probe()
    train, val = loaders(size=8)
    extra = [CrashAt(1)] if crash else []
    trainer = pl.Trainer(**trainer_kwargs(
        root, callbacks=[*callbacks, probe, *extra], max_epochs=2
    ))  # fmt: skip
    if crash:
        with pytest.raises(RuntimeError, match="simulated crash"):
            trainer.fit(module, train, val)
    else:
        trainer.fit(module, train, val)
    return module, probe.seen


@pytest.mark.parametrize("crash", [False, True], ids=["fit", "fit-raises"])
def test_fit_leaves_user_objects_as_it_found_them(tmp_path, crash):
    """What may change during fit: a pre-hook on each branch's conv1 and a hook on its end (3
    blocks: 6 hooks); after it, nothing."""
    bare, bare_seen = _fit_and_probe(tmp_path / "bare", [], crash)
    module, seen = _fit_and_probe(tmp_path / "ours", [StochasticDepth(rate=0.3)], crash)
    assert seen["hooks_during_fit"] == 6 and bare_seen["hooks_during_fit"] == 0
    assert seen["same_callbacks"] and seen["twin_ours"] == []
    assert hooks_left(module) == 0
    assert set(vars(module)) == set(vars(bare))
    assert not [k for k, v in vars(module).items() if _ours(v)]
    assert module.state_dict().keys() == bare.state_dict().keys()


class _MaskOfFirstStep(pl.Callback):
    def __init__(self, root):
        self.root = root

    def on_fit_start(self, trainer, pl_module):
        self.handle = pl_module.model[5].bn2.register_forward_hook(self._record)
        self.masks: list[Tensor] = []

    def _record(self, module, args, output):
        if module.training:
            self.masks.append((output.flatten(1) == 0).all(dim=1))

    def on_train_end(self, trainer, pl_module):
        self.handle.remove()
        torch.save(
            {"params": dict(pl_module.named_parameters()), "masks": torch.stack(self.masks)},
            f"{self.root}/rank{trainer.global_rank}.pt",
        )


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_two_processes_same_weights_distinct_masks(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = Classifier("tiny_resnet")
    train, _ = loaders(n=64, size=8)
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn",
        callbacks=[StochasticDepth(rate=0.5), _MaskOfFirstStep(str(tmp_path))],
        limit_val_batches=0,
    ))  # fmt: skip
    trainer.fit(module, train)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert same_state(ranks[0]["params"], ranks[1]["params"])  # BatchNorm buffers are per rank
    assert ranks[0]["masks"].any() and ranks[1]["masks"].any()
    assert not torch.equal(ranks[0]["masks"], ranks[1]["masks"])


def test_standalone_pytorch_lightning_trainer(tmp_path):
    import pytorch_lightning as ptl

    from lightning_reg.pytorch_lightning import StochasticDepth as PLStochasticDepth

    class PLClassifier(ptl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_resnet()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    zeros: list[Tensor] = []

    class Watch(ptl.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.handle = pl_module.model[5].bn2.register_forward_hook(
                lambda m, a, out: zeros.append((out.flatten(1) == 0).all(dim=1))
            )

        def on_fit_end(self, trainer, pl_module):
            self.handle.remove()

    module = PLClassifier()
    trainer = ptl.Trainer(**trainer_kwargs(
        tmp_path, max_epochs=1, callbacks=[PLStochasticDepth(rate=0.5), Watch()]
    ))  # fmt: skip
    trainer.fit(module, loaders(size=8)[0])
    assert torch.cat(zeros).any() and not torch.cat(zeros).all()
    assert hooks_left(module) == 0


class FreezeNormsAndCountDrops(pl.Callback):
    """Puts every BatchNorm in eval mode each epoch (frozen-BN fine-tuning) and, with a hook
    registered after StochasticDepth's on the hooked ``bn2``, counts the rows it zeroed."""

    def __init__(self) -> None:
        self.zeroed, self.rows, self.handle = 0, 0, None

    def on_fit_start(self, trainer, pl_module):  # after StochasticDepth's (list order)
        self.handle = pl_module.model[3].bn2.register_forward_hook(self._count)

    def on_train_epoch_start(self, trainer, pl_module):
        for module in pl_module.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()

    def _count(self, module, args, output):
        if torch.is_grad_enabled():  # training batches, not validation
            self.zeroed += int((output.flatten(1).abs().sum(1) == 0).sum())
            self.rows += output.shape[0]

    def on_fit_end(self, trainer, pl_module):
        self.handle.remove()


def test_blocks_hooked_on_a_frozen_eval_mode_batchnorm_still_drop(tmp_path):
    """The model's mode decides, not the hooked module's: a frozen BatchNorm used to turn the drop
    off silently while `reg/stochastic_depth/rate` logged the full rate."""
    probe = FreezeNormsAndCountDrops()
    sd = StochasticDepth(rate=0.9, blocks=["model.[345].bn2"])
    fit(tmp_path, callbacks=[sd, probe], max_epochs=1)
    assert probe.rows == 32
    assert 0.1 * 32 < probe.zeroed < 32  # the first block's rate is 0.3
