"""A sharded on-disk store of activation rows: memory-mapped ``.npy`` shards and an ``index.json``.

Layout of a store directory::

    index.json          what is stored (below); the only file a reader trusts
    shard-000000.npy    rows 0 .. shard_size-1, a (rows, d) array of the store's dtype
    shard-000001.npy    the next shard_size rows, and so on; only the last shard may be shorter

``index.json``::

    {"format": "actsparse-shards", "version": 1, "d": 64, "dtype": "float32",
     "shard_size": 65536, "rows": 131072, "complete": true,
     "source": {...how the rows were made...},
     "shards": [{"file": "shard-000000.npy", "rows": 65536}, ...],
     "resume": {"batch": 2047, "row": 64}}

Crash safety. Each shard is written to ``NAME.tmp``, fsync'd, and renamed to ``NAME``; then the
index is rewritten the same way (tmp, fsync, rename, fsync of the directory). So at any moment —
also after ``kill -9`` or a power cut — the index lists only shards that are complete on disk, and
``rows`` counts exactly their rows. ``complete`` becomes true when the writer is closed. Opening a
:class:`ShardWriter` on an existing store with the same arguments resumes it: the rows already
stored are kept, ``resume`` says where the input stream stood after the last stored row (input
batch, rows of it stored), and leftovers of the killed run (``shard-NNNNNN.npy`` not in the index,
the ``.tmp`` files of the store's own names) are deleted. The index is written when the writer
opens, before any shard, so a store folder is always recognisable; a writer refuses a non-empty
folder without a store index (also with ``overwrite``) and deletes nothing there, and it never
deletes a file whose name the store does not use.

Reading checks the rows as they are read: a NaN or Inf raises a ``ValueError`` naming the store,
the shard file and the row (:meth:`ShardStore.check_finite` scans a whole store).

Reading. :class:`ShardStore` checks the index and every shard's header and size at open (errors
name the file), memory-maps the shards (``np.load(mmap_mode="r")``), and yields shuffled
minibatches with a bounded shuffle buffer: the rows of ``buffer_shards`` shards at a time, in an
order drawn from ``(seed, epoch)``, so resident memory does not grow with the store. ``rank`` and
``world_size`` give each process a disjoint part of every epoch (see
:meth:`ShardStore.iter_batches`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import fsync_dir

__all__ = ["ShardWriter", "ShardStore", "describe_source", "check_store_dir", "INDEX_NAME", "STORE_DTYPES"]

INDEX_NAME = "index.json"
FORMAT = "actsparse-shards"
VERSION = 1
#: dtypes a store can hold (.npy has no bfloat16: bfloat16 activations are stored as float32 or float16)
STORE_DTYPES = ("float32", "float16", "float64")
_TMP = ".tmp"
#: The only names a writer ever creates in a store folder: the shards, their temp files, the index's
#: temp file. Only these are deleted (leftovers of a killed run, or by ``overwrite``), never anything else.
_OWN_NAME = re.compile(r"shard-\d{6}\.npy(\.tmp)?|" + re.escape(INDEX_NAME + _TMP))


def _dtype_name(dtype: str | np.dtype | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = dtype
    else:
        name = np.dtype(dtype).name
    if name not in STORE_DTYPES:
        raise ValueError(f"a shard store holds one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    return name


def _shard_name(i: int) -> str:
    return f"shard-{i:06d}.npy"


def _write_atomic(path: Path, write) -> None:
    """Write ``path`` through ``write(file)`` into ``path.tmp``, fsync, rename over ``path``."""
    tmp = path.with_name(path.name + _TMP)
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _json_value(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))  # tuples become lists, as they will when read back
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serialisable: {err}") from err


def _read_index(directory: Path) -> dict[str, Any]:
    path = directory / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no shard index {path}: not a store written by ShardWriter or actsparse "
                                "cache-activations (or its cache run was stopped before the first shard was complete)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt shard index {path}: {err}") from err
    problem = _index_problem(index)
    if problem:
        raise ValueError(f"corrupt shard index {path}: {problem}")
    return index


def check_store_dir(directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Raise ``ValueError`` unless ``directory`` may receive a shard store: it does not exist, is
    empty, or is a store (its ``index.json`` is a shard-store index). Nothing is deleted here, and
    a :class:`ShardWriter` deletes nothing in a folder this refuses: only a store's own files
    (``shard-NNNNNN.npy``, ``*.tmp`` of those, the index) are ever removed, and only in a store.

    Raises:
        ValueError: ``directory`` is a file, or a non-empty folder that is not a shard store (the
            message says so; pass another, new or empty, folder).
    """
    d = Path(directory)
    if not d.exists():
        return
    if not d.is_dir():
        raise ValueError(f"{d} is a file, not a folder: a shard store is a folder; choose a new or empty one")
    index = d / INDEX_NAME
    if index.exists():
        try:
            found = json.loads(index.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError) as err:
            raise ValueError(f"{index} is not a readable shard-store index ({type(err).__name__}), so {d} is not "
                             "recognisably a shard store and nothing in it was touched: write the store to a new or "
                             "empty folder (delete the folder yourself if it is a damaged store)") from err
        if not isinstance(found, dict) or found.get("format") != FORMAT:
            raise ValueError(f"{index} is not a shard-store index (no \"format\": \"{FORMAT}\"), so {d} is not a "
                             "shard store and nothing in it was touched: write the store to a new or empty folder")
        return
    others = sorted(p.name for p in d.iterdir() if p.name != INDEX_NAME + _TMP)
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise ValueError(f"{d} is not empty ({shown}) and is not a shard store (it has no {INDEX_NAME}); "
                         f"{'--overwrite deletes only a store, so ' if overwrite else ''}nothing in it was touched: "
                         "write the store to a new or empty folder")


