"""The classic-vs-SciPy benchmark runs, and the L-BFGS path it measures keeps its promises:
one evaluation per iteration (not two), and the same result as evaluating every time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from actsparse.config import TrainConfig
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


def test_reusing_the_accepted_evaluation_changes_no_bit_of_the_run():
    """The reference: torch.optim.LBFGS stepped with a closure that always evaluates."""
    cfg, x = _classic(iterations=15)
    res = train(cfg, x)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    x = x[torch.randperm(x.shape[0], generator=g)]  # train() shuffles before splitting off validation (none here)
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
    for (name, a), b in zip(model.state_dict().items(), res.model.state_dict().values()):
        if name != "samples_since_fired":  # counts evaluations, which is what changed
            assert torch.equal(a, b), name
