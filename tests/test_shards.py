"""The sharded activation store (actsparse.data.shards): round trip, epochs that visit every row once
across ranks, a bounded shuffle buffer, crash safety (an exception after a temp file, and SIGKILL of a
writer process), resuming, and errors that name the broken file."""

from __future__ import annotations

import json
import os
import signal
import time
import tracemalloc
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from actsparse.data import load_data
from actsparse.data import shards as S
from actsparse.data.activations import cache_activations
from actsparse.data.shards import INDEX_NAME, ShardStore, ShardWriter


def _rows(n: int, d: int = 3, start: int = 0) -> np.ndarray:
    """Row i holds i in column 0 (exact in float32 up to 2**24), so rows can be told apart."""
    ids = np.arange(start, start + n, dtype=np.float32)[:, None]
    return np.concatenate([ids, np.sin(ids * (1 + np.arange(d - 1, dtype=np.float32)))], 1)


def _store(tmp_path: Path, n: int, shard_size: int, d: int = 3, chunks=(5, 1, 13)) -> ShardStore:
    data = _rows(n, d)
    with ShardWriter(tmp_path, d, "float32", shard_size, source={"test": n}) as w:
        i, k = 0, 0
        while i < n:  # uneven writes, so shards straddle them
            step = chunks[k % len(chunks)]
            w.write(torch.from_numpy(data[i:i + step]) if k % 2 else data[i:i + step])
            i, k = i + step, k + 1
    return ShardStore(tmp_path)


