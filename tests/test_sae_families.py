"""SAE families against independent NumPy float64 re-statements of their papers' formulas.

* Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024): the loss is the sum over nested prefixes
  ``m_i`` of the reconstruction loss of ``x̂_i = h[:, :m_i] W_dec[:m_i] + b_dec``.
* Gated SAE (Rajamanoharan et al. 2024a): ``f = 1[π_gate > 0] ⊙ ReLU(π_mag)``, the penalty on
  ``ReLU(π_gate)``, the auxiliary reconstruction from ``ReLU(π_gate)`` through a frozen decoder.
* BatchTopK (Bussmann et al. 2024) on ``(..., d_sae)`` inputs: k per row.
* Neuron resampling (Bricken et al. 2023): dead units take the direction of inputs drawn with
  probability ∝ loss², encoder rows at 0.2 × the alive rows' mean norm, optimiser state reset.

Every check compares with NumPy written here (or with ``gradcheck``'s finite differences), never
with another output of the code under test.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch.func import functional_call

from actsparse.models import BatchTopK, Gated, SparseAutoencoder, get_activation
from actsparse.penalties import L1
from actsparse.train import train_step

# --------------------------------------------------------------------------------------------
# NumPy references


def np_relu(z):
    return np.maximum(z, 0.0)


def np_topk_rows(a, k):
    """Keep the k largest entries of each row (a loop over rows), zero the rest."""
    out = np.zeros_like(a)
    for i, row in enumerate(a):
        idx = np.argsort(-row, kind="stable")[:k]
        out[i, idx] = row[idx]
    return out


def np_batchtopk(a, k):
    """Keep the k·rows largest entries of ``a`` ``(..., d)`` over all of it (rows = size / d)."""
    flat = a.ravel()
    rows = flat.size // a.shape[-1]
    idx = np.argsort(-flat, kind="stable")[: k * rows]
    out = np.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(a.shape)


def np_recon(x_hat, x, kind):
    """``half_sse``: (1/m) Σ ½‖x̂ − x‖²; ``mse``: the mean over elements."""
    d = x_hat - x
    return 0.5 * (d**2).sum() / x.shape[0] if kind == "half_sse" else (d**2).mean()


def P(m):
    return {n: p.detach().numpy().copy() for n, p in m.named_parameters()}


def np_pre(x, p, pre_bias):
    x_in = x - p["b_dec"] if pre_bias else x
    return x_in @ p["W_enc"].T + p["b_enc"]


def np_matryoshka_terms(h, p, x, sizes, kind):
    """Each prefix's reconstruction loss, the full dictionary last."""
    return [np_recon(h[:, :m] @ p["W_dec"][:m] + p["b_dec"], x, kind) for m in sizes]


def rand64(*shape, gen):
    return torch.randn(*shape, dtype=torch.float64, generator=gen)


def _randomise_biases(m, gen, scale=0.3):
    with torch.no_grad():
        for name in ("b_enc", "b_dec"):
            getattr(m, name).copy_(scale * rand64(*getattr(m, name).shape, gen=gen))


def _as_function(m):
    names = [n for n, _ in m.named_parameters()]

    def f(x, *params):
        return functional_call(m, dict(zip(names, params)), (x,)).loss

    return f, tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())


# --------------------------------------------------------------------------------------------
# Matryoshka


@pytest.mark.parametrize("kind", ["mse", "half_sse"])
@pytest.mark.parametrize("act, decode", [("topk", "dense"), ("topk", "sparse"), ("batchtopk", "dense")])
def test_matryoshka_loss_is_the_sum_over_prefixes(kind, act, decode):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    sizes = (3, 8, 20)
    m = SparseAutoencoder(6, 20, act, k=4, recon_loss=kind, pre_bias=True, matryoshka=sizes[:2], decode=decode,
                          dtype=torch.float64)
    assert m.matryoshka == sizes and m.sparse == (decode == "sparse")  # d_hidden appended
    _randomise_biases(m, g)
    x = rand64(9, 6, gen=g)
    p = P(m)
    out = m(x)
    a = np_relu(np_pre(x.numpy(), p, True))
    h = np_topk_rows(a, 4) if act == "topk" else np_batchtopk(a, 4)
    terms = np_matryoshka_terms(h, p, x.numpy(), sizes, kind)
    np.testing.assert_allclose(float(out.loss), sum(terms), rtol=1e-12)
    np.testing.assert_allclose(float(out.reconstruction_loss), terms[-1], rtol=1e-12)
    np.testing.assert_allclose(float(out.aux_loss), sum(terms[:-1]), rtol=1e-12)
    np.testing.assert_allclose(out.reconstruction.detach().numpy(), h @ p["W_dec"] + p["b_dec"], rtol=1e-12,
                               atol=1e-13)
    assert terms[0] != terms[1] != terms[2]  # the prefixes differ: the sum is not a multiple of one term


