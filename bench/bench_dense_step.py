"""Dense SAE training-step efficiency: FLOPs of a step over the machine's measured matmul throughput.

A ReLU SAE 784 → 1024 → 784 with an L1 penalty, batch 256, trained by
:func:`actsparse.train.train_step`. A step does five matmuls of ``2·batch·d_in·d_sae`` FLOPs each
(encoder and decoder forward; decoder weight, hidden-gradient and encoder weight backward; the input
needs no gradient); everything else (ReLU, loss, penalty, Adam) is overhead on top of them.

Efficiency = (5 · 2·batch·d_in·d_sae / step seconds) / (fp32 GFLOP/s of a 2048² matmul), with the
step and the matmul probe interleaved in the same rounds. Two probes: torch's default ``torch.mm``
(the row's original definition), and oneDNN's float32 linear where this torch has it; since
actsparse's layers take oneDNN for the products where it was measured faster
(:mod:`actsparse.gemm`), the efficiency against the faster of the two probes is reported too.
Also timed side by side: the same model
written as plain PyTorch (``nn.Linear`` layers, the loss inline, ``torch.optim.Adam`` defaults),
the baseline of the issue ("plain PyTorch reaches about 60–70 % here").

    python bench/bench_dense_step.py [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import statistics

import torch
from _common import interleaved, matmul_flops, optimizer_step, parse_args, ratio, summary, write_result
from torch import nn

import actsparse
from actsparse import gemm
from actsparse.models import SparseAutoencoder
from actsparse.train import minibatch_optimizer, train_step


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    d_in, d_sae, batch, probe = (784, 1024, 256, 2048) if not args.smoke else (32, 64, 16, 128)
    lam, lr = 1e-3, 1e-4
    torch.manual_seed(0)
    x = torch.rand(batch, d_in)

    model = SparseAutoencoder(d_in, d_sae, "relu", decoder="linear", penalty=actsparse.L1(lam), recon_loss="mse")
    opt = minibatch_optimizer("adam", model.parameters(), lr)

    enc, dec = nn.Linear(d_in, d_sae), nn.Linear(d_sae, d_in)
    plain_opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=lr)

    def plain_step() -> None:
        h = torch.relu(enc(x))
        loss = nn.functional.mse_loss(dec(h), x) + lam * h.abs().sum() / batch
        optimizer_step(plain_opt, loss)

    contenders = {"actsparse": lambda: train_step(model, opt, x), "plain_pytorch": plain_step,
                  "matmul": matmul_flops(probe)}
    if gemm.onednn_available():
        a, b = torch.randn(probe, probe), torch.randn(probe, probe)
        contenders["matmul_onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    times = interleaved(contenders, rounds=args.rounds, min_seconds=0.05 if args.smoke else 0.4)
    step_flops = 5 * 2 * batch * d_in * d_sae
    peak = [2 * probe**3 / t for t in times["matmul"]]  # FLOP/s of the probe, per round
    best = [max(p, 2 * probe**3 / t) for p, t in zip(peak, times.get("matmul_onednn", times["matmul"]))]

    def efficiency(name: str, floor: list[float] = peak) -> dict[str, float]:
        per_round = [step_flops / t / p for t, p in zip(times[name], floor)]
        return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}

    payload = {
        "shape": {"d_in": d_in, "d_sae": d_sae, "batch": batch, "step_gflop": step_flops / 1e9},
        "matmul_gflops": summary([p / 1e9 for p in peak]),
        "step_ms": {n: summary([t * 1e3 for t in times[n]]) for n in ("actsparse", "plain_pytorch")},
        "efficiency": {n: efficiency(n) for n in ("actsparse", "plain_pytorch")},
        "fastest_matmul_gflops": summary([p / 1e9 for p in best]),
        "efficiency_vs_fastest_gemm": {n: efficiency(n, best) for n in ("actsparse", "plain_pytorch")},
        "gemm_decisions": gemm.decisions(),
        "plain_over_actsparse_time": ratio(times, "plain_pytorch", "actsparse"),
        "target": "efficiency >= 0.80",
        "_gflops": statistics.median(peak) / 1e9,
    }
    write_result("dense_step", payload, args)


if __name__ == "__main__":
    main()
