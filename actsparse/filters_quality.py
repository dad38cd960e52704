"""How localised and how smooth learned image filters are: two numbers per filter, for figures
that would otherwise be judged by eye.

Both take the encoder rows ``weights`` ``(units, h*w)`` of a model trained on ``h``×``w`` image
samples and return one value per unit, ``(units,)`` float64. Each filter's mean is removed
first (``center=True``): the patches of :mod:`actsparse.data.patches` have their own mean removed,
so a filter's mean multiplies a constant and acts as a bias, invisible in the data.

**Localisation index** (:func:`localisation_index`), defined for this library (a plain
energy-concentration measure, not taken from a paper): the share of a filter's energy
that lies in its best ``a``×``b`` window (default half the side each way, 4×4 of 8×8 — a
quarter of the area)::

    L(w) = max over windows V of  Σ_{p ∈ V} w_p²  /  Σ_p w_p²,        w ← w − mean(w)

It is 1 for a filter confined to one window, and its floor is the window's share of the area
(0.25) for energy spread evenly. Reference values on 8×8 (4×4 windows; computed in
``tests/test_filters_quality.py``):

* white-noise filters: median 0.38, 95th percentile 0.48, 99th 0.53 (2.8% above 0.5);
* full-patch gratings of 1 to 3 cycles per patch: 0.25–0.36 for every orientation and phase;
* a Gabor edge (sine carrier of period 4 pixels, Gaussian envelope of σ pixels, centred
  anywhere in the middle 2×2 pixels, any orientation): 0.97–1.0 for σ = 1, 0.85–0.93 for
  σ = 1.5, 0.69–0.77 for σ = 2, 0.56–0.64 for σ = 2.5.

:data:`LOCALISED` = 0.5 — half the energy in a quarter of the area — is the threshold at which
a filter counts as localised: no grating reaches it, a Gabor edge of σ ≤ 2.5 pixels always does,
and a random filter does about 3 times in 100. It measures place, not shape: a localised
checkerboard scores as high as an edge, which :func:`smoothness_index` tells apart.

**Smoothness index** (:func:`smoothness_index`): one minus Geary's contiguity ratio C (Geary
1954, "The contiguity ratio and statistical mapping", *The Incorporated Statistician* 5(3)),
with the 4-neighbour (rook) adjacency of the pixel grid::

    S(w) = 1 − C,   C = (N − 1) Σ_{(p,q) adjacent} (w_p − w_q)²  /  (2 A Σ_p (w_p − w̄)²)

with N pixels and A adjacent pairs (each counted once). C is 1 in expectation for independent
pixels, so S is about 0 for white noise, near 1 for a smooth filter (a slow edge, a stroke), and
negative down to about −1 for a pixel checkerboard. Reference values on 8×8: white noise
0.00 ± 0.10, gratings of 1, 2, 3 cycles per patch 0.84–0.87, 0.44–0.58, −0.08–0.24, the Gabor
edges above 0.2–0.46, a checkerboard −0.97.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["localisation_index", "smoothness_index", "filter_summary", "LOCALISED"]

#: A filter with :func:`localisation_index` above this is localised (see the module docstring).
LOCALISED = 0.5


def _tiles(weights, image_shape: tuple[int, int] | None, center: bool) -> Tensor:
    """``weights`` ``(units, h*w)`` as float64 tiles ``(units, h, w)``, mean removed if ``center``."""
    w = torch.as_tensor(weights).detach().to("cpu", torch.float64)
    if w.dim() == 1:
        w = w.unsqueeze(0)
    if w.dim() != 2:
        raise ValueError(f"weights must be (units, h*w), got shape {tuple(w.shape)}")
    d = w.shape[1]
    if image_shape is None:
        side = math.isqrt(d)
        if side * side != d:
            raise ValueError(f"{d} weights per unit are not a square image: pass image_shape=(h, w)")
        image_shape = (side, side)
    h, wd = image_shape
    if h * wd != d:
        raise ValueError(f"image_shape {image_shape} holds {h * wd} pixels, the filters have {d}")
    t = w.reshape(-1, h, wd)
    return t - t.mean(dim=(1, 2), keepdim=True) if center else t


def localisation_index(weights, image_shape: tuple[int, int] | None = None,
                       window: tuple[int, int] | None = None, center: bool = True) -> Tensor:
    """The share of each filter's energy in its best window (module docstring): ``(units,)``.

    Args:
        weights: ``(units, h*w)`` filters (a tensor or an array).
        image_shape: ``(h, w)``; default square.
        window: ``(a, b)`` window size; default ``(max(1, h // 2), max(1, w // 2))``.
        center: remove each filter's mean first.

    A filter of zeros (after centring) scores 0.
    """
    t = _tiles(weights, image_shape, center)
    h, w = t.shape[1:]
    a, b = window if window is not None else (max(1, h // 2), max(1, w // 2))
    if not (1 <= a <= h and 1 <= b <= w):
        raise ValueError(f"window {(a, b)} does not fit in a {h}x{w} filter")
    e = (t * t).unsqueeze(1)  # (units, 1, h, w)
    best = torch.nn.functional.avg_pool2d(e, (a, b), stride=1).flatten(1).amax(1) * (a * b)  # every window's sum
    total = e.flatten(1).sum(1)
    return torch.where(total > 0, best / total.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(total))


def smoothness_index(weights, image_shape: tuple[int, int] | None = None) -> Tensor:
    """One minus Geary's C over the 4-neighbour grid (module docstring): ``(units,)``; a constant
    filter scores 0."""
    t = _tiles(weights, image_shape, center=True)
    h, w = t.shape[1:]
    n, pairs = h * w, h * (w - 1) + w * (h - 1)
    if pairs == 0:
        raise ValueError("a 1x1 filter has no neighbours")
    diff = ((t[:, :, 1:] - t[:, :, :-1]) ** 2).sum((1, 2)) + ((t[:, 1:, :] - t[:, :-1, :]) ** 2).sum((1, 2))
    var = (t * t).sum((1, 2))
    c = (n - 1) * diff / (2 * pairs * var.clamp_min(torch.finfo(torch.float64).tiny))
    return torch.where(var > 0, 1 - c, torch.zeros_like(var))


def filter_summary(weights, image_shape: tuple[int, int] | None = None,
                   threshold: float = LOCALISED) -> dict[str, float]:
    """Median localisation and smoothness over the units, and how many units are localised
    (localisation index above ``threshold``): ``{"localisation_median", "localised",
    "units", "smoothness_median"}``."""
    loc = localisation_index(weights, image_shape)
    smooth = smoothness_index(weights, image_shape)
    return {"localisation_median": float(loc.quantile(0.5)), "localised": int((loc > threshold).sum()),
            "units": int(loc.numel()), "smoothness_median": float(smooth.quantile(0.5))}
