"""The ground-truth data source (actsparse.data.ground_truth) against independent references.

Firing rates are compared with Zipf probabilities computed here in NumPy (water-filling by
bisection), the hierarchy with trees built here breadth first, the copula's co-firing with SciPy's
bivariate normal CDF; each empirical rate must lie within 5 binomial standard deviations.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from actsparse.data.ground_truth import GroundTruth, load_true_features, truth_paths

N_BIG = 200_000


def zipf_reference(n: int, exponent: float, mean_active: float) -> np.ndarray:
    """``min(1, c (i+1)^-s)`` with ``Σ = mean_active``, ``c`` found by bisection (float64)."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    lo, hi = 0.0, 1.0 / w.min()
    for _ in range(200):
        c = (lo + hi) / 2
        lo, hi = (c, hi) if np.minimum(1.0, c * w).sum() < mean_active else (lo, c)
    return np.minimum(1.0, hi * w)


def bfs_parents(n: int, roots: int, branching: int, depth: int) -> np.ndarray:
    """Parents of ``roots`` full trees numbered breadth first, -1 for roots and the rest."""
    parents = [-1] * roots
    level = list(range(roots))
    for _ in range(depth - 1):
        nxt = []
        for p in level:
            for _ in range(branching):
                nxt.append(len(parents))
                parents.append(p)
        level = nxt
    return np.array(parents + [-1] * (n - len(parents)))


def within_binomial(freq: np.ndarray, p: np.ndarray, n, sigmas: float = 5.0) -> None:
    std = np.sqrt(p * (1 - p) / n)
    bad = np.abs(freq - p) > sigmas * std + 1e-6  # 1e-6: float32 uniforms and thresholds
    assert not bad.any(), f"rates {freq[bad]} vs {p[bad]} (std {std[bad]})"


def test_features_are_unit_norm_deterministic_and_depend_on_the_seed():
    gt = GroundTruth(50, 20, 3.0, seed=4)
    f = gt.features.numpy().astype(np.float64)
    assert gt.features.shape == (50, 20) and gt.features.dtype == torch.float32
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-6)
    again = GroundTruth(50, 20, 3.0, seed=4)
    assert torch.equal(again.features, gt.features)
    assert not torch.allclose(GroundTruth(50, 20, 3.0, seed=5).features, gt.features)
    # the firing options do not change the features
    other = GroundTruth(50, 20, 6.0, zipf_exponent=0.5, hierarchy=(2, 2, 3), correlation=0.4, seed=4)
    assert torch.equal(other.features, gt.features)
    # samples: an int seed repeats, the own stream moves on but repeats from construction
    x1, c1 = gt.sample(300, 7)
    x2, c2 = again.sample(300, 7)
    assert torch.equal(x1, x2) and torch.equal(c1, c2)
    assert not torch.equal(gt.sample(300, 8)[1], c1)
    s1, s2 = gt.sample(300), gt.sample(300)
    assert not torch.equal(s1[1], s2[1])
    assert torch.equal(GroundTruth(50, 20, 3.0, seed=4).sample(300)[1], s1[1])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(gt.sample(100, g1)[0], gt.sample(100, g2)[0])
    # orthogonal: F Fᵀ = I
    orth = GroundTruth(16, 20, 2.0, orthogonal=True, seed=1).features.numpy().astype(np.float64)
    np.testing.assert_allclose(orth @ orth.T, np.eye(16), atol=1e-6)


def test_firing_rates_are_zipfian_and_the_expected_l0_is_mean_active():
    gt = GroundTruth(64, 16, 4.0, zipf_exponent=1.0, seed=0)
    ref = zipf_reference(64, 1.0, 4.0)
    assert ref.max() < 1
    np.testing.assert_allclose(gt.probs.numpy(), ref, rtol=1e-9)
    np.testing.assert_allclose(gt.probs.numpy()[1:] / gt.probs.numpy()[:-1], np.arange(1, 64) / np.arange(2, 65),
                               rtol=1e-12)
    assert gt.expected_l0 == pytest.approx(4.0, rel=1e-12) and gt.n_saturated == 0
    x, codes = gt.sample(N_BIG, 1)
    c = codes.numpy()
    assert c.shape == (N_BIG, 64) and x.shape == (N_BIG, 16)
    assert c.min() >= 0
    within_binomial((c > 0).mean(0), ref, N_BIG)
    l0 = (c > 0).sum(1)
    assert abs(l0.mean() - 4.0) < 5 * l0.std() / math.sqrt(N_BIG)
    # magnitudes: |N(1, 0.25²)| (folded mass below 0 is negligible): mean 1, std 0.25
    on = c[c > 0]
    assert abs(on.mean() - 1.0) < 0.005 and abs(on.std() - 0.25) < 0.005

    flat = GroundTruth(10, 4, 2.5, zipf_exponent=0.0)
    np.testing.assert_allclose(flat.probs.numpy(), 0.25, rtol=1e-12)


