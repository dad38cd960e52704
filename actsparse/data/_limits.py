"""Limits and error helpers shared by the data loaders.

``ACTSPARSE_MAX_BYTES`` (environment variable, a number of bytes, default 1 GiB = 1073741824):
the largest decoded size a data file may declare in its header before its body is read —
an IDX file's data bytes (the product of its dimensions times the value size), an image's
``width * height * 8`` bytes (the float64 grey array it becomes). A small compressed file can
declare gigabytes (a "decompression bomb"); the loaders refuse it, naming the file, the
declared size and the limit, before decompressing anything. Raise the variable to read larger
files, e.g. ``ACTSPARSE_MAX_BYTES=8000000000``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MAX_BYTES_ENV", "DEFAULT_MAX_BYTES", "MissingDependency", "max_bytes", "check_declared_size",
           "one_line"]

MAX_BYTES_ENV = "ACTSPARSE_MAX_BYTES"
DEFAULT_MAX_BYTES = 1 << 30


class MissingDependency(ModuleNotFoundError, RuntimeError):
    """An optional package is missing. A ``ModuleNotFoundError`` (what the library documents) that is
    also a ``RuntimeError``, so the ``actsparse`` command reports it as one line."""


def max_bytes() -> int:
    """The limit in bytes from ``ACTSPARSE_MAX_BYTES`` (default 1 GiB)."""
    raw = os.environ.get(MAX_BYTES_ENV, "").strip().replace("_", "")
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        value = int(float(raw)) if any(c in raw for c in ".eE") else int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{MAX_BYTES_ENV} must be a positive number of bytes (e.g. 4000000000), got {raw!r}")
    return value


def _human(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def check_declared_size(path: str | Path, what: str, nbytes: int) -> None:
    """Raise ``ValueError`` if ``nbytes``, the decoded size a file's header declares, exceeds the limit.

    ``what`` says what was declared (``"shape (60000, 28, 28) of uint8"``, ``"a 15000x15000 image"``).
    """
    limit = max_bytes()
    if nbytes > limit:
        raise ValueError(
            f"{path} declares {what}: {nbytes} bytes ({_human(nbytes)}) once decoded, over the limit of "
            f"{limit} bytes ({_human(limit)}), so its data were not read. If the file is genuine, raise the "
            f"limit: {MAX_BYTES_ENV}={nbytes} (environment variable, in bytes)"
        )


def one_line(text: object, limit: int = 300) -> str:
    """``text`` on one line: whitespace runs collapsed, cut to ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."
