"""MC-dropout predictive uncertainty: the functional core (no Lightning import).

Dropout kept on at prediction time and averaged over ``N`` passes approximates the predictive
distribution of a Bayesian network (Gal & Ghahramani, ICML 2016, arXiv:1506.02142). Per sample:

- the predictive mean ``p = 1/N sum_n softmax(f_n(x))``;
- the predictive entropy ``H[p] = -sum_c p_c log p_c`` (total uncertainty);
- the mutual information between the prediction and the weights (BALD, Houlsby et al. 2011,
  arXiv:1112.5745): ``H[p] - 1/N sum_n H[softmax(f_n(x))]``, the part of the entropy that comes
  from disagreement between passes (epistemic uncertainty).

Only dropout modules are switched to training mode (:func:`dropout_active`); BatchNorm and every
other module stay in eval. The ``N`` passes run as one forward of the batch repeated ``N`` times
along the batch dimension (every row draws its own dropout mask), chunked by ``max_batch_size``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "MCDropoutResult",
    "OutputKind",
    "derive_seed",
    "dropout_active",
    "dropout_modules",
    "is_dropout_module",
    "mc_dropout_predict",
    "mutual_information",
    "passes_per_forward",
    "predictive_entropy",
    "seeded_rng",
]


OutputKind = Literal["logits", "probs", "log_probs"]
"""What a model returns: class logits, probabilities (softmax outputs) or log-probabilities."""
OUTPUT_KINDS: tuple[str, ...] = ("logits", "probs", "log_probs")


class MCDropoutResult(NamedTuple):
    """Per-sample results of ``N`` stochastic passes (all float32, on the logits' device)."""

    probs: Tensor
    """``(batch, classes)``: the predictive mean, the average of the passes' softmax."""
    entropy: Tensor
    """``(batch,)``: predictive entropy ``H[probs]`` in nats."""
    mutual_information: Tensor
    """``(batch,)``: ``H[probs]`` minus the passes' mean entropy (BALD), in nats, >= 0."""


def predictive_entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Entropy ``-sum p log p`` (nats) along ``dim`` (``0 log 0 = 0``).

    Example:
        >>> predictive_entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        tensor([0.6931, 0.0000])
    """
    return torch.special.entr(probs).sum(dim) + 0.0  # + 0.0: no "-0." for certain rows


def mutual_information(sample_probs: Tensor, sample_dim: int = 0, class_dim: int = -1) -> Tensor:
    """BALD: entropy of the mean over ``sample_dim`` minus the mean of the samples' entropies.

    ``sample_probs`` holds one probability vector per pass (e.g. ``(passes, batch, classes)``).
    The result is clamped at 0 (it is >= 0 mathematically; rounding can make it -1e-8).

    Example:
        >>> agree = torch.tensor([[[0.9, 0.1]], [[0.9, 0.1]]])
        >>> disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
        >>> mutual_information(agree), mutual_information(disagree)
        (tensor([0.]), tensor([0.6931]))
    """
    class_dim = class_dim % sample_probs.ndim
    mean_entropy = predictive_entropy(sample_probs, class_dim).mean(sample_dim)
    mean = sample_probs.mean(sample_dim, keepdim=True)
    return (predictive_entropy(mean, class_dim).squeeze(sample_dim) - mean_entropy).clamp_min(0)


def is_dropout_module(module: nn.Module) -> bool:
    """Torch's dropout modules, and any module whose class (or a base) has "Dropout" in its name.

    ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout`` and, by name,
    third-party ones (``SpatialDropout``, ``timm``'s dropout variants). Stochastic depth
    (``DropPath``) is not dropout in this sense and is left in eval.
    """
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return True
    return any("dropout" in cls.__name__.lower() for cls in type(module).__mro__)


def dropout_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The dropout modules of ``model`` that drop something (``p > 0`` where they have ``p``)."""
    found = {name: m for name, m in model.named_modules() if is_dropout_module(m)}
    return {name: m for name, m in found.items() if float(getattr(m, "p", 1.0)) > 0}


@contextmanager
def dropout_active(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Dropout modules of ``model`` in training mode, every other module in eval; then restore.

    Every module's ``training`` flag is recorded first and put back afterwards, also when the
    body raises, so a model in train mode leaves in train mode and one in eval in eval. Inside,
    BatchNorm normalises with its running statistics and never updates them. Yields the switched
    modules.

    Raises:
        ValueError: if ``model`` has no dropout module with ``p > 0``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).eval()
        >>> with dropout_active(net):
        ...     [m.training for m in net]
        [False, False, True]
        >>> [m.training for m in net]
        [False, False, False]
    """
    switched = list(dropout_modules(model).values())
    if not switched:
        raise ValueError(
            f"{type(model).__name__} has no dropout module with p > 0, so every MC-dropout pass "
            "would be the same deterministic prediction. Add dropout (nn.Dropout, "
            "nn.Dropout2d, ...) to the model, or use a single deterministic prediction."
        )
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in modes:
            m.training = False
        for m in switched:
            m.training = True  # this module only: `train()` would recurse into children
        yield switched
    finally:
        for m, mode in modes:
            m.training = mode


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integers (base seed, rank, batch index, ...), stable across runs.

    Example:
        >>> derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
        True
    """
    digest = hashlib.blake2b(repr(tuple(int(k) for k in keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def seeded_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Seed torch's global generators of the CPU and ``device`` inside a fork of their states.

    Dropout draws from the global generator (it takes no ``generator``); the fork puts the user's
    streams back on exit, so the passes neither disturb them nor depend on them.
    """
    device = torch.device(device)
    accelerator = device.type != "cpu"
    index = device.index if device.index is not None else 0
    devices = [index] if accelerator else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accelerator else "cuda"):
        torch.random.default_generator.manual_seed(seed)
        if accelerator:
            module = torch.get_device_module(device.type)
            with module.device(index):
                module.manual_seed(seed)
        yield


def passes_per_forward(num_samples: int, batch_size: int, max_batch_size: int | None) -> int:
    """How many passes one forward carries: all ``num_samples`` unless ``max_batch_size`` binds.

    Example:
        >>> [passes_per_forward(20, 8, limit) for limit in (None, 64, 5)]
        [20, 8, 1]
    """
    if max_batch_size is None:
        return num_samples
    return max(1, min(num_samples, max_batch_size // max(batch_size, 1)))


class _Accumulator:
    """Running sums of the passes' probabilities and entropies (memory of one pass, not N)."""

    def __init__(self, outputs: OutputKind = "logits") -> None:
        self.outputs = outputs
        self.prob_sum: Tensor | None = None
        self.entropy_sum: Tensor | None = None
        self.count = 0

    def add(self, values: Tensor) -> None:
        """``values``: ``(passes, batch, classes)`` logits, probabilities or log-probabilities."""
        if self.outputs == "probs":
            probs = values.float()
            entropy = predictive_entropy(probs)
        else:
            log_probs = values.float()
            if self.outputs == "logits":
                log_probs = torch.log_softmax(log_probs, dim=-1)
            probs = log_probs.exp()
            entropy = -(probs * log_probs).sum(-1)
        prob_sum, entropy_sum = probs.sum(0), entropy.sum(0)
        if self.prob_sum is None or self.entropy_sum is None:
            self.prob_sum, self.entropy_sum = prob_sum, entropy_sum
        else:
            self.prob_sum, self.entropy_sum = (
                self.prob_sum + prob_sum,
                self.entropy_sum + entropy_sum,
            )
        self.count += values.shape[0]

    def result(self) -> MCDropoutResult:
        assert self.prob_sum is not None and self.entropy_sum is not None and self.count
        probs = self.prob_sum / self.count
        entropy = predictive_entropy(probs)
        return MCDropoutResult(
            probs, entropy, (entropy - self.entropy_sum / self.count).clamp_min(0)
        )


def run_passes(
    forward: Callable[[int], Tensor],
    num_samples: int,
    batch_size: int,
    max_batch_size: int | None,
    outputs: OutputKind = "logits",
) -> MCDropoutResult:
    """Run ``num_samples`` passes in forwards of ``k`` repeats of the batch, and average them.

    ``forward(k)`` returns the outputs ``(k * batch_size, classes)`` (of kind ``outputs``) of the
    ``k`` copies of the batch one after the other.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be an integer >= 1, got {num_samples!r}.")
    check_output_kind_name(outputs)
    per_forward = passes_per_forward(num_samples, batch_size, max_batch_size)
    accumulator = _Accumulator(outputs)
    done = 0
    while done < num_samples:
        k = min(per_forward, num_samples - done)
        logits = forward(k)
        accumulator.add(logits.reshape(k, batch_size, *logits.shape[1:]))
        done += k
    return accumulator.result()


def repeat_rows(tensor: Tensor, times: int) -> Tensor:
    """``times`` copies of ``tensor`` one after the other along dim 0 (``(times * B, ...)``)."""
    return tensor.repeat(times, *([1] * (tensor.ndim - 1))) if times > 1 else tensor


def mc_dropout_predict(
    model: nn.Module,
    inputs: Tensor,
    num_samples: int = 20,
    max_batch_size: int | None = None,
    seed: int | None = None,
    outputs: OutputKind = "logits",
) -> MCDropoutResult:
    """``num_samples`` passes of ``model(inputs)`` with only dropout active, averaged per sample.

    ``model`` maps ``(batch, ...)`` inputs to ``(batch, classes)`` logits (or probabilities,
    or log-probabilities: say which with ``outputs``). The passes run as
    forwards of the batch repeated ``k`` times along dim 0 (``k = num_samples`` by default, fewer
    so that ``k * batch <= max_batch_size``; ``max_batch_size=1`` runs them one by one). Every row
    draws its own dropout masks, so batched and sequential passes have the same distribution (the
    draws differ: one mask tensor of ``k`` rows is not ``k`` separate draws). Runs without
    gradient; the modes of all modules are restored afterwards.

    Args:
        model: the network; it may be in train or eval mode (BatchNorm runs in eval either way).
        inputs: one batch of inputs.
        num_samples: number of stochastic passes ``N`` (>= 1).
        max_batch_size: most rows per forward (``None``: all ``N`` passes in one forward).
        seed: seed of the passes' dropout masks, drawn in a fork of torch's generators (the
            global stream is left as it was); ``None`` draws from the global stream.
        outputs: what ``model`` returns: ``"logits"`` (a softmax is applied), ``"probs"``
            (rows of probabilities, used as they are) or ``"log_probs"`` (``log_softmax``
            outputs). The first forward's outputs are checked once (one read on the host):
            ``"logits"`` whose rows all lie in ``[0, 1]`` and sum to 1 are refused (a softmax
            of probabilities would flatten them toward uniform); ``"probs"`` or ``"log_probs"``
            whose rows are not probability rows are refused too.

    Returns:
        :class:`MCDropoutResult` with ``probs`` ``(batch, classes)``, ``entropy`` and
        ``mutual_information`` ``(batch,)``.

    Raises:
        ValueError: for ``num_samples < 1``, a model without dropout, outputs that are not
            ``(batch, classes)``, or outputs that do not match ``outputs`` (see above).

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
        >>> out = mc_dropout_predict(net, torch.randn(5, 8), num_samples=30, seed=1)
        >>> out.probs.shape, out.entropy.shape, bool((out.mutual_information > 0).all())
        (torch.Size([5, 3]), torch.Size([5]), True)
    """
    batch_size = inputs.shape[0]
    check_output_kind_name(outputs)
    checked = False

    def forward(k: int) -> Tensor:
        nonlocal checked
        values = model(repeat_rows(inputs, k))
        check_logits(values, k * batch_size)
        if not checked:
            check_output_values(values, outputs)
            checked = True
        return values

    with torch.no_grad(), dropout_active(model):
        if seed is None:
            return run_passes(forward, num_samples, batch_size, max_batch_size, outputs)
        with seeded_rng(seed, inputs.device):
            return run_passes(forward, num_samples, batch_size, max_batch_size, outputs)


def check_output_kind_name(outputs: object) -> None:
    """Refuse an ``outputs`` argument other than ``"logits"``, ``"probs"``, ``"log_probs"``."""
    if outputs not in OUTPUT_KINDS:
        raise ValueError(
            f"`outputs` must be one of {', '.join(map(repr, OUTPUT_KINDS))} (what the model "
            f"returns), got {outputs!r}."
        )


def check_output_values(values: Tensor, outputs: OutputKind, tolerance: float = 1e-2) -> None:
    """Refuse ``(rows, classes)`` outputs that contradict ``outputs`` (reads 3 flags on the host).

    ``"logits"`` whose rows all lie in ``[0, 1]`` and sum to 1 (within ``tolerance``) are
    probabilities: a softmax of them would be wrong. ``"probs"`` must be such rows, and
    ``"log_probs"`` rows whose exponentials are. (Log-probabilities given as ``"logits"`` are
    fine: ``log_softmax`` leaves them unchanged.)
    """
    with torch.no_grad():
        values = values.detach().float()
        in_unit = ((values >= 0) & (values <= 1)).all()
        sums_to_one = ((values.sum(-1) - 1).abs() <= tolerance).all()
        exp_sums_to_one = ((values.exp().sum(-1) - 1).abs() <= tolerance).all()
        in_unit_, sums_, exp_sums_ = torch.stack([in_unit, sums_to_one, exp_sums_to_one]).tolist()
    if outputs == "logits" and in_unit_ and sums_:
        raise ValueError(
            "MC-dropout was told the model returns logits (`outputs='logits'`), but every row "
            "lies in [0, 1] and sums to 1: these are probabilities, and a softmax of them would "
            "flatten the prediction toward uniform. Pass `outputs='probs'` (or return the logits, "
            "without the softmax)."
        )
    if outputs == "probs" and not (in_unit_ and sums_):
        raise ValueError(
            "MC-dropout was told the model returns probabilities (`outputs='probs'`), but its "
            "rows are not in [0, 1] summing to 1. Pass `outputs='logits'` for unnormalised "
            "scores or `outputs='log_probs'` for log_softmax outputs."
        )
    if outputs == "log_probs" and not exp_sums_:
        raise ValueError(
            "MC-dropout was told the model returns log-probabilities (`outputs='log_probs'`), but "
            "the exponentials of its rows do not sum to 1. Pass `outputs='logits'` for "
            "unnormalised scores or `outputs='probs'` for softmax outputs."
        )


def check_logits(logits: object, rows: int) -> None:
    """Refuse anything but a ``(rows, classes >= 2)`` floating-point tensor."""
    if (
        not isinstance(logits, Tensor)
        or not logits.is_floating_point()
        or logits.ndim != 2
        or logits.shape[0] != rows
        or logits.shape[1] < 2
    ):
        got = (
            f"a {logits.dtype} tensor of shape {tuple(logits.shape)}"
            if isinstance(logits, Tensor)
            else type(logits).__name__
        )
        raise ValueError(
            f"MC-dropout expects class logits of shape (batch={rows}, classes>=2), got {got}. "
            "Return one column per class (logits, or probabilities with `outputs='probs'`); for "
            "a binary task return two columns, e.g. `torch.stack([-z, z], dim=-1)`."
        )
