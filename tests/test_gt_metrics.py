"""Metrics against known ground-truth features: MCC, the matching, feature F1, latent usage.

References are computed independently in NumPy (brute-force assignments, counts by loops), never
copied from the code under test.
"""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest
import torch

from actsparse import metrics as M
from actsparse.models.sparse_topk import SparseCode


def _abs_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.abs(a @ b.T)


def _brute_matching(true: np.ndarray, learned: np.ndarray) -> tuple[float, list[tuple[int, int]]]:
    """Best mean |cos| over every one-to-one assignment, by enumeration, and its pairs (g, j)."""
    c = _abs_cos(true, learned)
    n_t, n_l = c.shape
    best, pairs = -1.0, []
    if n_t <= n_l:
        for p in itertools.permutations(range(n_l), n_t):
            v = np.mean([c[g, p[g]] for g in range(n_t)])
            if v > best:
                best, pairs = v, [(g, p[g]) for g in range(n_t)]
    else:
        for p in itertools.permutations(range(n_t), n_l):
            v = np.mean([c[p[j], j] for j in range(n_l)])
            if v > best:
                best, pairs = v, sorted((p[j], j) for j in range(n_l))
    return float(best), pairs


# ---------------------------------------------------------------- MCC and the matching


@pytest.mark.parametrize("extra", [0, 5])
def test_mcc_is_one_for_the_true_dictionary_up_to_permutation_sign_scale(extra):
    g = torch.Generator().manual_seed(0)
    true = torch.randn(12, 8, generator=g)
    perm = torch.randperm(12, generator=g)
    signs = torch.where(torch.rand(12, generator=g) < 0.5, -1.0, 1.0)
    scales = torch.rand(12, generator=g) * 10 + 0.1
    learned = true[perm] * (signs * scales)[:, None]
    learned = torch.cat([learned, torch.randn(extra, 8, generator=g)])  # unmatched spare atoms
    assert float(M.mcc(true, learned)) == pytest.approx(1.0, abs=1e-12)
    t_idx, l_idx, cos = M.match_features(true, learned)
    assert t_idx.tolist() == list(range(12))
    inverse = torch.argsort(perm)  # true feature g sits at row inverse[g] of learned
    assert l_idx.tolist() == inverse.tolist()
    assert torch.allclose(cos, signs[inverse].double(), atol=1e-12)  # signed cosines: ±1


def test_mcc_mean_is_over_matched_pairs_only():
    true = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    # fewer atoms than features: the three found exactly give 1, the three missing do not count
    assert float(M.mcc(true, true[[4, 0, 2]] * 3)) == pytest.approx(1.0, abs=1e-12)
    t_idx, l_idx, _ = M.match_features(true, true[[4, 0, 2]])
    assert sorted(zip(t_idx.tolist(), l_idx.tolist())) == [(0, 1), (2, 2), (4, 0)]


@pytest.mark.parametrize(
    ("seed", "n_true", "n_learned", "d"),
    [(0, 6, 6, 4), (1, 6, 6, 3), (2, 4, 6, 5), (3, 6, 4, 3), (4, 5, 7, 4), (5, 7, 5, 6), (6, 1, 5, 3)],
)
def test_mcc_and_matching_agree_with_brute_force(seed, n_true, n_learned, d):
    rng = np.random.default_rng(seed)
    true, learned = rng.standard_normal((n_true, d)), rng.standard_normal((n_learned, d))
    best, pairs = _brute_matching(true, learned)
    got = M.mcc(torch.from_numpy(true), torch.from_numpy(learned))
    assert got.dtype == torch.float64 and got.dim() == 0
    assert float(got) == pytest.approx(best, abs=1e-12)
    t_idx, l_idx, cos = M.match_features(torch.from_numpy(true), torch.from_numpy(learned))
    assert len(t_idx) == min(n_true, n_learned)
    assert list(zip(t_idx.tolist(), l_idx.tolist())) == pairs  # random data: a unique optimum
    tn = true / np.linalg.norm(true, axis=1, keepdims=True)
    ln = learned / np.linalg.norm(learned, axis=1, keepdims=True)
    signed = np.array([tn[g] @ ln[j] for g, j in pairs])
    np.testing.assert_allclose(cos.numpy(), signed, atol=1e-12)


