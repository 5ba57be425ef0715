"""Compatibility matrix, precision and optimization rows: bf16 on CPU, ``torch.compile``d
submodules, gradient accumulation and manual optimization.

Every row is one real ``Trainer.fit`` of the whole stack (shared by the row's cells through
``fits``); each cell then checks what its callback promises on that run. The helpers here (``Net``,
``Probe``, ``fit_stack`` and the ``CHECKS`` per column) are shared by the other compat files of
this group (schedulers, loops).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_reg import (
    EarlyStopping,
    GeneralizationGapMonitor,
    MembershipInferenceAudit,
    Mixup,
    ProximalSparsity,
    RegularizationMonitor,
    WeightDecayExclusion,
    loss_attack_metrics,
)
from tests.helpers import BlobsDataModule, TinyClassifier, trainer_kwargs

# a scheduler factory is not a hyperparameter Lightning can pickle: it says so, and drops it
pytestmark = pytest.mark.filterwarnings("ignore:Attribute 'scheduler' removed from hparams")

# Scripted val_loss by check: the best check (index 1) is neither the first nor the last.
SCRIPT = (1.0, 0.5, 0.8, 0.9, 0.95, 0.97)
SMOOTHING, CLASSES = 0.1, 4


class Net(TinyClassifier):
    """``TinyClassifier`` that logs a scripted ``val_loss`` (so the best check is known) next to
    the real loss (``real_val_loss``), with an optional per-step scheduler, manual optimization
    and a ``torch.compile``d body."""

    def __init__(
        self, script: Iterable[float] = SCRIPT, script_by: str = "epoch",
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        manual: bool = False, compile_backend: str | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        kwargs = dict[str, Any](optimizer="adamw", weight_decay=0.05, lr=0.05) | kwargs
        super().__init__(**kwargs)
        self.script, self.script_by = list(script), script_by  # "epoch" or "check"
        self.checks_done = 0
        self.make_scheduler = scheduler
        self.automatic_optimization = not manual
        if compile_backend is not None:
            self.net = torch.compile(self.net, backend=compile_backend)  # type: ignore[assignment]

    def on_fit_start(self) -> None:
        self.checks_done = 0

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.checks_done += 1

    def _check_index(self) -> int:
        return self.current_epoch if self.script_by == "epoch" else self.checks_done

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        optimizer = self.optimizers()
        optimizer.zero_grad()  # type: ignore[union-attr]
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.manual_backward(loss)
        optimizer.step()  # type: ignore[union-attr]
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()  # type: ignore[union-attr]
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self.log("real_val_loss", F.cross_entropy(self(x), y))
        value = self.script[min(self._check_index(), len(self.script) - 1)]
        self.log("val_loss", torch.tensor(float(value)))

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        if self.make_scheduler is None:
            return optimizer
        scheduler = self.make_scheduler(optimizer)
        if isinstance(scheduler, dict):
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def step_decay(optimizer: torch.optim.Optimizer) -> Any:
    """An lr that changes at every step, so that "the no-decay group follows" has teeth."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)


