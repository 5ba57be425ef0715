"""ProximalSparsity: exact zeros, the closed-form soft-threshold, schedules, groups, logging."""

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg import (
    ProximalSparsity,
    RegularizationMonitor,
    prox_elastic_net,
    prox_group_lasso,
    prox_l1,
)
from tests.helpers import trainer_kwargs


def sparse_regression(n=256, features=20, useful=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.zeros(features)
    w[:useful] = torch.tensor([2.0, -1.5, 1.0, 0.5])
    y = x @ w + 0.1 * torch.randn(n, generator=g)
    return TensorDataset(x, y)


class Linear(pl.LightningModule):
    """Least squares, optionally with a plain (subgradient) L1 term in the loss."""

    def __init__(self, features=20, lr=0.05, loss_l1=0.0, groups=None):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(features, 1)
        self.lr, self.loss_l1, self.groups = lr, loss_l1, groups

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.fc(x).squeeze(-1), y)
        if self.loss_l1:
            loss = loss + self.loss_l1 * self.fc.weight.abs().sum()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.groups or self.parameters(), lr=self.lr)


def fit(tmp_path, model, callbacks, epochs=30, **overrides):
    pl.seed_everything(0, verbose=False)
    loader = DataLoader(sparse_regression(), batch_size=32, shuffle=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_epochs=epochs,
                                          limit_val_batches=0, **overrides))  # fmt: skip
    trainer.fit(model, train_dataloaders=loader)
    return trainer


def test_proximal_step_gives_exact_zeros_where_plain_l1_does_not(tmp_path):
    prox = Linear()
    trainer = fit(tmp_path / "prox", prox, [ProximalSparsity(l1=0.2)])
    plain = Linear(loss_l1=0.2)
    fit(tmp_path / "plain", plain, [])
    prox_w, plain_w = prox.fc.weight.detach()[0], plain.fc.weight.detach()[0]
    assert (prox_w[4:] == 0).all()  # every irrelevant feature is exactly zero
    assert (prox_w[:4] != 0).all()  # the useful ones survive
    assert (plain_w == 0).sum() == 0  # the subgradient only makes them oscillate around 0
    assert plain_w[4:].abs().max() > 0
    assert math.isfinite(trainer.callback_metrics["train_loss"].item())
    assert trainer.callback_metrics["reg/weights/sparsity"].item() == pytest.approx(16 / 20)


class _RecordStep(pl.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before = pl_module.fc.weight.detach().clone()
        self.grad = pl_module.fc.weight.grad.detach().clone()
        self.bias_before = pl_module.fc.bias.detach().clone()
        self.bias_grad = pl_module.fc.bias.grad.detach().clone()


def test_one_step_matches_the_closed_form_soft_threshold(tmp_path):
    model, rec = Linear(lr=0.1), _RecordStep()
    fit(tmp_path, model, [rec, ProximalSparsity(l1=0.5)], epochs=1, max_steps=1)
    expected = torch.sign(rec.before - 0.1 * rec.grad) * torch.clamp(
        (rec.before - 0.1 * rec.grad).abs() - 0.1 * 0.5, min=0
    )
    torch.testing.assert_close(model.fc.weight.detach(), expected)
    # the bias is excluded: a plain SGD step only
    torch.testing.assert_close(model.fc.bias.detach(), rec.bias_before - 0.1 * rec.bias_grad)


def test_per_group_strength_and_learning_rate(tmp_path):
    model = Linear()
    rec = _RecordStep()
    model.groups = [{"params": [model.fc.weight], "lr": 0.2, "l1": 2.0},
                    {"params": [model.fc.bias], "lr": 0.1}]  # fmt: skip
    fit(tmp_path, model, [rec, ProximalSparsity(l1=0.5)], epochs=1, max_steps=1)
    stepped = rec.before - 0.2 * rec.grad
    torch.testing.assert_close(model.fc.weight.detach(), prox_l1(stepped, 0.2 * 2.0))


def test_start_step_and_warm_up(tmp_path):
    callback = ProximalSparsity(l1=1.0, start_step=10, warmup_steps=4)
    assert [callback.ramp(s) for s in (0, 9, 10, 11, 13, 50)] == [0, 0, 0.25, 0.5, 1.0, 1.0]
    model = Linear()
    fit(tmp_path, model, [ProximalSparsity(l1=5.0, start_step=10_000)], epochs=2)
    assert (model.fc.weight != 0).all()  # never started


def test_gradient_accumulation_applies_one_step_per_optimizer_step(tmp_path):
    calls = []

    class Counting(ProximalSparsity):
        def apply(self, optimizers, ramp=1.0):
            calls.append(ramp)
            super().apply(optimizers, ramp)

    fit(tmp_path, Linear(), [Counting(l1=0.1)], epochs=1, accumulate_grad_batches=2)
    assert len(calls) == 4  # 8 batches, 4 optimizer steps


def test_elastic_net_and_group_lasso_closed_forms():
    w = torch.tensor([[3.0, -0.5], [0.2, 0.1]])
    torch.testing.assert_close(prox_elastic_net(w, 0.3, 0.5), prox_l1(w, 0.3) / 1.5)
    out = prox_group_lasso(w, threshold=0.5, group_dim=0)
    norms = torch.linalg.vector_norm(w, dim=1)
    scale = torch.clamp(1 - 0.5 * math.sqrt(2) / norms, min=0)
    torch.testing.assert_close(out, w * scale.unsqueeze(1))
    assert (out[1] == 0).all() and (out[0] != 0).all()  # a whole row removed, not single weights
    columns = prox_group_lasso(w, threshold=0.5, group_dim=1)
    assert columns.shape == w.shape


def test_group_lasso_removes_whole_input_features(tmp_path):
    model = Linear()
    fit(tmp_path, model, [ProximalSparsity(l1=0.3, penalty="group_lasso", group_dim=1)])
    weight = model.fc.weight.detach()[0]
    assert (weight[4:] == 0).all() and (weight[:4] != 0).all()


def test_logging_defers_to_the_regularization_monitor(tmp_path):
    trainer = fit(tmp_path, Linear(), [ProximalSparsity(l1=0.2), RegularizationMonitor()])
    assert trainer.callback_metrics["reg/weights/sparsity"].item() == pytest.approx(16 / 20)
    assert trainer.callback_metrics["reg/proximal/strength"].item() == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(l1=-1.0), ValueError),
        (dict(l1=0.0, l2=0.0), ValueError),
        (dict(l2=0.1), ValueError),
        (dict(penalty="l0"), ValueError),
        (dict(warmup_steps=-1), ValueError),
        (dict(exclude="*.bias"), TypeError),
    ],
)
def test_invalid_arguments(kwargs, error):
    with pytest.raises(error):
        ProximalSparsity(**kwargs)


def test_two_instances_keep_their_own_checkpoint_state(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    first, second = ProximalSparsity(l1=0.01), ProximalSparsity(l1=0.02, start_step=1000)
    assert first.state_key != second.state_key
    assert first.state_key == ProximalSparsity(l1=0.01).state_key  # built from the arguments
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    fit(tmp_path, Linear(), [first, second, ck], epochs=2, enable_checkpointing=True)
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["callbacks"]
    assert saved[first.state_key] == first.state_dict()
    assert saved[second.state_key] == second.state_dict()
