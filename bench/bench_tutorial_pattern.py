"""actsparse vs the tutorial pattern of seed 003: the penalty computed by re-running the layers.

The tutorial's deep autoencoder 784 → 256 → 128 → 64 → 32 → 16 → 32 → … → 784 (ReLU after every
layer) adds the mean absolute activation of every layer, which its ``sparse_loss`` obtains by
running the model's children a second time on the batch:

    values = x
    for layer in children: values = relu(layer(values)); loss += mean(|values|)

actsparse reads the same activations from the forward pass that already ran, with
``attach(model, {each ReLU: L1(1/units)})`` (``L1`` is ``Σ|a| / batch``, so weight ``1/units``
gives the tutorial's ``mean|a|``). Same model, data, optimiser (Adam) and penalty value; reported
is time(tutorial) / time(actsparse) per interleaved round (target ≥ 1.8) at the tutorial's batch
size 32 and at 256.

A third variant, ``plain``, trains the same model with the same optimiser and no penalty at all,
interleaved with the other two: time(tutorial) / time(plain) is the ceiling of the ratio (what a
penalty that cost nothing would reach), and time(actsparse) − time(plain) is what ``attach`` costs
per step.

    python bench/bench_tutorial_pattern.py [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import torch
from _common import interleaved, optimizer_step, parse_args, ratio, summary, write_result
from torch import nn

import actsparse

REG = 1e-3  # the tutorial's reg_param (β)


def autoencoder(widths: list[int]) -> nn.Sequential:
    """Linear + ReLU for every consecutive pair of ``widths`` (ReLU after the output too, as in the tutorial)."""
    torch.manual_seed(1)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


def tutorial_sparse_loss(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The tutorial's penalty: run every layer again and sum the mean absolute activations."""
    loss = x.new_zeros(())
    values = x
    for layer in model:
        values = layer(values)
        if isinstance(layer, nn.ReLU):
            loss = loss + values.abs().mean()
    return loss


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    enc = [784, 256, 128, 64, 32, 16] if not args.smoke else [32, 16, 8]
    widths = enc + enc[-2::-1]
    results = {}
    for batch in (32, 256) if not args.smoke else (8,):
        torch.manual_seed(0)
        x = torch.rand(batch, widths[0])

        tut_model = autoencoder(widths)
        tut_opt = torch.optim.Adam(tut_model.parameters(), lr=1e-3)

        def tutorial_step(model=tut_model, opt=tut_opt, x=x) -> torch.Tensor:
            out = model(x)
            pen = REG * tutorial_sparse_loss(model, x)
            loss = nn.functional.mse_loss(out, x) + pen
            optimizer_step(opt, loss)
            return pen

        act_model = autoencoder(widths)
        relus = {name: actsparse.L1(REG / m_prev.out_features)
                 for (name, m), m_prev in zip(list(act_model.named_children())[1::2], act_model[0::2])}
        reg = actsparse.attach(act_model, relus)
        act_opt = torch.optim.Adam(act_model.parameters(), lr=1e-3)

        def actsparse_step(model=act_model, opt=act_opt, reg=reg, x=x) -> torch.Tensor:
            out = model(x)
            pen = reg.penalty()
            loss = nn.functional.mse_loss(out, x) + pen
            optimizer_step(opt, loss)
            return pen

        plain_model = autoencoder(widths)
        plain_opt = torch.optim.Adam(plain_model.parameters(), lr=1e-3)

        def plain_step(model=plain_model, opt=plain_opt, x=x) -> None:
            optimizer_step(opt, nn.functional.mse_loss(model(x), x))

        # same weights before the first step: the same penalty value
        values = {"tutorial": float(tutorial_step().detach()), "actsparse": float(actsparse_step().detach())}
        times = interleaved({"tutorial": tutorial_step, "actsparse": actsparse_step, "plain": plain_step},
                            rounds=args.rounds, min_seconds=0.05 if args.smoke else 0.4)
        overhead = [(a - p) * 1e3 for a, p in zip(times["actsparse"], times["plain"])]
        results[f"batch_{batch}"] = {
            "step_ms": {n: summary([t * 1e3 for t in ts]) for n, ts in times.items()},
            "tutorial_over_actsparse": ratio(times, "tutorial", "actsparse"),
            "tutorial_over_plain": ratio(times, "tutorial", "plain"),
            "actsparse_over_plain": ratio(times, "actsparse", "plain"),
            "actsparse_minus_plain_ms": summary(overhead),
            "penalty_values_first_step": values,
        }
    write_result("tutorial_pattern", {"widths": widths, "results": results, "target": "tutorial / actsparse >= 1.8",
                                      "ceiling": "tutorial / plain: the ratio of a penalty that cost nothing"},
                 args)
    for key, r in results.items():
        ms = {n: s["median"] for n, s in r["step_ms"].items()}
        print(f"{key}: tutorial {ms['tutorial']:.2f} ms, actsparse {ms['actsparse']:.2f} ms, plain {ms['plain']:.2f} ms"
              f" per step; tutorial/actsparse {r['tutorial_over_actsparse']['median']:.2f}"
              f" (ceiling tutorial/plain {r['tutorial_over_plain']['median']:.2f});"
              f" attach costs {r['actsparse_minus_plain_ms']['median']:.2f} ms per step over plain")


if __name__ == "__main__":
    main()
