"""The TopK SAE training step against this CPU's bound: the encoder GEMM on the fastest float32
path plus the fused Adam pass, timed in the same run, interleaved.

    python bench/bench_topk_bound.py            # batch 512 and 4096, 1 and 2 threads
    python bench/bench_topk_bound.py --smoke

What is timed (d_in 512, d_sae 8192, k 32: the setting of docs/benchmarks.md §5), per thread count
and batch:

* ``step``: ``actsparse.train.train_step`` of the TopK SAE (sparse path, fused Adam), with the
  encoder GEMM the library chooses (``actsparse.gemm``: measured, cached per machine);
* ``step_before``: the step as it was before this benchmark existed: ``ACTSPARSE_GEMM=default``
  (torch's ``F.linear``) on the whole batch at once (``TOPK_CHUNK`` above the batch), so the
  ``(batch, d_sae)`` pre-activation matrix is built every step;
* ``gemm_default`` and ``gemm_onednn``: ``x W_encᵀ + b`` alone on each path;
* ``adam``: the fused Adam step alone over the SAE's 8.4 M parameters (gradients present);
* ``step_bf16``: the step with the opt-in ``topk_screen="bf16"`` (units chosen from a bfloat16
  GEMM, their values exact), an approximation, reported beside the exact step, not in its place.

The bound is ``min(gemm_default, gemm_onednn) + adam``: the unavoidable parts of a step. The
step's fraction of the bound is ``bound / step`` (1 = nothing but the bound). Also reported: the
FVU on held-out rows after the same 10 steps of ``step``, ``step_before`` and ``step_bf16`` from
the same initial weights, and for the bf16 screen how often its choice differs from the exact
top k (on held-out rows, with the weights after those steps): the fraction of rows whose set of k
units differs, and the fraction of chosen units not in the exact top k.

``--profile``: also the operators of 10 ``step`` calls by self time (torch.profiler), per step,
in the JSON and printed: what the step spends beyond the bound.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, parse_args, summary, topk_sae, write_result  # noqa: E402

from actsparse import gemm  # noqa: E402
from actsparse.data import make_synthetic  # noqa: E402
from actsparse.models import sparse_topk  # noqa: E402
from actsparse.train import train_step  # noqa: E402


def whole_batch(fn):
    """``fn`` run with the top-k's GEMM on the whole batch at once (no chunks)."""
    def run():
        sparse_topk.TOPK_CHUNK, before = 1 << 30, sparse_topk.TOPK_CHUNK
        try:
            return fn()
        finally:
            sparse_topk.TOPK_CHUNK = before
    return run


def with_gemm(path: str | None, fn):
    """``fn`` run with ``ACTSPARSE_GEMM`` set to ``path`` (None: the measured choice)."""
    def run():
        old = os.environ.pop("ACTSPARSE_GEMM", None)
        if path is not None:
            os.environ["ACTSPARSE_GEMM"] = path
        try:
            return fn()
        finally:
            os.environ.pop("ACTSPARSE_GEMM", None)
            if old is not None:
                os.environ["ACTSPARSE_GEMM"] = old
    return run


class Stepper:
    """``train_step`` of a fresh TopK SAE (seed 0, fused Adam) over the batches of ``pool``, cycling."""

    def __init__(self, d_in: int, d_sae: int, k: int, pool: torch.Tensor, lr: float = 1e-3,
                 screen: str = "exact") -> None:
        self.model = topk_sae(d_in, d_sae, k, "sparse", seed=0)
        self.model.topk_screen = screen
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr, fused=True)
        self.pool, self.steps = pool, 0

    def __call__(self) -> None:
        train_step(self.model, self.opt, self.pool[self.steps % len(self.pool)])
        self.steps += 1


def fvu(model, x: torch.Tensor) -> float:
    with torch.no_grad():
        xh = model(x).reconstruction
    return float((x - xh).square().sum() / (x - x.mean(0)).square().sum())


def screen_agreement(model, x: torch.Tensor) -> dict[str, float]:
    """How the bf16 screen's choice of units compares with the exact top k on ``x``."""
    k = model.activation.k
    x_in = model._encoder_input(x)
    with torch.no_grad():
        exact = sparse_topk.topk_linear(x_in, model.W_enc, model.b_enc, k)[1].sort(-1).values
        screened = sparse_topk.topk_linear(x_in, model.W_enc, model.b_enc, k, screen="bf16")[1].sort(-1).values
    rows_differ = float((exact != screened).any(-1).float().mean())
    hits = torch.zeros(x.shape[0], model.d_hidden, dtype=torch.bool).scatter_(1, exact, True).gather(1, screened)
    return {"rows_with_a_different_set": rows_differ, "chosen_units_not_in_exact_top_k": float(1 - hits.float().mean())}


def profile_step(stepper: Stepper, steps: int = 10, rows: int = 14) -> list[dict]:
    """The operators of ``steps`` calls of ``stepper`` by self CPU time, ms per step."""
    from torch.profiler import profile

    for _ in range(3):  # warm: oneDNN's primitives, the allocator's blocks
        with_gemm(None, stepper)()
    with profile() as prof:
        for _ in range(steps):
            with_gemm(None, stepper)()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls_per_step": e.count / steps}
            for e in ops]


