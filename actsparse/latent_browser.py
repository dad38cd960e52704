"""A latent browser for a sparse autoencoder: one self-contained HTML page with, for each latent,
its firing density, a histogram of its non-zero activations and its top-k activating contexts.

>>> records = collect_latent_records(lm_latent_codes(model, "h.0", sae, batches), k=20)
>>> write_latent_browser(records, "latents.html", tokens=tokens)        # tokens: the same sequences

Why it is built this way:

* Two steps. :func:`collect_latent_records` streams ``(code, where)`` batches into a
  :class:`LatentRecords` of size ``O(d_sae · (k + n_bins))``, so an SAE can be browsed over more
  tokens than fit in memory; the page is written from the records alone (plus the token ids or
  images the rows point at). :func:`lm_latent_codes` makes those batches for a language model;
  any other source works as long as it yields the pairs.
* Only firing entries are touched. A row fires for a latent where its code is ``> 0`` (negative
  codes count as not firing: the browser is for ReLU-family codes). Each batch is reduced to its
  non-zero entries, and the running top-k is merged by sorting the kept entries together with the
  batch's: the work is ``O(nnz log nnz)``, not ``O(d_sae · n)``, for a sparse code. Ties keep the
  earlier row (in stream order) first, so the records do not depend on how the stream is batched.
* The histogram edges are fixed before the first firing value is counted, so one pass suffices:
  ``value_range`` if given, else the first batch with firing entries, from a tenth of its smallest
  non-zero value to ten times its largest, log-spaced, but at most six decades (a ReLU code has
  values down to about 0, which would stretch a log axis without end). Values outside go to the
  first/last bin.
* The page follows :mod:`actsparse.report`: nothing outside the file is referenced (inline CSS and
  script, images as ``data:`` URIs, a Content-Security-Policy that forbids any fetch), charts are
  SVG written by hand (no matplotlib), image patches are PNGs written with ``zlib``/``struct``,
  and every string from the data is HTML-escaped. Everything is rendered in Python, so the page
  reads without its script; the script only sorts, filters and pages (100 latents at a time) and
  records what it did in ``data-*`` attributes of ``<body>`` (``data-ready``, ``data-sort``,
  ``data-matches``, ``data-shown``, ``data-images-rendered``/``-total``) that a headless browser's
  dumped DOM shows. The URL fragment drives it too: ``#sort=density-desc&q=text&open=3``, or
  ``#l17`` to open latent 17.
* Size: each context is one line of escaped text with the activating token in ``<mark>``, and
  each histogram a single SVG path: about 2.8 kB a live latent at k = 20 with byte tokens and the
  default window (2.9 MB for d_sae = 1024, 23 MB for 8192). Dead latents have no entry (they are
  listed at the top), and ``max_latents`` caps the rest.
"""

from __future__ import annotations

import html
import math
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .report import CSP, _data_uri, _e

__all__ = ["LatentRecords", "collect_latent_records", "lm_latent_codes", "purity", "write_latent_browser",
           "byte_token"]

#: The value range used when nothing ever fired (so the edges exist).
_EMPTY_RANGE = (1e-3, 1.0)

#: The most decades the default histogram range spans (below it: the first bin).
_DECADES = 6


# --------------------------------------------------------------------------- records
@dataclass
class LatentRecords:
    """What :func:`collect_latent_records` keeps of a stream of SAE codes.

    Attributes:
        n_rows: rows (token positions / samples) seen.
        fire_count: ``(d_sae,)`` int64, rows where the latent's code is ``> 0``.
        hist_edges: ``(n_bins + 1,)`` float64, increasing log-spaced bin edges for the firing values.
        hist_counts: ``(d_sae, n_bins)`` int64 counts of the firing values per bin; bin ``i`` holds
            ``[edges[i], edges[i+1])``, values below ``edges[0]`` are in bin 0 and values at or above
            ``edges[-1]`` in the last, so each row sums to ``fire_count``.
        top_values: ``(d_sae, k)`` float32, each latent's largest firing values, descending (ties:
            the earlier row first); NaN where the latent fired on fewer than ``k`` rows.
        top_where: ``(d_sae, k, 2)`` int64, the ``(sequence index, position)`` of each; ``-1`` where
            ``top_values`` is NaN.
    """

    n_rows: int
    fire_count: Tensor
    hist_edges: Tensor
    hist_counts: Tensor
    top_values: Tensor
    top_where: Tensor

    def __post_init__(self) -> None:
        d = self.fire_count.shape[0] if self.fire_count.dim() == 1 else -1
        if d < 0:
            raise ValueError(f"fire_count must be (d_sae,), got shape {tuple(self.fire_count.shape)}")
        if self.top_values.dim() != 2 or self.top_values.shape[0] != d:
            raise ValueError(f"top_values must be (d_sae={d}, k), got shape {tuple(self.top_values.shape)}")
        k = self.top_values.shape[1]
        if tuple(self.top_where.shape) != (d, k, 2):
            raise ValueError(f"top_where must be (d_sae, k, 2) = {(d, k, 2)}, got {tuple(self.top_where.shape)}")
        if self.hist_edges.dim() != 1 or self.hist_edges.numel() < 2:
            raise ValueError(f"hist_edges must be (n_bins + 1,), got shape {tuple(self.hist_edges.shape)}")
        n_bins = self.hist_edges.numel() - 1
        if tuple(self.hist_counts.shape) != (d, n_bins):
            raise ValueError(f"hist_counts must be (d_sae, n_bins) = {(d, n_bins)}, got "
                             f"{tuple(self.hist_counts.shape)}")

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return int(self.fire_count.shape[0])

    @property
    def k(self) -> int:
        """Contexts kept per latent."""
        return int(self.top_values.shape[1])

    @property
    def density(self) -> Tensor:
        """``(d_sae,)`` float64: the share of the rows where each latent fired (0 when no rows)."""
        return self.fire_count.double() / max(self.n_rows, 1)


