"""Pure sparsity-penalty functions over activation tensors.

Every function here is stateless, differentiable and reduces in at least float32 (float64 stays
float64), returning its result in the caller's dtype. Shapes use fixed names: ``batch`` is the
leading axis, ``units`` is the axis chosen by ``unit_dim`` (the last one by default; ``1`` for
convolutional maps ``(batch, units, height, width)``), and ``...`` is any number of other axes.

The formulas, with their sources:

==================  ===============================================  =================================
function            formula                                          source
==================  ===============================================  =================================
``bernoulli_kl``    Σ_j ρ log(ρ/ρ̂_j) + (1−ρ) log((1−ρ)/(1−ρ̂_j))      Ng, CS294A notes, p.14–15
``poisson_kl``      Σ_j ρ log(ρ/ρ̂_j) − ρ + ρ̂_j                      generalised KL (I-divergence)
``l1``              Σ|a| / batch                                     activity L1 (Keras convention)
``l2``              Σ a² / batch                                     activity L2
``hoyer``           mean over samples of (Σ|a|)² / Σ a²              Hoyer 2004
``activation_frequency``  f̂_j = mean H(a − θ), straight-through     Rajamanoharan et al. 2024
==================  ===============================================  =================================

Numerics: ρ̂ may reach 0 (a dead unit) or 1 (a saturated sigmoid). The KLs then evaluate the
divergence at ρ̂ clamped into ``[eps, 1 − eps]`` with a *straight-through* clamp: the value is
finite and the gradient is that of the divergence at the clamped point, so it keeps pushing ρ̂
back toward ρ instead of being zeroed as ``torch.clamp`` would do.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_BANDWIDTH",
    "mean_activation",
    "activation_frequency",
    "bernoulli_kl",
    "poisson_kl",
    "l1",
    "l2",
    "hoyer",
]

#: Distance from 0 and 1 at which the KLs clamp ρ̂ (straight-through, see module docstring).
DEFAULT_EPS = 1e-6
#: Width ε of the rectangle kernel of the straight-through Heaviside pseudo-gradient.
DEFAULT_BANDWIDTH = 0.1

KLReduction = Literal["sum", "mean", "none"]
ActivityReduction = Literal["batchmean", "sum", "mean"]


# --------------------------------------------------------------------------------------------
# helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reduce in float32 at least; float64 stays float64."""
    if dtype.is_floating_point:
        return torch.promote_types(dtype, torch.float32)
    return torch.float32


def _check_activations(a: Tensor, *, min_dim: int = 1) -> None:
    if not isinstance(a, Tensor):
        raise TypeError(f"activations must be a torch.Tensor, got {type(a).__name__}")
    if not a.dtype.is_floating_point:
        raise TypeError(
            f"activations must be a floating-point tensor, got dtype {a.dtype}; "
            "cast with .float() first"
        )
    if a.dim() < min_dim:
        raise ValueError(
            f"activations must have at least {min_dim} dimension(s) (batch, ..., units), "
            f"got shape {tuple(a.shape)}"
        )
    if a.numel() == 0:
        raise ValueError(f"activations are empty (shape {tuple(a.shape)}): nothing to penalise")


def normalize_unit_dim(a: Tensor, unit_dim: int) -> int:
    """Return ``unit_dim`` as a non-negative axis of ``a``; raise a clear error when out of range."""
    if isinstance(unit_dim, bool) or not isinstance(unit_dim, int):
        raise TypeError(f"unit_dim must be an int, got {type(unit_dim).__name__}")
    if not -a.dim() <= unit_dim < a.dim():
        raise IndexError(
            f"unit_dim={unit_dim} is out of range for activations of shape {tuple(a.shape)} "
            f"(valid: {-a.dim()} .. {a.dim() - 1})"
        )
    return unit_dim % a.dim()


def _reduce_dims(a: Tensor, unit_dim: int) -> list[int]:
    d = normalize_unit_dim(a, unit_dim)
    return [i for i in range(a.dim()) if i != d]


