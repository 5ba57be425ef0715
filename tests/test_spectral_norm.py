"""SpectralNormalization: the math against a direct computation, real fits, resume, DDP, bad input.

The generic fit/resume/pickle/``weights_only`` tests come from the ``CANONICAL`` table
(tests/test_stack.py).
"""

import pickle

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from lightning_reg import (
    SpectralNormalization,
    WeightDecayExclusion,
    apply_spectral_norm,
    constrained_spectral_norm,
    estimated_sigma,
    largest_singular_value,
    select_layers,
)
from tests.helpers import (
    BlobsDataModule,
    CrashAt,
    GlooDDPSpawn,
    TinyClassifier,
    same_state,
    trainer_kwargs,
)


def _matrix(weight, dim):
    """What spectral_norm does: the output dimension first, the rest flattened."""
    if dim:
        weight = weight.transpose(0, dim)
    return weight.reshape(weight.shape[0], -1)


def _sigma_max(matrix):
    return torch.linalg.svdvals(matrix.double())[0]


def _constrained(module):
    return module.parametrizations.weight


@pytest.mark.parametrize(
    ("layer", "dim"),
    [(nn.Linear(12, 7), 0), (nn.Conv2d(3, 5, 3), 0), (nn.ConvTranspose2d(4, 6, 3), 1)],
    ids=["linear", "conv2d", "conv-transpose"],
)
def test_sigma_estimate_and_norms_against_a_direct_computation(layer, dim):
    torch.manual_seed(0)
    apply_spectral_norm([("layer", layer)], n_power_iterations=1)
    plist = _constrained(layer)
    original, u, v = plist.original.detach(), plist[0]._u, plist[0]._v
    matrix = _matrix(original, dim)
    assert torch.allclose(estimated_sigma(layer), u @ matrix @ v)
    layer.eval()  # the layer divides by exactly that estimate
    assert torch.allclose(layer.weight, original / (u @ matrix @ v))
    assert torch.allclose(largest_singular_value(original, dim).double(), _sigma_max(matrix))
    ratio = _sigma_max(matrix) / (u @ matrix @ v).double()
    assert torch.allclose(constrained_spectral_norm(layer).double(), ratio, rtol=1e-5)
    layer.train()
    for _ in range(200):  # each training-mode access runs one power-iteration step
        _ = layer.weight
    assert torch.allclose(estimated_sigma(layer).double(), _sigma_max(matrix), rtol=1e-4)
    layer.eval()
    assert abs(_sigma_max(_matrix(layer.weight.detach(), dim)).item() - 1) < 1e-4
    assert abs(constrained_spectral_norm(layer).item() - 1) < 1e-4


