"""The files of a run folder: the resumable checkpoint, the exported weights and config, and the
checks made before they are written (free space, finite weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .build import build_model
from .checkpoint import CHECKPOINT, atomic_write, load_latest, write_checkpoint
from .config import TrainConfig
from .errors import NonFiniteError
from .models import SparseAutoencoder
from .weights import load_weights, save_weights

__all__ = ["checkpoint_bytes", "check_free_space", "check_weights_finite", "save_checkpoint", "load_resume_state",
           "load_checkpoint"]


def checkpoint_bytes(model: torch.nn.Module, optimizer: str) -> int:
    """An upper estimate of the disk space a run's checkpoints take: the resumable checkpoint
    (weights + optimiser state), the previous one and the one being written, plus the exported
    ``model.safetensors``. L-BFGS keeps 100 (s, y) pairs of parameter-sized vectors."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(b.numel() * b.element_size() for b in model.buffers())
    state = {"adam": 2, "sgd": 0, "lbfgs": 2 * 100 + 2}.get(optimizer, 2) * n
    return 3 * (n + state) + n


def check_weights_finite(model: torch.nn.Module, step: int) -> None:
    params = [p.detach() for p in model.parameters()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        raise NonFiniteError(step, {}, f"the weights became non-finite at step {step} ({', '.join(bad)})")


def save_checkpoint(run_dir: Path, model: torch.nn.Module, cfg: TrainConfig, d_in: int,
                    trainer_state: dict[str, Any] | None = None) -> None:
    """Write the run's files into ``run_dir``, each one atomically.

    * ``checkpoint.pt`` (when ``trainer_state`` is given: the step, optimiser and RNG states): the
      one resumable file, with the weights inside, verified by a SHA-256 in its header; the one it
      replaces is kept as ``checkpoint.prev.pt`` (:mod:`actsparse.checkpoint`).
    * ``model.safetensors`` and ``config.json``: the latest weights and the config, for
      :func:`load_checkpoint`, ``actsparse eval`` and other tools.

    Weights that are not finite are never written: :class:`NonFiniteError` is raised instead,
    and the last good checkpoint stays in place."""
    step = int(trainer_state["step"]) if trainer_state else None
    check_weights_finite(model, -1 if step is None else step)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    cfg_dict = cfg.to_dict() | {"d_in": d_in}
    if trainer_state is not None:
        write_checkpoint(run_dir, {**trainer_state, "model": state, "config": json.dumps(cfg_dict)})
    meta = {"step": "final" if step is None else str(step)}
    save_weights(run_dir / "model.safetensors", state, meta)
    atomic_write(run_dir / "config.json", lambda p: p.write_text(json.dumps(cfg_dict, indent=2) + "\n"))


def load_resume_state(run_dir: Path, model: torch.nn.Module) -> dict[str, Any]:
    """The newest checkpoint of an interrupted run that verifies (see :func:`~actsparse.checkpoint.load_latest`),
    with its weights loaded into ``model``."""
    found = load_latest(run_dir)
    if found is None:
        raise ValueError(f"cannot resume from {run_dir}: it holds no {CHECKPOINT} (was it written by an older "
                         f"actsparse, or with --checkpoint-every 0 and stopped before the end?)")
    state, path = found
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"cannot resume from {path}: its weights do not fit this model ({err})") from err
    return state


def load_checkpoint(run_dir: str | Path) -> tuple[SparseAutoencoder, TrainConfig]:
    """Rebuild the model of a run folder from its ``config.json`` and ``model.safetensors``."""
    run_dir = Path(run_dir)
    for name in ("config.json", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} is missing: is {run_dir} an actsparse run folder?")
    try:
        values = json.loads((run_dir / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{run_dir / 'config.json'} is not valid JSON: {err}") from err
    d_in = int(values.pop("d_in"))
    cfg = TrainConfig(**values)
    model = build_model(cfg, d_in)
    weights = run_dir / "model.safetensors"
    try:
        model.load_state_dict(load_weights(weights))
    except Exception as err:  # safetensors' own error for a truncated header, or a shape mismatch
        raise ValueError(f"cannot load {weights}: {err}") from err
    return model, cfg


def check_free_space(run_dir: Path, model: torch.nn.Module, optimizer: str) -> None:
    need = checkpoint_bytes(model, optimizer) + 16 * 2**20  # and room for the log and the figures
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise OSError(f"only {free / 2**20:.1f} MiB free in {run_dir}; this run's checkpoints need about "
                      f"{need / 2**20:.0f} MiB (free some space or choose another --out)")
