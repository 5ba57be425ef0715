"""Compatibility matrix, row "pytorch_lightning package": every callback under the standalone
``pytorch_lightning`` distribution (``import pytorch_lightning as pl``), whose classes are other
objects than ``lightning.pytorch``'s.

Each cell is a real ``pytorch_lightning.Trainer.fit`` of a ``pytorch_lightning.LightningModule``
(``tests/compat/pl_helpers.py``) and checks results against values computed here: restored
weights, checkpoint contents, hook order, true weight norms, TensorBoard extras, param groups,
mixed targets, the gap and the audit. One ``ddp_spawn`` launch (2 gloo processes) serves the
distributed checks.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped]
    EventAccumulator,
)

import lightning_reg
from lightning_reg.early_stopping import CHECKPOINT_KEY
from lightning_reg.privacy import loss_attack_metrics
from lightning_reg.pytorch_lightning import (
    EarlyStopping,
    GeneralizationGapMonitor,
    LabelSmoothing,
    MembershipInferenceAudit,
    Mixup,
    ProximalSparsity,
    RegularizationMonitor,
    SharpnessAwareMinimization,
    WeightDecayExclusion,
)
from tests.compat.pl_helpers import (
    CLASSES,
    PLClassifier,
    PLData,
    StateRecorder,
    pl_trainer,
    train_set_loss,
)
from tests.helpers import BlobsDataModule, TinyClassifier, trainer_kwargs
from tests.test_privacy import subset_indices

ROW = "pytorch_lightning package"


def _cell(column: str) -> pytest.MarkDecorator:
    return pytest.mark.compat(ROW, column)


def _assert_state_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() <= expected.keys()
    for name, tensor in actual.items():
        assert torch.equal(tensor, expected[name]), name


def _scalars(log_dir: str, tag: str) -> list[float]:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def test_the_helpers_are_pytorch_lightning_objects() -> None:
    # guards the premise of this file: nothing here is a lightning.pytorch object by accident
    assert not isinstance(PLClassifier(), L.LightningModule)
    assert not issubclass(pl.Callback, L.Callback)
    assert issubclass(EarlyStopping, pl.callbacks.EarlyStopping)
    assert lightning_reg.pytorch_lightning.Mixup is lightning_reg.Mixup


# ---------------------------------------------------------------------------------- EarlyStopping
@_cell("EarlyStopping")
def test_early_stopping_restores_best_and_checkpoints_its_snapshot(tmp_path: Path) -> None:
    es = EarlyStopping("scripted", patience=1)
    recorder = StateRecorder()
    saver = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0)
    model = PLClassifier(scripted=[2.0, 1.0, 1.5, 1.8])
    trainer = pl_trainer(
        tmp_path, max_epochs=4, callbacks=[es, recorder, saver], enable_checkpointing=True
    )
    assert trainer.early_stopping_callback is es  # the Trainer knows it as its own

    trainer.fit(model, datamodule=PLData())

    assert es.stopped_epoch == 2 and es.stopping_reason is EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert (es.best_epoch, es.best_value) == (1, 1.0)
    _assert_state_equal(model.state_dict(), recorder.states[1])  # BatchNorm statistics included
    assert not torch.equal(recorder.states[1]["net.0.weight"], recorder.states[2]["net.0.weight"])
    checkpoint = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    _assert_state_equal(checkpoint[CHECKPOINT_KEY][es.state_key], recorder.states[1])
    _assert_state_equal(checkpoint["state_dict"], recorder.states[2])  # last.ckpt: reached weights
    assert checkpoint["callbacks"][es.state_key]["best_epoch"] == 1

    # a resumed fit (new callback object) restores the checkpoint's snapshot: epoch 1, not 3
    resumed = EarlyStopping("scripted", patience=5)
    trainer = pl_trainer(tmp_path, max_epochs=4, callbacks=[resumed])
    trainer.fit(model, datamodule=PLData(), ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert (resumed.best_epoch, resumed.best_value) == (1, 1.0)
    _assert_state_equal(model.state_dict(), recorder.states[1])


@_cell("EarlyStopping")
def test_early_stopping_state_is_the_same_in_both_packages() -> None:
    ours, theirs = lightning_reg.EarlyStopping("m", patience=4), EarlyStopping("m", patience=4)
    assert ours.state_key == theirs.state_key
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.wait_count, theirs.best_epoch, theirs.best_value = 2, 5, 0.25
    theirs.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
    ours.load_state_dict(theirs.state_dict())
    assert (ours.wait_count, ours.stopping_reason.name) == (2, "PATIENCE_EXHAUSTED")
    assert type(ours.stopping_reason).__module__.startswith("lightning.pytorch.")  # its own enum
    assert type(theirs.stopping_reason) is EarlyStoppingReason


@_cell("EarlyStopping")
def test_early_stopping_checks_after_the_modules_on_train_epoch_end(tmp_path: Path) -> None:
    # `epoch_metric` is logged in the module's own on_train_epoch_end: run before it, the check
    # would find no metric at epoch 0, then judge every epoch on the previous epoch's value
    es = EarlyStopping("epoch_metric", patience=2, check_on_train_epoch_end=True)
    model = PLClassifier(epoch_end_values=[3.0, 1.0, 2.0, 2.0, 0.5, 0.1])
    pl_trainer(tmp_path, max_epochs=6, callbacks=[es]).fit(model, datamodule=PLData())

    assert (es.best_epoch, es.best_value) == (1, 1.0)
    assert es.stopped_epoch == 3 and es.stopping_reason is EarlyStoppingReason.PATIENCE_EXHAUSTED


@_cell("EarlyStopping")
def test_each_early_stopping_refuses_the_other_packages_trainer(tmp_path: Path) -> None:
    model = PLClassifier()
    trainer = pl_trainer(tmp_path, callbacks=[lightning_reg.EarlyStopping("val_loss")])
    with pytest.raises(
        TypeError, match=r"from lightning_reg\.pytorch_lightning import EarlyStopping"
    ):
        trainer.fit(model, datamodule=PLData())
    assert model.seen_targets == []  # refused before any training step

    kwargs = trainer_kwargs(tmp_path, max_epochs=1, callbacks=[EarlyStopping("val_loss")])
    with pytest.raises(TypeError, match="from lightning_reg import EarlyStopping"):
        L.Trainer(**kwargs).fit(TinyClassifier(), datamodule=BlobsDataModule())


# --------------------------------------------------------------------------- RegularizationMonitor
@_cell("RegularizationMonitor")
def test_regularization_monitor_true_norms_and_histograms(tmp_path: Path) -> None:
    recorder = StateRecorder()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    callbacks = [RegularizationMonitor(histogram_every_n_epochs=1), recorder]
    trainer = pl_trainer(tmp_path, callbacks=callbacks, logger=logger)
    trainer.fit(PLClassifier(weight_decay=0.01), datamodule=PLData())

    for i, tag in enumerate(("reg/weights/l1", "reg/weights/l2")):
        logged = _scalars(logger.log_dir, tag)
        assert logged == pytest.approx([recorder.norms[e][i] for e in (0, 1)], rel=1e-5), tag
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    histograms = set(events.Tags()["histograms"])
    assert {"reg/weights_hist/net.0.weight", "reg/weights_hist/net.3.weight"} <= histograms
    assert len(events.Histograms("reg/weights_hist/net.0.weight")) == 2
    assert _scalars(logger.log_dir, "reg/weight_decay/0/pg0") == pytest.approx([0.01, 0.01])


# ------------------------------------------------------------------------ GeneralizationGapMonitor
@_cell("GeneralizationGapMonitor")
def test_gap_monitor_true_values_and_tensorboard_extras(tmp_path: Path) -> None:
    recorder = StateRecorder()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    callbacks = [GeneralizationGapMonitor(subset_size=1000), recorder]
    trainer = pl_trainer(tmp_path, callbacks=callbacks, logger=logger)
    trainer.fit(PLClassifier(), datamodule=PLData())

    train_eval = _scalars(logger.log_dir, "reg/train_eval/loss")
    assert train_eval == pytest.approx([recorder.train_losses[e] for e in (0, 1)], rel=1e-5)
    gaps = _scalars(logger.log_dir, "reg/gap/loss")
    val = _scalars(logger.log_dir, "val_loss")
    assert gaps == pytest.approx([v - t for v, t in zip(val, train_eval, strict=True)], abs=1e-5)

    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    tensors = events.Tags()["tensors"]
    layout = events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    assert b"reg/train_eval/loss" in layout and b"reg/gap/loss" in layout
    assert any(tag.startswith("reg/diagnosis") for tag in tensors)  # the text card
    hparams = events.PluginTagToContent("hparams")
    assert b"reg/gap/loss" in hparams["_hparams_/experiment"]
    assert b"GeneralizationGapMonitor/subset_size" in hparams["_hparams_/session_start_info"]


# ---------------------------------------------------------------------------- WeightDecayExclusion
class GroupRecorder(pl.Callback):
    """The (lr, weight_decay) of every param group before every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[float, float]]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.steps.append([(g["lr"], g["weight_decay"]) for g in optimizer.param_groups])


