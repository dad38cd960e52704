"""TargetSparsity: a penalty whose coefficient is adapted until a statistic reaches its target.

References are independent: NumPy formulas for the statistics and the per-unit penalties,
gradcheck in float64, the update rule replayed by hand in Python floats, and a naive training
loop for resume."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import actsparse
from actsparse import L1, L2, BernoulliKL, FrequencyKL, Hoyer, PoissonKL
from actsparse.control import TargetNotReachedWarning, TargetSparsity, measure_statistic
from actsparse.models import SparseAutoencoder


def _acts(shape=(32, 6), seed=0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(*shape, generator=g, dtype=dtype) - 0.3)


# ------------------------------------------------------------------------------- weighted()


PENALTIES = {
    "BernoulliKL": lambda: BernoulliKL(0.05, weight=2.0),
    "PoissonKL": lambda: PoissonKL(0.1, weight=2.0),
    "FrequencyKL": lambda: FrequencyKL(0.2, weight=2.0, bandwidth=0.5),
    "L1": lambda: L1(2.0),
    "L2": lambda: L2(2.0),
    "Hoyer": lambda: Hoyer(2.0),
    "L1.of(relu)": lambda: L1(2.0).of(torch.relu),
}


@pytest.mark.parametrize("name", PENALTIES)
def test_weighted_with_a_float_is_forward_with_that_weight(name):
    a = _acts() if "KL" not in name or name == "PoissonKL" else _acts().clamp(max=1)
    p = PENALTIES[name]()
    x = a.clone().requires_grad_()
    ref = p(x)
    (g_ref,) = torch.autograd.grad(ref, x)
    y = a.clone().requires_grad_()
    got = p.weighted(y, 2.0)
    (g,) = torch.autograd.grad(got, y)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=0)


def _kl_np(rho, r):
    return rho * np.log(rho / r) + (1 - rho) * np.log((1 - rho) / (1 - r))


def test_per_unit_weights_match_numpy():
    """Σ_j w_j P_j against the formulas written out in NumPy, for L1, L2 and the two KLs, with
    the units last and on axis 1 of a conv map."""
    w = torch.tensor([0.5, 1.0, 2.0, 0.0, 3.0, 1.5], dtype=torch.float64)
    a = _acts((16, 6)).clamp(max=0.9)
    an, wn = a.numpy(), w.numpy()
    assert float(L1(1.0).weighted(a, w)) == pytest.approx((np.abs(an).sum(0) * wn).sum() / 16, rel=1e-12)
    assert float(L2(1.0).weighted(a, w)) == pytest.approx(((an ** 2).sum(0) * wn).sum() / 16, rel=1e-12)
    r = np.clip(an.mean(0), 1e-6, 1 - 1e-6)
    assert float(BernoulliKL(0.05).weighted(a, w)) == pytest.approx((_kl_np(0.05, r) * wn).sum(), rel=1e-9)
    pois = 0.1 * np.log(0.1 / r) - 0.1 + r
    assert float(PoissonKL(0.1).weighted(a, w)) == pytest.approx((pois * wn).sum(), rel=1e-9)
    conv = _acts((4, 6, 3, 5))  # (batch, channels, h, w): channels are the units
    cn = conv.numpy()
    got = float(L1(1.0, unit_dim=1).weighted(conv, w))
    assert got == pytest.approx((np.abs(cn).sum(axis=(0, 2, 3)) * wn).sum() / 4, rel=1e-12)


def test_per_unit_weighted_passes_gradcheck():
    w = torch.tensor([0.5, 1.0, 2.0, 0.7, 3.0, 1.5], dtype=torch.float64)
    a = (_acts((8, 6)) + 0.05).clamp(max=0.9).requires_grad_()  # away from L1's kink and the KL's clamp
    for p in (L1(1.0), L2(1.0), BernoulliKL(0.3), PoissonKL(0.3)):
        assert torch.autograd.gradcheck(lambda x, p=p: p.weighted(x, w), (a,)), type(p).__name__


def test_what_cannot_be_controlled_says_why():
    with pytest.raises(TypeError, match="not a sum over units"):
        Hoyer(1.0).toward(rate=0.1, per_unit=True)
    with pytest.raises(TypeError, match="control one term"):
        (L1(1.0) + L2(1.0)).toward(l0=4)
    with pytest.raises(TypeError, match="exactly one target"):
        L1(1.0).toward()
    with pytest.raises(TypeError, match="exactly one target"):
        L1(1.0).toward(l0=4, rate=0.1)
    with pytest.raises(ValueError, match="no per-unit form"):
        L1(1.0).toward(l0=4, per_unit=True)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        L1(1.0).toward(rate=1.5)
    with pytest.raises(ValueError, match="> 0"):
        L1(1.0).toward(l0=-2)
    with pytest.raises(ValueError, match="starting coefficient"):
        L1(0.0).toward(l0=4)
    with pytest.raises(TypeError, match="controlled already"):
        TargetSparsity(L1(1.0).toward(l0=4), "l0", 3)
    Hoyer(1.0).toward(l0=3)  # one coefficient: fine


# ------------------------------------------------------------------------------- statistics


def test_statistics_match_numpy():
    a = _acts((20, 5), seed=3)
    an = a.numpy()
    fired = (an > 0).mean(0)
    assert float(measure_statistic(a, "l0")) == pytest.approx(fired.sum(), rel=1e-12)
    assert float(measure_statistic(a, "rate")) == pytest.approx(fired.mean(), rel=1e-12)
    np.testing.assert_allclose(measure_statistic(a, "rate", per_unit=True).numpy(), fired, rtol=1e-12)
    np.testing.assert_allclose(measure_statistic(a, "mean", per_unit=True).numpy(), an.mean(0), rtol=1e-12)
    th = torch.tensor([0.0, 0.5, 1.0, 0.2, 0.1], dtype=torch.float64)
    np.testing.assert_allclose(measure_statistic(a, "rate", threshold=th, per_unit=True).numpy(),
                               (an > th.numpy()).mean(0), rtol=1e-12)
    conv = _acts((3, 5, 4, 4), seed=4)  # channels on axis 1: each channel's share over batch and positions
    np.testing.assert_allclose(measure_statistic(conv, "rate", unit_dim=1, per_unit=True).numpy(),
                               (conv.numpy() > 0).mean(axis=(0, 2, 3)), rtol=1e-12)


# ------------------------------------------------------------------------------- the update


def test_update_follows_the_formula():
    """log λ_{t+1} = log λ_t + η · min((s_t − s*)/s*, 1), replayed in Python floats; the value
    of each forward is λ_t (before the step's update) times the penalty."""
    ctrl = L1(0.01).toward(l0=3.0, rate_of_change=0.1)
    log_lam = math.log(0.01)
    for t in range(12):
        a = _acts((16, 8), seed=t).requires_grad_()
        s = float((a.detach() > 0).double().mean(0).sum())
        value = ctrl(a)
        assert float(value) == pytest.approx(math.exp(log_lam) * float(a.detach().abs().sum() / 16), rel=1e-12)
        log_lam += 0.1 * min((s - 3.0) / 3.0, 1.0)
        assert float(ctrl.log_weight) == pytest.approx(log_lam, rel=1e-12, abs=1e-15)
        assert float(ctrl.statistic) == pytest.approx(s, rel=1e-12)
    assert int(ctrl.updates) == 12


def test_per_unit_update_moves_each_unit_by_its_own_statistic():
    ctrl = L1(1.0).toward(rate=0.5, per_unit=True, rate_of_change=0.2)
    a = torch.zeros(10, 3, dtype=torch.float64)
    a[:9, 0] = 1.0   # unit 0 fires in 90 % of the samples: λ_0 up
    a[:5, 1] = 1.0   # unit 1 at 50 %: unchanged
    a[:1, 2] = 1.0   # unit 2 at 10 %: λ_2 down
    ctrl(a.requires_grad_())
    expected = 0.2 * np.array([min(0.4 / 0.5, 1.0), 0.0, -0.4 / 0.5])
    np.testing.assert_allclose(ctrl.log_weight.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_no_update_in_eval_mode_or_without_grad():
    ctrl = L1(0.5).toward(l0=1.0)
    a = _acts((8, 4)).requires_grad_()
    before = copy.deepcopy(ctrl.state_dict())
    ctrl.eval()
    ctrl(a)
    ctrl.train()
    with torch.no_grad():
        ctrl(a)
    for k, v in ctrl.state_dict().items():
        torch.testing.assert_close(v, before[k], equal_nan=True, msg=k)


def test_update_in_forward_false_waits_for_step():
    ctrl = L1(0.5).toward(l0=1.0, update_in_forward=False)
    a = _acts((8, 4)).requires_grad_()
    for _ in range(3):  # three evaluations of one step (a line search): no update yet
        ctrl(a)
    assert float(ctrl.log_weight) == math.log(0.5)
    ctrl.step()
    s = float((a.detach() > 0).double().mean(0).sum())
    assert float(ctrl.log_weight) == pytest.approx(math.log(0.5) + 0.05 * min(s - 1.0, 1.0), rel=1e-12)
    ctrl.step()  # no new forward: nothing to do
    assert int(ctrl.updates) == 1


def test_bounds_hold():
    ctrl = L1(1.0).toward(l0=0.01, max_weight=2.0, rate_of_change=1.0)
    for _ in range(5):
        ctrl(torch.ones(4, 3, requires_grad=True))
    assert float(ctrl.coefficient) == pytest.approx(2.0)
    # the default bounds: six decades either side of the start
    up = L1(1e-3).toward(l0=0.01, rate_of_change=1.0)
    down = L1(1e-3).toward(l0=100.0, rate_of_change=1.0)
    for _ in range(40):
        up(torch.ones(4, 3, requires_grad=True))
        down(torch.zeros(4, 3, requires_grad=True))
    assert float(up.coefficient) == pytest.approx(1e3) and float(down.coefficient) == pytest.approx(1e-9)


# ------------------------------------------------------------------------------- training


def _sae(penalty, seed=0):
    torch.manual_seed(seed)
    return SparseAutoencoder(16, 64, "relu", decoder="linear", penalty=penalty, recon_loss="mse")


def _data(n=2048):
    """``n`` training rows and 512 held-out rows of one synthetic dictionary (64 atoms in 16-d, 4 active)."""
    from actsparse.data.synthetic import make_synthetic

    x = make_synthetic(n + 512, 16, 64, 4.0, seed=0).x
    return x[:n], x[n:]


def _train(model, x, steps, batch=128, opt=None):
    opt = opt or torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(123)
    order = [torch.randperm(x.shape[0], generator=g)[:batch] for _ in range(steps)]
    for idx in order:
        opt.zero_grad()
        model(x[idx]).loss.backward()
        opt.step()
    return opt


def test_relu_l1_reaches_the_target_l0():
    """The controller takes a ReLU SAE + L1 to L0 = 6 (±5 %) on held-out data in eval mode, from
    a starting λ far too small (1e-4: the code is dense) and one so large that it silences every
    unit at first (1.0: the anti-windup holds λ while they revive)."""
    x, held_out = _data(8192)  # with 2,048 rows the held-out L0 is 5 % above the training rows' (overfit)
    for start, steps in ((1e-4, 1000), (1.0, 2500)):
        model = _sae(L1(start).toward(l0=6.0))
        _train(model, x, steps)
        model.eval()
        with torch.no_grad():
            l0 = float((model(held_out).code > 0).double().sum(1).mean())
        assert l0 == pytest.approx(6.0, rel=0.05), (start, l0, float(model.penalty.coefficient))


def test_resume_is_bit_identical():
    """Stop at step 40 (state_dict of the model, controller included, and the optimiser), load into
    fresh objects, go on to 80: the same weights and λ, bit for bit, as 80 steps in one go."""
    x, _ = _data(1024)
    whole = _sae(L1(1e-2).toward(l0=5.0))
    _train(whole, x, 80)
    first = _sae(L1(1e-2).toward(l0=5.0))
    opt = _train(first, x, 40)
    state, opt_state = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())
    again = _sae(L1(3.0).toward(l0=5.0), seed=9)  # other weights and λ: all replaced by the load
    again.load_state_dict(state)
    opt2 = torch.optim.Adam(again.parameters(), lr=3e-3)
    opt2.load_state_dict(opt_state)
    # replay: the batches of steps 41..80 of the same order
    g = torch.Generator().manual_seed(123)
    order = [torch.randperm(x.shape[0], generator=g)[:128] for _ in range(80)]
    for idx in order[40:]:
        opt2.zero_grad()
        again(x[idx]).loss.backward()
        opt2.step()
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    assert float(again.penalty.log_weight) == float(whole.penalty.log_weight)


def test_casting_the_model_keeps_the_controller_in_float64():
    model = _sae(L1(1e-2).toward(l0=5.0)).float()
    assert model.penalty.log_weight.dtype == torch.float64 and model.W_enc.dtype == torch.float32
    model.half()
    assert model.penalty.log_weight.dtype == torch.float64 and model.W_enc.dtype == torch.float16


def test_per_unit_state_round_trips():
    ctrl = BernoulliKL(0.05, weight=3.0).toward(mean=0.05, per_unit=True)
    ctrl(torch.rand(8, 5, dtype=torch.float64, requires_grad=True))
    fresh = BernoulliKL(0.05, weight=3.0).toward(mean=0.05, per_unit=True)
    fresh.load_state_dict(ctrl.state_dict())
    assert torch.equal(fresh.log_weight, ctrl.log_weight) and fresh.log_weight.shape == (5,)


# ------------------------------------------------------------------------------- attach


def test_attach_one_line_and_one_layer_per_controller():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    reg = actsparse.attach(model, {"1": L1(1e-3).toward(l0=4.0)})
    x = torch.randn(32, 8)
    model(x)
    reg.penalty().backward()
    ctrl = reg.penalties[0]
    assert int(ctrl.updates) == 1 and "coefficient" in repr(ctrl)
    shared = L1(1e-3).toward(l0=4.0)
    model2 = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    actsparse.attach(model2, {"1": shared, "3": shared})
    with pytest.raises(ValueError, match="attach one per layer"):
        model2(x)


# ------------------------------------------------------------------------------- reporting


def test_saturation_is_reported_with_numbers():
    """Activations that no coefficient can move (a constant input): λ rises without end and the
    controller says so after a window."""
    ctrl = L1(1e-3).toward(l0=2.0, window=20, rate_of_change=0.2)
    a = torch.ones(16, 8)  # L0 = 8, for ever
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(40):
            ctrl(a.clone().requires_grad_())
    msgs = [str(w.message) for w in caught if issubclass(w.category, TargetNotReachedWarning)]
    assert len(msgs) == 1 and "saturation" in msgs[0] and "target 2" in msgs[0], msgs
    # anti-windup: from the warning on, λ rises no further; it falls again once the statistic does
    held = float(ctrl.log_weight)
    for _ in range(10):
        ctrl(a.clone().requires_grad_())
    assert float(ctrl.log_weight) == held
    ctrl(torch.zeros(16, 8, requires_grad=True))
    assert float(ctrl.log_weight) == pytest.approx(held - 0.2) and float(ctrl.held) == 0


def test_too_sparse_is_reported():
    ctrl = L1(1.0).toward(rate=0.5, window=20, rate_of_change=0.2)
    a = torch.zeros(16, 8)
    a[0] = 1.0  # rate 1/16 whatever the coefficient
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(40):
            ctrl(a.clone().requires_grad_())
    msgs = [str(w.message) for w in caught if issubclass(w.category, TargetNotReachedWarning)]
    assert len(msgs) == 1 and "sparser than asked" in msgs[0], msgs
    held = float(ctrl.log_weight)
    ctrl(a.clone().requires_grad_())
    assert float(ctrl.log_weight) == held


def test_a_moving_statistic_is_not_reported():
    """λ rising while the statistic comes down toward the target is convergence, not saturation."""
    ctrl = L1(1e-3).toward(l0=2.0, window=20, rate_of_change=0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(60):
            a = torch.zeros(16, 8)
            a[:, : max(2, 8 - t // 6)] = 1.0  # L0 falls 8 → 2 as the steps go
            ctrl(a.requires_grad_())
    assert not [w for w in caught if issubclass(w.category, TargetNotReachedWarning)]


def test_frequency_kl_with_a_learned_threshold_measures_above_it():
    th = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    ctrl = FrequencyKL(0.2, weight=1.0, threshold=th).toward(rate=0.2, per_unit=True)
    a = torch.tensor([[1.0, 1.0, 1.0], [0.4, 0.0, 3.0]], dtype=torch.float64, requires_grad=True)
    ctrl(a)
    np.testing.assert_allclose(ctrl.statistic.numpy(), [0.5, 0.5, 0.5])


# ------------------------------------------------------------------------------- the command line


def _metrics(run):
    import json

    log = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines() if s.strip()]
    return log, json.loads((run / "metrics.json").read_text())


def test_cli_logs_plots_and_prints_the_controlled_statistic(tmp_path, capsys):
    from actsparse.cli import main

    args = ["train", "--data", "synthetic", "--samples", "1200", "--hidden", "32", "--activation", "relu",
            "--decoder", "linear", "--penalty", "l1", "--weight", "1e-3", "--target-l0", "6", "--optimizer", "adam",
            "--epochs", "3", "--out", str(tmp_path), "--name", "c", "--no-progress", "--threads", "1"]
    assert main(args) == 0
    run = tmp_path / "c"
    log, metrics = _metrics(run)
    assert all("coefficient" in r and "statistic" in r for r in log)
    assert metrics["coefficient"] == pytest.approx(log[-1]["coefficient"], rel=1e-12)
    # the coefficient follows the update rule from the logged statistics: it moved up from 1e-3 (L0 starts > 6)
    assert log[-1]["coefficient"] > 1e-3
    assert (run / "control.png").is_file()
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("trained "))
    assert "(target 6, coefficient" in line and "from 0.001" in line, line


def test_cli_resume_of_a_controlled_lbfgs_run_is_bit_identical(tmp_path):
    """L-BFGS steps the controller once per iteration and re-evaluates after it: stopping at 6 and
    resuming to 12 gives the weights and λ of 12 iterations in one go, bit for bit."""
    from safetensors.torch import load_file

    from actsparse.cli import main

    common = ["--samples", "400", "--hidden", "8", "--target-mean", "0.05", "--target", "0.05", "--out", str(tmp_path),
              "--no-progress", "--no-plots", "--threads", "1"]
    assert main(["train", *common, "--name", "whole", "--iterations", "12"]) == 0
    assert main(["train", *common, "--name", "parts", "--iterations", "6"]) == 0
    assert main(["train", "--resume", "--out", str(tmp_path), "--name", "parts", "--iterations", "12",
                 "--no-progress", "--no-plots"]) == 0
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("whole", "parts"))
    assert set(a) == set(b) and "penalty.log_weight" in a
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert a["penalty.log_weight"].dtype == torch.float64  # λ is not rounded to the model's float32
    assert float(a["penalty.log_weight"]) != math.log(3.0)  # it moved


@pytest.mark.parametrize("fields, match", [
    ({"target_l0": 4, "target_mean": 0.1}, "give one target"),
    ({"target_l0": 4, "penalty": None}, "needs a --penalty"),
    ({"target_l0": 4}, "sigmoid units always are"),
    ({"target_rate": 1.5, "activation": "relu"}, r"\(0, 1\)"),
    ({"target_l0": 40, "activation": "relu"}, "more than the 25 units of the code"),
    ({"target_l0": 5, "activation": "relu", "model": "stacked", "sizes": (8, 4)}, "more than the 4 units"),
    ({"per_unit": True}, "applies to --target-rate"),
    ({"target_l0": 4, "per_unit": True, "activation": "relu"}, "--per-unit holds each unit"),
    ({"target_rate": 0.1, "per_unit": True, "activation": "relu", "penalty": "hoyer"}, "not hoyer"),
    ({"target_mean": 0.1, "weight": 0.0}, "starting coefficient"),
    ({"target_l0": 4, "activation": "topk", "k": 4, "decoder": "linear"}, "nothing to adapt"),
    ({"target_mean": 0.1, "control_rate": 0.0}, "control-rate"),
    ({"target_mean": -1.0}, "finite number > 0"),
])
def test_config_refuses_what_cannot_be_controlled(fields, match):
    from actsparse.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=match):
        TrainConfig(**fields)


