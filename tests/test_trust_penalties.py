"""Review items 11–16 and 18 on penalties, attach() and KLSparseReg.

Each test failed on the code before its fix (the ``# failed before:`` line says how) and checks
values against an independent reference: a NumPy re-statement of the formula or a hand count.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

import actsparse

# Resolve the function before the class: importing the submodule first would leave the package
# attribute ``actsparse.attach`` bound to the module (lazy exports of actsparse/__init__.py).
attach = actsparse.attach
Attachment = actsparse.Attachment

NAN = float("nan")


def np_bernoulli_kl(rho: float, m) -> float:
    m = np.asarray(m, dtype=np.float64)
    return float(np.sum(rho * np.log(rho / m) + (1 - rho) * np.log((1 - rho) / (1 - m))))


def np_poisson_kl(rho: float, m) -> float:
    m = np.asarray(m, dtype=np.float64)
    return float(np.sum(rho * np.log(rho / m) - rho + m))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ 11: state per (module, call)


def test_11_momentum_penalty_on_two_layers_keeps_one_average_each():
    # failed before: layer 3 was penalised at a moving average that mixed layer 1's ρ̂ into it
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.Sigmoid()).double()
    p = actsparse.BernoulliKL(0.1, weight=2.0, momentum=0.9)
    reg = actsparse.attach(m, {nn.Sigmoid: p})  # one penalty object, two layers of equal width
    g, avgs = gen(1), [None, None]
    for _ in range(3):
        x = torch.randn(8, 3, dtype=torch.float64, generator=g)
        m(x)
        with torch.no_grad():
            h1 = torch.sigmoid(m[0](x))
            h2 = torch.sigmoid(m[2](h1))
        for k, h in enumerate((h1, h2)):
            b = h.numpy().mean(0)
            avgs[k] = b if avgs[k] is None else 0.9 * avgs[k] + 0.1 * b
        got = reg.penalties_by_target()
        assert float(got["1"]) == pytest.approx(2 * np_bernoulli_kl(0.1, avgs[0]), rel=1e-10)
        assert float(got["3"]) == pytest.approx(2 * np_bernoulli_kl(0.1, avgs[1]), rel=1e-10)
    # both averages are saved, and a fresh attachment restores them
    state = reg.state_dict()
    reg.remove()
    fresh = actsparse.BernoulliKL(0.1, weight=2.0, momentum=0.9)
    reg2 = actsparse.attach(m, {nn.Sigmoid: fresh})
    reg2.load_state_dict(state)
    np.testing.assert_allclose(fresh.running_rate.numpy(), avgs[0], rtol=1e-12)
    assert len([k for k in fresh.state_dict() if k.startswith("running_rate")]) == 2


def test_11_module_called_twice_keeps_one_average_per_call():
    # failed before: the second call's moving average started from (and mixed with) the first call's
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act = nn.Linear(4, 4), nn.Sigmoid()

        def forward(self, x):
            return self.act(self.lin(self.act(self.lin(x))))

    torch.manual_seed(0)
    m = Twice().double()
    reg = actsparse.attach(m, {"act": actsparse.PoissonKL(0.2, weight=1.5, momentum=0.5)})
    g, avgs = gen(2), [None, None]
    for _ in range(3):
        x = torch.randn(6, 4, dtype=torch.float64, generator=g)
        m(x)
        with torch.no_grad():
            h1 = torch.sigmoid(m.lin(x))
            h2 = torch.sigmoid(m.lin(h1))
        for k, h in enumerate((h1, h2)):
            b = h.numpy().mean(0)
            avgs[k] = b if avgs[k] is None else 0.5 * avgs[k] + 0.5 * b
        ref = 1.5 * (np_poisson_kl(0.2, avgs[0]) + np_poisson_kl(0.2, avgs[1]))
        assert float(reg.penalty()) == pytest.approx(ref, rel=1e-10)


def test_11_stats_of_a_module_called_twice_count_every_call():
    # failed before: dead_units=1, units=4 (the two calls were averaged unit by unit); truth 5 of 8
    class ShiftTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(x) + self.relu(x - 10.0)

    x = torch.rand(6, 4, generator=gen(3)) * 4 + 1  # units 1..3 fire in the first call only
    x[:, 0] = -x[:, 0]  # unit 0 never fires
    m = ShiftTwice()
    reg = actsparse.attach(m, {"relu": actsparse.L1(1e-3)})
    m(x)
    calls = [np.maximum(x.numpy(), 0), np.maximum(x.numpy() - 10, 0)]
    fire = np.concatenate([(h > 0).mean(0) for h in calls])  # per (call, unit)
    rho = np.concatenate([h.mean(0) for h in calls])
    s = reg.stats()["relu"]
    assert (s.dead_units, s.units, s.calls) == (int((fire == 0).sum()), 8, 2) == (5, 8, 2)
    assert s.active_fraction == pytest.approx(float(fire.mean()), rel=1e-6)
    assert s.mean_rho_hat == pytest.approx(float(rho.mean()), rel=1e-6)


def test_11_one_stateful_penalty_inside_two_different_penalties_is_refused():
    # failed before: accepted, and both layers then moved the same running_rate
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.Sigmoid())
    p = actsparse.BernoulliKL(0.1, momentum=0.9)
    with pytest.raises(ValueError, match="two different penalties.*separate penalty object"):
        actsparse.attach(m, {"1": p, "3": p + actsparse.L1(1e-3)})


# ------------------------------------------------------------------ 12: a rejected batch leaves the state alone


RATE_PENALTIES = {
    "BernoulliKL": (lambda: actsparse.BernoulliKL(0.2, weight=1.5, momentum=0.8),
                    lambda a: a.mean(0), np_bernoulli_kl),
    "PoissonKL": (lambda: actsparse.PoissonKL(0.2, weight=1.5, momentum=0.8),
                  lambda a: a.mean(0), np_poisson_kl),
    "FrequencyKL": (lambda: actsparse.FrequencyKL(0.2, weight=1.5, threshold=0.5, momentum=0.8),
                    lambda a: (a > 0.5).mean(0), np_bernoulli_kl),
}


@pytest.mark.parametrize("name", sorted(RATE_PENALTIES))
def test_12_nan_batch_is_refused_before_it_reaches_the_moving_average(name):
    # failed before: the NaN batch raised but left running_rate NaN, so the next clean batch raised too
    make, rate, kl = RATE_PENALTIES[name]
    p = make()
    g = gen(4)
    a1 = torch.rand(10, 3, dtype=torch.float64, generator=g)
    p(a1)
    saved = p.running_rate.clone()
    bad = a1.clone()
    bad[2, 1] = NAN
    with pytest.raises(ValueError, match="NaN"):
        p(bad)
    assert torch.equal(p.running_rate, saved)
    a2 = torch.rand(10, 3, dtype=torch.float64, generator=g)
    value = p(a2)
    m = 0.8 * saved.numpy() + 0.2 * rate(a2.numpy())
    np.testing.assert_allclose(p.running_rate.numpy(), m, rtol=1e-12)
    assert float(value) == pytest.approx(1.5 * kl(0.2, m), rel=1e-10)


def test_12_nan_batch_through_attach_leaves_every_layer_state_alone():
    # failed before: the first layer's running_rate became NaN before its hook raised
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.Sigmoid()).double()
    p = actsparse.BernoulliKL(0.1, momentum=0.9)
    actsparse.attach(m, {nn.Sigmoid: p})
    m(torch.randn(5, 3, dtype=torch.float64))
    saved = {k: v.clone() for k, v in p.state_dict().items()}
    x = torch.randn(5, 3, dtype=torch.float64)
    x[0, 0] = NAN
    with pytest.raises(ValueError, match=r"'1'.*NaN"):
        m(x)
    for k, v in p.state_dict().items():
        assert torch.equal(v, saved[k]), k


# ------------------------------------------------------------------ 13: fp16 overflow is named, not blamed on NaN


def test_13_l1_fp16_overflow_names_dtype_and_value():
    # failed before: L1 of 1000 values of 100 in float16 returned inf without a word
    a = torch.full((1, 1000), 100.0, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"1e\+05.*float16.*65504"):
        actsparse.L1(1.0)(a)


def test_13_fp16_weighted_value_that_fits_is_returned():
    # failed before: L2 reduced to Σa² = 1e5, cast that to float16 (inf), then weighted: inf, not 100
    a = torch.full((1, 1000), 10.0, dtype=torch.float16)
    got = actsparse.L2(1e-3)(a)
    assert got.dtype == torch.float16
    assert float(got) == pytest.approx(1e-3 * 1000 * 10.0**2, rel=1e-3)


@pytest.mark.parametrize("make, a", [
    (lambda: actsparse.Hoyer(1000.0), torch.ones(1, 100, dtype=torch.float16)),  # 1000 · 100
    (lambda: actsparse.BernoulliKL(0.1), torch.zeros(1, 100_000, dtype=torch.float16)),  # 1e5 · 1.06
])
def test_13_fp16_weighted_overflow_is_an_error(make, a):
    # failed before: the fp16 value (Hoyer 100; the KL sum cast to fp16) times the weight gave inf silently
    with pytest.raises(ValueError, match=r"overflows float16"):
        make()(a)


class Scale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(n, dtype=torch.float16))

    def forward(self, x):
        return x * self.w


class NaiveL1(actsparse.Penalty):
    """A user's own penalty, summed in the activations' dtype (no check of its own)."""

    def value(self, a):
        return a.abs().sum()


def test_13_attach_overflow_does_not_blame_nan_activations():
    # failed before: the L1 hook let inf through, and penalty() said "the activations of these
    # layers contain NaN or Inf" (for L1 and for a user's penalty alike)
    x = torch.full((1, 1000), 100.0, dtype=torch.float16)
    m = nn.Sequential(Scale(1000))
    reg = actsparse.attach(m, {"0": NaiveL1()})
    m(x)
    with pytest.raises(ValueError, match=r"'?0'? \(overflows float16 although its activations are finite") as err:
        reg.penalty()
    assert "NaN or Inf" not in str(err.value)
    reg.remove()
    actsparse.attach(m, {"0": actsparse.L1(1.0)})
    with pytest.raises(ValueError, match=r"'0'.*overflows float16") as err:
        m(x)
    assert "NaN" not in str(err.value)


def test_13_attach_sum_overflow_is_named():
    # failed before: two finite penalties (40000 each) summed to inf in float16, blamed on NaN activations
    x = torch.full((1, 1000), 100.0, dtype=torch.float16)
    m = nn.Sequential(Scale(1000))
    reg = actsparse.attach(m, {"0": [actsparse.L1(0.4), actsparse.L1(0.4)]})
    m(x)
    with pytest.raises(ValueError, match=r"sum.*overflows float16") as err:
        reg.penalty()
    assert "NaN" not in str(err.value)


# ------------------------------------------------------------------ 14: two penalties on one layer


def test_14_two_penalties_on_one_layer_keep_separate_keys():
    # failed before: penalties_by_target() and stats() kept one "0:L1" of three
    torch.manual_seed(0)
    lin = nn.Linear(3, 4).double()
    m = nn.Sequential(actsparse.regularize(lin, actsparse.L1(0.1)), nn.ReLU())
    reg = actsparse.attach(m, {"0": actsparse.L1(0.2), nn.Linear: actsparse.L1(0.3)})
    x = torch.randn(5, 3, dtype=torch.float64)
    m(x)
    by = reg.penalties_by_target()
    assert len(by) == 3 and len(reg.stats()) == 3 and set(reg.stats()) == set(by)
    with torch.no_grad():
        s = np.abs(lin(x).numpy()).sum() / 5
    np.testing.assert_allclose(sorted(float(v) for v in by.values()), [0.1 * s, 0.2 * s, 0.3 * s], rtol=1e-12)
    assert float(sum(by.values())) == pytest.approx(float(reg.penalty()), rel=1e-12)


# ------------------------------------------------------------------ 15: KLSparseReg refuses non-finite input


@pytest.mark.parametrize("bad_value", [NAN, float("inf")])
def test_15_kl_sparse_reg_refuses_non_finite_input(bad_value):
    # failed before: NaN/Inf input was accepted and the moving average stayed NaN from then on
    layer = actsparse.KLSparseReg(target=0.1, penalty=0.01, momentum=0.9).double()
    g = gen(5)
    x = torch.rand(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    layer(x).sum().backward()
    saved = layer.moving_avg.clone()
    bad = x.detach().clone()
    bad[1, 2] = bad_value
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(bad.requires_grad_(True))
    assert torch.equal(layer.moving_avg, saved)
    x2 = torch.rand(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    layer(x2).sum().backward()
    m = 0.9 * saved.numpy() + 0.1 * x2.detach().numpy().mean(0)
    np.testing.assert_allclose(layer.moving_avg.numpy(), m, rtol=1e-12)
    term = 0.01 * (-0.1 / m + 0.9 / (1 - m))  # MXNet's term, not divided by the batch
    np.testing.assert_allclose(x2.grad.numpy(), np.broadcast_to(1 + term, (6, 3)), rtol=1e-12)


# ------------------------------------------------------------------ 16: copies of a hooked model


def _sae() -> tuple[nn.Module, actsparse.BernoulliKL, Attachment]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 4)).double()
    p = actsparse.BernoulliKL(0.1, weight=2.0, momentum=0.5)
    return m, p, actsparse.attach(m, {"1": p})


def _by_hand(model: nn.Module, x: torch.Tensor, running: np.ndarray) -> float:
    """The penalty of ``model``'s forward on ``x``, from a moving average ``running`` before it."""
    with torch.no_grad():
        batch = torch.sigmoid(model[0](x)).numpy().mean(0)
    return 2.0 * np_bernoulli_kl(0.1, 0.5 * running + 0.5 * batch)


