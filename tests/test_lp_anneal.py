"""Lp penalty with p-annealing (Karvonen et al. 2024): value, gradient at and near 0, schedule,
coefficient rescaling, state round trip, registry, controller wrapping and bad input.

References are NumPy float64 restatements of the documented formulas, never the code's own output."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from actsparse.penalties import L1, L2, LP_EPS, Lp, get_penalty

rng = np.random.default_rng(7)


def codes(shape, zero_share=0.4, lo=1e-3):
    """Random activations with exact zeros, negatives, and no |a| in (0, lo)."""
    a = rng.uniform(-2.0, 2.0, size=shape)
    a[rng.random(shape) < zero_share] = 0.0
    a[(a != 0) & (np.abs(a) < lo)] = lo
    return a


def np_lp(a, p, weight=1.0):
    return weight * np.sum(np.abs(a) ** p) / a.shape[0]


def ref_p(fraction, p0, p1, s, e):
    t = min(max((fraction - s) / (e - s), 0.0), 1.0)
    return p0 + t * (p1 - p0)


# ---------------------------------------------------------------- value
@pytest.mark.parametrize("p", [1.0, 0.5, 0.2, 2.0])
@pytest.mark.parametrize("shape", [(16, 12), (4, 3, 5)])
def test_value_matches_numpy(p, shape):
    a = codes(shape)
    assert (a == 0).any()
    pen = Lp(0.3, p=p)
    got = pen(torch.tensor(a))
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(np_lp(a, p, 0.3), rel=1e-12)
    assert float(pen.value(torch.tensor(a))) == pytest.approx(np_lp(a, p), rel=1e-12)


def test_p1_is_l1_and_p2_is_l2():
    a = torch.tensor(codes((32, 10)), requires_grad=True)
    for w in (1e-3, 2.5):
        x = Lp(w, p=1.0)(a)
        y = L1(w)(a)
        assert float(x) == pytest.approx(float(y), rel=1e-15, abs=0)
        gx, = torch.autograd.grad(x, a)
        gy, = torch.autograd.grad(y, a)
        assert torch.equal(gx, gy)
        assert float(Lp(w, p=2.0)(a)) == pytest.approx(float(L2(w)(a)), rel=1e-13)
    f = a.detach().float()
    assert float(Lp(0.1)(f)) == pytest.approx(float(L1(0.1)(f)), rel=1e-7)


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_per_unit_weights_match_numpy(p):
    a = codes((8, 6))
    w = rng.uniform(0.1, 2.0, size=6)
    ref = np.sum(w * np.sum(np.abs(a) ** p, axis=0)) / 8
    got = Lp(1.0, p=p).weighted(torch.tensor(a), torch.tensor(w))
    assert float(got) == pytest.approx(ref, rel=1e-12)
    conv = codes((2, 3, 4, 4))  # unit_dim=1: one value per channel
    w3 = rng.uniform(0.1, 2.0, size=3)
    ref3 = np.sum(w3 * np.sum(np.abs(conv) ** p, axis=(0, 2, 3))) / 2
    got3 = Lp(1.0, p=p, unit_dim=1).weighted(torch.tensor(conv), torch.tensor(w3))
    assert float(got3) == pytest.approx(ref3, rel=1e-12)


def test_bf16_returns_bf16_close_to_float32():
    a = torch.tensor(codes((64, 16)), dtype=torch.float32)
    ref = float(Lp(0.5, p=0.5)(a))
    got = Lp(0.5, p=0.5)(a.bfloat16())
    assert got.dtype == torch.bfloat16
    assert float(got) == pytest.approx(ref, rel=2e-2)


# ---------------------------------------------------------------- gradient
@pytest.mark.parametrize("p", [1.0, 0.5, 0.2])
def test_gradcheck_away_from_zero(p):
    mag = torch.tensor(rng.uniform(0.1, 2.0, size=(5, 4)))
    sign = torch.tensor(rng.choice([-1.0, 1.0], size=(5, 4)))
    a = (mag * sign).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: Lp(0.7, p=p)(x), (a,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("p", [0.5, 0.2, 0.01])
def test_gradient_at_exact_zeros_is_zero_and_finite(p):
    a_np = codes((10, 8), zero_share=0.6)
    a = torch.tensor(a_np, requires_grad=True)
    g, = torch.autograd.grad(Lp(2.0, p=p)(a), a)
    assert torch.isfinite(g).all()
    zero = a_np == 0
    assert zero.any() and (g.numpy()[zero] == 0).all()
    ref = 2.0 * p * np.abs(a_np[~zero]) ** (p - 1) * np.sign(a_np[~zero]) / 10
    np.testing.assert_allclose(g.numpy()[~zero], ref, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.5, 0.1])
def test_tiny_activations_use_the_documented_chord(dtype, p):
    tiny = [1e-30, -1e-12, 1e-7, float(torch.finfo(torch.float32).smallest_normal) / 8]
    a = torch.tensor([tiny + [0.0, 0.5]], dtype=dtype, requires_grad=True)
    out = Lp(1.0, p=p)(a)
    g, = torch.autograd.grad(out, a)
    assert torch.isfinite(g).all() and math.isfinite(float(out))
    slope = LP_EPS ** (p - 1)  # below eps the term is eps^(p-1)·|a|
    x = a.detach().double().numpy()[0]
    ref = sum(slope * abs(v) for v in x[:4]) + 0.5 ** p
    assert float(out) == pytest.approx(ref, rel=1e-6)
    np.testing.assert_allclose(g.double().numpy()[0, :4], slope * np.sign(x[:4]), rtol=1e-6)
    assert float(g[0, 4]) == 0.0
    # continuous at eps: the chord meets |a|^p there
    at = torch.tensor([[LP_EPS * (1 - 1e-9), LP_EPS]], dtype=torch.float64)
    v = Lp(1.0, p=p)._unit_values(at).numpy()
    assert v[0] == pytest.approx(v[1], rel=1e-8) and v[1] == pytest.approx(LP_EPS ** p, rel=1e-12)


# ---------------------------------------------------------------- schedule
def test_linear_schedule_and_clamping():
    pen = Lp(1.0, p=1.0, p_end=0.2, anneal_start=0.2, anneal_end=0.8)
    assert pen.current_p == 1.0  # before any set_progress
    for f in (0.0, 0.1, 0.2, 0.35, 0.5, 0.8, 0.9, 1.0):
        pen.set_progress(f)
        assert pen.current_p == pytest.approx(ref_p(f, 1.0, 0.2, 0.2, 0.8), rel=1e-15, abs=1e-15)
        assert float(pen.p) == pen.current_p
    pen.set_progress(0.0)
    assert pen.current_p == 1.0
    pen.set_progress(1.0)
    assert pen.current_p == 0.2  # exactly p_end
    pen.set_progress(-3)  # clamped, as KSparse.set_progress
    assert pen.current_p == 1.0 and float(pen.progress) == 0.0
    pen.set_progress(7.5)
    assert pen.current_p == 0.2 and float(pen.progress) == 1.0
    fixed = Lp(1.0, p=0.5)
    fixed.set_progress(0.7)
    assert fixed.current_p == 0.5


def test_value_follows_the_annealed_p():
    a = codes((12, 7))
    pen = Lp(0.4, p=1.0, p_end=0.3, rescale=False)
    pen.set_progress(0.5)
    assert float(pen(torch.tensor(a))) == pytest.approx(np_lp(a, 0.65, 0.4), rel=1e-12)


def test_staircase_levels():
    n, s, e, p0, p1 = 5, 0.1, 0.9, 1.0, 0.2
    pen = Lp(1.0, p=p0, p_end=p1, anneal_start=s, anneal_end=e, levels=n)
    for f in np.linspace(0, 1, 41):
        starts = [s + (e - s) * k / (n - 1) for k in range(n)]
        k = max([k for k, b in enumerate(starts) if f >= b], default=0)
        pen.set_progress(float(f))
        assert pen.current_p == pytest.approx(p0 + (p1 - p0) * k / (n - 1), rel=1e-14)


# ---------------------------------------------------------------- rescaling
def test_rescale_ratio_of_previous_to_new_value():
    a1, a2, a3 = codes((16, 8)), codes((16, 8)), codes((16, 8))
    pen = Lp(0.5, p=1.0, p_end=0.2).train()
    pen.set_progress(0.5)  # p: 1 -> 0.6; rescale pending
    assert float(pen.coef_scale) == 1.0
    out = pen(torch.tensor(a1, requires_grad=True))
    r1 = np.sum(np.abs(a1)) / np.sum(np.abs(a1) ** 0.6)
    assert float(pen.coef_scale) == pytest.approx(r1, rel=1e-12)
    # the forward that rescales keeps the penalty's value across the change
    assert float(out) == pytest.approx(np_lp(a1, 1.0, 0.5), rel=1e-12)
    assert pen.coefficient == pytest.approx(0.5 * r1, rel=1e-12)
    pen(torch.tensor(a2, requires_grad=True))  # no change of p: no rescale
    assert float(pen.coef_scale) == pytest.approx(r1, rel=1e-12)
    pen.set_progress(1.0)  # 0.6 -> 0.2: the scales multiply
    out3 = pen(torch.tensor(a3, requires_grad=True))
    r2 = np.sum(np.abs(a3) ** 0.6) / np.sum(np.abs(a3) ** 0.2)
    assert float(pen.coef_scale) == pytest.approx(r1 * r2, rel=1e-12)
    assert float(out3) == pytest.approx(0.5 * r1 * r2 * np_lp(a3, 0.2), rel=1e-12)


def test_rescale_only_in_training_forwards_and_not_on_zero_batches():
    a = torch.tensor(codes((8, 4)))
    pen = Lp(1.0, p=1.0, p_end=0.5)
    pen.set_progress(1.0)
    pen.eval()
    pen(a)
    assert float(pen.coef_scale) == 1.0
    pen.train()
    with torch.no_grad():
        pen(a)
    assert float(pen.coef_scale) == 1.0
    pen(torch.zeros(8, 4, requires_grad=True))  # all zero: nothing to compare, stays pending
    assert float(pen.coef_scale) == 1.0 and float(pen.coef_scale_p) == 1.0
    pen(a.clone().requires_grad_(True))
    x = a.numpy()
    assert float(pen.coef_scale) == pytest.approx(np.sum(np.abs(x)) / np.sum(np.abs(x) ** 0.5), rel=1e-12)
    assert float(pen.coef_scale_p) == 0.5
    off = Lp(1.0, p=1.0, p_end=0.5, rescale=False).train()
    off.set_progress(1.0)
    off(a.clone().requires_grad_(True))
    assert float(off.coef_scale) == 1.0 and off.coefficient == 1.0


# ---------------------------------------------------------------- state
def make():
    return Lp(0.3, p=1.0, p_end=0.2, anneal_start=0.1, anneal_end=0.9).train()


def test_state_round_trip_resumes_bit_identically():
    batches = [torch.tensor(codes((16, 8))) for _ in range(6)]
    fractions = [0.0, 0.2, 0.35, 0.5, 0.65, 0.8]
    a = make()
    for f, x in zip(fractions[:3], batches[:3]):
        a.set_progress(f)
        a(x.clone().requires_grad_(True))
    a.set_progress(fractions[3])  # a pending rescale is part of what must survive
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    state = a.state_dict()
    assert {"p", "progress", "coef_scale", "coef_scale_p"} <= set(state)
    assert all(state[k].dtype == torch.float64 for k in ("p", "coef_scale", "coef_scale_p"))
    buf.seek(0)
    b = make()
    b.load_state_dict(torch.load(buf))
    assert b.current_p == a.current_p and b.coefficient == a.coefficient
    assert float(b.coef_scale_p) == float(a.coef_scale_p) != b.current_p
    for f, x in zip(fractions[3:], batches[3:]):
        if f != fractions[3]:
            a.set_progress(f)
            b.set_progress(f)
        va, vb = a(x.clone().requires_grad_(True)), b(x.clone().requires_grad_(True))
        assert torch.equal(va, vb)
        assert torch.equal(a.coef_scale, b.coef_scale)
    fresh = make()
    fresh.set_progress(fractions[-1])
    assert fresh.current_p == a.current_p and fresh.coefficient != a.coefficient  # the scale is state


def test_casts_keep_the_state_float64_and_bad_state_is_refused():
    pen = make()
    pen.set_progress(0.45)
    pen(torch.tensor(codes((8, 4)), requires_grad=True))
    p, scale = pen.current_p, float(pen.coef_scale)
    pen.half()
    assert pen.p.dtype == torch.float64 and float(pen.p) == p and float(pen.coef_scale) == scale
    pen.float()
    assert pen.coef_scale.dtype == torch.float64
    bad = pen.state_dict()
    bad["p"] = torch.tensor(-1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="state p"):
        make().load_state_dict(bad)


# ---------------------------------------------------------------- registry, toward
def test_registry():
    pen = get_penalty("lp", weight=2e-3, p=0.8, p_end=0.4, anneal_start=0.5)
    assert isinstance(pen, Lp) and pen.weight == 2e-3 and pen.p_start == 0.8 and pen.p_end == 0.4
    assert isinstance(get_penalty("LP"), Lp) and get_penalty("lp").current_p == 1.0


def test_toward_wraps_lp():
    a_np = np.abs(codes((32, 16)))
    a = torch.tensor(a_np, requires_grad=True)
    ctrl = Lp(1e-2, p=1.0, p_end=0.5).toward(l0=4)
    ctrl.train()
    out = ctrl(a)
    assert math.isfinite(float(out))
    assert float(out) == pytest.approx(1e-2 * np.sum(a_np) / 32, rel=1e-12)  # λ before its first update
    ctrl.inner.set_progress(1.0)
    lam = ctrl.mean_coefficient
    out = ctrl(a)
    assert float(out) == pytest.approx(lam * np.sum(a_np) / 32, rel=1e-12)  # the rescale keeps the value
    out.backward()
    assert torch.isfinite(a.grad).all()
    per = Lp(1e-2, p=0.5).toward(rate=0.2, per_unit=True).train()
    assert math.isfinite(float(per(a.detach().clone().requires_grad_(True))))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, err, match", [
    ({"p": 0.0}, ValueError, "p must be a finite number > 0"),
    ({"p": -1.0}, ValueError, "p must be"),
    ({"p": float("nan")}, ValueError, "p must be"),
    ({"p": float("inf")}, ValueError, "p must be"),
    ({"p": True}, TypeError, "p must be a number"),
    ({"p": "1"}, TypeError, "p must be a number"),
    ({"p": 0.5, "p_end": 0.8}, ValueError, "p_end must be <= p"),
    ({"p_end": 0.0}, ValueError, "p_end must be"),
    ({"p_end": float("nan")}, ValueError, "p_end must be"),
    ({"p_end": 0.5, "anneal_start": 0.6, "anneal_end": 0.6}, ValueError, "anneal_start must be < anneal_end"),
    ({"anneal_start": -0.1}, ValueError, "anneal_start must be a fraction"),
    ({"anneal_end": 1.5}, ValueError, "anneal_end must be a fraction"),
    ({"anneal_end": float("nan")}, ValueError, "anneal_end must be a fraction"),
    ({"levels": 1}, ValueError, "levels must be"),
    ({"levels": True}, ValueError, "levels must be"),
    ({"rescale": "yes"}, TypeError, "rescale must be True or False"),
    ({"eps": 0.0}, ValueError, "eps must be"),
    ({"weight": -1.0}, ValueError, "weight must be"),
])
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        Lp(**kwargs)


def test_bad_fractions_and_activations():
    pen = Lp(1.0, p=1.0, p_end=0.5)
    with pytest.raises(ValueError, match="nan"):
        pen.set_progress(float("nan"))
    with pytest.raises(TypeError, match="training fraction"):
        pen.set_progress("0.5")
    with pytest.raises(TypeError, match="training fraction"):
        pen.set_progress(True)
    assert pen.current_p == 1.0  # refused calls change nothing
    for p in (1.0, 0.5, 2.0):
        a = torch.ones(4, 3)
        a[1, 2] = float("nan")
        with pytest.raises(ValueError, match="NaN or Inf"):
            Lp(1.0, p=p)(a)
    with pytest.raises(TypeError, match="floating-point"):
        Lp(1.0, p=0.5)(torch.ones(4, 3, dtype=torch.int64))