def _log_edges(lo: float, hi: float, n_bins: int) -> Tensor:
    edges = torch.logspace(math.log10(lo), math.log10(hi), n_bins + 1, dtype=torch.float64)
    edges[0], edges[-1] = lo, hi
    return edges


def _check_batch(item: object, index: int, d_sae: int | None) -> tuple[Tensor, Tensor]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(f"codes batch {index}: expected a (code, where) pair, got {type(item).__name__}")
    code, where = item
    if not isinstance(code, Tensor) or not isinstance(where, Tensor):
        raise TypeError(f"codes batch {index}: code and where must be tensors, got {type(code).__name__} and "
                        f"{type(where).__name__}")
    if code.dim() != 2:
        raise ValueError(f"codes batch {index}: code must be (n, d_sae), got shape {tuple(code.shape)}")
    if not code.is_floating_point():
        raise ValueError(f"codes batch {index}: code must be a float tensor, got {code.dtype}")
    if d_sae is not None and code.shape[1] != d_sae:
        raise ValueError(f"codes batch {index}: code has {code.shape[1]} latents, the earlier batches {d_sae}")
    if tuple(where.shape) != (code.shape[0], 2):
        raise ValueError(f"codes batch {index}: where must be (n, 2) = {(code.shape[0], 2)} (sequence index, "
                         f"position), got {tuple(where.shape)}")
    if where.dtype.is_floating_point or where.dtype.is_complex or where.dtype == torch.bool:
        raise ValueError(f"codes batch {index}: where must be int64, got {where.dtype}")
    # one reduction first: NaN or Inf make the sum non-finite (so can an overflow: then check elementwise)
    total = float(code.sum()) if code.numel() else 0.0
    if not math.isfinite(total) and not bool(torch.isfinite(code).all()):
        what = "NaN" if bool(torch.isnan(code).any()) else "Inf"
        raise ValueError(f"codes batch {index}: the code holds {what} values")
    where = where.to("cpu", torch.int64)
    if where.numel() and int(where.min()) < 0:
        raise ValueError(f"codes batch {index}: where holds negative indices")
    return code, where


