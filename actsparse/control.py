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
10× or more since the statistic last made progress while the statistic stayed above the target
and moved less than a tenth of the way
(raising the coefficient no longer moves it), or fell by 10× or more while the statistic stayed
below the target (even almost no penalty leaves the code sparser than asked), a
:class:`TargetNotReachedWarning` says so with the numbers. λ is bounded to
[``min_weight``, ``max_weight``], by default six decades either side of the starting λ
(10⁻⁶·λ₀ to 10⁶·λ₀): a statistic the penalty cannot move must not drive λ to a value that
swamps every other loss term (seen: a per-unit β that rose from 1e-3 to 1e12 in 3,000 steps).

**Anti-windup.** An integrator that keeps integrating while the system does not answer winds up:
with every unit dead after a too-large start, λ would fall to its floor in a few hundred steps and,
once the units revive, overshoot far the other way. So the check above also *holds* the direction
that did not answer, the textbook remedy of conditional integration (Åström & Hägglund,
"Advanced PID Control", 2006, §3.5 on integrator windup): λ then stops moving that way until the
statistic crosses the target, and moves freely the other way. While held, the statistic's
progress is checked every window: a hold that sees no progress (2 % of the way) for 5 windows
(500 steps) is released, so that λ may move again where holding it does not help (a statistic that still does
not answer is held again after the next 10× move). Per unit, each coefficient is judged and held
on its own.

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
s_t), the progress-check anchor and the held directions are buffers: saved in ``state_dict`` (a resumed run continues
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
from ._lazy import adopt_saved_shapes
from .errors import TrainingWarning
from .penalties import Penalty, PenaltySum

__all__ = ["TargetSparsity", "TargetNotReachedWarning", "STATISTICS", "measure_statistic"]

#: A held direction is released after this many windows without progress of the statistic (and
#: at once when the statistic crosses the target).
HOLD_WINDOWS = 5

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
    if statistic == "mean":
        per = a.mean(dim=F._reduce_dims(a, unit_dim), dtype=torch.float64)
    else:
        per = F._firing_share(a, threshold, unit_dim, torch.float64)
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
        min_weight, max_weight: bounds of λ. Default 10⁻⁶ and 10⁶ times the starting λ.
        update_in_forward: move λ at each training forward (default True); False: call
            :meth:`step` once per optimiser step.
    """

    stateful = True  # type: ignore[assignment]
    log_weight: Tensor
    statistic: Tensor

    #: the process group the statistic is averaged over (set for DDP by sync_batch_statistics)
    stats_group = None

    def __init__(self, inner: Penalty, statistic: str, target: float, *, per_unit: bool = False,
                 rate_of_change: float = 0.05, window: int = 100, min_weight: float | None = None,
                 max_weight: float | None = None, update_in_forward: bool = True) -> None:
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
        if isinstance(inner.weight, (int, float)) and inner.weight > 0:  # (a weight of 0 is refused below)
            min_weight = inner.weight * 1e-6 if min_weight is None else min_weight
            max_weight = inner.weight * 1e6 if max_weight is None else max_weight
        min_weight = 1e-12 if min_weight is None else min_weight
        max_weight = 1e12 if max_weight is None else max_weight
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
        # the last progress check: its step, λ and error (per unit: (units,))
        self.register_buffer("anchor_step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("anchor_log_weight", self.log_weight.clone())
        self.register_buffer("anchor_error", torch.tensor(math.nan, dtype=torch.float64))
        # +1: increases of λ are held (saturation), −1: decreases are held (too sparse), 0: none;
        # and the update at which each hold began
        self.register_buffer("held", torch.zeros((), dtype=torch.float64))
        self.register_buffer("held_since", torch.zeros((), dtype=torch.int64))
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

    @property
    def mean_coefficient(self) -> float:
        """λ, or per unit the geometric mean of the λ_j: what the training log records."""
        return float(self.log_weight.mean().exp())

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
        raw = (s - self.target) / self.target  # the progress check compares these, unclipped
        error = raw.clamp(max=1.0)
        if self.held.shape != error.shape:  # per unit: one held direction and one anchor per unit
            self.held = self.held.expand_as(error).clone()
            self.held_since = self.held_since.expand(error.shape).clone()
            self.anchor_log_weight = self.log_weight.clone()
            self.anchor_error = torch.full_like(error, math.nan)
        # anti-windup: a direction that is held (the statistic did not answer it) takes no step,
        # until the statistic crosses the target (the error changes sign)
        self.held = torch.where(self.held * error < 0, torch.zeros_like(self.held), self.held)
        error = torch.where(self.held * error > 0, torch.zeros_like(error), error)
        lo, hi = math.log(self.min_weight), math.log(self.max_weight)
        self.log_weight = (self.log_weight + self.rate_of_change * error).clamp(lo, hi)
        self.updates += 1
        if int(self.updates) == 1:  # the first check compares with the first step
            self._set_anchor(raw)
        elif int(self.updates) % self.window == 0:
            self._check_progress(raw)

    def _set_anchor(self, error: Tensor) -> None:
        self.anchor_step = self.updates.clone()
        self.anchor_log_weight = self.log_weight.clone()
        self.anchor_error = error.clone()

    def _check_progress(self, error: Tensor) -> None:
        """Every ``window`` steps, per coefficient, against the anchor (the last check at which
        the statistic made progress, or at which a direction was held): a statistic that moved a
        tenth of the way to the target (or crossed it) made progress; a coefficient that moved 10×
        one way since the anchor without progress has its direction held until the next check,
        with a warning that gives the numbers. A hold lasts while the statistic makes any progress (2 % of
        the way: the model is catching up), until it crosses the target (in :meth:`step`), or until
        :data:`HOLD_WINDOWS` windows pass without progress, so that λ may move again where holding
        it does not help. ``error`` is the relative error (s − s*)/s*, unclipped."""
        rose = self.log_weight - self.anchor_log_weight
        error0 = self.anchor_error
        progress = (error.abs() <= 0.9 * error0.abs()) | (error * error0 <= 0) | torch.isnan(error0)
        # a held direction stays held while the statistic answers (progress toward the target: the
        # model is catching up); it is released at the crossing (in step()) or after HOLD_WINDOWS
        # windows without any progress, so that λ may move again
        answering = (error.abs() <= 0.98 * error0.abs()) | (error * error0 <= 0)  # any progress at all
        self.held_since = torch.where((self.held != 0) & answering, self.updates.to(self.held_since), self.held_since)
        expired = (self.updates - self.held_since) >= HOLD_WINDOWS * self.window
        self.held = torch.where(expired, torch.zeros_like(self.held), self.held)
        far = math.log(10)
        saturated = ~progress & (rose >= far) & (error > 0.05)
        too_sparse = ~progress & (rose <= -far) & (error < -0.05)
        self.held = torch.where(saturated, torch.ones_like(self.held),
                                torch.where(too_sparse, -torch.ones_like(self.held), self.held))
        self.held_since = torch.where(saturated | too_sparse, self.updates.to(self.held_since), self.held_since)
        steps = int(self.updates - self.anchor_step)
        reset = progress | saturated | too_sparse  # the others keep their anchor: more steps to judge
        self.anchor_step = torch.where(reset.all(), self.updates, self.anchor_step)
        self.anchor_log_weight = torch.where(reset, self.log_weight, self.anchor_log_weight)
        self.anchor_error = torch.where(reset, error, self.anchor_error)
        name = "L0" if self.statistic_name == "l0" else self.statistic_name
        for mask, kind in ((saturated, "saturated"), (too_sparse, "too_sparse")):
            if not bool(mask.any()):
                continue
            lw = self.log_weight[mask] if self.per_unit else self.log_weight.reshape(1)
            s = self.statistic[mask] if self.per_unit else self.statistic.reshape(1)
            moved = float(rose[mask].abs().max())
            who = f"{int(mask.sum())} of {mask.numel()} units: " if self.per_unit else ""
            if kind == "saturated":
                self._warn(f"{who}the coefficient rose {math.exp(moved):.3g}x (to {float(lw.exp().max()):.3g}) over "
                           f"the last {steps} steps, but the {name} is still {float(s.mean()):.4g} (target "
                           f"{self.target:g}): raising the penalty no longer moves the statistic (saturation); "
                           "its increase is held until the statistic crosses the target")
            else:
                self._warn(f"{who}the coefficient fell {math.exp(moved):.3g}x (to {float(lw.exp().min()):.3g}) over "
                           f"the last {steps} steps, but the {name} stays below the target ({float(s.mean()):.4g}, "
                           f"target {self.target:g}): the code is sparser than asked even with almost no penalty "
                           "(dead units?); its decrease is held until the statistic crosses the target")

    def _warn(self, message: str) -> None:
        warnings.warn(f"{type(self.inner).__name__}.toward({self.statistic_name}={self.target:g}): {message}",
                      TargetNotReachedWarning, stacklevel=4)

    # ---------------------------------------------------------------- state
    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """``.to()``, ``.float()``, ``.half()``... move the controller's state to the new device but
        keep its dtypes: λ and the statistic stay float64 (a model cast to float32 for its data
        must not round the coefficient, or a resumed run would differ)."""
        own = {name: b for name, b in self._buffers.items() if b is not None}
        for name in own:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            probe = fn(torch.zeros((), dtype=torch.float64))
            device = probe.device if isinstance(probe, Tensor) else None
            for name, b in own.items():
                self._buffers[name] = b.to(device) if device is not None else b
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any):  # type: ignore[override]
        # () or (units,): a per-unit controller learns its width from its first batch
        adopt_saved_shapes(self, state_dict, prefix, "log_weight", "statistic", "held", "held_since",
                           "anchor_log_weight", "anchor_error")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        lam = self.coefficient
        shown = f"{float(lam):.4g}" if lam.dim() == 0 else f"({lam.numel()} units, {float(lam.min()):.3g}.." \
                                                           f"{float(lam.max()):.3g})"
        return (f"{self.statistic_name}={self.target:g}{', per_unit' if self.per_unit else ''}, "
                f"coefficient={shown}, rate_of_change={self.rate_of_change:g}")
