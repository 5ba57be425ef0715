"""Models, data and a DDP strategy on the standalone ``pytorch_lightning`` package.

Importable (not in the test file) so that ``ddp_spawn`` workers can unpickle the classes. Nothing
here imports ``lightning.pytorch`` classes: the Trainer, module, datamodule, strategy, loggers and
recording callbacks are all ``pytorch_lightning``'s, as in a project that ``import pytorch_lightning
as pl``.
"""

from __future__ import annotations

import atexit
import json
from pathlib import Path
from typing import Any, cast

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning_fabric.utilities.distributed import _destroy_dist_connection
from pytorch_lightning.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

DIM, CLASSES = 8, 3


def make_blobs(n: int, seed: int = 0) -> TensorDataset:
    """Gaussian blobs (as ``tests.helpers.make_blobs``, which workers would import with sklearn)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, DIM, generator=g) * 1.5
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return TensorDataset(centers[y] + torch.randn(n, DIM, generator=g), y)


class PLData(pl.LightningDataModule):
    """Blobs: 64 training and 32 validation samples in batches of 16."""

    def __init__(self, n_train: int = 64, n_val: int = 32, batch_size: int = 16) -> None:
        super().__init__()
        x, y = make_blobs(n_train + n_val).tensors
        self.train_set = TensorDataset(x[:n_train], y[:n_train])
        self.val_set = TensorDataset(x[n_train:], y[n_train:])
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class PLClassifier(pl.LightningModule):
    """A BatchNorm MLP on ``pytorch_lightning.LightningModule``.

    Logs ``train_loss`` and ``val_loss``. ``scripted``: also logs ``scripted`` from
    ``scripted[current_epoch]`` in ``validation_step``, so a test chooses the best epoch.
    ``epoch_end_values``: logs ``epoch_metric`` from its own ``on_train_epoch_end``, to tell
    whether a callback reading it ran after that hook. ``seen_targets`` keeps the targets
    ``training_step`` received (single process).
    """

    def __init__(
        self,
        scripted: list[float] | None = None,
        epoch_end_values: list[float] | None = None,
        lr: float = 0.1,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(DIM, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES)
        )
        self.seen_targets: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self.seen_targets.append(y.detach().clone())
        loss = F.cross_entropy(self(x), y)  # class indices, or probability rows when mixed
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("val_loss", loss, sync_dist=True)
        scripted = self.hparams["scripted"]
        if scripted is not None:
            value = scripted[min(self.current_epoch, len(scripted) - 1)]
            self.log("scripted", torch.tensor(float(value)), sync_dist=True)

    def on_train_epoch_end(self) -> None:
        values = self.hparams["epoch_end_values"]
        if values is not None:
            self.log("epoch_metric", float(values[self.current_epoch]), sync_dist=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class StateRecorder(pl.Callback):
    """At every validation end: a copy of the module state, and the true weight norms (l1, l2).

    With ``directory``, rank 0 also writes them there (``ddp_spawn`` workers are other processes).
    Norms are over the parameters ``RegularizationMonitor`` watches by default (two or more dims).
    """

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory
        self.states: dict[int, dict[str, Tensor]] = {}
        self.norms: dict[int, tuple[float, float]] = {}
        self.train_losses: dict[int, float] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        self.states[epoch] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        weights = [p.detach() for p in pl_module.parameters() if p.ndim >= 2]
        l1 = sum(float(w.abs().sum()) for w in weights)
        l2 = sum(float(w.pow(2).sum()) for w in weights) ** 0.5
        self.norms[epoch] = (l1, l2)
        self.train_losses[epoch] = train_set_loss(pl_module, cast(Any, trainer).datamodule)
        if self.directory is not None and trainer.is_global_zero:
            torch.save(self.states, Path(self.directory) / "states.pt")
            record = {"norms": self.norms, "train_losses": self.train_losses}
            (Path(self.directory) / "truth.json").write_text(json.dumps(record))


def train_set_loss(module: nn.Module, data: PLData) -> float:
    """Mean cross-entropy of ``module`` in eval mode over the whole training set."""
    training = module.training
    module.eval()
    with torch.no_grad():
        x, y = data.train_set.tensors
        loss = float(F.cross_entropy(module(x), y))
    module.train(training)
    return loss


class PLGlooDDPSpawn(DDPStrategy):
    """``pytorch_lightning``'s ``ddp_spawn`` whose workers destroy their gloo group at exit.

    The twin of ``tests.helpers.GlooDDPSpawn`` (see there why), on this package's ``DDPStrategy``.
    """

    def __init__(self) -> None:
        super().__init__(start_method="spawn")

    def setup_distributed(self) -> None:
        super().setup_distributed()
        atexit.register(_destroy_dist_connection)


def pl_trainer(tmp_path: Any, **overrides: Any) -> pl.Trainer:
    """A quiet CPU ``pytorch_lightning.Trainer`` (``strategy="ddp_spawn"`` means 2 gloo workers)."""
    kwargs: dict[str, Any] = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    kwargs.update(overrides)
    if kwargs.get("strategy") == "ddp_spawn":
        kwargs.update(strategy=PLGlooDDPSpawn(), devices=2)
    return pl.Trainer(**kwargs)
