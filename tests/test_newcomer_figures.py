"""The figures and the report, as a newcomer reads them: one ρ̂ (the mean activation over the
training split, in eval mode) in metrics.json, rho_hat.png and report.html; integer unit counts
on the ρ̂ histogram; every logged loss term and the validation loss on loss.png; a representative
sample of inputs on reconstructions.png; no target where the run has no penalty; no L0 for a
sigmoid code. Each claim is checked against a recomputation that does not use actsparse's own."""

from __future__ import annotations

import base64
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from actsparse import plots
from actsparse.cli import main

pytest.importorskip("matplotlib")

TINY_SIGMOID = ["--samples", "400", "--iterations", "6", "--hidden", "12", "--no-progress"]  # patches, sigmoid, KL
TINY_TOPK = ["--data", "synthetic", "--samples", "600", "--activation", "topk", "--k", "3", "--hidden", "24",
             "--decoder", "linear", "--penalty", "none", "--optimizer", "adam", "--epochs", "2", "--no-progress"]
TINY_DIGITS = ["--data", "digits", "--hidden", "16", "--activation", "relu", "--decoder", "linear", "--penalty", "l1",
               "--weight", "1e-3", "--optimizer", "adam", "--epochs", "1", "--no-progress"]


class Page(HTMLParser):
    """The table rows (class, cell texts), the paragraphs' text and the images' sources."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[tuple[str | None, list[str]]] = []
        self.srcs: list[str] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr":
            self.rows.append((a.get("class"), []))
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.srcs.append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1][1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


def _train(out: Path, name: str, flags: list[str]) -> tuple[Path, dict]:
    """Train a run, keeping every figure that write_figures draws (Figure objects, by file name)."""
    figures: dict[str, object] = {}
    real_save = plots._save

    def keep(fig, path):
        figures[Path(path).name] = fig
        fig.canvas.draw()  # ticks and texts as they are saved
        real_save(fig, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "_save", keep)
        assert main(["train", *flags, "--out", str(out), "--name", name]) == 0
    return out / name, figures


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("newcomer")
    return {name: _train(out, name, flags)
            for name, flags in (("sigmoid", TINY_SIGMOID), ("topk", TINY_TOPK), ("digits", TINY_DIGITS))}


def _training_split_by_hand(run: Path, held_out: bool = False) -> torch.Tensor:
    """The rows train() trained on (or, ``held_out``, the validation rows), rebuilt from config.json
    alone: train draws one randperm from a generator seeded with --seed and holds out the first
    round(validation * n)."""
    from actsparse.config import TrainConfig
    from actsparse.data import load_data

    saved = json.loads((run / "config.json").read_text())
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k != "d_in"})
    x = load_data(cfg).x
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(saved["seed"]))
    n_val = int(round(saved["validation"] * x.shape[0]))
    return x[perm[:n_val]] if held_out else x[perm[n_val:]]


def _rho_by_hand(run: Path) -> torch.Tensor:
    from actsparse.train import load_checkpoint

    model, _ = load_checkpoint(run)
    x = _training_split_by_hand(run)
    with torch.no_grad():
        code = model.eval()(x).code  # one forward, no batching
    if not isinstance(code, torch.Tensor):  # the sparse TopK path's SparseCode (hidden 24 = 8·k)
        code = code.to_dense()
    return code.double().mean(0)


@pytest.mark.parametrize("name", ["sigmoid", "topk", "digits"])
def test_one_rho_hat_in_metrics_histogram_and_report(runs, name):
    run, figures = runs[name]
    rho = _rho_by_hand(run)
    mean = float(rho.mean())
    metrics = json.loads((run / "metrics.json").read_text())
    assert math.isclose(metrics["mean_activation"], mean, rel_tol=1e-5), (metrics["mean_activation"], mean)
    # the histogram: its title's mean is metrics.json's (to its 6 digits), its bars count every unit once
    ax = figures["rho_hat.png"].axes[0]
    title = ax.get_title()
    assert f"mean {metrics['mean_activation']:.6g}" in title and "training split" in title, title
    assert sum(p.get_height() for p in ax.patches) == rho.numel()
    # the report: the same number in the metrics table and in the units' summary, nothing else called ρ̂ mean
    from actsparse.report import write_report

    page = parse(write_report(run))
    shown = f"{metrics['mean_activation']:.6g}"
    assert ["mean_activation"] == [r[0] for _, r in page.rows if shown in r]
    text = " ".join(page.text)
    assert re.findall(r"ρ̂ mean (\S+?)[ ,;]", text) == [shown], re.findall(r"ρ̂ mean (\S+)", text)
    assert "recomputes" not in text  # no mismatch flagged: the report's ρ̂ is metrics.json's
    # the per-unit table lists the hand-computed ρ̂_j
    table = {int(r[1]): float(r[2]) for _, r in page.rows if len(r) == 5 and r[0].isdigit()}
    assert len(table) == rho.numel()
    for j, v in table.items():
        assert math.isclose(v, float(rho[j]), rel_tol=1e-4, abs_tol=1e-9), (j, v, float(rho[j]))


def _integers(values) -> bool:
    return all(float(v) == round(float(v)) for v in values)


def test_rho_hat_histogram_has_integer_ticks(runs):
    for name, (_, figures) in runs.items():
        ax = figures["rho_hat.png"].axes[0]
        visible = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
        assert visible and _integers(visible), (name, visible)
        labels = [t.get_text().replace("\u2212", "-") for t in ax.get_yticklabels() if t.get_text()]
        assert labels and all(re.fullmatch(r"-?\d+", s) for s in labels), (name, labels)
    # few units, at most 2 to a bin: where matplotlib alone would tick 0.5, 1.5
    fig = plots.rho_hat_figure(torch.tensor([0.01, 0.011, 0.02, 0.021, 0.03]), 0.01)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert _integers(ax.get_yticks()), list(ax.get_yticks())
    import matplotlib.pyplot as plt

    plt.close(fig)


def _labels(fig) -> list[str]:
    return [line.get_label() for line in fig.axes[0].get_lines()]


def test_loss_plot_has_every_term_and_the_validation_loss(runs):
    run, figures = runs["sigmoid"]
    labels = _labels(figures["loss.png"])
    assert {"total", "reconstruction", "sparsity penalty", "weight decay"} <= set(labels), labels
    assert "reconstruction, validation split (end)" in labels, labels
    # the validation marker is metrics.json's val_reconstruction, at the last logged step
    metrics = json.loads((run / "metrics.json").read_text())
    ax = figures["loss.png"].axes[0]
    line = next(ln for ln in ax.get_lines() if ln.get_label().endswith("validation split (end)"))
    log = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines() if s.strip()]
    assert list(line.get_xdata()) == [log[-1]["step"]] and list(line.get_ydata()) == [metrics["val_reconstruction"]]
    # the validation curve: the log's val_reconstruction, about 20 points, the last one at the last
    # step and equal to a plain forward of the saved model over the held-out rows (rebuilt by hand)
    curve = next(ln for ln in ax.get_lines() if ln.get_label() == "reconstruction, validation split (eval)")
    val_steps = [r["step"] for r in log if "val_reconstruction" in r]
    assert list(curve.get_xdata()) == val_steps and min(len(log), 15) <= len(val_steps) <= 25
    assert val_steps[-1] == log[-1]["step"]
    from actsparse.train import load_checkpoint

    model, _ = load_checkpoint(run)
    saved = json.loads((run / "config.json").read_text())
    all_rows = _training_split_by_hand(run, held_out=True)
    with torch.no_grad():
        x_hat = model.eval()(all_rows).reconstruction.double()
    by_hand = 0.5 * (x_hat - all_rows.double()).square().sum(1).mean()  # half SSE per sample (sigmoid runs)
    assert saved["activation"] == "sigmoid"
    assert math.isclose(float(curve.get_ydata()[-1]), float(by_hand), rel_tol=1e-5)
    # total = reconstruction + penalty + weight decay: the drawn terms add up to the drawn total
    y = {ln.get_label(): ln.get_ydata() for ln in ax.get_lines() if ln.get_label() != curve.get_label()}
    for i in range(len(log)):
        parts = sum(float(y[k][i]) for k in ("reconstruction", "sparsity penalty", "weight decay"))
        assert math.isclose(parts, float(y["total"][i]), rel_tol=1e-5), i
    # a term that is 0 throughout (no penalty) is named, not drawn; no validation given, none drawn
    _, figures = runs["topk"]
    ax = figures["loss.png"].axes[0]
    assert "sparsity penalty" not in _labels(figures["loss.png"]) and "sparsity penalty" in ax.get_title()
    hist = [{"step": s, "loss": 1.0 / s + 0.1, "reconstruction": 1.0 / s, "penalty": 0.05, "weight_decay": 0.05}
            for s in range(1, 6)]
    fig = plots.loss_figure(hist)
    assert "weight decay" in _labels(fig) and not any("validation" in s for s in _labels(fig))
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_reconstructions_are_a_representative_sample_of_digits(runs):
    """20 inputs, at least 8 of the 10 digit classes (the most varied inputs were nearly all 1s and 0s)."""
    sklearn = pytest.importorskip("sklearn.datasets")
    x_ref, labels = sklearn.load_digits(return_X_y=True)
    _, figures = runs["digits"]
    fig = figures["reconstructions.png"]
    grid = [ax for ax in fig.axes if ax.get_images()]  # row-major: input, output, input, output rows of 10
    assert len(grid) == 40 and [grid[r * 10].get_ylabel() for r in range(4)] == ["input", "output"] * 2
    shown = [grid[r * 10 + c].get_images()[0].get_array() for r in (0, 2) for c in range(10)]
    ref = torch.tensor(x_ref / 16.0)
    classes = []
    for im in shown:
        flat = torch.tensor(im.data.reshape(-1), dtype=torch.float64)
        i = int((ref - flat).abs().sum(1).argmin())
        assert torch.allclose(ref[i], flat, atol=1e-6)  # an actual input of the data set
        classes.append(int(labels[i]))
    assert len(set(classes)) >= 8, sorted(classes)
    assert max(classes.count(c) for c in set(classes)) <= 5, sorted(classes)  # no class dominates
    assert "at random" in fig._suptitle.get_text()  # the figure says what it shows
    # the same inputs on every redraw
    idx = plots.reconstruction_sample(ref)
    assert torch.equal(idx, plots.reconstruction_sample(ref)) and len(set(idx.tolist())) == 20


def test_report_shows_no_target_without_a_penalty(runs):
    from actsparse.report import write_report

    run, _ = runs["topk"]
    assert json.loads((run / "config.json").read_text())["penalty"] is None
    page = parse(write_report(run))
    assert not [r for _, r in page.rows if r and r[0] == "target"]
    svg = base64.b64decode(next(s for s in page.srcs if s.startswith("data:image/svg+xml;base64,")).split(",", 1)[1])
    assert b"target" not in svg
    text = " ".join(page.text).split("Configuration")[0]  # the config table lists every field, --target too
    assert "target 0.01" not in text and "target mean activation" not in text and "(target" not in text
    # a penalty without a target (L1): the row stays, greyed as unused, never called the penalty's target
    run, _ = runs["digits"]
    page = parse(write_report(run))
    rows = [(cls, r) for cls, r in page.rows if r and r[0] == "target"]
    assert len(rows) == 1 and rows[0][0] == "unused" and rows[0][1][1].startswith("not used")
    svg = base64.b64decode(next(s for s in page.srcs if s.startswith("data:image/svg+xml;base64,")).split(",", 1)[1])
    assert b"target" not in svg


def test_sigmoid_report_shows_no_l0(runs):
    from actsparse.report import write_report

    run, _ = runs["sigmoid"]
    page = parse(write_report(run))
    keys = [r[0] for _, r in page.rows if len(r) == 3]
    assert "l0" not in keys and "fraction_dead" not in keys and "units > 0.5" in keys
    # its value: the mean number of units above 0.5 per sample, recomputed here by hand
    from actsparse.train import load_checkpoint

    model, _ = load_checkpoint(run)
    with torch.no_grad():
        code = model.eval()(_training_split_by_hand(run)).code.double()
    value = next(float(r[2]) for _, r in page.rows if r and r[0] == "units > 0.5")
    assert math.isclose(value, float((code > 0.5).double().sum(1).mean()), rel_tol=1e-5, abs_tol=1e-9)
    # the target is a target mean activation, dashed in the chart with that name
    svg = base64.b64decode(next(s for s in page.srcs if s.startswith("data:image/svg+xml;base64,")).split(",", 1)[1])
    assert "target mean activation ρ = 0.01".encode() in svg and b"dead" not in svg
