"""The functional ECE against direct implementations; CalibrationMonitor through a real fit."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassCalibrationError

from lightning_reg import CalibrationMonitor, GeneralizationGapMonitor, Mixup
from lightning_reg._subset import draw_indices
from lightning_reg.calibration import calibration_bins, expected_calibration_error
from tests.helpers import BlobsDataModule, TinyClassifier, trainer_kwargs


def direct_ece(probs: torch.Tensor, targets: torch.Tensor, n_bins: int) -> float:
    """Guo et al.'s ECE, written out: loop over samples into bins [i/n, (i+1)/n), 1.0 apart."""
    sums: dict[int, list[float]] = {}
    for row, target in zip(probs.tolist(), targets.tolist(), strict=True):
        confidence = max(row)
        hit = float(row.index(confidence) == target)
        b = n_bins if confidence == 1.0 else int(confidence * n_bins)
        total = sums.setdefault(b, [0.0, 0.0, 0.0])
        total[0] += 1
        total[1] += confidence
        total[2] += hit
    n = len(targets)
    return sum(abs(h / c - s / c) * c / n for c, s, h in sums.values())


def logits_from_dict(module, batch):
    """A `logits_fn` for a model whose forward returns a dict (also used by test_cli)."""
    return module(batch[0])["logits"]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_matches_a_direct_implementation_and_torchmetrics(seed, n_bins):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(300, 5, generator=g, dtype=torch.float64) * (1 + seed)
    logits[:7, 0] = 80.0  # saturated rows: confidence exactly 1.0 gets its own bin
    targets = torch.randint(0, 5, (300,), generator=g)
    probs = logits.softmax(1)
    ours = expected_calibration_error(logits, targets, n_bins)
    assert ours.item() == pytest.approx(direct_ece(probs, targets, n_bins), abs=1e-9)
    from_probs = expected_calibration_error(probs, targets, n_bins, outputs="probs")
    assert from_probs.item() == pytest.approx(ours.item())
    metric = MulticlassCalibrationError(num_classes=5, n_bins=n_bins, norm="l1")
    assert ours.item() == pytest.approx(metric(logits.float(), targets).item(), abs=1e-6)
    bins = calibration_bins(logits, targets, n_bins)
    assert bins.samples.sum().item() == 300 and bins.samples[-1].item() == 7
    assert bins.accuracy[-1].item() == pytest.approx((targets[:7] == 0).double().mean().item())


def test_ece_refuses_bad_input():
    probs, targets = torch.full((4, 3), 1 / 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="class indices"):
        expected_calibration_error(probs, F.one_hot(targets, 3).float())
    with pytest.raises(ValueError, match="prediction rows"):
        expected_calibration_error(probs, targets[:3])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        expected_calibration_error(torch.zeros(4), targets)
    with pytest.raises(ValueError, match="at least 2 classes"):
        expected_calibration_error(torch.zeros(4, 1), targets)
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(probs, targets, n_bins=0)
    with pytest.raises(ValueError, match="outputs='probs'"):  # probabilities given as logits
        expected_calibration_error(probs, targets)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        expected_calibration_error(probs - 0.5, targets, outputs="probs")
    with pytest.raises(ValueError, match="'logits' or 'probs'"):
        expected_calibration_error(probs, targets, outputs="softmax")


def test_logits_inside_zero_one_are_logits_unless_told_otherwise():
    g = torch.Generator().manual_seed(0)
    logits = torch.rand(200, 4, generator=g, dtype=torch.float64)  # raw scores in [0, 1)
    targets = torch.randint(0, 4, (200,), generator=g)
    want = direct_ece(logits.softmax(1), targets, 15)
    assert expected_calibration_error(logits, targets).item() == pytest.approx(want, abs=1e-9)
    assert direct_ece(logits, targets, 15) != pytest.approx(want, abs=1e-3)  # the old guess


