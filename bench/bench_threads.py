"""Intra-op threads of a training run: one thread, every core, and the default rule, idle and loaded.

``actsparse train`` picks the thread count when ``--threads`` is not given
(:func:`actsparse.runner.default_threads`): never more than the cores that other processes
leave free; all of them for a small model, otherwise one per
:data:`~actsparse.runner.WORK_PER_THREAD` of work per step. This measures whether that rule is right, on two runs:

- ``classic``: the CS294A exercise, 64 → 25 → 64 sigmoid autoencoder + Bernoulli KL, full-batch
  L-BFGS on 10,000 8×8 patches, 400 iterations (``actsparse train`` with its defaults);
- ``large``: a TopK SAE, d_in 256 → 4096 units, k 32, linear decoder, Adam, batch 256, 2 epochs
  of 8,192 Gaussian rows.

Each is trained with 1 thread, with every usable core (``all``), and with the thread count the
rule gives at that moment (``rule``: it looks at the machine's load right before the run), on
the machine as it is (``idle``) and with one busy-spinning process per usable core started
beside it (``loaded``: ``python -c "while True: pass"``, killed after the loaded block). The
rounds interleave everything: idle/loaded blocks alternate their order each round, and so do the
three thread settings inside a block. Reported: training seconds (``metrics["seconds"]``) as
median (min..max) over rounds, and the per-round ratios rule/1 and rule/all.

    python bench/bench_threads.py [--rounds 7] [--models classic,large] [--iterations 400] [--epochs 2]

Writes ``bench/results/threads.json`` and prints a Markdown table. Run it on a quiet machine:
the "idle" numbers include whatever else the machine does.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import torch
from _common import parse_args, summary, write_result

from actsparse.config import TrainConfig
from actsparse.runner import WORK_PER_THREAD, _choose_threads, _parameters, busy_cores, usable_cores
from actsparse.train import train

SETTINGS = ("one", "all", "rule")
LOADS = ("idle", "loaded")


@contextlib.contextmanager
def spinners(n: int, settle: float = 0.5) -> Iterator[list[subprocess.Popen]]:
    """``n`` busy-spinning Python processes for the duration of the block (killed, and waited for,
    on the way out whatever happens)."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        time.sleep(settle)  # started and spinning before anything is timed
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def workloads(args) -> dict[str, tuple[TrainConfig, torch.Tensor, str]]:
    """The runs to time: name -> (config, data, description)."""
    from actsparse.data import load_data

    out = {}
    if "classic" in args.models:
        n, iters = (2000, 20) if args.smoke else (10_000, args.iterations)
        cfg = TrainConfig(samples=n, iterations=iters, plots=False, progress=False)
        x = load_data(cfg).x
        out["classic"] = (cfg, x, f"64→25→64 sigmoid + KL, L-BFGS full batch, {n} patches, {iters} iterations")
    if "large" in args.models:
        n, d, hidden, k, epochs = (2048, 64, 512, 16, 1) if args.smoke else (8192, 256, 4096, 32, args.epochs)
        cfg = TrainConfig(data="synthetic", hidden=hidden, activation="topk", k=k, decoder="linear", penalty=None,
                          optimizer="adam", epochs=epochs, batch_size=256, plots=False, progress=False)
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
        out["large"] = (cfg, x, f"TopK SAE {d}→{hidden} (k {k}), Adam, batch 256, {epochs} epochs of {n} rows")
    return out


def timed_run(cfg: TrainConfig, x: torch.Tensor, threads: int) -> float:
    """Training seconds of one run of ``cfg`` on ``x`` with ``threads`` intra-op threads."""
    torch.set_num_threads(threads)
    return float(train(cfg, x).metrics["seconds"])


def ratio_of(a: list[float], b: list[float]) -> dict[str, float]:
    rs = [p / q for p, q in zip(a, b)]
    return {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}


