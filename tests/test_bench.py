"""Every benchmark runs on a tiny size (``--smoke``), writes its JSON, and the report renders it.

The real measurements are not part of the test suite (docs/benchmarks.md says how to run them);
this only proves that each script works and produces the fields the report reads.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = {  # script -> result stem and a key its JSON must have
    "bench_attach_overhead.py": ("attach_overhead", "attach_over_inline"),
    "bench_tutorial_pattern.py": ("tutorial_pattern", "results"),
    "bench_classic_scipy.py": ("classic_scipy", "machine"),
    "bench_dense_step.py": ("dense_step", "efficiency"),
    "bench_topk_peers.py": ("topk_peers_fused_adam", "ratios"),
    "bench_scaling.py": ("scaling", "crossover"),
    "bench_stream_rss.py": ("stream_rss", "loop_peak_rss_ratio"),
    "bench_ddp_scaling.py": ("ddp_scaling", "speedup_over_one_thread"),
    "bench_topk_bound.py": ("topk_bound", "gemm_decisions"),
    "bench_data_memory.py": ("data_memory", "adam_peak_growth_per_data_mib"),
}

SLOW_SMOKE = {"bench_ddp_scaling.py", "bench_data_memory.py", "bench_stream_rss.py", "bench_scaling.py"}  # 9-15 s each


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    """The smoke runs, two at a time (each is mostly a fresh interpreter importing torch, on one
    core: the set takes about half as long as one after another)."""
    out = tmp_path_factory.mktemp("results")

    def smoke(script: str) -> tuple[str, subprocess.CompletedProcess]:
        argv = [sys.executable, str(BENCH / script), "--smoke", "--out", str(out / f"{SCRIPTS[script][0]}.json")]
        return script, subprocess.run(argv, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        slowest_first = sorted(SCRIPTS, key=lambda s: s not in SLOW_SMOKE)
        for script, res in pool.map(smoke, slowest_first):
            assert res.returncode == 0, f"{script} failed:\n{res.stderr[-3000:]}"
    return out


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_smoke_run_writes_its_result(smoke_results, script):
    stem, key = SCRIPTS[script]
    r = json.loads((smoke_results / f"{stem}.json").read_text())
    assert r["smoke"] is True and key in r
    assert r["machine"]["cores"] >= 1 and r["machine"]["torch"]


def test_report_renders_every_measured_benchmark(smoke_results, tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written text stays\n")
    res = subprocess.run([sys.executable, str(BENCH / "report.py"), "--results", str(smoke_results), "--doc", str(doc)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    text = doc.read_text()
    assert "hand-written text stays" in text
    assert "Not measured yet" in text  # the plain-Adam peers run is not part of the smoke set
    for title in ("attach() overhead", "tutorial pattern", "SciPy", "step efficiency", "Scaling"):
        assert title in text
    assert text.count("| actsparse") >= 2
