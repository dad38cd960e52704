"""The fast path of L1 (``functional.scaled_l1``, behind ``L1``, ``Lp(p=1)`` and so every L1 that
:func:`actsparse.attach` hooks): autograd's own nodes instead of a Python ``autograd.Function``.

Promised, and checked here against two references, the plain formula ``w · Σ|a| / batch`` under
autograd and the node the fast path replaced (kept below as ``reference_scaled_l1``): the same value up to float
rounding, the same gradient bit for bit (float64, float32, float16, bfloat16; any upstream
gradient), for both ways of keeping sgn(a) (in ``a``'s dtype, or int8 above ``_FLOAT_SIGN_MAX``
elements), through attach with shared tensors and in-place layers, and the same errors for
NaN/Inf and float16 overflow.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import actsparse
from actsparse import functional as F

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["sign_in_dtype", "sign_int8"])
def path(request, monkeypatch):
    """Run a test on each way of keeping the sign (int8: as for activations above 2**20 elements)."""
    if request.param == "sign_int8":
        monkeypatch.setattr(F, "_FLOAT_SIGN_MAX", 0)
    return request.param


class _OldNode(torch.autograd.Function):
    """The node before the fast path: ``scale · Σ|a|`` by ``vector_norm(ord=1)``, backward
    ``sgn(a)·(g·scale)`` from an int8 sign."""

    @staticmethod
    def forward(ctx, a, dtype, scale):
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(torch.sgn(a).to(torch.int8))
        ctx.scale, ctx.a_dtype = scale, a.dtype
        return torch.linalg.vector_norm(a, ord=1, dtype=dtype) * scale

    @staticmethod
    def backward(ctx, grad):
        (sign,) = ctx.saved_tensors
        s = sign.to(ctx.a_dtype)
        if torch.is_grad_enabled():
            return s * (grad * ctx.scale), None, None
        return s.mul_(grad * ctx.scale), None, None


def reference_scaled_l1(a, weight=1.0, *, reduction="batchmean", check=True):
    """``functional.scaled_l1`` as it was before the fast path (the reference of these tests)."""
    F._check_activations(a)
    out = _OldNode.apply(a, F._compute_dtype(a.dtype), weight / F._activity_divisor(a, reduction))
    return F._in_caller_dtype(out, a, check)


def old_node(monkeypatch) -> None:
    """Route L1 through the reference node (the implementation before the fast path)."""
    monkeypatch.setattr(F, "scaled_l1", reference_scaled_l1)


def formula(a: torch.Tensor, weight: float) -> torch.Tensor:
    return weight * a.abs().sum() / a.shape[0]


def activations(shape=(8, 6), dtype=torch.float64, seed=0, zeros=True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g, dtype=torch.float64)
    if zeros:
        a[a < -0.5] = 0.0  # exact zeros, as after a ReLU: sgn 0, gradient 0
    return a.to(dtype)


def value_and_grad(fn, a: torch.Tensor, upstream: float = 1.0):
    a = a.detach().clone().requires_grad_(True)
    v = fn(a)
    (v * upstream).backward()
    return v.detach(), a.grad


# ------------------------------------------------------------------ gradcheck (float64)


def test_gradcheck_and_gradgradcheck_in_float64(path):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(7, 5, generator=g, dtype=torch.float64)
    a = (a.sign() * (0.1 + a.abs())).requires_grad_(True)  # away from the kink at 0
    pen = actsparse.L1(0.3)
    assert torch.autograd.gradcheck(pen, (a,))
    assert torch.autograd.gradgradcheck(pen, (a,))
    assert torch.autograd.gradcheck(actsparse.Lp(0.3, p=1.0), (a,))


# ------------------------------------------------------------------ against both references


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("upstream", [1.0, 3.7, -0.25])
@pytest.mark.parametrize("weight", [1.0, 1e-3 / 7])
def test_gradient_is_bit_for_bit_the_old_nodes(path, dtype, upstream, weight):
    a = activations((16, 12), dtype)
    v, g = value_and_grad(lambda t: actsparse.L1(weight)(t), a, upstream)
    v_old, g_old = value_and_grad(lambda t: reference_scaled_l1(t, weight), a, upstream)
    assert v.dtype == dtype and g.dtype == dtype
    assert torch.equal(g, g_old)
    torch.testing.assert_close(v, v_old)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_value_and_gradient_equal_the_plain_formula(path, dtype):
    a = activations((32, 20), dtype, seed=2)
    v, g = value_and_grad(lambda t: actsparse.L1(0.05)(t), a, 2.5)
    v_ref, g_ref = value_and_grad(lambda t: formula(t, 0.05), a, 2.5)
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=1e-6, atol=0)
    torch.testing.assert_close(v, v_ref, **tol)
    torch.testing.assert_close(g, g_ref, **tol)
    exact = 0.05 * a.double().abs().sum() / 32
    assert float(v) == pytest.approx(float(exact), rel=tol["rtol"])


def test_lp_at_p_1_is_l1_bit_for_bit(path):
    a = activations((10, 9), torch.float32, seed=3)
    v, g = value_and_grad(lambda t: actsparse.L1(0.2)(t), a, 1.5)
    v_lp, g_lp = value_and_grad(lambda t: actsparse.Lp(0.2, p=1.0)(t), a, 1.5)
    assert torch.equal(v, v_lp) and torch.equal(g, g_lp)


def test_non_contiguous_activations(path):
    a = activations((9, 14), torch.float32, seed=4).t()  # (14, 9), transposed strides
    v, g = value_and_grad(lambda t: actsparse.L1(0.1)(t), a)
    v_old, g_old = value_and_grad(lambda t: reference_scaled_l1(t, 0.1), a)
    assert torch.equal(g, g_old)
    torch.testing.assert_close(v, v_old)


def test_double_backward_equals_the_old_nodes(path):
    x = activations((12, 4), seed=5, zeros=False)

    def grad_of_grad_norm(fn):
        torch.manual_seed(0)
        lin = nn.Linear(4, 5).double()
        g = torch.autograd.grad(fn(torch.tanh(lin(x))), list(lin.parameters()), create_graph=True)
        return torch.autograd.grad(sum(t.pow(2).sum() for t in g), list(lin.parameters()))

    for got, ref in zip(grad_of_grad_norm(actsparse.L1(0.3)), grad_of_grad_norm(lambda t: reference_scaled_l1(t, 0.3))):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-15)


def test_without_gradients_nothing_is_kept():
    a = activations((6, 5), torch.float32).requires_grad_(True)
    with torch.no_grad():
        v = actsparse.L1(0.5)(a)
    assert not v.requires_grad and v.grad_fn is None
    torch.testing.assert_close(v, reference_scaled_l1(a.detach(), 0.5))


def test_float32_sum_of_many_elements_stays_accurate():
    # 2**23 float32 elements (the int8 path): summed pairwise, within 1e-6 of the float64 sum
    a = torch.rand(2**13, 2**10, generator=torch.Generator().manual_seed(6)) * 3
    v = actsparse.L1(1.0)(a.requires_grad_(True))
    exact = float(a.detach().double().sum()) / a.shape[0]
    assert float(v) == pytest.approx(exact, rel=1e-6)


# ------------------------------------------------------------------ through attach


class Shared(nn.Module):
    """One ReLU module called twice, and its second output read by a second target (Identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin2, self.out = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 3)
        self.act, self.same = nn.ReLU(), nn.Identity()

    def forward(self, x):
        h1 = self.act(self.lin1(x))
        h2 = self.same(self.act(self.lin2(h1)))
        return self.out(h2)


