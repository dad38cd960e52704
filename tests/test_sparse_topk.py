"""The sparse TopK path against the dense path and against naive references (float64)."""

import numpy as np
import pytest
import torch

from actsparse import L1
from actsparse.metrics import l0
from actsparse.models import SparseAutoencoder, SparseCode
from actsparse.models.sparse_topk import gathered_linear, scatter_outer, sparse_decode, unit_sums


def rand64(*shape):
    return torch.rand(*shape, dtype=torch.float64)


def reconstruction_and_grads(model, x):
    """One forward and backward of ``model`` on ``x``: the reconstruction and every parameter's gradient."""
    out = model(x)
    out.loss.backward()
    return out.reconstruction.detach(), [p.grad.clone() for p in model.parameters()]


def pair(d_in=7, d=40, k=5, **kw):
    """Two SAEs with the same parameters, one per path."""
    torch.manual_seed(0)
    dense = SparseAutoencoder(d_in, d, "topk", k=k, decode="dense", dtype=torch.float64, **kw)
    sparse = SparseAutoencoder(d_in, d, "topk", k=k, decode="sparse", dtype=torch.float64, **kw)
    with torch.no_grad():
        dense.b_enc.uniform_(-0.3, 0.3)
        dense.b_dec.uniform_(-0.3, 0.3)
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


def test_scatter_outer_equals_a_loop():
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(9, generator=g)[:3] for _ in range(5)])
    coef = torch.randn(5, 3, generator=g, dtype=torch.float64)
    rows = torch.randn(5, 4, generator=g, dtype=torch.float64)
    ref = np.zeros((9, 4))
    for b in range(5):
        for j in range(3):
            ref[idx[b, j]] += coef[b, j].item() * rows[b].numpy()
    np.testing.assert_allclose(scatter_outer(idx, coef, rows, 9).numpy(), ref, rtol=1e-13, atol=1e-15)
    # the fallback for dtypes without a sparse matmul gives the same sums
    np.testing.assert_allclose(scatter_outer(idx, coef.bfloat16(), rows.bfloat16(), 9).float().numpy(), ref,
                               rtol=0.05, atol=0.05)
    np.testing.assert_allclose(unit_sums(idx, coef, 9).numpy(), [coef[idx == s].sum().item() for s in range(9)],
                               rtol=1e-13, atol=1e-15)


def test_gathered_linear_and_sparse_decode_pass_gradcheck():
    torch.manual_seed(2)
    x = rand64(4, 5).requires_grad_()
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(11)[:3] for _ in range(4)])

    def fn(x, w, b):
        pre = torch.nn.functional.linear(x, w, b)
        return gathered_linear(x, w, b, idx, pre)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    np.testing.assert_allclose(fn(x, w, b).detach().numpy(),
                               (x @ w.T + b).gather(1, idx).detach().numpy(), rtol=1e-14)
    v = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    atoms = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, a, b5: sparse_decode(v, idx, a, b5), (v, atoms, b[:5].detach().clone()
                                                                                    .requires_grad_()))
    dense = torch.zeros(4, 11, dtype=torch.float64).scatter(1, idx, v.detach())
    np.testing.assert_allclose(sparse_decode(v, idx, atoms).detach().numpy(), (dense @ atoms).detach().numpy(),
                               rtol=1e-13)


@pytest.mark.parametrize("kw", [{}, {"tied": True}, {"pre_bias": True}, {"decoder": "sigmoid"},
                                {"unit_norm_decoder": True, "init": "orthogonal_tied"},
                                {"auxk": 6, "dead_after": 1}, {"weight_decay": 0.01, "recon_loss": "mse"}])
def test_sparse_path_equals_dense_path_values_and_gradients(kw):
    dense, sparse = pair(**kw)
    assert sparse.sparse and not dense.sparse
    for step in range(2):  # the second step has dead units (dead_after=1), so AuxK is non-zero
        x = rand64(13, 7)
        od, osp = dense(x), sparse(x)
        assert isinstance(osp.code, SparseCode) and isinstance(od.code, torch.Tensor)
        np.testing.assert_allclose(osp.code.to_dense().detach().numpy(), od.code.detach().numpy(), rtol=1e-14)
        for term in ("reconstruction", "reconstruction_loss", "weight_decay_loss", "auxk_loss"):
            np.testing.assert_allclose(getattr(osp, term).detach().numpy(), getattr(od, term).detach().numpy(),
                                       rtol=1e-12, atol=1e-15, err_msg=term)
        if kw.get("auxk") and step == 1:
            assert float(od.auxk_loss) > 0
        gd = torch.autograd.grad(od.loss, list(dense.parameters()))
        gs = torch.autograd.grad(osp.loss, list(sparse.parameters()))
        for (name, _), a, b in zip(dense.named_parameters(), gd, gs):
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-11, atol=1e-14, err_msg=name)
        np.testing.assert_array_equal(sparse.samples_since_fired.numpy(), dense.samples_since_fired.numpy())


