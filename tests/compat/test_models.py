"""Compatibility matrix, third-party models: timm, torchvision, Lightning's demo Transformer and
Hugging Face style dict batches, each wrapped in a LightningModule with an unchanged
``F.cross_entropy`` step.

One fit per row runs the whole stack (shared by that row's cells through a module-scoped cache);
each cell checks its callback's results in that fit against a direct computation.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_reg import (
    EarlyStopping,
    GeneralizationGapMonitor,
    LabelSmoothing,
    MembershipInferenceAudit,
    Mixup,
    ProximalSparsity,
    RegularizationMonitor,
    WeightDecayExclusion,
)
from tests.compat import models
from tests.compat.models import CLASSES, Classifier, Probe
from tests.helpers import trainer_kwargs

SMOOTHING = 0.1


def _needs(module: str, factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Skip (cleanly, in the matrix) where the third-party package is absent."""

    def make() -> nn.Module:
        pytest.importorskip(module)
        return factory()

    return make


# row -> (model factory, image size, dict batches)
IMAGE_ROWS: dict[str, tuple[Callable[[], nn.Module], int, bool]] = {
    "timm ResNet (resnet10t, BatchNorm)": (_needs("timm", models.timm_resnet), 16, False),
    "timm ViT (no_weight_decay)": (_needs("timm", models.timm_vit), 16, False),
    "timm ConvNeXt (LayerNorm2d, layer scale)": (_needs("timm", models.timm_convnext), 32, False),
    "torchvision resnet18": (_needs("torchvision", models.torchvision_resnet18), 16, False),
    "HF dict batches (pixel_values/labels), ViT": (_needs("timm", models.timm_vit), 16, True),
}
EPOCHS = 2
LM_ROW = "Lightning demo Transformer (LM)"


def _fit(root: Any, module: pl.LightningModule, data: pl.LightningDataModule, callbacks: list,
         **overrides: Any) -> pl.Trainer:  # fmt: skip
    trainer = pl.Trainer(**trainer_kwargs(root, callbacks=callbacks, **overrides))
    trainer.fit(module, datamodule=data)
    return trainer


class StackRun:
    """One fit of the whole stack on a row's model, and what was recorded."""

    def __init__(self, root: Any, row: str) -> None:
        factory, size, dict_batches = IMAGE_ROWS[row]
        pl.seed_everything(0, verbose=False)
        self.net = factory()
        self.module = Classifier(self.net)
        self.data = models.image_data(size, dict_batches)
        self.probe = Probe(self.data.train_set, self.data.val_set)
        self.early = EarlyStopping("val_loss", patience=10)
        self.mixup = Mixup(1.0, cutmix_alpha=1.0, label_smoothing=SMOOTHING, num_classes=CLASSES)
        self.plans: list[Any] = []
        self.trainer = _fit(root, self.module, self.data, max_epochs=EPOCHS, callbacks=[
            self.probe, _PlanRecorder(self.mixup, self.plans), self.early,
            WeightDecayExclusion(verbose=False), self.mixup,
            GeneralizationGapMonitor(subset_size=64), RegularizationMonitor(),
            MembershipInferenceAudit(subset_size=64), ProximalSparsity(l1=2.0),
            models.WorseLastEpoch(),
        ])  # fmt: skip


class _PlanRecorder(pl.Callback):
    def __init__(self, mixup: Mixup, plans: list[Any]) -> None:
        self.mixup, self.plans = mixup, plans

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, out: Any, batch: Any, i: int
    ) -> None:
        self.plans.append(self.mixup.current_plan)


_RUNS: dict[str, StackRun] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], StackRun]:
    def get(row: str) -> StackRun:
        if row not in _RUNS:
            _RUNS[row] = StackRun(tmp_path_factory.mktemp("stack"), row)
        return _RUNS[row]

    yield get
    _RUNS.clear()


def cells(column: str, rows: Any = IMAGE_ROWS) -> list[Any]:
    return [pytest.param(row, marks=pytest.mark.compat(row, column), id=row) for row in rows]


