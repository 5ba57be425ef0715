"""Mixup and LabelSmoothing through Lightning's hooks: where the batch is changed, what the user's
objects keep, what a fit leaves to the next, and the errors that name ``num_classes``."""

import copy
import io

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from lightning_reg import LabelSmoothing, Mixup, mix_inputs
from tests.helpers import trainer_kwargs
from tests.test_attach import _DragDetector, _ours
from tests.test_mixup import ConvNet, CrashAtBatch, ImageData, fit, image_data


def hf_collate(samples):
    """A Hugging Face style batch: a dict with ``pixel_values`` and ``labels``."""
    x, y = default_collate(samples)
    return {"pixel_values": x, "labels": y}


class DictData(ImageData):
    def __init__(self, **kwargs):
        super().__init__(collate=hf_collate, **kwargs)


class DictNet(ConvNet):
    """Reads ``pixel_values``/``labels``; optionally wraps any network (e.g. a timm model)."""

    def __init__(self, net=None, classes=4):
        super().__init__(classes=classes)
        if net is not None:
            self.net = net
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch["pixel_values"], batch["labels"]
        self.seen["train"].append((type(batch), x.detach().clone(), y.detach().clone()))
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.detach())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch["pixel_values"], batch["labels"]
        self.seen["val"].append((type(batch), x.detach().clone(), y.detach().clone()))


class SeesBatchEnd(pl.Callback):
    """Records the targets that ``on_train_batch_end`` receives, and the batch objects."""

    def __init__(self):
        self.targets, self.same = [], []
        self._start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.same.append(batch is self._start)
        self.targets.append(batch["labels"] if isinstance(batch, dict) else batch[1])


# ------------------------------------------------------------------ where the batch is changed
@pytest.mark.parametrize(
    "make", [lambda: Mixup(0.8, 1.0, num_classes=4), lambda: LabelSmoothing(0.1, num_classes=4)]
)
def test_dict_batch_changed_in_place_and_seen_by_the_step_and_batch_end(tmp_path, make):
    model, seen = DictNet(), SeesBatchEnd()
    fit(tmp_path, model, [make(), seen], dm=DictData(), max_epochs=1)
    train = model.seen["train"]
    assert {kind for kind, _, _ in train} == {dict}
    assert all(y.shape == (len(y), 4) and torch.allclose(y.sum(1), torch.ones(len(y)))
               for _, _, y in train)  # fmt: skip
    assert all(seen.same) and len(seen.targets) == len(train)
    assert all(
        torch.equal(a, b) for a, b in zip(seen.targets, (y for _, _, y in train), strict=True)
    )
    assert all(y.dtype == torch.int64 for _, _, y in model.seen["val"])
    assert torch.isfinite(torch.stack(model.losses)).all()
    assert not [key for key, value in vars(model).items() if _ours(value)]


def test_mixed_inputs_are_new_tensors_the_dataset_is_untouched(tmp_path):
    dm = ImageData(shuffle=False)
    saved = dm.train_set.tensors[0].clone()
    fit(tmp_path, ConvNet(), [Mixup(0.8, 1.0, num_classes=4)], dm=dm, max_epochs=1)
    assert torch.equal(dm.train_set.tensors[0], saved)


@pytest.mark.parametrize(
    "options", [dict(mixup_alpha=0.8), dict(mixup_alpha=0.0, cutmix_alpha=1.0)],
    ids=["mixup", "cutmix"],
)  # fmt: skip
def test_timm_model_with_a_dict_batch(tmp_path, options):
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet10t", num_classes=4, pretrained=False)
    model = DictNet(net=net)
    dm = DictData(batch_size=8)
    dm.train_set = TensorDataset16(image_data(32))
    dm.val_set = TensorDataset16(image_data(8, seed=1))
    fit(tmp_path, model, [Mixup(**options, label_smoothing=0.1, num_classes=4)], dm=dm,
        max_epochs=1)  # fmt: skip
    targets = [y for _, _, y in model.seen["train"]]
    assert len(targets) == 4
    assert all(y.shape == (8, 4) and torch.allclose(y.sum(1), torch.ones(8)) for y in targets)
    assert all(float(y.min()) >= 0.1 / 4 - 1e-6 for y in targets)  # smoothed rows
    assert torch.isfinite(torch.stack(model.losses)).all()


