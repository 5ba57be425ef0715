"""Our callbacks attach through Lightning's hooks: `fit` leaves the user's objects as they were.

For every callback of the canonical table (and the whole stack), also when ``fit`` raises:

- ``vars(module)`` and ``vars(datamodule)`` hold exactly what a bare ``fit`` leaves there, and no
  object of ours;
- ``trainer.callbacks`` is the same list, in the same order, from ``setup`` to the end of ``fit``;
- the optimizers keep their methods: no instance attribute is added to them;
- a deep copy or pickle of the module, taken mid-fit (as ``WeightAveraging`` does), drags neither
  the Trainer nor the data along;
- no submodule changes class, with one narrow exception: the layers ``SpectralNormalization``
  constrains carry torch's parametrization (class swapped, ``parametrizations`` added), by design
  and also after fit; torch pickles no parametrized module, so the pickle checks pass exactly
  those layers by reference (``tests.test_stack.constrained_layers``).
"""

import copy
import io
import pickle

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from tests.helpers import BlobsDataModule, CrashAt, TinyClassifier, trainer_kwargs
from tests.test_stack import CASES, build, constrained_layers


class RecordsOptimizers(TinyClassifier):
    """Records the instance attributes of each optimizer as ``configure_optimizers`` built it."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        self.built_optimizer_keys = set(vars(optimizer))
        return optimizer


class _DragDetector(pickle.Pickler):
    """A pickler that records every Trainer, DataModule, DataLoader or Dataset it meets."""

    def __init__(self, file, by_reference=()):
        super().__init__(file)
        self.dragged = []
        self.by_reference = by_reference

    def persistent_id(self, obj):
        if id(obj) in self.by_reference:
            return id(obj)
        if isinstance(obj, pl.Trainer | pl.LightningDataModule | DataLoader | Dataset):
            self.dragged.append(type(obj).__name__)
            return id(obj)
        return None


def _ours(value) -> bool:
    return type(value).__module__.startswith("lightning_reg")


class Probe(pl.Callback):
    """Checks, at every stage of ``fit``, what the other callbacks may not change."""

    def __init__(self, others=()):
        self.others = list(others)
        self.callbacks = None
        self.problems = []
        self.copied = False

    def setup(self, trainer, pl_module, stage):
        self.callbacks = list(trainer.callbacks)

    def _check_callbacks(self, trainer, where):
        if list(trainer.callbacks) != self.callbacks:
            self.problems.append(f"trainer.callbacks changed by {where}")

    def _check_optimizers(self, trainer, pl_module, where):
        for optimizer in trainer.optimizers:
            if set(vars(optimizer)) != pl_module.built_optimizer_keys:
                added = set(vars(optimizer)) - pl_module.built_optimizer_keys
                self.problems.append(f"optimizer attributes {added} added by {where}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._check_callbacks(trainer, "on_train_batch_start")
        self._check_optimizers(trainer, pl_module, "on_train_batch_start")
        if not self.copied:  # what WeightAveraging does in `setup`, and users do for EMA
            self.copied = True
            twin = copy.deepcopy(pl_module)
            if any(_ours(v) for v in vars(twin).values()):
                self.problems.append("a deep copy of the module carries our objects")
            detector = _DragDetector(io.BytesIO(), constrained_layers(pl_module, self.others))
            detector.dump(pl_module)
            if detector.dragged:
                self.problems.append(f"pickling the module drags {detector.dragged}")

    def on_train_end(self, trainer, pl_module):
        self._check_callbacks(trainer, "on_train_end")
        self._check_optimizers(trainer, pl_module, "on_train_end")

    def on_exception(self, trainer, pl_module, exception):
        self._check_callbacks(trainer, "on_exception")


def _fit(root, callbacks, crash):
    pl.seed_everything(0, verbose=False)
    model = RecordsOptimizers(optimizer="adamw", weight_decay=0.05)
    dm = BlobsDataModule()
    before = (dict(vars(model)), dict(vars(dm)))
    probe = Probe(callbacks)
    extra = [CrashAt(1)] if crash else []
    trainer = pl.Trainer(**trainer_kwargs(
        root, callbacks=[*callbacks, probe, ModelCheckpoint(dirpath=root / "ck"), *extra],
        max_epochs=2, enable_checkpointing=True,
    ))  # fmt: skip
    if crash:
        with pytest.raises(RuntimeError, match="simulated crash"):
            trainer.fit(model, datamodule=dm)
    else:
        trainer.fit(model, datamodule=dm)
    return model, dm, before, probe, trainer


def _added_keys(obj, before):
    return {k for k in vars(obj) if k not in before or vars(obj)[k] is not before[k]}


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """What a fit without our callbacks leaves on the module and the datamodule."""
    out = {}
    for crash in (False, True):
        model, dm, _, _, _ = _fit(tmp_path_factory.mktemp("bare"), [], crash)
        out[crash] = (set(vars(model)), set(vars(dm)))
    return out


@pytest.mark.parametrize("crash", [False, True], ids=["fit", "fit-raises"])
@pytest.mark.parametrize("case", CASES)
def test_fit_leaves_user_objects_as_it_found_them(tmp_path, bare, case, crash):
    callbacks = build(case)
    model, dm, _, probe, trainer = _fit(tmp_path, callbacks, crash)
    assert probe.problems == []
    module_keys, datamodule_keys = bare[crash]
    assert set(vars(model)) == module_keys
    assert set(vars(dm)) == datamodule_keys
    assert not [k for k, v in vars(model).items() if _ours(v)]
    assert not [k for k, v in vars(dm).items() if _ours(v)]
    # the user's methods are the class's methods again (nothing shadowed on the instance)
    for name in ("configure_optimizers", "on_after_batch_transfer", "log", "training_step"):
        assert name not in vars(model), name
    assert list(trainer.callbacks) == probe.callbacks
    layers = constrained_layers(model, callbacks)
    fresh = RecordsOptimizers()  # no other submodule changed class
    for name, module in model.named_modules():
        if id(module) not in layers and "parametrizations" not in name.split("."):
            assert type(module) is type(fresh.get_submodule(name)), name
    detector = _DragDetector(io.BytesIO(), layers)
    detector.dump(model)
    assert detector.dragged == []
    pickle.loads(pickle.dumps(callbacks))
    torch.save(model.state_dict(), tmp_path / "w.pt")
