"""The CPU kernels of the sparse TopK path against naive references: the blocked top-k selection,
the blocked outer-product scatter and row dots, and the decode's custom backward."""

import numpy as np
import pytest
import torch
from test_sparse_topk import reconstruction_and_grads  # (tests/ is on sys.path)
from torch.nn import functional as F

from actsparse.models import SparseAutoencoder
from actsparse.models import sparse_topk as st


def naive_topk_sets(pre: torch.Tensor, k: int) -> list[set[int]]:
    """The k largest of each row by a full argsort in NumPy (float64)."""
    a = pre.double().numpy()
    return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in a]


@pytest.mark.parametrize("batch,n,k", [(1, 1024, 8), (257, 8192, 32), (64, 3000, 8), (33, 4096, 64), (16, 512, 4)])
def test_topk_rows_is_the_exact_topk(batch, n, k):
    assert st._block_size(n, k) >= 8  # these shapes take the blocked selection
    g = torch.Generator().manual_seed(n + k)
    pre = torch.randn(batch, n, generator=g)
    values, idx = st.topk_rows(pre, k)
    assert values.shape == idx.shape == (batch, k) and idx.dtype == torch.int64
    assert [set(r) for r in idx.tolist()] == naive_topk_sets(pre, k)
    assert torch.equal(values, pre.gather(1, idx))


def test_topk_rows_with_many_candidates_per_row():
    """Rows whose top values crowd into a few blocks (more than k entries ≥ the block threshold:
    the padded selection) and rows whose top k lie in k different blocks (exactly k candidates)."""
    n, k = 2048, 16
    width = st._block_size(n, k)
    g = torch.Generator().manual_seed(5)
    crowded = torch.randn(3, n, generator=g)
    crowded[:, :4 * width] += 10  # the top values all in the first 4 blocks
    spread = torch.randn(3, n, generator=g) - 10
    spread[:, ::width][:, :k] = torch.arange(k, dtype=torch.float32) + 1  # one large entry per block
    for pre in (crowded, spread, torch.cat([crowded, spread])):
        values, idx = st.topk_rows(pre, k)
        assert [set(r) for r in idx.tolist()] == naive_topk_sets(pre, k)
        assert torch.equal(values, pre.gather(1, idx))


def test_topk_rows_ties_infinities_and_nan():
    n, k = 1024, 8
    g = torch.Generator().manual_seed(6)
    ties = torch.randint(0, 3, (20, n), generator=g).float()  # hundreds of equal values per row
    values, idx = st.topk_rows(ties, k)
    assert torch.equal(values.sort(-1).values, ties.topk(k, -1).values.sort(-1).values)
    assert torch.equal(values, ties.gather(1, idx))
    assert all(len(set(r)) == k for r in idx.tolist())  # distinct units
    inf = torch.full((2, n), float("-inf"))
    inf[1, 100] = 3.0
    values, idx = st.topk_rows(inf, k)
    assert torch.equal(values, inf.gather(1, idx)) and values[1].max() == 3.0 and 100 in idx[1].tolist()
    assert all(len(set(r)) == k for r in idx.tolist())
    nan = torch.randn(4, n, generator=g)
    nan[2, 7] = float("nan")
    values, idx = st.topk_rows(nan, k)
    want = nan.topk(k, -1, sorted=False)  # a NaN row: the same as torch's topk (NaN ranked first)
    assert torch.equal(idx.sort(-1).values, want.indices.sort(-1).values)
    assert torch.isnan(values[2]).sum() == 1


def test_topk_rows_falls_back_for_short_rows():
    pre = torch.randn(10, 40)
    assert st._block_size(40, 8) == 0
    values, idx = st.topk_rows(pre, 8)
    assert [set(r) for r in idx.tolist()] == naive_topk_sets(pre, 8)


