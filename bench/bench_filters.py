"""How localised the classic run's filters are, before and after the patch pipeline's fixes.

Each case trains the classic sparse autoencoder (full-batch L-BFGS, 400 iterations, 25 sigmoid
hidden units, ρ = 0.01, λ = 1e-4, β = 3 unless the case says otherwise) on 10,000 8×8 patches,
once per seed, and scores its encoder rows with :mod:`actsparse.filters_quality`: the median
localisation index (share of a filter's energy in its best 4×4 window), how many of the units
exceed :data:`~actsparse.filters_quality.LOCALISED` (0.5), and the median smoothness index
(1 − Geary's C). Reported per case: each seed's numbers and the median over seeds.

Cases:

* ``before``: the patch pipeline as it was — photographs shrunk 2×, 1/f filter with f0 = 0.3,
  every drawn patch kept, no symmetries; ZCA on the raw (un-normalised) patches;
* ``after``: :func:`actsparse.data.patches.natural_patches` as it is now (shrunk 2×, f0 = 0.4,
  the half of highest contrast kept, a random symmetry of the square per patch; ZCA on the
  normalised patches);
* ``after-no-*``: ``after`` with one of those three steps undone, and ``after, shrunk 3x``
  (ablations, 1/f only);
* ``none`` and ``zca`` whitening, before and after; ZCA with the linear decoder, with λ = 1e-4
  (the classic value) and λ = 3e-3 (UFLDL's linear-decoder exercise);
* ``digits``: scikit-learn's digits, 100 hidden units, the classic settings vs ρ = 0.1,
  λ = 3e-3 (UFLDL's MNIST settings), and the same with every digit also moved by ±1 pixel.

Figures of every run go to ``--png-dir`` (default ``/tmp/actsparse-bench-filters``).

Run: ``.venv/bin/python bench/bench_filters.py [--seeds 0 1 2] [--cases after before ...]``
(45 runs of a few seconds each: several minutes on 2 cores); ``--smoke`` trains 2 cases
for 20 iterations. Writes ``bench/results/filters.json``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_args, write_result  # noqa: E402

from actsparse.config import TrainConfig  # noqa: E402
from actsparse.data import digits_array  # noqa: E402
from actsparse.data import patches as P  # noqa: E402
from actsparse.filters_quality import LOCALISED, localisation_index, smoothness_index  # noqa: E402
from actsparse.train import train  # noqa: E402

N, SIZE = 10_000, 8


def before_patches(whiten: str, seed: int) -> np.ndarray:
    """The pipeline before the fix, rebuilt from the module's parts."""
    images = [P.downsample(im, 2) for im in P.grey_sample_images()]
    if whiten == "1/f":
        images = [P.whiten_1f(im, 0.3) for im in images]
    p = P.sample_patches(images, N, SIZE, seed)
    if whiten == "zca":
        return P.zca_whiten(p - p.mean(axis=1, keepdims=True))
    return P.normalize_patches(p)


def after_patches(whiten: str, seed: int, *, k: int = P.DOWNSAMPLE, **kw: Any) -> np.ndarray:
    """:func:`~actsparse.data.patches.natural_patches`, with one of its steps changed by ``kw``."""
    return P.image_patches([P.downsample(im, k) for im in P.grey_sample_images()], N, SIZE, whiten, seed, **kw)


# Every case sets λ and ρ itself: the CLI's defaults for zca + linear and for digits are the
# UFLDL values (TrainConfig._resolve_recipe_defaults), so the classic values must be asked for.
LINEAR = {"whiten": "zca", "decoder": "linear", "weight_decay": 1e-4}
UFLDL_LINEAR = {**LINEAR, "weight_decay": 3e-3}
DIGITS = {"data": "digits", "hidden": 100, "target": 0.01, "weight_decay": 1e-4}
UFLDL_MNIST = {**DIGITS, "target": 0.1, "weight_decay": 3e-3}

