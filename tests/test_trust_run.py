"""Issue 12 ("Trust"): the run itself — run folders, resume, signals, L-BFGS resume, config files.

Every test here reproduced a defect found by an independent review before its fix (the comment
``failed before:`` says what happened); CLI cases run the real command in a subprocess and check the
exit code, that stderr is one line without a traceback, and that no other file changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actsparse.config import TrainConfig
from actsparse.train import train

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def _data(n: int = 300, d: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.8 + 0.1


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- item 10: L-BFGS resume is bit-identical ------------------------------------------------------

LBFGS_CFG = dict(hidden=5, optimizer="lbfgs", validation=0.0, plots=False, progress=False, weight_decay=1e-4)


@pytest.mark.parametrize("stop,every", [(37, 37), (143, 13), (120, 20)])
def test_lbfgs_resume_is_bit_identical(tmp_path, stop, every):
    """Stop at iteration ``stop`` (before the 100-pair history wraps, or after it), resume to 160:
    the weights equal an uninterrupted run's bit for bit. failed before: 143/13 differed by ~1e-2
    (the saved pairs were reordered oldest-first on load, so the sums over pairs ran in another
    order)."""
    x = _data()
    full = train(TrainConfig(iterations=160, **LBFGS_CFG), x)
    run = tmp_path / "run"
    run.mkdir()
    train(TrainConfig(iterations=stop, checkpoint_every=every, **LBFGS_CFG), x, run_dir=run)
    resumed = train(TrainConfig(iterations=160, checkpoint_every=every, resume=True, **LBFGS_CFG), x, run_dir=run)
    a, b = _state(full.model), _state(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
    assert [r["loss"] for r in full.history] == [r["loss"] for r in resumed.history]


def test_lbfgs_resume_after_a_skipped_pair_is_bit_identical(tmp_path):
    """A pair refused by the curvature condition (sᵀy ≤ 1e-10) leaves a gap between iterations and
    stored pairs; resume after it. Forced here by an optimiser whose threshold rejects every 7th pair."""
    from actsparse import lbfgs

    original = lbfgs.LBFGS._remember

    def remember(self, s, y):
        if self.iterations % 7 == 0:  # by iteration, so that the resumed run skips the same pairs
            return  # the curvature condition "fails": no pair stored
        original(self, s, y)

    x = _data()
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(lbfgs.LBFGS, "_remember", remember)
        full = train(TrainConfig(iterations=130, **LBFGS_CFG), x)
        run = tmp_path / "run"
        run.mkdir()
        train(TrainConfig(iterations=111, checkpoint_every=111, **LBFGS_CFG), x, run_dir=run)
        resumed = train(TrainConfig(iterations=130, resume=True, **LBFGS_CFG), x, run_dir=run)
    finally:
        mp.undo()
    a, b = _state(full.model), _state(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- the CLI: helpers ------------------------------------------------------------------------------

FAST = ["--samples", "300", "--iterations", "4", "--no-plots", "--no-progress", "--threads", "1"]


def _cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "actsparse", *args], cwd=cwd, capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def _one_line_error(r: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the SHA-256 of its bytes (to show that nothing changed)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


# --- item 1: --name stays inside --out -------------------------------------------------------------

def test_a_run_name_is_one_folder_inside_out(tmp_path):
    """failed before: ``--name ../../x`` and ``--name /abs/x`` wrote the run outside --out (also from
    a config file), over whatever run files were there."""
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "config.json").write_text("{}")
    (tmp_path / "bad.toml").write_text(f'name = "{tmp_path / "victim"}"\n')
    (tmp_path / "work").mkdir()
    before = _snapshot(tmp_path)
    for args in (["--name", "../victim"], ["--name", str(tmp_path / "victim")], ["--name", ".."],
                 ["--config", str(tmp_path / "bad.toml")]):
        _one_line_error(_cli("train", *FAST, "--out", "runs", *args, cwd=tmp_path / "work"), "--name",
                        "one folder name")
    assert _snapshot(tmp_path) == before  # nothing written anywhere, no empty runs/ folder either


# --- item 2: a finished run is never replaced ------------------------------------------------------

def test_a_second_run_never_replaces_the_first(tmp_path):
    """failed before: a second ``actsparse train`` (same default name) replaced model.safetensors,
    config.json and metrics, and left the first run's figures beside the new ones."""
    first = _cli("train", *FAST, "--out", str(tmp_path), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    old = _snapshot(tmp_path / "classic")
    second = _cli("train", *FAST, "--seed", "1", "--out", str(tmp_path), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "classic-2" in second.stdout and _snapshot(tmp_path / "classic") == old
    assert json.loads((tmp_path / "classic-2" / "config.json").read_text())["name"] == "classic-2"
    # an explicit name that holds a run: refused, nothing changed
    _one_line_error(_cli("train", *FAST, "--out", str(tmp_path), "--name", "classic", cwd=tmp_path),
                    "holds another run", "--overwrite")
    assert _snapshot(tmp_path / "classic") == old


def test_overwrite_removes_every_file_of_the_old_run_and_nothing_else(tmp_path):
    """--overwrite replaces a run: no figure of the old run survives (failed before: a synthetic
    run's report showed the old image run's filters.png), a file of the user's is kept."""
    run = tmp_path / "r"
    assert _cli("train", "--samples", "300", "--iterations", "3", "--no-progress", "--threads", "1",
                "--out", str(tmp_path), "--name", "r", cwd=tmp_path).returncode == 0
    assert (run / "filters.png").is_file()
    (run / "notes.txt").write_text("mine")
    r = _cli("train", "--data", "synthetic", "--samples", "300", "--hidden", "8", "--activation", "relu",
             "--decoder", "linear", "--penalty", "l1", "--optimizer", "adam", "--epochs", "1", "--no-progress",
             "--threads", "1", "--out", str(tmp_path), "--name", "r", "--overwrite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (run / "filters.png").exists() and not (run / "reconstructions.png").exists()
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "config.json").read_text())["data"] == "synthetic"
    _one_line_error(_cli("train", "--out", str(tmp_path), "--name", "r", "--overwrite", "--resume", cwd=tmp_path),
                    "choose one")


# --- items 5-7: resume ------------------------------------------------------------------------------

def test_resume_without_config_json_uses_the_checkpoints_config(tmp_path):
    """A kill between the checkpoint.pt rename and the config.json write. failed before: "nothing
    to resume: config.json does not exist", although checkpoint.pt embeds the config."""
    assert _cli("train", *FAST, "--out", str(tmp_path), "--name", "r", cwd=tmp_path).returncode == 0
    (tmp_path / "r" / "config.json").unlink()
    r = _cli("train", "--resume", "--iterations", "6", "--no-progress", "--threads", "1", "--out", str(tmp_path),
             "--name", "r", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "for 6 steps" in r.stdout
    assert json.loads((tmp_path / "r" / "config.json").read_text())["iterations"] == 6


def test_a_checkpoint_of_another_run_is_refused_naming_the_settings(tmp_path):
    """failed before: a checkpoint of a run with the same shapes but another seed and lr was resumed
    without a word. Also: resuming with another optimiser (failed before: "param_groups")."""
    base = ["--data", "synthetic", "--samples", "300", "--hidden", "8", "--activation", "relu", "--decoder",
            "linear", "--penalty", "l1", "--optimizer", "adam", "--epochs", "1", "--no-progress", "--threads", "1",
            "--out", str(tmp_path)]
    assert _cli("train", *base, "--name", "a", cwd=tmp_path).returncode == 0
    assert _cli("train", *base, "--name", "b", "--seed", "7", "--lr", "0.01", cwd=tmp_path).returncode == 0
    (tmp_path / "a" / "checkpoint.pt").write_bytes((tmp_path / "b" / "checkpoint.pt").read_bytes())
    (tmp_path / "a" / "checkpoint.prev.pt").unlink(missing_ok=True)
    before = _snapshot(tmp_path)
    line = _one_line_error(_cli("train", "--resume", "--epochs", "2", "--out", str(tmp_path), "--name", "a",
                                "--no-progress", cwd=tmp_path), "seed (checkpoint 7, now 0)", "lr (checkpoint 0.01")
    assert "other settings" in line
    _one_line_error(_cli("train", "--resume", "--epochs", "2", "--optimizer", "sgd", "--out", str(tmp_path),
                         "--name", "b", "--no-progress", cwd=tmp_path), "optimizer (checkpoint 'adam', now 'sgd')")
    assert _snapshot(tmp_path) == before


def test_config_file_on_resume_is_applied_or_refused_never_ignored(tmp_path):
    """failed before: ``--config FILE --resume`` ignored FILE (``iterations = 60`` left the run at 20)."""
    assert _cli("train", *FAST, "--out", str(tmp_path), "--name", "r", cwd=tmp_path).returncode == 0
    (tmp_path / "more.toml").write_text("iterations = 9\n")
    r = _cli("train", "--config", str(tmp_path / "more.toml"), "--resume", "--out", str(tmp_path), "--name", "r",
             "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "for 9 steps" in r.stdout
    (tmp_path / "other.toml").write_text("hidden = 30\niterations = 12\n")
    _one_line_error(_cli("train", "--config", str(tmp_path / "other.toml"), "--resume", "--out", str(tmp_path),
                         "--name", "r", "--no-progress", cwd=tmp_path), "hidden (checkpoint 25, now 30)")


def test_broken_run_configs_are_named(tmp_path):
    """failed before: a malformed config.json gave a JSON error without the file name; one without
    d_in said "d_in"; a list said "'str' object cannot be interpreted as an integer"."""
    assert _cli("train", *FAST, "--out", str(tmp_path), "--name", "r", cwd=tmp_path).returncode == 0
    cfg = tmp_path / "r" / "config.json"
    good = json.loads(cfg.read_text())
    cases = {"{": "is not valid JSON", json.dumps({k: v for k, v in good.items() if k != "d_in"}): "no valid 'd_in'",
             json.dumps(["a", "b"]): "must hold a JSON object"}
    for i, (text, needle) in enumerate(cases.items()):
        cfg.write_text(text)
        resume = ["train", "--resume", "--out", str(tmp_path), "--name", "r"]
        _one_line_error(_cli(*(resume if i % 2 == 0 else ["eval", str(tmp_path / "r")]), cwd=tmp_path), str(cfg),
                        needle)


# --- messages and guards ----------------------------------------------------------------------------

def test_config_file_errors_are_one_line(tmp_path):
    """failed before: a huge YAML seed gave "Overflow when unpacking long long"; malformed YAML
    gave 8 lines."""
    (tmp_path / "seed.yaml").write_text("seed: 123456789012345678901234567890\n")
    _one_line_error(_cli("train", "--config", str(tmp_path / "seed.yaml"), cwd=tmp_path), "--seed", "2**63")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\nb: {\n")
    _one_line_error(_cli("train", "--config", str(tmp_path / "bad.yaml"), cwd=tmp_path), "cannot parse")
    assert not (tmp_path / "runs").exists()


def test_training_guards_with_a_reason(tmp_path):
    """--validation 0.999 (failed before: "x is empty (shape (0, 16))"); --whiten zca with the sigmoid
    decoder (failed before: FVU 1.000 and exit 0); --auxk with ReLU units (failed before: ignored).
    No run folder is left behind by a run that failed before writing anything."""
    _one_line_error(_cli("train", *FAST, "--validation", "0.999", "--out", "runs", cwd=tmp_path),
                    "--validation 0.999", "leaves 0")
    _one_line_error(_cli("train", *FAST, "--whiten", "zca", "--out", "runs", cwd=tmp_path),
                    "--decoder sigmoid", "--decoder linear")
    _one_line_error(_cli("train", *FAST, "--activation", "relu", "--auxk", "4", "--out", "runs", cwd=tmp_path),
                    "--auxk", "topk")
    assert not (tmp_path / "runs").exists()


def test_a_run_that_learnt_nothing_says_so(tmp_path):
    """ReLU units with the Bernoulli KL on digits: FVU ≈ 1. failed before: exit 0 and no word."""
    r = _cli("train", "--data", "digits", "--activation", "relu", "--decoder", "linear", "--iterations", "5",
             "--no-plots", "--no-progress", "--threads", "1", "--out", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    fvu = json.loads((tmp_path / "classic" / "metrics.json").read_text())["fvu"]
    if fvu >= 0.99:
        assert "warning: FVU" in r.stdout and "poisson_kl" in r.stdout, r.stdout
    else:
        assert "warning: FVU" not in r.stdout


def test_fvu_of_data_without_variance_is_undefined(tmp_path):
    """failed before: FVU printed as 7e307."""
    import numpy as np

    from actsparse import metrics as M

    x = torch.full((50, 4), 0.5, dtype=torch.float64)
    assert torch.isnan(M.fvu(x, x * 0.9))
    np.save(tmp_path / "flat.npy", np.full((300, 16), 0.5, dtype=np.float32))
    r = _cli("train", "--data", str(tmp_path / "flat.npy"), "--hidden", "4", "--iterations", "3", "--no-plots",
             "--no-progress", "--threads", "1", "--out", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "FVU undefined (the data have no variance)" in r.stdout, r.stdout


def test_plot_skips_a_torn_last_line(tmp_path):
    """failed before: ``actsparse plot`` failed on the half line a kill leaves in metrics.jsonl,
    which train itself skips."""
    assert _cli("train", *FAST, "--out", str(tmp_path), "--name", "r", cwd=tmp_path).returncode == 0
    log = tmp_path / "r" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 5, "lo')
    r = _cli("plot", str(tmp_path / "r"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r" / "loss.png").is_file()


def test_nan_weights_are_named_before_training():
    """failed before: NaN in the weights was blamed on the activations and the learning rate."""
    from actsparse.build import build_model

    cfg = TrainConfig(hidden=4, iterations=2, validation=0.0, plots=False, progress=False)
    model = build_model(cfg, 16).double()
    with torch.no_grad():
        model.W_enc[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"weights of the model given contain NaN/Inf before training \(W_enc\)"):
        train(cfg, _data(), model=model)


# --- item 4: SIGTERM, SIGHUP and an early Ctrl-C ---------------------------------------------------

SIGNAL_ARGS = ["train", "--data", "synthetic", "--samples", "2000", "--hidden", "32", "--activation", "relu",
               "--decoder", "linear", "--penalty", "l1", "--weight", "1e-3", "--optimizer", "adam", "--lr", "3e-3",
               "--epochs", "25", "--batch-size", "64", "--checkpoint-every", "1000", "--no-plots", "--no-progress",
               "--threads", "1"]


def _default_signals() -> None:
    """In the child: the signals' default actions. A parent that ignores SIGINT (a job started with
    ``&`` by a non-interactive shell) passes that on, and a program that inherits an ignored signal
    keeps ignoring it, as it should; the test is about a program that receives them."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _popen(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "actsparse", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=_default_signals)


def _wait_for_steps(proc: subprocess.Popen, log: Path, steps: int, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and log.read_text().count("\n") >= steps // 10:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {steps}: {proc.poll()}")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_signal_checkpoints_the_step_reached_and_resume_is_bit_identical(tmp_path, sig):
    """failed before: SIGTERM and SIGHUP ended the run with no checkpoint and no message (SIGINT was
    handled). Now: one line, exit 128 + signal, a checkpoint at the step reached (not the last
    scheduled one: checkpoints are every 1,000 steps here), and --resume ends bit-identical to an
    uninterrupted run."""
    import signal

    from actsparse import checkpoint as ck

    signum = getattr(signal, sig)
    proc = _popen(*SIGNAL_ARGS, "--out", str(tmp_path), "--name", "cut", cwd=tmp_path)
    _wait_for_steps(proc, tmp_path / "cut" / "metrics.jsonl", 50)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = _one_line_error(r, f"stopped by {sig} after step", "--resume", code=128 + signum)
    step = int(line.split("after step ")[1].split(";")[0])
    payload, _ = ck.load_latest(tmp_path / "cut")
    assert payload["step"] == step and 50 <= step < 775  # the step reached, not a scheduled one (only the last)
    resumed = _cli("train", "--resume", "--out", str(tmp_path), "--name", "cut", "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    full = _cli(*SIGNAL_ARGS, "--out", str(tmp_path), "--name", "full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(s) for s in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(s) for s in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == [r["loss"] for r in reference]


@pytest.mark.parametrize("sig,delay", [("SIGINT", 0.3), ("SIGTERM", 0.3), ("SIGTERM", 1.5)])
def test_a_signal_before_training_is_one_line(tmp_path, sig, delay):
    """failed before: Ctrl-C in the first 0.6 s of ``train`` printed a traceback (torch's import)."""
    import signal
    import time

    proc = _popen(*SIGNAL_ARGS, "--out", str(tmp_path / "runs"), cwd=tmp_path)
    time.sleep(delay)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=120)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    _one_line_error(r, f"stopped by {sig}", code=128 + getattr(signal, sig))
    run = tmp_path / "runs" / "classic"
    assert not run.exists() or any(run.iterdir())  # no empty run folder left behind


def test_nan_weights_in_a_run_folder_are_named(tmp_path):
    """A run's model.safetensors with NaN weights (a valid digest: written by another tool) is
    named by ``load_checkpoint`` (``eval``, ``plot``, ``report``) instead of giving NaN metrics."""
    from safetensors.torch import load_file

    from actsparse.run_files import load_checkpoint
    from actsparse.weights import save_weights

    run = tmp_path / "r"
    run.mkdir()
    cfg = TrainConfig(hidden=4, iterations=2, validation=0.0, plots=False, progress=False)
    train(cfg, _data(), run_dir=run)
    tensors = load_file(str(run / "model.safetensors"))
    tensors["b_dec"][0] = float("nan")
    save_weights(run / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=r"model\.safetensors holds non-finite weights \(NaN/Inf in 'b_dec'\)"):
        load_checkpoint(run)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_a_signal_inside_train_checkpoints_and_resumes_bit_identically(tmp_path, optimizer):
    """From Python: SIGTERM while ``train`` runs (sent by the logging callback at step 30) stops it
    after that step with ``RunInterrupted`` and a checkpoint there; resuming gives the weights of an
    uninterrupted run bit for bit (L-BFGS: its pairs and line-search state; Adam: the epoch position)."""
    import signal

    from actsparse import checkpoint as ck
    from actsparse.interrupt import RunInterrupted

    x = _data(400)
    kw = dict(hidden=5, optimizer=optimizer, validation=0.0, plots=False, progress=False, checkpoint_every=1000,
              iterations=60, epochs=6, batch_size=32, decoder="sigmoid")
    full = train(TrainConfig(**kw), x)

    def send(rec):
        if rec["step"] == 30:
            os.kill(os.getpid(), signal.SIGTERM)

    run = tmp_path / "run"
    run.mkdir()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as stopped:
        train(TrainConfig(**kw), x, run_dir=run, on_step=send)
    assert stopped.value.step == 30 and stopped.value.exit_code == 128 + signal.SIGTERM
    assert ck.load_latest(run)[0]["step"] == 30
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is given back
    resumed = train(TrainConfig(resume=True, **kw), x, run_dir=run)
    a, b = _state(full.model), _state(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_swallowed_by_a_library_is_still_acted_on(tmp_path, capsys):
    """A SIGTERM that arrived during an import whose library swallowed the exception (a bare
    ``except:``; seen under load: the command then ran to the end with exit 0). The signal is
    kept: the next run loop stops after its first step with a checkpoint, and a command that ends
    anyway exits 143 with the one line."""
    import signal

    from actsparse import checkpoint as ck
    from actsparse.cli import main
    from actsparse.interrupt import RunInterrupted, note_pending

    note_pending(signal.SIGTERM)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RunInterrupted) as stopped:
        train(TrainConfig(iterations=20, **LBFGS_CFG), _data(), run_dir=run)
    assert stopped.value.step == 1 and ck.load_latest(run)[0]["step"] == 1
    note_pending(signal.SIGTERM)
    assert main(["--version"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().endswith("stopped by SIGTERM; the last checkpoint written (if any) is kept")
    assert main(["--version"]) == 0  # handled once, then forgotten
