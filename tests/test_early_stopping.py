"""EarlyStopping with best-state restore, through real ``Trainer.fit`` runs (single process).

DDP runs live in ``test_early_stopping_ddp.py``; the snapshot's own unit tests in
``test_snapshot.py``.
"""

import logging
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_reg import EarlyStopping
from tests.helpers import (
    BlobsDataModule,
    CrashAt,
    ScriptedClassifier,
    StateRecorder,
    TinyClassifier,
    same_state,
    trainer_kwargs,
)

NAN = float("nan")


def fit(tmp_path, model, callbacks, dm=None, seed=0, **overrides):
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **overrides))
    trainer.fit(model, datamodule=dm or BlobsDataModule())
    return trainer


def scripted(values, **kwargs):
    pl.seed_everything(0, verbose=False)
    return ScriptedClassifier(values, batchnorm=True, **kwargs)


# ------------------------------------------------------------------------------- restore points
def test_early_stop_restores_the_best_epoch_on_a_real_metric(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier(hidden=256, lr=0.3, batchnorm=True)
    es, rec = EarlyStopping("val_loss", patience=3), StateRecorder()
    dm = BlobsDataModule(label_noise=0.4, n_train=128)
    trainer = fit(tmp_path, model, [es, rec], dm=dm, max_epochs=40)

    best_epoch = min(rec.values, key=rec.values.get)
    last_epoch = max(rec.values)
    assert trainer.should_stop and best_epoch < last_epoch  # the restore has work to do
    assert es.best_epoch == best_epoch and es.best_value == rec.values[best_epoch]
    assert same_state(model.state_dict(), rec.states[best_epoch])
    # the restored model scores the best value again, BatchNorm statistics included
    assert trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"] == pytest.approx(
        rec.values[best_epoch], rel=1e-6
    )


def test_normal_end_restores_best_and_batchnorm_buffers(tmp_path):
    model = scripted([5, 3, 1, 2, 4, 4.5])
    es, rec = EarlyStopping("val_loss", patience=100), StateRecorder()
    trainer = fit(tmp_path, model, [es, rec], max_epochs=6)
    assert not es.stopped_epoch and trainer.current_epoch == 6
    assert es.best_epoch == 2
    assert same_state(model.state_dict(), rec.states[2])
    bn = model.net[1]
    assert bn.num_batches_tracked.item() == rec.states[2]["net.1.num_batches_tracked"].item()
    assert not torch.equal(rec.states[2]["net.1.running_mean"], rec.states[5]["net.1.running_mean"])


def test_restore_best_weights_false_keeps_the_last_weights(tmp_path):
    model = scripted([5, 3, 1, 2, 4, 4.5])
    rec = StateRecorder()
    fit(tmp_path, model, [EarlyStopping("val_loss", patience=100, restore_best_weights=False), rec],
        max_epochs=6)  # fmt: skip
    assert same_state(model.state_dict(), rec.states[5])


@pytest.mark.parametrize("restore_on_exception", [True, False])
def test_exception_restores_best_so_far(tmp_path, restore_on_exception):
    model = scripted([5, 1, 2, 3, 4, 5])
    es = EarlyStopping("val_loss", patience=100, restore_on_exception=restore_on_exception)
    rec = StateRecorder()
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path, model, [es, rec, CrashAt(4)], max_epochs=6)
    expected = rec.states[1] if restore_on_exception else rec.states[3]
    assert same_state(model.state_dict(), expected)


def test_keyboard_interrupt_restores_best(tmp_path):
    model = scripted([5, 1, 2, 3, 4, 5])
    rec = StateRecorder()
    with pytest.raises(SystemExit):  # Lightning turns Ctrl+C into a graceful exit(1)
        callbacks = [EarlyStopping("val_loss", patience=100), rec, CrashAt(3, KeyboardInterrupt)]
        fit(tmp_path, model, callbacks, max_epochs=6)
    assert same_state(model.state_dict(), rec.states[1])


