"""Faults a long run must survive: kill -9, killed and failed checkpoint writes, damaged
checkpoints, a full disk, and NaN/Inf blow-ups. Each test counts what it tried."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actsparse import checkpoint as ck
from actsparse.cli import main
from actsparse.config import TrainConfig
from actsparse.models import ForwardOutput, SparseAutoencoder
from actsparse.train import NonFiniteError, TrainingWarning, train

ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "actsparse", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, **kw)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


# --- kill -9 -------------------------------------------------------------------------------------

# long enough (30 epochs of 2,700 / 64: 1,290 Adam steps) for the kill to land mid-run; checkpoints every 50 steps
KILL_ARGS = ["train", "--data", "synthetic", "--samples", "3000", "--hidden", "64", "--activation", "relu",
             "--decoder", "linear", "--penalty", "l1", "--weight", "1e-3", "--optimizer", "adam", "--lr", "3e-3",
             "--epochs", "30", "--batch-size", "64", "--checkpoint-every", "50", "--no-plots", "--no-progress",
             "--threads", "1"]


def test_kill_9_then_resume_reaches_the_same_weights(tmp_path):
    """SIGKILL an `actsparse train` run after its second checkpoint, resume it with --resume: the
    final weights and the logged losses are bit-identical to an uninterrupted run (CPU, one thread,
    same seed: every operation is deterministic, and the checkpoint holds the optimiser, the RNG
    states and the position in the epoch)."""
    full = _cli(*KILL_ARGS, "--out", str(tmp_path), "--name", "full")
    cut = _cli(*KILL_ARGS, "--out", str(tmp_path), "--name", "cut")
    deadline = time.monotonic() + 120
    step = 0
    while time.monotonic() < deadline and cut.poll() is None:
        found = ck.load_latest(tmp_path / "cut") if (tmp_path / "cut" / ck.CHECKPOINT).exists() else None
        step = found[0]["step"] if found else 0
        if step >= 100:
            break
        time.sleep(0.02)
    os.kill(cut.pid, signal.SIGKILL)
    cut.wait()
    assert cut.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved = ck.load_latest(tmp_path / "cut")[0]["step"]
    total = 30 * math.ceil(2700 / 64)
    assert 100 <= saved < total, saved  # mid-run
    assert full.wait(timeout=300) == 0, full.stderr.read()

    resumed = _cli(*KILL_ARGS, "--out", str(tmp_path), "--name", "cut", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), {k: float((a[k] - b[k]).abs().max()) for k in a}
    logs = [[json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("full", "cut")]
    assert [(r["step"], r["loss"]) for r in logs[0]] == [(r["step"], r["loss"]) for r in logs[1]]
    print(f"kill -9 at checkpoint step {saved} of {total}, resumed: weights bit-identical")


WRITER = textwrap.dedent("""
    import sys, torch
    from actsparse.checkpoint import write_checkpoint
    run = sys.argv[1]
    step = 0
    while True:
        step += 1
        # 16 MiB per checkpoint, every value equal to the step: a torn write would show
        write_checkpoint(run, {"step": step, "w": torch.full((4 * 2**20,), float(step))})
        print(step, flush=True)
""")


def test_kill_9_during_checkpoint_writes_never_leaves_a_half_file(tmp_path):
    """A process writes 16 MiB checkpoints in a loop and is SIGKILLed at random moments (at least
    four times, and until one kill has landed mid-write, at most 24): each time the loader finds a
    complete checkpoint whose contents match its step."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    run = tmp_path / "run"
    run.mkdir()
    gen = torch.Generator().manual_seed(0)
    survived, torn, last = 0, 0, 0
    kills = 0
    while kills < 24 and (kills < 4 or torn == 0):  # a busy machine can shift where the kills land
        kills += 1
        p = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True, env=ENV)
        p.stdout.readline()  # at least one checkpoint of this process is complete
        time.sleep(float(torch.rand((), generator=gen)) * 0.3)
        p.kill()
        p.wait()
        torn += (run / "checkpoint.pt.tmp").exists()  # the kill landed mid-write
        payload, path = ck.load_latest(run)
        assert payload["w"].shape == (4 * 2**20,)
        assert torch.all(payload["w"] == float(payload["step"]))
        survived += 1
        last = payload["step"]
    print(f"checkpoint writes killed {kills} times, {torn} of them mid-write: {survived} complete checkpoints "
          f"found (last step {last})")
    assert survived == kills and torn >= 1


