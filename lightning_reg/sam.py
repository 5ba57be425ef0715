"""Sharpness-aware minimization (SAM, ASAM) as a callback for automatic optimization.

Method card:
    What it does: seeks flat minima. Each (k-th) step takes the gradient ``g`` at ``w``, moves to
    ``w + e(w)`` (``e = rho * g / ||g||``; ASAM: ``rho * w^2 g / || |w| g ||``), takes the gradient
    again there, moves back to ``w``, and lets the base optimizer step from ``w`` with the second
    gradient. Any base optimizer (SGD, AdamW), LR schedulers and param groups stay as they are.
    Suggested values: ``rho=0.05`` (SAM, up to 0.1-0.2 on noisy labels); ``rho=0.5``-``2.0`` with
    ``adaptive=True``. ``interval=k`` pays the second pass on every k-th step only.
    When it hurts: about twice the compute per step; tiny ``rho`` does nothing, large ``rho``
    underfits; with BatchNorm and very small batches the perturbed batch statistics are noisy.
    Papers: Foret et al., ICLR 2021 (arXiv:2010.01412); Kwon et al., ICML 2021 (arXiv:2102.11600).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn
from typing_extensions import override

from lightning_reg._eval_pass import (
    _PassResults,
    _restore_metric_states,
    _results_owner,
    _set_metric_states_aside,
)
from lightning_reg._grad_scaler import ScaledSecondGradient, active_scaler, check_scaler_supported
from lightning_reg._lightning import is_replicated
from lightning_reg.sam_functional import sam_perturbed

__all__ = ["SAM", "SharpnessAwareMinimization"]

ParameterFilter = Callable[[str, nn.Parameter], bool]


class SharpnessAwareMinimization(Callback):
    """SAM / ASAM on the user's own optimizer: no change to the module or the optimizer.

    In ``on_before_optimizer_step`` (the first gradient is complete, all-reduced under DDP), the
    callback perturbs the weights by ``e(w)`` (:func:`~lightning_reg.sam_perturbed`), sets the
    gradients to ``None``, runs ``training_step`` on the same batch through the strategy (the
    precision context, DDP's forward) and backpropagates, puts the exact weights back, and lets
    Lightning clip and step with the second gradient. In that second pass:

    - what ``training_step`` logs is discarded and torchmetrics objects are set aside, so logged
      values and metric updates count once per batch;
    - every buffer of the module (BatchNorm running statistics, ``num_batches_tracked``) is put
      back, so running statistics are updated once per batch, by the unperturbed pass;
    - the backward hooks (``on_before_backward``/``on_after_backward``) are not called again.

    Under DDP the perturbation uses the *all-reduced* first gradient: Lightning's closure runs
    the first backward through DDP, which averages it, and avoiding that would need patching
    ``no_sync`` into the loop. So every rank perturbs identically (no extra collective), and the
    second gradient is all-reduced too. This is SAM with ``m`` = the global batch (the paper's
    per-accelerator "m-sharpness" would use the local gradient).

    Under ``precision="16-mixed"`` the perturbation uses the *unscaled* first gradient (Lightning
    unscales it before this hook), the second loss is scaled like the first, and the second
    gradient is unscaled and inf-checked before clipping and the step. A non-finite value in either
    gradient skips the step and backs the scale off, as one overflow does without SAM (this needs
    one private ``GradScaler`` attribute; see ``lightning_reg/_grad_scaler.py``). A step whose
    ``training_step`` returned ``None`` (Lightning skips it) gets no second pass.

    Args:
        rho: neighbourhood radius (> 0).
        adaptive: ASAM (scale-invariant neighbourhood ``|w|``).
        interval: perturb on every ``interval``-th optimizer step (``global_step % interval ==
            0``); other steps are plain steps.
        parameters: ``(name, parameter) -> bool`` choosing which trainable parameters are
            perturbed; default all trainable parameters.
        eps: added to the gradient norm.

    Raises:
        ValueError: for ``rho <= 0`` or ``interval < 1``.
        RuntimeError: at fit start, for manual optimization (use
            :func:`~lightning_reg.sam_perturbed` in your ``training_step``),
            ``accumulate_grad_batches > 1``, or sharded strategies (FSDP, DeepSpeed).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[SharpnessAwareMinimization(rho=0.05)], logger=False)

    Logged metrics:
        - ``reg/sam/rho``: the radius, at each epoch's end.
        - ``reg/sam/perturbation_norm``: mean ``||e||`` over the epoch's perturbed steps.
    """

    def __init__(
        self,
        rho: float = 0.05,
        adaptive: bool = False,
        interval: int = 1,
        parameters: ParameterFilter | None = None,
        eps: float = 1e-12,
    ) -> None:
        if not (rho > 0 and math.isfinite(rho)):
            raise ValueError(f"`rho` must be finite and > 0, got {rho}.")
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"`interval` must be an integer >= 1, got {interval!r}.")
        self.rho, self.adaptive, self.interval = rho, adaptive, interval
        self.parameters, self.eps = parameters, eps
        self._state_key = self._generate_state_key(rho=rho, adaptive=adaptive, interval=interval)
        self._targets: set[int] = set()
        self._batch: tuple[Any, int] | None = None
        self._norm_sum: Tensor | None = None
        self._count = 0

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    def regularization_settings(self) -> dict[str, Any]:
        """This callback's settings, for the TensorBoard hparams view."""
        return {"SAM/rho": self.rho, "SAM/adaptive": self.adaptive, "SAM/interval": self.interval}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before a checkpoint's state is loaded: a resume brings its own counters back
        self._batch, self._norm_sum, self._count = None, None, 0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _refuse_unsupported(trainer, pl_module)
        chosen = self.parameters or (lambda name, p: True)
        self._targets = {
            id(p) for name, p in pl_module.named_parameters() if p.requires_grad and chosen(name, p)
        }
        if not self._targets:
            raise RuntimeError("SAM: no trainable parameter is selected by `parameters`.")

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # the same object reaches training_step (changes other callbacks make in place included)
        self._batch = (batch, batch_idx)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._batch is None or trainer.global_step % self.interval != 0:
            return
        batch, batch_idx = self._batch
        params = [p for g in optimizer.param_groups for p in g["params"] if id(p) in self._targets]
        if all(p.grad is None for p in params):
            return  # `training_step` returned None: Lightning skips this step, so does SAM
        scaler = active_scaler(trainer.precision_plugin)
        scaled = None if scaler is None else ScaledSecondGradient(scaler, optimizer)
        if scaled is not None:
            scaled.before_second_pass()
        buffers = [b.detach().clone() for b in pl_module.buffers()]
        with torch.enable_grad(), sam_perturbed(params, self.rho, self.adaptive, self.eps) as norm:
            optimizer.zero_grad(set_to_none=True)
            _second_backward(trainer, pl_module, optimizer, batch, batch_idx, scaled)
        if scaled is not None:
            scaled.after_second_pass()
        with torch.no_grad():
            for live, saved in zip(pl_module.buffers(), buffers, strict=True):
                live.copy_(saved)
        norm = norm.detach()
        total = self._norm_sum
        self._norm_sum = norm if total is None else total + norm.to(total)
        self._count += 1

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        self._batch = None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("reg/sam/rho", float(self.rho), on_step=False, on_epoch=True)
        if self._norm_sum is not None and self._count:
            mean = self._norm_sum / self._count
            pl_module.log("reg/sam/perturbation_norm", mean, on_step=False, on_epoch=True)
        self._norm_sum, self._count = None, 0

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._batch = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._batch = None

    @override
    def state_dict(self) -> dict[str, Any]:
        norm_sum = None if self._norm_sum is None else self._norm_sum.detach().cpu()
        return {"norm_sum": norm_sum, "count": self._count}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._norm_sum, self._count = state_dict.get("norm_sum"), int(state_dict.get("count", 0))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batch = None


