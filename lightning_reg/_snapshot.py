"""Copy a module's local state (parameters and persistent buffers) aside and put it back.

One snapshot is kept and overwritten in place: after the first capture, a capture allocates nothing
and is one ``copy_`` per tensor. Only each rank's *local* tensors are copied (``DTensor`` shards are
copied through their local tensor), so no collective is needed and the snapshot scales with
1/world size under sharded strategies.

Where the copy lives:

- ``"cpu"`` (default): host memory. From a CUDA model the copy goes to pinned memory with
  ``non_blocking=True`` and a CUDA event marks its completion, so capturing does not stall the host;
  the event is waited on only before the host reads the copy (checkpointing, writing to disk).
- ``"device"``: a second copy on the model's device (fastest, costs device memory).
- ``"disk"``: a file per rank in a directory (no extra memory; slowest).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

SnapshotLocation = Literal["cpu", "device", "disk"]
SNAPSHOT_LOCATIONS: tuple[str, ...] = ("cpu", "device", "disk")


def _local(tensor: Tensor) -> Tensor:
    """The rank-local tensor behind ``tensor``: a DTensor's shard, or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def module_state(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, local tensor)`` for every parameter and persistent buffer of ``module``.

    Tied parameters appear once. Non-persistent buffers are skipped: they are derived state that
    ``state_dict`` leaves out too. Tensors are the live ones (not detached): copy them under
    ``torch.no_grad()``.
    """
    for name, p in module.named_parameters():
        yield name, _local(p)
    for mod_name, mod in module.named_modules():
        non_persistent: set[str] = getattr(mod, "_non_persistent_buffers_set", set())
        for name, buf in mod._buffers.items():
            if buf is not None and name not in non_persistent:
                yield (f"{mod_name}.{name}" if mod_name else name), _local(buf)


class StateSnapshot:
    """A single, reusable copy of a module's local parameters and persistent buffers.

    Args:
        location: ``"cpu"``, ``"device"`` or ``"disk"`` (see the module docstring).
        path: the file that holds the copy when ``location="disk"``.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> snapshot = StateSnapshot("cpu")
        >>> snapshot.capture(net)
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> snapshot.restore(net)
        >>> torch.equal(net.weight, snapshot.state_dict()["weight"])
        True
    """

    def __init__(self, location: SnapshotLocation = "cpu", path: str | os.PathLike | None = None):
        if location not in SNAPSHOT_LOCATIONS:
            raise ValueError(
                f"Unknown snapshot location {location!r}; "
                f"use one of {', '.join(SNAPSHOT_LOCATIONS)}."
            )
        if location == "disk" and path is None:
            raise ValueError("A snapshot on disk needs a file path: pass `path=...`.")
        self.location = location
        self.path = Path(path) if path is not None else None
        self._tensors: dict[str, Tensor] = {}
        self._names: tuple[str, ...] = ()
        self._targets: list[Tensor] = []
        self._pending: torch.cuda.Event | None = None
        self._on_disk = False

    @property
    def empty(self) -> bool:
        """Whether nothing has been captured (or loaded) yet."""
        return not (self._tensors or self._on_disk)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by the copy (0 for a copy on disk)."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def capture(self, module: nn.Module) -> None:
        """Overwrite the snapshot with the current local state of ``module``."""
        if self.location == "disk":
            self._capture_to_disk(module)
            return
        names, sources = _unzip(module_state(module))
        if names != self._names or not all(map(self._fits, self._targets, sources)):
            self._tensors = dict(zip(names, map(self._allocate, sources), strict=True))
            self._names, self._targets = names, list(self._tensors.values())
        uses_cuda = any(src.is_cuda for src in sources)
        with torch.no_grad():
            # one fused call: per-tensor Python overhead matters for models with many small tensors
            torch._foreach_copy_(self._targets, sources, non_blocking=uses_cuda)
        if uses_cuda and self.location == "cpu":
            self._pending = torch.cuda.Event()
            self._pending.record()

    def _fits(self, dst: Tensor, src: Tensor) -> bool:
        same_place = self.location != "device" or dst.device == src.device
        return dst.shape == src.shape and dst.dtype == src.dtype and same_place

    def _allocate(self, src: Tensor) -> Tensor:
        if self.location == "device":
            return torch.empty_like(src, memory_format=torch.preserve_format)
        return torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)

    def _capture_to_disk(self, module: nn.Module) -> None:
        assert self.path is not None
        # torch.save writes synchronously, so CPU tensors need no intermediate copy
        state = {name: t.detach().cpu() for name, t in module_state(module)}
        self._write(state)

    def _write(self, state: dict[str, Tensor]) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)  # atomic: a crash mid-write never leaves a torn snapshot
        self._on_disk = True

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.synchronize()
            self._pending = None

    def restore(self, module: nn.Module) -> None:
        """Copy the snapshot back into ``module``'s parameters and buffers, in place.

        Raises:
            RuntimeError: if nothing was captured, or the module's tensors no longer match the copy.
        """
        if self.empty:
            raise RuntimeError("Nothing to restore: the snapshot is empty.")
        saved = self._read()
        current = dict(module_state(module))
        missing, unexpected = saved.keys() - current.keys(), current.keys() - saved.keys()
        if missing or unexpected:
            raise RuntimeError(
                "The module's tensors changed since the snapshot was taken "
                f"(missing in the module: {sorted(missing)[:5]}, new in the module: "
                f"{sorted(unexpected)[:5]}). Restore the same architecture it was captured from."
            )
        with torch.no_grad():
            for name, dst in current.items():
                src = saved[name]
                if src.shape != dst.shape:
                    raise RuntimeError(
                        f"Tensor {name!r} has shape {tuple(dst.shape)} but the snapshot holds "
                        f"{tuple(src.shape)}; was the model resized after the snapshot?"
                    )
                dst.copy_(src, non_blocking=src.is_pinned())

    def _read(self) -> dict[str, Tensor]:
        if self.location == "disk":
            assert self.path is not None
            return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        return self._tensors

    def state_dict(self) -> dict[str, Tensor]:
        """The copy as CPU tensors, for a checkpoint (``torch.load(weights_only=True)`` safe)."""
        if self.empty:
            return {}
        self._wait()
        return {name: t.cpu() for name, t in self._read().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace the copy with ``state`` (tensors from :meth:`state_dict`)."""
        self._wait()
        if self.location == "disk":
            if state:
                self._write(dict(state))
            return
        # Kept where they are; the next capture reallocates on the right device if needed.
        self._tensors = {name: t.detach().clone() for name, t in state.items()}
        self._names, self._targets = (), []

    def clear(self) -> None:
        """Drop the copy (and its file)."""
        self._wait()
        self._tensors, self._names, self._targets = {}, (), []
        if self._on_disk and self.path is not None:
            self.path.unlink(missing_ok=True)
        self._on_disk = False


def _unzip(pairs: Iterator[tuple[str, Tensor]]) -> tuple[tuple[str, ...], list[Tensor]]:
    names: list[str] = []
    tensors: list[Tensor] = []
    for name, tensor in pairs:
        names.append(name)
        tensors.append(tensor)
    return tuple(names), tensors
