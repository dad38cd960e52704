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


def test_float64_and_graphs_take_f_linear_exactly(fresh, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_GEMM", "onednn")
    x, w, b = torch.randn(8, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.randn(6)
    assert torch.equal(gemm.linear(x, w, b.double()), F.linear(x, w, b.double()))
    w32 = torch.randn(6, 4, requires_grad=True)
    x32 = torch.randn(8, 4)
    y = gemm.linear(x32, w32)
    assert y.requires_grad and torch.equal(y, F.linear(x32, w32))  # a graph: F.linear, differentiable
    with torch.no_grad():
        assert not gemm.linear(x32, w32).requires_grad


def test_the_choice_is_measured_once_and_stored(fresh, monkeypatch):
    calls = []

    def measured(batch, d_in, d_out, repeats=5):
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