def test_restore_message_is_printed(tmp_path, caplog):
    model = scripted([3, 2, 2.5, 2.6])
    with caplog.at_level(logging.INFO):
        fit(tmp_path, model, [EarlyStopping("val_loss", patience=2)], max_epochs=10)
    assert "Restored best weights from epoch 1 (val_loss=2.0000) after early stopping." in (
        caplog.text
    )


# --------------------------------------------------------------------- thresholds, NaN, options
def test_stopping_threshold_snapshots_the_epoch_that_reached_it(tmp_path):
    model = scripted([5, 4, 3, 0.5, 9])
    es, rec = EarlyStopping("val_loss", patience=10, stopping_threshold=1.0), StateRecorder()
    fit(tmp_path, model, [es, rec], max_epochs=5)
    assert es.stopped_epoch == 3 and es.best_epoch == 3
    assert same_state(model.state_dict(), rec.states[3])


def test_divergence_stop_does_not_restore_the_divergent_epoch(tmp_path):
    model = scripted([5, 4, 30, 1])
    es = EarlyStopping("val_loss", patience=10, divergence_threshold=20.0)
    rec = StateRecorder()
    fit(tmp_path, model, [es, rec], max_epochs=4)
    assert es.stopped_epoch == 2 and es.best_epoch == 1
    assert same_state(model.state_dict(), rec.states[1])


def test_divergent_first_check_is_never_snapshotted(tmp_path):
    model = scripted([30, 1])
    es = EarlyStopping("val_loss", divergence_threshold=20.0)
    fit(tmp_path, model, [es], max_epochs=2)
    assert es.best_epoch == -1 and math.isinf(es.best_value)


def test_nan_stops_and_restores_the_best_finite_epoch(tmp_path):
    model = scripted([5, 2, 3, NAN, 0.1])
    es, rec = EarlyStopping("val_loss", patience=10), StateRecorder()
    fit(tmp_path, model, [es, rec], max_epochs=5)
    assert es.stopped_epoch == 3 and es.best_epoch == 1 and es.best_value == 2.0
    assert same_state(model.state_dict(), rec.states[1])


def test_nan_without_check_finite_is_never_snapshotted(tmp_path):
    model = scripted([NAN, NAN, 4, NAN])
    es = EarlyStopping("val_loss", patience=10, check_finite=False)
    rec = StateRecorder()
    fit(tmp_path, model, [es, rec], max_epochs=4)
    assert es.best_epoch == 2
    assert same_state(model.state_dict(), rec.states[2])


def test_min_delta_and_max_mode(tmp_path):
    model = scripted([0.5, 0.7, 0.71, 0.72, 0.73, 0.74])
    es = EarlyStopping("val_loss", mode="max", min_delta=0.05, patience=3)
    rec = StateRecorder()
    fit(tmp_path, model, [es, rec], max_epochs=6)
    assert es.best_epoch == 1 and es.stopped_epoch == 4
    assert same_state(model.state_dict(), rec.states[1])


def test_start_from_epoch_ignores_warm_up(tmp_path):
    model = scripted([0.1, 0.2, 5, 4, 4.5, 4.6, 4.7])
    es, rec = EarlyStopping("val_loss", patience=2, start_from_epoch=2), StateRecorder()
    fit(tmp_path, model, [es, rec], max_epochs=7)
    assert es.best_epoch == 3 and es.stopped_epoch == 5
    assert same_state(model.state_dict(), rec.states[3])


def test_nan_during_warm_up_still_stops(tmp_path):
    es = EarlyStopping("val_loss", start_from_epoch=3)
    fit(tmp_path, scripted([1, NAN, 1, 1]), [es], max_epochs=4)
    assert es.stopped_epoch == 1 and es.best_epoch == -1


