"""attach(): the penalty through hooks equals the penalty computed by hand, and the hooks behave."""

from __future__ import annotations

import gc
import math
import warnings

import pytest
import torch
from torch import nn

import actsparse


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 10), nn.Sigmoid(), nn.Linear(10, 8), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(8, 6))

    def forward(self, x):
        return self.decoder(self.encoder(x))


def by_hand(model: MLP, x: torch.Tensor) -> torch.Tensor:
    """The same penalties computed from the activations by hand, independently of attach."""
    h1 = torch.sigmoid(model.encoder[0](x))
    h2 = torch.relu(model.encoder[2](h1))
    rho_hat = h1.mean(0)
    rho = 0.05
    kl = (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()
    return 3.0 * kl + 1e-2 * h2.abs().sum() / x.shape[0]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MLP().double()


def test_penalty_and_gradients_equal_hand_computed(model):
    x = torch.randn(16, 6, dtype=torch.float64)
    reg = actsparse.attach(model, {"encoder.1": actsparse.BernoulliKL(0.05, weight=3.0),
                                   "encoder.3": actsparse.L1(1e-2)})
    out = model(x)
    loss = ((out - x) ** 2).mean() + reg.penalty()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_loss = ((model(x) - x) ** 2).mean() + by_hand(model, x)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_targets_by_glob_type_and_instance(model):
    x = torch.randn(4, 6, dtype=torch.float64)
    for target in ("encoder.[13]", "encoder.*", nn.ReLU, model.encoder[3]):
        with actsparse.attach(model, {target: actsparse.L2(1.0)}) as reg:
            model(x)
            names = set(reg.penalties_by_target())
        expected = {"encoder.[13]": {"encoder.1", "encoder.3"},
                    "encoder.*": {"encoder.0", "encoder.1", "encoder.2", "encoder.3"}}.get(target, {"encoder.3"})
        assert names == expected, target


def test_unknown_name_lists_close_matches(model):
    with pytest.raises(KeyError, match="Closest: 'encoder.1'"):
        actsparse.attach(model, {"encoder1": actsparse.L1(1.0)})
    with pytest.raises(KeyError, match="no module of type Conv2d"):
        actsparse.attach(model, {nn.Conv2d: actsparse.L1(1.0)})
    with pytest.raises(KeyError):
        actsparse.attach(model, {"dec*.7": actsparse.L1(1.0)})
    with pytest.raises(TypeError, match="must be an actsparse Penalty"):
        actsparse.attach(model, {"encoder.1": torch.nn.L1Loss()})
    with pytest.raises(ValueError, match="nothing to attach"):
        actsparse.attach(model, {})


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.lin(self.act(self.lin(x))))


def test_module_called_twice_counts_twice():
    torch.manual_seed(0)
    m = Twice().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    reg = actsparse.attach(m, {"act": actsparse.L1(1.0)})
    m(x)
    h1 = torch.relu(m.lin(x))
    h2 = torch.relu(m.lin(h1))
    ref = (h1.abs().sum() + h2.abs().sum()) / 5
    assert float(reg.penalty()) == pytest.approx(float(ref), rel=1e-12)
    assert reg.stats()["act"].calls == 2


def test_one_module_on_two_widths():
    # seed 004's model: one ReLU after layers of 32 and then 16 units
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu = nn.Linear(8, 32), nn.Linear(32, 16), nn.ReLU()

        def forward(self, x):
            return self.relu(self.b(self.relu(self.a(x))))

    torch.manual_seed(0)
    m = M().double()
    x = torch.randn(4, 8, dtype=torch.float64)
    reg = actsparse.attach(m, {"relu": actsparse.L1(0.01)})
    m(x)
    h1 = torch.relu(m.a(x))
    h2 = torch.relu(m.b(h1))
    assert float(reg.penalty()) == pytest.approx(float(0.01 * (h1.abs().sum() + h2.abs().sum()) / 4), rel=1e-12)
    s = reg.stats()["relu"]
    assert s.units == 48 and s.calls == 2
    both = torch.cat([h1.mean(0), h2.mean(0)])
    assert s.mean_rho_hat == pytest.approx(float(both.mean()), rel=1e-6)