@_cell("WeightDecayExclusion")
def test_weight_decay_exclusion_splits_and_groups_follow_the_lr(tmp_path: Path) -> None:
    groups = GroupRecorder()
    model = PLClassifier(weight_decay=0.01)
    trainer = pl_trainer(tmp_path, callbacks=[WeightDecayExclusion(), groups])
    trainer.fit(model, datamodule=PLData())

    optimizer = trainer.optimizers[0]
    names = {id(p): n for n, p in model.named_parameters()}
    split = [sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups]
    assert split[0] == ["net.0.weight", "net.3.weight"]
    assert sorted(split[1]) == ["net.0.bias", "net.1.bias", "net.1.weight", "net.3.bias"]
    per_epoch = len(groups.steps) // 2
    for step, seen in enumerate(groups.steps):
        lr = 0.1 * 0.5 ** (step // per_epoch)  # StepLR halves the lr every epoch
        assert [group_lr for group_lr, _ in seen] == pytest.approx([lr, lr]), step
        assert [decay for _, decay in seen] == [0.01, 0.0], step


# ---------------------------------------------------------------------- Mixup and LabelSmoothing
@_cell("Mixup")
def test_mixup_mixes_the_targets_and_logs_lambda(tmp_path: Path) -> None:
    model = PLClassifier()
    trainer = pl_trainer(tmp_path, max_epochs=1, callbacks=[Mixup(num_classes=CLASSES)])
    trainer.fit(model, datamodule=PLData())

    assert len(model.seen_targets) == 4
    for targets in model.seen_targets:
        assert targets.shape == (16, CLASSES) and targets.dtype.is_floating_point
        assert torch.allclose(targets.sum(1), torch.ones(16))
    mixed = torch.cat(model.seen_targets)
    assert bool((mixed.max(1).values < 1 - 1e-6).any())  # some rows are mixtures
    assert 0.0 < float(trainer.callback_metrics["reg/mixup/lambda"]) < 1.0


@_cell("LabelSmoothing")
def test_label_smoothing_smooths_the_training_targets(tmp_path: Path) -> None:
    model = PLClassifier()
    smoothing = LabelSmoothing(0.3, num_classes=CLASSES)
    pl_trainer(tmp_path, max_epochs=1, callbacks=[smoothing]).fit(model, datamodule=PLData())

    targets = torch.cat(model.seen_targets)
    assert targets.shape == (64, CLASSES)
    # (1 - 0.3) * one_hot + 0.3 / 3: one 0.8 and two 0.1 per row
    assert sorted(targets.unique().tolist()) == pytest.approx([0.1, 0.8])
    assert torch.equal((targets > 0.5).sum(1), torch.ones(64, dtype=torch.long))


# --------------------------------------------------------------------------------------------- SAM
class _FirstBatch(pl.Callback):
    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batch = [t.clone() for t in batch]


@_cell("SAM")
def test_sam_step_equals_a_direct_sam_step_and_batchnorm_counts_once(tmp_path: Path) -> None:
    from tests.test_sam import direct_perturbation

    model = PLClassifier(lr=0.1)
    reference = copy.deepcopy(model)
    recorder = _FirstBatch()
    trainer = pl_trainer(tmp_path, max_steps=1, limit_val_batches=0,
                         callbacks=[SharpnessAwareMinimization(rho=0.2), recorder])  # fmt: skip
    trainer.fit(model, datamodule=PLData())

    x, y = recorder.batch
    params = list(reference.parameters())
    grads = torch.autograd.grad(F.cross_entropy(reference(x), y), params)
    e = direct_perturbation([p.detach() for p in params], list(grads), 0.2, adaptive=False)
    with torch.no_grad():
        for p, d in zip(params, e, strict=True):
            p.add_(d)
    second = torch.autograd.grad(F.cross_entropy(reference(x), y), params)
    with torch.no_grad():
        for p, d, g in zip(params, e, second, strict=True):
            p.sub_(d).sub_(0.1 * g)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert int(model.net[1].num_batches_tracked) == 1  # the perturbed pass left no trace
    assert len(model.seen_targets) == 2  # training_step ran twice on the one batch


# ---------------------------------------------------------------------- MembershipInferenceAudit
@_cell("MembershipInferenceAudit")
def test_membership_audit_logs_the_attack_on_the_final_model(tmp_path: Path) -> None:
    data = PLData()
    model = PLClassifier()
    audit = MembershipInferenceAudit(subset_size=24, seed=3)
    trainer = pl_trainer(tmp_path, max_epochs=1, callbacks=[audit])
    trainer.fit(model, datamodule=data)

    members, nonmembers = subset_indices(64, 32, 24, 3)
    model.eval()
    with torch.no_grad():
        losses = [
            F.cross_entropy(model(ds.tensors[0][idx]), ds.tensors[1][idx], reduction="none")
            for ds, idx in ((data.train_set, members), (data.val_set, nonmembers))
        ]
    expected = loss_attack_metrics(*losses)
    for name in ("auc", "advantage"):
        logged = float(trainer.callback_metrics[f"reg/privacy/{name}"])
        assert logged == pytest.approx(expected[name], abs=1e-6), name


# ------------------------------------------------------------------------------ ProximalSparsity
@_cell("ProximalSparsity")
def test_proximal_sparsity_zeroes_weights_and_the_monitor_sees_them(tmp_path: Path) -> None:
    model = PLClassifier()
    callbacks = [ProximalSparsity(l1=0.5), RegularizationMonitor(sparsity_tolerance=0.0)]
    trainer = pl_trainer(tmp_path, max_epochs=1, callbacks=callbacks)
    trainer.fit(model, datamodule=PLData())

    weights = torch.cat([p.detach().flatten() for p in model.parameters() if p.ndim >= 2])
    zeros = float((weights == 0).float().mean())
    assert zeros > 0.2
    assert float(trainer.callback_metrics["reg/weights/sparsity"]) == pytest.approx(zeros)
    assert float(trainer.callback_metrics["reg/proximal/strength"]) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ stack
@_cell("stack")
def test_the_whole_stack_with_tensorboard_and_checkpoints(tmp_path: Path) -> None:
    es = EarlyStopping("scripted", patience=5)
    recorder = StateRecorder()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    callbacks = [
        es, WeightDecayExclusion(), Mixup(num_classes=CLASSES), GeneralizationGapMonitor(),
        RegularizationMonitor(), MembershipInferenceAudit(subset_size=16),
        ProximalSparsity(l1=1e-3), recorder,
        ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True),
    ]  # fmt: skip
    model = PLClassifier(scripted=[2.0, 0.5, 1.0], weight_decay=0.01)
    trainer = pl_trainer(
        tmp_path, max_epochs=3, callbacks=callbacks, logger=logger, enable_checkpointing=True
    )
    assert trainer.early_stopping_callback is es
    trainer.fit(model, datamodule=PLData())

    _assert_state_equal(model.state_dict(), recorder.states[1])
    metrics = trainer.callback_metrics
    for name in (
        "reg/early_stopping/best", "reg/gap/loss", "reg/weights/l1", "reg/mixup/lambda",
        "reg/privacy/auc", "reg/proximal/strength",
    ):  # fmt: skip
        assert name in metrics and math.isfinite(float(metrics[name])), name
    assert float(metrics["reg/early_stopping/best_epoch"]) == 1
    assert _scalars(logger.log_dir, "reg/weights/l1") == pytest.approx(
        [recorder.norms[e][0] for e in range(3)], rel=1e-5
    )
    checkpoint = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    _assert_state_equal(checkpoint[CHECKPOINT_KEY][es.state_key], recorder.states[1])


