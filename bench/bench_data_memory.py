"""Peak resident memory of ``actsparse train`` on a ``.npy`` held in memory, with Adam and with L-BFGS.

A float32 ``.npy`` of ``--rows`` × ``--d`` standard-normal values (200,000 × 512: 391 MiB) is
written to a temporary folder. Each measurement is a fresh process running ``python -m actsparse
train --data that.npy ...`` (ReLU + L1, ``--hidden`` units, ``--no-plots``, one thread) through a
wrapper that calls the same ``actsparse.cli.main`` and then reads the process's own peak RSS
(``VmHWM`` of ``/proc/self/status``; a child's ``ru_maxrss`` would count the parent's pages copied
at fork). A third process only imports torch and actsparse: the baseline. The model's size is the
bytes of the trained weights (``model.safetensors``'s tensors).

The claim measured (the target): Adam's peak above the imports is at most 1.5 × (data + model).
Part of that peak is the run's own, whatever the data's size (code, the optimiser's imports, the
allocator's free lists, one evaluation chunk); so Adam also runs on the first tenth of the rows,
and the growth of the peak per MiB of data between the two is reported (1.0: the data are held
once, and nothing else grows with them). L-BFGS is full-batch: it keeps one contiguous copy of the
training split and evaluates all of it at once, so its figure is reported, not held to that target.

    python bench/bench_data_memory.py                  # 200,000 x 512 (writes 391 MiB)
    python bench/bench_data_memory.py --smoke          # 4,000 x 64, seconds
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_args, write_result  # noqa: E402

MIB = 2**20
TARGET = 1.5  # Adam: peak above the imports <= TARGET x (data + model)

CHILD = r"""
import json, sys
def status(key):  # this process's own figures, in MiB: VmHWM is its peak RSS since exec
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
import torch
import actsparse.cli, actsparse.data, actsparse.runner, actsparse.train  # what `actsparse train` imports
imports = status("VmHWM")
code = 0
if sys.argv[1:] != ["--imports-only"]:
    from actsparse.cli import main  # what `python -m actsparse` runs
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "imports_mib": imports, "peak_rss_mib": status("VmHWM"),
                  "end_rss_anon_mib": status("RssAnon"), "end_rss_file_mib": status("RssFile")}))
"""


def write_npy(path: Path, rows: int, d: int, chunk: int = 16384) -> None:
    """A float32 standard-normal ``(rows, d)`` array, written chunk by chunk (this process stays
    small); the same seed, so a shorter file holds the first rows of a longer one."""
    rng = np.random.default_rng(0)
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, d))
    for a in range(0, rows, chunk):
        x[a:a + chunk] = rng.standard_normal((min(chunk, rows - a), d), dtype=np.float32)
    x.flush()
    del x


def measure(argv: list[str], threads: int) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    if out.returncode:
        raise SystemExit(f"`{' '.join(argv)}` failed:\n{out.stderr[-3000:]}")
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    if rec["code"]:
        raise SystemExit(f"`actsparse {' '.join(argv)}` exited with {rec['code']}:\n{out.stdout[-3000:]}")
    return rec | {"seconds": seconds}


def model_bytes(run_dir: Path) -> int:
    """The bytes of the trained weights (every tensor in ``model.safetensors``)."""
    from safetensors import safe_open

    with safe_open(str(run_dir / "model.safetensors"), framework="np") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys())


def main() -> None:
    args = parse_args(__doc__.splitlines()[0],
                      rows=dict(type=int, default=200_000, help="samples of the .npy"),
                      d=dict(type=int, default=512, help="features of the .npy"),
                      hidden=dict(type=int, default=64, help="hidden units (ReLU + L1)"),
                      batch_size=dict(type=int, default=4096, help="Adam's minibatch"),
                      iterations=dict(type=int, default=3, help="L-BFGS iterations"),
                      dir=dict(default=None, help="where to write the .npy (default: a temporary folder)"))
    rows, d = (4000, 64) if args.smoke else (args.rows, args.d)
    hidden = 16 if args.smoke else args.hidden
    batch = 512 if args.smoke else args.batch_size
    iterations = 2 if args.smoke else args.iterations
    threads = args.threads or 1
    tenth = max(2, rows // 10)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        data, small = Path(tmp) / "data.npy", Path(tmp) / "tenth.npy"
        write_npy(data, rows, d)
        write_npy(small, tenth, d)
        data_mib, tenth_mib = rows * d * 4 / MIB, tenth * d * 4 / MIB
        common = ["--recipe", "sae", "--activation", "relu", "--penalty", "l1", "--hidden", str(hidden),
                  "--no-plots", "--no-progress", "--checkpoint-every", "0", "--threads", str(threads),
                  "--device", "cpu", "--out", tmp]
        adam_args = ["--optimizer", "adam", "--epochs", "1", "--batch-size", str(batch)]
        imports = measure(["--imports-only"], threads)
        adam = measure(["train", "--data", str(data), *common, *adam_args, "--name", "adam"], threads)
        adam_tenth = measure(["train", "--data", str(small), *common, *adam_args, "--name", "adam_tenth"], threads)
        lbfgs = measure(["train", "--data", str(data), *common, "--optimizer", "lbfgs", "--iterations", str(iterations),
                         "--name", "lbfgs"], threads)
        model_mib = model_bytes(Path(tmp) / "adam") / MIB
    base = imports["peak_rss_mib"]
    budget = TARGET * (data_mib + model_mib)
    runs = {}
    for name, rec in (("adam", adam), ("lbfgs", lbfgs)):
        above = rec["peak_rss_mib"] - base
        runs[name] = rec | {"above_imports_mib": above,
                            "above_imports_over_data_and_model": above / (data_mib + model_mib),
                            "peak_over_data_model_imports": rec["peak_rss_mib"] / (data_mib + model_mib + base)}
        print(f"{name}: peak RSS {rec['peak_rss_mib']:.0f} MiB, {above:.0f} MiB above the imports = "
              f"{runs[name]['above_imports_over_data_and_model']:.2f}x (data + model); "
              f"{runs[name]['peak_over_data_model_imports']:.2f}x (data + model + imports); {rec['seconds']:.1f} s")
    runs["adam_tenth"] = adam_tenth | {"rows": tenth, "data_mib": tenth_mib}
    per_mib = (adam["peak_rss_mib"] - adam_tenth["peak_rss_mib"]) / (data_mib - tenth_mib)
    print(f"adam on the first {tenth} rows ({tenth_mib:.0f} MiB): peak RSS {adam_tenth['peak_rss_mib']:.0f} MiB; the "
          f"peak grows {per_mib:.2f} MiB per MiB of data")
    met = runs["adam"]["above_imports_mib"] <= budget
    print(f"data {data_mib:.0f} MiB, model {model_mib:.2f} MiB, imports {base:.0f} MiB: Adam "
          f"{runs['adam']['above_imports_mib']:.0f} MiB above the imports vs the target {budget:.0f} MiB "
          f"({TARGET:g} x (data + model)): {'met' if met else 'not met'}")
    write_result("data_memory", {"rows": rows, "d": d, "hidden": hidden, "batch_size": batch,
                                 "lbfgs_iterations": iterations, "data_mib": data_mib, "model_mib": model_mib,
                                 "imports_mib": base, "target_above_imports_mib": budget, "adam_met": met,
                                 "adam_peak_growth_per_data_mib": per_mib,
                                 "runs": runs}, args)


if __name__ == "__main__":
    main()
