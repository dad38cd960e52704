"""Penalty objects: a coefficient, a unit axis and, for rate penalties, an optional moving average.

A penalty is an ``nn.Module`` whose ``forward(a)`` maps activations to a weighted scalar,
``weight * f(a)``, using exactly one function of :mod:`actsparse.functional`. Modules are used
(rather than plain callables) only because a rate penalty may keep state: the moving average of
ρ̂, a buffer that is saved in ``state_dict`` and not updated in eval mode.

Penalties compose with ``+``: ``BernoulliKL(0.05, weight=3) + L1(1e-4)`` is one penalty.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as F
from ._lazy import adopt_saved_shapes

__all__ = [
    "Penalty",
    "RatePenalty",
    "BernoulliKL",
    "PoissonKL",
    "FrequencyKL",
    "L1",
    "L2",
    "Hoyer",
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

    Subclasses implement :meth:`value`. ``firing_threshold`` is the level above which a unit
    counts as active in statistics (0 unless the penalty defines its own).
    """

    firing_threshold: float | Tensor = 0.0

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
        return self.value(a) * self.weight

    def __add__(self, other: Penalty) -> PenaltySum:
        if not isinstance(other, Penalty):
            return NotImplemented
        return PenaltySum(*_flatten(self), *_flatten(other))

    def extra_repr(self) -> str:
        parts = [f"weight={self.weight:g}"]
        if self.unit_dim != -1:
            parts.append(f"unit_dim={self.unit_dim}")
        return ", ".join(parts)


def _flatten(p: Penalty) -> list[Penalty]:
    return list(p.terms) if isinstance(p, PenaltySum) else [p]