# --- failed writes, damaged files, a full disk ---------------------------------------------------

def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ck.write_checkpoint(tmp_path, {"step": 1})
    ck.write_checkpoint(tmp_path, {"step": 2})

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.os, "fsync", full_disk)
    with pytest.raises(ck.CheckpointError, match=r"checkpoint\.pt: the disk is full; the last good checkpoint"):
        ck.write_checkpoint(tmp_path, {"step": 3})
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    assert ck.load_latest(tmp_path)[0]["step"] == 2


def test_a_full_disk_mid_run_stops_with_the_file_named(tmp_path, monkeypatch):
    cfg = TrainConfig(samples=300, iterations=12, checkpoint_every=4, plots=False, progress=False)
    x = torch.rand(300, 64)
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync_fails_late(fd):
        calls["n"] += 1
        if calls["n"] > 6:  # the first checkpoint (3 files) and part of the second go through
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(ck.os, "fsync", fsync_fails_late)
    with pytest.raises(ck.CheckpointError, match="disk is full"):
        train(cfg, x, run_dir=tmp_path)
    monkeypatch.undo()
    payload, _ = ck.load_latest(tmp_path)
    assert payload["step"] in (4, 8)
    assert not list(tmp_path.glob("*.tmp"))


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        data[len(data) - 100] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"PK\x03\x04 not a checkpoint")


@pytest.mark.parametrize("how", ["truncate", "flip", "empty", "garbage"])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_used(tmp_path, how):
    ck.write_checkpoint(tmp_path, {"step": 1, "w": torch.ones(1000)})
    ck.write_checkpoint(tmp_path, {"step": 2, "w": torch.ones(1000) * 2})
    _damage(tmp_path / ck.CHECKPOINT, how)
    with pytest.warns(ck.CheckpointWarning, match=r"checkpoint\.pt .*resuming from the previous checkpoint"):
        payload, path = ck.load_latest(tmp_path)
    assert path.name == ck.PREVIOUS and payload["step"] == 1
    _damage(tmp_path / ck.PREVIOUS, how)
    with pytest.raises(ck.CheckpointError, match=r"no usable checkpoint: .*checkpoint\.pt .*checkpoint\.prev\.pt"):
        ck.load_latest(tmp_path)