def test_matryoshka_with_one_prefix_is_plain_topk_exactly():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, generator=g)
    outs, grads = [], []
    for sizes in ((32,), None):
        torch.manual_seed(3)
        m = SparseAutoencoder(8, 32, "topk", k=3, recon_loss="mse", pre_bias=True, matryoshka=sizes,
                              init="orthogonal_tied", decode="dense")
        out = m(x)
        out.loss.backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in m.parameters()])
    a, b = outs
    assert torch.equal(a.loss, b.loss) and torch.equal(a.reconstruction_loss, b.reconstruction_loss)
    assert torch.equal(a.reconstruction, b.reconstruction) and float(a.aux_loss) == 0.0
    assert all(torch.equal(u, v) for u, v in zip(*grads))


def test_matryoshka_gradcheck_relu_l1_dense():
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    m = SparseAutoencoder(5, 7, "relu", penalty=L1(0.1), penalty_on_decoder_norm=True, recon_loss="mse",
                          pre_bias=True, matryoshka=(2, 5), dtype=torch.float64)
    _randomise_biases(m, g)
    x = rand64(6, 5, gen=g)
    assert m.encode_pre(x).abs().min() > 1e-3  # away from ReLU's and L1's kink
    f, params = _as_function(m)
    assert torch.autograd.gradcheck(f, (x, *params))


