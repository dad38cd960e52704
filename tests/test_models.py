"""Sparse-autoencoder models against independent references.

Every check compares with something written here, not with the code under test: NumPy loops for the
activations (TopK, BatchTopK and its running threshold, JumpReLU and its pseudo-gradient, k-sparse
and its schedule), the CS294A cost and backpropagation in NumPy for the classic autoencoder, NumPy
for the AuxK loss and dead-unit counts, and ``torch.autograd.gradcheck`` in float64 where the model
is smooth.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from actsparse.models import BatchTopK, JumpReLU, KSparse, SparseAutoencoder, TopK, get_activation
from actsparse.penalties import L1, L2, BernoulliKL

# --------------------------------------------------------------------------------------------
# NumPy references


def np_relu(z):
    return np.maximum(z, 0.0)


def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_keep_largest_per_row(a, k):
    """Keep the k largest entries of each row (a loop over rows), zero the rest."""
    out = np.zeros_like(a)
    for i, row in enumerate(a):
        idx = np.argsort(-row, kind="stable")[:k]
        out[i, idx] = row[idx]
    return out


def np_batchtopk(a, k):
    """Keep the k·batch largest entries of the whole batch; also return the kept values."""
    flat = a.ravel()
    idx = np.argsort(-flat, kind="stable")[: k * a.shape[0]]
    out = np.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(a.shape), flat[idx]


def params_np(m):
    return {n: p.detach().numpy().copy() for n, p in m.named_parameters()}


def rand64(*shape, gen=None):
    return torch.randn(*shape, dtype=torch.float64, generator=gen)


# --------------------------------------------------------------------------------------------
# activations


def test_topk_keeps_k_largest_of_relu_per_row_and_routes_gradient():
    g = torch.Generator().manual_seed(0)
    z = rand64(7, 10, gen=g)
    z[0] = -z[0].abs()  # a row with no positive entry
    z[1, :8] = -1.0 - torch.rand(8, dtype=torch.float64, generator=g)  # fewer positives than k
    z.requires_grad_(True)
    act = TopK(4)
    out = act(z)
    ref = np_keep_largest_per_row(np_relu(z.detach().numpy()), 4)
    np.testing.assert_array_equal(out.detach().numpy(), ref)
    assert ((out != 0).sum(1) <= 4).all()
    # d/dz of Σ w·out: w where the entry is kept and positive, 0 elsewhere
    w = rand64(7, 10, gen=g)
    (grad,) = torch.autograd.grad((out * w).sum(), z)
    np.testing.assert_array_equal(grad.numpy(), np.where(ref > 0, w.numpy(), 0.0))


def test_batchtopk_training_keeps_k_times_batch_over_the_batch():
    g = torch.Generator().manual_seed(1)
    act = BatchTopK(3).double()
    z = rand64(6, 12, gen=g)
    z[0] += 3.0  # one sample takes far more than k units: the budget is shared over the batch
    out = act(z)
    ref, _ = np_batchtopk(np_relu(z.numpy()), 3)
    np.testing.assert_array_equal(out.numpy(), ref)
    assert (out[0] != 0).sum() > 3
    assert (out != 0).sum() == 3 * 6


def test_batchtopk_threshold_is_running_mean_of_smallest_kept_value():
    g = torch.Generator().manual_seed(2)
    act = BatchTopK(2, momentum=0.9).double()
    thr = None
    for batch in (5, 8, 3, 11, 4):
        z = rand64(batch, 9, gen=g)
        act(z)
        _, kept = np_batchtopk(np_relu(z.numpy()), 2)
        smallest = kept[kept > 0].min()
        thr = smallest if thr is None else 0.9 * thr + 0.1 * smallest  # reference loop
        np.testing.assert_allclose(float(act.threshold), thr, rtol=1e-13)
    assert "threshold" in act.state_dict()

    act.eval()  # eval: keep every unit above θ; no top-k, no update, independent of the batch
    z = rand64(10, 9, gen=g)
    out = act(z)
    a = np_relu(z.numpy())
    np.testing.assert_array_equal(out.numpy(), np.where(a > thr, a, 0.0))
    np.testing.assert_allclose(float(act.threshold), thr, rtol=1e-13)
    alone = torch.cat([act(z[i : i + 1]) for i in range(10)])
    np.testing.assert_array_equal(alone.numpy(), out.numpy())


def test_batchtopk_eval_before_training_falls_back_to_per_sample_topk():
    z = rand64(4, 8, gen=torch.Generator().manual_seed(3))
    out = BatchTopK(3).double().eval()(z)
    np.testing.assert_array_equal(out.numpy(), np_keep_largest_per_row(np_relu(z.numpy()), 3))


def test_jumprelu_forward_and_straight_through_gradients():
    g = torch.Generator().manual_seed(4)
    theta = np.array([0.2, 0.5, 1.0, 0.3, 0.05])
    eps = 0.2
    act = JumpReLU(5, init_threshold=0.1, bandwidth=eps, dtype=torch.float64)
    with torch.no_grad():
        act.threshold.copy_(torch.from_numpy(theta))
    # half the entries within ±ε of θ, so the pseudo-derivative's window is hit
    z = rand64(40, 5, gen=g)
    z[:20] = torch.from_numpy(theta) + eps * (2 * torch.rand(20, 5, dtype=torch.float64, generator=g) - 1)
    z.requires_grad_(True)
    out = act(z)
    zn = z.detach().numpy()
    H = (zn > theta).astype(float)
    np.testing.assert_array_equal(out.detach().numpy(), zn * H)

    w = rand64(40, 5, gen=g).numpy()
    gz, gt = torch.autograd.grad((out * torch.from_numpy(w)).sum(), [z, act.threshold])
    np.testing.assert_array_equal(gz.numpy(), w * H)
    # ∂out/∂θ := −(θ/ε) K((z − θ)/ε), K = 1{|u| < 1/2} (θ is the parameter itself)
    K = (np.abs((zn - theta) / eps) < 0.5).astype(float)
    ref = np.sum(w * (-(theta / eps) * K), axis=0)
    assert (K.sum(0) > 0).all()
    np.testing.assert_allclose(gt.numpy(), ref, rtol=1e-12, atol=1e-14)


def test_ksparse_keeps_k_largest_of_z_without_relu_and_alpha_k_at_eval():
    g = torch.Generator().manual_seed(5)
    act = KSparse(3, alpha=2.0).double()
    z = rand64(6, 10, gen=g)
    z[0] = -z[0].abs() - 0.1  # all negative: the kept values are negative (linear units)
    np.testing.assert_array_equal(act(z).numpy(), np_keep_largest_per_row(z.numpy(), 3))
    assert (act(z)[0] < 0).sum() == 3
    act.eval()
    np.testing.assert_array_equal(act(z).numpy(), np_keep_largest_per_row(z.numpy(), 6))
    assert (KSparse(4, alpha=5.0).eval()(z) != 0).sum(1).tolist() == [10] * 6  # αk capped at d_sae


@pytest.mark.parametrize("k_start", [None, 8])
def test_ksparse_anneals_k_linearly_over_the_first_half(k_start):
    d_sae, k = 20, 4
    act = KSparse(k, k_start=k_start).double()
    z = rand64(5, d_sae, gen=torch.Generator().manual_seed(6))
    start = d_sae if k_start is None else k_start
    seen = []
    for p in (0.0, 0.1, 0.25, 0.4, 0.5, 0.7, 1.0):
        act.set_progress(p)
        expected = max(k, round(start + (k - start) * min(p / 0.5, 1.0)))
        nnz = (act(z) != 0).sum(1)
        assert nnz.tolist() == [expected] * 5, p
        np.testing.assert_array_equal(act(z).numpy(), np_keep_largest_per_row(z.numpy(), expected))
        seen.append(expected)
    assert seen[0] == start and seen[-1] == seen[-3] == k
    assert seen == sorted(seen, reverse=True)
    # the model forwards the schedule
    m = SparseAutoencoder(6, d_sae, "ksparse", k=k).double()
    m.set_progress(0.0)
    assert (m.encode(rand64(3, 6)) != 0).sum(1).tolist() == [d_sae] * 3


def test_get_activation_errors():
    with pytest.raises(KeyError, match="Did you mean 'topk'"):
        get_activation("topkk", d_sae=8, k=2)
    with pytest.raises(KeyError, match="Valid: sigmoid, relu, topk"):
        get_activation("tanh", d_sae=8)
    with pytest.raises(ValueError, match="needs k"):
        get_activation("batchtopk", d_sae=8)
    with pytest.raises(ValueError, match="k=9 is larger than .* d_sae=8"):
        get_activation("topk", d_sae=8, k=9)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be a positive int"):
            TopK(bad)
    with pytest.raises(ValueError, match="d_sae must be a positive int"):
        JumpReLU(-2)
    with pytest.raises(ValueError, match="k=5 is larger"):
        TopK(5)(torch.randn(2, 4))
    assert isinstance(get_activation("Jump-ReLU", d_sae=3), JumpReLU)


# --------------------------------------------------------------------------------------------
# the classic CS294A autoencoder


RHO, BETA, LAMBDA = 0.05, 3.0, 1e-3


def np_cs294a(W1, b1, W2, b2, X, *, tied=False):
    """CS294A cost and backprop in NumPy; X is (d_in, m), columns are samples as in the notes.

    Tied: W2 = W1ᵀ, one weight matrix, so the decay is (λ/2)‖W1‖² and W1's gradient is the sum of
    its encoder and (transposed) decoder contributions.
    """
    m = X.shape[1]
    a2 = np_sigmoid(W1 @ X + b1[:, None])
    a3 = np_sigmoid(W2 @ a2 + b2[:, None])
    rho_hat = a2.mean(axis=1)
    kl = np.sum(RHO * np.log(RHO / rho_hat) + (1 - RHO) * np.log((1 - RHO) / (1 - rho_hat)))
    recon = 0.5 * np.sum((a3 - X) ** 2) / m
    decay = LAMBDA / 2 * (np.sum(W1**2) + (0.0 if tied else np.sum(W2**2)))
    d3 = -(X - a3) * a3 * (1 - a3)
    d2 = (W2.T @ d3 + BETA * (-RHO / rho_hat + (1 - RHO) / (1 - rho_hat))[:, None]) * a2 * (1 - a2)
    gW1, gW2 = d2 @ X.T / m, d3 @ a2.T / m
    terms = (recon, BETA * kl, decay)
    if tied:
        return terms, {"W_enc": gW1 + gW2.T + LAMBDA * W1, "b_enc": d2.sum(1) / m, "b_dec": d3.sum(1) / m}
    # actsparse stores the decoder as rows of atoms, W_dec = W2ᵀ (d_hidden, d_in)
    return terms, {"W_enc": gW1 + LAMBDA * W1, "b_enc": d2.sum(1) / m,
                   "W_dec": (gW2 + LAMBDA * W2).T, "b_dec": d3.sum(1) / m}


def classic(tied=False, seed=0):
    torch.manual_seed(seed)
    m = SparseAutoencoder(8, 5, "sigmoid", decoder="sigmoid", tied=tied, penalty=BernoulliKL(RHO, weight=BETA),
                          weight_decay=LAMBDA, dtype=torch.float64)
    with torch.no_grad():  # non-zero biases so their gradients are exercised
        m.b_enc.uniform_(-0.3, 0.3)
        m.b_dec.uniform_(-0.3, 0.3)
    x = torch.rand(20, 8, dtype=torch.float64) * 0.8 + 0.1
    return m, x


@pytest.mark.parametrize("tied", [False, True])
def test_classic_autoencoder_equals_cs294a_cost_and_gradient(tied):
    m, x = classic(tied)
    out = m(x)
    p = params_np(m)
    W2 = p["W_enc"].T if tied else p["W_dec"].T
    (recon, sparsity, decay), ref_grads = np_cs294a(p["W_enc"], p["b_enc"], W2, p["b_dec"], x.numpy().T, tied=tied)
    np.testing.assert_allclose(float(out.reconstruction_loss), recon, rtol=1e-13)
    np.testing.assert_allclose(float(out.sparsity_loss), sparsity, rtol=1e-12)
    np.testing.assert_allclose(float(out.weight_decay_loss), decay, rtol=1e-13)
    assert float(out.auxk_loss) == 0.0
    np.testing.assert_allclose(float(out.loss), recon + sparsity + decay, rtol=1e-13)
    names = [n for n, _ in m.named_parameters()]
    assert sorted(names) == sorted(ref_grads)  # tied: no W_dec parameter at all
    grads = torch.autograd.grad(out.loss, list(m.parameters()))
    for n, gr in zip(names, grads):
        np.testing.assert_allclose(gr.numpy(), ref_grads[n], rtol=1e-10, atol=1e-14, err_msg=n)


def test_tied_decoder_is_the_encoder_transposed():
    m = SparseAutoencoder(6, 4, "relu", tied=True)
    assert m.W_dec is None
    assert m.decoder_weight.shape == (6, 4)
    assert m.decoder_weight.data_ptr() == m.W_enc.data_ptr()
    h = torch.rand(3, 4)
    torch.testing.assert_close(m.decode(h), h @ m.W_enc.detach() + m.b_dec.detach())


def test_pre_bias_subtracts_decoder_bias_before_encoding():
    torch.manual_seed(7)
    lam = 0.05
    m = SparseAutoencoder(6, 9, "relu", pre_bias=True, penalty=L1(lam), recon_loss="mse", dtype=torch.float64)
    with torch.no_grad():
        m.b_dec.uniform_(-1, 1)
        m.b_enc.uniform_(-0.2, 0.2)
    x = rand64(11, 6)
    out = m(x)
    p = params_np(m)
    X = x.numpy()
    pre = (X - p["b_dec"]) @ p["W_enc"].T + p["b_enc"]
    np.testing.assert_allclose(m.encode_pre(x).detach().numpy(), pre, rtol=1e-13)
    h = np_relu(pre)
    x_hat = h @ p["W_dec"] + p["b_dec"]
    n = X.size
    np.testing.assert_allclose(float(out.loss), np.sum((x_hat - X) ** 2) / n + lam * h.sum() / X.shape[0], rtol=1e-13)
    # backprop by hand: b_dec is reached through the output and through the encoder input
    d_out = 2 * (x_hat - X) / n
    d_pre = (d_out @ p["W_dec"].T + lam / X.shape[0]) * (pre > 0)
    ref_b_dec = d_out.sum(0) - d_pre.sum(0) @ p["W_enc"]
    (g,) = torch.autograd.grad(out.loss, m.b_dec)
    np.testing.assert_allclose(g.numpy(), ref_b_dec, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------------------------
# unit-norm decoder


@pytest.mark.parametrize("hidden", [10, 1100])  # 1100: three blocks of rows (models.sae.ROW_BLOCK), the last short
@pytest.mark.parametrize("tied", [False, True])
def test_normalize_decoder_gives_unit_norm_atoms(tied, hidden):
    torch.manual_seed(8)
    m = SparseAutoencoder(6, hidden, "topk", k=3, tied=tied, unit_norm_decoder=True, dtype=torch.float64)
    np.testing.assert_allclose(np.linalg.norm(m.decoder_weight.detach().numpy(), axis=0), np.ones(hidden), rtol=1e-14)
    with torch.no_grad():
        m.decoder_weight.mul_(torch.rand(6, hidden, dtype=torch.float64) * 3 + 0.1)
    before = m.decoder_weight.detach().numpy().copy()
    m.normalize_decoder()
    after = m.decoder_weight.detach().numpy()
    np.testing.assert_allclose(after, before / np.linalg.norm(before, axis=0, keepdims=True), rtol=1e-13)
    assert not m.decoder_weight.requires_grad or m.W_enc.grad is None  # no graph was built


@pytest.mark.parametrize("hidden", [10, 1100])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("unit", [True, False])
def test_remove_parallel_gradient_leaves_gradient_orthogonal_to_each_atom(tied, unit, hidden):
    torch.manual_seed(9)
    m = SparseAutoencoder(6, hidden, "relu", tied=tied, unit_norm_decoder=unit, penalty=L1(0.1), dtype=torch.float64)
    m.remove_parallel_gradient()  # no gradient yet: a no-op, not an error
    m(rand64(16, 6)).loss.backward()
    grad = (m.W_enc.grad if tied else m.W_dec.grad).t()  # (d_in, d_hidden), as decoder_weight
    g = grad.numpy().copy()
    w = m.decoder_weight.detach().numpy()
    m.remove_parallel_gradient()
    g_after = (m.W_enc.grad if tied else m.W_dec.grad).t().numpy()
    ref = g - (np.sum(g * w, axis=0) / np.sum(w * w, axis=0)) * w
    np.testing.assert_allclose(g_after, ref, rtol=1e-10, atol=1e-14)
    dots = np.sum(g_after * w, axis=0)
    assert np.abs(dots).max() < 1e-12 * np.abs(g).max()
    assert np.abs(g).max() > 1e-3  # there was a gradient to project


# --------------------------------------------------------------------------------------------
# dead units and AuxK


def test_dead_unit_tracking_counts_samples_since_each_unit_fired():
    gen = np.random.default_rng(10)
    torch.manual_seed(10)
    m = SparseAutoencoder(5, 8, "relu", dead_after=12, dtype=torch.float64)
    count = np.zeros(8, dtype=np.int64)
    was_dead = False
    for batch in (4, 7, 3, 10, 5, 6, 2, 9):
        with torch.no_grad():  # a bias of −50 keeps a unit silent for this batch
            m.b_enc.copy_(torch.from_numpy(np.where(gen.random(8) < 0.6, -50.0, 0.5)))
        out = m(rand64(batch, 5))
        fired = (out.code.detach().numpy() != 0).any(axis=0)
        for j in range(8):  # reference: a plain loop over units
            count[j] = 0 if fired[j] else count[j] + batch
        np.testing.assert_array_equal(m.samples_since_fired.numpy(), count)
        np.testing.assert_array_equal(m.dead_mask.numpy(), count >= 12)
        was_dead |= bool((count >= 12).any())
    assert was_dead and (count == 0).any()
    m.eval()  # eval does not count
    m(rand64(50, 5))
    np.testing.assert_array_equal(m.samples_since_fired.numpy(), count)


def test_a_unit_is_dead_once_silent_for_exactly_dead_after_samples():
    m = SparseAutoencoder(4, 3, "relu", dead_after=6, dtype=torch.float64)
    with torch.no_grad():
        m.b_enc.fill_(-50.0)
    m(rand64(3, 4))
    assert m.samples_since_fired.tolist() == [3] * 3 and not m.dead_mask.any()
    m(rand64(3, 4))  # silent in the last 6 samples: dead
    assert m.samples_since_fired.tolist() == [6] * 3 and m.dead_mask.all()


def test_ksparse_negative_values_count_as_firing():
    m = SparseAutoencoder(4, 6, "ksparse", k=2, dead_after=1, dtype=torch.float64)
    with torch.no_grad():
        m.b_enc.fill_(-100.0)  # every pre-activation negative; k-sparse still keeps 2 per sample
    code = m(rand64(3, 4)).code.detach().numpy()
    fired = (code != 0).any(axis=0)
    np.testing.assert_array_equal(m.samples_since_fired.numpy(), np.where(fired, 0, 3))
    assert (code < 0).sum() == 6


def np_auxk(p, X, count_dead, k, k_aux, coef):
    """AuxK by hand: top-k_aux of ReLU(pre) among dead units, decode without bias, normalised MSE."""
    pre = X @ p["W_enc"].T + p["b_enc"]
    h = np_keep_largest_per_row(np_relu(pre), k)
    res = X - (h @ p["W_dec"] + p["b_dec"])
    masked = np.where(count_dead, np_relu(pre), 0.0)
    k_aux = min(k_aux, int(count_dead.sum()))
    h_aux = np.zeros_like(pre)
    for i in range(X.shape[0]):
        idx = np.argsort(-masked[i], kind="stable")[:k_aux]
        h_aux[i, idx] = masked[i, idx]
    r_hat = h_aux @ p["W_dec"]
    denom = np.sum((res - res.mean(0)) ** 2)
    loss = coef * np.sum((r_hat - res) ** 2) / denom
    # gradients with the residual held fixed
    d_r = 2 * coef * (r_hat - res) / denom
    d_pre = np.where(h_aux > 0, d_r @ p["W_dec"].T, 0.0)
    grads = {"W_enc": d_pre.T @ X, "b_enc": d_pre.sum(0), "W_dec": h_aux.T @ d_r, "b_dec": np.zeros_like(p["b_dec"])}
    return loss, grads, h_aux


@pytest.mark.parametrize("k_aux", [3, 11])
def test_auxk_loss_equals_hand_computation(k_aux):
    torch.manual_seed(11)
    d_in, d, k, coef = 6, 12, 2, 0.25
    m = SparseAutoencoder(d_in, d, "topk", k=k, auxk=k_aux, auxk_coef=coef, dead_after=4, dtype=torch.float64)
    with torch.no_grad():
        m.W_enc.mul_(0.1)
        m.b_dec.uniform_(-0.5, 0.5)
        silent = torch.arange(d) < 4
        m.b_enc.copy_(torch.where(silent, -100.0, 3.0) + 0.1 * rand64(d))
    count = np.zeros(d, dtype=np.int64)
    x1 = rand64(5, d_in)
    count = np.where((m(x1).code.detach().numpy() != 0).any(0), 0, count + 5)
    with torch.no_grad():  # units 0-1 now positive, but well below the others: they stay out of the top-k;
        m.b_enc[:2] = 0.5  # units 2-3 stay negative: dead, but ReLU keeps them out of the AuxK code
    x2 = rand64(5, d_in)
    p = params_np(m)
    out = m(x2)
    count = np.where((out.code.detach().numpy() != 0).any(0), 0, count + 5)
    dead = count >= 4
    assert dead[:4].all() and dead.sum() < d  # some dead, some alive
    ref, ref_grads, h_aux = np_auxk(p, x2.numpy(), dead, k, k_aux, coef)
    assert (h_aux[:, 2:4] == 0).all() and (k_aux < dead.sum() - 2 or (h_aux[:, :2] > 0).all())
    assert (h_aux > 0).sum(1).tolist() == [min(k_aux, int(dead.sum()) - 2)] * 5
    np.testing.assert_allclose(float(out.auxk_loss), ref, rtol=1e-12)
    # the residual is detached: b_dec (which only shifts x̂) gets no gradient from AuxK at all
    grads = torch.autograd.grad(out.auxk_loss, list(m.parameters()), allow_unused=True)
    for (n, prm), gr in zip(m.named_parameters(), grads):
        gr = torch.zeros_like(prm) if gr is None else gr
        np.testing.assert_allclose(gr.detach().numpy(), ref_grads[n], rtol=1e-10, atol=1e-14, err_msg=n)
    torch.testing.assert_close(out.loss, out.reconstruction_loss + out.sparsity_loss + out.weight_decay_loss
                               + out.auxk_loss, rtol=0, atol=0)


def test_auxk_ignores_negative_pre_activations_of_dead_units():
    torch.manual_seed(16)
    m = SparseAutoencoder(5, 6, "topk", k=2, auxk=6, auxk_coef=1.0, dead_after=1, dtype=torch.float64)
    with torch.no_grad():
        m.b_enc.copy_(torch.tensor([-50.0, -50.0, -50.0, -50.0, 50.0, 50.0], dtype=torch.float64))
        m.W_enc.mul_(0.1)
    x = rand64(4, 5)
    p = params_np(m)
    out = m(x)
    dead = ~(out.code.detach().numpy() != 0).any(0)
    assert dead.tolist() == [True] * 4 + [False] * 2
    ref, _, h_aux = np_auxk(p, x.numpy(), dead, 2, 6, 1.0)
    assert (h_aux == 0).all()  # every dead unit is negative: AuxK reconstructs nothing
    np.testing.assert_allclose(float(out.auxk_loss), ref, rtol=1e-12)


def test_auxk_is_zero_without_dead_units_and_in_eval():
    torch.manual_seed(12)
    m = SparseAutoencoder(6, 12, "topk", k=2, auxk=4, dead_after=10_000)
    out = m(torch.randn(32, 6))
    assert not m.dead_mask.any() and float(out.auxk_loss) == 0.0
    m.dead_after = 1
    assert m.dead_mask.any()
    m.eval()
    assert float(m(torch.randn(32, 6)).auxk_loss) == 0.0


def test_loss_is_the_sum_of_all_terms():
    torch.manual_seed(13)
    m = SparseAutoencoder(6, 12, "topk", k=2, penalty=L1(0.1) + L2(0.05), weight_decay=0.01, auxk=3, dead_after=1,
                          dtype=torch.float64)
    out = m(rand64(8, 6))
    terms = [out.reconstruction_loss, out.sparsity_loss, out.weight_decay_loss, out.auxk_loss]
    assert all(float(t) > 0 for t in terms)
    assert float(out.loss) == pytest.approx(sum(float(t) for t in terms), rel=1e-14)
    h = out.code.detach().numpy()
    assert float(out.sparsity_loss) == pytest.approx(0.1 * np.abs(h).sum() / 8 + 0.05 * (h**2).sum() / 8, rel=1e-13)
    W = params_np(m)
    assert float(out.weight_decay_loss) == pytest.approx(0.005 * ((W["W_enc"] ** 2).sum() + (W["W_dec"] ** 2).sum()),
                                                         rel=1e-13)


def test_jumprelu_model_factory_arguments_reach_the_threshold():
    for name in ("jumprelu", "JumpReLU", "jump_relu", "jump-relu"):
        m = SparseAutoencoder(4, 3, name, dtype=torch.float64)
        assert m.threshold is not None and m.threshold.dtype == torch.float64, name
        assert m(rand64(2, 4)).code.dtype == torch.float64


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_input_gives_clear_errors():
    m = SparseAutoencoder(6, 8, "relu")
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 6\), got \(3, 5\)"):
        m(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"got \(2, 3, 6\)"):
        m(torch.randn(2, 3, 6))
    with pytest.raises(TypeError, match="input must be a tensor"):
        m(np.zeros((2, 6)))
    with pytest.raises(ValueError, match="k=9 is larger than the number of hidden units d_sae=8"):
        SparseAutoencoder(6, 8, "topk", k=9)
    with pytest.raises(ValueError, match="needs k"):
        SparseAutoencoder(6, 8, "topk")
    with pytest.raises(ValueError, match="k must be a positive int, got -1"):
        SparseAutoencoder(6, 8, "batchtopk", k=-1)
    for kw in ({"d_in": -1, "d_hidden": 8}, {"d_in": 6, "d_hidden": 0}, {"d_in": 6.0, "d_hidden": 8}):
        with pytest.raises(ValueError, match="must be a positive int"):
            SparseAutoencoder(**kw)
    with pytest.raises(KeyError, match="Did you mean 'batchtopk'"):
        SparseAutoencoder(6, 8, "batch_topkk", k=2)
    with pytest.raises(TypeError, match="activation must be a name"):
        SparseAutoencoder(6, 8, 3)
    with pytest.raises(ValueError, match="decoder must be"):
        SparseAutoencoder(6, 8, decoder="tanh")
    with pytest.raises(ValueError, match="recon_loss must be"):
        SparseAutoencoder(6, 8, recon_loss="l1")
    with pytest.raises(ValueError, match="init must be"):
        SparseAutoencoder(6, 8, init="xavier")
    with pytest.raises(ValueError, match="weight_decay"):
        SparseAutoencoder(6, 8, weight_decay=-1.0)
    with pytest.raises(TypeError, match="actsparse Penalty"):
        SparseAutoencoder(6, 8, penalty=torch.nn.L1Loss())
    for auxk in (0, 9, True):
        with pytest.raises(ValueError, match=r"auxk must be an int in \[1, d_hidden=8\]"):
            SparseAutoencoder(6, 8, "topk", k=2, auxk=auxk)
    for dead_after in (0, -5, 1.5):
        with pytest.raises(ValueError, match="dead_after must be a positive int"):
            SparseAutoencoder(6, 8, dead_after=dead_after)
    with pytest.raises(ValueError, match="auxk_coef"):
        SparseAutoencoder(6, 8, auxk_coef=float("nan"))


# --------------------------------------------------------------------------------------------
# gradcheck where the model is smooth


def _as_function(m):
    names = [n for n, _ in m.named_parameters()]

    def f(x, *params):
        return functional_call(m, dict(zip(names, params)), (x,)).loss

    return f, tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())


def test_gradcheck_sigmoid_kl_model():
    torch.manual_seed(14)
    m = SparseAutoencoder(5, 4, "sigmoid", penalty=BernoulliKL(0.2, weight=0.5), weight_decay=0.01,
                          dtype=torch.float64)
    f, params = _as_function(m)
    x = rand64(7, 5)
    assert torch.autograd.gradcheck(f, (x, *params))


def test_gradcheck_relu_l1_model_away_from_kinks():
    torch.manual_seed(15)
    m = SparseAutoencoder(5, 6, "relu", penalty=L1(0.1) + L2(0.05), weight_decay=0.01, pre_bias=True,
                          recon_loss="mse", dtype=torch.float64)
    with torch.no_grad():
        m.b_dec.uniform_(-0.5, 0.5)
    x = rand64(7, 5)
    assert m.encode_pre(x).abs().min() > 1e-3  # no pre-activation at ReLU's (or L1's) kink
    f, params = _as_function(m)
    assert torch.autograd.gradcheck(f, (x, *params))


def test_fvu_with_a_known_total_and_l0_by_counting():
    from actsparse.metrics import fvu, l0, total_variance

    g = torch.Generator().manual_seed(3)
    x, x_hat = torch.rand(40, 6, generator=g), torch.rand(40, 6, generator=g)
    X, Xh = x.double().numpy(), x_hat.double().numpy()
    ref = ((X - Xh) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
    assert float(fvu(x, x_hat)) == pytest.approx(ref, rel=1e-12)
    assert float(fvu(x, x_hat, total=total_variance(x))) == pytest.approx(ref, rel=1e-12)
    code = torch.relu(torch.randn(7, 3, 5, generator=g))
    assert float(l0(code)) == pytest.approx((code.numpy() != 0).sum(-1).mean())


def test_fvu_leaves_its_float64_inputs_alone():
    from actsparse.metrics import fvu

    x, x_hat = rand64(5, 3), rand64(5, 3)
    before = x_hat.clone()
    fvu(x, x_hat)
    assert torch.equal(x_hat, before)


def test_logged_fvu_equals_metrics_fvu():
    """The training log's FVU comes from the reconstruction loss; it is the FVU of the model's output."""
    from actsparse.config import TrainConfig
    from actsparse.metrics import fvu
    from actsparse.train import train

    x = torch.rand(200, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    res = train(TrainConfig(hidden=5, iterations=3, validation=0.0), x)  # L-BFGS: the logged point is the last
    with torch.no_grad():
        ref = float(fvu(x, res.model(x).reconstruction))  # train() shuffles x; the FVU ignores row order
    assert res.history[-1]["fvu"] == pytest.approx(ref, rel=1e-9)