def test_baseline_stops_when_never_beaten_but_keeps_the_best(tmp_path):
    model = scripted([3, 2.5, 2.8, 2.9, 1.0])
    es, rec = EarlyStopping("val_loss", patience=3, baseline=2.0), StateRecorder()
    fit(tmp_path, model, [es, rec], max_epochs=5)
    assert es.stopped_epoch == 2  # three checks, none below the baseline
    assert es.best_epoch == 1
    assert same_state(model.state_dict(), rec.states[1])


def test_min_epochs_keeps_training_and_restores_overall_best(tmp_path):
    model = scripted([5, 1, 2, 3, 0.5, 4, 4, 4])
    es, rec = EarlyStopping("val_loss", patience=1), StateRecorder()
    trainer = fit(tmp_path, model, [es, rec], max_epochs=8, min_epochs=6)
    assert trainer.current_epoch >= 6 and es.best_epoch == 4
    assert same_state(model.state_dict(), rec.states[4])


def test_check_on_validation_end_logs_to_the_loggers(tmp_path):
    model = scripted([5, 4, 3, 3.5, 3.6, 3.7])
    es = EarlyStopping("val_loss", patience=2, check_on_train_epoch_end=False)
    trainer = fit(tmp_path, model, [es], max_epochs=6, logger=CSVLogger(tmp_path),
                  check_val_every_n_epoch=1)  # fmt: skip
    assert es.best_epoch == 2
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "reg/early_stopping/best" in text and "reg/early_stopping/wait" in text
    assert trainer.current_epoch == 5


def test_logged_metrics_through_self_log(tmp_path):
    model = scripted([5, 4, 4.5])
    trainer = fit(tmp_path, model, [EarlyStopping("val_loss", patience=5)], max_epochs=3)
    logged = trainer.logged_metrics
    assert logged["reg/early_stopping/best"].item() == 4.0
    assert logged["reg/early_stopping/best_epoch"].item() == 1
    assert logged["reg/early_stopping/wait"].item() == 1


@pytest.mark.parametrize("location", ["cpu", "device", "disk"])
def test_every_snapshot_location_restores_the_same_state(tmp_path, location):
    model = scripted([5, 1, 2, 3])
    es = EarlyStopping("val_loss", patience=10, snapshot_to=location, snapshot_dir=tmp_path / "s")
    rec = StateRecorder()
    files = FilesDuringFit(tmp_path / "s")
    fit(tmp_path, model, [es, rec, files], max_epochs=4)
    assert same_state(model.state_dict(), rec.states[1])
    if location == "disk":  # one file for this fit, unique to it, deleted when fit ends
        assert len(files.seen) == 1 and ".rank0.pt" in files.seen.pop()
    assert not list((tmp_path / "s").glob("*.pt"))


class FilesDuringFit(pl.Callback):
    def __init__(self, directory):
        self.directory, self.seen = directory, set()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen |= {p.name for p in self.directory.glob("*.pt")}


def test_two_disk_runs_in_one_folder_do_not_share_a_file(tmp_path):
    seen = []
    for _ in range(2):
        files = FilesDuringFit(tmp_path / "best_state")
        es = EarlyStopping("val_loss", patience=10, snapshot_to="disk")
        fit(tmp_path, scripted([5, 1, 2]), [es, files], max_epochs=3)
        seen.append(files.seen)
    assert len(seen[0]) == len(seen[1]) == 1 and seen[0] != seen[1]
    assert not list((tmp_path / "best_state").glob("*.pt"))


class CallbacksDuringFit(pl.Callback):
    def __init__(self):
        self.lists = []

    def on_train_batch_end(self, trainer, *args):
        self.lists.append(list(trainer.callbacks))

    def on_train_end(self, trainer, pl_module):
        self.lists.append(list(trainer.callbacks))