def _expected_no_decay(module: nn.Module) -> set[str]:
    """By hand: tensors with fewer than 2 dims, and the names of timm's ``no_weight_decay()``."""
    names = set()
    for prefix, sub in module.named_modules():
        hook = getattr(sub, "no_weight_decay", None)
        if callable(hook):
            names |= {f"{prefix}.{n}" if prefix else n for n in hook()}
    return {
        n for n, p in module.named_parameters()
        if p.ndim < 2 or any(fnmatch.fnmatchcase(n, pat) for pat in names)
    }  # fmt: skip


# ------------------------------------------------------------------------------------ the cells
@pytest.mark.parametrize("row", cells("EarlyStopping"))
def test_early_stopping_restores_the_best_checks_weights(stack, row):
    run = stack(row)
    values = [c["metrics"]["val_loss"] for c in run.probe.checks]
    best = min(range(len(values)), key=values.__getitem__)
    assert run.early.best_epoch == run.probe.checks[best]["epoch"] < EPOCHS - 1
    assert float(run.early.best_score) == pytest.approx(values[best], abs=0)
    final = run.module.state_dict()
    expected = run.probe.checks[best]["state"]
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)  # BatchNorm buffers too
    # the model scores the best value, evaluated independently
    losses = models.per_sample_losses(run.module, run.data.val_set)
    assert float(losses.mean()) == pytest.approx(values[best], rel=1e-5)


@pytest.mark.parametrize("row", cells("WeightDecayExclusion"))
def test_weight_decay_exclusion_groups_and_lr(stack, row):
    run = stack(row)
    names = {id(p): n for n, p in run.module.named_parameters()}
    groups = run.trainer.optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    decay = {names[id(p)] for p in groups[0]["params"]}
    assert no_decay == _expected_no_decay(run.module)
    assert decay == set(names.values()) - no_decay
    if "ViT" in row:
        assert {"net.pos_embed", "net.cls_token"} <= no_decay  # 3-d: only no_weight_decay()
    # the no-decay group follows the lr at every step (StepLR, then WorseLastEpoch's change)
    lrs = run.probe.lrs
    assert all(step[0] == step[1] for step in lrs)
    assert len({step[0] for step in lrs}) == EPOCHS


@pytest.mark.parametrize("row", cells("Mixup"))
def test_mixup_soft_targets_and_mixed_inputs(stack, row):
    run = stack(row)
    mixed = 0
    for (x, y), (mx, my), plan in zip(run.probe.before, run.probe.after, run.plans, strict=True):
        assert y.dtype == torch.long and my.shape == (len(y), CLASSES)
        assert torch.allclose(my.sum(1), torch.ones(len(y)))  # probability rows
        rows = torch.full((len(y), CLASSES), SMOOTHING / CLASSES)
        rows[torch.arange(len(y)), y] += 1 - SMOOTHING
        perm, lam = torch.as_tensor(plan.perm), torch.as_tensor(plan.lam).float().view(-1, 1)
        assert torch.allclose(my, lam * rows + (1 - lam) * rows[perm], atol=1e-6)
        if plan.cut[0]:  # CutMix: the partner's box pasted, the rest untouched
            y0, y1, x0, x1 = (int(v) for v in plan.boxes[0])
            inside = torch.zeros_like(x, dtype=torch.bool)
            inside[..., y0:y1, x0:x1] = True
            assert torch.equal(mx[inside], x[perm][inside])
            assert torch.equal(mx[~inside], x[~inside])
            area = (y1 - y0) * (x1 - x0) / (x.shape[-1] * x.shape[-2])
            assert float(lam[0]) == pytest.approx(1 - area)
        else:
            assert torch.allclose(
                mx, lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[perm], atol=1e-5
            )
        mixed += not torch.equal(mx, x)
    assert mixed == len(run.plans)


