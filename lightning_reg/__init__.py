"""lightning-reg: regularization for PyTorch Lightning, as callbacks.

Add the callbacks to ``Trainer(callbacks=[...])``; your LightningModule stays as it is. Projects on
the standalone ``pytorch_lightning`` package import them from :mod:`lightning_reg.pytorch_lightning`
(its ``EarlyStopping`` is built on that package's class; the other callbacks are the same objects).
"""

from lightning_reg._batch import BatchAdapter
from lightning_reg.calibration import calibration_bins, expected_calibration_error
from lightning_reg.calibration_monitor import CalibrationMonitor
from lightning_reg.early_stopping import EarlyStopping
from lightning_reg.gap import GeneralizationGapMonitor
from lightning_reg.label_smoothing import LabelSmoothing
from lightning_reg.mc_dropout import MCDropoutPrediction
from lightning_reg.mixin import RegularizedModule
from lightning_reg.mixing import MixPlan, draw_mix_plan, mix_inputs, mixup_batch, smooth_targets
from lightning_reg.mixup import Mixup
from lightning_reg.monitor import RegularizationMonitor, decay_metrics, weight_statistics
from lightning_reg.privacy import MembershipInferenceAudit, loss_attack_metrics
from lightning_reg.sam import SAM, SharpnessAwareMinimization
from lightning_reg.sam_functional import sam_perturbation, sam_perturbed
from lightning_reg.sparsity import ProximalSparsity, prox_elastic_net, prox_group_lasso, prox_l1
from lightning_reg.spectral import (
    apply_spectral_norm,
    constrained_spectral_norm,
    estimated_sigma,
    largest_singular_value,
    select_layers,
)
from lightning_reg.spectral_norm import SpectralNormalization
from lightning_reg.stochastic_depth import StochasticDepth
from lightning_reg.uncertainty import (
    MCDropoutResult,
    dropout_active,
    mc_dropout_predict,
    mutual_information,
    predictive_entropy,
)
from lightning_reg.weight_decay import (
    WeightDecaySplit,
    coupled_weight_decay_warning,
    param_groups,
    split_parameters,
)
from lightning_reg.weight_decay_exclusion import WeightDecayExclusion

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "BatchAdapter",
    "CalibrationMonitor",
    "EarlyStopping",
    "GeneralizationGapMonitor",
    "LabelSmoothing",
    "MCDropoutPrediction",
    "MCDropoutResult",
    "MembershipInferenceAudit",
    "MixPlan",
    "Mixup",
    "ProximalSparsity",
    "RegularizationMonitor",
    "RegularizedModule",
    "SharpnessAwareMinimization",
    "SpectralNormalization",
    "StochasticDepth",
    "WeightDecayExclusion",
    "WeightDecaySplit",
    "__version__",
    "apply_spectral_norm",
    "calibration_bins",
    "constrained_spectral_norm",
    "coupled_weight_decay_warning",
    "decay_metrics",
    "draw_mix_plan",
    "dropout_active",
    "estimated_sigma",
    "expected_calibration_error",
    "largest_singular_value",
    "loss_attack_metrics",
    "mc_dropout_predict",
    "mix_inputs",
    "mixup_batch",
    "mutual_information",
    "param_groups",
    "predictive_entropy",
    "prox_elastic_net",
    "prox_group_lasso",
    "prox_l1",
    "sam_perturbation",
    "sam_perturbed",
    "select_layers",
    "smooth_targets",
    "split_parameters",
    "weight_statistics",
]
