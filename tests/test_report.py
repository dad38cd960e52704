"""``actsparse report RUN``: one self-contained HTML page per run (config, metrics, figures, units),
checked by parsing it and by rendering it in headless Chromium."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actsparse.cli import main
from actsparse.config import TrainConfig
from actsparse.report import unit_stats, write_report
from actsparse.weights import save_weights

DEAD = [2, 5]  # units the fixture kills by a very negative encoder bias
TINY = ["--samples", "400", "--iterations", "8", "--hidden", "12", "--activation", "relu", "--decoder", "linear",
        "--penalty", "l1", "--weight", "1e-3", "--no-progress"]


class Page(HTMLParser):
    """Every start tag with its attributes, the table rows (class, cell texts) and the body's attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.rows: list[tuple[str | None, list[str]]] = []
        self.body: dict = {}
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "body":
            self.body = a
        elif tag == "tr":
            self.rows.append((a.get("class"), []))
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1][1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(text: str) -> Page:
    p = Page()
    p.feed(text)
    p.close()
    return p


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny ReLU run on patches (so it has every figure), two of its units killed afterwards."""
    out = tmp_path_factory.mktemp("report")
    assert main(["train", *TINY, "--out", str(out), "--name", "tiny"]) == 0
    run = out / "tiny"
    weights = load_file(str(run / "model.safetensors"))
    weights["b_enc"][DEAD] = -1e4
    save_weights(run / "model.safetensors", weights)  # with its checksum, as train writes it
    return run


@pytest.fixture(scope="module")
def report(run) -> Path:
    return write_report(run)


def test_cli_writes_the_page(run, capsys):
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'report.html'}"


def test_page_is_self_contained_and_complete(run, report):
    text = report.read_text(encoding="utf-8")
    page = parse(text)
    assert page.tags[0][0] == "html" and text.startswith("<!DOCTYPE html>")
    # nothing outside the file: every src is a data: URI, no href, no <link>, no CSS url()
    for tag, attrs in page.tags:
        assert tag not in ("link", "iframe", "object", "embed"), tag
        assert "href" not in attrs and "srcset" not in attrs, (tag, attrs)
        if "src" in attrs:
            assert attrs["src"].startswith("data:image/"), (tag, attrs["src"][:60])
    assert "url(" not in text and "@import" not in text
    # every PNG of the folder, byte for byte, plus the per-unit chart
    pngs = sorted(run.glob("*.png"))
    assert {p.name for p in pngs} >= {"loss.png", "filters.png", "reconstructions.png", "rho_hat.png"}
    srcs = [a["src"] for t, a in page.tags if t == "img"]
    for p in pngs:
        assert "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() in srcs, p.name
    assert len(srcs) == len(pngs) + 1 and sum(s.startswith("data:image/svg+xml;base64,") for s in srcs) == 1
    cells = {c for _, row in page.rows for c in row}
    # the metrics, as in metrics.json
    metrics = json.loads((run / "metrics.json").read_text())
    for k, v in metrics.items():
        shown = f"{v:.6g}" if isinstance(v, float) else str(v)
        assert k in cells and shown in cells, (k, shown)
    assert metrics["steps"] == 8 and "8 steps (lbfgs)" in text
    # every config field, and exactly the ones that differ from TrainConfig() highlighted
    saved = json.loads((run / "config.json").read_text())
    defaults = dataclasses.asdict(TrainConfig())
    config_rows = {row[0]: (cls, row[1]) for cls, row in page.rows if row and row[0].startswith("--")}
    assert set(config_rows) == {"--" + k.replace("_", "-") for k in defaults}
    changed = {k for k in defaults if saved[k] != defaults[k]}
    assert {"samples", "iterations", "hidden", "activation", "penalty", "out", "name"} <= changed
    for k in defaults:
        cls, value = config_rows["--" + k.replace("_", "-")]
        assert (cls == "changed") == (k in changed), k
        assert value == (saved[k] if isinstance(saved[k], str) else json.dumps(saved[k])), k
    assert "d_in" in cells and str(saved["d_in"]) in cells
    # the units: one row per unit, sorted by rho_hat, the killed ones flagged dead
    units = [row for cls, row in page.rows if len(row) == 5 and row[0].isdigit()]
    assert [int(r[0]) for r in units] == list(range(1, 13))
    rhos = [float(r[2]) for r in units]
    assert rhos == sorted(rhos, reverse=True)
    dead_rows = sorted(int(row[1]) for cls, row in page.rows if cls == "dead")
    assert set(DEAD) <= set(dead_rows) and all((r[4] == "dead") == (float(r[3]) == 0) for r in units)
    assert all(float(r[2]) == 0 for r in units if r[4] == "dead")
    assert f"{len(dead_rows)} dead" in text and f"units {', '.join(map(str, dead_rows))}." in text
    # the header line: data, versions
    assert "Data: 400 8x8 natural-image patches" in text and f"torch {torch.__version__}" in text


def test_unit_stats_match_a_naive_computation(run):
    """Batched ρ̂ and firing fraction equal the mean over one dense forward, and the sparse TopK path's."""
    from actsparse.data import load_data
    from actsparse.models import SparseAutoencoder
    from actsparse.train import load_checkpoint

    model, cfg = load_checkpoint(run)
    x = load_data(cfg).x
    rho, firing = unit_stats(model, x, batch_size=37)
    with torch.no_grad():
        code = model.eval()(x).code.double()
    # (not torch.testing.assert_close: its first call imports for a second)
    assert rho.dtype == torch.float64 and torch.allclose(rho, code.mean(0), rtol=1e-12, atol=1e-15)
    assert torch.equal(firing, (code != 0).double().mean(0))
    assert set(DEAD) <= set(torch.nonzero(firing == 0).flatten().tolist())

    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 64, "topk", k=2, decode="sparse")
    xs = torch.randn(300, 16)
    rho_s, firing_s = unit_stats(sae, xs, batch_size=64)
    with torch.no_grad():
        dense = SparseAutoencoder(16, 64, "topk", k=2, decode="dense")
        dense.load_state_dict(sae.state_dict())
        ref = dense.eval()(xs).code.double()
    assert torch.allclose(rho_s, ref.mean(0), rtol=1e-9, atol=1e-12)
    assert torch.equal(firing_s, (ref != 0).double().mean(0)) and 0 < float(firing_s.sum()) <= 2


