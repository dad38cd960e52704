"""Does a loss term reach the parameters? Gradient norms per term, without touching ``.grad``.

Seed 001's penalty "had no impact on the learning phase" because it was computed from
``(encoded > 0)``, which has no gradient. :func:`gradient_report` makes that visible: it reports,
for each named loss term, the norm of its gradient on the model's parameters, and warns when a
term cannot reach any parameter.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["GradientReport", "gradient_report"]


@dataclass
class GradientReport:
    """How one loss term reaches the model's parameters.

    Attributes:
        term: the term's name.
        value: its value (NaN if it was not computed).
        grad_norm: L2 norm of d(term)/d(parameters) over all trainable parameters.
        params_reached: how many parameter tensors get a non-zero gradient from it.
        params_total: how many trainable parameter tensors the model has.
        problem: ``None``, or why the term cannot train anything.
    """

    term: str
    value: float
    grad_norm: float
    params_reached: int
    params_total: int
    problem: str | None = None

    def __str__(self) -> str:
        status = f"  <- {self.problem}" if self.problem else ""
        return (f"{self.term:<32} value={self.value:<12.6g} grad_norm={self.grad_norm:<12.6g} "
                f"params_reached={self.params_reached}/{self.params_total}{status}")


def gradient_report(
    model: nn.Module, terms: Mapping[str, Tensor | None], *, warn: bool = True
) -> list[GradientReport]:
    """Gradient norm of each loss term on ``model``'s trainable parameters.

    Args:
        model: the model whose parameters should be trained.
        terms: ``{name: scalar tensor}``, e.g. ``{"mse": mse, "sparsity": kl}``; ``None`` marks a
            term that was not computed.
        warn: emit a ``UserWarning`` for every term that reaches no parameter.

    Returns:
        One :class:`GradientReport` per term, in order. The autograd graph is kept
        (``retain_graph=True``) and ``.grad`` is not touched, so training can go on.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    reports: list[GradientReport] = []
    for name, value in terms.items():
        problem = None
        grad_norm, reached, val = 0.0, 0, math.nan
        if value is None:
            problem = "not computed in the latest forward (module not called, eval mode or no_grad?)"
        elif not isinstance(value, Tensor) or value.numel() != 1:
            raise TypeError(f"term {name!r} must be a scalar tensor, got {type(value).__name__}")
        else:
            val = float(value.detach())
            if not value.requires_grad:
                problem = ("has no gradient: it depends on nothing that requires grad (it was computed "
                           "through a comparison such as (a > 0), .item(), .detach() or torch.no_grad(), "
                           "or from a layer that sees only the input), so it cannot train anything; "
                           "for a firing-frequency penalty use actsparse.FrequencyKL")
            elif params:
                grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
                sq = 0.0
                for g in grads:
                    if g is not None:
                        n = float(torch.linalg.vector_norm(g.detach().float()))
                        sq += n * n
                        reached += int(n > 0)
                grad_norm = math.sqrt(sq)
                if reached == 0:
                    problem = "reaches no parameter (its gradient is zero everywhere)"
        if problem and warn:
            warnings.warn(f"loss term {name!r} {problem}", UserWarning, stacklevel=2)
        reports.append(GradientReport(name, val, grad_norm, reached, len(params), problem))
    return reports
