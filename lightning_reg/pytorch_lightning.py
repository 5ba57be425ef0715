"""lightning-reg for projects on the standalone ``pytorch_lightning`` package.

Projects that ``import pytorch_lightning as pl`` import the callbacks from here::

    from lightning_reg.pytorch_lightning import EarlyStopping, Mixup, RegularizationMonitor

``EarlyStopping`` is the one class that differs: Lightning's Trainer type-checks early-stopping
callbacks against *its own package's* ``EarlyStopping`` (it runs them after the module's
``on_train_epoch_end`` and lists them in ``trainer.early_stopping_callback``), so this one is built
on ``pytorch_lightning.callbacks.EarlyStopping``. It shares all its code with
:class:`lightning_reg.EarlyStopping` through a mixin, so arguments, behaviour, logged metrics,
``state_key`` and checkpoint contents are the same; each refuses the other package's Trainer with
a ``TypeError`` at setup. Every other name is the very object exported by ``lightning_reg``: the
Trainer calls their hooks by name, and their own type checks (strategies, loggers, callbacks)
recognise either package.

Requires the ``pytorch-lightning`` distribution beside ``lightning`` (which the library imports
everywhere else).
"""

from __future__ import annotations

try:
    from pytorch_lightning.callbacks import EarlyStopping as _PLEarlyStopping
    from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason
except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "`lightning_reg.pytorch_lightning` is for projects on the standalone `pytorch_lightning` "
        "package, which is not installed. Install it (`pip install pytorch-lightning`), or, with "
        "`lightning.pytorch`, import the callbacks from `lightning_reg`."
    ) from error

from lightning_reg import (
    BatchAdapter,
    CalibrationMonitor,
    GeneralizationGapMonitor,
    LabelSmoothing,
    MCDropoutPrediction,
    MembershipInferenceAudit,
    Mixup,
    ProximalSparsity,
    RegularizationMonitor,
    RegularizedModule,
    SharpnessAwareMinimization,
    SpectralNormalization,
    StochasticDepth,
    WeightDecayExclusion,
)
from lightning_reg.early_stopping import _RestoreBestState

__all__ = [
    "SAM",
    "BatchAdapter",
    "CalibrationMonitor",
    "EarlyStopping",
    "GeneralizationGapMonitor",
    "LabelSmoothing",
    "MCDropoutPrediction",
    "MembershipInferenceAudit",
    "Mixup",
    "ProximalSparsity",
    "RegularizationMonitor",
    "RegularizedModule",
    "SharpnessAwareMinimization",
    "SpectralNormalization",
    "StochasticDepth",
    "WeightDecayExclusion",
]

SAM = SharpnessAwareMinimization


# mypy checks the mixin against lightning.pytorch's class; the two packages' signatures differ only
# in their own Trainer and module types
class EarlyStopping(_RestoreBestState, _PLEarlyStopping):  # type: ignore[misc]
    r""":class:`lightning_reg.EarlyStopping`, built on ``pytorch_lightning``'s ``EarlyStopping``.

    For a ``pytorch_lightning.Trainer``: the Trainer recognises it as its early-stopping callback
    (``trainer.early_stopping_callback``; with ``check_on_train_epoch_end`` it runs after the
    module's ``on_train_epoch_end``, as Lightning's own does), and ``stopping_reason`` holds
    ``pytorch_lightning``'s ``EarlyStoppingReason``. Arguments, attributes, logged metrics,
    ``state_key`` and checkpoint contents are those of :class:`lightning_reg.EarlyStopping`, whose
    documentation applies word for word; checkpoints written with either class resume with the
    other.

    Raises:
        TypeError: at ``setup``, with a ``lightning.pytorch`` Trainer (use
            ``from lightning_reg import EarlyStopping`` there).

    Example:
        >>> from pytorch_lightning import Trainer
        >>> from lightning_reg.pytorch_lightning import EarlyStopping
        >>> early_stopping = EarlyStopping("val_loss", patience=5)
        >>> trainer = Trainer(callbacks=[early_stopping], logger=False)
        >>> trainer.early_stopping_callback is early_stopping
        True
    """

    _reasons = EarlyStoppingReason
    # this package's enum, for type checkers too (the mixin is typed on lightning.pytorch's class)
    stopping_reason: EarlyStoppingReason  # type: ignore[assignment]
