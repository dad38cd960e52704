"""Penalty objects: a coefficient, a unit axis and, for rate penalties, an optional moving average.

A penalty is an ``nn.Module`` whose ``forward(a)`` maps activations to a weighted scalar,
``weight * f(a)``, using exactly one function of :mod:`actsparse.functional`. Modules are used
(rather than plain callables) only because a rate penalty may keep state: the moving average of
ρ̂, a buffer that is saved in ``state_dict`` and not updated in eval mode.

Penalties compose with ``+``: ``BernoulliKL(0.05, weight=3) + L1(1e-4)`` is one penalty.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as F
from ._lazy import adopt_saved_shapes

__all__ = [
    "Penalty",
    "PenaltyOf",
    "RatePenalty",
    "BernoulliKL",
    "PoissonKL",
    "FrequencyKL",
    "L0",
    "L1",
    "L2",
    "Hoyer",
    "Lp",
    "PenaltySum",
    "PENALTIES",
    "get_penalty",
]


def _check_weight(weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"weight must be a number, got {type(weight).__name__}")
    if not 0.0 <= weight < float("inf"):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    return float(weight)


def _check_unit_dim(unit_dim: int) -> int:
    if isinstance(unit_dim, bool) or not isinstance(unit_dim, int):
        raise TypeError(f"unit_dim must be an int, got {type(unit_dim).__name__}")
    return unit_dim


class Penalty(nn.Module):
    """Base class: ``forward(a) = weight * value(a)``, a scalar in ``a``'s dtype.

    Args:
        weight: the coefficient (β or λ), a finite number >= 0. Default 1.
        unit_dim: the unit axis of the activations; ``-1`` by default, ``1`` for conv maps.
        check: validate activations (NaN/Inf, domain) with one host sync per call. Default True.

    Dtypes: the library's penalties reduce *and weight* in float32 at least (float64 stays
    float64) and return the result in ``a``'s dtype. When that dtype cannot hold the weighted
    value (float16 above 65504), ``check=True`` raises ``ValueError`` naming the dtype and the
    value rather than returning inf; with ``check=False`` the result is inf.

    Subclasses implement :meth:`value`. ``firing_threshold`` is the level above which a unit
    counts as active in statistics (0 unless the penalty defines its own). A subclass that keeps
    state per layer sets :attr:`stateful` and takes ``forward(a, slot=(target, call))``.
    """

    firing_threshold: float | Tensor = 0.0
    #: Whether the penalty is a sum of one term per unit (:meth:`weighted` takes ``(units,)`` weights).
    sum_over_units: bool = False

    def __init__(self, weight: float = 1.0, *, unit_dim: int = -1, check: bool = True) -> None:
        super().__init__()
        self.weight = _check_weight(weight)
        self.unit_dim = _check_unit_dim(unit_dim)
        self.check = bool(check)

    def value(self, a: Tensor) -> Tensor:
        """The unweighted penalty of activations ``a`` (scalar)."""
        raise NotImplementedError

    def forward(self, a: Tensor) -> Tensor:
        """``weight * value(a)``: a differentiable scalar in ``a``'s dtype."""
        return self._scaled(a, self.weight)

    def _scaled(self, a: Tensor, weight: float) -> Tensor:
        """``weight * value(a)`` for a float weight; subclasses fold the weight into their reduction."""
        return self.value(a) * weight

    def weighted(self, a: Tensor, weight: float | Tensor, *, slot: tuple[int, int] = (0, 0)) -> Tensor:
        """The penalty with another coefficient: ``weight · value(a)`` for a float ``weight``, and
        ``Σ_j weight_j · value_j(a)`` for a ``(units,)`` tensor, ``value_j`` the part of the
        penalty that unit ``j`` contributes (the penalties that are a sum over units: the KLs,
        L1, L2). ``self.weight`` is not used; ``slot`` as for :meth:`forward` of stateful
        penalties. A scalar in ``a``'s dtype. :class:`~actsparse.control.TargetSparsity` calls
        this with the coefficient it adapts."""
        if isinstance(weight, Tensor):
            out = (self._unit_values(a) * weight.to(device=a.device, dtype=F._compute_dtype(a.dtype))).sum()
            return F._in_caller_dtype(out, a, self.check)
        return self._scaled(a, float(weight))

    def _unit_values(self, a: Tensor) -> Tensor:
        """``(units,)`` in the compute dtype: the unweighted penalty split by unit (Σ_j = value)."""
        raise TypeError(f"{type(self).__name__} is not a sum over units, so it cannot take one coefficient per "
                        "unit: control it with per_unit=False (one coefficient)")

    def toward(self, *, l0: float | None = None, rate: float | None = None, mean: float | None = None,
               per_unit: bool = False, **knobs: Any):
        """This penalty with its coefficient adapted during training until a measured sparsity
        statistic reaches a target: give one of ``l0`` (active units per sample), ``rate`` (the
        share of samples in which a unit fires, averaged over units or, with ``per_unit``, for
        each unit) or ``mean`` (the mean activation ρ̂). The penalty's ``weight`` is the starting
        coefficient. ``L1(1e-3).toward(l0=16)``; ``BernoulliKL(0.01, weight=3).toward(mean=0.01)``.
        See :class:`~actsparse.control.TargetSparsity` for the update and its knobs (``rate_of_change``,
        ``window``)."""
        from .control import TargetSparsity

        given = {k: v for k, v in (("l0", l0), ("rate", rate), ("mean", mean)) if v is not None}
        if len(given) != 1:
            raise TypeError("toward() takes exactly one target: l0=..., rate=... or mean=..., got "
                            f"{', '.join(given) or 'none'}")
        (statistic, target), = given.items()
        return TargetSparsity(self, statistic, target, per_unit=per_unit, **knobs)

    @property
    def stateful(self) -> bool:
        """Whether ``forward`` updates state (a moving average) that belongs to one layer."""
        return False

    def __add__(self, other: Penalty) -> PenaltySum:
        if not isinstance(other, Penalty):
            return NotImplemented
        return PenaltySum(*_flatten(self), *_flatten(other))

    def transform(self, a: Tensor) -> Tensor:
        """The activation this penalty measures, from a module's output ``a``: ``a`` itself
        (:meth:`of` changes it). :meth:`Attachment.stats` reports statistics of this tensor."""
        return a

    def of(self, fn: Callable[[Tensor], Tensor]) -> PenaltyOf:
        """This penalty on ``fn(output)`` instead of the output: for a model whose activation is
        not a module but a function applied inline in ``forward`` (``F.relu(self.enc1(x))``),
        attach ``PoissonKL(0.05, weight=1e-3).of(torch.relu)`` to ``enc1``. The penalty then reads
        exactly the tensor the forward passes on, with no change to the model and no second
        forward of any layer (``fn`` runs once on the captured output, a ReLU costs one pass)."""
        return PenaltyOf(self, fn)

    def extra_repr(self) -> str:
        parts = [f"weight={self.weight:g}"]
        if self.unit_dim != -1:
            parts.append(f"unit_dim={self.unit_dim}")
        return ", ".join(parts)


