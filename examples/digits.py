"""Main job: a plain baseline vs. a regularized run on scikit-learn's digits, with noisy labels.

A small MLP learns the bundled 8x8 digits (real data, no download). A fraction of the *training*
labels (default 30%) is flipped to another class, so a model that memorizes shows it: train accuracy
on the given labels climbs towards 100% while validation and test accuracy fall. Validation and test
labels stay clean, as in the usual noisy-label benchmarks.

Besides accuracy, the tables give each final model's calibration on the test set: the expected
calibration error (``test ECE``, 15 equal-width bins) and the mean confidence minus accuracy
(``test conf-acc``: > 0 overconfident, < 0 underconfident), since label smoothing and mixup move
calibration as much as accuracy.

Run it with ``make demo`` (or ``python examples/digits.py --help``): one progress bar follows every
epoch of every run (recipe, seed, epoch, validation accuracy, the gap monitor's diagnosis), then the
tables are printed. Look at the runs with the printed ``tensorboard --logdir ...`` command: in the
HParams tab every run has its settings and its test accuracy and ECE, so runs sort by them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from lightning_reg import (
    CalibrationMonitor,
    EarlyStopping,
    GeneralizationGapMonitor,
    MembershipInferenceAudit,
    Mixup,
    RegularizationMonitor,
    WeightDecayExclusion,
    expected_calibration_error,
    loss_attack_metrics,
)
from lightning_reg.tensorboard import regularization_settings, tensorboard_writer, write_hparams


def flip_labels(y: np.ndarray, fraction: float, classes: int, seed: int) -> np.ndarray:
    """Copy ``y`` with ``fraction`` of the labels moved to another, random class."""
    rng = np.random.default_rng(seed)
    y = y.copy()
    idx = rng.choice(len(y), size=round(fraction * len(y)), replace=False)
    y[idx] = (y[idx] + rng.integers(1, classes, size=len(idx))) % classes
    return y


class DigitsData(pl.LightningDataModule):
    """Digits split 60/20/20 (stratified) into train/val/test; train labels optionally noisy."""

    def __init__(self, label_noise: float = 0.3, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32)
        x_tr, x_rest, y_tr, y_rest = train_test_split(
            x, y, test_size=0.4, stratify=y, random_state=seed
        )
        x_val, x_te, y_val, y_te = train_test_split(
            x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
        )
        self.classes = 10
        self.clean_train_labels = torch.as_tensor(y_tr)
        y_tr = flip_labels(y_tr, label_noise, self.classes, seed)
        self.batch_size = batch_size
        self.train_set = _tensors(x_tr, y_tr)
        self.val_set = _tensors(x_val, y_val)
        self.test_set = _tensors(x_te, y_te)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=512)


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x), torch.as_tensor(y, dtype=torch.long))


class MLP(pl.LightningModule):
    """A deliberately over-parameterized MLP trained with a plain ``F.cross_entropy`` step."""

    def __init__(
        self, hidden: int = 512, dropout: float = 0.0, lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, 10),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", F.cross_entropy(logits, y))
        self.log(f"{stage}_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )


@dataclass
class Run:
    """One row of the final table: how to build the model and which callbacks to add."""

    name: str
    model: dict[str, Any]
    callbacks: Callable[[], list[Callback]] = field(default=list)


def runs() -> list[Run]:
    """The plain baseline, the baseline with best-weight restore, and the regularized recipe."""
    return [
        Run("baseline", dict(dropout=0.0, weight_decay=0.0)),
        Run(
            "baseline+restore",
            dict(dropout=0.0, weight_decay=0.0),
            lambda: [EarlyStopping("val_loss", patience=15)],
        ),
        Run(
            "regularized",
            dict(dropout=0.3, weight_decay=0.05),
            lambda: [
                EarlyStopping("val_loss", patience=15),
                WeightDecayExclusion(),
                Mixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=10),
            ],
        ),
    ]


def monitors() -> list[Callback]:
    """The observing callbacks: honest gap + diagnosis, calibration, weight norms, the audit."""
    return [
        GeneralizationGapMonitor(subset_size=500),
        CalibrationMonitor(subset_size=500),  # the gap monitor's subset (same size and seed)
        RegularizationMonitor(per_layer=True, histogram_every_n_epochs=10),
        MembershipInferenceAudit(subset_size=350),
    ]


@torch.no_grad()
def membership_auc(model: nn.Module, members: TensorDataset, nonmembers: TensorDataset) -> float:
    """Loss-threshold membership-inference AUC of the final model: train vs. test samples."""
    model.eval()
    losses = [F.cross_entropy(model(x), y, reduction="none") for x, y in (
        members.tensors, nonmembers.tensors
    )]  # fmt: skip
    return loss_attack_metrics(*losses)["auc"]


@torch.no_grad()
def calibration(model: nn.Module, data: TensorDataset) -> tuple[float, float]:
    """Expected calibration error (15 bins) and mean confidence minus accuracy, in eval mode.

    The second number is signed: > 0 overconfident, < 0 underconfident (ECE alone cannot tell).
    """
    model.eval()
    x, y = data.tensors
    probs = model(x).softmax(-1)
    confidence, prediction = probs.max(-1)
    excess = (confidence - (prediction == y).float()).mean().item()
    return expected_calibration_error(probs, y, outputs="probs").item(), excess


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    """Accuracy in eval mode on a whole data set (the given labels, noisy ones included)."""
    model.eval()
    x, y = data.tensors
    return (model(x).argmax(-1) == y).float().mean().item()


class Progress(Callback):
    """One progress bar for the whole demo: every epoch of every run, with its validation accuracy.

    The bar counts the epoch budget (runs x seeds x ``--epochs``). When early stopping ends a run
    before ``--epochs``, the bar jumps to that run's end: its count stays the share of the budget
    done, never overshoots, and the remaining time (tqdm's average rate over the whole demo,
    ``smoothing=0``) assumes that later runs stop as early as the earlier ones did. It draws no
    random number and changes nothing in training.
    """

    def __init__(self, runs: int, max_epochs: int) -> None:
        self.bar = tqdm(total=runs * max_epochs, unit="epoch", smoothing=0.0, dynamic_ncols=True)
        self.runs, self.max_epochs, self.started = runs, max_epochs, 0
        self.epochs, self.best = 0, -math.inf

    def start(self, name: str) -> None:
        self.started += 1
        self.bar.set_postfix_str(f"epoch 0/{self.max_epochs}", refresh=False)
        self.bar.set_description(f"run {self.started}/{self.runs} {name}")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs, self.best = 0, -math.inf

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after validation and after the gap monitor's diagnosis of this epoch
        self.epochs += 1
        parts = [f"epoch {self.epochs}/{self.max_epochs}"]
        acc = trainer.callback_metrics.get("val_acc")
        if acc is not None:
            self.best = max(self.best, acc.item())
            parts.append(f"val acc {acc.item():.3f} (best {self.best:.3f})")
        gap = next(
            (cb for cb in trainer.callbacks if isinstance(cb, GeneralizationGapMonitor)), None
        )
        if gap is not None:
            parts.append(gap.diagnosis)
        self.bar.set_postfix_str(", ".join(parts), refresh=False)
        self.bar.update(1)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.bar.update(self.max_epochs - self.epochs)  # stopped early: the rest of its budget

    def close(self) -> None:
        self.bar.close()


class RunHparams(Callback):
    """This run's hparams in TensorBoard, with the demo's test metrics as the HParams metrics.

    Written in ``on_fit_start`` before any other callback writes hparams (TensorBoard keeps a run's
    first hparams summary): the module's hparams, every regularization setting, the recipe and
    the seed. ``columns`` lists the settings of every recipe, since the HParams tab takes its
    columns from whichever run it reads first. The test metrics are logged after ``fit``.
    """

    def __init__(self, recipe: str, seed: int, columns: dict[str, Any]) -> None:
        self.recipe, self.seed, self.columns = recipe, seed, columns

    def params(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        demo = {"recipe": self.recipe, "seed": self.seed}
        return {**demo, **dict(pl_module.hparams_initial), **regularization_settings(trainer)}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is not None:
            params = self.params(trainer, pl_module)
            write_hparams(writer, params, HPARAMS_METRICS, columns=self.columns)


# the HParams tab's metrics: the demo's test evaluation, then the gap monitor's own choice
TEST_METRICS = {"test/acc": "test acc", "test/ece": "test ECE", "test/conf_acc": "test conf-acc"}
HPARAMS_METRICS = [*TEST_METRICS, "reg/gap/loss", "reg/train_eval/loss", "reg/overfitting"]


class _Columns(Callback):
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.params = RunHparams("", 0, {}).params(trainer, pl_module)


def hparam_columns(
    recipes: list[Run], data: DigitsData, args: argparse.Namespace
) -> dict[str, Any]:
    """Every hparam of every recipe (name -> a value): a zero-epoch fit per recipe reports them."""
    columns: dict[str, Any] = {}
    for run in recipes:
        probe = _Columns()
        trainer = pl.Trainer(
            max_epochs=0, accelerator="cpu", devices=1, logger=False, num_sanity_val_steps=0,
            callbacks=[*run.callbacks(), *monitors(), probe], enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(MLP(hidden=args.hidden, **run.model), datamodule=data)
        columns.update(probe.params)
    return columns


def train(
    run: Run, data: DigitsData, args: argparse.Namespace, seed: int,
    progress: Progress | None = None, columns: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Fit one run and measure it; every run of a seed starts from the same state."""
    pl.seed_everything(seed, verbose=False)
    model = MLP(hidden=args.hidden, **run.model)
    # monitors only observe (they change no weight and draw no random number): both runs get them
    callbacks = [RunHparams(run.name, seed, columns or {}), *run.callbacks(), *monitors()]
    if progress is not None:
        progress.start(f"{run.name} seed {seed}")
        callbacks.append(progress)
    version = f"{run.name}-seed{seed}"
    _forget_previous_run(args.logdir / "digits" / version)
    logger = TensorBoardLogger(args.logdir, name="digits", version=version, default_hp_metric=False)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger,
        callbacks=callbacks, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, log_every_n_steps=10, deterministic=True,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    train_acc = accuracy(model, data.train_set)
    val_acc = accuracy(model, data.val_set)
    stop = next((cb for cb in callbacks if hasattr(cb, "best_epoch")), None)
    best = "-" if stop is None else str(stop.best_epoch)
    test_ece, test_excess = calibration(model, data.test_set)
    row = {
        "run": run.name,
        "seed": seed,
        "train acc (given labels)": train_acc,
        "val acc": val_acc,
        "test acc": accuracy(model, data.test_set),
        "test ECE": test_ece,
        "test conf-acc": test_excess,
        "gap": train_acc - val_acc,
        "MIA AUC": membership_auc(model, data.train_set, data.test_set),
        "best/stop epoch": f"{best}/{trainer.current_epoch - 1}",
        "seconds": seconds,
    }
    # the HParams tab's metrics: scalars of this run (fit closed its event file: a second one)
    logger.log_metrics({tag: row[key] for tag, key in TEST_METRICS.items()}, trainer.global_step)
    logger.finalize("success")
    return row


