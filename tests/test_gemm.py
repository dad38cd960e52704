"""The encoder GEMM chosen by measurement (actsparse.gemm): both paths equal F.linear to float32
rounding (float64 and graphs always take F.linear, exactly), the choice is stored per machine and
read back without measuring again, and a TopK SAE on the sparse path gives the dense reference
path's values and gradients whichever GEMM it uses."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from actsparse import gemm
from actsparse.models import SparseAutoencoder

pytestmark = pytest.mark.skipif(not gemm.onednn_available(), reason="this torch has no oneDNN linear")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path))
    monkeypatch.delenv("ACTSPARSE_GEMM", raising=False)
    monkeypatch.setattr(gemm, "_memo", {})
    return tmp_path


@pytest.mark.parametrize("path", gemm.PATHS)
@pytest.mark.parametrize(("batch", "d_in", "d_out"), [(1, 3, 5), (37, 64, 200), (256, 96, 1024)])
def test_each_path_is_f_linear_to_float32_rounding(fresh, monkeypatch, path, batch, d_in, d_out):
    monkeypatch.setenv("ACTSPARSE_GEMM", path)
    g = torch.Generator().manual_seed(batch)
    x, w, b = torch.randn(batch, d_in, generator=g), torch.randn(d_out, d_in, generator=g), torch.randn(d_out)
    ref = F.linear(x.double(), w.double(), b.double())
    for bias in (b, None):
        y = gemm.linear(x, w, bias)
        want = ref if bias is not None else ref - b.double()
        assert y.dtype == torch.float32 and y.shape == (batch, d_out)
        # float32 rounding of a d_in-term sum: a few ulps of the largest terms
        assert torch.allclose(y.double(), want, rtol=0, atol=1e-5 * float(want.abs().max()) + 1e-6)
    xt = torch.randn(d_in, batch, generator=g).t()  # a transposed (non-contiguous) input
    assert torch.allclose(gemm.linear(xt, w, b), F.linear(xt, w, b), atol=1e-4)


def test_float64_takes_f_linear_exactly_and_the_default_path_is_f_linear(fresh, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_GEMM", "onednn")
    x, w, b = torch.randn(8, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.randn(6)
    assert torch.equal(gemm.linear(x, w, b.double()), F.linear(x, w, b.double()))
    monkeypatch.setenv("ACTSPARSE_GEMM", "default")
    w32 = torch.randn(6, 4, requires_grad=True)
    x32 = torch.randn(8, 4)
    y = gemm.linear(x32, w32)
    assert y.requires_grad and torch.equal(y, F.linear(x32, w32)) and y.grad_fn.name() == "MmBackward0"
    with torch.no_grad():
        assert not gemm.linear(x32, w32).requires_grad


@pytest.mark.parametrize("path", gemm.PATHS)
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_graph_values_and_gradients_are_f_linear_to_float32_rounding(fresh, monkeypatch, path, x_grad, with_bias):
    """Each product of the layer on ``path``: the output and the gradients of x, W and b against
    F.linear's in float64 (an independent reference), with a weight that is a transposed view (a
    tied decoder's ``W_enc.t()``)."""
    monkeypatch.setenv("ACTSPARSE_GEMM", path)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 24, generator=g).requires_grad_(x_grad)
    w_t = torch.randn(24, 40, generator=g, requires_grad=True)  # the weight is w_t.t(): (40, 24), not contiguous
    b = torch.randn(40, generator=g, requires_grad=True) if with_bias else None
    up = torch.randn(300, 40, generator=g)
    y = gemm.linear(x, w_t.t(), b)
    (y * up).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(x_grad), w_t.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if with_bias else None
    y64 = F.linear(x64, w64.t(), b64)
    (y64 * up.double()).sum().backward()
    pairs = [(y, y64), (w_t.grad, w64.grad)] + ([(x.grad, x64.grad)] if x_grad else []) + \
        ([(b.grad, b64.grad)] if with_bias else [])
    for got, want in pairs:
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.allclose(got.double(), want, rtol=0, atol=1e-5 * float(want.abs().max()) + 1e-6)
    assert x.grad is None if not x_grad else True