def _flatten(p: Penalty) -> list[Penalty]:
    return list(p.terms) if isinstance(p, PenaltySum) else [p]


def _narrower(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` holds less range than the dtype penalties reduce in (float16, bfloat16)."""
    return dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(F._compute_dtype(dtype)).max


#: Names of the moving averages of a rate penalty: ``running_rate`` for its first target's first
#: call, ``running_rate_{target}_{call}`` for the others (see :meth:`RatePenalty.forward`).
_STATE = re.compile(r"running_rate(?:_(\d+)_(\d+))?")


def _state_name(slot: tuple[int, int]) -> str:
    target, call = slot
    return "running_rate" if (target, call) == (0, 0) else f"running_rate_{target}_{call}"


class PenaltySum(Penalty):
    """The sum of several penalties applied to the same activations (built by ``a + b``)."""

    def __init__(self, *terms: Penalty) -> None:
        if not terms or not all(isinstance(t, Penalty) for t in terms):
            raise TypeError("PenaltySum takes one or more Penalty objects")
        super().__init__(1.0, unit_dim=terms[0].unit_dim)
        self.terms = nn.ModuleList(terms)
        self.__dict__["firing_threshold"] = terms[0].firing_threshold

    @property
    def stateful(self) -> bool:
        return any(t.stateful for t in self.terms)

    def forward(self, a: Tensor, *, slot: tuple[int, int] = (0, 0)) -> Tensor:
        """The sum of the terms, in ``a``'s dtype; ``slot`` reaches the stateful terms."""
        parts = [t(a, slot=slot) if t.stateful else t(a) for t in self.terms]
        if not _narrower(a.dtype):
            total = parts[0]
            for v in parts[1:]:
                total = total + v
            return total
        # float16 terms that each fit may still sum past 65504: add in float32, check the cast
        total = parts[0].float()
        for v in parts[1:]:
            total = total + v.float()
        if any(t.check for t in self.terms):
            F.check_finite_result(total, a)
        return total.to(a.dtype)

    def value(self, a: Tensor) -> Tensor:
        return self.forward(a)

    def weighted(self, a: Tensor, weight: float | Tensor, *, slot: tuple[int, int] = (0, 0)) -> Tensor:
        raise TypeError("a sum of penalties has one coefficient per term, not one to adapt: control one term "
                        "and add the others outside, e.g. L1(1e-3).toward(l0=16) + L2(1e-4)")

    def extra_repr(self) -> str:
        return ""


class PenaltyOf(Penalty):
    """``inner`` applied to ``fn(a)`` (built by :meth:`Penalty.of`).

    ``forward(a) = inner(fn(a))``: the value, the gradient (through ``fn``), the moving average
    of a stateful ``inner`` and the statistics are those of ``fn(a)``, exactly as if ``fn`` were a
    module after the hooked layer and ``inner`` were attached to it. ``fn`` maps a tensor to a
    tensor of the same unit layout (an elementwise activation: ``torch.relu``, ``torch.sigmoid``,
    ``torch.tanh``, ``functools.partial(F.leaky_relu, negative_slope=0.01)``); use a named
    function rather than a lambda if the model is pickled (``torch.save``) with its hooks.
    """

    def __init__(self, inner: Penalty, fn: Callable[[Tensor], Tensor]) -> None:
        if not isinstance(inner, Penalty):
            raise TypeError(f"PenaltyOf takes a Penalty, got {type(inner).__name__}")
        if not callable(fn):
            raise TypeError(f"Penalty.of() takes a function of the activations (e.g. torch.relu), got "
                            f"{type(fn).__name__}")
        # the weight is inner's (forward applies inner's own): a controller starts from it
        super().__init__(inner.weight, unit_dim=inner.unit_dim, check=inner.check)
        self.inner, self.fn = inner, fn

    @property
    def firing_threshold(self) -> float | Tensor:  # type: ignore[override]
        return self.inner.firing_threshold

    @property
    def stateful(self) -> bool:
        return self.inner.stateful

    @property
    def sum_over_units(self) -> bool:  # type: ignore[override]
        return self.inner.sum_over_units

    @property
    def target(self) -> float | None:
        return getattr(self.inner, "target", None)

    def _apply(self, a: Tensor) -> Tensor:
        b = self.fn(a)
        if not isinstance(b, Tensor) or b.shape != a.shape:
            got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"the function of Penalty.of() must return a tensor of the output's shape "
                             f"{tuple(a.shape)} (an elementwise activation), got {got}")
        return b

    def transform(self, a: Tensor) -> Tensor:
        return self.inner.transform(self._apply(a))  # p.of(f).of(g) measures p on f(g(a))

    def forward(self, a: Tensor, *, slot: tuple[int, int] = (0, 0)) -> Tensor:
        b = self._apply(a)
        return self.inner(b, slot=slot) if self.inner.stateful else self.inner(b)

    def value(self, a: Tensor) -> Tensor:
        return self.inner.value(self._apply(a))

    def weighted(self, a: Tensor, weight: float | Tensor, *, slot: tuple[int, int] = (0, 0)) -> Tensor:
        return self.inner.weighted(self._apply(a), weight, slot=slot)

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', repr(self.fn))}"


class RatePenalty(Penalty):
    """A divergence between a target rate ρ and each unit's observed rate ρ̂_j (KL penalties).

    ``forward(a) = weight * divergence(target, rate(a))``, where ``rate`` is ``(units,)``.

    Args:
        target: ρ, the desired rate.
        weight: β.
        unit_dim: the unit axis.
        momentum: ``None`` (default) uses the batch's ρ̂. A float μ in [0, 1) uses a moving
            average ``m ← μ·m + (1 − μ)·ρ̂_batch`` (a buffer, ``running_rate``, started from the
            first batch, saved in ``state_dict``, updated only in training mode). The penalty's
            *value* is taken at m, and its gradient flows into the current batch as if ρ̂ were m
            (straight-through), so a small batch sees the same strength as the moving average:
            this is how the CS294A notes' "ρ̂ over the training set" is estimated online.
            A batch is validated before it enters the average: a rejected batch (NaN/Inf, ρ̂
            outside the domain) leaves it unchanged, and a non-finite batch never enters an
            existing average even with ``check=False``. Attached to several layers (or to a
            layer that runs several times per forward), the penalty keeps one average per
            (layer, call): ``running_rate_{target}_{call}`` besides ``running_rate``.
        eps: clamp distance for ρ̂ (see :mod:`actsparse.functional`).
        check: validate activations with one host sync per call: NaN/Inf, ρ̂ outside the
            divergence's domain, and a weighted value that ``a``'s dtype cannot hold (float16
            above 65504; the divergence is summed and weighted in float32).
    """

    running_rate: Tensor
    sum_over_units = True

    def __init__(
        self,
        target: float,
        weight: float = 1.0,
        *,
        unit_dim: int = -1,
        momentum: float | None = None,
        eps: float = F.DEFAULT_EPS,
        check: bool = True,
    ) -> None:
        super().__init__(weight, unit_dim=unit_dim, check=check)
        self._check_target(target)
        self.target = float(target)
        self.momentum = None if momentum is None else F.check_momentum(momentum)
        F.check_probability("eps", eps)
        self.eps = float(eps)
        # Empty until the first batch tells how many units there are.
        self.register_buffer("running_rate", torch.empty(0), persistent=momentum is not None)

    #: the largest batch rate the divergence accepts (None: unbounded); checked before the state moves
    _rate_upper: float | None = 1.0 + 1e-6

    def _check_target(self, target: float) -> None:
        F.check_probability("target ρ", target)

    @property
    def stateful(self) -> bool:
        return self.momentum is not None

    def rate(self, a: Tensor) -> Tensor:
        """The observed per-unit rate ``(units,)`` of activations ``a``."""
        raise NotImplementedError

    def divergence(self, rate: Tensor, reduction: str = "sum") -> Tensor:
        """The unweighted divergence between ``self.target`` and ``rate``: summed over units
        (scalar) or, with ``reduction="none"``, per unit; in ``rate``'s dtype. Unchecked:
        :meth:`forward` validates the batch rate once, before any state moves."""
        raise NotImplementedError

    #: The process group whose global batch ρ̂ is taken over (``None``: this process's batch);
    #: set by :func:`actsparse.distributed.sync_batch_statistics` for DDP training.
    stats_group = None

    def value(self, a: Tensor) -> Tensor:
        return self._evaluate(a, 1.0, (0, 0))

    def weighted(self, a: Tensor, weight: float | Tensor, *, slot: tuple[int, int] = (0, 0)) -> Tensor:
        return self._evaluate(a, weight if isinstance(weight, Tensor) else float(weight), slot)

    def forward(self, a: Tensor, *, slot: tuple[int, int] = (0, 0)) -> Tensor:
        """``weight · divergence(target, ρ̂)`` for activations ``a`` ``(batch, ..., units)``: a
        scalar in ``a``'s dtype (summed and weighted in float32 at least).

        ``slot = (target, call)`` picks the moving average (with ``momentum``): :func:`actsparse.attach`
        passes the index of the layer among this penalty's targets and the index of the call in
        the forward, so layers and calls never share an average. Called directly, ``(0, 0)``:
        ``running_rate``.
        """
        return self._evaluate(a, self.weight, slot)

    def _evaluate(self, a: Tensor, weight: float | Tensor, slot: tuple[int, int]) -> Tensor:
        rate = self.rate(a)
        if self.stats_group is not None:
            from .distributed import global_mean

            rate = global_mean(rate, a.numel() // max(rate.numel(), 1), self.stats_group)
        name, running = None, None
        if self.momentum is not None:
            name = _state_name(slot)
            running = self._next_running(rate, name)
            rate_used = rate + (running - rate).detach()  # value at the average, gradient through the batch
        else:
            rate_used = rate
        if isinstance(weight, Tensor):  # one coefficient per unit: Σ_j w_j · divergence_j
            out = (self.divergence(rate_used, "none") * weight.to(rate_used)).sum()
        else:
            out = self.divergence(rate_used) * weight
        if self.check:
            # one host read for the batch rate (NaN/Inf, domain) and the value's fit in a's dtype,
            # before the moving average moves: a rejected batch must not stay in it
            F._check_rate(rate.detach(), upper=self._rate_upper, penalty=type(self).__name__,
                          result=out, dtype=a.dtype)
        if running is not None and self.training:
            self._commit(name, running, rate)
        return out.to(a.dtype)

    def _next_running(self, rate: Tensor, name: str) -> Tensor:
        """The moving average ``name`` after this batch ``(units,)``; not stored yet."""
        running = getattr(self, name, None)
        if running is None or running.numel() == 0:
            return rate.detach().clone()  # started from the first batch
        if running.shape != rate.shape:
            raise ValueError(
                f"{type(self).__name__} holds a moving average for {running.numel()} units but the "
                f"activations have {rate.numel()}; use one penalty object per layer (attach() keeps one "
                "average per layer and call)"
            )
        running = running.to(device=rate.device, dtype=rate.dtype)
        return self.momentum * running + (1.0 - self.momentum) * rate.detach()

    def _commit(self, name: str, running: Tensor, rate: Tensor) -> None:
        old = getattr(self, name, None)
        if old is not None and old.numel():
            # unchecked (check=False, torch.compile) a non-finite batch would stay in the average
            # forever: keep the old one, on the device, without a host sync
            running = torch.where(torch.isfinite(rate.detach()).all(), running, old.to(running))
        if name in self._buffers:
            setattr(self, name, running)
        else:
            self.register_buffer(name, running)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # averages of further targets and calls are created on first use: create them for loading too
        names = [k[len(prefix):] for k in state_dict if k.startswith(prefix) and _STATE.fullmatch(k[len(prefix):])]
        if self.momentum is not None:
            for name in names:
                if name not in self._buffers:
                    self.register_buffer(name, torch.empty(0, device=self.running_rate.device))
        adopt_saved_shapes(self, state_dict, prefix, *(n for n in names if n in self._buffers))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        parts = [f"target={self.target:g}", super().extra_repr()]
        if self.momentum is not None:
            parts.append(f"momentum={self.momentum:g}")
        return ", ".join(parts)


class BernoulliKL(RatePenalty):
    """β Σ_j KL(ρ ‖ ρ̂_j), ρ̂_j the mean activation: the classic sparse-autoencoder penalty.

    For activations in [0, 1] (sigmoid). Ng, CS294A notes, p.14–15. Raises a clear error that
    points to :class:`PoissonKL` if a unit's mean activation exceeds 1 (ReLU).

    Example: ``BernoulliKL(0.05, weight=3.0)`` — ρ = 0.05, β = 3.
    """

    def rate(self, a: Tensor) -> Tensor:
        return F.mean_activation(a, self.unit_dim)

    def divergence(self, rate: Tensor, reduction: str = "sum") -> Tensor:
        return F.bernoulli_kl(self.target, rate, reduction=reduction, eps=self.eps, check=False)


class PoissonKL(RatePenalty):
    """β Σ_j [ρ log(ρ/ρ̂_j) − ρ + ρ̂_j]: the generalised KL, for unbounded activations ≥ 0 (ReLU).

    ``target`` is any ρ > 0 (a mean activation, not a probability, so it may exceed 1).
    """

    _rate_upper = None

    def _check_target(self, target: float) -> None:
        F.check_positive("target ρ", target)

    def rate(self, a: Tensor) -> Tensor:
        return F.mean_activation(a, self.unit_dim)

    def divergence(self, rate: Tensor, reduction: str = "sum") -> Tensor:
        return F.poisson_kl(self.target, rate, reduction=reduction, eps=self.eps, check=False)


class FrequencyKL(RatePenalty):
    """β Σ_j KL(ρ ‖ f̂_j), f̂_j how *often* unit j fires (``a > threshold``): an L0-style penalty.

    f̂_j is :func:`actsparse.functional.activation_frequency`, whose straight-through
    pseudo-gradient (Rajamanoharan et al. 2024) makes the frequency trainable — the penalty seed
    001 wrote by hand, where ``(encoded > 0).sum()`` had no gradient and so no effect.

    Args:
        target: ρ in (0, 1), the desired firing frequency.
        weight: β.
        threshold: θ, a float or a learnable ``(units,)`` tensor; a unit fires when ``a > θ``.
        bandwidth: ε, the width of the pseudo-gradient window around θ, in activation units.
            Only activations within ε/2 of θ are pushed; scale it with your activations. A unit
            whose activations all lie outside the window (always far above θ, or never near
            it) gets no gradient at all, however large its penalty: pick ε on the scale of the
            activations, and switch the penalty on after a short warm-up with the
            reconstruction loss alone (seed 001: ε = 0.3, warm-up 300 steps). ``"auto"``: one
            width per unit from each batch (twice the distance from θ to the unit's
            (1 − ρ)-quantile, plus a tenth of its standard deviation), so that the window always
            reaches the samples that must cross θ. Under DDP each process takes the quantile of
            its own batch (the frequency itself is global), so ranks may use slightly different
            windows.
        eps: clamp of f̂ into [eps, 1 − eps] (straight-through). Default ``min(0.01, target/2)``:
            frequencies of exactly 0 or 1 are common, and a tiny eps gives them a huge slope.
        unit_dim, momentum, check: as for :class:`RatePenalty`.
    """

    def __init__(
        self,
        target: float,
        weight: float = 1.0,
        threshold: float | Tensor = 0.0,
        *,
        bandwidth: float | str = F.DEFAULT_BANDWIDTH,
        unit_dim: int = -1,
        momentum: float | None = None,
        eps: float | None = None,
        check: bool = True,
    ) -> None:
        F.check_probability("target ρ", target)
        if eps is None:
            # A frequency of exactly 0 or 1 is common (a whole batch silent or firing); at
            # eps=1e-6 the KL's slope there is ~β/1e-6, one such step swamps Adam's second-moment
            # estimate and training stalls. 1e-2 (about 1/batch) keeps it usable.
            eps = min(1e-2, target / 2)
        super().__init__(
            target, weight, unit_dim=unit_dim, momentum=momentum, eps=eps, check=check
        )
        if isinstance(bandwidth, str):
            if bandwidth != "auto":
                raise ValueError(f"bandwidth must be a number > 0 or 'auto', got {bandwidth!r}")
        else:
            F.check_positive("bandwidth", bandwidth)
            bandwidth = float(bandwidth)
        self.bandwidth: float | str = bandwidth
        F.check_threshold(threshold)
        # A tensor threshold (e.g. a JumpReLU's learned θ) is referenced, not owned: it stays a
        # parameter of your model only, so it is not registered here.
        self.__dict__["firing_threshold"] = threshold if isinstance(threshold, Tensor) else float(threshold)

    @property
    def threshold(self) -> float | Tensor:
        return self.firing_threshold

    def rate(self, a: Tensor) -> Tensor:
        rate = F.activation_frequency(a, self.firing_threshold, self.unit_dim, self._bandwidth_for(a))
        if self.check:
            # a NaN activation compares as "not firing", so the frequency alone would hide it: carry it
            # into the value (one isnan pass, no extra host sync), where the result's finite check names it
            rate = rate + torch.where(torch.isnan(a).any(), float("nan"), 0.0)
        return rate

    def divergence(self, rate: Tensor, reduction: str = "sum") -> Tensor:
        return F.bernoulli_kl(self.target, rate, reduction=reduction, eps=self.eps, check=False)

    @torch.no_grad()
    def _bandwidth_for(self, a: Tensor) -> float | Tensor:
        """ε, or with ``bandwidth="auto"`` one width per unit from this batch: twice the distance
        from θ to the unit's (1 − ρ)-quantile, plus a tenth of its standard deviation. The window
        then reaches every sample that must cross θ for the unit to fire at rate ρ: those between
        θ and the quantile (above θ when it fires too often, below when too rarely), so a unit
        that always or never fires still gets a gradient."""
        if not isinstance(self.bandwidth, str):
            return self.bandwidth
        d = F.normalize_unit_dim(a, self.unit_dim)
        z = a.detach().movedim(d, -1).reshape(-1, a.shape[d]).to(F._compute_dtype(a.dtype))
        q = torch.quantile(z, 1.0 - self.target, dim=0)
        th = self.firing_threshold
        th = th.detach().to(z) if isinstance(th, Tensor) else th
        eps = 2.0 * (q - th).abs() + 0.1 * z.std(dim=0, unbiased=False)
        return eps.clamp_min(1e-6)

    def extra_repr(self) -> str:
        th = self.firing_threshold
        th_s = f"{th:g}" if isinstance(th, float) else f"tensor{tuple(th.shape)}"
        bw = self.bandwidth if isinstance(self.bandwidth, str) else f"{self.bandwidth:g}"
        return f"{super().extra_repr()}, threshold={th_s}, bandwidth={bw}"


class L0(Penalty):
    """λ · Σ_j f̂_j: the number of units per sample (and position) above θ, with f̂_j the share of
    samples in which unit j fires, ``a > θ`` — the L0 sparsity loss of JumpReLU SAEs
    (Rajamanoharan et al. 2024, "Jumping Ahead: Improving reconstruction fidelity with JumpReLU
    sparse autoencoders", eq. 9), with the straight-through pseudo-derivative of their eq. 11:
    ∂H(a − θ)/∂θ := −(1/ε) K((a − θ)/ε), K the rectangle kernel (and +(1/ε) K for ``a``).

    Args:
        weight: λ.
        threshold: θ: a float, a ``(units,)`` tensor, or a module with a ``threshold`` attribute
            (a :class:`~actsparse.models.JumpReLU`), read anew at every call so that a learned θ
            is always the current one. Default 0.
        bandwidth: ε; default the module's ``bandwidth`` if it has one, else 0.1.
        unit_dim, check: as for :class:`Penalty`.

    A :class:`~actsparse.models.SparseAutoencoder` with a JumpReLU binds an ``L0`` whose threshold
    is left at None to its JumpReLU and applies it to the *pre-activations*, detached: as in the
    paper, the L0 term trains the thresholds only, with both sides of the kernel. Attached with
    :func:`actsparse.attach` to a JumpReLU's output instead, it sees only the fired side (an
    unfired unit's output is 0, not its pre-activation), so its gradient on θ is about half.
    """

    sum_over_units = True

    def __init__(self, weight: float = 1.0, threshold: float | Tensor | nn.Module | None = None, *,
                 bandwidth: float | None = None, unit_dim: int = -1, check: bool = True) -> None:
        super().__init__(weight, unit_dim=unit_dim, check=check)
        if bandwidth is not None:
            F.check_positive("bandwidth", bandwidth)
        self.bandwidth = None if bandwidth is None else float(bandwidth)
        self.bind(threshold)

    def bind(self, threshold: float | Tensor | nn.Module | None) -> None:
        """Set θ (a float, a tensor, or a module whose ``threshold`` is read at each call; None: 0
        until a model binds its JumpReLU)."""
        if isinstance(threshold, nn.Module):
            if not hasattr(threshold, "threshold"):
                raise TypeError(f"L0's threshold module must have a 'threshold' (a JumpReLU), got "
                                f"{type(threshold).__name__}")
        elif threshold is not None:
            F.check_threshold(threshold)
        # referenced, not owned: the module's θ stays a parameter of the model only
        self.__dict__["_threshold"] = threshold

    @property
    def bound(self) -> bool:
        return self.__dict__.get("_threshold") is not None

    @property
    def firing_threshold(self) -> float | Tensor:  # type: ignore[override]
        th = self.__dict__.get("_threshold")
        if isinstance(th, nn.Module):
            return th.threshold
        return 0.0 if th is None else (th if isinstance(th, Tensor) else float(th))

    def _bandwidth(self) -> float:
        if self.bandwidth is not None:
            return self.bandwidth
        th = self.__dict__.get("_threshold")
        return float(getattr(th, "bandwidth", F.DEFAULT_BANDWIDTH)) if isinstance(th, nn.Module) \
            else F.DEFAULT_BANDWIDTH

    def _unit_values(self, a: Tensor) -> Tensor:
        rate = F.activation_frequency(a, self.firing_threshold, self.unit_dim, self._bandwidth())
        if self.check:  # a NaN activation compares as "not firing": carry it into the value (see FrequencyKL)
            rate = rate + torch.where(torch.isnan(a).any(), float("nan"), 0.0)
        return rate

    def value(self, a: Tensor) -> Tensor:
        out = self._unit_values(a).sum()
        if self.check:
            F.check_finite_result(out, a)
        return out.to(a.dtype)

    def extra_repr(self) -> str:
        th = self.__dict__.get("_threshold")
        shown = type(th).__name__ if isinstance(th, nn.Module) else ("tensor" if isinstance(th, Tensor) else th)
        return f"{super().extra_repr()}, threshold={shown}"


class L1(Penalty):
    """λ Σ|a| / batch: the activity L1 penalty (batch = ``a.shape[0]``, as Keras ≥ 3.14).

    Summed and weighted in float32 at least; returned in ``a``'s dtype, or, with ``check``, a
    ``ValueError`` naming dtype and value when that dtype cannot hold it (float16 above 65504).
    """

    sum_over_units = True

    def value(self, a: Tensor) -> Tensor:
        return F.scaled_l1(a, 1.0, check=self.check)

    def _scaled(self, a: Tensor, weight: float) -> Tensor:
        return F.scaled_l1(a, weight, check=self.check)  # the weight folded into the reduction

    def _unit_values(self, a: Tensor) -> Tensor:  # Σ over all but the unit axis of |a|, / batch
        F._check_activations(a)
        x = a.to(F._compute_dtype(a.dtype))
        return x.abs().sum(dim=F._reduce_dims(a, self.unit_dim)) / a.shape[0]


class L2(Penalty):
    """λ Σ a² / batch: the activity L2 penalty (squared norm; batch = ``a.shape[0]``).

    Summed and weighted in float32 at least, so a float16 Σa² above 65504 whose weighted value
    fits is returned exactly; a weighted value that does not fit raises with ``check``.
    """

    sum_over_units = True

    def value(self, a: Tensor) -> Tensor:
        return F.l2(a, check=self.check)

    def _scaled(self, a: Tensor, weight: float) -> Tensor:
        return F.scaled_l2(a, weight, check=self.check)  # weighted before the cast to a's dtype

    def _unit_values(self, a: Tensor) -> Tensor:  # Σ over all but the unit axis of a², / batch
        F._check_activations(a)
        x = a.to(F._compute_dtype(a.dtype))
        return x.square().sum(dim=F._reduce_dims(a, self.unit_dim)) / a.shape[0]


class Hoyer(Penalty):
    """λ · mean over samples of (Σ|a|)² / Σa²: scale-invariant sparsity (Hoyer 2004).

    Weighted in float32 at least; with ``check``, a weighted value that ``a``'s dtype cannot
    hold (float16 above 65504) raises ``ValueError`` naming dtype and value.
    """

    def value(self, a: Tensor) -> Tensor:
        return F.hoyer(a, check=self.check)

    def _scaled(self, a: Tensor, weight: float) -> Tensor:
        return F.scaled_hoyer(a, weight, check=self.check)  # weighted before the cast to a's dtype


#: Lp with p < 1: below this |a| the term |a|^p is replaced by its chord ε^(p−1)·|a| (see :class:`Lp`).
LP_EPS = 1e-6

#: The buffers of :class:`Lp` (float64 scalars, kept float64 by ``.half()``/``.float()``).
_LP_STATE = ("p", "progress", "coef_scale", "coef_scale_p")


def _check_exponent(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0.0 < value < math.inf:  # also False for NaN
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a fraction of training in [0, 1], got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:  # also False for NaN
        raise ValueError(f"{name} must be a fraction of training in [0, 1], got {value!r}")
    return float(value)


class Lp(Penalty):
    """λ · Σ|a|^p / batch, with p annealed during training (p-annealing).

    The activity Lp^p penalty: the sum over every element of ``a`` ``(batch, ..., units)`` of
    |a|^p, divided by ``batch = a.shape[0]``, times λ — the reduction of :class:`L1`, so
    ``Lp(λ, p=1)`` is ``L1(λ)`` (the same computation) and ``Lp(λ, p=2)`` equals ``L2(λ)``. p < 1
    comes closer to counting active units (L0) than L1 does and shrinks large activations less.

    **p-annealing** (Karvonen et al. 2024, "Measuring progress in dictionary learning for language
    model interpretability with board game models", NeurIPS, §p-annealing): training starts at
    ``p`` (the convex L1 by default) and p falls linearly to ``p_end`` between the fractions
    ``anneal_start`` and ``anneal_end`` of training; before, p is ``p``, after, ``p_end``. With
    t = clamp((fraction − anneal_start)/(anneal_end − anneal_start), 0, 1),
    p = (1 − t)·p + t·p_end. ``levels=n`` takes instead the paper code's staircase of n values
    (its ``n_sparsity_updates``, 10): p_k = (1 − k/(n−1))·p + k/(n−1)·p_end from the fraction
    anneal_start + k/(n−1)·(anneal_end − anneal_start) on. :meth:`set_progress` sets the fraction
    (a trainer calls it before each step); until then p is ``p``.

    **Rescaling** (``rescale=True``, the default, as in the paper): when p changes, the magnitude of
    Σ|a|^p changes with it (up for |a| < 1, down above), so the coefficient is multiplied by the
    ratio of the previous to the new penalty value: going from p_old to p_new, at the first training
    forward after the change (training mode, gradients on),
    ``coef_scale ← coef_scale · Σ|a|^p_old / Σ|a|^p_new``, both sums on that batch (over every
    rank's batch under DDP, :func:`~actsparse.distributed.sync_batch_statistics`). That forward
    already uses the new scale, so the penalty keeps its value across the change. The coefficient
    is λ · ``coef_scale`` (:attr:`coefficient`); ``coef_scale`` starts at 1. A batch whose sums are
    0 (all-zero activations) or not finite leaves the rescale pending for the next batch. The
    authors' code (``dictionary_learning``, ``PAnnealTrainer``) takes the same ratio of the means of
    the two sums over the 10 batches before each change (``sparsity_queue_length``); one batch, at
    the change, is that rule with a queue of one. Every change of p rescales: with a continuous
    schedule that is every step, at the cost of two reductions without gradient and one host read.
    Under :meth:`~Penalty.toward` the scale multiplies the controller's coefficient (the jump at
    a change is absorbed at once; the controller does the rest).

    **Numerics.** The derivative p·|a|^(p−1) of |a|^p is infinite at a = 0 for p < 1, and ReLU codes
    are exactly 0 most of the time. For p < 1, below |a| = ``eps`` (default ``LP_EPS`` = 1e-6) the
    term is the chord ε^(p−1)·|a| instead: 0 at a = 0, equal to |a|^p at |a| = ε, continuous, with a
    derivative ε^(p−1)·sgn(a) that is finite (≤ 1e6 for p ≥ 0.01 in float32) and 0 at a = 0 (the
    sign of 0 is 0, as for :class:`L1`). Elsewhere the value and gradient are |a|^p's exactly;
    |a|^p is never evaluated below ε, so the backward has no inf·0 = NaN. For p ≥ 1 the term is
    |a|^p everywhere (its derivative is finite; 0 at 0).

    Args:
        weight: λ, a finite number ≥ 0. Default 1.
        p: the exponent at the start, a finite number > 0. Default 1 (L1).
        p_end: the exponent at the end of annealing, 0 < p_end ≤ p; None (default): p stays ``p``.
        anneal_start, anneal_end: the fractions of training over which p moves, 0 ≤ start < end ≤ 1.
            Default 0 and 1 (all of training).
        levels: None (default): p moves at every :meth:`set_progress`; an int n ≥ 2: the staircase
            of n values above.
        rescale: rescale the coefficient when p changes (above). Default True.
        eps: ε of the chord for p < 1, a finite number > 0. Default 1e-6.
        unit_dim, check: as for :class:`Penalty`.

    Returns (``forward``): a scalar in ``a``'s dtype, reduced and weighted in float32 at least;
    with ``check``, NaN/Inf activations and a value that ``a``'s dtype cannot hold raise
    ``ValueError``.

    State: ``p`` (the current exponent), ``progress`` (the last fraction set), ``coef_scale`` and
    ``coef_scale_p`` (the p it was last rescaled at: a rescale is pending while it differs from
    ``p``) are float64 buffers, saved in ``state_dict``, so a resumed run continues bit-identically.
    They change only through :meth:`set_progress` and (the scale) training forwards.

    Example: ``Lp(1e-3, p=1.0, p_end=0.2, anneal_start=0.5)`` — L1 for the first half, then p falls
    linearly to 0.2 by the end.
    """

    sum_over_units = True
    #: The process group the rescaling sums are taken over (set for DDP by sync_batch_statistics).
    stats_group = None
    p: Tensor
    progress: Tensor
    coef_scale: Tensor
    coef_scale_p: Tensor

    def __init__(self, weight: float = 1.0, p: float = 1.0, p_end: float | None = None, *,
                 anneal_start: float = 0.0, anneal_end: float = 1.0, levels: int | None = None,
                 rescale: bool = True, eps: float = LP_EPS, unit_dim: int = -1, check: bool = True) -> None:
        super().__init__(weight, unit_dim=unit_dim, check=check)
        p = _check_exponent("p", p)
        if p_end is not None:
            p_end = _check_exponent("p_end", p_end)
            if p_end > p:
                raise ValueError(f"p-annealing lowers p: p_end must be <= p, got p={p:g}, p_end={p_end:g} "
                                 "(for a fixed p leave p_end None)")
        anneal_start = _check_fraction("anneal_start", anneal_start)
        anneal_end = _check_fraction("anneal_end", anneal_end)
        if not anneal_start < anneal_end:
            raise ValueError(f"anneal_start must be < anneal_end, got {anneal_start:g} and {anneal_end:g}")
        if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or levels < 2):
            raise ValueError(f"levels must be None (p moves continuously) or an int >= 2, got {levels!r}")
        if not isinstance(rescale, bool):
            raise TypeError(f"rescale must be True or False, got {type(rescale).__name__}")
        self.p_start, self.p_end = p, p_end
        self.anneal_start, self.anneal_end = anneal_start, anneal_end
        self.levels = levels
        self.rescale = rescale
        self.eps = _check_exponent("eps", eps)
        f64 = torch.float64
        self.register_buffer("p", torch.tensor(p, dtype=f64))
        self.register_buffer("progress", torch.zeros((), dtype=f64))
        self.register_buffer("coef_scale", torch.ones((), dtype=f64))
        self.register_buffer("coef_scale_p", torch.tensor(p, dtype=f64))
        self._refresh()

    # ---------------------------------------------------------------- the schedule
    def p_at(self, fraction: float) -> float:
        """The exponent the schedule gives at a fraction of training (clamped to [0, 1])."""
        if self.p_end is None:
            return self.p_start
        s, e = self.anneal_start, self.anneal_end
        t = min(max((fraction - s) / (e - s), 0.0), 1.0)
        if self.levels is not None:
            n = self.levels - 1
            k = min(math.floor(t * n), n)
            if k < n and fraction >= s + (e - s) * ((k + 1) / n):  # the boundary as documented, exactly
                k += 1
            t = k / n
        return (1.0 - t) * self.p_start + t * self.p_end

    def set_progress(self, fraction: float) -> None:
        """Fraction of training done, in [0, 1] (clamped); sets the annealed p."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise TypeError(f"the training fraction must be a number in [0, 1], got {type(fraction).__name__}")
        if math.isnan(fraction):
            raise ValueError("the training fraction must be a number in [0, 1], got nan")
        f = min(max(float(fraction), 0.0), 1.0)
        p = self.p_at(f)
        self.progress.fill_(f)
        self.p.fill_(p)
        self._progress, self._p = f, p

    @property
    def current_p(self) -> float:
        """The exponent in use."""
        return self._p

    @property
    def coefficient(self) -> float:
        """λ · ``coef_scale``: the coefficient ``forward`` applies."""
        return self.weight * self._scale

    # ---------------------------------------------------------------- the value
    def _terms(self, x: Tensor, p: float) -> Tensor:
        """|x|^p elementwise (the chord below ε for p < 1), in x's dtype; x must not be the caller's tensor."""
        mag = x.abs()
        if p == 1.0:
            return mag
        if p > 1.0:
            return mag.pow(p)
        big = mag >= self.eps  # False for NaN: the chord carries it into the value (reported by check)
        base = torch.where(big, mag, self.eps)  # ≥ ε: |a|^p and its gradient stay finite
        return torch.where(big, base.pow(p), mag * self.eps ** (p - 1.0))

    def _evaluate(self, a: Tensor, weight: float) -> Tensor:
        """``weight · Σ|a|^p / batch`` at the current p; no state changes."""
        if self._p == 1.0:
            return F.scaled_l1(a, weight, check=self.check)  # L1's own computation: Lp(p=1) is L1
        F._check_activations(a)
        # a copy, so that autograd keeps no reference to a (an in-place layer after the hook may overwrite it)
        x = a.to(F._compute_dtype(a.dtype), copy=True)
        out = self._terms(x, self._p).sum() * (weight / a.shape[0])
        return F._in_caller_dtype(out, a, self.check)

    def value(self, a: Tensor) -> Tensor:
        """Σ|a|^p / batch at the current p, unweighted (without λ or ``coef_scale``)."""
        return self._evaluate(a, 1.0)

    def _scaled(self, a: Tensor, weight: float) -> Tensor:
        F._check_activations(a)
        return self._evaluate(a, weight * self._scale_for(a))

    def weighted(self, a: Tensor, weight: float | Tensor, *, slot: tuple[int, int] = (0, 0)) -> Tensor:
        if isinstance(weight, Tensor):  # one coefficient per unit: each times coef_scale
            F._check_activations(a)
            weight = weight * self._scale_for(a)
        return super().weighted(a, weight, slot=slot)

    def _unit_values(self, a: Tensor) -> Tensor:  # Σ over all but the unit axis of |a|^p, / batch
        F._check_activations(a)
        x = a.to(F._compute_dtype(a.dtype), copy=True)
        return self._terms(x, self._p).sum(dim=F._reduce_dims(a, self.unit_dim)) / a.shape[0]

    # ---------------------------------------------------------------- the rescaling
    def _scale_for(self, a: Tensor) -> float:
        """``coef_scale``, first rescaled to the current p if p changed (training forwards only)."""
        if self.rescale and self._p != self._scale_p and self.training and torch.is_grad_enabled():
            self._rescale(a)
        return self._scale

    @torch.no_grad()
    def _rescale(self, a: Tensor) -> None:
        x = a.detach().to(F._compute_dtype(a.dtype))
        sums = torch.stack([self._terms(x, self._scale_p).sum(), self._terms(x, self._p).sum()]).double()
        if self.stats_group is not None:  # every rank takes the same ratio
            torch.distributed.all_reduce(sums, group=self.stats_group)
        old, new = sums.tolist()
        scale = self._scale * (old / new) if new > 0 and math.isfinite(new) and math.isfinite(old) else 0.0
        if not 0.0 < scale < math.inf:
            return  # an all-zero or non-finite batch: the next one rescales
        self.coef_scale.fill_(scale)
        self.coef_scale_p.fill_(self._p)
        self._scale, self._scale_p = scale, self._p

    # ---------------------------------------------------------------- state
    def _refresh(self) -> None:
        """The Python copies of the buffers (read at every call without a host sync)."""
        values = {name: float(getattr(self, name)) for name in _LP_STATE}
        for name in ("p", "coef_scale", "coef_scale_p"):
            if not 0.0 < values[name] < math.inf:
                raise ValueError(f"Lp: the state {name} must be a finite number > 0, got {values[name]!r}")
        if not 0.0 <= values["progress"] <= 1.0:
            raise ValueError(f"Lp: the state progress must lie in [0, 1], got {values['progress']!r}")
        self._p, self._progress = values["p"], values["progress"]
        self._scale, self._scale_p = values["coef_scale"], values["coef_scale_p"]

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """``.to()``, ``.half()``... move the state but keep it float64: a model cast to float16 must
        not round p or the scale, or a resumed run would differ."""
        own = {name: self._buffers[name] for name in _LP_STATE if self._buffers.get(name) is not None}
        for name in own:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, b in own.items():
                probe = fn(torch.zeros((), dtype=torch.float64, device=b.device))
                self._buffers[name] = b.to(probe.device) if isinstance(probe, Tensor) else b
        return self

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"p={self._p:g}"]
        if self.p_end is not None:
            parts.append(f"anneal={self.p_start:g}->{self.p_end:g} over [{self.anneal_start:g}, {self.anneal_end:g}]")
            if self.levels is not None:
                parts.append(f"levels={self.levels}")
            if self.rescale:
                parts.append(f"coef_scale={self._scale:.4g}")
        return ", ".join(parts)


#: Registry of penalty names (CLI and config files resolve ``--penalty NAME`` here).
PENALTIES: dict[str, type[Penalty]] = {
    "kl": BernoulliKL,
    "bernoulli_kl": BernoulliKL,
    "poisson_kl": PoissonKL,
    "frequency_kl": FrequencyKL,
    "l0": L0,
    "l1": L1,
    "l2": L2,
    "hoyer": Hoyer,
    "lp": Lp,
}


def get_penalty(name: str, **kwargs: Any) -> Penalty:
    """Build a penalty by registry name, e.g. ``get_penalty("kl", target=0.05, weight=3)``.

    Raises:
        KeyError: for an unknown name, listing the valid ones and the closest match.
    """
    if not isinstance(name, str):
        raise TypeError(f"a penalty name must be a str (one of {', '.join(sorted(PENALTIES))}), "
                        f"got {type(name).__name__}")
    key = name.lower().replace("-", "_")
    if key not in PENALTIES:
        close = difflib.get_close_matches(key, PENALTIES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(
            f"unknown penalty {name!r}.{hint} Valid names: {', '.join(sorted(PENALTIES))}"
        )
    return PENALTIES[key](**kwargs)
