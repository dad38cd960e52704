"""A real text corpus on every machine that runs Python: the standard library's own source files.

>>> corpus = stdlib_corpus()
>>> corpus.train.shape, corpus.validation.shape      # uint8 byte streams, tens of MB in all
>>> ngram_bits_per_byte(corpus, order=2)             # a bigram byte model's held-out bits per byte

Why it is built this way:

* Nothing can be downloaded here, but ``sysconfig.get_paths()["stdlib"]`` holds tens of MB of
  code, comments and docstrings. Byte-level (256 symbols), it needs no tokenizer.
* Whole files are held out (chosen by a hash of their path, so the split does not depend on the
  order the file system lists them in): validation text is text the model has never seen, not
  the next lines of a file it trained on.
* Byte 0 (NUL) never occurs in source text (any NUL is dropped). It is the stream's one special
  symbol: it separates files and leads every training window, like GPT-2's ``<|endoftext|>``
  (Radford et al. 2019), so position 0 of a window is a BOS that SAE training excludes.
* The n-gram baselines are add-one (Laplace) smoothed byte models fitted on the training bytes
  and scored on the validation bytes (Jurafsky & Martin, *Speech and Language Processing*, 3rd
  ed., ch. 3): a language model that learned anything must beat them.
"""

from __future__ import annotations

import hashlib
import math
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["BOS", "ByteCorpus", "stdlib_corpus", "ngram_bits_per_byte", "training_windows", "validation_windows"]

#: The byte that separates files and leads every window (NUL never occurs in source text).
BOS = 0

#: Folders of the standard library left out: third-party packages and compiled caches.
_SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class ByteCorpus:
    """Two byte streams: each file's bytes followed by :data:`BOS`, files in sorted path order.

    Attributes:
        train: ``(n_train,)`` uint8.
        validation: ``(n_val,)`` uint8 (whole held-out files).
        root: the folder the files were read from.
        train_files, validation_files: paths relative to ``root``.
    """

    train: np.ndarray
    validation: np.ndarray
    root: str
    train_files: list[str] = field(repr=False)
    validation_files: list[str] = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """A short hash of the corpus' contents (the cache key of models trained on it)."""
        h = hashlib.sha256()
        for arr in (self.train, self.validation):
            h.update(str(arr.shape[0]).encode())
            h.update(hashlib.sha256(arr.tobytes()).digest())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        stdlib = Path(self.root) == Path(sysconfig.get_paths()["stdlib"])
        what = f"Python {sys.version.split()[0]} standard library" if stdlib else f"files of {self.root}"
        return (f"{what}: {len(self.train_files)} files "
                f"({self.train.shape[0] / 1e6:.1f} MB) for training, {len(self.validation_files)} held out "
                f"({self.validation.shape[0] / 1e6:.1f} MB)")


def _path_hash(relative: str) -> float:
    """A file's place in the split: its relative path's hash, as a number in [0, 1)."""
    return int.from_bytes(hashlib.sha256(relative.encode()).digest()[:8], "big") / 2**64


