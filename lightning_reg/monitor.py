"""RegularizationMonitor: weight norms, sparsity, histograms and effective weight decay per epoch.

Method card:
    What it does: at the end of every training epoch, logs what regularization does to the weights:
    their global L2 and L1 norms, the fraction of (near-)zero weights, optionally one L2 norm per
    layer and weight histograms, and the weight decay every param group applies per step.
    Suggested values: the defaults (matrices and kernels only, no per-layer norms); turn on
    ``per_layer`` to find the layers that grow, ``histogram_every_n_epochs`` of 5-10 to see shapes.
    When it hurts: per-layer norms and histograms of models with thousands of tensors clutter the
    logger; histograms copy the weights to the host.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torchmetrics.aggregation import SumMetric
from typing_extensions import override

from lightning_reg._lightning import is_lightning_class, is_whole_model_per_rank
from lightning_reg._snapshot import _local
from lightning_reg.tensorboard import tensorboard_writer

__all__ = ["RegularizationMonitor", "decay_metrics", "weight_statistics"]

# Levels that FSDP1, activation checkpointing and torch.compile insert into parameter names
_WRAPPERS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


class RegularizationMonitor(Callback):
    r"""Logs weight norms, sparsity and effective weight decay at the end of every training epoch.

    Nothing runs per step: at each training-epoch end the statistics are built as device tensors
    and read with one host-device sync. Monitored are the trainable parameters with two or more
    dimensions (matrices, kernels, embeddings); ``include_1d`` adds biases, norm gains, scalars.

    Under DDP every rank holds the full weights and computes the same values alone. Under sharded
    strategies (``ModelParallelStrategy``, ``FSDPStrategy``) every rank sums over its local shards
    and torchmetrics' ``SumMetric`` adds the sums across ranks (one collective). ``FSDPStrategy``
    flattens parameters to 1-D shards, so only ``include_1d=True`` selects any; under DeepSpeed
    ZeRO-3 the module holds empty placeholders, so only the weight decay is logged. Strategies
    and loggers of the standalone ``pytorch_lightning`` package are recognised as well.

    Args:
        per_layer: also log the L2 norm of every module's monitored parameters.
        include_1d: also monitor parameters with fewer than two dimensions.
        sparsity_tolerance: a weight counts as zero when ``|w| <= sparsity_tolerance``.
        histogram_every_n_epochs: every this many epochs, write a histogram of every monitored
            parameter to TensorBoard (rank 0, only when a ``TensorBoardLogger`` is attached; under
            sharded strategies rank 0's shard). ``None`` writes none.

    Raises:
        ValueError: if ``sparsity_tolerance`` is negative or not finite, or
            ``histogram_every_n_epochs`` is not an integer >= 1.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_reg.monitor import RegularizationMonitor
        >>> monitor = RegularizationMonitor(per_layer=True, histogram_every_n_epochs=5)
        >>> trainer = Trainer(callbacks=[monitor], logger=False)
        >>> sorted(monitor.regularization_settings())[:2]
        ['RegularizationMonitor/histogram_every_n_epochs', 'RegularizationMonitor/include_1d']

    Logged metrics:
        - ``reg/weights/l2``: global L2 norm, ``sqrt(sum(w**2))`` over the monitored parameters.
        - ``reg/weights/l1``: global L1 norm, ``sum(|w|)``.
        - ``reg/weights/sparsity``: fraction of monitored elements with ``|w| <= tolerance``.
        - ``reg/weights_l2/<module>`` (``per_layer``): L2 norm of one module's monitored
          parameters; ``<module>`` is the parameter name without its last component (the
          parameter name itself for parameters of the root module).
        - ``reg/weight_decay/<i>/<group>``: ``weight_decay`` of param group ``<group>`` (its
          ``"name"``, else ``pg<j>``) of optimizer ``<i>``, as the epoch started (later
          changes, by schedulers or at the epoch's end, show in the next epoch's value).
        - ``reg/effective_decay/<i>/<group>``: ``lr * weight_decay``, the fraction decoupled decay
          (AdamW, ``decoupled_weight_decay=True``) removes from each weight per step. For coupled
          L2 it is the equivalent shrink of plain SGD (the penalty gradient ``wd * w`` times
          ``lr``); momentum amplifies it and adaptive optimizers (Adam's ``weight_decay``) rescale
          it per coordinate, so there it is only a nominal value.
    """

    def __init__(
        self,
        per_layer: bool = False,
        include_1d: bool = False,
        sparsity_tolerance: float = 1e-6,
        histogram_every_n_epochs: int | None = None,
    ) -> None:
        if not math.isfinite(sparsity_tolerance) or sparsity_tolerance < 0:
            raise ValueError(
                f"`sparsity_tolerance` must be a finite number >= 0, got {sparsity_tolerance!r}; "
                "use 0 to count exact zeros only."
            )
        every = histogram_every_n_epochs
        if every is not None and (type(every) is not int or every < 1):  # bool is no count
            raise ValueError(
                f"`histogram_every_n_epochs` must be an integer >= 1 or None, got {every!r}; "
                "pass None to write no histograms."
            )
        self.per_layer = per_layer
        self.include_1d = include_1d
        self.sparsity_tolerance = float(sparsity_tolerance)
        self.histogram_every_n_epochs = every
        self._sharded = False
        self._plain_replicas = 1
        self._skip_weights = False
        self._decay: dict[str, float] = {}

    def regularization_settings(self) -> dict[str, Any]:
        """This callback's settings, for the TensorBoard hparams view."""
        names = ("per_layer", "include_1d", "sparsity_tolerance", "histogram_every_n_epochs")
        return {f"RegularizationMonitor/{name}": getattr(self, name) for name in names}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        strategy = trainer.strategy
        # DDP (DeepSpeed ZeRO-1/2 too) replicates the weights: a sum over ranks would multiply them
        # (strategies of `lightning.pytorch` and `pytorch_lightning` alike: checked by class name)
        self._sharded = not is_whole_model_per_rank(strategy)
        # ModelParallelStrategy shards through DTensors: its plain tensors live on every rank
        parallel = is_lightning_class(strategy, "ModelParallelStrategy")
        self._plain_replicas = trainer.world_size if parallel else 1
        self._skip_weights = bool(getattr(strategy, "zero_stage_3", False))
        if self._skip_weights:
            rank_zero_warn("RegularizationMonitor logs no weight statistics under ZeRO-3.")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._skip_weights and next(self._monitored(pl_module), None) is None:
            rank_zero_warn(
                "RegularizationMonitor found no trainable parameter with "
                f"{'any shape' if self.include_1d else 'two or more dimensions'}, so it logs no "
                "weight statistics. Pass `include_1d=True` to monitor biases and norm gains too "
                "(FSDPStrategy flattens every parameter to 1-D)."
            )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Read now: Lightning steps epoch-interval schedulers after the epoch's last batch, before
        # `on_train_epoch_end`, where the values would already be the next epoch's.
        self._decay = decay_metrics(trainer.optimizers)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = [] if self._skip_weights else list(self._monitored(pl_module))
        metrics = weight_statistics(
            params, self.sparsity_tolerance, self.per_layer, self._sharded, self._plain_replicas
        )
        metrics.update(self._decay)
        for name, value in metrics.items():
            # identical on every rank; sync_dist=True only silences Lightning's distributed warning
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)
        every = self.histogram_every_n_epochs
        if every is not None and (trainer.current_epoch + 1) % every == 0:
            self._write_histograms(trainer, params)

    def _monitored(self, pl_module: pl.LightningModule) -> Iterator[tuple[str, Tensor]]:
        for name, param in pl_module.named_parameters():
            if param.requires_grad and (self.include_1d or param.ndim >= 2):
                yield _WRAPPERS.sub("", name), param

    def _write_histograms(self, trainer: pl.Trainer, params: list[tuple[str, Tensor]]) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        for name, param in params:
            local = _local(param).detach()
            if local.numel():  # an uneven shard can be empty on rank 0
                tag = f"reg/weights_hist/{name}"
                writer.add_histogram(tag, local.float().cpu(), trainer.global_step)


def weight_statistics(
    named_tensors: Iterable[tuple[str, Tensor]],
    sparsity_tolerance: float = 1e-6,
    per_layer: bool = False,
    sharded: bool = False,
    plain_replicas: int = 1,
) -> dict[str, float]:
    """Global L2 and L1 norms, sparsity and optionally per-layer L2 norms of some tensors.

    Args:
        named_tensors: ``(parameter name, tensor)`` pairs; a ``DTensor`` counts its local shard.
        sparsity_tolerance: an element counts as zero when ``|w| <= sparsity_tolerance``.
        per_layer: also return the L2 norm per module (the name without its last component).
        sharded: the tensors are this rank's parts of the weights: add the partial sums across
            ranks (a collective; every rank passes the same names in the same order). Leave it
            ``False`` when every rank holds the full weights (DDP).
        plain_replicas: with ``sharded``, on how many ranks each non-``DTensor`` lives: 1 for
            local shards (FSDP1), the world size where only ``DTensor`` s are sharded. Replicated
            mesh dimensions of a ``DTensor`` are counted once.

    Returns:
        ``{metric name: value}``, named as :class:`RegularizationMonitor` logs them; ``{}`` for
        no tensors.

    Example:
        >>> weight = torch.tensor([[3.0, 0.0], [-4.0, 0.0]])
        >>> weight_statistics([("fc.weight", weight)], per_layer=True)
        {'reg/weights/l2': 5.0, 'reg/weights/l1': 7.0, 'reg/weights/sparsity': 0.5,
         'reg/weights_l2/fc': 5.0}
    """
    rows: list[Tensor] = []  # per tensor: sum of squares, sum of |w|, near-zero count, count
    layers: dict[str, list[Tensor]] = {}
    for name, tensor in named_tensors:
        local = _local(tensor).detach()
        dtype = torch.float32 if local.device.type == "mps" else torch.float64
        squares, absolutes = _norm_sums(local, dtype)
        row = torch.stack([
            squares,
            absolutes,
            (local.abs() <= sparsity_tolerance).sum().to(dtype),
            local.new_full((), local.numel(), dtype=dtype),  # a fill, not a host-to-device copy
        ])  # fmt: skip
        copies = _replicas(tensor, plain_replicas) if sharded else 1
        rows.append(row / copies)
        layers.setdefault(name.rpartition(".")[0] or name, []).append(row[0] / copies)
    if not rows:
        return {}
    parts = [torch.stack(rows).sum(0)]
    if per_layer:
        parts.append(torch.stack([torch.stack(squares).sum() for squares in layers.values()]))
    sums = torch.cat(parts)
    if sharded:  # torchmetrics adds every rank's sums, all statistics in one collective
        metric = _ElementwiseSum().to(sums.device)
        metric.update(sums)
        sums = metric.compute()
    values = sums.tolist()  # the one host-device sync
    squares_sum, abs_sum, near_zero, count = values[:4]
    stats = {
        "reg/weights/l2": math.sqrt(squares_sum),
        "reg/weights/l1": abs_sum,
        "reg/weights/sparsity": near_zero / count if count else math.nan,
    }
    if per_layer:
        for layer, squares_sum in zip(layers, values[4:], strict=True):
            stats[f"reg/weights_l2/{layer}"] = math.sqrt(squares_sum)
    return stats


# Elements per partial norm. torch's CPU `vector_norm` in float32 loses precision on long vectors
# (torch 2.14: -0.8% of the squared L2 and -4.7% of the L1 norm of 5e7 elements, -3.5e-5 of the L2
# of a 512x512x3x3 kernel); norms of short chunks, added up in float64, are exact to rounding.
_CHUNK = 4096


def _norm_sums(local: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Sum of squares and sum of absolute values of ``local``, as ``dtype`` scalars."""
    flat = local.reshape(-1)
    cut = flat.numel() - flat.numel() % _CHUNK
    squares: list[Tensor] = []
    absolutes: list[Tensor] = []
    for part in (flat[:cut].view(-1, _CHUNK), flat[cut:].view(1, -1)):
        for order, out in ((2, squares), (1, absolutes)):
            norms = torch.linalg.vector_norm(part, order, dim=1, dtype=torch.float32).to(dtype)
            out.append((norms.square() if order == 2 else norms).sum())
    return squares[0] + squares[1], absolutes[0] + absolutes[1]


def decay_metrics(optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, float]:
    """``reg/weight_decay/...`` and ``reg/effective_decay/...`` of every param group.

    Example:
        >>> w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
        >>> sgd = torch.optim.SGD(
        ...     [{"params": [w], "weight_decay": 0.1, "name": "decay"}, {"params": [b]}], lr=0.5
        ... )
        >>> decay_metrics([sgd])
        {'reg/weight_decay/0/decay': 0.1, 'reg/effective_decay/0/decay': 0.05,
         'reg/weight_decay/0/pg1': 0.0, 'reg/effective_decay/0/pg1': 0.0}
    """
    metrics: dict[str, float] = {}
    for i, optimizer in enumerate(optimizers):
        names = [group.get("name") for group in optimizer.param_groups]
        for j, group in enumerate(optimizer.param_groups):
            # a name shared by two groups would merge their values under one key
            name = names[j] if names[j] and names.count(names[j]) == 1 else f"pg{j}"
            decay = float(group.get("weight_decay", 0.0))
            metrics[f"reg/weight_decay/{i}/{name}"] = decay
            if "lr" in group:
                metrics[f"reg/effective_decay/{i}/{name}"] = float(group["lr"]) * decay
    return metrics


def _replicas(tensor: Tensor, plain: int) -> int:
    """On how many ranks each element of ``tensor`` lives."""
    placements = getattr(tensor, "placements", None)
    if placements is None:
        return plain
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    return math.prod(mesh.size(dim) for dim, p in enumerate(placements) if p.is_replicate())


class _ElementwiseSum(SumMetric):
    """``SumMetric`` of a vector: every element is summed across ranks, all in one collective."""

    @override
    def update(self, value: float | Tensor) -> None:
        # No NaN check (a host sync; a NaN norm is worth seeing) and no flattening to a scalar.
        self.sum_value = self.sum_value + value