def shared_by_hand(m: Shared, x: torch.Tensor) -> torch.Tensor:
    h1 = torch.relu(m.lin1(x))
    h2 = torch.relu(m.lin2(h1))
    return formula(h1, 0.1) + formula(h2, 0.1) + formula(h2, 0.02) + formula(h2, 0.03)


def shared_step(dtype, x):
    torch.manual_seed(0)
    m = Shared().to(dtype)
    reg = actsparse.attach(m, {"act": actsparse.L1(0.1), "same": [actsparse.L1(0.02), actsparse.L1(0.03)]})
    loss = m(x).pow(2).mean() + reg.penalty()
    loss.backward()
    return m, reg, float(loss.detach())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attach_with_shared_tensors_matches_the_formula_and_the_old_nodes(path, dtype, monkeypatch):
    x = activations((11, 5), dtype, seed=7, zeros=False)
    m, reg, loss = shared_step(dtype, x)
    assert reg.stats()["act"].calls == 2
    grads = [p.grad.clone() for p in m.parameters()]
    # the formula by hand, on the same weights
    torch.manual_seed(0)
    ref = Shared().to(dtype)
    (ref(x).pow(2).mean() + shared_by_hand(ref, x)).backward()
    tol = dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    for g, p in zip(grads, ref.parameters()):
        torch.testing.assert_close(g, p.grad, **tol)
    # the old node: the same gradients bit for bit, the same loss up to rounding
    old_node(monkeypatch)
    m_old, _, loss_old = shared_step(dtype, x)
    for g, p in zip(grads, m_old.parameters()):
        assert torch.equal(g, p.grad)
    assert loss == pytest.approx(loss_old, rel=1e-6)


