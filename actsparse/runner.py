"""One training run end to end, as ``actsparse train`` does it: data → train → files → figures."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import atomic_write
from .config import TrainConfig
from .run_files import claim_run_dir, holds_run
from .train import TrainResult, planned_steps, train

__all__ = ["likely_cause", "prepare_run_dir", "choose_run_name", "run_training", "dictionary_recovery", "DEFAULT_NAME"]


#: The run name when ``--name`` is not given (the classic CS294A exercise is the default run).
DEFAULT_NAME = "classic"


def choose_run_name(cfg: TrainConfig) -> str:
    """``cfg.name``, or without one: ``classic`` to resume, else the first of ``classic``,
    ``classic-2``, ``classic-3``... in ``cfg.out`` that holds no run (a new run never writes into
    another run's folder)."""
    if cfg.name is not None:
        return cfg.name
    if cfg.resume:
        return DEFAULT_NAME
    out, name, i = Path(cfg.out), DEFAULT_NAME, 1
    while holds_run(out / name):
        i += 1
        name = f"{DEFAULT_NAME}-{i}"
    return name


def prepare_run_dir(cfg: TrainConfig, min_free_bytes: int = 50 * 2**20) -> Path:
    """Create ``out/name`` (``cfg.name`` is set if it was chosen here) and prove it is writable with
    enough free space, before any training. A folder that holds another run is refused unless
    ``cfg.resume`` (it is continued) or ``cfg.overwrite`` (its files are removed first)."""
    cfg.name = choose_run_name(cfg)
    run_dir = Path(cfg.out) / cfg.name
    claim_run_dir(run_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    if cfg.resume and not holds_run(run_dir):
        raise FileNotFoundError(f"nothing to resume: {run_dir} holds no run")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"  # one per process: torchrun's ranks probe at once
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"cannot write to the output folder {run_dir}: {err.strerror or err}") from err
    free = shutil.disk_usage(run_dir).free
    if free < min_free_bytes:
        raise OSError(f"only {free / 2**20:.1f} MiB free in {run_dir}; need at least {min_free_bytes / 2**20:.0f} MiB")
    return run_dir


def _remove_if_empty(folders: list[Path]) -> None:
    """A run that failed before writing anything leaves no empty folder behind: each of
    ``folders`` (innermost first, only those this run created) is removed if it is empty."""
    for f in folders:
        try:
            f.rmdir()  # only succeeds on an empty folder
        except OSError:
            return


def _progress(cfg: TrainConfig, total: int) -> tuple[Callable[[dict], None], Callable[[], None]]:
    if not cfg.progress:
        return (lambda rec: None), (lambda: None)
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:
        return (lambda rec: None), (lambda: None)
    bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=False)

    def update(rec: dict) -> None:
        bar.n = int(rec["step"])
        bar.set_postfix(loss=f"{rec['loss']:.4g}", l0=f"{rec['l0']:.3g}", rho=f"{rec['mean_activation']:.4f}",
                        refresh=False)
        bar.refresh()

    return update, bar.close


def dictionary_recovery(model, data) -> float | None:
    """MMCS of the model's dictionary against the data's ground truth (synthetic data and a
    one-layer autoencoder), else None."""
    if data.true_features is None or not hasattr(model, "decoder_weight"):
        return None
    from .metrics import mmcs

    return float(mmcs(data.true_features, model.decoder_weight.detach().t()))


def run_training(cfg: TrainConfig, echo: Callable[[str], None] = print) -> TrainResult:
    """Load the data, train, and write ``config.json``, ``model.safetensors``, ``metrics.json``,
    ``metrics.jsonl`` and the figures into ``out/name``; print where everything went.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process joins the process group (gloo on CPU,
    NCCL on CUDA) and trains its share of each global batch with DistributedDataParallel; only
    rank 0 writes files and prints."""
    from .distributed import init_from_env, world
    from .train import resolve_device

    joined = init_from_env(resolve_device(cfg.device))
    try:
        return _run(cfg, echo if world()[0] == 0 else (lambda line: None))
    finally:
        if joined:
            torch.distributed.barrier()  # rank 0 has written everything before any rank leaves
            torch.distributed.destroy_process_group()


def _run(cfg: TrainConfig, echo: Callable[[str], None]) -> TrainResult:
    from .distributed import world

    rank, world_size = world()
    asked = cfg.name
    if world_size > 1:  # rank 0 picks the name; the others must not pick the next one it just took
        names = [choose_run_name(cfg) if rank == 0 else None]
        torch.distributed.broadcast_object_list(names, src=0)
        cfg.name = names[0]
    out = Path(cfg.out)
    created = [f for f in (out / choose_run_name(cfg), out) if not f.is_dir()]
    if rank != 0 and not cfg.overwrite:  # every rank refuses: none waits for a failed one
        claim_run_dir(out / cfg.name, resume=cfg.resume, overwrite=False)
    run_dir = prepare_run_dir(cfg) if rank == 0 else out / cfg.name
    if world_size > 1:
        torch.distributed.barrier()  # the folder exists (and an old run is gone) before any rank looks
    if asked is None and cfg.name != DEFAULT_NAME and not cfg.resume:
        echo(f"{Path(cfg.out) / DEFAULT_NAME} holds another run: this run is {run_dir} (--name to choose)")
    try:
        return _run_in(cfg, run_dir, echo)
    except BaseException:
        if rank == 0:
            _remove_if_empty(created)
        raise