def test_matryoshka_gradcheck_topk_sparse_path():
    """The sparse path's own backward (gathered encoder, per-prefix masked embedding bags)."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    m = SparseAutoencoder(5, 12, "topk", k=3, recon_loss="half_sse", matryoshka=(4, 9), decode="sparse",
                          dtype=torch.float64)
    _randomise_biases(m, g)
    x = rand64(6, 5, gen=g)
    top = m.encode_pre(x).sort(dim=1, descending=True).values
    assert (top[:, 2] > 1e-3).all() and (top[:, 2] - top[:, 3] > 1e-3).all()  # no tie at the k-th unit
    f, params = _as_function(m)
    assert torch.autograd.gradcheck(f, (x, *params))


def test_prefix_metrics_against_numpy():
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    sizes = (4, 10, 24)
    m = SparseAutoencoder(8, 24, "batchtopk", k=3, matryoshka=sizes, init="orthogonal_tied", dtype=torch.float64)
    _randomise_biases(m, g, 0.1)
    for _ in range(3):  # training forwards set BatchTopK's threshold θ
        m(rand64(32, 8, gen=g))
    theta = float(m.activation.threshold)
    x = rand64(40, 8, gen=g)
    got = m.prefix_metrics(x)
    assert m.training  # the mode is given back
    p = P(m)
    a = np_relu(np_pre(x.numpy(), p, False))
    h = np.where(a > theta, a, 0.0)  # eval: every unit above θ
    X = x.numpy()
    total = ((X - X.mean(0)) ** 2).sum()
    assert [r["size"] for r in got] == list(sizes)
    for r, mi in zip(got, sizes):
        xh = h[:, :mi] @ p["W_dec"][:mi] + p["b_dec"]
        assert r["fvu"] == pytest.approx(((X - xh) ** 2).sum() / total, rel=1e-10)
        assert r["l0"] == pytest.approx((h[:, :mi] != 0).sum() / 40, rel=1e-12)
    assert got[0]["l0"] < got[-1]["l0"]


@pytest.mark.parametrize("bad", [(8, 4), (0, 4), (4, 25), (4, 4), (True, 8), (), "48"])
def test_matryoshka_sizes_are_checked(bad):
    with pytest.raises((ValueError, TypeError), match="matryoshka"):
        SparseAutoencoder(8, 24, "topk", k=2, matryoshka=bad)


# --------------------------------------------------------------------------------------------
# Gated


def _gated(gen, *, pre_bias=True, on_norm=True, kind="mse", weight=0.1, tied=False):
    m = SparseAutoencoder(5, 7, "gated", penalty=L1(weight), penalty_on_decoder_norm=on_norm, recon_loss=kind,
                          pre_bias=pre_bias, tied=tied, dtype=torch.float64)
    _randomise_biases(m, gen)
    with torch.no_grad():
        m.activation.r_mag.copy_(0.5 * rand64(7, gen=gen))
        m.activation.b_mag.copy_(0.6 * rand64(7, gen=gen))
    return m


def np_gated(x, p, pre_bias, on_norm, kind, lam):
    """Rajamanoharan et al. 2024a: the code f and the three loss terms."""
    x_in = x - p["b_dec"] if pre_bias else x
    wx = x_in @ p["W_enc"].T
    gate = wx + p["b_enc"]
    mag = np.exp(p["activation.r_mag"]) * wx + p["activation.b_mag"]
    f = (gate > 0) * np_relu(mag)
    recon = np_recon(f @ p["W_dec"] + p["b_dec"], x, kind)
    scale = np.linalg.norm(p["W_dec"], axis=1) if on_norm else 1.0
    penalty = lam * (np_relu(gate) * scale).sum() / x.shape[0]
    aux = np_recon(np_relu(gate) @ p["W_dec"] + p["b_dec"], x, kind)
    return f, recon, penalty, aux, gate, mag


def test_gated_activation_is_registered_and_checks_its_inputs():
    act = get_activation("Gated", d_sae=4, dtype=torch.float64)
    assert isinstance(act, Gated) and act.r_mag.dtype == torch.float64
    assert float(act.r_mag.abs().sum() + act.b_mag.abs().sum()) == 0.0  # r_mag, b_mag start at 0
    with pytest.raises(TypeError, match="two inputs"):
        act(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="d_sae=4"):
        act(torch.zeros(2, 5, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64))


@pytest.mark.parametrize("kind, on_norm, pre_bias", [("mse", True, True), ("half_sse", False, False)])
def test_gated_code_and_loss_against_numpy(kind, on_norm, pre_bias):
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    m = _gated(g, pre_bias=pre_bias, on_norm=on_norm, kind=kind)
    x = rand64(11, 5, gen=g)
    out = m(x)
    f, recon, penalty, aux, gate, mag = np_gated(x.numpy(), P(m), pre_bias, on_norm, kind, 0.1)
    assert ((gate > 0) & (mag <= 0)).any() and ((gate <= 0) & (mag > 0)).any()  # both paths matter
    np.testing.assert_allclose(out.code.detach().numpy(), f, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(m.encode(x).detach().numpy(), f, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(float(out.reconstruction_loss), recon, rtol=1e-12)
    np.testing.assert_allclose(float(out.sparsity_loss), penalty, rtol=1e-12)
    np.testing.assert_allclose(float(out.aux_loss), aux, rtol=1e-12)
    np.testing.assert_allclose(float(out.loss), recon + penalty + aux, rtol=1e-12)


def test_gated_gradcheck_on_every_parameter():
    """gradcheck of the total loss with the aux loss's decoder held at its value (what "frozen"
    means for finite differences): L(θ) − L_aux(θ) + L_aux(θ_enc, θ⁰_dec). Its analytic gradient at
    θ⁰ is the model's, since the model's aux loss sends nothing to the decoder (next test)."""
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    m = _gated(g, pre_bias=False)  # (with pre_bias, b_dec also enters the gate: the NumPy test below)
    x = rand64(6, 5, gen=g)
    *_, gate, mag = np_gated(x.numpy(), P(m), False, True, "mse", 0.1)
    assert np.abs(gate).min() > 1e-3 and np.abs(mag).min() > 1e-3  # away from the Heaviside's and ReLUs' kinks
    names = [n for n, _ in m.named_parameters()]
    assert set(names) == {"W_enc", "b_enc", "W_dec", "b_dec", "activation.r_mag", "activation.b_mag"}
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if n in ("W_dec", "b_dec")}

    def f(x, *params):
        now = dict(zip(names, params))
        out = functional_call(m, now, (x,))
        aux0 = functional_call(m, now | frozen, (x,)).aux_loss
        return out.loss - out.aux_loss + aux0

    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())
    assert torch.autograd.gradcheck(f, (x, *params))
    # and that gradient is the model's own
    ours = torch.autograd.grad(m(x).loss, list(m.parameters()))
    ref = torch.autograd.grad(f(x, *params), params)
    for n, a, b in zip(names, ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=n)


def test_gated_gradient_with_pre_bias_against_numpy_finite_differences():
    """Central differences of the NumPy loss, the aux decoder frozen at θ⁰ (b_dec still moves the
    encoder input x − b_dec)."""
    g = torch.Generator().manual_seed(16)
    torch.manual_seed(16)
    m = _gated(g, pre_bias=True, kind="half_sse")
    x = rand64(6, 5, gen=g)
    X, p0 = x.numpy(), P(m)
    *_, gate, mag = np_gated(X, p0, True, True, "half_sse", 0.1)
    assert np.abs(gate).min() > 1e-4 and np.abs(mag).min() > 1e-4  # no kink within the differences' step

    def loss(p):
        x_in = X - p["b_dec"]
        wx = x_in @ p["W_enc"].T
        gate = wx + p["b_enc"]
        f = (gate > 0) * np_relu(np.exp(p["activation.r_mag"]) * wx + p["activation.b_mag"])
        pen = 0.1 * (np_relu(gate) * np.linalg.norm(p["W_dec"], axis=1)).sum() / X.shape[0]
        aux = np_recon(np_relu(gate) @ p0["W_dec"] + p0["b_dec"], X, "half_sse")
        return np_recon(f @ p["W_dec"] + p["b_dec"], X, "half_sse") + pen + aux

    grads = dict(zip([n for n, _ in m.named_parameters()], torch.autograd.grad(m(x).loss, list(m.parameters()))))
    eps = 1e-6
    for name, value in p0.items():
        num = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            hi, lo = dict(p0), dict(p0)
            hi[name], lo[name] = value.copy(), value.copy()
            hi[name][i] += eps
            lo[name][i] -= eps
            num[i] = (loss(hi) - loss(lo)) / (2 * eps)
        np.testing.assert_allclose(grads[name].numpy(), num, rtol=1e-6, atol=1e-8, err_msg=name)
    assert np.abs(grads["b_enc"].numpy()).sum() > 0  # the gate learns, through the penalty and the aux loss


def test_gated_gradient_routes():
    """The aux loss reaches no decoder parameter (frozen copy); the Heaviside gives the gate no
    gradient from the reconstruction (b_enc is only in the gate); the magnitude path gets none
    from the penalty or the aux loss."""
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    m = _gated(g, pre_bias=False)
    x = rand64(12, 5, gen=g)
    out = m(x)
    params = dict(m.named_parameters())

    def grads(term):
        got = torch.autograd.grad(term, list(params.values()), retain_graph=True, allow_unused=True)
        return {n: (torch.zeros_like(params[n]) if t is None else t) for n, t in zip(params, got)}

    aux, rec, pen = grads(out.aux_loss), grads(out.reconstruction_loss), grads(out.sparsity_loss)
    for n in ("W_dec", "b_dec", "activation.r_mag", "activation.b_mag"):
        assert not aux[n].any(), n
    assert aux["W_enc"].abs().sum() > 0 and aux["b_enc"].abs().sum() > 0
    assert not rec["b_enc"].any() and rec["activation.r_mag"].abs().sum() > 0
    assert not pen["activation.r_mag"].any() and not pen["activation.b_mag"].any() and pen["b_enc"].abs().sum() > 0
    # with pre_bias the decoder bias enters the encoder input (x − b_dec): the aux loss still spares W_dec
    m2 = _gated(g, pre_bias=True)
    out2 = m2(x)
    (gw,) = torch.autograd.grad(out2.aux_loss, [m2.W_dec], allow_unused=True)
    assert gw is None or not gw.any()


# --------------------------------------------------------------------------------------------
# BatchTopK on (..., d_sae)


def test_batchtopk_3d_keeps_k_per_row():
    g = torch.Generator().manual_seed(8)
    act = BatchTopK(3).double()
    z = rand64(2, 5, 12, gen=g)  # (batch, seq, d_sae): 10 rows
    z[0, 0] += 3.0  # one row takes far more than k: the budget is shared over all rows
    out = act(z)
    ref = np_batchtopk(np_relu(z.numpy()), 3)
    np.testing.assert_array_equal(out.numpy(), ref)
    assert int((out != 0).sum()) == 3 * 10 and int((out[0, 0] != 0).sum()) > 3


def test_batchtopk_global_select_on_3d_input_one_rank(tmp_path):
    """The DDP path's count of rows (a group of one process: the local result)."""
    g = torch.Generator().manual_seed(9)
    z = rand64(2, 4, 10, gen=g)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        act = BatchTopK(2).double()
        act.stats_group = torch.distributed.group.WORLD
        out = act(z)
    finally:
        torch.distributed.destroy_process_group()
    np.testing.assert_array_equal(out.numpy(), np_batchtopk(np_relu(z.numpy()), 2))
    assert int((out != 0).sum()) == 2 * 8


