"""actsparse.interop: sparsify and SAELens checkpoint folders.

Two kinds of test:

* from the documented layout alone (always run): the files are written by hand with
  ``safetensors.numpy`` from the key names and shapes in actsparse/interop.py's docstring, loaded,
  and compared with an independent NumPy forward; saved back and compared tensor by tensor (and
  byte for byte where the layout allows it);
* against the packages themselves (skipped unless ``sparsify`` / ``sae_lens`` import): their own
  models saved with their own code, loaded here, outputs compared on the same input; and our
  files loaded by their loaders.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.numpy import load_file as np_load  # noqa: E402
from safetensors.numpy import save_file as np_save  # noqa: E402

from actsparse.interop import (  # noqa: E402
    CheckpointError,
    detect_layout,
    load_sae,
    load_saelens,
    load_sparsify,
    save_saelens,
    save_sparsify,
)
from actsparse.models import SparseAutoencoder  # noqa: E402

D_IN, D_SAE, K, N = 6, 16, 3, 40


# ------------------------------------------------------------------ the reference, in NumPy
def np_topk(z: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest of each row of ReLU(z)."""
    a = np.maximum(z, 0)
    keep = np.argsort(-a, axis=1)[:, :k]
    out = np.zeros_like(a)
    np.put_along_axis(out, keep, np.take_along_axis(a, keep, axis=1), axis=1)
    return out