# ------------------------------------------------------- DDP: 2 processes, one ddp_spawn launch
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``ddp_spawn`` fit (gloo, 2 processes): EarlyStopping, the gap and the weight monitor."""
    root = tmp_path_factory.mktemp("pl_ddp")
    saved = dict(os.environ)
    try:
        model = PLClassifier(scripted=[1.0, 2.0])  # best epoch: 0
        data = PLData()
        es = EarlyStopping("scripted", patience=5)
        callbacks = [
            es, GeneralizationGapMonitor(subset_size=1000), RegularizationMonitor(),
            StateRecorder(str(root)),
        ]  # fmt: skip
        logger = CSVLogger(str(root), name="csv", version=0)
        trainer = pl_trainer(root, strategy="ddp_spawn", callbacks=callbacks, logger=logger)
        assert trainer.early_stopping_callback is es
        trainer.fit(model, datamodule=data)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if value not in ("", None):
                logged.setdefault(key, []).append(float(value))
    truth = json.loads((root / "truth.json").read_text())
    return {
        "model": model, "logged": logged, "truth": truth, "world_size": trainer.world_size,
        "states": torch.load(root / "states.pt", weights_only=True),
        "train_loss_final": train_set_loss(model, data),
    }  # fmt: skip


@pytest.mark.ddp
@_cell("RegularizationMonitor")
def test_ddp_regularization_monitor_logs_the_true_norms(ddp_run: dict[str, Any]) -> None:
    assert ddp_run["world_size"] == 2
    norms = ddp_run["truth"]["norms"]
    for i, tag in enumerate(("reg/weights/l1", "reg/weights/l2")):
        expected = [norms[str(e)][i] for e in (0, 1)]
        assert ddp_run["logged"][tag] == pytest.approx(expected, rel=1e-5), tag  # not 2x


@pytest.mark.ddp
@_cell("EarlyStopping")
def test_ddp_early_stopping_returns_the_best_weights(ddp_run: dict[str, Any]) -> None:
    states = ddp_run["states"]
    _assert_state_equal(ddp_run["model"].state_dict(), states[0])
    assert ddp_run["logged"]["reg/early_stopping/best_epoch"] == [0.0, 0.0]


@pytest.mark.ddp
@_cell("GeneralizationGapMonitor")
def test_ddp_gap_monitor_evaluates_the_whole_subset(ddp_run: dict[str, Any]) -> None:
    truth = ddp_run["truth"]["train_losses"]
    expected = [truth[str(e)] for e in (0, 1)]
    assert ddp_run["logged"]["reg/train_eval/loss"] == pytest.approx(expected, rel=1e-5)
    assert ddp_run["train_loss_final"] == pytest.approx(expected[0], rel=1e-5)  # restored
