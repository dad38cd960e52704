"""Filter quality indices (actsparse.filters_quality): each checked against an independent NumPy
computation (explicit loops over windows and neighbour pairs), the reference values the module
docstring quotes (random filters, full-patch gratings, localised Gabor edges), and the classic
run's filters, which must be localised."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actsparse.filters_quality import LOCALISED, filter_summary, localisation_index, smoothness_index

YY, XX = np.mgrid[0:8, 0:8].astype(np.float64)


def ref_localisation(w: np.ndarray, h: int, wd: int, a: int, b: int) -> np.ndarray:
    """Loop over every a×b window of each centred filter, as the formula reads."""
    out = []
    for f in w:
        t = f.reshape(h, wd) - f.mean()
        total = (t**2).sum()
        best = max((t[i:i + a, j:j + b] ** 2).sum() for i in range(h - a + 1) for j in range(wd - b + 1))
        out.append(best / total)
    return np.array(out)


def ref_geary(w: np.ndarray, h: int, wd: int) -> np.ndarray:
    """1 − Geary's C with rook adjacency: the pairs listed one by one."""
    pairs = [((i, j), (i, j + 1)) for i in range(h) for j in range(wd - 1)]
    pairs += [((i, j), (i + 1, j)) for i in range(h - 1) for j in range(wd)]
    out = []
    for f in w:
        t = f.reshape(h, wd)
        m = t.mean()
        num = sum((t[p] - t[q]) ** 2 for p, q in pairs)
        c = (h * wd - 1) * num / (2 * len(pairs) * ((t - m) ** 2).sum())
        out.append(1 - c)
    return np.array(out)


def gratings(cycles: int) -> np.ndarray:
    f = cycles / 8
    return np.array([np.cos(2 * np.pi * f * (XX * np.cos(t) + YY * np.sin(t)) + ph).ravel()
                     for t in np.linspace(0, np.pi, 12, endpoint=False)
                     for ph in np.linspace(0, 2 * np.pi, 8, endpoint=False)])


def gabors(sigma: float) -> np.ndarray:
    """Sine-phase Gabor edges, period 4 px, centred in the middle 2×2 pixels, 12 orientations."""
    out = []
    for x0 in (2.5, 3.0, 3.5, 4.0, 4.5):
        for y0 in (2.5, 3.0, 3.5, 4.0, 4.5):
            for th in np.linspace(0, np.pi, 12, endpoint=False):
                xr = (XX - x0) * np.cos(th) + (YY - y0) * np.sin(th)
                yr = -(XX - x0) * np.sin(th) + (YY - y0) * np.cos(th)
                out.append((np.exp(-(xr**2 + yr**2) / (2 * sigma**2)) * np.sin(2 * np.pi * xr / 4)).ravel())
    return np.array(out)


def test_indices_match_a_numpy_loop():
    rng = np.random.default_rng(0)
    for h, wd, window in ((8, 8, None), (6, 10, (2, 3)), (5, 5, None)):
        w = rng.standard_normal((20, h * wd)) + rng.standard_normal((20, 1))  # with a mean to remove
        a, b = window or (h // 2, wd // 2)
        got = localisation_index(torch.tensor(w), (h, wd), window).numpy()
        np.testing.assert_allclose(got, ref_localisation(w, h, wd, a, b), rtol=1e-12)
        np.testing.assert_allclose(smoothness_index(w, (h, wd)).numpy(), ref_geary(w, h, wd), rtol=1e-10, atol=1e-12)


def test_random_filters_are_not_localised():
    w = np.random.default_rng(1).standard_normal((20_000, 64))
    loc, smooth = localisation_index(w).numpy(), smoothness_index(w).numpy()
    assert abs(np.median(loc) - 0.38) < 0.01 and abs(np.percentile(loc, 99) - 0.53) < 0.01
    assert 0.02 < (loc > LOCALISED).mean() < 0.04  # "about 3 in 100"
    assert abs(smooth.mean()) < 0.005 and 0.08 < smooth.std() < 0.11


@pytest.mark.parametrize("cycles", [1, 2, 3])
def test_full_patch_gratings_are_not_localised(cycles):
    loc = localisation_index(gratings(cycles)).numpy()
    assert loc.min() >= 0.25 - 1e-12 and loc.max() <= 0.36
    assert (loc <= LOCALISED).all()


@pytest.mark.parametrize("sigma, lo, hi", [(1.0, 0.97, 1.0), (1.5, 0.85, 0.93), (2.0, 0.69, 0.77), (2.5, 0.56, 0.64)])
def test_gabor_edges_are_localised(sigma, lo, hi):
    loc = localisation_index(gabors(sigma)).numpy()
    assert lo <= loc.min() and loc.max() <= hi
    assert (loc > LOCALISED).all()


def test_smoothness_orders_grating_noise_checkerboard():
    assert smoothness_index(gratings(1)).min() > 0.8
    checkerboard = (((XX + YY) % 2) * 2 - 1).ravel()[None]
    assert float(smoothness_index(checkerboard)) == pytest.approx(1 - 63 / 32, abs=1e-12)  # C = 63·448/(2·112·64)
    # a flat filter has no energy to place: both indices say 0, never NaN
    flat = np.ones((1, 64))
    assert float(localisation_index(flat)) == 0.0 and float(smoothness_index(flat)) == 0.0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="not a square image"):
        localisation_index(np.zeros((2, 10)))
    with pytest.raises(ValueError, match="holds 12 pixels"):
        localisation_index(np.zeros((2, 10)), (3, 4))
    with pytest.raises(ValueError, match="does not fit"):
        localisation_index(np.zeros((2, 16)), window=(5, 2))


def test_classic_run_learns_localised_edges():
    """The default run (10,000 8×8 patches of the embedded photographs, 400 L-BFGS iterations)
    learns localised filters. Before the patch pipeline was fixed, its median was 0.44–0.49
    over seeds 0–2, with 7–9 of 25 units above 0.5."""
    from actsparse.config import TrainConfig
    from actsparse.data import load_data
    from actsparse.train import train

    cfg = TrainConfig(plots=False, progress=False, checkpoint_every=0, threads=1)
    res = train(cfg, load_data(cfg).x)
    s = filter_summary(res.model.W_enc)
    assert s["localisation_median"] > 0.50 and s["localised"] >= 13, s


def _digit_filters(**fields):
    from actsparse.config import TrainConfig
    from actsparse.data import load_data
    from actsparse.train import train

    cfg = TrainConfig(data="digits", hidden=100, plots=False, progress=False, checkpoint_every=0, threads=1,
                      **fields)
    return cfg, filter_summary(train(cfg, load_data(cfg).x).model.W_enc, (8, 8))


def test_digits_defaults_learn_strokes_not_pixel_noise():
    """``--data digits`` defaults to UFLDL's MNIST values (ρ = 0.1, λ = 3e-3): its filters are
    smoother (strokes) than with the classic values, whose 100 filters are pixel noise
    (smoothness medians measured 0.44 and 0.25 over seeds 0–2)."""
    cfg, default = _digit_filters()
    assert (cfg.target, cfg.weight_decay) == (0.1, 3e-3)
    _, classic = _digit_filters(target=0.01, weight_decay=1e-4)
    assert default["smoothness_median"] > 0.38 > 0.32 > classic["smoothness_median"], (default, classic)
