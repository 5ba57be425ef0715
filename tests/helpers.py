"""Shared test models and data: small enough for CPU, real enough to train through ``Trainer.fit``.

Classes live in an importable module (not ``conftest.py``) so that ``ddp_spawn`` workers can
unpickle them.
"""

from __future__ import annotations

import atexit
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.distributed import _destroy_dist_connection
from lightning.pytorch.strategies import DDPStrategy
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset


def make_blobs(n: int = 256, dim: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    """Gaussian blobs: a learnable but not trivial classification set."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    return TensorDataset(x, y)


class BlobsDataModule(pl.LightningDataModule):
    """Generated train/val blobs; the val set is drawn from the same centers with another seed."""

    def __init__(
        self, n_train: int = 256, n_val: int = 128, dim: int = 16, classes: int = 4,
        batch_size: int = 32, label_noise: float = 0.0, seed: int = 0, shuffle: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.dim, self.classes, self.batch_size = dim, classes, batch_size
        self.shuffle = shuffle
        full = make_blobs(n_train + n_val, dim, classes, seed)
        x, y = full.tensors
        y = y.clone()
        if label_noise > 0:
            g = torch.Generator().manual_seed(seed + 1)
            flip = torch.rand(n_train, generator=g) < label_noise
            y[:n_train][flip] = torch.randint(0, classes, (int(flip.sum()),), generator=g)
        self.train_set = TensorDataset(x[:n_train], y[:n_train])
        self.val_set = TensorDataset(x[n_train:], y[n_train:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's bundled 8x8 digits (real data, no download), flattened to 64 features."""

    def __init__(self, batch_size: int = 64, n_train: int = 1000, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        x, y = load_digits(return_X_y=True)
        order = np.random.default_rng(seed).permutation(len(y))
        x_t = torch.tensor(x[order] / 16.0, dtype=torch.float32)
        y_t = torch.tensor(y[order], dtype=torch.long)
        self.train_set = TensorDataset(x_t[:n_train], y_t[:n_train])
        self.val_set = TensorDataset(x_t[n_train:], y_t[n_train:])
        self.dim, self.classes = 64, 10

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class TinyClassifier(pl.LightningModule):
    """An MLP with optional BatchNorm/dropout whose steps use plain ``F.cross_entropy``.

    Logs ``train_loss`` per step and ``val_loss``/``val_acc`` per epoch (synced across ranks).
    """

    def __init__(
        self, dim: int = 16, classes: int = 4, hidden: int = 32, lr: float = 0.05,
        batchnorm: bool = False, dropout: float = 0.0, optimizer: str = "sgd",
        weight_decay: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Linear(dim, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, classes)]
        self.net = nn.Sequential(*layers)

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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)


class GlooDDPSpawn(DDPStrategy):
    """``strategy="ddp_spawn"`` whose workers destroy their process group when they exit.

    Lightning registers that clean-up for NCCL only. A gloo group left for interpreter shutdown
    can still hold joinable threads, and once in a while on a busy 2-core machine the worker then
    aborts after a successful fit ("terminate called without an active exception", SIGABRT).
    """

    def __init__(self) -> None:
        super().__init__(start_method="spawn")

    def setup_distributed(self) -> None:
        super().setup_distributed()
        atexit.register(_destroy_dist_connection)


def trainer_kwargs(tmp_path: Any, **overrides: Any) -> dict[str, Any]:
    """Quiet CPU trainer settings shared by the tests (``"ddp_spawn"`` means ``GlooDDPSpawn``)."""
    kwargs: dict[str, Any] = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_epochs=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    if kwargs.get("strategy") == "ddp_spawn":
        kwargs["strategy"] = GlooDDPSpawn()
    return kwargs


class ScriptedClassifier(TinyClassifier):
    """Trains for real, but logs ``val_loss`` from a script: ``values[current_epoch]``.

    Lets a test choose exactly which epoch is best, where the metric turns NaN, and so on, while the
    weights still change every epoch. The real loss is logged as ``real_val_loss``.
    """

    def __init__(self, values: list[float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.values = list(values)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("real_val_loss", F.cross_entropy(self(x), y), sync_dist=True)
        value = self.values[min(self.current_epoch, len(self.values) - 1)]
        self.log("val_loss", torch.tensor(float(value)), sync_dist=True)


class StateRecorder(pl.Callback):
    """Records, at every (non-sanity) validation end, the metrics and a copy of the module state."""

    def __init__(self, key: str = "val_loss") -> None:
        self.key = key
        self.values: dict[int, float] = {}
        self.states: dict[int, dict[str, Tensor]] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        self.values[epoch] = float(trainer.callback_metrics[self.key])
        self.states[epoch] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


class CrashAt(pl.Callback):
    """Raises ``exception`` at the start of training epoch ``epoch``."""

    def __init__(self, epoch: int, exception: type[BaseException] = RuntimeError) -> None:
        self.epoch, self.exception = epoch, exception

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise self.exception(f"simulated crash at epoch {self.epoch}")


def same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """Bitwise equality of two state dicts."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class CountScalarReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: what ``.item()``, ``float(t)`` and ``bool(t)``
    dispatch to, i.e. a host-device synchronisation on an accelerator (counted on CPU too)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))
