"""Compatibility matrix, distributed rows: DDP and FSDP2 with 2 CPU processes (gloo).

Two launches serve every cell (a launch costs seconds on 2 cores): the stack under ``ddp_spawn``
(``GlooDDPSpawn``) from this process, and one run of ``tests.compat.distributed_helpers`` whose two
processes (``ModelParallelStrategy``'s own launcher) fit the FSDP2 stack, LabelSmoothing under
FSDP2 and DDP, ProximalSparsity alone and a refused group lasso. Each rank writes what it saw
(gathered states, metrics, draws, param groups); the tests below only read those files. Same seed,
data and initial weights everywhere, so FSDP2 is checked against DDP and both against one process.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_reg.privacy import loss_attack_metrics
from tests.compat import distributed_helpers as dh
from tests.test_privacy import NAMES, subset_indices

DDP = "DDP, 2 processes (gloo)"
FSDP2 = "FSDP2 (ModelParallelStrategy, 2 CPU processes)"
FSDP1 = "FSDP1 (FSDPStrategy), CPU"
REPO = Path(__file__).resolve().parents[2]
# Launch variables that must not leak into later tests (a reused MASTER_PORT may still be bound).
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK")

Ranks = list[dict[str, Any]]


def _load(root: Path, name: str) -> Ranks:
    return [torch.load(root / f"{name}.rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    saved = dict(os.environ)
    try:
        dh.run_ddp_launch(root)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return root


@pytest.fixture(scope="module")
def fsdp2_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fsdp2")
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV and k != "PL_GLOBAL_SEED"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.compat.distributed_helpers", str(root)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return root


@pytest.fixture(scope="module")
def ddp(ddp_root: Path) -> Ranks:
    return _load(ddp_root, "ddp_stack")


@pytest.fixture(scope="module")
def fsdp2(fsdp2_root: Path) -> Ranks:
    return _load(fsdp2_root, "fsdp2_stack")


# ------------------------------------------------------------------------ reference computations
def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _close(a: dict[str, Tensor], b: dict[str, Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


def _model(state: dict[str, Tensor]) -> dh.NormClassifier:
    model = dh.NormClassifier()
    model.load_state_dict(state)
    return model.eval()


def _single_process_gap(entry: dict[str, Any]) -> dict[str, float]:
    """``validation_step``'s loss and accuracy on the whole gap subset, in this one process."""
    train = dh.datamodule().train_set
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(5))
    x, y = (t[order[: dh.SUBSET]] for t in train.tensors)
    with torch.no_grad():
        logits = _model(entry["state"])(x)
    acc = (logits.argmax(-1) == y).float().mean()
    return {"loss": F.cross_entropy(logits, y).item(), "acc": acc.item()}


def _single_process_audit(entry: dict[str, Any]) -> dict[str, float]:
    data = dh.datamodule()
    members, nonmembers = subset_indices(256, 128, dh.SUBSET, seed=5)
    model = _model(entry["state"])
    losses = []
    for dataset, indices in ((data.train_set, members), (data.val_set, nonmembers)):
        x, y = dataset.tensors
        with torch.no_grad():
            losses.append(F.cross_entropy(model(x[indices]), y[indices], reduction="none"))
    return loss_attack_metrics(*losses)


def _weight_statistics(state: dict[str, Tensor]) -> dict[str, float]:
    """RegularizationMonitor's definitions on the whole (gathered) weights, in float64."""
    weights = {k: v.double() for k, v in state.items() if v.ndim >= 2}
    stats = {
        "reg/weights/l2": math.sqrt(sum(w.square().sum().item() for w in weights.values())),
        "reg/weights/l1": sum(w.abs().sum().item() for w in weights.values()),
        "reg/weights/sparsity": sum((w.abs() <= 1e-6).sum().item() for w in weights.values())
        / sum(w.numel() for w in weights.values()),
    }
    for key, w in weights.items():
        stats[f"reg/weights_l2/{key.rpartition('.')[0]}"] = w.norm().item()
    return stats