@pytest.mark.parametrize("row", cells("GeneralizationGapMonitor"))
def test_gap_monitor_train_eval_matches_an_independent_evaluation(stack, row):
    run = stack(row)
    for check in run.probe.checks:
        train_eval = check["metrics"]["reg/train_eval/loss"]
        assert train_eval == pytest.approx(float(check["train_losses"].mean()), rel=1e-5)
        gap = check["metrics"]["val_loss"] - train_eval
        assert check["metrics"]["reg/gap/loss"] == pytest.approx(gap, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("row", cells("RegularizationMonitor"))
def test_regularization_monitor_norms_match_a_direct_computation(stack, row):
    run = stack(row)
    last = run.probe.epoch_ends[-1]
    matrices = [w.double() for w in last["weights"].values() if w.ndim >= 2]
    l2 = torch.sqrt(sum(w.square().sum() for w in matrices))
    l1 = sum(w.abs().sum() for w in matrices)
    zeros = sum((w.abs() <= 1e-6).sum() for w in matrices) / sum(w.numel() for w in matrices)
    # logged as float32: equal to rounding (torch's float32 vector_norm alone was off by 3.5e-5)
    assert last["metrics"]["reg/weights/l2"] == pytest.approx(float(l2), rel=1e-6)
    assert last["metrics"]["reg/weights/l1"] == pytest.approx(float(l1), rel=1e-6)
    assert last["metrics"]["reg/weights/sparsity"] == pytest.approx(float(zeros), rel=1e-6)


@pytest.mark.parametrize("row", cells("MembershipInferenceAudit"))
def test_membership_audit_auc_matches_a_direct_computation(stack, row):
    run = stack(row)
    for check in run.probe.checks:  # subset_size covers both sets: members = the train set
        value = check["metrics"]["reg/privacy/auc"]
        assert 0.0 <= value <= 1.0
        assert value == pytest.approx(
            models.auc(check["train_losses"], check["val_losses"]), abs=1e-6
        )


@pytest.mark.parametrize("row", cells("ProximalSparsity"))
def test_proximal_sparsity_makes_exact_zeros_in_decayed_matrices_only(stack, row):
    run = stack(row)
    excluded = _expected_no_decay(run.module)
    for weights in [e["weights"] for e in run.probe.epoch_ends] + [
        dict(run.module.named_parameters())
    ]:
        zeros = {n: int((p == 0).sum()) for n, p in weights.items()}
        assert sum(z for n, z in zeros.items() if n not in excluded) > 0
        assert all(zeros[n] == 0 for n in excluded)  # biases, norms, pos_embed, cls_token kept


@pytest.mark.parametrize("row", cells("stack"))
def test_stack_trains_with_finite_losses(stack, row):
    run = stack(row)
    assert torch.isfinite(run.trainer.callback_metrics["train_loss"])
    assert all(torch.isfinite(torch.tensor(c["metrics"]["val_loss"])) for c in run.probe.checks)
    assert len(run.probe.checks) == EPOCHS  # patience 10: no stop
    assert all(torch.isfinite(p).all() for p in run.module.parameters())


# ------------------------------------------------------------------------ LabelSmoothing (alone)
# LabelSmoothing depends on the batch layout only: a list-batch row and the dict-batch row
@pytest.mark.parametrize("row", cells("LabelSmoothing", [
    "timm ViT (no_weight_decay)", "HF dict batches (pixel_values/labels), ViT",
]))  # fmt: skip
def test_label_smoothing_targets_have_the_right_mass(tmp_path, row):
    factory, size, dict_batches = IMAGE_ROWS[row]
    pl.seed_everything(0, verbose=False)
    module, data, probe = Classifier(factory()), models.image_data(size, dict_batches), Probe()
    trainer = _fit(tmp_path, module, data, [probe, LabelSmoothing(SMOOTHING, num_classes=CLASSES)],
                   max_steps=2, limit_val_batches=0)  # fmt: skip
    assert trainer.global_step == 2
    for (x, y), (sx, sy) in zip(probe.before, probe.after, strict=True):
        assert torch.equal(sx, x)  # inputs untouched
        expected = torch.full((len(y), CLASSES), SMOOTHING / CLASSES)
        expected[torch.arange(len(y)), y] += 1 - SMOOTHING
        assert torch.allclose(sy, expected)


# ------------------------------------------------------------------ the language-model row
def _lm(tmp_path: Any, callbacks: list, **overrides: Any) -> tuple[pl.LightningModule, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    module = models.LanguageModel(vocab=16)
    data = models.Data(models.tokens(16, 8, 16, seed=0), models.tokens(16, 8, 16, seed=1), 8)
    return module, _fit(tmp_path, module, data, callbacks, **overrides)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One stack fit of the language model, shared by its cells (the audit takes a ``loss_fn``:
    its default calls ``model(inputs)``, and this model also reads the targets)."""
    early, recorder = EarlyStopping("val_loss", patience=10), Probe()
    module, trainer = _lm(tmp_path_factory.mktemp("lm"), [
        recorder, early, WeightDecayExclusion(verbose=False),
        GeneralizationGapMonitor(subset_size=64), RegularizationMonitor(),
        MembershipInferenceAudit(subset_size=64, loss_fn=models.sequence_losses),
        ProximalSparsity(l1=0.5), models.WorseLastEpoch(),
    ], max_epochs=EPOCHS)  # fmt: skip
    return dict(early=early, checks=recorder.checks, module=module, trainer=trainer)


@pytest.mark.compat(LM_ROW, "stack")
def test_language_model_stack(lm_run):
    module, trainer, checks = lm_run["module"], lm_run["trainer"], lm_run["checks"]
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    values = [c["metrics"]["val_loss"] for c in checks]
    best = min(range(len(values)), key=values.__getitem__)
    assert lm_run["early"].best_epoch == best < EPOCHS - 1
    final, expected = module.state_dict(), checks[best]["state"]
    assert all(torch.equal(final[k], expected[k]) for k in final)
    # nn.MultiheadAttention's in_proj_bias and the LayerNorms do not decay; embeddings do
    names = {id(p): n for n, p in module.named_parameters()}
    no_decay = {names[id(p)] for p in trainer.optimizers[0].param_groups[1]["params"]}
    assert no_decay == {n for n, p in module.named_parameters() if p.ndim < 2}
    assert any(n.endswith("in_proj_bias") for n in no_decay)


@pytest.mark.compat(LM_ROW, "MembershipInferenceAudit")
def test_language_model_audit_with_a_sequence_loss_fn(lm_run):
    module, check = copy.deepcopy(lm_run["module"]), lm_run["checks"][-1]
    module.load_state_dict(check["state"])  # the weights of the last audit
    module.eval()
    data = lm_run["trainer"].datamodule
    with torch.no_grad():
        members, nonmembers = (
            torch.cat([models.sequence_losses(module, b) for b in loader])
            for loader in (data.train_dataloader(), data.val_dataloader())
        )  # fmt: skip
    value = check["metrics"]["reg/privacy/auc"]
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(models.auc(members, nonmembers), abs=1e-6)


@pytest.mark.compat(
    LM_ROW, "Mixup", refused="token ids cannot be blended: refused at the first batch"
)
def test_language_model_mixup_is_refused_at_the_first_batch(tmp_path):
    probe = Probe()
    with pytest.raises(ValueError, match=r"(?s)int64 inputs.*Token ids cannot be blended"):
        _lm(tmp_path, [probe, Mixup(1.0, num_classes=16)], max_epochs=1)
    assert len(probe.before) == 1 and not probe.after  # before the first step


@pytest.mark.compat(
    LM_ROW, "LabelSmoothing",
    refused="per-token targets (N, T) refused at the first batch; smooth in cross_entropy",
)  # fmt: skip
def test_language_model_label_smoothing_is_refused_at_the_first_batch(tmp_path):
    probe = Probe()
    with pytest.raises(ValueError, match=r"(?s)got \(8, 8\).*label_smoothing="):
        _lm(tmp_path, [probe, LabelSmoothing(0.1, num_classes=16)], max_epochs=1)
    assert len(probe.before) == 1 and not probe.after  # before the first step


def test_language_model_audit_default_loss_asks_for_a_loss_fn(tmp_path):
    # not a cell of its own: with `loss_fn` the audit works (above); without it, the default
    # `model(inputs)` cannot call a teacher-forced model, and the error says what to pass
    with pytest.raises(RuntimeError, match=r"(?s)model\(inputs\).*LanguageModel.*`loss_fn"):
        _lm(tmp_path, [MembershipInferenceAudit(subset_size=16)], max_epochs=1)
