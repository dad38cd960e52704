"""Classic exercise vs SciPy: the UFLDL 64→25→64 sparse autoencoder, full-batch L-BFGS.

actsparse side: what a user runs, ``actsparse.train.train(cfg, x)`` with the default
:class:`~actsparse.config.TrainConfig` (the CS294A exercise: 10,000 8×8 patches, 25 sigmoid
hidden units, ρ = 0.01, λ = 1e-4, β = 3, 400 L-BFGS iterations, history 100), no run folder, no
plots, no progress bar, no validation split, on the float32 patches ``actsparse train`` loads.

Reference: the same cost written here in vectorised NumPy float64 from the CS294A notes (Ng,
"Sparse autoencoder", p.14–15), minimised by ``scipy.optimize.minimize(method="L-BFGS-B")`` from
the same initial parameters, with the same number of corrections (``maxcor`` = actsparse's
``history_size`` = 100, minFunc's default; SciPy's own default is 10, see ``--maxcor``).

Reported: the time ratio actsparse / SciPy (median over interleaved rounds, min..max), the
final cost of each (both evaluated by the NumPy cost in float64 on the same data) and their
relative difference, and the iterations and function evaluations of each.

Threads: by default each side runs at its fastest setting on this machine (torch: every core;
NumPy's BLAS: one thread); ``--threads 1 --numpy-threads 1`` is the one-thread-each comparison.

Run: ``.venv/bin/python bench/bench_classic_scipy.py [--threads N] [--numpy-threads N] [--rounds 5]``;
``--smoke`` (500 patches, 10 iterations) finishes in seconds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, matmul_flops, parse_args, ratio, summary, time_block, write_result  # noqa: E402

from actsparse.config import TrainConfig  # noqa: E402
from actsparse.data import load_data  # noqa: E402
from actsparse.train import build_model, train  # noqa: E402

Params = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# ------------------------------------------------------------------------------------ reference


def unpack(theta: np.ndarray, d: int, h: int) -> Params:
    """Views of the flat parameter vector ``(h·d + h + d·h + d,)``: W1 ``(h, d)``, b1 ``(h,)``,
    W2 ``(d, h)``, b2 ``(d,)`` (actsparse's W_enc, b_enc, decoder_weight, b_dec)."""
    i = 0
    out = []
    for shape in ((h, d), (h,), (d, h), (d,)):
        n = int(np.prod(shape))
        out.append(theta[i:i + n].reshape(shape))
        i += n
    return tuple(out)  # type: ignore[return-value]


def sae_cost(theta: np.ndarray, x: np.ndarray, h: int, lam: float, beta: float,
             rho: float) -> tuple[float, np.ndarray]:
    """Cost and gradient of the CS294A sparse autoencoder, float64, samples as rows.

    J = (1/m) Σ_i ½‖x̂_i − x_i‖² + (λ/2)(‖W1‖² + ‖W2‖²) + β Σ_j KL(ρ‖ρ̂_j)  (Ng, CS294A notes, p.14–15),
    a2 = σ(W1 x + b1), x̂ = a3 = σ(W2 a2 + b2), ρ̂_j = (1/m) Σ_i a2_ij.

    Backpropagation (notes p.8 and p.15, vectorised over the m rows):
        δ3 = (a3 − x) ⊙ a3 ⊙ (1 − a3)                               ``(m, d)``
        δ2 = (δ3 W2 + β(−ρ/ρ̂ + (1−ρ)/(1−ρ̂))) ⊙ a2 ⊙ (1 − a2)         ``(m, h)``
        ∇W2 = δ3ᵀ a2 / m + λ W2,  ∇b2 = Σ_i δ3 / m,  ∇W1 = δ2ᵀ x / m + λ W1,  ∇b1 = Σ_i δ2 / m.

    Args:
        theta: flat parameters (see :func:`unpack`).
        x: data ``(m, d)`` float64, C-contiguous.
        h: hidden units; lam: λ; beta: β; rho: ρ.

    Returns:
        ``(J, grad)`` with ``grad`` shaped like ``theta``.
    """
    m, d = x.shape
    w1, b1, w2, b2 = unpack(theta, d, h)
    # in place where it saves a pass or an allocation: a fair reference is a fast one
    a2 = x @ w1.T
    a2 += b1
    expit(a2, out=a2)                             # (m, h)
    a3 = a2 @ w2.T
    a3 += b2
    expit(a3, out=a3)                             # (m, d)
    diff = a3 - x
    rho_hat = a2.mean(axis=0)                     # (h,)
    kl = rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat))
    cost = (0.5 * np.vdot(diff, diff) / m + 0.5 * lam * (np.vdot(w1, w1) + np.vdot(w2, w2))
            + beta * kl.sum())
    delta3 = diff * a3
    delta3 *= 1.0 - a3                            # (m, d)
    sparsity = beta * (-rho / rho_hat + (1 - rho) / (1 - rho_hat))  # (h,): not divided by m (notes p.15)
    delta2 = delta3 @ w2
    delta2 += sparsity
    delta2 *= a2 * (1.0 - a2)                     # (m, h)
    grad = np.concatenate([
        (delta2.T @ x / m + lam * w1).ravel(),
        delta2.sum(axis=0) / m,
        (delta3.T @ a2 / m + lam * w2).ravel(),
        delta3.sum(axis=0) / m,
    ])
    return float(cost), grad