def test_resume_from_a_corrupt_checkpoint_falls_back_and_still_matches(tmp_path, capsys):
    """The CLI reports the damaged file in one warning line, resumes from checkpoint.prev.pt and
    still reaches the uninterrupted run's weights."""
    # --threads 1: two separate runs compared bit for bit must sum in the same order; the default
    # count depends on the machine's load when each run starts
    args = ["train", "--samples", "600", "--iterations", "24", "--checkpoint-every", "8", "--no-progress",
            "--no-plots", "--out", str(tmp_path), "--threads", "1"]
    assert main([*args, "--name", "full"]) == 0
    assert main([*args, "--name", "cut", "--iterations", "16"]) == 0  # checkpoints at 8 and 16
    _damage(tmp_path / "cut" / ck.CHECKPOINT, "flip")
    capsys.readouterr()
    assert main([*args, "--name", "cut", "--resume"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "is corrupt" in warning[0] and "checkpoint.prev.pt (step 8)" in warning[0], err
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_model_file_is_named(tmp_path):
    from actsparse.train import load_checkpoint

    assert main(["train", "--samples", "300", "--iterations", "3", "--no-progress", "--no-plots",
                 "--out", str(tmp_path)]) == 0
    _damage(tmp_path / "classic" / "model.safetensors", "truncate")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_checkpoint(tmp_path / "classic")


def test_too_little_disk_space_fails_before_training(tmp_path, monkeypatch, capsys):
    import shutil as sh

    import actsparse.run_files as T  # the free-space check lives with the run files

    real = sh.disk_usage
    monkeypatch.setattr(T.shutil, "disk_usage", lambda p: real(p)._replace(free=20 * 2**20))
    cfg = TrainConfig(samples=300, hidden=2000, optimizer="adam", decoder="linear", epochs=1, plots=False,
                      progress=False)  # ~6 MiB of weights: the checkpoints need more than 20 MiB
    with pytest.raises(OSError, match=r"only 20\.0 MiB free .*checkpoints need about"):
        train(cfg, torch.rand(300, 64), run_dir=tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / ck.CHECKPOINT).exists()
    assert main(["train", "--samples", "300", "--hidden", "2000", "--optimizer", "adam", "--decoder", "linear",
                 "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MiB free" in err[0], err


# --- NaN / Inf -----------------------------------------------------------------------------------

class PoisonedSAE(SparseAutoencoder):
    """An SAE whose loss is NaN on the training calls listed in ``poison`` (1-based): a blow-up at a
    known step. With ``until_rollback`` every call from ``min(poison)`` on is NaN until the trainer
    rolls the weights back (``load_state_dict``)."""

    def __init__(self, *a, poison: set[int], until_rollback: bool = False, **kw):
        super().__init__(*a, **kw)
        self.poison, self.calls, self.until_rollback, self.rolled_back = poison, 0, until_rollback, False

    def load_state_dict(self, *a, **kw):
        self.rolled_back = True
        return super().load_state_dict(*a, **kw)

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            self.calls += 1
            bad = self.calls in self.poison or (
                self.until_rollback and not self.rolled_back and self.calls >= min(self.poison))
            if bad:
                return ForwardOutput(*out[:3], out.sparsity_loss * float("nan"), *out[4:])
        return out


def _poisoned(poison: set[int]) -> PoisonedSAE:
    torch.manual_seed(0)
    return PoisonedSAE(16, 32, "relu", decoder="linear", penalty=None, poison=poison)


MB = dict(optimizer="adam", epochs=4, batch_size=32, lr=1e-2, decoder="linear", activation="relu", hidden=32,
          penalty=None, weight_decay=0.0, checkpoint_every=5, plots=False, progress=False)


def test_nan_stops_at_its_step_with_the_terms_and_keeps_the_last_good_checkpoint(tmp_path):
    """The loss turns NaN at step 23 (not a logged step: those are every 10): the error names step 23
    and the NaN penalty, and checkpoint.pt is step 20's, whose weights are finite."""
    cfg = TrainConfig(**MB)
    x = torch.randn(320, 16)
    with pytest.raises(NonFiniteError, match=r"non-finite at step 23 \(loss nan, .*penalty nan") as err:
        train(cfg, x, run_dir=tmp_path, model=_poisoned({23}))
    assert err.value.step == 23 and err.value.terms["reconstruction"] > 0
    assert "the last good checkpoint" in str(err.value) and "--on-nan rollback" in str(err.value)
    payload, _ = ck.load_latest(tmp_path)
    assert payload["step"] == 20
    assert all(torch.isfinite(v).all() for v in payload["model"].values())
    assert all(r["step"] <= 20 for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()))


def test_weights_that_blow_up_are_never_written(tmp_path):
    """SGD with a huge learning rate: the loss overflows; the run stops and what is on disk is finite."""
    cfg = TrainConfig(**(MB | {"optimizer": "sgd", "lr": 1e4}))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 16, generator=g) * 10
    with pytest.raises(NonFiniteError, match="non-finite at step"):
        train(cfg, x, run_dir=tmp_path)
    found = ck.load_latest(tmp_path)
    if found is not None:
        assert all(torch.isfinite(v).all() for v in found[0]["model"].values())


def test_nan_step_matches_a_per_step_check():
    """The guard reports the first non-finite step that a naive per-step float(loss) check finds."""
    for poison in ({7}, {1}, {10}, {31, 32}):
        with pytest.raises(NonFiniteError) as err:
            train(TrainConfig(**MB), torch.randn(320, 16), model=_poisoned(poison))
        naive = _poisoned(poison)
        first = next(i for i in range(1, 100) if not torch.isfinite(naive(torch.randn(4, 16)).loss))
        assert err.value.step == first == min(poison)


def test_rollback_lowers_the_learning_rate_and_goes_on(tmp_path):
    cfg = TrainConfig(**(MB | {"on_nan": "rollback"}))
    x = torch.randn(320, 16)
    warning = r"non-finite at step 23.*rolling back to step 20 with learning rate 0\.005"
    with pytest.warns(TrainingWarning, match=warning):
        res = train(cfg, x, run_dir=tmp_path, model=_poisoned({23}))
    assert res.metrics["rollbacks"] == 1 and res.metrics["steps"] == 36  # 4 epochs of 288 / 32
    steps = [r["step"] for r in res.history]
    assert steps == sorted(set(steps)) == [10, 20, 30, 36]  # no step logged twice
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == steps
    assert ck.load_latest(tmp_path)[0]["lr_scale"] == 0.5
    assert all(torch.isfinite(p).all() for p in res.model.parameters())

    # too many blow-ups: it gives up with the count; a rollback before the first checkpoint goes to step 0
    with pytest.raises(NonFiniteError, match=r"after 2 rollbacks"):
        train(TrainConfig(**(MB | {"on_nan": "rollback", "max_rollbacks": 2})), x,
              model=_poisoned(set(range(3, 10**6))))


def test_lbfgs_backtracks_from_a_nan_trial_point():
    """One NaN evaluation inside the line search: the search starts again from a shorter step, no error."""
    torch.manual_seed(0)
    model = PoisonedSAE(16, 8, "sigmoid", decoder="linear", penalty=None, poison={12})
    res = train(TrainConfig(iterations=20, plots=False, progress=False, decoder="linear"), torch.rand(200, 16),
                model=model)
    assert res.metrics["steps"] == 20 and res.metrics["rollbacks"] == 0
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_rollback_with_lbfgs_restarts_the_curvature_pairs():
    torch.manual_seed(0)
    model = PoisonedSAE(16, 8, "sigmoid", decoder="linear", penalty=None, poison={12}, until_rollback=True)
    cfg = TrainConfig(iterations=20, checkpoint_every=5, on_nan="rollback", plots=False, progress=False,
                      decoder="linear")
    with pytest.warns(TrainingWarning, match="non-finite at step 8 .*rolling back to step 5 with L-BFGS's curvature"):
        res = train(cfg, torch.rand(200, 16), model=model)
    assert res.metrics["rollbacks"] == 1 and res.metrics["steps"] == 20
    assert [r["step"] for r in res.history] == list(range(1, 21))


def test_cli_nan_is_one_line_naming_the_step(tmp_path):
    r = _cli("train", "--data", "synthetic", "--samples", "400", "--hidden", "32", "--activation", "relu",
             "--decoder", "linear", "--penalty", "none", "--optimizer", "sgd", "--lr", "1e6", "--epochs", "5",
             "--clip-grad", "0",  # the SAE recipe's clipping at 1 would keep this run finite
             "--out", str(tmp_path), "--no-progress", "--no-plots")
    out, err = r.communicate(timeout=120)
    assert r.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "non-finite at step" in lines[0], err


def test_a_streamed_run_resumed_mid_epoch_is_bit_identical(tmp_path):
    """The same for training streamed from a shard store: the resumed run redraws the epoch's index
    stream from (seed, epoch), skips the batches already done without reading them, and ends on
    the uninterrupted run's weights."""
    import dataclasses

    from actsparse.data.shards import ShardStore, ShardWriter

    g = torch.Generator().manual_seed(0)
    with ShardWriter(tmp_path / "store", d=16, shard_size=300) as w:
        w.write(torch.randn(2000, 16, generator=g))
    store = ShardStore(tmp_path / "store")
    cfg = TrainConfig(data=f"shards:{tmp_path / 'store'}", hidden=32, activation="relu", decoder="linear",
                      penalty="l1", weight=1e-3, optimizer="adam", lr=3e-3, epochs=2, batch_size=64,
                      checkpoint_every=7, plots=False, progress=False, device="cpu")
    for name in ("full", "cut"):
        (tmp_path / name).mkdir()
    train(cfg, store, run_dir=tmp_path / "full")

    def interrupt(rec):
        if rec["step"] > 40:  # logged at 50, after the checkpoint at 49: mid second epoch (31 steps each)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, store, run_dir=tmp_path / "cut", on_step=interrupt)
    assert ck.load_latest(tmp_path / "cut")[0]["step"] == 49
    train(dataclasses.replace(cfg, resume=True), store, run_dir=tmp_path / "cut")
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a), {k: float((a[k] - b[k]).abs().max()) for k in a}
