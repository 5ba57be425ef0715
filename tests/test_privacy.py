"""MembershipInferenceAudit through real ``Trainer.fit`` runs, against independent computations."""

import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from sklearn.metrics import roc_auc_score
from torch.utils.data import TensorDataset

from lightning_reg.privacy import MembershipInferenceAudit, loss_attack_metrics
from tests.helpers import BlobsDataModule, TinyClassifier, same_state, trainer_kwargs

NAMES = ("auc", "advantage", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")


# ------------------------------------------------------------------- independent reference code
def subset_indices(n_train, n_val, subset_size, seed):
    """The documented seed logic: one generator draws the members, then the non-members."""
    n = min(subset_size, n_train, n_val)
    g = torch.Generator().manual_seed(seed)
    members = torch.randperm(n_train, generator=g)[:n]
    return members.tolist(), torch.randperm(n_val, generator=g)[:n].tolist()


def per_sample_losses(state, dataset, indices):
    model = TinyClassifier(**{k: v for k, v in state["hparams"].items()})
    model.load_state_dict(state["weights"])
    model.eval()
    x, y = dataset.tensors
    with torch.no_grad():
        return F.cross_entropy(model(x[indices]), y[indices], reduction="none").numpy()


def numpy_attack(member_losses, nonmember_losses):
    """Exact ROC by brute force: 'member' when -loss >= t, for every distinct t (and +inf)."""
    sm, sn = -member_losses.astype(np.float64), -nonmember_losses.astype(np.float64)
    t = np.concatenate([[np.inf], np.unique(np.concatenate([sm, sn]))])
    tpr = (sm[None, :] >= t[:, None]).mean(1)
    false_pos = (sn[None, :] >= t[:, None]).sum(1)
    out = {"advantage": float(np.max(tpr - false_pos / len(sn)))}
    for name, level in (("tpr_at_1pct_fpr", 0.01), ("tpr_at_0.1pct_fpr", 0.001)):
        ok = false_pos <= level * len(sn) + 1e-9
        out[name] = float(tpr[ok].max()) if len(sn) * level >= 1 - 1e-9 else math.nan
    return out


# ------------------------------------------------------------------------------ test utilities
class NoisyBlobs(BlobsDataModule):
    """Blobs with the same share of random labels in the training and the validation set."""

    def __init__(self, noise, **kwargs):
        super().__init__(label_noise=noise, **kwargs)
        g = torch.Generator().manual_seed(123)
        x, y = self.val_set.tensors
        y = y.clone()
        flip = torch.rand(len(y), generator=g) < noise
        y[flip] = torch.randint(0, self.classes, (int(flip.sum()),), generator=g)
        self.val_set = TensorDataset(x, y)


class WeightsRecorder(pl.Callback):
    """Placed BEFORE the audit: the weights that were validated (and audited), per epoch."""

    def __init__(self):
        self.states = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            weights = {k: v.clone() for k, v in pl_module.state_dict().items()}
            hparams = dict(pl_module.hparams)
            self.states[trainer.current_epoch] = {"weights": weights, "hparams": hparams}


class ValuesRecorder(pl.Callback):
    """Placed AFTER the audit: what it put into ``callback_metrics``, per epoch."""

    def __init__(self):
        self.values = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            m = trainer.callback_metrics
            self.values[trainer.current_epoch] = {k: m[f"reg/privacy/{k}"].item() for k in NAMES}


def fit(tmp_path, model, callbacks, dm, **overrides):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(model, datamodule=dm)
    return trainer


def audited(tmp_path, model, dm, audit, **overrides):
    weights, values = WeightsRecorder(), ValuesRecorder()
    trainer = fit(tmp_path, model, [weights, audit, values], dm, **overrides)
    return trainer, weights.states, values.values


# ------------------------------------------------------------------------------------ the tests
def test_logged_metrics_equal_an_independent_attack_on_the_validated_weights(tmp_path):
    pl.seed_everything(0, verbose=False)
    dm, model = NoisyBlobs(0.4), TinyClassifier(hidden=128, lr=0.3)
    audit = MembershipInferenceAudit(subset_size=120, seed=3)  # 120 of 256 train, 128 val
    logger = CSVLogger(tmp_path)
    _, states, values = audited(tmp_path, model, dm, audit, max_epochs=3, logger=logger)
    members, nonmembers = subset_indices(256, 128, 120, seed=3)
    assert len(values) == 3
    for epoch, logged in values.items():
        lm = per_sample_losses(states[epoch], dm.train_set, members)
        ln = per_sample_losses(states[epoch], dm.val_set, nonmembers)
        labels = np.r_[np.ones(len(lm)), np.zeros(len(ln))]
        assert logged["auc"] == pytest.approx(roc_auc_score(labels, -np.r_[lm, ln]), abs=1e-6)
        expected = numpy_attack(lm, ln)
        for name in ("advantage", "tpr_at_1pct_fpr"):  # 120 non-members: 1 false positive at 1%
            assert logged[name] == pytest.approx(expected[name], abs=1e-6), (epoch, name)
        assert math.isnan(logged["tpr_at_0.1pct_fpr"]) and math.isnan(expected["tpr_at_0.1pct_fpr"])
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().split("\n")[0]
    assert all(f"reg/privacy/{name}" in header for name in NAMES)  # every logger receives them


def test_auc_rises_when_the_model_memorizes_and_stays_at_chance_untrained(tmp_path):
    pl.seed_everything(0, verbose=False)
    dm = NoisyBlobs(0.5, n_train=128, n_val=128)  # half the labels random, in both sets alike
    _, _, memorized = audited(
        tmp_path, TinyClassifier(hidden=256, lr=0.3), dm, MembershipInferenceAudit(128),
        max_epochs=60, check_val_every_n_epoch=20,
    )  # fmt: skip
    assert memorized[59]["auc"] > 0.65 and memorized[59]["advantage"] > 0.3
    assert memorized[59]["auc"] > memorized[19]["auc"]

    pl.seed_everything(0, verbose=False)
    dm = BlobsDataModule(n_train=640, n_val=640)
    _, _, untrained = audited(
        tmp_path, TinyClassifier(lr=0.0), dm, MembershipInferenceAudit(640), max_epochs=1
    )
    assert abs(untrained[0]["auc"] - 0.5) < 0.1  # about 4 standard errors on 640 per side
    assert not math.isnan(untrained[0]["tpr_at_1pct_fpr"])
    assert math.isnan(untrained[0]["tpr_at_0.1pct_fpr"])  # needs >= 1000 non-members


def test_tpr_at_low_fpr_needs_enough_nonmembers():
    g = torch.Generator().manual_seed(0)
    for n, finite_1pct, finite_01pct in (
        (99, False, False),
        (100, True, False),
        (1000, True, True),
    ):
        members, nonmembers = torch.rand(n, generator=g), torch.rand(n, generator=g) + 0.2
        got = loss_attack_metrics(members, nonmembers)
        assert math.isnan(got["tpr_at_1pct_fpr"]) != finite_1pct
        assert math.isnan(got["tpr_at_0.1pct_fpr"]) != finite_01pct
        expected = numpy_attack(members.numpy(), nonmembers.numpy())
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, abs=1e-6, nan_ok=True), (n, name)
    # ties between members and non-members: the ROC has one point per distinct score
    tied = loss_attack_metrics(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0]))
    assert tied["auc"] == pytest.approx(roc_auc_score([1, 1, 1, 0, 0, 0], [0, 0, -1, 0, -1, -1]))


