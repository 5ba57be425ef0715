"""SharpnessAwareMinimization: the functional core against a direct implementation, and the
callback through a real ``Trainer.fit`` against a SAM step computed by hand."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import SumMetric

from lightning_reg import SAM, SharpnessAwareMinimization, sam_perturbation, sam_perturbed
from tests.helpers import BlobsDataModule, TinyClassifier, trainer_kwargs


def direct_perturbation(params: list[Tensor], grads: list[Tensor], rho: float, adaptive: bool):
    """SAM/ASAM written out: e = rho * T^2 g / ||T g||, T = |w| for ASAM, else 1."""
    t = [g * p.abs() if adaptive else g for p, g in zip(params, grads, strict=True)]
    norm = torch.sqrt(sum((x**2).sum() for x in t))
    return [
        rho * g * (p**2 if adaptive else 1) / (norm + 1e-12)
        for p, g in zip(params, grads, strict=True)
    ]


def direct_sam_step(model, batch, rho, lr, adaptive=False, clip=None):
    """One SAM step of plain SGD on ``model`` (in place), without any library code."""
    x, y = batch
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    e = direct_perturbation([p.detach() for p in params], grads, rho, adaptive)
    w0 = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, e, strict=True):
            p.add_(d)
    g2 = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    factor = 1.0
    if clip is not None:
        total = torch.sqrt(sum((g**2).sum() for g in g2))
        factor = torch.clamp(clip / (total + 1e-6), max=1.0)
    with torch.no_grad():
        for p, w, g in zip(params, w0, g2, strict=True):
            p.copy_(w - lr * g * factor)


def toy_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    w1 = torch.randn(3, requires_grad=True, generator=g)
    w2 = torch.randn((), requires_grad=True, generator=g)
    ((a @ w1 + w2 - b) ** 2).sum().backward()
    return [w1, w2]


@pytest.mark.parametrize("adaptive", [False, True])
def test_functional_perturbation_matches_the_direct_formula(adaptive):
    params = toy_params()
    expected = direct_perturbation(params, [p.grad for p in params], 0.3, adaptive)
    got = sam_perturbation(params, rho=0.3, adaptive=adaptive)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    if not adaptive:
        norm = torch.sqrt(sum((e**2).sum() for e in got))
        torch.testing.assert_close(norm, torch.tensor(0.3))


@pytest.mark.parametrize("adaptive", [False, True])
def test_perturbed_moves_by_e_and_restores_bitwise(adaptive):
    params = toy_params()
    before = [p.detach().clone() for p in params]
    e = sam_perturbation(params, rho=0.3, adaptive=adaptive)
    with sam_perturbed(params, rho=0.3, adaptive=adaptive) as norm:
        for p, w, d in zip(params, before, e, strict=True):
            torch.testing.assert_close(p.detach(), w + d)
        torch.testing.assert_close(norm, torch.sqrt(sum((d**2).sum() for d in e)))
    assert all(torch.equal(p, w) for p, w in zip(params, before, strict=True))
    with pytest.raises(KeyError), sam_perturbed(params, rho=0.3):
        raise KeyError("inside")
    assert all(torch.equal(p, w) for p, w in zip(params, before, strict=True))


def test_parameters_without_gradient_are_skipped():
    params = toy_params()
    frozen = torch.ones(2, requires_grad=True)
    assert len(sam_perturbation([*params, frozen])) == 2
    with sam_perturbed([frozen]) as norm:
        assert torch.equal(frozen, torch.ones(2)) and float(norm) == 0.0


def first_batch():
    return next(iter(BlobsDataModule(shuffle=False).train_dataloader()))


def fit(tmp_path, callbacks, model=None, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = model or TinyClassifier(lr=0.1)
    kwargs = {"max_steps": 1, "limit_val_batches": 0, **kwargs}
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **kwargs))
    trainer.fit(model, datamodule=BlobsDataModule(shuffle=False))
    return model, trainer


@pytest.mark.parametrize(
    ("adaptive", "clip"), [(False, None), (True, None), (False, 0.05)], ids=["sam", "asam", "clip"]
)
def test_one_step_equals_the_direct_sam_step(tmp_path, adaptive, clip):
    pl.seed_everything(0, verbose=False)
    reference = TinyClassifier(lr=0.1)
    model = copy.deepcopy(reference)
    direct_sam_step(reference, first_batch(), rho=0.2, lr=0.1, adaptive=adaptive, clip=clip)
    fit(tmp_path, [SAM(rho=0.2, adaptive=adaptive)], model=model, gradient_clip_val=clip)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # and it is not a plain step
    plain = copy.deepcopy(model)
    fit(tmp_path, [], model=plain)
    assert not all(
        torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters(), strict=True)
    )


class SteppedCounts(pl.Callback):
    def __init__(self, sam):
        self.sam, self.counts = sam, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts.append(self.sam._count)


def test_interval_perturbs_every_kth_step_only(tmp_path):
    sam = SAM(rho=0.1, interval=3)
    spy = SteppedCounts(sam)
    fit(tmp_path, [sam, spy], max_steps=-1, max_epochs=1)
    assert spy.counts == [1, 1, 1, 2, 2, 2, 3, 3]


class CountingClassifier(TinyClassifier):
    """Logs a per-batch 1 summed over the epoch, and updates a torchmetrics sum."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen = SumMetric()
        self.calls = 0

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.calls += 1
        self.seen.update(torch.tensor(1.0))
        self.log("ones", 1.0, on_step=False, on_epoch=True, reduce_fx="sum")
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        self.log("seen", self.seen.compute())
        self.seen.reset()


