"""SAE recipes on the command line, ``--data ground-truth``, and metrics against the true features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actsparse.cli import main
from actsparse.config import ConfigError, TrainConfig
from actsparse.data import GROUND_TRUTH_DEFAULTS, ground_truth_source, load_data
from actsparse.data.ground_truth import GroundTruth

SMALL = "ground-truth:n_features=64,d=16,mean_active=3,hierarchy=4/2/2"
FAST = ["--data", SMALL, "--hidden", "32", "--samples", "600", "--epochs", "2", "--batch-size", "64",
        "--no-progress", "--no-plots", "--threads", "1"]


# ------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("fields, expect", [
    ({}, dict(decoder="sigmoid", optimizer="lbfgs", penalty="kl", weight=3.0, pre_bias=False, weight_decay=1e-4,
              clip_grad=None)),
    ({"activation": "relu", "data": "ground-truth"},
     dict(decoder="linear", optimizer="adam", penalty="l1", weight=1.0, pre_bias=True, weight_decay=0.0,
          init_scale=0.1, unit_norm_decoder=False, clip_grad=1.0)),
    ({"activation": "jumprelu"}, dict(decoder="linear", penalty="l0", weight=0.1, init_scale=0.1)),
    ({"activation": "gated"}, dict(penalty="l1", unit_norm_decoder=False)),
    ({"activation": "topk", "k": 4}, dict(penalty=None, init_scale=0.1, unit_norm_decoder=True, optimizer="adam")),
    ({"activation": "relu", "recipe": "sae"}, dict(decoder="linear", penalty="l1")),
    ({"activation": "topk", "k": 4, "recipe": "classic"}, dict(decoder="sigmoid", optimizer="lbfgs")),
    # a value given wins over the recipe's
    ({"activation": "relu", "data": "synthetic", "optimizer": "sgd", "weight": 0.5, "pre_bias": False},
     dict(optimizer="sgd", weight=0.5, pre_bias=False)),
])
def test_recipe_resolves_each_unset_field(fields, expect):
    cfg = TrainConfig(**fields)
    for name, value in expect.items():
        assert getattr(cfg, name) == value, name


def test_resolved_recipe_is_recorded_and_a_resume_keeps_it():
    cfg = TrainConfig(activation="relu", data="ground-truth")
    again = TrainConfig(**cfg.to_dict())  # as config.json is read back on resume
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("fields, message", [
    ({"init_scale": 0.1}, "--init-scale sets the SAE init"),
    ({"activation": "relu", "recipe": "sae", "init_scale": 0.0}, "--init-scale must be a finite number > 0"),
    ({"recipe": "modern"}, "--recipe must be auto, classic or sae"),
    ({"activation": "topk", "k": 4, "matryoshka": (8, 4)}, "--matryoshka sizes must increase"),
    ({"activation": "topk", "k": 4, "matryoshka": (8, 64)}, r"lie in \[1, --hidden 25\]"),
    ({"activation": "relu", "recipe": "sae", "p_end": 0.5}, "--p-end is the final p of --penalty lp"),
    ({"activation": "relu", "penalty": "lp", "p_end": 1.5}, r"--p-end must be in \(0, 1\]"),
    ({"activation": "topk", "k": 4, "resample_every": 10, "optimizer": "lbfgs"}, "--resample-every resamples"),
    ({"activation": "topk", "k": 4, "dead_after": 0}, "--dead-after must be a positive integer"),
    ({"activation": "topk", "k": 4, "auxk_coef": -1.0}, "--auxk-coef must be"),
    ({"activation": "topk", "k": 4, "clip_grad": -1.0}, "--clip-grad must be a finite number >= 0"),
    ({"activation": "topk", "k": 4, "lr_decay": 1.5}, "--lr-decay must be a fraction"),
    ({"final_samples": 0, "validation": 0.0}, "--final-samples 0 measures"),
    ({"activation": "jumprelu", "threshold": -0.1}, "initial θ and must be > 0"),
    ({"activation": "relu", "threshold": 0.1}, "apply only to --penalty frequency_kl|applies only to"),
])
def test_bad_sae_settings_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**fields)


# ------------------------------------------------------------------------------ the data source
def test_ground_truth_spec_parses_over_the_defaults():
    truth = ground_truth_source("ground-truth:n_features=128,d=24,hierarchy=none,correlation=0", seed=3)
    assert (truth.n_features, truth.d, truth.hierarchy, truth.correlation) == (128, 24, None, 0.0)
    assert truth.mean_active == GROUND_TRUTH_DEFAULTS["mean_active"]
    # the same generator as built by hand: the same features
    ref = GroundTruth(128, 24, GROUND_TRUTH_DEFAULTS["mean_active"], zipf_exponent=0.5, correlation=0.0,
                      magnitude_std=0.15, seed=3)
    torch.testing.assert_close(truth.features, ref.features, rtol=0, atol=0)


@pytest.mark.parametrize("spec, message", [
    ("ground-truth:n_featres=10", "did you mean 'n_features'"),
    ("ground-truth:d", "is not KEY=VALUE"),
    ("ground-truth:hierarchy=4x2", "hierarchy is n_roots/branching/depth"),
    ("ground-truth:d=abc", "d must be a number"),
    ("ground-truth:mean_active=0", "mean_active"),
])
def test_bad_ground_truth_specs(spec, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ground_truth_source(spec)


def test_load_data_draws_the_samples_of_its_seed():
    cfg = TrainConfig(data=SMALL, samples=300, activation="relu", seed=5)
    ds = load_data(cfg)
    truth = ground_truth_source(SMALL, seed=5)
    x, _ = truth.sample(300, 5)
    torch.testing.assert_close(ds.x, x, rtol=0, atol=0)
    assert ds.truth is not None and ds.true_features.shape == (64, 16)


# ------------------------------------------------------------------------------ runs and their metrics
def _independent_scores(run, truth: GroundTruth, seed: int) -> dict[str, float]:
    """MCC and F1 recomputed from the saved weights with NumPy and scipy alone."""
    from safetensors.numpy import load_file
    from scipy.optimize import linear_sum_assignment

    w = load_file(str(run / "model.safetensors"))
    atoms = w["W_dec"]
    t = truth.features.numpy().astype(np.float64)
    a = atoms.astype(np.float64)
    cos = np.abs((t / np.linalg.norm(t, axis=1, keepdims=True)) @ (a / np.linalg.norm(a, axis=1, keepdims=True)).T)
    r, c = linear_sum_assignment(-cos)
    return {"mcc": float(cos[r, c].mean())}


def test_a_ground_truth_run_reports_mcc_and_f1(tmp_path, capsys):
    assert main(["train", *FAST, "--activation", "topk", "--k", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dictionary recovery over 64 true features: MCC" in out and "F1" in out
    run = tmp_path / "sae"
    m = json.loads((run / "metrics.json").read_text())
    for key in ("mcc", "mmcs", "f1", "precision", "recall", "variance_explained", "heldout_l0", "true_l0",
                "dead_latents", "dense_latents"):
        assert key in m, key
    ref = _independent_scores(run, ground_truth_source(SMALL, seed=0), 0)
    assert m["mcc"] == pytest.approx(ref["mcc"], abs=1e-6)
    assert 0 <= m["f1"] <= 1 and m["heldout_l0"] <= 3 + 1e-9
    assert abs(m["true_l0"] - 3) < 0.2  # 20,000 fresh samples of a generator with mean L0 3


def test_eval_prints_the_ground_truth_metrics(tmp_path):
    from actsparse.cli import cmd_eval

    assert main(["train", *FAST, "--activation", "relu", "--out", str(tmp_path)]) == 0
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cmd_eval([str(tmp_path / "sae")]) == 0
    got = json.loads(buf.getvalue())
    saved = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    assert got["mcc"] == pytest.approx(saved["mcc"], abs=1e-9) and got["f1"] == pytest.approx(saved["f1"], abs=1e-9)


def test_a_npy_saved_with_its_truth_brings_features_and_codes(tmp_path):
    truth = GroundTruth(48, 12, 3.0, seed=1)
    paths = truth.save(tmp_path / "gt.npy", 500, seed=2, codes=True)
    assert paths["codes"].is_file()
    ds = load_data(TrainConfig(data=str(tmp_path / "gt.npy"), activation="relu"))
    torch.testing.assert_close(ds.true_features, truth.features, rtol=0, atol=0)
    assert ds.true_codes.shape == (500, 48) and "48 true features" in ds.description
    assert main(["train", "--data", str(tmp_path / "gt.npy"), "--recipe", "sae", "--activation", "relu",
                 "--hidden", "24", "--epochs", "1", "--out", str(tmp_path), "--no-progress", "--no-plots",
                 "--threads", "1"]) == 0
    m = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    assert {"mcc", "f1"} <= set(m)


def test_final_samples_zero_measures_the_validation_split(tmp_path):
    assert main(["train", *FAST, "--activation", "relu", "--final-samples", "0", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    assert m["fvu"] == pytest.approx(m["val_fvu"], rel=1e-12)


# ------------------------------------------------------------------------------ the JumpReLU threshold
def test_parameter_groups_give_the_jumprelu_threshold_its_own_rate():
    from actsparse.models import SparseAutoencoder
    from actsparse.train import parameter_groups

    m = SparseAutoencoder(8, 16, "jumprelu")
    groups = parameter_groups(m, 1e-3)
    by_lr = {g["lr"]: g["params"] for g in groups}
    assert set(by_lr) == {1e-3, 1e-2}
    assert by_lr[1e-2] == [m.activation.threshold]
    # every parameter in exactly one group
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in m.parameters())


def test_jumprelu_threshold_learns_in_bf16():
    """θ stays float32 in a bf16 model, so Adam's ~lr steps are not rounded away (bf16's spacing
    near 0.1 is 0.0005, larger than a step of 1e-4)."""
    from actsparse import L0
    from actsparse.models import JumpReLU, SparseAutoencoder
    from actsparse.train import train_step

    torch.manual_seed(0)
    m = SparseAutoencoder(16, 32, JumpReLU(32, init_threshold=0.1, bandwidth=0.2, threshold_lr_scale=1.0),
                          penalty=L0(1.0), recon_loss="mse").to(torch.bfloat16)
    assert m.activation.threshold.dtype == torch.float32 and m.W_enc.dtype == torch.bfloat16
    before = m.activation.threshold.detach().clone()
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    x = (torch.randn(256, 16) * 0.5).to(torch.bfloat16)
    for _ in range(5):
        train_step(m, opt, x)
    moved = (m.activation.threshold.detach() - before).abs()
    # units in the kernel's window moved by about lr a step, in float32
    assert float(moved.max()) == pytest.approx(5e-4, rel=0.3)
    assert m.activation.threshold.dtype == torch.float32


def test_the_sae_recipe_uses_saelens_loss_so_coefficients_mean_the_same():
    """``sse``: the squared error summed over the inputs, averaged over the batch (NumPy)."""
    from actsparse.build import build_model

    model = build_model(TrainConfig(activation="relu", data="ground-truth"), d_in=6)
    assert model.recon_loss == "sse" and model.penalty_on_decoder_norm
    x = torch.randn(10, 6, dtype=torch.float64)
    model = model.double()
    out = model(x)
    ref = ((out.reconstruction.detach().numpy() - x.numpy()) ** 2).sum(axis=1).mean()
    assert float(out.reconstruction_loss) == pytest.approx(ref, rel=1e-12)
    # and the L1 on the decoder-norm-weighted code, λ = 1
    h = out.code.detach().numpy() * np.linalg.norm(model.W_dec.detach().numpy(), axis=1)
    assert float(out.sparsity_loss) == pytest.approx(np.abs(h).sum(axis=1).mean(), rel=1e-12)


def test_lr_decay_factor_is_linear_over_the_last_fraction():
    from actsparse.train import lr_decay_factor

    total = 100
    assert [lr_decay_factor(s, total, 0.2) for s in (0, 79, 80, 90, 99)] == pytest.approx([1, 1, 1, 0.5, 0.05])
    assert lr_decay_factor(50, total, 0.0) == 1.0


def test_clip_grad_bounds_the_update_norm():
    from actsparse.models import SparseAutoencoder
    from actsparse.train import train_step

    torch.manual_seed(0)
    model = SparseAutoencoder(8, 16, "relu", recon_loss="sse")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt, 100 * torch.randn(32, 8), clip_grad=0.5)
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert float(moved) == pytest.approx(0.5, rel=1e-5)  # SGD at lr 1: the step is the clipped gradient


def test_frequency_kl_on_a_jumprelu_threshold_survives_many_steps():
    """The pairing the JumpReLU docstring once suggested crashed on the second backward (its θ was
    exp(log θ), a tensor computed once); θ is now the parameter itself."""
    import actsparse
    from actsparse.models import JumpReLU, SparseAutoencoder

    act = JumpReLU(16)
    model = SparseAutoencoder(8, 16, act, penalty=actsparse.FrequencyKL(0.1, threshold=act.threshold),
                              recon_loss="mse")
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    before = act.threshold.detach().clone()
    for _ in range(3):
        out = model(torch.randn(64, 8))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert not torch.equal(act.threshold.detach(), before)  # θ trained by both terms, step after step


def test_a_matryoshka_run_reports_each_prefix(tmp_path, capsys):
    """prefix_<m>_fvu against a NumPy re-computation from the saved weights: BatchTopK at inference
    keeps the units above its threshold θ; prefix m decodes the first m latents alone."""
    from safetensors.numpy import load_file

    assert main(["train", *FAST, "--activation", "batchtopk", "--k", "3", "--matryoshka", "8", "16", "32",
                 "--out", str(tmp_path)]) == 0
    assert "matryoshka prefixes: 8 latents FVU" in capsys.readouterr().out
    run = tmp_path / "sae"
    m = json.loads((run / "metrics.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(run / "model.safetensors")).items()}
    x = load_data(TrainConfig(data=SMALL, samples=600, activation="batchtopk", k=3)).x.numpy().astype(np.float64)
    z = np.maximum((x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"], 0)
    code = z * (z > w["activation.threshold"])
    total = ((x - x.mean(0)) ** 2).sum()
    for size in (8, 16, 32):
        x_hat = code[:, :size] @ w["W_dec"][:size] + w["b_dec"]
        assert m[f"prefix_{size}_fvu"] == pytest.approx(((x - x_hat) ** 2).sum() / total, rel=1e-4)
        assert m[f"prefix_{size}_l0"] == pytest.approx((code[:, :size] != 0).sum(1).mean(), rel=1e-6)


def test_ground_truth_benchmark_smoke(tmp_path):
    """bench/bench_ground_truth.py at its tiny size: every architecture trains and is scored, and the
    figure is drawn (the real run is in docs/benchmarks.md)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_ground_truth.py"
    out, png = tmp_path / "gt.json", tmp_path / "gt.png"
    r = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out), "--png", str(png)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["smoke"] is True
    assert {f"actsparse/{a}" for a in ("relu_l1", "p_anneal", "gated", "jumprelu", "topk", "batchtopk",
                                      "matryoshka")} <= set(res["table"])
    for row in res["table"].values():
        assert 0 <= row["mcc"] <= 1 and 0 <= row["f1"] <= 1
    assert png.stat().st_size > 10_000


def test_penalty_target_of_a_controlled_penalty_is_the_statistic_it_holds():
    """Figures draw a per-unit target line only for a per-unit statistic: an L0 target (units per
    sample) is not one; a rate or a mean is (the controller's own target, not --target's default)."""
    import actsparse
    from actsparse.evaluation import penalty_target
    from actsparse.models import SparseAutoencoder

    def target_of(penalty):
        return penalty_target(SparseAutoencoder(4, 8, "relu", penalty=penalty))

    assert target_of(actsparse.L1(1e-3).toward(l0=3)) is None
    assert target_of(actsparse.L1(1e-3).toward(rate=0.2)) == (0.2, "firing frequency")
    assert target_of(actsparse.PoissonKL(0.01).toward(mean=0.05)) == (0.05, "mean activation")
    assert target_of(actsparse.PoissonKL(0.01)) == (0.01, "mean activation")
    assert target_of(actsparse.L1(1e-3)) is None
