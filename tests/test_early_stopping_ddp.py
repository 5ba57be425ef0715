"""EarlyStopping's best-state restore under real two-process DDP (``ddp_spawn``, gloo, CPU).

With ``ddp_spawn`` the trainer runs in child processes and the parent's callback objects are never
updated, so each rank writes what it saw (per-epoch monitored values and module states, its final
state and the callback's ``best_epoch``/``best_value``, the warnings it emitted) to
``<tmp_path>/rank{N}.pt`` from :class:`_RankRecorder`, and the tests compare those files.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor

from lightning_reg import EarlyStopping
from tests.helpers import BlobsDataModule, TinyClassifier, trainer_kwargs

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(120)]

DDP = dict(accelerator="cpu", devices=2, strategy="ddp_spawn")


def _state(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _RankRecorder(Callback):
    """Records, on every rank, what the rank saw; writes it to ``out_dir/rank{N}.pt`` at fit end."""

    def __init__(self, out_dir: str, monitor: str = "val_loss") -> None:
        self.out_dir = out_dir
        self.monitor = monitor
        self.epochs: list[int] = []
        self.values: list[float] = []
        self.states: list[dict[str, Tensor]] = []
        self._catcher: Any = None
        self._caught: list[warnings.WarningMessage] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Runs inside the spawned worker: record every warning this rank emits during fit.
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The state the EarlyStopping check of this epoch sees (no optimizer step in between).
        self.epochs.append(trainer.current_epoch)
        self.values.append(float(trainer.callback_metrics[self.monitor]))
        self.states.append(_state(pl_module))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._catcher is not None:
            self._catcher.__exit__(None, None, None)
            self._catcher = None
        es = next(cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping))
        record = dict(
            epochs=self.epochs,
            values=self.values,
            states=self.states,
            final=_state(pl_module),
            best_epoch=es.best_epoch,
            best_value=es.best_value,
            stopped_epoch=es.stopped_epoch,
            should_stop=trainer.should_stop,
            warnings=[(w.category.__name__, str(w.message)) for w in self._caught],
        )
        torch.save(record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class _NaNOnRankOne(TinyClassifier):
    """Logs ``val_loss`` per rank (no ``sync_dist``); rank 1 logs NaN at ``nan_epoch``."""

    def __init__(self, nan_epoch: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_epoch = nan_epoch

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.global_rank == 1 and self.current_epoch == self.nan_epoch:
            loss = torch.full_like(loss, math.nan)
        self.log("val_loss", loss)


def _load_ranks(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    paths = [tmp_path / f"rank{r}.pt" for r in (0, 1)]
    assert all(p.exists() for p in paths), f"missing rank records: {paths}"
    r0, r1 = (torch.load(p, weights_only=True) for p in paths)
    return r0, r1


def _first_best(values: list[float]) -> int:
    """Index of the check EarlyStopping should keep: strict improvements only (min_delta=0)."""
    best, best_i = math.inf, -1
    for i, v in enumerate(values):
        if math.isfinite(v) and v < best:
            best, best_i = v, i
    return best_i


def test_ddp_ranks_restore_identical_best_weights(tmp_path):
    pl.seed_everything(0)
    patience, max_epochs = 3, 30
    model = TinyClassifier(hidden=256, lr=0.3)
    es = EarlyStopping("val_loss", patience=patience)
    trainer = pl.Trainer(
        callbacks=[es, _RankRecorder(str(tmp_path))],
        **trainer_kwargs(tmp_path, max_epochs=max_epochs, **DDP),
    )
    trainer.fit(model, datamodule=BlobsDataModule(label_noise=0.4))
    r0, r1 = _load_ranks(tmp_path)

    # val_loss is synced: both ranks saw the same values and ran the same epochs.
    assert r0["epochs"] == r1["epochs"] == list(range(len(r0["epochs"])))
    assert r0["values"] == r1["values"]
    best = _first_best(r0["values"])
    last = r0["epochs"][-1]

    # The run overfits, so early stopping triggered and the best epoch is not the last one.
    assert r0["should_stop"] and r1["should_stop"]
    assert last < max_epochs - 1, "early stopping did not trigger"
    assert last == best + patience
    assert 0 <= best < last

    # Both ranks agree on the best check, and it is the one computed from the recorded values.
    assert r0["best_epoch"] == r1["best_epoch"] == best
    assert r0["best_value"] == r1["best_value"] == r0["values"][best]

    # Bitwise-identical weights on both ranks, and they are the best epoch's, not the last's.
    assert _equal(r0["final"], r1["final"])
    for r in (r0, r1):
        assert _equal(r["final"], r["states"][best])
        assert not _equal(r["final"], r["states"][last])
    # Every epoch's weights agree across ranks too (DDP keeps replicas in sync).
    assert all(_equal(a, b) for a, b in zip(r0["states"], r1["states"], strict=True))

    # The parent's model gets rank 0's final weights back: the restored ones.
    assert _equal(_state(model), r0["states"][best])

    # Our own logging is synced: no "use sync_dist=True" advice aimed at reg/early_stopping/*.
    for r in (r0, r1):
        assert not [m for _, m in r["warnings"] if "reg/early_stopping" in m]


def test_ddp_nan_on_one_rank_stops_without_hang_or_nan_snapshot(tmp_path):
    pl.seed_everything(0)
    nan_epoch = 2
    model = _NaNOnRankOne(nan_epoch=nan_epoch, hidden=32, lr=0.05)
    es = EarlyStopping("val_loss", patience=5)
    trainer = pl.Trainer(
        callbacks=[es, _RankRecorder(str(tmp_path))],
        **trainer_kwargs(tmp_path, max_epochs=8, **DDP),
    )
    trainer.fit(model, datamodule=BlobsDataModule())
    r0, r1 = _load_ranks(tmp_path)

    # check_finite on rank 1 stopped both ranks at the NaN epoch.
    assert r0["epochs"] == r1["epochs"] == list(range(nan_epoch + 1))
    assert r0["should_stop"] and r1["should_stop"]
    assert r0["stopped_epoch"] == r1["stopped_epoch"] == nan_epoch
    assert math.isfinite(r0["values"][nan_epoch])
    assert math.isnan(r1["values"][nan_epoch])
    # Unsynced: the ranks saw different values before the NaN.
    assert r0["values"][:nan_epoch] != r1["values"][:nan_epoch]

    # No rank took a snapshot at the NaN epoch, and both agree on the epoch that was kept.
    assert r0["best_epoch"] == r1["best_epoch"]
    best = r0["best_epoch"]
    assert 0 <= best < nan_epoch
    assert math.isfinite(r0["best_value"]) and math.isfinite(r1["best_value"])
    assert r0["best_value"] == r0["values"][best]
    assert r1["best_value"] == r1["values"][best]

    # Identical weights on both ranks: those of the kept epoch, not of the NaN epoch.
    assert _equal(r0["final"], r1["final"])
    for r in (r0, r1):
        assert _equal(r["final"], r["states"][best])
        assert not _equal(r["final"], r["states"][nan_epoch])
    assert _equal(_state(model), r0["states"][best])

    # Rank 0 warned (once) that the monitored value differs across ranks; rank 1 stayed quiet.
    def differs(r: dict[str, Any]) -> list[str]:
        return [m for c, m in r["warnings"] if c == "UserWarning" and "differs across ranks" in m]

    assert len(differs(r0)) == 1
    assert "sync_dist=True" in differs(r0)[0]
    assert differs(r1) == []


def test_ddp_last_checkpoint_loads_weights_only_and_holds_snapshot(tmp_path):
    pl.seed_everything(0)
    patience, max_epochs = 3, 30
    ckpt_dir = tmp_path / "ckpt"
    es = EarlyStopping("val_loss", patience=patience)
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0)
    model = TinyClassifier(hidden=256, lr=0.3)
    trainer = pl.Trainer(
        callbacks=[es, checkpoint, _RankRecorder(str(tmp_path))],
        **trainer_kwargs(tmp_path, max_epochs=max_epochs, enable_checkpointing=True, **DDP),
    )
    trainer.fit(model, datamodule=BlobsDataModule(label_noise=0.4))
    r0, _ = _load_ranks(tmp_path)
    best, last = r0["best_epoch"], r0["epochs"][-1]
    assert 0 <= best < last

    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    es_states = [v for k, v in ckpt["callbacks"].items() if k.startswith("EarlyStopping")]
    assert len(es_states) == 1
    saved = es_states[0]
    assert saved["best_epoch"] == best
    assert saved["best_value"] == r0["best_value"]
    # The snapshot in the checkpoint is the best epoch's weights...
    snapshot = ckpt["lightning_reg_best_state"][es.state_key]
    assert _equal(snapshot, r0["states"][best])
    # ...while its model weights are those training reached: with save_top_k=0, last.ckpt is
    # written by ModelCheckpoint.on_train_end, which must run before the restore.
    assert _equal(ckpt["state_dict"], r0["states"][last])
    assert not _equal(ckpt["state_dict"], snapshot)
    # The run itself still ended on the best weights.
    assert _equal(r0["final"], r0["states"][best])
