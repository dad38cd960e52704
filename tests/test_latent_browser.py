"""The latent browser: streamed per-latent records against a naive reference, the (sequence,
position) of each row of a language model, purity on known records, and the HTML page (parsed,
and rendered in headless Chromium)."""

from __future__ import annotations

import math
import re
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from actsparse.latent_browser import (
    LatentRecords,
    byte_token,
    collect_latent_records,
    lm_latent_codes,
    purity,
    write_latent_browser,
)


# --------------------------------------------------------------------------- helpers
def random_stream(seed: int = 0, d: int = 40, sizes=(17, 0, 31, 5, 23, 40)):
    """Sparse random codes in batches of the given sizes, with a dead latent (0), one firing 3 times
    (1), one with tied values (2), negative entries (not firing) and (seq, position) per row."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    code = torch.rand(n, d, generator=g) * 3
    code[torch.rand(n, d, generator=g) < 0.8] = 0
    code[torch.rand(n, d, generator=g) < 0.05] = -1.0  # negative: never firing
    code[:, 0] = 0
    code[:, 1] = 0
    code[[4, 30, 90], 1] = torch.tensor([0.5, 2.0, 0.5])
    code[:, 2] = torch.randint(0, 3, (n,), generator=g).float() * 0.5  # 0, 0.5, 1.0: many ties
    code[:, 3] = 1e-9  # tiny values, below the default histogram range: the first bin
    where = torch.stack([torch.arange(n) // 7, torch.arange(n) % 7], 1)
    batches, i = [], 0
    for s in sizes:
        batches.append((code[i:i + s], where[i:i + s]))
        i += s
    return batches, code, where


def naive(code: torch.Tensor, where: torch.Tensor, k: int, edges: np.ndarray):
    """Per latent: the firing rows sorted by (-value, row), the first k; counts; histograms."""
    c = code.numpy().astype(np.float64)
    d = c.shape[1]
    vals = np.full((d, k), np.nan)
    wh = np.full((d, k, 2), -1, dtype=np.int64)
    counts = np.zeros(d, dtype=np.int64)
    hist = np.zeros((d, len(edges) - 1), dtype=np.int64)
    for j in range(d):
        rows = np.nonzero(c[:, j] > 0)[0]
        counts[j] = rows.size
        order = rows[np.lexsort((rows, -c[rows, j]))][:k]
        vals[j, :order.size] = c[order, j]
        wh[j, :order.size] = where.numpy()[order]
        for v in c[rows, j]:
            b = min(max(int(np.searchsorted(edges, v, side="right")) - 1, 0), len(edges) - 2)
            hist[j, b] += 1
    return vals, wh, counts, hist


class Page(HTMLParser):
    """Start tags with their attributes, the text of each element by id, and the <details> entries."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.body: dict = {}
        self.entries: list[dict] = []  # attributes of each details.lat, in document order
        self.text_by_id: dict[str, str] = {}
        self._open: list[tuple[str, str | None]] = []
        self._chunks: dict[str, list[str]] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "body":
            self.body = a
        if tag == "details" and "lat" in (a.get("class") or ""):
            self.entries.append(a)
        if tag not in ("img", "br", "meta", "input", "path", "line", "rect"):
            self._open.append((tag, a.get("id")))
            if a.get("id"):
                self._chunks[a["id"]] = []

    def handle_endtag(self, tag):
        while self._open:
            t, i = self._open.pop()
            if i:
                self.text_by_id[i] = "".join(self._chunks.pop(i))
            if t == tag:
                break

    def handle_data(self, data):
        for _, i in self._open:
            if i:
                self._chunks[i].append(data)


def parse(text: str) -> Page:
    p = Page()
    p.feed(text)
    p.close()
    return p


