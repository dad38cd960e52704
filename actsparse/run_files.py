"""The files of a run folder: the resumable checkpoint, the exported weights and config, and the
checks made before they are written (free space, finite weights)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .build import build_model
from .checkpoint import CHECKPOINT, PREVIOUS, atomic_write, checkpoint_paths, load_latest, write_checkpoint
from .config import TrainConfig
from .errors import NonFiniteError
from .models import SparseAutoencoder
from .weights import load_weights, save_weights

__all__ = ["checkpoint_bytes", "check_free_space", "check_weights_finite", "save_checkpoint", "load_resume_state",
           "load_checkpoint", "read_run_config", "config_from_json", "resume_conflicts", "claim_run_dir", "holds_run",
           "run_files", "read_log", "RUN_FILES", "RESUMABLE_CHANGES"]


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


#: Files a run writes into its folder (figures: :data:`actsparse.plots.FIGURES`); with ``.tmp``
#: beside each while it is written.
RUN_FILES = ("config.json", "model.safetensors", CHECKPOINT, PREVIOUS, "metrics.json", "metrics.jsonl", "report.html")

#: Settings a resumed run may change: the step budget and how the run is watched and kept.
#: Every other setting is part of what the checkpoint's weights were trained with.
RESUMABLE_CHANGES = ("iterations", "epochs", "resume", "overwrite", "config", "progress", "plots", "threads",
                     "tensorboard", "device", "checkpoint_every", "on_nan", "max_rollbacks", "out", "name")


def run_files(folder: Path) -> list[Path]:
    """The files of an actsparse run in ``folder`` (a run's own names only; other files are not
    listed), with the temporary files of an interrupted write."""
    from .plots import FIGURES

    folder = Path(folder)
    names = [*RUN_FILES, *FIGURES]
    found = [folder / n for n in names if (folder / n).is_file()]
    return found + [folder / f"{n}.tmp" for n in names if (folder / f"{n}.tmp").is_file()]


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds (part of) a run: its config, weights, checkpoint or log."""
    folder = Path(folder)
    return any((folder / n).is_file() for n in ("config.json", "model.safetensors", CHECKPOINT, PREVIOUS,
                                               "metrics.jsonl", "metrics.json"))


def claim_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Make ``run_dir`` ready for a run: a new run never writes into a folder that holds another run.

    * ``resume``: the folder must hold the run (its checkpoint is checked when it is loaded);
    * ``overwrite``: every file of the old run (:func:`run_files`) is removed first, so nothing of
      it survives beside the new run; other files are left alone;
    * otherwise a folder that holds a run is refused with a ``FileExistsError`` that says what to do.
    """
    run_dir = Path(run_dir)
    if resume or not holds_run(run_dir):
        return
    if not overwrite:
        raise FileExistsError(f"{run_dir} holds another run: --resume continues it, --overwrite replaces it, "
                              f"or choose another --name")
    for f in run_files(run_dir):
        f.unlink(missing_ok=True)


def read_run_config(run_dir: Path) -> tuple[TrainConfig, int]:
    """The config and input size of the run in ``run_dir``: from ``config.json``, or, where a kill
    came before it was written, from the newest checkpoint that verifies (it embeds the config).

    Raises ``FileNotFoundError`` (neither exists) or ``ValueError`` naming the file and what is
    wrong with it (not JSON, not an object, no ``d_in``, an unknown or invalid setting)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read {path}: {err}") from err
    else:
        found = load_latest(run_dir) if checkpoint_paths(run_dir) else None
        if found is None or not isinstance(found[0].get("config"), str):
            raise FileNotFoundError(f"{path} is missing and no checkpoint holds the config: is {run_dir} an "
                                    f"actsparse run folder?")
        text, path = found[0]["config"], found[1]
    return config_from_json(text, path)


def config_from_json(text: str, source: Path | str) -> tuple[TrainConfig, int]:
    """Parse and check a saved run config (``config.json``'s text); ``source`` names it in errors."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"{source} must hold a JSON object of settings, got a {type(values).__name__}")
    d_in = values.pop("d_in", None)
    if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
        raise ValueError(f"{source} has no valid 'd_in' (the input size), got {d_in!r}: is it an actsparse run config?")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}")
    try:
        return TrainConfig(**values), d_in
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source}: {err}") from err


def resume_conflicts(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The settings of ``cfg`` that differ from the ``saved`` config of the checkpoint being resumed
    and may not change (all but :data:`RESUMABLE_CHANGES`), as ``"name (checkpoint X, now Y)"``."""
    now = cfg.to_dict()
    diffs = []
    for key, value in now.items():
        if key in RESUMABLE_CHANGES or key not in saved:
            continue
        old = saved[key]
        if isinstance(value, tuple):
            value = list(value)
        if old != value:
            diffs.append(f"{key} (checkpoint {old!r}, now {value!r})")
    return diffs


def load_resume_state(run_dir: Path, model: torch.nn.Module, cfg: TrainConfig | None = None) -> dict[str, Any]:
    """The newest checkpoint of an interrupted run that verifies (see :func:`~actsparse.checkpoint.load_latest`),
    with its weights loaded into ``model``.

    With ``cfg``, the config the checkpoint embeds must agree with it on every setting a resume may
    not change (:func:`resume_conflicts`): a checkpoint of another run, or a setting changed since,
    is refused with a ``ValueError`` that names each differing setting."""
    found = load_latest(run_dir)
    if found is None:
        raise ValueError(f"cannot resume from {run_dir}: it holds no {CHECKPOINT} (was it written by an older "
                         f"actsparse, or with --checkpoint-every 0 and stopped before the end?)")
    state, path = found
    if cfg is not None and isinstance(state.get("config"), str):
        try:
            saved = json.loads(state["config"])
        except json.JSONDecodeError:
            saved = {}
        diffs = resume_conflicts(saved if isinstance(saved, dict) else {}, cfg)
        if diffs:
            raise ValueError(f"cannot resume from {path}: it was trained with other settings: {'; '.join(diffs)} "
                             f"(a resume may change only the step budget and how the run is kept; start a new "
                             f"run with another --name, or --overwrite)")
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
    cfg, d_in = read_run_config(run_dir)
    model = build_model(cfg, d_in)
    weights = run_dir / "model.safetensors"
    tensors = load_weights(weights)  # its own errors name the file (damaged, corrupt, not safetensors)
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # train never writes such weights: the file was changed since, or written by something else
        names = ", ".join(map(repr, bad))
        raise ValueError(f"{weights} holds non-finite weights (NaN/Inf in {names}): they cannot be used; resume the "
                         f"run from its checkpoint or train it anew")
    try:
        model.load_state_dict(tensors)
    except (RuntimeError, KeyError) as err:  # weights of another shape than the config's model
        raise ValueError(f"cannot load {weights}: its weights do not fit the model of {run_dir / 'config.json'} "
                         f"({' '.join(str(err).split())})") from err
    return model, cfg


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none if it does not exist); a line a kill cut short, or
    any line that is not a JSON object, is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def check_free_space(run_dir: Path, model: torch.nn.Module, optimizer: str) -> None:
    need = checkpoint_bytes(model, optimizer) + 16 * 2**20  # and room for the log and the figures
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise OSError(f"only {free / 2**20:.1f} MiB free in {run_dir}; this run's checkpoints need about "
                      f"{need / 2**20:.0f} MiB (free some space or choose another --out)")
