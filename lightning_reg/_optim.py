"""Regroup live optimizers and keep split-off groups in step with their source groups.

The functional core of :class:`lightning_reg.WeightDecayExclusion` (no Lightning here). The layout
it produces: the user's groups stay at their indices, as the same dict objects; the excluded
parameters of each decayed group move to a new group with ``weight_decay=0`` appended at the end of
``param_groups``, marked with the index of its source under :data:`SOURCE_KEY`. Schedulers that
keep per-group lists of the original length (timm's, most hand-written ones, ``LambdaLR``) thus
still drive the right groups, and :func:`follow_sources`, called before every optimizer step,
copies each source group's hyperparameters into its split-off group, whatever changed them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

# Marks a split-off group with the index of the group it came from. A plain int, so it survives
# `optimizer.state_dict()`, checkpoints loaded with `weights_only=True`, and Lightning's
# `BaseFinetuning`, which stores and restores group settings itself.
SOURCE_KEY = "no_decay_of"
# What a split-off group keeps for itself; every other setting follows its source.
OWN_KEYS = frozenset({"params", "param_names", "weight_decay", "name", SOURCE_KEY})

# Scheduler attributes that hold one entry per param group and are read by group index
# (torch.optim.lr_scheduler and look-alikes): they get an entry for every split-off group.
_PER_GROUP_ATTRIBUTES = (
    "base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs", "base_momentums", "max_momentums",
)  # fmt: skip
_MISSING = object()


def is_decayed(group: dict[str, Any]) -> bool:
    """Whether ``group`` applies weight decay (a tensor value counts as decayed: no host read)."""
    decay = group.get("weight_decay", 0.0)
    return isinstance(decay, Tensor) or bool(decay)


def split_groups(groups: list[dict[str, Any]], excluded: set[int]) -> list[int]:
    """Move the excluded parameters of every decayed group of ``groups`` into appended groups.

    Idempotent: a split-off group, a group without weight decay, or a group holding no excluded
    parameter is left alone. A decayed group holding only excluded parameters gets
    ``weight_decay=0`` in place instead of an empty twin.

    Args:
        groups: an optimizer's ``param_groups``, edited in place (the existing group dicts are
            kept, so references held by schedulers stay valid; optimizer state is keyed by
            parameter and does not move).
        excluded: ``id()`` of the parameters that must not decay.

    Returns:
        For each appended group, in order, the index of its source group.

    Example:
        >>> import torch
        >>> w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
        >>> sgd = torch.optim.SGD([{"params": [w, b], "name": "net"}], lr=0.1, weight_decay=0.1)
        >>> split_groups(sgd.param_groups, {id(b)})
        [0]
        >>> [(g["name"], len(g["params"]), g["weight_decay"]) for g in sgd.param_groups]
        [('net', 1, 0.1), ('net/no_decay', 1, 0.0)]
    """
    origin: list[int] = []
    for index in range(len(groups)):
        group = groups[index]
        if SOURCE_KEY in group or not is_decayed(group):
            continue
        flags = [id(p) in excluded for p in group["params"]]
        if not any(flags):
            continue
        if all(flags):
            group["weight_decay"] = 0.0
            continue
        drop = dict(group, weight_decay=0.0)
        drop[SOURCE_KEY] = index
        for key in ("params", "param_names"):  # torch keeps names parallel to params when given
            if key in group:
                values = group[key]
                group[key] = [v for v, out in zip(values, flags, strict=True) if not out]
                drop[key] = [v for v, out in zip(values, flags, strict=True) if out]
        if "name" in group:  # LearningRateMonitor needs distinct group names
            drop["name"] = f"{group['name']}/no_decay"
        groups.append(drop)
        origin.append(index)
    return origin


def split_preview(groups: Sequence[dict[str, Any]], excluded: set[int]) -> list[dict[str, Any]]:
    """What :func:`split_groups` makes of ``groups``, computed on copies (``groups`` untouched)."""
    copies = [dict(group, params=list(group["params"])) for group in groups]
    split_groups(copies, excluded)
    return copies


def extend_scheduler(scheduler: Any, optimizer: Any, origin: Sequence[int], old_count: int) -> None:
    """Give ``scheduler``'s per-group lists an entry for every group appended by the split.

    ``origin[i]`` is the source of the ``i``-th appended group; ``old_count`` the number of groups
    before the split. Only lists of exactly ``old_count`` entries are extended (each new entry is
    its source's), so a list indexed by group (``ReduceLROnPlateau.min_lrs``) does not run out,
    while lists that are merely zipped with the groups would have been fine either way.
    """
    for child in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        extend_scheduler(child, optimizer, origin, old_count)
    if getattr(scheduler, "optimizer", None) is not optimizer or not origin:
        return
    for attribute in _PER_GROUP_ATTRIBUTES:
        value = getattr(scheduler, attribute, None)
        if isinstance(value, list) and len(value) == old_count:
            setattr(scheduler, attribute, value + [value[i] for i in origin])


def group_layout(groups: Sequence[dict[str, Any]]) -> list[tuple[int, Any]]:
    """``(number of params, source mark)`` per group: what a checkpoint's layout must match."""
    return [(len(g["params"]), g.get(SOURCE_KEY)) for g in groups]


def saved_group_layouts(states: Any) -> list[list[tuple[int, Any]]] | None:
    """:func:`group_layout` of each state in a checkpoint's ``optimizer_states``.

    None unless every state is in torch's format (a list of groups with a ``params`` list each):
    a sharded or otherwise custom format gives nothing to compare.
    """
    if not isinstance(states, list):
        return None
    layouts = []
    for state in states:
        groups = state.get("param_groups") if isinstance(state, dict) else None
        if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
        ):
            return None
        layouts.append(group_layout(groups))
    return layouts


