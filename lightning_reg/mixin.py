"""``RegularizedModule``: a LightningModule mixin with regularization helpers."""

from __future__ import annotations

from typing import Any, cast

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_reg._batch import TrainBatchTransform
from lightning_reg.mixing import MixPlan
from lightning_reg.weight_decay import param_groups

__all__ = ["RegularizedModule"]


class RegularizedModule:
    """Mix into your LightningModule (``class Net(RegularizedModule, LightningModule)``).

    Helpers for users who write ``configure_optimizers`` themselves (the callbacks do the same
    without any change to the module), and a cross-entropy that applies the current batch's
    mixing and smoothing when ``Mixup``/``LabelSmoothing`` run with ``keep_targets=True``.

    Example:
        >>> import torch
        >>> import lightning.pytorch as pl
        >>> class Net(RegularizedModule, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(4, 2)
        ...         self.norm = torch.nn.LayerNorm(2)
        ...
        ...     def configure_optimizers(self):
        ...         return torch.optim.AdamW(self.weight_decay_groups(0.05), lr=1e-3)
        >>> [g["weight_decay"] for g in Net().configure_optimizers().param_groups]
        [0.05, 0.0]
    """

    def weight_decay_groups(self, weight_decay: float, **rules: Any) -> list[dict[str, object]]:
        """This module's parameters as decay/no-decay optimizer groups.

        ``rules`` are :func:`~lightning_reg.param_groups`' keyword arguments (``exclude_bias``,
        ``exclude_norm``, ``exclude_1d``, ``exclude_embeddings``, ``use_no_weight_decay_hook``,
        ``exclude``).
        """
        return param_groups(cast(nn.Module, self), weight_decay, **rules)

    def cross_entropy(self, logits: Tensor, targets: Tensor, **kwargs: object) -> Tensor:
        """``F.cross_entropy`` on the soft targets of the current training batch.

        With ``Mixup(keep_targets=True)`` or ``LabelSmoothing(keep_targets=True)`` the batch keeps
        its integer targets (for metrics); this loss builds the same soft targets the callback
        would have put in the batch. It finds the callback among ``self.trainer.callbacks`` and
        asks it for its ``current_plan``; nothing is stored on the module. Outside training
        (validation, test) or without such a callback it is plain
        ``F.cross_entropy(logits, targets)``.

        Example:
            >>> import torch
            >>> module = RegularizedModule()
            >>> logits, y = torch.zeros(2, 3), torch.tensor([0, 2])
            >>> module.cross_entropy(logits, y)  # no callback: plain cross-entropy
            tensor(1.0986)
        """
        plan = _current_plan(self) if getattr(self, "training", False) else None
        if plan is None:
            return F.cross_entropy(logits, targets, **kwargs)  # type: ignore[arg-type]
        return F.cross_entropy(logits, plan.targets(targets), **kwargs)  # type: ignore[arg-type]


def _current_plan(module: object) -> MixPlan | None:
    """The plan of the batch being trained on, from the trainer's training-batch transform."""
    try:
        trainer = module.trainer  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # not a LightningModule, or not attached to a Trainer
        return None
    for callback in getattr(trainer, "callbacks", ()):
        if isinstance(callback, TrainBatchTransform):
            return callback.current_plan
    return None