def collect_latent_records(codes: Iterable[tuple[Tensor, Tensor]], *, k: int = 20, n_bins: int = 30,
                           value_range: tuple[float, float] | None = None) -> LatentRecords:
    """Stream SAE codes into per-latent statistics and top-k contexts.

    Args:
        codes: an iterable of ``(code, where)`` pairs: ``code`` ``(n, d_sae)`` float (dense; any
            device), ``where`` ``(n, 2)`` int64 ``(sequence index, position)`` of each row (for
            samples without positions, use position 0). ``n`` may be 0. :func:`lm_latent_codes`
            makes them for a language model.
        k: contexts kept per latent (default 20).
        n_bins: histogram bins (default 30).
        value_range: ``(lo, hi)`` with ``0 < lo < hi``, the outer histogram edges; None (default)
            takes them from the first batch with firing entries: ``(max(min / 10, max * 1e-5),
            max * 10)`` of its non-zero values, at most six decades (``(1e-3, 1)`` if nothing ever
            fires).

    Returns:
        A :class:`LatentRecords`. A row fires for a latent where its code is ``> 0``. The top-k
        are the largest firing values, ties broken by stream order (the earlier row first, however
        the stream is batched). Memory: ``O(d_sae · (k + n_bins))`` plus one batch's non-zero entries.

    Raises:
        ValueError: an empty stream, a bad ``k``/``n_bins``/``value_range``, or a batch with the wrong
            shapes or dtypes, a changed ``d_sae``, NaN/Inf codes or negative ``where`` (the message
            names the batch). TypeError: a batch that is not a pair of tensors.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    edges: Tensor | None = None
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
            raise ValueError(f"value_range must be (lo, hi) with 0 < lo < hi, got {value_range!r}")
        edges = _log_edges(lo, hi, n_bins)
    d: int | None = None
    n_rows = 0
    fire = hist = top_v = top_w = None
    for index, item in enumerate(codes):
        code, where = _check_batch(item, index, d)
        if d is None:
            d = code.shape[1]
            fire = torch.zeros(d, dtype=torch.int64)
            hist = torch.zeros(d * n_bins, dtype=torch.int64)
            top_v = torch.full((d, k), float("nan"), dtype=torch.float32)
            top_w = torch.full((d, k, 2), -1, dtype=torch.int64)
        n_rows += code.shape[0]
        rows, lat = (code > 0).nonzero(as_tuple=True)  # row-major: by row, then latent
        if rows.numel() == 0:
            continue
        raw = code[rows, lat].detach().to("cpu", torch.float64)
        vals = raw.float()
        rows, lat = rows.cpu(), lat.cpu()
        if edges is None:
            hi = float(raw.max()) * 10
            edges = _log_edges(max(float(raw.min()) / 10, hi * 10.0 ** -_DECADES), hi, n_bins)
        fire += torch.bincount(lat, minlength=d)
        bins = torch.bucketize(raw, edges[1:-1], right=True)  # i: edges[i] <= v < edges[i+1]
        hist += torch.bincount(lat * n_bins + bins, minlength=d * n_bins)
        # merge: the kept entries (earlier rows, already in order) first, then the batch's in row order;
        # a stable sort by value, then a stable sort by latent, keeps the earlier row first among ties
        kl, ks = (~torch.isnan(top_v)).nonzero(as_tuple=True)
        all_lat = torch.cat([kl, lat])
        all_val = torch.cat([top_v[kl, ks], vals])
        all_where = torch.cat([top_w[kl, ks], where[rows]])
        order = torch.sort(-all_val, stable=True).indices
        order = order[torch.sort(all_lat[order], stable=True).indices]
        lat_s = all_lat[order]
        counts = torch.bincount(lat_s, minlength=d)
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(lat_s.numel()) - start[lat_s]
        keep = rank < k
        sel, lat_k, rank_k = order[keep], lat_s[keep], rank[keep]
        top_v = torch.full((d, k), float("nan"), dtype=torch.float32)
        top_w = torch.full((d, k, 2), -1, dtype=torch.int64)
        top_v[lat_k, rank_k] = all_val[sel]
        top_w[lat_k, rank_k] = all_where[sel]
    if d is None:
        raise ValueError("codes yielded no batches")
    if edges is None:
        edges = _log_edges(*_EMPTY_RANGE, n_bins)
    return LatentRecords(n_rows=n_rows, fire_count=fire, hist_edges=edges, hist_counts=hist.view(d, n_bins),
                         top_values=top_v, top_where=top_w)


# --------------------------------------------------------------------------- language models
def lm_latent_codes(model: nn.Module, layer: str | nn.Module | type, sae: nn.Module,
                    batches: Iterable[Tensor | Mapping[str, Any]], *, positions="drop_first",
                    forward_kwargs: Mapping[str, Any] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(code, where)`` pairs for :func:`collect_latent_records` from a language model.

    Args:
        model: any ``nn.Module`` (a Hugging Face transformer works as is) called as ``model(ids)``.
        layer: the module whose output the SAE encodes (as :func:`actsparse.data.collect_activations`).
        sae: an :class:`actsparse.models.SparseAutoencoder` (anything with ``encode(rows)``
            returning ``(n, d_sae)`` or a :class:`~actsparse.models.sparse_topk.SparseCode`).
        batches: ``(batch, seq)`` int64 token ids, one forward each; or mappings with ``input_ids``
            and ``attention_mask`` (padding is then never kept, and positions count real tokens).
        positions: which positions to keep (:data:`actsparse.data.activations.Positions`; default
            ``"drop_first"``: not the first token, often BOS, whose activations are outliers).
        forward_kwargs: extra keyword arguments of every forward.

    Yields:
        ``code`` ``(n, d_sae)`` float32 on the SAE's device and ``where`` ``(n, 2)`` int64 on the
        CPU: ``(sequence index, position)``, the sequence index counted across all batches (the
        ``i``-th sequence of the stream is index ``i``), rows in row-major ``(sequence, position)``
        order as the layer's kept rows. The SAE encodes under ``torch.no_grad()`` in eval mode, its
        mode restored before each yield (as the model's by ``collect_activations``).
    """
    from .data.activations import collect_activations, position_mask

    offset = 0
    for index, batch in enumerate(batches):
        if isinstance(batch, Tensor):
            ids, mask = batch, None
        elif isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor):
            ids, mask = batch["input_ids"], batch.get("attention_mask")
        else:
            raise TypeError(f"token batch {index}: expected a (batch, seq) tensor or a mapping with input_ids, "
                            f"got {type(batch).__name__}")
        if ids.dim() != 2:
            raise ValueError(f"token batch {index}: expected (batch, seq) token ids, got shape {tuple(ids.shape)}")
        b, s = ids.shape
        if b == 0:
            continue
        (rows,) = collect_activations(model, layer, batch, batch_size=b, positions=positions,
                                      forward_kwargs=forward_kwargs)
        keep = position_mask(positions, (b, s), mask)
        keep = torch.ones(b, s, dtype=torch.bool) if keep is None else keep.cpu()
        where = keep.nonzero()  # row-major, the order of a[keep] in collect_activations
        if rows.shape[0] != where.shape[0]:
            raise ValueError(f"token batch {index}: the layer gave {rows.shape[0]} rows for {where.shape[0]} kept "
                             f"(sequence, position) pairs; it needs a (batch, seq, d) output")
        where[:, 0] += offset
        offset += b
        device = next((t.device for t in (*sae.parameters(), *sae.buffers())), rows.device)
        was_training = sae.training
        try:
            sae.eval()
            with torch.no_grad():
                code = sae.encode(rows.to(device))
        finally:
            sae.train(was_training)
        if hasattr(code, "to_dense"):  # a SparseCode from the sparse TopK path
            code = code.to_dense()
        yield code.float(), where


