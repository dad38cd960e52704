"""Peak resident memory of training streamed from an on-disk activation store, for two store sizes.

Each store is written with :class:`actsparse.data.shards.ShardWriter` (random rows, float32), then
one epoch of a TopK SAE is trained on it with ``actsparse.train.train`` in a fresh subprocess,
which reports its peak RSS (``VmHWM``, which counts the pages of memory-mapped shards that were
resident too; ``ru_maxrss`` would inherit the writer's peak across fork and exec). The claim
measured: peak RSS does not grow with the store (target: within 10 %).

    python bench/bench_stream_rss.py                    # 0.5 GB and 5 GB stores (writes ~5.5 GB)
    python bench/bench_stream_rss.py --sizes-gb 0.05 0.5 --smoke
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_args, write_result  # noqa: E402

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from actsparse.config import TrainConfig
from actsparse.data.shards import ShardStore
from actsparse.train import train
store = ShardStore(sys.argv[1])
cfg = TrainConfig(data="shards", hidden=int(sys.argv[2]), activation="topk", k=32, decoder="linear", penalty=None,
                  weight_decay=0.0, optimizer="adam", lr=1e-3, epochs=1, batch_size=int(sys.argv[3]), plots=False,
                  progress=False, threads=1, device="cpu", checkpoint_every=0)
def status(key):  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over fork + exec)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
before = status("VmRSS")
t = time.perf_counter()
loop = []  # the peak so far at each logged step: the training loop's, before the final evaluation
res = train(cfg, store, on_step=lambda rec: loop.append(status("VmHWM")))
print(json.dumps({"rows": store.n_rows, "steps": res.metrics["steps"], "seconds": time.perf_counter() - t,
                  "rss_before_mib": before, "loop_peak_rss_mib": loop[-1],
                  "peak_rss_mib": status("VmHWM"),
                  "fvu": res.metrics["fvu"]}))
"""


def write_store(path: Path, gb: float, d: int, shard_rows: int) -> int:
    from actsparse.data.shards import ShardWriter

    rows = int(gb * 1e9 / (4 * d))
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((4 * d, d)).astype(np.float32) / np.sqrt(d)
    with ShardWriter(path, d=d, dtype="float32", shard_size=shard_rows, source={"bench": "stream_rss"}) as w:
        done = 0
        while done < rows:
            n = min(shard_rows, rows - done)
            code = rng.exponential(size=(n, 4 * d)).astype(np.float32) * (rng.random((n, 4 * d)) < 0.02)
            w.write(code @ atoms)
            done += n
    return rows


def main() -> None:
    args = parse_args(__doc__.splitlines()[0],
                      sizes_gb=dict(type=float, nargs="+", default=[0.5, 5.0], help="store sizes in GB"),
                      d=dict(type=int, default=256, help="row width"),
                      hidden=dict(type=int, default=1024, help="SAE width (TopK, k=32)"),
                      shard_rows=dict(type=int, default=65536, help="rows per shard"),
                      dir=dict(default=None, help="where to write the stores (default: a temporary folder)"))
    sizes = [0.004, 0.04] if args.smoke else args.sizes_gb
    hidden = 256 if args.smoke else args.hidden
    shard_rows = 2048 if args.smoke else args.shard_rows
    batch = 256 if args.smoke else 4096
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for gb in sizes:
            store = Path(tmp) / f"store_{gb}gb"
            t = time.perf_counter()
            rows = write_store(store, gb, args.d, shard_rows)
            written = time.perf_counter() - t
            out = subprocess.run([sys.executable, "-c", CHILD, str(store), str(hidden), str(batch)],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"training on the {gb:g} GB store failed:\n{out.stderr[-3000:]}")
            rec = json.loads(out.stdout.strip().splitlines()[-1]) | {"store_gb": gb, "write_seconds": written}
            print(f"{gb:g} GB store ({rows} rows x {args.d}): peak RSS {rec['peak_rss_mib']:.0f} MiB, in the "
                  f"training loop {rec['loop_peak_rss_mib']:.0f} MiB (after imports {rec['rss_before_mib']:.0f} MiB), "
                  f"{rec['steps']} steps in {rec['seconds']:.1f} s")
            results.append(rec)
            for f in store.glob("*"):  # free the disk before the next, larger store
                f.unlink()
    ratio = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
    loop_ratio = results[-1]["loop_peak_rss_mib"] / results[0]["loop_peak_rss_mib"]
    print(f"peak RSS, largest / smallest store: {ratio:.3f}x; training loop only {loop_ratio:.3f}x (target <= 1.10x)")
    write_result("stream_rss", {"d": args.d, "hidden": hidden, "k": 32, "batch_size": batch, "shard_rows": shard_rows,
                                "runs": results, "peak_rss_ratio": ratio,
                                "loop_peak_rss_ratio": loop_ratio}, args)


if __name__ == "__main__":
    main()
