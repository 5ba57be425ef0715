"""SAM under ``precision="16-mixed"`` (a GradScaler), on CPU: the step equals a SAM step written
out with autocast and loss scaling, and a non-finite value in *either* gradient skips the step
and backs the scale off, as one overflow does without SAM."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor

from lightning_reg import SAM
from tests.helpers import BlobsDataModule, TinyClassifier, trainer_kwargs
from tests.test_sam import direct_perturbation, first_batch

SCALE = 2.0**10


def scaler_plugin() -> MixedPrecision:
    """Lightning's 16-mixed plugin with a CPU GradScaler (Lightning's own flag needs CUDA)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=SCALE))


def fit_16_mixed(tmp_path, model, callbacks, **kwargs: Any) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    kwargs = {"max_steps": 1, "limit_val_batches": 0, **kwargs}
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, callbacks=callbacks, plugins=[scaler_plugin()], **kwargs)
    )
    trainer.fit(model, datamodule=BlobsDataModule(shuffle=False))
    return trainer


def autocast_gradients(model, batch) -> list[Tensor]:
    """The unscaled gradient of a loss scaled by ``SCALE`` under CPU float16 autocast."""
    x, y = batch
    with torch.autocast("cpu", dtype=torch.half, cache_enabled=False):
        loss = F.cross_entropy(model(x), y)
    inv = torch.tensor(SCALE).double().reciprocal().float()
    return [g * inv for g in torch.autograd.grad(loss.float() * SCALE, list(model.parameters()))]


def direct_sam_step_16_mixed(model, batch, rho, lr):
    params = list(model.parameters())
    grads = autocast_gradients(model, batch)
    e = direct_perturbation([p.detach() for p in params], grads, rho, adaptive=False)
    w0 = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, e, strict=True):
            p.add_(d)
    g2 = autocast_gradients(model, batch)
    with torch.no_grad():
        for p, w, g in zip(params, w0, g2, strict=True):
            p.copy_(w - lr * g)


def scale_of(trainer: pl.Trainer) -> float:
    return float(trainer.precision_plugin.scaler.get_scale())  # type: ignore[attr-defined]


@pytest.mark.compat("precision='16-mixed' (CPU GradScaler)", "SAM")
def test_one_step_equals_the_direct_sam_step_with_loss_scaling(tmp_path):
    pl.seed_everything(0, verbose=False)
    reference = TinyClassifier(lr=0.1)
    model = copy.deepcopy(reference)
    direct_sam_step_16_mixed(reference, first_batch(), rho=0.2, lr=0.1)
    trainer = fit_16_mixed(tmp_path, model, [SAM(rho=0.2)])
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert scale_of(trainer) == SCALE  # a finite step: the scale is kept


class Overflowing(TinyClassifier):
    """Adds a non-finite term to the loss on chosen calls of ``training_step``.

    ``call`` counts every call: per batch, 0 is the plain pass and 1 SAM's perturbed one.
    ``only`` names the parameter the term depends on (``None``: the whole output).
    """

    def __init__(self, overflow_calls: set[int], only: str | None = None) -> None:
        super().__init__(lr=0.1)
        self.overflow_calls, self.only, self.calls = overflow_calls, only, 0

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        call, self.calls = self.calls, self.calls + 1
        if call not in self.overflow_calls:
            return loss
        if self.only is None:
            return loss * torch.inf
        return loss + self.get_parameter(self.only).sum() * torch.inf


@pytest.mark.parametrize(
    ("overflow_calls", "only", "sam_parameters"),
    [
        ({1}, None, None),  # the perturbed pass overflows: Lightning's own check saw nothing
        ({0}, None, None),  # the first pass overflows (the perturbation is NaN)
        # the first gradient overflows in a parameter SAM does not perturb, the second is finite:
        # only the merged flags of both passes skip this step
        ({0}, "net.0.weight", lambda name, p: name.startswith("net.3")),
    ],
    ids=["second-pass", "first-pass", "first-pass-unperturbed-parameter"],
)
def test_a_non_finite_gradient_in_either_pass_skips_the_step(
    tmp_path, overflow_calls, only, sam_parameters
):
    model = Overflowing(overflow_calls, only)
    before = copy.deepcopy(model.state_dict())
    trainer = fit_16_mixed(tmp_path, model, [SAM(rho=0.2, parameters=sam_parameters)])
    assert model.calls == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert scale_of(trainer) == SCALE / 2  # backed off, as after an overflow without SAM


def test_training_continues_after_a_skipped_step(tmp_path):
    model = Overflowing({1})
    trainer = fit_16_mixed(tmp_path, model, [SAM(rho=0.2)], max_steps=3)
    assert model.calls == 6 and trainer.global_step == 3
    assert scale_of(trainer) == SCALE / 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gradient_clipping_sees_the_unscaled_second_gradient(tmp_path):
    """With clipping at a norm far below the gradient's, the step length is exactly lr * clip."""
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier(lr=0.1)
    w0 = [p.detach().clone() for p in model.parameters()]
    fit_16_mixed(tmp_path, model, [SAM(rho=0.2)], gradient_clip_val=1e-3)
    moved = zip(model.parameters(), w0, strict=True)
    step = torch.sqrt(sum(((p - w) ** 2).sum() for p, w in moved))
    torch.testing.assert_close(step, torch.tensor(0.1 * 1e-3), rtol=1e-3, atol=0)


class FusedAdamW(TinyClassifier):
    def __init__(self, fused: bool) -> None:
        super().__init__(lr=0.01)
        self.fused = fused

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01, fused=self.fused)


def test_fused_optimizer_unscaling_in_step_gives_the_same_steps(tmp_path):
    """Lightning leaves unscaling to a fused optimizer's step; SAM unscales the first gradient."""
    pl.seed_everything(0, verbose=False)
    fused, plain = FusedAdamW(fused=True), FusedAdamW(fused=False)
    plain.load_state_dict(fused.state_dict())
    fit_16_mixed(tmp_path, fused, [SAM(rho=0.2)], max_steps=4)
    fit_16_mixed(tmp_path, plain, [SAM(rho=0.2)], max_steps=4)
    for a, b in zip(fused.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_trains_several_epochs_with_validation(tmp_path):
    model = TinyClassifier(lr=0.1)
    trainer = fit_16_mixed(tmp_path, model, [SAM(rho=0.05)], max_steps=-1, max_epochs=4,
                           limit_val_batches=None)  # fmt: skip
    assert trainer.callback_metrics["val_acc"] > 0.7
    assert "reg/sam/perturbation_norm" in trainer.callback_metrics