def test_each_forward_starts_fresh(model):
    reg = actsparse.attach(model, {"encoder.3": actsparse.L1(1.0)})
    x1, x2 = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    model(x1)
    model(x2)
    ref = torch.relu(model.encoder[2](torch.sigmoid(model.encoder[0](x2)))).abs().sum() / 4
    assert float(reg.penalty()) == pytest.approx(float(ref), rel=1e-12)
    assert reg.stats()["encoder.3"].calls == 1


def test_direct_submodule_calls_do_not_accumulate(model):
    reg = actsparse.attach(model, {"encoder.3": actsparse.L1(1.0)})
    for _ in range(3):
        h = model.encoder(torch.randn(4, 6, dtype=torch.float64))  # not through model(): no root hook
        p = reg.penalty()
        assert float(p) == pytest.approx(float(h.abs().sum() / 4), rel=1e-12)
        assert reg.stats()["encoder.3"].calls == 1


def test_direct_call_after_model_forward_starts_fresh(model):
    reg = actsparse.attach(model, {"encoder.3": actsparse.L1(1.0)})
    model(torch.randn(4, 6, dtype=torch.float64))
    h = model.encoder(torch.randn(4, 6, dtype=torch.float64))  # penalty() not read in between
    assert float(reg.penalty()) == pytest.approx(float(h.abs().sum() / 4), rel=1e-12)


def test_no_capture_under_no_grad_or_eval_unless_asked(model):
    reg = actsparse.attach(model, {"encoder.3": actsparse.L1(1.0)})
    with torch.no_grad():
        model(torch.randn(4, 6, dtype=torch.float64))
    assert float(reg.penalty()) == 0.0 and reg.stats()["encoder.3"].calls == 0
    model.eval()
    model(torch.randn(4, 6, dtype=torch.float64))
    assert float(reg.penalty()) == 0.0
    reg.remove()
    reg = actsparse.attach(model, {"encoder.3": actsparse.L1(1.0)}, capture="always")
    with torch.no_grad():
        model(torch.randn(4, 6, dtype=torch.float64))
    assert float(reg.penalty()) > 0.0


def _n_hooks(m: nn.Module) -> int:
    return sum(len(s._forward_hooks) + len(s._forward_pre_hooks) for s in m.modules())


def test_remove_and_context_manager_even_on_error(model):
    before = _n_hooks(model)
    reg = actsparse.attach(model, {nn.ReLU: actsparse.L1(1.0), "encoder.1": actsparse.BernoulliKL(0.1)})
    assert _n_hooks(model) == before + 4  # a pre- and a post-hook on the model, one hook per target
    reg.remove()
    reg.remove()  # idempotent
    assert _n_hooks(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with actsparse.attach(model, {nn.ReLU: actsparse.L1(1.0)}):
            model(torch.randn(2, 6, dtype=torch.float64))
            raise RuntimeError("boom")
    assert _n_hooks(model) == before


def test_gradient_accumulation_matches_full_batch(model):
    x = torch.randn(8, 6, dtype=torch.float64)
    reg = actsparse.attach(model, {"encoder.3": actsparse.L1(1e-2)})
    model.zero_grad()
    for chunk in x.split(4):
        (((model(chunk) - chunk) ** 2).mean() / 2 + reg.penalty() / 2).backward()
    accumulated = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for chunk in x.split(4):  # reference by hand
        h = torch.relu(model.encoder[2](torch.sigmoid(model.encoder[0](chunk))))
        (((model(chunk) - chunk) ** 2).mean() / 2 + 1e-2 * h.abs().sum() / 4 / 2).backward()
    for a, r in zip(accumulated, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_torch_compile_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 12), nn.Sigmoid(), nn.Linear(12, 6))
    x = torch.randn(16, 6)
    reg = actsparse.attach(m, {"1": actsparse.BernoulliKL(0.1, weight=2.0)})
    cm = torch.compile(m)
    for _ in range(2):
        loss = ((cm(x) - x) ** 2).mean() + reg.penalty()
        grads = torch.autograd.grad(loss, list(m.parameters()))
    h = torch.sigmoid(m[0](x))
    ref = ((m[2](h) - x) ** 2).mean() + actsparse.functional.bernoulli_kl(0.1, h.mean(0)) * 2.0
    ref_grads = torch.autograd.grad(ref, list(m.parameters()))
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_thousand_steps_constant_hooks_and_memory(model):
    reg = actsparse.attach(model, {"encoder.1": actsparse.BernoulliKL(0.1, weight=3.0),
                                   nn.ReLU: actsparse.L1(1e-3)})
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    hooks = _n_hooks(model)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter))

    def check_kept(reg):  # a function, so that no reference outlives the check
        for h in reg._hooked:
            assert h.calls == 1 and h.value.dim() == 0
            ((n, rho, fire),) = h.unit_sums().values()
            assert n == 1 and rho.dim() == 1 and rho.shape == fire.shape

    counts = []
    for step in range(1000):
        x = torch.randn(8, 6, dtype=torch.float64)
        loss = ((model(x) - x) ** 2).mean() + reg.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (10, 500, 999):
            counts.append(live_tensors())
            assert _n_hooks(model) == hooks
            # what the hooks keep: one scalar and two (units,) vectors per target, no activations
            check_kept(reg)
    del loss
    assert counts[0] == counts[1] == counts[2], counts


