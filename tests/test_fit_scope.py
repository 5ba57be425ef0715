"""What our callbacks change on the module, optimizers and themselves lasts exactly one ``fit``.

During ``fit`` the per-step hooks a callback leaves as ``Callback``'s no-ops are hidden from
Lightning's dispatcher, ``Mixup`` wraps ``on_after_batch_transfer`` and ``WeightDecayExclusion``
wraps ``configure_optimizers``. All of it is undone at the end of ``fit``, also when ``fit``
raises (Lightning then calls ``on_exception`` but not ``teardown``), so a second ``fit`` in the
same process (a notebook after a crash) runs with the new callbacks, not stale wrappers.
"""

import pickle

import lightning.pytorch as pl
import pytest
import torch

from lightning_reg import EarlyStopping, Mixup, WeightDecayExclusion
from lightning_reg._utils import PER_STEP_HOOKS
from lightning_reg.mixup import current_plan
from tests.helpers import BlobsDataModule, CrashAt, TinyClassifier, same_state, trainer_kwargs


class CrashesInTest(TinyClassifier):
    def test_step(self, batch, batch_idx):
        raise RuntimeError("simulated crash in test")


class CountingEarlyStopping(EarlyStopping):
    """A user's subclass that overrides a per-step hook and calls ``super()``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.batches += 1


class MixedBatches(pl.Callback):
    """Counts training batches whose targets arrive as probability rows (mixed by Mixup)."""

    def __init__(self):
        self.soft = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.soft += int(batch[1].is_floating_point())


def fit(root, model, callbacks, **overrides):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(root, callbacks=callbacks, **overrides))
    trainer.fit(model, datamodule=BlobsDataModule())
    return trainer


def test_a_subclass_that_overrides_a_per_step_hook_is_still_called(tmp_path):
    es = CountingEarlyStopping("val_loss", patience=10)
    fit(tmp_path, TinyClassifier(), [es], max_epochs=2)
    assert es.batches == 16  # 2 epochs x 8 batches
    assert "on_train_batch_end" not in vars(es) and "on_before_backward" not in vars(es)


def test_a_fit_that_raises_leaves_nothing_behind_and_the_next_fit_is_clean(tmp_path):
    model = TinyClassifier(optimizer="adamw", weight_decay=0.1)
    crashed = [EarlyStopping("val_loss"), Mixup(0.4, num_classes=4), WeightDecayExclusion()]
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "a", model, [*crashed, CrashAt(1)], max_epochs=3)
    for callback in crashed:
        assert not any(hook in vars(callback) for hook in PER_STEP_HOOKS), callback
    assert "on_after_batch_transfer" not in vars(model)
    assert "configure_optimizers" not in vars(model)

    # a new fit in the same process, with new callbacks: they (not the crashed ones) act
    mix, counter = Mixup(0.4, num_classes=4), MixedBatches()
    exclusion = WeightDecayExclusion(exclude=("net.0.weight",))
    trainer = fit(tmp_path / "b", model, [mix, exclusion, counter], max_epochs=1)
    assert counter.soft == 8 and mix.batches_seen == 8
    no_decay = [g for g in trainer.optimizers[0].param_groups if g["weight_decay"] == 0.0]
    names = {n for n, p in model.named_parameters() for g in no_decay for q in g["params"]
             if p is q}  # fmt: skip
    assert names == {"net.0.weight", "net.0.bias", "net.3.bias"}
    assert "on_after_batch_transfer" not in vars(model)
    assert crashed[1].batches_seen == 8  # its first epoch only: the stale wrapper was not used


def test_a_hook_set_on_the_instance_is_kept_and_called(tmp_path):
    mix, calls = Mixup(0.4, num_classes=4), []
    mix.on_train_batch_end = lambda *args: calls.append(1)
    fit(tmp_path, TinyClassifier(), [mix], max_epochs=1)
    assert len(calls) == 8 and callable(vars(mix)["on_train_batch_end"])


def test_restore_happens_only_in_a_fit_that_started(tmp_path):
    model, es = CrashesInTest(), EarlyStopping("val_loss", patience=10)
    trainer = fit(tmp_path, model, [es], max_epochs=2)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.net[0].weight.add_(1.0)  # weights after fit, changed by the user
    changed = {k: v.clone() for k, v in model.state_dict().items()}
    assert not same_state(changed, trained)
    trainer.validate(model, datamodule=BlobsDataModule(), verbose=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.test(model, dataloaders=BlobsDataModule().val_dataloader(), verbose=False)
    assert same_state(model.state_dict(), changed)  # neither restored the old snapshot
    assert es._restorer not in trainer.callbacks


def test_a_crashed_fit_leaves_no_restorer_or_published_plan_for_the_next_run(tmp_path):
    model = TinyClassifier()
    es, mix = EarlyStopping("val_loss"), Mixup(0.4, num_classes=4, keep_targets=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[es, mix, CrashAt(1)], max_epochs=3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(model, datamodule=BlobsDataModule())
    assert current_plan(model) is None and not mix._plans._blocks
    assert es._restorer in trainer.callbacks  # appended for the restore; taken out at setup
    trainer.validate(model, datamodule=BlobsDataModule(), verbose=False)
    assert es._restorer not in trainer.callbacks


def test_no_device_tensor_or_block_is_kept_after_fit(tmp_path):
    mix = Mixup(0.4, num_classes=4)
    fit(tmp_path, TinyClassifier(), [mix], max_epochs=1)
    assert not mix._plans._blocks and mix._plans._rows is None
    restored = pickle.loads(pickle.dumps(mix))
    assert restored._plans.owner is restored