# --------------------------------------------------------------------------- purity
def purity(records: LatentRecords, tokens: Tensor, *, top: int = 20) -> dict:
    """How many latents are single-token (or single-bigram) detectors on their top contexts.

    Args:
        records: from :func:`collect_latent_records` over these sequences.
        tokens: ``(n_seq, seq_len)`` int64, the same sequences in the same order (``top_where``
            indexes it).
        top: contexts looked at per latent, ``1 <= top <= records.k`` (default 20).

    Returns:
        A dict. A latent is *considered* when it fired and has at least ``top`` recorded contexts
        (so it fired on at least ``top`` rows); for each, take its ``top`` largest contexts
        ``(s_i, p_i)``. It is *same-token* when ``tokens[s_i, p_i]`` is the same for all of them,
        and *same-bigram* when the pair ``(tokens[s_i, p_i - 1], tokens[s_i, p_i])`` is (the previous
        token of position 0 is "none", equal only to another position 0's). Same-bigram implies
        same-token. Keys:

        * ``n_latents``: the number considered;
        * ``same_token``, ``same_bigram``: the shares of them (floats in [0, 1]; NaN when none is
          considered);
        * ``same_token_ids``, ``same_bigram_ids``: the latent ids, sorted by max activation
          (largest first, then by id);
        * ``top``: ``top``.
    """
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= records.k:
        raise ValueError(f"top must be an int in [1, k={records.k}], got {top!r}")
    tokens = _check_tokens(tokens, records)
    vals = records.top_values[:, :top]
    considered = (records.fire_count > 0) & ~torch.isnan(vals).any(1)
    ids = torch.nonzero(considered).flatten()
    out: dict[str, Any] = {"n_latents": int(ids.numel()), "top": top}
    if ids.numel() == 0:
        return {**out, "same_token": float("nan"), "same_bigram": float("nan"), "same_token_ids": [],
                "same_bigram_ids": []}
    w = records.top_where[ids, :top]  # (m, top, 2)
    seq, pos = w[..., 0], w[..., 1]
    cur = tokens[seq, pos]
    prev = torch.where(pos > 0, tokens[seq, (pos - 1).clamp(min=0)], torch.full_like(cur, -1))
    same_tok = (cur == cur[:, :1]).all(1)
    same_bi = same_tok & (prev == prev[:, :1]).all(1)
    vmax = records.top_values[ids, 0]

    def by_max(mask: Tensor) -> list[int]:
        pairs = sorted(zip((-vmax[mask]).tolist(), ids[mask].tolist()))
        return [j for _, j in pairs]

    return {**out, "same_token": float(same_tok.double().mean()), "same_bigram": float(same_bi.double().mean()),
            "same_token_ids": by_max(same_tok), "same_bigram_ids": by_max(same_bi)}


def _check_tokens(tokens: Tensor, records: LatentRecords) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be a (n_seq, seq_len) tensor, got "
                         f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
    w = records.top_where[records.top_where[..., 0] >= 0]
    if w.numel() and (int(w[:, 0].max()) >= tokens.shape[0] or int(w[:, 1].max()) >= tokens.shape[1]):
        raise ValueError(f"the records point at (sequence, position) = ({int(w[:, 0].max())}, {int(w[:, 1].max())}) "
                         f"at most, outside tokens of shape {tuple(tokens.shape)}: pass the same sequences")
    return tokens.to("cpu", torch.int64)


# --------------------------------------------------------------------------- page pieces
def byte_token(t: int) -> str:
    """A byte (0–255) as a visible string: printable Latin-1 as itself, newline ``⏎``, tab ``→``,
    and other control or invisible bytes (``\\r``, DEL, 0x80–0xA0, soft hyphen) as ``\\xNN``."""
    t = int(t)
    if not 0 <= t < 256:
        raise ValueError(f"byte_token() takes a byte 0..255, got {t}")
    if t == 10:
        return "⏎"
    if t == 9:
        return "→"
    if t < 32 or 127 <= t <= 160 or t == 173:
        return f"\\x{t:02x}"
    return bytes([t]).decode("latin-1")


_BYTE_HTML = [html.escape(byte_token(t), quote=False) for t in range(256)]


