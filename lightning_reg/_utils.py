"""Small helpers shared by the callbacks."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

PER_STEP_HOOKS = (
    "on_train_batch_start", "on_before_backward", "on_after_backward",
    "on_before_optimizer_step", "on_before_zero_grad", "on_train_batch_end",
)  # fmt: skip


def trainer_callbacks(trainer: pl.Trainer) -> list[Callback]:
    """The trainer's live callback list (an attribute Lightning's callback connector sets)."""
    return trainer.callbacks  # type: ignore[attr-defined]


class SkipsIdleStepHooks(Callback):
    """Base of our callbacks: during ``fit``, Lightning skips the per-step hooks they don't use.

    Lightning calls each of the six per-step hooks on every callback, inherited no-ops included,
    each inside a profiler context with a formatted name: about 2 us per hook and callback on a
    CPU, so a dozen microseconds per callback and step. Its dispatcher skips hook attributes that
    are not callable. From ``setup("fit")`` to ``teardown`` (or ``on_exception``) the per-step
    hooks a class leaves as ``Callback``'s no-ops are shadowed by ``None`` on the instance. Hooks
    that a class (a user's subclass included) overrides, or that were set on the instance, are
    left alone, and ``super()`` calls still reach ``Callback``'s methods.
    """

    _shadowed_hooks: tuple[str, ...] = ()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._shadowed_hooks = tuple(
            name for name in PER_STEP_HOOKS
            if name not in self.__dict__ and getattr(type(self), name) is getattr(Callback, name)
        )  # fmt: skip
        for name in self._shadowed_hooks:
            setattr(self, name, None)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unshadow_step_hooks()
        super().teardown(trainer, pl_module, stage)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._unshadow_step_hooks()  # Lightning does not call `teardown` after an exception
        super().on_exception(trainer, pl_module, exception)

    def _unshadow_step_hooks(self) -> None:
        for name in self._shadowed_hooks:
            if name in self.__dict__ and self.__dict__[name] is None:
                del self.__dict__[name]
        self._shadowed_hooks = ()