def test_infeasible_zipf_probabilities_are_clipped_to_one_with_a_warning():
    with pytest.warns(UserWarning, match=r"the 3 most frequent feature\(s\) in every sample"):
        gt = GroundTruth(10, 4, 5.0, zipf_exponent=2.0)
    ref = zipf_reference(10, 2.0, 5.0)
    assert (ref == 1).sum() == 3
    np.testing.assert_allclose(gt.probs.numpy(), ref, rtol=1e-9)
    assert gt.n_saturated == 3 and gt.expected_l0 == pytest.approx(5.0)
    assert (gt.sample(2000, 0)[1][:, :3] > 0).all()
    with pytest.warns(UserWarning, match="every sample"):
        assert (GroundTruth(5, 3, 5.0).sample(100)[1] > 0).all()  # mean_active = N: all fire


@pytest.mark.parametrize("correlation", [0.0, 0.5])
def test_hierarchy_children_fire_only_with_their_parent_and_keep_the_zipf_marginals(correlation):
    gt = GroundTruth(64, 16, 4.0, hierarchy=(4, 3, 3), correlation=correlation, seed=2)
    parents = bfs_parents(64, 4, 3, 3)
    np.testing.assert_array_equal(gt.parents.numpy(), parents)
    probs = zipf_reference(64, 1.0, 4.0)
    kids = np.flatnonzero(parents >= 0)
    assert len(kids) == 48
    np.testing.assert_allclose(gt.conditional.numpy()[kids], probs[kids] / probs[parents[kids]], rtol=1e-9)
    on = gt.sample(N_BIG, 0)[1].numpy() > 0
    assert not (on[:, kids] & ~on[:, parents[kids]]).any()
    within_binomial(on.mean(0), probs, N_BIG)
    # given the parent fired, a child fires with p_child / p_parent
    parent_on = on[:, parents[kids]]
    cond = (on[:, kids] & parent_on).sum(0) / parent_on.sum(0)
    within_binomial(cond, probs[kids] / probs[parents[kids]], parent_on.sum(0))
    # non-exclusive siblings fire together (independently given the parent)
    assert (on[:, 4] & on[:, 5]).any()


def test_exclusive_children_fire_one_at_a_time():
    gt = GroundTruth(52, 16, 4.0, hierarchy=(4, 3, 3), exclusive_children=True, correlation=0.3, seed=3)
    parents = bfs_parents(52, 4, 3, 3)
    probs = zipf_reference(52, 1.0, 4.0)
    on = gt.sample(N_BIG, 0)[1].numpy() > 0
    kids = np.flatnonzero(parents >= 0)
    assert not (on[:, kids] & ~on[:, parents[kids]]).any()
    for p in np.unique(parents[kids]):
        assert on[:, parents == p].sum(1).max() <= 1
    within_binomial(on.mean(0), probs, N_BIG)
    # one root with four children: q = (1/2 + 1/3 + 1/4 + 1/5) / 1 > 1
    with pytest.raises(ValueError, match=r"children of feature 0 .* summing to 1\.283 > 1"):
        GroundTruth(5, 4, 1.0, hierarchy=(1, 4, 2), exclusive_children=True)


def test_correlation_keeps_the_marginals_and_makes_features_co_fire():
    stats = pytest.importorskip("scipy.stats")
    n, rho = N_BIG, 0.6
    gt = GroundTruth(24, 8, 3.0, correlation=rho, correlation_rank=4, seed=5)
    probs = zipf_reference(24, 1.0, 3.0)
    on = gt.sample(n, 0)[1].numpy() > 0
    within_binomial(on.mean(0), probs, n)
    L = gt.loadings.numpy().astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(L, axis=1), 1.0, atol=1e-6)
    t = stats.norm.ppf(probs)
    joint_ref, joint = [], []
    for i, j in itertools.combinations(range(10), 2):
        r = rho * L[i] @ L[j]
        joint_ref.append(stats.multivariate_normal.cdf([t[i], t[j]], cov=[[1, r], [r, 1]]))
        joint.append((on[:, i] & on[:, j]).mean())
    joint_ref, joint = np.array(joint_ref), np.array(joint)
    within_binomial(joint, joint_ref, n)

    def max_phi(fired):
        c = np.corrcoef(fired[:, :10].T.astype(np.float64))
        return np.abs(c[np.triu_indices(10, 1)]).max()

    independent = GroundTruth(24, 8, 3.0, correlation=0.0, seed=5).sample(n, 0)[1].numpy() > 0
    assert max_phi(independent) < 5 / math.sqrt(n)
    assert max_phi(on) > 0.1
    within_binomial(independent.mean(0), probs, n)


