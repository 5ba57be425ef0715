"""Find and replace inputs and targets in any batch, and transform training batches only.

A training batch is transformed in the LightningModule's (or DataModule's)
``on_after_batch_transfer`` hook, wrapped by the callback for the duration of ``fit``: the batch is
already on the device, any batch type can be replaced (tuples and named tuples included), and
validation, test and predict batches pass untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_reg._utils import trainer_callbacks

InputsTargets = tuple[Tensor, Tensor]
GetBatch = Callable[[Any], InputsTargets]
SetBatch = Callable[[Any, Tensor, Tensor], Any]

PLAN_ATTRIBUTE = "_lightning_reg_mix_plan"  # where the current batch's plan is published

INPUT_KEYS = ("input", "inputs", "x", "image", "images", "img", "pixel_values", "features", "data")
TARGET_KEYS = ("target", "targets", "y", "label", "labels", "class", "cls")


class BatchAdapter:
    """Reads ``(inputs, targets)`` from a batch and builds a new batch with them replaced.

    Args:
        input_key: index (sequences) or key (mappings) of the inputs; by default index 0 or the
            first of :data:`INPUT_KEYS` present.
        target_key: the same for the targets; by default index 1 or the first of
            :data:`TARGET_KEYS` present.
        get_batch: a function ``batch -> (inputs, targets)`` for other layouts.
        set_batch: a function ``(batch, inputs, targets) -> new batch``; needed with ``get_batch``.

    Raises:
        ValueError: if only one of ``get_batch``/``set_batch`` is given.

    Example:
        >>> import torch
        >>> adapter = BatchAdapter()
        >>> batch = {"image": torch.zeros(2, 3), "label": torch.tensor([0, 1])}
        >>> new = adapter.replace(batch, torch.ones(2, 3), torch.ones(2, 4))
        >>> sorted(new), new["label"].shape, batch["label"].shape
        (['image', 'label'], torch.Size([2, 4]), torch.Size([2]))
    """

    def __init__(
        self,
        input_key: int | str | None = None,
        target_key: int | str | None = None,
        get_batch: GetBatch | None = None,
        set_batch: SetBatch | None = None,
    ) -> None:
        if (get_batch is None) != (set_batch is None):
            raise ValueError("Pass both `get_batch` and `set_batch`, or neither.")
        self.input_key, self.target_key = input_key, target_key
        self.get_batch, self.set_batch = get_batch, set_batch

    def split(self, batch: Any, keys: tuple[Any, Any] | None = None) -> InputsTargets:
        """The ``(inputs, targets)`` of ``batch`` (at ``keys``, from :meth:`keys`, if given)."""
        if self.get_batch is not None:
            return self.get_batch(batch)
        i, t = keys or self.keys(batch)
        return batch[i], batch[t]

    def replace(
        self, batch: Any, inputs: Tensor, targets: Tensor, keys: tuple[Any, Any] | None = None
    ) -> Any:
        """A new batch of the same type with ``inputs`` and ``targets`` replaced.

        The old batch is left as it was. ``keys`` (from :meth:`keys`) saves looking them up again.
        """
        if self.set_batch is not None:
            return self.set_batch(batch, inputs, targets)
        i, t = keys or self.keys(batch)
        if isinstance(batch, Mapping):
            new = dict(batch)
            new[i], new[t] = inputs, targets
            try:
                return type(batch)(new)  # type: ignore[call-arg]  # keep dict subclasses
            except TypeError:
                return new
        items = list(batch)
        items[int(i)], items[int(t)] = inputs, targets
        if isinstance(batch, tuple):
            fields = getattr(batch, "_fields", None)  # named tuple
            return type(batch)(*items) if fields is not None else tuple(items)
        return items

    def keys(self, batch: Any) -> tuple[Any, Any]:
        """The index or key of the inputs and of the targets in ``batch``.

        Raises:
            ValueError: if they cannot be found; the message names the options that fix it.
        """
        if isinstance(batch, Mapping):
            i = self.input_key if self.input_key is not None else _first(batch, INPUT_KEYS)
            t = self.target_key if self.target_key is not None else _first(batch, TARGET_KEYS)
            if i in batch and t in batch:
                return i, t
        elif isinstance(batch, Sequence) and not isinstance(batch, str):
            i = 0 if self.input_key is None else self.input_key
            t = 1 if self.target_key is None else self.target_key
            if isinstance(i, int) and isinstance(t, int) and max(i, t) < len(batch):
                return i, t
        raise ValueError(_layout_error(batch))


def _first(batch: Mapping[str, Any], names: Sequence[str]) -> str | None:
    return next((name for name in names if name in batch), None)


def _layout_error(batch: Any) -> str:
    if isinstance(batch, Mapping):
        what = f"a {type(batch).__name__} with keys {list(batch)}"
    elif isinstance(batch, Sequence):
        what = f"a {type(batch).__name__} of length {len(batch)}"
    else:
        what = f"a {type(batch).__name__}"
    return (
        f"Could not find inputs and targets in the training batch ({what}). Pass "
        "`input_key=` and `target_key=` (an index for lists/tuples, a key for dicts), or "
        "`get_batch=` and `set_batch=` functions for other layouts."
    )


class TrainBatchTransform(Callback):
    """Base class: transforms training batches in ``on_after_batch_transfer`` during ``fit``."""

    def __init__(self, adapter: BatchAdapter) -> None:
        self.adapter = adapter
        self._wrapped: list[Any] = []
        self._module: pl.LightningModule | None = None

    def transform(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Tensor, targets: Tensor
    ) -> InputsTargets:
        """Return the new ``(inputs, targets)`` of a training batch."""
        raise NotImplementedError

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        transforms = [
            cb for cb in trainer_callbacks(trainer) if isinstance(cb, TrainBatchTransform)
        ]
        if len(transforms) > 1:
            names = ", ".join(type(cb).__name__ for cb in transforms)
            raise RuntimeError(
                f"Several training-batch transforms are attached ({names}); their targets would "
                "be transformed twice. Use one: Mixup takes `label_smoothing=` itself."
            )
        self._module = pl_module
        datamodule = getattr(trainer, "datamodule", None)
        # Lightning calls the DataModule's hook instead of the module's when it overrides it
        hosts = [pl_module] if datamodule is None else [pl_module, datamodule]
        for host in hosts:
            hook = host.__dict__.get("on_after_batch_transfer")
            if isinstance(hook, _TransformingHook):  # left by a fit that raised: unwrap it
                del host.on_after_batch_transfer
            host.on_after_batch_transfer = _TransformingHook(  # type: ignore[method-assign]
                host.on_after_batch_transfer, self, trainer, pl_module
            )
            self._wrapped.append(host)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._unwrap()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._unwrap()  # Lightning does not call `teardown` after an exception

    def _unwrap(self) -> None:
        """Take the hook wrappers off and withdraw the last published plan."""
        for host in self._wrapped:
            if isinstance(host.__dict__.get("on_after_batch_transfer"), _TransformingHook):
                del host.on_after_batch_transfer
        self._wrapped = []
        if self._module is not None:
            self._module.__dict__.pop(PLAN_ATTRIBUTE, None)
            self._module = None


class _TransformingHook:
    """Calls the user's ``on_after_batch_transfer``, then transforms training batches."""

    def __init__(
        self,
        original: Callable[[Any, int], Any],
        callback: TrainBatchTransform,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
    ) -> None:
        self.original, self.callback = original, callback
        self.trainer, self.pl_module = trainer, pl_module
        self.__wrapped__ = original  # Lightning's `is_overridden` looks through wrappers

    def __call__(self, batch: Any, dataloader_idx: int = 0) -> Any:
        batch = self.original(batch, dataloader_idx)
        trainer = self.trainer
        if not trainer.training:  # validation, sanity checking, test, predict
            return batch
        adapter = self.callback.adapter
        keys = None if adapter.get_batch is not None else adapter.keys(batch)  # looked up once
        inputs, targets = adapter.split(batch, keys)
        inputs, targets = self.callback.transform(trainer, self.pl_module, inputs, targets)
        return adapter.replace(batch, inputs, targets, keys)
