"""Split-off no-decay groups follow their source group under any scheduler, through real fits.

Every optimizer step is recorded in the module's ``on_before_optimizer_step`` (the last hook before
the update reads the param groups). At every step, each ``<name>/no_decay`` group must hold exactly
the hyperparameters of its source group ``<name>`` (lr, momentum, betas, ``initial_lr``, ...), and
the source groups must follow the same schedule as in a run without the callback.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_reg import WeightDecayExclusion
from tests.helpers import BlobsDataModule, TinyClassifier, trainer_kwargs

OWN_KEYS = {"params", "param_names", "weight_decay", "name", "no_decay_of"}
STEPS_PER_EPOCH = 4  # 128 samples, batches of 32
EPOCHS = 3


class PerGroupWarmup:
    """A scheduler written the way many are outside torch (timm's, a user's own): it keeps one
    entry per param group it saw at construction and zips them with ``optimizer.param_groups``."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int = 4) -> None:
        self.optimizer = optimizer
        self.warmup = warmup
        self.base = [group["lr"] for group in optimizer.param_groups]
        self.t = 0
        self._apply()

    def _apply(self) -> None:
        scale = min(1.0, (self.t + 1) / self.warmup) * 0.5 ** (self.t // self.warmup)
        for group, base in zip(self.optimizer.param_groups, self.base):  # noqa: B905
            group["lr"] = base * scale

    def step(self) -> None:
        self.t += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "base": list(self.base)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.base = state["t"], list(state["base"])


def make_config(name: str, optimizer: torch.optim.Optimizer) -> Any:
    total = STEPS_PER_EPOCH * EPOCHS
    sched = torch.optim.lr_scheduler
    if name == "lambda":  # one lambda per group, different decay per group
        return sched.LambdaLR(optimizer, [lambda e: 0.5**e, lambda e: 0.8**e])
    if name == "plateau":  # an absolute threshold of 1 never "improves": halves every epoch
        plateau = sched.ReduceLROnPlateau(
            optimizer, factor=0.5, patience=0, threshold=1.0, threshold_mode="abs"
        )
        return {"scheduler": plateau, "monitor": "val_loss"}
    if name == "onecycle":  # cycles momentum (SGD) or beta1 (Adam) as well
        onecycle = sched.OneCycleLR(optimizer, max_lr=[0.1, 0.05], total_steps=total)
        return {"scheduler": onecycle, "interval": "step"}
    if name == "sequential":
        warm = sched.LinearLR(optimizer, start_factor=0.1, total_iters=3)
        cos = sched.CosineAnnealingLR(optimizer, T_max=total)
        both = sched.SequentialLR(optimizer, [warm, cos], milestones=[3])
        return {"scheduler": both, "interval": "step"}
    if name == "user":
        return {"scheduler": PerGroupWarmup(optimizer), "interval": "step"}
    if name == "timm-epoch":
        from timm.scheduler import CosineLRScheduler

        cosine = CosineLRScheduler(optimizer, t_initial=EPOCHS, warmup_t=2, warmup_lr_init=1e-4)
        return {"scheduler": cosine, "interval": "epoch"}
    if name == "timm-step":
        from timm.scheduler import CosineLRScheduler

        cosine = CosineLRScheduler(
            optimizer, t_initial=total, warmup_t=5, warmup_lr_init=1e-4, t_in_epochs=False
        )
        return {"scheduler": cosine, "interval": "step"}
    raise ValueError(name)


class Scheduled(pl.LightningModule):
    """Two named groups with different lrs; records every group's settings at every step."""

    def __init__(self, scheduler: str, optimizer: str = "adamw", manual: bool = False) -> None:
        super().__init__()
        self.scheduler_name, self.optimizer_name = scheduler, optimizer
        self.automatic_optimization = not manual
        self.body = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU())
        self.head = nn.Linear(32, 4)
        self.records: list[list[dict[str, Any]]] = []

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()  # the LightningOptimizer: Lightning's hooks run
        self.lr_schedulers().step()
        return None

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        groups = [
            {"params": self.body.parameters(), "lr": 0.02, "name": "body"},
            {"params": self.head.parameters(), "lr": 0.01, "name": "head"},
        ]
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9, weight_decay=1e-3)
        else:
            optimizer = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.05)
        return {"optimizer": optimizer, "lr_scheduler": make_config(self.scheduler_name, optimizer)}

    def lr_scheduler_step(self, scheduler, metric):
        if self.scheduler_name == "timm-epoch":
            scheduler.step(epoch=self.current_epoch + 1)
        elif self.scheduler_name == "timm-step":
            scheduler.step_update(num_updates=self.global_step)
        elif self.scheduler_name == "user":
            scheduler.step()
        else:
            super().lr_scheduler_step(scheduler, metric)

    def on_before_optimizer_step(self, optimizer):
        # the module's hook runs after every callback's: what the update will read
        self.records.append([
            {k: v for k, v in g.items() if k not in ("params", "param_names")}
            for g in optimizer.param_groups
        ])  # fmt: skip


