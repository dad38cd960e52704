"""actsparse.functional against NumPy formulas written here from their sources, gradcheck, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse import functional as F

# ---------------------------------------------------------------- NumPy references (from the formulas)


def np_bernoulli_kl(rho, rho_hat):
    return np.sum(rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat)))


def np_poisson_kl(rho, rho_hat):
    return np.sum(rho * np.log(rho / rho_hat) - rho + rho_hat)


def np_l1(a):
    return np.abs(a).sum() / a.shape[0]


def np_l2(a):
    return (a**2).sum() / a.shape[0]


def np_hoyer(a):
    flat = a.reshape(a.shape[0], -1)
    vals = []
    for row in flat:  # deliberately naive: one sample at a time
        s2 = (row**2).sum()
        vals.append(0.0 if s2 == 0 else np.abs(row).sum() ** 2 / s2)
    return float(np.mean(vals))


def np_mean_activation(a, unit_dim):
    axes = tuple(i for i in range(a.ndim) if i != unit_dim % a.ndim)
    return a.mean(axis=axes)


def np_frequency(a, threshold, unit_dim):
    return np_mean_activation((a > threshold).astype(np.float64), unit_dim)


def np_frequency_pseudo_grad(a, threshold, bandwidth, unit_dim):
    """d f̂_j / d a: (1/count) (1/ε) 1{|a − θ| < ε/2}  (Rajamanoharan et al. 2024, rectangle kernel)."""
    count = a.size / a.shape[unit_dim]
    u = (a - threshold) / bandwidth
    return ((u > -0.5) & (u < 0.5)).astype(np.float64) / bandwidth / count


rng = np.random.default_rng(0)


# ---------------------------------------------------------------- values vs NumPy


@pytest.mark.parametrize("shape,unit_dim", [((7, 5), -1), ((4, 3, 6), -1), ((3, 4, 5, 5), 1), ((6, 2, 3), 0)])
def test_mean_activation_matches_numpy(shape, unit_dim):
    a = rng.random(shape)
    got = F.mean_activation(torch.tensor(a), unit_dim)
    np.testing.assert_allclose(got.numpy(), np_mean_activation(a, unit_dim), rtol=1e-12)
    assert got.shape == (shape[unit_dim],)


def test_mean_activation_is_per_unit_not_per_sample():
    # seed 003's mistake: averaging over the unit axis. Unit j's mean is over the batch.
    a = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    assert F.mean_activation(a).tolist() == [1.0, 0.0, 0.5]


@pytest.mark.parametrize("rho", [0.01, 0.05, 0.3])
def test_bernoulli_kl_matches_numpy(rho):
    r = rng.uniform(0.001, 0.999, size=13)
    got = F.bernoulli_kl(rho, torch.tensor(r))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(float(got), np_bernoulli_kl(rho, r), rtol=1e-12)


def test_bernoulli_kl_float32_in_float32_out_close_to_float64():
    r = rng.uniform(0.01, 0.99, size=50)
    got = F.bernoulli_kl(0.05, torch.tensor(r, dtype=torch.float32))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(float(got), np_bernoulli_kl(0.05, r.astype(np.float32).astype(np.float64)), rtol=1e-5)


def test_bernoulli_kl_tensor_target_and_reductions():
    rho = rng.uniform(0.01, 0.5, size=6)
    r = rng.uniform(0.01, 0.99, size=6)
    none = F.bernoulli_kl(torch.tensor(rho), torch.tensor(r), reduction="none")
    ref = rho * np.log(rho / r) + (1 - rho) * np.log((1 - rho) / (1 - r))
    np.testing.assert_allclose(none.numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(float(F.bernoulli_kl(torch.tensor(rho), torch.tensor(r), reduction="mean")),
                               ref.mean(), rtol=1e-12)


@pytest.mark.parametrize("rho", [0.01, 0.5, 2.0])
def test_poisson_kl_matches_numpy(rho):
    r = rng.uniform(0.001, 5.0, size=11)
    got = F.poisson_kl(rho, torch.tensor(r))
    np.testing.assert_allclose(float(got), np_poisson_kl(rho, r), rtol=1e-12)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 5), (2, 3, 4, 4)])
def test_activity_norms_match_numpy(shape):
    a = rng.normal(size=shape)
    t = torch.tensor(a)
    np.testing.assert_allclose(float(F.l1(t)), np_l1(a), rtol=1e-12)
    np.testing.assert_allclose(float(F.l2(t)), np_l2(a), rtol=1e-12)
    np.testing.assert_allclose(float(F.hoyer(t)), np_hoyer(a), rtol=1e-12)
    np.testing.assert_allclose(float(F.l1(t, reduction="sum")), np.abs(a).sum(), rtol=1e-12)
    np.testing.assert_allclose(float(F.l1(t, reduction="mean")), np.abs(a).mean(), rtol=1e-12)


def test_hoyer_bounds_and_zero_sample():
    a = torch.zeros(3, 8, dtype=torch.float64)
    a[0, 2] = 5.0  # one active unit: 1
    a[1] = 1.0  # all equal: n = 8
    # a[2] all zero: counted 0, no NaN
    a.requires_grad_(True)
    h = F.hoyer(a)
    np.testing.assert_allclose(float(h.detach()), (1 + 8 + 0) / 3)
    h.backward()
    assert torch.isfinite(a.grad).all()
    assert (a.grad[2] == 0).all()


@pytest.mark.parametrize("unit_dim,shape", [(-1, (9, 4)), (1, (3, 4, 2, 2))])
def test_activation_frequency_value_and_pseudo_gradient(unit_dim, shape):
    a = rng.normal(scale=0.2, size=shape)
    theta, eps = 0.05, 0.1
    t = torch.tensor(a, requires_grad=True)
    f = F.activation_frequency(t, theta, unit_dim=unit_dim, bandwidth=eps)
    np.testing.assert_allclose(f.detach().numpy(), np_frequency(a, theta, unit_dim), rtol=1e-12)
    # gradient of Σ_j w_j f̂_j with arbitrary weights
    w = rng.normal(size=f.shape[0])
    (f * torch.tensor(w)).sum().backward()
    w_b = w.reshape([-1 if i == unit_dim % a.ndim else 1 for i in range(a.ndim)])
    ref = np_frequency_pseudo_grad(a, theta, eps, unit_dim) * w_b
    np.testing.assert_allclose(t.grad.numpy(), ref, rtol=1e-12)


def test_activation_frequency_threshold_gradient_is_minus_kernel():
    a = rng.normal(scale=0.2, size=(16, 3))
    theta = torch.tensor([0.0, 0.05, -0.05], dtype=torch.float64, requires_grad=True)
    f = F.activation_frequency(torch.tensor(a), theta, bandwidth=0.2)
    f.sum().backward()
    ref = -np_frequency_pseudo_grad(a, theta.detach().numpy(), 0.2, -1).sum(axis=0)
    np.testing.assert_allclose(theta.grad.numpy(), ref, rtol=1e-12)


# ---------------------------------------------------------------- gradcheck (float64)


def _interior(shape, lo=0.05, hi=0.95):
    return torch.tensor(rng.uniform(lo, hi, size=shape), requires_grad=True)


def test_gradcheck_bernoulli_kl_through_mean_activation():
    a = _interior((6, 4))
    assert torch.autograd.gradcheck(lambda x: F.bernoulli_kl(0.1, F.mean_activation(x)), (a,))
    assert torch.autograd.gradgradcheck(lambda x: F.bernoulli_kl(0.1, F.mean_activation(x)), (a,))


def test_gradcheck_poisson_kl():
    a = _interior((5, 3), 0.1, 3.0)
    assert torch.autograd.gradcheck(lambda x: F.poisson_kl(0.4, F.mean_activation(x)), (a,))


def test_gradcheck_kl_wrt_target_tensor():
    rho = _interior((4,), 0.05, 0.5)
    r = torch.tensor(rng.uniform(0.1, 0.9, size=4))
    assert torch.autograd.gradcheck(lambda p: F.bernoulli_kl(p, r), (rho,))


def test_gradcheck_activity_norms():
    a = torch.tensor(rng.normal(size=(4, 5)), requires_grad=True)  # no exact zeros: |a| is smooth there
    assert torch.autograd.gradcheck(F.l1, (a,))
    for reduction in ("sum", "mean"):  # L1 is one custom autograd node: check each divisor
        assert torch.autograd.gradcheck(lambda x, r=reduction: F.l1(x, reduction=r), (a,))
    assert torch.autograd.gradcheck(F.l2, (a,))
    assert torch.autograd.gradcheck(F.hoyer, (a,))


def test_gradcheck_kl_of_frequency_wrt_frequency():
    # activation_frequency itself has a pseudo-gradient (checked against NumPy above);
    # the KL applied to the frequency is smooth and checked here.
    f = _interior((5,), 0.1, 0.9)
    assert torch.autograd.gradcheck(lambda x: F.bernoulli_kl(0.2, x), (f,))


# ---------------------------------------------------------------- properties


rates = st.floats(0.0, 1.0, allow_nan=False)
targets = st.floats(1e-3, 1 - 1e-3, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(rho=targets, r=st.lists(rates, min_size=1, max_size=8))
def test_bernoulli_kl_nonnegative_finite(rho, r):
    r_t = torch.tensor(r, dtype=torch.float64, requires_grad=True)
    kl = F.bernoulli_kl(rho, r_t)
    assert math.isfinite(float(kl)) and float(kl) >= 0
    kl.backward()
    assert torch.isfinite(r_t.grad).all()


@settings(max_examples=200, deadline=None)
@given(rho=targets, r=st.floats(1e-3, 1 - 1e-3))
def test_bernoulli_kl_zero_iff_equal(rho, r):
    kl_same = float(F.bernoulli_kl(rho, torch.tensor([rho], dtype=torch.float64)))
    assert kl_same == pytest.approx(0.0, abs=1e-15)
    if abs(r - rho) > 1e-4:
        assert float(F.bernoulli_kl(rho, torch.tensor([r], dtype=torch.float64))) > 0


@settings(max_examples=100, deadline=None)
@given(rho=targets, edge=st.sampled_from([0.0, 1.0]))
def test_bernoulli_kl_edges_push_back_toward_target(rho, edge):
    for dtype in (torch.float32, torch.float64):
        r = torch.tensor([edge], dtype=dtype, requires_grad=True)
        kl = F.bernoulli_kl(rho, r)
        kl.backward()
        assert math.isfinite(float(kl))
        g = float(r.grad)
        assert math.isfinite(g)
        # descent direction −g must point from the edge toward ρ
        assert (-g > 0) if edge < rho else (-g < 0)


@settings(max_examples=200, deadline=None)
@given(rho=st.floats(1e-3, 10.0), r=st.floats(0.0, 1e4))
def test_poisson_kl_nonnegative_and_pushes_back(rho, r):
    r_t = torch.tensor([r], dtype=torch.float64, requires_grad=True)
    kl = F.poisson_kl(rho, r_t)
    assert math.isfinite(float(kl)) and float(kl) >= -1e-12
    kl.backward()
    g = float(r_t.grad)
    assert math.isfinite(g)
    if r < rho * 0.99:
        assert g < 0
    elif r > rho * 1.01:
        assert g > 0
    if r == rho:
        assert float(kl) == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=20))
def test_activity_norms_finite_for_finite_input(vals):
    a = torch.tensor(vals, dtype=torch.float32).reshape(2, -1) if len(vals) % 2 == 0 else torch.tensor([vals])
    a.requires_grad_(True)
    total = F.l1(a) + F.l2(a) + F.hoyer(a)
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(a.grad).all()


# ---------------------------------------------------------------- bad input


def test_bernoulli_kl_rate_above_one_names_poisson_kl():
    relu_out = torch.relu(torch.randn(32, 8)) * 5
    with pytest.raises(ValueError, match="PoissonKL"):
        F.bernoulli_kl(0.05, F.mean_activation(relu_out))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bernoulli_target_outside_open_interval(bad):
    with pytest.raises(ValueError, match="between 0 and 1"):
        F.bernoulli_kl(bad, torch.full((3,), 0.5))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_poisson_target_must_be_positive(bad):
    with pytest.raises(ValueError, match="> 0"):
        F.poisson_kl(bad, torch.full((3,), 0.5))


@pytest.mark.parametrize("fn", [
    lambda a: F.bernoulli_kl(0.1, F.mean_activation(a)),
    lambda a: F.poisson_kl(0.1, F.mean_activation(a)),
    F.l1,
    F.l2,
    F.hoyer,
])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nan_inf_activations_raise(fn, bad_value):
    a = torch.rand(4, 3)
    a[1, 2] = bad_value
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(a)


def test_negative_mean_rejected_by_kls():
    a = -torch.rand(4, 3)
    for fn in (F.bernoulli_kl, F.poisson_kl):
        with pytest.raises(ValueError, match="non-negative"):
            fn(0.1, F.mean_activation(a))


@pytest.mark.parametrize("unit_dim", [2, -3, 5])
def test_unit_dim_out_of_range(unit_dim):
    with pytest.raises(IndexError, match="unit_dim"):
        F.mean_activation(torch.rand(4, 3), unit_dim)
    with pytest.raises(IndexError, match="unit_dim"):
        F.activation_frequency(torch.rand(4, 3), unit_dim=unit_dim)


def test_other_bad_inputs():
    with pytest.raises(TypeError, match="torch.Tensor"):
        F.l1(np.ones((3, 3)))
    with pytest.raises(TypeError, match="floating-point"):
        F.mean_activation(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        F.mean_activation(torch.empty(0, 4))
    with pytest.raises(ValueError, match="at least 2"):
        F.mean_activation(torch.rand(5))
    with pytest.raises(ValueError, match="bandwidth"):
        F.activation_frequency(torch.rand(4, 3), bandwidth=0.0)
    with pytest.raises(ValueError, match="reduction"):
        F.l1(torch.rand(3, 3), reduction="avg")


def test_bf16_autocast_matches_fp32():
    a = torch.rand(64, 16)
    ref = F.bernoulli_kl(0.05, F.mean_activation(a))
    rho_hat = F.mean_activation(a.bfloat16())
    assert rho_hat.dtype == torch.float32  # the reduction runs in fp32, not bf16
    got = F.bernoulli_kl(0.05, rho_hat)
    assert float(got) == pytest.approx(float(ref), rel=2e-2)
