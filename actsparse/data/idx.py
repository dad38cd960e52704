"""MNIST-format IDX files (LeCun's ``train-images-idx3-ubyte`` and the like), plain or gzip-compressed.

Format (http://yann.lecun.com/exdb/mnist/): a 4-byte magic number — two zero bytes, a type code,
the number of dimensions — then one big-endian int32 per dimension, then the values in C order,
big-endian.

=========  ===========  =======
type code  values       NumPy
=========  ===========  =======
``0x08``   unsigned     ``>u1``
``0x09``   signed byte  ``>i1``
``0x0B``   short        ``>i2``
``0x0C``   int          ``>i4``
``0x0D``   float        ``>f4``
``0x0E``   double       ``>f8``
=========  ===========  =======

:func:`read_idx` returns the stored array unchanged; :func:`load_idx` turns it into training
samples ``(samples, features)`` float32 (unsigned bytes scaled to [0, 1]).
"""

from __future__ import annotations

import gzip
import math
import re
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDX_DTYPES", "read_idx", "load_idx", "is_idx_path"]

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def is_idx_path(path: str | Path) -> bool:
    """Whether a file name looks like an IDX file: ``*.idx``, ``*.idx3``, ``*-ubyte``, each
    optionally followed by ``.gz`` (``train-images-idx3-ubyte.gz``, ``t10k-labels.idx1-ubyte``)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith("-ubyte"):
        return True
    return re.search(r".\.idx\d*$", name) is not None


def _read_bytes(p: Path) -> bytes:
    raw = p.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a cut-off stream is EOFError
        raise ValueError(f"{p} is a damaged or truncated gzip file: {err}") from err


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (gzip-compressed or not), in native byte order.

    Returns:
        An array of the file's shape and type (e.g. ``(60000, 28, 28)`` uint8 for MNIST images,
        ``(60000,)`` uint8 for its labels).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a bad magic number or type code, a truncated header or body, or bytes left over
            after the data (the message gives the expected and actual sizes).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"IDX file not found: {p}")
    buf = _read_bytes(p)
    if len(buf) < 4:
        raise ValueError(f"{p} is not an IDX file: {len(buf)} bytes, shorter than the 4-byte magic number")
    zero0, zero1, code, ndim = buf[0], buf[1], buf[2], buf[3]
    if zero0 or zero1:
        raise ValueError(
            f"{p} is not an IDX file: its magic number {buf[:4].hex()} does not start with two zero bytes"
            + (" (is it compressed with something other than gzip?)" if buf[:1] in (b"B", b"P", b"\xfd") else "")
        )
    if code not in IDX_DTYPES:
        valid = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{p}: unknown IDX type code 0x{code:02X} in the magic number; valid: {valid}")
    if ndim == 0:
        raise ValueError(f"{p}: the IDX magic number says 0 dimensions")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{p} is truncated: the header of a {ndim}-D IDX file needs {header} bytes, got {len(buf)}")
    shape = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a garbage header cannot overflow int64
    body = len(buf) - header
    if body < expected:
        raise ValueError(
            f"{p} is truncated: shape {shape} of {dtype.name} needs {expected} data bytes, got {body}"
        )
    if body > expected:
        raise ValueError(
            f"{p} has the wrong size: shape {shape} of {dtype.name} needs {expected} data bytes, "
            f"got {body} ({body - expected} too many; is the header right?)"
        )
    arr = np.frombuffer(buf, dtype=dtype, count=expected // dtype.itemsize, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))  # a native-order, writable copy


def load_idx(path: str | Path) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Training samples from an IDX file: ``(x, image_shape)``.

    * ``(n, h, w)`` images become ``(n, h*w)`` with ``image_shape = (h, w)``;
    * ``(n, d)`` stays ``(n, d)``; more dimensions are flattened after the first (no image shape);
    * unsigned bytes (``0x08``) are divided by 255, so MNIST pixels lie in [0, 1]; other types are
      converted to float32 unscaled.

    Raises:
        ValueError: as :func:`read_idx`, or a 1-D file (labels, not samples).
    """
    arr = read_idx(path)
    if arr.ndim == 1:
        raise ValueError(
            f"{path} holds a 1-D array of {arr.shape[0]} values (labels?), not samples: "
            "use the images file (e.g. train-images-idx3-ubyte)"
        )
    if arr.size == 0:
        raise ValueError(f"{path} holds no samples: its shape is {arr.shape}")
    image_shape = (int(arr.shape[1]), int(arr.shape[2])) if arr.ndim == 3 else None
    x = arr.reshape(arr.shape[0], -1)
    if arr.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0), image_shape
    return x.astype(np.float32), image_shape
