"""MembershipInferenceAudit under DDP (2 processes): the numbers of one process on the same data."""

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lightning_reg.privacy import MembershipInferenceAudit, loss_attack_metrics
from tests.helpers import TinyClassifier, trainer_kwargs
from tests.test_privacy import NAMES, NoisyBlobs, numpy_attack, per_sample_losses, subset_indices


class _SaveAfterAudit(pl.Callback):
    """Placed after the audit: saves its values, its subsets' indices and the validated weights."""

    def __init__(self, root: str, audit: MembershipInferenceAudit) -> None:
        self.root, self.audit = root, audit

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        members, nonmembers = self.audit._loaders
        metrics = trainer.callback_metrics
        torch.save(
            {
                "values": {k: metrics[f"reg/privacy/{k}"].item() for k in NAMES},
                "members": list(members.dataset.indices),
                "nonmembers": list(nonmembers.dataset.indices),
                "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
                "hparams": dict(pl_module.hparams),
            },
            f"{self.root}/rank{trainer.global_rank}.pt",
        )


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_ddp_audit_equals_a_single_process_audit(tmp_path):
    pl.seed_everything(0, verbose=False)
    dm = NoisyBlobs(0.4, n_train=256, n_val=128)
    audit = MembershipInferenceAudit(subset_size=101, seed=5)  # odd: ranks get 51 and 50 samples
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, max_epochs=3, accelerator="cpu", devices=2, strategy="ddp_spawn",
        callbacks=[audit, _SaveAfterAudit(str(tmp_path), audit)],
    ))  # fmt: skip
    trainer.fit(TinyClassifier(hidden=128, lr=0.3), datamodule=dm)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    # each subset is split without duplicates and covers the seeded subset exactly
    members, nonmembers = subset_indices(256, 128, 101, seed=5)
    for key, expected in (("members", members), ("nonmembers", nonmembers)):
        assert not set(r0[key]) & set(r1[key])
        assert sorted(r0[key] + r1[key]) == sorted(expected)

    # both ranks hold the same values, equal to one process auditing both whole subsets
    assert r0["values"] == pytest.approx(r1["values"], nan_ok=True)
    lm = per_sample_losses(r0, dm.train_set, members)
    ln = per_sample_losses(r0, dm.val_set, nonmembers)
    single = loss_attack_metrics(torch.from_numpy(lm), torch.from_numpy(ln))
    assert r0["values"] == pytest.approx(single, abs=1e-6, nan_ok=True)
    labels = np.r_[np.ones(len(lm)), np.zeros(len(ln))]
    assert r0["values"]["auc"] == pytest.approx(roc_auc_score(labels, -np.r_[lm, ln]), abs=1e-6)
    expected = numpy_attack(lm, ln)
    assert r0["values"]["advantage"] == pytest.approx(expected["advantage"], abs=1e-6)
    assert r0["values"]["tpr_at_1pct_fpr"] == pytest.approx(expected["tpr_at_1pct_fpr"], abs=1e-6)
    assert math.isnan(r0["values"]["tpr_at_0.1pct_fpr"])