def _run_in(cfg: TrainConfig, run_dir: Path, echo: Callable[[str], None]) -> TrainResult:
    from .data import load_data
    from .distributed import world

    rank, world_size = world()
    if cfg.tensorboard is not None:  # a missing package ends the run here, on every rank, before any work
        from .tensorboard import require_tensorboard

        require_tensorboard()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    data = load_data(cfg)
    source = data.stream if data.stream is not None else data.x
    echo(f"data: {data.description} -> {(data.stream.n_rows, data.stream.d) if data.stream else tuple(data.x.shape)}"
         + (f", {world_size} processes" if world_size > 1 else ""))
    total = planned_steps(cfg, source)
    model = None
    if cfg.model == "stacked" and cfg.pretrain and not cfg.resume:
        from .train import build_model, pretrain_greedy

        model = build_model(cfg, data.x.shape[1])
        echo(f"greedy layer-wise pretraining of {len(model.encoder)} layers ...")
        pretrain_greedy(model, data.x, cfg)
    update, close = _progress(cfg, total) if rank == 0 else ((lambda rec: None), (lambda: None))
    tb = None

    def on_start(trained: torch.nn.Module) -> None:  # the logger reads the weights of the model being trained
        nonlocal tb
        if cfg.tensorboard is not None and rank == 0:
            from .tensorboard import TensorBoardLogger

            tb = TensorBoardLogger(cfg.tensorboard, trained, data.x, data.image_shape, cfg.checkpoint_every,
                                   config=cfg.to_dict())

    def on_step(rec: dict) -> None:
        update(rec)
        if tb is not None:
            tb.on_step(rec)

    try:
        result = train(cfg, source, run_dir=run_dir, on_step=on_step, model=model, on_start=on_start)
    except BaseException:
        if tb is not None:
            tb.close()  # what was logged up to the failure stays readable
        raise
    finally:
        close()
    if rank != 0:  # rank 0 reports and writes
        return result
    metrics = result.metrics | {"data": data.description}
    recovery = dictionary_recovery(result.model, data)
    if recovery is not None:
        metrics["mmcs"] = recovery
        echo(f"dictionary recovery: MMCS {recovery:.3f} over {data.true_features.shape[0]} true features")
    metrics["total_seconds"] = time.perf_counter() - t0
    atomic_write(run_dir / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    if tb is not None:
        tb.close(metrics)
    resumable = ["checkpoint.pt"] if (run_dir / "checkpoint.pt").is_file() else []
    written = ["config.json", "model.safetensors", *resumable, "metrics.json", "metrics.jsonl"]
    if cfg.plots:
        from .plots import write_figures

        written += write_figures(run_dir, result, data)
    echo(f"wrote {run_dir}/: {', '.join(written)}")
    m = result.metrics
    target = f" (target {cfg.target:g})" if cfg.penalty and "kl" in cfg.penalty.lower() else ""
    if cfg.model == "stacked":
        shape = "-".join(map(str, [data.x.shape[1], *cfg.sizes]))
    else:
        shape = f"{cfg.hidden} hidden units"
    fvu = "FVU undefined (the data have no variance)" if math.isnan(m["fvu"]) else f"FVU {m['fvu']:.3f}"
    echo(f"trained {shape}, {cfg.activation}, {cfg.optimizer} for {m['steps']} steps in "
         f"{m['seconds']:.1f} s: reconstruction {m['reconstruction']:.4g}, {fvu}, L0 {m['l0']:.2f}, "
         f"mean activation {m['mean_activation']:.4f}{target}")
    if m["fvu"] >= 0.99:
        echo(f"warning: FVU {m['fvu']:.3f}: the model reconstructs no better than the mean of the data; "
             f"{likely_cause(cfg, m)}")
    return result


def likely_cause(cfg: TrainConfig, m: dict[str, float]) -> str:
    """A one-line guess at why a run learnt nothing (FVU ≈ 1), from its settings and metrics."""
    penalty = (cfg.penalty or "").lower().replace("-", "_")
    if cfg.activation != "sigmoid" and penalty in ("kl", "bernoulli_kl"):
        return (f"--activation {cfg.activation} with the Bernoulli KL, which is for sigmoid units in [0, 1]: use "
                f"--penalty poisson_kl (the KL for unbounded ReLU units) or --penalty l1")
    if m.get("l0", 1.0) == 0 or m.get("fraction_dead", 0.0) >= 1.0:
        return f"every hidden unit is silent: the penalty is too strong (lower --weight {cfg.weight:g})"
    if cfg.optimizer != "lbfgs":
        return (f"too few steps or a learning rate that does not fit (--lr {cfg.lr:g}, --epochs {cfg.epochs}); "
                f"or the penalty is too strong (--weight {cfg.weight:g})")
    return (f"the penalty may be too strong (--weight {cfg.weight:g}) or the iterations too few "
            f"(--iterations {cfg.iterations})")