def test_validation_results_weights_and_global_rng_are_untouched(tmp_path):
    results = []
    for callbacks in ([], [MembershipInferenceAudit(200, batch_size=17)]):
        pl.seed_everything(0, verbose=False)
        model = TinyClassifier(batchnorm=True, dropout=0.3)
        trainer = fit(tmp_path, model, callbacks, BlobsDataModule(), max_epochs=2)
        metrics = {k: trainer.callback_metrics[k].item() for k in ("val_loss", "val_acc")}
        results.append((metrics, model.state_dict(), torch.get_rng_state(), model.training))
    (plain, w0, rng0, mode0), (audit, w1, rng1, mode1) = results
    assert audit == plain  # bitwise: the audit neither logs into validation nor reorders batches
    assert same_state(w0, w1) and torch.equal(rng0, rng1) and mode0 == mode1


def test_every_n_evals_skips_sanity_check_and_resumes_its_count(tmp_path):
    calls = []

    class Counting(MembershipInferenceAudit):
        def _audit(self, trainer, pl_module):
            calls.append((trainer.current_epoch, trainer.sanity_checking))
            return super()._audit(trainer, pl_module)

    audit = Counting(64, every_n_evals=2)
    fit(
        tmp_path, TinyClassifier(), [audit], BlobsDataModule(), max_epochs=4, num_sanity_val_steps=2
    )
    assert calls == [(1, False), (3, False)]
    assert audit.state_dict() == {"evals": 4}
    other = MembershipInferenceAudit(64, every_n_evals=2)
    other.load_state_dict(torch.load(_saved(tmp_path, audit.state_dict()), weights_only=True))
    assert other._evals == 4


def _saved(tmp_path, state):
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_custom_loss_fn_and_bad_layouts(tmp_path):
    def ce(pl_module, batch):
        x, y = batch
        return F.cross_entropy(pl_module(x), y, reduction="none")

    results = []
    for audit in (MembershipInferenceAudit(64), MembershipInferenceAudit(64, loss_fn=ce)):
        pl.seed_everything(0, verbose=False)
        _, _, values = audited(tmp_path, TinyClassifier(), BlobsDataModule(), audit, max_epochs=1)
        results.append(values[0])
    assert results[0] == pytest.approx(results[1], nan_ok=True)

    def batch_mean(pl_module, batch):
        return ce(pl_module, batch).mean()

    with pytest.raises(RuntimeError, match="one loss per sample"):
        audit = MembershipInferenceAudit(64, loss_fn=batch_mean)
        fit(tmp_path, TinyClassifier(), [audit], BlobsDataModule(), max_epochs=1)
    with pytest.raises(RuntimeError, match="input_key"):
        audit = MembershipInferenceAudit(64, input_key=2)  # a 2-tuple has no index 2
        fit(tmp_path, TinyClassifier(), [audit], BlobsDataModule(), max_epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"subset_size": 0}, "subset_size"),
        ({"subset_size": True}, "subset_size"),
        ({"every_n_evals": 0}, "every_n_evals"),
        ({"batch_size": 0}, "batch_size"),
        ({"loss_fn": "ce"}, "callable"),
        ({"loss_fn": lambda m, b: b, "target_key": "y"}, "one or the other"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MembershipInferenceAudit(**kwargs)