def _direct_callback_values(model, dm, subset_size, n_bins=15):
    model.eval()
    with torch.no_grad():
        x, y = dm.val_set.tensors
        val = direct_ece(model(x).double().softmax(1), y, n_bins)
        idx = draw_indices(dm.train_set, subset_size, torch.Generator().manual_seed(0))
        x, y = dm.train_set.tensors
        train = direct_ece(model(x[idx]).double().softmax(1), y[idx], n_bins)
    return val, train


def test_logged_ece_equals_a_direct_computation_beside_mixup_and_the_gap_monitor(tmp_path):
    pl.seed_everything(0, verbose=False)
    model, dm = TinyClassifier(hidden=32, lr=0.1), BlobsDataModule(label_noise=0.2)
    calibration = CalibrationMonitor(subset_size=100)
    callbacks = [Mixup(0.4, label_smoothing=0.1, num_classes=4), GeneralizationGapMonitor(64)]
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, callbacks=[*callbacks, calibration], max_epochs=3, num_sanity_val_steps=2,
    ))  # fmt: skip
    trainer.fit(model, datamodule=dm)
    val, train = _direct_callback_values(model, dm, 100)
    logged = trainer.callback_metrics
    assert logged["reg/calibration/val_ece"].item() == pytest.approx(val, abs=1e-5)
    assert logged["reg/calibration/train_ece"].item() == pytest.approx(train, abs=1e-5)
    assert logged["reg/calibration/gap"].item() == pytest.approx(val - train, abs=1e-5)
    assert "reg/gap/loss" in logged  # the gap monitor ran in the same fit
    assert len(calibration.history["val_ece"]) == 3  # one per validation, no sanity check
    assert calibration.history["val_ece"][-1] == pytest.approx(val, abs=1e-5)


class DictOutput(TinyClassifier):
    def forward(self, x):
        return {"logits": self.net(x)}

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0])["logits"], batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0])["logits"], batch[1]))


def test_a_forward_that_is_not_inputs_to_logits_needs_logits_fn(tmp_path):
    def fit(callback):
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(**trainer_kwargs(
            tmp_path, callbacks=[callback], max_epochs=1, num_sanity_val_steps=1,
        ))  # fmt: skip
        trainer.fit(DictOutput(), datamodule=BlobsDataModule())
        return trainer

    with pytest.raises(ValueError, match="logits_fn="):
        fit(CalibrationMonitor(subset_size=32))  # refused in the sanity check, before training
    trainer = fit(CalibrationMonitor(subset_size=32, logits_fn=logits_from_dict))
    assert 0 <= trainer.callback_metrics["reg/calibration/val_ece"].item() <= 1


class SquashedLogits(TinyClassifier):
    """Raw logits that always lie in (0, 1): the value range cannot tell them from probs."""

    def forward(self, x):
        return torch.sigmoid(self.net(x))


class SoftmaxOutputs(TinyClassifier):
    def forward(self, x):
        return self.net(x).softmax(-1)


def test_outputs_are_declared_once_not_guessed_per_batch(tmp_path):
    def fit(model, callback, sanity=0):
        pl.seed_everything(0, verbose=False)
        dm = BlobsDataModule()
        trainer = pl.Trainer(**trainer_kwargs(
            tmp_path, callbacks=[callback], max_epochs=1, num_sanity_val_steps=sanity,
        ))  # fmt: skip
        trainer.fit(model, datamodule=dm)
        model.eval()
        x, y = dm.val_set.tensors
        with torch.no_grad():
            outputs = model(x).double()
        return trainer.callback_metrics["reg/calibration/val_ece"].item(), outputs, y

    logged, outputs, y = fit(SquashedLogits(hidden=32), CalibrationMonitor(subset_size=32))
    assert logged == pytest.approx(direct_ece(outputs.softmax(1), y, 15), abs=1e-5)
    assert logged != pytest.approx(direct_ece(outputs, y, 15), abs=1e-3)  # not read as probs
    monitor = CalibrationMonitor(subset_size=32, outputs="probs")
    logged, outputs, y = fit(SoftmaxOutputs(hidden=32), monitor)
    assert logged == pytest.approx(direct_ece(outputs, y, 15), abs=1e-5)
    # contradictions are refused once, in the sanity check, naming the fix
    with pytest.raises(ValueError, match=r"validation batch.*outputs='probs'"):
        fit(SoftmaxOutputs(hidden=32), CalibrationMonitor(subset_size=32), sanity=1)
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*outputs='logits'"):
        fit(TinyClassifier(hidden=32), CalibrationMonitor(outputs="probs"), sanity=1)
    with pytest.raises(ValueError, match="outputs"):
        CalibrationMonitor(outputs="softmax")


