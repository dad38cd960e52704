"""The SAE families (Gated, Matryoshka, JumpReLU with θ stored directly, Lp annealing, resampling)
in checkpoints: SAELens' ``gated`` layout, Matryoshka models exported as their activation's SAE,
and bit-identical resume through :func:`actsparse.train.train` for each new architecture.

The Gated references are written here from SAELens' format (``sae_lens/saes/gated_sae.py``,
``GatedSAE.encode``), in NumPy, not from actsparse's code:
``f = 1[x' W_enc + b_gate > 0] · ReLU(x' (W_enc · exp(r_mag)) + b_mag)``, ``x' = x − b_dec`` when
``apply_b_dec_to_input``, ``x̂ = f W_dec + b_dec``, with ``W_enc`` ``(d_in, d_sae)``.
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

from actsparse.interop import CheckpointError, load_sae, load_saelens, save_saelens, save_sparsify  # noqa: E402
from actsparse.models import SparseAutoencoder  # noqa: E402

D_IN, D_SAE, N = 6, 16, 64


def ref_gated(w: dict[str, np.ndarray], cfg: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAELens' GatedSAE forward, from its format's definition."""
    x_in = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    gate = x_in @ w["W_enc"] + w["b_gate"]
    mag = x_in @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"]
    code = (gate > 0) * np.maximum(mag, 0)
    return code, code @ w["W_dec"] + w["b_dec"]


def encode_decode(model: SparseAutoencoder, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        h = model.encode(torch.as_tensor(x, dtype=model.W_enc.dtype))
        return h.double().numpy(), model.decode(h).double().numpy()


def gated_model(pre_bias: bool, seed: int = 0) -> SparseAutoencoder:
    """A float64 Gated SAE with every parameter random (r_mag and b_mag are 0 at init: a test with
    them at 0 could not tell b_gate from b_mag, or notice a missing exp)."""
    torch.manual_seed(seed)
    m = SparseAutoencoder(D_IN, D_SAE, "gated", pre_bias=pre_bias, dtype=torch.float64)
    with torch.no_grad():
        m.b_enc.normal_(0, 0.3)
        m.b_dec.normal_()
        m.activation.r_mag.normal_(0, 0.5)
        m.activation.b_mag.normal_(0, 0.3)
    return m.eval()


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(N, D_IN))


# ------------------------------------------------------------------ Gated
@pytest.mark.parametrize("pre_bias", [True, False])
def test_gated_round_trip_and_the_formula_of_the_format(tmp_path, x, pre_bias) -> None:
    model = gated_model(pre_bias)
    save_saelens(model, tmp_path / "g")
    cfg = json.loads((tmp_path / "g/cfg.json").read_text())
    w = np_load(str(tmp_path / "g/sae_weights.safetensors"))
    assert cfg["architecture"] == "gated" and cfg["apply_b_dec_to_input"] is pre_bias
    assert sorted(w) == ["W_dec", "W_enc", "b_dec", "b_gate", "b_mag", "r_mag"]  # no b_enc in this layout
    assert w["W_enc"].shape == (D_IN, D_SAE) and w["W_dec"].shape == (D_SAE, D_IN)
    code, recon = encode_decode(model, x)
    ref_code, ref_recon = ref_gated(w, cfg, x)
    # the gate and the magnitude disagree somewhere, or the test could not tell them apart
    gate_open = (x - w["b_dec"] * pre_bias) @ w["W_enc"] + w["b_gate"] > 0
    assert 0 < int(code.astype(bool).sum()) < int(gate_open.sum())
    np.testing.assert_allclose(code, ref_code, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(recon, ref_recon, rtol=1e-12, atol=1e-12)

    back = load_saelens(tmp_path / "g")
    assert type(back.activation).__name__ == "Gated" and back.pre_bias is pre_bias and not back.training
    assert back.W_enc.dtype == torch.float64
    for name, t in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], t, rtol=0, atol=0)
    code2, recon2 = encode_decode(back, x)
    np.testing.assert_array_equal(code2, code)
    np.testing.assert_array_equal(recon2, recon)
    assert load_sae(tmp_path / "g").activation.r_mag.shape == (D_SAE,)  # through the layout detection too


