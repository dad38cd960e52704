"""Memory of data held in memory: ``train`` keeps one copy of the data, the results are unchanged.

The training and validation splits of an in-memory data set are rows of the data
(:class:`~actsparse.data.IndexedRows`: index tensors), gathered a batch or an evaluation chunk at
a time, not copies (a copied split held the data twice); a float32 ``.npy`` is memory-mapped.
These tests check that the minibatches, the evaluations and so the weights and every logged
number are the same, to the bit, as with copied splits, and that no copy is made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from actsparse import metrics as M
from actsparse.config import TrainConfig
from actsparse.data import IndexedRows, load_data
from actsparse.evaluation import evaluate, split_indices
from actsparse.train import (
    _epoch_batches,
    _Run,
    build_model,
    minibatch_optimizer,
    parameter_groups,
    planned_steps,
    train,
    train_step,
)

ADAM = dict(hidden=12, activation="relu", decoder="linear", penalty="l1", weight=1e-3, optimizer="adam", lr=3e-3,
            epochs=3, batch_size=64, validation=0.2, plots=False, progress=False, checkpoint_every=0, seed=3)


def _x(n: int = 1001, d: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _untimed(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "seconds"}


def test_indexed_rows_are_the_copied_rows():
    x = _x(300, 7)
    idx = torch.randperm(300, generator=torch.Generator().manual_seed(1))[:250]
    rows, copy = IndexedRows(x, idx), x[idx]
    assert rows.shape == copy.shape and len(rows) == 250 and rows.dtype == x.dtype and rows.dim() == 2
    assert rows.numel() == copy.numel()
    for a, b in zip(rows.split(64), copy.split(64), strict=True):  # 64, 64, 64, 58
        assert torch.equal(a, b) and a.is_contiguous()
    pick = torch.tensor([5, 0, 249])
    assert torch.equal(rows.gather(pick), copy[pick])
    assert torch.equal(rows[pick].tensor(), copy[pick]) and torch.equal(rows[10:20].tensor(), copy[10:20])
    assert rows.tensor().data_ptr() != x.data_ptr() and rows.x is x  # the view holds x itself, not a copy
    with pytest.raises(TypeError):
        IndexedRows(x, idx.int())
    with pytest.raises(TypeError):
        rows[3]


@pytest.mark.parametrize("n,chunk", [(250, 64), (40_000, 16384), (16384, 16384)])
def test_total_variance_and_evaluate_of_rows_equal_those_of_the_copy(n, chunk):
    """To the bit: the chunks are the same rows in the same order, so every sum runs in the same order."""
    x = _x(n + 17, 9) * 3 + 100  # a large mean: the two-pass form matters
    idx = torch.randperm(n + 17, generator=torch.Generator().manual_seed(2))[:n]
    rows, copy = IndexedRows(x, idx), x[idx]
    assert torch.equal(M.total_variance(rows, chunk), M.total_variance(copy, chunk))
    model = build_model(TrainConfig(**ADAM), 9)
    assert evaluate(model, rows, batch_size=100) == evaluate(model, copy, batch_size=100)
    x64 = x.double()
    before = x64.clone()
    assert torch.equal(M.total_variance(IndexedRows(x64, idx)), M.total_variance(x64[idx]))
    assert torch.equal(M.total_variance(x64), M.total_variance(before)) and torch.equal(x64, before)  # not written
    with pytest.raises(ValueError, match="empty"):
        M.total_variance(IndexedRows(x, idx[:0]))


@pytest.mark.parametrize("world_size,skip", [(1, 0), (1, 3), (2, 0), (3, 2)])
def test_minibatches_are_those_of_the_copied_split(world_size, skip):
    """The same generator state gives the same batches, rank by rank, from the rows as from the copy."""
    x = _x(999, 6)
    cfg = TrainConfig(**ADAM)
    _, train_idx = split_indices(999, 0.2, torch.Generator().manual_seed(0))
    for rank in range(world_size):
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        a = list(_epoch_batches(IndexedRows(x, train_idx), 0, g1, cfg, rank, world_size, torch.device("cpu"), skip))
        b = list(_epoch_batches(x[train_idx], 0, g2, cfg, rank, world_size, torch.device("cpu"), skip))
        assert [i for i, _ in a] == [i for i, _ in b] == list(range(skip, 13))
        assert all(torch.equal(xa, xb) for (_, xa), (_, xb) in zip(a, b))
        assert torch.equal(g1.get_state(), g2.get_state())


def _reference_adam(cfg: TrainConfig, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The minibatch loop written out plainly, on a copied training split: the split of
    ``split_indices`` from the seeded generator, then each epoch a ``randperm`` of the split from
    the same generator, ``batch_size`` rows at a time."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    _, train_idx = split_indices(x.shape[0], cfg.validation, g)
    x_train = x[train_idx].clone()
    model = build_model(cfg, x.shape[1]).to(x.dtype)
    opt = minibatch_optimizer(cfg.optimizer, parameter_groups(model, cfg.lr), cfg.lr)
    total, step = planned_steps(cfg, x), 0
    for _ in range(cfg.epochs):
        for idx in torch.randperm(x_train.shape[0], generator=g).split(cfg.batch_size):
            model.set_progress(step / total)
            train_step(model, opt, x_train[idx], clip_grad=cfg.clip_grad)
            step += 1
    return _state(model)


def test_adam_weights_equal_a_plain_loop_on_a_copied_split():
    x = _x()
    cfg = TrainConfig(**ADAM)
    assert _same_state(_state(train(cfg, x).model), _reference_adam(cfg, x))


def _copying(init):
    """``_Run.__init__`` made to hold copies of its splits, as it did before (the tensor path of the loop)."""
    def copying_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for name in ("x_train", "x_val"):
            rows = getattr(self, name)
            if isinstance(rows, IndexedRows):
                setattr(self, name, rows.tensor())

    return copying_init


def _with_copied_splits(monkeypatch):
    """Make ``train`` hold copies of its splits."""
    monkeypatch.setattr(_Run, "__init__", _copying(_Run.__init__))


@pytest.mark.parametrize("extra", [
    {},
    {"validation": 0.0, "epochs": 2},
    {"final_samples": 300},
    {"final_samples": 0, "validation": 0.3},
    {"optimizer": "sgd", "activation": "topk", "k": 3, "penalty": None, "lr": 0.05},
    {"optimizer": "lbfgs", "iterations": 12},
    {"decoder": "sigmoid", "activation": "sigmoid", "penalty": "kl", "weight": 0.1, "target": 0.05},
])
def test_a_run_on_rows_equals_a_run_on_copied_splits(monkeypatch, extra):
    """Weights, every logged record (the validation curve included) and the final metrics."""
    x = _x().sigmoid() if extra.get("decoder") == "sigmoid" else _x()
    cfg = TrainConfig(**(ADAM | extra))
    now = train(cfg, x)
    with monkeypatch.context() as m:
        _with_copied_splits(m)
        then = train(cfg, x)
    assert _same_state(_state(now.model), _state(then.model))
    assert [_untimed(r) for r in now.history] == [_untimed(r) for r in then.history]
    assert any("val_reconstruction" in r for r in now.history) == bool(cfg.validation)
    assert _untimed(now.metrics) == _untimed(then.metrics)


def test_the_run_keeps_rows_of_the_data_not_copies():
    x = _x(2000, 8)
    run = _Run(TrainConfig(**ADAM), x, None, None, None)
    for rows in (run.x_train, run.x_val):
        assert isinstance(rows, IndexedRows) and rows.x is x
    assert len(run.x_train) + len(run.x_val) == 2000
    assert torch.equal(torch.sort(torch.cat([run.x_train.index, run.x_val.index])).values, torch.arange(2000))
    lbfgs = _Run(TrainConfig(**(ADAM | {"optimizer": "lbfgs"})), x, None, None, None)
    assert isinstance(lbfgs.x_train, torch.Tensor) and lbfgs.x_train.shape == (1600, 8)  # full batch: one copy
    assert isinstance(lbfgs.x_val, IndexedRows) and lbfgs.x_val.x is x


def _mapped_files(ptr: int) -> list[str]:
    """The file names of the mappings of this process that hold the address ``ptr``."""
    names = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in fields[0].split("-"))
        if lo <= ptr < hi and len(fields) == 6:
            names.append(fields[5].strip())
    return names


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")
def test_a_float32_npy_is_memory_mapped_and_never_written(tmp_path):
    path = tmp_path / "data.npy"
    arr = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
    np.save(path, arr)
    ds = load_data(TrainConfig(data=str(path)))
    assert str(path) in _mapped_files(ds.x.data_ptr())  # the tensor's memory is the file's mapping
    assert np.array_equal(ds.x.numpy(), arr)
    ds.x[0] = 7.0  # copy-on-write: the process sees its change, the file does not
    assert float(ds.x[0, 0]) == 7.0 and np.array_equal(np.load(path), arr)
    f64 = tmp_path / "f64.npy"
    np.save(f64, arr.astype(np.float64))
    x64 = load_data(TrainConfig(data=str(f64))).x
    assert x64.dtype == torch.float32 and str(f64) not in _mapped_files(x64.data_ptr())  # converted: a copy


RSS_CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
from actsparse.config import TrainConfig
from actsparse.train import _Run, train
if sys.argv[2] == "copied":  # the splits as copies, as train held them before: the measure must see them
    sys.path.insert(0, sys.argv[3])
    from test_data_memory import _copying
    _Run.__init__ = _copying(_Run.__init__)
cfg = TrainConfig(hidden=16, activation="relu", decoder="linear", penalty="l1", weight=1e-3, optimizer="adam",
                  epochs=1, batch_size=4096, validation=0.2, plots=False, progress=False, checkpoint_every=0)
train(cfg, torch.randn(5000, 64))  # the imports, kernels and optimiser modules of a run, before measuring
x = torch.randn(int(sys.argv[1]), 64)
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
train(cfg, x)
print(json.dumps({"data_mib": x.numel() * 4 / 2**20, "rise_mib": status("VmHWM") - base}))
"""


