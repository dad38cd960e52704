"""``actsparse train``'s report: the thread count it picks, the summary line's statistics, and its
progress in a log (stderr not a terminal)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actsparse.cli import main
from actsparse.config import TrainConfig
from actsparse.runner import WORK_PER_THREAD, _progress, default_threads

NUMBER = r"([0-9][0-9.e+-]*)"


def _summary(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("trained ")]
    assert len(lines) == 1, out
    return lines[0]


@pytest.fixture
def gaussian_npy(tmp_path):
    """600 rows of 16 Gaussian features (scale 2): ReLU codes whose mean activation is far from
    their firing frequency."""
    path = tmp_path / "x.npy"
    np.save(path, (2.0 * np.random.default_rng(0).standard_normal((600, 16))).astype(np.float32))
    return path


def _relu_run(path, tmp_path, name: str, *extra: str) -> str:
    args = ["train", "--data", str(path), "--activation", "relu", "--decoder", "linear", "--hidden", "32",
            "--optimizer", "adam", "--epochs", "3", "--batch-size", "64", "--validation", "0", "--no-plots",
            "--no-progress", "--threads", "1", "--out", str(tmp_path), "--name", name, *extra]
    assert main(args) == 0
    return str(tmp_path / name)


# --- the summary line ------------------------------------------------------------------------------

def test_sigmoid_kl_summary_has_no_l0_and_names_mean_activation_vs_target(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    assert main(["train", "--samples", "300", "--iterations", "5", "--no-plots", "--no-progress",
                 "--out", str(tmp_path), "--name", "s"]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"threads: \d+ \(chosen: .*; --threads N to set\)", out.splitlines()[1]), out
    assert torch.get_num_threads() == before  # the run's own choice is not left behind
    line = _summary(out)
    assert "L0" not in line, line  # every sigmoid unit is non-zero: an L0 of 25 says nothing
    m = re.search(rf"mean activation {NUMBER} \(target 0\.01\)", line)
    assert m, line
    saved = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert float(m.group(1)) == pytest.approx(saved["mean_activation"], rel=1e-3)
    assert f"threads: {saved['threads']} (" in out  # the count printed is the one saved


def test_frequency_kl_summary_names_the_firing_frequency_vs_target(tmp_path, capsys, gaussian_npy):
    run = _relu_run(gaussian_npy, tmp_path, "f", "--penalty", "frequency_kl", "--target", "0.2", "--weight", "0.1")
    line = _summary(capsys.readouterr().out)
    m = re.search(rf"firing frequency {NUMBER} \(target 0\.2\)", line)
    assert m, line
    assert "mean activation" not in line, line
    # recomputed from the saved weights on the data: ReLU(x W_encᵀ + b_enc), the share of non-zeros
    w = load_file(f"{run}/model.safetensors")
    x = torch.from_numpy(np.load(gaussian_npy)).double()
    h = torch.relu(x @ w["W_enc"].double().t() + w["b_enc"].double())
    firing = float((h != 0).double().mean(0).mean())  # mean over units of each unit's firing fraction
    assert 0.01 < firing < 0.99 and abs(firing - float(h.mean())) > 0.05  # the two statistics differ here
    assert float(m.group(1)) == pytest.approx(firing, rel=2e-3, abs=1e-4)
    l0 = re.search(rf"L0 {NUMBER} of 32", line)
    assert l0 and float(l0.group(1)) == pytest.approx(32 * firing, rel=2e-3, abs=0.01), line


def test_relu_l1_summary_shows_l0_and_no_target(tmp_path, capsys, gaussian_npy):
    _relu_run(gaussian_npy, tmp_path, "l1", "--penalty", "l1", "--weight", "1e-3")
    line = _summary(capsys.readouterr().out)
    assert re.search(rf"L0 {NUMBER} of 32", line), line
    assert "target" not in line, line


# --- progress in a log -----------------------------------------------------------------------------

def test_progress_to_a_pipe_is_a_few_plain_lines(tmp_path):
    """400 steps (40 epochs of 10 batches) with stderr to a pipe: about one line per tenth, no bar."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-m", "actsparse", "train", "--samples", "300", "--optimizer", "adam",
                        "--epochs", "40", "--batch-size", "27", "--no-plots", "--threads", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "for 400 steps" in r.stdout
    lines = [ln for ln in re.split(r"[\r\n]+", r.stderr) if ln.strip()]
    assert len(lines) <= 12, r.stderr[-2000:]
    steps = [ln for ln in lines if re.match(r"step \d+/400 ", ln)]
    assert len(steps) >= 5 and steps[-1].startswith("step 400/400 (100%) loss "), lines
    assert all("L0" not in ln and "(target 0.01)" in ln for ln in steps), steps  # sigmoid + KL: ρ̂ vs ρ


def test_progress_on_a_terminal_is_still_a_bar():
    pytest.importorskip("tqdm")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    update, close = _progress(TrainConfig(), 400, stream=term)
    for step in range(1, 401):
        update({"step": step, "loss": 0.5, "l0": 25.0, "mean_activation": 0.01, "fvu": 0.5, "seconds": 0.0})
    close()
    assert "\r" in term.getvalue() and "step 40/400" not in term.getvalue()


# --- the thread count ------------------------------------------------------------------------------

LARGE = dict(hidden=4096, activation="topk", k=32, decoder="linear", penalty=None, optimizer="adam")


def test_default_threads_take_only_free_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    classic = TrainConfig()
    assert default_threads(classic, 10_000, 64, cores=2, busy=0) == 2  # idle: every free core
    assert default_threads(classic, 10_000, 64, cores=2, busy=1) == 1  # another process on a core: 1
    assert default_threads(classic, 10_000, 64, cores=8, busy=5) == 3
    large = TrainConfig(**LARGE)
    work = (2 * 256 * 4096 + 4096 + 256) * 256
    assert default_threads(large, 100_000, 256, cores=8, busy=0) == min(8, int(work // WORK_PER_THREAD)) > 1
    assert default_threads(large, 100_000, 256, cores=64, busy=0) == int(work // WORK_PER_THREAD)
    assert default_threads(large, 100_000, 256, cores=8, busy=5) == 3  # only the free cores
    assert default_threads(large, 100_000, 256, cores=8, busy=8) == 1
    assert 1 <= default_threads(large, 100_000, 256) <= len(os.sched_getaffinity(0))


def test_default_threads_respects_an_explicit_choice(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads(TrainConfig(threads=3), 10_000, 64, cores=8, busy=0) == 3
    assert default_threads(TrainConfig(threads=1, **LARGE), 100_000, 256, cores=8, busy=0) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert default_threads(TrainConfig(**LARGE), 100_000, 256, cores=8, busy=0) == 2
    assert default_threads(TrainConfig(threads=4, **LARGE), 100_000, 256, cores=8, busy=0) == 4