@pytest.mark.parametrize("mkl", [True, False])
@pytest.mark.parametrize("block_bytes", [1, 4096, 1 << 20])
def test_scatter_outer_and_gathered_dots(monkeypatch, block_bytes, mkl):
    """MKL's CSR kernels, and the fallback in blocks of 1 sample, of a few and of all of them (the
    last one short); units repeated across samples and within a sample: the same sums as a loop
    in NumPy (float64)."""
    if mkl and not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL")
    if not mkl:
        monkeypatch.setattr(st, "_mkl_sparse", lambda t: False)
    monkeypatch.setattr(st, "SCATTER_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(7)
    batch, k, n, d = 37, 5, 13, 6
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)])
    idx[3, 1] = idx[3, 0]  # a unit twice in one sample (not from a top-k, but the sums must hold)
    coef = torch.randn(batch, k, generator=g, dtype=torch.float64)
    rows = torch.randn(batch, d, generator=g, dtype=torch.float64)
    table = torch.randn(n, d, generator=g, dtype=torch.float64)
    want_outer, want_dots = np.zeros((n, d)), np.zeros((batch, k))
    for b in range(batch):
        for j in range(k):
            want_outer[idx[b, j]] += coef[b, j].item() * rows[b].numpy()
            want_dots[b, j] = rows[b].numpy() @ table[idx[b, j]].numpy()
    np.testing.assert_allclose(st.scatter_outer(idx, coef, rows, n).numpy(), want_outer, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(st.gathered_dots(idx, table, rows).numpy(), want_dots, rtol=1e-12, atol=1e-14)
    start = torch.ones(n, d, dtype=torch.float64)  # out= adds to what is there
    np.testing.assert_allclose(st.scatter_outer(idx, coef, rows, n, out=start).numpy(), want_outer + 1, rtol=1e-12)
    untouched = sorted(set(range(n + 3)) - set(idx.reshape(-1).tolist()))  # units no sample chose: exact zeros
    assert untouched and not st.scatter_outer(idx, coef, rows, n + 3)[untouched].any()
    f32 = st.scatter_outer(idx, coef.float(), rows.float(), n)  # float32: to rounding
    np.testing.assert_allclose(f32.numpy(), want_outer, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st.gathered_dots(idx, table.float(), rows.float()).numpy(), want_dots, rtol=1e-5,
                               atol=1e-5)


def test_sparse_decode_backward_equals_the_embedding_bag_autograd():
    """The custom backward of sparse_decode against autograd through F.embedding_bag: float64
    gradcheck, and float32 gradients to rounding."""
    g = torch.Generator().manual_seed(8)
    idx = torch.stack([torch.randperm(30, generator=g)[:4] for _ in range(6)])
    v = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    atoms = torch.randn(30, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, a, b: st.sparse_decode(v, idx, a, b), (v, atoms, bias))
    v32, a32 = v.detach().float().requires_grad_(), atoms.detach().float().requires_grad_()
    up = torch.randn(6, 5, generator=g)
    mine = torch.autograd.grad(st.sparse_decode(v32, idx, a32), (v32, a32), up)
    ref = torch.autograd.grad(F.embedding_bag(idx, a32, per_sample_weights=v32, mode="sum"), (v32, a32), up)
    for a, b in zip(mine, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sae_on_the_blocked_path_equals_the_dense_path():
    """d_sae 1024, k 8 (the blocked top-k is taken): reconstruction and every gradient of the sparse
    path equal the dense path's, float64, over a batch of several top-k chunks."""
    assert st._block_size(1024, 8) >= 8
    torch.manual_seed(0)
    kw = dict(decoder="linear", init="orthogonal_tied", unit_norm_decoder=True, dtype=torch.float64)
    sparse = SparseAutoencoder(12, 1024, "topk", k=8, decode="sparse", **kw)
    dense = SparseAutoencoder(12, 1024, "topk", k=8, decode="dense", **kw)
    with torch.no_grad():
        sparse.b_enc.uniform_(-0.2, 0.2)
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(700, 12, dtype=torch.float64)
    got = [reconstruction_and_grads(m, x) for m in (sparse, dense)]
    assert torch.allclose(got[0][0], got[1][0], rtol=0, atol=1e-12)
    for a, b in zip(got[0][1], got[1][1]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_bf16_screen_picks_units_within_bf16_rounding_of_the_top_k():
    """The bf16 screen: values are the exact products at the chosen units (float32 dot products),
    and no unit left out beats a chosen one by more than bf16's rounding of the product (2⁻⁸
    relative on x, W and the output: a bound of 4·2⁻⁸·(|x||W|ᵀ + |b|) per entry)."""
    g = torch.Generator().manual_seed(9)
    x, w, b = torch.randn(300, 64, generator=g), torch.randn(2048, 64, generator=g) / 8, torch.randn(2048, generator=g)
    k = 16
    values, idx = st.topk_linear(x, w, b, k, screen="bf16", chunk=128)
    exact = (x.double() @ w.double().T + b.double())
    assert torch.allclose(values.double(), exact.gather(1, idx), rtol=0, atol=1e-5)
    assert all(len(set(r)) == k for r in idx.tolist())
    bound = 4 * 2.0 ** -8 * (x.double().abs() @ w.double().abs().T + b.double().abs())
    left_out = exact.scatter(1, idx, float("-inf")).amax(1)
    chosen_min = exact.gather(1, idx).amin(1)
    assert bool((left_out - chosen_min <= bound.amax(1)).all())
    # and most chosen sets are the exact ones (what the bench reports as the differing fraction)
    want = exact.topk(k, -1).indices
    same_units = sum(len(set(a) & set(c)) for a, c in zip(idx.tolist(), want.tolist())) / idx.numel()
    assert same_units > 0.9
    with pytest.raises(ValueError, match="screen must be one of"):
        st.topk_linear(x, w, b, k, screen="fp8")


def test_bf16_screen_on_the_model_trains_and_evaluates_exactly():
    from actsparse.config import ConfigError, TrainConfig

    torch.manual_seed(0)
    kw = dict(k=8, decode="sparse", init="orthogonal_tied", unit_norm_decoder=True, pre_bias=True)
    screened = SparseAutoencoder(32, 512, "topk", topk_screen="bf16", **kw)
    exact = SparseAutoencoder(32, 512, "topk", **kw)
    exact.load_state_dict(screened.state_dict())
    x = torch.randn(256, 32)
    screened.eval()
    exact.eval()  # evaluation takes the exact top k on both
    assert torch.equal(screened(x).reconstruction, exact(x).reconstruction)
    screened.train()
    out = screened(x)
    out.loss.backward()
    assert screened.W_enc.grad is not None and torch.isfinite(screened.W_enc.grad).all()
    with pytest.raises(ValueError, match="dense path"):
        SparseAutoencoder(32, 64, "topk", k=8, decode="dense", topk_screen="bf16")
    with pytest.raises(ValueError, match="AuxK"):
        SparseAutoencoder(32, 512, "topk", k=8, decode="sparse", auxk=16, topk_screen="bf16")
    with pytest.raises(ValueError, match="topk_screen must be"):
        SparseAutoencoder(32, 512, "topk", k=8, topk_screen="fast")
    with pytest.raises(ConfigError, match="--topk-screen bf16"):
        TrainConfig(data="synthetic", activation="relu", topk_screen="bf16")
    with pytest.raises(ConfigError, match="--topk-screen"):
        TrainConfig(data="synthetic", activation="topk", k=4, topk_screen="half")


def test_the_unit_grouping_kept_on_the_indices_follows_their_changes():
    """scatter_outer keeps the sort of the indices on the tensor (both weight gradients of a step
    use it); an in-place change of the indices must not reuse it."""
    g = torch.Generator().manual_seed(10)
    idx = torch.stack([torch.randperm(20, generator=g)[:3] for _ in range(8)])
    coef = torch.randn(8, 3, generator=g, dtype=torch.float64)
    rows = torch.randn(8, 4, generator=g, dtype=torch.float64)

    def naive(idx):
        out = torch.zeros(20, 4, dtype=torch.float64)
        for b in range(8):
            for j in range(3):
                out[idx[b, j]] += coef[b, j] * rows[b]
        return out

    assert torch.allclose(st.scatter_outer(idx, coef, rows, 20), naive(idx))
    assert torch.allclose(st.scatter_outer(idx, coef, rows, 20), naive(idx))  # from the kept grouping
    idx[2, 1] = (idx[2, 1] + 7) % 20 if int((idx[2, 1] + 7) % 20) not in idx[2].tolist() else idx[2, 1]
    idx[5] = idx[5].flip(0)
    assert torch.allclose(st.scatter_outer(idx, coef, rows, 20), naive(idx))
    assert torch.allclose(st.scatter_outer(idx, coef, rows, 25), torch.cat([naive(idx), torch.zeros(5, 4).double()]))