def _index_problem(index: Any) -> str | None:
    if not isinstance(index, dict):
        return "not a JSON object"
    if index.get("format") != FORMAT:
        return f"format is {index.get('format')!r}, expected {FORMAT!r}"
    if index.get("version") != VERSION:
        return f"version {index.get('version')!r} is not supported (this actsparse reads version {VERSION})"
    for key, kinds in (("d", (int, type(None))), ("dtype", str), ("shard_size", int), ("rows", int),
                       ("complete", bool), ("shards", list)):
        if key not in index or not isinstance(index[key], kinds):
            return f"{key!r} is missing or of the wrong type"
    if index["dtype"] not in STORE_DTYPES:
        return f"dtype {index['dtype']!r} is not one of {', '.join(STORE_DTYPES)}"
    for i, s in enumerate(index["shards"]):
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("rows"), int)
                and s["rows"] > 0 and "/" not in s["file"] and "\\" not in s["file"]):
            return f"shard entry {i} is not {{'file': NAME, 'rows': N > 0}}"
    if sum(s["rows"] for s in index["shards"]) != index["rows"]:
        return f"'rows' is {index['rows']}, but the shards hold {sum(s['rows'] for s in index['shards'])}"
    if index["shards"] and index["d"] is None:
        return "'d' is null, but there are shards"
    return None


