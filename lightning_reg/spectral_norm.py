"""Spectral normalization of chosen layers, applied by a callback before the optimizers are built.

Method card:
    What it does: divides each chosen layer's weight by an estimate of its largest singular value
    (power iteration, ``n_power_iterations`` steps per training forward), so every constrained
    layer is (about) 1-Lipschitz. The whole model's Lipschitz constant is then bounded by the
    product of the unconstrained parts. It is torch's own
    ``torch.nn.utils.parametrizations.spectral_norm``; this callback chooses the layers, applies it
    at the right moment of Lightning's lifecycle and logs the norms.
    Suggested values: GAN discriminators (every Conv/Linear), Lipschitz-bounded or robust models;
    ``n_power_iterations=1`` (the vectors persist across steps, so one step per forward tracks the
    slowly changing weights).
    When it hurts: it limits capacity; on a plain classifier it often costs accuracy unless the
    unconstrained layers (or a learnable output scale) can make up the logit scale. Per training
    forward: ``n_power_iterations`` x two matrix-vector products per layer, the division and its
    backward (a step of the small digits MLP cost 1.2-1.6x a plain one on a CPU). A constrained
    module can no longer be pickled as an object (torch's rule for parametrized modules;
    ``state_dict`` works).
    Papers: Miyato et al., ICLR 2018 (arXiv:1802.05957); Yoshida & Miyato 2017 (arXiv:1705.10941).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_reg._lightning import averaging_callbacks, is_lightning_class
from lightning_reg._utils import trainer_callbacks
from lightning_reg.spectral import (
    apply_spectral_norm,
    constrained_spectral_norm,
    find_spectral_norm,
    largest_singular_value,
    output_dim,
    select_layers,
)

__all__ = ["SpectralNormalization"]


class SpectralNormalization(Callback):
    """Constrain the spectral norm of chosen layers with torch's ``spectral_norm`` parametrization.

    In ``setup`` of ``fit`` (Lightning runs it before ``configure_model``,
    ``configure_optimizers`` and the restore of a checkpoint) the chosen layers get
    ``torch.nn.utils.parametrizations.spectral_norm`` on their ``weight``. So the optimizer holds
    each layer's ``parametrizations.weight.original``, a checkpoint holds ``original`` and the
    power-iteration buffers ``_u``/``_v``, and resuming restores them bitwise. A layer that
    already carries a spectral norm (your own, or this callback's from an earlier fit) keeps it:
    nothing is stacked. Adding one draws ``u``/``v`` from a fork of the global random generator
    (``torch.random.fork_rng``), so your run's random stream is not consumed.

    ``validate``/``test``/``predict`` leave the model as they find it, except to load a checkpoint
    whose state_dict holds constrained keys (``<layer>.parametrizations.weight.original``) for
    chosen layers the model does not constrain (``trainer.validate(fresh_model, ckpt_path=...)``):
    those layers get the spectral norm just before the load (a ``load_state_dict`` pre-hook, as the
    restore comes after ``setup``), and in ``teardown`` it is baked in again
    (``leave_parametrized=True``, eval mode): the model keeps its keys and classes, with the
    checkpoint's constrained weights in effect, as Lightning leaves any checkpoint's weights in the
    model.

    After fit the constraint stays on the model: it is part of the model you trained, and its
    ``state_dict`` matches the checkpoints. With ``remove_at_end=True`` the spectral norms this fit
    added are removed at the end of a successful fit, leaving plain ``weight`` parameters that hold
    the constrained values (``remove_parametrizations(..., leave_parametrized=True)``, computed in
    eval mode): an unmodified architecture loads that ``state_dict``, and the module pickles. When
    fit raises, the model is left as training left it (still constrained), so it matches the
    checkpoints written so far and a resume proceeds. To load one of those checkpoints into a
    fresh model without a Trainer, call ``apply_spectral_norm(select_layers(model, ...))`` first.

    Under a launched strategy (``"ddp_spawn"``, ``"ddp_fork"``, ``"ddp_notebook"``) training
    happens in worker processes and Lightning copies the weights back into your model by name,
    silently skipping names it does not know; the callback therefore always bakes in, at the end
    of such a fit, the spectral norms it added (your model in the main process never had them),
    so the constrained weights do come back. Spectral norms you put on the model yourself stay:
    your model carries them too, and their ``original`` weights come back under the same names.

    With Lightning's ``WeightAveraging``/``EMAWeightAveraging``, list this callback first: the
    averaging callback copies the model in its own ``setup``, and the copy must carry the
    constraint (it then averages ``original``, ``_u`` and ``_v``, and validation uses the averaged
    weight over its averaged estimate). Listed after it, or with ``remove_at_end=True``, the
    combination is refused in ``setup``.

    Args:
        modules: ``fnmatch`` patterns on ``named_modules()`` names (``"net.*"``,
            ``"discriminator.*"``); ``None``: any name.
        types: layer classes to constrain (``(nn.Linear, nn.Conv2d)``); ``None``: any type. A
            layer is chosen when it satisfies both conditions.
        n_power_iterations: power-iteration steps per training forward (>= 1).
        eps: the ``eps`` of ``spectral_norm``.
        log_unconstrained: also log the exact spectral norm of every other 2-D+ ``weight``.
        remove_at_end: remove the spectral norms this fit added at the end of a successful fit.

    Raises:
        ValueError: in ``__init__`` for neither ``modules`` nor ``types``, a string for
            ``modules``, ``n_power_iterations < 1`` or ``eps <= 0``; in ``setup`` for a pattern
            that matches no module (the message lists some names), an empty selection, or a
            chosen module without a 2-D+ ``weight``; in ``setup`` of fit when listed after a
            ``WeightAveraging`` callback, or ``remove_at_end=True`` with one.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> spectral = SpectralNormalization(modules=["net.*"], types=(nn.Linear, nn.Conv2d))
        >>> trainer = Trainer(callbacks=[spectral], logger=False)

    Logged metrics:
        - ``reg/spectral/<layer>``: at each training epoch's end, the exact largest singular value
          of the weight each constrained layer uses, ``W / (u^T W v)``: ~1 (it is
          ``sigma_max(W)`` over the power iteration's estimate).
        - ``reg/spectral_free/<layer>``: with ``log_unconstrained=True``, the exact largest
          singular value of each unconstrained 2-D+ ``weight``, for comparison.
    """

    def __init__(
        self,
        modules: Sequence[str] | None = None,
        types: Sequence[type[nn.Module]] | None = None,
        n_power_iterations: int = 1,
        eps: float = 1e-12,
        log_unconstrained: bool = False,
        remove_at_end: bool = False,
    ) -> None:
        if modules is None and types is None:
            raise ValueError(
                "SpectralNormalization needs `modules` (name patterns such as ['net.*']) and/or "
                "`types` (such as (nn.Linear, nn.Conv2d)) to choose the layers to constrain."
            )
        if isinstance(modules, str):
            raise TypeError(f"`modules` takes a list of patterns, got the string {modules!r}.")
        if types is not None and not all(
            isinstance(t, type) and issubclass(t, nn.Module) for t in types
        ):
            raise TypeError(f"`types` takes nn.Module classes, got {types!r}.")
        if not isinstance(n_power_iterations, int) or n_power_iterations < 1:
            raise ValueError(
                f"`n_power_iterations` must be an integer >= 1, got {n_power_iterations!r}."
            )
        if not eps > 0:
            raise ValueError(f"`eps` must be > 0, got {eps}.")
        self.modules = None if modules is None else list(modules)
        self.types = None if types is None else tuple(types)
        self.n_power_iterations, self.eps = n_power_iterations, eps
        self.log_unconstrained, self.remove_at_end = log_unconstrained, remove_at_end
        type_names = None if self.types is None else [t.__name__ for t in self.types]
        self._state_key = self._generate_state_key(
            modules=self.modules, types=type_names, n_power_iterations=n_power_iterations
        )
        self._constrained: list[str] = []
        self._added: list[str] = []
        self._orders: dict[str, list[str]] = {}
        self._load_hook: RemovableHandle | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    @property
    def constrained_layers(self) -> list[str]:
        """Names of the layers constrained in the current (or last) run."""
        return list(self._constrained)

    def __getstate__(self) -> dict[str, Any]:
        # Lightning attaches the module's bound `log`/`log_dict` to every callback at fit start;
        # they would drag the module along, and torch refuses to pickle a parametrized module.
        # The next fit attaches them again.
        state = {k: v for k, v in vars(self).items() if k not in ("log", "log_dict")}
        return {**state, "_load_hook": None}  # a handle to a hook on the module, during a stage

    def regularization_settings(self) -> dict[str, Any]:
        """This callback's settings, for the TensorBoard hparams view."""
        return {
            "SpectralNorm/layers": len(self._constrained),
            "SpectralNorm/n_power_iterations": self.n_power_iterations,
        }

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._added = []
        if stage != "fit":
            # Leave the model alone unless a checkpoint with constrained layers is loaded into it:
            # the restore comes after `setup` and `trainer.ckpt_path` is only set then, so the
            # state_dict itself is looked at, by a load_state_dict pre-hook (torch's public one).
            self._release_load_hook()
            self._load_hook = pl_module.register_load_state_dict_pre_hook(self._constrain_to_load)
            return
        self._check_weight_averaging(trainer)
        layers = select_layers(pl_module, self.modules, self.types)
        self._constrained = [name for name, _ in layers]
        self._orders = _parameter_orders(layers)
        self._added = apply_spectral_norm(layers, self.n_power_iterations, self.eps)

    def _constrain_to_load(self, module: nn.Module, state_dict: Any, prefix: str, *_: Any) -> None:
        """Constrain the chosen layers whose constrained keys the loaded state_dict holds."""
        layers = select_layers(module, self.modules, self.types)
        wanted = [
            (name, layer) for name, layer in layers
            if f"{prefix}{name}.parametrizations.weight.original" in state_dict
        ]  # fmt: skip
        if wanted:
            self._constrained = [name for name, _ in wanted]
            self._orders.update(_parameter_orders(wanted))
            self._added += apply_spectral_norm(wanted, self.n_power_iterations, self.eps)

    def _release_load_hook(self) -> None:
        hook = getattr(self, "_load_hook", None)
        if hook is not None:
            hook.remove()
        self._load_hook = None

    def _check_weight_averaging(self, trainer: pl.Trainer) -> None:
        callbacks = trainer_callbacks(trainer)
        position = callbacks.index(self) if self in callbacks else len(callbacks)
        averaging = averaging_callbacks(callbacks)
        before = [cb for cb in averaging if callbacks.index(cb) < position]
        if before:
            raise ValueError(
                f"SpectralNormalization is listed after {type(before[0]).__name__} in the "
                "Trainer's callbacks: that callback copies the model in its own `setup`, before "
                "the spectral norm is added, so the averaged copy and the model no longer have the "
                "same tensors. List SpectralNormalization before it: "
                f"`callbacks=[SpectralNormalization(...), {type(before[0]).__name__}(...)]`."
            )
        if averaging and self.remove_at_end:
            raise ValueError(
                f"SpectralNormalization(remove_at_end=True) cannot be combined with "
                f"{type(averaging[0]).__name__}: its averaged copy keeps the spectral norm "
                "(torch's parametrization), and the model without it would no longer match the "
                "copy's tensors at the next validation. Use remove_at_end=False, or bake the "
                "constraint in after fit with `torch.nn.utils.parametrize.remove_parametrizations("
                "layer, 'weight', leave_parametrized=True)`."
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        modules = dict(pl_module.named_modules())
        for name in self._constrained:
            value = constrained_spectral_norm(modules[name])
            pl_module.log(
                f"reg/spectral/{name}", value, on_step=False, on_epoch=True, sync_dist=True
            )
        if not self.log_unconstrained:
            return
        for name, module in modules.items():
            weight = module._parameters.get("weight") if name else None
            if weight is None or weight.ndim < 2 or "parametrizations" in name.split("."):
                continue
            value = largest_singular_value(weight, output_dim(module))
            pl_module.log(
                f"reg/spectral_free/{name}", value, on_step=False, on_epoch=True, sync_dist=True
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Under a launched run (ddp_spawn/ddp_fork/ddp_notebook) Lightning copies the workers'
        # weights back by name with strict=False: the layers this fit added must come back as
        # plain `weight`s (the main process's model never had them constrained); the user's own
        # spectral norms are in the main model too and stay.
        spawned = is_lightning_class(trainer.strategy.launcher, "_MultiProcessingLauncher")
        if self.remove_at_end or spawned:
            _remove(pl_module, self._added, self._orders)
        self._added = []

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            self._restore_after_evaluation(pl_module)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # fit: the model stays constrained (it matches the checkpoints written so far)
        if self._load_hook is not None:  # only set in validate/test/predict
            self._restore_after_evaluation(pl_module)

    def _restore_after_evaluation(self, pl_module: nn.Module) -> None:
        """Undo what a validate/test/predict stage added to load a constrained checkpoint.

        ``leave_parametrized=True``: the model keeps the checkpoint's weights in effect (the
        constrained ones, as Lightning leaves any loaded checkpoint's weights in the model), as
        plain ``weight`` parameters: the keys and classes it was found with.
        """
        self._release_load_hook()
        _remove(pl_module, self._added, self._orders)
        self._added = []


def _remove(pl_module: nn.Module, names: Sequence[str], orders: dict[str, list[str]]) -> None:
    """Replace each layer's spectral norm with a plain ``weight`` holding the constrained value.

    The spectral norm runs in eval mode for it (no extra power-iteration step). torch registers
    the plain ``weight`` last; the layer's parameters are put back in the order they had before
    the spectral norm (``orders``), so ``parameters()``, and an optimizer's state indexed by it,
    keep the order of the unconstrained architecture.
    """
    modules = dict(pl_module.named_modules())
    for name in names:
        module = modules[name]
        norm = find_spectral_norm(module)
        if norm is None:
            continue
        norm.eval()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        params = module._parameters
        order = [k for k in orders.get(name, []) if k in params]
        held = {k: params.pop(k) for k in [*order, *(k for k in list(params) if k not in order)]}
        params.update(held)


def _parameter_orders(layers: Sequence[tuple[str, nn.Module]]) -> dict[str, list[str]]:
    return {name: list(module._parameters) for name, module in layers}
