"""PNG figures of a run (matplotlib, imported lazily, Agg backend): loss curves, the learned
features as a filter grid, reconstructions next to inputs, and the histogram of ρ̂ per unit.

Each ``*_figure`` function returns the matplotlib Figure (to inspect or save elsewhere; close it
with ``matplotlib.pyplot.close``); each ``plot_*`` function draws the same figure into a PNG.

ρ̂_j is the mean activation of unit j over the run's training split in eval mode, the numbers
whose mean is ``metrics.json``'s ``mean_activation`` (:mod:`actsparse.evaluation`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

__all__ = ["write_figures", "plot_loss", "plot_filters", "plot_reconstructions", "plot_rho_hat", "loss_figure",
           "filters_figure", "reconstructions_figure", "rho_hat_figure", "reconstruction_sample", "FIGURES",
           "RECON_SAMPLES", "RECON_SEED"]

#: Every figure :func:`write_figures` may write into a run folder (a run replaced with
#: ``--overwrite`` loses all of them, so no figure of the old run survives beside the new one).
FIGURES = ("loss.png", "filters.png", "reconstructions.png", "rho_hat.png")

#: How many inputs reconstructions.png shows, and the seed of their random draw.
RECON_SAMPLES, RECON_SEED = 20, 0

#: The terms of the logged loss (``metrics.jsonl``): total = reconstruction + penalty + weight decay
#: (+ AuxK, which is not logged apart: it shows as the rest).
_TERMS = (("loss", "total", "tab:blue"), ("reconstruction", "reconstruction", "tab:orange"),
          ("penalty", "sparsity penalty", "tab:green"), ("weight_decay", "weight decay", "tab:purple"))


def _plt():
    try:
        import matplotlib
    except ModuleNotFoundError as err:
        from .config import install_hint

        raise ModuleNotFoundError(f"figures need matplotlib: {install_hint('cli')}") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _plt()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def loss_figure(history: list[dict], final: dict | None = None):
    """Total loss and each of its logged terms per logged step (log scale): the reconstruction,
    the sparsity penalty and the weight decay of the minibatch (or full batch) of that step; a
    term that is 0 at every step is named in the title instead of drawn. The validation curve is
    the log's ``val_reconstruction`` (eval mode, no penalty, about 20 points a run); where
    ``final`` (``metrics.json``) has ``reconstruction`` and ``val_reconstruction`` they are markers
    at the last step (the whole training split and the validation split, eval mode)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    steps = [h["step"] for h in history]
    absent = []
    for key, label, color in _TERMS:
        vals = [h.get(key) for h in history]
        if not any(_finite(v) and v > 0 for v in vals):
            absent.append(label)
            continue
        ax.plot(steps, [v if _finite(v) and v > 0 else float("nan") for v in vals], label=label, color=color,
                lw=1.4)
    # total − the logged terms: AuxK where used (not logged apart), else rounding
    rest = [h["loss"] - sum(h[k] for k in ("reconstruction", "penalty", "weight_decay") if _finite(h.get(k)))
            if _finite(h.get("loss")) else float("nan") for h in history]
    scale = max((abs(h["loss"]) for h in history if _finite(h.get("loss"))), default=0.0)
    if any(r > 1e-6 * scale for r in rest if math.isfinite(r)):
        ax.plot(steps, [r if r > 0 else float("nan") for r in rest], label="rest (AuxK)", color="tab:gray", lw=1.0)
    val = [(h["step"], h["val_reconstruction"]) for h in history
           if _finite(h.get("val_reconstruction")) and h["val_reconstruction"] > 0]
    if val:
        ax.plot(*zip(*val), ".-", color="tab:red", lw=1.2, ms=4, label="reconstruction, validation split (eval)")
    final = final or {}
    if steps and _finite(final.get("reconstruction")) and final["reconstruction"] > 0:
        ax.plot([steps[-1]], [final["reconstruction"]], "o", color="tab:orange", mec="black", ms=7,
                label="reconstruction, training split (end)")
    if steps and _finite(final.get("val_reconstruction")) and final["val_reconstruction"] > 0:
        ax.plot([steps[-1]], [final["val_reconstruction"]], "D", color="tab:red", mec="black", ms=7,
                label="reconstruction, validation split (end)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    title = "Training loss per logged step"
    if absent:
        title += f"\n({', '.join(absent)}: 0 at every step, not drawn)"
    ax.set_title(title, fontsize=11)
    if ax.get_legend_handles_labels()[0]:  # under the axes: it hides no curve
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_loss(history: list[dict], path: Path, final: dict | None = None) -> None:
    """:func:`loss_figure` into ``path``."""
    _save(loss_figure(history, final), path)


def filters_figure(weights: torch.Tensor, image_shape: tuple[int, int], title: str):
    """Each row of ``weights`` ``(units, h*w)`` as an h×w tile, scaled to its own max |w| (grey = 0):
    the tiles' contrasts cannot be compared."""
    plt = _plt()
    w = weights.detach().double().cpu()
    n = w.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.1 * rows + 0.7), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            tile = w[i].reshape(image_shape)
            m = float(tile.abs().max()) or 1.0
            ax.imshow(tile.numpy(), cmap="gray", vmin=-m, vmax=m, interpolation="nearest")
    fig.suptitle(f"{title}\neach tile scaled to its own max |w| (grey = 0)", fontsize=10 + max(0, cols - 5) * 0.8)
    fig.tight_layout()
    return fig