def model_params(model: torch.nn.Module) -> list[torch.Tensor]:
    """W1 = ``W_enc`` ``(h, d)``, b1 = ``b_enc``, W2 = ``decoder_weight`` ``(d, h)`` (the decoder
    matrix, whatever layout the model stores it in), b2 = ``b_dec``."""
    return [model.W_enc, model.b_enc, model.decoder_weight, model.b_dec]


def flat_params(model: torch.nn.Module) -> np.ndarray:
    """actsparse's parameters W1, b1, W2, b2 as one float64 vector (see :func:`unpack`)."""
    return np.concatenate([p.detach().double().reshape(-1).numpy() for p in model_params(model)])


def check_same_cost(cfg: TrainConfig, x: torch.Tensor, theta: np.ndarray) -> dict[str, float]:
    """The NumPy cost and gradient agree with actsparse's model (float64, autograd) at ``theta``:
    the two sides minimise the same function. Returns the relative differences."""
    model = build_model(cfg, x.shape[1]).double()
    d, h = x.shape[1], cfg.hidden
    with torch.no_grad():
        for p, v in zip(model_params(model), unpack(theta, d, h)):
            p.copy_(torch.from_numpy(v))
    loss = model(x.double()).loss
    loss.backward()
    g_dec = model.W_dec.grad
    g_dec = g_dec if g_dec.shape == (d, h) else g_dec.t()  # as the (d_in, d_hidden) decoder matrix
    g_t = np.concatenate([g.reshape(-1).numpy() for g in (model.W_enc.grad, model.b_enc.grad, g_dec,
                                                          model.b_dec.grad)])
    j_np, g_np = sae_cost(theta, x.double().numpy(), h, cfg.weight_decay, cfg.weight, cfg.target)
    rel_j = abs(j_np - float(loss.detach())) / abs(j_np)
    rel_g = float(np.linalg.norm(g_np - g_t) / np.linalg.norm(g_np))
    if rel_j > 1e-10 or rel_g > 1e-8:
        raise AssertionError(f"NumPy and actsparse costs differ: cost {rel_j:.2e}, gradient {rel_g:.2e}")
    return {"cost": rel_j, "gradient": rel_g}


# ------------------------------------------------------------------------------------ main


