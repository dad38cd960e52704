"""Target controllers: does a stated sparsity come out, and is it as good as a sweep?

Every figure is measured at the end of training, in eval mode, on held-out data, over seeds:

* ``relu_l1``: a ReLU SAE + L1 (32 → 128, linear decoder with unit-norm rows, Adam, lr 1e-3,
  batch 256, 40 epochs (2,560 steps) of 16,384 rows of ``make_synthetic(d=32, features=128, active=8)``) with
  ``L1(1e-3).toward(l0=...)``, targets 4, 8, 16, 32; L0 on 4,096 held-out rows.
* ``sweep``: the same SAE with a fixed λ, 10 values log-spaced over 2e-3..6e-2; its (L0, FVU) curve on
  the held-out rows, against which each controlled run's FVU is compared at its own L0
  (interpolated in log L0 along the sweep, seed by seed).
* ``jumprelu``: a JumpReLU SAE (same data and training; the JumpReLU's defaults θ₀ = 0.01, ε = 0.05) with the
  paper's L0 loss, ``L0(1e-3).toward(l0=...)``, targets 8 and 32.
* ``classic``: ``actsparse train --target-mean 0.01`` (CS294A: sigmoid, Bernoulli KL, L-BFGS);
  ρ̂ on the 1,000 held-out validation rows and on 50,000 fresh patches (the same pipeline with
  another seed); the filters' localisation index.
* ``seed001``: the user's 20-80-40-4-40-80-20 ReLU network (examples/seed001_frequency_kl.py),
  each bottleneck unit held at firing rate 0.2 (``rate=0.2, per_unit=True``) from step 0, with no
  warm-up, by ``FrequencyKL`` with its default bandwidth, with ``bandwidth="auto"``, and by L1 of
  the ReLU's output.
* ``conv``: a small conv net classifying scikit-learn's digits, L1 on its 8 conv channels held at
  firing rate 0.1 per channel (``unit_dim=1``).

Run: ``python bench/bench_target_control.py [--seeds 0 1 2] [--parts relu_l1 classic seed001 conv]``
(about 9 minutes on 2 cores);
``--smoke`` runs a tiny version. Writes ``bench/results/target_control.json`` and the figure
``--png`` (default ``docs/img/target-control-sweep.png``).
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_args, write_result  # noqa: E402

import actsparse  # noqa: E402
from actsparse.config import TrainConfig  # noqa: E402
from actsparse.control import TargetNotReachedWarning  # noqa: E402
from actsparse.data import make_synthetic  # noqa: E402
from actsparse.filters_quality import filter_summary  # noqa: E402
from actsparse.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Fresh patches the classic run's ρ̂ is also measured on (50,000: a standard error near 1 %).
FRESH = 50_000
SWEEP = [float(v) for v in np.logspace(math.log10(2e-3), math.log10(6e-2), 10)]


# ------------------------------------------------------------------------------ ReLU SAE + L1
def sae_data(seed: int, n: int, held_out: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    x = make_synthetic(n + held_out, 32, 128, 8.0, seed=seed).x
    return x[:n], x[n:]


def eval_sae(model, x: torch.Tensor) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        out = model(x)
    code, x_hat = out.code, out.reconstruction
    fvu = float((x - x_hat).square().sum() / (x - x.mean(0)).square().sum())
    return {"l0": float((code > 0).double().sum(1).mean()), "fvu": fvu}


def train_sae(model, x: torch.Tensor, epochs: int, seed: int) -> None:
    """Adam, lr 1e-3, ``epochs`` shuffled passes in batches of 256 (the order drawn from ``seed``)."""
    from actsparse.train import parameter_groups, train_step

    opt = torch.optim.Adam(parameter_groups(model, 1e-3))  # a JumpReLU's θ at its own (10×) rate
    g = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetNotReachedWarning)
        for _ in range(epochs):
            for idx in torch.randperm(x.shape[0], generator=g).split(256):
                train_step(model, opt, x[idx])


def sae_run(seed: int, n: int, epochs: int, weight: float, target_l0: float | None) -> dict[str, float]:
    """The field's ReLU + L1 SAE (unit-norm decoder rows, so L1 cannot be dodged by shrinking the
    code and growing the decoder; Gao et al.'s tied orthogonal init), Adam, lr 1e-3, batch 256."""
    from actsparse.models import SparseAutoencoder

    x, held = sae_data(seed, n)
    penalty = actsparse.L1(weight)
    if target_l0 is not None:
        penalty = penalty.toward(l0=target_l0, rate_of_change=0.02)
    torch.manual_seed(seed)
    model = SparseAutoencoder(32, 128, "relu", decoder="linear", penalty=penalty, recon_loss="mse",
                              unit_norm_decoder=True, init="orthogonal_tied")
    train_sae(model, x, epochs, seed)
    out = eval_sae(model, held)
    if target_l0 is not None:
        out["coefficient"] = float(penalty.coefficient)
    return out


