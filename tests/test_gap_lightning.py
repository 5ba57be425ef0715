"""GeneralizationGapMonitor runs the user's step the way Lightning runs validation.

Precision (bf16-mixed autocast, bf16-true inputs), logging through Lightning's own result
collection (``log`` is never replaced), several validation dataloaders, clear errors at fit start,
``evaluate_after_validation`` for callbacks that read the gap first, a clean start for every fit,
and one checkpoint state per instance.
"""

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, IterableDataset

from lightning_reg import GeneralizationGapMonitor
from tests.helpers import BlobsDataModule, TinyClassifier, trainer_kwargs


def fit(tmp_path, model, callbacks, dm=None, ckpt_path=None, **overrides):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(model, datamodule=dm or BlobsDataModule(), ckpt_path=ckpt_path)
    return trainer


class StepRecorder(TinyClassifier):
    """Records, at every ``validation_step`` call, what the step sees."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def validation_step(self, batch, batch_idx, *args):
        x, y = batch
        logits = self(x)
        self.seen.append({
            "logits": logits.dtype, "inputs": x.dtype, "log_replaced": "log" in vars(self),
            "args": args, "grad": torch.is_grad_enabled(), "training": self.training,
        })  # fmt: skip
        self.log("val_loss", F.cross_entropy(logits.float(), y), sync_dist=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), sync_dist=True)


class Phase(pl.Callback):
    """Marks the ``validation_step`` calls that come after Lightning's validation epoch: ours."""

    def __init__(self, model):
        self.model, self.boundary = model, None

    def on_validation_epoch_end(self, trainer, pl_module):
        self.boundary = None if trainer.sanity_checking else len(self.model.seen)

    def _mark(self):
        if self.boundary is not None:
            seen = self.model.seen
            seen[self.boundary :] = [{**s, "ours": True} for s in seen[self.boundary :]]
            self.boundary = None

    def on_validation_start(self, trainer, pl_module):
        self._mark()

    def on_train_end(self, trainer, pl_module):
        self._mark()


def ours(model):
    return [s for s in model.seen if s.get("ours")]


# ------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize(
    ("precision", "logits", "inputs"),
    [("bf16-mixed", torch.bfloat16, torch.float32), ("bf16-true", torch.bfloat16, torch.bfloat16)],
)
def test_the_pass_runs_under_the_trainers_precision(tmp_path, precision, logits, inputs):
    model = StepRecorder()
    fit(tmp_path, model, [Phase(model), GeneralizationGapMonitor(64, batch_size=32)],
        max_epochs=2, precision=precision)  # fmt: skip
    assert len(ours(model)) == 4  # 2 validations x 2 balanced batches of 32
    lightning = [s for s in model.seen if not s.get("ours")]
    for seen in ours(model):  # what Lightning's own validation_step calls see
        assert seen["logits"] == lightning[0]["logits"] == logits
        assert seen["inputs"] == lightning[0]["inputs"] == inputs
        assert not seen["grad"] and not seen["training"]


# ------------------------------------------------------------------------------------- logging
def test_log_is_never_replaced_and_validation_results_are_unchanged(tmp_path):
    runs = {}
    for label, gap in (("plain", None), ("monitored", GeneralizationGapMonitor(64))):
        pl.seed_everything(0, verbose=False)
        model = StepRecorder(batchnorm=True, dropout=0.2)
        after = []

        class After(pl.Callback):  # placed after the monitor: the state its hooks leave
            def on_validation_end(self, trainer, pl_module, after=after):
                after.append({k: v.clone() for k, v in trainer.callback_metrics.items()})

        callbacks = [Phase(model), *([gap] if gap else []), After()]
        trainer = fit(tmp_path / label, model, callbacks, max_epochs=3, val_check_interval=0.5)
        runs[label] = (model, trainer, after)
    (_, plain_trainer, plain_after), (mon, mon_trainer, mon_after) = runs.values()
    assert ours(mon) and not any(s["log_replaced"] for s in mon.seen)
    assert "log" not in vars(mon)

    def theirs(metrics):
        return {k: v for k, v in metrics.items() if not k.startswith("reg/")}

    for key in ("callback_metrics", "logged_metrics", "progress_bar_metrics"):
        a, b = getattr(plain_trainer, key), theirs(getattr(mon_trainer, key))
        assert a.keys() == b.keys(), key
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a), key
    assert len(plain_after) == len(mon_after) == 6
    for a, b in zip(plain_after, mon_after, strict=True):
        assert a.keys() == theirs(b).keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert "reg/gap/loss" in mon_after[-1]


# ---------------------------------------------------------------------- several val dataloaders
class TwoValLoaders(BlobsDataModule):
    """Validation loader 0: the validation set; loader 1: the whole training set."""

    def val_dataloader(self):
        return [DataLoader(self.val_set, batch_size=32), DataLoader(self.train_set, batch_size=64)]


@pytest.mark.parametrize("metrics", [None, ["val_loss"], ["val_loss/dataloader_idx_1"]])
def test_two_validation_dataloaders_compare_with_the_chosen_one(tmp_path, metrics):
    model = StepRecorder()
    gap = GeneralizationGapMonitor(256, metrics=metrics, val_dataloader_idx=1)  # the whole set
    trainer = fit(tmp_path, model, [Phase(model), gap], dm=TwoValLoaders(), max_epochs=2)
    assert {s["args"] for s in ours(model)} == {(1,)}  # handed the chosen dataloader_idx
    m = trainer.callback_metrics
    # dataloader 1 holds the subset's samples: the same value, batched differently
    assert m["reg/train_eval/loss"].item() == pytest.approx(m["val_loss/dataloader_idx_1"].item())
    assert abs(m["reg/gap/loss"].item()) < 1e-5
    assert list(gap.history) == ["val_loss"] if metrics else ["val_loss", "val_acc"]


