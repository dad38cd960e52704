"""Shared helpers of the benchmarks: interleaved timing, the machine's description, JSON results.

Absolute times on a shared 2-core machine are noisy, so every figure a benchmark reports is a
*ratio* of two things timed in the same process, in rounds that interleave them (A B, then B A,
so that a slow drift of the machine cancels). The ratio of each round is computed, and the
median over rounds is reported together with its spread (min..max).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(description: str, **extra: Any) -> argparse.Namespace:
    """The flags every benchmark takes: ``--smoke`` (tiny sizes, for the test suite), ``--threads``,
    ``--rounds`` and ``--out`` (a JSON file; default ``bench/results/NAME.json``, none in smoke mode)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few rounds: checks that the benchmark runs")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: every core)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 7, smoke: 2)")
    p.add_argument("--out", type=str, default=None, help="where to write the JSON result")
    for name, kwargs in extra.items():
        p.add_argument(f"--{name.replace('_', '-')}", **kwargs)
    args = p.parse_args()
    if args.smoke and not args.threads:
        args.threads = 1  # tiny sizes: a second thread only spin-waits (and the test suite runs beside others)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounds is None:
        args.rounds = 2 if args.smoke else 7
    return args


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """The usual three lines of a training step after the loss: zero, backward, step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def topk_sae(d_in: int, d_sae: int, k: int, decode: str = "auto", seed: int = 0):
    """The TopK SAE every benchmark trains: linear decoder, unit-norm atoms, Gao et al.'s init, mse."""
    from actsparse.models import SparseAutoencoder

    torch.manual_seed(seed)
    return SparseAutoencoder(d_in, d_sae, "topk", k=k, decoder="linear", unit_norm_decoder=True,
                             init="orthogonal_tied", recon_loss="mse", decode=decode)


def time_block(fn: Callable[[], object], repeat: int) -> float:
    """Seconds per call of ``fn``, over ``repeat`` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def calibrate(fn: Callable[[], object], min_seconds: float) -> int:
    """How many back-to-back calls of ``fn`` take at least ``min_seconds`` (after one warm-up call)."""
    fn()
    t = time_block(fn, 1)
    return max(1, int(min_seconds / max(t, 1e-9)) + 1)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 7, min_seconds: float = 0.3,
                warmup: int = 2) -> dict[str, list[float]]:
    """Time each function in ``fns`` once per round, alternating the order every round
    (A B C, C B A, ...). Returns ``{name: [seconds per call, one per round]}``.

    Each function runs ``warmup`` times first, then in each round enough calls back-to-back to
    take about ``min_seconds`` (calibrated once per function)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    reps = {name: calibrate(fn, min_seconds) for name, fn in fns.items()}
    out: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(time_block(fns[name], reps[name]))
    return out


def ratio(times: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    """``num / den`` per round: median, min and max (a ratio > 1 means ``num`` is slower)."""
    rs = [a / b for a, b in zip(times[num], times[den])]
    return {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}


def summary(seconds: list[float]) -> dict[str, float]:
    """Median, min and max of a list of per-round times."""
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def matmul_flops(n: int = 2048, dtype: torch.dtype = torch.float32) -> Callable[[], object]:
    """A closure computing an ``n×n`` by ``n×n`` matmul (``2n³`` FLOPs): the throughput probe."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(matmul_gflops: float | None = None) -> dict[str, Any]:
    """What the numbers were measured on."""
    import numpy

    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        info["load_average"] = os.getloadavg()[0]
    except OSError:
        pass
    if matmul_gflops is not None:
        info["matmul_fp32_gflops"] = matmul_gflops
    return info


def write_result(name: str, payload: dict[str, Any], args: argparse.Namespace) -> Path | None:
    """Write ``payload`` (plus the machine description) as JSON; print it; return the path.
    Smoke runs write nothing unless ``--out`` is given."""
    payload = {"benchmark": name, "smoke": bool(args.smoke), "machine": machine(payload.pop("_gflops", None)),
               **payload}
    text = json.dumps(payload, indent=2, default=float)
    print(text)
    if args.smoke and not args.out:
        return None
    path = Path(args.out) if args.out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path