def one_setting(d_in: int, d_sae: int, k: int, batch: int, rounds: int, min_seconds: float, n_batches: int,
                profile: bool = False):
    x = make_synthetic(batch * n_batches + 4096, d=d_in, n_features=16384, active=32.0, seed=0).x
    pool, held = x[:batch * n_batches].reshape(n_batches, batch, d_in), x[batch * n_batches:]
    chosen, default = Stepper(d_in, d_sae, k, pool), Stepper(d_in, d_sae, k, pool)
    screened = Stepper(d_in, d_sae, k, pool, screen="bf16")
    g = torch.Generator().manual_seed(1)
    xs, w, b = torch.randn(batch, d_in, generator=g), torch.randn(d_sae, d_in, generator=g), torch.randn(d_sae)
    adam_model = topk_sae(d_in, d_sae, k, "sparse", seed=0)
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3, fused=True)
    for p in adam_model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    fns = {
        "step": with_gemm(None, chosen),
        "step_before": with_gemm("default", whole_batch(default)),
        "step_bf16": with_gemm(None, screened),
        "gemm_default": lambda: torch.nn.functional.linear(xs, w, b),
        "adam": adam.step,
    }
    if gemm.onednn_available():
        fns["gemm_onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(xs, w, b, "none", [], "")
    times = interleaved(fns, rounds=rounds, min_seconds=min_seconds)
    path = gemm.choose(batch, d_in, d_sae)
    gemm_best = min(statistics.median(times[n]) for n in ("gemm_default", "gemm_onednn") if n in times)
    bound = gemm_best + statistics.median(times["adam"])
    out = {
        "batch": batch, "gemm_path": path, "seconds": {n: summary(v) for n, v in times.items()},
        "samples_per_second": {n: batch / statistics.median(times[n]) for n in ("step", "step_before", "step_bf16")},
        "bound_seconds": bound, "bound_samples_per_second": batch / bound,
        "fraction_of_bound": {n: bound / statistics.median(times[n]) for n in ("step", "step_before", "step_bf16")},
        "speedup_over_before": statistics.median([a / b for a, b in zip(times["step_before"], times["step"])]),
        "bf16_speedup_over_step": statistics.median([a / b for a, b in zip(times["step"], times["step_bf16"])]),
        "gemm_gflops": {n: 2 * batch * d_in * d_sae / statistics.median(times[n]) / 1e9
                        for n in ("gemm_default", "gemm_onednn") if n in times},
    }
    # from the same initial weights, the same 10 steps on each path: the held-out FVU must not move
    now, then = Stepper(d_in, d_sae, k, pool), Stepper(d_in, d_sae, k, pool)
    bf16 = Stepper(d_in, d_sae, k, pool, screen="bf16")
    for _ in range(10):
        with_gemm(None, now)()
        with_gemm("default", whole_batch(then))()
        with_gemm(None, bf16)()
    out["fvu_after_10_steps"] = {"step": fvu(now.model, held), "step_before": fvu(then.model, held),
                                 "step_bf16": fvu(bf16.model, held)}
    out["bf16_screen"] = screen_agreement(bf16.model, held)
    if profile:
        out["profile"] = profile_step(Stepper(d_in, d_sae, k, pool))
    return out


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], batches=dict(type=int, nargs="+", default=None),
                      profile=dict(action="store_true", help="also profile the step's operators"))
    d_in, d_sae, k = (64, 1024, 8) if args.smoke else (512, 8192, 32)
    batches = args.batches or ([64] if args.smoke else [512, 4096])
    thread_counts = [torch.get_num_threads()] if args.smoke or args.threads else [1, 2]
    results = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for batch in batches:
            r = one_setting(d_in, d_sae, k, batch, args.rounds, 0.05 if args.smoke else 0.4, 4 if args.smoke else 8,
                            profile=args.profile)
            r["threads"] = threads
            results.append(r)
            print(f"threads {threads} batch {batch}: step {r['samples_per_second']['step']:.0f} samples/s "
                  f"({r['gemm_path']} GEMM), before {r['samples_per_second']['step_before']:.0f}; "
                  f"bound {r['bound_samples_per_second']:.0f}: fraction {r['fraction_of_bound']['step']:.2f} "
                  f"(was {r['fraction_of_bound']['step_before']:.2f}); GEMM GFLOP/s {r['gemm_gflops']}; "
                  f"bf16 screen {r['bf16_speedup_over_step']:.2f}x the step, {r['bf16_screen']}, "
                  f"FVU after 10 steps {r['fvu_after_10_steps']}", flush=True)
            for op in r.get("profile", []):
                print(f"    {op['op']:<55} {op['ms_per_step']:7.2f} ms/step  ({op['calls_per_step']:.0f} calls)")
    write_result("topk_bound", {"d_in": d_in, "d_sae": d_sae, "k": k, "gemm_decisions": gemm.decisions(),
                                "results": results}, args)


if __name__ == "__main__":
    main()