def _fit(root, callbacks, model=None, max_epochs=4, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = model if model is not None else TinyClassifier(lr=0.05)
    trainer = pl.Trainer(**trainer_kwargs(
        root, callbacks=callbacks, max_epochs=max_epochs, **kwargs,
    ))  # fmt: skip
    trainer.fit(model, datamodule=BlobsDataModule())
    return model, trainer


def test_fit_constrains_the_chosen_layers_and_logs_their_norms(tmp_path):
    callback = SpectralNormalization(
        modules=["net.0"], n_power_iterations=5, log_unconstrained=True
    )
    model = TinyClassifier(lr=0.05)
    with torch.no_grad():  # both layers start with spectral norms well above 1
        model.net[0].weight.mul_(4)
        model.net[3].weight.mul_(4)
    model, trainer = _fit(tmp_path, [callback], model=model)
    assert callback.constrained_layers == ["net.0"]
    assert parametrize.is_parametrized(model.net[0], "weight")
    assert not parametrize.is_parametrized(model.net[3])
    model.eval()
    constrained = _sigma_max(model.net[0].weight.detach()).item()
    free = _sigma_max(model.net[3].weight.detach()).item()
    assert 0.99 < constrained < 1.15  # 5 power-iteration steps per forward track sigma closely
    assert free > 2  # the unconstrained layer keeps its scale: the check above can fail
    metrics = trainer.callback_metrics
    assert metrics["reg/spectral/net.0"].item() == pytest.approx(constrained, rel=1e-4)
    assert metrics["reg/spectral_free/net.3"].item() == pytest.approx(free, rel=1e-4)
    assert "reg/spectral_free/net.0" not in metrics


def test_the_optimizer_holds_the_parametrized_weights_and_weight_decay_exclusion_works(tmp_path):
    groups = {}

    class Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            names = {id(p): n for n, p in pl_module.named_parameters()}
            for group in trainer.optimizers[0].param_groups:
                groups[group["weight_decay"]] = sorted(names[id(p)] for p in group["params"])

    model = TinyClassifier(optimizer="adamw", weight_decay=0.05)
    spectral = SpectralNormalization(types=(nn.Linear,))
    _fit(tmp_path, [WeightDecayExclusion(), spectral, Record()], model=model, max_epochs=1)
    assert groups == {
        0.05: ["net.0.parametrizations.weight.original", "net.3.parametrizations.weight.original"],
        0.0: ["net.0.bias", "net.3.bias"],
    }


def test_a_conv_model_we_did_not_write(tmp_path):
    torchvision = pytest.importorskip("torchvision")

    class Vision(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torchvision.models.resnet18(num_classes=4)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x.reshape(-1, 1, 4, 4).expand(-1, 3, 4, 4)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    model = Vision()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    callback = SpectralNormalization(types=(nn.Conv2d,))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small LAPACK calls: extra threads only spin on a shared machine
    try:
        _, trainer = _fit(tmp_path, [callback], model=model, max_epochs=1, limit_train_batches=2)
    finally:
        torch.set_num_threads(threads)
    assert callback.constrained_layers == convs and len(convs) == 20
    assert all(parametrize.is_parametrized(m) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert not parametrize.is_parametrized(model.model.fc)
    assert 0.5 < trainer.callback_metrics["reg/spectral/model.conv1"].item() < 1.5
    trainer.save_checkpoint(tmp_path / "vision.ckpt")
    fresh = Vision()  # a fresh model loads the checkpoint once it carries the same constraint
    apply_spectral_norm(select_layers(fresh, types=(nn.Conv2d,)))
    state = torch.load(tmp_path / "vision.ckpt", weights_only=True)["state_dict"]
    fresh.load_state_dict(state)
    assert same_state(fresh.state_dict(), model.state_dict())


def test_a_second_fit_reuses_the_constraint_and_so_does_a_model_that_carries_one(tmp_path):
    callback = SpectralNormalization(types=(nn.Linear,), n_power_iterations=2)
    model, _ = _fit(tmp_path / "a", [callback], max_epochs=1)
    first = model.net[0].parametrizations.weight.original.detach().clone()
    _fit(tmp_path / "b", [callback], model=model, max_epochs=1)
    assert len(model.net[0].parametrizations.weight) == 1
    assert not torch.equal(first, model.net[0].parametrizations.weight.original)
    assert callback.constrained_layers == ["net.0", "net.3"]

    own = TinyClassifier()
    spectral_norm(own.net[0], n_power_iterations=3)
    _fit(tmp_path / "c", [callback], model=own, max_epochs=1)
    assert len(own.net[0].parametrizations.weight) == 1
    assert own.net[0].parametrizations.weight[0].n_power_iterations == 3  # the user's own kept
    assert own.net[3].parametrizations.weight[0].n_power_iterations == 2


def test_remove_at_end_leaves_plain_weights_and_a_crash_leaves_the_constraint(tmp_path):
    callback = SpectralNormalization(types=(nn.Linear,), remove_at_end=True)
    model, _ = _fit(tmp_path / "a", [callback], max_epochs=2)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert list(model.state_dict()) == list(TinyClassifier().state_dict())  # order kept too
    assert 0.9 < _sigma_max(model.net[0].weight.detach()).item() < 1.3
    pickle.loads(pickle.dumps(model))

    crashed = TinyClassifier()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "b", [callback, CrashAt(1)], model=crashed, max_epochs=3)
    assert parametrize.is_parametrized(crashed.net[0], "weight")  # as the checkpoints have it


def test_resume_restores_weights_buffers_and_optimizer_state(tmp_path):
    def run(root, crash=None, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        model = TinyClassifier(optimizer="adam", lr=0.01)
        callbacks = [
            SpectralNormalization(types=(nn.Linear,)),
            ModelCheckpoint(root, save_last=True),
        ]
        trainer = pl.Trainer(**trainer_kwargs(
            root, callbacks=callbacks + ([CrashAt(crash)] if crash else []), max_epochs=3,
            enable_checkpointing=True,
        ))  # fmt: skip
        dm = BlobsDataModule(shuffle=False)
        if crash:
            with pytest.raises(RuntimeError):
                trainer.fit(model, datamodule=dm)
        else:
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model, trainer

    full, full_trainer = run(tmp_path / "full")
    run(tmp_path / "part", crash=2)
    resumed, resumed_trainer = run(tmp_path / "resumed", ckpt_path=tmp_path / "part" / "last.ckpt")
    assert "net.0.parametrizations.weight.original" in full.state_dict()
    assert "net.0.parametrizations.weight.0._u" in full.state_dict()
    assert same_state(full.state_dict(), resumed.state_dict())
    states = [t.optimizers[0].state_dict()["state"] for t in (full_trainer, resumed_trainer)]
    assert all(torch.equal(states[0][i]["exp_avg"], states[1][i]["exp_avg"]) for i in states[0])


class _RankNorms(pl.Callback):
    def __init__(self, root):
        self.root = root

    def on_train_end(self, trainer, pl_module):
        norms = {n: constrained_spectral_norm(pl_module.net[i]) for n, i in (("0", 0), ("3", 3))}
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        pl_module.eval()
        weight = pl_module.net[3].weight.detach().clone()
        torch.save(
            {"norms": norms, "state": state, "weight": weight},
            f"{self.root}/r{trainer.global_rank}.pt",
        )


class _GlooDDPFork(GlooDDPSpawn):
    """``strategy="ddp_fork"`` (what ``"ddp_notebook"`` is too), with GlooDDPSpawn's clean-up."""

    def __init__(self):
        DDPStrategy.__init__(self, start_method="fork")


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_fork_ranks_agree_and_the_main_process_gets_every_trained_weight(tmp_path):
    # net.0 carries the user's own spectral norm, net.3 gets the callback's. Lightning copies the
    # workers' weights back by name with strict=False: both must come back trained.
    model = TinyClassifier(lr=0.05)
    spectral_norm(model.net[0])
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    callback = SpectralNormalization(types=(nn.Linear,))
    _fit(tmp_path, [callback, _RankNorms(str(tmp_path))], model=model, max_epochs=2,
         devices=2, strategy=_GlooDDPFork())  # fmt: skip
    ranks = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1)]
    assert same_state(ranks[0]["state"], ranks[1]["state"])
    assert ranks[0]["norms"] == ranks[1]["norms"]
    assert 0.9 < ranks[0]["norms"]["3"].item() < 1.5
    # the user's spectral norm stays, trained: rank 0's values under the same names
    assert parametrize.is_parametrized(model.net[0], "weight")
    assert not parametrize.is_parametrized(model.net[3], "weight")
    for key in ("net.0.parametrizations.weight.original", "net.0.parametrizations.weight.0._u"):
        assert torch.equal(model.state_dict()[key], ranks[0]["state"][key])
    # the callback's is baked in: rank 0's eval-mode constrained weight
    assert torch.equal(model.net[3].weight.detach(), ranks[0]["weight"])
    for key, value in model.state_dict().items():  # every weight changed by training
        if key.endswith(("weight", "original", "bias")):
            assert not torch.equal(value, initial.get(key, torch.zeros(0))), key


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs `modules`"),
        ({"modules": "net.0"}, "list of patterns"),
        ({"types": (nn.Linear,), "n_power_iterations": 0}, "n_power_iterations"),
        ({"types": (nn.Linear,), "n_power_iterations": 1.5}, "n_power_iterations"),
        ({"types": ("Linear",)}, "nn.Module classes"),
        ({"types": (nn.Linear,), "eps": 0.0}, "eps"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        SpectralNormalization(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modules": ["encoder.*"]}, r"match no module.*'net', 'net.0'"),
        ({"modules": ["net.*"], "types": (nn.Conv2d,)}, "no module of TinyClassifier matches"),
        ({"modules": ["net.1"]}, r"'net.1' \(BatchNorm1d\) has a 1-D `weight`"),
        ({"modules": ["net.2"]}, r"'net.2' \(ReLU\) has no `weight` parameter"),
    ],
)
def test_bad_selections_are_refused_before_training(tmp_path, kwargs, message):
    model = TinyClassifier(batchnorm=True)
    with pytest.raises(ValueError, match=message):
        _fit(tmp_path, [SpectralNormalization(**kwargs)], model=model, max_epochs=1)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


class _Evaluated(TinyClassifier):
    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def _run_stage(trainer, stage, model, loader, **kwargs):
    if stage == "predict":
        return torch.cat(trainer.predict(model, loader, **kwargs))
    return getattr(trainer, stage)(model, loader, verbose=False, **kwargs)


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluating_after_remove_at_end_leaves_the_model_as_fit_left_it(tmp_path, stage):
    pl.seed_everything(0, verbose=False)
    model = _Evaluated(lr=0.05)
    dm = BlobsDataModule()
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, callbacks=[SpectralNormalization(types=(nn.Linear,), remove_at_end=True)],
        max_epochs=1,
    ))  # fmt: skip
    trainer.fit(model, datamodule=dm)
    dm.setup("fit")
    loader = dm.val_dataloader()
    x = next(iter(loader))[0]
    model.eval()
    before_out, before_state = model(x).detach(), dict(model.state_dict())
    keys = list(before_state)

    plain = pl.Trainer(**trainer_kwargs(tmp_path / "plain"))
    torch.manual_seed(1)
    _run_stage(plain, stage, model, loader)  # what the stage itself draws from the global RNG
    expected_rng = torch.random.get_rng_state()
    torch.manual_seed(1)
    _run_stage(trainer, stage, model, loader)
    assert torch.equal(torch.random.get_rng_state(), expected_rng)
    assert list(model.state_dict()) == keys
    assert same_state(model.state_dict(), before_state)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    model.eval()
    assert torch.equal(model(x), before_out)
    pickle.loads(pickle.dumps(model))