def test_sparse_code_statistics_equal_the_dense_ones():
    dense, sparse = pair(k=4)
    with torch.no_grad():
        sparse.b_enc.fill_(-0.45)  # some samples have fewer than k positive units: zeros among the values
        dense.b_enc.fill_(-0.45)
    x = rand64(30, 7)
    code, h = sparse(x).code.detach(), dense(x).code.detach()
    assert (code.values == 0).any()
    assert code.shape == tuple(h.shape)
    np.testing.assert_allclose(float(code.mean()), float(h.mean()), rtol=1e-13)
    np.testing.assert_allclose(code.mean(0).numpy(), h.mean(0).numpy(), rtol=1e-13, atol=1e-16)
    np.testing.assert_array_equal(code.fired().numpy(), (h != 0).any(0).numpy())
    assert float(l0(code)) == float(l0(h))
    with pytest.raises(ValueError, match="dim=None or dim=0"):
        code.mean(1)


def test_eval_mode_and_decode_of_a_sparse_code():
    dense, sparse = pair()
    dense.eval(), sparse.eval()
    x = rand64(6, 7)
    with torch.no_grad():
        np.testing.assert_allclose(sparse(x).reconstruction.numpy(), dense(x).reconstruction.numpy(), rtol=1e-13)
        code = sparse(x).code
        np.testing.assert_allclose(sparse.decode(code).numpy(), dense.decode(code.to_dense()).numpy(), rtol=1e-13)


def test_auto_chooses_the_sparse_path_only_where_it_applies():
    assert SparseAutoencoder(8, 512, "topk", k=8).sparse
    assert not SparseAutoencoder(8, 16, "topk", k=8).sparse  # k close to d_hidden: dense matmuls win
    assert not SparseAutoencoder(8, 63, "topk", k=8).sparse and SparseAutoencoder(8, 64, "topk", k=8).sparse
    assert not SparseAutoencoder(8, 512, "topk", k=8, penalty=L1(0.1)).sparse  # a penalty needs the dense code
    assert not SparseAutoencoder(8, 512, "batchtopk", k=8).sparse
    assert not SparseAutoencoder(8, 512, "relu").sparse
    assert SparseAutoencoder(8, 16, "topk", k=8, decode="sparse").sparse


@pytest.mark.parametrize("kwargs, match", [
    ({"activation": "relu", "decode": "sparse"}, "needs the topk activation"),
    ({"activation": "topk", "k": 2, "decode": "sparse", "penalty": L1(0.1)}, "cannot apply a penalty"),
    ({"activation": "topk", "k": 2, "decode": "fast"}, "decode must be"),
])
def test_bad_decode_requests_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseAutoencoder(8, 32, **kwargs)


def test_training_on_either_path_reaches_the_same_weights():
    from actsparse.config import ConfigError, TrainConfig
    from actsparse.data import make_synthetic
    from actsparse.train import train

    x = make_synthetic(600, d=16, n_features=48, active=3, seed=1).x.double()
    base = dict(data="synthetic", hidden=64, activation="topk", k=4, decoder="linear", penalty=None,
                optimizer="adam", epochs=2, batch_size=50, lr=3e-3, weight_decay=0.0, auxk=8, validation=0.0)
    runs = {d: train(TrainConfig(**base, decode=d), x) for d in ("dense", "sparse")}
    assert runs["sparse"].model.sparse and not runs["dense"].model.sparse
    for (name, a), b in zip(runs["dense"].model.state_dict().items(), runs["sparse"].model.state_dict().values()):
        np.testing.assert_allclose(b.double().numpy(), a.double().numpy(), rtol=1e-9, atol=1e-11, err_msg=name)
    assert runs["sparse"].metrics["fvu"] == pytest.approx(runs["dense"].metrics["fvu"], rel=1e-9)
    with pytest.raises(ConfigError, match="--decode sparse needs"):
        TrainConfig(**(base | {"penalty": "l1"}), decode="sparse")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_topk_linear_in_chunks_is_the_topk_of_the_whole_matrix(dtype):
    """topk_linear, 256 rows at a time over 1,000 rows (the last chunk short): the same index sets
    as topk of the full x Wᵀ + b, and values equal to the full matrix's at those indices (float64:
    exactly; float32: to rounding, the chunks may take another GEMM kernel)."""
    from actsparse.models.sparse_topk import topk_linear

    g = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*s, generator=g, dtype=dtype) for s in ((1000, 24), (300, 24), (300,)))
    values, idx = topk_linear(x, w, b, 7, chunk=256)
    full = torch.nn.functional.linear(x.double(), w.double(), b.double())
    want = full.topk(7, dim=-1).indices
    assert values.shape == idx.shape == (1000, 7) and values.dtype == dtype and idx.dtype == torch.int64
    assert torch.equal(idx.sort(-1).values, want.sort(-1).values)
    tol = 0 if dtype == torch.float64 else 1e-5
    assert torch.allclose(values.double(), full.gather(-1, idx), rtol=0, atol=tol)


def test_sparse_path_over_several_chunks_matches_the_dense_reference():
    """A batch of 1,100 rows (3 chunks of the top-k): the sparse path's reconstruction and every
    gradient equal the dense path's, from the same weights (float64: to 1e-10)."""
    torch.manual_seed(0)
    kw = dict(decoder="linear", init="orthogonal_tied", unit_norm_decoder=True)
    sparse = SparseAutoencoder(16, 256, "topk", k=5, decode="sparse", **kw).double()
    dense = SparseAutoencoder(16, 256, "topk", k=5, decode="dense", **kw).double()
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(1100, 16, dtype=torch.float64)
    res = [reconstruction_and_grads(m, x) for m in (sparse, dense)]
    assert torch.allclose(res[0][0], res[1][0], atol=1e-10)
    for a, b in zip(res[0][1], res[1][1]):
        assert torch.allclose(a, b, atol=1e-10)