#: name -> (data(seed), TrainConfig fields)
CASES: dict[str, tuple[Callable[[int], np.ndarray], dict[str, Any]]] = {
    "1/f before": (lambda s: before_patches("1/f", s), {}),
    "1/f after": (lambda s: after_patches("1/f", s), {}),
    "1/f after, shrunk 3x": (lambda s: after_patches("1/f", s, k=3), {}),
    "1/f after-no-f0 (0.3)": (lambda s: after_patches("1/f", s, f0=0.3), {}),
    "1/f after-no-contrast-selection": (lambda s: after_patches("1/f", s, keep=1.0), {}),
    "1/f after-no-symmetries": (lambda s: after_patches("1/f", s, symmetries=False), {}),
    "none before": (lambda s: before_patches("none", s), {"whiten": "none"}),
    "none after": (lambda s: after_patches("none", s), {"whiten": "none"}),
    "zca before, lambda 1e-4": (lambda s: before_patches("zca", s), LINEAR),
    "zca before, lambda 3e-3": (lambda s: before_patches("zca", s), UFLDL_LINEAR),
    "zca after, lambda 1e-4": (lambda s: after_patches("zca", s), LINEAR),
    "zca after, lambda 3e-3": (lambda s: after_patches("zca", s), UFLDL_LINEAR),
    "digits classic (rho 0.01, lambda 1e-4)": (lambda s: digits_array(), DIGITS),
    "digits rho 0.1, lambda 3e-3": (lambda s: digits_array(), UFLDL_MNIST),
    "digits rho 0.1, lambda 3e-3, shifted +-1 px": (lambda s: digits_array(1), UFLDL_MNIST),
}


def run_case(name: str, seed: int, iterations: int, png_dir: Path | None) -> dict[str, float]:
    make, fields = CASES[name]
    x = torch.tensor(make(seed), dtype=torch.float32)
    cfg = TrainConfig(**{"seed": seed, "iterations": iterations, "plots": False, "progress": False,
                         "checkpoint_every": 0, **fields})
    t0 = time.perf_counter()
    res = train(cfg, x)
    w = res.model.W_enc.detach()
    loc, smooth = localisation_index(w), smoothness_index(w)
    out = {"localisation_median": float(loc.quantile(0.5)), "localised": int((loc > LOCALISED).sum()),
           "units": int(loc.numel()), "smoothness_median": float(smooth.quantile(0.5)),
           "fvu": float(res.metrics["fvu"]), "mean_activation": float(res.metrics["mean_activation"]),
           "seconds": time.perf_counter() - t0}
    if png_dir is not None:
        from actsparse.plots import plot_filters

        png_dir.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        plot_filters(w, (SIZE, SIZE), png_dir / f"{slug}_seed{seed}.png",
                     f"{name}, seed {seed}: localisation median {out['localisation_median']:.2f}, "
                     f"{out['localised']}/{out['units']} > {LOCALISED}")
    return out


def main() -> None:
    args = parse_args(__doc__.splitlines()[0],
                      seeds={"type": int, "nargs": "+", "default": [0, 1, 2], "help": "seeds (default 0 1 2)"},
                      cases={"nargs": "+", "default": None, "help": "case names (default: all; see CASES)"},
                      png_dir={"type": str, "default": "/tmp/actsparse-bench-filters",
                               "help": "where the filter figures go ('' for none)"})
    names = args.cases or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; the cases are: {list(CASES)}")
    iterations = 400
    if args.smoke:
        names, args.seeds, iterations = names[:2], args.seeds[:1], 20
    png_dir = Path(args.png_dir) if args.png_dir else None
    results: dict[str, Any] = {}
    for name in names:
        per_seed = {}
        for seed in args.seeds:
            per_seed[str(seed)] = r = run_case(name, seed, iterations, png_dir)
            print(f"{name:48s} seed {seed}: localisation median {r['localisation_median']:.3f}, "
                  f"{r['localised']:3d}/{r['units']} > {LOCALISED}, smoothness {r['smoothness_median']:.3f}, "
                  f"FVU {r['fvu']:.3f} ({r['seconds']:.1f} s)", file=sys.stderr, flush=True)
        results[name] = {
            "seeds": per_seed,
            "median_over_seeds": {key: statistics.median(r[key] for r in per_seed.values())
                                  for key in ("localisation_median", "localised", "smoothness_median", "fvu")},
        }
    print(f"\n| case | localisation median | units > {LOCALISED:g} (per seed) | smoothness median | FVU |",
          file=sys.stderr)
    print("|---|---|---|---|---|", file=sys.stderr)
    for name, r in results.items():
        m = r["median_over_seeds"]
        counts = ", ".join(str(s["localised"]) for s in r["seeds"].values())
        units = next(iter(r["seeds"].values()))["units"]
        print(f"| {name} | {m['localisation_median']:.3f} | {counts} of {units} | {m['smoothness_median']:.3f} | "
              f"{m['fvu']:.3f} |", file=sys.stderr)
    write_result("filters", {"iterations": iterations, "samples": N, "patch_size": SIZE, "threshold": LOCALISED,
                             "seeds": args.seeds, "cases": results}, args)


if __name__ == "__main__":
    main()