def _check_shard(path: Path, rows: int, d: int, dtype: str) -> None:
    """Raise if the shard at ``path`` is missing, not a (rows, d) ``dtype`` .npy, or truncated."""
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} is listed in {path.parent / INDEX_NAME} but missing")
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, found = read(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as err:
        raise ValueError(f"shard {path} is not a valid .npy file: {err}") from err
    if tuple(shape) != (rows, d) or found != np.dtype(dtype) or fortran:
        raise ValueError(f"shard {path} holds a {tuple(shape)} {found} array; the index lists ({rows}, {d}) {dtype}")
    size, expected = path.stat().st_size, offset + rows * d * np.dtype(dtype).itemsize
    if size < expected:
        raise ValueError(f"shard {path} is truncated: {size} bytes, expected {expected}")


class ShardWriter:
    """Write ``(n, d)`` rows into a shard store, crash-safely, resuming an unfinished one.

    Args:
        directory: the store's folder (created if needed).
        d: row width; None takes it from the first :meth:`write` (or from an existing index).
        dtype: ``"float32"`` (default), ``"float16"`` or ``"float64"``; rows are cast to it.
        shard_size: rows per shard (default 65,536; the last shard may hold fewer).
        source: a JSON-serialisable description of how the rows are made (model, layer, inputs...),
            kept in the index; resuming needs the same one.
        overwrite: delete an existing store in ``directory`` and start over.

    ``directory`` must be new, empty, or a store (:func:`check_store_dir`): a non-empty folder
    without a shard-store ``index.json`` is refused, with or without ``overwrite``, and nothing in
    it is deleted. The index is written at once, so the folder is recognisably a store from then
    on. Only the store's own files are ever deleted (unlisted ``shard-NNNNNN.npy``, ``*.tmp`` of the
    store's files; with ``overwrite``, the store's shards and index).

    An existing index with the same ``d`` (if given), dtype, shard size and source is resumed:
    :attr:`rows` are already stored, :attr:`resume` tells where the input stood, and
    :attr:`complete` is True if there is nothing left to write. Other arguments raise a
    ``ValueError`` naming the differences.

    Use as a context manager: leaving the block normally calls :meth:`close` (the last, shorter
    shard is written and the store marked complete); leaving it by an exception keeps only the
    complete shards, so that a rerun resumes.
    """

    def __init__(self, directory: str | os.PathLike, d: int | None = None, dtype: str | np.dtype | torch.dtype =
                 "float32", shard_size: int = 65536, *, source: Any = None, overwrite: bool = False) -> None:
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise ValueError(f"d must be a positive int, got {d!r}")
        self.directory = Path(directory)
        self.d = d
        self.dtype = _dtype_name(dtype)
        self.shard_size = shard_size
        self.source = _json_value(source, "source")
        self.shards: list[dict[str, Any]] = []
        self.rows = 0  # rows in complete shards, all listed in the index
        self.resume: dict[str, int] | None = None
        self.complete = False
        self._buffer: list[np.ndarray] = []
        self._marks: list[tuple[int, int] | None] = []  # (input batch, first row in it) per buffered chunk
        self._buffered = 0
        check_store_dir(self.directory, overwrite=overwrite)  # before anything is created or deleted
        self.directory.mkdir(parents=True, exist_ok=True)
        if (self.directory / INDEX_NAME).is_file():
            if overwrite:
                self._delete_store()
            else:
                self._resume_existing()
        self._clean_leftovers()
        if not (self.directory / INDEX_NAME).is_file():
            # an index at once, before any shard: the folder is then recognisably a store, so a rerun
            # after a kill before the first complete shard may clean up and resume it
            self._write_index()

    # ------------------------------------------------------------ opening
    def _delete_store(self) -> None:
        for p in self.directory.iterdir():  # the store's own files only (check_store_dir: it is a store)
            if _OWN_NAME.fullmatch(p.name) and p.is_file():
                p.unlink()
        (self.directory / INDEX_NAME).unlink()

    def _resume_existing(self) -> None:
        index = _read_index(self.directory)
        theirs = {"dtype": index["dtype"], "shard_size": index["shard_size"], "source": index.get("source")}
        ours = {"dtype": self.dtype, "shard_size": self.shard_size, "source": self.source}
        if self.d is not None and index["d"] is not None:
            theirs["d"], ours["d"] = index["d"], self.d
        diff = [f"{k}: stored {theirs[k]!r}, now {ours[k]!r}" for k in ours if ours[k] != theirs[k]]
        if diff:
            raise ValueError(f"{self.directory} holds a store made with other arguments ({'; '.join(diff)}); "
                             "rerun with the same arguments to resume it, or overwrite it")
        for s in index["shards"]:
            _check_shard(self.directory / s["file"], s["rows"], index["d"], index["dtype"])
        self.d = index["d"] if index["d"] is not None else self.d
        self.shards = [dict(s) for s in index["shards"]]
        self.rows = index["rows"]
        self.resume = index.get("resume")
        self.complete = index["complete"]

    def _clean_leftovers(self) -> None:
        # a killed run may leave a temp file, or a renamed shard that the index does not list yet
        listed = {s["file"] for s in self.shards}
        for p in self.directory.iterdir():
            if _OWN_NAME.fullmatch(p.name) and p.name not in listed and p.is_file():
                p.unlink()

    # ------------------------------------------------------------ writing
    @property
    def n_rows(self) -> int:
        """Rows written so far: stored in complete shards plus buffered for the next shard."""
        return self.rows + self._buffered

    def write(self, x: Tensor | np.ndarray, *, position: tuple[int, int] | None = None) -> None:
        """Append ``x``, ``(n, d)``; every full ``shard_size`` rows become a shard on disk.

        ``position = (batch, row)``: ``x[0]`` is row ``row`` of input batch ``batch``. It is stored
        in the index as ``resume`` when a shard ends inside ``x``, so a resumed run can skip the
        stored input batches without recomputing them.
        """
        if self.complete:
            raise RuntimeError(f"the store in {self.directory} is complete; open it with overwrite to rewrite it")
        if isinstance(x, Tensor):
            x = x.detach().to("cpu", torch.float32 if x.dtype == torch.bfloat16 else None).numpy()
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"rows must be (n, d), got shape {x.shape}")
        if self.d is None:
            if x.shape[0] == 0:
                return
            self.d = int(x.shape[1])
        if x.shape[1] != self.d:
            raise ValueError(f"rows of width {x.shape[1]} do not fit a store of d={self.d}")
        if x.shape[0] == 0:
            return
        self._buffer.append(x.astype(self.dtype))  # a copy: the caller may reuse its array
        self._marks.append(position)
        self._buffered += x.shape[0]
        while self._buffered >= self.shard_size:
            self._write_shard(self.shard_size)

    def _write_shard(self, n: int) -> None:
        parts, cursor, taken = [], None, 0
        while taken < n:
            chunk, mark = self._buffer[0], self._marks[0]
            k = min(n - taken, chunk.shape[0])
            parts.append(chunk[:k])
            cursor = None if mark is None else {"batch": mark[0], "row": mark[1] + k}
            if k == chunk.shape[0]:
                self._buffer.pop(0)
                self._marks.pop(0)
            else:
                self._buffer[0] = chunk[k:]
                self._marks[0] = None if mark is None else (mark[0], mark[1] + k)
            taken += k
        arr = np.ascontiguousarray(np.concatenate(parts) if len(parts) > 1 else parts[0])
        name = _shard_name(len(self.shards))
        _write_atomic(self.directory / name, lambda f: np.lib.format.write_array(f, arr, allow_pickle=False))
        # only now, with the shard durable under its final name, does the index list it
        self.shards.append({"file": name, "rows": int(n)})
        self.rows += n
        self._buffered -= n
        self.resume = cursor
        self._write_index()

    def _write_index(self) -> None:
        index = {"format": FORMAT, "version": VERSION, "d": self.d, "dtype": self.dtype,
                 "shard_size": self.shard_size, "rows": self.rows, "complete": self.complete,
                 "source": self.source, "shards": self.shards, "resume": self.resume}
        text = json.dumps(index, indent=1).encode("utf-8")
        _write_atomic(self.directory / INDEX_NAME, lambda f: f.write(text))

    def close(self) -> None:
        """Write the buffered rows as the last shard and mark the store complete (idempotent)."""
        if self.complete:
            return
        if self.d is None:
            raise ValueError(f"nothing was written to {self.directory}: no rows, so d is unknown")
        if self._buffered:
            self._write_shard(self._buffered)
        self.complete = True
        self._write_index()

    def store(self) -> ShardStore:
        """The :class:`ShardStore` reading this directory (after :meth:`close`)."""
        return ShardStore(self.directory)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the complete shards only: a rerun resumes after them
            self._buffer.clear()
            self._marks.clear()
            self._buffered = 0

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{self._buffered} rows buffered"
        return f"ShardWriter({str(self.directory)!r}, d={self.d}, {self.dtype}, {self.rows} rows stored, {state})"


