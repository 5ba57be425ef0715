"""EarlyStopping across fits, beside Lightning's weight averaging, and as a drop-in for Lightning's.

- A callback reused for another fit (the sweep pattern) starts afresh: it never puts one model's
  weights into another, nor stops a run on another run's best value.
- With ``EMAWeightAveraging`` (either order) the model ends with the weights that were validated
  at the best check, so it scores the best value it reports.
- Lightning's own drop-in behaviours: ``vars()`` survives pickling, a checkpoint's callback state
  compares equal with ``==`` to ``state_dict()`` taken at save time.
"""

import copy
import pickle

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import (
    EMAWeightAveraging,
    ModelCheckpoint,
    OnExceptionCheckpoint,
    StochasticWeightAveraging,
)

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


def fit(root, model, callbacks, dm=None, ckpt_path=None, **overrides):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(root, callbacks=callbacks, **overrides))
    trainer.fit(model, datamodule=dm or BlobsDataModule(), ckpt_path=ckpt_path)
    return trainer


def scripted(values, seed=0):
    pl.seed_everything(seed, verbose=False)
    return ScriptedClassifier(values, batchnorm=True)


# ------------------------------------------------------------------------------------ sweeps
def test_a_reused_callback_starts_afresh_on_a_new_model(tmp_path):
    es, rec_a, rec_b = EarlyStopping("val_loss", patience=2), StateRecorder(), StateRecorder()
    model_a = scripted([1, 2, 3, 4, 5, 6])  # best at epoch 0, stops at epoch 2
    fit(tmp_path / "a", model_a, [es, rec_a], max_epochs=6)
    assert (es.best_epoch, es.stopped_epoch) == (0, 2)
    assert same_state(model_a.state_dict(), rec_a.states[0])

    model_b = scripted([9, 8, 7, 6, 5, 4], seed=1)  # keeps improving: never stops
    trainer = fit(tmp_path / "b", model_b, [es, rec_b], max_epochs=6)
    assert trainer.current_epoch == 6 and es.stopped_epoch == 0 and es.best_value == 4.0
    assert es.best_epoch == 5 and es.wait_count == 0
    assert same_state(model_b.state_dict(), rec_b.states[5])  # B's own weights, not A's


def test_a_reused_callback_does_not_restore_the_previous_model_when_nothing_improved(tmp_path):
    es = EarlyStopping("val_loss", patience=5)
    fit(tmp_path / "a", scripted([1, 2]), [es], max_epochs=2)
    model_b, rec = scripted([float("nan")] * 2, seed=1), StateRecorder()
    fit(tmp_path / "b", model_b, [EarlyStopping("other", strict=False), es, rec], max_epochs=1)
    assert es.best_epoch == -1
    assert same_state(model_b.state_dict(), rec.states[0])  # its own last weights


def test_resuming_is_the_one_way_state_crosses_fits(tmp_path):
    es = EarlyStopping("val_loss", patience=10)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    values = [5, 1, 2, 3, 4, 5]
    fit(tmp_path / "a", scripted(values), [es, ckpt], max_epochs=3, enable_checkpointing=True)
    model, rec = scripted(values), StateRecorder()
    last = tmp_path / "ck" / "last.ckpt"
    callbacks = [es, rec, ModelCheckpoint(dirpath=tmp_path / "ck2")]
    fit(tmp_path / "b", model, callbacks, ckpt_path=last, max_epochs=6, enable_checkpointing=True)
    assert es.best_epoch == 1 and es.best_value == 1.0  # carried by the checkpoint
    first = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert same_state(model.state_dict(), first["lightning_reg_best_state"][es.state_key])


# ------------------------------------------------------------------------- weight averaging
class ValidatedWeights(pl.Callback):
    """Records the weights inside validation (what it scores) and the validation loss."""

    def __init__(self):
        self.states, self.values = {}, {}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and not trainer.sanity_checking:
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.states[trainer.current_epoch] = state

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.values[trainer.current_epoch] = float(trainer.callback_metrics["val_loss"])


@pytest.mark.parametrize("order", ["es-first", "ema-first"])
def test_with_ema_the_model_ends_with_the_validated_weights_of_the_best_check(tmp_path, order):
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier(hidden=64, lr=0.5, batchnorm=True)
    dm = BlobsDataModule(label_noise=0.4, n_train=128)
    es, ema = EarlyStopping("val_loss", patience=3), EMAWeightAveraging(decay=0.6)
    seen = ValidatedWeights()
    callbacks = [es, ema, seen] if order == "es-first" else [ema, es, seen]
    trainer = fit(tmp_path, model, callbacks, dm=dm, max_epochs=25)
    best = min(seen.values, key=seen.values.get)
    assert best < max(seen.values)  # the restore has work to do
    assert es.best_epoch == best and es.best_value == seen.values[best]
    assert same_state(model.state_dict(), seen.states[best])
    # a plain evaluation of the returned model scores the reported best value
    check = pl.Trainer(**trainer_kwargs(tmp_path / "check"))
    score = check.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
    assert score == pytest.approx(es.best_value, rel=1e-5)
    # and so does a validation on the fit's own Trainer, where the averaging callback swaps its
    # averaged model in
    again = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
    assert again == pytest.approx(es.best_value, rel=1e-5)
    assert same_state(model.state_dict(), seen.states[best])


