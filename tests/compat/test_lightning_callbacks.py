"""Compatibility matrix, Lightning's own callbacks beside ours: weight averaging (EMA, SWA),
ModelCheckpoint with ``trainer.test(ckpt_path="best")``, LearningRateMonitor, BackboneFinetuning
and the Tuner (``lr_find``, ``scale_batch_size``). Each cell is a real fit of a small CNN with
BatchNorm (``tests/compat/models.py``) whose results are checked, not just that nothing raised.
"""

from __future__ import annotations

import csv
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.tuner import Tuner
from torch import nn

from lightning_reg import (
    EarlyStopping,
    GeneralizationGapMonitor,
    MembershipInferenceAudit,
    Mixup,
    ProximalSparsity,
    RegularizationMonitor,
    WeightDecayExclusion,
)
from tests.compat import models
from tests.compat.models import CLASSES, Classifier, Probe, WorseLastEpoch
from tests.helpers import same_state, trainer_kwargs

EPOCHS = 3


def _model() -> Classifier:
    pl.seed_everything(0, verbose=False)
    return Classifier(models.small_cnn(), lr=0.01)


def _stack() -> list[pl.Callback]:
    return [
        EarlyStopping("val_loss", patience=10), WeightDecayExclusion(verbose=False),
        Mixup(1.0, label_smoothing=0.1, num_classes=CLASSES),
        GeneralizationGapMonitor(subset_size=64), RegularizationMonitor(),
        MembershipInferenceAudit(subset_size=64), ProximalSparsity(l1=1e-3),
    ]  # fmt: skip


def _early(callbacks: list[pl.Callback]) -> EarlyStopping:
    return next(cb for cb in callbacks if isinstance(cb, EarlyStopping))


class ValidatedWeights(pl.Callback):
    """Listed first: at the end of each validation epoch, while a weight-averaging callback listed
    after it still has its average swapped in, evaluates exactly the weights that were validated
    on the train and val sets."""

    def __init__(self, data: models.Data) -> None:
        self.data = data
        self.losses: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.losses.append((
                models.per_sample_losses(pl_module, self.data.train_set),
                models.per_sample_losses(pl_module, self.data.val_set),
            ))  # fmt: skip


