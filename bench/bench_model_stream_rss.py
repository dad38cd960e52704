"""Peak resident memory of training straight from a model (``--data model:tiny-gpt2``), for two stream lengths.

Each length runs ``actsparse train --data model:tiny-gpt2 --tokens N ...`` (one epoch of a TopK SAE
on block 0's activations, the same ``--buffer`` for both) in a fresh subprocess, which reports its
peak RSS (``VmHWM`` of ``/proc/self/status``, read by the process itself after the command: a
child's ``ru_maxrss`` would count the parent's pages copied at fork). Nothing is written to disk
but the run folder. The claim measured: peak RSS does not grow with the stream (target: within
10 %), since the stream holds at most two blocks of ``--buffer`` rows and a fixed metrics sample.

    python bench/bench_model_stream_rss.py                          # 200,000 and 2,000,000 positions
    python bench/bench_model_stream_rss.py --smoke                  # 80,000 and 400,000
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_args, write_result  # noqa: E402

CHILD = r"""
import json, sys
def status(key):  # VmHWM: this process's peak RSS since exec
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
import torch, transformers  # the imports' memory is in the baseline, not in the run's share
from actsparse.cli import main
before = status("VmRSS")
code = main(sys.argv[1:])
print(json.dumps({"code": code, "rss_before_mib": before, "peak_rss_mib": status("VmHWM")}))
"""


def main() -> None:
    args = parse_args(__doc__.splitlines()[0],
                      tokens=dict(type=int, nargs="+", default=[200_000, 2_000_000], help="stream lengths (positions)"),
                      buffer=dict(type=int, default=65_536, help="rows of the shuffle buffer"),
                      context=dict(type=int, default=128, help="tokens per window"),
                      hidden=dict(type=int, default=512, help="SAE width (TopK, k=32)"),
                      batch_size=dict(type=int, default=4096, help="SAE minibatch"))
    tokens = [80_000, 400_000] if args.smoke else args.tokens  # both above the 65,536-row metrics sample
    buffer = 8192 if args.smoke else args.buffer
    hidden = 128 if args.smoke else args.hidden
    batch = 1024 if args.smoke else args.batch_size
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in tokens:
            argv = ["train", "--data", "model:tiny-gpt2", "--layer", "h.0", "--tokens", str(n), "--context",
                    str(args.context), "--buffer", str(buffer), "--hidden", str(hidden), "--activation", "topk", "--k",
                    "32", "--epochs", "1", "--batch-size", str(batch), "--checkpoint-every", "0", "--no-plots",
                    "--no-progress", "--threads", "1", "--device", "cpu", "--out", tmp, "--name", f"tokens-{n}"]
            out = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env)
            if out.returncode:
                raise SystemExit(f"training on {n} positions failed:\n{out.stderr[-3000:]}")
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            if rec["code"]:
                raise SystemExit(f"training on {n} positions failed:\n{out.stderr[-3000:]}")
            metrics = json.loads((Path(tmp) / f"tokens-{n}" / "metrics.json").read_text())
            rec |= {"tokens": n, "steps": metrics["steps"], "seconds": metrics["total_seconds"], "fvu": metrics["fvu"]}
            print(f"{n:,} positions: peak RSS {rec['peak_rss_mib']:.0f} MiB (after imports {rec['rss_before_mib']:.0f}"
                  f" MiB), {rec['steps']} steps in {rec['seconds']:.1f} s, FVU {rec['fvu']:.3f}")
            results.append(rec)
    ratio = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
    grown = [r["peak_rss_mib"] - r["rss_before_mib"] for r in results]
    print(f"peak RSS, longest / shortest stream: {ratio:.3f}x (target <= 1.10x); above the imports: "
          f"{grown[0]:.0f} -> {grown[-1]:.0f} MiB")
    write_result("model_stream_rss", {"model": "tiny-gpt2", "layer": "h.0", "context": args.context, "buffer": buffer,
                                      "hidden": hidden, "k": 32, "batch_size": batch, "runs": results,
                                      "peak_rss_ratio": ratio, "rss_above_imports_mib": grown}, args)


if __name__ == "__main__":
    main()
