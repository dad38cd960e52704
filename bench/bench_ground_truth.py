"""Which SAE recovers known features best? Every architecture on the same ground-truth data.

Data: :class:`actsparse.data.ground_truth.GroundTruth` (``--data ground-truth``'s generator):
``--features`` true unit-norm features in ``--d`` dims, ``--true-l0`` active per sample with
Zipfian firing (exponent 0.5), ``--features``/32 parents with 4 children each (a child fires
only with its parent), correlated roots (ρ = 0.1), magnitudes |N(1, 0.15²)|. Every SAE sees the
same ``--samples`` training samples (one epoch), in the same order, with the same width
``--width``, batch 512 and Adam at lr 1e-3; each is scored on 20,000 fresh samples (another seed)
in eval mode:

* **MCC**: mean |cos| of a one-to-one (Hungarian) matching of decoder atoms to true features;
* **F1**: each latent as a detector of its closest true feature (SynthSAEBench's rule);
* **VE**: variance explained; **L0**; **dead** latents (never fire on the 20,000 samples).

Architectures, at matched L0 (the true L0, ``--true-l0``): the top-k family holds k itself; the
penalty SAEs hold it with the target controller (``--target-l0``: one run, no sweep):

* ``relu_l1``: ReLU + L1 on the decoder-norm-weighted code (the ``--recipe sae`` ReLU SAE);
* ``p_anneal``: the same with Lp, p annealed 1 → 0.5 (Karvonen et al. 2024);
* ``gated``: Gated SAE (Rajamanoharan et al. 2024a);
* ``jumprelu``: JumpReLU with the L0 loss (Rajamanoharan et al. 2024b), θ₀ 0.01, ε 0.05;
* ``topk``: TopK (Gao et al. 2024); ``batchtopk``: BatchTopK (Bussmann et al. 2024);
* ``matryoshka``: Matryoshka BatchTopK, prefixes width/16, width/4, width (Bussmann et al. 2025).

``relu_l1``, ``gated`` and ``jumprelu`` are also trained as a library without a controller must
be: a sweep of fixed coefficients (``--sweep``, ``--l0-sweep``), then one run at the coefficient
the sweep says gives the target L0 (log coefficient interpolated in log L0), reported as
``ARCH (matched)``.

``--reference``: SAELens' equivalents trained on the same samples by its own trainer and scored
by the same code (needs ``sae-lens``, installed only in the benchmark environment:
``bench/requirements-peers.txt``): ``standard``, ``gated`` and ``jumprelu`` by the same sweep and
matched run (the same coefficients: the SAE recipe's loss is SAELens' own), ``topk``,
``batchtopk`` and ``matryoshka_batchtopk`` at k = the target L0.

Run: ``python bench/bench_ground_truth.py [--seeds 0 1 2] [--arch ...] [--reference]`` (actsparse
alone, 3 seeds: about 12 minutes on 2 cores, 4 without the sweeps (``--sweep`` with no value);
with ``--reference`` about 21); ``--replot JSON`` redraws the figure;
``--smoke`` is a tiny version for the test suite. Writes ``bench/results/ground_truth.json`` and the
figure ``--png`` (default ``docs/img/ground-truth-mcc.png``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_args, write_result  # noqa: E402

from actsparse import metrics as M  # noqa: E402
from actsparse.config import TrainConfig  # noqa: E402
from actsparse.control import TargetNotReachedWarning  # noqa: E402
from actsparse.data.ground_truth import GroundTruth  # noqa: E402
from actsparse.models.sparse_topk import SparseCode  # noqa: E402
from actsparse.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("relu_l1", "p_anneal", "gated", "jumprelu", "topk", "batchtopk", "matryoshka")
#: The penalty SAEs that are also trained with fixed coefficients (a sweep read at the target L0),
#: to compare with SAELens' sweeps on equal terms.
SWEPT = ("relu_l1", "gated", "jumprelu")
REFERENCE_ARCHS = ("standard", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk", "gated")
BATCH, LR, EVAL = 512, 1e-3, 20_000


def make_truth(args, seed: int) -> GroundTruth:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the smoke size clips a probability at 1
        return GroundTruth(args.features, args.d, args.true_l0, zipf_exponent=0.5,
                           hierarchy=(max(1, args.features // 32), 4, 2), correlation=0.1, magnitude_std=0.15,
                           seed=seed)


# ------------------------------------------------------------------------------ scoring
def score(code: torch.Tensor, x_hat: torch.Tensor, atoms: torch.Tensor, x: torch.Tensor,
          codes: torch.Tensor, features: torch.Tensor) -> dict[str, float]:
    """MCC, F1, VE, L0, dead latents of one SAE's eval-mode code and reconstruction of ``x``."""
    code, x_hat, atoms = code.detach().float(), x_hat.detach().float(), atoms.detach().float()
    f1 = M.feature_f1(codes, code, features, atoms)  # its "mcc": one Hungarian matching, not two
    usage = M.latent_usage(code)
    return {"mcc": f1["mcc"], "f1": f1["f1"], "ve": float(M.variance_explained(x, x_hat)),
            "l0": usage["l0"], "dead": usage["dead"]}