def stdlib_corpus(root: str | Path | None = None, *, validation: float = 0.05, suffixes: tuple[str, ...] = (".py",),
                  max_bytes: int | None = None) -> ByteCorpus:
    """Read the standard library's source files into a training and a validation byte stream.

    Args:
        root: the folder to read (default ``sysconfig.get_paths()["stdlib"]``); every file below
            it with one of ``suffixes``, ``site-packages`` and ``__pycache__`` excepted.
        validation: the share of files held out, chosen by a hash of each relative path (default
            0.05; 0 < validation < 1); at least one file, if there are two or more.
        suffixes: file name endings to read (default ``(".py",)``).
        max_bytes: read only the first files in sorted order that hold this many bytes (default all).

    Raises:
        FileNotFoundError: ``root`` is not a folder or holds no matching file.
        ValueError: ``validation`` outside (0, 1), or one of the two splits is empty.
    """
    if not 0 < validation < 1:
        raise ValueError(f"validation must be a share of the files in (0, 1), got {validation!r}")
    folder = Path(root if root is not None else sysconfig.get_paths()["stdlib"]).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of source files")
    files = sorted(p for p in folder.rglob("*") if p.suffix in suffixes and p.is_file()
                   and not _SKIP_PARTS.intersection(p.relative_to(folder).parts))
    if not files:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files under {folder}")
    rels = [p.relative_to(folder).as_posix() for p in files]
    if max_bytes is not None:  # the split of the files that will be read
        sizes = np.cumsum([p.stat().st_size + 1 for p in files])
        n = int(np.searchsorted(sizes, max_bytes)) + 1
        files, rels = files[:n], rels[:n]
    place = {r: _path_hash(r) for r in rels}
    cut = validation
    if len(rels) >= 2 and not any(v < validation for v in place.values()):
        cut = min(place.values()) + 1e-12  # a small folder: hold out (at least) the one file of lowest hash
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    names: dict[bool, list[str]] = {False: [], True: []}
    sep = bytes([BOS])
    for p, rel in zip(files, rels):
        try:
            data = p.read_bytes().replace(sep, b"")
        except OSError:  # an unreadable file (permissions, a broken link) is skipped, not fatal
            continue
        held = place[rel] < cut
        parts[held] += [data, sep]
        names[held].append(rel)
    if not names[False] or not names[True]:
        raise ValueError(f"{folder}: {len(names[False])} training and {len(names[True])} held-out files; both splits "
                         "need at least one (read more files or change validation)")
    stream = {k: np.frombuffer(b"".join(v), dtype=np.uint8).copy() for k, v in parts.items()}
    return ByteCorpus(stream[False], stream[True], str(folder), names[False], names[True])


def ngram_bits_per_byte(corpus: ByteCorpus, order: int) -> float:
    """Held-out bits per byte of an add-one smoothed byte n-gram model (``order`` 1 or 2).

    Fitted on ``corpus.train``, scored on every byte of ``corpus.validation`` but the
    separators (for ``order`` 2, the first byte of the stream has no predecessor and is scored by
    the unigram model): ``−(1/N) Σ log₂ p(b_t | b_{t−1})`` with
    ``p(b | a) = (count(a, b) + 1) / (count(a) + 256)``.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (unigram) or 2 (bigram), got {order!r}")
    tr = corpus.train.astype(np.int64)
    va = corpus.validation.astype(np.int64)
    uni = np.bincount(tr, minlength=256).astype(np.float64)
    p_uni = (uni + 1) / (uni.sum() + 256)
    scored = va != BOS
    if order == 1:
        return float(-np.log2(p_uni[va[scored]]).mean())
    pairs = np.bincount(tr[:-1] * 256 + tr[1:], minlength=256 * 256).reshape(256, 256).astype(np.float64)
    p_bi = (pairs + 1) / (pairs.sum(1, keepdims=True) + 256)
    logp = np.empty(va.shape[0])
    logp[0] = np.log2(p_uni[va[0]])
    logp[1:] = np.log2(p_bi[va[:-1], va[1:]])
    return float(-logp[scored].mean())


def training_windows(stream: np.ndarray, context: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """``(batch_size, context)`` int64: each row :data:`BOS` then ``context − 1`` bytes from a
    uniformly random offset of ``stream`` (drawn from ``generator``)."""
    body = context - 1
    if stream.shape[0] <= body:
        raise ValueError(f"the stream holds {stream.shape[0]} bytes, fewer than a window of {context}")
    starts = torch.randint(0, stream.shape[0] - body, (batch_size,), generator=generator).numpy()
    rows = np.stack([stream[s:s + body] for s in starts]).astype(np.int64)
    out = torch.full((batch_size, context), BOS, dtype=torch.int64)
    out[:, 1:] = torch.from_numpy(rows)
    return out


def validation_windows(stream: np.ndarray, context: int, n_windows: int | None = None) -> Tensor:
    """``(n, context)`` int64: :data:`BOS` then consecutive, non-overlapping ``context − 1``-byte
    pieces of ``stream`` from its start (the first ``n_windows``, default all whole pieces)."""
    body = context - 1
    n = stream.shape[0] // body
    if n_windows is not None:
        n = min(n, n_windows)
    if n < 1:
        raise ValueError(f"the stream holds {stream.shape[0]} bytes, fewer than a window of {context}")
    out = torch.full((n, context), BOS, dtype=torch.int64)
    out[:, 1:] = torch.from_numpy(stream[:n * body].reshape(n, body).astype(np.int64))
    return out


def uniform_bits_per_byte() -> float:
    """8: a model that gives every one of the 256 bytes the same probability."""
    return math.log2(256)