def test_cli_flag_error_is_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "actsparse", "train", "--target-l0", "4", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "sigmoid units always are" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_control_figure_draws_the_logged_numbers():
    from actsparse import plots

    hist = [{"step": s, "statistic": 10.0 / s, "coefficient": 1e-3 * s} for s in range(1, 6)]
    fig = plots.control_figure(hist, 4.0, "l0")
    top, bottom = fig.axes
    assert list(top.get_lines()[0].get_ydata()) == [10.0 / s for s in range(1, 6)]
    assert list(top.get_lines()[1].get_ydata()) == [4.0, 4.0]
    assert list(bottom.get_lines()[0].get_ydata()) == [1e-3 * s for s in range(1, 6)]
    assert bottom.get_yscale() == "log"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_benchmark_smoke_run(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_target_control.py"
    out = tmp_path / "tc.json"
    r = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["smoke"] is True and set(res) >= {"relu_l1", "sweep", "classic", "seed001", "conv"}
    assert all("l0" in v for per in res["relu_l1"].values() for v in per.values())


# ------------------------------------------------------------------------------- per-unit bandwidth


def test_per_unit_bandwidth_equals_one_call_per_unit():
    """activation_frequency with a (units,) bandwidth: each unit's value and gradient are those of a
    call on that unit alone with its own float bandwidth."""
    from actsparse.functional import activation_frequency

    a = torch.randn(40, 3, dtype=torch.float64, requires_grad=True)
    eps = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    f = activation_frequency(a, 0.0, -1, eps)
    (g,) = torch.autograd.grad((f * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum(), a)
    for j in range(3):
        x = a.detach()[:, j:j + 1].clone().requires_grad_()
        fj = activation_frequency(x, 0.0, -1, float(eps[j]))
        (gj,) = torch.autograd.grad(fj.sum() * (j + 1), x)
        assert float(f[j]) == float(fj[0])
        torch.testing.assert_close(g[:, j:j + 1], gj, rtol=0, atol=0)


def test_auto_bandwidth_reaches_the_quantile():
    """bandwidth="auto": ε_j = 2|q_j − θ| + 0.1·std_j with q_j the (1 − ρ)-quantile (NumPy), so a unit
    that always fires still gets a gradient, which a fixed ε = 0.1 gives it not."""
    z = torch.rand(200, 2, dtype=torch.float64) + torch.tensor([0.5, -2.0], dtype=torch.float64)  # always / never on
    p = FrequencyKL(0.2, weight=1.0, bandwidth="auto")
    eps = p._bandwidth_for(z)
    zn = z.numpy()
    ref = 2 * np.abs(np.quantile(zn, 0.8, axis=0)) + 0.1 * zn.std(axis=0)
    np.testing.assert_allclose(eps.numpy(), ref, rtol=1e-12)
    x = z.clone().requires_grad_()
    (g,) = torch.autograd.grad(p(x), x)
    assert bool((g[:, 0] != 0).any()) and bool((g[:, 1] != 0).any())
    y = z.clone().requires_grad_()
    (g_fixed,) = torch.autograd.grad(FrequencyKL(0.2, weight=1.0)(y), y)
    assert bool((g_fixed == 0).all())
    with pytest.raises(ValueError, match="'auto'"):
        FrequencyKL(0.2, bandwidth="wide")


def test_tensorboard_logs_the_coefficient_and_the_statistic(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator as ea

    from actsparse.tensorboard import TensorBoardLogger

    model = _sae(L1(1e-3).toward(l0=4.0))
    logger = TensorBoardLogger(tmp_path, model, torch.zeros(4, 16), every=0)
    for step, (s, c) in enumerate([(9.0, 1e-3), (7.0, 2e-3)], start=1):
        logger.on_step({"step": step, "loss": 1.0, "statistic": s, "coefficient": c})
    logger.close()
    acc = ea.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/statistic")] == [(1, 9.0), (2, 7.0)]
    assert [e.value for e in acc.Scalars("train/coefficient")] == pytest.approx([1e-3, 2e-3])


# ------------------------------------------------------------------------------- L0 (JumpReLU)


def test_l0_value_and_threshold_gradient_match_the_formula():
    """L0: λ·mean over samples of #(a > θ); ∂/∂θ_j = −λ/(ε N) · #{i: |a_ij − θ_j| < ε/2} (the
    rectangle-kernel pseudo-derivative of Rajamanoharan et al. 2024, eq. 11), in NumPy."""
    from actsparse import L0

    g = torch.Generator().manual_seed(0)
    a = torch.rand(50, 4, generator=g, dtype=torch.float64)
    theta = torch.tensor([0.2, 0.5, 0.7, 0.9], dtype=torch.float64, requires_grad=True)
    p = L0(0.3, threshold=theta, bandwidth=0.1)
    v = p(a)
    an, tn = a.numpy(), theta.detach().numpy()
    assert float(v) == pytest.approx(0.3 * (an > tn).sum(1).mean(), rel=1e-12)
    (gt,) = torch.autograd.grad(v, theta)
    np.testing.assert_allclose(gt.numpy(), -0.3 / (0.1 * 50) * (np.abs(an - tn) < 0.05).sum(0), rtol=1e-12)


def test_sae_binds_l0_to_its_jumprelu_and_reads_pre_activations():
    """An unbound L0 in a JumpReLU SAE takes the JumpReLU's current θ (read at every forward, so a
    second backward works after θ moved) and trains θ only: no gradient reaches the encoder from it."""
    from actsparse import L0
    from actsparse.models import JumpReLU

    torch.manual_seed(0)
    act = JumpReLU(16, init_threshold=0.1, bandwidth=0.5)
    model = SparseAutoencoder(8, 16, act, decoder="linear", penalty=L0(1.0).toward(l0=3.0), recon_loss="mse")
    assert model.penalty.inner.firing_threshold is not None and model.penalty.inner.bound
    x = torch.randn(32, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # the second step uses the moved θ
        opt.zero_grad()
        out = model(x)
        out.sparsity_loss.backward()
        assert model.W_enc.grad is None or float(model.W_enc.grad.abs().sum()) == 0.0
        assert float(act.threshold.grad.abs().sum()) > 0
        opt.step()
    with torch.no_grad():
        pre = model.encode_pre(x)
        value = model.eval()(x).sparsity_loss
    lam = float(model.penalty.coefficient)
    assert float(value) == pytest.approx(lam * float((pre > act.threshold).double().sum(1).mean()), rel=1e-5)


def test_stacked_pretraining_holds_the_target_on_the_code_only(tmp_path):
    """--model stacked --pretrain --target-l0: the layers before the code pretrain with the fixed
    --weight (a target of 3 active units cannot even be asked of the 2-unit first layer); the code
    layer and the fine-tuning hold the target."""
    from actsparse.cli import main

    args = ["train", "--data", "synthetic", "--samples", "600", "--model", "stacked", "--sizes", "2", "6",
            "--activation", "relu", "--decoder", "linear", "--penalty", "l1", "--weight", "1e-3",
            "--target-l0", "3", "--optimizer", "adam", "--epochs", "2", "--pretrain", "--out", str(tmp_path),
            "--name", "s", "--no-progress", "--no-plots", "--threads", "1"]
    assert main(args) == 0
    log, metrics = _metrics(tmp_path / "s")
    assert "coefficient" in metrics and all("coefficient" in r for r in log)
