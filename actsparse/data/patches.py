"""Natural-image patches from images shipped inside installed packages (nothing is downloaded).

UFLDL's ``sampleIMAGES`` + ``normalizeData`` (CS294A exercise): random 8×8 patches of grey
images, each patch's mean removed, clipped to ±3σ (σ over all patch pixels), rescaled to
[0.1, 0.9] so that sigmoid output units can reproduce them.

The exercise used ten 512×512 natural scenes pre-whitened with Olshausen & Field's 1/f filter
(IMAGES.mat: foliage and rocks, structured everywhere). Here the images are scikit-learn's two
sample photographs (a temple, a flower), halved in size (mean over 2×2 blocks, :data:`DOWNSAMPLE`),
and three steps bring their patches close to the exercise's (``whiten="1/f"``, the default;
``bench/bench_filters.py`` measures each):

* the 1/f filter rolls off at f0 = 0.4 cycles/pixel (:data:`F0`), Olshausen & Field's 200
  cycles per 512-pixel picture. With f0 = 0.3 the filter keeps little above ~2 cycles per 8
  pixels and most units learn gratings that span the patch;
* half of the patches drawn, the flattest, are dropped (:data:`KEEP`): the photographs hold
  much sky, water and defocused background, and half of their whitened patches have under 4% of
  the mean patch variance (median localisation index over seeds 0–7: 0.53 without this step,
  0.56 with it; photographs shrunk 3× without it once trained to nothing, FVU ≈ 1);
* each patch is given one of the 8 symmetries of the square (rotations by 90°, mirror images)
  at random: two photographs, one of them a temple of verticals and horizontals, have few
  orientations.

With these the 25 units of the classic run learn localised, oriented edges: the median
localisation index (:mod:`actsparse.filters_quality`) goes from 0.44–0.49 (seeds 0–2) to
0.52–0.58 (seeds 0–7), and the units above 0.5 from 7–9 to 15–20 of 25 (seeds 0–2). On unwhitened patches
(``whiten="none"``), whose power falls as 1/f², the units learn smoother, larger edges.
``whiten="zca"`` applies ZCA (ε = 0.1, as the linear-decoder exercise) to the normalised patches
instead of the 1/f filter; it needs a linear decoder.
"""

from __future__ import annotations

import functools

import numpy as np

from ._limits import MissingDependency

__all__ = [
    "grey_sample_images", "downsample", "whiten_1f", "sample_patches", "normalize_patches", "zca_whiten",
    "zca_matrix", "keep_contrast", "random_symmetries", "image_patches", "natural_patches", "check_patch_request",
    "MIN_PATCH_SIZE", "value_range", "DOWNSAMPLE", "F0", "KEEP",
]

#: The embedded photographs are shrunk by this factor (mean over k×k blocks) before patches are cut
#: (3 measures the same as 2: see bench/bench_filters.py).
DOWNSAMPLE = 2
#: Roll-off of the 1/f whitening filter, cycles/pixel (Olshausen & Field: 200 cycles per 512 pixels).
F0 = 0.4
#: Fraction of the drawn patches kept, those of highest contrast (variance about their own mean).
KEEP = 0.5


def grey_sample_images() -> list[np.ndarray]:
    """scikit-learn's two sample photographs (temple, flower) as float64 grey images in [0, 1]
    (decoded once per process; each call returns fresh copies)."""
    return [im.copy() for im in _grey_sample_images()]


@functools.lru_cache(maxsize=1)
def _grey_sample_images() -> tuple[np.ndarray, ...]:
    try:
        from sklearn.datasets import load_sample_images
    except ModuleNotFoundError as err:
        from ..config import install_hint

        raise MissingDependency(
            f"the embedded image patches need scikit-learn: {install_hint('cli')} (or pip install scikit-learn)",
            name="sklearn",
        ) from err
    rgb = load_sample_images().images
    return tuple(img.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0 for img in rgb)


