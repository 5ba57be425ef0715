"""Compatibility matrix, loop rows: mid-epoch validation, validation every other epoch, several
validation dataloaders, an iterable training set, ``fast_dev_run``, ``max_time`` and a second
``fit`` with the same callback objects.

As in the precision rows, one fit of the stack per row is shared by the row's cells.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Timer
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_reg import (
    EarlyStopping,
    GeneralizationGapMonitor,
    MembershipInferenceAudit,
    WeightDecayExclusion,
)
from tests.compat.test_precision_and_optimization import (
    CHECKS,
    Fits,
    Net,
    Run,
    best_check,
    cells,
    check_soft_targets,
    fit_stack,
    same_state,
    stack,
    step_decay,
)
from tests.helpers import BlobsDataModule, trainer_kwargs

pytestmark = pytest.mark.filterwarnings("ignore:Attribute 'scheduler' removed from hparams")


class TwoValLoaders(BlobsDataModule):
    """The validation set, and its first half as a second validation dataloader."""

    def val_dataloader(self) -> list[DataLoader]:  # type: ignore[override]
        half = TensorDataset(*(t[: len(t) // 2] for t in self.val_set.tensors))
        return [super().val_dataloader(), DataLoader(half, batch_size=self.batch_size)]


class Stream(IterableDataset):
    """A map-style dataset served as a stream (no ``__len__``, no ``__getitem__``)."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return (self.data[i] for i in range(len(self.data)))