def main() -> None:
    args = parse_args(__doc__.splitlines()[0],
                      samples=dict(type=int, default=None, help="patches (default 10,000; smoke 500)"),
                      iterations=dict(type=int, default=None, help="L-BFGS iterations (default 400; smoke 10)"),
                      maxcor=dict(type=int, default=100, help="SciPy's maxcor (actsparse's history_size is 100)"),
                      numpy_threads=dict(type=int, default=None,
                                         help="NumPy's BLAS threads (default 1, its fastest here)"))
    samples = args.samples or (500 if args.smoke else 10_000)
    iterations = args.iterations or (10 if args.smoke else 400)
    # Each side at its fastest setting on this 2-core machine by default: torch with every core
    # (1.7 s vs 2.7 s with one thread), NumPy with one BLAS thread (its 2-thread OpenBLAS is 2.4x
    # slower on these skinny products: a SciPy run took 16.5 s instead of 6.9 s, measured on a
    # quiet machine). --threads 1 --numpy-threads 1 gives the one-thread-each comparison.
    from threadpoolctl import threadpool_limits

    numpy_threads = args.numpy_threads or 1
    torch_threads = torch.get_num_threads()
    threadpool_limits(numpy_threads, user_api="blas")
    torch.set_num_threads(torch_threads)  # a limit on the BLAS pools must not reach torch's own pool
    cfg = TrainConfig(samples=samples, iterations=iterations, plots=False, progress=False, validation=0.0)
    x = load_data(cfg).x                          # what `actsparse train` trains on: float32 (n, 64)
    x64 = np.ascontiguousarray(x.double().numpy())
    d, h = x.shape[1], cfg.hidden

    # the initial parameters train() draws: seed, then build_model (UFLDL init, zero biases)
    torch.manual_seed(cfg.seed)
    theta0 = flat_params(build_model(cfg, d).to(x.dtype))
    same = check_same_cost(cfg, x, theta0)

    last: dict[str, Any] = {}
    # float32 matmuls may round differently from run to run (MKL picks kernels by alignment), and
    # L-BFGS amplifies that: the evaluations of each run are kept, not only the last run's
    nfev: dict[str, list[int]] = {"actsparse": [], "scipy": []}

    def run_actsparse() -> None:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, d).to(x.dtype)   # exactly the model train(cfg, x) would build
        evals = [0]
        # count the training forwards (evaluate() at the end runs in eval mode)
        model.register_forward_hook(lambda mod, inp, out: evals.__setitem__(0, evals[0] + mod.training))
        res = train(cfg, x, model=model)
        last["actsparse"] = {"theta": flat_params(res.model), "nit": len(res.history), "nfev": evals[0]}
        nfev["actsparse"].append(evals[0])

    def run_scipy() -> None:
        res = minimize(sae_cost, theta0, args=(x64, h, cfg.weight_decay, cfg.weight, cfg.target),
                       method="L-BFGS-B", jac=True,
                       options={"maxiter": iterations, "maxcor": args.maxcor, "maxfun": 100 * iterations,
                                "ftol": 0.0, "gtol": 0.0})
        last["scipy"] = {"theta": res.x, "nit": int(res.nit), "nfev": int(res.nfev), "message": str(res.message)}
        nfev["scipy"].append(int(res.nfev))

    # whole runs are long, so no extra warm-up and one run per round (min_seconds=0)
    times = interleaved({"actsparse": run_actsparse, "scipy": run_scipy}, rounds=args.rounds,
                        min_seconds=0.0, warmup=0)
    costs = {k: sae_cost(v["theta"], x64, h, cfg.weight_decay, cfg.weight, cfg.target)[0] for k, v in last.items()}
    j0 = sae_cost(theta0, x64, h, cfg.weight_decay, cfg.weight, cfg.target)[0]
    flops = 2 * 2048**3
    gflops = None if args.smoke else flops / time_block(matmul_flops(), 3) / 1e9
    payload: dict[str, Any] = {
        "_gflops": gflops,
        "problem": {"samples": samples, "d_in": d, "hidden": h, "iterations": iterations,
                    "rho": cfg.target, "lambda": cfg.weight_decay, "beta": cfg.weight,
                    "actsparse_dtype": str(x.dtype).removeprefix("torch."), "scipy_dtype": "float64",
                    "history": {"actsparse": 100, "scipy_maxcor": args.maxcor},
                    "threads": {"torch": torch.get_num_threads(), "numpy": numpy_threads}},
        "numpy_vs_actsparse_cost_rel_diff": same,
        "ratio_actsparse_over_scipy": ratio(times, "actsparse", "scipy"),
        "seconds": {k: summary(v) for k, v in times.items()},
        "initial_cost": j0,
        "final_cost": costs,
        "final_cost_rel_diff": (costs["actsparse"] - costs["scipy"]) / costs["scipy"],
        "iterations": {k: v["nit"] for k, v in last.items()},
        "function_evaluations": {k: v["nfev"] for k, v in last.items()},
        "function_evaluations_every_run": nfev,
        "evaluations_per_iteration": {k: v["nfev"] / max(v["nit"], 1) for k, v in last.items()},
        "scipy_message": last["scipy"]["message"],
        "target": "actsparse <= 0.3x SciPy's time, final cost within 1%",
    }
    write_result("classic_scipy", payload, args)
    r = payload["ratio_actsparse_over_scipy"]
    print(f"actsparse/SciPy time: {r['median']:.3f} ({r['min']:.3f}..{r['max']:.3f}); final cost "
          f"{costs['actsparse']:.6g} vs {costs['scipy']:.6g} ({100 * payload['final_cost_rel_diff']:+.2f} %)",
          file=sys.stderr)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
