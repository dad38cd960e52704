"""Training throughput with 2 processes (torchrun, DDP over gloo) against 1 process, on this CPU.

The same ``actsparse train`` run (a dense ReLU SAE with a KL penalty on the global batch's ρ̂,
Adam) is launched as: one process with one thread, one process with two threads, and two
processes with one thread each (``torchrun --nproc_per_node=2``). The three are interleaved over
rounds (A B C A B C ...); each reports its training seconds (``metrics.json``: the loop only, not
the start-up), and the script reports samples/s and the median speed-ups.

    python bench/bench_ddp_scaling.py            # ~2 minutes
    python bench/bench_ddp_scaling.py --smoke
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_args, write_result  # noqa: E402


def run(kind: str, out: Path, train_args: list[str]) -> float:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    if kind == "2 processes x 1 thread":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "actsparse"]
        threads = "1"
    else:
        cmd = [sys.executable, "-m", "actsparse"]
        threads = "2" if "2 threads" in kind else "1"
        env["OMP_NUM_THREADS"] = threads
    name = kind.replace(" ", "_")
    r = subprocess.run([*cmd, *train_args, "--threads", threads, "--out", str(out), "--name", name, "--overwrite"],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{kind} failed:\n{r.stderr[-3000:]}")
    return json.loads((out / name / "metrics.json").read_text())["seconds"]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], samples=dict(type=int, default=32768),
                      hidden=dict(type=int, default=2048))
    samples = 2048 if args.smoke else args.samples
    hidden = 64 if args.smoke else args.hidden
    train_args = ["train", "--data", "synthetic", "--samples", str(samples), "--hidden", str(hidden),
                  "--activation", "relu", "--decoder", "linear", "--penalty", "poisson_kl", "--target", "0.05",
                  "--weight", "1e-2", "--optimizer", "adam", "--epochs", "1", "--batch-size", "1024",
                  "--validation", "0", "--no-plots", "--no-progress", "--checkpoint-every", "0"]
    kinds = ["1 process x 1 thread", "1 process x 2 threads", "2 processes x 1 thread"]
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1 if args.smoke else args.rounds):  # smoke: each kind once (it starts 3 runs a round)
            order = kinds if r % 2 == 0 else kinds[::-1]
            for kind in order:
                seconds[kind].append(run(kind, Path(tmp), train_args))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    speedup = {k: med[kinds[0]] / med[k] for k in kinds}
    for k in kinds:
        print(f"{k:>24}: {samples / med[k]:9.0f} samples/s, {speedup[k]:.2f}x one thread "
              f"(median of {len(seconds[k])})")
    write_result("ddp_scaling", {"samples": samples, "hidden": hidden, "batch_size": 1024, "seconds": seconds,
                                 "samples_per_second": {k: samples / med[k] for k in kinds},
                                 "speedup_over_one_thread": speedup}, args)


if __name__ == "__main__":
    main()