def _png_gray(pixels: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a ``(h, w)`` uint8 array."""
    h, w = pixels.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(pixels, dtype=np.uint8))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _gray(image: np.ndarray) -> np.ndarray:
    """Scale one image to 0..255 by its own min and max (a constant image: mid grey)."""
    lo, hi = float(image.min()), float(image.max())
    if not hi > lo:
        return np.full(image.shape, 128, dtype=np.uint8)
    return np.round((image - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _pct(d: float) -> str:
    return "0%" if d == 0 else f"{100 * d:.3g}%"


def _hist_svg(counts: list[int], lo: float, hi: float) -> str:
    """The firing values' histogram of one latent: bars over log-spaced bins, scaled to its tallest."""
    bw = max(2, 240 // len(counts))
    w, base = bw * len(counts), 40
    top = max(counts) or 1
    path = "".join(f"V{base - 36 * c / top:.1f}h{bw}" for c in counts)
    return (f'<svg class="h" width="{w}" height="54" viewBox="0 0 {w} 54"><path d="M0 {base}{path}V{base}z"/>'
            f'<line x1="0" x2="{w}" y1="{base + .5}" y2="{base + .5}"/><text x="0" y="52">{_fmt(lo)}</text>'
            f'<text x="{w}" y="52" text-anchor="end">{_fmt(hi)}</text></svg>')


def _density_svg(density: Tensor, threshold: float) -> str:
    """Histogram of log10(density) over the live latents, the dense threshold dashed."""
    live = density[density > 0]
    w, h, left, right, top, bottom = 560, 180, 44, 16, 24, 38
    pw, ph = w - left - right, h - top - bottom
    lo_dec = math.floor(math.log10(min(float(live.min()), threshold))) if live.numel() else -4
    span = max(-lo_dec, 1)
    n_bins = 10 * span
    x = live.log10().clamp(lo_dec, -1e-12)
    counts = torch.histc(x, bins=n_bins, min=lo_dec, max=0).tolist() if live.numel() else [0.0] * n_bins
    cmax = max(max(counts), 1)
    bw = pw / n_bins
    bars = "".join(f"M{left + i * bw:.1f} {top + ph}v{-ph * c / cmax:.1f}h{bw * 0.9:.1f}v{ph * c / cmax:.1f}z"
                   for i, c in enumerate(counts) if c)
    out = [f'<svg class="dens" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">',
           f'<path d="{bars}" fill="#3b75af"/>',
           f'<line x1="{left}" x2="{left + pw}" y1="{top + ph + .5}" y2="{top + ph + .5}" stroke="#333"/>']
    for dec in range(lo_dec, 1):
        xx = left + pw * (dec - lo_dec) / span
        label = f"1e{dec}" if dec < -2 else f"{10.0 ** dec:g}"
        out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top + ph}" y2="{top + ph + 5}" stroke="#333"/>'
                   f'<text x="{xx:.1f}" y="{top + ph + 18}" text-anchor="middle">{label}</text>')
    tx = left + pw * (math.log10(threshold) - lo_dec) / span
    out.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{top}" y2="{top + ph}" stroke="#c0392b" '
               f'stroke-dasharray="5 4" stroke-width="1.5"/><text x="{tx:.1f}" y="{top - 8}" '
               f'text-anchor="middle" fill="#c0392b">dense &gt; {_e(_pct(threshold))}</text>')
    out.append(f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{int(cmax)}</text>'
               f'<text x="{left - 6}" y="{top + ph}" text-anchor="end">0</text>'
               f'<text x="{left + pw / 2}" y="{h - 4}" text-anchor="middle">density (share of rows where the latent '
               f'fires, log scale) · {live.numel()} live latents</text></svg>')
    return "".join(out)


def _id_list(ids: list[int], linked: set[int], extra: Callable[[int], str]) -> str:
    """``17 (12.5%), …``, each id a link to its entry when it has one."""
    return ", ".join((f'<a href="#l{j}">{j}</a>' if j in linked else str(j)) + f" ({extra(j)})" for j in ids)


CSS = """
body{font:14px/1.45 "DejaVu Sans",Helvetica,Arial,sans-serif;color:#222;margin:0;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:22px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:24px;margin:0 0 8px}h2{font-size:17px;margin:22px 0 8px;border-bottom:2px solid #e6e8eb;padding-bottom:3px}
.note{color:#666;font-size:12.5px;margin:4px 0}
table.meta{border-collapse:collapse;font-size:13px;margin:4px 0 8px}
table.meta th,table.meta td{padding:3px 10px;border-bottom:1px solid #eceef1;text-align:left}
table.meta th{background:#f0f2f5;font-weight:600}
.top{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}.top>div{flex:1 1 420px;min-width:0}
.ids{max-height:7.5em;overflow:auto;font-size:12.5px;font-variant-numeric:tabular-nums;margin:2px 0 8px}
a{color:#2b5d8f;text-decoration:none}a:hover{text-decoration:underline}
svg.dens{max-width:100%;height:auto}svg text{font:11px "DejaVu Sans",Helvetica,Arial,sans-serif;fill:#444}
.bar{position:sticky;top:0;z-index:2;background:#fff;display:flex;gap:10px;align-items:center;
padding:8px 0;border-bottom:1px solid #e6e8eb;flex-wrap:wrap}
.bar input{flex:1 1 260px;font:inherit;padding:5px 8px;border:1px solid #c9ced6;border-radius:4px}
.bar select,.bar button{font:inherit;padding:4px 8px;border:1px solid #c9ced6;border-radius:4px;background:#f6f7f9}
#count{color:#555;font-size:13px}
details.lat{border-bottom:1px solid #eceef1}
details.lat>summary{cursor:pointer;padding:5px 4px;display:flex;gap:14px;align-items:center;list-style:none}
details.lat>summary::-webkit-details-marker{display:none}
details.lat>summary::before{content:"\\25B8";color:#888;width:10px}details.lat[open]>summary::before{content:"\\25BE"}
details.lat>summary:hover{background:#f4f7fb}
.id{font-weight:700;width:56px;font-variant-numeric:tabular-nums}
.st{color:#555;font-size:12.5px;width:250px;flex:none;font-variant-numeric:tabular-nums}
.tt{font-size:12.5px;color:#333;overflow:hidden;white-space:nowrap;text-overflow:ellipsis;flex:1 1 auto}
.tt code{background:#eef3f8;border-radius:3px;padding:0 3px;margin-right:2px}
.badge{font-size:10.5px;font-weight:700;text-transform:uppercase;color:#8e1b10;background:#fde2df;
border-radius:3px;padding:0 4px}
.body{display:flex;gap:22px;padding:4px 10px 12px 28px;align-items:flex-start}
svg.h{flex:none}svg.h path{fill:#3b75af}svg.h line{stroke:#333}
ol.cx{margin:0;padding:0;list-style:none;font:12.5px/1.55 "DejaVu Sans Mono",Menlo,Consolas,monospace;min-width:0}
ol.cx li{white-space:pre;overflow:hidden;display:flex;align-items:baseline;margin:1px 0}
ol.cx li>span{display:flex;justify-content:flex-end;overflow:hidden}
ol.cx i{font-style:normal;color:#666;flex:0 0 58px;text-align:right;margin-right:10px}
ol.cx.cols{columns:3 170px;column-gap:18px;flex:1 1 auto}ol.cx.cols li{display:block}
mark{background:#ffd54f;color:#000;border-radius:2px;padding:0 1px;font-weight:700;line-height:1.3}
.ims{display:flex;flex-wrap:wrap;gap:4px}
.ims img{image-rendering:pixelated;border:1px solid #ccd;background:#888}
.none{color:#888}#more{margin:12px 0}
"""

