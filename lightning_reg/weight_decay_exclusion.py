"""``WeightDecayExclusion``: the decay/no-decay split applied to the optimizers Lightning builds.

The rules and the split are pure functions in :mod:`lightning_reg.weight_decay`; this module only
handles Lightning's lifecycle. The split happens at fit start on ``trainer.optimizers`` (after
``configure_optimizers``, before optimizer state is restored from a checkpoint); the no-decay parts
are appended after your groups, and follow their source group's hyperparameters at every optimizer
step, whatever the scheduler (torch, timm, your own): the callback copies them over right before
each step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_reg._lightning import is_lightning_class
from lightning_reg._optim import (
    SOURCE_KEY,
    GroupLink,
    extend_scheduler,
    follow_sources,
    group_layout,
    is_decayed,
    link_groups,
    saved_group_layouts,
    split_groups,
    split_preview,
)
from lightning_reg._utils import trainer_callbacks
from lightning_reg.weight_decay import (
    WeightDecaySplit,
    coupled_weight_decay_warning,
    split_parameters,
)

__all__ = ["WeightDecayExclusion"]


class WeightDecayExclusion(Callback):
    """Apply the decay/no-decay split to the optimizers your ``configure_optimizers`` builds.

    Your ``configure_optimizers`` stays as it is (for example ``AdamW(self.parameters(),
    weight_decay=0.05)``). At fit start, every param group with a non-zero ``weight_decay`` is
    split in two: the parameters that should decay stay in the group, at its index; the excluded
    ones (see :func:`param_groups` for the rules) move to a copy of the group with
    ``weight_decay=0``, appended at the end of ``param_groups``. The copy's ``name`` (used by
    ``LearningRateMonitor``) is suffixed ``/no_decay``, and its ``"no_decay_of"`` entry holds the
    index of its source group. A group holding only excluded parameters just gets
    ``weight_decay=0``; groups whose ``weight_decay`` is already 0 are left alone, so applying it
    twice changes nothing.

    Schedulers: split-off groups follow their source group's hyperparameters at every optimizer
    step, whatever the scheduler. Right before each step (and at each batch and epoch start, so
    ``LearningRateMonitor`` listed after this callback logs the right values) every setting of the
    source group but ``params``, ``weight_decay`` and ``name`` (``lr``, momentum, betas,
    ``initial_lr``, ``max_lr``...) is copied into its split-off group; a tensor value is shared,
    not copied. Since the source groups keep their indices, a scheduler that keeps one entry per
    group (timm's, ``LambdaLR`` with a list, your own) still drives the right ones; torch
    schedulers' per-group lists that are read by index (``ReduceLROnPlateau.min_lrs``,
    ``base_lrs``, ...) get an entry per split-off group. A change made to a split-off group alone
    (``BackboneFinetuning`` sets ``param_groups[-1]["lr"]``) is copied back to its source.

    Resuming: the split happens before Lightning restores optimizer and scheduler state, so Adam
    moments go back onto the same parameters. Groups added during training through
    ``optimizer.add_param_group`` (Lightning's ``BaseFinetuning``/``BackboneFinetuning`` unfreezing
    a backbone) are split the same way before their first step. To resume such a run, list the
    fine-tuning callback before this one: it restores its groups at fit start, and they must be
    there when this callback splits.

    Manual optimization works when you step through ``self.optimizers()`` (Lightning's optimizer
    wrapper); stepping the raw torch optimizer bypasses Lightning's hooks, and with them the
    copy. A setting changed after this callback's ``on_before_optimizer_step`` (by a callback
    listed after it, or by your module's ``on_before_optimizer_step``) reaches the split-off group
    one step later.

    Args:
        exclude_bias: exclude every parameter named ``bias``.
        exclude_norm: exclude all parameters of normalization layers.
        exclude_1d: exclude every parameter with fewer than two dimensions.
        exclude_embeddings: exclude the weights of ``nn.Embedding``/``nn.EmbeddingBag``.
        use_no_weight_decay_hook: honour ``no_weight_decay()`` methods of the model's modules.
        exclude: extra glob patterns on full parameter names, e.g. ``["*pos_embed"]``.
        warn_coupled_l2: warn when Adam-style optimizers apply weight decay as coupled L2.
        verbose: print the split summary on rank 0 at fit start (and when a group added during
            training is split).

    Attributes:
        splits: one :class:`WeightDecaySplit` per optimizer (what was decayed and excluded, and by
            which rule), filled at fit start and extended when a group added later is split.

    Raises:
        TypeError: if ``exclude`` is a single string instead of a list of patterns.
        RuntimeError: at ``setup``, if two ``WeightDecayExclusion`` callbacks are attached; at fit
            start, if the checkpoint being resumed holds a different param group layout than the
            split produced (for example a run written without this callback, or a
            ``BaseFinetuning`` callback listed after this one), or if none of an optimizer's
            decayed tensors is a parameter of the module (flattened by DeepSpeed or FSDP).

    Example:
        >>> import torch
        >>> from lightning.pytorch import LightningModule, Trainer
        >>> from lightning_reg import WeightDecayExclusion
        >>> class Net(LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
        ...     def training_step(self, batch, batch_idx):
        ...         return self.net(batch[0]).pow(2).mean()
        ...     def configure_optimizers(self):  # unchanged: one group, decay everywhere
        ...         opt = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.05)
        ...         return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]
        >>> data = torch.utils.data.TensorDataset(torch.randn(8, 4))
        >>> trainer = Trainer(
        ...     max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...     enable_model_summary=False, callbacks=[WeightDecayExclusion(verbose=False)],
        ... )
        >>> trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=4))
        >>> groups = trainer.optimizers[0].param_groups  # Linear weight | its bias, LayerNorm
        >>> [(len(g["params"]), g["weight_decay"], g["lr"]) for g in groups]
        [(1, 0.05, 0.00025), (3, 0.0, 0.00025)]

    Logged metrics:
        None. The split summary is printed at fit start; ``RegularizationMonitor`` logs the
        effective weight decay of each param group.
    """

    def __init__(
        self,
        *,
        exclude_bias: bool = True,
        exclude_norm: bool = True,
        exclude_1d: bool = True,
        exclude_embeddings: bool = False,
        use_no_weight_decay_hook: bool = True,
        exclude: Sequence[str] = (),
        warn_coupled_l2: bool = True,
        verbose: bool = True,
    ) -> None:
        if isinstance(exclude, str):
            raise TypeError(f"`exclude` takes a list of glob patterns, got the string {exclude!r}.")
        self.rules: dict[str, Any] = dict(
            exclude_bias=exclude_bias, exclude_norm=exclude_norm, exclude_1d=exclude_1d,
            exclude_embeddings=exclude_embeddings,
            use_no_weight_decay_hook=use_no_weight_decay_hook, exclude=list(exclude),
        )  # fmt: skip
        self.warn_coupled_l2 = warn_coupled_l2
        self.verbose = verbose
        self.splits: list[WeightDecaySplit] = []
        self._reset()

    def regularization_settings(self) -> dict[str, Any]:
        """This callback's settings, for the TensorBoard hparams view."""
        return {f"WeightDecayExclusion/{k}": str(v) for k, v in self.rules.items()}

    def _reset(self) -> None:
        self._layouts: list[_Layout] = []
        self._split: WeightDecaySplit | None = None  # the rules applied to this fit's module
        self._saved: list[list[tuple[int, Any]]] | None = None  # group layouts in the checkpoint

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        others = [cb for cb in trainer_callbacks(trainer) if isinstance(cb, WeightDecayExclusion)]
        if len(others) > 1:
            raise RuntimeError(
                f"{len(others)} WeightDecayExclusion callbacks are attached; keep one and put all "
                "exclusion rules on it."
            )
        self.splits = []
        self._reset()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._saved = saved_group_layouts(checkpoint.get("optimizer_states"))
        if self._layouts:  # strategies that restore after setup: the split is already done
            self._check_checkpoint(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_sharded_flat_views(trainer.strategy, trainer.world_size)
        self._split = split = split_parameters(pl_module, include_frozen=True, **self.rules)
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for index, optimizer in enumerate(trainer.optimizers):
            if any(layout.optimizer is optimizer for layout in self._layouts):
                continue
            if self.warn_coupled_l2 and (message := coupled_weight_decay_warning(optimizer)):
                rank_zero_warn(message)
            groups = optimizer.param_groups
            _check_known(split, groups, index)
            self.splits.append(_report(split, groups))
            old_count = len(groups)
            origin = split_groups(groups, _excluded(split))
            for scheduler in schedulers:
                extend_scheduler(scheduler, optimizer, origin, old_count)
            layout = _Layout(index, optimizer)
            self._layouts.append(layout)
            self._relink(layout)
            if self.verbose:
                rank_zero_info(
                    f"WeightDecayExclusion, optimizer {index} ({type(optimizer).__name__}): "
                    f"{self.splits[-1].summary()}"
                )
        if self._saved is not None:
            self._check_checkpoint(trainer)

    def param_groups_after_split(
        self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> list[dict[str, Any]]:
        """``optimizer``'s param groups as this callback leaves them.

        The live groups once this fit split them (from this callback's ``on_fit_start`` on), a
        preview on copies before that: hparams written by a callback whose ``on_fit_start`` runs
        first (Lightning logs hparams right after that hook) show the decay actually used.
        """
        if any(layout.optimizer is optimizer for layout in self._layouts):
            return optimizer.param_groups
        split = split_parameters(pl_module, include_frozen=True, **self.rules)
        return split_preview(optimizer.param_groups, _excluded(split))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for layout in self._layouts:  # the restored optimizer state brought new group dicts
            self._relink(layout)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._follow_all()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._follow_all()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for layout in self._layouts:
            if layout.optimizer is optimizer:
                self._follow(layout)
                return
        self._follow_all()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._follow_all()  # the last epoch's scheduler step, so the groups agree after fit

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit":
            self._reset()  # keep no optimizer after fit; `splits` stays for the user

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._reset()  # Lightning does not call `teardown` after an exception

    def _follow_all(self) -> None:
        for layout in self._layouts:
            self._follow(layout)

    def _follow(self, layout: _Layout) -> None:
        groups = layout.optimizer.param_groups
        if groups is layout.groups and len(groups) == layout.count:
            follow_sources(layout.links)
        else:  # groups added (BaseFinetuning) or replaced (a restored optimizer state)
            self._relink(layout)

    def _relink(self, layout: _Layout) -> None:
        """Split the groups added since the last look, then pair every split-off group again."""
        groups = layout.optimizer.param_groups
        if self._split is not None and layout.count and len(groups) > layout.count:
            added = _report(self._split, groups[layout.count :])
            if split_groups(groups, _excluded(self._split)):
                self._added(layout, added)
        known = {(id(link.source), id(link.target)): link for link in layout.links}
        links = [
            known.get((id(link.source), id(link.target)), link) for link in link_groups(groups)
        ]
        follow_sources(links)
        layout.groups, layout.count, layout.links = groups, len(groups), links

    def _added(self, layout: _Layout, added: WeightDecaySplit) -> None:
        done = self.splits[layout.index] if layout.index < len(self.splits) else WeightDecaySplit()
        done.decay += added.decay
        done.no_decay += added.no_decay
        done.reasons.update(added.reasons)
        if self.verbose:
            rank_zero_info(
                f"WeightDecayExclusion, optimizer {layout.index}: split a param group added "
                f"during training: {added.summary()}"
            )

    def _check_checkpoint(self, trainer: pl.Trainer) -> None:
        saved, self._saved = self._saved, None
        for layout in self._layouts:
            if saved is None or layout.index >= len(saved):
                continue
            ours = group_layout(layout.optimizer.param_groups)
            if ours == saved[layout.index]:
                continue
            callbacks = trainer_callbacks(trainer)
            later = callbacks[callbacks.index(self) + 1 :] if self in callbacks else []
            finetuning = [type(cb).__name__ for cb in later if _is_finetuning(cb)]
            fix = (
                f"{finetuning[0]} is listed after WeightDecayExclusion: it restores the groups it "
                "added after the split happened. List WeightDecayExclusion after it."
                if finetuning
                else "Resume with the callbacks and `configure_optimizers` of the run that wrote "
                "the checkpoint (a run without WeightDecayExclusion cannot be resumed with it, "
                "nor the other way round)."
            )
            raise RuntimeError(
                f"The checkpoint's optimizer {layout.index} has the param groups "
                f"{saved[layout.index]} but WeightDecayExclusion made {ours} (parameters per "
                "group, and the source of each split-off no-decay group): the optimizer state "
                f"would not go back onto the right parameters. {fix}"
            )


class _Layout:
    """What the callback knows about one optimizer's param groups."""

    __slots__ = ("count", "groups", "index", "links", "optimizer")

    def __init__(self, index: int, optimizer: torch.optim.Optimizer) -> None:
        self.index, self.optimizer = index, optimizer
        self.groups: list[dict[str, Any]] | None = None  # the `param_groups` list last seen
        self.count = 0
        self.links: list[GroupLink] = []


def _excluded(split: WeightDecaySplit) -> set[int]:
    return {id(p) for _, p in split.no_decay if not _is_flattened(p)}  # flat ones keep decay


def refuse_sharded_flat_views(strategy: Any, world_size: int) -> None:
    """Refuse FSDP1 on several ranks: its parameters are then 1-d shards of the weights.

    With ``use_orig_params=True`` the module's parameters outside ``forward`` are views into each
    rank's flat shard, all 1-d, so the "1d" rule would exclude every weight and the split would
    silently turn weight decay off for the whole model. (One rank keeps the original shapes;
    FSDP2 keeps them as DTensors.)

    Raises:
        RuntimeError: under ``FSDPStrategy`` with more than one rank.
    """
    if world_size > 1 and is_lightning_class(strategy, "FSDPStrategy"):
        raise RuntimeError(
            "WeightDecayExclusion cannot split FSDPStrategy (FSDP1) parameters across "
            f"{world_size} ranks: outside forward they are 1-d shards of the weights, so it cannot "
            "tell weights from biases and gains by shape. Use ModelParallelStrategy (FSDP2, "
            "`fully_shard` in `configure_model`), which keeps the shapes, or build the groups "
            "yourself with `lightning_reg.param_groups(self, weight_decay)` in "
            "`configure_optimizers` and drop the callback."
        )


def _check_known(split: WeightDecaySplit, groups: Sequence[dict[str, Any]], index: int) -> None:
    """Refuse, or warn about, decayed tensors that are not parameters of the module."""
    # FSDP1 without `use_orig_params` registers its FlatParameter on the module itself: a module
    # parameter, yet one flat 1-d tensor of many weights that no rule can split (it would land in
    # the no-decay part as "1d" and silently turn decay off for the whole group)
    known = {id(p) for _, p in split.decay + split.no_decay if not _is_flattened(p)}
    decayed = [p for g in groups if is_decayed(g) and SOURCE_KEY not in g for p in g["params"]]
    unknown = sum(id(p) not in known for p in decayed)
    if not unknown:
        return
    what = (
        f"{unknown} of the {len(decayed)} decayed tensors of optimizer {index} are not parameters "
        "of the LightningModule (or are flattened ones), so WeightDecayExclusion cannot tell "
        "whether they should decay"
    )
    if unknown == len(decayed):
        raise RuntimeError(
            f"{what}: none of them is. A strategy that flattens parameters before the optimizer "
            "is built (DeepSpeed, FSDP without `use_orig_params=True`) leaves nothing to split "
            "after setup; build the groups yourself with `lightning_reg.param_groups(self, "
            "weight_decay)` in `configure_optimizers` and drop the callback."
        )
    rank_zero_warn(f"{what}; they keep the decay you configured.")


def _is_flattened(param: torch.Tensor) -> bool:
    """Whether ``param`` is FSDP1's ``FlatParameter`` (many weights in one flat tensor)."""
    return bool(getattr(param, "_is_flat_param", False))


def _is_finetuning(callback: Callback) -> bool:
    # lightning.pytorch's or pytorch_lightning's BaseFinetuning
    return any(cls.__name__ == "BaseFinetuning" for cls in type(callback).__mro__)


def _report(split: WeightDecaySplit, groups: Sequence[dict[str, Any]]) -> WeightDecaySplit:
    """The part of ``split`` in the decayed (or already split-off) groups among ``groups``."""
    placed = {
        id(p) for g in groups if is_decayed(g) or SOURCE_KEY in g for p in g["params"]
    }  # fmt: skip
    no_decay = [(n, p) for n, p in split.no_decay if id(p) in placed]
    return WeightDecaySplit(
        decay=[(n, p) for n, p in split.decay if id(p) in placed],
        no_decay=no_decay,
        reasons={n: split.reasons[n] for n, _ in no_decay},
    )