def _peak_rise(rows: int, splits: str = "rows") -> dict:
    """Peak RSS of one run on ``rows`` x 64 floats, above what its process held before the run (MiB).

    glibc is told to map every block over 1 MiB on its own (``MALLOC_MMAP_THRESHOLD_``; a batch, exactly
    1 MiB, stays in the heap, which keeps the run fast), so a freed large block leaves the resident set at
    once: the peak is then what the run held at one time, not what the allocator's free lists happened to
    keep (which moved the figure by 10-20 MiB between runs and machines, and failed CI once)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20 + 1)}
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(rows), splits, str(Path(__file__).parent)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak RSS (Linux)")
def test_training_does_not_copy_the_data():
    """The peak's growth with the data: 0.08 MiB per MiB when measured (the validation chunk's
    pre-activations, the index permutations), against 1.0 (0.8 + 0.2) for copies of the two splits.
    The slope between two sizes cancels the run's fixed memory (kernels, the model, Adam's state)."""
    small, large, copied = _peak_rise(100_000), _peak_rise(400_000), _peak_rise(100_000, "copied")
    slope = (large["rise_mib"] - small["rise_mib"]) / (large["data_mib"] - small["data_mib"])
    assert slope < 0.35, (small, large)
    assert large["rise_mib"] < 0.35 * large["data_mib"] + 48, large
    # The measure sees a copy: the copied splits add at least most of the training split's 0.8.
    assert copied["rise_mib"] - small["rise_mib"] > 0.6 * small["data_mib"], (small, copied)
