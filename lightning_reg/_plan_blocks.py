"""Where ``Mixup`` gets its plans: blocks of batch positions drawn from seeded generators.

Pure NumPy/torch (no Lightning here); :class:`~lightning_reg.Mixup` keeps one :class:`PlanSource`
and resets it at the start of every fit.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from lightning_reg.mixing import MixPlan, _mixup_every_batch, draw_mix_plan, smoothed_rows


class MixSettings(Protocol):
    """What a plan source reads from its owner (``Mixup``) when it makes a block."""

    options: dict[str, Any]
    num_classes: int | None
    label_smoothing: float


BLOCK_BATCHES = 64
"""Consecutive batch positions whose plans are drawn from one generator (and, in the common
case, in one go)."""
_BLOCK_ELEMENTS = 1 << 18  # at most this many permutation entries per block


class _Block:
    """The plans of one block of batch positions: its generator, settings and what was drawn."""

    def __init__(self, rng: np.random.Generator, num_classes: int | None, smoothing: float) -> None:
        self.rng = rng
        self.num_classes, self.smoothing = num_classes, smoothing
        self.drawn = 0  # plans drawn one by one so far
        self.perms: np.ndarray | None = None  # whole-block draws: (rows, n) permutations
        self.lams: list[np.ndarray] = []
        self.no_cut = np.zeros(0, dtype=bool)
        self.device: torch.device | None = None  # where partners and class_rows are
        self.partners: list[Tensor] = []
        self.class_rows: Tensor | None = None


class PlanSource:
    """One rank's plans, each a function of its epoch key, position in the epoch and batch size.

    Positions are grouped in blocks of ``BLOCK_BATCHES``; each block has its own generator,
    seeded from ``(seed, rank, epoch, block, batch size)``. A resumed run therefore draws the
    plans of an uninterrupted one without replaying the epoch, and a short last batch does not
    shift the draws of the others. In the common case (batch mode, mixup only, every batch mixed)
    a block's coefficients and permutations are drawn in two NumPy calls and its permutations
    reach the device in one copy, so a batch costs a few list look-ups; otherwise the block's
    plans are drawn one by one with :func:`draw_mix_plan`. The last few blocks are kept, so
    batches of alternating sizes do not redraw them. The callback's settings are read when a
    block is made, so changing them (``mix.num_classes = ...``) takes effect at the next block.
    """

    def __init__(self, owner: MixSettings) -> None:
        self.owner = owner
        self._whole: bool | None = None  # whether whole blocks are drawn (set at first use)
        self._blocks: OrderedDict[tuple[Any, ...], _Block] = OrderedDict()
        self._rows_key: tuple[Any, ...] | None = None
        self._rows: Tensor | None = None

    def clear(self) -> None:
        """Drop the kept blocks and tables (device tensors included)."""
        self._whole = None
        self._blocks.clear()
        self._rows_key, self._rows = None, None

    def __getstate__(self) -> dict[str, Any]:
        return {"owner": self.owner}  # kept blocks and device tensors stay behind

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["owner"])  # type: ignore[misc]

    def plan(
        self,
        epoch_key: tuple[int, int, int],
        position: int,
        n: int,
        image_size: tuple[int, int] | None,
        device: torch.device,
    ) -> MixPlan:
        """The plan of the batch at ``position`` in the epoch, ``n`` samples, on ``device``."""
        whole = self._whole
        if whole is None:
            options = self.owner.options
            whole = self._whole = _mixup_every_batch(
                options["mode"], options["prob"], options["cutmix_alpha"], options["cutmix_minmax"]
            )
        rows = max(1, min(BLOCK_BATCHES, _BLOCK_ELEMENTS // max(n, 1)))
        index, row = divmod(position, rows)
        key = (*epoch_key, index, n, None if whole else image_size)
        block = self._blocks.get(key)
        if block is None or (not whole and row < block.drawn):  # new, or going back: afresh
            block = self._blocks[key] = _Block(
                np.random.default_rng([*epoch_key, index, n]),
                self.owner.num_classes, self.owner.label_smoothing,
            )  # fmt: skip
            if whole:
                self._draw_block(block, rows, n)
            while len(self._blocks) > _KEPT_BLOCKS:
                self._blocks.popitem(last=False)
        if device != block.device:
            self._place(block, device)
        if whole:
            return MixPlan(
                perm=block.perms[row], lam=block.lams[row], boxes=None,  # type: ignore[index]
                cut=block.no_cut, shared=True, num_classes=block.num_classes,
                smoothing=block.smoothing, partners=block.partners[row],
                class_rows=block.class_rows,
            )  # fmt: skip
        for _ in range(block.drawn, row):  # replay the block's earlier draws after a resume
            self._draw(block, n, image_size)
        block.drawn = row + 1
        plan = self._draw(block, n, image_size)
        plan.class_rows = block.class_rows
        return plan

    def _draw(self, block: _Block, n: int, image_size: tuple[int, int] | None) -> MixPlan:
        return draw_mix_plan(
            n, block.rng, image_size=image_size, num_classes=block.num_classes,
            smoothing=block.smoothing, **self.owner.options,
        )  # fmt: skip

    def _draw_block(self, block: _Block, rows: int, n: int) -> None:
        alpha = self.owner.options["mixup_alpha"]
        lam = block.rng.beta(alpha, alpha, rows).astype(np.float32)
        block.perms = np.tile(np.arange(n), (rows, 1))
        block.rng.permuted(block.perms, axis=1, out=block.perms)
        block.lams = list(np.repeat(lam[:, None], n, axis=1))
        block.no_cut = np.zeros(n, dtype=bool)

    def _place(self, block: _Block, device: torch.device) -> None:
        """Put the block's partners and class table on ``device`` (pinned, non-blocking on CUDA)."""
        if block.perms is not None:
            perms = torch.from_numpy(block.perms)
            if device.type == "cuda":
                perms = perms.pin_memory()
            block.partners = list(perms.to(device, non_blocking=True).unbind(0))
        block.class_rows = self._class_rows(block.num_classes, block.smoothing, device)
        block.device = device

    def _class_rows(
        self, classes: int | None, smoothing: float, device: torch.device
    ) -> Tensor | None:
        """A table of smoothed one-hot rows on ``device`` (the last one made is kept)."""
        if classes is None or classes > _TABLE_CLASSES:
            return None
        key = (classes, smoothing, device, torch.get_default_dtype())
        if key != self._rows_key:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None  # a table made now would live in the graph's private pool
            self._rows_key, self._rows = key, smoothed_rows(classes, smoothing, device)
        return self._rows


_KEPT_BLOCKS = 4  # blocks kept per callback (batches of alternating sizes use two)
_TABLE_CLASSES = 1024  # a table of smoothed rows holds at most 1024 x 1024 values
