"""GeneralizationGapMonitor through real ``Trainer.fit`` runs, and its TensorBoard output."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Subset

from lightning_reg import EarlyStopping, GeneralizationGapMonitor, Mixup
from lightning_reg.diagnosis import diagnose, lower_is_better, short_name, trend
from tests.helpers import BlobsDataModule, TinyClassifier, trainer_kwargs


class Recorder(pl.Callback):
    """Keeps a copy of the weights at every validation end (before the gap monitor's pass)."""

    def __init__(self):
        self.states = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.states[trainer.current_epoch] = {
                k: v.clone() for k, v in pl_module.state_dict().items()
            }


class MetricObjectClassifier(TinyClassifier):
    """Logs a torchmetrics object from validation_step and accumulates a train metric too."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=4)
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.train_acc(logits, y)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return F.cross_entropy(logits, y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc)


def fit(tmp_path, model, callbacks, dm=None, **overrides):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(model, datamodule=dm or BlobsDataModule())
    return trainer


def overfitting_setup():
    pl.seed_everything(0, verbose=False)
    return TinyClassifier(hidden=256, lr=0.3), BlobsDataModule(label_noise=0.4)


# ------------------------------------------------------------------------------ the pass itself
def test_train_eval_equals_an_independent_evaluation_of_the_same_weights(tmp_path):
    model, dm = overfitting_setup()
    rec = Recorder()
    gap = GeneralizationGapMonitor(subset_size=100, seed=3)
    trainer = fit(tmp_path, model, [rec, gap], dm=dm, max_epochs=3)
    # rebuild the same subset and evaluate the last validated weights independently
    order = torch.randperm(len(dm.train_set), generator=torch.Generator().manual_seed(3))[:100]
    x, y = (torch.stack(t) for t in zip(*Subset(dm.train_set, order.tolist()), strict=True))
    model.load_state_dict(rec.states[2])
    model.eval()
    with torch.no_grad():
        logits = model(x)
    expected_loss = F.cross_entropy(logits, y).item()
    expected_acc = (logits.argmax(-1) == y).float().mean().item()
    metrics = trainer.callback_metrics
    assert metrics["reg/train_eval/loss"].item() == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["reg/train_eval/acc"].item() == pytest.approx(expected_acc, abs=1e-6)
    assert metrics["reg/gap/loss"].item() == pytest.approx(
        metrics["val_loss"].item() - expected_loss, rel=1e-5
    )
    assert metrics["reg/gap/acc"].item() == pytest.approx(
        expected_acc - metrics["val_acc"].item(), abs=1e-6
    )


def test_validation_results_and_metric_objects_are_not_polluted(tmp_path):
    rec_plain, rec_monitored = {}, {}
    for store, callbacks in ((rec_plain, []), (rec_monitored, [GeneralizationGapMonitor(64)])):
        pl.seed_everything(0, verbose=False)
        model = MetricObjectClassifier()
        trainer = fit(tmp_path, model, callbacks, max_epochs=2)
        store.update({k: v.item() for k, v in trainer.callback_metrics.items()})
    # the monitor changes neither the validation metrics nor the accumulated train metric
    for key in ("val_loss", "val_acc", "train_acc"):
        assert rec_monitored[key] == pytest.approx(rec_plain[key], abs=1e-7), key
    assert "reg/train_eval/acc" in rec_monitored  # computed from the Metric object


def test_mixup_never_reaches_the_subset(tmp_path):
    model, dm = overfitting_setup()
    rec = Recorder()
    gap = GeneralizationGapMonitor(subset_size=256)
    callbacks = [rec, Mixup(num_classes=4), gap]
    trainer = fit(tmp_path, model, callbacks, dm=dm, max_epochs=2)
    model.load_state_dict(rec.states[1])
    model.eval()
    x, y = dm.train_set.tensors
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y).item()  # subset == the whole train set here
    assert trainer.callback_metrics["reg/train_eval/loss"].item() == pytest.approx(expected, 1e-5)


def test_sanity_check_is_ignored_and_no_per_step_cost(tmp_path):
    calls = []

    class Counting(GeneralizationGapMonitor):
        def _run_pass(self, trainer, pl_module):
            calls.append(trainer.sanity_checking)
            return super()._run_pass(trainer, pl_module)

    fit(tmp_path, TinyClassifier(), [Counting(32)], max_epochs=3, num_sanity_val_steps=2)
    assert calls == [False, False, False]  # one pass per validation, none for the sanity check


# ------------------------------------------------------------------------------------ diagnosis
def test_noisy_overparameterized_model_is_diagnosed_overfitting(tmp_path):
    model, dm = overfitting_setup()
    gap = GeneralizationGapMonitor(subset_size=256)
    with pytest.warns(UserWarning, match="overfitting"):
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[gap], max_epochs=30))
        trainer.fit(model, datamodule=dm)
    gaps = gap.history["val_loss"]["gap"]
    assert gaps[-1] > gaps[0] + 0.3  # a growing gap
    assert gap.diagnosis == "overfitting"
    assert trainer.callback_metrics["reg/overfitting"].item() == 1.0
    assert "Strengthen regularization" in gap.advice


def test_strong_regularization_is_not_diagnosed_overfitting(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier(hidden=256, lr=0.3, weight_decay=0.05, dropout=0.5)
    gap = GeneralizationGapMonitor(subset_size=256)
    fit(tmp_path, model, [gap], dm=BlobsDataModule(label_noise=0.4), max_epochs=30)
    assert gap.diagnosis != "overfitting"
    assert max(gap.history["val_loss"]["gap"]) < 0.3


def test_diagnose_rules():
    flat = [2.0] * 8
    assert diagnose(flat, flat, [0.0] * 8) == "underfitting"
    assert diagnose([1, 0.8], [1, 0.7], [0, 0.1]) == "warming up"
    improving = [1.0, 0.8, 0.6, 0.5, 0.4, 0.35]
    assert diagnose(improving, [0.9 * v for v in improving], [0.1 * v for v in improving]) == (
        "healthy"
    )
    accuracy_val = [0.5, 0.7, 0.8, 0.78, 0.76, 0.75, 0.74]
    accuracy_train = [0.5, 0.72, 0.85, 0.9, 0.95, 0.98, 0.99]
    gaps = [t - v for t, v in zip(accuracy_train, accuracy_val, strict=True)]
    assert diagnose(accuracy_val, accuracy_train, gaps, lower_better=False) == "overfitting"


def test_names_directions_and_trend():
    assert short_name("val_loss") == "loss" and short_name("val/acc") == "acc"
    assert short_name("accuracy") == "accuracy"
    assert lower_is_better("val_loss") and lower_is_better("val/mse")
    assert lower_is_better("val_nll_loss") and not lower_is_better("val_acc")
    assert not lower_is_better("val_f1") and not lower_is_better("val/auroc")
    assert trend([0, 1, 2, 3]) == pytest.approx(1.0) and trend([5]) == 0.0


# ---------------------------------------------------------------------------- loggers and state
def test_tensorboard_holds_scalars_layout_hparams_and_text(tmp_path):
    model, dm = overfitting_setup()
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, model, [GeneralizationGapMonitor(64)], dm=dm, max_epochs=3, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("reg/train_eval/loss", "reg/gap/loss", "reg/gap_trend/acc", "reg/overfitting"):
        assert len(events.Scalars(tag)) == 3, tag
    assert "custom_scalars__config__" in tags["tensors"]
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert b"reg/gap/loss" in hparams["_hparams_/experiment"]  # our scalars are its metrics
    assert b"GeneralizationGapMonitor/subset_size" in hparams["_hparams_/session_start_info"]
    assert any(t.startswith("reg/diagnosis") for t in tags["tensors"])
    layout = events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    assert b"reg/train_eval/loss" in layout and b"val_loss" in layout and b"reg/gap/loss" in layout
    hparams_dirs = [p for p in (tmp_path / "tb").rglob("*") if p.is_dir() and p != tmp_path]
    assert all(p.parent == tmp_path / "tb" for p in hparams_dirs)  # no extra run directories


def test_csv_logger_receives_the_same_scalars(tmp_path):
    logger = CSVLogger(tmp_path)
    fit(tmp_path, TinyClassifier(), [GeneralizationGapMonitor(64)], max_epochs=2, logger=logger)
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().split("\n")[0]
    for tag in ("reg/train_eval/loss", "reg/gap/acc", "reg/overfitting"):
        assert tag in header


def test_early_stopping_can_monitor_the_gap(tmp_path):
    gap = GeneralizationGapMonitor(64)
    es = EarlyStopping("reg/gap/loss", patience=50, check_on_train_epoch_end=True)
    fit(tmp_path, TinyClassifier(), [gap, es], max_epochs=3)
    assert es.best_epoch >= 0


def test_state_round_trip_and_bad_arguments(tmp_path):
    gap = GeneralizationGapMonitor(64)
    fit(tmp_path, TinyClassifier(), [gap], max_epochs=2)
    other = GeneralizationGapMonitor(64)
    other.load_state_dict(gap.state_dict())
    assert other.history == gap.history and len(other.history["val_loss"]["gap"]) == 2
    with pytest.raises(ValueError, match="subset_size"):
        GeneralizationGapMonitor(0)
    with pytest.raises(ValueError, match="patience"):
        GeneralizationGapMonitor(window=3, patience=3)


def test_requested_metric_never_logged(tmp_path):
    with pytest.raises(RuntimeError, match="val_f1"):
        fit(tmp_path, TinyClassifier(), [GeneralizationGapMonitor(64, metrics=["val_f1"])],
            max_epochs=1)  # fmt: skip


def test_iterable_dataset_needs_an_explicit_dataset(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            data = BlobsDataModule().train_set
            return iter(data[i] for i in range(len(data)))

    class StreamData(BlobsDataModule):
        def train_dataloader(self):
            return DataLoader(Stream(), batch_size=32)

    with pytest.raises(RuntimeError, match="dataset="):
        fit(tmp_path, TinyClassifier(), [GeneralizationGapMonitor(64)], dm=StreamData(),
            max_epochs=1)  # fmt: skip
    dm = StreamData()
    gap = GeneralizationGapMonitor(64, dataset=dm.train_set)
    fit(tmp_path, TinyClassifier(), [gap], dm=dm, max_epochs=1)
    assert gap.history