def read_png(data: bytes) -> np.ndarray:
    """Decode an 8-bit grayscale, non-interlaced PNG (checking every chunk's CRC)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    i, idat, w = 8, b"", None
    while i < len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        tag, body = data[i + 4:i + 8], data[i + 8:i + 8 + n]
        assert struct.unpack(">I", data[i + 8 + n:i + 12 + n])[0] == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        if tag == b"IHDR":
            w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, color, interlace) == (8, 0, 0)
        elif tag == b"IDAT":
            idat += body
        i += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, w + 1)
    assert (raw[:, 0] == 0).all()  # filter type None on every row
    return raw[:, 1:]


def text_records(tokens: torch.Tensor, fires: dict[int, list[tuple[int, int, float]]], d: int, k: int = 4):
    """Records from a dense code that is non-zero exactly at the given (seq, pos, value) per latent."""
    n_seq, seq_len = tokens.shape
    code = torch.zeros(n_seq * seq_len, d)
    for j, items in fires.items():
        for s, p, v in items:
            code[s * seq_len + p, j] = v
    where = torch.stack(torch.meshgrid(torch.arange(n_seq), torch.arange(seq_len), indexing="ij"), -1).view(-1, 2)
    return collect_latent_records([(code[:9], where[:9]), (code[9:], where[9:])], k=k, n_bins=8)


# --------------------------------------------------------------------------- records
@pytest.mark.parametrize("k", [1, 6])
def test_records_match_a_naive_reference(k):
    batches, code, where = random_stream()
    rec = collect_latent_records(iter(batches), k=k, n_bins=12)
    edges = rec.hist_edges.numpy()
    vals, wh, counts, hist = naive(code, where, k, edges)
    assert rec.n_rows == code.shape[0] and rec.d_sae == 40 and rec.k == k
    assert rec.top_values.dtype == torch.float32 and rec.top_where.dtype == torch.int64
    assert rec.fire_count.dtype == torch.int64 and rec.hist_counts.dtype == torch.int64
    assert np.array_equal(rec.fire_count.numpy(), counts)
    assert np.array_equal(np.isnan(rec.top_values.numpy()), np.isnan(vals))
    got = rec.top_values.numpy().astype(np.float64)
    assert np.array_equal(got[~np.isnan(vals)], vals[~np.isnan(vals)].astype(np.float32).astype(np.float64))
    assert np.array_equal(rec.top_where.numpy(), wh)  # ties too: the earlier row first
    assert np.array_equal(rec.hist_counts.numpy(), hist)
    assert torch.equal(rec.hist_counts.sum(1), rec.fire_count)
    assert torch.allclose(rec.density, torch.from_numpy(counts / code.shape[0]))
    # the cases the stream was built for
    assert counts[0] == 0 and np.isnan(rec.top_values[0].numpy()).all() and (rec.top_where[0] == -1).all()
    assert counts[1] == 3
    if k == 6:
        assert rec.top_values[1, :3].tolist() == [2.0, 0.5, 0.5] and math.isnan(rec.top_values[1, 3])
        assert rec.top_where[1, :3].tolist() == [where[30].tolist(), where[4].tolist(), where[90].tolist()]
        assert (rec.top_where[1, 3:] == -1).all()
    assert hist[3, 0] == counts[3] == code.shape[0]  # 1e-9 lies below the range: all in the first bin
    # default edges: log-spaced, from the first batch with firing entries (the first; at most 6 decades)
    first = batches[0][0]
    fv = first[first > 0].double()
    hi = float(fv.max()) * 10
    assert math.isclose(edges[-1], hi) and math.isclose(edges[0], max(float(fv.min()) / 10, hi * 1e-6))
    assert np.allclose(np.diff(np.log(edges)), np.log(edges[-1] / edges[0]) / 12)


def test_batching_does_not_change_the_records():
    batches, code, where = random_stream(seed=3)
    one = collect_latent_records([(code, where)], k=5, value_range=(0.01, 10))
    many = collect_latent_records(batches, k=5, value_range=(0.01, 10))
    rows = collect_latent_records([(code[i:i + 1], where[i:i + 1]) for i in range(code.shape[0])], k=5,
                                  value_range=(0.01, 10))
    for r in (many, rows):
        assert torch.equal(r.top_where, one.top_where) and torch.equal(r.hist_counts, one.hist_counts)
        assert torch.equal(r.top_values.nan_to_num(-1), one.top_values.nan_to_num(-1))
    assert one.hist_edges[0] == 0.01 and one.hist_edges[-1] == 10
    # bin i holds [edges[i], edges[i+1]); below the range: the first bin, at or above it: the last
    vals = torch.tensor([[4.0], [50.0], [0.5], [1.0], [0.1], [0.3], [1.99]])
    edge = collect_latent_records([(vals, torch.zeros(7, 2, dtype=torch.int64))], n_bins=4, value_range=(0.25, 4))
    assert edge.hist_edges.tolist() == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert edge.hist_counts.tolist() == [[2, 1, 2, 2]]


def test_bad_streams_raise_naming_the_batch():
    good = (torch.rand(3, 4), torch.zeros(3, 2, dtype=torch.int64))
    nan = torch.rand(3, 4)
    nan[1, 2] = float("nan")
    inf = torch.rand(3, 4)
    inf[0, 0] = -float("inf")
    cases = [
        ([good, good, (nan, good[1])], "batch 2: the code holds NaN"),
        ([good, (inf, good[1])], "batch 1: the code holds Inf"),
        ([good, (torch.rand(3, 5), good[1])], "batch 1: code has 5 latents"),
        ([(torch.rand(3), good[1])], "batch 0: code must be (n, d_sae)"),
        ([(torch.ones(3, 4, dtype=torch.int64), good[1])], "batch 0: code must be a float"),
        ([good, (good[0], torch.zeros(3, 2))], "batch 1: where must be int64"),
        ([(good[0], torch.zeros(2, 2, dtype=torch.int64))], "batch 0: where must be (n, 2)"),
        ([(good[0], -torch.ones(3, 2, dtype=torch.int64))], "batch 0: where holds negative"),
        ([], "no batches"),
    ]
    for stream, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            collect_latent_records(stream)
    # finite codes whose float32 sum overflows are fine
    huge = collect_latent_records([(torch.full((4, 2), 3e38), torch.zeros(4, 2, dtype=torch.int64))], k=2)
    assert huge.fire_count.tolist() == [4, 4] and torch.equal(huge.top_values, torch.full((2, 2), 3e38))
    with pytest.raises(TypeError, match="batch 0"):
        collect_latent_records([torch.rand(3, 4)])
    for kwargs in ({"k": 0}, {"n_bins": 0}, {"value_range": (1.0, 0.5)}, {"value_range": (0.0, 1.0)}):
        with pytest.raises(ValueError):
            collect_latent_records([good], **kwargs)


# --------------------------------------------------------------------------- language models
def test_lm_latent_codes_rows_are_where_they_say():
    pytest.importorskip("transformers")
    from actsparse.data.activations import tiny_gpt2
    from actsparse.models import SparseAutoencoder

    model = tiny_gpt2(0, n_layer=2, n_embd=32, n_head=2)
    torch.manual_seed(0)
    sae = SparseAutoencoder(32, 64, "relu", decoder="linear")
    sae.train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (9, 11), generator=g)
    batches = [tokens[:4], tokens[4:5], tokens[5:]]

    def first(out):  # a block returns a tensor or a tuple (hidden, ...), by transformers version
        return (out if isinstance(out, torch.Tensor) else out[0]).detach()

    # the reference: layer h.0's output for every sequence, by a hook of our own, in one forward
    seen = []
    handle = model.h[0].register_forward_hook(lambda m, a, out: seen.append(first(out)))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    hidden = seen[0]  # (9, 11, 32)
    with torch.no_grad():
        ref_code = sae.encode(hidden.reshape(-1, 32)).view(9, 11, 64)

    pairs = list(lm_latent_codes(model, "h.0", sae, batches))
    assert sae.training and not model.training  # the SAE's mode restored (tiny_gpt2 is in eval mode)
    assert len(pairs) == 3
    where = torch.cat([w for _, w in pairs])
    code = torch.cat([c for c, _ in pairs])
    assert code.shape == (9 * 10, 64) and code.dtype == torch.float32 and where.dtype == torch.int64
    # drop_first: every (sequence, position) but position 0, sequences counted across batches, row-major
    expected = [[s, p] for s in range(9) for p in range(1, 11)]
    assert where.tolist() == expected
    assert torch.allclose(code, ref_code[where[:, 0], where[:, 1]], atol=1e-5)
    assert (code > 0).any() and not code.requires_grad

    # a record's value equals the code of its (sequence, position) recomputed on that sequence alone
    rec = collect_latent_records(lm_latent_codes(model, "h.0", sae, batches), k=3)
    assert rec.n_rows == 90 and (rec.top_where[..., 1][rec.top_where[..., 1] >= 0] >= 1).all()
    checked = 0
    for j in (0, 7, 33, 63):
        for i in range(3):
            s, p = rec.top_where[j, i].tolist()
            if s < 0:
                continue
            seen.clear()
            handle = model.h[0].register_forward_hook(lambda m, a, out: seen.append(first(out)))
            with torch.no_grad():
                model(tokens[s:s + 1])
            handle.remove()
            with torch.no_grad():
                alone = sae.encode(seen[0][0, p:p + 1])[0, j]
            assert math.isclose(float(rec.top_values[j, i]), float(alone), rel_tol=1e-4, abs_tol=1e-5), (j, i)
            checked += 1
    assert checked >= 6
    # positions="all" keeps position 0; a padded mapping batch drops padding and its first real token
    n_all = sum(c.shape[0] for c, _ in lm_latent_codes(model, "h.0", sae, [tokens[:2]], positions="all"))
    assert n_all == 22
    mask = torch.ones(2, 11, dtype=torch.int64)
    mask[1, :3] = 0  # left padding
    (code_m, where_m), = lm_latent_codes(model, "h.0", sae, [{"input_ids": tokens[:2], "attention_mask": mask}])
    assert where_m.tolist() == [[0, p] for p in range(1, 11)] + [[1, p] for p in range(4, 11)]


# --------------------------------------------------------------------------- purity
def test_purity_on_known_records():
    tokens = torch.tensor([[5, 1, 2, 3, 1, 2],
                           [1, 2, 9, 9, 4, 2],
                           [2, 7, 7, 1, 2, 0]])
    k = 3
    nan = float("nan")
    spec = {  # latent: ([(seq, pos)], [values], fire_count)
        0: ([(0, 2), (1, 1), (2, 4)], [3.0, 2.0, 1.0], 5),  # all "1 2": same bigram (and token)
        1: ([(0, 2), (1, 5), (1, 1)], [4.0, 3.0, 1.0], 3),  # all 2, previous 1/4/1: same token only
        2: ([(0, 1), (0, 2), (1, 0)], [5.0, 1.0, 1.0], 3),  # 1, 2, 1: neither
        3: ([], [], 0),  # dead
        4: ([(0, 2), (2, 4)], [9.0, 8.0], 2),  # two contexts < top = 3: not considered
        5: ([(2, 0), (0, 2), (2, 4)], [6.0, 2.0, 2.0], 4),  # all 2; position 0 has no previous: token only
        6: ([(1, 2), (1, 3), (2, 2)], [0.5, 0.4, 0.3], 3),  # 9 9 7: neither
    }
    d = len(spec)
    top_v = torch.full((d, k), nan)
    top_w = torch.full((d, k, 2), -1, dtype=torch.int64)
    fire = torch.zeros(d, dtype=torch.int64)
    for j, (wh, vals, n) in spec.items():
        top_v[j, :len(vals)] = torch.tensor(vals)
        if wh:
            top_w[j, :len(wh)] = torch.tensor(wh)
        fire[j] = n
    rec = LatentRecords(n_rows=18, fire_count=fire, hist_edges=torch.logspace(-2, 1, 4, dtype=torch.float64),
                        hist_counts=torch.zeros(d, 3, dtype=torch.int64), top_values=top_v, top_where=top_w)
    out = purity(rec, tokens, top=3)
    assert out["n_latents"] == 5 and out["top"] == 3
    assert out["same_token"] == 3 / 5 and out["same_bigram"] == 1 / 5
    assert out["same_token_ids"] == [5, 1, 0]  # by max activation, largest first
    assert out["same_bigram_ids"] == [0]
    # with top = 2, latent 4 (two contexts, 2 and 2 after 1 and 1) counts, and latent 2 (1, 2) is still mixed
    two = purity(rec, tokens, top=2)
    assert two["n_latents"] == 6 and 4 in two["same_bigram_ids"] and 2 not in two["same_token_ids"]
    assert two["same_token_ids"][0] == 4 and 6 in two["same_token_ids"] and 6 not in two["same_bigram_ids"]
    with pytest.raises(ValueError, match="top must be"):
        purity(rec, tokens, top=4)
    with pytest.raises(ValueError, match="outside tokens"):
        purity(rec, tokens[:, :3], top=3)
    none = LatentRecords(0, torch.zeros(2, dtype=torch.int64), rec.hist_edges, torch.zeros(2, 3, dtype=torch.int64),
                         torch.full((2, 3), nan), torch.full((2, 3, 2), -1, dtype=torch.int64))
    empty = purity(none, tokens, top=3)
    assert empty["n_latents"] == 0 and math.isnan(empty["same_token"]) and empty["same_token_ids"] == []


# --------------------------------------------------------------------------- the page
def test_byte_token():
    assert byte_token(ord("a")) == "a" and byte_token(10) == "⏎" and byte_token(9) == "→"
    assert byte_token(0) == "\\x00" and byte_token(13) == "\\x0d" and byte_token(127) == "\\x7f"
    assert byte_token(0x85) == "\\x85" and byte_token(0xE9) == "é" and byte_token(32) == " "
    with pytest.raises(ValueError):
        byte_token(256)


TEXT = [b"Hello <script>alert(1)</script> and more text.",
        b"the cat sat on the mat\nthe dog sat on the log."]


def text_page(tmp_path: Path, **kwargs) -> tuple[Path, LatentRecords, torch.Tensor]:
    width = max(map(len, TEXT))
    tokens = torch.tensor([list(t.ljust(width)) for t in TEXT])
    s_pos = TEXT[0].index(b"<script>") + 1  # the "s" of <script>
    fires = {
        1: [(0, s_pos, 2.5)],  # fires on the "s" inside "<script>"
        2: [(1, p, 1.0 + 0.01 * p) for p in range(width) if TEXT[1][p:p + 1] == b"a"],  # every "a"
        3: [(s, p, 0.3) for s in range(2) for p in range(0, width, 2)],  # dense: every other byte
        4: [(1, TEXT[1].index(b"\n"), 7.0)],  # the newline
        6: [(0, TEXT[0].index(b"alert"), 1.5)],  # right after "<script>"
    }
    rec = text_records(tokens, fires, d=7, k=4)  # latents 0 and 5 are dead
    out = write_latent_browser(rec, tmp_path / "text.html", tokens=tokens, window=(8, 3), dense_threshold=0.3,
                               meta={"model": "<b>tiny</b>", "L0": 3.25, "tokens": 1234567}, **kwargs)
    return out, rec, tokens


def entry_html(text: str, j: int) -> str:
    start = text.index(f'<details class="lat" id="l{j}"')
    return text[start:text.index("</details>", start)]


def test_page_is_self_contained_and_escaped(tmp_path):
    path, rec, tokens = text_page(tmp_path)
    text = path.read_text(encoding="utf-8")
    page = parse(text)
    assert text.startswith("<!DOCTYPE html>")
    csp = [a for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]
    for tag, attrs in page.tags:
        assert tag not in ("link", "iframe", "object", "embed"), tag
        assert not attrs.get("src", "data:").startswith(("http", "//")) and "srcset" not in attrs
        assert attrs.get("href", "#").startswith("#"), attrs
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    assert "url(" not in text and "@import" not in text
    # the data is escaped: one <script> element (ours), the context's tag shown as text
    assert [t for t, _ in page.tags].count("script") == 1
    assert text.count("<script") == 1 and "<script>alert" not in text
    assert "<span>&lt;script&gt;</span><mark>a</mark>ler</li>" in entry_html(text, 6)
    assert "<b>tiny</b>" not in text and "&lt;b&gt;tiny&lt;/b&gt;" in text and ">3.25<" in text and ">1234567<" in text
    # latent 1's context: 8 bytes before the "s" of <script>, the s highlighted, 3 after, and its value
    e1 = entry_html(text, 1)
    assert "<span>Hello &lt;</span><mark>s</mark>cri</li>" in e1 and "<i>2.5</i>" in e1
    # the newline latent shows ⏎ highlighted; latent 2's contexts are its "a"s, largest value first
    assert "<mark>⏎</mark>the" in entry_html(text, 4)
    e2 = entry_html(text, 2)
    assert e2.count("<mark>a</mark>") == 4 and e2.count("<li title=\"seq 1 pos ") == 4  # 5 "a"s, k = 4
    values = [float(v) for v in re.findall(r"<i>([0-9.]+)</i>", e2)]
    assert values == sorted(values, reverse=True) and len(values) == 4
    # dead latents: listed at the top, no entry; the dense one listed with its density and badged
    assert page.text_by_id["dead-ids"] == "0, 5" and page.text_by_id["dead"].startswith("2 dead latents")
    assert [int(e["data-id"]) for e in page.entries] == [1, 2, 3, 4, 6]
    assert "3 (" in page.text_by_id["dense-ids"] and page.text_by_id["dense"].startswith("1 dense latent ")
    assert '<span class="badge">dense</span>' in entry_html(text, 3)
    assert '<span class="badge">dense</span>' not in e1
    density = rec.density
    for e in page.entries:
        assert float(e["data-density"]) == float(density[int(e["data-id"])])
        assert float(e["data-max"]) == float(rec.top_values[int(e["data-id"]), 0])
    # one histogram per entry, as inline SVG, and the density chart
    assert text.count('<svg class="h"') == 5 and text.count('<svg class="dens"') == 1

    # a decode of our own is escaped too; max_latents caps the entries (lowest live ids)
    out = write_latent_browser(rec, tmp_path / "dec.html", tokens=tokens, decode=lambda t: f"<{t}>",
                               max_latents=2)
    text2 = out.read_text(encoding="utf-8")
    assert [int(e["data-id"]) for e in parse(text2).entries] == [1, 2]
    assert "<mark>&lt;115&gt;</mark>" in text2 and "<115>" not in text2  # 115 = "s"


def test_image_mode_embeds_pngs_of_the_samples(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(12, 5, 7, generator=g)
    images[4] = 2.0  # a constant sample: mid grey
    code = torch.zeros(12, 3)
    code[[2, 4, 9], 1] = torch.tensor([1.0, 3.0, 2.0])
    code[[0, 1], 2] = torch.tensor([0.5, 0.7])
    where = torch.stack([torch.arange(12), torch.zeros(12, dtype=torch.int64)], 1)
    rec = collect_latent_records([(code, where)], k=3)
    path = write_latent_browser(rec, tmp_path / "img.html", images=images)
    page = parse(path.read_text(encoding="utf-8"))
    imgs = [a for t, a in page.tags if t == "img"]
    assert [a["alt"] for a in imgs] == ["sample 4", "sample 9", "sample 2", "sample 1", "sample 0"]
    import base64

    for a in imgs:
        assert a["src"].startswith("data:image/png;base64,")
        pixels = read_png(base64.b64decode(a["src"].split(",", 1)[1]))
        assert pixels.shape == (5, 7)
        im = images[int(a["alt"].split()[1])].double().numpy()
        if im.max() == im.min():
            assert (pixels == 128).all()
        else:
            expected = np.round((im - im.min()) / (im.max() - im.min()) * 255)
            assert np.array_equal(pixels, expected.astype(np.uint8))
            assert pixels.min() == 0 and pixels.max() == 255
        try:
            from PIL import Image
        except ImportError:
            continue
        import io

        with Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1]))) as pil:
            assert pil.size == (7, 5) and np.array_equal(np.asarray(pil), pixels)
    with pytest.raises(ValueError, match="outside images"):
        write_latent_browser(rec, tmp_path / "bad.html", images=images[:5])
    with pytest.raises(ValueError, match="not both"):
        write_latent_browser(rec, tmp_path / "bad.html", images=images, tokens=torch.zeros(12, 1, dtype=torch.long))


# --------------------------------------------------------------------------- in a browser
def _render(chromium: Path, url: str, tmp_path: Path, shot: Path | None = None) -> str:
    cmd = [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--hide-scrollbars",
           "--window-size=1200,800"]
    if shot is not None:
        cmd.append(f"--screenshot={shot}")
    res = subprocess.run([*cmd, "--dump-dom", url], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_page_sorts_filters_and_renders_in_chromium(tmp_path, chromium):
    """The script runs (data-ready), sorting by density reorders the entries, a text search hides the
    latents whose contexts lack it, and the screenshot is not blank; image mode's PNGs decode."""
    path, rec, _ = text_page(tmp_path)
    ids_in_file = [int(e["data-id"]) for e in parse(path.read_text(encoding="utf-8")).entries]
    shot = tmp_path / "page.png"
    dom = parse(_render(chromium, path.resolve().as_uri() + "#sort=density-desc&q=HELLO&open=1", tmp_path, shot))
    assert dom.body.get("data-ready") == "1" and dom.body.get("data-sort") == "density-desc", dom.body
    order = [int(e["data-id"]) for e in dom.entries]
    dens = rec.density.tolist()
    assert sorted(order) == ids_in_file and order != ids_in_file
    assert order == sorted(ids_in_file, key=lambda j: (-dens[j], j))
    # "hello" (any case) is in the contexts of latents 1 (before the "s" of <script>) and 3 (dense, its
    # four top contexts the first even positions of "Hello <script>") only
    visible = [int(e["data-id"]) for e in dom.entries if "hidden" not in e]
    assert visible == [3, 1] and dom.body.get("data-matches") == "2" and dom.body.get("data-shown") == "2"
    assert "open" in dom.entries[0] and "open" not in dom.entries[1]
    assert shot.is_file()
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1200, 800)
        colors = dict((rgb, n) for n, rgb in im.convert("RGB").getcolors(maxcolors=1 << 20))
    # not blank (an empty page is one colour), and the highlight and the bars were drawn
    assert len(colors) > 100 and max(colors.values()) < 0.97 * 1200 * 800
    assert colors.get((0xFF, 0xD5, 0x4F), 0) > 200 and colors.get((0x3B, 0x75, 0xAF), 0) > 200

    # an id search shows that latent only; image mode's thumbnails all decode in the browser
    dom = parse(_render(chromium, path.resolve().as_uri() + "#q=4", tmp_path))
    assert [int(e["data-id"]) for e in dom.entries if "hidden" not in e] == [4]
    # a text search looks at the contexts, not at the values beside them (latent 1's is 2.5)
    dom = parse(_render(chromium, path.resolve().as_uri() + "#q=2.5", tmp_path))
    assert dom.body.get("data-matches") == "0" and all("hidden" in e for e in dom.entries)
    images = torch.rand(6, 4, 4)
    code = torch.zeros(6, 2)
    code[:, 1] = torch.arange(6.0)
    where = torch.stack([torch.arange(6), torch.zeros(6, dtype=torch.int64)], 1)
    img = write_latent_browser(collect_latent_records([(code, where)], k=3), tmp_path / "img.html", images=images)
    body = parse(_render(chromium, img.resolve().as_uri(), tmp_path)).body
    assert body.get("data-images-total") == "3" and body.get("data-images-rendered") == "3", body