# ---------------------------------------------------------------------------- weight averaging
@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fit of the stack beside ``EMAWeightAveraging``, shared by its cells."""
    data, callbacks = models.image_data(n=32), _stack()
    validated, probe, module = ValidatedWeights(data), Probe(), _model()
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path_factory.mktemp("ema"), max_epochs=EPOCHS,
        callbacks=[validated, probe, *callbacks, EMAWeightAveraging(decay=0.5), WorseLastEpoch()],
    ))  # fmt: skip
    trainer.fit(module, datamodule=data)
    return dict(data=data, early=_early(callbacks), validated=validated.losses,
                checks=probe.checks, module=module, trainer=trainer)  # fmt: skip


@pytest.mark.compat("EMAWeightAveraging", "EarlyStopping")
def test_ema_ends_with_the_average_of_the_best_check(ema_run):
    early, checks = ema_run["early"], ema_run["checks"]
    values = [c["metrics"]["val_loss"] for c in checks]
    best = min(range(EPOCHS), key=values.__getitem__)
    assert early.best_epoch == best < EPOCHS - 1
    score = float(models.per_sample_losses(ema_run["module"], ema_run["data"].val_set).mean())
    assert score == pytest.approx(float(early.best_score), rel=1e-5)
    for (_, val), check in zip(ema_run["validated"], checks, strict=True):  # the average scored
        assert check["metrics"]["val_loss"] == pytest.approx(float(val.mean()), rel=1e-5)


@pytest.mark.compat("EMAWeightAveraging", "GeneralizationGapMonitor")
def test_ema_gap_pass_evaluates_the_validated_average(ema_run):
    for (train, _), check in zip(ema_run["validated"], ema_run["checks"], strict=True):
        train_eval = check["metrics"]["reg/train_eval/loss"]
        assert train_eval == pytest.approx(float(train.mean()), rel=1e-5)


@pytest.mark.compat("EMAWeightAveraging", "MembershipInferenceAudit")
def test_ema_audit_attacks_the_validated_average(ema_run):
    for (train, val), check in zip(ema_run["validated"], ema_run["checks"], strict=True):
        assert check["metrics"]["reg/privacy/auc"] == pytest.approx(
            models.auc(train, val), abs=1e-6
        )


@pytest.mark.compat("EMAWeightAveraging", "stack")
def test_ema_stack_trains_with_finite_losses(ema_run):
    assert torch.isfinite(ema_run["trainer"].callback_metrics["train_loss"])
    assert all(torch.isfinite(p).all() for p in ema_run["module"].parameters())


@pytest.mark.compat("StochasticWeightAveraging", "EarlyStopping")
def test_swa_the_best_validated_weights_win_with_a_warning(tmp_path):
    data, early, probe = models.image_data(n=32), EarlyStopping("val_loss", patience=10), Probe()
    module = _model()
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, max_epochs=EPOCHS,
        callbacks=[probe, early, StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)],
    ))  # fmt: skip
    with pytest.warns(UserWarning, match="StochasticWeightAveraging"):
        trainer.fit(module, datamodule=data)
    values = [c["metrics"]["val_loss"] for c in probe.checks]
    best = min(range(EPOCHS), key=values.__getitem__)
    assert early.best_epoch == best
    assert same_state(module.state_dict(), probe.checks[best]["state"])
    score = float(models.per_sample_losses(module, data.val_set).mean())
    assert score == pytest.approx(values[best], rel=1e-5)


# -------------------------------------------------------------------------------- checkpoints
class _TestStep(Classifier):
    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = models.split(batch)
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))


@pytest.mark.compat("ModelCheckpoint + test(ckpt_path='best')", "EarlyStopping")
def test_best_checkpoint_holds_the_weights_early_stopping_restores(tmp_path):
    data, early = models.image_data(n=32), EarlyStopping("val_loss", patience=10)
    pl.seed_everything(0, verbose=False)
    module = _TestStep(models.small_cnn(), lr=0.01)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val_loss", save_top_k=1)
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, max_epochs=EPOCHS, enable_checkpointing=True,
        callbacks=[early, checkpoint, WorseLastEpoch()],
    ))  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert early.best_epoch < EPOCHS - 1
    assert float(checkpoint.best_model_score) == float(early.best_score)
    saved = torch.load(checkpoint.best_model_path, weights_only=True)
    assert same_state(saved["state_dict"], module.state_dict())
    data.test_dataloader = data.val_dataloader  # type: ignore[method-assign]
    result = trainer.test(module, datamodule=data, ckpt_path="best", verbose=False)
    assert result[0]["test_loss"] == pytest.approx(float(early.best_score), rel=1e-5)


# ----------------------------------------------------------------------------- optimizer side
@pytest.mark.compat("LearningRateMonitor", "WeightDecayExclusion")
def test_learning_rate_monitor_logs_the_no_decay_groups_lr(tmp_path):
    data, module = models.image_data(n=32), _model()
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, max_epochs=2, logger=CSVLogger(tmp_path), log_every_n_steps=1,
        callbacks=[WeightDecayExclusion(verbose=False), LearningRateMonitor("step")],
    ))  # fmt: skip
    trainer.fit(module, datamodule=data)
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("lr-AdamW/pg1")]
    assert len(rows) == 2 * 4  # every step of both epochs
    for row in rows:
        assert row["lr-AdamW/pg2"] == row["lr-AdamW/pg1"]  # the no-decay group, appended
    assert [float(r["lr-AdamW/pg1"]) for r in rows[::4]] == pytest.approx([0.01, 0.005])


class _Finetuned(Classifier):
    """``backbone`` frozen by ``BackboneFinetuning`` until epoch 1, then added as a new group."""

    def __init__(self) -> None:
        super().__init__(models.small_cnn(), lr=0.01)
        self.backbone, self.head = self.net[:5], self.net[5]

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.05)


@pytest.mark.compat("BackboneFinetuning", "WeightDecayExclusion")
def test_backbone_finetuning_groups_are_split_when_unfrozen(tmp_path):
    pl.seed_everything(0, verbose=False)
    module, data, probe = _Finetuned(), models.image_data(n=32), Probe()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.1)
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, max_epochs=2, callbacks=[finetuning, WeightDecayExclusion(verbose=False), probe],
    ))  # fmt: skip
    trainer.fit(module, datamodule=data)
    names = {id(p): n for n, p in module.named_parameters()}
    groups = [
        (g["weight_decay"], g["lr"], {names[id(p)] for p in g["params"]})
        for g in trainer.optimizers[0].param_groups
    ]
    # the head's no-decay part appended at fit start, the backbone's when it was unfrozen
    # (BackboneFinetuning freezes with train_bn=True: the BatchNorm is in the first group)
    assert [(wd, ps) for wd, _, ps in groups] == [
        (0.05, {"net.5.weight"}), (0.0, {"net.5.bias", "net.1.weight", "net.1.bias"}),
        (0.05, {"net.0.weight"}), (0.0, {"net.0.bias"}),
    ]  # fmt: skip
    assert groups[3][1] == groups[2][1] != groups[0][1]  # the backbone's no-decay part follows
    assert all(len(step) == 2 and step[1] == step[0] for step in probe.lrs[:4])
    assert all(len(step) == 4 and step[3] == step[2] for step in probe.lrs[4:])


# ---------------------------------------------------------------------------------- the tuner
def _tuned_then_plain(tmp_path: Any, tune: Any, batch_size: int = 8) -> tuple[Any, Any]:
    """The same fit twice: after tuning with our callbacks attached, and with fresh callbacks
    and the tuned value set by hand. Our callbacks must keep nothing from the trial fits."""
    results = []
    value = None
    for label in ("tuned", "plain"):
        module, data, callbacks = _model(), models.image_data(n=32, batch_size=batch_size), _stack()
        trainer = pl.Trainer(**trainer_kwargs(
            tmp_path / label, max_epochs=2, callbacks=[*callbacks, WorseLastEpoch()],
        ))  # fmt: skip
        if value is None:
            value = tune(Tuner(trainer), module, data)
        else:
            module.lr, data.batch_size = value
        trainer.fit(module, datamodule=data)
        results.append((module, trainer, callbacks))
    return results[0], results[1]


def _assert_same_fit(tuned: Any, plain: Any) -> None:
    (m1, t1, c1), (m2, t2, c2) = tuned, plain
    assert same_state(m1.state_dict(), m2.state_dict())
    assert _early(c1).best_epoch == _early(c2).best_epoch
    assert float(_early(c1).best_score) == float(_early(c2).best_score)
    mix1, mix2 = (next(cb for cb in c if isinstance(cb, Mixup)) for c in (c1, c2))
    assert mix1.batches_seen == mix2.batches_seen
    for key in ("reg/train_eval/loss", "reg/privacy/auc", "reg/weights/l2"):
        assert float(t1.callback_metrics[key]) == float(t2.callback_metrics[key]), key
    assert len(t1.optimizers[0].param_groups) == len(t2.optimizers[0].param_groups) == 2


@pytest.mark.compat("Tuner.lr_find", "stack")
def test_lr_find_leaves_a_clean_fit(tmp_path):
    def tune(tuner: Tuner, module: Classifier, data: models.Data) -> tuple[float, int]:
        tuner.lr_find(module, datamodule=data, num_training=24, min_lr=1e-4, max_lr=0.1,
                      early_stop_threshold=None)  # fmt: skip
        assert module.lr != 0.01  # the suggestion was set
        return module.lr, data.batch_size

    _assert_same_fit(*_tuned_then_plain(tmp_path, tune, batch_size=2))  # 32 steps to try


@pytest.mark.compat("Tuner.scale_batch_size", "stack")
def test_scale_batch_size_leaves_a_clean_fit(tmp_path):
    def tune(tuner: Tuner, module: Classifier, data: models.Data) -> tuple[float, int]:
        tuner.scale_batch_size(module, datamodule=data, steps_per_trial=1, init_val=2,
                               max_trials=2)  # fmt: skip
        assert data.batch_size == 4  # 2, then 4 (two trials)
        return module.lr, data.batch_size

    _assert_same_fit(*_tuned_then_plain(tmp_path, tune))