def spread(d: dict[str, float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(d['median'])} ({fmt.format(d['min'])}..{fmt.format(d['max'])})"


def main() -> None:
    args = parse_args(__doc__.splitlines()[0],
                      models={"type": lambda s: [m for m in s.split(",") if m], "default": ["classic", "large"],
                              "help": "comma-separated: classic, large"},
                      iterations={"type": int, "default": 400, "help": "L-BFGS iterations of the classic run"},
                      epochs={"type": int, "default": 2, "help": "Adam epochs of the large run"})
    unknown = set(args.models) - {"classic", "large"}
    if unknown:
        raise SystemExit(f"unknown --models {', '.join(sorted(unknown))}: use classic, large")
    os.environ.pop("OMP_NUM_THREADS", None)  # else the rule would take it (a user's explicit choice)
    cores = usable_cores()
    runs = workloads(args)
    for cfg, x, _ in runs.values():  # warm-up (lazy imports, allocator), untimed
        timed_run(cfg, x, 1)

    # times[model][load][setting] = seconds per round; chosen/busy: what the rule saw and picked
    times = {m: {ld: {s: [] for s in SETTINGS} for ld in LOADS} for m in runs}
    chosen = {m: {ld: [] for ld in LOADS} for m in runs}
    seen_busy = {ld: [] for ld in LOADS}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        for load in (LOADS if r % 2 == 0 else LOADS[::-1]):
            with (spinners(cores) if load == "loaded" else contextlib.nullcontext()):
                seen_busy[load].append(busy_cores())
                for name, (cfg, x, _) in runs.items():
                    for setting in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
                        if setting == "rule":
                            n, _why = _choose_threads(cfg, x.shape[0], x.shape[1])
                            chosen[name][load].append(n)
                        else:
                            n = 1 if setting == "one" else cores
                        times[name][load][setting].append(timed_run(cfg, x, n))
        print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)

    results = {}
    for name, (cfg, x, desc) in runs.items():
        rows = x.shape[0] - int(round(cfg.validation * x.shape[0])) if cfg.optimizer == "lbfgs" else cfg.batch_size
        entry = {"description": desc, "parameters": _parameters(cfg, x.shape[1]), "rows_per_step": rows,
                 "work_per_step": _parameters(cfg, x.shape[1]) * rows}
        for load in LOADS:
            t = times[name][load]
            entry[load] = {"seconds": {s: summary(t[s]) for s in SETTINGS},
                           "per_round": t, "rule_threads": chosen[name][load],
                           "rule_over_one": ratio_of(t["rule"], t["one"]),
                           "rule_over_all": ratio_of(t["rule"], t["all"])}
        results[name] = entry
    payload = {"cores": cores, "all_threads": cores, "work_per_thread": WORK_PER_THREAD, "rounds": args.rounds,
               "busy_cores_seen": {ld: summary(v) for ld, v in seen_busy.items()}, "results": results}

    table = [f"| run | machine | 1 thread (s) | all ({cores} threads, s) | rule (s) | rule chose | rule / 1 | "
             "rule / all |",
             "|---|---|---|---|---|---|---|---|"]
    for name, entry in results.items():
        for load in LOADS:
            e = entry[load]
            picks = sorted(set(e["rule_threads"]))
            table.append(f"| {name} | {load} | {spread(e['seconds']['one'])} | {spread(e['seconds']['all'])} | "
                         f"{spread(e['seconds']['rule'])} | {', '.join(map(str, picks))} | "
                         f"{spread(e['rule_over_one'])} | {spread(e['rule_over_all'])} |")
    write_result("threads", payload, args)
    print()
    for name, (_, _, desc) in runs.items():
        print(f"- {name}: {desc}")
    print(f"\nTraining seconds, median (min..max) over {args.rounds} interleaved rounds; ratios per round "
          f"(< 1: the rule is faster). Busy cores seen by the rule: idle "
          f"{spread(payload['busy_cores_seen']['idle'], '{:.1f}')}, loaded "
          f"{spread(payload['busy_cores_seen']['loaded'], '{:.1f}')}.\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
