"""What our callbacks change on the module, optimizers and themselves lasts exactly one ``fit``.

During ``fit`` the per-step hooks a callback leaves as ``Callback``'s no-ops are hidden from
Lightning's dispatcher, ``Mixup`` wraps ``on_after_batch_transfer`` and ``WeightDecayExclusion``
wraps ``configure_optimizers``. All of it is undone at the end of ``fit``, also when ``fit``
raises (Lightning then calls ``on_exception`` but not ``teardown``), so a second ``fit`` in the
same process (a notebook after a crash) runs with the new callbacks, not stale wrappers.
"""

import lightning.pytorch as pl
import pytest

from lightning_reg import EarlyStopping, Mixup, WeightDecayExclusion
from lightning_reg._utils import PER_STEP_HOOKS
from tests.helpers import BlobsDataModule, CrashAt, TinyClassifier, trainer_kwargs


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