class GroupLink:
    """A split-off group, its source group, and the settings last copied between them."""

    __slots__ = ("last", "source", "target")

    def __init__(self, source: dict[str, Any], target: dict[str, Any]) -> None:
        self.source, self.target = source, target
        self.last: dict[str, Any] = {}


def link_groups(groups: Sequence[dict[str, Any]]) -> list[GroupLink]:
    """The (source, split-off) pairs of ``groups``, read from the :data:`SOURCE_KEY` marks.

    Raises:
        ValueError: if a mark does not point at an earlier, unmarked group.
    """
    links: list[GroupLink] = []
    for index, group in enumerate(groups):
        source = group.get(SOURCE_KEY)
        if source is None:
            continue
        if not (isinstance(source, int) and 0 <= source < index) or SOURCE_KEY in groups[source]:
            raise ValueError(
                f"param group {index} is marked as the no-decay part of group {source!r}, which "
                "is not an earlier group of this optimizer; the param groups were reordered "
                "after WeightDecayExclusion split them."
            )
        links.append(GroupLink(groups[source], group))
    return links


def follow_sources(links: Iterable[GroupLink]) -> None:
    """Copy every setting of each source group into its split-off group (in place, host only).

    All keys but :data:`OWN_KEYS` follow: ``lr``, momentum, betas, ``initial_lr``, OneCycleLR's
    ``max_lr``... Values are shared, not copied: a tensor lr stays the same tensor object. A value
    that changed on the split-off group alone since the last call (code that sets
    ``param_groups[-1]["lr"]``, as Lightning's ``BackboneFinetuning`` does) is copied the other
    way, so the pair follows whichever of the two was changed; when both changed, the source wins.
    The split-off group's ``weight_decay`` is put back to 0 if anything changed it. Values are
    compared by identity only, so this never reads a tensor.

    Example:
        >>> source, target = {"lr": 0.1, "weight_decay": 0.1}, {"lr": 0.1, "weight_decay": 0.0}
        >>> links = [GroupLink(source, target)]
        >>> source["lr"] = 0.05
        >>> follow_sources(links)
        >>> target
        {'lr': 0.05, 'weight_decay': 0.0}
        >>> target["lr"] = 0.2
        >>> follow_sources(links)
        >>> source
        {'lr': 0.2, 'weight_decay': 0.1}
    """
    for link in links:
        source, target, last = link.source, link.target, link.last
        decay = target.get("weight_decay")
        if not (isinstance(decay, float | int) and decay == 0):
            # a weight-decay schedule that writes every group must not decay the excluded part
            target["weight_decay"] = 0.0
        for key, value in source.items():
            if key in OWN_KEYS:
                continue
            current = target.get(key, _MISSING)
            if current is not value:
                if value is last.get(key, _MISSING) and current is not _MISSING:
                    source[key] = value = current  # only the split-off group was changed
                else:
                    target[key] = value
            last[key] = value