def jumprelu_run(seed: int, n: int, epochs: int, target_l0: float) -> dict[str, float]:
    """A JumpReLU SAE (32 → 128, unit-norm decoder, the JumpReLU's defaults: θ₀ = 0.01, ε = 0.05,
    θ at 10× the learning rate) with the paper's L0 loss, ``L0(1e-3).toward(l0=target)``."""
    from actsparse.models import JumpReLU, SparseAutoencoder

    x, held = sae_data(seed, n)
    penalty = actsparse.L0(1e-3).toward(l0=target_l0, rate_of_change=0.02)
    torch.manual_seed(seed)
    model = SparseAutoencoder(32, 128, JumpReLU(128), decoder="linear",
                              penalty=penalty, recon_loss="mse", unit_norm_decoder=True, init="orthogonal_tied")
    train_sae(model, x, epochs, seed)
    return {**eval_sae(model, held), "coefficient": float(penalty.coefficient),
            "threshold_mean": float(model.activation.threshold.detach().mean())}


def interpolate_fvu(sweep: list[dict[str, float]], l0: float) -> float | None:
    """The sweep's FVU at ``l0``, linear in log L0 between its two neighbours (None outside it)."""
    pts = sorted((math.log(p["l0"]), p["fvu"]) for p in sweep if p["l0"] > 0)
    xs = [p[0] for p in pts]
    v = math.log(l0)
    if not xs or v < xs[0] or v > xs[-1]:
        return None
    return float(np.interp(v, xs, [p[1] for p in pts]))


# ------------------------------------------------------------------------------ the classic run
def classic_run(seed: int, iterations: int) -> dict[str, float]:
    from actsparse.data import load_data
    from actsparse.evaluation import split_indices

    cfg = TrainConfig(target_mean=0.01, seed=seed, iterations=iterations, plots=False, progress=False,
                      checkpoint_every=0)
    x = load_data(cfg).x
    res = train(cfg, x)
    val_idx, _ = split_indices(x.shape[0], cfg.validation, torch.Generator().manual_seed(seed))
    model = res.model.eval()
    from actsparse.data.patches import natural_patches

    fresh = torch.tensor(natural_patches(FRESH, seed=seed + 1000), dtype=torch.float32)  # same pipeline, new draw
    with torch.no_grad():
        rho = float(model(x[val_idx]).code.double().mean())
        rho_fresh = float(model(fresh).code.double().mean())
    return {"mean_activation_val": rho, "mean_activation_fresh": rho_fresh,
            "mean_activation_train": float(res.metrics["mean_activation"]),
            "coefficient": float(res.metrics["coefficient"]), "fvu": float(res.metrics["fvu"]),
            **filter_summary(model.W_enc, (8, 8))}


