"""Recognise Lightning's classes by name: `lightning.pytorch` and `pytorch_lightning` alike.

The two packages ship the same classes under two module paths; an ``isinstance`` check against one
silently fails for users of the other. These helpers look at a class's MRO (name and package) so
one code base serves both.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning_utilities.core.overrides import is_overridden as _is_overridden
from torch import nn

_PACKAGES = ("lightning.pytorch.", "pytorch_lightning.")
# The classes Lightning's own `is_overridden` compares a user's object against.
_HOOK_OWNERS = ("LightningModule", "LightningDataModule", "Callback")
# Strategies whose every rank holds the whole model (the snapshot of rank 0 is the model's).
_REPLICATED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy", "SingleDeviceXLAStrategy")


def is_lightning_class(obj: Any, *names: str) -> bool:
    """Whether ``obj``'s class is (or derives from) one of Lightning's classes ``names``."""
    return any(
        cls.__name__ in names and cls.__module__.startswith(_PACKAGES) for cls in type(obj).__mro__
    )


def lightning_package(obj: Any) -> str | None:
    """The package ``obj``'s class is built on: ``"lightning.pytorch"`` or ``"pytorch_lightning"``.

    The nearest Lightning class in the MRO decides (a user's ``Trainer`` subclass counts as its
    base's package); ``None`` when ``obj`` derives from no Lightning class.

    Example:
        >>> import lightning.pytorch
        >>> import pytorch_lightning
        >>> lightning_package(lightning.pytorch.callbacks.Callback())
        'lightning.pytorch'
        >>> lightning_package(pytorch_lightning.callbacks.Callback())
        'pytorch_lightning'
    """
    for cls in type(obj).__mro__:
        for package in _PACKAGES:
            if cls.__module__.startswith(package):
                return package[:-1]
    return None


def require_same_package(callback: Any, trainer: Any) -> None:
    """Refuse a callback built on the other package's class than the ``Trainer``'s.

    Needed where the Trainer itself type-checks the callback: it runs ``EarlyStopping`` and
    ``Checkpoint`` instances *of its own package* after the module's ``on_train_epoch_end`` and
    lists them in ``trainer.early_stopping_callback``; one of the other package would silently run
    earlier (and read a metric the module logs there from the previous epoch).

    Raises:
        TypeError: if ``callback`` and ``trainer`` come from different packages.
    """
    ours, theirs = lightning_package(callback), lightning_package(trainer)
    if ours is None or theirs is None or ours == theirs:
        return
    name = type(callback).__name__
    module = "lightning_reg.pytorch_lightning" if theirs == "pytorch_lightning" else "lightning_reg"
    raise TypeError(
        f"This {name} is built on `{ours}`'s {name}, but the Trainer comes from `{theirs}`, which "
        f"does not recognise it as one of its own: it would run before your LightningModule's "
        f"`on_train_epoch_end` and be missing from `trainer.early_stopping_callback`. Use "
        f"`from {module} import {name}` with a `{theirs}` Trainer."
    )


def is_overridden(method_name: str, instance: Any) -> bool:
    """Whether ``instance`` overrides ``method_name`` of its Lightning base class.

    Lightning's ``is_overridden`` raises for a module of the other package (it checks
    ``isinstance`` against its own ``LightningModule``); this one finds the base by name.

    Raises:
        ValueError: if ``instance`` is no ``LightningModule``, ``LightningDataModule`` or
            ``Callback`` of either package.
    """
    for cls in type(instance).__mro__:
        if cls.__name__ in _HOOK_OWNERS and cls.__module__.startswith(_PACKAGES):
            return _is_overridden(method_name, instance, cls)
    raise ValueError(
        f"{type(instance).__name__} derives from none of Lightning's {', '.join(_HOOK_OWNERS)} "
        "(of `lightning.pytorch` or `pytorch_lightning`)."
    )


def is_replicated(strategy: Any) -> bool:
    """Whether every rank holds the whole model (single device, DDP), as opposed to sharded."""
    if is_lightning_class(strategy, "FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"):
        return False
    return is_lightning_class(strategy, *_REPLICATED_STRATEGIES)


def is_whole_model_per_rank(strategy: Any) -> bool:
    """Whether every rank's module holds all the weights: single device, DDP, DeepSpeed ZeRO-1/2.

    Unlike :func:`is_replicated`, DeepSpeed counts (ZeRO-3 empties the module instead of sharding
    it; the caller checks ``zero_stage_3``).
    """
    return is_lightning_class(strategy, "SingleDeviceStrategy", "DDPStrategy")


def averaging_callbacks(callbacks: list[Any]) -> list[Any]:
    """Lightning's ``WeightAveraging`` callbacks (``EMAWeightAveraging`` included) in the list."""
    return [cb for cb in callbacks if is_lightning_class(cb, "WeightAveraging")]


