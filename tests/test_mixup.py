"""Mixup / CutMix / LabelSmoothing callbacks through real ``Trainer.fit`` runs.

The functional core (soft targets, mixing, boxes) is tested in ``test_mixup_functional.py``.
"""

from collections import namedtuple

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate

from lightning_reg import (
    LabelSmoothing,
    Mixup,
    RegularizedModule,
    _plan_blocks,
    draw_mix_plan,
    mix_inputs,
)
from lightning_reg.mixup import MixPlan
from tests.helpers import CountScalarReads, CrashAt, same_state, trainer_kwargs

Pair = namedtuple("Pair", ["image", "label"])


def image_data(n=96, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


def as_tuple(samples):
    x, y = default_collate(samples)
    return (x, y)


def as_dict(samples):
    x, y = default_collate(samples)
    return {"image": x, "label": y, "index": torch.arange(len(samples))}


def as_named(samples):
    x, y = default_collate(samples)
    return Pair(x, y)


class ImageData(pl.LightningDataModule):
    def __init__(self, collate=None, shuffle=True, batch_size=16):
        super().__init__()
        self.train_set, self.val_set = image_data(96), image_data(32, seed=1)
        self.collate, self.shuffle, self.batch_size = collate, shuffle, batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, self.batch_size, shuffle=self.shuffle,
                          collate_fn=self.collate)  # fmt: skip

    def val_dataloader(self):
        return DataLoader(self.val_set, 16, collate_fn=self.collate)


class ConvNet(RegularizedModule, pl.LightningModule):
    """An unmodified-looking module: ``F.cross_entropy(self(x), y)`` in ``training_step``."""

    def __init__(self, classes=4, use_mixin_loss=False):
        super().__init__()
        torch.manual_seed(0)  # same initial weights for every instance
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
        )  # fmt: skip
        self.use_mixin_loss = use_mixin_loss
        self.seen = {"train": [], "val": []}

    def forward(self, x):
        return self.net(x)

    @staticmethod
    def _unpack(batch):
        if isinstance(batch, dict):
            return batch["image"], batch["label"]
        return batch[0], batch[1]

    def training_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        self.seen["train"].append((type(batch), x.detach().clone(), y.detach().clone()))
        logits = self(x)
        loss = self.cross_entropy(logits, y) if self.use_mixin_loss else F.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        self.seen["val"].append((type(batch), x.detach().clone(), y.detach().clone()))
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit(tmp_path, model, callbacks, dm=None, seed=0, **overrides):
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **overrides))
    trainer.fit(model, datamodule=dm or ImageData())
    return trainer


def raw_batches(dm):
    return [x for x, _ in DataLoader(dm.train_set, dm.batch_size)]


# --------------------------------------------------------------------------- unchanged step trains
@pytest.mark.parametrize(
    "callback",
    [
        Mixup(mixup_alpha=0.4, num_classes=4),
        Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=4),
        Mixup(0.8, 1.0, label_smoothing=0.1, num_classes=4, mode="elem"),
        LabelSmoothing(0.1, num_classes=4),
    ],
    ids=["mixup", "cutmix", "both-elem-smoothed", "smoothing"],
)
def test_unchanged_cross_entropy_step_trains_on_soft_targets(tmp_path, callback):
    model = ConvNet()
    dm = ImageData()
    x_val, y_val = dm.val_set.tensors
    loss_before = F.cross_entropy(model(x_val), y_val)
    trainer = fit(tmp_path, model, [callback], max_epochs=3)
    train, val = model.seen["train"], model.seen["val"]
    assert all(y.dtype == torch.float32 and y.shape[1] == 4 for _, _, y in train)
    assert all(torch.allclose(y.sum(1), torch.ones(len(y))) for _, _, y in train)
    # validation batches are untouched: integer labels, the raw images
    assert all(y.dtype == torch.int64 for _, _, y in val)
    assert torch.equal(torch.cat([x for _, x, _ in val[:2]]), x_val)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert F.cross_entropy(model(x_val), y_val) < loss_before - 0.05  # it learned


def test_mixup_changes_training_inputs_and_cutmix_pastes_patches(tmp_path):
    dm = ImageData(shuffle=False)
    model = ConvNet()
    fit(tmp_path, model, [Mixup(0.0, 1.0, num_classes=4)], dm=dm, max_epochs=1)
    for (_, x, y), raw in zip(model.seen["train"], raw_batches(dm), strict=True):
        changed = (x != raw).flatten(1).any(1)
        assert changed.any()  # some samples got a patch
        same = (x == raw).flatten(1).float().mean(1)
        # target weight on the own class >= kept area (equal unless the partner shares the class)
        assert (y.max(1).values >= same - 1e-6).all()


