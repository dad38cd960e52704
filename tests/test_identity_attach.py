"""KLSparseReg against a NumPy re-statement of MXNet's IdentityAttachKLSparseReg backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import actsparse


def mxnet_backward(data, grad_out, moving_avg, target, penalty, momentum):
    """MXNet semantics (IdentityAttachKLSparseReg): update m with the batch mean, then add the term, not / batch."""
    flat = data.reshape(data.shape[0], -1)
    avg = flat.sum(axis=0) / flat.shape[0]
    moving_avg = momentum * moving_avg + (1 - momentum) * avg
    term = penalty * (-target / moving_avg + (1 - target) / (1 - moving_avg))
    return grad_out.reshape(flat.shape) + term[None, :], moving_avg


@pytest.mark.parametrize("target,penalty,momentum", [(0.1, 0.001, 0.9), (0.05, 0.5, 0.5)])
def test_matches_mxnet_over_steps(target, penalty, momentum):
    rng = np.random.default_rng(0)
    layer = actsparse.KLSparseReg(target=target, penalty=penalty, momentum=momentum).double()
    m = np.zeros(5)  # MXNet initialises the moving average with zeros
    for _ in range(4):
        data = rng.uniform(0.05, 0.95, size=(7, 5))
        w = rng.normal(size=(7, 5))
        x = torch.tensor(data, requires_grad=True)
        y = layer(x)
        assert torch.equal(y, x)  # identity forward
        (y * torch.tensor(w)).sum().backward()  # grad_out = w
        ref_grad, m = mxnet_backward(data, w, m, target, penalty, momentum)
        np.testing.assert_allclose(x.grad.numpy(), ref_grad, rtol=1e-12)
        np.testing.assert_allclose(layer.moving_avg.numpy(), m, rtol=1e-12)


def test_defaults_are_mxnets():
    layer = actsparse.KLSparseReg()
    assert (layer.target, layer.penalty, layer.momentum) == (0.1, 0.001, 0.9)


def _train_mean_rate(with_reg: bool) -> tuple[float, nn.Module]:
    torch.manual_seed(0)
    layers = [nn.Linear(10, 32), nn.Sigmoid()]
    if with_reg:
        layers.append(actsparse.KLSparseReg(0.05, penalty=0.05))
    net = nn.Sequential(*layers, nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(256, 10)
    for _ in range(300):
        opt.zero_grad()
        ((net(x) - x) ** 2).mean().backward()
        opt.step()
    with torch.no_grad():
        return float(net[1](net[0](x)).mean()), net


def test_drops_into_sequential_and_trains_toward_target():
    without, _ = _train_mean_rate(False)
    with_reg, net = _train_mean_rate(True)
    # the layer drives the mean activation toward ρ = 0.05 (from ~0.5 without it)
    assert abs(with_reg - 0.05) < abs(without - 0.05) / 3, (with_reg, without)
    assert "2.moving_avg" in net.state_dict()


def test_no_update_in_eval_or_no_grad():
    layer = actsparse.KLSparseReg()
    x = torch.rand(4, 3, requires_grad=True)
    layer(x).sum().backward()
    saved = layer.moving_avg.clone()
    layer.eval()
    x2 = torch.rand(4, 3, requires_grad=True)
    layer(x2).sum().backward()
    assert torch.equal(layer.moving_avg, saved)
    assert torch.equal(x2.grad, torch.ones(4, 3))  # plain identity in eval
    layer.train()
    with torch.no_grad():
        layer(torch.rand(4, 3))
    assert torch.equal(layer.moving_avg, saved)


def test_state_dict_roundtrip_and_finite_at_zero():
    layer = actsparse.KLSparseReg()
    x = torch.zeros(4, 3, requires_grad=True)  # avg 0: MXNet would divide by 0
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad < 1).all()  # term pushes activations up
    fresh = actsparse.KLSparseReg()
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.moving_avg, layer.moving_avg)


@pytest.mark.parametrize("kwargs", [dict(target=0.0), dict(target=1.2), dict(penalty=-1.0), dict(momentum=1.0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        actsparse.KLSparseReg(**kwargs)


def test_bad_input():
    layer = actsparse.KLSparseReg()
    with pytest.raises(ValueError, match="batch"):
        layer(torch.rand(5))
    with pytest.raises(TypeError):
        layer(torch.ones(3, 3, dtype=torch.long))
    layer(torch.rand(2, 3, requires_grad=True))
    with pytest.raises(ValueError, match="3 units, now 4"):
        layer(torch.rand(2, 4, requires_grad=True))