SCRIPT = r"""(function(){
var P=100,limit=P,list,items,q,sort,more,count;
function num(e,k){return parseFloat(e.getAttribute("data-"+k))}
function txt(e){if(e._t===undefined){var c=e.querySelectorAll(".cx li"),t=[];
  for(var i=0;i<c.length;i++){var li=c[i];t.push(li.textContent.slice(li.firstChild.textContent.length))}
  e._t=t.join("\n").toLowerCase()}return e._t}
function apply(){
  var s=sort.value,query=q.value.trim().toLowerCase(),arr=items.slice();
  if(s!=="id"){var f=s.split("-"),k=f[0],dir=f[1]==="asc"?1:-1;
    arr.sort(function(a,b){return dir*(num(a,k)-num(b,k))||(num(a,"id")-num(b,"id"))})}
  var idq=/^#?\d+$/.test(query)?query.replace("#",""):null,match=0,frag=document.createDocumentFragment();
  for(var i=0;i<arr.length;i++){var e=arr[i];
    var ok=!query||(idq!==null?e.getAttribute("data-id")===String(parseInt(idq,10)):txt(e).indexOf(query)>=0);
    if(ok){match++}e.hidden=!ok||match>limit;frag.appendChild(e)}
  list.appendChild(frag);
  var shown=Math.min(match,limit),b=document.body.dataset;
  b.sort=s;b.matches=String(match);b.shown=String(shown);
  count.textContent="showing "+shown+" of "+match+(query?" matching":"")+" latents ("+items.length+" listed)";
  more.hidden=match<=limit;more.textContent="show "+Math.min(P,match-limit)+" more";
}
function params(){var h=location.hash.slice(1),o={};
  h.split("&").forEach(function(p){var i=p.indexOf("=");if(i>0){o[p.slice(0,i)]=decodeURIComponent(p.slice(i+1))}});
  return o}
function fromHash(){var h=location.hash,m=/^#l(\d+)$/.exec(h);
  if(m){var e=document.getElementById("l"+m[1]);if(e){q.value="";apply();e.hidden=false;e.open=true;e.scrollIntoView()}
    return}
  var o=params();
  if(o.sort){for(var i=0;i<sort.options.length;i++){if(sort.options[i].value===o.sort){sort.value=o.sort}}}
  if(o.q!==undefined){q.value=o.q}
  limit=P;apply();
  if(o.open){var n=o.open==="all"?1e9:parseInt(o.open,10),c=0;
    for(var j=0;j<list.children.length&&c<n;j++){var e2=list.children[j];if(!e2.hidden){e2.open=true;c++}}}
}
window.addEventListener("DOMContentLoaded",function(){
  list=document.getElementById("latents");items=Array.prototype.slice.call(list.children);
  q=document.getElementById("q");sort=document.getElementById("sort");more=document.getElementById("more");
  count=document.getElementById("count");var t=null;
  q.addEventListener("input",function(){clearTimeout(t);t=setTimeout(function(){limit=P;apply()},150)});
  sort.addEventListener("change",function(){limit=P;apply()});
  more.addEventListener("click",function(){limit+=P;apply()});
  window.addEventListener("hashchange",fromHash);
  fromHash();document.body.dataset.ready="1";
});
window.addEventListener("load",function(){var im=document.images,ok=0;
  for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0){ok++}}
  document.body.dataset.imagesRendered=String(ok);document.body.dataset.imagesTotal=String(im.length);});
})();"""


def _top_tokens(toks: list[str], n: int = 6) -> str:
    def chip(t: str) -> str:
        return t.replace(" ", "␣") if not t.strip() else t

    parts = [f"<code>{chip(t)}</code>×{c}" if c > 1 else f"<code>{chip(t)}</code>"
             for t, c in Counter(toks).most_common(n)]
    return " ".join(parts)


