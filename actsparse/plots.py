"""PNG figures of a run (matplotlib, imported lazily, Agg backend): loss curves, the learned
features as a filter grid, reconstructions next to inputs, and the histogram of ρ̂ per unit."""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["write_figures", "plot_loss", "plot_filters", "plot_reconstructions", "plot_rho_hat", "FIGURES"]

#: Every figure :func:`write_figures` may write into a run folder (a run replaced with
#: ``--overwrite`` loses all of them, so no figure of the old run survives beside the new one).
FIGURES = ("loss.png", "filters.png", "reconstructions.png", "rho_hat.png")


def _plt():
    try:
        import matplotlib
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("figures need matplotlib: pip install 'actsparse[cli]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(history: list[dict], path: Path) -> None:
    """Total loss, reconstruction and penalty per logged step (log scale)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    for key, label in (("loss", "total"), ("reconstruction", "reconstruction"), ("penalty", "sparsity penalty")):
        vals = [h[key] for h in history]
        if any(v > 0 for v in vals):
            ax.plot(steps, vals, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_filters(weights: torch.Tensor, image_shape: tuple[int, int], path: Path, title: str) -> None:
    """Each row of ``weights`` ``(units, h*w)`` as an h×w tile, scaled to its own max |w|."""
    plt = _plt()
    w = weights.detach().double().cpu()
    n = w.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.1 * rows + 0.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            tile = w[i].reshape(image_shape)
            m = float(tile.abs().max()) or 1.0
            ax.imshow(tile.numpy(), cmap="gray", vmin=-m, vmax=m, interpolation="nearest")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reconstructions(x: torch.Tensor, x_hat: torch.Tensor, image_shape: tuple[int, int], path: Path,
                         n: int = 10) -> None:
    """``n`` inputs (top row) above their reconstructions (bottom row): the most varied of the first
    1,000 samples, since flat patches show nothing."""
    plt = _plt()
    n = min(n, x.shape[0])
    idx = x[:1000].double().var(dim=1).argsort(descending=True)[:n]
    x, x_hat = x[idx], x_hat[idx]
    fig, axes = plt.subplots(2, n, figsize=(1.1 * n, 2.6), squeeze=False)
    lo, hi = float(x[:n].min()), float(x[:n].max())
    for i in range(n):
        for r, data in enumerate((x, x_hat)):
            ax = axes[r, i]
            ax.imshow(data[i].detach().cpu().reshape(image_shape).numpy(), cmap="gray", vmin=lo, vmax=hi,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        if i == 0:
            axes[0, 0].set_ylabel("input")
            axes[1, 0].set_ylabel("output")
    fig.suptitle("Inputs (top) and reconstructions (bottom)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rho_hat(rho_hat: torch.Tensor, target: float | None, path: Path) -> None:
    """Histogram of the mean activation ρ̂_j of each unit, with the target ρ marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(rho_hat.detach().double().cpu().numpy(), bins=min(30, max(5, rho_hat.numel() // 2)),
            color="tab:blue", alpha=0.8)
    if target is not None:
        ax.axvline(target, color="tab:red", linestyle="--", label=f"target ρ = {target:g}")
        ax.legend()
    ax.set_xlabel("mean activation ρ̂_j")
    ax.set_ylabel("units")
    ax.set_title(f"Mean activation per unit (mean {float(rho_hat.mean()):.4g})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_figures(run_dir: Path, result, data) -> list[str]:
    """All figures of a finished run; returns the file names written."""
    model = result.model
    written = []
    if result.history:
        plot_loss(result.history, run_dir / "loss.png")
        written.append("loss.png")
    with torch.no_grad():
        model.eval()
        out = model(data.x[:4096])
        model.train()
    if data.image_shape is not None:
        w = model.W_enc if hasattr(model, "W_enc") else model.encoder[0].weight  # stacked: first layer
        plot_filters(w, data.image_shape, run_dir / "filters.png", f"Learned features ({w.shape[0]} encoder rows)")
        plot_reconstructions(data.x, out.reconstruction, data.image_shape, run_dir / "reconstructions.png")
        written += ["filters.png", "reconstructions.png"]
    target = getattr(getattr(model, "penalty", None), "target", None)
    plot_rho_hat(out.code.mean(0), target, run_dir / "rho_hat.png")
    written.append("rho_hat.png")
    return written