def test_x_is_codes_times_features_plus_bias_and_noise():
    gt = GroundTruth(40, 12, 3.0, hierarchy=(3, 2, 2), seed=6)
    x, codes = gt.sample(5000, 0)
    assert x.dtype == torch.float32 and codes.dtype == torch.float32
    assert torch.equal(x, codes @ gt.features)
    np.testing.assert_allclose(x.numpy(), codes.numpy().astype(np.float64) @ gt.features.numpy().astype(np.float64),
                               rtol=1e-5, atol=1e-5)
    biased = GroundTruth(40, 12, 3.0, bias_norm=2.0, seed=6)
    assert float(biased.bias.norm()) == pytest.approx(2.0, rel=1e-6)
    xb, cb = biased.sample(5000, 0)
    assert torch.equal(xb, cb @ biased.features + biased.bias)
    noisy = GroundTruth(40, 12, 3.0, noise_std=0.1, bias_norm=1.0, seed=6)
    xn, cn = noisy.sample(20_000, 0)
    resid = (xn - cn @ noisy.features - noisy.bias).numpy()
    assert abs(resid.std() - 0.1) < 0.002 and abs(resid.mean()) < 0.001
    const = GroundTruth(40, 12, 3.0, magnitude_std=0.0, magnitude_mean=2.0).sample(1000, 0)[1]
    assert set(torch.unique(const).tolist()) == {0.0, 2.0}


def test_batches_are_lazy_shaped_and_deterministic():
    gt = GroundTruth(30, 10, 3.0, correlation=0.2, hierarchy=(2, 2, 2), seed=7)
    got = list(gt.batches(1000, 2500, seed=3))
    assert [tuple(b[0].shape) for b in got] == [(1000, 10), (1000, 10), (500, 10)]
    assert [tuple(b[1].shape) for b in got] == [(1000, 30), (1000, 30), (500, 30)]
    again = list(gt.batches(1000, 2500, seed=3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, again))
    assert not torch.equal(next(gt.batches(1000, 2500, seed=4))[1], got[0][1])
    assert torch.equal(got[0][1], gt.sample(1000, 3)[1])
    whole = next(gt.batches(5000, 2500, seed=3))
    assert torch.equal(whole[1], gt.sample(2500, 3)[1]) and len(whole[0]) == 2500
    # 10^15 samples would not fit anywhere: only the batch drawn exists
    it = gt.batches(8, 10**15, seed=0)
    x, codes = next(it)
    assert x.shape == (8, 10) and codes.shape == (8, 30)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        gt.batches(0, 10)  # checked at the call, not at the first next()


def test_save_and_load_the_data_with_its_true_features(tmp_path):
    gt = GroundTruth(20, 6, 2.0, hierarchy=(2, 2, 2), correlation=0.3, noise_std=0.01, seed=8)
    path = tmp_path / "data.npy"
    written = gt.save(path, 1000, seed=2, batch_size=300, codes=True)
    paths = truth_paths(path)
    assert written == {k: paths[k] for k in ("x", "features", "truth", "codes")}
    assert paths["features"].name == "data.features.npy" and paths["codes"].name == "data.codes.npy"
    assert paths["truth"].name == "data.truth.json"
    assert not list(tmp_path.glob("*.tmp"))
    ref = list(gt.batches(300, 1000, seed=2))
    x, codes = np.load(path), np.load(paths["codes"])
    assert x.dtype == np.float32 and x.shape == (1000, 6) and codes.shape == (1000, 20)
    np.testing.assert_array_equal(x, torch.cat([b[0] for b in ref]).numpy())
    np.testing.assert_array_equal(codes, torch.cat([b[1] for b in ref]).numpy())
    feats = load_true_features(path)
    assert feats.dtype == torch.float32 and torch.equal(feats, gt.features)
    assert torch.equal(load_true_features(str(path)), gt.features)
    truth = json.loads(paths["truth"].read_text())
    assert truth["n_samples"] == 1000 and truth["seed"] == 2 and truth["batch_size"] == 300
    rebuilt = GroundTruth(**truth["config"])
    assert torch.equal(rebuilt.features, gt.features)
    assert np.array_equal(torch.cat([b[0] for b in rebuilt.batches(300, 1000, 2)]).numpy(), x)
    # saved again without codes: the old codes file, which would not match, is gone
    gt.save(path, 500, seed=1)
    assert not paths["codes"].exists() and np.load(path).shape == (500, 6)

    with pytest.raises(FileNotFoundError, match="no true features beside"):
        load_true_features(tmp_path / "other.npy")
    with pytest.raises(ValueError, match="must be a .npy path"):
        load_true_features(tmp_path / "data.csv")
    np.save(tmp_path / "wrong.npy", np.zeros((5, 7), np.float32))
    np.save(tmp_path / "wrong.features.npy", np.zeros((3, 6), np.float32))
    with pytest.raises(ValueError, match="d=6 but the data"):
        load_true_features(tmp_path / "wrong.npy")
    with pytest.raises(ValueError, match="must be a .npy path"):
        gt.save(tmp_path / "data.txt", 10)


