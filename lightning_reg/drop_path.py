"""Stochastic depth (drop path): the math and the model surgery, without any Lightning import.

- :func:`drop_path`: per-sample drop of a residual branch's output, survivors scaled by
  ``1 / (1 - rate)`` so the expectation is unchanged (timm's semantics, with an optional generator).
- :func:`depth_rates`: Huang et al.'s linear rule, block ``l`` of ``L`` gets ``rate * l / L``.
- :func:`scheduled_rate`: the final block's rate at an epoch (off, then a linear warm-up).
- :func:`find_drop_path_modules` / :func:`find_residual_branches`: what can carry the drop.
- :class:`BranchDrop`: a forward hook dropping a branch's output, for modules without drop path.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "BlockSelector",
    "BranchDrop",
    "DropPathModule",
    "RandomSource",
    "depth_rates",
    "drop_path",
    "drop_path_blocks",
    "find_drop_path_modules",
    "find_residual_branches",
    "scheduled_rate",
    "step_seed",
    "torchvision_branch_end",
]

# (name, module) -> whether the module's output is a residual branch to drop
BlockSelector = Callable[[str, nn.Module], bool]

# drop-path module classes (by name) and the attribute holding their rate
_RATE_ATTRIBUTES = {"DropPath": "drop_prob", "StochasticDepth": "p"}
# torchvision's residual blocks (by name, in any `torchvision.models...` module) and the last
# module of their residual branch
_TORCHVISION_BRANCH_ENDS = {"BasicBlock": "bn2", "Bottleneck": "bn3"}


def drop_path(
    x: Tensor, rate: float, training: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Zero whole samples of ``x`` with probability ``rate``; scale the rest by ``1/(1-rate)``.

    The same as timm's ``drop_path(x, rate, training, scale_by_keep=True)``: one Bernoulli draw per
    sample (the first dimension), so a dropped sample's residual branch contributes nothing and
    ``E[drop_path(x)] = x``. Outside training, or with ``rate == 0``, ``x`` itself is returned.

    Args:
        x: a branch's output, samples along dimension 0.
        rate: drop probability in ``[0, 1]`` (``1`` drops everything, without scaling).
        training: apply the drop; ``False`` is the identity (inference is unchanged).
        generator: the random source (on ``x``'s device); default torch's global generator.

    Raises:
        ValueError: if ``rate`` is outside ``[0, 1]``.

    Example:
        >>> x = torch.ones(4, 3)
        >>> out = drop_path(x, 0.5, generator=torch.Generator().manual_seed(0))
        >>> sorted(set(out[:, 0].tolist())) in ([0.0, 2.0], [0.0], [2.0])
        True
        >>> drop_path(x, 0.5, training=False) is x
        True
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"The drop rate must be in [0, 1], got {rate}.")
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep, generator=generator)
    if keep > 0.0:
        mask.div_(keep)
    return x * mask


def depth_rates(rate: float, num_blocks: int) -> list[float]:
    """Huang et al.'s linear rule: block ``l`` (1-based) of ``L`` gets ``rate * l / L``.

    Example:
        >>> depth_rates(0.5, 4)
        [0.125, 0.25, 0.375, 0.5]
    """
    if num_blocks < 0:
        raise ValueError(f"`num_blocks` must be >= 0, got {num_blocks}.")
    return [rate * (index + 1) / num_blocks for index in range(num_blocks)]


def scheduled_rate(
    epoch: int, final_rate: float, start_epoch: int = 0, warmup_epochs: int = 0
) -> float:
    """The final block's rate at ``epoch`` (0-based).

    Off (0) for epochs ``< start_epoch``; then ``final_rate * k / warmup_epochs`` at the ``k``-th
    epoch of the warm-up (``k = 1 .. warmup_epochs``), and ``final_rate`` from epoch
    ``start_epoch + warmup_epochs - 1`` on.

    Example:
        >>> [scheduled_rate(e, 0.2, start_epoch=1, warmup_epochs=2) for e in range(5)]
        [0.0, 0.1, 0.2, 0.2, 0.2]
    """
    if epoch < start_epoch:
        return 0.0
    if warmup_epochs <= 0:
        return final_rate
    return final_rate * min(1.0, (epoch - start_epoch + 1) / warmup_epochs)


@dataclass(frozen=True)
class DropPathModule:
    """A drop-path module found in a model: its name, its block (parent) and its rate attribute."""

    name: str
    block: str
    module: nn.Module
    attribute: str

    @property
    def rate(self) -> float:
        """The module's current rate."""
        return float(getattr(self.module, self.attribute))

    def set_rate(self, rate: float) -> None:
        """Set the module's rate (what its own forward reads)."""
        setattr(self.module, self.attribute, rate)