def test_attach_with_shared_tensors_gradcheck(path):
    torch.manual_seed(0)
    m = Shared().double()
    reg = actsparse.attach(m, {"act": actsparse.L1(0.1), "same": [actsparse.L1(0.02), actsparse.L1(0.03)]})
    x = activations((6, 5), seed=8, zeros=False).requires_grad_(True)

    def total(x):
        return m(x).pow(2).mean() + reg.penalty()

    assert torch.autograd.gradcheck(total, (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attach_in_half_precision_matches_the_old_nodes(path, dtype, monkeypatch):
    def step():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4)).to(dtype)
        reg = actsparse.attach(m, {"1": actsparse.L1(0.01)})
        out = m(activations((10, 6), dtype, seed=9, zeros=False))
        pen = reg.penalty()
        assert pen.dtype == dtype
        (out.float().pow(2).mean() + pen.float()).backward()
        return pen.detach(), [p.grad for p in m.parameters()]

    pen, grads = step()
    old_node(monkeypatch)
    pen_old, grads_old = step()
    torch.testing.assert_close(pen, pen_old)
    for g, g_old in zip(grads, grads_old):
        assert torch.equal(g, g_old)


def test_attach_before_an_inplace_relu_matches_the_old_nodes(path, monkeypatch):
    x = activations((8, 6), torch.float32, seed=10, zeros=False)

    def step():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
        reg = actsparse.attach(m, {"0": actsparse.L1(0.2)})
        (m(x).sum() + reg.penalty()).backward()
        return [p.grad for p in m.parameters()]

    grads = step()
    # by hand: the penalty on the Linear's output before the ReLU overwrote it
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    (ref(x).sum() + formula(ref[0](x), 0.2)).backward()
    for g, p in zip(grads, ref.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-7)
    old_node(monkeypatch)
    for g, g_old in zip(grads, step()):
        assert torch.equal(g, g_old)


# ------------------------------------------------------------------ errors as before


def _error(x: torch.Tensor, **kw) -> str:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(x.shape[1], 5).to(x.dtype), nn.Identity())
    actsparse.attach(m, {"1": actsparse.L1(1.0, **kw)})
    with pytest.raises(ValueError) as err:
        m(x)
    return str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_activations_raise_the_same_error(path, bad, monkeypatch):
    x = activations((4, 3), torch.float32, zeros=False)
    x[1, 2] = bad
    new = _error(x)
    assert "penalty on '1' (L1)" in new and "NaN or Inf" in new
    old_node(monkeypatch)
    assert new == _error(x)


def test_float16_overflow_raises_the_same_error(path, monkeypatch):
    x = torch.full((1, 1000), 100.0, dtype=torch.float16)
    m = nn.Sequential(nn.Identity())
    actsparse.attach(m, {"0": actsparse.L1(1.0)})
    with pytest.raises(ValueError, match=r"'0'.*overflows float16") as err:
        m(x.requires_grad_(True))
    old_node(monkeypatch)
    m = nn.Sequential(nn.Identity())
    actsparse.attach(m, {"0": actsparse.L1(1.0)})
    with pytest.raises(ValueError) as err_old:
        m(x)
    assert str(err.value) == str(err_old.value)


def test_unchecked_nan_gets_a_zero_gradient_as_before(path, monkeypatch):
    a = activations((5, 4), torch.float32, zeros=False)
    a[2, 1] = float("nan")
    v, g = value_and_grad(lambda t: actsparse.L1(0.5, check=False)(t), a)
    v_old, g_old = value_and_grad(lambda t: reference_scaled_l1(t, 0.5, check=False), a)
    assert torch.isnan(v) and torch.isnan(v_old)
    assert g[2, 1] == 0 and torch.isfinite(g).all()
    assert torch.equal(g, g_old)