def _check_stack_ran(ranks: Ranks) -> None:
    assert [r["stopped_epoch"] for r in ranks] == [dh.EPOCHS, dh.EPOCHS]
    assert sorted(ranks[0]["validated"]) == list(range(dh.EPOCHS))


# ---------------------------------------------------------------------------------------- DDP
pytestmark = [pytest.mark.ddp, pytest.mark.timeout(300)]


@pytest.mark.compat(DDP, "stack")
def test_ddp_stack_ends_with_identical_weights_on_both_ranks(ddp):
    _check_stack_ran(ddp)
    assert _same(ddp[0]["local"], ddp[1]["local"])
    assert _same(ddp[0]["final"], ddp[0]["local"])  # nothing sharded


@pytest.mark.compat(DDP, "EarlyStopping")
def test_ddp_early_stopping_restores_the_best_check_exactly(ddp):
    for rank in ddp:
        # the check runs at the training-epoch end: epoch 1's shows at the next validation
        assert rank["validated"][2]["metrics"]["reg/early_stopping/best_epoch"] == 1
        assert _same(rank["final"], rank["validated"][1]["state"])
        assert not _same(rank["final"], rank["validated"][2]["state"])


@pytest.mark.compat(DDP, "WeightDecayExclusion")
def test_ddp_weight_decay_exclusion_splits_alike_and_follows_the_lr(ddp):
    _check_groups(ddp)
    assert ddp[0]["groups"] == ddp[1]["groups"]
    assert not any(flag for group in ddp[0]["groups"] for flag in group["dtensors"])


def _check_groups(ranks: Ranks) -> None:
    for rank in ranks:
        decayed, excluded = rank["groups"]
        assert decayed["names"] == ["net.0.weight", "net.3.weight"]
        assert decayed["weight_decay"] == 0.05
        assert excluded["names"] == ["net.0.bias", "net.1.weight", "net.1.bias", "net.3.bias"]
        assert excluded["weight_decay"] == 0.0 and excluded["no_decay_of"] == 0
        assert excluded["lr"] == decayed["lr"] == pytest.approx(0.05 * 0.5**dh.EPOCHS)


@pytest.mark.compat(DDP, "Mixup")
def test_ddp_mixup_draws_differ_per_rank(ddp):
    lams = [rank["lams"] for rank in ddp]
    assert len(lams[0]) == len(lams[1]) == 4 * dh.EPOCHS  # 128 samples per rank, batches of 32
    assert lams[0] != lams[1]
    for rank in ddp:  # soft rows: mixed and smoothed, each summing to 1
        targets = rank["targets"]
        assert targets.shape == (32, 4) and targets.min() >= 0.1 / 4 - 1e-6
        torch.testing.assert_close(targets.sum(1), torch.ones(32))


@pytest.mark.compat(DDP, "LabelSmoothing")
def test_ddp_label_smoothing_smooths_every_rank_alike(fsdp2_root):
    ranks = _load(fsdp2_root, "ddp_smoothing")
    _check_smoothed(ranks)
    assert _same(ranks[0]["local"], ranks[1]["local"])


def _check_smoothed(ranks: Ranks) -> None:
    for rank in ranks:
        targets = rank["targets"]
        assert targets.shape == (32, 4)
        hot = targets.argmax(1)
        expected = torch.full((32, 4), 0.025).scatter(1, hot[:, None], 0.925)
        torch.testing.assert_close(targets, expected)


@pytest.mark.compat(DDP, "GeneralizationGapMonitor")
def test_ddp_gap_equals_a_single_process_evaluation(ddp):
    for epoch in range(dh.EPOCHS):
        entries = [rank["validated"][epoch] for rank in ddp]
        assert not set(entries[0]["gap_indices"]) & set(entries[1]["gap_indices"])
        expected = _single_process_gap(entries[0])
        for entry in entries:
            metrics = entry["metrics"]
            assert metrics["reg/train_eval/loss"] == pytest.approx(expected["loss"], rel=1e-5)
            assert metrics["reg/train_eval/acc"] == pytest.approx(expected["acc"], abs=1e-6)
            gap = metrics["val_loss"] - metrics["reg/train_eval/loss"]
            assert metrics["reg/gap/loss"] == pytest.approx(gap, rel=1e-5)