def write_latent_browser(records: LatentRecords, path: str | Path, *, tokens: Tensor | None = None,
                         decode: Callable[[int], str] | None = None, images: Tensor | None = None,
                         window: tuple[int, int] = (24, 6), dense_threshold: float = 0.1,
                         title: str = "Latent browser", meta: dict | None = None,
                         max_latents: int | None = None) -> Path:
    """Write the latent browser (see the module docstring) to ``path`` and return it.

    Args:
        records: from :func:`collect_latent_records`.
        path: the HTML file to write (replaced atomically).
        tokens: text mode: ``(n_seq, seq_len)`` int token ids, the sequences ``top_where`` indexes.
        decode: token id → display string (default :func:`byte_token`, for byte-level ids 0–255);
            newlines and tabs in what it returns are shown as ``⏎`` and ``→``.
        images: image mode: ``(n_samples, h, w)`` float, indexed by ``top_where[..., 0]`` (the
            position is ignored); each top sample is a grayscale PNG thumbnail, scaled to its own
            min..max. At most one of ``tokens`` and ``images``; with neither, contexts show
            ``(sequence, position)`` only.
        window: ``(before, after)`` tokens shown around the activating one (default ``(24, 6)``).
        dense_threshold: latents with a density above this are listed as dense (default 0.1).
        title: the page's title.
        meta: ``{name: str or number}`` shown in a table at the top (model, layer, SAE, L0, FVU…).
        max_latents: give entries to at most this many live latents, the lowest ids (default: all).
            Dead latents never get an entry; they and the dense ones are listed at the top in full.

    Raises:
        ValueError: bad arguments, or records pointing outside ``tokens``/``images``.
    """
    if tokens is not None and images is not None:
        raise ValueError("pass tokens (text) or images, not both")
    if len(window) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in window):
        raise ValueError(f"window must be (before, after) with ints >= 0, got {window!r}")
    if not (isinstance(dense_threshold, (int, float)) and 0 < dense_threshold <= 1):
        raise ValueError(f"dense_threshold must be in (0, 1], got {dense_threshold!r}")
    if max_latents is not None and (isinstance(max_latents, bool) or not isinstance(max_latents, int)
                                    or max_latents < 0):
        raise ValueError(f"max_latents must be an int >= 0 or None, got {max_latents!r}")
    meta = dict(meta or {})
    for key, v in meta.items():
        if not isinstance(key, str) or isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError(f"meta must map str to str or number, got {key!r}: {v!r}")
    tok_np: np.ndarray | None = None
    img_np: np.ndarray | None = None
    if tokens is not None:
        tok_np = _check_tokens(tokens, records).numpy()
    if images is not None:
        if not isinstance(images, Tensor) or images.dim() != 3 or not images.is_floating_point():
            raise ValueError("images must be a (n_samples, h, w) float tensor, got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        w = records.top_where[..., 0]
        if w.numel() and int(w.max()) >= images.shape[0]:
            raise ValueError(f"the records point at sample {int(w.max())}, outside images of shape "
                             f"{tuple(images.shape)}")
        img_np = images.detach().to("cpu", torch.float64).numpy()

    shown_as: dict[int, str] = {}  # token id -> its display string
    escaped: dict[int, str] = {}

    def tok_html(t: int) -> str:
        s = escaped.get(t)
        if s is None:
            if decode is None:
                shown = byte_token(t) if 0 <= t < 256 else f"<{t}>"
            else:
                shown = str(decode(t)).replace("\n", "⏎").replace("\t", "→")
            shown_as[t] = shown
            s = escaped[t] = html.escape(shown, quote=False)
        return s

    def tok_len(t: int) -> int:
        tok_html(t)
        return len(shown_as[t])

    d, k = records.d_sae, records.k
    density = records.density
    fire = records.fire_count.tolist()
    dens = density.tolist()
    top_v = records.top_values.tolist()
    top_w = records.top_where.tolist()
    counts = records.hist_counts.tolist()
    lo, hi = float(records.hist_edges[0]), float(records.hist_edges[-1])
    dead_ids = [j for j in range(d) if fire[j] == 0]
    dense_ids = [j for j in range(d) if dens[j] > dense_threshold]
    dense_ids.sort(key=lambda j: -dens[j])
    live_ids = [j for j in range(d) if fire[j] > 0]
    shown_ids = live_ids if max_latents is None else live_ids[:max_latents]
    before, after = window

    # the entries
    thumbs: dict[int, str] = {}

    def thumb(s: int, v: float) -> str:
        if s not in thumbs:
            im = img_np[s]
            scale = max(1, round(40 / max(im.shape)))
            thumbs[s] = (f'src="{_data_uri("image/png", _png_gray(_gray(im)))}" width="{im.shape[1] * scale}" '
                         f'height="{im.shape[0] * scale}"')
        return f'<img {thumbs[s]} alt="sample {s}" title="{_fmt(v)} · sample {s}">'

    entries = []
    pre_chars: list[int] = []  # the length of the text before each activating token
    for j in shown_ids:
        n_ctx = sum(1 for v in top_v[j] if not math.isnan(v))
        vals, wh = top_v[j][:n_ctx], top_w[j][:n_ctx]
        vmax = vals[0] if vals else 0.0
        dense = dens[j] > dense_threshold
        head = (f'<span class="id">#{j}</span><span class="st">{_pct(dens[j])} · {_n(fire[j], "row")} · '
                f"max {_fmt(vmax)}</span>")
        if tok_np is not None:
            lines, acts = [], []
            for v, (s, p) in zip(vals, wh):
                row = tok_np[s]
                pre_ids = row[max(0, p - before):p]
                pre = "".join(tok_html(int(t)) for t in pre_ids)
                pre_chars.append(sum(tok_len(int(t)) for t in pre_ids))
                act = tok_html(int(row[p]))
                post = "".join(tok_html(int(t)) for t in row[p + 1:p + 1 + after])
                acts.append(act)
                lines.append(f'<li title="seq {s} pos {p}"><i>{_fmt(v)}</i><span>{pre}</span><mark>{act}</mark>{post}'
                             "</li>")
            summary = head + f'<span class="tt">{_top_tokens(acts)}</span>'
            detail = f'<ol class="cx">{"".join(lines)}</ol>'
        elif img_np is not None:
            summary = head + f'<span class="tt ims">{"".join(thumb(s, v) for v, (s, _) in zip(vals, wh))}</span>'
            detail = ('<ol class="cx cols">' + "".join(f"<li><i>{_fmt(v)}</i>sample {s}</li>" for v, (s, _) in
                                                   zip(vals, wh)) + "</ol>")
        else:
            summary = head + '<span class="tt"></span>'
            detail = ('<ol class="cx cols">' + "".join(f"<li><i>{_fmt(v)}</i>seq {s} pos {p}</li>"
                                                   for v, (s, p) in zip(vals, wh)) + "</ol>")
        if dense:
            summary += '<span class="badge">dense</span>'
        entries.append(f'<details class="lat" id="l{j}" data-id="{j}" data-density="{dens[j]!r}" '
                       f'data-max="{vmax!r}" data-fires="{fire[j]}"><summary>{summary}</summary>'
                       f'<div class="body">{_hist_svg(counts[j], lo, hi)}{detail}</div></details>')

    # the header
    auto = {"rows seen": records.n_rows, "latents (d_sae)": d, "contexts per latent (k)": k,
            "histogram range": f"{_fmt(lo)} … {_fmt(hi)} ({len(counts[0]) if d else 0} log-spaced bins)"}
    meta_rows = "".join(f"<tr><th>{_e(key)}</th><td>{_e(format(v, '.6g') if isinstance(v, float) else v)}</td></tr>"
                        for key, v in {**meta, **auto}.items())
    mode = (f"text: the activating token highlighted, {before} before and {after} after" if tok_np is not None
            else "images: the top samples, each scaled to its own min..max" if img_np is not None
            else "positions only")
    # the activating tokens line up in one column, wide enough for 9 in 10 contexts' text before them
    # (the rest is cut on the left); the width lives in the page's CSS, not in each context
    col = int(np.percentile(pre_chars, 90)) if pre_chars else 1
    css = CSS + f"ol.cx li>span{{flex:0 0 {min(max(col, 1), 64)}ch}}"
    parts = [f"<h1>{_e(title)}</h1>", '<div class="top"><div>', f'<table class="meta">{meta_rows}</table>',
             f'<p class="note">A latent fires on a row where its code is &gt; 0; density is the share of the '
             f"{records.n_rows} rows where it fires. Contexts: {_e(mode)}. Each histogram counts the latent's "
             "non-zero values over log-spaced bins shared by all latents, scaled to its own tallest bin.</p>",
             "</div><div>", _density_svg(density, float(dense_threshold)), "</div></div>"]
    parts.append(f'<h2 id="dead" data-count="{len(dead_ids)}">{_n(len(dead_ids), "dead latent")} '
                 f"({_pct(len(dead_ids) / max(d, 1))}; never fired, no entry below)</h2>")
    parts.append(f'<div class="ids" id="dead-ids">{", ".join(map(str, dead_ids)) or "none"}</div>')
    parts.append(f'<h2 id="dense" data-count="{len(dense_ids)}">{_n(len(dense_ids), "dense latent")} '
                 f"(density &gt; {_e(_pct(dense_threshold))})</h2>")
    dense_list = _id_list(dense_ids, set(shown_ids), lambda j: _pct(dens[j]))
    parts.append(f'<div class="ids" id="dense-ids">{dense_list or "none"}</div>')
    capped = (f"; the {len(shown_ids)} lowest ids of the {len(live_ids)} live latents (max_latents)"
              if len(shown_ids) < len(live_ids) else "")
    parts.append(f"<h2>Latents</h2><p class=\"note\">{len(shown_ids)} entries{capped}. Click a latent for its "
                 "histogram and top contexts. Search by latent id (digits) or by text in its contexts; the URL "
                 "fragment <code>#sort=max-desc&amp;q=the&amp;open=3</code> or <code>#l17</code> does the same."
                 "</p>")
    parts.append('<div class="bar"><input id="q" type="search" placeholder="latent id, or text in its contexts" '
                 'aria-label="search"><select id="sort" aria-label="sort"><option value="id">latent id</option>'
                 '<option value="density-desc">density ↓</option><option value="density-asc">density ↑</option>'
                 '<option value="max-desc">max activation ↓</option><option value="max-asc">max activation ↑'
                 f'</option></select><span id="count">{len(shown_ids)} latents</span></div>')
    parts.append(f'<div id="latents">{"".join(entries)}</div><button id="more" type="button" hidden>show more'
                 "</button>")
    if not live_ids:
        parts.append('<p class="none">No latent fired.</p>')

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{css}</style><script>{SCRIPT}</script></head>\n"
            f'<body data-latents="{len(shown_ids)}" data-d-sae="{d}"><main>\n{chr(10).join(parts)}\n</main>'
            "</body></html>\n")
    from .checkpoint import atomic_write

    out = Path(path)
    atomic_write(out, lambda p: p.write_text(page, encoding="utf-8"))
    return out