def find_drop_path_modules(model: nn.Module) -> list[DropPathModule]:
    """Drop-path modules of ``model``, in registration order.

    timm's ``DropPath`` (rate ``drop_prob``) and torchvision's ``StochasticDepth`` (``p``),
    recognised by class name (in the MRO) and rate attribute.
    """
    found = []
    for name, module in model.named_modules():
        for cls in type(module).__mro__:
            attribute = _RATE_ATTRIBUTES.get(cls.__name__)
            if attribute is not None and isinstance(getattr(module, attribute, None), float | int):
                found.append(DropPathModule(name, name.rpartition(".")[0], module, attribute))
                break
    return found


def drop_path_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks that have a drop-path slot, in registration order.

    A slot is a drop-path module, or an attribute named ``drop_path*`` holding ``nn.Identity`` or
    ``None``: timm builds those where its own rate is 0 (always the first block, every block with
    ``drop_path_rate=0``), so they count for the depth ``L`` but cannot be dropped.
    """
    parents = {found.block for found in find_drop_path_modules(model)}
    blocks = []
    for name, module in model.named_modules():
        slots = [value for key, value in vars(module).items() if key.startswith("drop_path")]
        slots += [child for key, child in module.named_children() if key.startswith("drop_path")]
        empty = any(value is None or isinstance(value, nn.Identity) for value in slots)
        if name in parents or empty:
            blocks.append(name)
    return blocks


def torchvision_branch_end(module: nn.Module) -> str | None:
    """The attribute naming the last module of a torchvision ResNet block's residual branch."""
    for cls in type(module).__mro__:
        end = _TORCHVISION_BRANCH_ENDS.get(cls.__name__)
        if end is not None and cls.__module__.startswith("torchvision.models"):
            return end if isinstance(getattr(module, end, None), nn.Module) else None
    return None


def find_residual_branches(
    model: nn.Module, blocks: Sequence[str] | BlockSelector | None = None
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` pairs whose output is a residual branch, in registration order.

    With ``blocks`` (module-name patterns, ``fnmatch`` style, or a ``(name, module) -> bool``
    callable) exactly the chosen modules; without, the branch ends of torchvision's ResNet blocks
    (``bn2`` of ``BasicBlock``, ``bn3`` of ``Bottleneck``).
    """
    if blocks is None:
        found = []
        for name, module in model.named_modules():
            end = torchvision_branch_end(module)
            if end is not None:
                found.append((f"{name}.{end}" if name else end, getattr(module, end)))
        return found
    if callable(blocks):
        return [(name, m) for name, m in model.named_modules() if name and blocks(name, m)]
    patterns = list(blocks)
    return [
        (name, module)
        for name, module in model.named_modules()
        if name and any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    ]


class RandomSource:
    """One generator per device, reseeded from an integer key at each training step.

    Pickles and deep-copies as its seed only (generators are rebuilt), so a module carrying hooks
    that use it stays copyable.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._seeded: set[torch.device] = set()

    def reseed(self, seed: int) -> None:
        """Use ``seed`` from now on: each device's generator is reseeded at its next draw."""
        self.seed, self._seeded = seed, set()

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator of ``device``, seeded with the current seed."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        if device not in self._seeded:
            gen.manual_seed(self.seed)
            self._seeded.add(device)
        return gen

    def __getstate__(self) -> dict[str, int]:
        return {"seed": self.seed}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["seed"])  # type: ignore[misc]


class BranchDrop:
    """Forward hook: drops the hooked module's output per sample while the module trains.

    The hooked module must produce the residual branch (before it is added to the shortcut).
    Python floats only: no host-device synchronisation.
    """

    def __init__(self, source: RandomSource, rate: float = 0.0) -> None:
        self.source, self.rate = source, rate

    def __call__(self, module: nn.Module, args: object, output: Tensor) -> Tensor | None:
        """The dropped output in training; ``None`` (output unchanged) otherwise."""
        if not module.training or self.rate <= 0.0 or not isinstance(output, Tensor):
            return None
        return drop_path(output, self.rate, True, self.source.generator(output.device))


def step_seed(seed: int, rank: int, step: int, batch_idx: int) -> int:
    """A 63-bit seed from the run's seed, the global rank, the global step and the batch index."""
    value = seed & 0xFFFFFFFFFFFF
    for part in (rank, step, batch_idx):
        value = (value * 0x9E3779B97F4A7C15 + part + 1) % (1 << 63)
    return value