def _forget_previous_run(directory: Path) -> None:
    """Remove what an earlier demo run wrote under this run's name.

    TensorBoard reads every event file of a run directory as one run and keeps its *first* hparams:
    a rerun would show both runs' curves and the old hparams.
    """
    for path in [*directory.glob("events.out.tfevents.*"), directory / "hparams.yaml"]:
        path.unlink(missing_ok=True)


def train_all(recipes: list[Run], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every recipe on every seed of ``args.seeds``, under one progress bar."""
    rows: list[dict[str, Any]] = []
    with _quiet_lightning():
        columns: dict[str, Any] = {}
        progress = Progress(len(recipes) * len(args.seeds), args.epochs)
        try:
            for seed in args.seeds:
                data = DigitsData(label_noise=args.label_noise, seed=seed)
                columns = columns or hparam_columns(recipes, data, args)
                rows += [train(run, data, args, seed, progress, columns) for run in recipes]
        finally:
            progress.close()
    return rows


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Keep the terminal to the progress bar: no info lines, no warnings the bar already shows.

    The gap monitor's diagnosis is on the bar (and in TensorBoard's Text tab); Lightning's
    "GPU available", "LOCAL_RANK" and tip lines, and our callbacks' info lines, go to its logger.
    """
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="GeneralizationGapMonitor:")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            yield
    finally:
        log.setLevel(level)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table, one row per line."""
    headers = list(rows[0])
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=True))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean (and spread of test accuracy) over seeds, one row per run."""
    summary = []
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]
        mean = {k: float(np.mean([r[k] for r in mine])) for k in _NUMERIC}
        test = [r["test acc"] for r in mine]
        summary.append({
            "run": name, **mean, "test acc std": float(np.std(test)), "seeds": len(mine),
        })  # fmt: skip
    return summary


_NUMERIC = (
    "train acc (given labels)", "val acc", "test acc", "test ECE", "test conf-acc", "gap",
    "MIA AUC", "seconds",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--label-noise", type=float, default=0.3, help="fraction of train labels flipped"
    )
    parser.add_argument("--epochs", type=int, default=100, help="max epochs per run")
    parser.add_argument("--hidden", type=int, default=512, help="hidden width of the MLP")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run each")
    parser.add_argument("--logdir", type=Path, default=Path("lightning_logs"))
    args = parser.parse_args(argv)
    if not 0.0 <= args.label_noise < 1.0:
        parser.error(f"--label-noise must be in [0, 1), got {args.label_noise}")
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(1)  # a small MLP: one thread is as fast and never oversubscribes
    rows = train_all(runs(), args)
    print(f"\nDigits MLP, {args.label_noise:.0%} of train labels flipped, every run and seed:\n")
    print(format_table(rows))
    print(f"\nMean over seeds {args.seeds}:\n")
    print(format_table(summarize(rows)))
    print(f"\nView the runs:  tensorboard --logdir {args.logdir / 'digits'}")
    return rows


if __name__ == "__main__":
    main()