def swa_callbacks(callbacks: list[Any]) -> list[Any]:
    """Lightning's ``StochasticWeightAveraging`` callbacks in the list."""
    return [cb for cb in callbacks if is_lightning_class(cb, "StochasticWeightAveraging")]


def averaged_module(callback: Any) -> nn.Module | None:
    """The module ``WeightAveraging`` validates with: its averaged copy (``None`` before setup).

    Lightning keeps it in the private ``_average_model`` (an ``AveragedModel`` whose ``module``
    is a deep copy of the LightningModule) and swaps its tensors into the LightningModule from
    ``on_validation_epoch_start`` to ``on_validation_epoch_end``.

    Raises:
        RuntimeError: if the Lightning version keeps it elsewhere (the combination is unsupported
            rather than silently wrong).
    """
    if not hasattr(callback, "_average_model"):
        raise RuntimeError(
            f"lightning-reg cannot find the averaged model of {type(callback).__name__} in this "
            "Lightning version, so EarlyStopping cannot snapshot, nor GeneralizationGapMonitor "
            "and MembershipInferenceAudit evaluate, the weights that were validated. Remove "
            "them (or pass `restore_best_weights=False`), or use lightning>=2.6,<2.7."
        )
    averaged = callback._average_model
    return None if averaged is None else averaged.module


@contextmanager
def validated_weights(callbacks: list[Any], module: nn.Module) -> Iterator[None]:
    """While inside, ``module`` holds the weights the last validation scored.

    ``WeightAveraging`` swaps its average into the module for validation and back out in its
    ``on_validation_epoch_end``, before the ``on_validation_end`` hooks where the gap pass and
    the audit run: this swaps it in again (parameters, then buffers, in place, as Lightning does)
    and back out on exit. Without weight averaging it does nothing.
    """
    averages = [
        a for a in (averaged_module(cb) for cb in averaging_callbacks(callbacks)) if a is not None
    ]  # fmt: skip
    for average in averages:
        _swap(average, module)
    try:
        yield
    finally:
        for average in reversed(averages):
            _swap(average, module)


@torch.no_grad()
def _swap(average: nn.Module, module: nn.Module) -> None:
    tensors = zip(
        itertools.chain(average.parameters(), average.buffers()),
        itertools.chain(module.parameters(), module.buffers()),
        strict=True,  # the average is a deep copy of the module
    )  # fmt: skip
    for a, m in tensors:
        held = a.clone()
        a.copy_(m)
        m.copy_(held)


def checkpoint_savers_after(callbacks: list[Any], owner: Any) -> list[Any]:
    """Checkpoint callbacks after ``owner`` in the list that save when ``fit`` raises."""
    if owner not in callbacks:
        return []
    later = callbacks[callbacks.index(owner) + 1 :]
    return [
        cb for cb in later
        if is_lightning_class(cb, "Checkpoint") and _saves_on_exception(cb)
    ]  # fmt: skip


def _saves_on_exception(callback: Any) -> bool:
    if is_lightning_class(callback, "ModelCheckpoint"):
        return bool(getattr(callback, "save_on_exception", False)) or _overrides_on_exception(
            callback, "ModelCheckpoint"
        )
    return _overrides_on_exception(callback, "Checkpoint")


def _overrides_on_exception(callback: Any, base: str) -> bool:
    for cls in type(callback).__mro__:
        if cls.__name__ == base and cls.__module__.startswith(_PACKAGES):
            return False
        if "on_exception" in vars(cls):
            return True
    return False


def alias_names(module: nn.Module) -> dict[str, str]:
    """Every ``state_dict`` key of ``module`` mapped to the name its tensor has in the snapshot.

    Tied tensors appear in ``state_dict`` under each of their names but once in the snapshot.
    """
    canonical: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, tensor in [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]:
        canonical[name] = first.setdefault(id(tensor), name)
    return canonical
