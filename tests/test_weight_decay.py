"""WeightDecayExclusion through real ``Trainer.fit`` runs: decay, schedulers, resume, fine-tuning.

The pure split (rules, property tests, architectures) is tested in ``test_weight_decay_split.py``.
"""

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_reg import RegularizedModule, WeightDecayExclusion
from tests.helpers import BlobsDataModule, CrashAt, same_state, trainer_kwargs


class DecayProbe(RegularizedModule, pl.LightningModule):
    """A small classifier plus probe parameters whose gradient is exactly zero at every step.

    With a zero gradient, AdamW and SGD move a parameter only through weight decay: a probe
    shrinks if and only if it is decayed.
    """

    def __init__(self, optimizer: str = "adamw", scheduler: str | None = None, lr: float = 0.05,
                 weight_decay: float = 0.1, grouped: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.optimizer_name, self.scheduler, self.lr, self.wd = (
            optimizer,
            scheduler,
            lr,
            weight_decay,
        )
        self.grouped = grouped
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU())
        self.head = nn.Linear(32, 4)
        self.probe_weight = nn.Parameter(torch.ones(3, 3))
        self.probe_gain = nn.Parameter(torch.ones(3))  # 1-d: excluded by the "1d" rule
        self.probe_norm = nn.LayerNorm(3)  # weight 1, bias 0: excluded by the "norm" rule
        with torch.no_grad():
            self.probe_norm.bias.fill_(1.0)

    def forward(self, x):
        return self.head(self.backbone(x))

    def _probes(self):
        return [self.probe_weight, self.probe_gain, self.probe_norm.weight, self.probe_norm.bias]

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss + 0.0 * sum(p.sum() for p in self._probes())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        if self.grouped:  # two named groups with their own lr
            probes = self._probes()
            params = [
                {"params": self.backbone.parameters(), "lr": self.lr, "name": "backbone"},
                {"params": [*self.head.parameters(), *probes], "lr": self.lr / 2, "name": "head"},
            ]
        else:  # frozen parameters stay out, as BaseFinetuning expects
            params = [p for p in self.parameters() if p.requires_grad]
        cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "adam": torch.optim.Adam}
        optimizer = cls[self.optimizer_name](params, lr=self.lr, weight_decay=self.wd)
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": make_scheduler(self.scheduler, optimizer)}


def make_scheduler(name, optimizer):
    n = len(optimizer.param_groups)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    if name == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=40)
        return {"scheduler": sched, "interval": "step"}
    if name == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(  # abs threshold 1: never "improves"
            optimizer, factor=0.5, patience=0, threshold=1.0, threshold_mode="abs"
        )
        return {"scheduler": sched, "monitor": "val_loss"}
    if name == "lambda":  # one lambda per original group
        lambdas = [(lambda e, i=i: 0.9 ** (e * (i + 1))) for i in range(n)]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    if name == "sequential":
        warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=2)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cos], milestones=[2])
    raise ValueError(name)


class LrRecorder(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def fit(tmp_path, model, callbacks=(), max_epochs=3, dm=None, **overrides):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=list(callbacks),
                                          max_epochs=max_epochs, **overrides))  # fmt: skip
    trainer.fit(model, datamodule=dm or BlobsDataModule(n_train=128))
    return trainer


def probe_values(model):
    return {
        "weight": model.probe_weight.detach().clone(),
        "gain": model.probe_gain.detach().clone(),
        "norm.weight": model.probe_norm.weight.detach().clone(),
        "norm.bias": model.probe_norm.bias.detach().clone(),
    }


# --------------------------------------------------------------------------- decay really applies
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_only_decayed_parameters_shrink(tmp_path, optimizer):
    model = DecayProbe(optimizer)
    fit(tmp_path, model, [WeightDecayExclusion()])
    probes = probe_values(model)
    assert (probes["weight"] < 1.0).all()  # decayed
    assert torch.equal(probes["gain"], torch.ones(3))  # excluded: untouched
    assert torch.equal(probes["norm.weight"], torch.ones(3))
    assert torch.equal(probes["norm.bias"], torch.ones(3))


def test_without_the_callback_everything_shrinks(tmp_path):
    model = DecayProbe("adamw")
    fit(tmp_path, model)
    assert all((v < 1.0).all() for v in probe_values(model).values())