SAM = SharpnessAwareMinimization


def _refuse_unsupported(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    if not pl_module.automatic_optimization:
        raise RuntimeError(
            "SAM runs its second pass inside Lightning's automatic optimization, but this "
            "module uses manual optimization. Remove the callback and wrap your second "
            "forward/backward in `with lightning_reg.sam_perturbed(self.parameters(), rho=...):` "
            "before `opt.step()`."
        )
    if trainer.accumulate_grad_batches > 1:
        raise RuntimeError(
            f"SAM does not support accumulate_grad_batches={trainer.accumulate_grad_batches}: the "
            "perturbation needs the whole step's gradient, and the second pass would have to "
            "revisit every accumulated batch, which no callback hook can reach. Use a larger "
            "batch size, or accumulate_grad_batches=1."
        )
    scaler = active_scaler(trainer.precision_plugin)
    if scaler is not None:
        check_scaler_supported(scaler)
    if not is_replicated(trainer.strategy):
        raise RuntimeError(
            f"SAM supports single-device and DDP strategies, not {type(trainer.strategy).__name__}"
            ": with sharded parameters the gradient norm would need a collective of its own."
        )


def _second_backward(
    trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer,
    batch: Any, batch_idx: int, scaled: ScaledSecondGradient | None,
) -> None:  # fmt: skip
    """``training_step`` through the strategy (precision context, DDP forward) and backward.

    The order of Lightning's own ``Strategy.backward``: the strategy's ``pre_backward`` sees the
    unscaled loss, the precision plugin backpropagates the (GradScaler-)scaled one.
    """
    args: tuple[Any, ...] = (batch,)
    if is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2):
        args += (batch_idx,)
    with _discarded_logs(trainer, pl_module):
        output = call._call_strategy_hook(trainer, "training_step", *args)
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, Tensor):
        raise RuntimeError(
            "SAM: `training_step` returned no loss in the perturbed pass; SAM needs a loss on "
            "every step it perturbs (skip batches before the step, not by returning None)."
        )
    strategy = trainer.strategy
    strategy.pre_backward(loss)
    scaled_loss = loss if scaled is None else scaled.scale(loss)
    trainer.precision_plugin.backward(scaled_loss, pl_module, optimizer)
    strategy.post_backward(loss)


@contextmanager
def _discarded_logs(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Lend the training loop a collection that drops every ``self.log``; set metrics aside."""
    owner = _results_owner(trainer)
    connector = trainer._logger_connector
    saved_connector = (connector._first_loop_iter, connector._current_fx)
    saved_results = owner._results
    saved_metrics = _set_metric_states_aside(pl_module)
    owner._results = _PassResults(lambda name: False, trainer)
    try:
        yield
    finally:
        owner._results = saved_results
        connector._first_loop_iter, connector._current_fx = saved_connector
        _restore_metric_states(saved_metrics)
