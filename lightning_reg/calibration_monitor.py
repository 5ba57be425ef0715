"""Expected calibration error on validation and on a training subset, after every validation.

Method card:
    What it does: scores how far the model's top-label confidence is from its accuracy (expected
    calibration error, equal-width bins, torchmetrics' ``MulticlassCalibrationError``), on the
    validation set and on a fixed, seeded training subset evaluated like validation (eval mode,
    no augmentation, hard labels, the weights that were just validated).
    Why: label smoothing and mixup change calibration as much as accuracy (Müller et al. 2019,
    "When does label smoothing help?"; Thulasidasan et al. 2019, "On mixup training"); plain
    training of large networks tends to be overconfident (Guo et al. 2017, "On calibration of
    modern neural networks"). Choosing between regularizers needs both numbers.
    Reading it: ECE is unsigned; a low train ECE next to a high val ECE is the calibration side of
    overfitting (confident on what it memorised). Values below ~0.02 are within noise on a few
    thousand samples. ECE depends on the number of bins; compare runs with the same ``n_bins``.
    Cost: one extra forward per validation batch (Lightning does not hand callbacks the logits),
    plus one forward pass over ``subset_size`` training samples per validation. Nothing per
    training step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchmetrics.classification import MulticlassCalibrationError
from typing_extensions import override

from lightning_reg._batch import BatchAdapter
from lightning_reg._lightning import validated_weights
from lightning_reg._subset import train_subset_loader
from lightning_reg._utils import trainer_callbacks
from lightning_reg.calibration import ClassOutputs, check_class_outputs
from lightning_reg.tensorboard import log_scalars

__all__ = ["CalibrationMonitor"]

# returns (N, C) logits; typed `Any` because LightningCLI (jsonargparse) reads a callable typed to
# return a class as a factory of that class and refuses a plain function's import path
LogitsFn = Callable[[pl.LightningModule, Any], Any]


class CalibrationMonitor(Callback):
    """Log expected calibration error on validation and on a training subset, and their gap.

    During each validation of ``fit``, just before your ``validation_step``, the callback runs
    the model on the batch (``pl_module(inputs)`` inside the precision plugin's forward context,
    or your ``logits_fn``) and feeds a torchmetrics ``MulticlassCalibrationError``; your
    ``validation_step`` is left alone. After the validation, the same scoring runs on a fixed,
    seeded subset of the training set, in eval mode and without gradients, batches taking
    Lightning's transfer path (precision conversion, batch-transfer hooks), with the weights that
    were just validated (the average, beside Lightning's weight averaging). With the default
    ``subset_size`` and ``seed`` the subset is the one
    :class:`~lightning_reg.GeneralizationGapMonitor` draws. ``Mixup`` and ``LabelSmoothing``
    change training batches only: both sets are scored against class indices.

    Under DDP each rank scores its share and torchmetrics gathers the confidences. The training
    subset is split across ranks without duplicates. A validation set whose size is not a
    multiple of the world size is padded by torch's ``DistributedSampler`` (Lightning's default,
    ``use_distributed_sampler=True``) with repeats of its first samples at the end of some ranks'
    shares; the callback recognises that sampler (also as ``batch_sampler.sampler``) and drops
    the padded rows, so the values equal a single-process evaluation. A custom distributed
    sampler that repeats samples is scored as it delivers them (repeats counted).

    Outputs are ``(N, C)`` logits (a softmax is applied), or probabilities with
    ``outputs="probs"``: decided once by the argument, never guessed from a batch's values. The
    first scored batch (in the sanity check if there is one) is checked once, one read on the
    host: ``"probs"`` outside ``[0, 1]`` are refused, and so are ``"logits"`` whose rows all lie
    in ``[0, 1]`` and sum to 1 (probabilities, which a softmax would flatten). Targets are
    ``(N,)`` class indices, not range-checked (that would synchronise with the device): a label
    outside ``[0, C)`` counts as a wrong prediction.

    Args:
        subset_size: number of training samples scored per validation.
        n_bins: equal-width confidence bins of the calibration error.
        num_classes: the number of classes; checked against the outputs (default: their width).
        logits_fn: ``(pl_module, batch) -> (N, C) logits`` for models whose ``forward`` does not
            map the inputs to logits (default: ``pl_module(inputs)``).
        input_key: index or key of the inputs in a batch (see :class:`BatchAdapter`).
        target_key: index or key of the targets in a batch.
        dataset: the training data to sample from, with validation transforms (default: the
            train dataloader's dataset).
        batch_size: the largest batch size of the subset pass (default: the train dataloader's).
        seed: seed of the subset's indices.
        val_dataloader_idx: with several validation dataloaders, the one that is scored.
        outputs: what the model (or ``logits_fn``) returns: ``"logits"`` or ``"probs"``.

    Raises:
        ValueError: for a bad ``subset_size``, ``n_bins``, ``num_classes``, ``batch_size`` or
            ``val_dataloader_idx``, an unknown ``outputs``, or a ``logits_fn`` that is not
            callable; during the first validation (the sanity check if there is one), for outputs
            that are not ``(N, C)`` floating rows or contradict ``outputs``, soft or non-``(N,)``
            targets, or a width other than ``num_classes``.
        RuntimeError: before the first training step, when no subset can be drawn (an iterable
            training dataset without ``dataset=``).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> calibration = CalibrationMonitor(subset_size=512, n_bins=15)
        >>> trainer = Trainer(callbacks=[calibration], logger=False)
        >>> calibration.state_key == CalibrationMonitor(subset_size=512).state_key
        True

    Logged metrics (after every validation of ``fit``, not during the sanity check):
        - ``reg/calibration/val_ece``: expected calibration error on the validation set.
        - ``reg/calibration/train_ece``: the same on the training subset.
        - ``reg/calibration/gap``: ``val_ece - train_ece`` (> 0: worse calibrated on unseen data).
    """

    def __init__(
        self,
        subset_size: int = 1000,
        n_bins: int = 15,
        num_classes: int | None = None,
        logits_fn: LogitsFn | None = None,
        input_key: int | str | None = None,
        target_key: int | str | None = None,
        dataset: Dataset | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        val_dataloader_idx: int = 0,
        outputs: ClassOutputs = "logits",
    ) -> None:
        for name, value, low in (
            ("subset_size", subset_size, 1), ("n_bins", n_bins, 1),
            ("val_dataloader_idx", val_dataloader_idx, 0),
        ):  # fmt: skip
            if type(value) is not int or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
        if num_classes is not None and (type(num_classes) is not int or num_classes < 2):
            raise ValueError(f"`num_classes` must be an int >= 2, got {num_classes!r}.")
        if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
            raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
        if outputs not in ("logits", "probs"):
            raise ValueError(
                f"`outputs` must be 'logits' or 'probs' (what the model returns), got {outputs!r}."
            )
        if logits_fn is not None and not callable(logits_fn):
            raise ValueError(
                f"`logits_fn` must be a function `(pl_module, batch) -> logits`, got {logits_fn!r}."
            )
        self.subset_size, self.n_bins, self.num_classes = subset_size, n_bins, num_classes
        self.logits_fn, self.adapter = logits_fn, BatchAdapter(input_key, target_key)
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.val_dataloader_idx, self.outputs = val_dataloader_idx, outputs
        self._state_key = self._generate_state_key(
            subset_size=subset_size, n_bins=n_bins, seed=seed, val_dataloader_idx=val_dataloader_idx
        )
        self._reset_run()

    def _reset_run(self) -> None:
        """Forget a previous fit (its history, its data, its metric states)."""
        self.history: dict[str, list[float]] = {"val_ece": [], "train_ece": []}
        self._loader: DataLoader | None = None
        self._val_metric: MulticlassCalibrationError | None = None
        self._outputs_checked = False
        self._val_rows_left: int | None = None  # real (unpadded) validation rows of this rank

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    def regularization_settings(self) -> dict[str, Any]:
        """This callback's settings, for the TensorBoard hparams view."""
        return {"CalibrationMonitor/n_bins": self.n_bins}

    # ----------------------------------------------------------------------------- lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._reset_run()  # a resumed fit gets its history back after `setup`

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._subset_loader(trainer)  # an undrawable subset fails before the first step

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._loader, self._val_metric = None, None

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._loader, self._val_metric = None, None  # no `teardown` after an exception

    def _active(self, trainer: pl.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_metric = None
        self._val_rows_left = _unpadded_rows(trainer, self.val_dataloader_idx)

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # before `validation_step`, so an unscorable batch is refused before the user's code fails
        if not self._active(trainer) or dataloader_idx != self.val_dataloader_idx:
            return
        probs, targets = self._score_batch(trainer, pl_module, batch, "validation")
        if trainer.sanity_checking:
            return  # the sanity check only proves the outputs can be scored
        if self._val_metric is None:
            self._val_metric = self._new_metric(probs)
        if self._val_rows_left is not None:  # drop the sampler's padding (host-side counts)
            keep = min(probs.shape[0], self._val_rows_left)
            self._val_rows_left -= keep
            probs, targets = probs[:keep], targets[:keep]
        if probs.shape[0]:
            self._val_metric.update(probs, targets)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._active(trainer) or self._val_metric is None:
            return
        val_ece = float(self._val_metric.compute())  # gathers the ranks' confidences
        self._val_metric = None
        with validated_weights(trainer_callbacks(trainer), pl_module):
            train_ece = self._score_subset(trainer, pl_module)
        self.history["val_ece"].append(val_ece)
        self.history["train_ece"].append(train_ece)
        scalars = {
            "reg/calibration/val_ece": val_ece,
            "reg/calibration/train_ece": train_ece,
            "reg/calibration/gap": val_ece - train_ece,
        }
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scalars.items()})
        log_scalars(trainer, scalars)

    # ------------------------------------------------------------------------------- scoring
    def _new_metric(self, probs: Tensor) -> MulticlassCalibrationError:
        # validate_args=False: torchmetrics' range check of the targets would read them on the host
        metric = MulticlassCalibrationError(
            num_classes=probs.shape[1], n_bins=self.n_bins, norm="l1", validate_args=False
        )
        return metric.to(probs.device)

    def _score_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, where: str
    ) -> tuple[Tensor, Tensor]:
        """The float32 probabilities of a device batch and its class-index targets, checked.

        Probabilities, not logits, go to torchmetrics, so its per-batch guess from the value range
        (softmax only when a value lies outside [0, 1]) never decides.
        """
        _, targets = self.adapter.split(batch)
        with trainer.precision_plugin.forward_context():
            if self.logits_fn is not None:
                logits = self.logits_fn(pl_module, batch)
            else:
                logits = pl_module(self.adapter.split(batch)[0])
        self._check(logits, targets, where)
        values = logits.float()
        if not self._outputs_checked:  # once per fit: one read on the host
            try:
                check_class_outputs(values, self.outputs)
            except ValueError as error:
                raise ValueError(f"CalibrationMonitor ({where} batch): {error}") from None
            self._outputs_checked = True
        return (values.softmax(dim=1) if self.outputs == "logits" else values), targets

    def _check(self, logits: Any, targets: Any, where: str) -> None:
        """Refuse what cannot be scored (shapes and dtypes only: no device sync)."""
        how = (
            "Pass `logits_fn=lambda module, batch: ...` returning (N, C) logits"
            if self.logits_fn is None
            else "Make `logits_fn` return (N, C) logits"
        )
        if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.ndim != 2:
            got = (
                f"a {tuple(logits.shape)} {logits.dtype} tensor"
                if isinstance(logits, Tensor)
                else f"a {type(logits).__name__}"
            )
            raise ValueError(
                f"CalibrationMonitor scores classifiers: it needs (N, C) floating logits or "
                f"probabilities for each {where} batch, but the model gave {got}. {how}, or remove "
                "the monitor (regression and dense outputs have no top-label calibration error)."
            )
        if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.ndim != 1:
            got = (
                f"a {tuple(targets.shape)} {targets.dtype} tensor"
                if isinstance(targets, Tensor)
                else f"a {type(targets).__name__}"
            )
            raise ValueError(
                f"CalibrationMonitor needs (N,) integer class indices as {where} targets, got "
                f"{got}. Soft targets (probability rows) have no single true class: keep them for "
                "training only (Mixup/LabelSmoothing do) and give hard labels to validation; "
                "set `target_key=` if the targets are elsewhere in the batch."
            )
        if targets.shape[0] != logits.shape[0]:
            raise ValueError(
                f"CalibrationMonitor: the model gave {logits.shape[0]} rows for "
                f"{targets.shape[0]} {where} targets. {how}."
            )
        classes = self.num_classes
        if logits.shape[1] < 2 or (classes is not None and logits.shape[1] != classes):
            expected = f"num_classes={classes}" if classes is not None else "at least 2"
            raise ValueError(
                f"CalibrationMonitor: the model gave {logits.shape[1]} class columns, expected "
                f"{expected}. A binary classifier with one logit: return `torch.cat([-z, z], 1)`"
                " from `logits_fn` (a softmax of that is the sigmoid)."
            )

    def _subset_loader(self, trainer: pl.Trainer) -> DataLoader:
        if self._loader is None:
            self._loader = train_subset_loader(
                "CalibrationMonitor", trainer, self.dataset, self.subset_size, self.seed,
                self.batch_size,
            )  # fmt: skip
        return self._loader

    def _score_subset(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """ECE of the training subset, batches transferred the way Lightning transfers them."""
        idx = self.val_dataloader_idx if len(trainer.num_val_batches) > 1 else 0
        metric: MulticlassCalibrationError | None = None
        modes = {module: module.training for module in pl_module.modules()}
        try:
            pl_module.eval()
            with torch.no_grad():
                for batch in self._subset_loader(trainer):
                    batch = trainer.precision_plugin.convert_input(batch)
                    batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=idx)
                    batch = trainer.strategy.batch_to_device(batch, dataloader_idx=idx)
                    probs, targets = self._score_batch(trainer, pl_module, batch, "training")
                    metric = metric or self._new_metric(probs)
                    metric.update(probs, targets)
        finally:
            for module, training in modes.items():
                module.training = training
        assert metric is not None  # the subset has at least one sample per rank
        return float(metric.compute())

    # ----------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        history = state_dict.get("history", {})
        self.history = {k: list(history.get(k, [])) for k in ("val_ece", "train_ece")}


def _unpadded_rows(trainer: pl.Trainer, dataloader_idx: int) -> int | None:
    """This rank's real validation rows when a ``DistributedSampler`` pads the set, else None.

    The sampler pads the index list with its first entries up to a multiple of the world size
    and gives rank ``r`` positions ``r, r + W, ...``: the real ones (``< len(dataset)``) come
    first, the padding last.
    """
    loaders = trainer.val_dataloaders
    if isinstance(loaders, list | tuple):
        loaders = loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
    sampler = getattr(loaders, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        sampler = getattr(getattr(loaders, "batch_sampler", None), "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    size = len(sampler.dataset)  # type: ignore[arg-type]
    if sampler.total_size == size:
        return None
    return len(range(sampler.rank, size, sampler.num_replicas))
