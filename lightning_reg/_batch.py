"""Find inputs and targets in a batch, change them in place, and transform training batches only.

A training batch is transformed in the callback hook ``on_train_batch_start``: Lightning calls it
after the batch is on the device and after the module's (or DataModule's)
``on_after_batch_transfer``, and passes the same object on to ``training_step`` and
``on_train_batch_end``. The batch is therefore changed in place: the inputs and targets entries
of a list or dict are replaced (the targets change shape, ``(N,)`` to ``(N, C)``, so the entry
is replaced rather than the tensor written over). A tuple or another immutable batch is refused
with an error naming the fix. Validation, test and predict batches never reach this hook.
Nothing is set on the user's module or datamodule: the current plan stays on the callback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, MutableSequence, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_reg._utils import trainer_callbacks
from lightning_reg.mixing import MixPlan

__all__ = ["BatchAdapter", "TrainBatchTransform"]

InputsTargets = tuple[Tensor, Tensor]
GetBatch = Callable[[Any], InputsTargets]
SetBatch = Callable[[Any, Tensor, Tensor], None]

INPUT_KEYS = ("input", "inputs", "x", "image", "images", "img", "pixel_values", "features", "data")
TARGET_KEYS = ("target", "targets", "y", "label", "labels", "class", "cls")


class BatchAdapter:
    """Reads ``(inputs, targets)`` from a batch and puts new ones back in the same batch object.

    Args:
        input_key: index (lists) or key (dicts) of the inputs; by default index 0 or the first
            of ``INPUT_KEYS`` present (``"input"``, ``"x"``, ``"image"``, ``"pixel_values"``...).
        target_key: the same for the targets; by default index 1 or the first of
            ``TARGET_KEYS`` present (``"target"``, ``"y"``, ``"label"``, ``"labels"``...).
        get_batch: a function ``batch -> (inputs, targets)`` for other layouts.
        set_batch: a function ``(batch, inputs, targets) -> None`` that changes ``batch`` in
            place (Lightning hands that same object to ``training_step``); needed with
            ``get_batch``. Returning the batch itself is accepted; returning a new batch is not.

    Raises:
        ValueError: if only one of ``get_batch``/``set_batch`` is given.

    Example:
        >>> import torch
        >>> adapter = BatchAdapter()
        >>> batch = {"pixel_values": torch.zeros(2, 3), "labels": torch.tensor([0, 1])}
        >>> adapter.put(batch, torch.ones(2, 3), torch.ones(2, 4))
        >>> sorted(batch), batch["labels"].shape
        (['labels', 'pixel_values'], torch.Size([2, 4]))
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

    def put(
        self, batch: Any, inputs: Tensor, targets: Tensor, keys: tuple[Any, Any] | None = None
    ) -> None:
        """Replace the inputs and targets entries of ``batch`` in place.

        Raises:
            TypeError: if ``batch`` cannot be changed in place (a tuple, a named tuple, another
                immutable object) or ``set_batch`` returned a new batch.
        """
        if self.set_batch is not None:
            returned = self.set_batch(batch, inputs, targets)
            if returned is not None and returned is not batch:
                raise TypeError(_new_batch_error(type(returned).__name__))
            return
        if not isinstance(batch, MutableMapping | MutableSequence):
            raise TypeError(_immutable_error(batch))
        i, t = keys or self.keys(batch)
        batch[i], batch[t] = inputs, targets

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


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {list(batch)}"
    if isinstance(batch, Sequence):
        return f"a {type(batch).__name__} of length {len(batch)}"
    return f"a {type(batch).__name__}"


def _layout_error(batch: Any) -> str:
    return (
        f"Could not find inputs and targets in the training batch ({_describe(batch)}). Pass "
        "`input_key=` and `target_key=` (an index for lists, a key for dicts), or "
        "`get_batch=` and `set_batch=` functions for other layouts."
    )


_IN_PLACE = (
    "The training batch is changed in place in `on_train_batch_start`, because Lightning hands "
    "that same object on to `training_step`."
)


def _immutable_error(batch: Any) -> str:
    return (
        f"{_IN_PLACE} This batch is {_describe(batch)}, which cannot be changed in place. Return "
        "a list or a dict from the DataLoader's `collate_fn` (torch's default collate already "
        "turns a tuple of samples into a list), or pass `get_batch=` and `set_batch=`, where "
        "`set_batch(batch, inputs, targets)` changes the batch in place."
    )


def _new_batch_error(kind: str) -> str:
    return (
        f"`set_batch` returned a new batch (a {kind}). {_IN_PLACE} `set_batch(batch, inputs, "
        "targets)` must change `batch` in place and return None: e.g. `batch['x'], batch['y'] "
        "= inputs, targets`."
    )