class CountingProx(ProximalSparsity):
    """``ProximalSparsity`` that records the global step of every proximal step it applies."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.applied_at: list[int] = []
        self.trainer: pl.Trainer | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.trainer, self.applied_at = trainer, []

    def apply(self, optimizers: Any, ramp: float = 1.0) -> None:
        assert self.trainer is not None
        self.applied_at.append(self.trainer.global_step)
        super().apply(optimizers, ramp)


@dataclass
class Check:
    """What the trainer held at the end of one validation (not the sanity check)."""

    step: int
    epoch: int
    metrics: dict[str, float]
    state: dict[str, Tensor]


_OWN = ("params", "weight_decay", "name", "no_decay_of")  # what a no-decay group keeps its own


@dataclass
class Probe(pl.Callback):
    """Listed after our callbacks: records what the cells check, at the moments they promise it."""

    optimizer_steps: int = 0
    lr_pairs: list[tuple[float, float]] = field(default_factory=list)  # (no-decay lr, source lr)
    no_decay_wd: list[float] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)  # settings the no-decay group missed
    targets: list[Tensor] = field(default_factory=list)
    inputs_dtype: list[torch.dtype] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    epoch_end_weights: list[Tensor] = field(default_factory=list)
    epoch_end_metrics: dict[str, float] = field(default_factory=dict)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.optimizer_steps += 1
        groups = optimizer.param_groups
        for group in groups:
            if "no_decay_of" in group:
                source = groups[group["no_decay_of"]]
                self.lr_pairs.append((float(group["lr"]), float(source["lr"])))
                self.no_decay_wd.append(float(group["weight_decay"]))
                self.mismatches += [
                    k for k in source if k not in _OWN and group.get(k) != source[k]
                ]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.inputs_dtype.append(batch[0].dtype)
        self.targets.append(batch[1].detach().clone())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.checks.append(Check(trainer.global_step, trainer.current_epoch, metrics, state))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_end_weights = [
            p.detach().clone() for p in pl_module.parameters() if p.ndim >= 2
        ]  # fmt: skip


def stack(**overrides: Any) -> dict[str, pl.Callback]:
    """Every callback of the library (LabelSmoothing is fused into Mixup), by matrix column."""
    callbacks: dict[str, pl.Callback] = {
        "EarlyStopping": EarlyStopping("val_loss", patience=len(SCRIPT)),
        "WeightDecayExclusion": WeightDecayExclusion(verbose=False),
        "Mixup": Mixup(0.4, label_smoothing=SMOOTHING, num_classes=CLASSES),
        "GeneralizationGapMonitor": GeneralizationGapMonitor(subset_size=256),
        "RegularizationMonitor": RegularizationMonitor(),
        "MembershipInferenceAudit": MembershipInferenceAudit(subset_size=64),
        "ProximalSparsity": CountingProx(l1=0.1),
    }
    callbacks.update(overrides)
    return {name: cb for name, cb in callbacks.items() if cb is not None}


@dataclass
class Run:
    """One fit of the stack and what its cells need to check it."""

    model: Net
    trainer: pl.Trainer
    probe: Probe
    callbacks: dict[str, pl.Callback]
    datamodule: pl.LightningDataModule
    precision: str = "32-true"
    hard_targets: bool = False  # Mixup left out: targets stay integer labels


def fit_stack(
    root: Any, model: Net | Callable[[], Net] | None = None,
    datamodule: pl.LightningDataModule | None = None,
    callbacks: dict[str, pl.Callback] | None = None, fit: bool = True, **overrides: Any,
) -> Run:  # fmt: skip
    pl.seed_everything(0, verbose=False)
    if not isinstance(model, Net):  # built after seeding: same initial weights in every row
        model = model() if model is not None else Net(scheduler=step_decay)
    datamodule = datamodule if datamodule is not None else BlobsDataModule(shuffle=False)
    callbacks = callbacks if callbacks is not None else stack()
    probe = Probe()
    kwargs = trainer_kwargs(root, max_epochs=3) | overrides
    trainer = pl.Trainer(**kwargs | {"callbacks": [*callbacks.values(), probe]})
    run = Run(model, trainer, probe, callbacks, datamodule, str(trainer.precision))
    run.hard_targets = "Mixup" not in callbacks
    if fit:
        trainer.fit(model, datamodule=datamodule)
    return run


def evaluate(run: Run, state: dict[str, Tensor], loader: DataLoader) -> dict[str, float]:
    """``state`` validated on ``loader`` by a fresh Trainer in the run's precision."""
    model = Net(script=[0.0])
    model.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in state.items()})
    trainer = pl.Trainer(**trainer_kwargs(run.trainer.default_root_dir, precision=run.precision))
    trainer.validate(model, dataloaders=loader, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """Bitwise equality, dtypes included."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )  # fmt: skip


# ------------------------------------------------------------------------- checks by column
def best_check(run: Run) -> Check:
    monitor = run.callbacks["EarlyStopping"].monitor  # type: ignore[attr-defined]
    checks = [c for c in run.probe.checks if monitor in c.metrics]
    return min(checks, key=lambda c: c.metrics[monitor])  # first of equal values, like "min"


def check_early_stopping(run: Run) -> None:
    """The model ends with the best check's weights (bitwise, in its dtype) and scores its value."""
    best = best_check(run)
    assert best is not run.probe.checks[-1], "the script must make an earlier check the best"
    final = run.model.state_dict()
    assert same_state(final, best.state)
    assert not same_state(final, run.probe.checks[-1].state)
    dtype = next(iter(best.state.values())).dtype
    assert all(v.dtype == dtype for k, v in final.items() if v.is_floating_point())
    loader = run.datamodule.val_dataloader()
    loader = loader[0] if isinstance(loader, list) else loader  # the monitored one
    scored = evaluate(run, final, loader)["real_val_loss"]
    value = best.metrics.get("real_val_loss", best.metrics.get("real_val_loss/dataloader_idx_0"))
    assert scored == pytest.approx(value, rel=1e-6, abs=1e-7)


def check_weight_decay_exclusion(run: Run) -> None:
    """Excluded tensors have weight_decay 0 and their group had the source's lr at every step."""
    probe = run.probe
    assert probe.optimizer_steps == run.trainer.global_step > 0
    assert probe.lr_pairs, "no split-off no-decay group was stepped"
    assert all(a == b for a, b in probe.lr_pairs), probe.lr_pairs
    assert len({b for _, b in probe.lr_pairs}) > 1, "the lr never changed: the check is void"
    assert set(probe.no_decay_wd) == {0.0}
    assert not probe.mismatches, sorted(set(probe.mismatches))  # momentum, betas, initial_lr...
    names = {id(p): n for n, p in run.model.named_parameters()}
    for group in run.trainer.optimizers[0].param_groups:
        for param in group["params"]:
            excluded = param.ndim < 2
            assert (group["weight_decay"] == 0) == excluded, (names[id(param)], group)


def check_soft_targets(run: Run, mixed: bool = True) -> None:
    """Every training batch reached ``training_step`` with probability rows of the right mass."""
    assert len(run.probe.targets) == run.trainer.fit_loop.epoch_loop.batch_progress.total.completed
    for y, x_dtype in zip(run.probe.targets, run.probe.inputs_dtype, strict=True):
        assert y.ndim == 2 and y.shape[1] == CLASSES and y.is_floating_point(), y.dtype
        assert y.dtype in (torch.float32, x_dtype)  # the inputs' precision or float32
        tol = 1e-2 if y.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(y.float().sum(1), torch.ones(len(y)), atol=tol, rtol=0)
        assert float(y.min()) >= SMOOTHING / CLASSES - tol  # the smoothing mass is everywhere
        assert float(y.max()) <= 1 - SMOOTHING + SMOOTHING / CLASSES + tol
    if mixed:  # a new draw per batch: coefficients differ from batch to batch
        assert len({round(float(y.max(1).values.min()), 3) for y in run.probe.targets}) > 1


def check_gap(run: Run) -> None:
    """train_eval equals an independent evaluation (a fresh Trainer's ``validate`` in the run's
    precision) of the validated weights on the monitor's training subset; the gap is val minus
    train_eval. Under bf16 the float32 evaluation differs: the pass ran in the run's precision."""
    train_set = run.datamodule.train_set  # type: ignore[attr-defined]
    # the monitor's subset: the first `subset_size` of a randperm seeded with its `seed` (0)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(Subset(train_set, order.tolist()), batch_size=32)
    checks = [c for c in run.probe.checks if "reg/train_eval/real_val_loss" in c.metrics]
    assert checks
    for check in (checks[0], checks[-1]):
        ours = check.metrics["reg/train_eval/real_val_loss"]
        assert ours == pytest.approx(evaluate(run, check.state, loader)["real_val_loss"], rel=1e-6)
        if not run.precision.startswith("32"):
            fp32 = evaluate(replace(run, precision="32-true"), check.state, loader)
            assert ours != pytest.approx(fp32["real_val_loss"], rel=1e-6)
        val = check.metrics.get(
            "real_val_loss", check.metrics.get("real_val_loss/dataloader_idx_0")
        )
        assert val is not None  # the gap is taken against the first validation dataloader
        gap = val - ours
        assert check.metrics["reg/gap/real_val_loss"] == pytest.approx(gap, rel=1e-5, abs=1e-6)


def check_membership_audit(run: Run) -> None:
    """The logged attack metrics equal the attack on losses computed here, on the audit's subsets
    (members and non-members drawn in turn from one generator seeded with its ``seed``, 0)."""
    audit = run.callbacks["MembershipInferenceAudit"]
    assert isinstance(audit, MembershipInferenceAudit) and run.precision.startswith("32")
    train: Any = audit.train_dataset or run.datamodule.train_set  # type: ignore[attr-defined]
    val = run.datamodule.val_set  # type: ignore[attr-defined]
    n = min(audit.subset_size, len(train), len(val))
    generator = torch.Generator().manual_seed(0)
    members = torch.randperm(len(train), generator=generator)[:n]
    nonmembers = torch.randperm(len(val), generator=generator)[:n]
    checks = [c for c in run.probe.checks if "reg/privacy/auc" in c.metrics]
    assert checks
    for check in (checks[0], checks[-1]):
        model = Net(script=[0.0])
        model.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in check.state.items()})
        model.eval()
        with torch.no_grad():
            losses = [
                F.cross_entropy(model(data[idx][0]), data[idx][1], reduction="none")
                for data, idx in ((train, members), (val, nonmembers))
            ]  # fmt: skip
        expected = loss_attack_metrics(*losses)
        for name in ("auc", "advantage"):
            assert check.metrics[f"reg/privacy/{name}"] == pytest.approx(expected[name], abs=1e-6)


