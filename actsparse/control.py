"""Sparsity you state: a penalty whose coefficient is adapted during training until a measured
sparsity statistic reaches its target.

``L1(1e-3).toward(l0=16)`` is :class:`TargetSparsity` around ``L1``: the L1 penalty, with a
coefficient λ that starts at 1e-3 and moves, step by step, until the code has 16 active units per
sample.

**The problem.** Training with a penalty P and a fixed coefficient λ minimises ``R(θ) + λ P(θ)``
(R: the reconstruction or task loss), and the sparsity s(θ) it ends at is whatever that λ gives.
What users want is the constrained problem: minimise R(θ) subject to s(θ) = s*. Its Lagrangian
``R(θ) + λ (s(θ) − s*)`` has a multiplier λ that the dual ascent of the *basic differential
multiplier method* (Platt & Barr 1988, "Constrained differential optimization", NeurIPS) moves
along the constraint's violation while θ descends. The penalty P stands in for s (s itself, a
count, has no gradient; P is its differentiable surrogate, and s falls as λ grows), and λ is kept
positive by ascending on log λ, a multiplicative update like GECO's (Rezende & Viola 2018,
"Taming VAEs", arXiv:1810.00597, eq. 9: λ ← λ · exp(α · C)).

**The update**, once per training step t, after the step's forward measured s_t::

    e_t = min((s_t − s*) / s*, 1)            relative error, clipped above at 1
    log λ_{t+1} = log λ_t + η · e_t          η = ``rate_of_change`` (default 0.05)

so λ grows while the code is denser than the target and shrinks while it is sparser, at most by a
factor e^η per step (e^0.05 = 1.05). The relative error makes η independent of the statistic's
scale (an L0 of 64 and a rate of 0.01 move alike); the clip keeps a far-too-dense start (L0 of
500 for a target of 8) from multiplying λ by e^(η·61) in one step.

**Why it converges.** Near the target the statistic responds to λ like a power law,
s ≈ s* (λ*/λ)^γ for some elasticity γ > 0, so e ≈ −γ (log λ − log λ*) and each step shrinks the
distance of log λ from log λ* by the factor (1 − ηγ): the fixed point λ* is stable when
0 < ηγ < 2, and the approach is monotone for ηγ < 1. The model needs some steps τ to respond to a
new λ (that is the "while θ descends" of the method above); an integral controller with that
lag stays stable when ηγτ is of order 1 or less, so η is small (0.05: λ changes by at most 5 % a
step) and a slowly responding model simply converges more slowly. At the fixed point e = 0 on
average: s equals s* in the mean, not merely nearby, which a fixed λ only gives by luck. Batch
noise in s_t makes log λ wander by about η·σ_e/√(2ηγ); with η = 0.05 and the per-batch noise of
a batch of 256 that is under 1 %.

**Knobs.** ``rate_of_change`` η: the step of log λ (default 0.05; halve it if the statistic
oscillates around the target, double it for very short runs). ``window`` (default 100 steps):
how often the controller checks for saturation. The penalty's own ``weight`` is the starting λ. A start too small by a
factor F costs about ln(F)/η steps (100×: 92 steps at η = 0.05). A start far too large can silence
every unit at once (dead ReLUs get no gradient), and the units then take their own time to revive
whatever λ does; the anti-windup below holds λ meanwhile (ReLU SAE + L1 started 20× too high:
on target after about 1,750 steps, against 250 from 500× too low). Start low when unsure.

**Saturation and infeasibility** are reported, not hidden: every ``window`` steps, if λ rose by
10× or more while the statistic stayed above the target and moved less than a tenth of the way
(raising the coefficient no longer moves it), or fell by 10× or more while the statistic stayed
below the target (even almost no penalty leaves the code sparser than asked), a
:class:`TargetNotReachedWarning` says so with the numbers. λ is bounded to
[``min_weight``, ``max_weight``] (default 1e-12 to 1e12).

**Anti-windup.** An integrator that keeps integrating while the system does not answer winds up:
with every unit dead after a too-large start, λ would fall to its floor in a few hundred steps and,
once the units revive, overshoot far the other way. So the check above also *holds* the direction
that did not answer, the textbook remedy of conditional integration (Åström & Hägglund,
"Advanced PID Control", 2006, §3.5 on integrator windup): λ then stops moving that way until the
error changes sign (the statistic crossed the target), and moves freely the other way.

**Statistics** (of the activations the penalty measures, ``a`` ``(batch, ..., units)``; a unit is
active where ``a`` > the penalty's firing threshold, 0 unless it defines one, e.g. FrequencyKL's
θ or a JumpReLU's learned threshold):

* ``l0``: active units per sample, Σ_j f̂_j with f̂_j the share of samples (and positions) in
  which unit j is active;
* ``rate``: f̂_j, averaged over units, or each unit's own with ``per_unit=True``;
* ``mean``: ρ̂_j, the mean activation (CS294A's ρ̂), averaged over units or per unit.

With ``per_unit=True`` the coefficient is a vector λ_j, one per unit, each updated from its own
unit's statistic, and the penalty is Σ_j λ_j P_j (the KL penalties, L1 and L2 are sums over units;
Hoyer is not and takes one coefficient).

**State.** ``log_weight`` (λ, as its logarithm: () or (units,)), ``statistic`` (the last measured
s_t) and the saturation anchor are buffers: saved in ``state_dict`` (a resumed run continues
bit-identically), moved with ``.to()``. They change only in training mode with gradients on, so an
evaluation pass never moves them. Under DDP (:func:`actsparse.distributed.sync_batch_statistics`
sets ``stats_group``) the statistic is the global batch's, all-reduced before the update, so every
rank takes the same step and holds the same λ.

**When it updates.** By default at every training forward (one forward per optimiser step, the
common loop). An optimiser that evaluates the loss several times per step (L-BFGS's line search)
sets ``update_in_forward=False`` and calls :meth:`TargetSparsity.step` once per step, after the
optimiser's step: the statistic of the last forward is used.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from . import functional as F
from .errors import TrainingWarning
from .penalties import Penalty, PenaltySum

__all__ = ["TargetSparsity", "TargetNotReachedWarning", "STATISTICS", "measure_statistic"]

#: The statistics a :class:`TargetSparsity` can hold to a target.
STATISTICS = ("l0", "rate", "mean")


class TargetNotReachedWarning(TrainingWarning):
    """The controller cannot move the statistic to its target (saturation or infeasibility)."""


def measure_statistic(a: Tensor, statistic: str, *, unit_dim: int = -1, threshold: float | Tensor = 0.0,
                      per_unit: bool = False) -> Tensor:
    """A sparsity statistic of activations ``a`` ``(batch, ..., units)``, without gradient, in
    float64: ``l0`` (active units per sample, a scalar), ``rate`` (share of samples where a unit
    is > ``threshold``) or ``mean`` (mean activation ρ̂_j): ``(units,)`` if ``per_unit``, else
    averaged over units (a scalar)."""
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")
    a = a.detach()
    dims = F._reduce_dims(a, unit_dim)
    if statistic == "mean":
        per = a.mean(dim=dims, dtype=torch.float64)
    else:
        th = F.unit_view(threshold, a, unit_dim) if isinstance(threshold, Tensor) else threshold
        per = (a > th).mean(dim=dims, dtype=torch.float64)
    if statistic == "l0":
        return per.sum()
    return per if per_unit else per.mean()


class TargetSparsity(Penalty):
    """``inner`` with its coefficient λ adapted so that ``statistic`` reaches ``target``.

    ``forward(a) = λ · inner.value(a)`` (or ``Σ_j λ_j · inner.value_j(a)`` with ``per_unit``), in
    ``a``'s dtype; in training mode it also measures the statistic and (``update_in_forward``)
    moves λ by the dual-ascent step of the module docstring. Built by :meth:`Penalty.toward`.

    Args:
        inner: the penalty to control (any penalty but a sum of penalties); its ``weight`` is the
            starting λ and must be > 0.
        statistic: ``"l0"``, ``"rate"`` or ``"mean"`` (see the module docstring).
        target: s*, > 0 (a rate in (0, 1); an l0 at most the number of units).
        per_unit: one coefficient per unit, each held to the target by its own unit's statistic
            (``rate`` and ``mean`` only). Default False.
        rate_of_change: η, the step of log λ per update. Default 0.05.
        window: steps between the saturation checks. Default 100.
        min_weight, max_weight: bounds of λ. Default 1e-12, 1e12.
        update_in_forward: move λ at each training forward (default True); False: call
            :meth:`step` once per optimiser step.
    """

    stateful = True  # type: ignore[assignment]
    log_weight: Tensor
    statistic: Tensor

    #: the process group the statistic is averaged over (set for DDP by sync_batch_statistics)
    stats_group = None

    def __init__(self, inner: Penalty, statistic: str, target: float, *, per_unit: bool = False,
                 rate_of_change: float = 0.05, window: int = 100, min_weight: float = 1e-12,
                 max_weight: float = 1e12, update_in_forward: bool = True) -> None:
        if not isinstance(inner, Penalty):
            raise TypeError(f"TargetSparsity controls a Penalty, got {type(inner).__name__}")
        if isinstance(inner, TargetSparsity):
            raise TypeError("this penalty is controlled already: call toward() once")
        if isinstance(inner, PenaltySum):
            inner.weighted(torch.zeros(1, 1), 1.0)  # raises, saying how to control one term
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < math.inf:
            raise ValueError(f"the target {statistic} must be a finite number > 0, got {target!r}")
        if statistic == "rate" and not target < 1:
            raise ValueError(f"a target rate is a share of samples and must lie in (0, 1), got {target!r}")
        if per_unit and statistic == "l0":
            raise ValueError("l0 counts the active units of a sample: it has no per-unit form; hold each unit's "
                             "firing rate instead (rate=..., per_unit=True)")
        if per_unit and not inner.sum_over_units:
            raise TypeError(f"{type(inner).__name__} is not a sum over units, so it cannot take one coefficient per "
                            "unit: control it with per_unit=False (one coefficient)")
        for name, v in (("rate_of_change", rate_of_change), ("min_weight", min_weight), ("max_weight", max_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if not min_weight <= inner.weight <= max_weight or inner.weight == 0:
            raise ValueError(f"the penalty's weight is the starting coefficient and must be > 0 (and within "
                             f"[{min_weight:g}, {max_weight:g}]), got {inner.weight:g}")
        super().__init__(inner.weight, unit_dim=inner.unit_dim, check=inner.check)
        self.inner = inner
        self.statistic_name = statistic
        self.target = float(target)
        self.per_unit = bool(per_unit)
        self.rate_of_change = float(rate_of_change)
        self.window = int(window)
        self.min_weight, self.max_weight = float(min_weight), float(max_weight)
        self.update_in_forward = bool(update_in_forward)
        # λ as log λ in float64: () now, (units,) per unit once the first batch gives the width
        self.register_buffer("log_weight", torch.tensor(math.log(inner.weight), dtype=torch.float64))
        self.register_buffer("statistic", torch.tensor(math.nan, dtype=torch.float64))
        # updates done; at the last saturation check: that step, mean log λ and mean error
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("anchor", torch.tensor([0.0, math.log(inner.weight), math.nan], dtype=torch.float64))
        # +1: increases of λ are held (saturation), −1: decreases are held (too sparse), 0: none
        self.register_buffer("held", torch.zeros((), dtype=torch.float64))
        self._fresh = False  # a statistic measured since the last update

    # ---------------------------------------------------------------- what the penalty is
    @property
    def firing_threshold(self) -> float | Tensor:  # type: ignore[override]
        return self.inner.firing_threshold

    def transform(self, a: Tensor) -> Tensor:
        return self.inner.transform(a)

    @property
    def coefficient(self) -> Tensor:
        """λ: a float64 scalar, or ``(units,)`` per unit."""
        return self.log_weight.exp()

    def _weight_for(self, a: Tensor) -> float | Tensor:
        if not self.per_unit:
            return float(self.log_weight.exp())
        if self.log_weight.dim() == 0:  # the first batch gives the number of units
            units = a.shape[F.normalize_unit_dim(a, self.unit_dim)]
            self.log_weight = self.log_weight.expand(units).clone().to(a.device)
        return self.log_weight.exp()

    # ---------------------------------------------------------------- forward
    def forward(self, a: Tensor, *, slot: tuple[int, int] = (0, 0)) -> Tensor:
        """``λ · inner(a)`` (``Σ_j λ_j inner_j(a)`` per unit) in ``a``'s dtype; in training mode
        with gradients on, measure the statistic and (``update_in_forward``) update λ after."""
        if slot != (0, 0):
            raise ValueError("a TargetSparsity holds one coefficient for one layer, called once per forward: attach "
                             "one per layer, e.g. {name: L1(1e-3).toward(l0=16) for name in names}")
        value = self.inner.weighted(a, self._weight_for(a), slot=slot)
        if self.training and torch.is_grad_enabled():
            self._measure(a)
            if self.update_in_forward:
                self.step()
        return value

    def value(self, a: Tensor) -> Tensor:
        return self.inner.value(a)

    def weighted(self, a: Tensor, weight: float | Tensor, *, slot: tuple[int, int] = (0, 0)) -> Tensor:
        return self.inner.weighted(a, weight, slot=slot)

    @torch.no_grad()
    def _measure(self, a: Tensor) -> None:
        b = self.inner.transform(a)
        s = measure_statistic(b, self.statistic_name, unit_dim=self.unit_dim, threshold=self.firing_threshold,
                              per_unit=self.per_unit)
        if self.stats_group is not None:  # the global batch's statistic: every rank takes the same step
            from .distributed import global_mean

            s = global_mean(s, b.numel(), self.stats_group)
        self.statistic = s.to(self.log_weight.device)
        self._fresh = True

    # ---------------------------------------------------------------- the update
    @torch.no_grad()
    def step(self, a: Tensor | None = None) -> None:
        """One dual-ascent step of log λ from the statistic of the last training forward (none
        since the last step: nothing happens), or of the activations ``a`` if given (L-BFGS: the
        output at the accepted point, not the last trial of its line search). Called by
        :meth:`forward` unless ``update_in_forward`` is False."""
        if a is not None and isinstance(a, Tensor):
            self._measure(a)
        if not self._fresh:
            return
        self._fresh = False
        s = self.statistic
        if not bool(torch.isfinite(s).all()):
            return  # a NaN batch moves nothing (the penalty itself reports it)
        error = ((s - self.target) / self.target).clamp(max=1.0)
        # anti-windup: while a direction is held (the statistic did not answer it), no step that way
        # (per unit: the held direction is that of the mean error, and so is its release)
        if float(self.held) * float(error.mean()) < 0:
            self.held = torch.zeros_like(self.held)  # the statistic crossed the target: released
        error = torch.where(self.held * error > 0, torch.zeros_like(error), error)
        lo, hi = math.log(self.min_weight), math.log(self.max_weight)
        self.log_weight = (self.log_weight + self.rate_of_change * error).clamp(lo, hi)
        self.updates += 1
        if int(self.updates) % self.window == 0:
            self._check_progress(float(error.mean()))

    def _check_progress(self, error: float) -> None:
        """Every ``window`` steps: warn when λ moved 10× one way without moving the statistic."""
        _, log_w0, error0 = self.anchor.tolist()
        log_w = float(self.log_weight.mean())
        self.anchor = torch.tensor([float(self.updates), log_w, error], dtype=torch.float64,
                                   device=self.anchor.device)
        if math.isnan(error0):
            return
        rose, s = log_w - log_w0, float(self.statistic.mean())
        name = "L0" if self.statistic_name == "l0" else self.statistic_name
        what = f"{name} {'per unit ' if self.per_unit else ''}"
        if rose >= math.log(10) and error > 0.05 and error > 0.9 * error0:
            self.held = torch.ones_like(self.held)
            self._warn(f"the coefficient rose {math.exp(rose):.3g}x (to {math.exp(log_w):.3g}) over the last "
                       f"{self.window} steps, but the {what}moved only from {self.target * (1 + error0):.4g} to "
                       f"{s:.4g} (target {self.target:g}): raising the penalty no longer moves the statistic "
                       f"(saturation). Try another penalty, or a target the model can reach")
        elif rose <= -math.log(10) and error < -0.05 and error < 0.9 * error0:
            self.held = -torch.ones_like(self.held)
            self._warn(f"the coefficient fell {math.exp(-rose):.3g}x (to {math.exp(log_w):.3g}) over the last "
                       f"{self.window} steps, but the {what}stays below the target ({s:.4g}, target "
                       f"{self.target:g}): the code is sparser than asked even with almost no penalty")

    def _warn(self, message: str) -> None:
        warnings.warn(f"{type(self.inner).__name__}.toward({self.statistic_name}={self.target:g}): {message}",
                      TargetNotReachedWarning, stacklevel=4)

    # ---------------------------------------------------------------- state
    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any):  # type: ignore[override]
        key = prefix + "log_weight"
        if key in state_dict and state_dict[key].shape != self.log_weight.shape:
            self.log_weight = torch.empty_like(state_dict[key], device=self.log_weight.device)
        key = prefix + "statistic"
        if key in state_dict and state_dict[key].shape != self.statistic.shape:
            self.statistic = torch.empty_like(state_dict[key], device=self.statistic.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        lam = self.coefficient
        shown = f"{float(lam):.4g}" if lam.dim() == 0 else f"({lam.numel()} units, {float(lam.min()):.3g}.." \
                                                           f"{float(lam.max()):.3g})"
        return (f"{self.statistic_name}={self.target:g}{', per_unit' if self.per_unit else ''}, "
                f"coefficient={shown}, rate_of_change={self.rate_of_change:g}")
