"""Stochastic depth (drop path): the math and the model surgery, without any Lightning import.

- :func:`drop_path`: per-sample drop of a residual branch's output, survivors scaled by
  ``1 / (1 - rate)`` so the expectation is unchanged (timm's semantics, with an optional generator).
- :func:`depth_rates`: Huang et al.'s linear rule, block ``l`` of ``L`` gets ``rate * l / L``.
- :func:`scheduled_rate`: the final block's rate at an epoch (off, then a linear warm-up).
- :func:`find_drop_path_modules` / :func:`find_residual_branches`: what can carry the drop.
- :class:`BranchDrop`: a forward hook dropping a branch's output, for modules without drop path.
- :class:`BranchSkip`: a forward pre-hook + forward hook pair that runs a torchvision ResNet
  block's branch on the kept samples only, so dropped samples cost no branch compute.
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
    "BranchSkip",
    "DropPathModule",
    "RandomSource",
    "depth_rates",
    "drop_path",
    "drop_path_blocks",
    "find_drop_path_modules",
    "find_residual_branches",
    "scheduled_rate",
    "step_seed",
    "torchvision_branch",
    "torchvision_branch_end",
]

# (name, module) -> whether the module's output is a residual branch to drop
BlockSelector = Callable[[str, nn.Module], bool]

# drop-path module classes (by name) and the attribute holding their rate
_RATE_ATTRIBUTES = {"DropPath": "drop_prob", "StochasticDepth": "p"}
# torchvision's residual blocks (by name, in any `torchvision.models...` module) and the first and
# last modules of their residual branch: `forward` calls `conv1(x)` on the block input `x` and
# adds the shortcut (`x` or `downsample(x)`) to `bn2`/`bn3`'s output; nothing in between mixes
# samples except BatchNorm's batch statistics (torchvision/models/resnet.py, and quantization/)
_TORCHVISION_BRANCH_ENDS = {"BasicBlock": "bn2", "Bottleneck": "bn3"}
_TORCHVISION_BRANCH_START = "conv1"


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


def torchvision_branch(module: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(first, last)`` of a torchvision ResNet block's branch: ``conv1``, ``bn2``/``bn3``."""
    end = torchvision_branch_end(module)
    start = getattr(module, _TORCHVISION_BRANCH_START, None)
    if end is None or not isinstance(start, nn.Module):
        return None
    return start, getattr(module, end)


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
        # whether the hooks drop: set by the callback per training batch (the model's mode then,
        # so a frozen, eval-mode BatchNorm hooked by `blocks=` still drops); None: the hooked
        # module's own `training` decides (the hooks used without the callback)
        self.active: bool | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._seeded: set[torch.device] = set()

    def dropping(self, module: nn.Module) -> bool:
        """Whether a hook on ``module`` drops now (see :attr:`active`)."""
        return module.training if self.active is None else self.active

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

    def keyed_generator(self, device: torch.device, key: int) -> torch.Generator:
        """``device``'s generator reseeded from the current seed and ``key`` (a block's index).

        Reseeded at every call, so the same step and key always give the same draws.
        """
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        self._seeded.discard(device)  # `generator()` reseeds it from the step's seed alone
        return gen.manual_seed(step_seed(self.seed, key, 0, 0))

    def __getstate__(self) -> dict[str, int]:
        return {"seed": self.seed}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["seed"])  # type: ignore[misc]


class BranchDrop:
    """Forward hook: drops the hooked module's output per sample during training batches.

    The hooked module must produce the residual branch (before it is added to the shortcut).
    Python floats only: no host-device synchronisation.
    """

    def __init__(self, source: RandomSource, rate: float = 0.0, index: int = 0) -> None:
        self.source, self.rate, self.index = source, rate, index

    def __call__(self, module: nn.Module, args: object, output: Tensor) -> Tensor | None:
        """The dropped output in training; ``None`` (output unchanged) otherwise."""
        if not self.source.dropping(module) or self.rate <= 0.0 or not isinstance(output, Tensor):
            return None
        generator = self.source.keyed_generator(output.device, self.index)
        return drop_path(output, self.rate, True, generator)


@dataclass(frozen=True)
class _Draw:
    """One block's draw for the forward in progress (set by the pre-hook, read by the hook)."""

    rows: int  # the batch size the block received
    scale: float  # 1 / (1 - rate)
    kept: Tensor | None  # skip path: indices of the kept rows, on the input's device
    mask: Tensor | None  # mask path (too few rows kept): per-sample factor (0 or scale)


