"""Stochastic depth (drop path) as a callback: scheduled per-block rates, no model edits.

Method card:
    What it does: during training, each residual block's branch is skipped for a random subset of
    the samples (its output zeroed, the survivors scaled by ``1/(1-p)``), so the network trains as
    an ensemble of shallower ones; the rate rises linearly with depth (block ``l`` of ``L`` gets
    ``rate * l / L``). Inference is the full network, unchanged.
    Suggested values: ``rate=0.1`` for ResNet-18/50-sized models and small ViTs, ``0.2``-``0.5``
    for deep ones (Huang et al. use 0.5 for the last block of a 110-layer ResNet; timm's DeiT-S
    recipe 0.1, ViT-B 0.1-0.2). ``start_epoch``/``warmup_epochs`` to let a model fit first.
    When it hurts: shallow or under-fitting models (it removes capacity during training), very
    short runs, and tiny batches with BatchNorm in the branch (dropped samples still update the
    running statistics). On torchvision ResNets the dropped samples' branches are not
    computed (a step costs about ``1 - mean rate x branch share`` of the bare model's, when
    activations dominate it); timm's ``DropPath`` and ``blocks=`` multiply by a mask instead,
    computing every branch (a step costs about as much as without the callback).
    Papers: Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016 (arXiv:1603.09382);
    Larsson et al., "FractalNet", ICLR 2017 (drop path); Touvron et al., DeiT, ICML 2021.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_reg.drop_path import (
    BlockSelector,
    BranchDrop,
    BranchSkip,
    DropPathModule,
    RandomSource,
    depth_rates,
    drop_path_blocks,
    find_drop_path_modules,
    find_residual_branches,
    scheduled_rate,
    step_seed,
    torchvision_branch,
)

__all__ = ["StochasticDepth"]


class StochasticDepth(Callback):
    """Stochastic depth on the user's own model: timm drop-path rates or hooks on ResNet branches.

    At fit start the callback looks, in this order, for:

    1. ``blocks`` given: the chosen modules, whose output is a residual branch (before it is added
       to the shortcut); a forward hook drops that output.
    2. drop-path modules (timm's ``DropPath``, ``drop_prob``; torchvision's ``StochasticDepth``,
       ``p``): their rates are set each epoch, and the original values put back at fit end and
       when fit raises. timm's modules draw from torch's global generator (reproducible under
       ``seed_everything``, but the same draws on every rank whose batches have the same shape,
       and not restored on resume: only the rates are).
    3. torchvision ResNet blocks (``BasicBlock``/``Bottleneck``, recognised by class name and
       package): the branch runs on the kept samples only (``lightning_reg.drop_path.BranchSkip``).
       A forward pre-hook on ``conv1`` (whose input is the block input) passes it
       the kept rows; a forward hook on ``bn2``/``bn3`` scatters their output, scaled by
       ``1/(1-p)``, into zeros of the full batch, which the block adds to its shortcut (computed
       from every row) as usual. Dropped samples cost no branch compute, forward or backward.
       BatchNorm inside the branch computes its batch statistics, and updates its running
       statistics, over the kept samples only (those that use the branch). When fewer than 2
       samples are kept, that block falls back to multiplying its full branch output by the
       mask for that step. A block run twice in one step (gradient checkpointing, SAM's second
       pass) drops the same samples again.

    Hooks act only while the module trains and are removed at fit end and when fit raises, so
    inference, parameters, buffers and ``state_dict`` keys are those of the unmodified model, and
    checkpoints load into it. Their masks come from a per-device generator reseeded every step
    from the run's seed (``seed_everything``), the global rank, the global step and the batch
    index: reproducible, distinct per rank, bitwise on resume, without host-device sync.

    The rate in force at epoch ``e`` is :func:`~lightning_reg.drop_path.scheduled_rate` (0 before
    ``start_epoch``, then a linear warm-up to ``rate`` over ``warmup_epochs``), given to the
    deepest block; block ``l`` of ``L`` gets ``rate_e * l / L``. It depends on the epoch only.

    Args:
        rate: the final (deepest) block's drop rate, in ``(0, 1)``. Overrides the model's own
            ``drop_path_rate`` during fit.
        start_epoch: epochs trained without drop before the warm-up begins.
        warmup_epochs: epochs of linear warm-up from 0 to ``rate`` (0: ``rate`` at once).
        blocks: module-name patterns (``fnmatch``: ``"layer*.*.bn2"``) or a ``(name, module) ->
            bool`` callable choosing the modules whose output is a residual branch, for models
            the callback does not recognise.
        seed: seed of the hooks' masks; default the seed of ``seed_everything``.

    Raises:
        ValueError: for ``rate`` outside ``(0, 1)``, negative epochs or empty ``blocks``.
        RuntimeError: at fit start, when nothing can carry the drop: a timm model built with
            ``drop_path_rate=0`` (no ``DropPath`` modules), an unknown architecture, or
            ``blocks`` matching no module.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> callback = StochasticDepth(rate=0.1, start_epoch=2, warmup_epochs=5)
        >>> trainer = Trainer(callbacks=[callback], logger=False)

    Logged metrics:
        - ``reg/stochastic_depth/rate``: the deepest block's rate in force, at each epoch's end.
    """

    def __init__(
        self,
        rate: float = 0.1,
        start_epoch: int = 0,
        warmup_epochs: int = 0,
        blocks: Sequence[str] | BlockSelector | None = None,
        seed: int | None = None,
    ) -> None:
        if not 0.0 < rate < 1.0:
            raise ValueError(
                f"`rate` is the deepest block's drop probability and must be in (0, 1), got "
                f"{rate!r}. Typical values are 0.1-0.5."
            )
        for name, value in (("start_epoch", start_epoch), ("warmup_epochs", warmup_epochs)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
        if isinstance(blocks, str):
            blocks = [blocks]
        if blocks is not None and not callable(blocks):
            blocks = list(blocks)
            if not blocks or not all(isinstance(p, str) for p in blocks):
                raise ValueError(
                    "`blocks` must be a non-empty list of module-name patterns (e.g. "
                    f'["layer*.*.bn2"]) or a (name, module) -> bool callable, got {blocks!r}.'
                )
        self.rate, self.start_epoch, self.warmup_epochs = rate, start_epoch, warmup_epochs
        self.blocks, self.seed = blocks, seed
        self._state_key = self._generate_state_key(
            rate=rate, start_epoch=start_epoch, warmup_epochs=warmup_epochs
        )
        self._source = RandomSource()
        self._run_seed = 0
        self._modules: list[tuple[DropPathModule, int]] = []  # (module, 1-based depth)
        self._originals: list[float] = []
        self._hooks: list[BranchDrop | BranchSkip] = []
        self._handles: list[RemovableHandle] = []
        self._depth = 0
        self._current = 0.0

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    def regularization_settings(self) -> dict[str, Any]:
        """This callback's settings, for the TensorBoard hparams view."""
        return {
            "StochasticDepth/rate": self.rate,
            "StochasticDepth/start_epoch": self.start_epoch,
            "StochasticDepth/warmup_epochs": self.warmup_epochs,
        }

    def rate_at(self, epoch: int) -> float:
        """The deepest block's rate at ``epoch``."""
        return scheduled_rate(epoch, self.rate, self.start_epoch, self.warmup_epochs)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._undo()  # a previous fit that ended without our hooks running leaves nothing behind
        seed = self.seed
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
        self._run_seed, self._current = seed, 0.0
        self._source.active = False
        if self.blocks is None and find_drop_path_modules(pl_module):
            self._attach_drop_path_modules(pl_module)
        else:
            self._attach_hooks(pl_module)

    def _attach_drop_path_modules(self, model: nn.Module) -> None:
        blocks = drop_path_blocks(model)
        depth = {name: index + 1 for index, name in enumerate(blocks)}
        self._depth = len(blocks)
        self._modules = [(found, depth[found.block]) for found in find_drop_path_modules(model)]
        self._originals = [found.rate for found, _ in self._modules]

    def _attach_hooks(self, model: nn.Module) -> None:
        if self.blocks is None:
            self._attach_skips(model)
            if self._hooks:
                return
        branches = find_residual_branches(model, self.blocks)
        if not branches:
            raise RuntimeError(_nothing_to_drop(model, self.blocks))
        self._depth = len(branches)
        for index, (_, module) in enumerate(branches):
            hook = BranchDrop(self._source, index=index)
            self._hooks.append(hook)
            self._handles.append(module.register_forward_hook(hook))

    def _attach_skips(self, model: nn.Module) -> None:
        # torchvision blocks: the branch runs on the kept rows only (pre-hook on conv1, hook on
        # bn2/bn3), so dropped samples cost no branch compute
        for module in model.modules():
            branch = torchvision_branch(module)
            if branch is None:
                continue
            first, last = branch
            skip = BranchSkip(self._source, index=len(self._hooks))
            self._hooks.append(skip)
            self._handles.append(first.register_forward_pre_hook(skip.before))
            self._handles.append(last.register_forward_hook(skip.after))
        self._depth = len(self._hooks)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current = self.rate_at(trainer.current_epoch)
        rates = depth_rates(self._current, self._depth)
        for found, depth in self._modules:
            found.set_rate(rates[depth - 1])
        for hook, rate in zip(self._hooks, rates if self._hooks else [], strict=True):
            hook.rate = rate

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._hooks:
            rank, step = trainer.global_rank, trainer.global_step
            self._source.reseed(step_seed(self._run_seed, rank, step, batch_idx))
            # the model's mode decides, not the hooked module's (a frozen BatchNorm in eval mode
            # hooked by `blocks=` would otherwise never drop)
            self._source.active = pl_module.training

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        self._source.active = False  # evaluation passes between batches never drop

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("reg/stochastic_depth/rate", self._current, on_step=False, on_epoch=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._undo()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._undo()

    def _undo(self) -> None:
        for handle in self._handles:
            handle.remove()
        for (found, _), original in zip(self._modules, self._originals, strict=True):
            found.set_rate(original)
        self._modules, self._originals, self._hooks, self._handles = [], [], [], []
        self._depth = 0

    def __getstate__(self) -> dict[str, Any]:
        # a pickled callback carries its settings, not the model it was attached to
        state = self.__dict__.copy()
        state.update(_modules=[], _originals=[], _hooks=[], _handles=[], _depth=0)
        return state


def _nothing_to_drop(model: nn.Module, blocks: Sequence[str] | BlockSelector | None) -> str:
    names = [name for name, _ in model.named_modules() if name][:12]
    if blocks is not None:
        return (
            f"StochasticDepth: `blocks={blocks!r}` matches no module of "
            f"{type(model).__name__}. Patterns are matched (fnmatch) against module names such "
            f"as {names}; choose the modules whose output is a residual branch (before the "
            "shortcut is added), e.g. `blocks=['layer*.*.bn2']`."
        )
    timm_slots = drop_path_blocks(model)
    if timm_slots or any(type(m).__module__.startswith("timm.") for m in model.modules()):
        return (
            f"StochasticDepth: {type(model).__name__} has no DropPath module: timm builds "
            "`nn.Identity` (or nothing) in their place when the model is created with "
            "`drop_path_rate=0`. Create it with `drop_path_rate>0`, e.g. "
            "`timm.create_model(..., drop_path_rate=0.1)`; the callback's `rate` overrides that "
            "value during fit and puts it back afterwards."
        )
    return (
        f"StochasticDepth found nothing to drop in {type(model).__name__}: it looks for drop-path "
        "modules (timm's `DropPath`, torchvision's `StochasticDepth`) and torchvision ResNet "
        "blocks (`BasicBlock`, `Bottleneck`). Point it at your residual blocks with `blocks=`: "
        "module-name patterns or a `(name, module) -> bool` callable choosing the modules whose "
        f"output is the residual branch (before the shortcut is added). Module names: {names}."
    )