def test_mcc_of_random_dictionary_between_expected_abs_cos_and_row_max():
    d, n = 32, 64
    # E|cos| of two independent uniform directions in d dims: Γ(d/2) / (√π Γ((d+1)/2))
    e_abs_cos = math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((20000, d)), rng.standard_normal((20000, d))
    mc = np.mean(np.abs(np.sum(a * b, 1)) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    assert mc == pytest.approx(e_abs_cos, rel=0.02)  # the formula itself, by Monte Carlo
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        true, learned = rng.standard_normal((n, d)), rng.standard_normal((n, d))
        c = _abs_cos(true, learned)
        row_max = c.max(1).mean()  # each feature's best atom, atoms reusable: an upper bound
        # greedy one-to-one matching (largest |cos| first): a feasible assignment, a lower bound
        greedy, used_t, used_l = [], set(), set()
        for flat in np.argsort(-c, axis=None):
            g, j = divmod(int(flat), n)
            if g not in used_t and j not in used_l:
                greedy.append(c[g, j])
                used_t.add(g)
                used_l.add(j)
        got = float(M.mcc(torch.from_numpy(true), torch.from_numpy(learned)))
        assert e_abs_cos < got <= row_max + 1e-12
        assert np.mean(greedy) - 1e-12 <= got
        assert got > 1.5 * e_abs_cos  # the matching picks well above a random pair


def test_mcc_zero_norm_atom_counts_as_cosine_zero():
    true = torch.eye(3, dtype=torch.float64)
    learned = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.float64)
    assert float(M.mcc(true, learned)) == pytest.approx(2 / 3, abs=1e-12)


def test_missing_scipy_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # `from scipy.optimize import …` fails
    with pytest.raises(ModuleNotFoundError, match=r"scipy.*pip install -e '\.\[cli\]'"):
        M.mcc(torch.eye(3), torch.eye(3))


# ---------------------------------------------------------------- feature F1


def _f1_reference(true_codes, codes, true, learned, threshold):
    """The rule of feature_f1, restated: brute-force matching, counts by loops, means by hand."""
    _, pairs = _brute_matching(true, learned)
    f1s, ps, rs, tps, fps, fns, excluded = [], [], [], 0, 0, 0, 0
    for g, j in pairs:
        tp = fp = fn = 0
        for b in range(true_codes.shape[0]):
            active, fires = true_codes[b, g] != 0, codes[b, j] > threshold
            tp += active and fires
            fp += fires and not active
            fn += active and not fires
        if tp + fn == 0:
            excluded += 1
            continue
        ps.append(tp / (tp + fp) if tp + fp else 0.0)
        rs.append(tp / (tp + fn))
        f1s.append(2 * tp / (2 * tp + fp + fn))
        tps, fps, fns = tps + tp, fps + fp, fns + fn
    return {
        "f1": np.mean(f1s),
        "precision": np.mean(ps),
        "recall": np.mean(rs),
        "f1_pooled": 2 * tps / (2 * tps + fps + fns),
        "pairs": len(f1s),
        "excluded": excluded,
    }


def test_f1_of_perfect_codes_is_one():
    g = torch.Generator().manual_seed(2)
    n, d, batch = 10, 16, 300
    true = torch.randn(n, d, generator=g)
    true_codes = torch.rand(batch, n, generator=g) * (torch.rand(batch, n, generator=g) < 0.2)
    perm = torch.randperm(n, generator=g)
    learned, codes = -2 * true[perm], 3 * true_codes[:, perm]  # permuted, flipped, rescaled
    out = M.feature_f1(true_codes, codes, true, learned, matching="hungarian")
    for key in ("f1", "precision", "recall", "f1_pooled", "mcc"):
        assert out[key] == pytest.approx(1.0, abs=1e-12), key
    assert (out["pairs"], out["excluded"]) == (n, 0)


def test_f1_of_always_and_never_firing_latents_from_counts():
    true = torch.eye(2)
    true_codes = torch.zeros(100, 2)
    true_codes[:30, 0] = 1.0  # feature 0 active in 30 samples
    true_codes[50:90, 1] = 2.0  # feature 1 active in 40
    codes = torch.zeros(100, 2)
    codes[:, 0] = 0.5  # latent 0 fires always: TP 30, FP 70, FN 0
    # latent 1 never fires: TP 0, FP 0, FN 40 -> precision 0 by convention, recall 0, F1 0
    out = M.feature_f1(true_codes, codes, true, true.clone(), matching="hungarian")
    assert out["precision"] == pytest.approx((30 / 100 + 0) / 2)
    assert out["recall"] == pytest.approx((1 + 0) / 2)
    assert out["f1"] == pytest.approx((2 * 30 / (2 * 30 + 70) + 0) / 2)
    assert out["f1_pooled"] == pytest.approx(2 * 30 / (2 * 30 + 70 + 40))
    # a threshold above the activation: latent 0 now never fires either
    assert M.feature_f1(true_codes, codes, true, true.clone(), threshold=0.5, matching="hungarian")["f1"] == 0.0