def test_bad_folders_end_with_one_line(tmp_path, run, capsys):
    cases = {str(tmp_path / "nope"): "is missing: is", str(tmp_path): "an actsparse run folder?"}
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(run / name, broken / name)
    (broken / "metrics.json").write_text("{")
    cases[str(broken)] = "metrics.json is not valid JSON"
    for folder, expected in cases.items():
        assert main(["report", folder]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("actsparse report: error: ") and expected in err, err
    assert main(["report"]) == 2 and "usage: actsparse report RUN" in capsys.readouterr().err


def test_page_renders_in_chromium(run, report, tmp_path, chromium):
    """Every figure decodes in a real browser (the page's load script counts them into the DOM), and a
    screenshot of the page is not blank."""
    base = [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    shot = tmp_path / "page.png"
    # one browser start does both: the DOM after load on stdout, and the screenshot
    res = subprocess.run([*base, "--hide-scrollbars", "--window-size=1200,2000", f"--screenshot={shot}",
                          "--dump-dom", report.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    body = parse(res.stdout).body
    total = len(list(run.glob("*.png"))) + 1
    assert body.get("data-figures-total") == str(total), (body, res.stderr[-2000:])
    assert body.get("data-figures-rendered") == str(total), body
    assert shot.is_file(), res.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1200, 2000)
        rgb = im.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 20)
    assert len(colors) > 100, f"the screenshot looks blank: {len(colors)} colours"
    # not one colour covering nearly everything (an empty white page would)
    assert max(c for c, _ in colors) < 0.9 * 1200 * 2000
