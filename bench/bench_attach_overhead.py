"""attach() overhead: an MLP training step with penalties attached vs the same math written inline.

MLP 784 → 512 → 512 → 10 with ReLU modules, batch 256, cross-entropy, Adam. Penalties: L1 (λ = 1e-4)
on the first ReLU's output and the generalised (Poisson) KL (ρ = 0.05, β = 1e-3) on the second's.

* ``inline``: the forward returns the activations and the loop computes ``λ Σ|h1| / batch`` and
  ``β Σ_j ρ log(ρ/ρ̂_j) − ρ + ρ̂_j`` itself (with the same straight-through clamp of ρ̂ at 1e-6).
* ``attach``: ``actsparse.attach(model, {"1": L1(λ), "3": PoissonKL(ρ, weight=β)})`` with its
  defaults (statistics kept, inputs checked), loss ``+ reg.penalty()``.
* ``attach_lean``: the same with ``stats=False`` and the penalties' ``check=False``.

Reported: time(attach) / time(inline) per interleaved round (target ≤ 1.03), and the two
penalty values (equal to float32 rounding).

    python bench/bench_attach_overhead.py [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import torch
from _common import interleaved, optimizer_step, parse_args, ratio, summary, write_result
from torch import nn

import actsparse

RHO, BETA, LAM, EPS = 0.05, 1e-3, 1e-4, 1e-6


def inline_penalty(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """The two penalties written by hand, as a user would inline them."""
    l1 = LAM * h1.abs().sum() / h1.shape[0]
    r = h2.mean(0)
    r = r + (r.clamp_min(EPS) - r).detach()  # straight-through clamp, as actsparse does
    return l1 + BETA * (RHO * torch.log(RHO / r) - RHO + r).sum()


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    d_in, width, batch = (784, 512, 256) if not args.smoke else (32, 16, 8)
    torch.manual_seed(0)
    x, y = torch.rand(batch, d_in), torch.randint(0, 10, (batch,))

    def mlp() -> nn.Sequential:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, 10))

    # inline: the same model, activations taken from its forward by slicing the Sequential
    inline_model = mlp()
    inline_opt = torch.optim.Adam(inline_model.parameters(), lr=1e-4)

    def inline_step() -> torch.Tensor:
        h1 = inline_model[1](inline_model[0](x))
        h2 = inline_model[3](inline_model[2](h1))
        pen = inline_penalty(h1, h2)
        loss = nn.functional.cross_entropy(inline_model[4](h2), y) + pen
        optimizer_step(inline_opt, loss)
        return pen

    def attached(lean: bool):
        model = mlp()
        reg = actsparse.attach(model, {"1": actsparse.L1(LAM, check=not lean),
                                       "3": actsparse.PoissonKL(RHO, weight=BETA, check=not lean)},
                               stats=not lean)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step() -> torch.Tensor:
            out = model(x)
            pen = reg.penalty()
            loss = nn.functional.cross_entropy(out, y) + pen
            optimizer_step(opt, loss)
            return pen

        return step

    fns = {"inline": inline_step, "attach": attached(False), "attach_lean": attached(True)}
    values = {n: float(mlp_fresh_penalty(n, mlp, x, inline_penalty).detach()) for n in ("inline", "attach")}
    times = interleaved(fns, rounds=args.rounds, min_seconds=0.05 if args.smoke else 0.4)
    payload = {
        "shape": {"d_in": d_in, "width": width, "batch": batch},
        "step_ms": {n: summary([t * 1e3 for t in ts]) for n, ts in times.items()},
        "attach_over_inline": ratio(times, "attach", "inline"),
        "attach_lean_over_inline": ratio(times, "attach_lean", "inline"),
        "penalty_values": values,
        "target": "attach / inline <= 1.03",
    }
    write_result("attach_overhead", payload, args)


def mlp_fresh_penalty(kind: str, mlp, x: torch.Tensor, inline) -> torch.Tensor:
    """The penalty of one forward of a freshly initialised MLP, computed inline or by attach."""
    model = mlp()
    if kind == "inline":
        h1 = model[1](model[0](x))
        return inline(h1, model[3](model[2](h1)))
    with actsparse.attach(model, {"1": actsparse.L1(LAM), "3": actsparse.PoissonKL(RHO, weight=BETA)}) as reg:
        model(x)
        return reg.penalty()


if __name__ == "__main__":
    main()
