"""Penalty objects: weights, unit_dim, moving averages, state_dict, composition, registry, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import actsparse

rng = np.random.default_rng(1)


def np_bernoulli_kl(rho, r):
    return np.sum(rho * np.log(rho / r) + (1 - rho) * np.log((1 - rho) / (1 - r)))


def np_poisson_kl(rho, r):
    return np.sum(rho * np.log(rho / r) - rho + r)


def test_weighted_values_match_numpy():
    a = rng.uniform(0.01, 0.99, size=(10, 6))
    t = torch.tensor(a)
    r = a.mean(axis=0)
    assert float(actsparse.BernoulliKL(0.05, weight=3.0)(t)) == pytest.approx(3 * np_bernoulli_kl(0.05, r), rel=1e-12)
    assert float(actsparse.PoissonKL(0.2, weight=0.5)(t)) == pytest.approx(0.5 * np_poisson_kl(0.2, r), rel=1e-12)
    assert float(actsparse.L1(1e-3)(t)) == pytest.approx(1e-3 * np.abs(a).sum() / 10, rel=1e-12)
    assert float(actsparse.L2(2.0)(t)) == pytest.approx(2 * (a**2).sum() / 10, rel=1e-12)
    f = (a > 0.5).mean(axis=0)
    assert float(actsparse.FrequencyKL(0.1, 2.0, threshold=0.5)(t)) == pytest.approx(
        2 * np_bernoulli_kl(0.1, np.clip(f, 0.01, 1 - 0.01)), rel=1e-12)


def test_unit_dim_for_conv_maps():
    a = rng.uniform(0.01, 0.99, size=(2, 3, 4, 4))  # (batch, channels, h, w)
    r = a.mean(axis=(0, 2, 3))
    got = actsparse.BernoulliKL(0.1, unit_dim=1)(torch.tensor(a))
    assert float(got) == pytest.approx(np_bernoulli_kl(0.1, r), rel=1e-12)


def test_composition_with_plus():
    a = torch.rand(8, 5, dtype=torch.float64)
    p = actsparse.BernoulliKL(0.05, weight=3.0) + actsparse.L1(1e-2) + actsparse.Hoyer(0.1)
    assert isinstance(p, actsparse.PenaltySum) and len(p.terms) == 3
    ref = actsparse.BernoulliKL(0.05, weight=3.0)(a) + actsparse.L1(1e-2)(a) + actsparse.Hoyer(0.1)(a)
    assert float(p(a)) == pytest.approx(float(ref), rel=1e-12)


def test_output_dtype_follows_activations_bf16():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(64, 16, generator=g)
    a = torch.where((a - 0.5).abs() < 0.01, a + 0.02, a)  # no value that bf16 rounding moves across θ = 0.5
    for p in (actsparse.BernoulliKL(0.05), actsparse.PoissonKL(0.05), actsparse.L1(1.0),
              actsparse.L2(1.0), actsparse.Hoyer(1.0), actsparse.FrequencyKL(0.3, threshold=0.5)):
        ref = p(a)
        got = p(a.bfloat16())
        assert got.dtype == torch.bfloat16
        assert float(got) == pytest.approx(float(ref), rel=2e-2), type(p).__name__


def test_autocast_bf16_cpu_penalties_finite_and_close():
    model = nn.Sequential(nn.Linear(16, 32), nn.Sigmoid())
    x = torch.randn(64, 16)
    p = actsparse.BernoulliKL(0.05, weight=3.0)
    ref = p(model(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = p(model(x))
    assert torch.isfinite(got)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=2e-2)


# ---------------------------------------------------------------- moving average


def test_momentum_semantics_match_reference_loop():
    mu, rho, beta = 0.9, 0.1, 2.0
    p = actsparse.BernoulliKL(rho, weight=beta, momentum=mu)
    m = None
    for _step in range(5):
        a_np = rng.uniform(0.05, 0.95, size=(8, 4))
        a = torch.tensor(a_np, requires_grad=True)
        val = p(a)
        batch = a_np.mean(axis=0)
        m = batch if m is None else mu * m + (1 - mu) * batch  # started from the first batch
        assert float(val) == pytest.approx(beta * np_bernoulli_kl(rho, m), rel=1e-12)
        np.testing.assert_allclose(p.running_rate.numpy(), m, rtol=1e-12)
        # gradient: as if ρ̂ were m (straight-through), spread over the batch mean
        val.backward()
        dkl = beta * (-rho / m + (1 - rho) / (1 - m)) / a_np.shape[0]
        np.testing.assert_allclose(a.grad.numpy(), np.broadcast_to(dkl, a_np.shape), rtol=1e-10)


def test_momentum_not_updated_in_eval_and_saved_in_state_dict():
    p = actsparse.PoissonKL(0.2, momentum=0.5)
    p(torch.rand(4, 3) * 2)
    saved = p.running_rate.clone()
    p.eval()
    p(torch.rand(4, 3) * 10)
    assert torch.equal(p.running_rate, saved)
    sd = p.state_dict()
    assert torch.equal(sd["running_rate"], saved)
    fresh = actsparse.PoissonKL(0.2, momentum=0.5)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.running_rate, saved)


def test_no_momentum_no_state():
    p = actsparse.BernoulliKL(0.1)
    p(torch.rand(4, 3))
    assert "running_rate" not in p.state_dict()


def test_momentum_unit_mismatch_is_clear():
    p = actsparse.BernoulliKL(0.1, momentum=0.9)
    p(torch.rand(4, 3))
    with pytest.raises(ValueError, match="one penalty object per layer"):
        p(torch.rand(4, 5))


# ---------------------------------------------------------------- registry and bad input


def test_registry():
    p = actsparse.get_penalty("kl", target=0.05, weight=3.0)
    assert isinstance(p, actsparse.BernoulliKL) and p.target == 0.05 and p.weight == 3.0
    assert isinstance(actsparse.get_penalty("Poisson-KL", target=2.0), actsparse.PoissonKL)
    with pytest.raises(KeyError, match="Did you mean 'l1'"):
        actsparse.get_penalty("l11")
    with pytest.raises(KeyError, match="Valid names: .*bernoulli_kl"):
        actsparse.get_penalty("sparsemax")


@pytest.mark.parametrize("make,match", [
    (lambda: actsparse.BernoulliKL(1.5), "between 0 and 1"),
    (lambda: actsparse.BernoulliKL(0.0), "between 0 and 1"),
    (lambda: actsparse.FrequencyKL(1.0), "between 0 and 1"),
    (lambda: actsparse.PoissonKL(-1.0), "> 0"),
    (lambda: actsparse.L1(-1e-3), "weight"),
    (lambda: actsparse.BernoulliKL(0.1, weight=-3.0), "weight"),
    (lambda: actsparse.BernoulliKL(0.1, weight=float("nan")), "weight"),
    (lambda: actsparse.BernoulliKL(0.1, momentum=1.0), "momentum"),
    (lambda: actsparse.FrequencyKL(0.1, bandwidth=-1.0), "bandwidth"),
])
def test_bad_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_types():
    with pytest.raises(TypeError):
        actsparse.L1("0.1")
    with pytest.raises(TypeError):
        actsparse.L1(0.1, unit_dim=1.5)
    with pytest.raises(TypeError):
        actsparse.BernoulliKL(0.1) + 3


def test_penalty_unit_dim_out_of_range_is_clear():
    with pytest.raises(IndexError, match="unit_dim=3"):
        actsparse.BernoulliKL(0.1, unit_dim=3)(torch.rand(4, 5))


def test_bernoulli_on_relu_points_to_poisson():
    a = torch.relu(torch.randn(32, 8)) * 4
    with pytest.raises(ValueError, match="PoissonKL"):
        actsparse.BernoulliKL(0.05)(a)
    assert torch.isfinite(actsparse.PoissonKL(0.05)(a))


def test_frequency_kl_learnable_threshold_gets_gradient():
    theta = nn.Parameter(torch.zeros(4))
    p = actsparse.FrequencyKL(0.1, weight=1.0, threshold=theta, bandwidth=1.0)
    a = torch.randn(64, 4) * 0.3
    p(a).backward()
    # frequency ≈ 0.5 > target: raising θ lowers the frequency, so the descent step raises θ
    assert (theta.grad < 0).all()


def test_eval_frequency_zero_and_one_finite():
    for a in (torch.zeros(8, 3), torch.ones(8, 3)):
        a.requires_grad_(True)
        v = actsparse.FrequencyKL(0.1, threshold=0.5, bandwidth=1.0)(a)
        v.backward()
        assert torch.isfinite(v) and torch.isfinite(a.grad).all()