class ShardStore:
    """Read a shard store written by :class:`ShardWriter` (or ``actsparse cache-activations``).

    Args:
        directory: the store's folder.
        allow_incomplete: also open a store whose cache run has not finished (its complete
            shards); by default that raises, so nothing trains on half a cache by mistake.
        verify: check every listed shard's header and size at open (cheap: a few hundred bytes
            per shard), so that a missing or truncated shard fails here, naming the file.
        check_finite: check the rows as they are read (one ``isfinite`` over each batch or read,
            cheap next to a training step) and raise a ``ValueError`` naming the store, the shard
            file and the row of the first NaN/Inf value. :meth:`check_finite` scans the whole
            store up front.

    Raises:
        FileNotFoundError: no ``index.json``, or a listed shard is missing.
        ValueError: a corrupt index, a truncated or mismatched shard, an unfinished store.
    """

    def __init__(self, directory: str | os.PathLike, *, allow_incomplete: bool = False, verify: bool = True,
                 check_finite: bool = True) -> None:
        self.directory = Path(directory)
        self.checks_finite = bool(check_finite)
        self.index = _read_index(self.directory)
        if not self.index["complete"] and not allow_incomplete:
            raise ValueError(f"the store {self.directory} is unfinished ({self.index['rows']} rows in "
                             f"{len(self.index['shards'])} complete shards so far): rerun its cache run with the same "
                             "arguments to resume it, or open it with allow_incomplete=True")
        if self.index["d"] is None:
            raise ValueError(f"the store {self.directory} holds no rows")
        self.files = [self.directory / s["file"] for s in self.index["shards"]]
        self.shard_rows = [int(s["rows"]) for s in self.index["shards"]]
        if verify:
            for path, rows in zip(self.files, self.shard_rows):
                _check_shard(path, rows, self.d, self.dtype)
        self._starts = np.concatenate([[0], np.cumsum(self.shard_rows, dtype=np.int64)])

    # ------------------------------------------------------------ facts
    @property
    def d(self) -> int:
        """Row width."""
        return int(self.index["d"])

    @property
    def dtype(self) -> str:
        """Stored dtype name (``"float32"``, ``"float16"``, ``"float64"``)."""
        return self.index["dtype"]

    @property
    def n_rows(self) -> int:
        """Rows in the store."""
        return int(self.index["rows"])

    def __len__(self) -> int:
        return self.n_rows

    @property
    def n_shards(self) -> int:
        return len(self.files)

    @property
    def source(self) -> Any:
        """The description the writer stored (model, layer, inputs...)."""
        return self.index.get("source")

    @property
    def complete(self) -> bool:
        return bool(self.index["complete"])

    def __repr__(self) -> str:
        return (f"ShardStore({str(self.directory)!r}: {self.n_rows} rows x d={self.d} {self.dtype} in "
                f"{self.n_shards} shards{'' if self.complete else ', unfinished'})")

    # ------------------------------------------------------------ finiteness
    def _raise_not_finite(self, row: int) -> None:
        """Raise for the store-wide ``row``, which holds a NaN or Inf value."""
        i = int(np.searchsorted(self._starts, row, side="right") - 1)
        local = row - int(self._starts[i])
        values = np.asarray(self.shard(i)[local])
        what = "NaN" if np.isnan(values).any() else "Inf"
        raise ValueError(f"the shard store {self.directory} holds {what} in row {local} of {self.files[i]} (row {row} "
                         "of the store): the stored activations are broken, not the training; recreate the store "
                         "(actsparse cache-activations --overwrite) or check the model and dtype that made it")

    def _checked(self, shard: int, first: int | np.ndarray, arr: np.ndarray) -> np.ndarray:
        """``arr``, rows of ``shard`` starting at row ``first`` (or at the rows ``first`` lists),
        after one ``isfinite`` over it (if the store checks)."""
        if self.checks_finite and arr.size and not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
            local = int(first[bad]) if isinstance(first, np.ndarray) else int(first) + bad
            self._raise_not_finite(int(self._starts[shard]) + local)
        return arr

    def check_finite(self, chunk_rows: int = 65536) -> None:
        """Read the whole store, ``chunk_rows`` rows at a time, and raise ``ValueError`` naming the
        shard file and row of the first NaN/Inf value. Costs one pass over the store; training
        does not need it (the rows are checked as they are read), but it finds a broken store
        before a run starts."""
        for i in range(self.n_shards):
            m = self.shard(i)
            for a in range(0, m.shape[0], chunk_rows):
                block = np.asarray(m[a:a + chunk_rows])
                if not np.isfinite(block).all():
                    bad = int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                    self._raise_not_finite(int(self._starts[i]) + a + bad)

    # ------------------------------------------------------------ random access
    def shard(self, i: int) -> np.ndarray:
        """Shard ``i`` memory-mapped read-only, ``(rows, d)``; nothing is read until it is indexed."""
        return np.load(self.files[i], mmap_mode="r", allow_pickle=False)

    def read(self, start: int = 0, stop: int | None = None, *, dtype: torch.dtype | None = torch.float32) -> Tensor:
        """Rows ``start:stop`` (Python slice bounds over the whole store) as a ``(n, d)`` tensor."""
        start, stop, _ = slice(start, stop).indices(self.n_rows)
        parts = []
        for i in range(self.n_shards):
            a, b = max(start, self._starts[i]), min(stop, self._starts[i + 1])
            if a < b:
                lo, hi = a - self._starts[i], b - self._starts[i]
                parts.append(self._checked(i, lo, np.array(self.shard(i)[lo:hi])))
        arr = np.concatenate(parts) if parts else np.zeros((0, self.d), self.dtype)
        return _to_tensor(arr, dtype)

    def to_tensor(self, dtype: torch.dtype | None = torch.float32) -> Tensor:
        """The whole store in memory, ``(n_rows, d)``: for small stores only."""
        return self.read(0, self.n_rows, dtype=dtype)

    def sample(self, n: int, *, seed: int = 0, dtype: torch.dtype | None = torch.float32) -> Tensor:
        """``min(n, n_rows)`` distinct random rows (in store order), ``(n, d)``, for metrics and
        figures; reads only those rows."""
        n = min(int(n), self.n_rows)
        rows = np.sort(np.random.default_rng(seed).choice(self.n_rows, size=n, replace=False))
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        parts = [self._checked(i, rows[shard_of == i] - self._starts[i],
                               np.asarray(self.shard(i)[rows[shard_of == i] - self._starts[i]]))
                 for i in np.unique(shard_of)]
        arr = np.concatenate(parts) if parts else np.zeros((0, self.d), self.dtype)
        return _to_tensor(arr, dtype)

    def read_rows(self, rows: np.ndarray, *, dtype: torch.dtype | None = torch.float32) -> Tensor:
        """The rows with these store-wide indices ``(n,)``, in that order, as ``(n, d)``; reads only
        them (each shard is mapped for the call and unmapped after it, so resident memory does not
        grow as an epoch moves through the store)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"row indices must lie in [0, {self.n_rows}), got {rows.min()}..{rows.max()}")
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        shard_of = np.searchsorted(self._starts, ordered, side="right") - 1
        out = np.empty((rows.size, self.d), dtype=self.dtype)
        bounds = np.searchsorted(shard_of, np.arange(self.n_shards + 1))
        for i in np.unique(shard_of):
            a, b = bounds[i], bounds[i + 1]
            out[order[a:b]] = self.shard(int(i))[ordered[a:b] - self._starts[i]]
        if self.checks_finite and rows.size and not np.isfinite(out).all():
            bad = int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
            self._raise_not_finite(int(rows[bad]))
        return _to_tensor(out, dtype)

    def global_batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0, buffer_shards: int = 4,
                       drop_last: bool = True) -> Iterator[np.ndarray]:
        """The store-wide row indices ``(batch_size,)`` of each minibatch of one shuffled epoch.

        The order depends only on ``(seed, epoch)``, not on how many processes train: each
        process reads its own share of every global batch (``np.array_split(ids, world_size)[rank]``
        with :meth:`read_rows`), so N processes see exactly the batches one process would, and a
        run resumed with another number of processes goes on with the same data. Shards are
        visited in an order drawn from ``(seed, epoch)``, ``buffer_shards`` at a time, and the
        indices within that window (plus the leftover of the window before) are permuted: only
        indices are shuffled, so memory holds indices, never the rows of the window."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        rng = np.random.default_rng([int(seed), int(epoch), 0x5A4D])
        order = rng.permutation(self.n_shards)
        carry = np.zeros(0, dtype=np.int64)
        for w in range(0, self.n_shards, max(1, int(buffer_shards))):
            window = [np.arange(self._starts[i], self._starts[i + 1]) for i in order[w:w + buffer_shards]]
            ids = np.concatenate([carry, *window])
            ids = ids[rng.permutation(ids.size)]
            full = ids.size - ids.size % batch_size
            for j in range(0, full, batch_size):
                yield ids[j:j + batch_size]
            carry = ids[full:]
        if carry.size and not drop_last:
            yield carry

    def epoch_batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                      skip: int = 0) -> Iterator[tuple[int, Tensor]]:
        """``(b, rows)`` for each whole batch ``b >= skip`` of one epoch of :meth:`global_batches`:
        this process's ``np.array_split(ids, world_size)[rank]`` share of global batch ``b``, read
        with :meth:`read_rows` (what :func:`actsparse.train.train` streams; the batches before
        ``skip``, done before a resume, are drawn but not read)."""
        for b, ids in enumerate(self.global_batches(batch_size, seed=seed, epoch=epoch)):
            if b >= skip:
                yield b, self.read_rows(np.array_split(ids, world_size)[rank])

    # ------------------------------------------------------------ epochs
    def rows_for_rank(self, rank: int = 0, world_size: int = 1, *, even: bool = False) -> int:
        """Rows that ``rank`` reads per epoch: ``n_rows // world_size``, plus one for the first
        ``n_rows % world_size`` ranks unless ``even``."""
        _check_rank(rank, world_size)
        base, extra = divmod(self.n_rows, world_size)
        return base + (0 if even else int(rank < extra))

    def batches_per_epoch(self, batch_size: int, *, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                          even: bool = False) -> int:
        """Batches :meth:`iter_batches` yields with the same arguments."""
        rows = self.rows_for_rank(rank, world_size, even=even)
        return rows // batch_size if drop_last else math.ceil(rows / batch_size)

    def segments(self, *, epoch: int = 0, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 even: bool = False) -> list[tuple[int, int, int]]:
        """``[(shard, start, stop), ...]``: the rows ``rank`` reads in ``epoch``, in reading order.

        The shards are put in an order drawn from ``(seed, epoch)`` (the same on every rank; file
        order without ``shuffle``), their rows are laid end to end, and that sequence is cut into
        ``world_size`` contiguous, consecutive ranges whose sizes differ by at most one row (with
        ``even``, all are ``n_rows // world_size`` and the few rows left at the end are skipped
        that epoch). So the ranks' parts are disjoint and together cover every row once; each
        rank reads whole shards except at most one partial shard at either end of its range, and
        with fewer shards than ranks, a rank reads a row range of one or two shards.
        """
        _check_rank(rank, world_size)
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
        order = (np.random.default_rng([seed, epoch]).permutation(self.n_shards) if shuffle
                 else np.arange(self.n_shards))
        base, extra = divmod(self.n_rows, world_size)
        lo = rank * base + (0 if even else min(rank, extra))
        hi = lo + self.rows_for_rank(rank, world_size, even=even)
        out, pos = [], 0
        for i in order:
            rows = self.shard_rows[i]
            a, b = max(lo, pos), min(hi, pos + rows)
            if a < b:
                out.append((int(i), a - pos, b - pos))
            pos += rows
            if pos >= hi:
                break
        return out

    def iter_batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0, rank: int = 0,
                     world_size: int = 1, drop_last: bool = False, even: bool = False, buffer_shards: int = 4,
                     dtype: torch.dtype | None = torch.float32, device: torch.device | str | None = None,
                     pin_memory: bool = False) -> Iterator[Tensor]:
        """Minibatches ``(batch_size, d)`` of one epoch of this rank's part of the store.

        Every row of the rank's part (:meth:`segments`) is yielded exactly once per epoch; only
        the last batch may be smaller (dropped with ``drop_last``). With ``shuffle`` (default),
        the part is read ``buffer_shards`` shard pieces at a time, and the rows in the buffer (plus
        the fewer than ``batch_size`` left over from the previous buffer) are permuted: memory
        holds at most about ``buffer_shards * shard_size`` rows, whatever the store's size. The
        order depends only on ``(seed, epoch, rank, world_size)``; pass a new ``epoch`` each
        epoch to reshuffle. Without ``shuffle``, rows come in store order.

        DDP: give every process its ``rank`` and ``world_size`` and the same ``seed``/``epoch``.
        With ``even=True, drop_last=True`` every rank yields the same number of batches
        (:meth:`batches_per_epoch`), as collective operations need.

        Args:
            batch_size: rows per batch.
            buffer_shards: shard pieces mixed at a time (default 4; more mixes better and uses
                more memory).
            dtype: dtype of the yielded tensors (default float32); None keeps the stored one.
            device: move each batch there (e.g. ``"cuda"``); with ``pin_memory``, from pinned memory
                and without blocking.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if buffer_shards < 1:
            raise ValueError(f"buffer_shards must be >= 1, got {buffer_shards}")
        segs = self.segments(epoch=epoch, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size, even=even)
        rng = np.random.default_rng([seed, epoch, rank, world_size, 1])
        carry = np.zeros((0, self.d), self.dtype)
        for g in range(0, len(segs), buffer_shards):
            pieces = [carry] + [self._checked(i, a, np.asarray(self.shard(i)[a:b]))
                                for i, a, b in segs[g:g + buffer_shards]]
            buf = np.concatenate(pieces)
            order = rng.permutation(buf.shape[0]) if shuffle else np.arange(buf.shape[0])
            full = buf.shape[0] // batch_size * batch_size
            for k in range(0, full, batch_size):
                yield self._batch(buf[order[k:k + batch_size]], dtype, device, pin_memory)
            carry = buf[order[full:]]
        if carry.shape[0] and not drop_last:
            yield self._batch(carry, dtype, device, pin_memory)

    @staticmethod
    def _batch(rows: np.ndarray, dtype: torch.dtype | None, device, pin_memory: bool) -> Tensor:
        t = _to_tensor(rows, dtype)
        if device is None:
            return t
        if pin_memory:
            t = t.pin_memory()
        return t.to(device, non_blocking=pin_memory)


def _to_tensor(arr: np.ndarray, dtype: torch.dtype | None) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t if dtype is None else t.to(dtype)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def describe_source(source: Any) -> str:
    """One line for logs from a store's ``source``."""
    if isinstance(source, Mapping):
        return ", ".join(f"{k}={v}" for k, v in source.items() if v is not None and not isinstance(v, Mapping))
    return "" if source is None else str(source)