class SoftValidation(BlobsDataModule):
    def val_dataloader(self):
        x, y = self.val_set.tensors
        return DataLoader(TensorDataset(x, F.one_hot(y, 4).float()), batch_size=32)


def test_bad_input_is_refused(tmp_path):
    for kwargs in ({"subset_size": 0}, {"n_bins": 0}, {"num_classes": 1}, {"logits_fn": 3}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            CalibrationMonitor(**kwargs)
    cases = [
        (SoftValidation(), CalibrationMonitor(), "integer class indices"),
        (BlobsDataModule(), CalibrationMonitor(num_classes=10), "num_classes=10"),
    ]
    for dm, callback, message in cases:
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_epochs=1))
        with pytest.raises(ValueError, match=message):
            trainer.fit(TinyClassifier(), datamodule=dm)


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_two_processes_give_the_single_process_value(tmp_path):
    pl.seed_everything(0, verbose=False)
    # 127 validation samples: DistributedSampler pads rank 1 with sample 0, which is dropped
    model, dm = TinyClassifier(hidden=32, lr=0.1), BlobsDataModule(shuffle=False, n_val=127)
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, max_epochs=1, devices=2, strategy="ddp_spawn",
        callbacks=[CalibrationMonitor(subset_size=101)],
    ))  # fmt: skip
    trainer.fit(model, datamodule=dm)
    val, train = _direct_callback_values(model, dm, 101)  # the trained weights, one process
    x, y = dm.val_set.tensors
    padded = torch.cat([torch.arange(127), torch.tensor([0])])
    with torch.no_grad():
        with_duplicate = direct_ece(model(x[padded]).double().softmax(1), y[padded], 15)
    assert with_duplicate != pytest.approx(val, abs=1e-5)  # counting the padding would show
    logged = trainer.callback_metrics
    assert logged["reg/calibration/val_ece"].item() == pytest.approx(val, abs=1e-5)
    assert logged["reg/calibration/train_ece"].item() == pytest.approx(train, abs=1e-5)


def test_under_the_pytorch_lightning_package(tmp_path):
    from lightning_reg.pytorch_lightning import CalibrationMonitor as PLCalibrationMonitor
    from tests.compat.pl_helpers import PLClassifier, PLData, pl_trainer

    pl.seed_everything(0, verbose=False)
    model, data = PLClassifier(), PLData()
    trainer = pl_trainer(tmp_path, callbacks=[PLCalibrationMonitor(subset_size=32)], max_epochs=2)
    trainer.fit(model, datamodule=data)
    val, train = _direct_callback_values(model, data, 32)
    logged = trainer.callback_metrics
    assert logged["reg/calibration/val_ece"].item() == pytest.approx(val, abs=1e-5)
    assert logged["reg/calibration/train_ece"].item() == pytest.approx(train, abs=1e-5)


def test_bf16_mixed_scores_the_autocast_outputs(tmp_path):
    pl.seed_everything(0, verbose=False)
    model, dm = TinyClassifier(hidden=32, lr=0.1), BlobsDataModule()
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, callbacks=[CalibrationMonitor(subset_size=64)], max_epochs=1,
        precision="bf16-mixed",
    ))  # fmt: skip
    trainer.fit(model, datamodule=dm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        val, train = _direct_callback_values(model, dm, 64)
    full_precision_val, _ = _direct_callback_values(model, dm, 64)
    logged = trainer.callback_metrics
    assert logged["reg/calibration/val_ece"].item() == pytest.approx(val, abs=1e-5)
    assert logged["reg/calibration/train_ece"].item() == pytest.approx(train, abs=1e-5)
    assert val != full_precision_val  # the autocast outputs were scored, not float32 ones
