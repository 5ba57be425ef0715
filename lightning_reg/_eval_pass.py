"""Run the user's ``validation_step`` on other data and collect what it logs, without side effects.

Used by :class:`lightning_reg.GeneralizationGapMonitor` to evaluate a training subset *exactly* as
validation does. While the pass runs:

- ``self.log`` is replaced by a collector, so nothing reaches Lightning's validation results;
- every torchmetrics ``Metric`` of the module is saved, reset, and restored afterwards, so metric
  objects updated in ``validation_step`` (or accumulating training metrics) are not polluted;
- values are aggregated per name with torchmetrics aggregators weighted by batch size (Lightning's
  epoch reduction), so under DDP every rank gets the value over the whole, split subset.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric, Metric, MinMetric, SumMetric

_AGGREGATORS: dict[str, Callable[[], Metric]] = {
    "mean": MeanMetric, "sum": SumMetric, "max": MaxMetric, "min": MinMetric,
}  # fmt: skip


class _LogCollector:
    """Stands in for ``LightningModule.log`` during the pass."""

    def __init__(self, wanted: Callable[[str], bool], device: torch.device) -> None:
        self.wanted, self.device = wanted, device
        self.batch_size = 1
        self.aggregators: dict[str, Metric] = {}
        self.metric_objects: dict[str, Metric] = {}

    def __call__(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if not self.wanted(name):
            return
        if isinstance(value, Metric):  # computed once at the end, over the whole pass
            self.metric_objects[name] = value
            return
        reduce_fx = kwargs.get("reduce_fx", "mean")
        key = reduce_fx if isinstance(reduce_fx, str) else getattr(reduce_fx, "__name__", "mean")
        if key not in _AGGREGATORS:
            raise ValueError(
                f"GeneralizationGapMonitor cannot reproduce reduce_fx={reduce_fx!r} of metric "
                f"{name!r}; use 'mean', 'sum', 'max' or 'min', or log a torchmetrics Metric."
            )
        aggregator = self.aggregators.get(name)
        if aggregator is None:
            aggregator = self.aggregators[name] = _AGGREGATORS[key]().to(self.device)
        value = torch.as_tensor(value, dtype=torch.float32, device=self.device).detach()
        batch_size = kwargs.get("batch_size") or self.batch_size
        if isinstance(aggregator, MeanMetric):
            aggregator.update(value.mean(), weight=batch_size)
        else:
            aggregator.update(value)

    def compute(self) -> dict[str, Tensor]:
        """Every collected value, reduced across ranks (names sorted: same collectives order)."""
        out = {name: self.aggregators[name].compute() for name in sorted(self.aggregators)}
        for name in sorted(self.metric_objects):
            out[name] = self.metric_objects[name].compute()
        return {name: value.float().squeeze() for name, value in out.items()}


def evaluate_like_validation(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    batches: Iterable[Any],
    wanted: Callable[[str], bool],
) -> dict[str, Tensor]:
    """Run ``validation_step`` on ``batches`` in eval mode without gradients; return its logs.

    Args:
        trainer: the running trainer (moves batches with the strategy).
        pl_module: the module; left in the mode and state it was in.
        batches: host batches, as a DataLoader yields them.
        wanted: which logged names to keep.
    """
    collector = _LogCollector(wanted, pl_module.device)
    saved = _save_metric_states(pl_module)
    was_training = pl_module.training
    takes_idx = is_param_in_hook_signature(pl_module.validation_step, "dataloader_idx")
    pl_module.__dict__["log"] = collector  # shadows LightningModule.log for the pass
    try:
        pl_module.eval()
        with torch.no_grad():
            for batch_idx, batch in enumerate(batches):
                batch = trainer.strategy.batch_to_device(batch)
                collector.batch_size = _batch_size(batch)
                if takes_idx:
                    pl_module.validation_step(batch, batch_idx, dataloader_idx=0)
                else:
                    pl_module.validation_step(batch, batch_idx)
            return collector.compute()
    finally:
        del pl_module.__dict__["log"]
        _restore_metric_states(saved)
        pl_module.train(was_training)


def _batch_size(batch: Any) -> int:
    try:
        return extract_batch_size(batch)
    except Exception:  # Lightning warns and uses 1 in this case too
        return 1


_MetricState = tuple[Metric, dict[str, Any], int, Any]


def _save_metric_states(module: torch.nn.Module) -> list[_MetricState]:
    saved = []
    for metric in module.modules():
        if isinstance(metric, Metric):
            state = {name: copy.deepcopy(getattr(metric, name)) for name in metric._defaults}
            saved.append((metric, state, metric._update_count, metric._computed))
            metric.reset()
    return saved


def _restore_metric_states(saved: list[_MetricState]) -> None:
    for metric, state, update_count, computed in saved:
        for name, value in state.items():
            setattr(metric, name, value)
        metric._update_count, metric._computed = update_count, computed
