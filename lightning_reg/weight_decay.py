"""Weight-decay exclusion: decay weights, not biases, normalization parameters or declared tensors.

Method card:
    What it does: splits the trainable parameters into a decayed group and an undecayed group
    (``weight_decay=0``). Excluded by default: every bias, every parameter of a normalization layer
    (BatchNorm/InstanceNorm/LayerNorm/GroupNorm/LocalResponseNorm/RMSNorm and any module whose
    class name contains the word ``Norm``), every other parameter with fewer than two dimensions,
    and the names a module returns from ``no_weight_decay()`` (timm's convention; globs allowed).
    Suggested values: AdamW ``weight_decay`` 0.01-0.1 for transformers, SGD 1e-4-5e-4 for CNNs.
    When it hurts: decaying normalization gains and biases pulls them to zero, which fights the
    normalization and costs accuracy (Goyal et al. 2017; Loshchilov & Hutter 2019).
    How it applies: call :func:`param_groups` in ``configure_optimizers``, or add the
    :class:`~lightning_reg.WeightDecayExclusion` callback (``weight_decay_exclusion.py``).

This module is the functional core: no Lightning import.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "WeightDecaySplit",
    "coupled_weight_decay_warning",
    "is_norm_module",
    "param_groups",
    "split_parameters",
]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
# Rules in the order they are reported: a parameter excluded by several is counted under the first.
RULES = ("no_weight_decay", "pattern", "norm", "embedding", "bias", "1d")


_NORM_NAME = re.compile(r"Norm(?![a-z])")  # LayerNorm, RMSNorm2d, FusedLayerNorm; not "Normal..."


def is_norm_module(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer: a torch norm, or a class named ``*Norm*``."""
    return isinstance(module, _NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


def _is_bias(leaf: str) -> bool:
    # bias, in_proj_bias, bias_k/bias_v (nn.MultiheadAttention)
    return leaf == "bias" or leaf.endswith("_bias") or leaf.startswith("bias_")


@dataclass
class WeightDecaySplit:
    """Which parameters decay, which do not, and why.

    Attributes:
        decay: ``(name, parameter)`` pairs that keep the optimizer's weight decay.
        no_decay: ``(name, parameter)`` pairs excluded from it.
        reasons: for each excluded name, the rule that excluded it (one of ``RULES``).
    """

    decay: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    no_decay: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{"decay": (tensors, elements), "no_decay": ..., "<rule>": ...}`` for reporting."""
        out = {
            "decay": _count(p for _, p in self.decay),
            "no_decay": _count(p for _, p in self.no_decay),
        }
        params = dict(self.no_decay)
        for rule in RULES:
            out[rule] = _count(params[n] for n, r in self.reasons.items() if r == rule)
        return out

    def summary(self) -> str:
        """One line: how many tensors and elements decay, and what was excluded by which rule."""
        counts = self.counts()
        rules = ", ".join(
            f"{rule} {n} ({e:,})" for rule in RULES for n, e in [counts[rule]] if n
        )  # fmt: skip
        (dn, de), (xn, xe) = counts["decay"], counts["no_decay"]
        return (
            f"decayed {dn} tensors ({de:,} parameters); excluded {xn} tensors ({xe:,} parameters)"
            + (f": {rules}" if rules else "")
        )


def _count(params: Iterable[Tensor]) -> tuple[int, int]:
    tensors = list(params)
    return len(tensors), sum(p.numel() for p in tensors)


def split_parameters(
    module: nn.Module,
    *,
    exclude_bias: bool = True,
    exclude_norm: bool = True,
    exclude_1d: bool = True,
    exclude_embeddings: bool = False,
    use_no_weight_decay_hook: bool = True,
    exclude: Sequence[str] = (),
    include_frozen: bool = False,
) -> WeightDecaySplit:
    """Split ``module``'s parameters into decayed and excluded ones (see :func:`param_groups`).

    Raises:
        TypeError: if a module's ``no_weight_decay()`` does not return names.
    """
    if isinstance(exclude, str):
        raise TypeError(f"`exclude` takes a list of glob patterns, got the string {exclude!r}.")
    aliases = _aliases(module)
    declared = _declared_names(module) if use_no_weight_decay_hook else []
    split = WeightDecaySplit()
    for name, param in module.named_parameters():  # tied parameters come once...
        if not (param.requires_grad or include_frozen):
            continue
        places = aliases[id(param)]  # ...but every name and owner they have is checked
        embedding = nn.Embedding | nn.EmbeddingBag
        checks = (
            ("no_weight_decay", any(_matches(n, declared) for n, _ in places)),
            ("pattern", any(_matches(n, exclude) for n, _ in places)),
            ("norm", exclude_norm and any(is_norm_module(m) for _, m in places)),
            ("embedding", exclude_embeddings and any(isinstance(m, embedding) for _, m in places)),
            ("bias", exclude_bias and any(_is_bias(n.rsplit(".", 1)[-1]) for n, _ in places)),
            ("1d", exclude_1d and param.ndim <= 1),
        )
        rule = next((rule for rule, hit in checks if hit), None)
        if rule is None:
            split.decay.append((name, param))
        else:
            split.no_decay.append((name, param))
            split.reasons[name] = rule
    return split


def param_groups(
    module: nn.Module,
    weight_decay: float,
    *,
    exclude_bias: bool = True,
    exclude_norm: bool = True,
    exclude_1d: bool = True,
    exclude_embeddings: bool = False,
    use_no_weight_decay_hook: bool = True,
    exclude: Sequence[str] = (),
    include_frozen: bool = False,
) -> list[dict[str, object]]:
    """Optimizer param groups: ``[{decayed, weight_decay}, {excluded, weight_decay=0}]``.

    Every trainable parameter lands in exactly one group; tied parameters appear once; an empty
    group is left out. Pass the result to any torch optimizer.

    Args:
        module: the model (for example your LightningModule).
        weight_decay: the decay of the first group.
        exclude_bias: exclude every bias (``bias``, ``*_bias``, ``bias_*`` such as attention's
            ``in_proj_bias``/``bias_k``).
        exclude_norm: exclude all parameters of normalization layers (see :func:`is_norm_module`).
        exclude_1d: exclude every parameter with fewer than two dimensions (gains, scales, ...);
            this also catches user-defined norm layers whatever their class name.
        exclude_embeddings: exclude the weights of ``nn.Embedding``/``nn.EmbeddingBag``.
        use_no_weight_decay_hook: exclude the names returned by ``no_weight_decay()`` of the
            module or any submodule (names relative to that submodule; glob patterns allowed).
        exclude: extra glob patterns on full parameter names, e.g. ``["*pos_embed"]``.
        include_frozen: also place parameters with ``requires_grad=False``.

    Raises:
        ValueError: if ``weight_decay`` is negative.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> groups = param_groups(model, weight_decay=0.05)
        >>> [(len(g["params"]), g["weight_decay"]) for g in groups]
        [(2, 0.05), (4, 0.0)]
        >>> optimizer = torch.optim.AdamW(groups, lr=1e-3)
    """
    if weight_decay < 0:
        raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
    split = split_parameters(
        module, exclude_bias=exclude_bias, exclude_norm=exclude_norm, exclude_1d=exclude_1d,
        exclude_embeddings=exclude_embeddings, use_no_weight_decay_hook=use_no_weight_decay_hook,
        exclude=exclude, include_frozen=include_frozen,
    )  # fmt: skip
    groups: list[dict[str, object]] = []
    if split.decay:
        groups.append({"params": [p for _, p in split.decay], "weight_decay": weight_decay})
    if split.no_decay:
        groups.append({"params": [p for _, p in split.no_decay], "weight_decay": 0.0})
    return groups


def _aliases(module: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """For each parameter (by ``id``), every ``(full name, owning module)`` it is reachable by."""
    places: dict[int, list[tuple[str, nn.Module]]] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for leaf, param in mod._parameters.items():
            if param is not None:
                name = f"{mod_name}.{leaf}" if mod_name else leaf
                places.setdefault(id(param), []).append((name, mod))
    return places


def _declared_names(module: nn.Module) -> list[str]:
    """Names (or patterns) declared by ``no_weight_decay()`` hooks, made relative to ``module``."""
    names: list[str] = []
    for mod_name, mod in module.named_modules():
        hook = getattr(mod, "no_weight_decay", None)
        if not callable(hook):
            continue
        declared = hook()
        if isinstance(declared, str) or not isinstance(declared, Iterable):
            raise TypeError(
                f"{type(mod).__name__}.no_weight_decay() must return a set or list of parameter "
                f"names (glob patterns allowed), got {declared!r}."
            )
        names += [f"{mod_name}.{n}" if mod_name else str(n) for n in declared]
    return names


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


_COUPLED_L2 = (
    torch.optim.Adam,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
)


def coupled_weight_decay_warning(optimizer: torch.optim.Optimizer) -> str | None:
    """A warning text if ``optimizer`` applies weight decay as coupled L2 in an adaptive method.

    Adam-style optimizers add ``weight_decay * w`` to the gradient, which the adaptive step then
    rescales per coordinate: weights with large gradients are barely decayed. AdamW decouples it.

    Example:
        >>> w = nn.Parameter(torch.zeros(2, 2))
        >>> coupled_weight_decay_warning(torch.optim.AdamW([w], weight_decay=0.01)) is None
        True
        >>> "AdamW" in coupled_weight_decay_warning(torch.optim.Adam([w], weight_decay=0.01))
        True
    """
    if not isinstance(optimizer, _COUPLED_L2):
        return None
    coupled = [
        g for g in optimizer.param_groups
        if g.get("weight_decay", 0) and not g.get("decoupled_weight_decay", False)
    ]  # fmt: skip
    if not coupled:
        return None
    name = type(optimizer).__name__
    return (
        f"{name} applies `weight_decay` as an L2 term added to the gradient, which its adaptive "
        "step rescales, so weights with large gradients are barely regularized. Use "
        f"torch.optim.AdamW (or `{name}(..., decoupled_weight_decay=True)` where supported) for "
        "decoupled weight decay; with Adam, AdamW's usual values (0.01-0.1) are too strong as L2."
    )
