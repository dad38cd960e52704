"""Trusting the weights that are read: ``model.safetensors``' SHA-256 (actsparse.weights) and the
interop loaders' checks of weights and cfg.json values (actsparse.interop).

The expected digest is computed here from the file's bytes (its header parsed by hand), not by the
code under test. Each test names the behaviour it failed on before the fix (``# failed before``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

from actsparse import interop  # noqa: E402
from actsparse import weights as W  # noqa: E402  (the module: names added by the fix are looked up in the tests)
from actsparse.models import SparseAutoencoder  # noqa: E402

DIGEST_KEY = "actsparse_sha256"


# ---------------------------------------------------------------------------------------- helpers
def _parse(path: Path) -> tuple[bytes, dict, dict, int]:
    """(file bytes, tensor entries, __metadata__, offset of the data region) of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    return raw, header, meta, 8 + n


def _expected_sha256(path: Path) -> str:
    """The digest as the weights module's docstring defines it, from the raw file."""
    raw, header, _, base = _parse(path)
    h = hashlib.sha256()
    for name in sorted(header):
        info = header[name]
        h.update(json.dumps([name, info["dtype"], info["shape"]], separators=(",", ":")).encode("ascii") + b"\n")
        begin, end = info["data_offsets"]
        h.update(raw[base + begin:base + end])
    return h.hexdigest()


