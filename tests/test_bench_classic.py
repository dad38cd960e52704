"""The classic-vs-SciPy benchmark runs, and the L-BFGS path it measures keeps its promises:
one evaluation per iteration (not two), the compact direction equals the two-loop recursion, and
the cost matches torch.optim.LBFGS's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actsparse.config import TrainConfig
from actsparse.lbfgs import LBFGS, two_loop_direction
from actsparse.train import build_model, train

ROOT = Path(__file__).resolve().parents[1]


def _classic(n: int = 300, iterations: int = 20) -> tuple[TrainConfig, torch.Tensor]:
    cfg = TrainConfig(samples=n, iterations=iterations, plots=False, progress=False, validation=0.0)
    x = torch.rand(n, 16, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    return cfg, x


def test_lbfgs_evaluates_about_once_per_iteration():
    """torch's LBFGS re-evaluates, at the start of every step, the point its last line search
    accepted; the trainer reuses that evaluation (2 evaluations per iteration before)."""
    cfg, x = _classic()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, x.shape[1])
    evals = []
    model.register_forward_hook(lambda mod, inp, out: evals.append(mod.training) if mod.training else None)
    res = train(cfg, x, model=model)
    assert len(res.history) == cfg.iterations
    assert len(evals) <= 1.3 * cfg.iterations, len(evals)
    assert res.history[-1]["loss"] < 0.5 * res.history[0]["loss"]


def test_bench_classic_scipy_smoke(tmp_path):
    out = tmp_path / "classic.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_classic_scipy.py"), "--smoke", "--rounds", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["numpy_vs_actsparse_cost_rel_diff"]["gradient"] < 1e-8
    assert abs(res["final_cost_rel_diff"]) < 0.05
    assert res["iterations"] == {"actsparse": 10, "scipy": 10}


def naive_two_loop(g, pairs, gamma):
    """Nocedal & Wright Alg. 7.4, written as the book has it; ``pairs`` oldest first."""
    q = g.clone()
    alphas = []
    for s, y in reversed(pairs):
        a = float(s.dot(q)) / float(y.dot(s))
        alphas.append(a)
        q -= a * y
    r = gamma * q
    for (s, y), a in zip(pairs, reversed(alphas)):
        b = float(y.dot(r)) / float(y.dot(s))
        r += (a - b) * s
    return -r


def test_compact_direction_equals_the_two_loop_recursion_in_any_slot_order():
    g0 = torch.Generator().manual_seed(0)
    n, m = 200, 12
    curvature = torch.linspace(0.5, 50, n, dtype=torch.float64)  # pairs of a convex quadratic
    pairs = [(s, curvature * s + 0.01 * torch.randn(n, generator=g0, dtype=torch.float64))
             for s in torch.randn(m, n, generator=g0, dtype=torch.float64)]
    g = torch.randn(n, generator=g0, dtype=torch.float64)
    gamma = float(pairs[-1][0].dot(pairs[-1][1]) / pairs[-1][1].dot(pairs[-1][1]))
    want = naive_two_loop(g, pairs, gamma)
    order = torch.randperm(m, generator=g0).tolist()  # slot of the i-th oldest pair
    s = torch.empty(m, n, dtype=torch.float64)
    y = torch.empty(m, n, dtype=torch.float64)
    for (si, yi), slot in zip(pairs, order):
        s[slot], y[slot] = si, yi
    got = two_loop_direction(g, s, y, s @ y.T, gamma, order)
    assert float((got - want).norm() / want.norm()) < 1e-12
    assert torch.equal(two_loop_direction(g, s[:0], y[:0], s[:0, :0], 1.0), -g)


def test_lbfgs_reaches_the_cost_of_torch_lbfgs():
    cfg, x = _classic(iterations=40)
    res = train(cfg, x)
    torch.manual_seed(cfg.seed)
    x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(cfg.seed))]
    model = build_model(cfg, x.shape[1])
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=1, max_eval=25, history_size=100,
                            line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)

    def closure():
        opt.zero_grad()
        loss = model(x).loss
        loss.backward()
        return loss

    for _ in range(cfg.iterations):
        opt.step(closure)
    ref = float(closure())
    assert abs(res.history[-1]["loss"] - ref) / ref < 0.02, (res.history[-1]["loss"], ref)


def test_lbfgs_refuses_a_foreign_state():
    opt = LBFGS([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="not from actsparse's L-BFGS"):
        opt.load_state_dict({"state": {}, "param_groups": []})


class _Output:
    """A closure's second value, as the trainer's model output: tracked to count how many live."""

    def __init__(self, loss: float, params: torch.Tensor):
        self.loss, self.params = loss, params


def test_the_line_search_holds_one_trial_output_and_returns_the_accepted_points():
    """Each output the closure returns stands for a full batch's reconstruction and code; the step
    keeps the accepted trial's, not every trial's (which held one per evaluation of the search at once).
    Rosenbrock from (-1.2, 1) takes several trials per search (N&W's test problem, §9.4). An output
    holds no reference cycle, so it is freed when its last reference goes (no ``gc.collect`` needed)."""
    import weakref

    x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    opt = LBFGS([x], history=5)
    live: weakref.WeakSet = weakref.WeakSet()
    alive_at_call, evals_per_step = [], []

    def closure():
        alive_at_call.append(len(live))
        loss = 100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[0]) ** 2
        loss.backward()
        out = _Output(float(loss), x.detach().clone())
        live.add(out)
        return loss, out

    for _ in range(30):
        before = opt.evaluations
        opt.step(closure)
        evals_per_step.append(opt.evaluations - before)
        assert opt.aux.loss == opt.f and torch.equal(opt.aux.params, x.detach())  # the accepted point's output
    assert max(evals_per_step) >= 3, evals_per_step  # searches of several trials happened
    assert max(alive_at_call) <= 1, alive_at_call  # at most the kept trial's, during any evaluation
    assert opt.f < 1e-3  # and the minimiser still converges toward (1, 1)


def _quantised_quadratic(x: torch.Tensor, quantum: float = 1e-4):
    """½ Σ aᵢ(xᵢ − 1)² (aᵢ from 1 to 100) whose *value* is rounded to ``quantum`` while its gradient
    is the exact one: a loss whose values run out of precision near the minimum, as float32 ones do."""
    a = torch.linspace(1.0, 100.0, x.numel(), dtype=x.dtype)
    v = 0.5 * (a * (x - 1) ** 2).sum()
    return v + (torch.round(v / quantum) * quantum - v).detach()


def test_lbfgs_restarts_then_stops_when_no_step_lowers_the_loss():
    """A search that finds no decrease returns the step 0: before, the memory stayed as it was, so
    every later iteration searched the same direction from the same point again (25 evaluations of
    nothing each); now the memory is emptied (a restart along -gamma grad f), and if that finds no
    decrease either, the optimiser has stalled: later steps evaluate nothing."""
    x = torch.zeros(40, dtype=torch.float64, requires_grad=True)
    opt = LBFGS([x], history=10)
    restarts, evals_after_stall = 0, []

    def closure():
        loss = _quantised_quadratic(x)
        loss.backward()
        return loss, x.detach().clone()  # the output: the point it was evaluated at

    for _ in range(200):
        had_memory, before = bool(opt.order), opt.evaluations
        opt.step(closure)
        restarts += had_memory and not opt.order and not opt.stalled
        if opt.stalled and opt.stalled_at != opt.iterations:
            evals_after_stall.append(opt.evaluations - before)
    assert opt.stalled and opt.stalled_at is not None and opt.stalled_at < 200
    assert restarts >= 1
    assert evals_after_stall and set(evals_after_stall) == {0}
    assert opt.evaluations < 3 * opt.stalled_at  # not 25 an iteration from the first search without decrease
    a = torch.linspace(1.0, 100.0, 40, dtype=torch.float64)
    assert float(0.5 * (a * (x.detach() - 1) ** 2).sum()) < 1e-3  # the minimum, to about the values' quantum
    # the state carries it: a reloaded optimiser evaluates nothing either, until the objective changes
    again = LBFGS([x], history=10)
    again.load_state_dict(opt.state_dict())
    again.step(closure)  # one evaluation, for the output at the point (a reloaded state has none)
    assert again.evaluations == opt.evaluations + 1 and again.stalled_at == opt.stalled_at
    assert torch.equal(again.aux, x.detach()) and again.f == opt.f
    again.step(closure)
    assert again.evaluations == opt.evaluations + 1  # and then nothing
    again.objective_changed()
    again.step(closure)
    assert again.evaluations > opt.evaluations + 1  # a changed objective is evaluated and searched again


def test_a_stalled_run_ends_where_it_stalled():
    """The trainer's later L-BFGS steps after a stall change nothing (the weights of a run cut at the
    stall are the same to the bit), and the metrics say where it stalled."""
    cfg, x = _classic(n=300, iterations=600)  # stalls at 168 when measured, on one thread or two
    res = train(cfg, x)
    at = res.metrics.get("lbfgs_stalled_at")
    assert at is not None and at < 600, res.metrics
    cut = train(TrainConfig(**(cfg.__dict__ | {"iterations": at})), x)
    assert "lbfgs_stalled_at" in cut.metrics
    for (k, p), q in zip(res.model.state_dict().items(), cut.model.state_dict().values()):
        assert torch.equal(p, q), k


def test_the_cli_says_where_l_bfgs_stalled(tmp_path, capsys):
    from actsparse.cli import main

    assert main(["train", "--samples", "300", "--iterations", "600", "--no-plots", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "classic" / "metrics.json").read_text())
    assert 0 < m["lbfgs_stalled_at"] < 600  # 367 when measured
    assert f"L-BFGS stopped improving at step {m['lbfgs_stalled_at']}:" in capsys.readouterr().out


def test_a_stalled_run_resumes_to_the_weights_of_one_run(tmp_path, capsys):
    """A checkpoint written after the stall holds a stalled optimiser: the resumed run takes its
    later steps without moving (it crashed before: the reloaded optimiser had no output to log)."""
    from actsparse.cli import main

    common = ["--samples", "300", "--no-plots", "--no-progress", "--out", str(tmp_path)]
    assert main(["train", *common, "--iterations", "400", "--name", "cut"]) == 0
    assert main(["train", "--resume", "--iterations", "600", "--no-plots", "--no-progress", "--out", str(tmp_path),
                 "--name", "cut"]) == 0
    assert main(["train", *common, "--iterations", "600", "--name", "whole"]) == 0
    from safetensors.torch import load_file

    cut, whole = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("cut", "whole"))
    assert cut.keys() == whole.keys() and all(torch.equal(cut[k], whole[k]) for k in cut)
    m = {n: json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("cut", "whole")}
    assert m["cut"]["lbfgs_stalled_at"] == m["whole"]["lbfgs_stalled_at"] < 400
    assert m["cut"]["steps"] == m["whole"]["steps"] == 600
