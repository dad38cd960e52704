"""Review findings on the data layer: each case is refused early with one clear line.

Library cases call the loaders; CLI cases run the real ``actsparse`` command in a subprocess (cwd a
fresh folder) and check exit status 2, exactly one stderr line without a traceback, and that no file
outside the intended folder changed. The CLI commands are started together, in a few threads, the
first time a CLI test needs one (each is mostly the import of torch), so the file stays fast.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import struct
import subprocess
import sys
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from actsparse.config import TrainConfig
from actsparse.data import load_array, load_data, read_idx
from actsparse.data.images import read_grey_image
from actsparse.data.shards import INDEX_NAME, ShardStore, ShardWriter

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers
def _idx_header(shape: tuple[int, ...], code: int = 0x08) -> bytes:
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


def _bomb_png(path: Path, w: int = 15000, h: int = 15000) -> Path:
    """A valid 8x8 grey PNG whose header then claims ``w`` x ``h`` pixels (a few hundred bytes)."""
    from PIL import Image

    Image.new("L", (8, 8), 128).save(path)
    raw = bytearray(path.read_bytes())
    assert raw[12:16] == b"IHDR"
    raw[16:24] = struct.pack(">II", w, h)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))
    return path


def _store(directory: Path, rows: int, d: int, shard_size: int, dtype: str = "float32") -> ShardStore:
    x = np.random.default_rng(0).random((rows, d)).astype(dtype)
    with ShardWriter(directory, d, dtype, shard_size, source="trust test") as w:
        w.write(x)
    return ShardStore(directory)


def _poison(directory: Path, shard: str, row: int, col: int = 1) -> None:
    m = np.load(directory / shard, mmap_mode="r+")
    m[row, col] = np.nan
    m.flush()
    del m


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- CLI cases (run together)
def _setup_out_not_a_store(t: Path) -> list[str]:
    user = t / "user"
    user.mkdir()
    for name, text in (("notes.tmp", "draft"), ("shard-old.npy", "mine"), ("keep.txt", "keep")):
        (user / name).write_text(text)
    return ["cache-activations", "--out", "user", "--tokens", "64", "--context", "8", "--no-progress"]


def _setup_overwrite_foreign_index(t: Path) -> list[str]:
    other = t / "other"
    other.mkdir()
    (other / INDEX_NAME).write_text(json.dumps({"pages": ["a", "b"]}))
    (other / "shard-a.npy").write_text("not ours")
    (other / "draft.tmp").write_text("not ours either")
    return ["cache-activations", "--out", "other", "--overwrite", "--tokens", "64", "--context", "8", "--no-progress"]


def _setup_idx_bomb(t: Path) -> list[str]:
    body = bytes(1000)  # declares 2,000,000 x 28 x 28 bytes (1.57 GB); holds 1,000
    (t / "bomb-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_header((2_000_000, 28, 28)) + body))
    return ["train", "--data", "bomb-idx3-ubyte.gz", "--name", "t", "--out", "runs", "--no-plots", "--no-progress"]


def _setup_png_bomb(t: Path) -> list[str]:
    (t / "imgs").mkdir()
    _bomb_png(t / "imgs" / "huge.png")
    return ["train", "--data", "folder:imgs", "--name", "t", "--out", "runs", "--no-plots", "--no-progress"]


def _setup_garbage_pt(t: Path) -> list[str]:
    (t / "g.pt").write_bytes(b"garbage here\x80\x02}q\x00" * 10)
    return ["train", "--data", "g.pt", "--name", "t", "--out", "runs", "--no-plots", "--no-progress"]


def _setup_token_file(values: list[int]):
    def setup(t: Path) -> list[str]:
        np.save(t / "ids.npy", np.array(values * 40, dtype=np.int64))
        return ["cache-activations", "--out", "acts", "--token-file", "ids.npy", "--tokens", "64", "--context", "8",
                "--no-progress"]
    return setup


def _setup_nan_store(t: Path) -> list[str]:
    # a store larger than the 65,536-row sample that load_data checks, with a NaN in a row outside it
    n, d = 140_000, 2
    _store(t / "store", n, d, 20_000)
    sampled = set(np.random.default_rng(0).choice(n, size=65_536, replace=False).tolist())
    row = next(r for r in range(20_000 + 5, n) if r not in sampled)
    _poison(t / "store", "shard-000001.npy", row - 20_000)
    (t / "row.txt").write_text(str(row - 20_000))
    return ["train", "--data", "shards:store", "--optimizer", "adam", "--batch-size", "10000", "--epochs", "1",
            "--decoder", "linear", "--hidden", "4", "--name", "t", "--out", "runs", "--no-plots", "--no-progress",
            "--checkpoint-every", "0"]


CLI_SETUPS = {
    "out_not_a_store": _setup_out_not_a_store,
    "overwrite_foreign_index": _setup_overwrite_foreign_index,
    "idx_bomb": _setup_idx_bomb,
    "png_bomb": _setup_png_bomb,
    "garbage_pt": _setup_garbage_pt,
    "torchvision_missing": lambda t: ["train", "--data", "torchvision:MNIST:data", "--name", "t", "--out", "runs"],
    "negative_token": _setup_token_file([1, 2, -3, 4]),
    "token_over_vocab": _setup_token_file([1, 2, 256, 4]),
    "bos_negative": lambda t: ["cache-activations", "--out", "acts", "--bos", "-1", "--tokens", "64", "--context", "8"],
    "bos_over_vocab": lambda t: ["cache-activations", "--out", "acts", "--bos", "99999", "--tokens", "64",
                                 "--context", "8"],
    "device_cuda": lambda t: ["cache-activations", "--out", "acts", "--device", "cuda", "--tokens", "64",
                              "--context", "8"],
    "pickle_model": lambda t: (
        (t / "bin").mkdir(),
        (t / "bin" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8,
                                                            "n_head": 2, "vocab_size": 16})),
        (t / "bin" / "pytorch_model.bin").write_bytes(b"\x80\x02c__builtin__\nprint\nq\x00."),
        ["cache-activations", "--out", "acts", "--model", "bin", "--tokens", "64", "--context", "8"],
    )[-1],
    "patch_size_1": lambda t: ["train", "--patch-size", "1", "--samples", "200", "--name", "t", "--out", "runs",
                               "--no-plots", "--no-progress"],
    "nan_store": _setup_nan_store,
}
#: Folders a failing command may leave changed (a training run folder, created before the data fail).
ALLOWED = {"nan_store": ("runs",)}


def _run(name: str, tmp: Path) -> dict:
    cwd = tmp / name
    cwd.mkdir()
    argv = CLI_SETUPS[name](cwd)
    before = _snapshot(cwd)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "MPLCONFIGDIR": str(tmp / f"mpl-{name}"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "actsparse.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    after = _snapshot(cwd)
    allowed = ALLOWED.get(name, ())
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and not k.startswith(tuple(f"{a}{os.sep}" for a in allowed)))
    return {"rc": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout, "changed": changed, "cwd": cwd}


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict[str, Future]:
    tmp = tmp_path_factory.mktemp("trust_cli")
    pool = ThreadPoolExecutor(max_workers=3)
    futures = {name: pool.submit(_run, name, tmp) for name in CLI_SETUPS}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _one_line_error(cli, name: str, *needles: str) -> str:
    r = cli[name].result()
    err = r["stderr"]
    assert r["rc"] == 2, (r["rc"], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err[-3000:]}"
    assert not r["changed"], f"files changed outside the allowed folder: {r['changed']}"
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "weights_only=False" not in lines[0]
    return lines[0]


# --------------------------------------------------------------------------- 3. --out deletes user files
def test_cache_out_refuses_non_store_folder(cli):
    # failed before: exit 0, and notes.tmp and shard-old.npy of the user were deleted
    line = _one_line_error(cli, "out_not_a_store", "is not a shard store", "nothing in it was touched")
    assert "user" in line
    assert sorted(p.name for p in (cli["out_not_a_store"].result()["cwd"] / "user").iterdir()) == [
        "keep.txt", "notes.tmp", "shard-old.npy"]


def test_cache_overwrite_refuses_foreign_index(cli):
    # failed before: --overwrite deleted the foreign index.json and shard-a.npy, and draft.tmp
    _one_line_error(cli, "overwrite_foreign_index", "is not a shard-store index", "nothing in it was touched")
    left = sorted(p.name for p in (cli["overwrite_foreign_index"].result()["cwd"] / "other").iterdir())
    assert left == ["draft.tmp", INDEX_NAME, "shard-a.npy"]


def test_writer_cleans_only_its_own_leftovers(tmp_path):
    # failed before: the user's mine.tmp in a store folder was deleted with the store's own leftovers
    _store(tmp_path, 30, 2, 10)
    (tmp_path / "shard-000007.npy.tmp").write_bytes(b"leftover of a killed run")
    (tmp_path / "shard-000009.npy").write_bytes(b"renamed, not yet in the index")
    (tmp_path / "mine.tmp").write_text("the user's")
    (tmp_path / "shard-notes.npy").write_text("the user's too")
    ShardWriter(tmp_path, 2, "float32", 10, source="trust test")  # resumes (complete): cleans leftovers
    assert not (tmp_path / "shard-000007.npy.tmp").exists() and not (tmp_path / "shard-000009.npy").exists()
    assert (tmp_path / "mine.tmp").read_text() == "the user's"
    assert (tmp_path / "shard-notes.npy").is_file()
    with ShardWriter(tmp_path, 2, "float32", 10, source="new", overwrite=True) as w:  # a store: overwritten
        w.write(np.zeros((5, 2)))
    assert ShardStore(tmp_path).n_rows == 5 and (tmp_path / "mine.tmp").is_file()


def test_writer_refuses_non_store_folder_and_resumes_an_empty_store(tmp_path):
    # failed before: ShardWriter deleted a.tmp in a folder that was no store
    (tmp_path / "a.tmp").write_text("x")
    with pytest.raises(ValueError, match="not a shard store.*nothing in it was touched"):
        ShardWriter(tmp_path, 2, source="s")
    with pytest.raises(ValueError, match="--overwrite deletes only a store"):
        ShardWriter(tmp_path, 2, source="s", overwrite=True)
    assert (tmp_path / "a.tmp").read_text() == "x"
    # a run killed before its first shard leaves an index: the folder is a store, and is resumed
    ShardWriter(tmp_path / "s", 2, source="s")
    (tmp_path / "s" / "shard-000000.npy.tmp").write_bytes(b"cut off")
    with ShardWriter(tmp_path / "s", 2, source="s") as w:
        w.write(np.ones((3, 2)))
    assert ShardStore(tmp_path / "s").n_rows == 3
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [INDEX_NAME, "shard-000000.npy"]


# --------------------------------------------------------------------------- 9. decompression bombs
def test_idx_bomb_refused_from_its_header(tmp_path):
    # failed before: gzip.decompress of the whole file, then "truncated" (a real 1.2 GB body was loaded)
    p = tmp_path / "bomb-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(_idx_header((2_000_000, 28, 28)) + bytes(1000)))
    with pytest.raises(ValueError, match=r"declares shape \(2000000, 28, 28\).*over the limit of 1073741824 "
                                         r"bytes.*ACTSPARSE_MAX_BYTES=1568000000") as info:
        read_idx(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_idx_limit_is_set_by_environment(tmp_path, monkeypatch):
    # failed before: ACTSPARSE_MAX_BYTES did not exist; a 1.57 MB body was read whatever its size
    p = tmp_path / "real-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(_idx_header((2000, 28, 28)) + bytes(2000 * 28 * 28)))
    monkeypatch.setenv("ACTSPARSE_MAX_BYTES", "100000")
    with pytest.raises(ValueError, match="1568000 bytes .* over the limit of 100000 bytes"):
        read_idx(p)
    monkeypatch.setenv("ACTSPARSE_MAX_BYTES", "2000000")
    assert read_idx(p).shape == (2000, 28, 28)
    monkeypatch.setenv("ACTSPARSE_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="ACTSPARSE_MAX_BYTES must be a positive number of bytes"):
        read_idx(p)


def test_cli_idx_bomb(cli):
    # failed before: one line, but "truncated", not the size limit (a genuine bomb trained at 24 GB peak)
    _one_line_error(cli, "idx_bomb", "bomb-idx3-ubyte.gz", "over the limit", "ACTSPARSE_MAX_BYTES")


def test_png_bomb_refused_from_its_header(tmp_path, monkeypatch):
    # failed before: PIL's DecompressionBombError escaped (not a ValueError)
    p = _bomb_png(tmp_path / "huge.png")
    with pytest.raises(ValueError, match="declares a 15000x15000 image.*over the limit.*ACTSPARSE_MAX_BYTES"):
        read_grey_image(p)
    monkeypatch.setenv("ACTSPARSE_MAX_BYTES", str(15000 * 15000 * 8))  # allowed: then it is a damaged PNG
    with pytest.raises(ValueError, match="is not an image that can be read"):
        read_grey_image(p)


def test_cli_png_bomb(cli):
    # failed before: a 38-line traceback ending in DecompressionBombError, exit 1
    _one_line_error(cli, "png_bomb", "huge.png", "15000x15000", "ACTSPARSE_MAX_BYTES")


# --------------------------------------------------------------------------- 18. complex data
def test_complex_rejected_by_every_loader(tmp_path):
    # failed before: the .pt file was read with its imaginary part dropped (a complex .npy was refused)
    z = (np.arange(12).reshape(6, 2) + 1j).astype(np.complex64)
    torch.save(torch.from_numpy(z), tmp_path / "c.pt")
    torch.save({"x": torch.from_numpy(z)}, tmp_path / "d.pt")
    np.save(tmp_path / "c.npy", z)
    np.savez(tmp_path / "c.npz", x=z)
    (tmp_path / "c.csv").write_text("1+2j,3\n4,5\n")
    from safetensors.numpy import save_file

    save_file({"x": z}, str(tmp_path / "c.safetensors"))
    for name in ("c.pt", "d.pt", "c.npy", "c.npz", "c.safetensors", "c.csv"):
        with pytest.raises(ValueError) as info:
            load_array(tmp_path / name)
        assert name in str(info.value), str(info.value)
        if name != "c.csv":  # text: not a number at all
            assert "real numbers" in str(info.value), str(info.value)
    torch.save(torch.ones(3, 2, dtype=torch.bool), tmp_path / "b.pt")
    with pytest.raises(ValueError, match="must hold numbers, got dtype bool"):  # as .npy
        load_array(tmp_path / "b.pt")


# --------------------------------------------------------------------------- tracebacks -> one line
def test_cli_garbage_pt(cli):
    # failed before: 6 lines of torch text that suggest weights_only=False
    line = _one_line_error(cli, "garbage_pt", "g.pt is not a readable tensor file")
    assert "weights_only" not in line


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_cli_torchvision_missing(cli):
    # failed before: a traceback (ModuleNotFoundError), and "pip install torchvision", which can replace torch
    line = _one_line_error(cli, "torchvision_missing", "needs torchvision", "--no-deps", "pip install torchvision==")
    from actsparse.data import torchvision_install_hint

    assert torchvision_install_hint() in line
    assert torchvision_install_hint("2.14.1") == "pip install torchvision==0.29.1 --no-deps"
    assert torchvision_install_hint("2.13.0+cpu") == ("pip install torchvision==0.28.0 --no-deps --index-url "
                                                      "https://download.pytorch.org/whl/cpu")
    assert "the release built for torch 2.99.0" in torchvision_install_hint("2.99.0")


def test_cli_negative_token_id(cli):
    # failed before: 30-line traceback (IndexError: index out of range in self), exit 1
    _one_line_error(cli, "negative_token", "ids.npy holds token id -3", ">= 0")


def test_cli_token_id_over_vocabulary(cli):
    # passed before (already one line); kept so that the earlier check (before the model loads) stays right
    _one_line_error(cli, "token_over_vocab", "ids.npy holds token id 256", "vocabulary of 256")


def test_cli_bos_negative(cli):
    # failed before: traceback (IndexError in torch.embedding), exit 1
    _one_line_error(cli, "bos_negative", "--bos -1 is not a token id", "0..255")


def test_cli_bos_over_vocabulary(cli):
    # failed before: traceback (IndexError in torch.embedding), exit 1
    _one_line_error(cli, "bos_over_vocab", "--bos 99999 is not a token id", "0..255")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cli_device_cuda_without_cuda(cli):
    # failed before: traceback (AssertionError: Torch not compiled with CUDA enabled), exit 1
    _one_line_error(cli, "device_cuda", "--device cuda: CUDA is not available", "--device cpu")


def test_cli_pickle_model_folder(cli):
    # failed before: 38-line traceback (UnpicklingError from transformers' torch.load), exit 1
    line = _one_line_error(cli, "pickle_model", "pytorch_model.bin", "only safetensors checkpoints are loaded",
                           "save_pretrained")
    assert "weights_only" not in line


# --------------------------------------------------------------------------- messages that say what is wrong
def test_cli_patch_size_1(cli):
    # failed before: a numpy "invalid value encountered in divide" warning line, then "data contain NaN"
    _one_line_error(cli, "patch_size_1", "--patch-size", "at least 2")


def test_store_reader_names_the_nan_row(tmp_path):
    # failed before: the NaN row was yielded to training; check_finite did not exist
    store = _store(tmp_path, 200, 3, 50)
    _poison(tmp_path, "shard-000002.npy", 7)
    store = ShardStore(tmp_path)
    where = f"row 7 of {tmp_path / 'shard-000002.npy'} \\(row 107 of the store\\)"
    with pytest.raises(ValueError, match=where):
        store.check_finite()
    with pytest.raises(ValueError, match=where):
        store.read_rows(np.array([3, 107, 150]))
    with pytest.raises(ValueError, match=where):
        list(store.iter_batches(16, seed=1))
    with pytest.raises(ValueError, match=where):
        store.read(100, 120)
    assert store.read_rows(np.array([3, 106, 150])).shape == (3, 3)  # other rows still read
    assert ShardStore(tmp_path, check_finite=False).read(100, 120).isnan().sum() == 1


def test_cli_nan_in_streamed_store(cli):
    # failed before: blamed on the activations and the learning rate, not on the store's row
    r = cli["nan_store"].result()
    row = (r["cwd"] / "row.txt").read_text()
    _one_line_error(cli, "nan_store", "shard-000001.npy", f"row {row} of", "holds NaN")


def test_value_range_of_each_source():
    # failed before: Dataset had no value_range (a sigmoid decoder on ZCA data in [-2, 2] learned nothing)
    ranges = {}
    for kw in ({"data": "patches", "whiten": "1/f"}, {"data": "patches", "whiten": "none"},
               {"data": "patches", "whiten": "zca"}, {"data": "digits"}, {"data": "synthetic"}):
        ds = load_data(TrainConfig(name="t", samples=500, **kw))
        lo, hi = ds.value_range
        assert (lo, hi) == (float(ds.x.min()), float(ds.x.max()))
        ranges[kw.get("whiten", kw["data"])] = (lo, hi, ds.in_unit_interval)
    assert ranges["1/f"][2] and ranges["none"][2] and ranges["digits"][2]
    assert ranges["1/f"][0] >= 0.1 - 1e-6 and ranges["1/f"][1] <= 0.9 + 1e-6
    assert not ranges["zca"][2] and ranges["zca"][0] < 0
    assert not ranges["synthetic"][2] and ranges["synthetic"][0] < 0