def test_evaluating_a_fresh_model_from_a_spectral_checkpoint(tmp_path):
    callback = SpectralNormalization(types=(nn.Linear,))
    model, trainer = _fit(tmp_path, [callback], model=_Evaluated(lr=0.05), max_epochs=1)
    trainer.save_checkpoint(tmp_path / "spectral.ckpt")
    dm = BlobsDataModule()
    dm.setup("fit")
    loader = dm.val_dataloader()
    expected = trainer.validate(model, loader, verbose=False)[0]
    model.eval()
    constrained = {i: model.net[i].weight.detach().clone() for i in (0, 3)}
    x = next(iter(loader))[0]

    fresh = _Evaluated()
    keys = list(fresh.state_dict())
    evaluator = pl.Trainer(**trainer_kwargs(tmp_path / "eval", callbacks=[callback]))
    got = evaluator.validate(fresh, loader, ckpt_path=tmp_path / "spectral.ckpt", verbose=False)
    assert got[0] == expected
    # restored as found: plain keys and classes, the checkpoint's constrained weights in effect
    assert list(fresh.state_dict()) == keys
    assert not any(parametrize.is_parametrized(m) for m in fresh.modules())
    assert all(torch.equal(fresh.net[i].weight, constrained[i]) for i in (0, 3))
    fresh.eval()
    assert torch.equal(fresh(x), model(x))
    pickle.loads(pickle.dumps(fresh))
    predicted = evaluator.predict(fresh, loader, ckpt_path=tmp_path / "spectral.ckpt")
    assert torch.equal(torch.cat(predicted), _run_stage(evaluator, "predict", fresh, loader))
    assert list(fresh.state_dict()) == keys