def test_batchtopk_eval_code_does_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(10)
    act = BatchTopK(2).double()
    for _ in range(4):
        act(rand64(3, 4, 9, gen=g))  # training on 3-D batches sets θ
    act.eval()
    theta = float(act.threshold)
    sample = rand64(1, 4, 9, gen=g)
    alone = act(sample)[0]
    in_a = act(torch.cat([rand64(2, 4, 9, gen=g), sample]))[2]
    in_b = act(torch.cat([sample, 5 * rand64(6, 4, 9, gen=g)]))[0]
    assert torch.equal(alone, in_a) and torch.equal(alone, in_b)
    a = np_relu(sample[0].numpy())
    np.testing.assert_array_equal(alone.numpy(), np.where(a > theta, a, 0.0))
    assert float(act.threshold) == theta  # eval does not move θ


# --------------------------------------------------------------------------------------------
# resampling


def _trained(d_hidden=10, steps=2, seed=11, **kw):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = SparseAutoencoder(6, d_hidden, "topk", k=3, recon_loss="mse", pre_bias=True, init="orthogonal_tied",
                          dtype=torch.float64, **kw)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, fused=True)
    for _ in range(steps):
        train_step(m, opt, rand64(16, 6, gen=g))
    with torch.no_grad():
        m.b_dec.copy_(0.2 * rand64(6, gen=g))
    return m, opt, g