def fit(tmp_path, model: Scheduled, callbacks=()) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=list(callbacks), max_epochs=EPOCHS))
    trainer.fit(model, datamodule=BlobsDataModule(n_train=128, batch_size=32))
    return trainer


def assert_split_groups_follow(
    records: list[list[dict[str, Any]]], steps: int = STEPS_PER_EPOCH * EPOCHS
) -> None:
    """At every step, each ``x/no_decay`` group equals group ``x`` on every shared setting."""
    assert len(records) == steps
    for step, groups in enumerate(records):
        by_name = {g["name"]: g for g in groups}
        split_off = [g for g in groups if g["name"].endswith("/no_decay")]
        assert len(split_off) == 2, [g["name"] for g in groups]
        for group in split_off:
            source = by_name[group["name"].removesuffix("/no_decay")]
            assert group["weight_decay"] == 0.0 and source["weight_decay"] > 0
            for key, value in source.items():
                if key not in OWN_KEYS:
                    assert group.get(key) == value, (step, group["name"], key)


def source_schedule(records: list[list[dict[str, Any]]]) -> list[dict[str, tuple]]:
    """Per step, ``{name: (lr, momentum, betas)}`` of the user's own groups."""
    return [
        {
            g["name"]: (g["lr"], g.get("momentum"), g.get("betas"))
            for g in groups
            if not g["name"].endswith("/no_decay")
        }
        for groups in records
    ]


def check(
    tmp_path, scheduler: str, optimizer: str = "adamw", manual: bool = False
) -> list[list[dict[str, Any]]]:
    baseline = Scheduled(scheduler, optimizer, manual)
    fit(tmp_path / "baseline", baseline)
    ours = Scheduled(scheduler, optimizer, manual)
    fit(tmp_path / "ours", ours, [WeightDecayExclusion(verbose=False)])
    assert_split_groups_follow(ours.records)
    # the user's groups get the same schedule as without the callback...
    got, want = source_schedule(ours.records), source_schedule(baseline.records)
    assert got == want
    # ...and the schedule really moved the lr (the test would be empty otherwise)
    assert len({step["body"][0] for step in want}) > 1
    return ours.records


@pytest.mark.parametrize("scheduler", ["lambda", "plateau", "sequential", "user"])
def test_split_groups_follow_their_source_under_torch_and_user_schedulers(tmp_path, scheduler):
    check(tmp_path, scheduler)


def test_momentum_follows_under_sgd_with_onecycle(tmp_path):
    records = check(tmp_path, "onecycle", optimizer="sgd")
    assert len({groups[-1]["momentum"] for groups in records}) > 2  # cycled, and followed


def test_adam_betas_follow_with_onecycle(tmp_path):
    records = check(tmp_path, "onecycle", optimizer="adamw")
    assert len({groups[-1]["betas"][0] for groups in records}) > 2  # beta1 cycled, and followed


@pytest.mark.parametrize("scheduler", ["timm-epoch", "timm-step"])
def test_split_groups_follow_timm_cosine_with_warmup(tmp_path, scheduler):
    pytest.importorskip("timm")
    records = check(tmp_path, scheduler)
    # past the warm-up, no group is left at warmup_lr_init (biases and norm gains would not train)
    assert not any(math.isclose(g["lr"], 1e-4) for g in records[-1])


def test_manual_optimization_through_the_lightning_optimizer(tmp_path):
    check(tmp_path, "user", manual=True)


def test_learning_rate_monitor_logs_the_followed_lr(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    pl.seed_everything(0, verbose=False)
    callbacks = [WeightDecayExclusion(verbose=False), LearningRateMonitor("step")]
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, callbacks=callbacks, max_epochs=EPOCHS, logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
    ))  # fmt: skip
    trainer.fit(Scheduled("user"), datamodule=BlobsDataModule(n_train=128, batch_size=32))
    lines = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    logged = [r for r in rows if r.get("lr-AdamW/body")]
    assert len(logged) == STEPS_PER_EPOCH * EPOCHS
    for row in logged:
        assert row["lr-AdamW/body/no_decay"] == row["lr-AdamW/body"]
        assert row["lr-AdamW/head/no_decay"] == row["lr-AdamW/head"]
    assert len({r["lr-AdamW/body"] for r in logged}) > 1


class DecaySchedule(pl.Callback):
    """A weight-decay schedule that writes every param group (as many hand-written ones do)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for group in trainer.optimizers[0].param_groups:
            group["weight_decay"] = 0.01 * (1 + trainer.global_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen.append([g["weight_decay"] for g in optimizer.param_groups])


def test_a_weight_decay_schedule_writing_every_group_never_decays_the_excluded_part(tmp_path):
    schedule = DecaySchedule()
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier(optimizer="adamw", weight_decay=0.05)
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, callbacks=[schedule, WeightDecayExclusion(verbose=False)], max_epochs=1,
    ))  # fmt: skip
    trainer.fit(model, datamodule=BlobsDataModule())
    assert schedule.seen and all(len(wd) == 2 for wd in schedule.seen)
    assert all(wd[0] > 0 and wd[1] == 0.0 for wd in schedule.seen)
