"""Sharpness-aware minimization, the functional core: the perturbation ``e(w)`` and its undo.

SAM (Foret et al., ICLR 2021) evaluates the gradient at ``w + e(w)`` with
``e(w) = rho * g / ||g||``; adaptive SAM (ASAM, Kwon et al., ICML 2021) scales it by the weights'
magnitudes, ``e(w) = rho * T^2 g / ||T g||`` with ``T = |w|``. Both are the math of
:class:`lightning_reg.SharpnessAwareMinimization` and live here once.

For manual optimization, wrap the second forward/backward in :func:`sam_perturbed`::

    loss = self.compute_loss(batch)
    self.manual_backward(loss)
    with sam_perturbed(self.parameters(), rho=0.05):
        opt.zero_grad()
        self.manual_backward(self.compute_loss(batch))
    opt.step()  # the base optimizer steps from w with the gradient taken at w + e(w)
    opt.zero_grad()
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["sam_perturbation", "sam_perturbed"]


def _with_grad(params: Iterable[Tensor]) -> list[Tensor]:
    return [p for p in params if p.grad is not None]


def _ascent_scale(params: list[Tensor], rho: float, adaptive: bool, eps: float) -> Tensor:
    """``rho / (||T g|| + eps)`` as a device tensor (no host-device synchronisation)."""
    norms = [(p.grad * p.abs() if adaptive else p.grad).norm(2) for p in params]  # type: ignore[operator,union-attr]
    return rho / (torch.linalg.vector_norm(torch.stack(norms)) + eps)


def _perturbation(p: Tensor, scale: Tensor, adaptive: bool) -> Tensor:
    e = p.grad * scale  # type: ignore[operator]
    return e * p.square() if adaptive else e


def _perturb_in_place(params: list[Tensor], rho: float, adaptive: bool, eps: float) -> Tensor:
    """``p += e(p)`` for each parameter; returns ``||e||``.

    SAM allocates no parameter-sized temporary (``addcmul_`` with the scale as a 0-d tensor);
    ASAM one parameter's perturbation at a time.
    """
    if not adaptive:
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm(2) for p in params]))  # type: ignore[union-attr]
        scale = rho / (total + eps)
        for p in params:
            p.addcmul_(p.grad, scale)  # type: ignore[arg-type]
        return scale * total
    scale = _ascent_scale(params, rho, adaptive, eps)
    norms = []
    for p in params:
        e = _perturbation(p, scale, adaptive)
        norms.append(torch.linalg.vector_norm(e))
        p.add_(e)
    return torch.linalg.vector_norm(torch.stack(norms))


@torch.no_grad()
def sam_perturbation(
    params: Iterable[Tensor], rho: float = 0.05, adaptive: bool = False, eps: float = 1e-12
) -> list[Tensor]:
    """The SAM (or ASAM) perturbation of every parameter that holds a gradient (new tensors).

    Args:
        params: parameters whose ``.grad`` is the gradient at the current weights; those without
            a gradient are skipped (and absent from the result).
        rho: radius of the neighbourhood; ``||e|| = rho`` for SAM, ``||e / |w| || = rho`` for ASAM.
        adaptive: ASAM's scale-invariant neighbourhood (``T = |w|``).
        eps: added to the norm, so a zero gradient gives a zero perturbation.

    Example:
        >>> w = torch.tensor([3.0, 4.0], requires_grad=True)
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> sam_perturbation([w], rho=0.5)
        [tensor([0.3000, 0.4000])]
    """
    params = _with_grad(params)
    if not params:
        return []
    scale = _ascent_scale(params, rho, adaptive, eps)
    return [_perturbation(p, scale, adaptive) for p in params]


@contextmanager
def sam_perturbed(
    params: Iterable[Tensor], rho: float = 0.05, adaptive: bool = False, eps: float = 1e-12
) -> Iterator[Tensor]:
    """Move the weights to ``w + e(w)`` inside the block and put the exact ``w`` back after.

    ``e(w)`` is :func:`sam_perturbation` of the gradients held on entry. The weights are restored
    bitwise (from a copy, not by subtracting ``e``), also when the block raises; the gradients
    are left as the block leaves them. Extra memory: one copy of the perturbed weights (ASAM: plus
    one parameter's perturbation at a time).

    Yields:
        ``||e||`` over all perturbed parameters, a device tensor (read it later, not per step).
    """
    params = _with_grad(params)
    saved = [p.detach().clone() for p in params]
    norm = torch.zeros(())
    with torch.no_grad():
        if params:
            norm = _perturb_in_place(params, rho, adaptive, eps)
    try:
        yield norm
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved, strict=True):
                p.copy_(w)
