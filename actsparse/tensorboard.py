"""TensorBoard logging of a training run (``actsparse train --tensorboard DIR``).

Needs the ``tensorboard`` package (from a clone: ``pip install -e '.[tensorboard]'``;
released: ``pip install 'actsparse[tensorboard]'``), imported inside
the functions that use it. What is written, by :class:`TensorBoardLogger`:

* every logged record's loss terms and metrics as scalars ``train/loss``, ``train/reconstruction``,
  ``train/penalty``, ``train/weight_decay``, ``train/fvu``, ``train/l0``, ``train/mean_activation``,
  ``train/fraction_dead`` (a value that is NaN, e.g. no dead-unit count, is left out);
* every ``every`` steps (the run's ``--checkpoint-every``; 0: only at the end), at the first logged
  step at or after each multiple of it, and at the last step: the histogram ``rho_hat`` of the mean
  activation ρ̂_j of each hidden unit on a fixed sample of the data (one eval-mode forward of at
  most :data:`SAMPLE` rows, no gradient), and, when the samples are images, the encoder rows tiled as
  ``filters.png`` tiles them (:func:`tile_filters`), as the image ``filters``;
* the config (``config``) and the final metrics (``metrics``, the JSON of ``metrics.json``) as
  text, and each numeric final metric as a scalar ``final/<name>`` at the last step.

A resumed or rolled-back run writes a new event file (or more events) to the same folder; its
steps repeat earlier ones, and TensorBoard's loader keeps the newer values (it purges events
that a smaller step supersedes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TensorBoardLogger", "MissingTensorBoard", "require_tensorboard", "tile_filters", "SCALARS", "SAMPLE"]

#: The record keys logged as ``train/<key>`` scalars.
SCALARS = ("loss", "reconstruction", "penalty", "weight_decay", "fvu", "l0", "mean_activation", "fraction_dead",
           "val_reconstruction", "coefficient", "statistic")
#: The most samples the ρ̂ histogram is computed on.
SAMPLE = 4096
#: The most units shown in the filter image (the first ones).
MAX_FILTERS = 256


class MissingTensorBoard(ImportError, RuntimeError):
    """The ``tensorboard`` package is not installed (an ``ImportError``; a ``RuntimeError`` too, so
    that the command line reports it in one line)."""


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``, or :class:`MissingTensorBoard` with the install line."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        from .config import install_hint

        raise MissingTensorBoard(f"--tensorboard needs the tensorboard package: {install_hint('tensorboard')}") from err
    return SummaryWriter


def tile_filters(weights: Tensor, image_shape: tuple[int, int], pad: int = 1) -> Tensor:
    """The rows of ``weights`` ``(units, h*w)`` as h×w tiles in a grid, as
    :func:`actsparse.plots.plot_filters` lays them out: ``ceil(sqrt(units))`` columns, row-major,
    each tile scaled to its own max |w| (−max → 0, 0 → 0.5, +max → 1). Tiles are separated and
    framed by ``pad`` pixels of 0. Returns ``(1, rows*(h+pad)+pad, cols*(w+pad)+pad)`` float32 in
    [0, 1] (CHW, one channel)."""
    h, w = image_shape
    units = weights.shape[0]
    if weights.dim() != 2 or weights.shape[1] != h * w or units == 0:
        raise ValueError(f"weights must be (units, {h}*{w}), got {tuple(weights.shape)}")
    cols = math.ceil(math.sqrt(units))
    rows = math.ceil(units / cols)
    t = weights.detach().to("cpu", torch.float64).reshape(units, h, w)
    scale = t.abs().amax(dim=(1, 2), keepdim=True)
    t = 0.5 + 0.5 * t / torch.where(scale > 0, scale, torch.ones_like(scale))
    grid = torch.zeros(rows * cols, h + pad, w + pad, dtype=torch.float64)
    grid[:units, :h, :w] = t
    grid = grid.reshape(rows, cols, h + pad, w + pad).permute(0, 2, 1, 3).reshape(rows * (h + pad), cols * (w + pad))
    return nn.functional.pad(grid, (pad, 0, pad, 0)).to(torch.float32).unsqueeze(0)


def _filters(model: nn.Module) -> Tensor | None:
    """The encoder rows ``(units, d_in)`` that ``filters.png`` shows (a stack: its first layer)."""
    if hasattr(model, "W_enc"):
        return model.W_enc
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, nn.Sequential | nn.ModuleList) and len(encoder) and hasattr(encoder[0], "weight"):
        return encoder[0].weight
    return None


class TensorBoardLogger:
    """Writes a run's scalars, ρ̂ histograms, filter images, config and final metrics to
    TensorBoard event files in ``log_dir`` (see the module docstring for the tags).

    Args:
        log_dir: the folder of the event files (created).
        model: the model being trained (trained in place: the logger reads its current weights);
            it must have ``encode(x) -> (batch, d_hidden)``.
        sample: ``(n, d_in)`` rows of the data for ρ̂; the first :data:`SAMPLE` are used.
        image_shape: ``(h, w)`` when each sample is an image (the filters are then logged), else None.
        every: log ρ̂ and the filters every this many steps (0: only at the end).
        config: logged as text ``config`` (JSON), if given.

    Call :meth:`on_step` with each logged record, then :meth:`close` (with the final metrics to
    log them and the final ρ̂ and filters)."""

    def __init__(self, log_dir: str | Path, model: nn.Module, sample: Tensor,
                 image_shape: tuple[int, int] | None = None, every: int = 100,
                 config: Mapping[str, Any] | None = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an integer >= 0, got {every!r}")
        writer_cls = require_tensorboard()
        self.model, self.every, self.image_shape = model, every, image_shape
        self.sample = sample[:SAMPLE]
        self.writer = writer_cls(log_dir=str(log_dir))
        self._prev: int | None = None  # the step of the previous record
        self._snapshot_step: int | None = None  # the step of the last histogram/image
        if config is not None:
            self.writer.add_text("config", _as_markdown_json(config), 0)

    def rho_hat(self) -> Tensor:
        """ρ̂_j, the mean of hidden unit j over the sample, ``(d_hidden,)`` float64 (eval mode, this
        process's statistics only: under torchrun only rank 0 runs it)."""
        from .train import unit_statistics

        return unit_statistics(self.model, self.sample)[0]

    def snapshot(self, step: int) -> None:
        """Log the ρ̂ histogram and (image data) the filter grid at ``step``."""
        self.writer.add_histogram("rho_hat", self.rho_hat().numpy(), step)
        w = _filters(self.model)
        if self.image_shape is not None and w is not None and w.shape[1] == math.prod(self.image_shape):
            self.writer.add_image("filters", tile_filters(w[:MAX_FILTERS], self.image_shape), step)
        self._snapshot_step = step

    def on_step(self, record: Mapping[str, float]) -> None:
        """Log a record of :func:`actsparse.train.train` (``step`` and :data:`SCALARS`); take a
        snapshot when a multiple of ``every`` lies in (previous record's step, this step]."""
        step = int(record["step"])
        for key in SCALARS:
            v = record.get(key)
            if v is not None and not math.isnan(v):
                self.writer.add_scalar(f"train/{key}", v, step)
        prev = step - 1 if self._prev is None or self._prev >= step else self._prev  # first, or after a rollback
        self._prev = step
        if self.every and step // self.every > prev // self.every:
            self.snapshot(step)

    def close(self, metrics: Mapping[str, Any] | None = None) -> None:
        """With ``metrics`` (a finished run's, with ``steps``): log them, and ρ̂ and the filters at the
        last step unless already logged there. Then flush and close the event file (again: no-op)."""
        if self.writer is None:
            return
        try:
            if metrics is not None:
                step = int(metrics.get("steps", self._prev or 0))
                self.writer.add_text("metrics", _as_markdown_json(metrics), step)
                for key, v in metrics.items():
                    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                        self.writer.add_scalar(f"final/{key}", v, step)
                if self._snapshot_step != step:
                    self.snapshot(step)
        finally:
            self.writer.close()
            self.writer = None


def _as_markdown_json(values: Mapping[str, Any]) -> str:
    # TensorBoard renders text as Markdown: an indented block keeps the JSON's layout
    text = json.dumps(dict(values), indent=2, default=str)
    return "\n".join("    " + line for line in text.splitlines())
