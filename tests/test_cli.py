"""The ``actsparse`` command: the default classic run, gradcheck, config files and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actsparse.cli import main

FAST = ["--samples", "2000", "--iterations", "30", "--no-progress"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # small models; see conftest.py
    return subprocess.run([sys.executable, "-m", "actsparse", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_default_run_reproduces_the_classic_exercise(tmp_path, capsys):
    """The acceptance run: the defaults are the CS294A exercise (400 L-BFGS iterations)."""
    assert main(["train", "--out", str(tmp_path), "--no-progress"]) == 0
    run = tmp_path / "classic"
    for name in ("config.json", "model.safetensors", "metrics.json", "metrics.jsonl",
                 "loss.png", "filters.png", "reconstructions.png", "rho_hat.png"):
        assert (run / name).is_file(), name
    m = json.loads((run / "metrics.json").read_text())
    print(f"classic run: mean activation {m['mean_activation']:.5f} (target 0.01), FVU {m['fvu']:.3f}, "
          f"{m['seconds']:.1f} s training, {m['total_seconds']:.1f} s in all")
    assert m["steps"] == 400 and m["target"] == 0.01
    assert abs(m["mean_activation"] - 0.01) <= 0.15 * 0.01
    assert m["fvu"] < 0.8  # it reconstructs, it does not just predict the mean
    assert m["total_seconds"] < 60
    out = capsys.readouterr().out
    assert str(run) in out and "mean activation" in out
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 400 and json.loads(lines[-1])["step"] == 400


def test_same_seed_same_weights(tmp_path):
    for name in ("a", "b"):
        assert main(["train", *FAST, "--out", str(tmp_path), "--name", name, "--no-plots"]) == 0
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_reloads(tmp_path):
    from actsparse.train import load_checkpoint

    assert main(["train", *FAST, "--out", str(tmp_path), "--no-plots"]) == 0
    model, cfg = load_checkpoint(tmp_path / "classic")
    assert cfg.hidden == 25 and model.W_enc.shape == (25, 64)


def test_minibatch_topk_on_a_npy_file(tmp_path):
    x = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    args = ["train", "--data", str(tmp_path / "x.npy"), "--activation", "topk", "--k", "4", "--hidden", "32",
            "--decoder", "linear", "--penalty", "none", "--optimizer", "adam", "--epochs", "2",
            "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    m = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    assert m["l0"] <= 4.0 + 1e-9


def test_config_file_toml_and_flags_win(tmp_path):
    (tmp_path / "c.toml").write_text('hidden = 9\niterations = 5\nsamples = 500\nname = "fromfile"\n')
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--iterations", "3", "--out", str(tmp_path),
                 "--no-progress", "--no-plots"]) == 0
    cfg = json.loads((tmp_path / "fromfile" / "config.json").read_text())
    assert cfg["hidden"] == 9 and cfg["iterations"] == 3


def test_gradcheck_command():
    r = run_cli("gradcheck")
    assert r.returncode == 0, r.stderr
    err = float(r.stdout.split("relative difference ")[1].split()[0])
    assert err < 1e-9 and "OK" in r.stdout


def _one_clean_line(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert needle in r.stderr, r.stderr


@pytest.mark.parametrize("args,needle", [
    (["train", "--data", "/nonexistent/x.npy"], "not found"),
    (["train", "--penalty", "kll"], "unknown --penalty"),
    (["train", "--activation", "topk", "--k", "50"], "larger than --hidden"),
    (["train", "--activation", "topk"], "needs --k"),
    (["train", "--hidden", "0"], "positive integer"),
    (["train", "--config", "/nonexistent.toml"], "config file not found"),
    (["trian"], "did you mean 'train'"),
    (["train", "--decode", "sparse"], "--decode sparse needs --activation topk"),
    (["train", "--threads", "0"], "--threads must be a positive integer"),
])
def test_bad_input_one_line_nonzero_exit(args, needle):
    _one_clean_line(run_cli(*args), needle)


def test_bad_files_one_line(tmp_path):
    bad = np.ones((20, 4))
    bad[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    _one_clean_line(run_cli("train", "--data", str(tmp_path / "nan.npy"), "--out", str(tmp_path)), "NaN")
    np.save(tmp_path / "3d.npy", np.ones((2, 3, 4)))
    _one_clean_line(run_cli("train", "--data", str(tmp_path / "3d.npy"), "--out", str(tmp_path)), "2-D array")
    (tmp_path / "broken.toml").write_text("hidden = = 3\n")
    _one_clean_line(run_cli("train", "--config", str(tmp_path / "broken.toml")), "cannot parse")
    (tmp_path / "unknown.yaml").write_text("hiden: 3\n")
    _one_clean_line(run_cli("train", "--config", str(tmp_path / "unknown.yaml")), "unknown setting(s) hiden")


def test_unwritable_output_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = run_cli("train", "--out", str(blocker), "--no-progress")
    _one_clean_line(r, "cannot write to the output folder")
    assert "data:" not in r.stdout  # nothing was loaded or trained


def test_help_reads_well():
    r = run_cli("train", "--help")
    assert r.returncode == 0
    for flag in ("--data", "--penalty", "--target", "--weight", "--optimizer", "--iterations", "--epochs",
                 "--batch-size", "--config"):
        assert flag in r.stdout
    assert Path  # keep import used


def test_eval_and_plot_a_run(tmp_path):
    from actsparse.data import load_data
    from actsparse.train import evaluate, load_checkpoint

    assert main(["train", *FAST, "--out", str(tmp_path), "--no-plots"]) == 0
    run = tmp_path / "classic"
    r = run_cli("eval", str(run))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    model, cfg = load_checkpoint(run)
    ref = evaluate(model, load_data(cfg).x)  # the same data, rebuilt independently of the command
    assert got["fvu"] == pytest.approx(ref["fvu"], rel=1e-6)
    assert got["mean_activation"] == pytest.approx(ref["mean_activation"], rel=1e-6)
    r = run_cli("plot", str(run))
    assert r.returncode == 0, r.stderr
    for name in ("loss.png", "filters.png", "reconstructions.png", "rho_hat.png"):
        assert (run / name).stat().st_size > 1000
    _one_clean_line(run_cli("eval", str(tmp_path / "missing")), "config.json is missing")


@pytest.mark.parametrize("extra", [
    ["--iterations", "30"],
    ["--optimizer", "adam", "--epochs", "3", "--batch-size", "128", "--decoder", "linear", "--lr", "0.01"],
])
def test_resume_after_interruption_is_bit_identical(tmp_path, extra):
    """A run interrupted after its checkpoint at step 14, then resumed with --resume, reaches the same
    weights and the same logged losses as an uninterrupted run with the same seed."""
    from actsparse.config import TrainConfig
    from actsparse.data import load_data
    from actsparse.train import train

    base = ["train", "--samples", "1000", "--no-progress", "--no-plots", "--checkpoint-every", "7", "--threads", "1",
            *extra]  # one thread: the two runs compared must sum in the same order, whatever the machine's load
    assert main([*base, "--out", str(tmp_path), "--name", "full"]) == 0

    # the interrupted run: the library's loop, stopped by an exception after step 14 was saved
    cli_cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    cli_cfg.pop("d_in")
    cfg = TrainConfig(**(cli_cfg | {"name": "cut"}))
    (tmp_path / "cut").mkdir()

    def interrupt(rec):
        if rec["step"] > 14:
            raise KeyboardInterrupt

    before = torch.get_num_threads()
    torch.set_num_threads(cli_cfg["threads"])  # the count the command chose and recorded: the same sums
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, load_data(cfg).x, run_dir=tmp_path / "cut", on_step=interrupt)
    finally:
        torch.set_num_threads(before)
    assert main([*base, "--out", str(tmp_path), "--name", "cut", "--resume"]) == 0
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), {k: float((a[k] - b[k]).abs().max()) for k in a}
    full_log = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    cut_log = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in full_log] == [(r["step"], r["loss"]) for r in cut_log]


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    args = ["train", "--samples", "500", "--iterations", "8", "--checkpoint-every", "4", "--no-progress",
            "--no-plots", "--out", str(tmp_path)]
    assert main(args) == 0
    _one_clean_line(run_cli(*args, "--resume", "--hidden", "30"), "hidden (checkpoint 25, now 30)")
    _one_clean_line(run_cli("train", "--resume", "--out", str(tmp_path / "none")), "nothing to resume")


def test_stacked_model_with_greedy_pretraining(tmp_path):
    from actsparse.models import StackedAutoencoder
    from actsparse.train import load_checkpoint

    x = np.random.default_rng(0).uniform(size=(600, 20)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    args = ["train", "--data", str(tmp_path / "x.npy"), "--model", "stacked", "--sizes", "80", "40", "4",
            "--activation", "relu", "--decoder", "linear", "--penalty", "l1", "--weight", "1e-3",
            "--optimizer", "adam", "--epochs", "2", "--pretrain", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    model, cfg = load_checkpoint(tmp_path / "classic")
    assert isinstance(model, StackedAutoencoder) and model.sizes == [20, 80, 40, 4]
    assert cfg.sizes == (80, 40, 4)
    _one_clean_line(run_cli("train", "--model", "stacked", "--out", str(tmp_path)), "needs --sizes")


def test_threads_flag_sets_torchs_thread_count(tmp_path):
    before = torch.get_num_threads()
    try:
        assert main(["train", *FAST, "--out", str(tmp_path), "--no-plots", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
        assert json.loads((tmp_path / "classic" / "config.json").read_text())["threads"] == 2
    finally:
        torch.set_num_threads(before)
