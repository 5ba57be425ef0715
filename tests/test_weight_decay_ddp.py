"""WeightDecayExclusion under DDP with 2 processes (CPU, gloo)."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_reg import WeightDecayExclusion
from tests.helpers import BlobsDataModule, trainer_kwargs
from tests.test_weight_decay import DecayProbe, probe_values


class _SaveRankResult(pl.Callback):
    def __init__(self, root: str) -> None:
        self.root = root

    def on_train_end(self, trainer, pl_module):
        groups = trainer.optimizers[0].param_groups
        torch.save(
            {
                "probes": probe_values(pl_module),
                "weight_decay": [g["weight_decay"] for g in groups],
                "sizes": [len(g["params"]) for g in groups],
            },
            f"{self.root}/rank{trainer.global_rank}.pt",
        )


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_ddp_regroups_identically_and_leaves_excluded_parameters_undecayed(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = DecayProbe("adamw")
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_spawn",
        callbacks=[WeightDecayExclusion(), _SaveRankResult(str(tmp_path))],
    ))  # fmt: skip
    trainer.fit(model, datamodule=BlobsDataModule(n_train=128))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for result in ranks:
        assert result["weight_decay"] == [0.1, 0.0] and result["sizes"] == [3, 7]
        assert (result["probes"]["weight"] < 1).all()
        assert torch.equal(result["probes"]["gain"], torch.ones(3))
        assert torch.equal(result["probes"]["norm.weight"], torch.ones(3))
    assert all(
        torch.equal(ranks[0]["probes"][k], ranks[1]["probes"][k]) for k in ranks[0]["probes"]
    )
