"""One self-contained HTML page per run folder (``actsparse report RUN`` → ``RUN/report.html``).

The page holds the run's config (every field; values that differ from ``TrainConfig()`` are
highlighted), the final metrics (``metrics.json``), every PNG figure of the folder embedded as a
base64 ``data:`` URI, and ρ̂ and the firing fraction of each unit, recomputed from the saved weights
on the run's training split (:func:`actsparse.evaluation.training_split`: the samples that
``metrics.json`` was computed on, so its ``mean_activation`` is the mean of these ρ̂_j), sorted,
with dead units flagged. Nothing outside the file is referenced: the CSS
is inline, the figures are ``data:`` URIs, and a Content-Security-Policy forbids any fetch. A tiny
inline script records, on load, how many images decoded (``<body data-figures-rendered>`` and
``data-figures-total``), so a headless browser's dumped DOM proves the figures render.

No printing here: the CLI prints where the page went. No matplotlib either: the per-unit chart is
an SVG written by hand.
"""

from __future__ import annotations

import base64
import html
import json
import math
import struct
import time
from pathlib import Path

import torch
from torch import Tensor

from .evaluation import penalty_target, training_split
from .evaluation import unit_statistics as unit_stats  # ρ̂ and firing per unit, from evaluate's pass

__all__ = ["write_report", "unit_stats", "REPORT_NAME"]

#: File name of the page inside the run folder.
REPORT_NAME = "report.html"

#: For a sigmoid code, a unit counts as on where its activation exceeds this (pre-activation > 0):
#: a sigmoid is never exactly 0, so the firing fraction (≠ 0) and L0 would count every unit.
SIGMOID_ON = 0.5

#: Captions of the figures that :func:`actsparse.plots.write_figures` writes.
CAPTIONS = {
    "loss.png": "Training loss per logged step (log scale), each term on that step's batch: total = reconstruction "
                "+ sparsity penalty + weight decay (+ AuxK, drawn as the rest); a term that is 0 throughout is "
                "named, not drawn. The red curve is the reconstruction loss on the held-out validation split (eval "
                "mode, no penalty), about 20 points a run; the markers at the last step are metrics.json's "
                "reconstruction on the training split and val_reconstruction.",
    "filters.png": "Learned features: each encoder row as an image tile, each tile scaled to its own max |w| "
                   "(grey = 0), so the contrast of two tiles cannot be compared.",
    "reconstructions.png": "Inputs and the model's reconstructions of them, on one grey scale: the data ordered by "
                           "input variance and cut into 20 equal strata, one input drawn at random (seed 0) from "
                           "each, lowest variance first; a representative sample, not a chosen one.",
    "control.png": "The sparsity statistic held to its target (--target-*), measured on each logged step's batch "
                   "in training mode (top), and the penalty's coefficient the controller adapted for it (bottom, log "
                   "scale). With --per-unit: the mean over units and the geometric mean of the coefficients.",
    "rho_hat.png": "Histogram of ρ̂_j, the mean activation of each unit over the training split in eval mode (their "
                   "mean is metrics.json's mean_activation).",
}

#: What each key of ``metrics.json`` is.
METRIC_NOTES = {
    "reconstruction": "reconstruction loss",
    "penalty": "sparsity penalty (weighted)",
    "fvu": "fraction of variance unexplained, Σ‖x − x̂‖² / Σ‖x − x̄‖²",
    "l0": "mean number of non-zero units per sample",
    "mean_activation": "ρ̂, mean activation over units and the training split's samples (eval mode)",
    "fraction_dead": "fraction of units that never fired",
    "target": "target ρ of the penalty",
    "seconds": "training time (s)",
    "total_seconds": "data + training + files (s)",
    "threads": "CPU threads of torch",
    "steps": "optimiser steps",
    "rollbacks": "rollbacks after a NaN/Inf",
    "processes": "training processes",
    "val_reconstruction": "validation reconstruction loss (no penalty)",
    "val_fvu": "validation FVU",
    "mmcs": "mean max cosine similarity to the true features",
    "mcc": "MCC: mean |cos| of a one-to-one matching of atoms to true features",
    "f1": "F1 of feature detection (each latent vs its closest true feature, held-out samples)",
    "precision": "precision of feature detection",
    "recall": "recall of feature detection",
    "variance_explained": "variance explained on held-out ground-truth samples",
    "heldout_l0": "L0 on held-out ground-truth samples",
    "true_l0": "L0 of the true codes",
    "dead_latents": "latents that never fired on the held-out samples",
    "dense_latents": "latents firing on over 10% of the held-out samples",
    "coefficient": "the penalty's coefficient at the end, adapted by --target-* (geometric mean per unit)",
    "data": "data source",
}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _close(a: float, b: float) -> bool:
    """Equal up to the float32 rounding of a pass on another device."""
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12)


