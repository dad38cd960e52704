#!/usr/bin/env bash
# Every benchmark at full size, one after the other (they must not share the machine), then the
# report. The peers run in their own environment (bench/requirements-peers.txt):
#   PEERS_PYTHON=/path/to/benchenv/bin/python bash bench/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PEERS_PY=${PEERS_PYTHON:-/work/benchenv/bin/python}
$PY bench/bench_attach_overhead.py --rounds 15 > /dev/null
$PY bench/bench_tutorial_pattern.py > /dev/null
$PY bench/bench_tutorial_pattern.py --threads 1 --out bench/results/tutorial_pattern_one_thread.json > /dev/null
$PY bench/bench_classic_scipy.py > /dev/null
$PY bench/bench_classic_scipy.py --threads 1 --numpy-threads 1 --out bench/results/classic_scipy_one_thread.json > /dev/null
$PY bench/bench_dense_step.py --rounds 15 > /dev/null
if [ -x "$PEERS_PY" ]; then
  $PEERS_PY bench/bench_topk_peers.py --adam fused > /dev/null
  $PEERS_PY bench/bench_topk_peers.py --adam plain > /dev/null
else
  echo "no peers environment at $PEERS_PY: benchmark 5 skipped" >&2
fi
$PY bench/bench_scaling.py > /dev/null
$PY bench/report.py
