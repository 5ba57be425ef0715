"""Models, callbacks and launches for ``tests/compat/test_distributed.py`` (2 CPU processes, gloo).

Importable, so that ``ddp_spawn`` workers can unpickle what they run, and runnable:
``python -m tests.compat.distributed_helpers OUT`` runs the FSDP2 fits (and their DDP twins) under
Lightning's ``ModelParallelStrategy`` with its own launcher, which starts the second process by
running this module again. Every fit of a launch runs in the same two processes, so one launch
serves many cells; each rank writes what the tests check to ``OUT/<fit>.rank<r>.pt``.

The clean way to FSDP2 on CPU: ``ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1)`` with ``accelerator="cpu", devices=2`` and ``fully_shard`` in
``configure_model``; its process-group backend defaults to gloo for CPU devices. It launches by
re-running the script, so it runs from a script (or ``python -m``), not inside a test process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
from tests.helpers import BlobsDataModule, trainer_kwargs

EPOCHS = 3
# Scripted early-stopping metric: epoch 1 is best, epoch 2 is worse and stops (patience 1).
SCORES = (0.5, 0.2, 0.4)
SUBSET = 65  # odd: ranks hold 33 and 32 samples
SPARSITY = 0.1  # strong enough for exact zeros within three epochs


def datamodule() -> BlobsDataModule:
    return BlobsDataModule(n_train=256, n_val=128, label_noise=0.2)


class NormClassifier(pl.LightningModule):
    """Linear -> LayerNorm -> ReLU -> Linear, 33 hidden units (uneven shards on 2 ranks).

    Logs the real ``val_loss``/``val_acc`` and a scripted ``val_score`` (``SCORES``) for
    EarlyStopping, so the best epoch is known. AdamW with a StepLR schedule (the lr changes every
    epoch, which the split-off no-decay groups must follow).
    """

    def __init__(self, hidden: int = 33) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(16, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, 4)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), sync_dist=True)
        score = SCORES[min(self.current_epoch, len(SCORES) - 1)]
        self.log("val_score", torch.tensor(score), sync_dist=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.05)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


class ShardedClassifier(NormClassifier):
    """The same model with FSDP2 (``fully_shard``) on every layer and the root, on dim 0."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear | nn.LayerNorm):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def full_state(module: nn.Module) -> dict[str, Tensor]:
    """The whole ``state_dict``, DTensors gathered (a collective: every rank must call it)."""
    out = {}
    for name, tensor in module.state_dict().items():
        full = getattr(tensor, "full_tensor", None)
        out[name] = (full() if callable(full) else tensor).detach().clone().cpu()
    return out