@pytest.mark.compat(DDP, "RegularizationMonitor")
def test_ddp_monitor_norms_are_exact(ddp):
    _check_norms(ddp)


def _check_norms(ranks: Ranks, name: str = "RegularizationMonitor") -> None:
    for rank in ranks:
        for epoch, entry in rank["epoch_end"].items():
            expected = _weight_statistics(entry["state"])
            logged = {k: entry["metrics"][k] for k in expected if k in entry["metrics"]}
            assert logged.keys() >= {"reg/weights/l2", "reg/weights/l1", "reg/weights/sparsity"}
            assert logged == pytest.approx({k: expected[k] for k in logged}, rel=1e-5), epoch


@pytest.mark.compat(DDP, "MembershipInferenceAudit")
def test_ddp_audit_equals_a_single_process_audit(ddp):
    for epoch in range(dh.EPOCHS):
        expected = _single_process_audit(ddp[0]["validated"][epoch])
        for rank in ddp:
            values = {k: rank["validated"][epoch]["metrics"][f"reg/privacy/{k}"] for k in NAMES}
            assert values == pytest.approx(expected, abs=1e-6, nan_ok=True)


@pytest.mark.compat(DDP, "ProximalSparsity")
def test_ddp_proximal_steps_give_the_same_exact_zeros_on_both_ranks(ddp):
    assert _same(ddp[0]["local"], ddp[1]["local"])
    weights = [v for k, v in ddp[0]["final"].items() if k.endswith("weight") and v.ndim >= 2]
    assert sum(int((w == 0).sum()) for w in weights) > 0  # exact zeros, not near-zeros
    _check_norms(ddp)  # the sparsity logged is that of the weights


# -------------------------------------------------------------------------------------- FSDP2
@pytest.mark.compat(FSDP2, "stack")
def test_fsdp2_stack_trains_like_ddp(fsdp2, ddp):
    _check_stack_ran(fsdp2)
    assert _same(fsdp2[0]["final"], fsdp2[1]["final"])
    # really sharded: 33 rows split 17 / 16
    assert fsdp2[0]["local"]["net.0.weight"].shape == (17, 16)
    assert fsdp2[1]["local"]["net.0.weight"].shape == (16, 16)
    _close(fsdp2[0]["final"], ddp[0]["final"])


@pytest.mark.compat(FSDP2, "EarlyStopping")
def test_fsdp2_early_stopping_restores_local_shards_exactly(fsdp2):
    for rank in fsdp2:
        # the check runs at the training-epoch end: epoch 1's shows at the next validation
        assert rank["validated"][2]["metrics"]["reg/early_stopping/best_epoch"] == 1
        assert _same(rank["final"], rank["validated"][1]["state"])
        assert not _same(rank["final"], rank["validated"][2]["state"])


@pytest.mark.compat(FSDP2, "WeightDecayExclusion")
def test_fsdp2_weight_decay_exclusion_splits_dtensor_parameters(fsdp2, ddp):
    _check_groups(fsdp2)
    assert all(flag for group in fsdp2[0]["groups"] for flag in group["dtensors"])
    names = [[group["names"] for group in ranks[0]["groups"]] for ranks in (fsdp2, ddp)]
    assert names[0] == names[1]


@pytest.mark.compat(FSDP2, "Mixup")
def test_fsdp2_mixup_draws_what_ddp_draws(fsdp2, ddp):
    for sharded, replicated in zip(fsdp2, ddp, strict=True):
        assert sharded["lams"] == pytest.approx(replicated["lams"], rel=1e-6)
        torch.testing.assert_close(sharded["targets"], replicated["targets"])
    assert fsdp2[0]["lams"] != fsdp2[1]["lams"]


