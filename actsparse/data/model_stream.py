"""Activations streamed from a model's forward straight into SAE training: no cache on disk.

>>> windows = RandomTokens(vocab_size=256, context=128, seed=0)
>>> stream = ModelActivationStream.for_layer(tiny_gpt2(), "h.0", windows, tokens=1_000_000)
>>> train(TrainConfig(data="model:tiny-gpt2", ...), stream)         # what --data model:tiny-gpt2 does

How the stream is cut, which is what makes it resumable, shardable over processes and bounded in
memory:

* **Windows.** Window ``j`` (``context`` token ids) is a function of ``j`` and the seed alone
  (:class:`RandomTokens`, :class:`CorpusWindows`: drawn from the generator of ``(seed, j // 64)``)
  or of its place in a token file (:class:`FileWindows`: tokens ``j·body … (j+1)·body − 1``, with
  ``body`` = context, less one with a BOS). Any part of the stream is made without what comes before.
* **Blocks.** Each window gives ``r`` rows (the positions kept). Block ``k`` is windows
  ``[k·W, (k+1)·W)`` with ``W = ⌊buffer / r⌋`` (at least one): at most ``buffer`` rows, the shuffle
  buffer. Its activations come from forwards of ``forward_batch`` windows each, always the same
  ones, so a block computed again is bit-identical. ``--tokens N`` is the rows of an epoch: the
  first ``N`` rows of the first ``⌈N / r⌉`` windows.
* **Epochs.** An epoch visits the blocks in an order drawn from ``(seed, epoch)`` and the rows of
  each in an order drawn from ``(seed, epoch, block)``; batch ``b`` is rows ``[b·B, (b+1)·B)`` of
  that sequence, so a batch may straddle two blocks (no row is dropped, but the last, partial
  batch of an epoch). With ``buffer`` 0 or 1 nothing is shuffled: blocks of ``forward_batch``
  windows, visited in order, rows in stream order. Every epoch runs the model over the same
  windows again (nothing is stored).
* **Resume.** The checkpoint's ``epoch`` and ``batch`` (batches done) are the position in the
  token stream: batch b → the block(s) holding its rows (:meth:`ModelActivationStream.position`)
  → their windows → their tokens. A resumed run computes only the blocks from there on: the
  forwards of the blocks before are skipped.
* **Memory.** The block being read and, for a batch that straddles, the next one: at most
  ``2 · buffer`` rows of each layer (plus the metrics sample, :meth:`ActivationBlocks.sample`, at
  most 65,536 rows), whatever ``--tokens`` is (``bench/bench_model_stream_rss.py`` measures it).
* **Processes (DDP).** Every process computes every block (the model's forward runs once per
  process: N processes pay N forwards of the stream, and split the SAE's work) and reads its
  ``np.array_split`` share of each global batch, so N processes see exactly the rows one would.
* **Several layers.** :class:`ActivationBlocks` hooks every layer in one forward (stopped after
  the last of them ran) and keeps the last two blocks; the per-layer streams of
  :meth:`ModelActivationStream.for_layers`, trained in lockstep by
  :func:`actsparse.train.train_together`, read each block from there: one forward per block serves
  every layer.

>>> streams = ModelActivationStream.for_layers(model, ["h.0", "h.1"], windows, tokens=1_000_000)
>>> results = train_together([cfg, cfg], streams)           # an SAE per layer, one pass of the model
"""

from __future__ import annotations

import collections
import difflib
import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import MODEL_PREFIX
from .activations import (
    Positions,
    _check_bos,
    _check_token_ids,
    _describe_positions,
    _model_device,
    forward_layers,
    load_token_file,
    parse_positions,
    position_mask,
    resolve_layer,
)

__all__ = ["ModelActivationStream", "ActivationBlocks", "RandomTokens", "CorpusWindows", "FileWindows",
           "stream_from_config", "MODEL_PREFIX", "MODEL_NAMES", "FORWARD_BATCH"]

#: The models known by name; any other NAME is a Hugging Face checkpoint name or folder.
MODEL_NAMES = ("stdlib-lm", "tiny-gpt2")
#: Windows per model forward.
FORWARD_BATCH = 32
#: Windows drawn from one generator by the seeded sources: window j comes from that of (seed, j // 64).
_CHUNK = 64
_TOKEN_SALT, _ORDER_SALT, _ROWS_SALT, _SAMPLE_SALT = 0x70CE, 0x0BDE, 0x5A3E, 0x5A4F