def test_round_trip(tmp_path):
    store = _store(tmp_path, 100, 16)
    assert store.shard_rows == [16] * 6 + [4] and len(store) == store.n_rows == 100 and store.d == 3
    assert torch.equal(store.to_tensor(), torch.from_numpy(_rows(100)))
    assert torch.equal(store.read(30, 70), torch.from_numpy(_rows(40, start=30)))
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["complete"] and index["rows"] == 100 and index["source"] == {"test": 100}
    assert [s["file"] for s in index["shards"]] == [f"shard-{i:06d}.npy" for i in range(7)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([INDEX_NAME] + [s["file"] for s in index["shards"]])
    mm = store.shard(2)
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    sample = store.sample(10, seed=1)
    ids = sample[:, 0].long()
    assert len(set(ids.tolist())) == 10 and torch.equal(sample, torch.from_numpy(_rows(100))[ids])
    assert store.sample(1000).shape == (100, 3)
    ds = load_data(SimpleNamespace(data=f"shards:{tmp_path}", seed=0))  # streamed; x samples it (all 100 rows)
    assert isinstance(ds.stream, ShardStore) and torch.equal(ds.x, store.to_tensor())


def test_float16_store(tmp_path):
    x = torch.randn(50, 4, dtype=torch.float64)
    with ShardWriter(tmp_path, dtype="float16", shard_size=20) as w:
        w.write(x)
    store = ShardStore(tmp_path)
    assert store.dtype == "float16" and store.d == 4
    assert torch.equal(store.to_tensor(), x.half().float())
    assert store.to_tensor(dtype=None).dtype == torch.float16


@pytest.mark.parametrize(("n", "shard_size", "world_size", "even"), [
    (100, 16, 1, False), (100, 16, 3, False), (100, 16, 3, True), (100, 7, 4, False),
    (50, 40, 5, False),  # fewer shards (2) than ranks: row ranges of shards
    (10, 10, 4, True),  # one shard, four ranks
])
def test_every_row_once_per_epoch_across_ranks(tmp_path, n, shard_size, world_size, even):
    store = _store(tmp_path, n, shard_size)
    orders = []
    for epoch in (0, 1):
        seen = []
        counts = set()
        for rank in range(world_size):
            batches = list(store.iter_batches(6, epoch=epoch, seed=3, rank=rank, world_size=world_size, even=even,
                                              buffer_shards=2))
            assert all(b.shape[0] == 6 for b in batches[:-1]) and len(batches) == store.batches_per_epoch(
                6, rank=rank, world_size=world_size, even=even)
            rows = torch.cat(batches) if batches else torch.zeros(0, 3)
            ids = rows[:, 0].long()
            assert torch.equal(rows, torch.from_numpy(_rows(n))[ids]), "rows must come back unchanged"
            assert rows.shape[0] == store.rows_for_rank(rank, world_size, even=even)
            counts.add(rows.shape[0])
            seen += ids.tolist()
        assert len(seen) == len(set(seen)), "ranks must read disjoint rows, each once"
        if even:
            assert len(counts) == 1 and len(seen) == n // world_size * world_size
        else:
            assert sorted(seen) == list(range(n)) and max(counts) - min(counts) <= 1
        orders.append(seen)
        again = torch.cat(list(store.iter_batches(6, epoch=epoch, seed=3, rank=0, world_size=world_size, even=even,
                                                  buffer_shards=2)))
        assert again[:, 0].long().tolist() == seen[:again.shape[0]], "an epoch's order is deterministic"
    if n >= 50:
        assert orders[0] != orders[1], "a new epoch reshuffles"
    plain = torch.cat(list(store.iter_batches(7, shuffle=False)))
    assert torch.equal(plain, store.to_tensor())
    drop = list(store.iter_batches(7, drop_last=True))
    assert len(drop) == n // 7 and all(b.shape == (7, 3) for b in drop)


def test_shuffle_buffer_memory_does_not_grow_with_the_store(tmp_path):
    def peak(n_shards: int) -> int:
        store = _store(tmp_path / str(n_shards), 500 * n_shards, 500, d=32, chunks=(500,))
        next(iter(store.iter_batches(64, buffer_shards=2)))  # one-time allocations (lazy imports, caches) first
        tracemalloc.start()
        try:
            for _ in store.iter_batches(64, buffer_shards=2):
                pass
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(4), peak(32)
    shard_bytes = 500 * 32 * 4
    # the 2-shard buffer, its permuted copy (4 shards' bytes), a batch and the leftover rows
    assert large < 6 * shard_bytes, f"peak {large} bytes for 2-shard buffers of {shard_bytes} bytes"
    assert large < 1.5 * small + shard_bytes, (small, large)


def test_writer_refuses_other_arguments_and_overwrites(tmp_path):
    _store(tmp_path, 40, 16)
    with pytest.raises(ValueError, match="other arguments.*shard_size: stored 16, now 8"):
        ShardWriter(tmp_path, 3, "float32", 8, source={"test": 40})
    with pytest.raises(ValueError, match="source"):
        ShardWriter(tmp_path, 3, "float32", 16, source={"test": 41})
    done = ShardWriter(tmp_path, 3, "float32", 16, source={"test": 40})
    assert done.complete and done.rows == 40
    with pytest.raises(RuntimeError, match="complete"):
        done.write(_rows(2))
    with ShardWriter(tmp_path, 3, "float32", 8, source="new", overwrite=True) as w:
        w.write(_rows(10))
    assert ShardStore(tmp_path).shard_rows == [8, 2]
    with pytest.raises(ValueError, match="bfloat16"):
        ShardWriter(tmp_path / "b", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="width 2 do not fit a store of d=3"):
        ShardWriter(tmp_path / "c", 3).write(np.zeros((1, 2)))


# --------------------------------------------------------------------------- broken stores
def test_errors_name_the_broken_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no shard index {tmp_path / INDEX_NAME}"):
        ShardStore(tmp_path)
    _store(tmp_path, 40, 16)
    index_path = tmp_path / INDEX_NAME
    good = index_path.read_text()

    index_path.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match=f"corrupt shard index {index_path}"):
        ShardStore(tmp_path)
    broken = json.loads(good)
    broken["rows"] = 41
    index_path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=f"corrupt shard index {index_path}: 'rows' is 41"):
        ShardStore(tmp_path)
    index_path.write_text(good)

    shard = tmp_path / "shard-000001.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-5])
    with pytest.raises(ValueError, match=f"shard {shard} is truncated"):
        ShardStore(tmp_path)
    with pytest.raises(ValueError, match=f"shard {shard} is truncated"):
        ShardWriter(tmp_path, 3, "float32", 16, source={"test": 40})  # resuming checks them too
    shard.write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match=f"shard {shard} is not a valid .npy file"):
        ShardStore(tmp_path)
    np.save(shard, np.zeros((16, 4), np.float32))
    with pytest.raises(ValueError, match=f"shard {shard} holds a .16, 4. float32 array"):
        ShardStore(tmp_path)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shard} is listed in {index_path} but missing"):
        ShardStore(tmp_path)