# -------------------------------------------------------------------------------- batch layouts
@pytest.mark.parametrize(("collate", "kind"), [(None, list), (as_dict, dict)])
def test_batch_layouts(tmp_path, collate, kind):
    model = ConvNet()
    fit(tmp_path, model, [Mixup(num_classes=4)], dm=ImageData(collate), max_epochs=1)
    assert {t for t, _, _ in model.seen["train"]} == {kind}
    assert all(y.is_floating_point() for _, _, y in model.seen["train"])


@pytest.mark.parametrize("collate", [as_tuple, as_named], ids=["tuple", "namedtuple"])
@pytest.mark.parametrize("make", [lambda: Mixup(num_classes=4), lambda: LabelSmoothing(0.1, 4)])
def test_immutable_batches_are_refused_at_the_first_batch(tmp_path, collate, make):
    model = ConvNet()
    with pytest.raises(TypeError, match=r"cannot be changed in place.*collate_fn.*set_batch"):
        fit(tmp_path, model, [make()], dm=ImageData(collate), max_epochs=1)
    assert model.seen["train"] == []  # refused before the first step


def test_custom_getter_and_in_place_setter(tmp_path):
    def get(batch):
        return batch["image"], batch["label"]

    def put(batch, x, y):
        batch["image"], batch["label"] = x, y

    model = ConvNet()
    mix = Mixup(num_classes=4, get_batch=get, set_batch=put)
    fit(tmp_path, model, [mix], dm=ImageData(as_dict), max_epochs=1)
    assert all(y.is_floating_point() for _, _, y in model.seen["train"])


def test_a_setter_that_returns_a_new_batch_is_refused(tmp_path):
    mix = Mixup(num_classes=4, get_batch=lambda b: (b["image"], b["label"]),
                set_batch=lambda b, x, y: {**b, "image": x, "label": y})  # fmt: skip
    with pytest.raises(TypeError, match="must change `batch` in place"):
        fit(tmp_path, ConvNet(), [mix], dm=ImageData(as_dict), max_epochs=1)


def test_unknown_layout_names_the_options(tmp_path):
    with pytest.raises(ValueError, match=r"keys \['image', 'label', 'index'\].*input_key"):
        fit(tmp_path, ConvNet(), [Mixup(num_classes=4, target_key="y")],
            dm=ImageData(as_dict), max_epochs=1)  # fmt: skip


def test_batch_of_one_and_odd_batch_sizes(tmp_path):
    model = ConvNet()
    dm = ImageData(batch_size=7)  # 96 = 13 * 7 + 5: odd sizes, last batch of 5
    dm.train_set = TensorDataset(*(t[:92] for t in dm.train_set.tensors))  # 92 = 13 * 7 + 1
    fit(tmp_path, model, [Mixup(0.8, 1.0, num_classes=4, mode="elem")], dm=dm, max_epochs=1)
    sizes = [len(y) for _, _, y in model.seen["train"]]
    assert sizes[-1] == 1 and 7 in sizes


