"""Patches from a folder of your own images (PNG, JPEG, TIFF, BMP, … — whatever Pillow reads).

Every file directly inside the folder is read as a grey image in [0, 1] (colour through the luma
weights 0.299, 0.587, 0.114, as :func:`~actsparse.data.patches.grey_sample_images`; an alpha
channel is ignored). The images may differ in size. Patches are then cut and normalised exactly as
for the embedded photographs (:func:`actsparse.data.patches.image_patches`): optional 1/f whitening
of each image, random ``size``×``size`` patches drawn evenly over the images of which the half of
highest contrast is kept, a random symmetry of the square for each, and UFLDL's normalisation to
[0.1, 0.9] (or ZCA on the normalised patches). The images are not downsampled.

Files whose names start with a dot (``.DS_Store``) are skipped. Any other file that is not an
image, a sub-folder, or an image smaller than a patch is an error that names it: a silently
skipped file would change the data without telling you.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ._limits import MissingDependency, check_declared_size, one_line
from .patches import check_patch_request, image_patches

__all__ = ["read_grey_image", "load_image_folder", "image_patches", "folder_patches"]

_LUMA = np.array([0.299, 0.587, 0.114])


def _pil():
    try:
        from PIL import Image
    except ModuleNotFoundError as err:
        raise MissingDependency(
            "reading a folder of images needs Pillow: pip install pillow (matplotlib installs it)", name="PIL"
        ) from err
    return Image


def read_grey_image(path: str | Path) -> np.ndarray:
    """One image file as a float64 grey array ``(h, w)`` in [0, 1].

    8-bit images are divided by 255, 16-bit ones by 65535; floating-point images are kept as
    they are.

    The size in the image's header is checked before its pixels are decoded: an image whose grey
    array (``width * height * 8`` bytes) would exceed ``ACTSPARSE_MAX_BYTES`` (environment variable,
    default 1 GiB, about 134 million pixels; see :mod:`actsparse.data._limits`) is refused, so that a
    small file declaring a huge image (a "decompression bomb") cannot fill the memory. This check
    replaces Pillow's own ``Image.MAX_IMAGE_PIXELS`` for the files read here.

    Raises:
        ValueError: the file is not an image Pillow can read, is damaged, or declares a size over the
            limit (the message names it).
    """
    Image = _pil()
    p = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # the limit below applies instead (it names the file and the variable)
            try:
                im = Image.open(p)  # lazy: reads the header only
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with im:
            w, h = im.size
            check_declared_size(p, f"a {w}x{h} image", int(w) * int(h) * 8)
            im.load()  # decode now, so that a truncated file fails here, with its name
            mode = im.mode
            if mode == "F":
                return np.asarray(im, dtype=np.float64)
            if mode.startswith("I"):  # 16-bit PNG/TIFF ("I;16", "I;16B") or 32-bit int ("I")
                return np.asarray(im, dtype=np.float64) / 65535.0
            if mode in ("L", "1"):
                return np.asarray(im.convert("L"), dtype=np.float64) / 255.0
            rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{p} is not an image that can be read ({type(err).__name__}: {one_line(err)})") from err
    except ValueError as err:
        if str(err).startswith(str(p)):  # the size check's own message
            raise
        raise ValueError(f"{p} is not an image that can be read ({type(err).__name__}: {one_line(err)})") from err
    return rgb @ _LUMA / 255.0


def load_image_folder(folder: str | Path) -> tuple[list[np.ndarray], list[Path]]:
    """Every image directly inside ``folder``, as grey arrays, with their paths (sorted by name).

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        NotADirectoryError: ``folder`` is a file.
        ValueError: the folder holds no images, a sub-folder, or a file that is not an image.
    """
    d = Path(folder)
    if not d.exists():
        raise FileNotFoundError(f"image folder not found: {d}")
    if not d.is_dir():
        raise NotADirectoryError(f"{d} is not a folder")
    paths = sorted(p for p in d.iterdir() if not p.name.startswith("."))
    for p in paths:
        if p.is_dir():
            raise ValueError(f"{p} is a folder: only the images directly inside {d} are read; move them up or out")
    if not paths:
        raise ValueError(f"the image folder {d} is empty: put PNG or JPEG images in it")
    return [read_grey_image(p) for p in paths], paths


def folder_patches(
    folder: str | Path, n: int, size: int = 8, whiten: str = "1/f", seed: int = 0
) -> tuple[np.ndarray, int]:
    """``n`` random ``size``×``size`` patches of the images in ``folder``: ``(patches, n_images)``.

    Raises:
        ValueError: as :func:`load_image_folder`, or an image smaller than ``size``×``size``.
    """
    check_patch_request(n, size, whiten)  # before reading every image
    images, paths = load_image_folder(folder)
    for im, p in zip(images, paths):
        if im.shape[0] < size or im.shape[1] < size:
            raise ValueError(f"{p} is {im.shape[1]}x{im.shape[0]} pixels, smaller than a {size}x{size} patch")
        if whiten == "1/f" and np.ptp(im) == 0:  # whitening divides by the image's spread
            raise ValueError(f"{p} is a single flat colour: it has no structure to whiten or learn from")
    return image_patches(images, n, size, whiten, seed), len(images)