def ref_sparsify(w: dict[str, np.ndarray], cfg: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sparsify's forward: top-k of ReLU((x − b_dec) @ encoder.weightᵀ + encoder.bias), code @ W_dec + b_dec."""
    x_in = x if cfg.get("transcode") else x - w["b_dec"]
    code = np_topk(x_in @ w["encoder.weight"].T + w["encoder.bias"], cfg["k"])
    return code, code @ w["W_dec"] + w["b_dec"]


def ref_saelens(w: dict[str, np.ndarray], cfg: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAELens' forward for standard, topk (with or without decoder-norm rescaling) and jumprelu."""
    x_in = x - w["b_dec"] if cfg.get("apply_b_dec_to_input", True) else x
    z = x_in @ w["W_enc"] + w["b_enc"]
    arch, w_dec = cfg["architecture"], w["W_dec"]
    if arch == "standard":
        return (code := np.maximum(z, 0)), code @ w_dec + w["b_dec"]
    if arch == "jumprelu":
        return (code := np.maximum(z, 0) * (z > w["threshold"])), code @ w_dec + w["b_dec"]
    norms = np.linalg.norm(w_dec, axis=1) if cfg.get("rescale_acts_by_decoder_norm") else np.ones(len(w_dec))
    code = np_topk(z * norms, cfg["k"])
    return code, (code / norms) @ w_dec + w["b_dec"]


def encode_decode(model: SparseAutoencoder, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        h = model.encode(torch.as_tensor(x, dtype=model.W_enc.dtype))
        return h.double().numpy(), model.decode(h).double().numpy()


def assert_same(model, ref, w, cfg, x, tol=1e-10) -> None:
    code, recon = encode_decode(model, x)
    ref_code, ref_recon = ref(w, cfg, x)
    np.testing.assert_allclose(code, ref_code, rtol=tol, atol=tol)
    np.testing.assert_allclose(recon, ref_recon, rtol=tol, atol=tol)


# ------------------------------------------------------------------ files written by hand
def weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"W_enc": rng.normal(size=(D_IN, D_SAE)), "b_enc": rng.normal(0, 0.3, D_SAE),
            "W_dec": rng.normal(size=(D_SAE, D_IN)), "b_dec": rng.normal(size=D_IN),
            "threshold": rng.uniform(0.05, 1.0, D_SAE)}


def write_sparsify(path: Path, *, dtype=np.float64, **cfg_changes) -> tuple[dict, dict]:
    rng = np.random.default_rng(1)
    w = {"encoder.weight": rng.normal(size=(D_SAE, D_IN)), "encoder.bias": rng.normal(0, 0.3, D_SAE),
         "W_dec": rng.normal(size=(D_SAE, D_IN)), "b_dec": rng.normal(size=D_IN)}
    w = {k: v.astype(dtype) for k, v in w.items()}
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN} | cfg_changes
    path.mkdir(parents=True, exist_ok=True)
    np_save(w, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return w, cfg


def write_saelens(path: Path, architecture: str, /, *, file_dtype="float64", drop=(),
                  **cfg_changes) -> tuple[dict, dict]:
    """A SAELens folder of random weights in ``file_dtype``; ``cfg_changes`` override config fields."""
    rng = np.random.default_rng(2)
    np_dtype = np.dtype(file_dtype.removeprefix("torch."))
    w = {k: v.astype(np_dtype) for k, v in weights(rng).items()}
    if architecture != "jumprelu":
        del w["threshold"]
    for key in drop:
        del w[key]
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": file_dtype, "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.0.hook_resid_post"}}
    if architecture == "topk":
        cfg |= {"k": K, "rescale_acts_by_decoder_norm": False}
    cfg = cfg | {"architecture": architecture} | cfg_changes
    path.mkdir(parents=True, exist_ok=True)
    np_save(w, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return w, cfg


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(N, D_IN))


# ------------------------------------------------------------------ sparsify, by the layout
@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify_layout_loads_and_matches_numpy(tmp_path, x, transcode) -> None:
    w, cfg = write_sparsify(tmp_path / "sp", transcode=transcode)
    model = load_sparsify(tmp_path / "sp")
    assert (model.k, model.pre_bias, model.unit_norm_decoder, model.W_enc.dtype) == (K, not transcode, True,
                                                                                    torch.float64)
    assert not model.training
    assert_same(model, ref_sparsify, w, cfg, x)


def test_sparsify_save_back_is_byte_identical(tmp_path) -> None:
    write_sparsify(tmp_path / "a")
    save_sparsify(load_sparsify(tmp_path / "a"), tmp_path / "b")
    assert (tmp_path / "a/sae.safetensors").read_bytes() == (tmp_path / "b/sae.safetensors").read_bytes()
    a, b = (json.loads((tmp_path / p / "cfg.json").read_text()) for p in "ab")
    assert list(a) == list(b)  # every field, in sparsify's order
    assert {k: v for k, v in a.items() if k != "expansion_factor"} == \
        {k: v for k, v in b.items() if k != "expansion_factor"}  # ignored when num_latents > 0


def test_sparsify_expansion_factor_and_float32(tmp_path, x) -> None:
    w, cfg = write_sparsify(tmp_path / "sp", dtype=np.float32, num_latents=0, expansion_factor=D_SAE // D_IN + 0)
    # d_sae = d_in · expansion_factor when num_latents is 0: 6·2 = 12 ≠ 16, so the shapes must not match
    with pytest.raises(CheckpointError, match=r"sae.safetensors: 'encoder.weight' has shape \(16, 6\), "
                                              r"expected \(12, 6\)"):
        load_sparsify(tmp_path / "sp")
    w, cfg = write_sparsify(tmp_path / "sp32", dtype=np.float32)
    model = load_sparsify(tmp_path / "sp32")
    assert model.W_enc.dtype == torch.float32
    assert_same(model, ref_sparsify, {k: v.astype(np.float64) for k, v in w.items()}, cfg, x.astype(np.float32),
                tol=2e-5)


def test_save_sparsify_folds_the_bias_of_a_model_without_pre_bias(tmp_path, x) -> None:
    torch.manual_seed(0)
    model = SparseAutoencoder(D_IN, D_SAE, "topk", k=K, pre_bias=False, dtype=torch.float64).eval()
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_enc.normal_()
    save_sparsify(model, tmp_path / "sp")
    w = np_load(str(tmp_path / "sp/sae.safetensors"))
    cfg = json.loads((tmp_path / "sp/cfg.json").read_text())
    assert cfg["transcode"] is False and cfg["num_latents"] == D_SAE and cfg["normalize_decoder"] is False
    # the file, run as sparsify runs it (subtracting b_dec), gives the model's outputs
    code, recon = encode_decode(model, x)
    ref_code, ref_recon = ref_sparsify(w, cfg, x)
    np.testing.assert_allclose(code, ref_code, atol=1e-10)
    np.testing.assert_allclose(recon, ref_recon, atol=1e-10)


def test_save_sparsify_of_a_tied_model(tmp_path, x) -> None:
    model = SparseAutoencoder(D_IN, D_SAE, "topk", k=K, tied=True, pre_bias=True, dtype=torch.float64).eval()
    save_sparsify(model, tmp_path / "sp")
    loaded = load_sparsify(tmp_path / "sp")
    np.testing.assert_array_equal(loaded.W_dec.detach().numpy(), model.W_enc.detach().numpy())
    np.testing.assert_allclose(encode_decode(loaded, x)[1], encode_decode(model, x)[1], atol=1e-12)


# ------------------------------------------------------------------ SAELens, by the layout
@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_layout_loads_and_matches_numpy(tmp_path, x, architecture, apply_b_dec) -> None:
    w, cfg = write_saelens(tmp_path / "sl", architecture, apply_b_dec_to_input=apply_b_dec)
    model = load_saelens(tmp_path / "sl")
    assert model.pre_bias is apply_b_dec and model.W_enc.dtype == torch.float64
    assert type(model.activation).__name__ == {"standard": "ReLU", "topk": "TopK", "jumprelu": "JumpReLU"}[architecture]
    assert_same(model, ref_saelens, w, cfg, x)


def test_saelens_topk_with_decoder_norm_rescaling(tmp_path, x) -> None:
    w, cfg = write_saelens(tmp_path / "sl", "topk", rescale_acts_by_decoder_norm=True)
    model = load_saelens(tmp_path / "sl")
    # folded: unit-norm atoms, so the model keeps them unit norm if training goes on
    assert model.unit_norm_decoder
    np.testing.assert_allclose(model.atoms.detach().norm(dim=1).numpy(), 1.0, atol=1e-12)
    assert_same(model, ref_saelens, w, cfg, x)
    save_saelens(model, tmp_path / "back")
    back = json.loads((tmp_path / "back/cfg.json").read_text())
    assert back["rescale_acts_by_decoder_norm"] is False
    assert_same(load_saelens(tmp_path / "back"), ref_saelens, w, cfg, x)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_saelens_save_back_is_byte_identical(tmp_path, architecture) -> None:
    _, cfg = write_saelens(tmp_path / "a", architecture)
    save_saelens(load_saelens(tmp_path / "a"), tmp_path / "b", metadata={"hook_name": "blocks.0.hook_resid_post"})
    a, b = (tmp_path / f"{p}/sae_weights.safetensors" for p in "ab")
    assert a.read_bytes() == b.read_bytes()
    back = json.loads((tmp_path / "b/cfg.json").read_text())
    assert list(back) == list(cfg)  # SAEConfig's field order, architecture last
    assert {k: v for k, v in back.items() if k != "metadata"} == {k: v for k, v in cfg.items() if k != "metadata"}
    assert back["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert back["metadata"]["sae_lens_version"] == "6.0.0"  # the layout written, so SAELens skips its pre-6 path


def test_saelens_jumprelu_thresholds(tmp_path, x) -> None:
    w, cfg = write_saelens(tmp_path / "sl", "jumprelu")
    thresholds = w["threshold"].copy()
    thresholds[:4] = [0.0, -0.3, -2.0, 0.0]  # θ <= 0: SAELens' ReLU(z)·H(z − θ) is ReLU(z)
    np_save(w | {"threshold": thresholds}, str(tmp_path / "sl/sae_weights.safetensors"))
    model = load_saelens(tmp_path / "sl")
    assert_same(model, ref_saelens, w | {"threshold": thresholds}, cfg, x)
    save_saelens(model, tmp_path / "back")
    saved = np_load(str(tmp_path / "back/sae_weights.safetensors"))
    np.testing.assert_allclose(saved["threshold"], np.maximum(thresholds, 0), rtol=1e-12)
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_array_equal(saved[key], w[key])
    # an older file with log_threshold instead of threshold
    np_save({k: v for k, v in w.items() if k != "threshold"} | {"log_threshold": np.log(w["threshold"])},
            str(tmp_path / "sl/sae_weights.safetensors"))
    assert_same(load_saelens(tmp_path / "sl"), ref_saelens, w, cfg, x)


def test_saelens_pre_6_config_and_dtypes(tmp_path, x) -> None:
    # SAELens 5.x: no 'architecture'; a topk SAE said so through activation_fn_str + activation_fn_kwargs
    w, cfg = write_saelens(tmp_path / "old", "topk", file_dtype="torch.float32")
    old = {k: v for k, v in cfg.items() if k not in ("architecture", "k", "rescale_acts_by_decoder_norm", "metadata")}
    old |= {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "normalize_activations": False,
            "sae_lens_training_version": "5.1.0"}
    (tmp_path / "old/cfg.json").write_text(json.dumps(old))
    model = load_saelens(tmp_path / "old")
    assert model.k == K and model.W_enc.dtype == torch.float32
    assert_same(model, ref_saelens, {k: v.astype(np.float64) for k, v in w.items()},
                cfg | {"architecture": "topk", "k": K}, x.astype(np.float32), tol=2e-5)
    # the config's dtype wins over the file's (SAELens casts), and the caller's over both
    write_saelens(tmp_path / "bf", "standard", file_dtype="float32")
    (tmp_path / "bf/cfg.json").write_text(json.dumps(json.loads((tmp_path / "bf/cfg.json").read_text())
                                                     | {"dtype": "torch.bfloat16"}))
    assert load_saelens(tmp_path / "bf").W_enc.dtype == torch.bfloat16
    assert load_saelens(tmp_path / "bf", dtype=torch.float64).W_dec.dtype == torch.float64


def test_save_saelens_of_actsparse_models(tmp_path, x) -> None:
    torch.manual_seed(0)
    relu = SparseAutoencoder(D_IN, D_SAE, "relu", dtype=torch.float64).eval()
    save_saelens(relu, tmp_path / "relu")
    cfg = json.loads((tmp_path / "relu/cfg.json").read_text())
    assert (cfg["architecture"], cfg["apply_b_dec_to_input"], cfg["dtype"]) == ("standard", False, "float64")
    np.testing.assert_allclose(encode_decode(relu, x)[1],
                               ref_saelens(np_load(str(tmp_path / "relu/sae_weights.safetensors")), cfg, x)[1],
                               atol=1e-12)
    # a trained BatchTopK keeps units above one threshold at inference: written as a JumpReLU SAE
    btk = SparseAutoencoder(D_IN, D_SAE, "batchtopk", k=K, pre_bias=True, dtype=torch.float64)
    with pytest.raises(CheckpointError, match="no inference threshold"):
        save_saelens(btk, tmp_path / "btk")
    btk(torch.as_tensor(x))  # one training-mode batch sets the threshold
    btk.eval()
    save_saelens(btk, tmp_path / "btk")
    w = np_load(str(tmp_path / "btk/sae_weights.safetensors"))
    cfg = json.loads((tmp_path / "btk/cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and w["threshold"].shape == (D_SAE,)
    code, recon = encode_decode(btk, x)
    np.testing.assert_allclose(code, ref_saelens(w, cfg, x)[0], atol=1e-12)
    np.testing.assert_allclose(recon, ref_saelens(w, cfg, x)[1], atol=1e-12)


# ------------------------------------------------------------------ detection and errors
def test_load_sae_detects_each_layout(tmp_path, x) -> None:
    from actsparse.config import TrainConfig
    from actsparse.train import train

    w, cfg = write_sparsify(tmp_path / "sp")
    ws, cfgs = write_saelens(tmp_path / "sl", "jumprelu")
    run = tmp_path / "run"
    run.mkdir()
    native = train(TrainConfig(hidden=8, iterations=3, validation=0.0, plots=False, progress=False),
                   torch.rand(50, D_IN), run_dir=run).model
    assert [detect_layout(tmp_path / p) for p in ("sp", "sl", "run")] == ["sparsify", "saelens", "actsparse"]
    assert detect_layout(tmp_path / "sl/cfg.json") == "saelens"  # a file stands for its folder
    assert_same(load_sae(tmp_path / "sp"), ref_sparsify, w, cfg, x)
    assert_same(load_sae(tmp_path / "sl"), ref_saelens, ws, cfgs, x)
    loaded = load_sae(run)
    for name, t in native.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, rtol=0, atol=0)
    assert load_sae(tmp_path / "sp", dtype=torch.float32).W_enc.dtype == torch.float32


def test_loading_leaves_the_rng_alone(tmp_path) -> None:
    write_saelens(tmp_path / "sl", "topk")
    state = torch.get_rng_state()
    load_saelens(tmp_path / "sl")
    assert torch.equal(torch.get_rng_state(), state)


def test_errors_name_the_file_and_the_key(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/notes.txt").write_text("")
    with pytest.raises(CheckpointError, match=r"not a known checkpoint layout \(found: notes.txt\)"):
        load_sae(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sae(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"empty/cfg.json is missing"):
        load_saelens(tmp_path / "empty")
    (tmp_path / "empty/cfg.json").write_text(json.dumps({"d_in": 2, "d_sae": 4, "architecture": "standard"}))
    with pytest.raises(FileNotFoundError, match=r"empty/sae_weights.safetensors is missing"):
        load_saelens(tmp_path / "empty")
    write_saelens(tmp_path / "nokey", "jumprelu", drop=("threshold",))
    with pytest.raises(CheckpointError, match=r"nokey/sae_weights.safetensors: missing key 'log_threshold'"):
        load_saelens(tmp_path / "nokey")
    write_saelens(tmp_path / "shape", "standard", d_sae=D_SAE + 1)
    with pytest.raises(CheckpointError, match=r"sae_weights.safetensors: 'W_enc' has shape \(6, 16\), expected "
                                              r"\(6, 17\) = \(d_in=6, d_sae=17\)"):
        load_saelens(tmp_path / "shape")
    write_saelens(tmp_path / "extra", "standard")
    np_save(np_load(str(tmp_path / "extra/sae_weights.safetensors")) | {"W_skip": np.zeros((D_IN, D_IN))},
            str(tmp_path / "extra/sae_weights.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected key.*W_skip"):
        load_saelens(tmp_path / "extra")
    for changes, match in [({"architecture": "matching_pursuit"}, "'architecture' 'matching_pursuit' is not supported"),
                           ({"architecture": "batchtopk"}, "save_inference_model"),
                           ({"normalize_activations": "layer_norm"}, "'normalize_activations' 'layer_norm'"),
                           ({"dtype": "int8"}, "'dtype' 'int8' is not one of"),
                           ({"d_in": "six"}, "'d_in' must be an integer"),
                           ({"k": 99}, "'k' 99 is larger than d_sae 16")]:
        write_saelens(tmp_path / "bad", "topk", **changes)
        with pytest.raises(CheckpointError, match=match):
            load_saelens(tmp_path / "bad")
    for changes, match in [({"activation": "groupmax"}, "'activation' 'groupmax' is not supported"),
                           ({"skip_connection": True}, "'skip_connection' true is not supported"),
                           ({"k": None}, "'k' must be an integer")]:
        write_sparsify(tmp_path / "bads", **changes)
        with pytest.raises(CheckpointError, match=match):
            load_sparsify(tmp_path / "bads")
    (tmp_path / "bads/cfg.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"bads/cfg.json: not valid JSON"):
        load_sparsify(tmp_path / "bads")
    (tmp_path / "bads/cfg.json").write_text(json.dumps({"d_in": D_IN, "k": K, "num_latents": D_SAE}))
    (tmp_path / "bads/sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"bads/sae.safetensors: not a readable safetensors file"):
        load_sparsify(tmp_path / "bads")


def test_models_a_layout_cannot_hold(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="sparsify SAEs are TopK; this model's activation is ReLU"):
        save_sparsify(SparseAutoencoder(4, 8, "relu"), tmp_path / "a")
    with pytest.raises(CheckpointError, match="SAELens has no Sigmoid SAE"):
        save_saelens(SparseAutoencoder(4, 8, "sigmoid"), tmp_path / "a")
    with pytest.raises(CheckpointError, match="decoders are linear; this model has a sigmoid decoder"):
        save_saelens(SparseAutoencoder(4, 8, "relu", decoder="sigmoid"), tmp_path / "a")
    with pytest.raises(TypeError, match="takes an actsparse SparseAutoencoder"):
        save_saelens(torch.nn.Linear(2, 2), tmp_path / "a")


# ------------------------------------------------------------------ against the packages
def _rel_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-6) -> None:
    """Equal to ``tol`` relative to the output's scale (float32 sums in another order differ in the last bits)."""
    scale = max(float(theirs.abs().max()), 1.0)
    err = float((ours.double() - theirs.double()).abs().max())
    assert err <= tol * scale, f"max difference {err:.3g} > {tol:g} · {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_against_sparsify(tmp_path, dtype) -> None:
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K), dtype=dtype)
    with torch.no_grad():
        coder.b_dec.normal_()
        coder.encoder.bias.normal_(0, 0.3)
    coder.save_to_disk(tmp_path / "theirs")
    x = torch.randn(N, D_IN, dtype=dtype)

    def theirs(c, x):
        with torch.no_grad():
            acts, idx, _ = c.encode(x)
            return torch.zeros(N, D_SAE, dtype=dtype).scatter(-1, idx, acts), c.decode(acts, idx)

    ours = load_sparsify(tmp_path / "theirs")
    with torch.no_grad():
        code = ours.encode(x)
        ref_code, ref_recon = theirs(coder, x)
        _rel_close(code, ref_code)
        _rel_close(ours.decode(code), ref_recon)
    # our files, read by sparsify: a model without pre_bias (bias folded) and a tied one
    for kwargs in ({"pre_bias": False}, {"pre_bias": True, "tied": True}):
        model = SparseAutoencoder(D_IN, D_SAE, "topk", k=K, dtype=dtype, **kwargs).eval()
        with torch.no_grad():
            model.b_dec.normal_()
        save_sparsify(model, tmp_path / "ours")
        back = sparsify.SparseCoder.load_from_disk(tmp_path / "ours")
        with torch.no_grad():
            ref_code, ref_recon = theirs(back, x)
            _rel_close(model.encode(x), ref_code)
            _rel_close(model.decode(model.encode(x)), ref_recon)


def _saelens_models(sae_lens, dtype: str):
    return {
        "standard": sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype=dtype)),
        "standard_no_b_dec": sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype=dtype,
                                                                             apply_b_dec_to_input=False)),
        "topk": sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, dtype=dtype)),
        "topk_rescaled": sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, dtype=dtype,
                                                                 rescale_acts_by_decoder_norm=True)),
        "jumprelu": sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype=dtype)),
    }


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_against_saelens(tmp_path, dtype) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    torch.manual_seed(0)
    x = torch.randn(N, D_IN, dtype=getattr(torch, dtype))
    for name, sae in _saelens_models(sae_lens, dtype).items():
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_()
            if name == "jumprelu":
                sae.threshold.uniform_(-0.5, 1.5)  # some θ <= 0
        sae.save_model(tmp_path / name)
        ours = load_saelens(tmp_path / name)
        with torch.no_grad():
            code = ours.encode(x)
            _rel_close(code, sae.encode(x))
            _rel_close(ours.decode(code), sae.decode(sae.encode(x)))
            assert int((code != 0).sum()) > 0
        # and back: our file read by SAELens' own loader
        save_saelens(ours, tmp_path / f"{name}_back")
        back = sae_lens.SAE.load_from_disk(tmp_path / f"{name}_back")
        assert type(back) is type(sae)
        with torch.no_grad():
            _rel_close(back.encode(x), sae.encode(x))
            _rel_close(back.decode(back.encode(x)), sae.decode(sae.encode(x)))


