"""``model.safetensors``: the exported weights of a run, written and read in one place.

The file is a plain safetensors file that any safetensors reader opens. Its metadata carries a
SHA-256 of its tensors under :data:`DIGEST_KEY`, so that a flipped bit or a damaged copy is
detected when the file is read instead of giving silently wrong numbers (``checkpoint.pt`` is
checked the same way, :mod:`actsparse.checkpoint`).

The digest (:func:`tensors_sha256`) is SHA-256 over the tensors in sorted name order (Python's
``sorted`` of the names: by code point). For each tensor it takes

1. the record ``json.dumps([name, dtype, shape], separators=(",", ":"))`` (``ensure_ascii``, so
   ASCII), e.g. ``["W_enc","F32",[8,64]]``, encoded as ASCII and followed by ``b"\\n"``; ``dtype``
   is the safetensors header's code (``F32``, ``BF16``, ``I64``, ``BOOL``, ...) and ``shape`` the
   list of its dimensions (``[]`` for a scalar);
2. then the tensor's raw data as stored in the file: C order, little-endian, ``numel · itemsize``
   bytes (the bytes between its ``data_offsets``).

The ``__metadata__`` entries themselves are not covered: they are not read as numbers. A file
without :data:`DIGEST_KEY` was written before the digest existed (or by other code): it is
loaded, with a :class:`WeightsWarning` once per process for each distinct content, and left as it is.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import warnings
from pathlib import Path

import torch

from .checkpoint import atomic_write

__all__ = ["DIGEST_KEY", "WeightsWarning", "save_weights", "load_weights", "tensors_sha256"]

#: The ``__metadata__`` key that holds the hex SHA-256 of the tensors (64 lowercase hex digits).
DIGEST_KEY = "actsparse_sha256"

#: torch dtype -> the safetensors header's dtype code (safetensors' own table, ``safetensors.torch``).
_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
}
# dtypes that only some torch versions have
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e4m3fnuz", "F8_E4M3FNUZ"), ("float8_e5m2", "F8_E5M2"),
                     ("float8_e5m2fnuz", "F8_E5M2FNUZ"), ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _CODES[getattr(torch, _name)] = _code

_HEX64 = re.compile(r"[0-9a-f]{64}")

#: digests of the unverifiable files already warned about: one warning per file, not one per load.
#: Keyed by content, not path: a byte-identical copy of a file (or the same file read again by
#: eval, then report) says nothing new; a file rewritten in place with other weights warns again.
_warned: set[str] = set()


class WeightsWarning(UserWarning):
    """A ``model.safetensors`` carries no digest (written before actsparse recorded one): it cannot be verified."""


def _little_endian_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` as safetensors stores them: a flat uint8 CPU tensor (a view where it can be)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8)
    if sys.byteorder == "big" and flat.element_size() > 1:
        # safetensors files are little-endian whatever the host: reverse the bytes of each element
        raw = raw.reshape(-1, flat.element_size()).flip(1).reshape(-1)
    return raw


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """The hex SHA-256 of ``state`` (name -> tensor, any shape) as stored in a safetensors file;
    see the module docstring for the exact bytes hashed.

    Raises:
        TypeError: a tensor whose dtype safetensors cannot store.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if t.dtype not in _CODES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        record = json.dumps([name, _CODES[t.dtype], list(t.shape)], separators=(",", ":"))
        h.update(record.encode("ascii") + b"\n")
        # numpy's buffer, not bytes(): no copy of a large tensor just to hash it
        h.update(_little_endian_bytes(t).numpy())
    return h.hexdigest()


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``state`` (name -> CPU tensor, any shape) to ``path`` atomically, as safetensors.

    ``metadata`` (str -> str, default none) goes into the file's ``__metadata__`` together with
    :data:`DIGEST_KEY`, the SHA-256 of the tensors (:func:`tensors_sha256`); a ``DIGEST_KEY`` in
    ``metadata`` is replaced by the digest of ``state``.
    """
    from safetensors.torch import save_file

    meta = dict(metadata or {}) | {DIGEST_KEY: tensors_sha256(state)}
    atomic_write(Path(path), lambda p: save_file(state, str(p), metadata=meta))


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read the tensors (name -> CPU tensor) of a ``model.safetensors`` written by :func:`save_weights`,
    after checking them against the SHA-256 in its metadata.

    A file without the digest (written by an actsparse that did not record one, or by other code)
    is read as it is, with a :class:`WeightsWarning` the first time these weights are read in this
    process (from this path or a byte-identical copy); the file is not rewritten.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a readable safetensors file (truncated, not safetensors), or
            its tensors do not match the recorded digest (the file is corrupt). The message is one
            line and names the file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError (and others) for a damaged file
        raise ValueError(f"{path} is not a readable safetensors file (truncated or damaged?): {_one_line(err)}") \
            from err
    recorded = metadata.get(DIGEST_KEY)
    if recorded is None:
        try:
            key = tensors_sha256(tensors)
        except TypeError:  # a dtype the digest does not cover: fall back to one warning per path
            key = str(path.resolve())
        if key not in _warned:
            _warned.add(key)
            warnings.warn(WeightsWarning(
                f"{path} predates checksums (no {DIGEST_KEY!r} in its metadata; or it was written by other "
                "code): its weights cannot be verified and are loaded as they are"), stacklevel=2)
        return tensors
    # a damaged digest is as untrustworthy as damaged tensors: both are "corrupt"
    if not _HEX64.fullmatch(recorded) or tensors_sha256(tensors) != recorded:
        raise ValueError(f"{path} is corrupt: its tensors do not match the SHA-256 recorded in its metadata "
                         f"({DIGEST_KEY}); restore it from a good copy or retrain")
    return tensors
