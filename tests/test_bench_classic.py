"""The classic-vs-SciPy benchmark runs, and the L-BFGS path it measures keeps its promises:
one evaluation per iteration (not two), the compact direction equals the two-loop recursion,
torch.optim.LBFGS checkpoints still load, and the logged FVU is metrics.fvu."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from actsparse import metrics as M
from actsparse.config import TrainConfig
from actsparse.train import _LBFGS, _LoggedFVU, build_model, train

ROOT = Path(__file__).resolve().parents[1]


def _two_loop(g, dirs, stps, ro, h_diag):
    """torch.optim.LBFGS's two-loop recursion (Nocedal & Wright, Alg. 7.4), the reference."""
    q = g.neg()
    al = [None] * len(dirs)
    for i in range(len(dirs) - 1, -1, -1):
        al[i] = stps[i].dot(q) * ro[i]
        q.add_(dirs[i], alpha=-al[i])
    r = q * h_diag
    for i in range(len(dirs)):
        be = dirs[i].dot(r) * ro[i]
        r.add_(stps[i], alpha=al[i] - be)
    return r


def test_compact_direction_equals_two_loop():
    g0 = torch.Generator().manual_seed(0)
    n, m = 300, 20
    curvature = torch.linspace(1, 100, n, dtype=torch.float64)  # pairs of a convex quadratic
    stps = [torch.randn(n, generator=g0, dtype=torch.float64) for _ in range(m)]
    dirs = [curvature * s for s in stps]
    ro = [1.0 / y.dot(s) for y, s in zip(dirs, stps)]
    h_diag = dirs[-1].dot(stps[-1]) / dirs[-1].dot(dirs[-1])
    g = torch.randn(n, generator=g0, dtype=torch.float64)
    s_mat, y_mat = torch.stack(stps), torch.stack(dirs)
    got = _LBFGS._direction(g, s_mat, y_mat, s_mat @ y_mat.T, h_diag)
    want = _two_loop(g, dirs, stps, ro, h_diag)
    assert float((got - want).norm() / want.norm()) < 1e-12


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


def test_loads_a_torch_lbfgs_checkpoint_and_goes_on():
    """A run's optimiser state written by torch.optim.LBFGS (no "sy" matrix) resumes in _LBFGS."""
    cfg, x = _classic()
    torch.manual_seed(0)
    model = build_model(cfg, x.shape[1])

    def closure():
        opt.zero_grad()
        loss = model(x).loss
        loss.backward()
        return loss

    opt = torch.optim.LBFGS(model.parameters(), max_iter=1, history_size=100, line_search_fn="strong_wolfe",
                            tolerance_grad=0.0, tolerance_change=0.0)
    for _ in range(5):
        opt.step(closure)
    ours = _LBFGS(model.parameters(), max_iter=1, history_size=100, line_search_fn="strong_wolfe",
                  tolerance_grad=0.0, tolerance_change=0.0)
    ours.load_state_dict(opt.state_dict())
    before = float(closure())
    opt = ours  # the closure zeroes this optimiser's gradients from now on
    for _ in range(5):
        ours.step(closure)
    assert float(closure()) < before
    state = ours.state[ours._params[0]]
    assert state["sy"].shape == (9, 9) == (len(state["old_stps"]),) * 2  # 10 iterations, 9 pairs


def test_logged_fvu_is_metrics_fvu():
    g0 = torch.Generator().manual_seed(2)
    x = torch.rand(500, 12, generator=g0)
    fvu = _LoggedFVU()
    for _ in range(2):  # second call: the cached denominator
        x_hat = x + 0.1 * torch.randn(500, 12, generator=g0)
        assert abs(fvu(x, x_hat) / float(M.fvu(x, x_hat)) - 1) < 1e-12
    x.mul_(2)  # modified in place: the cache notices
    assert abs(fvu(x, x_hat) / float(M.fvu(x, x_hat)) - 1) < 1e-12


def test_bench_classic_scipy_smoke(tmp_path):
    out = tmp_path / "classic.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_classic_scipy.py"), "--smoke", "--rounds", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["numpy_vs_actsparse_cost_rel_diff"]["gradient"] < 1e-8
    assert abs(res["final_cost_rel_diff"]) < 0.05
    assert res["iterations"] == {"actsparse": 10, "scipy": 10}
