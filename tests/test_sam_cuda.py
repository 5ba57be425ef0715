"""SAM on one GPU (skipped without one; run by ``benchmarks/gpu_check.sh``): the 16-mixed step
equals a SAM step written out with CUDA autocast and loss scaling, an overflow in the perturbed
pass skips the step, and SAM adds no host-device synchronisation to Lightning's own steps."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_reg import SAM
from tests.helpers import BlobsDataModule, TinyClassifier
from tests.test_cuda import gpu_kwargs, needs_cuda
from tests.test_sam import direct_perturbation, first_batch
from tests.test_sam_mixed_precision import Overflowing
from tests.test_stack import _CountScalarReadsInTrainingSteps

SCALE = 2.0**16  # Lightning's GradScaler starts here


def cuda_gradients(model, x, y, precision):
    params = list(model.parameters())
    dtype = torch.half if precision == "16-mixed" else torch.bfloat16
    with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
        loss = F.cross_entropy(model(x), y)
    if precision != "16-mixed":
        return torch.autograd.grad(loss, params)
    inv = torch.tensor(SCALE, device="cuda").double().reciprocal().float()
    return [g * inv for g in torch.autograd.grad(loss.float() * SCALE, params)]


@needs_cuda
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_one_step_equals_the_direct_step_on_gpu(tmp_path, precision):
    pl.seed_everything(0, verbose=False)
    reference = TinyClassifier(lr=0.1).cuda()
    model = copy.deepcopy(reference).cpu()
    x, y = (t.cuda() for t in first_batch())
    params = list(reference.parameters())
    first = list(cuda_gradients(reference, x, y, precision))
    e = direct_perturbation([p.detach() for p in params], first, 0.2, adaptive=False)
    with torch.no_grad():
        for p, d in zip(params, e, strict=True):
            p.add_(d)
    second = cuda_gradients(reference, x, y, precision)
    with torch.no_grad():
        for p, d, g in zip(params, e, second, strict=True):
            p.sub_(d).sub_(0.1 * g)
    trainer = pl.Trainer(**gpu_kwargs(
        tmp_path, max_steps=1, limit_val_batches=0, precision=precision, callbacks=[SAM(rho=0.2)]
    ))  # fmt: skip
    trainer.fit(model, datamodule=BlobsDataModule(shuffle=False))
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@needs_cuda
def test_an_overflow_in_the_perturbed_pass_skips_the_step_on_gpu(tmp_path):
    model = Overflowing({1})
    before = copy.deepcopy(model.state_dict())
    trainer = pl.Trainer(**gpu_kwargs(
        tmp_path, max_steps=1, limit_val_batches=0, precision="16-mixed", callbacks=[SAM()]
    ))  # fmt: skip
    trainer.fit(model, datamodule=BlobsDataModule(shuffle=False))
    for name, value in model.state_dict().items():
        assert torch.equal(value.cpu(), before[name]), name
    assert trainer.precision_plugin.scaler.get_scale() == SCALE / 2  # type: ignore[attr-defined]


@needs_cuda
@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_sam_adds_no_scalar_read_to_training_steps(tmp_path, precision):
    counts = {}
    for label, callbacks in (("bare", []), ("sam", [SAM()])):
        pl.seed_everything(0, verbose=False)
        counter = _CountScalarReadsInTrainingSteps()
        trainer = pl.Trainer(**gpu_kwargs(
            tmp_path / label, callbacks=[*callbacks, counter], max_epochs=2, precision=precision
        ))  # fmt: skip
        trainer.fit(TinyClassifier(lr=0.1), datamodule=BlobsDataModule(shuffle=False))
        counts[label] = counter.count
    assert counts["sam"] == counts["bare"], counts