def downsample(img: np.ndarray, k: int = DOWNSAMPLE) -> np.ndarray:
    """Mean over k×k blocks (cropped to a multiple of k): averages away JPEG block artefacts and
    brings the scale of the photographs' edges closer to that of the exercise's images."""
    h, w = img.shape[0] // k * k, img.shape[1] // k * k
    return img[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))


def whiten_1f(img: np.ndarray, f0: float = F0) -> np.ndarray:
    """Olshausen & Field (1997) whitening: spectrum × |f|·exp(−(|f|/f0)⁴), f in cycles/pixel.

    |f| flattens the ~1/f amplitude spectrum of natural images; the exponential removes the
    highest frequencies (noise, JPEG artefacts). Returns the image scaled to unit variance.
    """
    fy = np.fft.fftfreq(img.shape[0])[:, None]
    fx = np.fft.fftfreq(img.shape[1])[None, :]
    f = np.sqrt(fx**2 + fy**2)
    out = np.real(np.fft.ifft2(np.fft.fft2(img - img.mean()) * f * np.exp(-((f / f0) ** 4))))
    return out / out.std()


def sample_patches(images: list[np.ndarray], n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` random ``size``×``size`` patches ``(n, size*size)``, drawn evenly over ``images``."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size * size))
    which = np.arange(n) % len(images)
    for k, img in enumerate(images):
        rows = np.flatnonzero(which == k)
        r = rng.integers(0, img.shape[0] - size + 1, rows.size)
        c = rng.integers(0, img.shape[1] - size + 1, rows.size)
        windows = np.lib.stride_tricks.sliding_window_view(img, (size, size))  # a view, no copy
        out[rows] = windows[r, c].reshape(rows.size, -1)
    return out


def keep_contrast(p: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` rows of ``p`` ``(m, d)`` with the largest variance about their own mean, in their
    original order (ties: the earlier row first)."""
    if n >= p.shape[0]:
        return p
    v = p.var(axis=1)
    keep = np.sort(np.argsort(-v, kind="stable")[:n])
    return p[keep]


def random_symmetries(p: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Each ``size``×``size`` patch (a row of ``p``) turned by a random one of the 8 symmetries
    of the square: k·90° rotations (k = 0..3), each with or without a transpose."""
    rng = np.random.default_rng([seed, 8])  # its own stream: the positions drawn do not change
    sym = rng.integers(0, 8, p.shape[0])
    sq = p.reshape(-1, size, size)
    out = np.empty_like(sq)
    for s in range(8):  # 8 vectorised cases, not a loop over patches
        rows = sym == s
        t = np.rot90(sq[rows], s % 4, axes=(1, 2))
        out[rows] = t.transpose(0, 2, 1) if s >= 4 else t
    return out.reshape(p.shape)


def normalize_patches(p: np.ndarray) -> np.ndarray:
    """UFLDL ``normalizeData``: remove each patch's mean, clip to ±3σ, rescale to [0.1, 0.9]."""
    p = p - p.mean(axis=1, keepdims=True)
    s = 3 * p.std()
    return (np.clip(p, -s, s) / s + 1) * 0.4 + 0.1


def zca_matrix(p: np.ndarray, eps: float = 0.1) -> np.ndarray:
    """The symmetric ZCA matrix ``(d, d)`` of rows ``(n, d)``: U diag(1/√(s + ε)) Uᵀ of their
    covariance U diag(s) Uᵀ. The encoder rows W of a model trained on ``p @ Z`` see a raw patch
    through ``W @ Z`` (the UFLDL exercise shows ``W*ZCAWhite``)."""
    p = p - p.mean(axis=0)
    cov = p.T @ p / p.shape[0]
    u, s, _ = np.linalg.svd(cov)
    return u @ np.diag(1.0 / np.sqrt(s + eps)) @ u.T


def zca_whiten(p: np.ndarray, eps: float = 0.1) -> np.ndarray:
    """ZCA whitening of rows ``(n, d)`` with regulariser ε (UFLDL linear decoder: ε = 0.1)."""
    return (p - p.mean(axis=0)) @ zca_matrix(p, eps)


#: The smallest patch side: each patch's mean is removed (normalisation and ZCA alike), so a 1x1
#: patch is always 0 and its normalisation divides by a zero spread.
MIN_PATCH_SIZE = 2


def check_patch_request(n: int, size: int, whiten: str) -> None:
    """Raise ``ValueError`` for a patch count that is not a positive int, a patch side that is not an
    int >= :data:`MIN_PATCH_SIZE`, or an unknown whitening."""
    for name, v in (("n (the number of patches)", n), ("size (the patch side)", size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if size < MIN_PATCH_SIZE:
        raise ValueError(f"the patch side (--patch-size) must be at least {MIN_PATCH_SIZE}, got {size}: each patch's "
                         f"mean is removed before normalisation or ZCA, so a {size}x{size} patch is always 0 "
                         "(use 8, the exercise's size)")
    if whiten not in ("1/f", "zca", "none"):
        raise ValueError(f"whiten must be '1/f', 'zca' or 'none', got {whiten!r}")


def image_patches(
    images: list[np.ndarray], n: int, size: int = 8, whiten: str = "1/f", seed: int = 0, *,
    keep: float = KEEP, symmetries: bool = True, f0: float = F0,
) -> np.ndarray:
    """``(n, size*size)`` float64 patches of grey ``images``, as the exercise prepares them: in
    [0.1, 0.9], or unbounded and centred on 0 after ZCA (``whiten="zca"``).

    Steps: the 1/f filter on each image (``whiten="1/f"``, roll-off ``f0``); ``n / keep``
    patches drawn evenly over the images (:func:`sample_patches`), of which the ``n`` of highest
    contrast are kept (:func:`keep_contrast`; ``keep=1`` keeps all); a random symmetry of the
    square for each (:func:`random_symmetries`, if ``symmetries``); UFLDL's normalisation
    (:func:`normalize_patches`); then, for ``whiten="zca"``, ZCA with ε = 0.1 (:func:`zca_whiten`).
    """
    check_patch_request(n, size, whiten)
    if not 0 < keep <= 1:
        raise ValueError(f"keep (the fraction of patches kept) must be in (0, 1], got {keep!r}")
    for k, im in enumerate(images):
        if im.shape[0] < size or im.shape[1] < size:
            raise ValueError(f"image {k} is {im.shape[1]}x{im.shape[0]} pixels, smaller than a {size}x{size} patch")
    if whiten == "1/f":
        images = [whiten_1f(im, f0) for im in images]
    p = keep_contrast(sample_patches(images, int(np.ceil(n / keep)), size, seed), n)
    if symmetries:
        p = random_symmetries(p, size, seed)
    p = normalize_patches(p)
    # ε = 0.1 is the exercise's for pixels spanning [0, 1]; on the raw photographs (pixel std ~0.07)
    # it would hardly whiten, on the normalised patches (std 0.13) it whitens the strong components
    return zca_whiten(p) if whiten == "zca" else p


def natural_patches(n: int = 10_000, size: int = 8, whiten: str = "1/f", seed: int = 0) -> np.ndarray:
    """The default data set: ``(n, size*size)`` float64 patches in [0.1, 0.9] (ZCA: unbounded) of
    scikit-learn's photographs shrunk :data:`DOWNSAMPLE` times (see the module docstring)."""
    check_patch_request(n, size, whiten)  # before the photographs are loaded
    return image_patches([downsample(im) for im in grey_sample_images()], n, size, whiten, seed)


def value_range(whiten: str) -> tuple[float, float] | None:
    """The interval every patch value lies in for a whitening: ``(0.1, 0.9)`` for ``"1/f"`` and
    ``"none"`` (UFLDL's normalisation), None for ``"zca"`` (unbounded, centred on 0)."""
    return None if whiten == "zca" else (0.1, 0.9)