class StreamedBlobs(BlobsDataModule):
    """Blobs whose training set is an ``IterableDataset``; ``train_set`` stays for the checks."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Stream(self.train_set), batch_size=self.batch_size)


class Slow(pl.Callback):
    """Sleeps ``seconds`` at the end of training epoch ``epoch`` (after its validation)."""

    def __init__(self, epoch: int, seconds: float) -> None:
        self.epoch, self.seconds = epoch, seconds

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            time.sleep(self.seconds)


def _mid_epoch(root: Any) -> Run:
    # checks at steps 4, 8, 12...: the best one (0.5) is mid-epoch, in epoch 1
    model = Net(script=(1.0, 0.9, 0.5, 0.8, 0.9, 0.95), script_by="check", scheduler=step_decay)
    run = fit_stack(root, model=model, val_check_interval=0.5)
    assert [c.step for c in run.probe.checks] == [4, 8, 12, 16, 20, 24]
    assert best_check(run).step == 12
    return run


def _every_other_epoch(root: Any) -> Run:
    model = Net(script=(0.5, 0.8), script_by="check", scheduler=step_decay)
    run = fit_stack(root, model=model, max_epochs=4, check_val_every_n_epoch=2)
    assert [c.epoch for c in run.probe.checks] == [1, 3]
    return run


def _two_val_loaders(root: Any) -> Run:
    callbacks = stack(EarlyStopping=EarlyStopping("val_loss/dataloader_idx_0", patience=6))
    return fit_stack(root, datamodule=TwoValLoaders(shuffle=False), callbacks=callbacks)


def _streamed(root: Any) -> Run:
    data = StreamedBlobs(shuffle=False)
    callbacks = stack(
        GeneralizationGapMonitor=GeneralizationGapMonitor(subset_size=256, dataset=data.train_set),
        MembershipInferenceAudit=MembershipInferenceAudit(
            subset_size=64, train_dataset=data.train_set
        ),
    )
    return fit_stack(root, datamodule=data, callbacks=callbacks)


def _fast_dev_run(root: Any) -> Run:
    callbacks = stack(EarlyStopping=EarlyStopping("val_loss", snapshot_to="disk"))
    run = fit_stack(root, callbacks=callbacks, fast_dev_run=True)
    assert run.trainer.global_step == 1
    return run


def _max_time(root: Any) -> Run:
    # Two epochs (two checks, the first the best) take well under 2 s; a pause at the end of the
    # second one runs out the time, so the limit stops training, never the script.
    callbacks = stack(EarlyStopping=EarlyStopping("val_loss", patience=100))
    callbacks["slow"] = Slow(epoch=1, seconds=2)
    run = fit_stack(
        root, model=Net(script=(0.5, 0.8, 0.9), scheduler=step_decay), callbacks=callbacks,
        max_epochs=50, max_time=timedelta(seconds=2),
    )  # fmt: skip
    timer = next(cb for cb in run.trainer.callbacks if isinstance(cb, Timer))  # type: ignore[attr-defined]
    assert timer.time_elapsed("train") >= 2 and run.trainer.current_epoch <= 3  # not 50
    assert len(run.probe.checks) >= 2
    return run


SECOND_SCRIPT = (1.2, 1.9, 1.6)  # the second fit's best check is its first, the first fit's 0.5


def _second_fit(root: Any) -> Run:
    first = fit_stack(root / "first")
    # same initial weights and data, another script: training is bitwise the same, only the
    # monitored value (and so the best check) differs
    second = fit_stack(
        root / "second", model=lambda: Net(script=SECOND_SCRIPT, scheduler=step_decay),
        callbacks=first.callbacks,
    )  # fmt: skip
    second.first = first  # type: ignore[attr-defined]
    return second


ROWS = {
    "val_check_interval=0.5": _mid_epoch,
    "check_val_every_n_epoch=2": _every_other_epoch,
    "two validation dataloaders": _two_val_loaders,
    "IterableDataset training set": _streamed,
    "fast_dev_run=True": _fast_dev_run,
    "max_time": _max_time,
    "second fit, same callbacks": _second_fit,
}


VALIDATION_COLUMNS = ("EarlyStopping", "GeneralizationGapMonitor", "MembershipInferenceAudit")


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> Fits:
    return Fits(tmp_path_factory.mktemp("loops"), ROWS)


@pytest.mark.parametrize(
    ("row", "column"),
    [
        *cells("val_check_interval=0.5", (*VALIDATION_COLUMNS, "stack")),
        *cells(
            "check_val_every_n_epoch=2", (*VALIDATION_COLUMNS, "RegularizationMonitor", "stack")
        ),
        *cells("two validation dataloaders", (*VALIDATION_COLUMNS, "stack")),
        *cells("IterableDataset training set", ("Mixup", "ProximalSparsity", "stack")),
        *cells("max_time", ("EarlyStopping", "stack")),
    ],
)
def test_cell(fits: Fits, row: str, column: str) -> None:
    CHECKS[column](fits(row))


# -------------------------------------------------------------------- iterable training set
def _refusal(tmp_path: Any, callback: pl.Callback) -> tuple[pl.Trainer, RuntimeError]:
    model, trainer = Net(), pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[callback]))
    with pytest.raises(RuntimeError) as error:
        trainer.fit(model, datamodule=StreamedBlobs())
    assert trainer.global_step == 0  # refused before the first step
    return trainer, error.value


@pytest.mark.compat(
    "IterableDataset training set", "GeneralizationGapMonitor",
    refused="no fixed subset of a stream: pass `dataset=` (works then)",
)  # fmt: skip
def test_iterable_training_set_needs_a_dataset_for_the_gap_monitor(tmp_path: Any) -> None:
    _, error = _refusal(tmp_path, GeneralizationGapMonitor(subset_size=64))
    message = str(error)
    assert "map-style" in message and "Stream" in message and "`dataset=`" in message


@pytest.mark.compat(
    "IterableDataset training set", "MembershipInferenceAudit",
    refused="no fixed subset of a stream: pass `train_dataset=` (works then)",
)  # fmt: skip
def test_iterable_training_set_needs_a_dataset_for_the_audit(tmp_path: Any) -> None:
    _, error = _refusal(tmp_path, MembershipInferenceAudit(subset_size=64))
    assert "train_dataset=" in str(error)


@pytest.mark.compat("IterableDataset training set", "GeneralizationGapMonitor")
def test_iterable_training_set_with_dataset_gap(fits: Fits) -> None:
    CHECKS["GeneralizationGapMonitor"](fits("IterableDataset training set"))


@pytest.mark.compat("IterableDataset training set", "MembershipInferenceAudit")
def test_iterable_training_set_with_dataset_audit(fits: Fits) -> None:
    CHECKS["MembershipInferenceAudit"](fits("IterableDataset training set"))


# ---------------------------------------------------------------------------- fast_dev_run
@pytest.mark.compat("fast_dev_run=True", "EarlyStopping")
def test_fast_dev_run_restores_nothing_and_leaves_no_file(fits: Fits) -> None:
    run = fits("fast_dev_run=True")
    early_stopping = run.callbacks["EarlyStopping"]
    assert isinstance(early_stopping, EarlyStopping)
    # Lightning skips every check under fast_dev_run: no snapshot, so the model keeps the weights
    # training reached (those its one validation saw)
    assert len(run.probe.checks) == 1
    assert same_state(run.model.state_dict(), run.probe.checks[0].state)
    assert early_stopping.wait_count == 0 and math.isinf(float(early_stopping.best_score))
    root = run.trainer.default_root_dir
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]
    assert leftovers == []  # no snapshot file, no log, no checkpoint


@pytest.mark.compat("fast_dev_run=True", "stack")
def test_fast_dev_run_stack(fits: Fits) -> None:
    run = fits("fast_dev_run=True")
    assert torch.isfinite(run.trainer.callback_metrics["train_loss"])
    check_soft_targets(run, mixed=False)  # the one batch was mixed


# ----------------------------------------------------------------- a second fit, same objects
@pytest.mark.parametrize(
    ("row", "column"),
    cells(
        "second fit, same callbacks",
        (
            "EarlyStopping",
            "WeightDecayExclusion",
            "GeneralizationGapMonitor",
            "MembershipInferenceAudit",
            "ProximalSparsity",
        ),
    ),
)
def test_second_fit_cell(fits: Fits, row: str, column: str) -> None:
    run = fits(row)
    CHECKS[column](run)
    if column == "EarlyStopping":  # its own best, not the first fit's 0.5 (nor its weights)
        early_stopping = run.callbacks["EarlyStopping"]
        best = float(early_stopping.best_score)  # type: ignore[attr-defined]
        assert best == pytest.approx(min(SECOND_SCRIPT))
        assert best_check(run) is run.probe.checks[0]
    if column == "WeightDecayExclusion":
        assert len(run.callbacks["WeightDecayExclusion"].splits) == 1  # type: ignore[attr-defined]
        assert isinstance(run.callbacks["WeightDecayExclusion"], WeightDecayExclusion)


NOT_SCRIPTED = ("train_loss", "real_val_loss", "reg/weights", "reg/mixup", "reg/privacy",
                "reg/train_eval/real_val_loss", "reg/gap/real_val_loss",
                "reg/gap_trend/real_val_loss", "reg/proximal")  # fmt: skip


@pytest.mark.compat("second fit, same callbacks", "Mixup")
def test_second_fit_draws_again(fits: Fits) -> None:
    run = fits("second fit, same callbacks")
    first = run.first  # type: ignore[attr-defined]
    CHECKS["Mixup"](run)
    assert len(run.probe.targets) == len(first.probe.targets)
    assert all(
        torch.equal(a, b) for a, b in zip(first.probe.targets, run.probe.targets, strict=True)
    )


@pytest.mark.compat("second fit, same callbacks", "stack")
def test_second_fit_repeats_the_first(fits: Fits) -> None:
    """Training is the same in both fits: everything not derived from the scripted value (gap
    history and trend, audit, norms, draws, proximal steps) must come out bitwise the same."""
    run = fits("second fit, same callbacks")
    first = run.first  # type: ignore[attr-defined]
    CHECKS["stack"](run)
    for a, b in zip(first.probe.checks, run.probe.checks, strict=True):
        assert same_state(a.state, b.state)
        keys = [k for k in a.metrics if k.startswith(NOT_SCRIPTED)]
        for key in keys:  # NaN for the TPRs at low FPR on 64 samples: equal too
            assert a.metrics[key] == b.metrics[key] or math.isnan(a.metrics[key] + b.metrics[key])