def test_16_deepcopy_before_and_after_a_step_is_independent():
    # failed before: the copy's forward fed the original's penalty(), and after a step deepcopy raised
    # "Only Tensors created explicitly by the user (graph leaves) support the deepcopy protocol"
    m, p, reg = _sae()
    x, x2 = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    before_step = copy.deepcopy(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    loss = ((m(x) - x) ** 2).mean() + reg.penalty()
    loss.backward()
    opt.step()
    after_step = copy.deepcopy(m)
    value, running = float(reg.penalty()), p.running_rate.clone()
    for c in (before_step, after_step):
        (rc,) = Attachment.find(c)
        saved = rc.penalties[0].running_rate.numpy().copy() if rc.penalties[0].running_rate.numel() else None
        c(x2)
        got = float(rc.penalty())
        if saved is None:  # copied before any forward: the moving average starts at this batch
            with torch.no_grad():
                saved = torch.sigmoid(c[0](x2)).numpy().mean(0)
        assert got == pytest.approx(_by_hand(c, x2, saved), rel=1e-10)
        assert float(reg.penalty()) == value and torch.equal(p.running_rate, running)  # original untouched
    assert after_step[1] is Attachment.find(after_step)[0]._hooked[0].module


def test_16_torch_save_round_trip_of_a_hooked_model():
    # failed before: torch.save raised "Can't pickle local object 'Attachment._make_hook.<locals>.hook'"
    m, p, reg = _sae()
    x = torch.randn(8, 4, dtype=torch.float64)
    m(x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    (rl,) = Attachment.find(loaded)
    saved = rl.penalties[0].running_rate.numpy().copy()
    np.testing.assert_array_equal(saved, p.running_rate.numpy())
    x2 = torch.randn(8, 4, dtype=torch.float64)
    value = float(reg.penalty())
    loaded(x2)
    assert float(rl.penalty()) == pytest.approx(_by_hand(loaded, x2, saved), rel=1e-10)
    assert float(reg.penalty()) == value


# ------------------------------------------------------------------ 18: double backward and in-place layers


def _np_free_kl(rho, r):  # the Bernoulli KL as a torch expression (reference)
    return (rho * torch.log(rho / r) + (1 - rho) * torch.log((1 - rho) / (1 - r))).sum()


def _frequency_reference(a, rho=0.2, theta=0.5, bw=0.4):
    """f̂ = mean(a > θ) in value; its gradient the rectangle window / ε (straight-through)."""
    window = ((a - theta).abs() < bw / 2).to(a.dtype) / bw
    st = a * window
    f = (a > theta).to(a.dtype).mean(0) + (st - st.detach()).mean(0)
    eps = min(0.01, rho / 2)  # FrequencyKL's default clamp, straight-through
    return _np_free_kl(rho, f + (f.clamp(eps, 1 - eps) - f).detach())


#: name: (penalty, the same formula written inline)
INLINE = {
    "L1": (lambda: actsparse.L1(0.3), lambda a: 0.3 * a.abs().sum() / a.shape[0]),
    "L2": (lambda: actsparse.L2(0.3), lambda a: 0.3 * a.pow(2).sum() / a.shape[0]),
    "Hoyer": (lambda: actsparse.Hoyer(0.3),
              lambda a: 0.3 * (a.abs().sum(1) ** 2 / a.pow(2).sum(1)).mean()),
    "BernoulliKL": (lambda: actsparse.BernoulliKL(0.2, 0.3), lambda a: 0.3 * _np_free_kl(0.2, a.mean(0))),
    "PoissonKL": (lambda: actsparse.PoissonKL(0.2, 0.3),
                  lambda a: 0.3 * (0.2 * torch.log(0.2 / a.mean(0)) - 0.2 + a.mean(0)).sum()),
    "FrequencyKL": (lambda: actsparse.FrequencyKL(0.2, 0.3, threshold=0.5, bandwidth=0.4),
                    lambda a: 0.3 * _frequency_reference(a)),
}


@pytest.mark.parametrize("name", sorted(INLINE))
def test_18_double_backward_matches_the_inline_formula(name):
    # failed before (L1): the grad of the gradient norm raised "one of the variables needed for
    # gradient computation has been modified by an inplace operation: ... output 0 of Sgn"
    make, inline = INLINE[name]
    x = torch.randn(16, 4, dtype=torch.float64, generator=gen(6))

    def grad_of_grad_norm(fn):
        torch.manual_seed(0)
        lin = nn.Linear(4, 5).double()
        a = torch.sigmoid(lin(x))
        g = torch.autograd.grad(fn(a), list(lin.parameters()), create_graph=True)
        return torch.autograd.grad(sum(t.pow(2).sum() for t in g), list(lin.parameters()))

    for got, ref in zip(grad_of_grad_norm(make()), grad_of_grad_norm(inline)):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


class Clamp01(nn.Module):
    def forward(self, x):
        return x.clamp(0.0, 1.0)  # clamp saves its input, so an in-place layer after it is legal


@pytest.mark.parametrize("name", sorted(INLINE))
def test_18_penalty_before_an_inplace_relu_trains(name):
    # failed before (L1, FrequencyKL): backward raised "one of the variables needed for gradient
    # computation has been modified by an inplace operation", with no hint
    make, inline = INLINE[name]
    x = torch.randn(16, 4, dtype=torch.float64, generator=gen(7))

    def build(inplace: bool) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 5), Clamp01(), nn.ReLU(inplace=inplace), nn.Linear(5, 3)).double()

    m = build(True)
    reg = actsparse.attach(m, {"1": make()})
    grads = torch.autograd.grad(m(x).pow(2).sum() + reg.penalty(), list(m.parameters()))
    ref_m = build(False)
    h = ref_m[0](x).clamp(0.0, 1.0)
    ref = torch.autograd.grad(ref_m(x).pow(2).sum() + inline(h), list(ref_m.parameters()))
    for got, r in zip(grads, ref):
        torch.testing.assert_close(got, r, rtol=1e-9, atol=1e-12)
