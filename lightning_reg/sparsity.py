"""Proximal sparsity: L1, elastic net and group lasso as a proximal step after each optimizer step.

Method card:
    What it does: after every optimizer step, replaces each regularized weight ``w`` by the
    proximal operator of the penalty with step ``lr``: soft-thresholding for L1
    (``sign(w) * max(|w| - lr * l1, 0)``), soft-thresholding then shrinking for elastic net, and
    block soft-thresholding of whole rows/columns for group lasso. Weights become *exactly* zero,
    which a subgradient L1 term in the loss never achieves (it makes them oscillate around 0).
    Suggested values: ``l1`` so that ``lr * l1`` is 1e-5-1e-3 of a typical weight magnitude;
    ramp it in with ``warmup_steps``; watch ``reg/weights/sparsity`` and the validation metric.
    When it hurts: adaptive optimizers (Adam) rescale gradients per coordinate, so the proximal
    step with the raw ``lr`` is only an approximation there; SGD is the textbook setting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_reg._lightning import is_lightning_class
from lightning_reg._snapshot import _local
from lightning_reg._utils import trainer_callbacks
from lightning_reg.weight_decay import split_parameters

__all__ = ["ProximalSparsity", "prox_elastic_net", "prox_group_lasso", "prox_l1"]

Penalty = Literal["l1", "elastic_net", "group_lasso"]


def prox_l1(w: Tensor, threshold: float) -> Tensor:
    """Soft-thresholding, the proximal operator of ``threshold * |w|_1`` (a new tensor).

    Example:
        >>> prox_l1(torch.tensor([-0.3, 0.05, 0.0, 0.2]), 0.1)
        tensor([-0.2000,  0.0000,  0.0000,  0.1000])
    """
    return F.softshrink(w, threshold) if threshold > 0 else w.clone()


def prox_elastic_net(w: Tensor, l1_threshold: float, l2_threshold: float) -> Tensor:
    """Proximal operator of ``t1 * |w|_1 + (t2 / 2) * |w|_2^2``: soft-threshold, then shrink."""
    return prox_l1(w, l1_threshold) / (1.0 + l2_threshold)


def prox_group_lasso(w: Tensor, threshold: float, group_dim: int = 0) -> Tensor:
    """Block soft-thresholding, the proximal operator of group lasso.

    Each slice along ``group_dim`` is a group, scaled by
    ``max(0, 1 - threshold * sqrt(group size) / ||group||)`` (zero groups stay zero).

    Example:
        >>> w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # row norms 5 and 0.5
        >>> prox_group_lasso(w, threshold=1.0 / math.sqrt(2), group_dim=0)
        tensor([[2.4000, 3.2000],
                [0.0000, 0.0000]])
    """
    if w.ndim < 2:
        return prox_l1(w, threshold)
    dims = [d for d in range(w.ndim) if d != group_dim % w.ndim]
    norms = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
    size = w.numel() // w.shape[group_dim]
    scale = torch.clamp(1.0 - threshold * math.sqrt(size) / norms.clamp_min(1e-12), min=0.0)
    return w * scale


def _refuse_groups_across_shards(params: Sequence[tuple[str, Tensor]], group_dim: int) -> None:
    """Refuse group lasso on a ``DTensor`` sharded along a dimension that its groups span.

    Each rank thresholds its local shard: a group cut across ranks would be scaled by the norm of
    its local part only, a silently wrong step.
    """
    for name, param in params:
        dim = group_dim % param.ndim
        for placement in getattr(param, "placements", ()):
            if placement.is_shard() and placement.dim % param.ndim != dim:
                raise RuntimeError(
                    f"ProximalSparsity(penalty='group_lasso', group_dim={group_dim}): parameter "
                    f"{name!r} is sharded along dim {placement.dim} (e.g. FSDP2's `fully_shard`), "
                    "so each group is split across ranks and a rank would scale it by the norm of "
                    f"its part only. Use `group_dim={placement.dim}` (groups along the sharded "
                    "dimension stay whole on one rank), or penalty='l1'."
                )


class ProximalSparsity(Callback):
    """Sparsity by proximal steps: L1, elastic net or group lasso, applied after each step.

    After every optimizer step (gradient accumulation respected: only when ``global_step``
    advanced), every regularized parameter of every param group is replaced by the proximal
    operator of the penalty with that group's learning rate as step size, so the effective
    threshold follows LR schedules. A param group may set its own strength with the keys
    ``"l1"`` / ``"l2"`` (e.g. in ``configure_optimizers``); others use the callback's. Which
    parameters are regularized follows the weight-decay exclusion rules (biases, normalization
    layers, 1-d parameters, ``no_weight_decay()`` names and ``exclude`` patterns are left alone).
    The strength can start at ``start_step`` and ramp in linearly over ``warmup_steps``.

    Everything runs on the device with Python-float thresholds: no host-device synchronisation.
    Sparsity is logged under the :class:`~lightning_reg.RegularizationMonitor` names: by the
    monitor when it is attached, else by this callback.

    Args:
        l1: L1 strength (the threshold per step is ``lr * l1``); for group lasso, the group
            strength.
        l2: L2 strength of elastic net (shrink by ``1 / (1 + lr * l2)``); only with
            ``penalty="elastic_net"``.
        penalty: ``"l1"``, ``"elastic_net"`` or ``"group_lasso"``.
        group_dim: for group lasso, the dimension whose slices are groups (0: output units of a
            ``Linear``/``Conv`` weight, 1: input features).
        start_step: no proximal step before this global step.
        warmup_steps: ramp the strength linearly from 0 to full over this many steps.
        exclude_bias: leave biases alone.
        exclude_norm: leave normalization layers alone.
        exclude_1d: leave every parameter with fewer than two dimensions alone.
        exclude_embeddings: leave embeddings alone.
        exclude: glob patterns of parameter names to leave alone.
        sparsity_tolerance: ``|w| <= tolerance`` counts as zero in the logged sparsity.

    Raises:
        ValueError: for negative strengths or steps, an unknown penalty, ``l2`` without
            elastic net, or all strengths zero.
        RuntimeError: at fit start, for group lasso on parameters sharded (FSDP2's DTensors)
            along another dimension than ``group_dim``, whose groups no rank holds whole.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> sparsity = ProximalSparsity(l1=1e-4, warmup_steps=500)
        >>> trainer = Trainer(callbacks=[sparsity], logger=False)
        >>> sparsity.state_key == ProximalSparsity(l1=1e-3, warmup_steps=500).state_key
        False

    Logged metrics:
        - ``reg/proximal/strength``: the L1 (group) strength in force at the epoch's end.
        - ``reg/weights/sparsity``, ``reg/weights/l1``, ``reg/weights/l2``: logged here only when
          no ``RegularizationMonitor`` is attached (same names, same definitions).
    """

    def __init__(
        self,
        l1: float = 1e-4,
        l2: float = 0.0,
        penalty: Penalty = "l1",
        group_dim: int = 0,
        start_step: int = 0,
        warmup_steps: int = 0,
        *,
        exclude_bias: bool = True,
        exclude_norm: bool = True,
        exclude_1d: bool = True,
        exclude_embeddings: bool = False,
        exclude: Sequence[str] = (),
        sparsity_tolerance: float = 1e-6,
    ) -> None:
        if penalty not in ("l1", "elastic_net", "group_lasso"):
            raise ValueError(
                f"`penalty` must be 'l1', 'elastic_net' or 'group_lasso', got {penalty!r}."
            )
        if l1 < 0 or l2 < 0 or not (math.isfinite(l1) and math.isfinite(l2)):
            raise ValueError(f"Strengths must be finite and >= 0, got l1={l1}, l2={l2}.")
        if l2 > 0 and penalty != "elastic_net":
            raise ValueError("`l2` is the ridge part of elastic net: use penalty='elastic_net'.")
        if l1 == 0 and l2 == 0:
            raise ValueError("All strengths are 0, so nothing would be regularized.")
        if start_step < 0 or warmup_steps < 0:
            raise ValueError(f"Steps must be >= 0, got {start_step} and {warmup_steps}.")
        if isinstance(exclude, str):
            raise TypeError(f"`exclude` takes a list of glob patterns, got the string {exclude!r}.")
        self.l1, self.l2, self.penalty, self.group_dim = l1, l2, penalty, group_dim
        self.start_step, self.warmup_steps = start_step, warmup_steps
        self.rules: dict[str, Any] = dict(
            exclude_bias=exclude_bias, exclude_norm=exclude_norm, exclude_1d=exclude_1d,
            exclude_embeddings=exclude_embeddings, exclude=list(exclude),
        )  # fmt: skip
        self.sparsity_tolerance = sparsity_tolerance
        # Lightning reads `state_key` at every hook call: built once
        self._state_key = self._generate_state_key(
            l1=l1, l2=l2, penalty=penalty, group_dim=group_dim, start_step=start_step,
            warmup_steps=warmup_steps,
        )  # fmt: skip
        self._targets: set[int] = set()
        self._last_step = -1
        self._log_weights = True
        self._sharded, self._plain_replicas = False, 1

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    def regularization_settings(self) -> dict[str, Any]:
        """This callback's settings, for the TensorBoard hparams view."""
        return {
            "ProximalSparsity/penalty": self.penalty, "ProximalSparsity/l1": self.l1,
            "ProximalSparsity/l2": self.l2,
        }  # fmt: skip

    def ramp(self, step: int) -> float:
        """The fraction of the strength in force at global step ``step``."""
        if step < self.start_step:
            return 0.0
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step - self.start_step + 1) / self.warmup_steps)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        split = split_parameters(pl_module, include_frozen=True, **self.rules)
        if self.penalty == "group_lasso":
            _refuse_groups_across_shards(split.decay, self.group_dim)
        self._targets = {id(p) for _, p in split.decay}
        self._last_step = trainer.global_step
        # as RegularizationMonitor: under sharded strategies each rank sums its local shards and
        # the sums are added across ranks (a DTensor's plain tensors live on every rank)
        strategy = trainer.strategy
        self._sharded = not is_lightning_class(strategy, "SingleDeviceStrategy", "DDPStrategy")
        parallel = is_lightning_class(strategy, "ModelParallelStrategy")
        self._plain_replicas = trainer.world_size if parallel else 1
        from lightning_reg.monitor import RegularizationMonitor

        monitors = [c for c in trainer_callbacks(trainer) if isinstance(c, RegularizationMonitor)]
        self._log_weights = not monitors

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        step = trainer.global_step
        if step == self._last_step:  # accumulating gradients: no optimizer step this batch
            return
        self._last_step = step
        ramp = self.ramp(step - 1)
        if ramp > 0:
            self.apply(trainer.optimizers, ramp)

    @torch.no_grad()
    def apply(self, optimizers: Sequence[torch.optim.Optimizer], ramp: float = 1.0) -> None:
        """One proximal step on the regularized parameters of ``optimizers``' groups."""
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                lr = float(group["lr"])
                t1 = lr * float(group.get("l1", self.l1)) * ramp
                t2 = lr * float(group.get("l2", self.l2)) * ramp
                for param in group["params"]:
                    if id(param) in self._targets:
                        local = _local(param)
                        local.copy_(self._prox(local, t1, t2))

    def _prox(self, w: Tensor, t1: float, t2: float) -> Tensor:
        if self.penalty == "group_lasso":
            return prox_group_lasso(w, t1, self.group_dim)
        if self.penalty == "elastic_net":
            return prox_elastic_net(w, t1, t2)
        return prox_l1(w, t1)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {"reg/proximal/strength": self.l1 * self.ramp(max(trainer.global_step - 1, 0))}
        if self._log_weights:
            from lightning_reg.monitor import weight_statistics

            params = [(n, p) for n, p in pl_module.named_parameters() if p.ndim >= 2]
            metrics.update(weight_statistics(
                params, self.sparsity_tolerance, sharded=self._sharded,
                plain_replicas=self._plain_replicas,
            ))  # fmt: skip
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
