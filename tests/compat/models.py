"""Small builders for the compatibility matrix: third-party models in tiny configurations, a
LightningModule that wraps any of them with an unchanged ``F.cross_entropy`` step, generated data
(tensor or Hugging Face style dict batches), and a probe callback that records what the checks
compare against.

Nothing here downloads anything: every model is built from code with random weights.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

CLASSES = 4


# ----------------------------------------------------------------------------------------- data
class DictImages(Dataset):
    """Samples as Hugging Face ``datasets`` yield them: ``{"pixel_values": x, "labels": y}``."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        x, y = self.data[index]
        return {"pixel_values": x, "labels": y}


def images(n: int, size: int, seed: int) -> TensorDataset:
    """Class-dependent colour blobs on noise: learnable, so losses move."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    colours = torch.linspace(-1, 1, CLASSES)
    x = torch.randn(n, 3, size, size, generator=g) * 0.5 + colours[y].view(-1, 1, 1, 1)
    return TensorDataset(x, y)


def tokens(n: int, length: int, vocab: int, seed: int) -> TensorDataset:
    """Token sequences that count upward modulo ``vocab``; the target is the next token."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    seq = (start + torch.arange(length + 1)) % vocab
    return TensorDataset(seq[:, :-1], seq[:, 1:])


class Data(pl.LightningDataModule):
    """Fixed train and val sets (no shuffling: the probe re-evaluates them as they are)."""

    def __init__(self, train: Dataset, val: Dataset, batch_size: int = 16) -> None:
        super().__init__()
        self.train_set, self.val_set, self.batch_size = train, val, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


def image_data(
    size: int = 16, dict_batches: bool = False, n: int = 16, batch_size: int = 8
) -> Data:
    train, val = images(n, size, seed=0), images(n, size, seed=1)
    if dict_batches:
        return Data(DictImages(train), DictImages(val), batch_size)
    return Data(train, val, batch_size)


def split(batch: Any) -> tuple[Tensor, Tensor]:
    """Inputs and targets of a list or a Hugging Face style dict batch."""
    if isinstance(batch, dict):
        return batch["pixel_values"], batch["labels"]
    return batch[0], batch[1]


# --------------------------------------------------------------------------------------- models
def timm_resnet() -> nn.Module:
    timm = __import__("timm")
    return timm.create_model("resnet10t", pretrained=False, num_classes=CLASSES)


def timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=CLASSES
    )


def timm_convnext() -> nn.Module:
    """Four stages, each halving: needs 32x32 inputs."""
    timm = __import__("timm")
    return timm.create_model(
        "convnext_atto", pretrained=False, num_classes=CLASSES, depths=(1, 1, 1, 1),
        dims=(16, 32, 64, 128),
    )  # fmt: skip


def torchvision_resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=CLASSES)


def small_cnn() -> nn.Module:
    """Conv + BatchNorm + linear head: biases, norm gains and running statistics, cheap."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(32, CLASSES),
    )  # fmt: skip


class Classifier(pl.LightningModule):
    """Any image model with an unchanged ``F.cross_entropy`` step, AdamW with weight decay on
    ``self.parameters()`` and a StepLR schedule (so the lr moves and the no-decay group must
    follow it)."""

    def __init__(self, net: nn.Module, lr: float = 1e-3, weight_decay: float = 0.05) -> None:
        super().__init__()
        self.net, self.lr, self.weight_decay = net, lr, weight_decay

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = split(batch)
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = split(batch)
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


class LanguageModel(Classifier):
    """Lightning's demo ``Transformer`` (teacher-forced: it reads the targets too) on token ids."""

    def __init__(self, vocab: int = 16, **kwargs: Any) -> None:
        from lightning.pytorch.demos import Transformer

        net = Transformer(vocab_size=vocab, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.0)
        super().__init__(net, **kwargs)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # type: ignore[override]
        return self.net(x, y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x, y), y.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x, y), y.reshape(-1)))


def sequence_losses(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """Per-sequence mean token loss: the ``loss_fn`` a language model gives the audit."""
    x, y = batch
    logits = pl_module(x, y)
    return F.cross_entropy(logits, y.reshape(-1), reduction="none").view(y.shape).mean(1)


# ------------------------------------------------------------------------------- direct checks
@torch.no_grad()
def per_sample_losses(module: nn.Module, dataset: Dataset, batch_size: int = 8) -> Tensor:
    """Per-sample cross-entropy of ``module`` (eval mode, no augmentation) over ``dataset``."""
    training = module.training
    module.eval()
    try:
        out = []
        for batch in DataLoader(dataset, batch_size=batch_size):
            x, y = split(batch)
            out.append(F.cross_entropy(module(x), y, reduction="none"))
        return torch.cat(out)
    finally:
        module.train(training)


def auc(members: Tensor, nonmembers: Tensor) -> float:
    """The loss-threshold attack's AUC by counting pairs (Mann-Whitney, ties count half)."""
    m, n = members.double().view(-1, 1), nonmembers.double().view(1, -1)
    return float(((m < n).double() + 0.5 * (m == n).double()).mean())


class WorseLastEpoch(pl.Callback):
    """Multiplies the first param group's lr by ``factor`` for the last epoch, so that the best
    check is an earlier one and restoring it is visible (the no-decay group must follow too)."""

    def __init__(self, factor: float = 1000.0) -> None:
        self.factor = factor

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch == trainer.max_epochs - 1:
            trainer.optimizers[0].param_groups[0]["lr"] *= self.factor


class Probe(pl.Callback):
    """Records what the checks compare with; list it FIRST (it clones the batch before the
    transforms) and the values it reads at validation end come after our callbacks have run
    (it asks them to evaluate first, as EarlyStopping does)."""

    def __init__(self, train: Dataset | None = None, val: Dataset | None = None) -> None:
        self.train, self.val = train, val
        self.before: list[tuple[Tensor, Tensor]] = []  # the training batch as the loader made it
        self.after: list[tuple[Tensor, Tensor]] = []  # what training_step received
        self.checks: list[dict[str, Any]] = []  # per validation: metrics, state, direct values
        self.epoch_ends: list[dict[str, Any]] = []  # per train epoch end: metrics, weights
        self.lrs: list[list[float]] = []  # per step, every param group's lr, before the step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        x, y = split(batch)
        self.before.append((x.clone(), y.clone()))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.lrs.append([float(g["lr"]) for g in optimizer.param_groups])

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, out: Any, batch: Any, i: int
    ) -> None:
        x, y = split(batch)
        self.after.append((x.clone(), y.clone()))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        for callback in trainer.callbacks:
            if hasattr(callback, "evaluate_after_validation"):
                callback.evaluate_after_validation(trainer, pl_module)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        record: dict[str, Any] = {
            "epoch": trainer.current_epoch, "metrics": metrics,
            "state": copy.deepcopy(pl_module.state_dict()),
        }  # fmt: skip
        if self.train is not None and self.val is not None:
            record["train_losses"] = per_sample_losses(pl_module, self.train)
            record["val_losses"] = per_sample_losses(pl_module, self.val)
        self.checks.append(record)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # listed first, this runs before the monitors log: read their values in `teardown`
        weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.epoch_ends.append({"weights": weights})

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.epoch_ends:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            self.epoch_ends[-1]["metrics"] = metrics
