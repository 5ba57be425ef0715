"""Compatibility matrix, column "SAM" on third-party models (timm, torchvision, dict batches) and
a second fit with the same callback object.

Each cell runs one SAM step through a real ``Trainer.fit`` with plain SGD and checks
it against a SAM step written out here: the first gradient, the perturbation by the direct
formula, the second gradient, SGD stepping with it. Running statistics (BatchNorm)
must equal those of one unperturbed forward pass.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_reg import SharpnessAwareMinimization
from tests.compat import models
from tests.compat.models import Classifier, split
from tests.compat.test_models import IMAGE_ROWS, cells
from tests.helpers import BlobsDataModule, TinyClassifier, trainer_kwargs
from tests.test_sam import direct_perturbation

RHO = 0.1


class SGDClassifier(Classifier):
    """The row's model with plain SGD: AdamW's first step is ``lr * sign(g)``, which turns float
    noise in gradients that are zero in theory (a key bias in attention) into whole steps."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def direct_step(module: SGDClassifier, batch: Any) -> dict[str, torch.Tensor]:
    """SAM with ``module``'s own optimizer, in place; returns the buffers after the first pass."""
    x, y = split(batch)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    grads = torch.autograd.grad(F.cross_entropy(module(x), y), params)
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    e = direct_perturbation([p.detach() for p in params], list(grads), RHO, adaptive=False)
    with torch.no_grad():
        for p, d in zip(params, e, strict=True):
            p.add_(d)
    second = torch.autograd.grad(F.cross_entropy(module(x), y), params)
    with torch.no_grad():
        for p, d, g in zip(params, e, second, strict=True):
            p.sub_(d)
            p.grad = g
    module.configure_optimizers().step()
    return buffers


@pytest.mark.parametrize("row", cells("SAM"))
def test_sam_step_on_third_party_models_equals_the_direct_step(tmp_path, row):
    factory, size, dict_batches = IMAGE_ROWS[row]
    pl.seed_everything(0, verbose=False)
    module = SGDClassifier(factory())
    reference = copy.deepcopy(module)
    data = models.image_data(size, dict_batches)
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, max_steps=1, limit_val_batches=0, callbacks=[SharpnessAwareMinimization(RHO)]
    ))  # fmt: skip
    trainer.fit(module, datamodule=data)

    buffers = direct_step(reference, next(iter(data.train_dataloader())))
    for (name, a), b in zip(module.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-5), name  # oneDNN conv threads
    for name, value in module.named_buffers():
        torch.testing.assert_close(value, buffers[name], msg=name)  # one pass counted


@pytest.mark.compat("second fit, same callbacks", "SAM")
def test_a_second_fit_with_the_same_callback_starts_afresh(tmp_path):
    sam = SharpnessAwareMinimization(rho=0.2)
    for _ in range(2):
        pl.seed_everything(0, verbose=False)
        reference = TinyClassifier(lr=0.1)
        model = copy.deepcopy(reference)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[sam]))
        trainer.fit(model, datamodule=BlobsDataModule(shuffle=False))
        fresh = copy.deepcopy(reference)
        pl.seed_everything(0, verbose=False)
        other = pl.Trainer(
            **trainer_kwargs(tmp_path, max_epochs=2, callbacks=[SharpnessAwareMinimization(0.2)])
        )
        other.fit(fresh, datamodule=BlobsDataModule(shuffle=False))
        for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
            assert torch.equal(a, b)
        norm = trainer.callback_metrics["reg/sam/perturbation_norm"]
        assert norm == other.callback_metrics["reg/sam/perturbation_norm"]