class TrainBatchTransform(Callback):
    """Base class: transforms each training batch, in place, in ``on_train_batch_start``.

    Subclasses implement :meth:`transform` and may set ``self._plan`` for
    ``RegularizedModule.cross_entropy`` (read through :attr:`current_plan`); they reset their
    run state in :meth:`reset`, called at the start of every fit.
    """

    num_classes: int | None

    def __init__(self, adapter: BatchAdapter) -> None:
        self.adapter = adapter
        self._plan: MixPlan | None = None
        self._columns: int | None = None  # columns of the soft targets of the last batch
        self._labels = False  # whether the last batch's targets were class indices

    @property
    def current_plan(self) -> MixPlan | None:
        """The plan of the training batch being trained on; ``None`` between epochs and fits."""
        return self._plan

    def transform(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Tensor, targets: Tensor
    ) -> InputsTargets:
        """Return the new ``(inputs, targets)`` of a training batch."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the previous fit.

        Called in ``setup(stage="fit")``, before a resumed fit loads its checkpoint state.
        """
        self._plan, self._columns, self._labels = None, None, False

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
        self.reset()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        adapter = self.adapter
        keys = None if adapter.get_batch is not None else adapter.keys(batch)  # looked up once
        inputs, targets = adapter.split(batch, keys)
        self._check(inputs, targets)
        new_inputs, new_targets = self.transform(trainer, pl_module, inputs, targets)
        if new_inputs is not inputs or new_targets is not targets:
            adapter.put(batch, new_inputs, new_targets, keys)

    def _check(self, inputs: Tensor, targets: Tensor) -> None:
        """Refuse targets that cannot become probability rows (shapes and dtypes only: no sync)."""
        name, classes = type(self).__name__, self.num_classes
        labels = not targets.is_floating_point()
        if labels:
            if classes is None:
                raise ValueError(
                    f"{name} got integer class targets but no `num_classes`; it needs it to "
                    f"turn them into probability rows: pass `{name}(..., num_classes=C)`."
                )
            columns: int | None = classes
        else:
            columns = targets.shape[-1] if targets.ndim == 2 else None
            if classes is not None and columns is not None and columns != classes:
                raise ValueError(
                    f"{name} got soft targets with {columns} columns but num_classes={classes}. "
                    "Set `num_classes=` to the number of classes of your data and model."
                )
        if targets.ndim == 0 or targets.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"{name} got {tuple(inputs.shape)} inputs and {tuple(targets.shape)} targets; "
                "it needs one target per sample. Check `input_key=`/`target_key=`."
            )
        self._columns, self._labels = columns, labels

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._plan = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit":
            self._plan = None

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._plan = None  # Lightning does not call `teardown` after an exception
        note = self._explain(exception)
        if note is not None:
            if hasattr(exception, "add_note"):  # Python >= 3.11
                exception.add_note(note)
            else:
                rank_zero_warn(note)

    def _explain(self, exception: BaseException) -> str | None:
        """What our soft targets have to do with ``exception``, when it looks like their doing.

        The logits are never seen here (comparing them per step would cost a hook on the model),
        so a mismatch between ``num_classes`` and the model surfaces in the user's loss; this
        names the likely cause after the fact, at no cost per step.
        """
        columns = self._columns
        if columns is None or not isinstance(exception, RuntimeError | ValueError | IndexError):
            return None
        message, name = str(exception), type(self).__name__
        width = _WIDTH_MESSAGES if str(columns) in message else ()  # sizes that name our width
        if any(part in message for part in (*_SHAPE_MESSAGES, *width)):
            return (
                f"lightning-reg: {name} replaced the training targets with probability rows of "
                f"shape (N, {columns}) (num_classes={columns}). If the model outputs another "
                "number of classes, set `num_classes=` to it; if the loss needs class indices, "
                "pass `keep_targets=True` and use `RegularizedModule.cross_entropy`."
            )
        if self._labels and _DEVICE_ASSERT in message:
            return (
                f"lightning-reg: {name} turns class indices into rows of num_classes={columns} "
                f"columns on the device, where a label outside [0, {columns}) trips a "
                "device-side assert (the range is not checked on the host, which would "
                "synchronise). If that is the cause, set `num_classes=` to the number of classes "
                "of your data and model (run on CPU to get the failing label named)."
            )
        return None


# what F.cross_entropy / nn.CrossEntropyLoss say when given probability rows of the wrong width
_SHAPE_MESSAGES = ("multi-target not supported",)
# what other losses say about a width mismatch (only used when the message names our width)
_WIDTH_MESSAGES = ("target size", "different to the input size", "must match the size")
# what an out-of-range class index gives on CUDA, at the next synchronisation
_DEVICE_ASSERT = "device-side assert"