def test_gated_file_written_by_hand_loads(tmp_path, x) -> None:
    """A file written from the layout alone (not by save_saelens), in float32."""
    rng = np.random.default_rng(3)
    w = {"W_enc": rng.normal(size=(D_IN, D_SAE)), "b_gate": rng.normal(0, 0.3, D_SAE),
         "r_mag": rng.normal(0, 0.5, D_SAE), "b_mag": rng.normal(0, 0.3, D_SAE),
         "W_dec": rng.normal(size=(D_SAE, D_IN)), "b_dec": rng.normal(size=D_IN)}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12"}, "architecture": "gated"}
    (tmp_path / "h").mkdir()
    np_save(w, str(tmp_path / "h/sae_weights.safetensors"))
    (tmp_path / "h/cfg.json").write_text(json.dumps(cfg))
    model = load_saelens(tmp_path / "h", dtype=torch.float64)  # float32 values, computed in float64
    ref_code, ref_recon = ref_gated({k: v.astype(np.float64) for k, v in w.items()}, cfg, x)
    code, recon = encode_decode(model, x)
    assert int((code != 0).sum()) > 0
    np.testing.assert_allclose(code, ref_code, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(recon, ref_recon, rtol=1e-12, atol=1e-12)


def _gated_file(path: Path, mutate) -> None:
    save_saelens(gated_model(True), path)
    w = np_load(str(path / "sae_weights.safetensors"))
    mutate(w)
    np_save(w, str(path / "sae_weights.safetensors"))


def test_bad_gated_files_name_the_key(tmp_path) -> None:
    _gated_file(tmp_path / "a", lambda w: w.pop("r_mag"))
    with pytest.raises(CheckpointError, match=r"a/sae_weights.safetensors: missing key 'r_mag'"):
        load_saelens(tmp_path / "a")
    _gated_file(tmp_path / "b", lambda w: w.__setitem__("b_mag", np.zeros(D_SAE + 1)))
    with pytest.raises(CheckpointError, match=r"'b_mag' has shape \(17,\), expected \(16,\)"):
        load_saelens(tmp_path / "b")
    _gated_file(tmp_path / "c", lambda w: w.__setitem__("b_enc", w.pop("b_gate")))  # a standard SAE's bias name
    with pytest.raises(CheckpointError, match="missing key 'b_gate'"):
        load_saelens(tmp_path / "c")
    _gated_file(tmp_path / "d", lambda w: w["r_mag"].__setitem__(3, np.inf))
    with pytest.raises(CheckpointError, match="'r_mag' has 1 non-finite value"):
        load_saelens(tmp_path / "d")
    _gated_file(tmp_path / "e", lambda w: w.__setitem__("threshold", np.zeros(D_SAE)))
    with pytest.raises(CheckpointError, match="unexpected key.*threshold"):
        load_saelens(tmp_path / "e")
    with pytest.raises(CheckpointError, match="sparsify SAEs are TopK; this model's activation is Gated"):
        save_sparsify(gated_model(True), tmp_path / "f")


# ------------------------------------------------------------------ Matryoshka
def _train_a_few_steps(model: SparseAutoencoder, x: torch.Tensor, steps: int = 5) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()


def test_matryoshka_batchtopk_exports_as_jumprelu_with_its_threshold(tmp_path, x) -> None:
    torch.manual_seed(0)
    model = SparseAutoencoder(D_IN, D_SAE, "batchtopk", k=3, pre_bias=True, recon_loss="mse", matryoshka=(4, 8),
                              dtype=torch.float64)
    _train_a_few_steps(model, torch.as_tensor(x))
    theta = float(model.activation.threshold)
    assert theta > 0
    save_saelens(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m/cfg.json").read_text())
    w = np_load(str(tmp_path / "m/sae_weights.safetensors"))
    assert cfg["architecture"] == "jumprelu"
    np.testing.assert_array_equal(w["threshold"], np.full(D_SAE, theta))  # the learned inference threshold
    # the prefix sizes, where SAELens' save_inference_model keeps a matryoshka_batchtopk SAE's widths
    assert cfg["metadata"]["training_architecture"] == "matryoshka_batchtopk"
    assert cfg["metadata"]["training_architecture_details"] == {"matryoshka_widths": [4, 8, D_SAE], "k": 3}

    back = load_saelens(tmp_path / "m")
    assert back.matryoshka == (4, 8, D_SAE)
    code, recon = encode_decode(model, x)
    assert 0 < int((code != 0).sum()) < code.size
    # an independent reference: eval-mode BatchTopK keeps ReLU(z) above θ
    z = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    np.testing.assert_allclose(code, np.maximum(z, 0) * (z > theta), rtol=1e-12, atol=1e-12)
    code2, recon2 = encode_decode(back, x)
    np.testing.assert_array_equal(code2, code)
    np.testing.assert_array_equal(recon2, recon)
    with torch.no_grad():  # the prefixes of the reloaded model reconstruct as the original's
        a, b = model.prefix_metrics(torch.as_tensor(x)), back.prefix_metrics(torch.as_tensor(x))
    assert a == b and len(a) == 3


def test_matryoshka_topk_exports_as_topk(tmp_path, x) -> None:
    torch.manual_seed(1)
    model = SparseAutoencoder(D_IN, D_SAE, "topk", k=3, pre_bias=True, matryoshka=(5,), dtype=torch.float64).eval()
    save_saelens(model, tmp_path / "t")
    cfg = json.loads((tmp_path / "t/cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"]) == ("topk", 3)
    assert "training_architecture" not in cfg["metadata"]  # SAELens has no Matryoshka TopK training SAE
    assert cfg["metadata"]["training_architecture_details"] == {"matryoshka_widths": [5, D_SAE]}
    back = load_saelens(tmp_path / "t")
    assert back.matryoshka == (5, D_SAE) and back.k == 3
    np.testing.assert_array_equal(encode_decode(back, x)[1], encode_decode(model, x)[1])


def test_bad_matryoshka_widths_are_named(tmp_path) -> None:
    model = SparseAutoencoder(D_IN, D_SAE, "topk", k=3, matryoshka=(5,)).eval()
    for widths in ([8, 4], [0, 8], [4, D_SAE + 1], "4,8", []):
        save_saelens(model, tmp_path / "w", metadata={"training_architecture_details": {"matryoshka_widths": widths}})
        with pytest.raises(CheckpointError, match=r"'metadata.training_architecture_details.matryoshka_widths' "
                                                  r"must be a non-empty, strictly increasing list"):
            load_saelens(tmp_path / "w")


# ------------------------------------------------------------------ against SAELens (skipped without it)
def test_gated_and_matryoshka_against_saelens(tmp_path) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig

    x = torch.randn(N, D_IN, dtype=torch.float64)
    ours = gated_model(True)
    save_saelens(ours, tmp_path / "ours")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "ours")
    assert type(theirs) is GatedSAE
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-12, atol=1e-12)
    torch.manual_seed(0)
    g = GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float64", apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in g.parameters():
            p.normal_(0, 0.5)
    g.save_model(tmp_path / "theirs")
    back = load_saelens(tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), g.encode(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(back.decode(back.encode(x)), g.decode(g.encode(x)), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ resume, bit for bit
GROUND_TRUTH = "ground-truth:n_features=64,d=16,mean_active=3,hierarchy=none"
RESUME_CASES = {
    "gated-l1": dict(activation="gated", penalty="l1"),
    "jumprelu-l0": dict(activation="jumprelu", penalty="l0"),
    "jumprelu-l0-target": dict(activation="jumprelu", penalty="l0", target_l0=4.0),
    "matryoshka-batchtopk": dict(activation="batchtopk", k=4, matryoshka=(8, 32)),
    "relu-lp-annealed": dict(activation="relu", penalty="lp", p_end=0.5),
    "topk-resample": dict(activation="topk", k=4, resample_every=5, dead_after=64),
}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_bit_identical(tmp_path, case) -> None:
    """An uninterrupted run of 40 steps (8 epochs of 5) vs the same run stopped after its
    checkpoint at step 28 (mid-epoch) and resumed to the end: the final weights and buffers are
    equal bit for bit, and so is the logged loss. The stop is a KeyboardInterrupt from the logging
    callback at step 30, so the resumed run redoes steps 29 and 30."""
    from actsparse import checkpoint as ck
    from actsparse.config import TrainConfig
    from actsparse.data import load_data
    from actsparse.train import train

    kw = dict(data=GROUND_TRUTH, samples=320, recipe="sae", hidden=32, optimizer="adam", lr=3e-3, batch_size=64,
              epochs=8, validation=0.0, checkpoint_every=7, plots=False, progress=False, device="cpu",
              threads=1, seed=5, **RESUME_CASES[case])
    cfg = TrainConfig(**kw)
    x = load_data(cfg).x
    assert x.shape == (320, 16)
    resampled: list[int] = []

    def count_resamples(model) -> None:
        if getattr(model, "resample_every", None):
            inner = model.resample_dead
            model.resample_dead = lambda *a, **k: resampled.append(inner(*a, **k)) or resampled[-1]

    full = train(cfg, x, on_start=count_resamples)
    n_full = sum(resampled)

    def stop(rec) -> None:
        if rec["step"] == 30:
            raise KeyboardInterrupt

    run = tmp_path / "cut"
    run.mkdir()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, x, run_dir=run, on_step=stop, on_start=count_resamples)
    assert ck.load_latest(run)[0]["step"] == 28
    before = sum(resampled)
    logged: list[int] = []
    resumed = train(TrainConfig(resume=True, **kw), x, run_dir=run, on_start=count_resamples,
                    on_step=lambda rec: logged.append(rec["step"]))
    assert logged == [30, 40]  # it continued from step 28 (a run from scratch would also end equal)
    if cfg.resample_every:  # resampling happened, also after the resume
        assert n_full > 0 and sum(resampled) > before
    a, b = _state(full.model), _state(resumed.model)
    assert a.keys() == b.keys()
    diff = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not diff, diff
    losses = [r["loss"] for r in full.history]
    assert [r["loss"] for r in resumed.history] == losses
    assert losses[-1] < losses[0]  # it trained: not equal because nothing moved