def score_ours(model, x, codes, features) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        parts = [model(xb) for xb in x.split(4096)]
    code = torch.cat([p.code.to_dense() if isinstance(p.code, SparseCode) else p.code for p in parts])
    out = score(code, torch.cat([p.reconstruction for p in parts]), model.atoms, x, codes, features)
    if getattr(model, "matryoshka", None):
        with torch.no_grad():
            out["prefixes"] = model.prefix_metrics(x)
    return out


# ------------------------------------------------------------------------------ actsparse
def our_config(arch: str, args, seed: int) -> TrainConfig:
    """The ``actsparse train`` settings of one architecture (the SAE recipe's defaults otherwise)."""
    common: dict[str, Any] = dict(data="ground-truth", recipe="sae", hidden=args.width, epochs=1,
                                  batch_size=BATCH, lr=LR, validation=0.0, final_samples=1024, seed=seed,
                                  plots=False, progress=False, checkpoint_every=0)
    target = {"target_l0": float(args.true_l0)}
    k = max(1, round(args.true_l0))
    if arch == "relu_l1":
        return TrainConfig(activation="relu", penalty="l1", **target, **common)
    if arch == "p_anneal":
        return TrainConfig(activation="relu", penalty="lp", p_end=0.5, **target, **common)
    if arch == "gated":
        return TrainConfig(activation="gated", penalty="l1", **target, **common)
    if arch == "jumprelu":
        return TrainConfig(activation="jumprelu", penalty="l0", threshold=0.01, bandwidth=0.05, **target, **common)
    if arch == "topk":
        return TrainConfig(activation="topk", k=k, **common)
    if arch == "batchtopk":
        return TrainConfig(activation="batchtopk", k=k, **common)
    if arch == "matryoshka":
        w = args.width
        return TrainConfig(activation="batchtopk", k=k, matryoshka=(w // 16, w // 4, w), **common)
    raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHS)}")


def run_ours(arch: str, args, seed: int, x: torch.Tensor, held, coef: float | None = None) -> dict[str, Any]:
    """One actsparse SAE; with ``coef``, a fixed coefficient instead of the target L0 (a sweep point)."""
    cfg = our_config(arch, args, seed)
    if coef is not None:
        cfg = dataclasses.replace(cfg, target_l0=None, weight=coef)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetNotReachedWarning)
        res = train(cfg, x)
    seconds = time.perf_counter() - t0
    return {"arch": arch, "library": "actsparse", "seed": seed, "seconds": seconds, "coefficient": coef,
            **score_ours(res.model.cpu(), *held)}


