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

from ._limits import check_declared_size, max_bytes

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


_CHUNK = 1 << 20


def _open(p: Path):
    """``(file object, compressed)``: a gzip stream for a gzip file (decompressed as it is read,
    never all at once), else the plain file."""
    with open(p, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
    return (gzip.open(p, "rb") if compressed else open(p, "rb")), compressed


def _readinto_full(f, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:got + _CHUNK])
        if not n:
            break
        got += n
    return got


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (gzip-compressed or not), in native byte order.

    The header is read first, and the size it declares is checked before the body is read (a gzip
    file is decompressed as a stream, never all at once): a file whose data would exceed
    ``ACTSPARSE_MAX_BYTES`` bytes (environment variable, default 1 GiB; see
    :mod:`actsparse.data._limits`) is refused, so that a small compressed file declaring gigabytes
    (a "decompression bomb") cannot fill the memory. Set the variable higher to read larger files.

    Returns:
        An array of the file's shape and type (e.g. ``(60000, 28, 28)`` uint8 for MNIST images,
        ``(60000,)`` uint8 for its labels).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a bad magic number or type code, a truncated header or body, bytes left over
            after the data (the message gives the expected and actual sizes), or a declared size
            over the limit.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"IDX file not found: {p}")
    f, compressed = _open(p)
    try:
        with f:
            return _read_idx_stream(p, f, compressed)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a cut-off stream is EOFError
        if not compressed:
            raise
        raise ValueError(f"{p} is a damaged or truncated gzip file: {err}") from err


def _read_idx_stream(p: Path, f, compressed: bool) -> np.ndarray:
    magic = f.read(4)
    if len(magic) < 4:
        raise ValueError(f"{p} is not an IDX file: {len(magic)} bytes, shorter than the 4-byte magic number")
    zero0, zero1, code, ndim = magic[0], magic[1], magic[2], magic[3]
    if zero0 or zero1:
        raise ValueError(
            f"{p} is not an IDX file: its magic number {magic.hex()} does not start with two zero bytes"
            + (" (is it compressed with something other than gzip?)" if magic[:1] in (b"B", b"P", b"\xfd") else "")
        )
    if code not in IDX_DTYPES:
        valid = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{p}: unknown IDX type code 0x{code:02X} in the magic number; valid: {valid}")
    if ndim == 0:
        raise ValueError(f"{p}: the IDX magic number says 0 dimensions")
    header = 4 + 4 * ndim
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(f"{p} is truncated: the header of a {ndim}-D IDX file needs {header} bytes, "
                         f"got {4 + len(dims)}")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4", count=ndim))
    dtype = IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a garbage header cannot overflow int64
    if not compressed:  # the body's size is known without reading it
        body = p.stat().st_size - header
        if body < expected:
            raise ValueError(f"{p} is truncated: shape {shape} of {dtype.name} needs {expected} data bytes, got {body}")
        if body > expected:
            raise ValueError(
                f"{p} has the wrong size: shape {shape} of {dtype.name} needs {expected} data bytes, "
                f"got {body} ({body - expected} too many; is the header right?)"
            )
    check_declared_size(p, f"shape {shape} of {dtype.name} in its IDX header", expected)
    arr = np.empty(shape, dtype=dtype)
    got = _readinto_full(f, memoryview(arr.reshape(-1)).cast("B")) if expected else 0
    if got < expected:
        raise ValueError(f"{p} is truncated: shape {shape} of {dtype.name} needs {expected} data bytes, got {got}")
    extra, cap = 0, max_bytes()
    while extra <= cap:  # count what is left (bounded: a bomb's tail is not read to its end)
        chunk = f.read(_CHUNK)
        if not chunk:
            break
        extra += len(chunk)
    if extra:
        got_all = f"{expected + extra}" if extra <= cap else f"more than {expected + cap}"
        raise ValueError(
            f"{p} has the wrong size: shape {shape} of {dtype.name} needs {expected} data bytes, "
            f"got {got_all} ({extra if extra <= cap else f'over {cap}'} too many; is the header right?)"
        )
    if not dtype.isnative:
        arr.byteswap(inplace=True)  # to native order, in place: no second copy of a large file
        arr = arr.view(dtype.newbyteorder("="))
    return arr


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