def test_split_keeps_group_hyperparameters_and_names(tmp_path, caplog):
    model = DecayProbe("adamw", grouped=True)
    callback = WeightDecayExclusion()
    with caplog.at_level(logging.INFO):
        trainer = fit(tmp_path, model, [callback, LearningRateMonitor()], max_epochs=1,
                      logger=CSVLogger(tmp_path))  # fmt: skip
    groups = trainer.optimizers[0].param_groups
    # the user's groups keep their indices; their no-decay parts are appended, marked
    assert [g["name"] for g in groups] == ["backbone", "head", "backbone/no_decay", "head/no_decay"]
    assert [g.get("no_decay_of") for g in groups] == [None, None, 0, 1]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1, 0.0, 0.0]
    assert [g["lr"] for g in groups] == [0.05, 0.025, 0.05, 0.025]
    assert all(g["betas"] == (0.9, 0.999) for g in groups)
    # tensors: backbone linear weight; head weight + probe | its bias + LayerNorm; the rest
    assert [len(g["params"]) for g in groups] == [1, 2, 3, 4]
    metrics = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "lr-AdamW/backbone/no_decay" in metrics and "lr-AdamW/head" in metrics
    # summary printed, numbers available programmatically
    assert "WeightDecayExclusion, optimizer 0 (AdamW): decayed 3 tensors" in caplog.text
    counts = callback.splits[0].counts()
    assert counts["decay"][0] == 3 and counts["no_decay"][0] == 7
    assert counts["norm"][0] == 4 and counts["bias"][0] == 2 and counts["1d"][0] == 1


def test_coupled_l2_warning_points_to_adamw(tmp_path):
    with pytest.warns(UserWarning, match="torch.optim.AdamW"):
        fit(tmp_path, DecayProbe("adam"), [WeightDecayExclusion()], max_epochs=1)


def test_two_callbacks_are_refused(tmp_path):
    with pytest.raises(RuntimeError, match="keep one"):
        fit(tmp_path, DecayProbe(), [WeightDecayExclusion(), WeightDecayExclusion()])


class RecordsOptimizer(DecayProbe):
    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        self.built = (optimizer, set(vars(optimizer)))
        return optimizer


@pytest.mark.parametrize("crash", [False, True], ids=["fit", "fit-raises"])
def test_module_and_optimizer_are_left_as_they_were(tmp_path, crash):
    model = RecordsOptimizer()
    callback = WeightDecayExclusion()
    callbacks = [callback, *([CrashAt(1)] if crash else [])]
    if crash:
        with pytest.raises(RuntimeError, match="simulated crash"):
            fit(tmp_path, model, callbacks, max_epochs=2)
    else:
        fit(tmp_path, model, callbacks, max_epochs=2)
    optimizer, attributes = model.built
    assert set(vars(optimizer)) == attributes  # no method replaced, nothing added
    assert "configure_optimizers" not in vars(model)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # it was split
    assert callback._layouts == []  # the callback keeps no optimizer after fit


def test_mixin_groups_and_callback_are_idempotent(tmp_path):
    class Mixed(DecayProbe):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.weight_decay_groups(0.1), lr=0.05)

    model = Mixed()
    trainer = fit(tmp_path, model, [WeightDecayExclusion()])
    assert [g["weight_decay"] for g in trainer.optimizers[0].param_groups] == [0.1, 0.0]
    probes = probe_values(model)
    assert (probes["weight"] < 1).all() and torch.equal(probes["gain"], torch.ones(3))


# ------------------------------------------------------------------------------------ schedulers
@pytest.mark.parametrize("scheduler", ["step", "onecycle", "plateau", "lambda", "sequential"])
@pytest.mark.parametrize("grouped", [False, True], ids=["one-group", "two-groups"])
def test_schedulers_drive_split_groups_like_their_origin(tmp_path, scheduler, grouped):
    baseline, ours = LrRecorder(), LrRecorder()
    fit(tmp_path / "a", DecayProbe(scheduler=scheduler, grouped=grouped), [baseline], max_epochs=4)
    fit(tmp_path / "b", DecayProbe(scheduler=scheduler, grouped=grouped),
        [WeightDecayExclusion(), ours], max_epochs=4)  # fmt: skip
    origin = [0, 1, 0, 1] if grouped else [0, 0]
    expected = [[epoch[i] for i in origin] for epoch in baseline.lrs]
    assert len(ours.lrs) == len(expected)
    for got, want in zip(ours.lrs, expected, strict=True):
        assert got == pytest.approx(want)
    assert len({tuple(e) for e in baseline.lrs}) > 1  # the scheduler did change the lr


