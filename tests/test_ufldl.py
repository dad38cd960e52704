"""The UFLDL sparse autoencoder cost built with actsparse (Ng, CS294A notes).

Checked two independent ways in float64: against the backpropagation formulas of the CS294A notes
written in NumPy (sec. 2.2 and 3), and against central differences (ε = 1e-4), where the relative
difference must be below 1e-9 as in the exercise.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import actsparse

RHO, BETA, LAMBDA = 0.01, 3.0, 1e-4


def build(n_in=8, n_hidden=5, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, n_hidden), nn.Sigmoid(), nn.Linear(n_hidden, n_in), nn.Sigmoid()).double()
    r = np.sqrt(6 / (n_in + n_hidden + 1))
    with torch.no_grad():
        for lin in (model[0], model[2]):
            lin.weight.uniform_(-r, r)
            lin.bias.uniform_(-0.1, 0.1)  # non-zero so the bias gradients are exercised too
    reg = actsparse.attach(model, {"1": actsparse.BernoulliKL(RHO, weight=BETA)})
    return model, reg


def cost(model, reg, x):
    m = x.shape[0]
    recon = 0.5 * ((model(x) - x) ** 2).sum() / m
    decay = LAMBDA / 2 * (model[0].weight.pow(2).sum() + model[2].weight.pow(2).sum())
    return recon + decay + reg.penalty()


def numpy_cost_and_grad(W1, b1, W2, b2, X):
    """CS294A notes: forward, δ3 = −(y − a3)·f'(z3), δ2 = (W2ᵀδ3 + β(−ρ/ρ̂ + (1−ρ)/(1−ρ̂)))·f'(z2)."""
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    m = X.shape[1]  # columns are samples, as in the notes
    a2 = sig(W1 @ X + b1[:, None])
    a3 = sig(W2 @ a2 + b2[:, None])
    rho_hat = a2.mean(axis=1)
    kl = np.sum(RHO * np.log(RHO / rho_hat) + (1 - RHO) * np.log((1 - RHO) / (1 - rho_hat)))
    J = 0.5 * np.sum((a3 - X) ** 2) / m + LAMBDA / 2 * (np.sum(W1**2) + np.sum(W2**2)) + BETA * kl
    d3 = -(X - a3) * a3 * (1 - a3)
    sparse = BETA * (-RHO / rho_hat + (1 - RHO) / (1 - rho_hat))
    d2 = (W2.T @ d3 + sparse[:, None]) * a2 * (1 - a2)
    gW2 = d3 @ a2.T / m + LAMBDA * W2
    gb2 = d3.sum(axis=1) / m
    gW1 = d2 @ X.T / m + LAMBDA * W1
    gb1 = d2.sum(axis=1) / m
    return J, (gW1, gb1, gW2, gb2)


def test_cost_and_gradient_match_numpy_backprop():
    model, reg = build()
    x = torch.rand(20, 8, dtype=torch.float64) * 0.8 + 0.1
    J = cost(model, reg, x)
    grads = torch.autograd.grad(J, [model[0].weight, model[0].bias, model[2].weight, model[2].bias])
    ref_J, ref_grads = numpy_cost_and_grad(model[0].weight.detach().numpy(), model[0].bias.detach().numpy(),
                                           model[2].weight.detach().numpy(), model[2].bias.detach().numpy(),
                                           x.numpy().T)
    np.testing.assert_allclose(float(J.detach()), ref_J, rtol=1e-12)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g.numpy(), r, rtol=1e-10, atol=1e-14)


def test_central_difference_gradient_check_below_1e_9():
    model, reg = build()
    x = torch.rand(20, 8, dtype=torch.float64) * 0.8 + 0.1
    err = actsparse.relative_gradient_error(lambda: cost(model, reg, x), list(model.parameters()), eps=1e-4)
    print(f"UFLDL gradient check: relative difference {err:.3e}")
    assert err < 1e-9


def test_gradient_check_detects_a_wrong_gradient():
    # the checker itself must be able to fail: a custom op with a deliberately wrong backward
    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**2

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * 2.1 * x

    p = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert actsparse.relative_gradient_error(lambda: Wrong.apply(p).sum(), [p]) > 1e-3