class PenaltySum(Penalty):
    """The sum of several penalties applied to the same activations (built by ``a + b``)."""

    def __init__(self, *terms: Penalty) -> None:
        if not terms or not all(isinstance(t, Penalty) for t in terms):
            raise TypeError("PenaltySum takes one or more Penalty objects")
        super().__init__(1.0, unit_dim=terms[0].unit_dim)
        self.terms = nn.ModuleList(terms)
        self.__dict__["firing_threshold"] = terms[0].firing_threshold

    def forward(self, a: Tensor) -> Tensor:
        total = self.terms[0](a)
        for t in self.terms[1:]:
            total = total + t(a)
        return total

    def value(self, a: Tensor) -> Tensor:
        return self.forward(a)

    def extra_repr(self) -> str:
        return ""


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
        eps: clamp distance for ρ̂ (see :mod:`actsparse.functional`).
        check: validate activations with one host sync per call.
    """

    running_rate: Tensor

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

    def _check_target(self, target: float) -> None:
        F.check_probability("target ρ", target)

    def rate(self, a: Tensor) -> Tensor:
        """The observed per-unit rate ``(units,)`` of activations ``a``."""
        raise NotImplementedError

    def divergence(self, rate: Tensor) -> Tensor:
        """The unweighted divergence between ``self.target`` and ``rate`` (scalar)."""
        raise NotImplementedError

    #: The process group whose global batch ρ̂ is taken over (``None``: this process's batch);
    #: set by :func:`actsparse.distributed.sync_batch_statistics` for DDP training.
    stats_group = None

    def value(self, a: Tensor) -> Tensor:
        rate = self.rate(a)
        if self.stats_group is not None:
            from .distributed import global_mean

            rate = global_mean(rate, a.numel() // max(rate.numel(), 1), self.stats_group)
        rate = self.smoothed(rate)
        return self.divergence(rate).to(a.dtype)

    def smoothed(self, rate: Tensor) -> Tensor:
        """Apply the moving average (if any) to a batch rate ``(units,)``; update it in training."""
        if self.momentum is None:
            return rate
        running = self.running_rate
        if running.numel() == 0:
            running = rate.detach().clone()  # started from the first batch
        else:
            if running.shape != rate.shape:
                raise ValueError(
                    f"{type(self).__name__} holds a moving average for {running.numel()} units "
                    f"but the activations have {rate.numel()}; one penalty object per layer"
                )
            running = running.to(device=rate.device, dtype=rate.dtype)
            running = self.momentum * running + (1.0 - self.momentum) * rate.detach()
        if self.training:
            self.running_rate = running
        # value at the moving average, gradient through the batch rate
        return rate + (running - rate).detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        adopt_saved_shapes(self, state_dict, prefix, "running_rate")
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

    def divergence(self, rate: Tensor) -> Tensor:
        return F.bernoulli_kl(self.target, rate, eps=self.eps, check=self.check)


class PoissonKL(RatePenalty):
    """β Σ_j [ρ log(ρ/ρ̂_j) − ρ + ρ̂_j]: the generalised KL, for unbounded activations ≥ 0 (ReLU).

    ``target`` is any ρ > 0 (a mean activation, not a probability, so it may exceed 1).
    """

    def _check_target(self, target: float) -> None:
        F.check_positive("target ρ", target)

    def rate(self, a: Tensor) -> Tensor:
        return F.mean_activation(a, self.unit_dim)

    def divergence(self, rate: Tensor) -> Tensor:
        return F.poisson_kl(self.target, rate, eps=self.eps, check=self.check)


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
            reconstruction loss alone (seed 001: ε = 0.3, warm-up 300 steps).
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
        bandwidth: float = F.DEFAULT_BANDWIDTH,
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
        F.check_positive("bandwidth", bandwidth)
        self.bandwidth = float(bandwidth)
        F.check_threshold(threshold)
        # A tensor threshold (e.g. a JumpReLU's learned θ) is referenced, not owned: it stays a
        # parameter of your model only, so it is not registered here.
        self.__dict__["firing_threshold"] = threshold if isinstance(threshold, Tensor) else float(threshold)

    @property
    def threshold(self) -> float | Tensor:
        return self.firing_threshold

    def rate(self, a: Tensor) -> Tensor:
        rate = F.activation_frequency(a, self.firing_threshold, self.unit_dim, self.bandwidth)
        if self.check:
            # a NaN activation compares as "not firing", so the frequency alone would hide it: carry it
            # into the value (one isnan pass, no extra host sync), where the result's finite check names it
            rate = rate + torch.where(torch.isnan(a).any(), float("nan"), 0.0)
        return rate

    def divergence(self, rate: Tensor) -> Tensor:
        return F.bernoulli_kl(self.target, rate, eps=self.eps, check=self.check)

    def extra_repr(self) -> str:
        th = self.firing_threshold
        th_s = f"{th:g}" if isinstance(th, float) else f"tensor{tuple(th.shape)}"
        return f"{super().extra_repr()}, threshold={th_s}, bandwidth={self.bandwidth:g}"


class L1(Penalty):
    """λ Σ|a| / batch: the activity L1 penalty (batch = ``a.shape[0]``, as Keras ≥ 3.14)."""

    def value(self, a: Tensor) -> Tensor:
        return F.l1(a, check=self.check)

    def forward(self, a: Tensor) -> Tensor:
        return F.scaled_l1(a, self.weight, check=self.check)  # the weight folded into one node


class L2(Penalty):
    """λ Σ a² / batch: the activity L2 penalty (squared norm; batch = ``a.shape[0]``)."""

    def value(self, a: Tensor) -> Tensor:
        return F.l2(a, check=self.check)


class Hoyer(Penalty):
    """λ · mean over samples of (Σ|a|)² / Σa²: scale-invariant sparsity (Hoyer 2004)."""

    def value(self, a: Tensor) -> Tensor:
        return F.hoyer(a, check=self.check)


#: Registry of penalty names (CLI and config files resolve ``--penalty NAME`` here).
PENALTIES: dict[str, type[Penalty]] = {
    "kl": BernoulliKL,
    "bernoulli_kl": BernoulliKL,
    "poisson_kl": PoissonKL,
    "frequency_kl": FrequencyKL,
    "l1": L1,
    "l2": L2,
    "hoyer": Hoyer,
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
