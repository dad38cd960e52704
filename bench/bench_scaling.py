"""Scaling of TopK SAE training: dense vs sparse decoding, over d_sae and over k.

For each configuration (d_in 512, batch 512; d_sae from 1k to 32k at k = 32, k from 8 to 256
at d_sae = 8192, and k from 64 to 512 at d_sae = 1024, where the crossover lies) the two paths
of :class:`actsparse.models.SparseAutoencoder` (``decode="dense"`` and ``decode="sparse"``, same
initial weights) are trained by :func:`actsparse.train.train_step` with fused Adam, interleaved
in the same rounds: samples/s of each and the speed-up sparse / dense. Peak memory is measured
in a fresh subprocess per configuration and path: the peak resident set (VmHWM) over three
steps minus the resident set before the model was built, i.e. parameters, gradients, Adam
state and the step's temporaries.

The crossover (the smallest d_sae / k at which sparse is faster) is what ``decode="auto"``
uses (``actsparse.models.sae.SPARSE_MIN_RATIO``).

    python bench/bench_scaling.py [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from _common import interleaved, parse_args, ratio, summary, topk_sae, write_result

from actsparse.models.sae import SPARSE_MIN_RATIO
from actsparse.train import minibatch_optimizer, train_step


def build(d_in: int, d_sae: int, k: int, decode: str):
    model = topk_sae(d_in, d_sae, k, decode)
    return model, minibatch_optimizer("adam", model.parameters(), 1e-4)


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_probe(d_in: int, d_sae: int, k: int, batch: int, decode: str) -> None:
    """Run in a subprocess: print the peak memory (MiB) of three training steps as JSON."""
    x = torch.randn(batch, d_in)
    tiny, tiny_opt = build(4, 8, 2, decode)  # one-time initialisation (allocator, autograd, kernels) off the books
    train_step(tiny, tiny_opt, torch.randn(2, 4))
    before = rss_kib("VmRSS")
    model, opt = build(d_in, d_sae, k, decode)
    for _ in range(3):
        train_step(model, opt, x)
    print(json.dumps({"peak_mib": (rss_kib("VmHWM") - before) / 1024}))


def measure_memory(d_in: int, d_sae: int, k: int, batch: int, decode: str, threads: int) -> float | None:
    cmd = [sys.executable, __file__, "--memory-probe", f"{d_in},{d_sae},{k},{batch},{decode}",
           "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], memory_probe={"default": None, "help": "internal"})
    if args.memory_probe:
        d_in, d_sae, k, batch, decode = args.memory_probe.split(",")
        memory_probe(int(d_in), int(d_sae), int(k), int(batch), decode)
        return
    if args.smoke:
        d_in, batch, sweep_d, sweep_k, fixed_k, fixed_d = 16, 32, [64], [], 4, 64
    else:
        d_in, batch = 512, 512
        sweep_d, sweep_k, fixed_k, fixed_d = [1024, 2048, 4096, 8192, 16384, 32768], [8, 16, 32, 64, 128, 256], 32, 8192
    configs = [(d, fixed_k) for d in sweep_d] + [(fixed_d, k) for k in sweep_k if (fixed_d, k) != (fixed_d, fixed_k)]
    if not args.smoke:  # where the crossover lies: k close to d_sae
        configs += [(1024, k) for k in (64, 128, 256, 512)]
    x = torch.randn(batch, d_in)
    rows = []
    for d_sae, k in configs:
        steps = {}
        for decode in ("dense", "sparse"):
            model, opt = build(d_in, d_sae, k, decode)
            steps[decode] = lambda model=model, opt=opt: train_step(model, opt, x)
        times = interleaved(steps, rounds=args.rounds, min_seconds=0.05 if args.smoke else 0.3, warmup=1)
        row = {"d_sae": d_sae, "k": k, "ratio_d_sae_over_k": d_sae / k,
               "samples_per_s": {n: batch / summary(ts)["median"] for n, ts in times.items()},
               "speedup_sparse_over_dense": ratio(times, "dense", "sparse"),
               "peak_mib": {n: measure_memory(d_in, d_sae, k, batch, n, torch.get_num_threads())
                            for n in ("dense", "sparse")}}
        rows.append(row)
        print(f"d_sae {d_sae:6d} k {k:4d}: dense {row['samples_per_s']['dense']:8.0f}/s, "
              f"sparse {row['samples_per_s']['sparse']:8.0f}/s, speed-up "
              f"{row['speedup_sparse_over_dense']['median']:.2f}, peak MiB {row['peak_mib']}", file=sys.stderr)
    faster = sorted(r["ratio_d_sae_over_k"] for r in rows if r["speedup_sparse_over_dense"]["median"] > 1)
    slower = sorted(r["ratio_d_sae_over_k"] for r in rows if r["speedup_sparse_over_dense"]["median"] <= 1)
    payload = {"d_in": d_in, "batch": batch, "rows": rows,
               "crossover": {"sparse_faster_from_ratio": faster[0] if faster else None,
                             "dense_faster_up_to_ratio": slower[-1] if slower else None,
                             "auto_rule_SPARSE_MIN_RATIO": SPARSE_MIN_RATIO}}
    write_result("scaling", payload, args)


if __name__ == "__main__":
    main()