def test_adding_the_constraint_leaves_the_global_random_stream_alone():
    torch.manual_seed(3)
    layer, direct = nn.Linear(6, 5), nn.Linear(6, 5)
    direct.load_state_dict(layer.state_dict())
    state = torch.random.get_rng_state()
    apply_spectral_norm([("layer", layer)])
    assert torch.equal(torch.random.get_rng_state(), state)
    spectral_norm(direct)  # the same draws, from the global generator itself
    assert not torch.equal(torch.random.get_rng_state(), state)
    assert same_state(layer.state_dict(), direct.state_dict())


def test_weight_averaging_must_come_after_and_then_averages_the_constrained_layers(tmp_path):
    model = TinyClassifier(lr=0.05)
    with pytest.raises(ValueError, match="List SpectralNormalization before it"):
        _fit(tmp_path / "a", [EMAWeightAveraging(), SpectralNormalization(types=(nn.Linear,))],
             model=model, max_epochs=1)  # fmt: skip
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    with pytest.raises(ValueError, match="remove_at_end=True"):
        _fit(tmp_path / "b", [SpectralNormalization(types=(nn.Linear,), remove_at_end=True),
                              EMAWeightAveraging()], max_epochs=1)  # fmt: skip

    ema = EMAWeightAveraging(decay=0.5)
    model, trainer = _fit(tmp_path / "c", [SpectralNormalization(types=(nn.Linear,)), ema],
                          max_epochs=2)  # fmt: skip
    average = ema._average_model.module
    assert parametrize.is_parametrized(average.net[0], "weight")
    assert trainer.callback_metrics["val_acc"] > 0.5
    # the model ends with the average (Lightning copies it in at train end), constrained
    assert same_state(model.state_dict(), average.state_dict())
    assert 0.8 < constrained_spectral_norm(model.net[0]).item() < 1.5


class _FailOnValidationStart(pl.Callback):
    def on_validation_start(self, trainer, pl_module):
        raise RuntimeError("simulated failure")


def test_a_failing_evaluation_still_restores_the_model_it_constrained_to_load(tmp_path):
    callback = SpectralNormalization(types=(nn.Linear,))
    _, trainer = _fit(tmp_path, [callback], max_epochs=1)
    trainer.save_checkpoint(tmp_path / "spectral.ckpt")
    fresh = TinyClassifier()
    keys = list(fresh.state_dict())
    evaluator = pl.Trainer(**trainer_kwargs(
        tmp_path / "eval", callbacks=[callback, _FailOnValidationStart()],
    ))  # fmt: skip
    with pytest.raises(RuntimeError, match="simulated failure"):
        evaluator.validate(
            fresh, datamodule=BlobsDataModule(), ckpt_path=tmp_path / "spectral.ckpt"
        )
    assert list(fresh.state_dict()) == keys
    assert not any(parametrize.is_parametrized(m) for m in fresh.modules())
    assert not fresh._load_state_dict_pre_hooks  # the pre-hook is gone too
