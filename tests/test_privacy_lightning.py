"""MembershipInferenceAudit takes Lightning's evaluation path and its lifecycle rules.

Batch hooks and precision as in validation, clear errors at fit start, ``evaluate_after_validation``
for callbacks that read its values first, a clean start for every fit, one checkpoint state per
instance.
"""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, IterableDataset

from lightning_reg.privacy import MembershipInferenceAudit
from tests.helpers import BlobsDataModule, TinyClassifier, trainer_kwargs


def fit(tmp_path, model, callbacks, dm=None, ckpt_path=None, **overrides):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(model, datamodule=dm or BlobsDataModule(), ckpt_path=ckpt_path)
    return trainer


class DictBatches(TinyClassifier):
    """Its data comes as dicts; ``on_before_batch_transfer`` turns them into ``(x, y)``, as the
    steps expect, and records the dtype the forward sees."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.forward_dtypes = []

    def on_before_batch_transfer(self, batch, dataloader_idx):
        return batch["a"], batch["b"]

    def forward(self, x):
        out = super().forward(x)
        self.forward_dtypes.append(out.dtype)
        return out


class DictData(BlobsDataModule):
    def _dicts(self, data, **kwargs):
        def collate(rows):
            x, y = zip(*rows, strict=True)
            return {"a": torch.stack(x), "b": torch.stack(y)}  # keys no adapter guesses

        return DataLoader(data, batch_size=32, collate_fn=collate, **kwargs)

    def train_dataloader(self):
        return self._dicts(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._dicts(self.val_set)


def test_batches_take_the_hooks_and_precision_of_validation(tmp_path):
    model = DictBatches()
    audit = MembershipInferenceAudit(64)
    trainer = fit(tmp_path, model, [audit], dm=DictData(), max_epochs=1, precision="bf16-mixed")
    assert 0 <= trainer.callback_metrics["reg/privacy/auc"].item() <= 1
    assert set(model.forward_dtypes) == {torch.bfloat16}


class Stream(IterableDataset):
    def __iter__(self):
        data = BlobsDataModule().train_set
        return iter(data[i] for i in range(len(data)))


class StreamData(BlobsDataModule):
    def train_dataloader(self):
        return DataLoader(Stream(), batch_size=32)


class CountsSteps(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)


def test_an_iterable_training_set_fails_before_the_first_step(tmp_path):
    model = CountsSteps()
    with pytest.raises(RuntimeError, match="train_dataset="):
        fit(tmp_path, model, [MembershipInferenceAudit(64)], dm=StreamData(), max_epochs=1)
    assert model.steps == 0
    dm = StreamData()
    audit = MembershipInferenceAudit(64, train_dataset=dm.train_set)
    trainer = fit(tmp_path, TinyClassifier(), [audit], dm=dm, max_epochs=1)
    assert "reg/privacy/auc" in trainer.callback_metrics


def test_a_module_without_validation_step_fails_at_setup(tmp_path):
    class NoValidation(CountsSteps):
        validation_step = pl.LightningModule.validation_step

    model = NoValidation()
    with pytest.raises(RuntimeError, match="no `validation_step`"):
        fit(tmp_path, model, [MembershipInferenceAudit(64)], max_epochs=1)
    assert model.steps == 0


def test_a_callback_placed_first_reads_this_validations_audit(tmp_path):
    audits, read = [], []

    class Counting(MembershipInferenceAudit):
        def _audit(self, trainer, pl_module):
            audits.append(trainer.global_step)
            return super()._audit(trainer, pl_module)

    audit = Counting(64, every_n_evals=2)

    class ReadsFirst(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                audit.evaluate_after_validation(trainer, pl_module)
                audit.evaluate_after_validation(trainer, pl_module)
                read.append(trainer.callback_metrics.get("reg/privacy/auc"))

    fit(tmp_path, TinyClassifier(), [ReadsFirst(), audit], max_epochs=2, val_check_interval=0.5)
    assert audits == [8, 16]  # the 2nd and 4th validations, once each
    assert read[0] is None and read[1] is not None


def test_a_reused_audit_starts_every_fit_clean(tmp_path):
    audit = MembershipInferenceAudit(64, every_n_evals=2)
    fit(tmp_path / "a", TinyClassifier(), [audit], max_epochs=3)
    assert audit.state_dict() == {"evals": 3}
    dm_b = BlobsDataModule(seed=7)
    sources = []

    class Source(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            sources.append(audit._subset_loaders(trainer)[0].dataset.dataset)

    trainer = fit(tmp_path / "b", TinyClassifier(), [audit, Source()], dm=dm_b, max_epochs=2)
    assert audit.state_dict() == {"evals": 2}  # audited at B's 2nd validation, not A's 4th
    assert "reg/privacy/auc" in trainer.callback_metrics
    assert all(s is dm_b.train_set for s in sources)
    assert audit._loaders is None


def test_two_audits_keep_their_own_checkpoint_state(tmp_path):
    def audits():
        return [MembershipInferenceAudit(64, every_n_evals=1),
                MembershipInferenceAudit(64, every_n_evals=3)]  # fmt: skip

    first = audits()
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    fit(tmp_path, TinyClassifier(), [*first, ck], max_epochs=2, enable_checkpointing=True)
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["callbacks"]
    assert first[0].state_key != first[1].state_key
    assert {first[0].state_key, first[1].state_key} <= set(saved)
    resumed = audits()
    trainer = fit(tmp_path / "r", TinyClassifier(), resumed, max_epochs=3,
                  ckpt_path=tmp_path / "ck" / "last.ckpt")  # fmt: skip
    assert [a.state_dict() for a in resumed] == [{"evals": 3}, {"evals": 3}]
    assert "reg/privacy/auc" in trainer.callback_metrics  # the 3rd validation: both audit
