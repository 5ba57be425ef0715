"""Compatibility matrix, scheduler rows: ``WeightDecayExclusion`` (and the whole stack) under
torch's ``CosineAnnealingLR`` and ``OneCycleLR``, timm's ``CosineLRScheduler`` with warm-up,
Hugging Face's linear warm-up as a ``LambdaLR`` and a hand-written scheduler with its own
per-group list.

The module has two param groups with different learning rates (so a scheduler that addresses
groups by index is exercised), both decayed: the callback appends a no-decay group for each. At
every optimizer step the no-decay groups must hold their source group's lr (and momentum, betas,
every setting but ``params``/``weight_decay``/``name``), which ``Probe`` records.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.compat.test_precision_and_optimization import CHECKS, Fits, Net, Run, cells, fit_stack

# a scheduler factory is not a hyperparameter Lightning can pickle: it says so, and drops it
pytestmark = pytest.mark.filterwarnings("ignore:Attribute 'scheduler' removed from hparams")

STEPS = 24  # 3 epochs of 8 batches
WARMUP = 5


class TwoGroupNet(Net):
    """Two decayed param groups (the head at a tenth of the lr), a scheduler stepped per step;
    non-torch schedulers are stepped through ``lr_scheduler_step`` as Lightning asks."""

    def configure_optimizers(self) -> Any:
        head = list(self.net[-1].parameters())
        body = [p for p in self.parameters() if all(p is not h for h in head)]
        lr = self.hparams["lr"]
        optimizer = torch.optim.AdamW(
            [{"params": body}, {"params": head, "lr": lr / 10}], lr=lr, weight_decay=0.05
        )
        assert self.make_scheduler is not None
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.make_scheduler(optimizer), "interval": "step"},
        }

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if hasattr(scheduler, "step_update"):  # timm: stepped by update count
            scheduler.step_update(num_updates=self.global_step)
        else:
            scheduler.step()


def linear_warmup(step: int) -> float:
    """transformers' ``get_linear_schedule_with_warmup`` factor, written out."""
    if step < WARMUP:
        return step / WARMUP
    return max(0.0, (STEPS - step) / (STEPS - WARMUP))


class HalvingPerGroup:
    """A user's scheduler: its own list of base lrs, one per group it saw at construction, written
    back by index (it knows nothing of groups added later)."""

    def __init__(self, optimizer: torch.optim.Optimizer, every: int = 3) -> None:
        self.optimizer, self.every, self.count = optimizer, every, 0
        self.start = [group["lr"] for group in optimizer.param_groups]

    def step(self) -> None:
        self.count += 1
        factor = 0.5 ** (self.count // self.every)
        for group, base in zip(self.optimizer.param_groups, self.start, strict=False):
            group["lr"] = base * factor

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "start": list(self.start)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.start = state["count"], list(state["start"])


def timm_cosine(optimizer: torch.optim.Optimizer) -> Any:
    scheduler = pytest.importorskip("timm.scheduler")
    return scheduler.CosineLRScheduler(
        optimizer, t_initial=STEPS, warmup_t=WARMUP, warmup_lr_init=1e-4, lr_min=1e-4,
        t_in_epochs=False,
    )  # fmt: skip


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "torch CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=STEPS
    ),
    "torch OneCycleLR (lr and betas)": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[0.1, 0.01], total_steps=STEPS
    ),
    "timm CosineLRScheduler, warm-up": timm_cosine,
    "HF linear warm-up (LambdaLR)": lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, [linear_warmup, linear_warmup]
    ),
    "own scheduler, per-group list": HalvingPerGroup,
}


def _row(make: Callable[[torch.optim.Optimizer], Any]) -> Callable[[Any], Run]:
    def build(root: Any) -> Run:
        run = fit_stack(root, model=TwoGroupNet(scheduler=make))
        groups = run.trainer.optimizers[0].param_groups
        assert [g.get("no_decay_of") for g in groups] == [None, None, 0, 1]
        assert run.trainer.global_step == STEPS
        return run

    return build


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> Fits:
    builders = {row: _row(make) for row, make in SCHEDULERS.items()}
    return Fits(tmp_path_factory.mktemp("schedulers"), builders)


@pytest.mark.parametrize(
    ("row", "column"),
    [cell for row in SCHEDULERS for cell in cells(row, ("WeightDecayExclusion", "stack"))],
)
def test_cell(fits: Fits, row: str, column: str) -> None:
    run = fits(row)
    CHECKS[column](run)
    if column == "WeightDecayExclusion":
        lrs = [b for _, b in run.probe.lr_pairs]
        assert all(math.isfinite(lr) for lr in lrs)
        assert len(set(lrs)) > 2  # the schedule moved the lr, in both source groups
