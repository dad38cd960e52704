"""Central-difference gradient check, as in the UFLDL exercise (``checkNumericalGradient``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["numerical_gradient", "relative_gradient_error"]


def numerical_gradient(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], eps: float = 1e-4) -> list[Tensor]:
    """(J(θ + ε e_i) − J(θ − ε e_i)) / 2ε for every entry of every parameter (modified in place
    and restored). Use float64 parameters: the UFLDL bar of 1e-9 needs it.

    ``loss_fn`` runs with gradients enabled, as in training: penalties attached with
    :func:`actsparse.attach` capture nothing under ``torch.no_grad()``."""
    grads = []
    for p in params:
        g = torch.zeros_like(p)
        flat = p.detach().view(-1)  # edits the parameter's storage without autograd noticing
        gflat = g.view(-1)
        for i in range(flat.numel()):
            orig = float(flat[i])
            flat[i] = orig + eps
            plus = float(loss_fn().detach())
            flat[i] = orig - eps
            minus = float(loss_fn().detach())
            flat[i] = orig
            gflat[i] = (plus - minus) / (2 * eps)
        grads.append(g)
    return grads


def relative_gradient_error(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], eps: float = 1e-4) -> float:
    """‖g_num − g_autograd‖ / ‖g_num + g_autograd‖ over all parameters (UFLDL's measure).

    Args:
        loss_fn: computes the scalar loss from the current ``params``.
        params: leaf tensors with ``requires_grad=True`` (float64 recommended).
        eps: the central-difference step. Default 1e-4, as in the UFLDL exercise.
    """
    params = list(params)
    for p in params:
        if not p.requires_grad:
            raise ValueError("every parameter must require grad")
    analytic = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    analytic = [torch.zeros_like(p) if g is None else g for p, g in zip(params, analytic)]
    numeric = numerical_gradient(loss_fn, params, eps)
    a = torch.cat([g.reshape(-1) for g in analytic]).double()
    n = torch.cat([g.reshape(-1) for g in numeric]).double()
    denom = torch.linalg.vector_norm(n + a)
    if float(denom) == 0.0:
        return 0.0 if float(torch.linalg.vector_norm(n - a)) == 0.0 else float("inf")
    return float(torch.linalg.vector_norm(n - a) / denom)