def check_regularization_monitor(run: Run) -> None:
    """The logged global L2/L1 norms equal a direct computation on the last epoch's weights."""
    weights = run.probe.epoch_end_weights
    l2 = math.sqrt(sum(float(w.double().square().sum()) for w in weights))
    l1 = sum(float(w.double().abs().sum()) for w in weights)
    metrics = run.trainer.callback_metrics
    assert float(metrics["reg/weights/l2"]) == pytest.approx(l2, rel=1e-5)
    assert float(metrics["reg/weights/l1"]) == pytest.approx(l1, rel=1e-5)


def check_proximal_sparsity(run: Run) -> None:
    """One proximal step after each real optimizer step, and exact zeros in the matrices."""
    prox = run.callbacks["ProximalSparsity"]
    assert isinstance(prox, CountingProx)
    assert prox.applied_at == list(range(1, run.trainer.global_step + 1))
    zeros = sum(int((p == 0).sum()) for p in run.model.parameters() if p.ndim >= 2)
    assert zeros > 0


def check_stack(run: Run) -> None:
    """All together: a finite loss, every callback logged, and an exact restore."""
    metrics = run.trainer.callback_metrics
    assert torch.isfinite(metrics["train_loss"])
    for name in ("reg/train_eval/real_val_loss", "reg/weights/l2", "reg/privacy/auc"):
        assert name in metrics and math.isfinite(float(metrics[name])), name
    if "Mixup" in run.callbacks:
        assert "reg/mixup/lambda" in metrics
    check_early_stopping(run)