def test_ema_with_a_check_at_train_epoch_end_is_refused_at_setup(tmp_path):
    es = EarlyStopping("val_loss", check_on_train_epoch_end=True)
    with pytest.raises(RuntimeError, match=r"check_on_train_epoch_end=True\).*EMAWeightAveraging"):
        fit(tmp_path, TinyClassifier(), [es, EMAWeightAveraging()], max_epochs=1)


def test_swa_warns_that_the_best_validated_weights_win(tmp_path):
    model, rec = scripted([5, 1, 2, 3]), StateRecorder()
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)
    with pytest.warns(UserWarning, match="StochasticWeightAveraging"):
        fit(tmp_path, model, [EarlyStopping("val_loss", patience=10), swa, rec], max_epochs=4)
    assert same_state(model.state_dict(), rec.states[1])


# ---------------------------------------------------------------------- exception checkpoints
@pytest.mark.parametrize("saver", ["OnExceptionCheckpoint", "ModelCheckpoint"])
def test_exception_checkpoints_hold_the_reached_weights_and_the_model_the_best(tmp_path, saver):
    model, rec = scripted([5, 1, 2, 3, 4]), StateRecorder()
    if saver == "OnExceptionCheckpoint":
        ckpt, path = OnExceptionCheckpoint(tmp_path / "ck", filename="crash"), "crash.ckpt"
    else:
        ckpt = ModelCheckpoint(tmp_path / "ck", save_on_exception=True, filename="crash")
        path = "crash.ckpt"
    es = EarlyStopping("val_loss", patience=10, snapshot_to="disk", snapshot_dir=tmp_path / "s")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path, model, [es, rec, ckpt, CrashAt(3)], max_epochs=5, enable_checkpointing=True)
    crash = torch.load(tmp_path / "ck" / path, weights_only=True)
    assert same_state(crash["state_dict"], rec.states[2])  # what training reached
    assert same_state(crash["lightning_reg_best_state"][es.state_key], rec.states[1])
    assert same_state(model.state_dict(), rec.states[1])  # the model: the best
    assert not list((tmp_path / "s").glob("*.pt"))  # the snapshot file is gone


# ----------------------------------------------------------------------- Lightning's parity
def test_vars_survive_a_pickle_round_trip():
    es = EarlyStopping(monitor="foo")
    assert vars(es) == vars(pickle.loads(pickle.dumps(es)))
    assert vars(es) == vars(copy.deepcopy(es))


class RecordsStates(EarlyStopping):
    def __init__(self, *args, expected=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.saved_states, self.expected, self.seen_at_start = [], expected, None

    def on_train_start(self, trainer, pl_module):
        self.seen_at_start = self.state_dict()

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        self.saved_states.append(self.state_dict().copy())


def test_checkpoint_state_compares_equal_to_state_dict_at_save_time(tmp_path):
    es = RecordsStates(monitor="train_loss")
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="train_loss", save_top_k=1)
    fit(tmp_path, TinyClassifier(), [es, ckpt], max_epochs=4, enable_checkpointing=True)
    checkpoint = torch.load(ckpt.kth_best_model_path, weights_only=True)
    saved = checkpoint["callbacks"]["RecordsStates{'monitor': 'train_loss', 'mode': 'min'}"]
    assert saved == es.saved_states[checkpoint["epoch"]]
    # a fit resumed from it starts with exactly that state
    resumed = RecordsStates(monitor="train_loss")
    fit(tmp_path / "r", TinyClassifier(), [resumed], ckpt_path=ckpt.kth_best_model_path,
        max_epochs=5)  # fmt: skip
    assert resumed.seen_at_start == saved


# ------------------------------------------------------------------ monitoring our own metrics
class GapRecorder(pl.Callback):
    """Records ``reg/gap/loss`` as every callback sees it after each mid-epoch validation."""

    def __init__(self):
        self.values = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.values.append(float(trainer.callback_metrics["reg/gap/loss"]))


@pytest.mark.parametrize("order", ["es-first", "gap-first"])
def test_monitoring_the_gap_mid_epoch_does_not_depend_on_the_callback_order(tmp_path, order):
    from lightning_reg import GeneralizationGapMonitor

    es = EarlyStopping("reg/gap/loss", patience=100)
    gap, seen = GeneralizationGapMonitor(subset_size=64), GapRecorder()
    callbacks = [es, gap, seen] if order == "es-first" else [gap, es, seen]
    fit(tmp_path, TinyClassifier(), callbacks, max_epochs=2, val_check_interval=0.5)
    assert len(gap.history["val_loss"]["gap"]) == len(seen.values) == 4  # one pass each
    assert es.best_value == min(seen.values)


def test_a_check_called_outside_fit_writes_no_logs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    es, trainer = EarlyStopping(monitor="foo"), pl.Trainer(default_root_dir=tmp_path)
    trainer.callback_metrics["foo"] = torch.tensor([[[0.5]]])
    es._run_early_stopping_check(trainer)
    assert es.wait_count == 0 and float(es.best_score) == 0.5
    assert not (tmp_path / "lightning_logs").exists()
