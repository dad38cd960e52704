"""Full-batch L-BFGS for the classic sparse autoencoder: one iteration per ``step``, one
function evaluation per iteration in the usual case, and a search direction computed with a few
matrix products instead of a Python loop over the stored pairs.

The search direction is −H∇f with H the L-BFGS inverse-Hessian approximation of Nocedal &
Wright, *Numerical Optimization* (2nd ed.), Alg. 7.4 (the two-loop recursion), H₀ = γI with
γ = sᵀy / yᵀy of the newest pair (eq. 7.20). The two loops are two triangular recurrences in
their scalars; written as matrices (the compact form of Byrd, Nocedal & Schnabel, 1994) with
S, Y the stored pairs as rows (oldest first) and A = S Yᵀ (so A_ii = sᵢᵀyᵢ = 1/ρᵢ), R = triu(A):

    loop 1:  R α = S g,                       q = g − Yᵀ α
    loop 2:  Rᵀ c = α ⊙ diag(A) − γ Y q,        H g = γ q + Sᵀ c          (c_i = α_i − β_i)

So one iteration costs a handful of ``(m, n)`` products and two ``m × m`` triangular solves,
where the two-loop recursion with m = 100 pairs issues ~400 small tensor operations. A pair is
stored only if sᵀy > 1e-10 (the curvature condition; N&W §7.2). The step length satisfies the
strong Wolfe conditions (``torch.optim.lbfgs._strong_wolfe``, c₁ = 1e-4, c₂ = 0.9); the first
iteration starts at t = min(1, 1/‖g‖₁), the others at t = 1.

The value and gradient at the accepted point come from the line search's own evaluation, so the
next iteration does not evaluate again (``torch.optim.LBFGS`` with ``max_iter=1`` does: two
evaluations per iteration).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.lbfgs import _strong_wolfe

__all__ = ["LBFGS", "two_loop_direction"]

_C1, _C2 = 1e-4, 0.9  # the strong Wolfe constants (N&W §3.1; torch's and minFunc's defaults)


def two_loop_direction(g: Tensor, s: Tensor, y: Tensor, a: Tensor, gamma: float,
                       order: list[int] | None = None) -> Tensor:
    """−H g by the compact form above.

    Args:
        g: gradient ``(n,)``.
        s, y: the stored pairs ``(m, n)`` (``m`` may be 0).
        a: ``S Yᵀ`` ``(m, m)`` in the same row order.
        gamma: γ, the scale of H₀.
        order: the rows oldest first; default ``0..m-1``. The pairs stay where they are stored
            (no ``(m, n)`` copy per iteration): only m-vectors and ``a`` are reordered.

    Returns:
        The search direction ``(n,)``.
    """
    m = s.shape[0]
    if m == 0:
        return g.neg()
    idx = torch.arange(m) if order is None else torch.tensor(order)
    r = torch.triu(a.double()[idx][:, idx])  # m×m work in float64: tiny, no worse than the loops' rounding
    alpha = torch.linalg.solve_triangular(r, (s @ g).double()[idx].unsqueeze(1), upper=True).squeeze(1)
    alpha_slots = torch.empty_like(alpha).index_copy_(0, idx, alpha)
    q = g - y.t() @ alpha_slots.to(g.dtype)
    rhs = alpha * r.diagonal() - gamma * (y @ q).double()[idx]
    c = torch.linalg.solve_triangular(r.t(), rhs.unsqueeze(1), upper=False).squeeze(1)
    c_slots = torch.empty_like(c).index_copy_(0, idx, c)
    return q.mul_(gamma).add_(s.t() @ c_slots.to(g.dtype)).neg_()


class _NonFiniteTrial(Exception):
    """A line-search trial point gave a NaN/Inf loss or gradient; ``aux`` is its output."""

    def __init__(self, aux: Any) -> None:
        super().__init__("non-finite trial point")
        self.aux = aux


class LBFGS:
    """L-BFGS over ``params``, one iteration per :meth:`step` (module docstring for the method).

    Args:
        params: the tensors to optimise (leaves with ``requires_grad``).
        history: number of stored pairs m. Default 100 (minFunc's default, the CS294A exercise).
        max_evals: most function evaluations of one line search. Default 25.
        max_nonfinite_retries: line searches tried, each from a 10x shorter first step, when trial
            points give a NaN/Inf loss or gradient. Default 10.

    ``step(closure)``: ``closure()`` zeroes nothing; it computes the loss, calls ``backward()``
    on it and returns ``(loss, aux)``, where ``aux`` is anything (the model's output) that
    :attr:`aux` then gives for the accepted point. Gradients are read from ``p.grad``.

    A line search that finds no decrease along the L-BFGS direction (it returns the step 0) empties
    the memory, so that the next iteration searches along −∇f (the restart of N&W §7.2): with the
    memory unchanged, every later iteration would search the same direction from the same point
    again. If −∇f gives no decrease either, the point is a minimum to the precision of the loss's
    values (float32: a relative 1e-7) and :attr:`stalled` turns true; later steps then evaluate
    nothing and return the same value, until :meth:`objective_changed`.
    """

    def __init__(self, params: Iterable[Tensor], history: int = 100, max_evals: int = 25,
                 max_nonfinite_retries: int = 10) -> None:
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("LBFGS got no parameters")
        if history < 1 or max_evals < 1:
            raise ValueError(f"history and max_evals must be >= 1, got {history} and {max_evals}")
        self.history, self.max_evals = int(history), int(max_evals)
        self.max_nonfinite_retries = max(1, int(max_nonfinite_retries))
        p0 = self.params[0]
        n = sum(p.numel() for p in self.params)
        # the pairs live in fixed buffers, in slots; `order` lists the used slots oldest first
        self.s = p0.new_zeros(self.history, n)
        self.y = p0.new_zeros(self.history, n)
        self.a = p0.new_zeros(self.history, self.history)  # a[i, j] = s_i · y_j, by slot
        self.order: list[int] = []
        self.gamma = 1.0
        self.f: float | None = None  # value and flat gradient at the current point
        self.g: Tensor | None = None
        self.iterations = 0
        self.evaluations = 0
        self.stalled_at: int | None = None  # the iteration that found no decrease along -H0 grad f (1-based)
        self.restarting = False  # the memory was emptied after a search without decrease
        self.aux: Any = None
        self._has_aux = False  # aux is the output at the current point (not after a load_state_dict)

    # ---------------------------------------------------------------- flat views
    def _flat_grad(self) -> Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])

    def _flat_params(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    @torch.no_grad()
    def _set_params(self, flat: Tensor) -> None:
        i = 0
        for p in self.params:
            p.copy_(flat[i:i + p.numel()].view_as(p))
            i += p.numel()

    def _evaluate(self, closure: Callable[[], tuple[Tensor, Any]]) -> tuple[float, Tensor, Any]:
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            loss, aux = closure()
        self.evaluations += 1
        return float(loss.detach()), self._flat_grad(), aux

    @property
    def stalled(self) -> bool:
        """Whether a search along −H₀∇f found no decrease (:attr:`stalled_at` is set): later steps
        evaluate nothing, until :meth:`objective_changed`."""
        return self.stalled_at is not None

    # ---------------------------------------------------------------- the iteration
    def step(self, closure: Callable[[], tuple[Tensor, Any]]) -> float:
        """One L-BFGS iteration; returns the loss at the accepted point."""
        if self.stalled and self.f is not None:  # no decrease along -H0 grad f: nothing left to do
            if not self._has_aux:  # a reloaded state: the output at the point, which the caller reads
                self.f, self.g, self.aux = self._evaluate(closure)
                self._has_aux = True
            self.iterations += 1
            return self.f
        if self.f is None:
            self.f, self.g, _ = self._evaluate(closure)
        # The output at the current point (a full batch's reconstruction and code, the size of the
        # data or more) is not needed past here: the step's output is the accepted trial's.
        self.aux, self._has_aux = None, False
        f, g = self.f, self.g
        m = len(self.order)
        if self.restarting:  # the memory was emptied: -H0 g with its last gamma (N&W eq. 7.20), a full step
            d, t = g.mul(-self.gamma), 1.0
            gtd = float(g.dot(d))
        else:
            d = two_loop_direction(g, self.s[:m], self.y[:m], self.a[:m, :m], self.gamma, self.order)
            gtd = float(g.dot(d))
            if not gtd < 0:  # not a descent direction (rounding, or a stale memory): start over
                self.order.clear()
                d, gtd = g.neg(), -float(g.dot(g))
            t = min(1.0, 1.0 / float(g.abs().sum())) if (self.iterations == 0 or m == 0) else 1.0
        x0 = self._flat_params()
        # The output of one trial only: the one the search returns, which is the trial of lowest
        # value among those meeting sufficient decrease (its bracket's low end; N&W Alg. 3.6). Keeping
        # every trial's output held one full-batch output per evaluation of the search at once.
        kept: dict[float, Any] = {}
        kept_f = math.inf

        def objective(x: Tensor, t: float, d: Tensor) -> tuple[float, Tensor]:
            nonlocal kept_f
            self._set_params(torch.add(x, d, alpha=t))
            f_t, g_t, aux = self._evaluate(closure)
            if not (math.isfinite(f_t) and bool(torch.isfinite(g_t).all())):
                raise _NonFiniteTrial(aux)  # torch's line search cannot bracket a NaN
            if f_t <= f + _C1 * float(t) * gtd and f_t < kept_f:
                kept.clear()
                kept[float(t)], kept_f = aux, f_t
            return f_t, g_t

        # a trial step whose loss or gradient is NaN/Inf: search again from a 10x shorter first
        # step (minFunc backtracks the same way); if every try is non-finite, stay at x0 and report
        # the last non-finite output, so that the caller's finite check stops the run on good weights
        for _ in range(self.max_nonfinite_retries):
            kept.clear()
            kept_f = math.inf
            try:
                f_new, g_new, t, _ = _strong_wolfe(objective, x0, t, d, f, g, gtd, c1=_C1, c2=_C2,
                                                   max_ls=self.max_evals)
                break
            except _NonFiniteTrial as bad:
                t, last_bad = t * 0.1, bad.aux
        else:
            self._set_params(x0)
            self.aux, self._has_aux = last_bad, True
            return float("nan")
        t = float(t)
        if t == 0.0:  # no decrease along d: the point stays; restart from -grad f, or stop if that was it
            self._set_params(x0)
            self.restarting = bool(self.order)
            self.order.clear()
            self.f, self.g, self.aux = self._evaluate(closure)  # x0's values again, and its output
            self._has_aux = True
            self.iterations += 1
            if not self.restarting:  # that was the search along -H0 grad f
                self.stalled_at = self.iterations
            return self.f
        self._set_params(torch.add(x0, d, alpha=t))  # the accepted point, bit for bit as evaluated
        if t not in kept:  # the search returned x0 or a point short of sufficient decrease: evaluate it
            f_new, g_new, kept[t] = self._evaluate(closure)
        self._remember(d.mul(t), g_new - g)
        self.restarting = False
        self.f, self.g, self.aux = float(f_new), g_new, kept[t]
        self._has_aux = True
        self.iterations += 1
        return self.f

    def objective_changed(self) -> None:
        """The objective changed at the current point (a controlled penalty's coefficient moved):
        the next :meth:`step` evaluates it anew instead of starting from the cached value and
        gradient, so that its line search compares values of one objective. The curvature pairs
        are kept (the coefficient moves a few percent a step)."""
        self.f = self.g = None
        self.stalled_at = None

    def _remember(self, s_new: Tensor, y_new: Tensor) -> None:
        ys = float(s_new.dot(y_new))
        if ys <= 1e-10:  # curvature condition fails: keep the old pairs (N&W §7.2)
            return
        if len(self.order) == self.history:
            slot = self.order.pop(0)
        else:
            slot = len(self.order)
        self.s[slot], self.y[slot] = s_new, y_new
        self.order.append(slot)
        m = len(self.order)  # the used slots are 0..m-1, in some order
        self.a[slot, :m] = self.y[:m] @ s_new  # row: s_new · y_j
        self.a[:m, slot] = self.s[:m] @ y_new  # column: s_i · y_new
        self.gamma = ys / float(y_new.dot(y_new))

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit: the pairs *in their slots* with the slot order
        (the products over pairs sum in slot order, so reordering the slots on load would change the
        rounding), γ, the current value and gradient."""
        m = len(self.order)  # the used slots are 0..m-1
        return {"kind": "actsparse.LBFGS", "history": self.history, "s": self.s[:m].clone(),
                "y": self.y[:m].clone(), "a": self.a[:m, :m].clone(), "order": list(self.order),
                "gamma": self.gamma, "f": self.f, "g": None if self.g is None else self.g.clone(),
                "iterations": self.iterations, "evaluations": self.evaluations,
                "stalled_at": self.stalled_at, "restarting": self.restarting}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "actsparse.LBFGS":
            raise ValueError("this optimiser state is not from actsparse's L-BFGS (a checkpoint written by an older "
                             "actsparse?): start the run anew")
        m = state["s"].shape[0]
        if m > self.history or state["s"].shape[1] != self.s.shape[1]:
            raise ValueError(f"the saved L-BFGS state has {m} pairs of size {state['s'].shape[1]}; this optimiser "
                             f"keeps {self.history} pairs of size {self.s.shape[1]}")
        # older checkpoints stored the pairs oldest first, without "order"
        order = [int(i) for i in state.get("order", range(m))]
        if sorted(order) != list(range(m)):
            raise ValueError(f"the saved L-BFGS state is inconsistent: slot order {order} for {m} pairs")
        self.order = order
        self.s[:m], self.y[:m] = state["s"], state["y"]
        self.a[:m, :m] = state["a"]
        self.gamma, self.f, self.g = state["gamma"], state["f"], state["g"]
        self.iterations, self.evaluations = state["iterations"], state["evaluations"]
        self.stalled_at = state.get("stalled_at")
        self.restarting = bool(state.get("restarting", False))
        self.aux, self._has_aux = None, False