class Recorder(pl.Callback):
    """Listed after the callbacks under test: records what the tests check, saves it per rank.

    - ``validated[epoch]``: gathered state and our metrics after each validation (after the gap
      pass and the audit), with the subsets' indices;
    - ``epoch_end[epoch]``: gathered state and the monitor's metrics at each training-epoch end;
    - ``lams``: Mixup's mean coefficient of every batch of this rank; ``targets``: the first
      batch's (mixed or smoothed) targets and hard labels;
    - ``groups``: the optimizer's param groups at the end (parameter names, weight decay, lr);
    - ``final`` / ``local``: gathered and rank-local state after ``fit`` (after the restore).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"validated": {}, "epoch_end": {}, "lams": [], "targets": None}
        self._lam_last = 0.0

    def _callback(self, trainer: pl.Trainer, kind: type) -> Any:
        return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.data["targets"] is None:
            self.data["targets"] = batch[1].detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mixup = self._callback(trainer, Mixup)
        if mixup is not None:
            self.data["lams"].append(mixup._lam_sum - self._lam_last)
            self._lam_last = mixup._lam_sum

    def on_train_epoch_end(self, trainer, pl_module):
        self._lam_last = 0.0
        metrics = _ours(trainer.callback_metrics)
        self.data["epoch_end"][trainer.current_epoch] = {
            "state": full_state(pl_module), "metrics": metrics,
        }  # fmt: skip

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        entry: dict[str, Any] = {
            "state": full_state(pl_module), "metrics": _ours(trainer.callback_metrics),
        }  # fmt: skip
        gap = self._callback(trainer, GeneralizationGapMonitor)
        if gap is not None:
            entry["gap_indices"] = list(gap._loader.dataset.indices)
        audit = self._callback(trainer, MembershipInferenceAudit)
        if audit is not None:
            members, nonmembers = audit._loaders
            entry["members"] = list(members.dataset.indices)
            entry["nonmembers"] = list(nonmembers.dataset.indices)
        self.data["validated"][trainer.current_epoch] = entry

    def on_train_end(self, trainer, pl_module):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.data["groups"] = [
            {
                "names": [names[id(p)] for p in group["params"]],
                "weight_decay": group["weight_decay"],
                "lr": float(group["lr"]),
                "no_decay_of": group.get("no_decay_of"),
                "dtensors": [hasattr(p, "placements") for p in group["params"]],
            }
            for group in trainer.optimizers[0].param_groups
        ]

    def on_fit_end(self, trainer, pl_module):
        self.data["final"] = full_state(pl_module)
        self.data["local"] = {
            k: getattr(v, "to_local", lambda v=v: v)().detach().clone()
            for k, v in pl_module.state_dict().items()
        }
        self.data["stopped_epoch"] = trainer.current_epoch
        torch.save(self.data, f"{self.path}.rank{trainer.global_rank}.pt")


def _ours(metrics: dict[str, Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith(("reg/", "val_"))}


def stack() -> list[pl.Callback]:
    """The whole stack, canonical settings (LabelSmoothing is fused into Mixup)."""
    return [
        EarlyStopping("val_score", patience=1),
        WeightDecayExclusion(verbose=False),
        Mixup(0.4, label_smoothing=0.1, num_classes=4),
        GeneralizationGapMonitor(subset_size=SUBSET, metrics=["val_loss", "val_acc"], seed=5),
        RegularizationMonitor(per_layer=True),
        MembershipInferenceAudit(subset_size=SUBSET, seed=5),
        ProximalSparsity(l1=SPARSITY),
    ]


def fit(root: Path, name: str, model: pl.LightningModule, callbacks: list, strategy: Any) -> None:
    """Seeded fit of ``model`` on 2 CPU processes; the Recorder writes ``root/name.rank<r>.pt``."""
    pl.seed_everything(0, verbose=False)
    model.load_state_dict(initial_state())
    trainer = pl.Trainer(**trainer_kwargs(
        root / name, max_epochs=EPOCHS, devices=2, strategy=strategy,
        callbacks=[*callbacks, Recorder(str(root / name))],
    ))  # fmt: skip
    trainer.fit(model, datamodule=datamodule())


def initial_state() -> dict[str, Tensor]:
    """The same initial weights for every fit (and every strategy)."""
    torch.manual_seed(0)
    return NormClassifier().state_dict()


def model_parallel() -> Any:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def run_ddp_launch(root: Path) -> None:
    """The DDP launch: the stack under ``ddp_spawn`` (``GlooDDPSpawn``), from the test process."""
    fit(root, "ddp_stack", NormClassifier(), stack(), "ddp_spawn")


def run_fsdp2_launch(root: Path) -> None:
    """Every fit of the FSDP2 launch, in the two processes this module's launch created.

    After the first fit ``LOCAL_RANK`` is set in both processes, so the later Trainers (the
    ``DDPStrategy`` one included) run in them instead of launching again.
    """
    from lightning.pytorch.strategies import DDPStrategy

    fit(root, "fsdp2_stack", ShardedClassifier(), stack(), model_parallel())
    fit(root, "fsdp2_smoothing", ShardedClassifier(), [LabelSmoothing(0.1, 4)], model_parallel())
    fit(root, "ddp_smoothing", NormClassifier(), [LabelSmoothing(0.1, 4)], DDPStrategy())
    sparsity = [ProximalSparsity(l1=SPARSITY)]  # alone: it logs the weight statistics itself
    fit(root, "fsdp2_sparsity", ShardedClassifier(), sparsity, model_parallel())
    # groups across the shards (columns of a weight sharded by rows) must be refused
    group_lasso = ProximalSparsity(l1=SPARSITY, penalty="group_lasso", group_dim=1)
    try:
        fit(root, "fsdp2_group_lasso", ShardedClassifier(), [group_lasso], model_parallel())
    except RuntimeError as error:
        rank = os.environ.get("LOCAL_RANK", "0")
        (root / f"fsdp2_group_lasso.rank{rank}.txt").write_text(str(error))


if __name__ == "__main__":
    run_fsdp2_launch(Path(sys.argv[1]))