def _cache(model, out, **kw):
    x = torch.randint(0, 50, (30, 5), generator=torch.Generator().manual_seed(0))
    return cache_activations(model, "1", x, out, batch_size=4, shard_size=16, progress=False, **kw)


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 6), nn.Tanh())
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_exception_after_temp_file_leaves_complete_shards_and_resumes(tmp_path, monkeypatch):
    model = _Counting()
    reference = _cache(model, tmp_path / "ref")
    full_calls = model.calls
    model.calls = 0

    out = tmp_path / "cut"
    real_replace, renames = os.replace, []

    def failing_replace(src, dst):
        renames.append(Path(dst).name)
        if len([r for r in renames if r.startswith("shard-")]) == 4:
            raise OSError("disk full (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(S.os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        _cache(model, out)
    monkeypatch.setattr(S.os, "replace", real_replace)
    assert (out / "shard-000003.npy.tmp").is_file() and not (out / "shard-000003.npy").exists()
    index = json.loads((out / INDEX_NAME).read_text())
    assert [s["file"] for s in index["shards"]] == [f"shard-{i:06d}.npy" for i in range(3)]
    assert not index["complete"] and index["rows"] == 48
    with pytest.raises(ValueError, match="unfinished .48 rows in 3 complete shards"):
        ShardStore(out)
    assert ShardStore(out, allow_incomplete=True).to_tensor().shape == (48, 6)

    model.calls = 0
    store = _cache(model, out)
    # 20 rows per batch: batches 0 and 1 are stored whole and skipped, batch 2 is run again
    assert full_calls == 8 and model.calls == 6, "the stored input batches are skipped, not recomputed"
    _assert_same_store(store, reference)


def _assert_same_store(a: ShardStore, b: ShardStore) -> None:
    assert a.index == b.index
    for fa, fb in zip(a.files, b.files):
        assert fa.read_bytes() == fb.read_bytes()
    assert sorted(p.name for p in a.directory.iterdir()) == sorted(p.name for p in b.directory.iterdir())


def _write_rows(out: Path, n: int, pause: float) -> None:
    """Store rows 0..n-1 of a known array, 250 at a time, resuming what ``out`` holds."""
    with ShardWriter(out, 64, "float32", 1000, source="kill test") as w:
        for i in range(w.rows, n, 250):
            b = min(i + 250, n)
            w.write(np.arange(i * 64, b * 64, dtype=np.float32).reshape(b - i, 64))
            time.sleep(pause)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_mid_write_leaves_a_consistent_index_and_resumes(tmp_path):
    out, n = tmp_path / "store", 50_000  # 50 shards of 256 kB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a process with threads: the child uses none
        pid = os.fork()
    if pid == 0:  # the child writes until it is killed; it never returns into pytest
        try:
            _write_rows(out, n, pause=0.002)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if json.loads((out / INDEX_NAME).read_text())["rows"] >= 3000:
                    break
            except (FileNotFoundError, ValueError):
                pass  # not written yet (a reader never sees a half-written index: it is renamed into place)
            time.sleep(0.002)
        else:
            pytest.fail("the writer did not store 3 shards in 60 s")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    partial = ShardStore(out, allow_incomplete=True)  # verifies every listed shard's header and size
    assert not partial.complete and 3000 <= partial.n_rows < n and partial.n_rows % 1000 == 0
    expected = np.arange(n * 64, dtype=np.float32).reshape(n, 64)
    assert np.array_equal(partial.to_tensor().numpy(), expected[:partial.n_rows])

    _write_rows(out, n, pause=0.0)  # the rerun resumes after the stored rows
    store = ShardStore(out)
    assert store.complete and store.n_rows == n and store.shard_rows == [1000] * 50
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert np.array_equal(store.to_tensor().numpy(), expected)