def _straight_through_clamp(x: Tensor, lo: float, hi: float | None) -> Tensor:
    """Value of ``x.clamp(lo, hi)``, gradient of the identity (so it never vanishes)."""
    # clamp + (x − x): the added term is exactly 0, so the value is the clamp's bit for bit. The
    # form x + (clamp − x) rounds: for x = −32 in float32, −32 + (1e-6 + 32) is 0, not 1e-6.
    return x.clamp(lo, hi).detach() + (x - x.detach())


def _below_one(eps: float, dtype: torch.dtype) -> float:
    """``1 − eps``, but at most the largest float below 1 that ``dtype`` keeps apart from 1:
    float32 rounds 1 − 1e-9 to 1, where a saturated unit's ``log((1 − ρ)/(1 − ρ̂))`` is inf."""
    return min(1.0 - eps, 1.0 - torch.finfo(dtype).eps)


def _as_target(target: float | Tensor, like: Tensor) -> Tensor:
    t = torch.as_tensor(target, dtype=like.dtype, device=like.device)
    if t.dim() and t.shape != like.shape and not _broadcasts_to(t.shape, like.shape):  # shapes only: free
        raise ValueError(f"target ρ of shape {tuple(t.shape)} does not broadcast to rho_hat of shape "
                         f"{tuple(like.shape)} (one target per unit, or a float)")
    return t


def _check_rho_hat(rho_hat: Tensor, eps: float) -> None:
    """Type, dtype and size of a divergence's ρ̂ (no host sync), and its clamp distance ``eps``."""
    if not isinstance(rho_hat, Tensor):
        raise TypeError(f"rho_hat must be a torch.Tensor (e.g. mean_activation(a)), got {type(rho_hat).__name__}")
    if not rho_hat.dtype.is_floating_point:
        raise TypeError(f"rho_hat must be a floating-point tensor, got dtype {rho_hat.dtype}; cast with .float()")
    if rho_hat.numel() == 0:
        raise ValueError(f"rho_hat is empty (shape {tuple(rho_hat.shape)}): no units to compare with the target")
    if not (isinstance(eps, float) and 0.0 < eps < 1.0):  # the common case in one test
        check_probability("eps", eps)