# ------------------------------------------------------------------------------ seed 001
def seed001_module():
    spec = importlib.util.spec_from_file_location("seed001", ROOT / "examples" / "seed001_frequency_kl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seed001_run(seed: int, penalty: str, steps: int) -> dict[str, Any]:
    """The example's own training (its data, model, Adam and batches), with the penalty on from step 0."""
    ex = seed001_module()
    if penalty == "frequency_kl":  # FrequencyKL's own bandwidth (0.1): nothing tuned
        p = actsparse.FrequencyKL(0.2, weight=0.1).toward(rate=0.2, per_unit=True, rate_of_change=0.02)
    elif penalty == "frequency_kl_auto":  # one window per unit from each batch's quantile, β started low
        p = actsparse.FrequencyKL(0.2, weight=1e-3, bandwidth="auto").toward(rate=0.2, per_unit=True,
                                                                            rate_of_change=0.02)
    else:  # L1 of relu(z): units above the rate are pushed down, the others are left alone
        p = actsparse.L1(1e-3).of(torch.relu).toward(rate=0.2, per_unit=True, rate_of_change=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetNotReachedWarning)
        r = ex.train(seed, True, steps, penalty=p, warmup=0)
    rates = torch.tensor(r["unit_fractions"], dtype=torch.float64)
    return {"rates": rates.tolist(), "max_error": float((rates - 0.2).abs().max()), "mse": r["mse"],
            "mean_mse": r["mse_of_mean"]}


# ------------------------------------------------------------------------------ conv net
class SmallConvNet(nn.Module):
    """Digits classifier: conv 1→8 (3×3, padding 1), ReLU, 2×2 max-pool, linear 8·4·4 → 10."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.head(F.max_pool2d(self.act(self.conv(x)), 2).flatten(1))


def conv_run(seed: int, steps: int) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, tr = perm[:400], perm[400:]
    torch.manual_seed(seed)
    model = SmallConvNet()
    reg = actsparse.attach(model, {"act": actsparse.L1(1e-4, unit_dim=1).toward(rate=0.1, per_unit=True,
                                                                                 rate_of_change=0.02)})
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = tr[torch.randint(0, len(tr), (128,), generator=g)]
        loss = F.cross_entropy(model(x[idx]), y[idx]) + reg.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acts = model.act(model.conv(x[test]))
        acc = float((model(x[test]).argmax(1) == y[test]).double().mean())
    rates = (acts > 0).double().mean(dim=(0, 2, 3))
    return {"rates": rates.tolist(), "max_error": float((rates - 0.1).abs().max()), "accuracy": acc}


# ------------------------------------------------------------------------------ figure
def sweep_figure(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, pts in enumerate(results["sweep"].values()):
        pts = sorted(pts, key=lambda p: p["l0"])
        ax.plot([p["l0"] for p in pts], [p["fvu"] for p in pts], "o-", color="tab:blue", ms=4, lw=1, alpha=0.8,
                label=f"fixed λ, {len(SWEEP)} runs per seed (2e-3..6e-2)" if i == 0 else None)
    first = True
    for target, per_seed in results["relu_l1"].items():
        for r in per_seed.values():
            ax.plot([r["l0"]], [r["fvu"]], "*", color="tab:red", ms=12, mec="black",
                    label="controlled: one run per target" if first else None)
            first = False
        ax.axvline(float(target), color="tab:red", lw=0.6, ls=":")
    ax.set_xscale("log")
    ticks = [2, 3, 4, 6, 8, 12, 16, 24, 32]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("L0 (active units per sample, held-out rows, eval mode)")
    ax.set_ylabel("FVU (held-out rows)")
    ax.set_title("ReLU SAE + L1: a target L0 in one run vs a sweep of λ\n(dotted: the targets 4, 8, 16, 32)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0],
                      seeds={"type": int, "nargs": "+", "default": [0, 1, 2], "help": "seeds (default 0 1 2)"},
                      png={"type": str, "default": str(ROOT / "docs" / "img" / "target-control-sweep.png")},
                      parts={"nargs": "+", "default": ["relu_l1", "jumprelu", "classic", "seed001", "conv"],
                             "help": "which parts to run (default: all)"})
    parts = set(args.parts)
    seeds = args.seeds[:1] if args.smoke else args.seeds
    n, epochs = (2048, 2) if args.smoke else (16384, 40)
    targets = [8.0] if args.smoke else [4.0, 8.0, 16.0, 32.0]
    sweep_weights = SWEEP[::4] if args.smoke else SWEEP
    iterations, steps001, steps_conv = (20, 100, 50) if args.smoke else (400, 3000, 2000)
    out: dict[str, Any] = {"relu_l1": {}, "sweep": {}, "classic": {}, "seed001": {}, "conv": {}}

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    for seed in seeds if "relu_l1" in parts else ():
        out["sweep"][str(seed)] = pts = []
        for w in sweep_weights:
            pts.append({"weight": w, **sae_run(seed, n, epochs, w, None)})
            log(f"sweep seed {seed} λ {w:.3g}: L0 {pts[-1]['l0']:.2f}, FVU {pts[-1]['fvu']:.4f}")
    for t in targets if "relu_l1" in parts else ():
        out["relu_l1"][f"{t:g}"] = per = {}
        for seed in seeds:
            r = sae_run(seed, n, epochs, 1e-3, t)
            r["sweep_fvu_at_l0"] = interpolate_fvu(out["sweep"][str(seed)], r["l0"])
            per[str(seed)] = r
            log(f"target L0 {t:g} seed {seed}: L0 {r['l0']:.3f} ({(r['l0'] / t - 1) * 100:+.1f} %), FVU {r['fvu']:.4f}"
                f" vs sweep {r['sweep_fvu_at_l0']}, λ {r['coefficient']:.4g}")
    out["jumprelu"] = {}
    for t in ([8.0] if args.smoke else [8.0, 32.0]) if "jumprelu" in parts else ():
        out["jumprelu"][f"{t:g}"] = per = {}
        for seed in seeds:
            per[str(seed)] = r = jumprelu_run(seed, n, epochs, t)
            log(f"jumprelu target L0 {t:g} seed {seed}: L0 {r['l0']:.3f} ({(r['l0'] / t - 1) * 100:+.1f} %), "
                f"FVU {r['fvu']:.4f}, λ {r['coefficient']:.4g}, mean θ {r['threshold_mean']:.3g}")
    for seed in seeds if "classic" in parts else ():
        out["classic"][str(seed)] = r = classic_run(seed, iterations)
        log(f"classic seed {seed}: ρ̂ validation {r['mean_activation_val']:.5f}, fresh patches "
            f"{r['mean_activation_fresh']:.5f}, training "
            f"{r['mean_activation_train']:.5f}, β {r['coefficient']:.3g}, localisation median "
            f"{r['localisation_median']:.3f}, {r['localised']}/25 localised, FVU {r['fvu']:.3f}")
    for penalty in ("frequency_kl", "frequency_kl_auto", "l1") if "seed001" in parts else ():
        out["seed001"][penalty] = per = {}
        for seed in seeds:
            per[str(seed)] = r = seed001_run(seed, penalty, steps001)
            log(f"seed001 {penalty} seed {seed}: rates {[round(v, 3) for v in r['rates']]}, "
                f"max |rate − 0.2| {r['max_error']:.3f}, MSE {r['mse']:.4f} (mean predictor {r['mean_mse']:.4f})")
    for seed in seeds if "conv" in parts else ():
        out["conv"][str(seed)] = r = conv_run(seed, steps_conv)
        log(f"conv seed {seed}: channel rates {[round(v, 3) for v in r['rates']]}, max |rate − 0.1| "
            f"{r['max_error']:.3f}, accuracy {r['accuracy']:.3f}")

    log("\n| target L0 | L0 per seed (held-out, eval) | worst error | FVU | sweep FVU at that L0 | FVU vs sweep |")
    log("|---|---|---|---|---|---|")
    for t, per in out["relu_l1"].items():
        l0s = [r["l0"] for r in per.values()]
        worst = max(abs(v / float(t) - 1) for v in l0s)
        rel = [r["fvu"] / r["sweep_fvu_at_l0"] - 1 for r in per.values() if r["sweep_fvu_at_l0"]]
        sweep = [r["sweep_fvu_at_l0"] for r in per.values()]
        shown = ", ".join("outside" if v is None else f"{v:.4f}" for v in sweep)
        log(f"| {t} | {', '.join(f'{v:.2f}' for v in l0s)} | {worst * 100:.1f} % | "
            f"{statistics.median(r['fvu'] for r in per.values()):.4f} | {shown} | "
            f"{', '.join(f'{v * 100:+.1f} %' for v in rel)} |")
    if not args.smoke and args.png and out["relu_l1"]:
        sweep_figure(out, Path(args.png))
        log(f"figure: {args.png}")
    for per in out["relu_l1"].values():  # the trajectories are long: keep them out of the JSON
        for r in per.values():
            r.pop("trajectory", None)
    write_result("target_control", {"seeds": seeds, "epochs": epochs, "samples": n, "sweep_weights": sweep_weights,
                                     **out}, args)


if __name__ == "__main__":
    main()