def test_two_validation_dataloaders_default_to_the_first(tmp_path):
    gap = GeneralizationGapMonitor(64)
    trainer = fit(tmp_path, StepRecorder(), [gap], dm=TwoValLoaders(), max_epochs=1)
    m = trainer.callback_metrics
    expected = m["val_loss/dataloader_idx_0"] - m["reg/train_eval/loss"]
    assert m["reg/gap/loss"].item() == pytest.approx(expected.item())


def test_dataloader_names_and_indices_are_checked(tmp_path):
    with pytest.raises(ValueError, match="val_dataloader_idx=1"):
        GeneralizationGapMonitor(metrics=["val_loss/dataloader_idx_1"])
    with pytest.raises(ValueError, match="val_dataloader_idx"):
        GeneralizationGapMonitor(val_dataloader_idx=-1)
    with pytest.raises(RuntimeError, match="2 validation dataloader"):
        fit(tmp_path, StepRecorder(), [GeneralizationGapMonitor(64, val_dataloader_idx=2)],
            dm=TwoValLoaders(), max_epochs=1)  # fmt: skip


# ---------------------------------------------------------------------------- errors, at start
class CountsSteps(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)


class Stream(IterableDataset):
    def __iter__(self):
        data = BlobsDataModule().train_set
        return iter(data[i] for i in range(len(data)))


class StreamData(BlobsDataModule):
    def train_dataloader(self):
        return DataLoader(Stream(), batch_size=32)


def test_an_iterable_training_set_fails_before_the_first_step(tmp_path):
    model = CountsSteps()
    with pytest.raises(RuntimeError, match="dataset="):
        fit(tmp_path, model, [GeneralizationGapMonitor(64)], dm=StreamData(), max_epochs=1)
    assert model.steps == 0


def test_a_module_without_validation_step_fails_at_setup(tmp_path):
    class NoValidation(CountsSteps):
        validation_step = pl.LightningModule.validation_step

    model = NoValidation()
    with pytest.raises(RuntimeError, match="no `validation_step`"):
        fit(tmp_path, model, [GeneralizationGapMonitor(64)], max_epochs=1)
    assert model.steps == 0


# ------------------------------------------------------------------- evaluate_after_validation
class ReadsTheGapFirst(pl.Callback):
    """Placed BEFORE the monitor, like an early stopping checking in ``on_validation_end``."""

    def __init__(self, gap):
        self.gap, self.read = gap, []

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.gap.evaluate_after_validation(trainer, pl_module)
        self.gap.evaluate_after_validation(trainer, pl_module)  # idempotent
        self.read.append(trainer.callback_metrics["reg/gap/loss"].item())


def test_a_callback_placed_first_reads_this_validations_gap(tmp_path):
    passes = []

    class Counting(GeneralizationGapMonitor):
        def _run_pass(self, trainer, pl_module):
            passes.append(trainer.global_step)
            super()._run_pass(trainer, pl_module)

    gap = Counting(64)
    reader = ReadsTheGapFirst(gap)
    fit(tmp_path, TinyClassifier(), [reader, gap], max_epochs=2, val_check_interval=0.5,
        num_sanity_val_steps=2)  # fmt: skip
    assert passes == [4, 8, 12, 16]  # once per validation, mid-epoch ones included
    assert reader.read == pytest.approx(gap.history["val_loss"]["gap"])


# ----------------------------------------------------------------------- fit to fit, and state
class SubsetSource(pl.Callback):
    def __init__(self, gap):
        self.gap, self.sources = gap, []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.sources.append(self.gap._subset_loader(trainer).dataset.dataset)


def test_a_reused_monitor_starts_every_fit_clean(tmp_path):
    gap = GeneralizationGapMonitor(64)
    source = SubsetSource(gap)
    fit(tmp_path / "a", TinyClassifier(), [gap, source], max_epochs=3)
    dm_b = BlobsDataModule(seed=7)
    pl.seed_everything(1, verbose=False)
    fit(tmp_path / "b", TinyClassifier(), [gap, source], dm=dm_b, max_epochs=2)
    fresh = GeneralizationGapMonitor(64)
    pl.seed_everything(1, verbose=False)
    fit(tmp_path / "c", TinyClassifier(), [fresh], dm=BlobsDataModule(seed=7), max_epochs=2)
    assert gap.history == fresh.history  # only B's two evaluations, equal to a fresh monitor's
    assert len(gap.history["val_loss"]["gap"]) == 2
    assert all(s is dm_b.train_set for s in source.sources[3:])
    assert gap._loader is None  # nothing of the last fit's data is kept


def test_two_monitors_keep_their_own_checkpoint_state(tmp_path):
    def monitors():
        return [GeneralizationGapMonitor(32, seed=1), GeneralizationGapMonitor(128, seed=1)]

    first = monitors()
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    fit(tmp_path, TinyClassifier(), [*first, ck], max_epochs=2, enable_checkpointing=True)
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["callbacks"]
    assert first[0].state_key != first[1].state_key
    assert {first[0].state_key, first[1].state_key} <= set(saved)
    assert first[0].history != first[1].history  # different subsets, different train values

    resumed = monitors()
    fit(tmp_path / "r", TinyClassifier(), resumed, ckpt_path=tmp_path / "ck" / "last.ckpt",
        max_epochs=3)  # fmt: skip
    for before, after in zip(first, resumed, strict=True):
        for key in ("val", "train", "gap"):
            assert after.history["val_loss"][key][:2] == before.history["val_loss"][key]
            assert len(after.history["val_loss"][key]) == 3