def test_f1_excludes_pairs_whose_feature_is_never_active():
    true = torch.eye(2)
    true_codes = torch.zeros(10, 2)
    true_codes[:4, 0] = 1.0  # feature 1 never active
    codes = torch.ones(10, 2)  # both latents always fire
    out = M.feature_f1(true_codes, codes, true, true.clone(), matching="hungarian")
    assert (out["pairs"], out["excluded"]) == (1, 1)
    assert out["f1"] == pytest.approx(2 * 4 / (2 * 4 + 6))
    with pytest.raises(ValueError, match="none of the matched true features is active"):
        M.feature_f1(torch.zeros(10, 2), codes, true, true.clone(), matching="hungarian")


@pytest.mark.parametrize(("seed", "n_true", "n_learned"), [(0, 5, 5), (1, 4, 6), (2, 6, 4), (3, 5, 7)])
def test_f1_agrees_with_numpy_restatement(seed, n_true, n_learned):
    rng = np.random.default_rng(seed)
    d, batch, threshold = 4, 60, 0.3
    true, learned = rng.standard_normal((n_true, d)), rng.standard_normal((n_learned, d))
    true_codes = rng.random((batch, n_true)) * (rng.random((batch, n_true)) < 0.3)
    true_codes[:, 0] = 0.0  # one feature never active: exercises the exclusion when it is matched
    codes = rng.standard_normal((batch, n_learned))  # negative and sub-threshold values do not fire
    ref = _f1_reference(true_codes, codes, true, learned, threshold)
    for chunk in (7, 16384):  # chunked counts must add up to the one-pass counts
        got = M.feature_f1(
            torch.from_numpy(true_codes),
            torch.from_numpy(codes),
            torch.from_numpy(true),
            torch.from_numpy(learned),
            threshold=threshold,
            chunk=chunk,
            matching="hungarian",
        )
        for key, value in ref.items():
            assert got[key] == pytest.approx(value, abs=1e-12), key
        assert got["mcc"] == pytest.approx(_brute_matching(true, learned)[0], abs=1e-12)


def _f1_best_reference(true_codes, codes, true, learned, threshold):
    """SynthSAEBench's rule restated: each latent against its highest-|cos| true feature, the
    per-latent precision, recall and F1 (0 where undefined), averaged over all latents."""
    tn = true / np.linalg.norm(true, axis=1, keepdims=True)
    ln = learned / np.linalg.norm(learned, axis=1, keepdims=True)
    best = np.abs(ln @ tn.T).argmax(axis=1)
    out = {"precision": [], "recall": [], "f1": []}
    for j, g in enumerate(best):
        a, f = true_codes[:, g] != 0, codes[:, j] > threshold
        tp, fp, fn = np.sum(a & f), np.sum(~a & f), np.sum(a & ~f)
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        out["precision"].append(p)
        out["recall"].append(r)
        out["f1"].append(2 * p * r / (p + r) if p + r else 0.0)
    return {k: float(np.mean(v)) for k, v in out.items()}


@pytest.mark.parametrize(("seed", "n_true", "n_learned"), [(0, 5, 5), (1, 4, 9), (2, 8, 3)])
def test_f1_best_match_agrees_with_numpy_restatement(seed, n_true, n_learned):
    rng = np.random.default_rng(seed)
    d, batch, threshold = 4, 80, 0.2
    true, learned = rng.standard_normal((n_true, d)), rng.standard_normal((n_learned, d))
    true_codes = rng.random((batch, n_true)) * (rng.random((batch, n_true)) < 0.3)
    true_codes[:, 0] = 0.0  # a feature never active: its latents score 0, not excluded
    codes = rng.standard_normal((batch, n_learned))
    ref = _f1_best_reference(true_codes, codes, true, learned, threshold)
    tensors = (torch.from_numpy(a) for a in (true_codes, codes, true, learned))
    got = M.feature_f1(*tensors, threshold=threshold, chunk=11)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["pairs"] == n_learned


def test_f1_matching_must_be_named():
    with pytest.raises(ValueError, match="matching must be 'best' or 'hungarian'"):
        M.feature_f1(torch.ones(3, 2), torch.ones(3, 2), torch.eye(2), torch.eye(2), matching="greedy")


# ---------------------------------------------------------------- latent usage, variance explained


def _usage_code() -> torch.Tensor:
    code = torch.zeros(100, 6)
    code[:10, 1] = 1.0  # fires in exactly 10%: not dense (the rule is "more than")
    code[:11, 2] = 0.2  # 11%: dense
    code[:, 3] = 3.0  # always: dense
    code[20:25, 4] = -1.0  # non-zero counts as firing, whatever the sign
    return code  # latents 0 and 5: dead