def test_restore_runs_after_checkpoints_at_the_end_of_fit(tmp_path):
    model = scripted([5, 1, 2, 3])
    es, rec = EarlyStopping("val_loss", patience=10), StateRecorder()
    during = CallbacksDuringFit()
    # save_top_k=0: no epoch-end save, so ModelCheckpoint writes last.ckpt in on_train_end
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=0, save_last=True)
    trainer = fit(tmp_path, model, [es, rec, during, ckpt], max_epochs=4, enable_checkpointing=True)
    last = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert same_state(last["state_dict"], rec.states[3])  # what training reached, not the best
    assert same_state(model.state_dict(), rec.states[1])
    # nothing was added to the callback list to get there
    assert all(seen == list(trainer.callbacks) for seen in during.lists)
    assert trainer.callbacks[-1] is ckpt


def test_exception_checkpoint_holds_the_crash_time_weights(tmp_path):
    model = scripted([5, 1, 2, 3, 4])
    es, rec = EarlyStopping("val_loss", patience=10), StateRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_on_exception=True, filename="crash")
    with pytest.raises(RuntimeError):
        fit(tmp_path, model, [es, rec, ckpt, CrashAt(3)], max_epochs=5, enable_checkpointing=True)
    crash = torch.load(tmp_path / "ck" / "crash.ckpt", weights_only=True)
    assert same_state(crash["state_dict"], rec.states[2])
    assert same_state(model.state_dict(), rec.states[1])


# ------------------------------------------------------------------------ drop-in compatibility
PARITY_CASES = [
    dict(patience=2),
    dict(patience=3, min_delta=0.3),
    dict(patience=2, mode="max"),
    dict(patience=5, stopping_threshold=1.5),
    dict(patience=5, divergence_threshold=4.2),
    dict(patience=0),
    dict(patience=1, check_on_train_epoch_end=False),
]
PARITY_VALUES = [5, 4, 4.1, 3, 2.9, 2.95, 1.2, 4.5, 4.4, 4.3, 4.35, 4.36]


@pytest.mark.parametrize("kwargs", PARITY_CASES, ids=lambda k: ",".join(map(str, k.items())))
def test_same_stopping_behaviour_as_lightning(tmp_path, kwargs):
    outcome = {}
    for cls in (LightningEarlyStopping, EarlyStopping):
        es = cls("val_loss", **kwargs)
        trainer = fit(tmp_path, scripted(PARITY_VALUES), [es], max_epochs=len(PARITY_VALUES))
        outcome[cls] = (
            trainer.current_epoch, trainer.global_step, es.stopped_epoch, es.wait_count,
            float(es.best_score), es.stopping_reason, es.stopping_reason_message,
        )  # fmt: skip
    assert outcome[EarlyStopping] == outcome[LightningEarlyStopping]


def test_state_key_matches_lightning_and_checkpoints_cross_load():
    ours, theirs = (
        EarlyStopping("val_acc", mode="max"),
        LightningEarlyStopping("val_acc", mode="max"),
    )
    assert ours.state_key == theirs.state_key
    theirs.wait_count, theirs.best_score = 2, torch.tensor(0.9)
    ours.load_state_dict(theirs.state_dict())  # a Lightning checkpoint resumes with ours
    assert ours.wait_count == 2 and float(ours.best_score) == pytest.approx(0.9)
    assert ours.best_epoch == -1  # no snapshot in it: tracked afresh
    theirs.load_state_dict(ours.state_dict())  # and the other way round


