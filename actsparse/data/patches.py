"""Natural-image patches from images shipped inside installed packages (nothing is downloaded).

UFLDL's ``sampleIMAGES`` + ``normalizeData`` (CS294A exercise): random 8×8 patches of grey
images, each patch's mean removed, clipped to ±3σ (σ over all patch pixels), rescaled to
[0.1, 0.9] so that sigmoid output units can reproduce them.

The exercise used images pre-whitened with Olshausen & Field's 1/f filter (IMAGES.mat); here the
same filter (f0 = 0.3 cycles/pixel) is applied to scikit-learn's sample photographs, halved in
size first (``whiten="1/f"``, the default). On
unwhitened photographs, whose power falls as 1/f², the hidden units learn smooth blobs instead
of localised oriented edges. ``whiten="zca"`` applies ZCA to the patches (ε = 0.1) instead, as the
linear-decoder exercise does.
"""

from __future__ import annotations

import functools

import numpy as np

from ._limits import MissingDependency

__all__ = [
    "grey_sample_images", "downsample", "whiten_1f", "sample_patches", "normalize_patches", "zca_whiten",
    "image_patches", "natural_patches", "check_patch_request", "MIN_PATCH_SIZE", "value_range",
]


def grey_sample_images() -> list[np.ndarray]:
    """scikit-learn's two sample photographs (temple, flower) as float64 grey images in [0, 1]
    (decoded once per process; each call returns fresh copies)."""
    return [im.copy() for im in _grey_sample_images()]


@functools.lru_cache(maxsize=1)
def _grey_sample_images() -> tuple[np.ndarray, ...]:
    try:
        from sklearn.datasets import load_sample_images
    except ModuleNotFoundError as err:
        raise MissingDependency(
            "the embedded image patches need scikit-learn: pip install 'actsparse[cli]' (or scikit-learn)",
            name="sklearn",
        ) from err
    rgb = load_sample_images().images
    return tuple(img.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0 for img in rgb)


def downsample(img: np.ndarray, k: int = 2) -> np.ndarray:
    """Mean over k×k blocks (cropped to a multiple of k): averages away JPEG block artefacts and
    brings the scale of the photographs' edges closer to that of the exercise's images."""
    h, w = img.shape[0] // k * k, img.shape[1] // k * k
    return img[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))


def whiten_1f(img: np.ndarray, f0: float = 0.3) -> np.ndarray:
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


def normalize_patches(p: np.ndarray) -> np.ndarray:
    """UFLDL ``normalizeData``: remove each patch's mean, clip to ±3σ, rescale to [0.1, 0.9]."""
    p = p - p.mean(axis=1, keepdims=True)
    s = 3 * p.std()
    return (np.clip(p, -s, s) / s + 1) * 0.4 + 0.1


def zca_whiten(p: np.ndarray, eps: float = 0.1) -> np.ndarray:
    """ZCA whitening of rows ``(n, d)`` with regulariser ε (UFLDL linear decoder: ε = 0.1)."""
    p = p - p.mean(axis=0)
    cov = p.T @ p / p.shape[0]
    u, s, _ = np.linalg.svd(cov)
    return p @ (u @ np.diag(1.0 / np.sqrt(s + eps)) @ u.T)


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
    images: list[np.ndarray], n: int, size: int = 8, whiten: str = "1/f", seed: int = 0
) -> np.ndarray:
    """``(n, size*size)`` float64 patches of grey ``images``, whitened and normalised as the
    exercise does: in [0.1, 0.9], or unbounded after ZCA (``whiten="zca"``, ε = 0.1 on the patches)."""
    check_patch_request(n, size, whiten)
    for k, im in enumerate(images):
        if im.shape[0] < size or im.shape[1] < size:
            raise ValueError(f"image {k} is {im.shape[1]}x{im.shape[0]} pixels, smaller than a {size}x{size} patch")
    if whiten == "1/f":
        images = [whiten_1f(im) for im in images]
    p = sample_patches(images, n, size, seed)
    if whiten == "zca":
        return zca_whiten(p - p.mean(axis=1, keepdims=True))
    return normalize_patches(p)


def natural_patches(n: int = 10_000, size: int = 8, whiten: str = "1/f", seed: int = 0) -> np.ndarray:
    """The default data set: ``(n, size*size)`` float64 patches in [0.1, 0.9] (ZCA: unbounded)."""
    check_patch_request(n, size, whiten)  # before the photographs are loaded
    return image_patches([downsample(im) for im in grey_sample_images()], n, size, whiten, seed)


def value_range(whiten: str) -> tuple[float, float] | None:
    """The interval every patch value lies in for a whitening: ``(0.1, 0.9)`` for ``"1/f"`` and
    ``"none"`` (UFLDL's normalisation), None for ``"zca"`` (unbounded, centred on 0)."""
    return None if whiten == "zca" else (0.1, 0.9)