def test_latent_usage_counts_dead_and_dense():
    out = M.latent_usage(_usage_code())
    assert (out["latents"], out["samples"]) == (6, 100)
    assert (out["dead"], out["dense"]) == (2, 2)
    assert out["dead_fraction"] == pytest.approx(2 / 6)
    assert out["dense_fraction"] == pytest.approx(2 / 6)
    assert out["max_frequency"] == pytest.approx(1.0)
    assert out["l0"] == pytest.approx((10 + 11 + 100 + 5) / 100)
    assert M.latent_usage(_usage_code(), dense_threshold=0.05)["dense"] == 3
    assert M.latent_usage(_usage_code(), chunk=3) == out


def test_latent_usage_of_sparse_code_matches_dense():
    g = torch.Generator().manual_seed(3)
    values = torch.relu(torch.randn(50, 3, generator=g))  # some zeros: chosen but not firing
    indices = torch.stack([torch.randperm(9, generator=g)[:3] for _ in range(50)])
    sc = SparseCode(values, indices, 12)  # units 9..11 can never be chosen: dead
    dense = sc.to_dense()
    fired = (dense != 0).sum(0).numpy()
    out = M.latent_usage(sc)
    assert out == M.latent_usage(dense)
    assert out["dead"] == int((fired == 0).sum()) >= 3
    assert out["dense"] == int((fired / 50 > 0.1).sum())


def test_variance_explained_is_one_minus_fvu():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 5))
    x_hat = x + 0.3 * rng.standard_normal((40, 5))
    ref = 1 - np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2)
    got = M.variance_explained(torch.from_numpy(x).float(), torch.from_numpy(x_hat).float())
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------- bad input

_R = torch.rand(4, 3)
_NAN = torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, 0.0]])
_INF = torch.tensor([[1.0, float("inf"), 0.0], [0.0, 1.0, 0.0]])
_TC, _C = torch.rand(8, 4), torch.rand(8, 4)


@pytest.mark.parametrize(
    ("call", "exc", "pattern"),
    [
        (lambda: M.mcc("x", _R), TypeError, "tensor"),
        (lambda: M.mcc(torch.rand(4), _R), ValueError, r"\(n_true, d\)"),
        (lambda: M.mcc(_R, torch.rand(4, 5)), ValueError, "feature sizes differ"),
        (lambda: M.mcc(_R, torch.rand(0, 3)), ValueError, "empty"),
        (lambda: M.mcc(_R, _NAN), ValueError, "learned contains NaN"),
        (lambda: M.mcc(_INF, _R), ValueError, "true_features contains NaN or Inf"),
        (lambda: M.match_features(_R, torch.rand(2, 3, 1)), ValueError, r"\(n_learned, d\)"),
        (lambda: M.feature_f1(_TC, _C, _R, torch.rand(4, 2)), ValueError, "feature sizes differ"),
        (lambda: M.feature_f1(_TC[:5], _C, _R, _R), ValueError, "same number of samples"),
        (lambda: M.feature_f1(torch.rand(8, 3), _C, _R, _R), ValueError, "3 columns but there are 4 true"),
        (lambda: M.feature_f1(_TC, torch.rand(8, 5), _R, _R), ValueError, "5 columns but there are 4 learned"),
        (lambda: M.feature_f1(_TC, torch.rand(8), _R, _R), ValueError, r"\(batch, n_learned\)"),
        (lambda: M.feature_f1(_TC, _C.clone().fill_(float("nan")), _R, _R), ValueError, "codes contains NaN"),
        (lambda: M.feature_f1(_TC, _C, _R, _R, threshold=float("nan")), ValueError, "threshold"),
        (lambda: M.feature_f1(_TC, _C, _R, _R, chunk=0), ValueError, "chunk"),
        (lambda: M.feature_f1(None, _C, _R, _R), TypeError, "true_codes must be a tensor"),
        (lambda: M.latent_usage(torch.rand(5)), ValueError, r"\(batch, n_latents\)"),
        (lambda: M.latent_usage(torch.rand(0, 5)), ValueError, "empty"),
        (lambda: M.latent_usage(_NAN), ValueError, "code contains NaN"),
        (lambda: M.latent_usage(_R, dense_threshold=1.5), ValueError, "dense_threshold"),
        (lambda: M.latent_usage([[1.0]]), TypeError, "tensor"),
        (lambda: M.variance_explained(_R, torch.rand(4, 2)), ValueError, "same shape"),
    ],
)
def test_gt_metrics_bad_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()