def test_what_training_step_logs_counts_once_per_batch(tmp_path):
    model, trainer = fit(tmp_path, [SAM()], model=CountingClassifier(), max_steps=-1, max_epochs=1)
    assert model.calls == 16  # the second pass ran on every batch
    assert float(trainer.callback_metrics["ones"]) == 8.0
    assert float(trainer.callback_metrics["seen"]) == 8.0
    assert float(trainer.callback_metrics["reg/sam/rho"]) == pytest.approx(0.05)
    assert float(trainer.callback_metrics["reg/sam/perturbation_norm"]) == pytest.approx(0.05)


def test_batchnorm_statistics_updated_once_per_batch(tmp_path):
    pl.seed_everything(0, verbose=False)
    with_sam = TinyClassifier(lr=0.1, batchnorm=True)
    fit(tmp_path, [SAM()], model=with_sam, max_steps=-1, max_epochs=1)
    assert int(with_sam.net[1].num_batches_tracked) == 8
    # the running statistics come from the unperturbed passes only: on step 1 they equal a plain
    # run's (the weights only differ after the first step)
    pl.seed_everything(0, verbose=False)
    one_sam, one_plain = TinyClassifier(batchnorm=True), TinyClassifier(batchnorm=True)
    one_plain.load_state_dict(one_sam.state_dict())
    fit(tmp_path, [SAM()], model=one_sam)
    fit(tmp_path, [], model=one_plain)
    assert torch.equal(one_sam.net[1].running_mean, one_plain.net[1].running_mean)
    assert torch.equal(one_sam.net[1].running_var, one_plain.net[1].running_var)


@pytest.mark.compat("precision='bf16-mixed' (CPU)", "SAM")
def test_bf16_mixed_trains(tmp_path):
    _, trainer = fit(tmp_path, [SAM()], precision="bf16-mixed", max_steps=-1, max_epochs=2)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert torch.isfinite(trainer.callback_metrics["reg/sam/perturbation_norm"])


def test_adamw_trains_and_loss_decreases(tmp_path):
    model = TinyClassifier(lr=0.01, optimizer="adamw", weight_decay=0.01)
    _, trainer = fit(tmp_path, [SAM(adaptive=True, rho=0.5)], model=model, max_steps=-1,
                     max_epochs=5, limit_val_batches=None)  # fmt: skip
    assert float(trainer.callback_metrics["val_acc"]) > 0.5