CHECKS: dict[str, Callable[[Run], None]] = {
    "EarlyStopping": check_early_stopping,
    "WeightDecayExclusion": check_weight_decay_exclusion,
    "Mixup": check_soft_targets,
    "GeneralizationGapMonitor": check_gap,
    "RegularizationMonitor": check_regularization_monitor,
    "MembershipInferenceAudit": check_membership_audit,
    "ProximalSparsity": check_proximal_sparsity,
    "stack": check_stack,
}


def cells(row: str, columns: Iterable[str], key: str | None = None) -> list[Any]:
    """One parametrized case per (row, column) cell, marked for the matrix."""
    return [
        pytest.param(
            key or row, column, marks=pytest.mark.compat(row, column), id=f"{row}-{column}"
        )
        for column in columns
    ]


class Fits:
    """One fit per row, shared by the row's cells (built on first use)."""

    def __init__(self, root: Any, builders: Mapping[str, Callable[[Any], Run]]) -> None:
        self.root, self.builders, self.runs = root, builders, dict[str, Run]()

    def __call__(self, key: str) -> Run:
        if key not in self.runs:
            self.runs[key] = self.builders[key](self.root / key.replace(" ", "_"))
        return self.runs[key]


# ------------------------------------------------------------------------------------- rows
def _precision(precision: str) -> Callable[[Any], Run]:
    return lambda root: fit_stack(root, precision=precision)


def _compiled(root: Any) -> Run:
    # aot_eager: dynamo's graph capture and guards on the parameters and AOTAutograd, which is what
    # our in-place writes (proximal step, restore, snapshot) meet; inductor's C++ code generation
    # adds a minute of compiling on CPU and nothing our callbacks touch.
    return fit_stack(
        root, model=Net(scheduler=step_decay, compile_backend="aot_eager"), max_epochs=3
    )


def _accumulate(root: Any) -> Run:
    run = fit_stack(root, accumulate_grad_batches=2)
    batches = run.trainer.fit_loop.epoch_loop.batch_progress.total.completed
    assert run.trainer.global_step == batches // 2 > 0  # one real step per two micro-batches
    return run


def _manual(root: Any) -> Run:
    return fit_stack(root, model=Net(scheduler=step_decay, manual=True))


ROWS = {
    "precision='bf16-mixed' (CPU)": _precision("bf16-mixed"),
    "precision='bf16-true' (CPU)": _precision("bf16-true"),
    "torch.compile'd submodules": _compiled,
    "accumulate_grad_batches=2": _accumulate,
    "manual optimization": _manual,
}


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> Fits:
    return Fits(tmp_path_factory.mktemp("precision_and_optimization"), ROWS)


BF16_COLUMNS = ("EarlyStopping", "Mixup", "GeneralizationGapMonitor", "stack")


@pytest.mark.parametrize(
    ("row", "column"),
    [
        *cells("precision='bf16-mixed' (CPU)", BF16_COLUMNS),
        *cells(
            "precision='bf16-true' (CPU)",
            (*BF16_COLUMNS, "RegularizationMonitor", "ProximalSparsity"),
        ),
        *cells("torch.compile'd submodules", ("EarlyStopping", "WeightDecayExclusion", "stack")),
        *cells(
            "accumulate_grad_batches=2",
            ("WeightDecayExclusion", "Mixup", "ProximalSparsity", "stack"),
        ),
        *cells(
            "manual optimization",
            ("EarlyStopping", "WeightDecayExclusion", "Mixup", "ProximalSparsity", "stack"),
        ),
    ],
)
def test_cell(fits: Fits, row: str, column: str) -> None:
    CHECKS[column](fits(row))
