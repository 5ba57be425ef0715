"""WeightDecayExclusion under DDP with 2 processes (CPU, gloo)."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_reg import WeightDecayExclusion
from tests.helpers import BlobsDataModule, same_state, trainer_kwargs
from tests.test_weight_decay import DecayProbe, probe_values
from tests.test_weight_decay_schedulers import Scheduled, assert_split_groups_follow


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


class _SaveRankRecords(pl.Callback):
    def __init__(self, root: str) -> None:
        self.root = root

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.records, f"{self.root}/records{trainer.global_rank}.pt")


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_ddp_split_groups_follow_a_hand_written_scheduler_on_every_rank(tmp_path):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(
        tmp_path, max_epochs=3, accelerator="cpu", devices=2, strategy="ddp_spawn",
        callbacks=[WeightDecayExclusion(verbose=False), _SaveRankRecords(str(tmp_path))],
    ))  # fmt: skip
    trainer.fit(Scheduled("user"), datamodule=BlobsDataModule(n_train=128, batch_size=32))
    ranks = [torch.load(tmp_path / f"records{r}.pt", weights_only=True) for r in (0, 1)]
    for records in ranks:
        assert_split_groups_follow(records, steps=3 * 2)  # 64 samples per rank, batches of 32
    assert ranks[0] == ranks[1]


class _SaveRankWeights(pl.Callback):
    def __init__(self, root: str) -> None:
        self.root = root

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), f"{self.root}/rank{trainer.global_rank}.pt")


def _ddp_run(root, max_epochs, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(
        root, max_epochs=max_epochs, accelerator="cpu", devices=2, strategy="ddp_spawn",
        enable_checkpointing=True,
        callbacks=[WeightDecayExclusion(verbose=False), _SaveRankWeights(str(root)),
                   ModelCheckpoint(dirpath=root / "ck", save_last=True)],
    ))  # fmt: skip
    model = DecayProbe("adamw", scheduler="step")
    trainer.fit(model, datamodule=BlobsDataModule(n_train=128, shuffle=False), ckpt_path=ckpt_path)
    return [torch.load(root / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_ddp_resume_is_bitwise_identical(tmp_path):
    full = _ddp_run(tmp_path / "full", max_epochs=4)
    _ddp_run(tmp_path / "part", max_epochs=2)
    resumed = _ddp_run(tmp_path / "resumed", 4, ckpt_path=tmp_path / "part" / "ck" / "last.ckpt")
    assert same_state(*full) and same_state(*resumed)
    assert same_state(full[0], resumed[0])