def _num(v: object) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return str(v) if isinstance(v, int) else f"{v:.6g}"


def _config_value(v: object) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    return None


def _ticks(hi: float, n: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``hi``."""
    raw = hi / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(math.ceil(hi / step - 1e-9)) + 1)]


def _units_svg(rho: Tensor, firing: Tensor, order: Tensor, target: tuple[float, str] | None,
               on_label: str = "firing fraction", mark_dead: bool = True) -> str:
    """Bars of ρ̂_j sorted (left axis), the firing fraction in the same order (right axis, 0–1),
    the target dashed on the axis it belongs to (a target mean activation on the left, a target
    firing frequency on the right), dead units as red marks under the axis."""
    w, h, right, top, bottom = 900, 330, 64, 36, 46
    r, f = rho[order].tolist(), firing[order].tolist()
    n = len(r)
    mean_target = target[0] if target is not None and target[1] == "mean activation" else None
    freq_target = target[0] if target is not None and target[1] != "mean activation" else None
    ticks = _ticks(max(max(r), mean_target or 0.0, 1e-12) * 1.05)
    ymax = ticks[-1]
    labels = [f"{t:.4g}" for t in ticks]
    # the tick labels (≈ 7 px a character at 12 px) and a gap, then the rotated axis title
    left = int(34 + 7.2 * max(map(len, labels)))
    pw, ph = w - left - right, h - top - bottom

    def y(v: float, top_v: float = ymax) -> float:
        return top + ph * (1 - min(max(v / top_v, 0.0), 1.0))

    bw = pw / n
    bars = "".join(f"M{left + i * bw:.2f} {top + ph}V{y(v):.2f}h{bw * 0.85 if n < 200 else bw:.2f}V{top + ph}z"
                   for i, v in enumerate(r) if v > 0)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="#fff"/>']
    for t, label in zip(ticks, labels):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(t):.2f}" y2="{y(t):.2f}" stroke="#e3e3e3"/>'
                   f'<text x="{left - 6}" y="{y(t) + 4:.2f}" text-anchor="end">{label}</text>')
    for t in (0.0, 0.5, 1.0):
        out.append(f'<text x="{left + pw + 6}" y="{y(t, 1.0) + 4:.2f}" fill="#d2691e">{t:g}</text>')
    out.append(f'<path d="{bars}" fill="#3b75af"/>')
    for value, scale in ((mean_target, ymax), (freq_target, 1.0)):
        if value is not None:
            out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(value, scale):.2f}" y2="{y(value, scale):.2f}" '
                       'stroke="#c0392b" stroke-width="1.5" stroke-dasharray="6 4"/>')
    pts = " ".join(f"{left + (i + 0.5) * bw:.2f},{y(v, 1.0):.2f}" for i, v in enumerate(f))
    out.append(f'<polyline points="{pts}" fill="none" stroke="#d2691e" stroke-width="1.5"/>')
    dead = "".join(f"M{left + i * bw:.2f} {top + ph + 3}h{max(bw, 1.0):.2f}v6h-{max(bw, 1.0):.2f}z"
                   for i, v in enumerate(f) if v == 0) if mark_dead else ""
    if dead:
        out.append(f'<path d="{dead}" fill="#c0392b"/>')
    out.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#333"/>'
               f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="#333"/>')
    out.append(f'<text x="{left + pw / 2}" y="{h - 12}" text-anchor="middle">{n} units, sorted by ρ̂ '
               '(largest first)</text>'
               f'<text transform="translate(16 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
               'mean activation ρ̂_j</text>'
               f'<text transform="translate({w - 14} {top + ph / 2}) rotate(90)" text-anchor="middle" '
               f'fill="#d2691e">{html.escape(on_label)}</text>')
    legend = [("#3b75af", "ρ̂_j"), ("#d2691e", on_label)]
    if mean_target is not None:
        legend.append(("#c0392b", f"target mean activation ρ = {mean_target:g}"))
    if freq_target is not None:
        legend.append(("#c0392b", f"target firing frequency ρ = {freq_target:g} (right axis)"))
    if dead:
        legend.append(("#c0392b", "dead (never fired)"))
    x0 = left
    for color, label in legend:
        out.append(f'<rect x="{x0}" y="12" width="14" height="10" fill="{color}"/>'
                   f'<text x="{x0 + 19}" y="21">{html.escape(label)}</text>')
        x0 += 30 + 7.2 * len(label)
    out.append("</svg>")
    return "".join(out)


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _figure(uri: str, caption: str, alt: str, size: tuple[int, int] | None) -> str:
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    return (f'<figure><img src="{uri}" alt="{_e(alt)}"{dims}><figcaption>{_e(caption)}</figcaption>'
            "</figure>")


CSS = """
body{font:15px/1.45 "DejaVu Sans",Helvetica,Arial,sans-serif;color:#222;margin:0;background:#f6f7f9}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:26px;margin:0 0 6px}
h2{font-size:19px;margin:30px 0 10px;border-bottom:2px solid #e6e8eb;padding-bottom:4px}
.meta{color:#555;margin:0 0 4px}.note{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13.5px;margin:6px 0}
th,td{padding:4px 10px;border-bottom:1px solid #eceef1;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}.n{text-align:right;font-variant-numeric:tabular-nums}
td.s{max-width:420px}
code{font-family:"DejaVu Sans Mono",Menlo,monospace;font-size:12.5px}
tr.changed td{background:#fff4c2}tr.changed td.v{font-weight:700}
tr.dead td{background:#fde2df;color:#8e1b10}.badge{font-size:11.5px;font-weight:700;text-transform:uppercase}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:18px}
figure{margin:0;border:1px solid #e6e8eb;border-radius:6px;padding:10px;background:#fff}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figure.wide{grid-column:1/-1}figure.tall{grid-row:span 2;align-self:start}
tr.unused td{color:#999}figcaption{font-size:13px;color:#555;margin-top:6px}
details summary{cursor:pointer;color:#2b5d8f;margin:6px 0}
img.broken{outline:3px solid #c0392b}
"""

SCRIPT = """window.addEventListener("load",function(){var im=document.images,ok=0;
for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0){ok++}else{im[i].classList.add("broken")}}
document.body.dataset.figuresRendered=String(ok);document.body.dataset.figuresTotal=String(im.length);});"""

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _table(head: list[str], rows: list[str], numeric: tuple[int, ...] = ()) -> str:
    cells = "".join(f'<th class="n">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>" for i, h in enumerate(head))
    return f"<table><thead><tr>{cells}</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"


def _steps_from_log(run_dir: Path) -> int | None:
    from .run_files import read_log  # the one reader of metrics.jsonl (it skips a line a kill cut short)

    records = read_log(run_dir / "metrics.jsonl")
    try:
        return int(records[-1]["step"]) if records else None
    except (ValueError, KeyError, TypeError):
        return None


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` (see the module docstring) and return its path.

    Raises the errors of :func:`actsparse.train.load_checkpoint` (``FileNotFoundError`` for a folder
    that is not a run, ``ValueError`` for damaged files) and of :func:`actsparse.data.load_data`
    (the run's data must still be there), and ``ValueError`` for a ``metrics.json`` that is not JSON."""
    from . import __version__
    from .config import TrainConfig
    from .data import load_data
    from .train import load_checkpoint

    run_dir = Path(run_dir)
    model, cfg = load_checkpoint(run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    metrics_path = run_dir / "metrics.json"
    metrics: dict = {}
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{metrics_path} is not valid JSON: {err}") from err
        if not isinstance(metrics, dict):
            raise ValueError(f"{metrics_path} must hold a JSON object, got {type(metrics).__name__}")
    data = load_data(cfg)
    # one ρ̂ for the whole page: over the training split in eval mode, as metrics.json's mean_activation
    x = training_split(data, cfg)
    sigmoid = cfg.activation == "sigmoid"  # never exactly 0: "≠ 0" counts every unit on every sample
    rho, firing = unit_stats(model, x, threshold=SIGMOID_ON if sigmoid else None)
    order = torch.argsort(rho, descending=True, stable=True)
    dead = 0 if sigmoid else int((firing == 0).sum())
    target = penalty_target(model)  # (ρ, "mean activation" | "firing frequency") or None
    on_label = f"share of samples > {SIGMOID_ON:g}" if sigmoid else "firing fraction"
    if data.stream is not None:
        where = f"the sample of the streamed store that the metrics use ({x.shape[0]} rows)"
    else:
        n_val = data.x.shape[0] - x.shape[0]
        where = (f"the training split ({x.shape[0]} of the {data.x.shape[0]} samples; {n_val} held out for "
                 f"validation with seed {cfg.seed}, as train does)" if n_val else f"all {x.shape[0]} samples")
    rho_mean = float(rho.mean())

    title = f"actsparse run {run_dir.resolve().name}"
    steps = metrics.get("steps", _steps_from_log(run_dir))
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime((run_dir / "model.safetensors").stat().st_mtime))
    timing = []
    if isinstance(metrics.get("seconds"), (int, float)):
        timing.append(f"trained in {metrics['seconds']:.1f} s")
    if isinstance(metrics.get("total_seconds"), (int, float)):
        timing.append(f"{metrics['total_seconds']:.1f} s in all")
    meta = [f"Data: {data.description}",
            f"{steps if steps is not None else '?'} steps ({cfg.optimizer})" + (", " + ", ".join(timing)
                                                                              if timing else ""),
            f"weights written {when}",
            f"report by actsparse {__version__}, torch {torch.__version__}"]

    parts = [f"<h1>{_e(title)}</h1>", f'<p class="meta">{_e(" · ".join(meta[:2]))}</p>',
             f'<p class="meta">{_e(" · ".join(meta[2:]))} · folder <code>{_e(run_dir)}</code></p>']

    # metrics
    parts.append("<h2>Final metrics</h2>")
    if metrics:
        rows, notes, hidden = [], [], []
        for k, v in metrics.items():
            note, cls = METRIC_NOTES.get(k, ""), ""
            control = cfg.control() if k == "target" and hasattr(cfg, "control") else None
            if control is not None:  # --target-*: the statistic held during training, and its target
                v = control[1]
                note = {"l0": "target L0 (active units per sample) of --target-l0, held by adapting the coefficient",
                        "rate": "target firing rate of --target-rate, held by adapting the coefficient",
                        "mean": "target mean activation of --target-mean, held by adapting the coefficient",
                        }[control[0]]
            elif k == "target":
                if cfg.penalty is None:  # no penalty, no target: train records --target's default all the same
                    notes.append("metrics.json's target (the default of --target) is not shown: this run has "
                                 "no penalty, so no target.")
                    continue
                if target is None:
                    note, cls = f"not used: --penalty {cfg.penalty} has no target (the default of --target)", "unused"
                elif target[1] == "firing frequency":
                    note = ("target firing frequency ρ of --penalty frequency_kl: the share of samples where a "
                            "unit's activation exceeds its threshold (not a mean activation)")
                else:
                    note = f"target mean activation ρ of --penalty {cfg.penalty}"
            elif sigmoid and k in ("l0", "fraction_dead"):
                hidden.append(f"{k} ({_num(v)})")
                if k == "l0":
                    rows.append(f'<tr><td>units &gt; {SIGMOID_ON:g}</td><td>mean number of units above {SIGMOID_ON:g} '
                                f"per sample (pre-activation &gt; 0; recomputed on the same samples)</td>"
                                f'<td class="n">{_e(_num(float(firing.sum())))}</td></tr>')
                continue
            elif k == "mean_activation" and isinstance(v, (int, float)) and not _close(v, rho_mean):
                note += f" (the report recomputes {_num(rho_mean)}: the weights or the data changed since)"
            rows.append(f'<tr{f" class={cls}" if cls else ""}><td><code>{_e(k)}</code></td><td>{_e(note)}</td>'
                        f'<td class="{"n" if isinstance(v, (int, float)) else "s"}" title="{_e(v)}">{_e(_num(v))}'
                        "</td></tr>")
        parts.append(_table(["metric", "meaning", "value"], rows, numeric=(2,)))
        if hidden:
            notes.append(f"metrics.json's {' and '.join(hidden)} not shown: sigmoid units are never exactly 0, so "
                         "every unit counts as non-zero on every sample.")
        parts.extend(f'<p class="note">{_e(n)}</p>' for n in notes)
    else:
        parts.append(f'<p class="note">No <code>metrics.json</code> in {_e(run_dir)}: the run did not finish.</p>')

    # figures: the per-unit chart first, then every PNG of the folder
    unit_cap = (f"ρ̂_j (mean activation, eval mode) and {on_label} of each of the {rho.numel()} units, recomputed by "
                f"the report from the saved weights on {where}, sorted by ρ̂"
                + ("." if sigmoid else f"; {dead} dead."))
    svg = _units_svg(rho, firing, order, target, on_label, mark_dead=not sigmoid).encode()
    figs = [_figure(_data_uri("image/svg+xml", svg), unit_cap, "rho_hat per unit, sorted", (900, 330))
            .replace("<figure>", '<figure class="wide">', 1)]
    # then any other PNG by name
    known = ["loss.png", "filters.png", "rho_hat.png", "reconstructions.png", "control.png"]
    pngs = sorted((p for p in run_dir.glob("*.png") if p.is_file()),
                  key=lambda p: (known.index(p.name) if p.name in known else len(known), p.name))
    names = {p.name for p in pngs}
    for p in pngs:
        raw = p.read_bytes()
        size = _png_size(raw)
        caption = CAPTIONS.get(p.name, p.stem.replace("_", " "))
        if p.name == "rho_hat.png" and target is not None:
            caption += (f" The target mean activation ρ = {target[0]:g} dashed." if target[1] == "mean activation" else
                        f" The penalty's target {target[0]:g} is a {target[1]}, not a ρ̂: not drawn here.")
        fig = _figure(_data_uri("image/png", raw), f"{caption} ({p.name})", p.name, size)
        if p.name == "reconstructions.png" or (size and size[0] > 2.2 * size[1]):  # a strip: the page's width
            fig = fig.replace("<figure>", '<figure class="wide">', 1)
        elif p.name == "filters.png" and {"loss.png", "rho_hat.png"} <= names:  # beside the two, one above the other
            fig = fig.replace("<figure>", '<figure class="tall">', 1)
        figs.append(fig)
    parts.append("<h2>Figures</h2>")
    if not pngs:
        parts.append(f'<p class="note">No PNG figures in {_e(run_dir)} (trained with --no-plots?): '
                     "<code>actsparse plot RUN</code> draws them.</p>")
    parts.append('<div class="figs">' + "".join(figs) + "</div>")

    # units
    parts.append("<h2>Units</h2>")
    summary = (f"{rho.numel()} units, measured on {where} in eval mode; ρ̂ mean {_num(rho_mean)} (metrics.json's "
               f"mean_activation), min {_num(float(rho.min()))}, max {_num(float(rho.max()))}")
    if target is not None:
        summary += f"; target {target[1]} {target[0]:g}"
    if sigmoid:
        summary += (f". Sigmoid units are never exactly 0, so each is non-zero on every sample (L0 would count every "
                    f"unit): the {on_label} (pre-activation positive) stands in for the firing fraction, and no unit "
                    "is called dead.")
    else:
        summary += f"; {dead} dead (never non-zero on these samples)"
        dead_ids = sorted(torch.nonzero(firing == 0).flatten().tolist())
        if dead_ids:
            summary += ": unit" + ("s " if dead > 1 else " ") + ", ".join(map(str, dead_ids[:50])) \
                + (f" and {dead - 50} more" if dead > 50 else "")
        summary += "."
    parts.append(f"<p>{_e(summary)}</p>")
    rows = []
    for rank, j in enumerate(order.tolist(), 1):
        is_dead = not sigmoid and float(firing[j]) == 0
        rows.append(f'<tr{" class=dead" if is_dead else ""}><td class="n">{rank}</td><td class="n">{j}</td>'
                    f'<td class="n">{float(rho[j]):.5g}</td><td class="n">{float(firing[j]):.4f}</td>'
                    f'<td>{"<span class=badge>dead</span>" if is_dead else ""}</td></tr>')
    table = _table(["rank", "unit", "ρ̂_j", on_label, ""], rows, numeric=(0, 1, 2, 3))
    opened = " open" if rho.numel() <= 64 else ""
    parts.append(f"<details{opened}><summary>Per-unit table, sorted by ρ̂ ({rho.numel()} rows)</summary>"
                 f"{table}</details>")

    # config
    defaults = TrainConfig().to_dict()
    values = cfg.to_dict()
    rows = []
    if "d_in" in saved:
        rows.append(f'<tr><td><code>d_in</code></td><td class="v">{_e(saved["d_in"])}</td>'
                    "<td>(from the data)</td></tr>")
    for k, v in values.items():
        changed = v != defaults.get(k)
        rows.append(f'<tr{" class=changed" if changed else ""}><td><code>--{_e(k.replace("_", "-"))}</code></td>'
                    f'<td class="v">{_e(_config_value(v))}</td><td>{_e(_config_value(defaults.get(k)))}</td></tr>')
    n_changed = sum(values[k] != defaults.get(k) for k in values)
    parts.append("<h2>Configuration</h2>")
    parts.append(f'<p class="note">Every field of <code>config.json</code>; the {n_changed} highlighted differ from '
                 "the defaults of <code>TrainConfig()</code> (the classic CS294A exercise).</p>")
    parts.append(_table(["field", "value", "default"], rows))

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style><script>{SCRIPT}</script></head>\n"
            f"<body><main>\n{chr(10).join(parts)}\n</main></body></html>\n")
    from .checkpoint import atomic_write

    out = run_dir / REPORT_NAME
    atomic_write(out, lambda p: p.write_text(page, encoding="utf-8"))
    return out
