"""Membership-inference audit: how much the model's losses tell who was in the training set.

Method card:
    What it does: after validation, runs the loss-threshold membership-inference attack (Yeom et
    al., 2018) on a fixed, seeded subset of training samples (members) and as many validation
    samples (non-members): the lower a sample's loss, the more surely the attack calls it a
    member. Logs the attack's ROC AUC, its advantage (max TPR - FPR) and its TPR at low FPR, the
    number that matters when a few confidently exposed records are the harm (Carlini et al., 2022).
    How to read it: AUC 0.5 and advantage 0 mean *this* attack cannot tell members apart. It is a
    lower bound on leakage, never a privacy guarantee: stronger attacks (per-example thresholds,
    shadow models, LiRA) do better. A smaller train/val gap does not imply less leakage either:
    label smoothing can narrow the gap and still raise it.
    Suggested values: ``subset_size`` of 1000 or more (>= 100 non-members for TPR at 1% FPR,
    >= 1000 for 0.1%); on 1000 per side the AUC of a model that leaks nothing still varies by
    about +-0.03, and the advantage (a maximum over thresholds) is biased upward on small subsets.
    Cost: one forward pass over ``2 * subset_size`` samples per audited validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import BinaryROC
from typing_extensions import override

from lightning_reg._batch import BatchAdapter
from lightning_reg._lightning import is_overridden, validated_weights
from lightning_reg._subset import draw_indices, is_map_style, subset_loader
from lightning_reg._utils import trainer_callbacks
from lightning_reg.tensorboard import log_scalars

__all__ = ["MembershipInferenceAudit", "attack_metrics", "loss_attack_metrics"]

LossFn = Callable[[pl.LightningModule, Any], Tensor]
FPR_LEVELS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0.1pct_fpr": 0.001}
_SETTINGS = ("subset_size", "every_n_evals")


def attack_metrics(fpr: Tensor, tpr: Tensor, n_nonmembers: int) -> dict[str, float]:
    """AUC, advantage and TPR at low FPR from the exact ROC curve of an attack.

    The TPR at an FPR level is the best TPR among the thresholds whose FPR is at most the level;
    it is NaN with fewer than ``1 / level`` non-members, where one false positive exceeds it.
    """
    fpr, tpr = fpr.detach().double().cpu(), tpr.detach().double().cpu()
    out = {"auc": float(torch.trapezoid(tpr, fpr)), "advantage": float((tpr - fpr).max())}
    false_positives = torch.round(fpr * n_nonmembers)  # counts: no float edge at the level
    for name, level in FPR_LEVELS.items():
        allowed = math.floor(level * n_nonmembers + 1e-9)
        out[name] = float(tpr[false_positives <= allowed].max()) if allowed >= 1 else math.nan
    return out


def loss_attack_metrics(member_losses: Tensor, nonmember_losses: Tensor) -> dict[str, float]:
    """The loss-threshold attack on per-sample losses, in one process (the callback's math).

    Example:
        >>> members, nonmembers = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.25, 0.5, 0.9])
        >>> m = loss_attack_metrics(members, nonmembers)
        >>> round(m["auc"], 4), round(m["advantage"], 4), m["tpr_at_1pct_fpr"]
        (0.8889, 0.6667, nan)
    """
    roc = BinaryROC(thresholds=None, normalization=None, sync_on_compute=False)
    for losses, label in ((member_losses, 1), (nonmember_losses, 0)):
        roc.update(-losses.detach().float(), torch.full_like(losses, label, dtype=torch.long))
    fpr, tpr, _ = roc.compute()
    return attack_metrics(fpr, tpr, len(nonmember_losses))


class MembershipInferenceAudit(Callback):
    """Log how well a loss-threshold attack tells training samples from validation samples.

    After each (non-sanity) validation of ``fit`` (or every ``every_n_evals``), the per-sample
    losses of the model, in eval mode and without gradients, are computed on a fixed, seeded
    subset of the training set (members) and one of the validation set (non-members), both of
    ``min(subset_size, len(train), len(val))`` samples. The attack's score is the negative loss.
    Batches take Lightning's evaluation path: the precision plugin's input conversion and
    ``val_step_context`` (autocast under ``bf16-mixed``/``16-mixed``), your batch-transfer hooks,
    and, for the default loss, the forward of the strategy's wrapper (DDP, FSDP). Under DDP each
    rank scores its own share of both subsets (no duplicates, the same number of batches on every
    rank) and torchmetrics gathers the scores, so the numbers equal a single-process audit.
    Validation results, the global RNG and the weights are left untouched.

    The result is a LOWER BOUND on membership leakage: a stronger attack can do better, so a low
    AUC is no privacy guarantee. A smaller train/val gap does not imply less leakage (label
    smoothing can raise it while narrowing the gap).

    A callback that reads ``reg/privacy/...`` in its own ``on_validation_end`` calls
    :meth:`evaluate_after_validation` first; the audit runs once per audited validation whoever
    asks first.

    Args:
        subset_size: members (and non-members) scored per audit.
        every_n_evals: audit every this many validations (the n-th, 2n-th, ...).
        loss_fn: ``loss_fn(pl_module, batch) -> per-sample losses (N,)`` for models that are not
            classifiers; default: ``F.cross_entropy(model(x), y, reduction="none")`` where
            ``model`` is the strategy's wrapped module. ``loss_fn`` receives the
            ``LightningModule`` itself: under ``FSDPStrategy`` (FSDP1), whose root wrapper holds
            the flat parameters, call the model through ``pl_module.trainer.strategy.model``.
        input_key: where the inputs are in a batch (index or key; see ``BatchAdapter``).
        target_key: where the targets are in a batch.
        train_dataset: members are drawn from it (default: the train dataloader's dataset);
            pass the training data with validation transforms if the dataset augments.
        val_dataset: non-members are drawn from it (default: the first validation dataloader's).
        batch_size: the largest batch size of the pass (default: each dataloader's).
        seed: seed of the subsets: a generator seeded with it draws
            ``randperm(len(train))[:n]``, then ``randperm(len(val))[:n]``.

    Raises:
        ValueError: for a bad ``subset_size``, ``every_n_evals`` or ``batch_size``, or
            ``input_key``/``target_key`` together with ``loss_fn``.
        RuntimeError: at fit start, when the module has no ``validation_step`` (no validation,
            so no audit) or the training dataset is iterable and ``train_dataset=`` is not given;
            at the first audit, when the validation dataset is iterable and ``val_dataset=`` is
            not given, when the batch layout is unknown, or when the losses are not one per
            sample.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> audit = MembershipInferenceAudit(subset_size=1000)
        >>> trainer = Trainer(callbacks=[audit], logger=False)
        >>> audit.state_key == MembershipInferenceAudit(subset_size=100).state_key
        False

    Logged metrics:
        - ``reg/privacy/auc``: ROC AUC of the attack (0.5: no better than chance).
        - ``reg/privacy/advantage``: max over thresholds of TPR - FPR (0: no advantage).
        - ``reg/privacy/tpr_at_1pct_fpr``: best TPR with FPR <= 1% (NaN under 100 non-members).
        - ``reg/privacy/tpr_at_0.1pct_fpr``: the same at 0.1% (NaN under 1000 non-members).
    """

    def __init__(
        self,
        subset_size: int = 1000,
        every_n_evals: int = 1,
        loss_fn: LossFn | None = None,
        input_key: int | str | None = None,
        target_key: int | str | None = None,
        train_dataset: Dataset | None = None,
        val_dataset: Dataset | None = None,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        for name, value in (("subset_size", subset_size), ("every_n_evals", every_n_evals)):
            if type(value) is not int or value < 1:  # bool is no count
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
            raise ValueError(f"`batch_size` must be an integer >= 1 or None, got {batch_size!r}.")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be callable(pl_module, batch), got {loss_fn!r}.")
        if loss_fn is not None and (input_key is not None or target_key is not None):
            raise ValueError(
                "`input_key`/`target_key` are only used by the default cross-entropy loss; your "
                "`loss_fn` reads the batch itself. Pass one or the other."
            )
        self.subset_size, self.every_n_evals, self.seed = subset_size, every_n_evals, seed
        self.loss_fn, self.adapter = loss_fn, BatchAdapter(input_key, target_key)
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.batch_size = batch_size
        self._roc = BinaryROC(thresholds=None, normalization=None)  # scores are -loss: no sigmoid
        # Lightning reads `state_key` at every hook call: built once
        self._state_key = self._generate_state_key(
            subset_size=subset_size, every_n_evals=every_n_evals, seed=seed
        )
        self._reset_run()

    def _reset_run(self) -> None:
        """Forget everything of a previous fit (its count, its data)."""
        self._loaders: tuple[DataLoader, DataLoader] | None = None
        self._n = 0
        self._evals = 0  # validations of this fit so far (not sanity checks)
        self._audited: tuple[int, int] | None = None  # the validation last audited

    def regularization_settings(self) -> dict[str, Any]:
        """This callback's settings, for the TensorBoard hparams view."""
        return {f"MembershipInferenceAudit/{k}": getattr(self, k) for k in _SETTINGS}

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    # -------------------------------------------------------------------------------- subsets
    def _dataset(self, trainer: pl.Trainer, arg: str) -> Any:
        given = self.train_dataset if arg == "train_dataset" else self.val_dataset
        data: Any
        if given is not None:
            data = given
        elif arg == "train_dataset":
            data = getattr(trainer.train_dataloader, "dataset", None)
        else:
            data = getattr(_first(trainer.val_dataloaders), "dataset", None)
        if not is_map_style(data):
            what = type(data).__name__ if data is not None else "no single dataset"
            raise RuntimeError(
                "MembershipInferenceAudit needs map-style training and validation datasets (with "
                f"`__len__` and `__getitem__`) to draw fixed subsets from, but got {what} for "
                f"`{arg}`. Pass `{arg}=` (the data with validation transforms)."
            )
        return data

    def _subset_loaders(self, trainer: pl.Trainer) -> tuple[DataLoader, DataLoader]:
        if self._loaders is not None:
            return self._loaders
        train, val = self._dataset(trainer, "train_dataset"), self._dataset(trainer, "val_dataset")
        n = min(self.subset_size, len(train), len(val))
        generator = torch.Generator().manual_seed(self.seed)  # the global RNG stays untouched
        members = draw_indices(train, n, generator)
        nonmembers = draw_indices(val, n, generator)
        self._n = n
        like = (trainer.train_dataloader, _first(trainer.val_dataloaders))
        self._loaders = (
            self._loader(trainer, train, members, like[0]),
            self._loader(trainer, val, nonmembers, like[1]),
        )
        return self._loaders

    def _loader(self, trainer: pl.Trainer, data: Any, indices: Tensor, like: Any) -> DataLoader:
        return subset_loader(
            data, indices, rank=trainer.global_rank, world_size=trainer.world_size,
            batch_size=self.batch_size or getattr(like, "batch_size", None) or 64, like=like,
            seed=self.seed,
        )  # fmt: skip

    # ----------------------------------------------------------------------------- lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # A new fit starts clean; a resumed one gets its count back from the checkpoint, which
        # Lightning loads after `setup`.
        self._reset_run()
        if not is_overridden("validation_step", pl_module):
            raise RuntimeError(
                "MembershipInferenceAudit audits after each validation, but "
                f"{type(pl_module).__name__} defines no `validation_step`, so Lightning never "
                "validates. Add a `validation_step` (and a validation dataloader), or remove the "
                "audit."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The earliest hook where the train dataloader is loaded: fail before the first step.
        self._dataset(trainer, "train_dataset")
        if self.val_dataset is not None or trainer.val_dataloaders is not None:
            self._subset_loaders(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._loaders = None  # nothing of this fit's data is kept

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._evals += 1

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.evaluate_after_validation(trainer, pl_module)

    # ------------------------------------------------------------------------------- the audit
    def evaluate_after_validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Audit the latest validation of ``fit`` if it is due and has not been audited yet.

        Called by this callback's own ``on_validation_end``. A callback that reads
        ``reg/privacy/...`` in its ``on_validation_end`` (such as
        :class:`lightning_reg.EarlyStopping`) calls it first, so that it sees this validation's
        values whatever the order of the callbacks. It is idempotent: one audit per due
        validation, keyed on ``trainer.global_step`` and a count of validations. It does nothing
        during the sanity check, outside ``fit``, or for validations ``every_n_evals`` skips.

        Args:
            trainer: the running trainer.
            pl_module: the module being fitted.
        """
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        key = (trainer.global_step, self._evals)
        if self._evals == 0 or self._evals % self.every_n_evals or key == self._audited:
            return
        scalars = {f"reg/privacy/{k}": v for k, v in self._audit(trainer, pl_module).items()}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scalars.items()})
        log_scalars(trainer, scalars)
        self._audited = key

    def _audit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        loaders = self._subset_loaders(trainer)
        roc = self._roc.to(pl_module.device)
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:  # the weights validation scored: the average, beside Lightning's weight averaging
            with validated_weights(trainer_callbacks(trainer), pl_module), torch.no_grad():
                for loader, label in zip(loaders, (1, 0), strict=True):
                    for batch in loader:
                        losses = self._losses(trainer, pl_module, batch).float()
                        roc.update(-losses, torch.full_like(losses, label, dtype=torch.long))
            fpr, tpr, _ = roc.compute()  # gathers every rank's scores
        finally:
            roc.reset()
            for module, training in modes.items():
                module.training = training
        return attack_metrics(fpr, tpr, self._n)

    def _losses(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        # Lightning's evaluation path for a batch (loops/evaluation_loop.py, `_evaluation_step`)
        batch = trainer.precision_plugin.convert_input(batch)
        batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        with trainer.precision_plugin.val_step_context():
            losses = self._loss(trainer, pl_module, batch)
        if not isinstance(losses, Tensor) or losses.ndim != 1:
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise RuntimeError(
                f"MembershipInferenceAudit needs one loss per sample (shape (N,)), got {shape}; "
                "use reduction='none' and average any other dimension inside `loss_fn`."
            )
        return losses.detach()

    def _loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
        if self.loss_fn is not None:
            return self.loss_fn(pl_module, batch)
        try:
            x, y = self.adapter.split(batch)
        except ValueError as err:
            raise RuntimeError(
                "MembershipInferenceAudit could not find inputs and targets in the batch; "
                "pass `input_key=`/`target_key=`, or `loss_fn(pl_module, batch)` returning "
                "per-sample losses."
            ) from err
        # the strategy's wrapper (DDP, FSDP) runs the module's forward, as in Lightning's steps
        model = trainer.strategy.model or pl_module
        try:
            logits = model(x)
        except TypeError as err:  # e.g. a forward that also takes the targets (teacher forcing)
            raise RuntimeError(
                "MembershipInferenceAudit's default loss calls your model with the inputs alone, "
                f"`model(inputs)`, which failed for {type(pl_module).__name__} ({err}). Pass "
                "`loss_fn(pl_module, batch)` returning one loss per sample (for a sequence "
                "model, e.g. the mean token loss of each sequence)."
            ) from err
        return F.cross_entropy(logits, y, reduction="none")

    # ----------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"evals": self._evals}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._evals = int(state_dict.get("evals", 0))


def _first(loaders: Any) -> Any:
    """The first of several validation dataloaders (a list or a dict of them), or the only one."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, Sequence):
        return loaders[0] if loaders else None
    return loaders
