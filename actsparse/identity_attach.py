"""``KLSparseReg``: MXNet's ``IdentityAttachKLSparseReg`` as a PyTorch module (seed 000).

Semantics, exactly as MXNet's operator (``src/operator/identity_attach_KL_sparse_reg-inl.h``):

* forward is the identity;
* the state is one moving average ``m_j`` per unit, starting at 0, momentum μ (default 0.9);
* on each training backward, ``avg_j`` = batch mean of unit j (the input flattened to
  ``(batch, -1)``), ``m ← μ·m + (1 − μ)·avg``, and then, with the *updated* m,
  ``grad_in = grad_out + penalty · (−ρ/m_j + (1 − ρ)/(1 − m_j))`` for every element —
  the term is **not** divided by the batch size;
* defaults ρ = 0.1, penalty = 0.001, μ = 0.9.

One deliberate difference: MXNet divides by m and 1 − m unguarded (NaN/Inf once m hits 0 or 1);
here m is clamped into ``[eps, 1 − eps]`` inside the gradient term only, so the term stays finite
and keeps its sign. The stored moving average itself is never clamped.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as F
from ._lazy import adopt_saved_shapes

__all__ = ["KLSparseReg"]


class _KLSparseRegFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, avg: Tensor, moving_avg: Tensor, target: float,  # type: ignore[override]
                penalty: float, momentum: float, eps: float) -> Tensor:
        # The batch mean (validated by KLSparseReg.forward) is all backward needs from x: keep it
        # instead of x itself.
        ctx.avg = avg
        ctx.moving_avg = moving_avg
        ctx.hyper = (target, penalty, momentum, eps)
        ctx.x_shape = x.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        target, penalty, momentum, eps = ctx.hyper
        m = ctx.moving_avg
        with torch.no_grad():
            m.mul_(momentum).add_(ctx.avg, alpha=1.0 - momentum)
            mc = m.clamp(eps, F._below_one(eps, m.dtype))  # 1 − eps must stay < 1 in m's dtype
            term = penalty * (-target / mc + (1.0 - target) / (1.0 - mc))
        g = grad_out.reshape(grad_out.shape[0], -1) + term.to(grad_out.dtype)
        return g.reshape(ctx.x_shape), None, None, None, None, None, None


class KLSparseReg(nn.Module):
    """Identity layer that adds the KL sparsity gradient in backward (MXNet semantics).

    Drop it after a sigmoid: ``nn.Sequential(nn.Linear(784, 128), nn.Sigmoid(),
    actsparse.KLSparseReg(target=0.05, penalty=0.001), nn.Linear(128, 10))``.

    Args:
        target: ρ in (0, 1), the sparseness target. Default 0.1.
        penalty: the coefficient of the gradient term (≥ 0). Default 0.001.
        momentum: μ in [0, 1) of the moving average. Default 0.9.
        eps: clamp of m inside the gradient term only. Default 1e-6.
        check: refuse a training batch with NaN/Inf (``ValueError``) before it can reach the
            moving average, with one host sync per training forward. Default True.

    Input/output: ``(batch, units)`` (other shapes are flattened to ``(batch, -1)`` as MXNet does).

    The moving average is the buffer ``moving_avg`` ``(units,)`` (in ``state_dict``), created with
    zeros on the first training forward, updated in backward only when the module was in
    training mode; in eval mode or under ``no_grad`` the layer is a plain identity. A NaN/Inf
    batch would stay in the average forever, so (with ``check``) it is refused in forward, before
    backward could fold it in. Because the
    term lives in backward, it adds nothing to the loss value: :meth:`kl` reports the current
    β·Σ KL(ρ‖m) for logging.
    """

    moving_avg: Tensor

    def __init__(self, target: float = 0.1, penalty: float = 0.001, momentum: float = 0.9,
                 *, eps: float = F.DEFAULT_EPS, check: bool = True) -> None:
        super().__init__()
        F.check_probability("target", target)
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not 0 <= penalty < float("inf"):
            raise ValueError(f"penalty must be a finite number >= 0, got {penalty!r}")
        F.check_momentum(momentum)
        F.check_probability("eps", eps)
        self.target, self.penalty, self.momentum, self.eps = float(target), float(penalty), float(momentum), float(eps)
        self.check = bool(check)
        self.register_buffer("moving_avg", torch.empty(0))

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise TypeError("KLSparseReg takes a floating-point tensor")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"KLSparseReg expects (batch, units) with batch >= 1, got shape {tuple(x.shape)}")
        if not (self.training and torch.is_grad_enabled() and x.requires_grad):
            return x
        units = x[0].numel()
        fresh = self.moving_avg.numel() == 0
        if not fresh and self.moving_avg.numel() != units:
            raise ValueError(f"KLSparseReg was used with {self.moving_avg.numel()} units, now {units}")
        dtype = F._compute_dtype(x.dtype) if fresh else self.moving_avg.dtype
        avg = x.detach().reshape(x.shape[0], -1).mean(dim=0, dtype=dtype)
        if self.check and not torch.compiler.is_compiling() and not bool(torch.isfinite(avg).all()):
            bad = int((~torch.isfinite(avg)).sum())
            raise ValueError(
                f"KLSparseReg input contains NaN or Inf (the batch mean of {bad} of {units} units is not "
                "finite); the batch was refused and the moving average left unchanged: check the "
                "previous layer's input and the learning rate"
            )
        if fresh:
            self.moving_avg = torch.zeros(units, device=x.device, dtype=dtype)
        return _KLSparseRegFn.apply(x, avg, self.moving_avg, self.target, self.penalty, self.momentum, self.eps)

    @torch.no_grad()
    def kl(self) -> Tensor:
        """``penalty · Σ_j KL(ρ ‖ m_j)`` at the current moving average (0 before any update)."""
        if self.moving_avg.numel() == 0:
            return torch.zeros(())
        return self.penalty * F.bernoulli_kl(self.target, self.moving_avg, eps=self.eps, check=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        adopt_saved_shapes(self, state_dict, prefix, "moving_avg")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        extra = "" if self.check else ", check=False"
        return f"target={self.target:g}, penalty={self.penalty:g}, momentum={self.momentum:g}{extra}"