def test_against_saelens_training_saes_and_batchtopk(tmp_path) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    torch.manual_seed(0)
    x = torch.randn(N, D_IN)
    # a training TopK SAE (rescale_acts_by_decoder_norm on by default) saved for inference
    train_sae = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    with torch.no_grad():
        train_sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
        train_sae.b_dec.normal_()
    train_sae.save_inference_model(tmp_path / "topk_train")
    ours = load_saelens(tmp_path / "topk_train")
    reference = sae_lens.SAE.load_from_disk(tmp_path / "topk_train")
    with torch.no_grad():
        _rel_close(ours.encode(x), reference.encode(x))
        _rel_close(ours.decode(ours.encode(x)), reference.decode(reference.encode(x)))
    # an actsparse BatchTopK SAE, read by SAELens as the JumpReLU SAE it is at inference
    btk = SparseAutoencoder(D_IN, D_SAE, "batchtopk", k=K, pre_bias=True)
    btk(x)
    btk.eval()
    save_saelens(btk, tmp_path / "btk")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "btk")
    assert type(theirs).__name__ == "JumpReLUSAE"
    with torch.no_grad():
        _rel_close(btk.encode(x), theirs.encode(x))
        _rel_close(btk.decode(btk.encode(x)), theirs.decode(theirs.encode(x)))


def test_a_loaded_model_trains_on(tmp_path) -> None:
    from actsparse.train import minibatch_optimizer, train_step

    write_sparsify(tmp_path / "sp", dtype=np.float32)
    model = load_sparsify(tmp_path / "sp").train()
    assert all(p.requires_grad and p.is_leaf for p in model.parameters())
    opt = minibatch_optimizer("sgd", model.parameters(), 1e-2)
    x = torch.randn(32, D_IN)
    first = float(train_step(model, opt, x).loss)
    for _ in range(20):
        last = float(train_step(model, opt, x).loss)
    assert last < first
    torch.testing.assert_close(model.atoms.detach().norm(dim=1), torch.ones(D_SAE))  # normalize_decoder kept


def test_example_runs(tmp_path) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "interop_checkpoints.py"
    spec = importlib.util.spec_from_file_location("interop_checkpoints", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    diffs = example.main(["--out", str(tmp_path)])
    assert {"actsparse-run", "sparsify", "saelens"} <= set(diffs)
    assert max(diffs.values()) < 1e-5, diffs