def check_momentum(momentum: float) -> float:
    """A moving average's momentum μ: a number in [0, 1) (``TypeError`` / ``ValueError``); returns it as a float."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float in [0, 1), got {type(momentum).__name__}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
    return float(momentum)


def check_probability(name: str, value: float | Tensor) -> None:
    """Raise ``ValueError`` unless every entry of ``value`` lies strictly inside (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if isinstance(value, (int, float)):
        if not 0.0 < value < 1.0:  # also False for NaN
            raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")
        return
    t = value.detach()
    if not bool(torch.isfinite(t).all()) or bool(((t <= 0) | (t >= 1)).any()):
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {_short(value)}")


def check_positive(name: str, value: float | Tensor) -> None:
    """Raise ``ValueError`` unless every entry of ``value`` is finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if isinstance(value, (int, float)):
        if not 0.0 < value < float("inf"):  # also False for NaN
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        return
    t = value.detach()
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise ValueError(f"{name} must be a finite number > 0, got {_short(value)}")


def _short(value: float | Tensor) -> str:
    if isinstance(value, Tensor):
        flat = value.detach().flatten()
        shown = ", ".join(f"{v:g}" for v in flat[:4].tolist())
        return f"tensor([{shown}{', ...' if flat.numel() > 4 else ''}])"
    return repr(value)


def _check_rate(rate: Tensor, *, upper: float | None, penalty: str, result: Tensor | None = None,
                dtype: torch.dtype | None = None) -> None:
    """One host sync that catches NaN/Inf activations and rates outside the divergence's domain
    and, given the penalty ``result`` (scalar, compute dtype), a value that overflows ``dtype``
    (the caller's, e.g. float16) although the rates are fine.

    Skipped while ``torch.compile`` traces (a data-dependent branch would break the graph);
    :meth:`actsparse.Attachment.penalty` still checks the total outside the compiled region.
    """
    if torch.compiler.is_compiling():
        return
    finite = torch.isfinite(rate)
    low = rate < 0
    flags = [~finite.all(), low.any()]
    if upper is not None:
        flags.append((rate > upper).any())
    if result is not None:
        flags.append(~torch.isfinite(result.detach().to(dtype or result.dtype)).all())
    bad = torch.stack(flags).tolist()
    if bad[0]:
        n = int((~finite).sum())
        raise ValueError(
            f"activations contain NaN or Inf: the mean of {n} of {rate.numel()} units is not "
            "finite; check the layer's input and learning rate"
        )
    if bad[1]:
        raise ValueError(
            f"{penalty} needs non-negative activations, but the mean of {int(low.sum())} "
            f"unit(s) is negative (min {float(rate.min()):.4g}); apply a sigmoid or ReLU first (a layer "
            "whose ReLU is applied inline in forward, F.relu(self.enc(x)): attach penalty.of(torch.relu) to "
            "it), or use L1 for signed activations"
        )
    if upper is not None and bad[2]:
        raise ValueError(
            f"{penalty} needs activations in [0, 1] (a firing probability, e.g. after a sigmoid), "
            f"but the mean activation of {int((rate > upper).sum())} unit(s) exceeds 1 "
            f"(max {float(rate.max()):.4g}). For unbounded non-negative activations such as ReLU "
            "use PoissonKL (actsparse.functional.poisson_kl), the generalised KL."
        )
    if result is not None and bad[-1]:
        raise ValueError(_overflow_message(penalty, float(result.detach()), dtype or result.dtype,
                                           "the activations are finite"))


def _overflow_message(name: str, value: float, dtype: torch.dtype, why: str) -> str:
    """One line: ``name`` (= value, when the compute dtype held it) does not fit ``dtype``."""
    shown = f" = {value:.4g}" if math.isfinite(value) else ""
    return (f"{name}{shown} overflows {str(dtype).replace('torch.', '')} (max {torch.finfo(dtype).max:.5g}) "
            f"although {why}; lower the weight, or compute the penalty in a wider dtype (a.float(), or "
            "float64)")


def _fits(value: float, dtype: torch.dtype) -> bool:
    """Whether a finite Python float stays finite when cast to ``dtype`` (rounding included)."""
    return value == 0.0 or math.isfinite(float(torch.tensor(value, dtype=torch.float64).to(dtype)))


def _reduce(x: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return x.sum()
    if reduction == "mean":
        return x.mean()
    if reduction == "none":
        return x
    raise ValueError(f"unknown reduction {reduction!r}; choose one of 'sum', 'mean', 'none'")


def check_threshold(threshold: float | Tensor) -> None:
    """Raise unless ``threshold`` is a tensor or a finite number (a tensor's values are not read)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, Tensor)):
        raise TypeError(f"threshold must be a float or a tensor, got {type(threshold).__name__}")
    if not isinstance(threshold, Tensor) and not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without growing it. Pure Python over the dims:
    ``torch.broadcast_shapes`` costs ~60 µs a call (and seconds for its first import)."""
    extra = len(shape) - len(target)
    if extra > 0 and any(d != 1 for d in shape[:extra]):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def unit_view(t: Tensor, a: Tensor, unit_dim: int) -> Tensor:
    """Reshape a per-unit vector ``(units,)`` so it broadcasts against ``a`` along ``unit_dim``."""
    if t.dim() != 1 or a.dim() <= 1:
        return t
    d = normalize_unit_dim(a, unit_dim)
    shape = [1] * a.dim()
    shape[d] = t.shape[0]
    return t.reshape(shape)


# --------------------------------------------------------------------------------------------
# rates


def mean_activation(a: Tensor, unit_dim: int = -1) -> Tensor:
    """ρ̂_j: the mean of unit ``j`` over every axis but the unit axis.

    Args:
        a: activations ``(batch, ..., units)`` (or with the units on ``unit_dim``).
        unit_dim: the unit axis; ``-1`` by default, ``1`` for ``(batch, units, h, w)`` maps.

    Returns:
        ``(units,)`` in float32 (float64 for float64 input). Differentiable.

    Averaging over the batch *and* every spatial/sequence position is what CS294A means by
    "average activation of hidden unit j over the training set" (Ng, p.14); averaging over the
    unit axis instead is the mistake of seed 003.
    """
    _check_activations(a, min_dim=2)
    dims = _reduce_dims(a, unit_dim)
    return a.mean(dim=dims, dtype=_compute_dtype(a.dtype))


def _firing_share(a: Tensor, threshold: float | Tensor, unit_dim: int, dtype: torch.dtype) -> Tensor:
    """The share of samples (and positions) in which each unit is ``> threshold``: ``(units,)`` in
    ``dtype``, no gradient. A tensor threshold is aligned with ``unit_dim``. (The differentiable
    form, with a straight-through gradient, is :func:`activation_frequency`.)"""
    a = a.detach()
    th = unit_view(threshold, a, unit_dim) if isinstance(threshold, Tensor) else threshold
    return (a > th).mean(dim=_reduce_dims(a, unit_dim), dtype=dtype)


def rectangle_window(a: Tensor, threshold: Tensor, bandwidth: float | Tensor) -> Tensor:
    """K((a − θ)/ε) as a bool tensor, with the rectangle kernel K(u) = 1{|u| < 1/2}."""
    u = (a - threshold) / bandwidth
    return (u > -0.5) & (u < 0.5)


def rectangle_kernel(a: Tensor, threshold: Tensor, bandwidth: float | Tensor) -> Tensor:
    """(1/ε)·K((a − θ)/ε) with the rectangle kernel K(u) = 1{|u| < 1/2}: the pseudo-derivative of
    H(a − θ) (Rajamanoharan et al. 2024, eq. 11). Shared by the frequency penalty and JumpReLU."""
    return _kernel(rectangle_window(a, threshold, bandwidth), a.dtype, bandwidth)


def _kernel(window: Tensor, dtype: torch.dtype, bandwidth: float | Tensor) -> Tensor:
    return window.to(dtype) / (bandwidth.to(dtype) if isinstance(bandwidth, Tensor) else bandwidth)


class _HeavisideST(torch.autograd.Function):
    """H(a − θ) forward; rectangle-kernel pseudo-derivative backward.

    Rajamanoharan et al. 2024 ("Jumping Ahead", eq. 11): ∂H(z − θ)/∂θ := −(1/ε) K((z − θ)/ε)
    with K the rectangle kernel 1{|u| < 1/2}. We give the activation the mirror pseudo-derivative
    +(1/ε) K(...), so a penalty on firing frequency reaches the layer that produced ``a``.
    """

    @staticmethod
    def forward(ctx, a: Tensor, threshold: Tensor, bandwidth: float | Tensor) -> Tensor:  # type: ignore[override]
        # Keep the window (bool), not a: a layer after the hooked one may overwrite a in place
        # (nn.ReLU(inplace=True)), which would make a saved a unusable in backward.
        if any(ctx.needs_input_grad[:2]):
            ctx.save_for_backward(rectangle_window(a, threshold, bandwidth))
        ctx.bandwidth, ctx.threshold_shape = bandwidth, threshold.shape
        return (a > threshold).to(a.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (window,) = ctx.saved_tensors
        g = grad * _kernel(window, grad.dtype, ctx.bandwidth)
        grad_a = g if ctx.needs_input_grad[0] else None
        grad_t = None
        if ctx.needs_input_grad[1]:
            grad_t = (-g).sum_to_size(ctx.threshold_shape)
        return grad_a, grad_t, None


def activation_frequency(
    a: Tensor,
    threshold: float | Tensor = 0.0,
    unit_dim: int = -1,
    bandwidth: float | Tensor = DEFAULT_BANDWIDTH,
) -> Tensor:
    """f̂_j: the fraction of samples (and positions) in which unit ``j`` fires, ``a > threshold``.

    The forward value is the exact frequency, ``mean H(a − θ)``. Its gradient is a straight-through
    pseudo-gradient (Rajamanoharan et al. 2024): each element with ``|a − θ| < bandwidth/2``
    receives ``+1/bandwidth`` (and θ, when it is a tensor that requires grad, ``−1/bandwidth``),
    times the usual ``1/count`` of the mean. This is what makes a penalty on *how often* a unit
    fires trainable; ``(a > 0).float().mean()`` alone has no gradient at all (seed 001).

    Args:
        a: activations ``(batch, ..., units)``.
        threshold: θ, a float or a tensor broadcastable to ``a``; a ``(units,)`` vector is aligned
            with ``unit_dim``. May be a learnable parameter (JumpReLU).
        unit_dim: the unit axis.
        bandwidth: ε > 0, width of the pseudo-gradient window, in the units of ``a``: a float,
            or a ``(units,)`` tensor (one width per unit, aligned with ``unit_dim``; no gradient).

    Returns:
        ``(units,)`` in float32 (float64 for float64 input), values in [0, 1].
    """
    _check_activations(a, min_dim=2)
    check_positive("bandwidth", bandwidth)
    dims = _reduce_dims(a, unit_dim)
    if isinstance(threshold, Tensor):
        th = unit_view(threshold.to(device=a.device, dtype=a.dtype), a, unit_dim)
        if th.dim() and not _broadcasts_to(th.shape, a.shape):
            units = a.shape[normalize_unit_dim(a, unit_dim)]
            raise ValueError(f"threshold of shape {tuple(threshold.shape)} does not fit activations of shape "
                             f"{tuple(a.shape)} ({units} units on unit_dim={unit_dim})")
    else:
        check_threshold(threshold)
        th = torch.tensor(float(threshold), device=a.device, dtype=a.dtype)
    if isinstance(bandwidth, Tensor):
        eps = unit_view(bandwidth.detach().to(device=a.device, dtype=a.dtype), a, unit_dim)
    else:
        eps = float(bandwidth)
    fired = _HeavisideST.apply(a, th, eps)
    return fired.mean(dim=dims, dtype=_compute_dtype(a.dtype))


# --------------------------------------------------------------------------------------------
# divergences between a target rate and the observed rate


def bernoulli_kl(
    target: float | Tensor,
    rho_hat: Tensor,
    *,
    reduction: KLReduction = "sum",
    eps: float = DEFAULT_EPS,
    check: bool = True,
) -> Tensor:
    """KL(ρ ‖ ρ̂) between Bernoulli firing probabilities, summed over units.

    ``Σ_j ρ log(ρ/ρ̂_j) + (1 − ρ) log((1 − ρ)/(1 − ρ̂_j))`` (Ng, CS294A notes, p.14–15).

    Args:
        target: ρ in (0, 1), a float or a tensor broadcastable to ``rho_hat``.
        rho_hat: ρ̂ ``(units,)`` (any shape works) in [0, 1], e.g. ``mean_activation(a)``.
        reduction: ``"sum"`` over units (the formula, default), ``"mean"``, or ``"none"``.
        eps: ρ̂ is clamped straight-through into ``[eps, 1 − eps]``: finite value, gradient kept
            (the upper end at most the largest float below 1 in the compute dtype).
        check: raise ``ValueError`` for NaN/Inf ρ̂ or ρ̂ outside [0, 1] (one host sync).

    Returns:
        A scalar (or ``rho_hat``-shaped for ``"none"``) in ``rho_hat``'s dtype.

    Raises:
        ValueError: target outside (0, 1); ρ̂ > 1 (points to :func:`poisson_kl`); NaN/Inf.
    """
    check_probability("target ρ", target)
    _check_rho_hat(rho_hat, eps)
    cd = _compute_dtype(rho_hat.dtype)
    r = rho_hat.to(cd)
    if check:
        _check_rate(r.detach(), upper=1.0 + 1e-6, penalty="BernoulliKL")
    rho = _as_target(target, r)
    r = _straight_through_clamp(r, eps, _below_one(eps, cd))
    kl = rho * torch.log(rho / r) + (1 - rho) * torch.log((1 - rho) / (1 - r))
    return _reduce(kl, reduction).to(rho_hat.dtype)


def poisson_kl(
    target: float | Tensor,
    rho_hat: Tensor,
    *,
    reduction: KLReduction = "sum",
    eps: float = DEFAULT_EPS,
    check: bool = True,
) -> Tensor:
    """Generalised KL (I-divergence) D(ρ ‖ ρ̂), valid for unbounded non-negative activations.

    ``Σ_j ρ log(ρ/ρ̂_j) − ρ + ρ̂_j``: the KL between Poisson distributions of means ρ and ρ̂_j.
    It is ≥ 0, zero only at ρ̂ = ρ, and unlike the Bernoulli KL it is defined for ρ̂ > 1, so it is
    the KL to use for ReLU units (Keras' 2015 code: ``p_hat - p + p*log(p/p_hat)``).

    Args:
        target: ρ > 0 (may exceed 1), a float or a tensor broadcastable to ``rho_hat``.
        rho_hat: ρ̂ ``(units,)`` ≥ 0, e.g. ``mean_activation(relu_out)``.
        reduction: ``"sum"`` over units (default), ``"mean"``, or ``"none"``.
        eps: ρ̂ is clamped straight-through to at least ``eps``.
        check: raise ``ValueError`` for NaN/Inf or negative ρ̂ (one host sync).

    Returns:
        A scalar (or ``rho_hat``-shaped for ``"none"``) in ``rho_hat``'s dtype.
    """
    check_positive("target ρ", target)
    _check_rho_hat(rho_hat, eps)
    cd = _compute_dtype(rho_hat.dtype)
    r = rho_hat.to(cd)
    if check:
        _check_rate(r.detach(), upper=None, penalty="PoissonKL")
    rho = _as_target(target, r)
    r = _straight_through_clamp(r, eps, None)
    kl = rho * torch.log(rho / r) - rho + r
    return _reduce(kl, reduction).to(rho_hat.dtype)


# --------------------------------------------------------------------------------------------
# activity norms


def _activity_divisor(a: Tensor, reduction: str) -> float:
    """What an activity norm's sum is divided by: the batch (``batchmean``), 1 or the element count."""
    if reduction == "batchmean":
        return float(a.shape[0])
    if reduction == "sum":
        return 1.0
    if reduction == "mean":
        return float(a.numel())
    raise ValueError(
        f"unknown reduction {reduction!r}; choose one of 'batchmean', 'sum', 'mean'"
    )


def check_finite_result(value: Tensor, a: Tensor) -> None:
    """One host sync on a reduced value; on failure, say how many activations are bad, or that the
    value (reduced in float32) does not fit ``a``'s dtype (float16's max is 65504)."""
    if torch.compiler.is_compiling():
        return
    # a scalar is read directly (one host read, no kernels: this runs in every hook call)
    v = float(value.detach()) if value.dim() == 0 else math.nan
    finite = math.isfinite(v) if value.dim() == 0 else bool(torch.isfinite(value.detach()).all())
    narrower = a.dtype.is_floating_point and torch.finfo(a.dtype).max < torch.finfo(value.dtype).max
    if finite and narrower and value.dim() == 0 and not _fits(v, a.dtype):
        why = f"every activation is finite (largest |a| = {float(a.detach().abs().max()):.3g}, shape {tuple(a.shape)})"
        raise ValueError(_overflow_message("the penalty", v, a.dtype, why))
    if not finite:
        bad = int((~torch.isfinite(a.detach())).sum())
        if bad == 0:  # finite activations whose penalty is too large for the dtype (e.g. Σa² of 1e30s)
            why = (f"every activation is finite (largest |a| = {float(a.detach().abs().max()):.3g}, "
                   f"shape {tuple(a.shape)})")
            raise ValueError(_overflow_message("the penalty", v, value.dtype, why))
        raise ValueError(
            f"activations contain NaN or Inf ({bad} of {a.numel()} elements, shape "
            f"{tuple(a.shape)}); check the layer's input and learning rate"
        )


#: Up to this many elements :func:`scaled_l1` keeps sgn(a) for the backward in ``a``'s dtype (one
#: kernel fewer each way; at these sizes a step costs mostly per-kernel overhead); above, as int8
#: (a quarter of a float32 activation's memory, held until the backward).
_FLOAT_SIGN_MAX = 1 << 20


def _in_caller_dtype(out: Tensor, a: Tensor, check: bool) -> Tensor:
    """A weighted value reduced in the compute dtype, returned in ``a``'s dtype. With ``check``,
    one host read raises ``ValueError`` for NaN/Inf activations and for a value ``a``'s dtype
    cannot hold (float16 above 65504) instead of returning inf."""
    if check:
        check_finite_result(out, a)
    return out if out.dtype == a.dtype else out.to(a.dtype)


def scaled_l1(a: Tensor, weight: float = 1.0, *, reduction: ActivityReduction = "batchmean",
              check: bool = True) -> Tensor:
    """``weight · l1(a, reduction=...)`` (what :class:`actsparse.L1` computes).

    The value is ``(a · s).sum() · weight/divisor`` with ``s = sgn(a)`` detached, summed in the
    compute dtype by ``torch.sum`` (pairwise: accurate for 10⁸ float32 elements, where CPU
    ``vector_norm(ord=1)`` was 7 % off at 6·10⁷, and 4× slower). Its gradient is
    ``s · (g · weight/divisor)``, the gradient of ``weight · Σ|a| / divisor``. The product keeps
    ``s``, not ``a``, for the backward, so a layer after the hooked one may overwrite ``a`` in
    place (``nn.ReLU(inplace=True)``). With ``check=False``, a NaN element gets a zero gradient.

    The weight is applied in the compute dtype, before the cast to ``a``'s dtype; with ``check``,
    a weighted value that ``a``'s dtype cannot hold raises ``ValueError`` (dtype and value).
    """
    _check_activations(a)
    scale = weight / _activity_divisor(a, reduction)
    cd = _compute_dtype(a.dtype)
    if a.requires_grad and torch.is_grad_enabled() and a.numel() > _FLOAT_SIGN_MAX:
        out = _SignedL1.apply(a, cd, scale)  # large: the sign kept as int8, no float product
    elif a.requires_grad and torch.is_grad_enabled():
        s = torch.sgn(a.detach())
        if not check:
            s = s.nan_to_num_(0.0)
        out = (a * s).sum(dtype=cd) * scale
    else:  # nothing to keep for a backward
        out = a.abs().sum(dtype=cd) * scale
    return _in_caller_dtype(out, a, check)


class _SignedL1(torch.autograd.Function):
    """``scale · Σ|a|`` (summed in ``dtype`` by ``torch.sum``) whose backward is
    ``sgn(a)·(g·scale)`` from sgn(a) kept as int8: :func:`scaled_l1` for activations above
    :data:`_FLOAT_SIGN_MAX` elements, where a product's float temporaries would cost more memory
    than the node's Python backward costs time (a NaN's sign is 0: no gradient)."""

    @staticmethod
    def forward(ctx, a: Tensor, dtype: torch.dtype, scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(torch.sgn(a).to(torch.int8))
        ctx.scale, ctx.a_dtype = scale, a.dtype
        return a.abs().sum(dtype=dtype) * scale

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (sign,) = ctx.saved_tensors
        s = sign.to(ctx.a_dtype)
        if torch.is_grad_enabled():  # create_graph=True: autograd records this, so no in-place op
            return s * (grad * ctx.scale), None, None
        return s.mul_(grad * ctx.scale), None, None


def l1(
    a: Tensor, *, reduction: ActivityReduction = "batchmean", check: bool = True
) -> Tensor:
    """Activity L1: ``Σ|a| / batch``.

    Args:
        a: activations ``(batch, ...)``.
        reduction: ``"batchmean"`` divides the sum by ``batch = a.shape[0]`` (the convention of
            Keras ≥ 3.14 activity regularizers, default); ``"sum"``; ``"mean"`` over elements.
        check: raise ``ValueError`` if the result is NaN/Inf or overflows ``a``'s dtype (one host sync).

    Returns:
        A scalar in ``a``'s dtype, reduced in float32 at least.
    """
    return scaled_l1(a, 1.0, reduction=reduction, check=check)


def l2(
    a: Tensor, *, reduction: ActivityReduction = "batchmean", check: bool = True
) -> Tensor:
    """Activity L2 (squared): ``Σ a² / batch``.

    Args:
        a: activations ``(batch, ...)``.
        reduction: as for :func:`l1`.
        check: raise ``ValueError`` if the result is NaN/Inf or overflows ``a``'s dtype (one host sync).

    Returns:
        A scalar in ``a``'s dtype, reduced in float32 at least.
    """
    return scaled_l2(a, 1.0, reduction=reduction, check=check)


def scaled_l2(a: Tensor, weight: float = 1.0, *, reduction: ActivityReduction = "batchmean",
              check: bool = True) -> Tensor:
    """``weight · l2(a, reduction=...)``, weighted in the compute dtype (what :class:`actsparse.L2`
    computes): a float16 ``Σa²`` above 65504 whose weighted value fits is returned, not inf."""
    _check_activations(a)
    # Scale by √(weight/divisor) *before* squaring: the partial sums of Σ(a·c)² never exceed the
    # result, so the reduction overflows only when weight·Σa²/d itself does (in float32, Σa² of
    # four 1e19s is inf while Σa²/batch = 1e38 is not). The product is never a itself, so the
    # square keeps no reference to a (an in-place layer after the hook may overwrite it).
    x = a.to(_compute_dtype(a.dtype))
    out = (x * math.sqrt(weight / _activity_divisor(a, reduction))).square().sum()
    return _in_caller_dtype(out, a, check)


def hoyer(a: Tensor, *, check: bool = True) -> Tensor:
    """Hoyer square measure: the mean over samples of ``(Σ|a|)² / Σ a²`` (Hoyer 2004).

    Each sample is ``a[i]`` flattened; the value lies in [1, size] (1 = one active unit) and is
    scale-invariant, so it sparsifies without shrinking the activations. An all-zero sample
    counts 0 (with zero gradient) instead of 0/0; so does a sample whose largest |a| is so small
    (subnormal, below ~4·size/max of the compute dtype) that its gradient, O(size/max|a|), would
    overflow.

    Args:
        a: activations ``(batch, ...)``.
        check: raise ``ValueError`` if the result is NaN/Inf or overflows ``a``'s dtype (one host sync).

    Returns:
        A scalar in ``a``'s dtype, reduced in float32 at least.
    """
    return scaled_hoyer(a, 1.0, check=check)


def scaled_hoyer(a: Tensor, weight: float = 1.0, *, check: bool = True) -> Tensor:
    """``weight · hoyer(a)``, weighted in the compute dtype (what :class:`actsparse.Hoyer` computes)."""
    _check_activations(a)
    cd = _compute_dtype(a.dtype)
    x = a.to(cd).reshape(a.shape[0], -1)
    # The measure is scale-invariant (degree 0), so dividing each sample by a detached positive
    # constant leaves value and gradient exactly unchanged, while keeping Σa² away from underflow.
    # The division keeps no reference to a (the divisor is detached): an in-place layer after the
    # hook may overwrite a. |∂R/∂x_i| ≤ 2√n + 2n for the scaled sample, so the gradient in a is
    # that over the scale: a smaller scale counts as an all-zero sample.
    scale = x.detach().abs().amax(dim=1, keepdim=True)
    tiny = scale <= 4.0 * x.shape[1] / torch.finfo(cd).max  # False for NaN: NaN stays in (and is reported)
    x = torch.where(tiny, 0.0, x / torch.where(tiny, torch.ones_like(scale), scale))
    s1 = x.abs().sum(dim=1)
    s2 = x.square().sum(dim=1)
    nonzero = s2 != 0  # NaN stays in (and is reported), only exact zeros are masked
    # double where: the masked branch must not produce 0/0 even in the backward pass
    ratio = torch.where(nonzero, s1.square() / torch.where(nonzero, s2, torch.ones_like(s2)), 0.0)
    return _in_caller_dtype(ratio.mean() * weight, a, check)
