"""Synthetic ground truth: the metrics against NumPy, and SAEs that recover the true dictionary.

``make_synthetic`` draws sparse non-negative combinations of 64 random unit atoms in 32 dimensions
(mean L0 4). A TopK SAE and a ReLU + L1 SAE trained on it must find the atoms: MMCS ≥ 0.95.
Measured on 8 seeds with the settings below (20,000 samples, batch 128, 10 epochs of Adam 3e-3):
TopK + AuxK 0.980–0.993, ReLU + L1 0.975–0.998. Without AuxK, TopK leaves about 7 of its 64
latents dead and scores 0.954–0.973. ``pytest -s`` prints the numbers; ``-m slow`` runs two more
seeds.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from actsparse.data.synthetic import make_synthetic
from actsparse.metrics import fvu, l0, mmcs
from actsparse.models import SparseAutoencoder
from actsparse.penalties import L1

SEEDS = [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]




def train(model: SparseAutoencoder, x: torch.Tensor, *, epochs: int, batch_size: int, lr: float, seed: int) -> None:
    """Adam on minibatches, with the unit-norm decoder kept by projection and renormalisation."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=g).split(batch_size):
            out = model(x[idx])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            model.remove_parallel_gradient()
            opt.step()
            model.normalize_decoder()


def recover(activation: str, seed: int, **kwargs) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    syn = make_synthetic(20_000, d=32, n_features=64, active=4.0, seed=seed)
    model = SparseAutoencoder(32, 64, activation, unit_norm_decoder=True, init="orthogonal_tied", recon_loss="mse",
                              **kwargs)
    t = time.perf_counter()
    train(model, syn.x, epochs=10, batch_size=128, lr=3e-3, seed=seed)
    seconds = time.perf_counter() - t
    model.eval()
    with torch.no_grad():
        out = model(syn.x)
        score = float(mmcs(syn.features, model.decoder_weight.t()))
        f, n = float(fvu(syn.x, out.reconstruction)), float(l0(out.code))
    print(f"\n{activation} {kwargs} seed={seed}: MMCS {score:.4f}  FVU {f:.4f}  L0 {n:.2f}  ({seconds:.1f} s)")
    return score, f, n


@pytest.mark.parametrize("seed", SEEDS)
def test_topk_sae_recovers_the_dictionary(seed, one_thread):
    score, f, n = recover("topk", seed, k=4, auxk=16, dead_after=2000)
    assert score >= 0.95
    assert f < 0.3  # measured 0.11-0.13: top-4 truncates the samples with more than 4 active atoms
    assert n <= 4


@pytest.mark.parametrize("seed", SEEDS)
def test_relu_l1_sae_recovers_the_dictionary(seed, one_thread):
    score, f, n = recover("relu", seed, penalty=L1(1e-2))
    assert score >= 0.95
    assert f < 0.3  # measured 0.15-0.17 (L1 shrinks the coefficients)
    assert 3.0 < n < 7.0  # true mean L0 is 4


# --------------------------------------------------------------------------------------------
# metrics against NumPy


def np_mmcs(true, learned):
    """For each true feature, the best cosine with any learned atom (a loop), averaged."""
    best = []
    for f in true:
        best.append(max(float(f @ d) / (np.linalg.norm(f) * np.linalg.norm(d)) for d in learned))
    return float(np.mean(best))


def test_mmcs_matches_numpy_and_is_low_for_a_random_dictionary():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(10, 6)) * rng.uniform(0.1, 5, size=(10, 1))
    learned = rng.normal(size=(15, 6)) * rng.uniform(0.1, 5, size=(15, 1))
    assert float(mmcs(torch.from_numpy(true), torch.from_numpy(learned))) == pytest.approx(np_mmcs(true, learned),
                                                                                          rel=1e-12)
    assert float(mmcs(torch.from_numpy(true).float(), torch.from_numpy(learned).float())) == pytest.approx(
        np_mmcs(true, learned), rel=1e-6)

    syn = make_synthetic(10, seed=3)
    # the truth itself, shuffled and rescaled, scores 1; a random dictionary far less
    shuffled = syn.features[torch.randperm(64)] * torch.rand(64, 1).add(0.5)
    assert float(mmcs(syn.features, shuffled)) == pytest.approx(1.0, abs=1e-6)
    random = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    low = float(mmcs(syn.features, random))
    assert low == pytest.approx(np_mmcs(syn.features.numpy().astype(np.float64), random.numpy().astype(np.float64)),
                                rel=1e-6)
    print(f"\nMMCS of a random 64-atom dictionary: {low:.3f}")
    assert low < 0.7
    with pytest.raises(ValueError, match="feature sizes differ"):
        mmcs(syn.features, random[:, :31])


def test_fvu_and_l0_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 7)) + rng.normal(size=7) * 3  # a non-zero mean: FVU centres x
    x_hat = x + 0.3 * rng.normal(size=x.shape)
    ref = np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(axis=0)) ** 2)
    assert float(fvu(torch.from_numpy(x), torch.from_numpy(x_hat))) == pytest.approx(ref, rel=1e-12)
    assert float(fvu(torch.from_numpy(x).float(), torch.from_numpy(x_hat).float())) == pytest.approx(ref, rel=1e-5)
    assert float(fvu(torch.from_numpy(x), torch.from_numpy(x))) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        fvu(torch.zeros(3, 2), torch.zeros(2, 3))

    code = rng.normal(size=(40, 12)) * (rng.random((40, 12)) < 0.3)
    code[0] = 0.0  # an all-zero sample counts 0
    ref_l0 = np.mean([np.count_nonzero(row) for row in code])
    assert float(l0(torch.from_numpy(code))) == pytest.approx(ref_l0, rel=1e-12)


# --------------------------------------------------------------------------------------------
# the generator


def test_make_synthetic_is_the_documented_ground_truth():
    syn = make_synthetic(20_000, d=16, n_features=40, active=5.0, seed=7)
    assert syn.x.shape == (20_000, 16) and syn.features.shape == (40, 16) and syn.codes.shape == (20_000, 40)
    np.testing.assert_allclose(np.linalg.norm(syn.features.numpy(), axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(syn.x.numpy(), syn.codes.numpy() @ syn.features.numpy(), rtol=1e-5, atol=1e-6)
    c = syn.codes.numpy()
    assert c.min() >= 0 and c.max() <= 1
    # mean L0 = active; the standard error of the mean here is about 0.015
    assert abs(np.count_nonzero(c, axis=1).mean() - 5.0) < 0.08
    again = make_synthetic(20_000, d=16, n_features=40, active=5.0, seed=7)
    assert torch.equal(again.x, syn.x)
    assert not torch.equal(make_synthetic(20_000, d=16, n_features=40, active=5.0, seed=8).x, syn.x)
    for kw in ({"n_samples": 0}, {"d": -1}, {"n_features": 2.5}):
        with pytest.raises(ValueError, match="must be a positive int"):
            make_synthetic(**kw)
    for active in (0, 65, float("nan")):
        with pytest.raises(ValueError, match="active"):
            make_synthetic(10, active=active)
