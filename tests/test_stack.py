"""Generic tests driven by one table of canonical settings: every callback alone, and the stack.

Each case must fit, resume bitwise from a mid-training checkpoint, run under DDP with 2
processes, pickle before and after fit, write checkpoints that load with ``weights_only=True``,
and add no host-device synchronisation to the training steps.
"""

import copy
import io
import pickle

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.utils import parametrize

from lightning_reg import (
    CalibrationMonitor,
    EarlyStopping,
    GeneralizationGapMonitor,
    LabelSmoothing,
    MCDropoutPrediction,
    MembershipInferenceAudit,
    Mixup,
    ProximalSparsity,
    RegularizationMonitor,
    SharpnessAwareMinimization,
    SpectralNormalization,
    StochasticDepth,
    WeightDecayExclusion,
)
from tests.helpers import (
    BlobsDataModule,
    CountScalarReads,
    CrashAt,
    TinyClassifier,
    same_state,
    trainer_kwargs,
)

# name -> (factory with canonical settings, metrics it must log)
CANONICAL = {
    "EarlyStopping": (
        lambda: EarlyStopping("val_loss", patience=3),
        ["reg/early_stopping/wait", "reg/early_stopping/best"],
    ),
    "WeightDecayExclusion": (lambda: WeightDecayExclusion(), []),
    "Mixup": (lambda: Mixup(0.4, label_smoothing=0.1, num_classes=4), ["reg/mixup/lambda"]),
    "LabelSmoothing": (lambda: LabelSmoothing(0.1, num_classes=4), []),
    "GeneralizationGapMonitor": (
        lambda: GeneralizationGapMonitor(subset_size=64),
        ["reg/train_eval/loss", "reg/gap/loss", "reg/overfitting"],
    ),
    "RegularizationMonitor": (
        lambda: RegularizationMonitor(per_layer=True),
        ["reg/weights/l2", "reg/weights/sparsity", "reg/weights_l2/net.0"],
    ),
    "MembershipInferenceAudit": (
        lambda: MembershipInferenceAudit(subset_size=64),
        ["reg/privacy/auc", "reg/privacy/advantage"],
    ),
    "ProximalSparsity": (
        lambda: ProximalSparsity(l1=1e-3),
        ["reg/proximal/strength", "reg/weights/sparsity"],
    ),
    "SAM": (
        lambda: SharpnessAwareMinimization(rho=0.05),
        ["reg/sam/rho", "reg/sam/perturbation_norm"],
    ),
    "CalibrationMonitor": (
        lambda: CalibrationMonitor(subset_size=64),
        ["reg/calibration/val_ece", "reg/calibration/train_ece", "reg/calibration/gap"],
    ),
    # prediction-time only: these cases check that it leaves fit, resume and checkpoints alone;
    # tests/test_mc_dropout.py tests what it does in `trainer.predict`
    "MCDropoutPrediction": (lambda: MCDropoutPrediction(num_samples=8), []),
    "SpectralNormalization": (
        lambda: SpectralNormalization(types=(nn.Linear,)),
        ["reg/spectral/net.0", "reg/spectral/net.3"],
    ),
    # TinyClassifier has no residual block: `blocks=` points the hook path at its hidden layer so
    # the generic checks run; tests/test_stochastic_depth.py tests timm and torchvision models
    "StochasticDepth": (
        lambda: StochasticDepth(rate=0.2, blocks=["net.0"]),
        ["reg/stochastic_depth/rate"],
    ),
}
# LabelSmoothing is left out of the stack: Mixup(label_smoothing=...) fuses it.
STACK = [
    "EarlyStopping", "WeightDecayExclusion", "Mixup", "GeneralizationGapMonitor",
    "RegularizationMonitor", "MembershipInferenceAudit", "ProximalSparsity",
]  # fmt: skip
CASES = {name: [name] for name in CANONICAL} | {"stack": STACK}


def constrained_layers(model, callbacks):
    """The layers of ``model`` a callback changed by design: ``{id(layer): layer}``.

    The one narrow exception to "fit leaves the model as it found it": ``SpectralNormalization``
    puts torch's ``spectral_norm`` parametrization on the layers it constrains and keeps it after
    fit (and when fit raises): it is part of the trained model. torch refuses to pickle
    parametrized modules (``state_dict`` only), so the pickle checks pass these layers by
    reference. A parametrized layer that no ``SpectralNormalization`` constrained fails here.
    """
    allowed = {
        name
        for callback in callbacks
        if isinstance(callback, SpectralNormalization)
        for name in callback.constrained_layers
    }
    changed = {n: m for n, m in model.named_modules() if parametrize.is_parametrized(m)}
    assert set(changed) <= allowed, f"parametrized by no SpectralNormalization: {changed}"
    return {id(m): m for m in changed.values()}