def plot_filters(weights: torch.Tensor, image_shape: tuple[int, int], path: Path, title: str) -> None:
    """:func:`filters_figure` into ``path``."""
    _save(filters_figure(weights, image_shape, title), path)


def reconstruction_sample(x: torch.Tensor, n: int = RECON_SAMPLES, seed: int = RECON_SEED) -> torch.Tensor:
    """The indices of the inputs reconstructions.png shows, a sample stratified by contrast: the rows
    of ``x`` ordered by their variance (over features) and cut into ``n`` equal strata, one row
    drawn at random (``seed``) from each, lowest variance first. Every twentieth of the data (for
    ``n`` = 20) is represented once, so the figure shows the flat inputs and the busy ones in
    their proportions, and the same inputs on every redraw."""
    n = min(n, x.shape[0])
    var = torch.cat([b.double().var(dim=1, unbiased=False) for b in x.split(65536)])
    strata = var.argsort(stable=True).tensor_split(n)
    g = torch.Generator().manual_seed(seed)
    return torch.stack([s[torch.randint(len(s), (1,), generator=g)] for s in strata]).flatten()


def reconstructions_figure(x: torch.Tensor, x_hat: torch.Tensor, image_shape: tuple[int, int], per_row: int = 10,
                           caption: str = ""):
    """Inputs above their reconstructions, ``per_row`` to a band (input row, then output row), all
    on the inputs' grey scale (min to max of the shown inputs)."""
    plt = _plt()
    n = x.shape[0]
    cols = min(per_row, n)
    bands = math.ceil(n / cols)
    fig, axes = plt.subplots(2 * bands, cols, figsize=(1.1 * cols + 0.4, 1.15 * 2 * bands + 0.6), squeeze=False)
    lo, hi = float(x.min()), float(x.max())
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    for i in range(n):
        b, c = divmod(i, cols)
        for r, data in enumerate((x, x_hat)):
            ax = axes[2 * b + r, c]
            ax.imshow(data[i].detach().double().cpu().reshape(image_shape).numpy(), cmap="gray", vmin=lo, vmax=hi,
                      interpolation="nearest")
            for s in ax.spines.values():
                s.set_visible(True)
    for b in range(bands):
        axes[2 * b, 0].set_ylabel("input")
        axes[2 * b + 1, 0].set_ylabel("output")
    fig.suptitle("Inputs and their reconstructions" + (f"\n{caption}" if caption else ""), fontsize=10)
    fig.tight_layout()
    return fig


def plot_reconstructions(x: torch.Tensor, x_hat: torch.Tensor, image_shape: tuple[int, int], path: Path,
                         per_row: int = 10, caption: str = "") -> None:
    """:func:`reconstructions_figure` into ``path``: every row of ``x`` and ``x_hat`` is shown (pick
    them with :func:`reconstruction_sample`)."""
    _save(reconstructions_figure(x, x_hat, image_shape, per_row, caption), path)