def test_a_gradient_of_a_gradient_goes_through_differentiable_products(fresh, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_GEMM", "onednn")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 6, generator=g, requires_grad=True)
    w = torch.randn(7, 6, generator=g, requires_grad=True)
    (gx,) = torch.autograd.grad(gemm.linear(x, w).square().sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.square().sum(), w)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (gx64,) = torch.autograd.grad(F.linear(x64, w64).square().sum(), x64, create_graph=True)
    (gw64,) = torch.autograd.grad(gx64.square().sum(), w64)
    assert torch.allclose(gw.double(), gw64, rtol=1e-4, atol=1e-4 * float(gw64.abs().max()))


def test_each_product_of_a_graph_is_chosen_on_its_own(fresh, monkeypatch):
    """oneDNN measured faster for the output only: the backward's products stay torch's mm."""
    def measured(batch, d_in, d_out, repeats=5, kind="forward"):
        return {"default": 2.0, "onednn": 1.0} if kind == "forward" else {"default": 1.0, "onednn": 2.0}

    monkeypatch.setattr(gemm, "_measure", measured)
    monkeypatch.setattr(gemm, "_onednn", _counting(gemm._onednn, calls := []))
    x = torch.randn(100, 8, requires_grad=True)
    w = torch.randn(16, 8, requires_grad=True)
    gemm.linear(x, w).sum().backward()
    assert len(calls) == 1  # the output only
    kinds = sorted(k.split("|")[-1] for k in gemm.decisions())
    assert kinds == ["128x8->16", "grad_input of 128x8->16", "grad_weight of 128x8->16"]
    assert set(gemm.decisions().values()) == {"onednn", "default"}


def _counting(f, calls):
    def counted(*a, **k):
        calls.append(1)
        return f(*a, **k)
    return counted


def test_the_choice_is_measured_once_and_stored(fresh, monkeypatch):
    calls = []

    def measured(batch, d_in, d_out, repeats=5, kind="forward"):
        calls.append((batch, d_in, d_out))
        return {"default": 2.0, "onednn": 1.0}  # oneDNN 2x faster

    monkeypatch.setattr(gemm, "_measure", measured)
    assert gemm.choose(300, 16, 64) == "onednn"
    assert gemm.choose(500, 16, 64) == "onednn" and len(calls) == 1  # same bucket (512): no new measurement
    stored = json.loads((fresh / "gemm.json").read_text())
    (key, entry), = stored.items()
    assert "512x16->64" in key and entry["path"] == "onednn"
    # another process (a fresh memo) reads the file and does not measure
    monkeypatch.setattr(gemm, "_memo", {})
    monkeypatch.setattr(gemm, "_measure", lambda *a, **k: pytest.fail("measured again"))
    assert gemm.choose(400, 16, 64) == "onednn"
    # a tie keeps the default
    monkeypatch.setattr(gemm, "_measure", lambda *a, **k: {"default": 1.05, "onednn": 1.0})
    assert gemm.choose(40, 16, 64) == "default"


def test_the_environment_overrides(fresh, monkeypatch):
    monkeypatch.setattr(gemm, "_measure", lambda *a, **k: pytest.fail("measured despite ACTSPARSE_GEMM"))
    monkeypatch.setenv("ACTSPARSE_GEMM", "default")
    assert gemm.choose(64, 8, 8) == "default"
    monkeypatch.setenv("ACTSPARSE_GEMM", "fastest")
    with pytest.raises(ValueError, match="ACTSPARSE_GEMM must be one of default, onednn"):
        gemm.choose(64, 8, 8)


@pytest.mark.parametrize("path", gemm.PATHS)
def test_sparse_topk_sae_matches_the_dense_reference_on_each_path(fresh, monkeypatch, path):
    """Forward values and every parameter's gradient of the sparse path (encoder GEMM on ``path``)
    against the dense path with F.linear, from the same weights and batch."""
    monkeypatch.setenv("ACTSPARSE_GEMM", path)
    torch.manual_seed(0)
    sparse = SparseAutoencoder(48, 768, "topk", k=8, decoder="linear", decode="sparse", init="orthogonal_tied")
    dense = SparseAutoencoder(48, 768, "topk", k=8, decoder="linear", decode="dense", init="orthogonal_tied")
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(200, 48)
    outs = {}
    for name, m in (("sparse", sparse), ("dense", dense)):
        out = m(x)
        out.loss.backward()
        outs[name] = (out.reconstruction.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    (rs, gs), (rd, gd) = outs["sparse"], outs["dense"]
    assert torch.allclose(rs, rd, atol=1e-5)
    for n in gd:
        assert torch.allclose(gs[n], gd[n], atol=1e-6, rtol=1e-4), n


def test_a_full_batch_is_timed_on_a_slice_and_keeps_its_input_uncopied(fresh, monkeypatch):
    """A 10⁶-row layer is timed on MEASURE_ROWS rows (timing it whole took 25 s and a copy of the
    data), and its weight gradient stays with torch's mm, which needs no transposed copy."""
    shapes = []
    randn = torch.randn
    with monkeypatch.context() as m:
        m.setattr(torch, "randn", lambda *size, **kw: shapes.append(size) or randn(*size, **kw))
        for kind in gemm.KINDS:
            gemm._measure(10**6, 8, 4, repeats=1, kind=kind)
    assert max(s[0] for s in shapes) == gemm.MEASURE_ROWS
    monkeypatch.setattr(gemm, "_measure", lambda *a, **k: {"default": 2.0, "onednn": 1.0})  # oneDNN faster
    w = torch.randn(4, 8, requires_grad=True)
    over = gemm.COPY_LIMIT // (4 * (8 + 4)) + 1  # rows whose transposed copies pass the limit
    gemm.linear(torch.randn(over, 8), w).sum().backward()
    assert not any("grad_weight" in k for k in gemm.decisions())  # not even measured
    gemm.linear(torch.randn(1000, 8), w).sum().backward()
    assert any("grad_weight of 1024x8->4" in k for k in gemm.decisions())  # under it: chosen as usual