def pickle_round_trip(obj, by_reference):
    """Pickle and unpickle ``obj``, passing the objects in ``by_reference`` (by id) as they are."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer)
    pickler.persistent_id = lambda o: id(o) if id(o) in by_reference else None
    pickler.dump(obj)
    buffer.seek(0)
    unpickler = pickle.Unpickler(buffer)
    unpickler.persistent_load = by_reference.__getitem__
    return unpickler.load()


def build(case):
    return [CANONICAL[name][0]() for name in CASES[case]]


def expected_metrics(case):
    return [metric for name in CASES[case] for metric in CANONICAL[name][1]]


def model_and_data():
    pl.seed_everything(0, verbose=False)
    return TinyClassifier(hidden=32, lr=0.1, optimizer="adamw", weight_decay=0.05), BlobsDataModule(
        shuffle=False
    )


def run(root, case, max_epochs=4, crash_at=None, ckpt_path=None, extra=()):
    model, dm = model_and_data()
    callbacks = [*build(case), ModelCheckpoint(dirpath=root / "ck", save_last=True), *extra]
    callbacks += [CrashAt(crash_at)] if crash_at is not None else []
    trainer = pl.Trainer(**trainer_kwargs(
        root, callbacks=callbacks, max_epochs=max_epochs, enable_checkpointing=True,
        logger=pl.loggers.CSVLogger(root),
    ))  # fmt: skip
    if crash_at is None:
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    else:
        with pytest.raises(RuntimeError, match="simulated crash"):
            trainer.fit(model, datamodule=dm)
    return model, trainer


@pytest.mark.parametrize("case", CASES)
def test_fits_and_logs(tmp_path, case):
    _, trainer = run(tmp_path, case)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    for metric in expected_metrics(case):
        assert metric in trainer.callback_metrics, metric
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().split("\n")[0]
    assert all(metric in header for metric in expected_metrics(case))


@pytest.mark.parametrize("case", CASES)
def test_resume_from_a_mid_training_checkpoint_is_bitwise_identical(tmp_path, case):
    full, _ = run(tmp_path / "full", case)
    run(tmp_path / "part", case, crash_at=2)
    checkpoint = tmp_path / "part" / "ck" / "last.ckpt"
    resumed, _ = run(tmp_path / "resumed", case, ckpt_path=checkpoint)
    assert same_state(full.state_dict(), resumed.state_dict())


@pytest.mark.parametrize("case", CASES)
def test_checkpoints_load_weights_only_and_states_round_trip(tmp_path, case):
    _, trainer = run(tmp_path, case, max_epochs=2)
    checkpoint = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    ours = [cb for cb in trainer.callbacks if type(cb).__name__ in CASES[case]]
    for callback in ours:
        state = callback.state_dict()
        fresh = next(cb for cb in build(case) if type(cb) is type(callback))
        fresh.load_state_dict(copy.deepcopy(state))
        assert pickle.loads(pickle.dumps(fresh.state_dict())).keys() == state.keys()
        if state:
            assert callback.state_key in checkpoint["callbacks"]


@pytest.mark.parametrize("case", CASES)
def test_callbacks_pickle_before_and_after_fit(tmp_path, case):
    callbacks = build(case)
    pickle.loads(pickle.dumps(callbacks))
    model, dm = model_and_data()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_epochs=2))
    trainer.fit(model, datamodule=dm)
    restored = pickle.loads(pickle.dumps(callbacks))
    assert [type(cb) for cb in restored] == [type(cb) for cb in callbacks]
    pickle_round_trip(model, constrained_layers(model, callbacks))  # no wrapper left on it


class _RankWeights(pl.Callback):
    def __init__(self, root):
        self.root = root

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), f"{self.root}/rank{trainer.global_rank}.pt")


@pytest.mark.ddp
@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", ["EarlyStopping", "Mixup", "stack"])
def test_ddp_two_processes(tmp_path, case):
    model, dm = model_and_data()
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, max_epochs=3, accelerator="cpu", devices=2, strategy="ddp_spawn",
        callbacks=[*build(case), _RankWeights(str(tmp_path))],
    ))  # fmt: skip
    trainer.fit(model, datamodule=dm)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert same_state(*ranks)


class _CountScalarReadsInTrainingSteps(pl.Callback):
    """Counts ``aten._local_scalar_dense`` (what ``.item()``/``bool(t)`` dispatch to) from the
    start of each training epoch to its last batch: batch transfer, training steps, optimizer
    steps and per-step hooks, but not validation or epoch ends."""

    def __init__(self):
        self.count, self.mode = 0, None

    def on_train_epoch_start(self, trainer, pl_module):
        self.mode = CountScalarReads()
        self.mode.__enter__()

    def _stop(self):
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.count += self.mode.count
            self.mode = None

    def on_validation_start(self, trainer, pl_module):
        self._stop()

    def on_train_epoch_end(self, trainer, pl_module):
        self._stop()


@pytest.mark.parametrize("case", ["stack", "LabelSmoothing"])
def test_no_host_device_sync_added_to_training_steps(tmp_path, case):
    counts = {}
    for label, callbacks in (("bare", []), ("ours", build(case))):
        counter = _CountScalarReadsInTrainingSteps()
        model, dm = model_and_data()
        trainer = pl.Trainer(**trainer_kwargs(
            tmp_path / label, callbacks=[*callbacks, counter], max_epochs=2,
        ))  # fmt: skip
        trainer.fit(model, datamodule=dm)
        counts[label] = counter.count
    assert counts["ours"] == counts["bare"]


def test_the_counter_sees_a_sync(tmp_path):
    class SyncingModule(TinyClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            loss.item()
            return loss

    counter = _CountScalarReadsInTrainingSteps()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[counter], max_epochs=1))
    trainer.fit(SyncingModule(), datamodule=BlobsDataModule())
    assert counter.count >= 8  # one per training step (256 samples / 32)