# --------------------------------------------------------------------------- token windows
class _SeededWindows:
    """Windows drawn ``_CHUNK`` at a time from generators seeded by ``(seed, chunk)``."""

    n_windows: int | None = None  # as many as asked for

    def __init__(self, context: int, seed: int) -> None:
        self.context, self.seed = int(context), int(seed)

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        raise NotImplementedError

    def take(self, ids: np.ndarray) -> Tensor:
        """The windows ``ids`` ``(n,)``, in that order, as ``(n, context)`` int64."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((ids.shape[0], self.context), dtype=np.int64)
        chunk = ids // _CHUNK
        for c in np.unique(chunk):  # each chunk drawn once, whatever the number of its windows asked for
            mine = chunk == c
            out[mine] = self._draw(np.random.default_rng([self.seed, int(c), _TOKEN_SALT]), _CHUNK)[ids[mine] % _CHUNK]
        return torch.from_numpy(out)


class RandomTokens(_SeededWindows):
    """Uniformly random ids in ``0 … vocab_size − 1``, ``context`` per window; with ``bos``, the
    first of each window is that id."""

    def __init__(self, vocab_size: int, context: int, *, seed: int = 0, bos: int | None = None) -> None:
        super().__init__(context, seed)
        self.vocab_size, self.bos = int(vocab_size), bos

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ids = rng.integers(0, self.vocab_size, (n, self.context))
        if self.bos is not None:
            ids[:, 0] = self.bos
        return ids

    def describe(self) -> str:
        return f"windows of {self.context} uniformly random tokens (seed {self.seed})"


class CorpusWindows(_SeededWindows):
    """``bos``, then ``context − 1`` consecutive tokens from a uniformly random offset of ``stream``
    (1-D), per window: the training windows of :func:`actsparse.lm.stdlib_lm`'s corpus."""

    def __init__(self, stream: np.ndarray, context: int, *, seed: int = 0, bos: int = 0, name: str = "a corpus"):
        super().__init__(context, seed)
        if stream.shape[0] < context:
            raise ValueError(f"{name} holds {stream.shape[0]} tokens, fewer than a window of {context}")
        self.stream, self.bos, self.name = stream, int(bos), name

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        body = self.context - 1
        starts = rng.integers(0, self.stream.shape[0] - body + 1, n)
        out = np.full((n, self.context), self.bos, dtype=np.int64)
        out[:, 1:] = np.stack([self.stream[s:s + body] for s in starts])
        return out

    def describe(self) -> str:
        return f"windows of {self.context} tokens at random offsets of {self.name} (seed {self.seed}, BOS {self.bos})"


class FileWindows:
    """Consecutive windows of a 1-D array of token ids (a memory map is read window by window):
    window ``j`` is ``bos`` (if given) and tokens ``j·body … (j+1)·body − 1``, with ``body`` the
    context less the BOS."""

    def __init__(self, ids: np.ndarray, context: int, *, bos: int | None = None, name: str = "a token file") -> None:
        self.ids, self.context, self.bos, self.name = ids, int(context), bos, name
        self.body = self.context - (bos is not None)
        self.n_windows = int(ids.shape[0]) // self.body

    def take(self, ids: np.ndarray) -> Tensor:
        """The windows ``ids`` ``(n,)``, in that order, as ``(n, context)`` int64."""
        out = np.empty((len(ids), self.context), dtype=np.int64)
        lead = int(self.bos is not None)
        if lead:
            out[:, 0] = self.bos
        for i, j in enumerate(np.asarray(ids, dtype=np.int64)):
            out[i, lead:] = self.ids[j * self.body:(j + 1) * self.body]
        return torch.from_numpy(out)

    def describe(self) -> str:
        return f"consecutive windows of {self.context} tokens of {self.name}" + \
            (f" (BOS {self.bos} first)" if self.bos is not None else "")