def test_resample_dead_changes_exactly_the_dead_units():
    m, opt, g = _trained()
    dead = torch.tensor([1, 4, 7])
    with torch.no_grad():
        m.samples_since_fired.zero_()
        m.samples_since_fired[dead] = m.dead_after
    x = rand64(16, 6, gen=g)
    before = {n: t.detach().clone() for n, t in m.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in m.parameters()}
    n = m.resample_dead(x, opt, generator=torch.Generator().manual_seed(0))
    assert n == 3
    alive = torch.ones(10, dtype=torch.bool)
    alive[dead] = False
    for name in ("W_enc", "b_enc", "W_dec"):
        assert torch.equal(getattr(m, name)[alive], before[name][alive]), name  # bit-identical
        assert not torch.equal(getattr(m, name)[dead], before[name][dead]) or name == "b_enc"
    assert torch.equal(m.b_dec, before["b_dec"])
    assert not m.b_enc[dead].any() and not m.samples_since_fired.any() and not m.dead_mask.any()

    X, b_dec = x.numpy(), m.b_dec.detach().numpy()
    cand = X - b_dec
    cand /= np.linalg.norm(cand, axis=1, keepdims=True)  # every input's centred direction
    W_dec, W_enc = m.W_dec.detach().numpy(), m.W_enc.detach().numpy()
    enc_norm = np.linalg.norm(before["W_enc"].numpy()[alive.numpy()], axis=1).mean()
    picked = []
    for j in dead.tolist():
        np.testing.assert_allclose(np.linalg.norm(W_dec[j]), 1.0, rtol=1e-12)
        dist = np.abs(cand - W_dec[j]).max(1)
        assert dist.min() < 1e-12  # the atom is an input's direction
        picked.append(int(dist.argmin()))
        np.testing.assert_allclose(W_enc[j], 0.2 * enc_norm * cand[picked[-1]], rtol=1e-12, atol=1e-15)
    assert len(set(picked)) == 3  # 16 samples with a loss > 0: drawn without replacement

    for p in (m.W_enc, m.b_enc, m.W_dec):
        st, old = opt.state[p], state[id(p)]
        for key in ("exp_avg", "exp_avg_sq"):
            assert not st[key][dead].any(), key
            assert torch.equal(st[key][alive], old[key][alive]), key
            assert old[key][dead].any()  # it was not zero before
        assert torch.equal(st["step"], old["step"])
    for p in (m.b_dec,):  # not a unit's parameter: untouched
        assert all(torch.equal(opt.state[p][k], state[id(p)][k]) for k in opt.state[p])