NAN = float("nan")
BAD = [
    ({"n_features": 0}, ValueError, "n_features must be >= 1, got 0"),
    ({"n_features": -3}, ValueError, "n_features must be >= 1"),
    ({"n_features": True}, TypeError, "n_features must be an int, got bool"),
    ({"n_features": 8.0}, TypeError, "n_features must be an int, got float"),
    ({"d": -1}, ValueError, "d must be >= 1"),
    ({"mean_active": 0}, ValueError, r"mean_active must be in \(0, 8\]"),
    ({"mean_active": 9}, ValueError, r"mean_active must be in \(0, 8\], got 9"),
    ({"mean_active": NAN}, ValueError, "mean_active must be a finite number"),
    ({"mean_active": "2"}, TypeError, "mean_active must be a real number"),
    ({"zipf_exponent": -0.5}, ValueError, "zipf_exponent must be in"),
    ({"correlation": 1.0}, ValueError, r"correlation must be in \[0, 1\), got 1.0"),
    ({"correlation": -0.1}, ValueError, "correlation must be in"),
    ({"correlation": NAN}, ValueError, "correlation must be a finite number"),
    ({"correlation_rank": 0}, ValueError, "correlation_rank must be >= 1"),
    ({"magnitude_mean": 0.0}, ValueError, "magnitude_mean must be in"),
    ({"magnitude_std": -1.0}, ValueError, "magnitude_std must be in"),
    ({"noise_std": float("inf")}, ValueError, "noise_std must be a finite number"),
    ({"bias_norm": -1}, ValueError, "bias_norm must be in"),
    ({"seed": -1}, ValueError, "seed must be >= 0"),
    ({"seed": False}, TypeError, "seed must be an int, got bool"),
    ({"orthogonal": 1}, TypeError, "orthogonal must be a bool"),
    ({"orthogonal": True, "d": 4}, ValueError, "orthogonal features need n_features <= d"),
    ({"hierarchy": (2, 2)}, TypeError, r"hierarchy must be None or \(n_roots, branching, depth\)"),
    ({"hierarchy": "abc"}, TypeError, "hierarchy must be None"),
    ({"hierarchy": (0, 2, 2)}, ValueError, "hierarchy n_roots must be >= 1"),
    ({"hierarchy": (2, 2.0, 2)}, TypeError, "hierarchy branching must be an int"),
    ({"hierarchy": (2, 2, 3)}, ValueError, r"has 14 features, more than n_features=8"),
    ({"exclusive_children": True}, ValueError, "exclusive_children=True needs a hierarchy"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD)
def test_bad_arguments_raise_with_a_message(kwargs, exc, match):
    args = {"n_features": 8, "d": 6, "mean_active": 2.0} | kwargs
    with pytest.raises(exc, match=match):
        GroundTruth(**args)


def test_bad_sampling_arguments_raise_with_a_message():
    gt = GroundTruth(8, 6, 2.0)
    for call, exc, match in [
        (lambda: gt.sample(0), ValueError, "n must be >= 1"),
        (lambda: gt.sample(-5), ValueError, "n must be >= 1"),
        (lambda: gt.sample(True), TypeError, "n must be an int, got bool"),
        (lambda: gt.sample(10, 1.5), TypeError, "generator must be None, an int seed or a torch.Generator"),
        (lambda: gt.sample(10, True), TypeError, "generator must be None"),
        (lambda: gt.sample(10, -1), ValueError, "seed must be >= 0"),
        (lambda: gt.batches(10, 0), ValueError, "n_samples must be >= 1"),
        (lambda: gt.batches(2.0, 10), TypeError, "batch_size must be an int"),
        (lambda: gt.save(123, 10), TypeError, "path must be a str or os.PathLike"),
    ]:
        with pytest.raises(exc, match=match):
            call()