class TensorDataset16(Dataset):
    """``image_data`` upsampled to 3x16x16 (what a timm stem needs at least)."""

    def __init__(self, data):
        x, y = data.tensors
        self.x, self.y = F.interpolate(x, size=(16, 16)), y
        self.tensors = (self.x, self.y)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


# ---------------------------------------------------------------- nothing of ours on the module
def test_ema_weight_averaging_after_mixup_copies_nothing_of_ours(tmp_path):
    model, ema = ConvNet(), EMAWeightAveraging()
    fit(tmp_path, model, [Mixup(0.4, num_classes=4, keep_targets=True), ema], max_epochs=2)
    averaged = ema._average_model.module
    assert not [k for k, v in vars(averaged).items() if _ours(v)]
    detector = _DragDetector(io.BytesIO())
    detector.dump(averaged)
    assert detector.dragged == []
    assert averaged._trainer is None
    assert not any(type(m).__module__.startswith("lightning_reg") for m in averaged.modules())


def test_keep_targets_plan_lives_on_the_callback_and_is_withdrawn(tmp_path):
    mix = Mixup(0.4, num_classes=4, keep_targets=True)
    plans = []

    class Peek(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            plans.append(mix.current_plan)
            assert copy.deepcopy(pl_module)._trainer is None  # nothing drags the Trainer along

    model = ConvNet(use_mixin_loss=True)
    fit(tmp_path / "a", model, [mix, Peek()], max_epochs=1)
    assert all(plan is not None for plan in plans) and mix.current_plan is None
    with pytest.raises(RuntimeError, match="mid-epoch"):
        fit(tmp_path / "b", model, [mix, CrashAtBatch(0, 2)], max_epochs=1)
    assert mix.current_plan is None  # withdrawn in on_exception too
    # outside fit, the mixin loss is plain cross-entropy
    logits, y = torch.zeros(2, 4), torch.tensor([0, 1])
    model.train()
    assert torch.allclose(model.cross_entropy(logits, y), F.cross_entropy(logits, y))


# ------------------------------------------------------------------------- every fit is fresh
def _mixed_inputs(model):
    return torch.cat([x for _, x, _ in model.seen["train"]])


@pytest.mark.parametrize("options", [dict(), dict(cutmix_alpha=1.0, mode="elem")])
def test_a_reused_callback_behaves_like_a_fresh_one(tmp_path, options):
    reused = Mixup(0.8, num_classes=4, **options)
    with pytest.raises(RuntimeError, match="mid-epoch"):  # leaves a position inside an epoch
        fit(tmp_path / "crash", ConvNet(), [reused, CrashAtBatch(1, 2)], max_epochs=2)
    fit(tmp_path / "first", ConvNet(), [reused], seed=1, max_epochs=2)
    for seed in (0, 3):  # another seed_everything: the reused callback follows it
        again, fresh = ConvNet(), ConvNet()
        fit(tmp_path / f"again{seed}", again, [reused], dm=ImageData(shuffle=False), seed=seed,
            max_epochs=2)  # fmt: skip
        new = Mixup(0.8, num_classes=4, **options)
        fit(tmp_path / f"fresh{seed}", fresh, [new], dm=ImageData(shuffle=False), seed=seed,
            max_epochs=2)  # fmt: skip
        assert torch.equal(_mixed_inputs(again), _mixed_inputs(fresh))
        assert reused.state_dict() == new.state_dict()
        assert reused.batches_seen == 12  # 2 epochs x 6 batches, not counted on from before


def test_a_reused_label_smoothing_follows_its_new_settings(tmp_path):
    smoothing = LabelSmoothing(0.1, num_classes=4)
    fit(tmp_path / "a", ConvNet(), [smoothing], max_epochs=1)
    smoothing.smoothing = 0.2
    model = ConvNet()
    fit(tmp_path / "b", model, [smoothing], max_epochs=1)
    assert all(torch.isclose(y.max(), torch.tensor(0.85)) for _, _, y in model.seen["train"])


# ------------------------------------------------------------------ errors naming num_classes
class WideNet(ConvNet):
    """Outputs 6 classes while the data (and the callback) say 4."""

    def __init__(self):
        super().__init__(classes=6)


@pytest.mark.parametrize(
    "make", [lambda: Mixup(0.4, num_classes=4), lambda: LabelSmoothing(0.1, num_classes=4)]
)
def test_model_with_another_number_of_classes_gets_a_note(tmp_path, make):
    with pytest.raises(RuntimeError, match="multi-target") as info:
        fit(tmp_path, WideNet(), [make()], max_epochs=1)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "num_classes=4" in notes and "set `num_classes=`" in notes


def test_unrelated_errors_get_no_note(tmp_path):
    with pytest.raises(RuntimeError, match="mid-epoch") as info:
        fit(tmp_path, ConvNet(), [Mixup(num_classes=4), CrashAtBatch(0, 1)], max_epochs=1)
    assert not getattr(info.value, "__notes__", [])


@pytest.mark.parametrize("classes", [8, 2000], ids=["class-table", "no-table"])
@pytest.mark.parametrize("keep_targets", [False, True])
def test_out_of_range_labels_name_num_classes(tmp_path, classes, keep_targets):
    dm = ImageData()
    x, y = dm.train_set.tensors
    y = y.clone()
    y[5] = classes + 3
    dm.train_set = type(dm.train_set)(x, y)
    model = ConvNet(classes=classes, use_mixin_loss=keep_targets)
    mix = Mixup(0.4, num_classes=classes, keep_targets=keep_targets)
    with pytest.raises(ValueError, match=rf"outside \[0, {classes}\).*`num_classes=`"):
        fit(tmp_path, model, [mix], dm=dm, max_epochs=1)


@pytest.mark.parametrize("make", [lambda: Mixup(0.4), lambda: LabelSmoothing(0.1),
                                  lambda: Mixup(0.4, keep_targets=True)])  # fmt: skip
def test_integer_targets_without_num_classes_fail_at_the_first_batch(tmp_path, make):
    model = ConvNet(use_mixin_loss=True)
    with pytest.raises(ValueError, match=r"integer class targets but no `num_classes`"):
        fit(tmp_path, model, [make()], max_epochs=1)
    assert model.seen["train"] == []


def test_soft_targets_of_another_width_are_refused(tmp_path):
    dm = ImageData()
    x, y = dm.train_set.tensors
    dm.train_set = type(dm.train_set)(x, F.one_hot(y, 4).float())
    with pytest.raises(ValueError, match="4 columns but num_classes=5"):
        fit(tmp_path, ConvNet(), [Mixup(0.4, num_classes=5)], dm=dm, max_epochs=1)


def test_the_hook_called_by_hand_matches_the_functional_twin(tmp_path):
    """The hook changes a list batch in place; the functional core gives the same result."""
    mix = Mixup(0.8, num_classes=4, seed=5)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[mix]))
    mix.reset()
    x, y = torch.randn(8, 3, 4, 4), torch.arange(8) % 4
    batch = [x, y]
    mix.on_train_batch_start(trainer, None, batch, 0)
    plan = mix.current_plan
    assert batch[0] is not x and torch.equal(batch[0], mix_inputs(x, plan))
    assert torch.allclose(batch[1], plan.targets(y))
    assert isinstance(plan.perm, np.ndarray) and plan.perm.shape == (8,)


class SoftLossWideNet(WideNet):
    """A hand-written soft-target loss: the width mismatch is a broadcasting error."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return -(y * F.log_softmax(self(x), dim=1)).sum(1).mean()


def test_a_hand_written_soft_loss_with_another_width_gets_a_note(tmp_path):
    with pytest.raises(RuntimeError, match="must match the size") as info:
        fit(tmp_path, SoftLossWideNet(), [Mixup(0.4, num_classes=4)], max_epochs=1)
    assert "num_classes=4" in "\n".join(getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("labels", [True, False])
def test_a_device_side_assert_after_integer_labels_gets_a_note(tmp_path, labels):
    """What CUDA reports for an out-of-range label, at the next synchronisation."""
    mix = Mixup(0.4, num_classes=4)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[mix]))
    mix.reset()
    y = torch.tensor([0, 1, 2, 3]) if labels else torch.full((4, 4), 0.25)
    mix.on_train_batch_start(trainer, None, [torch.randn(4, 3, 8, 8), y], 0)
    error = RuntimeError("CUDA error: device-side assert triggered")
    mix.on_exception(trainer, None, error)
    notes = "\n".join(getattr(error, "__notes__", []))
    assert ("outside [0, 4)" in notes) is labels