# -------------------------------------------------------------------------------------- resuming
def _resume_run(root, crash_at=None, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    model = DecayProbe("adamw", scheduler="step")
    callbacks = [WeightDecayExclusion(), ModelCheckpoint(dirpath=root / "ck", save_last=True)]
    callbacks += [CrashAt(crash_at)] if crash_at is not None else []
    trainer = pl.Trainer(**trainer_kwargs(root, callbacks=callbacks, max_epochs=5,
                                          enable_checkpointing=True))  # fmt: skip
    dm = BlobsDataModule(n_train=128, shuffle=False)
    if crash_at is None:
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    else:
        with pytest.raises(RuntimeError):
            trainer.fit(model, datamodule=dm)
    return model, trainer


def test_resume_puts_optimizer_state_back_on_the_same_parameters(tmp_path):
    full, full_trainer = _resume_run(tmp_path / "full")
    _resume_run(tmp_path / "part", crash_at=3)
    saved = torch.load(tmp_path / "part" / "ck" / "last.ckpt", weights_only=True)
    assert len(saved["optimizer_states"][0]["param_groups"]) == 2
    resumed, resumed_trainer = _resume_run(
        tmp_path / "resumed", ckpt_path=tmp_path / "part" / "ck" / "last.ckpt"
    )
    assert same_state(resumed.state_dict(), full.state_dict())
    opt_full, opt_resumed = full_trainer.optimizers[0], resumed_trainer.optimizers[0]
    for p_full, p_resumed in zip(full.parameters(), resumed.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_full.state[p_full][key], opt_resumed.state[p_resumed][key])


# ----------------------------------------------------------------------------------- fine-tuning
class UnfreezeBackboneAt(BaseFinetuning):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.backbone, train_bn=False)

    def finetune_function(self, pl_module, current_epoch, optimizer):
        if current_epoch == self.epoch:
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, lr=0.01)


def test_groups_added_by_base_finetuning_are_split(tmp_path):
    model = DecayProbe("adamw")
    trainer = fit(tmp_path, model, [UnfreezeBackboneAt(1), WeightDecayExclusion()], max_epochs=2)
    groups = trainer.optimizers[0].param_groups
    added = groups[2:]
    assert [g["weight_decay"] for g in added] == [0.1, 0.0]
    assert added[0]["params"] == [model.backbone[0].weight]
    assert {id(p) for p in added[1]["params"]} == {
        id(model.backbone[0].bias),
        id(model.backbone[1].weight),
        id(model.backbone[1].bias),
    }
    assert all(g["lr"] == 0.01 for g in added)


class ForeignTensors(DecayProbe):
    """An optimizer over copies of the parameters, as after a strategy flattened them."""

    def __init__(self, all_foreign: bool) -> None:
        super().__init__("adamw")
        self.all_foreign = all_foreign

    def configure_optimizers(self):
        copies = [nn.Parameter(p.detach().clone()) for p in self.parameters()]
        own = [] if self.all_foreign else list(self.parameters())
        return torch.optim.AdamW([*own, *copies[:1]], lr=0.01, weight_decay=0.1)


def test_optimizer_over_tensors_the_module_does_not_own_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match=r"none of them is.*lightning_reg\.param_groups"):
        fit(tmp_path, ForeignTensors(all_foreign=True), [WeightDecayExclusion()], max_epochs=1)
    with pytest.warns(UserWarning, match=r"1 of the 11 decayed tensors .* keep the decay"):
        fit(tmp_path, ForeignTensors(all_foreign=False), [WeightDecayExclusion()], max_epochs=1)


def test_fsdp1_on_several_ranks_is_refused_and_one_rank_or_fsdp2_is_not():
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from lightning_reg.weight_decay_exclusion import refuse_sharded_flat_views

    with pytest.raises(RuntimeError, match=r"1-d shards.*ModelParallelStrategy"):
        refuse_sharded_flat_views(FSDPStrategy(), world_size=2)
    refuse_sharded_flat_views(FSDPStrategy(), world_size=1)
    refuse_sharded_flat_views(ModelParallelStrategy(), world_size=2)