@pytest.mark.compat(FSDP2, "LabelSmoothing")
def test_fsdp2_label_smoothing_trains_like_ddp(fsdp2_root):
    sharded, replicated = _load(fsdp2_root, "fsdp2_smoothing"), _load(fsdp2_root, "ddp_smoothing")
    _check_smoothed(sharded)
    for a, b in zip(sharded, replicated, strict=True):
        torch.testing.assert_close(a["targets"], b["targets"])
    _close(sharded[0]["final"], replicated[0]["final"])


@pytest.mark.compat(FSDP2, "GeneralizationGapMonitor")
def test_fsdp2_gap_equals_ddp_and_a_single_process_evaluation(fsdp2, ddp):
    for epoch in range(dh.EPOCHS):
        expected = _single_process_gap(fsdp2[0]["validated"][epoch])
        for sharded, replicated in zip(fsdp2, ddp, strict=True):
            metrics = sharded["validated"][epoch]["metrics"]
            assert metrics["reg/train_eval/loss"] == pytest.approx(expected["loss"], rel=1e-5)
            assert metrics["reg/train_eval/acc"] == pytest.approx(expected["acc"], abs=1e-6)
            theirs = replicated["validated"][epoch]["metrics"]
            for key in ("reg/train_eval/loss", "reg/gap/loss", "reg/gap/acc"):
                assert metrics[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6)


@pytest.mark.compat(FSDP2, "RegularizationMonitor")
def test_fsdp2_monitor_norms_equal_the_unsharded_values(fsdp2):
    _check_norms(fsdp2)


@pytest.mark.compat(FSDP2, "MembershipInferenceAudit")
def test_fsdp2_audit_equals_ddp_and_a_single_process_audit(fsdp2, ddp):
    for epoch in range(dh.EPOCHS):
        expected = _single_process_audit(fsdp2[0]["validated"][epoch])
        for sharded, replicated in zip(fsdp2, ddp, strict=True):
            ours, theirs = (
                {k: r["validated"][epoch]["metrics"][f"reg/privacy/{k}"] for k in NAMES}
                for r in (sharded, replicated)
            )
            assert ours == pytest.approx(expected, abs=1e-6, nan_ok=True)
            assert ours == pytest.approx(theirs, abs=1e-4, nan_ok=True)


@pytest.mark.compat(FSDP2, "ProximalSparsity")
def test_fsdp2_proximal_sparsity_thresholds_shards_and_logs_whole_weights(fsdp2_root, fsdp2, ddp):
    # in the stack: the same exact zeros as DDP
    zeros = [(v == 0).sum().item() for k, v in fsdp2[0]["final"].items() if v.ndim >= 2]
    assert sum(zeros) > 0
    assert zeros == [(v == 0).sum().item() for v in ddp[0]["final"].values() if v.ndim >= 2]
    # alone, it logs the statistics of the whole weights, not a mean of the shards'
    _check_norms(_load(fsdp2_root, "fsdp2_sparsity"))


def test_fsdp2_group_lasso_across_shards_is_refused_at_fit_start(fsdp2_root):
    for rank in (0, 1):
        message = (fsdp2_root / f"fsdp2_group_lasso.rank{rank}.txt").read_text()
        assert "group_dim=1" in message and "'net.0.weight' is sharded along dim 0" in message
        assert "Use `group_dim=0`" in message


# -------------------------------------------------------------------------------------- FSDP1
@pytest.mark.compat(FSDP1, "stack", refused="Lightning's FSDPStrategy needs CUDA; use FSDP2")
def test_fsdp1_is_refused_on_cpu_by_lightning(tmp_path):
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        pl.Trainer(accelerator="cpu", devices=2, strategy="fsdp", default_root_dir=tmp_path)