class BranchSkip:
    """Stochastic depth that skips the dropped samples' branch compute, with two hooks.

    :meth:`before` is a forward *pre*-hook on the branch's first module (``conv1`` of a
    torchvision block, whose input is the block input ``x``): it draws one keep/drop per sample and
    replaces that input by its kept rows. :meth:`after` is a forward hook on the branch's last
    module (``bn2``/``bn3``): it scatters the kept rows' output, scaled by ``1/(1-rate)``, into a
    full-size tensor of zeros, so the block's own ``out += identity`` adds the shortcut (computed by
    the block from every row) unchanged. The result equals :func:`drop_path` on the full branch,
    except that BatchNorm inside the branch computes its batch statistics (and updates its running
    statistics) over the kept rows only, i.e. over the samples that actually use the branch.
    Inference (``module.training`` false) is untouched.

    Fallbacks: every row kept -> the input is left whole and the output only scaled; fewer than
    :attr:`min_rows` kept (BatchNorm cannot train on 0 or 1 row) -> the whole batch runs the branch
    and its output is multiplied by the mask, as :class:`BranchDrop` does.

    The draw is a function of the step's seed, the block's ``index`` and the batch size only (a
    CPU generator reseeded at every call), so a block run twice in one step (gradient
    checkpointing's recomputation, SAM's second pass) gets the same kept rows again. No
    host-device synchronisation: the indices are computed on the CPU and copied to the device
    asynchronously (from pinned memory on CUDA).
    """

    min_rows = 2

    def __init__(self, source: RandomSource, rate: float = 0.0, index: int = 0) -> None:
        self.source, self.rate, self.index = source, rate, index
        self._draw: _Draw | None = None

    def before(self, module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...] | None:
        """Forward pre-hook: the kept rows of the branch input in training; else ``None``."""
        self._draw = None
        if not self.source.dropping(module) or self.rate <= 0.0:
            return None
        if not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        keep = 1.0 - self.rate
        scale = 1.0 / keep if keep > 0.0 else 0.0
        cpu = self.source.keyed_generator(torch.device("cpu"), self.index)
        mask = torch.empty(x.shape[0]).bernoulli_(keep, generator=cpu)
        kept = mask.nonzero().flatten()  # on the CPU: no synchronisation with the device
        count = kept.shape[0]
        if count == x.shape[0]:
            self._draw = _Draw(x.shape[0], scale, None, None)
            return None
        if count < self.min_rows:
            self._draw = _Draw(x.shape[0], scale, None, _to_device(mask.mul_(scale), x.device))
            return None
        kept = _to_device(kept, x.device)
        self._draw = _Draw(x.shape[0], scale, kept, None)
        return (x.index_select(0, kept), *args[1:])

    def after(self, module: nn.Module, args: object, output: Tensor) -> Tensor | None:
        """Forward hook: the branch output of every row (dropped rows zero, kept ones scaled)."""
        draw, self._draw = self._draw, None
        if draw is None or not isinstance(output, Tensor):
            return None
        if draw.mask is not None:
            factor = draw.mask.to(output.dtype).view((-1,) + (1,) * (output.ndim - 1))
            return output * factor
        if draw.kept is None:
            return output * draw.scale
        if output.shape[0] != draw.kept.shape[0]:
            raise RuntimeError(
                f"StochasticDepth: the branch's last module returned {output.shape[0]} rows, but "
                f"{draw.kept.shape[0]} of {draw.rows} were kept at its first module. The block's "
                "forward does not run its branch as torchvision's BasicBlock/Bottleneck do; "
                "point the callback at the branch output with `blocks=` instead."
            )
        full = output.new_zeros((draw.rows, *output.shape[1:]))
        return full.index_copy(0, draw.kept, output * draw.scale)


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """An asynchronous host-to-device copy (pinned memory on CUDA); no copy for the CPU."""
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def step_seed(seed: int, rank: int, step: int, batch_idx: int) -> int:
    """A 63-bit seed from the run's seed, the global rank, the global step and the batch index."""
    value = seed & 0xFFFFFFFFFFFF
    for part in (rank, step, batch_idx):
        value = (value * 0x9E3779B97F4A7C15 + part + 1) % (1 << 63)
    return value
