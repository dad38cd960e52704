"""Crash-safe resumable checkpoints: one self-checking file per checkpoint, the previous one kept.

A resumable checkpoint is one file, ``checkpoint.pt``, that holds everything a resume needs
(weights, optimiser state, step, RNG states), so no kill can leave a mismatched pair of files.
Each write

1. serialises the payload with :func:`torch.save` into memory and prefixes it with a header line
   ``ACTSPARSE-CHECKPOINT 1 <sha256 of the payload> <payload length>``;
2. writes it to ``checkpoint.pt.tmp``, flushes and ``fsync``\\ s it;
3. renames the current ``checkpoint.pt`` to ``checkpoint.prev.pt`` and the new file to
   ``checkpoint.pt`` (``os.replace`` is atomic on POSIX), then ``fsync``\\ s the folder.

A kill at any point leaves the loader a complete, verified file: before step 3 the old
``checkpoint.pt``; between the two renames ``checkpoint.prev.pt``, which is then the newest.
:func:`load_latest` verifies the header's length and digest, so a truncated or corrupted file is
detected (with its name in the message) and the previous good one is used instead.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT", "PREVIOUS", "CheckpointError", "CheckpointWarning", "atomic_write", "fsync_dir",
           "write_checkpoint",
           "read_checkpoint", "load_latest", "checkpoint_paths"]

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
_MAGIC = b"ACTSPARSE-CHECKPOINT"
_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and the reason."""


class CheckpointWarning(UserWarning):
    """A checkpoint was damaged and an older one is used instead."""


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (a no-op where a folder cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None], *, previous: Path | None = None) -> None:
    """Write ``path`` through ``write(tmp)`` on ``path.tmp``, fsync it and rename it into place.

    A reader sees the old file or the complete new one, never half a file. With ``previous``, the
    old file is first renamed to it (so the last good version is kept beside the new one). On
    failure (disk full, permission) the temporary file is removed, the old file is untouched, and
    a :class:`CheckpointError` names the file and the reason."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)  # a kill right after this: previous is the newest, and complete
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
        if previous is None:
            raise CheckpointError(f"cannot write {path}: {reason}; the previous version, if any, is kept") from err
        kept = path if path.exists() else previous
        raise CheckpointError(f"cannot write {path}: {reason}; the last good checkpoint "
                              f"{kept if kept.exists() else '(none)'} is kept") from err
    fsync_dir(path.parent)


def _encode(payload: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = b"%s %d %s %d\n" % (_MAGIC, _VERSION, hashlib.sha256(body).hexdigest().encode(), len(body))
    return header + body


def write_checkpoint(run_dir: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as ``run_dir/checkpoint.pt``, keeping the one before as ``checkpoint.prev.pt``.

    ``payload`` holds tensors, numbers, strings and containers of them (``torch.load`` reads it
    back with ``weights_only=True``). Returns the path written."""
    run_dir = Path(run_dir)
    data = _encode(payload)
    atomic_write(run_dir / CHECKPOINT, lambda p: p.write_bytes(data), previous=run_dir / PREVIOUS)
    return run_dir / CHECKPOINT


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Read and verify one checkpoint file.

    Raises:
        CheckpointError: the file is missing, not a checkpoint, truncated, or its contents do not
            match the digest in its header (the message names the file and which check failed).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from err
    header, sep, body = data.partition(b"\n")
    parts = header.split(b" ")
    if not sep or len(parts) != 4 or parts[0] != _MAGIC:
        raise CheckpointError(f"{path} is not an actsparse checkpoint (bad header)")
    try:
        version, digest, length = int(parts[1]), parts[2].decode(), int(parts[3])
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not an actsparse checkpoint (bad header)") from err
    if version > _VERSION:
        raise CheckpointError(f"{path} was written by a newer actsparse (format {version} > {_VERSION})")
    if len(body) != length:
        raise CheckpointError(f"{path} is truncated: {len(body)} of {length} bytes")
    if hashlib.sha256(body).hexdigest() != digest:
        raise CheckpointError(f"{path} is corrupt: its contents do not match the SHA-256 in its header")
    try:
        return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as err:  # a payload that verifies but does not unpickle: a foreign writer
        raise CheckpointError(f"{path} cannot be loaded: {err}") from err


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """The checkpoint files of ``run_dir`` that exist, newest first."""
    return [p for p in (Path(run_dir) / CHECKPOINT, Path(run_dir) / PREVIOUS) if p.is_file()]


def load_latest(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint of ``run_dir`` that verifies, and its path; ``None`` if there is none.

    A damaged ``checkpoint.pt`` gives a :class:`CheckpointWarning` that names it, and
    ``checkpoint.prev.pt`` is used. If every file present is damaged, a :class:`CheckpointError`
    lists each one with its reason."""
    errors = []
    for path in checkpoint_paths(run_dir):
        try:
            payload = read_checkpoint(path)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        if errors:
            warnings.warn(f"{errors[0]}; resuming from the previous checkpoint {path} (step {payload.get('step')})",
                          CheckpointWarning, stacklevel=2)
        return payload, path
    if errors:
        raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
    return None