def test_stats_match_hand_computed(model):
    x = torch.randn(32, 6, dtype=torch.float64)
    reg = actsparse.attach(model, {"encoder.3": actsparse.PoissonKL(0.1, weight=1.0)})
    model(x)
    s = reg.stats()["encoder.3"]
    h = torch.relu(model.encoder[2](torch.sigmoid(model.encoder[0](x)))).detach()
    assert s.mean_rho_hat == pytest.approx(float(h.mean()), rel=1e-6)
    assert s.active_fraction == pytest.approx(float((h > 0).double().mean()), rel=1e-6)
    assert s.dead_units == int(((h > 0).sum(0) == 0).sum())
    assert s.units == 8 and s.calls == 1 and s.target == 0.1
    assert s.penalty == pytest.approx(float(reg.penalty()), rel=1e-12)


def test_diagnose_reports_unreachable_penalty():
    torch.manual_seed(0)
    # the ReLU sees the *input*, so a penalty on it cannot train any parameter
    m = nn.Sequential(nn.ReLU(), nn.Linear(4, 3), nn.Sigmoid())
    reg = actsparse.attach(m, {"0": actsparse.L1(1.0), "2": actsparse.BernoulliKL(0.2)})
    x = torch.randn(8, 4)
    loss = m(x).pow(2).mean() + reg.penalty()
    with pytest.warns(UserWarning, match="penalty 0.*no gradient"):
        report = reg.diagnose(loss)
    by_term = {r.term: r for r in report}
    assert by_term["penalty 0"].grad_norm == 0 and by_term["penalty 0"].problem
    assert by_term["penalty 2"].grad_norm > 0 and by_term["penalty 2"].problem is None
    assert by_term["loss"].params_reached == 2
    loss.backward()  # the graph is still usable


def test_gradient_report_flags_non_differentiable_term():
    # seed 001: a KL computed from (encoded > 0) has no gradient at all
    m = nn.Linear(4, 3)
    encoded = m(torch.randn(8, 4))
    rho_hat = (encoded > 0).float().mean(0).clamp(0.001, 0.999)
    kl = (0.1 * torch.log(0.1 / rho_hat)).sum()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        (r,) = actsparse.gradient_report(m, {"user_kl": kl})
    assert r.problem and "no gradient" in r.problem and r.grad_norm == 0
    assert any("user_kl" in str(x.message) for x in w)


