"""The functional core under WeightDecayExclusion: regrouping live optimizers and linked groups."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_reg import WeightDecayExclusion
from lightning_reg._optim import (
    GroupLink,
    extend_scheduler,
    follow_sources,
    link_groups,
    split_groups,
)
from lightning_reg.tensorboard import regularization_settings
from tests.helpers import BlobsDataModule, CountScalarReads, TinyClassifier, trainer_kwargs


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def _excluded(model: nn.Module) -> set[int]:
    return {id(p) for n, p in model.named_parameters() if p.ndim < 2}


def test_split_keeps_source_dicts_at_their_index_and_appends_marked_parts():
    model = _model()
    optimizer = torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "name": "a"},
            {"params": model[1].parameters(), "name": "norm", "weight_decay": 0.0},
            {"params": model[2].parameters(), "name": "b", "lr": 0.5},
        ],
        lr=0.1,
        weight_decay=0.05,
    )
    before = list(optimizer.param_groups)
    origin = split_groups(optimizer.param_groups, _excluded(model))
    groups = optimizer.param_groups
    assert origin == [0, 2]
    assert all(groups[i] is before[i] for i in range(3))  # same dicts, same indices
    assert [g["name"] for g in groups] == ["a", "norm", "b", "a/no_decay", "b/no_decay"]
    assert [g.get("no_decay_of") for g in groups] == [None, None, None, 0, 2]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.05, 0.0, 0.0]
    assert [g["lr"] for g in groups] == [0.1, 0.1, 0.5, 0.1, 0.5]
    assert groups[3]["params"] == [model[0].bias] and groups[0]["params"] == [model[0].weight]
    # idempotent
    assert split_groups(groups, _excluded(model)) == [] and len(groups) == 5


def test_a_group_of_excluded_parameters_only_gets_zero_decay_in_place():
    model = _model()
    optimizer = torch.optim.SGD(model[1].parameters(), lr=0.1, weight_decay=0.1)
    assert split_groups(optimizer.param_groups, _excluded(model)) == []
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0]


def test_param_names_are_split_with_their_params():
    model = _model()
    optimizer = torch.optim.AdamW(list(model.named_parameters()), lr=0.1, weight_decay=0.1)
    split_groups(optimizer.param_groups, _excluded(model))
    for group in optimizer.param_groups:
        named = dict(model.named_parameters())
        assert [named[n] for n in group["param_names"]] == group["params"]


def test_schedulers_get_an_entry_per_split_off_group():
    model = _model()
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}],
        lr=0.1,
        weight_decay=0.1,
    )
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, min_lr=[0.01, 0.02])
    lambdas = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda e: 1.0, lambda e: 0.5])
    sequential = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.ConstantLR(optimizer),
            torch.optim.lr_scheduler.StepLR(optimizer, 1),
        ],
        milestones=[1],
    )
    origin = split_groups(optimizer.param_groups, _excluded(model))
    for scheduler in (plateau, lambdas, sequential):
        extend_scheduler(scheduler, optimizer, origin, old_count=2)
    assert plateau.min_lrs == [0.01, 0.02, 0.01, 0.02]
    assert lambdas.base_lrs == [0.1, 0.5, 0.1, 0.5] and len(lambdas.lr_lambdas) == 4
    assert all(len(s.base_lrs) == 4 for s in sequential._schedulers)
    plateau.step(1.0)
    plateau.step(2.0)  # reduces every group without running out of per-group entries
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 0.02, 0.01, 0.02]  # min_lrs


def test_follow_sources_copies_every_shared_setting_and_shares_tensors():
    lr = torch.tensor(0.1)
    source = {"params": [1], "lr": lr, "betas": (0.9, 0.99), "weight_decay": 0.1, "name": "a"}
    target = {"params": [2], "lr": lr, "betas": (0.9, 0.99), "weight_decay": 0.0,
              "name": "a/no_decay", "no_decay_of": 0}  # fmt: skip
    links = link_groups([source, target])
    source["betas"], source["initial_lr"], source["lr"] = (0.8, 0.9), 0.1, torch.tensor(0.2)
    with CountScalarReads() as counter:
        follow_sources(links)
    assert counter.count == 0  # identity only: no tensor is read
    assert target["lr"] is source["lr"] and target["betas"] == (0.8, 0.9)
    assert target["initial_lr"] == 0.1
    assert target["params"] == [2] and target["weight_decay"] == 0.0
    assert target["name"] == "a/no_decay" and target["no_decay_of"] == 0


def test_a_change_to_the_split_off_group_alone_goes_back_to_its_source():
    source, target = {"lr": 0.1, "momentum": 0.9}, {"lr": 0.1, "momentum": 0.9}
    links = [GroupLink(source, target)]
    follow_sources(links)
    target["lr"] = 0.3  # e.g. BackboneFinetuning writing param_groups[-1]
    follow_sources(links)
    assert source["lr"] == target["lr"] == 0.3
    source["lr"], target["lr"] = 0.5, 0.7  # both changed: the source wins
    follow_sources(links)
    assert target["lr"] == 0.5


@pytest.mark.parametrize("mark", [5, -1, "0", 1])
def test_a_mark_that_does_not_point_at_an_earlier_group_is_refused(mark):
    groups = [{"params": []}, {"params": [], "no_decay_of": mark}]
    with pytest.raises(ValueError, match="reordered"):
        link_groups(groups)


class _SettingsAt(pl.Callback):
    """Records ``regularization_settings`` in ``on_fit_start`` (listed before the exclusion, as
    the gap monitor's hparams are) and in ``on_train_start`` (after every split)."""

    def __init__(self) -> None:
        self.seen: dict[str, dict] = {}

    def on_fit_start(self, trainer, pl_module):
        self.seen["fit_start"] = regularization_settings(trainer)

    def on_train_start(self, trainer, pl_module):
        self.seen["train_start"] = regularization_settings(trainer)


def test_hparams_written_before_the_split_show_the_decay_actually_used(tmp_path):
    """Lightning logs hparams right after on_fit_start; a writer listed before the exclusion saw
    one decayed group (0.05) and no no-decay group, while training used both."""
    record = _SettingsAt()
    model = TinyClassifier(optimizer="adamw", weight_decay=0.05)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[
        record, WeightDecayExclusion(verbose=False)
    ]))  # fmt: skip
    trainer.fit(model, datamodule=BlobsDataModule())
    early, late = record.seen["fit_start"], record.seen["train_start"]
    assert early == late
    assert late["optimizer0/AdamW/pg0/weight_decay"] == 0.05
    assert late["optimizer0/AdamW/pg1/weight_decay"] == 0.0
    assert len(trainer.optimizers[0].param_groups) == 2  # the preview left the optimizer alone
