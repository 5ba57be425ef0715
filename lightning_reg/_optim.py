"""Regroup optimizers that already exist, and keep their LR schedulers consistent.

Used by :class:`lightning_reg.WeightDecayExclusion`, which applies the regrouping to what the user's
``configure_optimizers`` returns, before Lightning restores optimizer state from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

# Scheduler attributes that hold one entry per param group (torch.optim.lr_scheduler).
_PER_GROUP_ATTRIBUTES = (
    "base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs", "base_momentums", "max_momentums",
)  # fmt: skip


def walk_optimizer_config(config: Any) -> Iterator[Any]:
    """Yield every optimizer and scheduler object in a ``configure_optimizers`` return value."""
    if isinstance(config, dict):
        for value in config.values():
            yield from walk_optimizer_config(value)
    elif isinstance(config, list | tuple):
        for value in config:
            yield from walk_optimizer_config(value)
    elif isinstance(config, torch.optim.Optimizer) or hasattr(config, "optimizer"):
        yield config


def split_groups(optimizer: torch.optim.Optimizer, excluded: set[int]) -> list[int]:
    """Split every decayed param group of ``optimizer`` in place into decay and no-decay groups.

    Args:
        optimizer: the optimizer to regroup (its state, if any, stays keyed by parameter).
        excluded: ``id()`` of the parameters that must not decay.

    Returns:
        For each new group, the index of the group it came from.
    """
    new_groups: list[dict[str, Any]] = []
    origin: list[int] = []
    for index, group in enumerate(optimizer.param_groups):
        keep, drop = _partition(group, excluded) if group.get("weight_decay") else (group, None)
        for part in (keep, drop):
            if part is not None and part["params"]:
                new_groups.append(part)
                origin.append(index)
    optimizer.param_groups[:] = new_groups
    return origin


def _partition(group: dict[str, Any], excluded: set[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    flags = [id(p) in excluded for p in group["params"]]
    keep, drop = dict(group), dict(group, weight_decay=0.0)
    for key in ("params", "param_names"):  # torch keeps names parallel to params when given
        if key in group:
            keep[key] = [v for v, out in zip(group[key], flags, strict=True) if not out]
            drop[key] = [v for v, out in zip(group[key], flags, strict=True) if out]
    if "name" in group:  # LearningRateMonitor needs distinct group names
        drop["name"] = f"{group['name']}/no_decay"
    return keep, drop


def expand_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, origin: list[int]) -> None:
    """Give ``scheduler``'s per-group lists one entry per new group of ``optimizer``.

    ``origin[i]`` is the old group that new group ``i`` came from. Schedulers that keep their
    per-group settings in the param groups themselves (OneCycleLR, the ``initial_lr`` of every
    LRScheduler) need nothing: the split groups carry copies of those entries.
    """
    for child in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        expand_scheduler(child, optimizer, origin)
    if getattr(scheduler, "optimizer", None) is not optimizer:
        return
    old_count = max(origin) + 1 if origin else 0
    for attribute in _PER_GROUP_ATTRIBUTES:
        value = getattr(scheduler, attribute, None)
        if isinstance(value, list) and len(value) == old_count:
            setattr(scheduler, attribute, [value[i] for i in origin])


class SplittingAddParamGroup:
    """Stands in for ``optimizer.add_param_group``, splitting every added group the same way.

    Lightning's fine-tuning callbacks (``BaseFinetuning.unfreeze_and_add_param_group``) add the
    unfrozen parameters as a new group with the optimizer's default weight decay.
    """

    def __init__(self, original: Callable[[dict[str, Any]], None], excluded: set[int]) -> None:
        self.original = original
        self.excluded = excluded

    def __call__(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        owner: torch.optim.Optimizer = self.original.__self__  # type: ignore[attr-defined]
        decay = param_group.get("weight_decay", owner.defaults.get("weight_decay", 0.0))
        group = dict(param_group, params=params)
        if not decay or not any(id(p) in self.excluded for p in params):
            self.original(group)
            return
        keep, drop = _partition(group, self.excluded)
        for part in (keep, drop):
            if part["params"]:
                self.original(part)