def test_integer_targets_need_num_classes(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        fit(tmp_path, ConvNet(), [Mixup()], max_epochs=1)


# ------------------------------------------------------------------------------ keep targets mode
def test_keep_targets_mode_trains_exactly_like_soft_batches(tmp_path):
    options = dict(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4)
    soft = ConvNet()
    fit(tmp_path / "a", soft, [Mixup(**options, mode="elem")], max_epochs=2)
    kept = ConvNet(use_mixin_loss=True)
    fit(tmp_path / "b", kept, [Mixup(**options, mode="elem", keep_targets=True)], max_epochs=2)
    assert all(y.dtype == torch.int64 for _, _, y in kept.seen["train"])  # labels for metrics
    assert same_state(soft.state_dict(), kept.state_dict())


def test_keep_targets_label_smoothing(tmp_path):
    soft, kept = ConvNet(), ConvNet(use_mixin_loss=True)
    fit(tmp_path / "a", soft, [LabelSmoothing(0.2, num_classes=4)], max_epochs=2)
    fit(tmp_path / "b", kept, [LabelSmoothing(0.2, num_classes=4, keep_targets=True)], max_epochs=2)
    assert same_state(soft.state_dict(), kept.state_dict())
    # validation uses plain cross-entropy even with the mixin loss
    assert kept.cross_entropy(torch.zeros(2, 4), torch.tensor([0, 1])) == pytest.approx(
        1.3863, 1e-4
    )


# -------------------------------------------------------------------------- schedule and logging
def test_off_epoch_stops_mixing_but_keeps_smoothing(tmp_path):
    dm = ImageData(shuffle=False)
    model = ConvNet()
    mix = Mixup(num_classes=4, label_smoothing=0.1, off_epoch=1)
    trainer = fit(
        tmp_path, model, [mix], dm=dm, max_epochs=2, logger=pl.loggers.CSVLogger(tmp_path)
    )
    per_epoch = len(raw_batches(dm))
    epoch0, epoch1 = model.seen["train"][:per_epoch], model.seen["train"][per_epoch:]
    raws = raw_batches(dm)
    assert any(not torch.equal(x, raw) for (_, x, _), raw in zip(epoch0, raws, strict=True))
    assert all(torch.equal(x, raw) for (_, x, _), raw in zip(epoch1, raws, strict=True))
    assert all(torch.isclose(y.max(), torch.tensor(0.925)) for _, _, y in epoch1)
    assert trainer.logged_metrics["reg/mixup/lambda"] == 1.0  # the last epoch did not mix
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "reg/mixup/lambda" in logged


def test_off_fraction(tmp_path):
    dm = ImageData(shuffle=False)
    model = ConvNet()
    fit(tmp_path, model, [Mixup(num_classes=4, off_fraction=0.5)], dm=dm, max_epochs=2)
    batches = raw_batches(dm) * 2
    seen = model.seen["train"]
    mixed = [not torch.equal(x, raw) for (_, x, _), raw in zip(seen, batches, strict=True)]
    half = len(batches) // 2
    assert any(mixed[:half]) and not any(mixed[half:])


def test_lambda_is_logged_per_epoch(tmp_path):
    trainer = fit(tmp_path, ConvNet(), [Mixup(0.4, num_classes=4)], max_epochs=1)
    value = float(trainer.logged_metrics["reg/mixup/lambda"])
    assert 0.0 < value < 1.0


# ------------------------------------------------------------------------ seeds, resume, errors
def test_reproducible_under_seed_everything(tmp_path):
    runs = []
    for seed in (0, 0, 1):
        model = ConvNet()
        fit(tmp_path / str(len(runs)), model, [Mixup(0.8, 1.0, num_classes=4)], seed=seed,
            max_epochs=1)  # fmt: skip
        runs.append(torch.cat([x for _, x, _ in model.seen["train"]]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_resume_draws_the_same_batches_as_an_uninterrupted_run(tmp_path):
    def run(root, crash_at=None, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        model = ConvNet()
        callbacks = [Mixup(0.8, 1.0, num_classes=4, mode="elem"),
                     pl.callbacks.ModelCheckpoint(dirpath=root, save_last=True)]  # fmt: skip
        callbacks += [CrashAt(crash_at)] if crash_at is not None else []
        trainer = pl.Trainer(**trainer_kwargs(root, callbacks=callbacks, max_epochs=3,
                                              enable_checkpointing=True))  # fmt: skip
        if crash_at is None:
            trainer.fit(model, datamodule=ImageData(shuffle=False), ckpt_path=ckpt_path)
        else:
            with pytest.raises(RuntimeError):
                trainer.fit(model, datamodule=ImageData(shuffle=False))
        return model

    full = run(tmp_path / "full")
    run(tmp_path / "part", crash_at=2)
    resumed = run(tmp_path / "resumed", ckpt_path=tmp_path / "part" / "last.ckpt")
    assert same_state(full.state_dict(), resumed.state_dict())
    state = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)["callbacks"]
    assert any(v.get("batches_seen") == 12 for v in state.values())  # 2 epochs x 6 batches


class CrashAtBatch(pl.Callback):
    def __init__(self, epoch, batch_idx):
        self.at = (epoch, batch_idx)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            raise RuntimeError("simulated crash mid-epoch")


class RecordPlans(pl.Callback):
    """The mixing plan of each training batch (``keep_targets=True``) by (epoch, batch index)."""

    def __init__(self):
        self.plans = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        mix = next(cb for cb in trainer.callbacks if isinstance(cb, Mixup))
        plan = mix.current_plan
        boxes = None if plan.boxes is None else plan.boxes.tolist()
        self.plans[(trainer.current_epoch, batch_idx)] = (plan.perm.tolist(), plan.lam.tolist(),
                                                          boxes)  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [dict(mixup_alpha=0.8), dict(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem")],
    ids=["whole-blocks", "one-by-one"],
)
def test_mid_epoch_resume_draws_the_plans_of_an_uninterrupted_run(tmp_path, monkeypatch, options):
    # Blocks of 4 batches: 88 samples in batches of 16 give 5 full batches and one of 8 per
    # epoch, so the crash (epoch 1, batch 3) falls inside a block and the short batch opens a
    # block of its own size. The data loader keeps no state, so on resume it restarts the
    # epoch's data at batch index 3: the plans are compared, not the mixed inputs, and batch
    # (1, 5) is a full batch there (its plan is drawn for 16 samples, not 8).
    monkeypatch.setattr("lightning_reg._plan_blocks.BLOCK_BATCHES", 4)

    def run(root, crash=None, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        data = ImageData(shuffle=False)
        data.train_set = image_data(88)
        record = RecordPlans()
        callbacks = [Mixup(num_classes=4, keep_targets=True, **options), record,
                     pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=1,
                                                  save_last=True)]  # fmt: skip
        callbacks += [CrashAtBatch(*crash)] if crash else []
        trainer = pl.Trainer(**trainer_kwargs(root, callbacks=callbacks, max_epochs=3,
                                              enable_checkpointing=True))  # fmt: skip
        if crash:
            with pytest.raises(RuntimeError, match="mid-epoch"):
                trainer.fit(ConvNet(), datamodule=data)
        else:
            trainer.fit(ConvNet(), datamodule=data, ckpt_path=ckpt_path)
        return record.plans

    full = run(tmp_path / "full")
    run(tmp_path / "part", crash=(1, 3))
    resumed = run(tmp_path / "resumed", ckpt_path=tmp_path / "part" / "last.ckpt")
    assert len(full) == 18 and (1, 3) in resumed and (1, 0) not in resumed
    assert len(full[(1, 5)][0]) == len(full[(2, 5)][0]) == len(resumed[(2, 5)][0]) == 8
    assert all(resumed[key] == full[key] for key in resumed if key != (1, 5))
    assert full[(1, 0)] != full[(2, 0)] and full[(1, 0)] != full[(1, 4)]  # no repeats


@pytest.mark.parametrize("options", [dict(), dict(cutmix_alpha=1.0, mode="elem")])
def test_alternating_batch_sizes_keep_their_blocks_and_draws(monkeypatch, options):
    made = []
    original = _plan_blocks._Block

    def counting_block(*args):
        made.append(1)
        return original(*args)

    monkeypatch.setattr(_plan_blocks, "_Block", counting_block)
    mix = Mixup(0.8, num_classes=4, **options)
    mix.seed = 0
    sizes = [16, 15] * 20  # e.g. a bucketing sampler
    plans = [mix._plans.plan((0, 0, 0), i, n, (8, 8), torch.device("cpu"))
             for i, n in enumerate(sizes)]  # fmt: skip
    assert len(made) == 2  # one block per batch size, not one per batch
    for i, (plan, n) in enumerate(zip(plans, sizes, strict=True)):  # as drawn with no history
        alone = Mixup(0.8, num_classes=4, **options)._plans.plan(
            (0, 0, 0), i, n, (8, 8), torch.device("cpu")
        )
        assert np.array_equal(plan.perm, alone.perm) and np.array_equal(plan.lam, alone.lam)


def test_settings_changed_after_construction_are_used(tmp_path):
    mix = Mixup(0.4, label_smoothing=0.1)  # num_classes given later, e.g. from the data
    mix.num_classes = 4
    model = ConvNet()
    fit(tmp_path, model, [mix], max_epochs=1)
    targets = model.seen["train"][0][2]
    assert targets.shape == (16, 4) and float(targets.min()) >= 0.1 / 4 - 1e-6


def test_two_transforms_are_refused(tmp_path):
    with pytest.raises(RuntimeError, match="label_smoothing"):
        fit(tmp_path, ConvNet(), [Mixup(num_classes=4), LabelSmoothing(num_classes=4)])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mixup_alpha=-1), "alphas"),
        (dict(mixup_alpha=0, cutmix_alpha=0), "LabelSmoothing"),
        (dict(prob=1.5), "prob"),
        (dict(switch_prob=-0.1), "switch_prob"),
        (dict(mode="pair"), "mode"),
        (dict(label_smoothing=1.0), "label_smoothing"),
        (dict(num_classes=1), "num_classes"),
        (dict(cutmix_minmax=(0.5, 0.2)), "cutmix_minmax"),
        (dict(off_fraction=2.0), "off_fraction"),
        (dict(get_batch=lambda b: b), "set_batch"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mixup(**kwargs)


def test_label_smoothing_invalid_arguments():
    with pytest.raises(ValueError, match="smoothing"):
        LabelSmoothing(1.2)
    with pytest.raises(ValueError, match="num_classes"):
        LabelSmoothing(0.1, num_classes=1)


# ------------------------------------------------------------------------------------ no syncs
@pytest.mark.parametrize("mode", ["batch", "elem"])
@pytest.mark.parametrize("alphas", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixing_reads_no_tensor_scalars(mode, alphas):
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    with CountScalarReads() as counter:
        for step in range(5):
            rng = np.random.default_rng([0, 0, step])
            plan = draw_mix_plan(16, rng, image_size=(8, 8), mixup_alpha=alphas[0],
                                 cutmix_alpha=alphas[1], mode=mode, num_classes=4,
                                 smoothing=0.1)  # fmt: skip
            mix_inputs(x, plan)
            plan.targets(y)
    assert counter.count == 0
    assert isinstance(plan, MixPlan)