def test_parameters_filter_perturbs_only_the_chosen(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier()
    sam = SAM(parameters=lambda name, p: name.startswith("net.3"))
    fit(tmp_path, [sam], model=model)
    assert sam._targets == {id(model.net[3].weight), id(model.net[3].bias)}


class Manual(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        return loss


def refused(row: str, why: str) -> pytest.MarkDecorator:
    return pytest.mark.compat(row, "SAM", refused=why)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        pytest.param("manual", "sam_perturbed", marks=refused(
            "manual optimization", "no closure to hook; use sam_perturbed in training_step"
        )),
        pytest.param("accumulate", "accumulate_grad_batches=2", marks=refused(
            "accumulate_grad_batches=2", "the second pass cannot revisit the accumulated batches"
        )),
    ],
)  # fmt: skip
def test_refused_at_fit_start(tmp_path, case, match):
    kwargs: dict[str, Any] = {}
    model = Manual() if case == "manual" else TinyClassifier()
    if case == "accumulate":
        kwargs["accumulate_grad_batches"] = 2
    with pytest.raises(RuntimeError, match=match):
        fit(tmp_path, [SAM()], model=model, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(rho=0.0), dict(rho=float("nan")), dict(interval=0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SharpnessAwareMinimization(**kwargs)


def test_state_key_tells_settings_apart():
    assert SAM(rho=0.05).state_key != SAM(rho=0.1).state_key
    assert SAM(adaptive=True).state_key != SAM().state_key


def test_no_host_device_sync_added_to_training_steps(tmp_path):
    from tests.test_stack import _CountScalarReadsInTrainingSteps, model_and_data

    counts = {}
    for label, callbacks in (("bare", []), ("sam", [SAM(adaptive=True)])):
        counter = _CountScalarReadsInTrainingSteps()
        model, dm = model_and_data()
        trainer = pl.Trainer(**trainer_kwargs(
            tmp_path / label, callbacks=[*callbacks, counter], max_epochs=2,
        ))  # fmt: skip
        trainer.fit(model, datamodule=dm)
        counts[label] = counter.count
    assert counts["sam"] == counts["bare"]


@pytest.mark.ddp
@pytest.mark.timeout(180)
@pytest.mark.compat("DDP, 2 processes (gloo)", "SAM")
def test_ddp_two_processes_perturb_and_step_identically(tmp_path):
    from tests.test_stack import _RankWeights, model_and_data

    model, dm = model_and_data()
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_spawn",
        callbacks=[SAM(rho=0.1), _RankWeights(str(tmp_path))],
    ))  # fmt: skip
    trainer.fit(model, datamodule=dm)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])


class ManualSAM(TinyClassifier):
    """The functional form in manual optimization, as sam_functional's docstring shows it."""

    def __init__(self, rho: float) -> None:
        super().__init__(lr=0.1)
        self.rho = rho
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        self.manual_backward(F.cross_entropy(self(x), y))
        with sam_perturbed(self.parameters(), rho=self.rho):
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(x), y))
        opt.step()
        opt.zero_grad()


def test_functional_form_in_manual_optimization_equals_the_direct_step(tmp_path):
    pl.seed_everything(0, verbose=False)
    reference = TinyClassifier(lr=0.1)
    model = ManualSAM(rho=0.2)
    model.load_state_dict(reference.state_dict())
    direct_sam_step(reference, first_batch(), rho=0.2, lr=0.1)
    fit(tmp_path, [], model=model)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_with_the_whole_stack(tmp_path):
    from tests.test_stack import build

    callbacks = [*build("stack"), SAM()]
    model = TinyClassifier(lr=0.1, optimizer="adamw", weight_decay=0.05)
    _, trainer = fit(tmp_path, callbacks, model=model, max_steps=-1, max_epochs=3,
                     limit_val_batches=None)  # fmt: skip
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert "reg/sam/perturbation_norm" in trainer.callback_metrics
    assert "reg/mixup/lambda" in trainer.callback_metrics


def test_sharded_strategies_are_refused():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_reg.sam import _refuse_unsupported

    trainer = SimpleNamespace(
        accumulate_grad_batches=1, precision_plugin=object(), strategy=ModelParallelStrategy()
    )
    with pytest.raises(RuntimeError, match="ModelParallelStrategy"):
        _refuse_unsupported(trainer, TinyClassifier())  # type: ignore[arg-type]


class SkipsOddBatches(TinyClassifier):
    """Returns ``None`` from ``training_step`` on odd batches: Lightning skips those steps."""

    def __init__(self) -> None:
        super().__init__(lr=0.1)
        self.calls = 0

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:  # type: ignore[override]
        self.calls += 1
        return None if batch_idx % 2 else super().training_step(batch, batch_idx)


def test_a_step_skipped_by_returning_none_gets_no_second_pass(tmp_path):
    model = SkipsOddBatches()
    sam = SAM(rho=0.2)
    counts = SteppedCounts(sam)
    fit(tmp_path, [sam, counts], model=model, max_steps=-1, max_epochs=1, limit_train_batches=6)
    assert model.calls == 6 + 3
    assert counts.counts == [1, 1, 2, 2, 3, 3]
