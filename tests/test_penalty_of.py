"""Penalty.of(fn): a penalty on a function of a module's output, for models whose activation is
applied inline in ``forward`` (seed 003's tutorial: ``x = F.relu(self.enc1(x))``). Checked against
the same model edited to have ``nn.ReLU`` modules (same weights), and against the formula."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actsparse

WIDTHS = [784, 256, 128, 64, 32, 16]


class TutorialSAE(nn.Module):
    """The tutorial's model as it is written: ten Linear layers, ReLU applied inline."""

    def __init__(self) -> None:
        super().__init__()
        for i, (a, b) in enumerate(zip(WIDTHS, WIDTHS[1:]), 1):
            setattr(self, f"enc{i}", nn.Linear(a, b))
        back = WIDTHS[::-1]
        for i, (a, b) in enumerate(zip(back, back[1:]), 1):
            setattr(self, f"dec{i}", nn.Linear(a, b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, 6):
            x = F.relu(getattr(self, f"enc{i}")(x))
        for i in range(1, 6):
            x = F.relu(getattr(self, f"dec{i}")(x))
        return x


def _edited(model: TutorialSAE) -> nn.Sequential:
    """The same weights, with each ReLU as a module the penalty can be attached to."""
    layers: list[nn.Module] = []
    for name in [f"enc{i}" for i in range(1, 6)] + [f"dec{i}" for i in range(1, 6)]:
        layers += [copy.deepcopy(getattr(model, name)), nn.ReLU()]
    return nn.Sequential(*layers)


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    model = TutorialSAE().double()
    return model, _edited(model)


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_of_relu_equals_editing_the_model(momentum):
    """Value, every gradient, and the statistics equal those of the edited model, over 3 steps
    (with momentum the moving averages must follow the same path)."""
    model, edited = _pair()
    pen = dict(target=0.05, weight=1e-3, momentum=momentum)
    reg = actsparse.attach(model, {"enc*": actsparse.PoissonKL(**pen).of(torch.relu),
                                   "dec*": actsparse.PoissonKL(**pen).of(torch.relu)})
    ref = actsparse.attach(edited, {nn.ReLU: actsparse.PoissonKL(**pen)})
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(edited.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.rand(32, 784, generator=g, dtype=torch.float64)
        loss_a = F.mse_loss(model(x), x) + reg.penalty()
        loss_b = F.mse_loss(edited(x), x) + ref.penalty()
        assert torch.allclose(loss_a, loss_b, rtol=1e-12, atol=0)
        opt_a.zero_grad()
        opt_b.zero_grad()
        loss_a.backward()
        loss_b.backward()
        grads_b = [p.grad for p in edited.parameters()]
        for ga, gb in zip([p.grad for p in model.parameters()], grads_b):
            assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-15)
        opt_a.step()
        opt_b.step()
    stats_a = {s.mean_rho_hat for s in reg.stats().values()}
    stats_b = {s.mean_rho_hat for s in ref.stats().values()}
    assert sorted(stats_a) == pytest.approx(sorted(stats_b), rel=1e-12)


def test_of_relu_value_matches_the_formula():
    """β Σ_layers Σ_j [ρ log(ρ/ρ̂_j) − ρ + ρ̂_j], ρ̂_j the batch mean of relu(layer output)."""
    model, _ = _pair(3)
    reg = actsparse.attach(model, {"enc*": actsparse.PoissonKL(0.05, weight=1e-3).of(torch.relu)})
    x = torch.rand(16, 784, dtype=torch.float64)
    model(x)
    expected, h = 0.0, x
    for i in range(1, 6):
        h = torch.relu(getattr(model, f"enc{i}")(h))
        r = h.mean(0).clamp_min(1e-6)
        expected += float((0.05 * torch.log(0.05 / r) - 0.05 + r).sum()) * 1e-3
    assert float(reg.penalty()) == pytest.approx(expected, rel=1e-9)


def test_without_of_the_error_points_to_it():
    """failed before: attaching a KL to the Linear of an inline ReLU only said "apply a sigmoid or
    ReLU first", with no way forward short of editing the model."""
    model, _ = _pair()
    reg = actsparse.attach(model, {"enc*": actsparse.PoissonKL(0.05, weight=1e-3)})
    with pytest.raises(ValueError, match=r"\.of\(torch\.relu\)"):
        model(torch.rand(64, 784, dtype=torch.float64))
        reg.penalty()


def test_of_is_saved_copied_and_checked():
    """state_dict carries the inner moving average; a deep copy and a pickle keep working (named
    function); a function that changes the shape is refused."""
    p = actsparse.BernoulliKL(0.1, weight=2.0, momentum=0.9).of(torch.sigmoid)
    a = torch.randn(20, 5)
    p.train()
    p(a)
    assert "inner.running_rate" in p.state_dict()
    q = pickle.loads(pickle.dumps(copy.deepcopy(p)))
    assert torch.equal(q.state_dict()["inner.running_rate"], p.state_dict()["inner.running_rate"])
    direct = actsparse.BernoulliKL(0.1, weight=2.0)(torch.sigmoid(a))
    assert torch.allclose(actsparse.BernoulliKL(0.1, weight=2.0).of(torch.sigmoid)(a), direct)
    with pytest.raises(ValueError, match="same shape|output's shape"):
        actsparse.L1(1.0).of(lambda t: t.sum(0))(a)
    with pytest.raises(TypeError, match="function of the activations"):
        actsparse.L1(1.0).of(3)
