"""MC-dropout predictive uncertainty from ``trainer.predict``, as a callback.

Method card:
    What it does: keeps dropout on at prediction time and averages ``N`` stochastic passes per
    batch (Gal & Ghahramani 2016): the predictive mean, its entropy (total uncertainty) and the
    mutual information between prediction and weights (BALD: disagreement between passes, the
    epistemic part). Only dropout modules are switched to training mode; BatchNorm stays in eval.
    Suggested values: ``num_samples=20``-``50`` (the mean's noise falls as ``1/sqrt(N)``); the
    dropout rate the model was trained with (0.1-0.5). Set ``max_batch_size`` to what one forward
    of your model fits in memory.
    When it hurts: ``N`` times the prediction compute; a model trained without dropout has no
    posterior to sample (refused); dropout in front of the last layer only gives a narrow spread;
    functional dropout (``F.dropout(x, training=self.training)`` inside another module) and
    attention dropout of fused kernels stay off in eval and are not sampled.
    Papers: Gal & Ghahramani, ICML 2016 (arXiv:1506.02142); Houlsby et al. 2011 (BALD,
    arXiv:1112.5745); Kendall & Gal, NeurIPS 2017 (arXiv:1703.04977).
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from typing_extensions import override

from lightning_reg.uncertainty import (
    MCDropoutResult,
    OutputKind,
    check_logits,
    check_output_kind_name,
    check_output_values,
    derive_seed,
    dropout_active,
    dropout_modules,
    repeat_rows,
    run_passes,
    seeded_rng,
)

__all__ = ["MCDropoutPrediction"]


class MCDropoutPrediction(Callback):
    """MC-dropout uncertainty for every batch of ``trainer.predict``; ``predict_step`` unchanged.

    After Lightning's own (deterministic, eval-mode) ``predict_step`` of a batch, in
    ``on_predict_batch_end``, the callback switches only the dropout modules to training mode and
    runs ``predict_step`` ``num_samples`` more times through the strategy (precision context, DDP
    forward), as forwards of the batch repeated ``k`` times along dim 0 (every tensor of the batch
    whose first dimension is the batch size; at most ``max_batch_size`` rows per forward). It
    averages the passes' softmax and computes, per sample, the predictive mean ``probs``, the
    predictive ``entropy`` and the ``mutual_information`` (nats), then puts every module's mode
    back.

    ``predict_step`` must return class logits ``(batch, classes)`` (Lightning's default
    ``predict_step`` returns ``self(batch)``), or a dict holding them under ``logits_key``; a
    ``predict_step`` that returns probabilities (``self(x).softmax(-1)``) or log-probabilities
    says so with ``outputs="probs"`` / ``"log_probs"``. The first batch of each
    ``trainer.predict`` is checked once (one read on the host): ``"logits"`` whose rows all lie in
    ``[0, 1]`` and sum to 1 are refused, since a softmax of probabilities would flatten them
    toward uniform and make entropy and mutual information wrong.

    Where the results go (Lightning's predict loop logs nothing, and a callback cannot replace
    what ``predict_step`` returned):

    - ``callback.predictions``: after ``trainer.predict``, an
      :class:`~lightning_reg.uncertainty.MCDropoutResult` (``probs``, ``entropy``,
      ``mutual_information``, on CPU, in this rank's order) for one dataloader, a list of them for
      several (as ``trainer.predict`` returns). Under DDP each rank holds its own samples (with
      ``ddp_spawn``, in its worker process: the main process's object stays empty). With
      ``keep_predictions=False`` nothing is kept (``predictions`` stays ``None``): use it with
      dict outputs and a prediction writer, so memory does not grow with the dataset.
    - dict outputs gain ``f"{prefix}probs"``, ``f"{prefix}entropy"`` and
      ``f"{prefix}mutual_information"`` in place, so ``trainer.predict``'s return value and a
      :class:`~lightning.pytorch.callbacks.BasePredictionWriter` (listed *after* this callback, or
      writing on epoch end) carry them with Lightning's batch indices: the way to collect the
      results of every rank.

    The dropout masks of a batch come from a seed derived from ``seed`` (default: the seed of
    ``seed_everything``, else torch's initial seed), the global rank, the dataloader index and the
    batch index, drawn in a fork of torch's generators: reproducible, different on every rank, and
    the global random stream after ``trainer.predict`` is the one it would be without the callback.

    Args:
        num_samples: stochastic passes per batch ``N`` (>= 1).
        max_batch_size: most rows in one forward (``None``: all ``N`` copies of the batch in one
            forward; ``1`` or any value below twice the batch size: one pass per forward).
        seed: base seed of the dropout masks.
        logits_key: where the logits are when ``predict_step`` returns a dict.
        prefix: prefix of the keys added to dict outputs.
        outputs: what ``predict_step`` returns: ``"logits"`` (a softmax is applied),
            ``"probs"`` (probability rows, averaged as they are) or ``"log_probs"``.
        keep_predictions: keep every batch's results (on CPU) for ``callback.predictions``;
            ``False`` keeps nothing (dict outputs still gain the keys).

    Raises:
        ValueError: for ``num_samples < 1``, ``max_batch_size < 1`` or an unknown ``outputs``;
            on the first batch for outputs that contradict ``outputs`` (probability rows given
            as ``"logits"``, or ``"probs"``/``"log_probs"`` that are not probability rows).
        RuntimeError: at predict start for a model without dropout (``p > 0``) or a
            ``predict_step`` taking ``dataloader_iter``; on the first batch for an output that is
            neither a logits tensor nor a dict with ``logits_key``, or a batch without a tensor of
            the batch size.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> mc = MCDropoutPrediction(num_samples=30)
        >>> trainer = Trainer(callbacks=[mc], logger=False)
        >>> # trainer.predict(model, loader); mc.predictions.probs, mc.predictions.entropy

    Logged metrics:
        None: prediction logs nothing in Lightning; the results are ``callback.predictions`` and
        the keys added to dict outputs.
    """

    def __init__(
        self,
        num_samples: int = 20,
        max_batch_size: int | None = None,
        seed: int | None = None,
        logits_key: str = "logits",
        prefix: str = "mc_",
        outputs: OutputKind = "logits",
        keep_predictions: bool = True,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"`num_samples` must be an integer >= 1, got {num_samples!r}.")
        if max_batch_size is not None and (
            isinstance(max_batch_size, bool)
            or not isinstance(max_batch_size, int)
            or max_batch_size < 1
        ):
            raise ValueError(
                f"`max_batch_size` must be None or an integer >= 1, got {max_batch_size!r}."
            )
        self.num_samples, self.max_batch_size, self.seed = num_samples, max_batch_size, seed
        check_output_kind_name(outputs)
        if not isinstance(keep_predictions, bool):
            raise ValueError(f"`keep_predictions` must be True or False, got {keep_predictions!r}.")
        self.logits_key, self.prefix = logits_key, prefix
        self.outputs, self.keep_predictions = outputs, keep_predictions
        self._checked = False
        self._state_key = self._generate_state_key(num_samples=num_samples, seed=seed)
        self.predictions: MCDropoutResult | list[MCDropoutResult] | None = None
        self._batches: list[list[MCDropoutResult]] = []
        self._seed = 0

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    def regularization_settings(self) -> dict[str, Any]:
        """This callback's settings, for the TensorBoard hparams view."""
        return {"MCDropout/num_samples": self.num_samples}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict":  # also when no batch will run (`limit_predict_batches=0`)
            self.predictions, self._batches = None, []

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not dropout_modules(pl_module):
            raise RuntimeError(
                f"MCDropoutPrediction: {type(pl_module).__name__} has no dropout module with p > 0 "
                "(nn.Dropout, nn.Dropout1d/2d/3d, nn.AlphaDropout, nn.FeatureAlphaDropout, or a "
                "class named *Dropout*), so all passes would give the same prediction. Train the "
                "model with dropout, or remove the callback."
            )
        if is_param_in_hook_signature(pl_module.predict_step, "dataloader_iter", explicit=True):
            raise RuntimeError(
                "MCDropoutPrediction needs the batch to repeat the passes, but this `predict_step` "
                "takes `dataloader_iter`. Take `batch` (and `batch_idx`) instead."
            )
        seed = self.seed
        self._seed = (
            int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())) if seed is None else seed
        )
        self.predictions, self._checked = None, False
        self._batches = [[] for _ in range(trainer.predict_loop.num_dataloaders)]

    @override
    def on_predict_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        logits = self._logits(outputs)
        rows = logits.shape[0]
        if not _has_rows(batch, rows):
            raise RuntimeError(
                f"MCDropoutPrediction repeats every tensor of the batch whose first dimension is "
                f"the batch size ({rows} rows of logits), but the batch ({type(batch).__name__}) "
                "holds no such tensor."
            )
        if not self._checked:  # one host read per `trainer.predict`
            check_output_values(logits, self.outputs)
            self._checked = True
        several = trainer.predict_loop.num_dataloaders > 1

        def forward(k: int) -> Tensor:
            repeated = apply_to_collection(batch, Tensor, _repeat_if_rows, rows, k)
            args: tuple[Any, ...] = (repeated,)
            if is_param_in_hook_signature(pl_module.predict_step, "batch_idx", min_args=2):
                args += (batch_idx,)
            args += (dataloader_idx,) if several else ()
            passes = self._logits(call._call_strategy_hook(trainer, "predict_step", *args))
            check_logits(passes, k * rows)
            return passes

        seed = derive_seed(self._seed, trainer.global_rank, dataloader_idx, batch_idx)
        with dropout_active(pl_module), seeded_rng(seed, logits.device):
            result = run_passes(forward, self.num_samples, rows, self.max_batch_size, self.outputs)
        if isinstance(outputs, dict):
            outputs[f"{self.prefix}probs"] = result.probs
            outputs[f"{self.prefix}entropy"] = result.entropy
            outputs[f"{self.prefix}mutual_information"] = result.mutual_information
        if self.keep_predictions:  # on CPU, as Lightning keeps the predictions it returns
            self._batches[dataloader_idx].append(MCDropoutResult(*(t.cpu() for t in result)))

    @override
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.keep_predictions:
            self.predictions, self._batches = None, []
            return
        merged = [
            MCDropoutResult(*(torch.cat(parts) for parts in zip(*batches, strict=True)))
            if batches else MCDropoutResult(*(torch.empty(0) for _ in range(3)))
            for batches in self._batches
        ]  # fmt: skip
        self.predictions = merged[0] if len(merged) == 1 else merged
        self._batches = []

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._batches = []

    def _logits(self, output: Any) -> Tensor:
        if isinstance(output, Tensor):
            return output
        if isinstance(output, dict) and isinstance(output.get(self.logits_key), Tensor):
            return output[self.logits_key]
        raise RuntimeError(
            f"MCDropoutPrediction expects `predict_step` to return class logits (a tensor of "
            f"shape (batch, classes)) or a dict with them under {self.logits_key!r} "
            f"(`logits_key`), got {type(output).__name__}"
            + (f" with keys {sorted(map(str, output))}" if isinstance(output, dict) else "")
            + "."
        )


def _has_rows(batch: Any, rows: int) -> bool:
    found: list[bool] = []
    apply_to_collection(batch, Tensor, lambda t: found.append(t.ndim > 0 and t.shape[0] == rows))
    return any(found)


def _repeat_if_rows(tensor: Tensor, rows: int, times: int) -> Tensor:
    return repeat_rows(tensor, times) if tensor.ndim > 0 and tensor.shape[0] == rows else tensor