def test_strict_missing_metric_raises_with_the_available_names(tmp_path):
    with pytest.raises(RuntimeError, match=r"`val_los` which is not available.*val_loss"):
        fit(tmp_path, scripted([1, 2]), [EarlyStopping("val_los")], max_epochs=2)
    es = EarlyStopping("val_los", strict=False)
    fit(tmp_path, scripted([1, 2]), [es], max_epochs=2)
    assert es.best_epoch == -1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(monitor=""), "monitor"),
        (dict(monitor="v", min_delta=-0.1), "min_delta"),
        (dict(monitor="v", patience=-1), "patience"),
        (dict(monitor="v", patience=2.5), "patience"),
        (dict(monitor="v", snapshot_to="gpu"), "snapshot_to"),
        (dict(monitor="v", start_from_epoch=-2), "start_from_epoch"),
        (dict(monitor="v", baseline=float("inf")), "baseline"),
        (dict(monitor="v", stopping_threshold=2.0, divergence_threshold=1.0), "swap"),
        (dict(monitor="v", mode="max", stopping_threshold=1.0, divergence_threshold=2.0), "swap"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyStopping(**kwargs)


def test_bad_mode_raises_like_lightning():
    with pytest.raises(Exception, match="`mode` can be min, max"):
        EarlyStopping("v", mode="lowest")


def test_two_restoring_instances_warn(tmp_path):
    callbacks = [EarlyStopping("val_loss", patience=5), EarlyStopping("real_val_loss", patience=5)]
    with pytest.warns(UserWarning, match="the last one in the callback list wins"):
        fit(tmp_path, scripted([3, 2, 1]), callbacks, max_epochs=3)


# ----------------------------------------------------------------------------------- resuming
RESUME_VALUES = [5, 4, 3, 2.5, 3, 3.1, 2.9, 3.2, 3.3, 3.4, 3.5, 3.6]


def _resume_run(tmp_path, crash_at=None, ckpt_path=None, checkpoint_snapshot=True):
    model = scripted(RESUME_VALUES, hidden=32, lr=0.2)
    es = EarlyStopping("val_loss", patience=4, checkpoint_snapshot=checkpoint_snapshot)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    callbacks = [es, ckpt] + ([CrashAt(crash_at)] if crash_at is not None else [])
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, callbacks=callbacks, max_epochs=len(RESUME_VALUES), enable_checkpointing=True,
    ))  # fmt: skip
    dm = BlobsDataModule(shuffle=False)
    if crash_at is not None:
        with pytest.raises(RuntimeError):
            trainer.fit(model, datamodule=dm)
    else:
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, es, trainer


def test_resume_restores_bitwise_the_same_weights_as_an_uninterrupted_run(tmp_path):
    full, full_es, _ = _resume_run(tmp_path / "full")
    assert full_es.best_epoch == 3 and full_es.stopped_epoch == 7

    _resume_run(tmp_path / "part", crash_at=5)
    last = tmp_path / "part" / "ck" / "last.ckpt"
    resumed, resumed_es, _ = _resume_run(tmp_path / "resumed", ckpt_path=last)

    assert (resumed_es.best_epoch, resumed_es.stopped_epoch) == (3, 7)
    assert resumed_es.best_value == full_es.best_value
    assert same_state(resumed.state_dict(), full.state_dict())


def test_resume_without_checkpointed_snapshot_tracks_afresh(tmp_path):
    _resume_run(tmp_path / "part", crash_at=5, checkpoint_snapshot=False)
    last = tmp_path / "part" / "ck" / "last.ckpt"
    _, es, _ = _resume_run(tmp_path / "resumed", ckpt_path=last, checkpoint_snapshot=False)
    # the best check after resuming (2.9 at epoch 6), not the lost epoch 3 (2.5)
    assert es.best_epoch == 6 and es.stopped_epoch == 7


def test_checkpoint_loads_weights_only_and_holds_the_snapshot(tmp_path):
    model = scripted([5, 1, 2, 3])
    es, rec = EarlyStopping("val_loss", patience=10), StateRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    fit(tmp_path, model, [es, rec, ckpt], max_epochs=4, enable_checkpointing=True)
    checkpoint = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    state = checkpoint["callbacks"][es.state_key]
    assert state["best_epoch"] == 1 and state["best_value"] == 1.0
    assert not any(isinstance(v, dict) for v in state.values())  # the copy has its own key
    assert same_state(checkpoint["lightning_reg_best_state"][es.state_key], rec.states[1])