def test_regularize_declares_penalty_in_the_model():
    torch.manual_seed(0)
    lin = nn.Linear(5, 7)
    m = nn.Sequential(actsparse.regularize(lin, actsparse.L1(1e-2)), nn.ReLU(), nn.Linear(7, 3),
                      actsparse.regularize(nn.Sigmoid(), actsparse.BernoulliKL(0.3, momentum=0.9)))
    assert [k for k in m.state_dict() if "weight" in k] == ["0.weight", "2.weight"]  # names unchanged
    reg = actsparse.attach(m)  # collects the declared penalties
    x = torch.randn(6, 5)
    m(x)
    with torch.no_grad():  # not captured, so the model's capture stays
        ref = 1e-2 * lin(x).abs().sum() / 6
    assert set(reg.penalties_by_target()) == {"0", "3"}
    assert float(reg.penalties_by_target()["0"]) == pytest.approx(float(ref), rel=1e-6)
    assert "3.activity_regularizer.running_rate" in m.state_dict()  # state travels with the model
    m.eval()
    assert not m[3].activity_regularizer.training


def test_tuple_output_uses_first_tensor():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    m = nn.Sequential(lstm)
    reg = actsparse.attach(m, {"0": actsparse.L2(1.0)})
    x = torch.randn(2, 5, 3)
    out, _ = lstm(x)
    m(x)
    assert float(reg.penalty()) == pytest.approx(float(out.pow(2).sum() / 2), rel=1e-6)


def test_error_inside_hook_names_the_layer(model):
    actsparse.attach(model, {"encoder.3": actsparse.BernoulliKL(0.05)})  # ReLU output: ρ̂ may exceed 1
    x = torch.full((4, 6), 50.0, dtype=torch.float64)
    with torch.no_grad():
        model.encoder[2].bias.fill_(10.0)
    with pytest.raises(ValueError, match=r"'encoder.3'.*PoissonKL"):
        model(x)


def test_nan_activations_raise_with_layer_name(model):
    actsparse.attach(model, {"encoder.3": actsparse.L1(1.0)})
    x = torch.randn(4, 6, dtype=torch.float64)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'encoder.3'.*NaN"):
        model(x)


def test_attachment_state_dict_roundtrip(model):
    p = actsparse.BernoulliKL(0.1, momentum=0.9)
    reg = actsparse.attach(model, {"encoder.1": p})
    model(torch.randn(4, 6, dtype=torch.float64))
    sd = reg.state_dict()
    reg.remove()
    reg2 = actsparse.attach(model, {"encoder.1": actsparse.BernoulliKL(0.1, momentum=0.9)})
    reg2.load_state_dict(sd)
    torch.testing.assert_close(reg2.penalties[0].running_rate, p.running_rate)


def test_regularize_a_sequential_keeps_its_output():
    torch.manual_seed(0)
    block = actsparse.regularize(nn.Sequential(nn.Linear(4, 3), nn.Sigmoid()), actsparse.L1(0.1))
    x = torch.rand(2, 4)
    y = block(x)
    assert y.shape == (2, 3)  # not a scalar: the penalty is not run as a layer
    model = nn.Sequential(block)
    reg = actsparse.attach(model)
    model(x)
    assert float(reg.penalty()) == pytest.approx(float(0.1 * y.abs().sum() / 2), rel=1e-6)


def test_stats_of_an_output_modified_in_place_are_reported_missing():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    reg = actsparse.attach(model, {"0": actsparse.L1(1e-3)})
    model(torch.randn(4, 6))  # the ReLU overwrote the Linear's output after the hook kept it
    with pytest.warns(UserWarning, match="modified in place"):
        st = reg.stats()["0"]
    assert math.isnan(st.mean_rho_hat) and st.calls == 1 and st.penalty > 0


def test_stats_use_the_threshold_of_the_forward_not_a_later_one():
    th = nn.Parameter(torch.full((4,), 0.5, dtype=torch.float64))
    model = nn.Sequential(nn.Linear(3, 4).double())
    reg = actsparse.attach(model, {"0": actsparse.FrequencyKL(0.2, threshold=th)})
    x = torch.randn(50, 3, dtype=torch.float64)
    a = model(x).detach()
    with torch.no_grad():
        th.fill_(10.0)  # an optimiser step moves the learned threshold after the forward
    assert reg.stats()["0"].active_fraction == pytest.approx(float((a > 0.5).double().mean()))