# ------------------------------------------------------------------------------ SAELens
def run_saelens(arch: str, args, seed: int, x: torch.Tensor, held, coef: float | None = None) -> dict[str, Any]:
    """One SAELens SAE trained on the same samples in the same order (its own trainer, Adam at the
    same lr and batch), scored by :func:`score`."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes import gated_sae, jumprelu_sae, standard_sae
    from sae_lens.training.sae_trainer import SAETrainer

    d, w, k = x.shape[1], args.width, max(1, round(args.true_l0))
    torch.manual_seed(seed)
    if arch == "standard":
        sae = standard_sae.StandardTrainingSAE(standard_sae.StandardTrainingSAEConfig(d_in=d, d_sae=w,
                                                                                      l1_coefficient=coef))
    elif arch == "gated":
        sae = gated_sae.GatedTrainingSAE(gated_sae.GatedTrainingSAEConfig(d_in=d, d_sae=w, l1_coefficient=coef))
    elif arch == "jumprelu":
        sae = jumprelu_sae.JumpReLUTrainingSAE(jumprelu_sae.JumpReLUTrainingSAEConfig(
            d_in=d, d_sae=w, l0_coefficient=coef))
    elif arch == "topk":
        from sae_lens.saes import topk_sae
        sae = topk_sae.TopKTrainingSAE(topk_sae.TopKTrainingSAEConfig(d_in=d, d_sae=w, k=k))
    elif arch == "batchtopk":
        from sae_lens.saes import batchtopk_sae
        sae = batchtopk_sae.BatchTopKTrainingSAE(batchtopk_sae.BatchTopKTrainingSAEConfig(d_in=d, d_sae=w, k=k))
    elif arch == "matryoshka_batchtopk":
        from sae_lens.saes import matryoshka_batchtopk_sae as mb
        sae = mb.MatryoshkaBatchTopKTrainingSAE(mb.MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d, d_sae=w, k=k, matryoshka_widths=[w // 16, w // 4, w]))
    else:
        raise ValueError(f"unknown reference architecture {arch!r}")
    n = (x.shape[0] // BATCH) * BATCH

    def batches():
        while True:  # SAELens' trainer may draw a batch more than it trains on
            yield from x[:n].split(BATCH)

    tcfg = SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False, total_training_samples=n,
        device="cpu", autocast=False, lr=LR, lr_end=LR, lr_scheduler_name="constant", lr_warm_up_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, lr_decay_steps=0, n_restart_cycles=1, train_batch_size_samples=BATCH,
        dead_feature_window=1000, feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1), n_batches_for_norm_estimate=1)
    t0 = time.perf_counter()
    SAETrainer(cfg=tcfg, sae=sae, data_provider=batches(), save_checkpoint_fn=lambda p: None).fit()
    seconds = time.perf_counter() - t0
    sae.eval()
    xe, codes, features = held
    with torch.no_grad():
        code = torch.cat([sae.encode(xb) for xb in xe.split(4096)])
        x_hat = torch.cat([sae.decode(c) for c in code.split(4096)])
    return {"arch": arch, "library": "saelens", "seed": seed, "seconds": seconds, "coefficient": coef,
            **score(code, x_hat, sae.W_dec, xe, codes, features)}


# ------------------------------------------------------------------------------ the whole benchmark
def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for key in sorted({(r["library"], r["arch"]) for r in rows if not r.get("sweep")}):
        sel = [r for r in rows if (r["library"], r["arch"]) == key and not r.get("sweep")]
        table[f"{key[0]}/{key[1]}"] = {m: statistics.fmean(r[m] for r in sel)
                                       for m in ("mcc", "f1", "ve", "l0", "dead", "seconds")} | {"seeds": len(sel)}
    return table


#: One colour per architecture, the same for both libraries (SAELens' names on the right).
FAMILIES = {"relu_l1": "ReLU + L1", "standard": "ReLU + L1", "gated": "Gated", "jumprelu": "JumpReLU",
            "p_anneal": "p-annealing", "topk": "TopK", "batchtopk": "BatchTopK", "matryoshka": "Matryoshka",
            "matryoshka_batchtopk": "Matryoshka"}


def figure(rows: list[dict[str, Any]], path: Path, true_l0: float) -> None:
    """MCC and F1 against L0: a colour per architecture, a marker per library and kind of run
    (controlled or top-k: circle; matched to the target by a sweep: diamond; SAELens: cross),
    and each sweep as a thin line (solid: actsparse, dashed: SAELens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.lines import Line2D

    families = list(dict.fromkeys(FAMILIES.values()))
    colour = {f: plt.get_cmap("tab10")(i) for i, f in enumerate(families)}

    def family(arch: str) -> str:
        return FAMILIES.get(arch.replace(" (matched)", ""), arch)

    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    for ax, key in zip(axes, ("mcc", "f1")):
        for (lib, arch) in sorted({(r["library"], r["arch"]) for r in rows}):
            sel = [r for r in rows if (r["library"], r["arch"]) == (lib, arch)]
            c = colour.get(family(arch), "grey")
            for s in sorted({r["seed"] for r in sel if r.get("sweep")}):
                pts = sorted((r["l0"], r[key]) for r in sel if r.get("sweep") and r["seed"] == s and r["l0"] > 0)
                ax.plot(*zip(*pts), color=c, lw=0.7, alpha=0.5, ls="-" if lib == "actsparse" else "--")
            main = [r for r in sel if not r.get("sweep")]
            marker = "x" if lib != "actsparse" else ("D" if "matched" in arch else "o")
            ax.scatter([r["l0"] for r in main], [r[key] for r in main], color=c, marker=marker, s=32, zorder=3)
        ax.axvline(true_l0, color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("L0 (latents active per sample, held-out data)")
        ax.set_ylabel(key.upper())
        ax.grid(alpha=0.3)
    axes[0].set_title("dictionary vs true features (MCC)")
    axes[1].set_title("feature detection (F1)")
    handles = [Line2D([], [], color=colour[f], lw=3, label=f) for f in families]
    handles += [Line2D([], [], color="k", marker="o", ls="", label="actsparse: target L0 / k"),
                Line2D([], [], color="k", marker="D", ls="", label="actsparse: matched by a sweep"),
                Line2D([], [], color="k", marker="x", ls="", label="SAELens (matched, or k)"),
                Line2D([], [], color="k", lw=0.7, label="actsparse sweep"),
                Line2D([], [], color="k", lw=0.7, ls="--", label="SAELens sweep"),
                Line2D([], [], color="grey", lw=0.6, ls=":", label="true L0")]
    axes[1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0],
                      seeds=dict(type=int, nargs="+", default=[0, 1, 2]),
                      arch=dict(nargs="+", default=list(ARCHS), choices=ARCHS),
                      reference=dict(action="store_true", help="also train SAELens' SAEs (benchmark env only)"),
                      reference_arch=dict(nargs="+", default=list(REFERENCE_ARCHS), choices=REFERENCE_ARCHS),
                      sweep=dict(type=float, nargs="*", default=[0.5, 1.0, 2.0, 4.0],
                                 help="L1 coefficients of the sweeps (relu_l1, gated; both libraries)"),
                      l0_sweep=dict(type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0],
                                    help="L0 coefficients of the JumpReLU sweeps"),
                      features=dict(type=int, default=2048), d=dict(type=int, default=128),
                      true_l0=dict(type=float, default=16.0), width=dict(type=int, default=512),
                      samples=dict(type=int, default=400_000),
                      png=dict(type=str, default=str(ROOT / "docs" / "img" / "ground-truth-mcc.png")),
                      replot=dict(type=str, default=None, help="redraw the figure from a result JSON and exit"))
    if args.replot:
        res = json.loads(Path(args.replot).read_text())
        figure(res["runs"], Path(args.png), res["settings"]["true_l0"])
        return
    if args.smoke:
        args.features, args.d, args.true_l0, args.width, args.samples = 128, 32, 4.0, 64, 4096
        args.seeds, args.sweep, args.l0_sweep = args.seeds[:1], args.sweep[:2], args.l0_sweep[:2]
    rows: list[dict[str, Any]] = []

    def show(r: dict[str, Any]) -> None:
        print(f"seed {r['seed']} {r['library']} {r['arch']}: "
              + ", ".join(f"{k} {r[k]:.3f}" for k in ("mcc", "f1", "ve", "l0") if k in r), flush=True)

    def swept(lib: str, arch: str, seed: int, run, coefs: list[float]) -> None:
        """A sweep of fixed coefficients, then one more run at the coefficient that the sweep says
        gives the target L0 (log coefficient interpolated linearly in log L0 between the two
        points around it): a real run at (about) the target L0, not an interpolated score."""
        points = [run(c) for c in coefs]
        rows.extend(p | {"sweep": True} for p in points)
        pts = sorted((math.log(p["l0"]), math.log(p["coefficient"])) for p in points if p["l0"] > 0)
        target = math.log(args.true_l0)
        if len(pts) < 2 or not pts[0][0] <= target <= pts[-1][0]:
            l0s = ", ".join(f"{p['l0']:.1f}" for p in points)
            print(f"seed {seed} {lib} {arch}: the sweep's L0 ({l0s}) does not bracket {args.true_l0:g}", flush=True)
            return
        coef = math.exp(float(np.interp(target, [a for a, _ in pts], [b for _, b in pts])))
        rows.append(run(coef) | {"arch": f"{arch} (matched)"})
        show(rows[-1])

    for seed in args.seeds:
        truth = make_truth(args, seed)
        x, _ = truth.sample(args.samples, seed)
        xe, codes = truth.sample(EVAL, seed + 1_000)
        held = (xe, codes, truth.features)
        for arch in args.arch:
            rows.append(run_ours(arch, args, seed, x, held))
            show(rows[-1])
        for arch in SWEPT:
            if arch in args.arch and args.sweep:
                coefs = args.l0_sweep if arch == "jumprelu" else args.sweep
                swept("actsparse", arch, seed, functools.partial(run_ours, arch, args, seed, x, held), coefs)
        if args.reference:
            for arch in args.reference_arch:
                if arch in ("standard", "gated", "jumprelu"):  # no controller there: a sweep
                    coefs = args.l0_sweep if arch == "jumprelu" else args.sweep
                    swept("saelens", arch, seed, functools.partial(run_saelens, arch, args, seed, x, held), coefs)
                else:
                    rows.append(run_saelens(arch, args, seed, x, held))
                    show(rows[-1])
    table = summarise(rows)
    for name, t in table.items():
        print(f"{name:34s} MCC {t['mcc']:.3f}  F1 {t['f1']:.3f}  VE {t['ve']:.3f}  L0 {t['l0']:6.1f}  "
              f"dead {t['dead']:6.1f}  {t['seconds']:5.1f} s")
    if not args.smoke or args.out:
        figure(rows, Path(args.png), args.true_l0)
    names = ("features", "d", "true_l0", "width", "samples", "seeds", "sweep", "l0_sweep")
    settings = {k: getattr(args, k) for k in names} | {"batch": BATCH, "lr": LR, "eval": EVAL}
    write_result("ground_truth", {"settings": settings, "table": table, "runs": rows}, args)


if __name__ == "__main__":
    main()