def test_resample_draws_inputs_with_probability_proportional_to_squared_loss():
    """All units dead and a code of 0 (W_enc = 0, b_enc < 0): x̂ = b_dec = 0, so sample b's loss
    is ‖x_b‖² and its probability ‖x_b‖⁴ / Σ‖x‖⁴; 3000 draws (with replacement: more units
    than samples). No unit alive: the encoder rows take 0.2 × 1."""
    torch.manual_seed(12)
    m = SparseAutoencoder(3, 3000, "topk", k=1, dead_after=1, dtype=torch.float64)
    with torch.no_grad():
        m.W_enc.zero_()
        m.b_enc.fill_(-1.0)
        m.samples_since_fired.fill_(5)
    x = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0]], dtype=torch.float64)
    assert m.resample_dead(x, generator=torch.Generator().manual_seed(1)) == 3000
    which = m.W_dec.detach().numpy().argmax(1)  # the axis of each atom: the sample drawn
    freq = np.bincount(which, minlength=3) / 3000
    p = np.array([1.0, 16.0, 81.0]) / 98.0
    sd = np.sqrt(p * (1 - p) / 3000)
    assert (np.abs(freq - p) < 4 * sd).all(), (freq, p)
    np.testing.assert_allclose(np.linalg.norm(m.W_enc.detach().numpy(), axis=1), 0.2, rtol=1e-12)


def test_resample_with_no_dead_unit_is_a_no_op():
    m, opt, g = _trained()
    m.samples_since_fired.zero_()
    before = {n: t.clone() for n, t in m.state_dict().items()}
    assert m.resample_dead(rand64(8, 6, gen=g), opt) == 0
    assert all(torch.equal(before[n], t) for n, t in m.state_dict().items())


def test_resample_refuses_a_tied_decoder():
    m = SparseAutoencoder(4, 6, "topk", k=2, tied=True)
    with pytest.raises(ValueError, match="untied"):
        m.resample_dead(torch.randn(3, 4))


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_training_with_resample_every_resumes_bit_identically(tmp_path):
    """actsparse.train with ``resample_every``: a run of 4 epochs equals one of 2 epochs extended
    to 4 by a resume, bit for bit; resampling happened in both halves."""
    from actsparse.config import TrainConfig
    from actsparse.train import train

    x = torch.randn(160, 8, generator=torch.Generator().manual_seed(13))
    calls = []

    def model():
        torch.manual_seed(0)
        m = SparseAutoencoder(8, 24, "topk", k=2, recon_loss="mse", dead_after=48, resample_every=3,
                              init="orthogonal_tied", unit_norm_decoder=True)
        inner = m.resample_dead
        m.resample_dead = lambda *a, **kw: calls.append(inner(*a, **kw)) or calls[-1]
        return m

    kw = dict(hidden=24, activation="topk", k=2, optimizer="adam", lr=1e-2, batch_size=32, validation=0.0,
              plots=False, progress=False, checkpoint_every=1000, seed=3)
    full = train(TrainConfig(epochs=4, **kw), x, model=model())
    assert len(calls) == 20 // 3 and sum(calls) > 0
    calls.clear()
    run = tmp_path / "run"
    run.mkdir()
    train(TrainConfig(epochs=2, **kw), x, run_dir=run, model=model())
    first = sum(calls)
    resumed = train(TrainConfig(epochs=4, resume=True, **kw), x, run_dir=run, model=model())
    assert first > 0 and sum(calls) > first
    a, b = _state(full.model), _state(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("kind", ["matryoshka", "gated"])
def test_state_dict_round_trip(kind):
    g = torch.Generator().manual_seed(14)

    def make(seed):
        torch.manual_seed(seed)
        if kind == "matryoshka":
            return SparseAutoencoder(6, 16, "batchtopk", k=2, matryoshka=(4, 8), init="orthogonal_tied")
        return SparseAutoencoder(6, 16, "gated", penalty=L1(1e-2), pre_bias=True)

    a = make(0)
    opt = torch.optim.Adam(a.parameters(), lr=1e-2)
    for _ in range(3):  # moves r_mag, b_mag and BatchTopK's θ off their initial values
        train_step(a, opt, torch.randn(32, 6, generator=g))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make(1)
    b.load_state_dict(torch.load(buf))
    if kind == "gated":
        assert a.activation.r_mag.abs().sum() > 0 and torch.equal(a.activation.r_mag, b.activation.r_mag)
    x = torch.randn(20, 6, generator=g)
    for m in (a, b):
        m.eval()
    oa, ob = a(x), b(x)
    assert torch.equal(oa.reconstruction, ob.reconstruction) and torch.equal(oa.loss, ob.loss)
    assert torch.equal(oa.aux_loss, ob.aux_loss) and float(oa.aux_loss) > 0
    assert a.prefix_metrics(x) == b.prefix_metrics(x)
