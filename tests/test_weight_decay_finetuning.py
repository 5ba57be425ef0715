"""WeightDecayExclusion with Lightning's BackboneFinetuning, resumed runs and reused callbacks.

BackboneFinetuning unfreezes ``pl_module.backbone`` with ``optimizer.add_param_group`` at an epoch
start, then raises its lr each epoch by writing ``optimizer.param_groups[-1]["lr"]``; it stores the
group layout in its own state and puts it back at fit start when resuming.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, ModelCheckpoint

from lightning_reg import WeightDecayExclusion
from tests.helpers import BlobsDataModule, CrashAt, TinyClassifier, same_state, trainer_kwargs
from tests.test_weight_decay import DecayProbe

UNFREEZE = 1


class Recorded(DecayProbe):
    """Records ``(source mark, weight_decay, lr, number of params)`` of each group at each step."""

    def __init__(self) -> None:
        super().__init__("adamw")
        self.records: list[list[tuple]] = []

    def on_before_optimizer_step(self, optimizer):
        self.records.append([
            (g.get("no_decay_of"), g["weight_decay"], g["lr"], len(g["params"]))
            for g in optimizer.param_groups
        ])  # fmt: skip


class ResumableBackboneFinetuning(BackboneFinetuning):
    """Lightning's BackboneFinetuning, plus the unfreeze it skips on resume.

    On resume its ``setup`` freezes the backbone again and ``on_fit_start`` restores the backbone's
    param group, but nothing sets ``requires_grad`` back (Lightning 2.6): the backbone would stay
    frozen, with or without WeightDecayExclusion.
    """

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch > self.unfreeze_backbone_at_epoch:
            self.make_trainable(pl_module.backbone)
        super().finetune_function(pl_module, epoch, optimizer)


def finetuning() -> BackboneFinetuning:
    return ResumableBackboneFinetuning(
        unfreeze_backbone_at_epoch=UNFREEZE, backbone_initial_ratio_lr=0.1
    )


def run(root, callbacks, max_epochs=4, crash_at=None, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    model = Recorded()
    callbacks = [*callbacks, ModelCheckpoint(dirpath=root / "ck", save_last=True)]
    callbacks += [CrashAt(crash_at)] if crash_at is not None else []
    trainer = pl.Trainer(**trainer_kwargs(
        root, callbacks=callbacks, max_epochs=max_epochs, enable_checkpointing=True
    ))  # fmt: skip
    dm = BlobsDataModule(n_train=128, shuffle=False)
    if crash_at is None:
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    else:
        with pytest.raises(RuntimeError, match="simulated crash"):
            trainer.fit(model, datamodule=dm)
    return model, trainer


def test_unfrozen_backbone_group_is_split_and_follows_backbone_finetuning_lr(tmp_path, caplog):
    baseline, _ = run(tmp_path / "baseline", [finetuning()])
    callback = WeightDecayExclusion()
    with caplog.at_level(logging.INFO):
        ours, _ = run(tmp_path / "ours", [finetuning(), callback])
    steps = len(baseline.records)
    assert len(ours.records) == steps
    for want, got in zip(baseline.records, ours.records, strict=True):
        if len(want) == 1:  # before the unfreeze
            assert len(got) == 2 and got[1][2] == got[0][2] == want[0][2]
            continue
        head_lr, backbone_lr = want[0][2], want[1][2]
        assert [g[2] for g in got] == [head_lr, head_lr, backbone_lr, backbone_lr]
    backbone_lrs = [r[1][2] for r in baseline.records if len(r) == 2]
    assert len(set(backbone_lrs)) > 1  # BackboneFinetuning did raise the backbone's lr
    # layout: head+probes | its no-decay part | backbone weight | backbone bias + LayerNorm
    assert [r[:2] for r in ours.records[-1]] == [(None, 0.1), (0, 0.0), (None, 0.1), (2, 0.0)]
    assert [r[3] for r in ours.records[-1]] == [2, 4, 1, 3]
    assert (
        "optimizer 0: split a param group added during training: decayed 1 tensors" in caplog.text
    )
    split = callback.splits[0]  # the summary counts the backbone now
    assert {n for n, _ in split.no_decay} >= {"backbone.0.bias", "backbone.1.weight"}


def test_resume_after_the_unfreeze_is_bitwise_identical(tmp_path):
    full, _ = run(tmp_path / "full", [finetuning(), WeightDecayExclusion()])
    run(tmp_path / "part", [finetuning(), WeightDecayExclusion()], crash_at=3)
    checkpoint = tmp_path / "part" / "ck" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=True)["optimizer_states"][0]["param_groups"]
    assert [g.get("no_decay_of") for g in saved] == [None, 0, None, 2]
    resumed, _ = run(tmp_path / "resumed", [finetuning(), WeightDecayExclusion()],
                     ckpt_path=checkpoint)  # fmt: skip
    assert same_state(full.state_dict(), resumed.state_dict())
    assert resumed.records == full.records[-len(resumed.records) :]


def test_resume_with_backbone_finetuning_listed_after_is_refused(tmp_path):
    run(tmp_path / "part", [WeightDecayExclusion(), finetuning()], crash_at=3)
    checkpoint = tmp_path / "part" / "ck" / "last.ckpt"
    with pytest.raises(
        RuntimeError, match="BackboneFinetuning is listed after WeightDecayExclusion"
    ):
        run(tmp_path / "resumed", [WeightDecayExclusion(), finetuning()], ckpt_path=checkpoint)


def test_resume_before_the_unfreeze_works_in_either_order(tmp_path):
    order = [WeightDecayExclusion(), finetuning()]
    full, _ = run(tmp_path / "full", order)
    run(tmp_path / "part", [WeightDecayExclusion(), finetuning()], crash_at=UNFREEZE)
    checkpoint = tmp_path / "part" / "ck" / "last.ckpt"
    resumed, _ = run(tmp_path / "resumed", [WeightDecayExclusion(), finetuning()],
                     ckpt_path=checkpoint)  # fmt: skip
    assert same_state(full.state_dict(), resumed.state_dict())


def test_resuming_a_run_written_without_the_callback_is_refused(tmp_path):
    run(tmp_path / "part", [], crash_at=2)
    checkpoint = tmp_path / "part" / "ck" / "last.ckpt"
    with pytest.raises(RuntimeError, match="a run without WeightDecayExclusion cannot be resumed"):
        run(tmp_path / "resumed", [WeightDecayExclusion()], ckpt_path=checkpoint)


def test_a_reused_callback_splits_the_next_fits_optimizer(tmp_path):
    callback = WeightDecayExclusion(verbose=False)
    first, _ = run(tmp_path / "first", [callback], max_epochs=1)
    assert callback.splits[0].counts()["no_decay"][0] == 7
    pl.seed_everything(0, verbose=False)
    second = TinyClassifier(batchnorm=True, optimizer="adamw", weight_decay=0.05)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "second", callbacks=[callback], max_epochs=1))
    trainer.fit(second, datamodule=BlobsDataModule(n_train=64))
    groups = trainer.optimizers[0].param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(2, 0.05), (4, 0.0)]
    assert len(callback.splits) == 1
    assert {n for n, _ in callback.splits[0].no_decay} == {
        "net.0.bias", "net.1.weight", "net.1.bias", "net.4.bias"
    }  # fmt: skip
    assert all(p is not q for p in first.parameters() for _, q in callback.splits[0].decay)