def rho_hat_figure(rho_hat: torch.Tensor, target: float | None = None, *, target_kind: str = "mean activation",
                   samples: str = ""):
    """Histogram of ρ̂_j, the mean activation of each unit (y: how many units, integer ticks), its
    mean in the title; ``target``, a target mean activation, dashed. A target of another kind
    (``target_kind="firing frequency"``, ``--penalty frequency_kl``) is not on this axis: it is
    named in the title instead. ``samples`` says what ρ̂ was measured on."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    r = rho_hat.detach().double().cpu()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.hist(r.numpy(), bins=min(30, max(5, r.numel() // 2)), color="tab:blue", alpha=0.8)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    title = f"Mean activation ρ̂_j of the {r.numel()} units: mean {float(r.mean()):.6g}"
    if samples:
        title += f"\n{samples}"
    if target is not None and target_kind == "mean activation":
        ax.axvline(target, color="tab:red", linestyle="--", label=f"target ρ = {target:g}")
        ax.legend()
    elif target is not None:
        title += f"\n(the penalty's target {target:g} is a {target_kind}, not a ρ̂: not drawn)"
    ax.set_xlabel("mean activation ρ̂_j")
    ax.set_ylabel("units")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_rho_hat(rho_hat: torch.Tensor, target: float | None, path: Path, *, target_kind: str = "mean activation",
                 samples: str = "") -> None:
    """:func:`rho_hat_figure` into ``path``."""
    _save(rho_hat_figure(rho_hat, target, target_kind=target_kind, samples=samples), path)


def _run_config(run_dir: Path):
    from .run_files import read_run_config

    try:
        return read_run_config(run_dir)[0]
    except (FileNotFoundError, ValueError):
        return None


def _final_metrics(run_dir: Path, result) -> dict:
    if getattr(result, "metrics", None):
        return dict(result.metrics)
    try:  # actsparse plot: the metrics of the folder
        m = json.loads((run_dir / "metrics.json").read_text())
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def control_figure(history: list[dict], target: float, statistic: str):
    """A controlled run (``--target-*``): the statistic the controller holds, per logged step, with
    its target (top), and the coefficient it adapted (bottom, log scale), on one step axis. The
    statistic is the one the controller measured on each step's batch in training mode (for
    ``--per-unit``: the mean over units, and the geometric mean of the coefficients)."""
    plt = _plt()
    rows = [h for h in history if _finite(h.get("statistic")) and _finite(h.get("coefficient"))]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.2), sharex=True)
    steps = [h["step"] for h in rows]
    name = {"l0": "L0 (active units per sample)", "rate": "firing rate", "mean": "mean activation ρ̂"}[statistic]
    values = [h["statistic"] for h in rows]
    top.plot(steps, values, color="tab:blue", lw=1.2, label=f"{name}, step's batch")
    top.axhline(target, color="tab:red", ls="--", lw=1.2, label=f"target {target:g}")
    top.set_ylabel(name)
    # the scale of where the run settles (the last 90 % of the logged steps), so that a few percent
    # off the target can be seen; a start far from it is clipped, and the title says so
    late = values[len(values) // 10:] + [target]
    lo, hi = min(late), max(late)
    pad = 0.25 * max(hi - lo, 0.02 * abs(target))
    if values and (min(values) < lo - pad or max(values) > hi + pad):
        top.set_ylim(lo - pad, hi + pad)
        top.set_title("y axis: the last 90 % of the steps (the first steps are off the scale)", fontsize=8)
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(steps, [h["coefficient"] for h in rows], color="tab:green", lw=1.2)
    bottom.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    def minor(v: float, _pos) -> str:  # 2, 3 and 5 of each decade: readable, never crowded
        return f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 3, 5) else ""

    bottom.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    bottom.yaxis.set_minor_formatter(FuncFormatter(minor))
    bottom.tick_params(axis="y", which="minor", labelsize=7)
    bottom.set_ylabel("coefficient (log scale)")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3, which="both")
    end = f"ends at {rows[-1]['coefficient']:.4g}" if rows else "no logged step"
    fig.suptitle(f"The statistic held to its target, and the coefficient adapted for it ({end})", fontsize=10)
    fig.tight_layout()
    return fig


def write_figures(run_dir: Path, result, data, cfg=None) -> list[str]:
    """All figures of a finished run; returns the file names written.

    ``cfg``: the run's :class:`~actsparse.config.TrainConfig` (read from ``run_dir/config.json``
    when not given), for the training split on which ρ̂ is measured, as for ``metrics.json``."""
    from .evaluation import penalty_target, training_split, unit_statistics

    run_dir = Path(run_dir)
    model = result.model
    written = []
    if result.history:
        plot_loss(result.history, run_dir / "loss.png", _final_metrics(run_dir, result))
        written.append("loss.png")
    if data.image_shape is not None:
        w = model.W_enc if hasattr(model, "W_enc") else model.encoder[0].weight  # stacked: first layer
        plot_filters(w, data.image_shape, run_dir / "filters.png", f"Learned features ({w.shape[0]} encoder rows)")
        idx = reconstruction_sample(data.x)
        xs = data.x[idx]
        device = next(model.parameters()).device
        with torch.no_grad():
            was = model.training
            model.eval()
            try:
                x_hat = model(xs.to(device)).reconstruction.cpu()
            finally:
                model.train(was)
        where = "the streamed store's sample" if data.stream is not None else "the data set"
        plot_reconstructions(xs, x_hat, data.image_shape, run_dir / "reconstructions.png",
                             caption=f"one input drawn at random (seed {RECON_SEED}) from each of {len(idx)} equal "
                                     f"strata of {where} ({data.x.shape[0]:,}) by input variance, lowest first")
        written += ["filters.png", "reconstructions.png"]
    cfg = cfg if cfg is not None else _run_config(run_dir)
    control = cfg.control() if cfg is not None else None
    if control is not None and result.history:
        _save(control_figure(result.history, control[1], control[0]), run_dir / "control.png")
        written.append("control.png")
    if cfg is not None:
        x = training_split(data, cfg)
        samples = f"on the training split ({x.shape[0]:,} samples, eval mode), as in metrics.json"
    else:  # no config to recompute the split from: say what was used
        x = data.x
        samples = f"on all {x.shape[0]:,} samples (eval mode)"
    rho, _ = unit_statistics(model, x)
    found = penalty_target(model)
    plot_rho_hat(rho, found[0] if found else None, run_dir / "rho_hat.png",
                 target_kind=found[1] if found else "mean activation", samples=samples)
    written.append("rho_hat.png")
    return written