# --------------------------------------------------------------------------- blocks
class ActivationBlocks:
    """The activations of one or more layers of ``model`` over a source of token windows, cut into
    blocks computed on demand (see the module docstring), the last ``keep`` of them cached.

    Args:
        model: any ``nn.Module`` called as ``model(ids, **forward_kwargs)`` with ids ``(batch, context)``.
        layers: the hooked modules (names as :func:`~actsparse.data.activations.resolve_layer`
            takes them: ``h.0`` finds ``transformer.h.0`` of a model with an LM head).
        windows: the token windows: :class:`RandomTokens`, :class:`CorpusWindows`, :class:`FileWindows`
            (anything with ``context``, ``n_windows`` (None: unbounded) and ``take(ids)``).
        tokens: rows of one epoch (positions kept, over ``⌈tokens / r⌉`` windows).
        buffer: rows of the shuffle buffer (default 65,536): a block is ``⌊buffer / r⌋`` windows;
            0 or 1: no shuffle, blocks of ``forward_batch`` windows.
        positions: the positions kept of each window (:data:`~actsparse.data.activations.Positions`;
            default ``"all"``; ``"drop_first"`` leaves out a BOS).
        forward_batch: windows per forward (default :data:`FORWARD_BATCH`).
        forward_kwargs: extra keyword arguments of every forward (``{"use_cache": False}``).
        keep: blocks cached (default 2: the one read and the next, for a batch that straddles them).

    Attributes:
        forwards: model forwards run so far (blocks, samples and the width probe).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], windows: Any, *, tokens: int, buffer: int = 65_536,
                 positions: Positions | str = "all", forward_batch: int = FORWARD_BATCH,
                 forward_kwargs: Mapping[str, Any] | None = None, keep: int = 2) -> None:
        if isinstance(layers, str):
            layers = [layers]
        if not layers:
            raise ValueError("name at least one layer to collect activations from")
        for name, v, low in (("tokens", tokens, 1), ("buffer", buffer, 0), ("forward_batch", forward_batch, 1),
                             ("keep", keep, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        self.model = model
        inner = getattr(model, "_orig_mod", model)
        self.modules = dict(resolve_layer(inner, layer) for layer in layers)
        if len(self.modules) < len(layers):
            raise ValueError(f"the layers {list(layers)} name the same module twice")
        self.layers = list(self.modules)
        self.windows, self.tokens, self.buffer = windows, tokens, buffer
        self.positions = parse_positions(positions)
        mask = position_mask(self.positions, (1, windows.context))
        self.rows_per_window = windows.context if mask is None else int(mask.sum())
        if self.rows_per_window < 1:
            raise ValueError(f"--positions {_describe_positions(self.positions)} keeps no position of a window of "
                             f"{windows.context} tokens")
        self.n_windows = math.ceil(tokens / self.rows_per_window)
        if windows.n_windows is not None and self.n_windows > windows.n_windows:
            raise ValueError(f"--tokens {tokens:,} needs {self.n_windows:,} windows of {windows.context} tokens, but "
                             f"there are {windows.n_windows:,} ({windows.describe()}): lower --tokens or --context")
        self.shuffle = buffer > 1
        self.block_windows = max(1, buffer // self.rows_per_window) if self.shuffle else forward_batch
        self.n_blocks = math.ceil(self.n_windows / self.block_windows)
        sizes = np.full(self.n_blocks, self.block_windows * self.rows_per_window, dtype=np.int64)
        sizes[-1] = tokens - int(sizes[:-1].sum())  # the last block: the rows up to --tokens
        self.block_rows = sizes
        self.forward_batch, self.keep = forward_batch, keep
        self.forward_kwargs = dict(forward_kwargs or {})
        self.forwards = 0
        self._cache: collections.OrderedDict[int, dict[str, Tensor]] = collections.OrderedDict()
        self._sample: tuple[tuple[int, int], dict[str, Tensor]] | None = None
        self._widths: dict[str, int] | None = None

    @property
    def n_rows(self) -> int:
        """Rows of one epoch (``tokens``)."""
        return self.tokens

    def width(self, layer: str) -> int:
        """The row width of ``layer`` (one forward of one window, the first time)."""
        if self._widths is None:
            self._widths = {k: v.shape[1] for k, v in self._forward(self.windows.take(np.zeros(1, np.int64))).items()}
        return self._widths[layer]

    # ---------------------------------------------------------------- computing rows
    def _forward(self, ids: Tensor) -> dict[str, Tensor]:
        """One forward of ``ids`` ``(n, context)``: the kept rows ``(n·r, d)`` float32 of each layer
        (:func:`~actsparse.data.activations.forward_layers`: stopped once every hooked layer ran)."""
        rows = forward_layers(self.model, self.modules, ids, _model_device(self.model), self.forward_kwargs,
                              self.positions, torch.float32)
        self.forwards += 1
        return rows

    def _rows_of_windows(self, ids: np.ndarray, n_rows: int) -> dict[str, Tensor]:
        """The first ``n_rows`` rows of the windows ``ids``, in forwards of ``forward_batch`` windows
        (written into one tensor per layer: no second copy of the block while it is assembled)."""
        out: dict[str, Tensor] = {}
        filled = 0
        for i in range(0, len(ids), self.forward_batch):
            got = self._forward(self.windows.take(ids[i:i + self.forward_batch]))
            for name, rows in got.items():
                if name not in out:
                    out[name] = rows.new_empty((len(ids) * self.rows_per_window, rows.shape[1]))
                out[name][filled:filled + rows.shape[0]] = rows
            filled += rows.shape[0]
        return {name: rows[:n_rows] for name, rows in out.items()}

    def block(self, k: int) -> dict[str, Tensor]:
        """Block ``k``'s rows ``(block_rows[k], d)`` of each layer, in stream order (computed, or cached)."""
        if not 0 <= k < self.n_blocks:
            raise IndexError(f"block {k} of {self.n_blocks}")
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        while len(self._cache) >= self.keep:  # before computing: never keep + 1 blocks at once
            self._cache.popitem(last=False)
        rows = self._cache[k] = self._compute_block(k)
        return rows

    def _compute_block(self, k: int) -> dict[str, Tensor]:
        first = k * self.block_windows
        ids = np.arange(first, min(first + self.block_windows, self.n_windows))
        return self._rows_of_windows(ids, int(self.block_rows[k]))

    def sample(self, n: int, *, seed: int = 0) -> dict[str, Tensor]:
        """``min(n, n_rows)`` rows of each layer for metrics and figures, on the CPU: the rows of
        ``⌈n / r⌉`` distinct windows drawn from ``seed`` (all windows when ``n >= n_rows``, in
        order), so their cost is bounded by ``n`` whatever the stream's length. The last sample
        is kept: the trainer asks for the same one at the start and at the end."""
        n = min(int(n), self.n_rows)
        if self._sample is not None and self._sample[0] == (n, seed):
            return self._sample[1]
        if n == self.n_rows:
            ids = np.arange(self.n_windows)
        else:
            m = min(self.n_windows, math.ceil(n / self.rows_per_window))
            ids = np.sort(np.random.default_rng([seed, _SAMPLE_SALT]).choice(self.n_windows, m, replace=False))
        rows = {name: r.cpu() for name, r in self._rows_of_windows(ids, n).items()}
        self._sample = ((n, seed), rows)
        return rows

    # ---------------------------------------------------------------- epochs
    def epoch_plan(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(order, starts)``: the blocks in the order ``epoch`` visits them, and where each
        visit starts in the epoch's rows (``starts[v] … starts[v + 1]``, ``n_blocks + 1`` values)."""
        order = (np.random.default_rng([seed, epoch, _ORDER_SALT]).permutation(self.n_blocks) if self.shuffle
                 else np.arange(self.n_blocks))
        return order, np.concatenate([[0], np.cumsum(self.block_rows[order])])

    def row_order(self, block: int, seed: int, epoch: int) -> np.ndarray | None:
        """The order ``epoch`` reads the rows of ``block`` in (None: stream order, no shuffle)."""
        if not self.shuffle:
            return None
        return np.random.default_rng([seed, epoch, block, _ROWS_SALT]).permutation(int(self.block_rows[block]))

    def describe(self) -> str:
        rows = self.block_windows * self.rows_per_window
        shuffled = (f"shuffled in blocks of {self.block_windows:,} windows ({rows:,} rows)" if self.shuffle
                    else "in stream order (no shuffle)")
        return (f"{self.n_rows:,} positions ({_describe_positions(self.positions)}) of {self.n_windows:,} "
                f"{self.windows.describe()}, {shuffled}")


# --------------------------------------------------------------------------- what the trainer streams
class ModelActivationStream:
    """One layer's activations, streamed from the model as the trainer reads them: the
    :class:`~actsparse.train.TrainingStream` that ``--data model:NAME`` trains on (see the module
    docstring for blocks, shuffling, resume and processes).

    Args:
        blocks: the source (:class:`ActivationBlocks`), shared with the streams of its other layers.
        layer: one of ``blocks.layers`` (default: the first).
        name: the model's name, for :attr:`description`.
    """

    def __init__(self, blocks: ActivationBlocks, layer: str | None = None, *, name: str = "the model") -> None:
        self.blocks = blocks
        inner = getattr(blocks.model, "_orig_mod", blocks.model)
        self.layer = blocks.layers[0] if layer is None else resolve_layer(inner, layer)[0]
        if self.layer not in blocks.layers:
            raise ValueError(f"{layer!r} is not one of the hooked layers {blocks.layers}")
        self.name = name

    @classmethod
    def for_layers(cls, model: nn.Module, layers: Sequence[str], windows: Any, *, name: str = "the model",
                   **options: Any) -> list[ModelActivationStream]:
        """A stream per layer, sharing one :class:`ActivationBlocks` (``options``: its keyword
        arguments): trained in lockstep (:func:`actsparse.train.train_together`), one forward per
        block serves them all."""
        blocks = ActivationBlocks(model, layers, windows, **options)
        return [cls(blocks, layer, name=name) for layer in blocks.layers]

    @classmethod
    def for_layer(cls, model: nn.Module, layer: str, windows: Any, *, name: str = "the model",
                  **options: Any) -> ModelActivationStream:
        """The stream of one layer (``options``: :class:`ActivationBlocks`' keyword arguments)."""
        return cls.for_layers(model, [layer], windows, name=name, **options)[0]

    @property
    def n_rows(self) -> int:
        """Rows of one epoch."""
        return self.blocks.n_rows

    @property
    def d(self) -> int:
        """Row width."""
        return self.blocks.width(self.layer)

    @property
    def description(self) -> str:
        return f"{self.layer} of {self.name} (d={self.d}): {self.blocks.describe()}, streamed from the model"

    def sample(self, n: int, *, seed: int = 0) -> Tensor:
        """``(min(n, n_rows), d)`` rows for metrics and figures (:meth:`ActivationBlocks.sample`)."""
        return self.blocks.sample(n, seed=seed)[self.layer]

    def epoch_batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                      skip: int = 0) -> Iterator[tuple[int, Tensor]]:
        """``(b, rows)`` for each whole batch ``b >= skip`` of ``epoch``: this process's
        ``np.array_split(…, world_size)[rank]`` share of global batch ``b`` (``batch_size`` rows).
        Only the blocks from batch ``skip`` on are computed; at most two are held at a time."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not world_size <= batch_size:
            raise ValueError(f"batch_size must be an integer >= {world_size} (a row per process), got {batch_size!r}")
        blocks = self.blocks
        order, starts = blocks.epoch_plan(seed, epoch)
        share = np.array_split(np.arange(batch_size), world_size)[rank]
        first, stop = int(share[0]), int(share[-1]) + 1  # this process's rows of each global batch
        held: dict[int, tuple[Tensor, Tensor | None]] = {}  # visit -> (the block's rows, their order)
        for b in range(skip, blocks.n_rows // batch_size):
            lo, hi = b * batch_size + first, b * batch_size + stop
            v0 = int(np.searchsorted(starts, lo, "right")) - 1
            v1 = int(np.searchsorted(starts, hi - 1, "right")) - 1
            for v in [v for v in held if v < v0]:
                del held[v]  # a block read to its end: let it go
            parts = []
            for v in range(v0, v1 + 1):
                if v not in held:
                    k = int(order[v])
                    rows = blocks.block(k)[self.layer]
                    perm = blocks.row_order(k, seed, epoch)
                    held[v] = rows, None if perm is None else torch.from_numpy(perm).to(rows.device)
                rows, perm = held[v]
                a, z = max(lo, int(starts[v])) - int(starts[v]), min(hi, int(starts[v + 1])) - int(starts[v])
                parts.append(rows[a:z] if perm is None else rows[perm[a:z]])
            yield b, parts[0] if len(parts) == 1 else torch.cat(parts)

    def position(self, batch_size: int, *, seed: int = 0, epoch: int = 0, batch: int = 0) -> dict[str, int]:
        """Where batch ``batch`` of ``epoch`` starts in the token stream (what a checkpoint's
        ``epoch`` and ``batch`` stand for): ``block``, the block holding its first row, its
        ``row`` in that block (in the order it is read) and the ``windows`` ``[first, stop)`` of that block."""
        blocks = self.blocks
        order, starts = blocks.epoch_plan(seed, epoch)
        at = batch * batch_size
        v = int(np.searchsorted(starts, at, "right")) - 1
        k = int(order[v])
        first = k * blocks.block_windows
        return {"block": k, "row": at - int(starts[v]), "window": first,
                "window_stop": min(first + blocks.block_windows, blocks.n_windows)}


# --------------------------------------------------------------------------- --data model:NAME
def _load_model(name: str, cfg: Any, device: torch.device) -> tuple[nn.Module, Any, str]:
    """``(model, corpus or None, description)`` of ``--data model:NAME``."""
    from .activations import load_hf_model, tiny_gpt2

    if name == "stdlib-lm":
        from ..lm import stdlib_corpus, stdlib_lm

        corpus = stdlib_corpus()
        model, info = stdlib_lm(corpus=corpus, progress=bool(getattr(cfg, "progress", False)))
        return model.to(device).eval(), corpus, (f"the byte-level GPT-2 of the standard library "
                                                 f"({info['bits_per_byte']:.2f} bits/byte held out)")
    if name == "tiny-gpt2":
        return tiny_gpt2(cfg.seed, device=device), None, f"tiny-gpt2 (seed {cfg.seed})"
    try:
        return load_hf_model(name, device=device), None, name
    except FileNotFoundError as err:
        close = difflib.get_close_matches(name, MODEL_NAMES, n=1)
        hint = f"did you mean model:{close[0]}? " if close else ""
        raise FileNotFoundError(f"--data model:{name}: {hint}NAME is {' or '.join(MODEL_NAMES)}, or a Hugging Face "
                                f"checkpoint name or folder; {err}") from None


def stream_from_config(cfg: Any) -> ModelActivationStream:
    """The stream of ``--data model:NAME`` with the settings of a :class:`~actsparse.config.TrainConfig`
    (``layer``, ``tokens``, ``context``, ``buffer``, ``token_file``, ``bos``, ``positions``,
    ``seed``, ``device``). NAME: ``stdlib-lm`` (:func:`actsparse.lm.stdlib_lm`, trained once and
    cached; random windows of its training files, BOS 0), ``tiny-gpt2`` (seeded by ``seed``,
    uniformly random tokens) or a Hugging Face name or folder (uniformly random tokens over its
    vocabulary); ``--token-file`` replaces the tokens by consecutive windows of that file.

    Raises:
        FileNotFoundError: an unknown NAME, a missing token file.
        KeyError: no such layer (the message lists the closest names).
        ValueError: a context longer than the model's positions, ids outside its vocabulary, a
            token file shorter than ``--tokens`` asks for.
    """
    from ..build import resolve_device

    name = cfg.data[len(MODEL_PREFIX):]
    known_vocab = 256 if name in MODEL_NAMES else None  # both are byte-level: cheap checks before loading
    _check_bos(cfg.bos, known_vocab)
    ids = load_token_file(cfg.token_file, known_vocab) if cfg.token_file is not None else None
    model, corpus, about = _load_model(name, cfg, resolve_device(cfg.device))
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab != known_vocab:
        _check_bos(cfg.bos, vocab)
        if ids is not None:
            _check_token_ids(Path(cfg.token_file), ids, vocab)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit is not None and cfg.context > limit:
        raise ValueError(f"--context {cfg.context} exceeds the {limit} positions of model:{name}")
    if ids is not None:
        windows: Any = FileWindows(ids, cfg.context, bos=cfg.bos, name=str(cfg.token_file))
    elif corpus is not None:
        windows = CorpusWindows(corpus.train, cfg.context, seed=cfg.seed, bos=cfg.bos, name="its training files")
    elif vocab is None:
        raise ValueError(f"model:{name} has no config.vocab_size to draw random tokens from: pass --token-file")
    else:
        windows = RandomTokens(vocab, cfg.context, seed=cfg.seed, bos=cfg.bos)
    takes_cache = "use_cache" in inspect.signature(model.forward).parameters
    blocks = ActivationBlocks(model, [cfg.layer], windows, tokens=cfg.tokens, buffer=cfg.buffer,
                              positions=cfg.positions, forward_kwargs={"use_cache": False} if takes_cache else None)
    return ModelActivationStream(blocks, name=about)