def _flip(path: Path, tensor: str, where: str = "middle", mask: int = 0x01) -> None:
    """Flip bits of one byte inside ``tensor``'s data (one low bit by default: the quietest damage)."""
    raw, header, _, base = _parse(path)
    begin, end = header[tensor]["data_offsets"]
    i = base + {"first": begin, "middle": (begin + end) // 2, "last": end - 1}[where]
    data = bytearray(raw)
    data[i] ^= mask
    path.write_bytes(bytes(data))


def _run_cli(*args: str) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.Popen([sys.executable, "-m", "actsparse.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny run trained by the real CLI (in this process: a second interpreter costs seconds)."""
    from actsparse.cli import main

    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "--data", "digits", "--hidden", "8", "--iterations", "5", "--no-plots", "--no-progress",
                 "--out", str(out), "--name", "r"]) == 0
    return out / "r"


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    dst = tmp_path / "r"
    shutil.copytree(run, dst)
    return dst


# ---------------------------------------------------------------------------------------- item 8
def test_written_weights_carry_the_sha256_of_their_tensors(run, tmp_path):
    # failed before: model.safetensors' metadata was {'step': '5'}, no digest
    _, header, meta, _ = _parse(run / "model.safetensors")
    assert meta.get("step") == "5"  # the caller's metadata is kept
    assert meta.get(DIGEST_KEY) == _expected_sha256(run / "model.safetensors")
    # every dtype family, a scalar and an empty tensor, names out of order
    state = {"z": torch.randn(3, 4), "a": torch.arange(5), "h": torch.randn(2, 3).to(torch.bfloat16),
             "m": torch.tensor([True, False, True]), "s": torch.tensor(2.5, dtype=torch.float64),
             "e": torch.zeros(0, 4, dtype=torch.float16)}
    f = tmp_path / "m.safetensors"
    W.save_weights(f, state, {"note": "x"})
    _, header, meta, _ = _parse(f)
    assert meta == {"note": "x", DIGEST_KEY: _expected_sha256(f)}
    plain = load_file(str(f))  # still a plain safetensors file
    loaded = W.load_weights(f)
    assert all(torch.equal(loaded[k], state[k]) and torch.equal(plain[k], state[k]) for k in state)


@pytest.mark.parametrize("tensor", ["W_enc", "W_dec", "b_enc", "b_dec", "samples_since_fired"])
@pytest.mark.parametrize("where", ["first", "last"])
def test_a_flipped_byte_in_any_tensor_is_refused(run_copy, tensor, where):
    # failed before: load_weights returned the damaged tensors without a word
    f = run_copy / "model.safetensors"
    _flip(f, tensor, where)
    with pytest.raises(ValueError, match="is corrupt: its tensors do not match the SHA-256 recorded") as e:
        W.load_weights(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_a_damaged_digest_or_renamed_tensor_is_refused(run_copy):
    # failed before: nothing was recorded, so nothing was checked
    f = run_copy / "model.safetensors"
    good = f.read_bytes()
    recorded = _parse(f)[2][DIGEST_KEY]
    other = ("0" if recorded[0] != "0" else "1") + recorded[1:]
    for old, new in ((recorded.encode(), other.encode()), (b'"b_enc"', b'"b_enx"')):
        assert good.count(old) == 1
        f.write_bytes(good.replace(old, new))  # same length: the header stays well-formed
        with pytest.raises(ValueError, match="is corrupt"):
            W.load_weights(f)


def test_cli_eval_plot_report_and_load_sae_refuse_a_flipped_byte(run_copy):
    # failed before: eval, plot and report exited 0 with numbers from the damaged weights; load_sae loaded them
    f = run_copy / "model.safetensors"
    _flip(f, "W_enc")
    procs = {cmd: _run_cli(cmd, str(run_copy)) for cmd in ("eval", "plot", "report")}  # in parallel: ~3x faster
    for cmd, p in procs.items():
        out, err = p.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert p.returncode == 2, (cmd, p.returncode, out, err)
        assert len(lines) == 1 and str(f) in lines[0] and "corrupt" in lines[0], (cmd, err)
    with pytest.raises(ValueError, match="corrupt") as e:
        interop.load_sae(run_copy)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("damage", ["truncated-data", "truncated-header", "empty", "garbage"])
def test_a_truncated_or_garbage_file_is_a_one_line_value_error(run_copy, damage):
    # failed before: safetensors' own SafetensorError (not a ValueError, no file name) escaped load_weights
    from actsparse.run_files import load_checkpoint

    f = run_copy / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes({"truncated-data": raw[:-7], "truncated-header": raw[:40], "empty": b"",
                   "garbage": b"\x00\x01not safetensors at all" * 20}[damage])
    with pytest.raises(ValueError) as e:
        W.load_weights(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="model.safetensors"):
        load_checkpoint(run_copy)


def test_a_file_without_digest_loads_with_one_warning_and_is_not_rewritten(run_copy, tmp_path):
    # failed before: no WeightsWarning existed and old files loaded silently
    from actsparse.run_files import load_checkpoint

    assert issubclass(W.WeightsWarning, UserWarning)
    f = run_copy / "model.safetensors"
    state = load_file(str(f))
    save_file(state, str(f), metadata={"step": "5"})  # as written by an actsparse without digests
    before = f.read_bytes()
    other, copy = tmp_path / "old.safetensors", tmp_path / "copy.safetensors"
    save_file({"x": torch.ones(2)}, str(other))
    shutil.copy(f, copy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count what the module emits, not what the filter lets through
        model, _ = load_checkpoint(run_copy)
        load_checkpoint(run_copy)
        W.load_weights(f)
        W.load_weights(copy)  # the same weights: nothing new to say
        W.load_weights(other)
        W.load_weights(other)
    mine = [w for w in caught if issubclass(w.category, W.WeightsWarning)]
    assert len(mine) == 2, [str(w.message) for w in caught]
    assert str(f) in str(mine[0].message) and "predates" in str(mine[0].message)
    assert "cannot be verified" in str(mine[0].message) and str(other) in str(mine[1].message)
    assert f.read_bytes() == before  # nothing rewritten
    assert torch.equal(model.W_enc.detach(), state["W_enc"])


# ---------------------------------------------------------------------------------------- item 18
def _topk_sae() -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(6, 16, "topk", k=3, decoder="linear", pre_bias=True, recon_loss="mse")


@pytest.mark.parametrize("layout,tensor,value", [
    ("sparsify", "encoder.weight", float("nan")),
    ("sparsify", "b_dec", float("inf")),
    ("saelens", "W_dec", float("nan")),
    ("saelens", "b_enc", float("-inf")),
])
def test_interop_loaders_refuse_non_finite_weights(tmp_path, layout, tensor, value):
    # failed before: the NaN/inf weights were loaded, giving NaN codes later
    model = _topk_sae()
    (interop.save_sparsify if layout == "sparsify" else interop.save_saelens)(model, tmp_path)
    f = tmp_path / ("sae.safetensors" if layout == "sparsify" else "sae_weights.safetensors")
    state = load_file(str(f))
    state[tensor].view(-1)[1] = value
    save_file(state, str(f))
    for load in ((interop.load_sparsify if layout == "sparsify" else interop.load_saelens), interop.load_sae):
        with pytest.raises(ValueError, match="non-finite") as e:
            load(tmp_path)
        msg = str(e.value)
        assert str(f) in msg and repr(tensor) in msg and "\n" not in msg


def test_interop_refuses_weights_that_overflow_the_config_dtype(tmp_path):
    # failed before: float32 weights of 1e6 became inf in a float16 config and were loaded
    interop.save_saelens(_topk_sae(), tmp_path)
    f = tmp_path / "sae_weights.safetensors"
    state = load_file(str(f))
    state["W_enc"][0, 0] = 1e6
    save_file(state, str(f))
    cfg = json.loads((tmp_path / "cfg.json").read_text()) | {"dtype": "float16"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="non-finite.*float16") as e:
        interop.load_saelens(tmp_path)
    assert str(f) in str(e.value)


def test_load_sae_refuses_non_finite_weights_in_a_run(run_copy):
    # failed before: load_sae returned a model with NaN weights (the file itself is consistent)
    f = run_copy / "model.safetensors"
    state = load_file(str(f))
    state["W_dec"][0, 0] = float("nan")
    W.save_weights(f, state, {"step": "5"})  # a valid digest: only the finiteness check can catch it
    with pytest.raises(ValueError, match="non-finite") as e:
        interop.load_sae(run_copy)
    assert str(f) in str(e.value) and "'W_dec'" in str(e.value)


def _saelens_folder(tmp_path: Path, **cfg_changes) -> Path:
    interop.save_saelens(_topk_sae(), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text()) | cfg_changes
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("dtype", [["float32"], {"name": "float32"}])
def test_saelens_dtype_of_the_wrong_type_is_a_clear_value_error(tmp_path, dtype):
    # failed before: a list or object 'dtype' raised TypeError (unhashable type)
    with pytest.raises(ValueError, match=r"'dtype' .* is not one of float32, float64, float16, bfloat16") as e:
        interop.load_saelens(_saelens_folder(tmp_path, dtype=dtype))
    assert "cfg.json" in str(e.value)


@pytest.mark.parametrize("kwargs", [[32], "k=32", 32])
def test_saelens_activation_fn_kwargs_not_an_object_is_a_clear_value_error(tmp_path, kwargs):
    # failed before: AttributeError ('list' object has no attribute 'get') from a pre-6.0 config
    folder = _saelens_folder(tmp_path, activation_fn_kwargs=kwargs, activation_fn_str="topk")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["architecture"], cfg["k"]  # a pre-6.0 config: the architecture comes from the activation
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'activation_fn_kwargs' must be a JSON object") as e:
        interop.load_saelens(folder)
    assert "cfg.json" in str(e.value)


@pytest.mark.parametrize("layout,key,value", [
    ("saelens", "architecture", ["topk"]),
    ("saelens", "activation_fn", {"name": "relu"}),
    ("saelens", "normalize_activations", ["none"]),
    ("sparsify", "activation", ["topk"]),
])
def test_string_cfg_fields_of_the_wrong_type_say_so(tmp_path, layout, key, value):
    # failed before: a misleading message ("'normalize_activations' ['none'] normalises each input inside
    # the SAE", "'architecture' ['topk'] is not supported") instead of naming the wrong type
    if layout == "saelens":
        folder = _saelens_folder(tmp_path, **{key: value})
        load = interop.load_saelens
    else:
        interop.save_sparsify(_topk_sae(), tmp_path)
        cfg = json.loads((tmp_path / "cfg.json").read_text()) | {key: value}
        (tmp_path / "cfg.json").write_text(json.dumps(cfg))
        folder, load = tmp_path, interop.load_sparsify
    with pytest.raises(ValueError, match=f"'{key}' must be a string, got {type(value).__name__}"):
        load(folder)
