"""Run the user's ``validation_step`` on other data the way Lightning runs it, and collect its logs.

Used by :class:`lightning_reg.GeneralizationGapMonitor` to evaluate a training subset *exactly* as
validation does. Each batch takes Lightning's own path (``loops/evaluation_loop.py``,
``_evaluation_step``): the precision plugin's ``convert_input`` (bf16-true), the module's
``on_before_batch_transfer``, ``strategy.batch_to_device`` (``transfer_batch_to_device`` and
``on_after_batch_transfer``), then ``strategy.validation_step``: the precision plugin's
``val_step_context`` (autocast under ``bf16-mixed``/``16-mixed``) and the forward redirection
through the strategy's wrapper (DDP, FSDP).

What ``validation_step`` logs is captured by Lightning's own logging path, not by a stand-in for
``self.log``: ``LightningModule.log`` writes into the result collection of the trainer's active
loop, and for the pass that loop is given a fresh collection of ours. Lightning exposes no public
way to choose that collection, so this is the one place where private attributes of the *trainer*
(never of the user's module) are touched; all of them are put back in a ``finally``. The captured
values are reduced by Lightning's own code (batch-size-weighted means, ``reduce_fx``, torchmetrics
objects), always synchronised across ranks, since every rank evaluates only its share of the
subset. Every torchmetrics ``Metric`` of the module is set aside during the pass and put back
afterwards, so metric objects updated in ``validation_step`` (or accumulating training metrics)
are not polluted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override

__all__ = ["evaluate_like_validation"]


class _PassResults(_ResultCollection):
    """Lightning's result collection, keeping only wanted names and always syncing across ranks."""

    def __init__(self, wanted: Callable[[str], bool], trainer: pl.Trainer) -> None:
        super().__init__(training=False)
        self.wanted = wanted
        self.distributed = trainer.world_size > 1
        self.strategy = trainer.strategy

    @override
    def log(self, fx: str, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if not self.wanted(name):
            return
        # Each rank holds only its share of the subset: the value of the whole subset needs a sync.
        kwargs.update(sync_dist=self.distributed, sync_dist_fn=self._reduce)
        super().log(fx, name, value, *args, **kwargs)

    def _reduce(self, tensor: Tensor, reduce_op: str | None = None, group: Any = None) -> Tensor:
        # A mean is synced as (sum of value * batch size) / (sum of batch sizes). Lightning reduces
        # both with op "mean", dividing by the world size: exact for the weighted sums, truncated
        # for the integer count when ranks saw different numbers of samples (our shares differ by
        # one). Summing both is exact.
        op = "sum" if reduce_op in (None, "mean", "sum") else reduce_op
        return self.strategy.reduce(tensor, group=group, reduce_op=op)


def evaluate_like_validation(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    batches: Iterable[Any],
    wanted: Callable[[str], bool],
    dataloader_idx: int | None = None,
) -> dict[str, Tensor]:
    """Run ``validation_step`` on ``batches`` in eval mode without gradients; return its logs.

    Args:
        trainer: the running trainer, inside ``fit``.
        pl_module: the module; left in the mode and state it was in.
        batches: host batches, as a DataLoader yields them.
        wanted: which logged names (as passed to ``self.log``) to keep.
        dataloader_idx: the validation dataloader the pass stands in for when there are several
            (passed to ``validation_step`` and the batch hooks, and appended to the logged names as
            Lightning does); ``None`` with a single validation dataloader.

    Returns:
        ``{name: value}`` as ``trainer.callback_metrics`` would hold them after a validation on
        ``batches`` (with the ``/dataloader_idx_N`` suffix when ``dataloader_idx`` is given).

    Raises:
        RuntimeError: when called outside a running loop of ``fit``.
    """
    owner = _results_owner(trainer)
    connector = trainer._logger_connector
    saved_connector = (connector._first_loop_iter, connector._current_fx)
    saved_results = owner._results
    results = _PassResults(wanted, trainer)
    saved_metrics = _set_metric_states_aside(pl_module)
    modes = {module: module.training for module in pl_module.modules()}
    idx = 0 if dataloader_idx is None else dataloader_idx
    owner._results = results
    try:
        pl_module.eval()
        with torch.no_grad():
            for batch_idx, batch in enumerate(batches):
                batch = trainer.precision_plugin.convert_input(batch)
                batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=idx)
                batch = trainer.strategy.batch_to_device(batch, dataloader_idx=idx)
                connector._first_loop_iter = batch_idx == 0  # a new epoch of this collection
                results.batch, results.batch_size = batch, None
                results.dataloader_idx = dataloader_idx
                # Lightning's own call: it names the running hook `validation_step` (so `self.log`
                # accepts it), runs the strategy's precision context and wrapper, and puts the
                # module's hook name back.
                call._call_strategy_hook(
                    trainer,
                    "validation_step",
                    *_step_args(pl_module, batch, batch_idx, dataloader_idx),
                )
            results.batch = None
            return dict(results.metrics(on_step=False)["callback"])
    finally:
        owner._results = saved_results
        connector._first_loop_iter, connector._current_fx = saved_connector
        _restore_metric_states(saved_metrics)
        for module, training in modes.items():
            module.training = training


def _results_owner(trainer: pl.Trainer) -> Any:
    """The loop whose result collection ``LightningModule.log`` writes into right now.

    Lightning's ``self.log`` writes into ``trainer._results``, the collection of the active loop;
    no public API selects it, so that loop lends us its ``_results`` slot for the pass.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    if trainer.state.fn == TrainerFn.FITTING and trainer.validating:
        return epoch_loop.val_loop
    if trainer.state.fn == TrainerFn.FITTING and trainer.training:
        return epoch_loop
    raise RuntimeError("The evaluation pass runs only inside the training or validation of `fit`.")


def _step_args(
    pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int | None
) -> tuple[Any, ...]:
    """The positional arguments Lightning passes to ``validation_step``."""
    args: tuple[Any, ...] = (batch,)
    if is_param_in_hook_signature(pl_module.validation_step, "batch_idx", min_args=2):
        args += (batch_idx,)
    return args if dataloader_idx is None else (*args, dataloader_idx)


_MetricState = tuple[Metric, dict[str, Any], dict[str, Any]]
_FLAGS = ("_update_count", "_computed", "_forward_cache", "_is_synced", "_cache")


def _set_metric_states_aside(module: torch.nn.Module) -> list[_MetricState]:
    """Keep every metric's state objects and reset it (``reset`` assigns new state objects)."""
    saved = []
    for metric in module.modules():
        if isinstance(metric, Metric):
            state = {name: getattr(metric, name) for name in metric._defaults}
            flags = {name: getattr(metric, name) for name in _FLAGS if hasattr(metric, name)}
            saved.append((metric, state, flags))
            metric.reset()
    return saved


def _restore_metric_states(saved: list[_MetricState]) -> None:
    for metric, state, flags in saved:
        for name, value in {**state, **flags}.items():
            setattr(metric, name, value)
