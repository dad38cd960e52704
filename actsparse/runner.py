"""One training run end to end, as ``actsparse train`` does it: data → train → files → figures."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import atomic_write
from .config import TrainConfig
from .evaluation import GROUND_TRUTH_EVAL_SAMPLES, ground_truth_metrics, prefix_report
from .interrupt import raise_if_pending
from .run_files import claim_run_dir, holds_run
from .train import TrainResult, planned_steps, train

__all__ = ["likely_cause", "prepare_run_dir", "choose_run_name", "run_training", "ground_truth_summary", "DEFAULT_NAME",
           "default_threads", "summary_statistics", "WORK_PER_THREAD"]


#: The run name when ``--name`` is not given (the classic CS294A exercise is the default run);
#: ``sae`` for runs of the SAE recipe (``TrainConfig.sae_recipe``).
DEFAULT_NAME = "classic"
SAE_NAME = "sae"


def choose_run_name(cfg: TrainConfig) -> str:
    """``cfg.name``, or without one: ``classic`` (``sae`` for the SAE recipe) to resume, else the
    first of ``classic``, ``classic-2``, ``classic-3``... in ``cfg.out`` that holds no run (a new
    run never writes into another run's folder)."""
    if cfg.name is not None:
        return cfg.name
    base = SAE_NAME if cfg.sae_recipe else DEFAULT_NAME
    if cfg.resume:
        return base
    out, name, i = Path(cfg.out), base, 1
    while holds_run(out / name):
        i += 1
        name = f"{base}-{i}"
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


#: Multiply-adds of one forward pass (parameters × rows of a step) that one more intra-op thread
#: needs before :func:`default_threads` gives it: each thread's share of a step must take several
#: milliseconds, so that a thread descheduled by another process (a time slice, a few ms) delays
#: a step by a fraction of it rather than many times over.
WORK_PER_THREAD = 1e8


def _code_width(cfg: TrainConfig) -> int:
    """Units of the penalised code: ``hidden``, or the last of ``sizes`` for a stacked model."""
    return int(cfg.sizes[-1]) if cfg.model == "stacked" and cfg.sizes else int(cfg.hidden)


def _parameters(cfg: TrainConfig, d_in: int) -> int:
    """Weights and biases of the model ``cfg`` describes on inputs of size ``d_in`` (without building it)."""
    if cfg.model == "stacked" and cfg.sizes:
        sizes = [d_in, *cfg.sizes]
        return sum(2 * a * b + a + b for a, b in zip(sizes, sizes[1:]))  # encoder and its mirror
    return d_in * cfg.hidden * (1 if cfg.tied else 2) + cfg.hidden + d_in


def _processes() -> tuple[int, int]:
    """(processes of the run, processes on this machine), from torchrun's environment."""
    def env(name: str, default: int) -> int:
        try:
            return max(1, int(os.environ.get(name, default)))
        except ValueError:
            return default
    world = env("WORLD_SIZE", 1)
    return world, env("LOCAL_WORLD_SIZE", world)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, else ``os.cpu_count()``), shared out among
    the processes torchrun started on this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // _processes()[1])


def _own_running_threads() -> int:
    n = 0
    try:
        for task in os.scandir("/proc/self/task"):
            try:
                stat = Path(task.path, "stat").read_text()
            except OSError:
                continue
            n += stat[stat.rindex(")") + 2:].startswith("R")
    except OSError:
        return 1
    return max(1, n)


def busy_cores(samples: int = 5, interval: float = 0.005) -> float:
    """Cores that other processes keep busy now, on this process's share of the machine.

    On Linux: the runnable tasks of ``/proc/loadavg`` less this process's running threads, the
    median of ``samples`` reads ``interval`` seconds apart (a spinning process is always
    runnable; the load average would take a minute to show it, and would count this process).
    Elsewhere: the 1-minute load average. The machine-wide count is scaled by the share of the
    machine's cores this process may use."""
    counts = []
    try:
        for i in range(samples):
            if i:
                time.sleep(interval)
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
            counts.append(max(0, running - _own_running_threads()))
        busy = float(statistics.median(counts))
    except (OSError, ValueError, IndexError):
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0
    total = os.cpu_count() or 1
    try:
        mine = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mine = total
    return busy * min(1.0, mine / total)


def _choose_threads(cfg: TrainConfig, n_samples: int, d_in: int, *, cores: int | None = None,
                    busy: float | None = None) -> tuple[int, str]:
    if cfg.threads is not None:
        return cfg.threads, "--threads"
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "from OMP_NUM_THREADS"
    world, _ = _processes()
    if cfg.optimizer == "lbfgs":  # full batch: the training split, shared among the processes
        rows = max(1, n_samples - int(round(cfg.validation * n_samples)))
    else:
        rows = max(1, min(cfg.batch_size, n_samples))
    rows = max(1, rows // world)
    work = _parameters(cfg, d_in) * rows
    cores = usable_cores() if cores is None else max(1, int(cores))
    if cores == 1:
        return 1, "chosen: one core"
    busy = busy_cores() if busy is None else max(0.0, float(busy))
    free = max(1, int(math.floor(cores - busy + 0.5)))
    # a small model takes every free core (the classic run: 2.0 s with 2 threads, 7.2 s with 1, on
    # an idle 2-core machine), a large one one core per WORK_PER_THREAD of work; never a busy core
    by_work = cores if work < 2 * WORK_PER_THREAD else max(1, int(work // WORK_PER_THREAD))
    n = min(cores, by_work, free)
    if n == free and free < cores:
        return n, f"chosen: {busy:.0f} of {cores} cores busy"
    return n, ("chosen: every core is free" if n == cores else f"chosen: model size, {cores} cores")


def default_threads(cfg: TrainConfig, n_samples: int, d_in: int, *, cores: int | None = None,
                    busy: float | None = None) -> int:
    """The intra-op thread count of a run of ``cfg`` on ``n_samples`` rows of ``d_in`` features.

    ``cfg.threads`` when it is set, else ``OMP_NUM_THREADS`` when that is set, else:

    - never more threads than the cores other processes leave free (:func:`busy_cores` of
      :func:`usable_cores`): when another process takes a core, threads spin-wait for the
      descheduled one at every operation, and a run becomes 5–40× slower (the classic 64 → 25 → 64
      run: 9–45 s with two threads on a busy 2-core machine, 2–8 s with one);
    - a small model (work per step, parameters × rows of a step, under 2 × :data:`WORK_PER_THREAD`)
      takes every free core: on an idle 2-core machine the classic run trains in 2.0 s with two
      threads and 7.2 s with one;
    - a larger one takes one thread per :data:`WORK_PER_THREAD` of work, up to the free cores.

    ``cores`` and ``busy`` replace the measured values (tests, benchmarks)."""
    return _choose_threads(cfg, n_samples, d_in, cores=cores, busy=busy)[0]


def summary_statistics(cfg: TrainConfig, m: dict[str, float]) -> list[str]:
    """The sparsity statistics worth printing for a run of ``cfg`` with metrics ``m`` (``l0``,
    ``mean_activation``), as text: L0 where the code has exact zeros (not for sigmoid units, which
    are never 0), and the statistic that the penalty targets, next to its target: the mean
    activation ρ̂ for the Bernoulli and Poisson KLs, the firing frequency (L0 / units: the mean
    over units of the share of samples where a unit is non-zero) for ``frequency_kl``. L1, L2,
    Hoyer and no penalty have no target: the mean activation is shown alone."""
    penalty = cfg.penalty_key
    units = _code_width(cfg)
    control = cfg.control()
    if control is not None:  # --target-*: the statistic held, its target, and where the coefficient ended
        statistic, target = control
        shown = {"l0": ("L0", m["l0"]), "rate": ("firing rate", m["l0"] / units),
                 "mean": ("mean activation", m["mean_activation"])}[statistic]
        end = f", coefficient {m['coefficient']:.4g} from {cfg.weight:g}" if "coefficient" in m else ""
        per = " (mean over units, each held)" if cfg.per_unit else ""
        return [f"{shown[0]} {shown[1]:.4g}{per} (target {target:g}{end})"]
    parts = [] if cfg.activation == "sigmoid" else [f"L0 {m['l0']:.2f} of {units}"]
    if penalty in ("kl", "bernoulli_kl", "poisson_kl"):
        parts.append(f"mean activation {m['mean_activation']:.4g} (target {cfg.target:g})")
    elif penalty == "frequency_kl":
        parts.append(f"firing frequency {m['l0'] / units:.4g} (target {cfg.target:g})")
    else:
        parts.append(f"mean activation {m['mean_activation']:.4g}")
    return parts


#: Plain progress lines (stderr not a terminal): one per tenth of the run, and one at least every
#: this many seconds.
PROGRESS_SECONDS = 60.0


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _progress(cfg: TrainConfig, total: int, stream=None) -> tuple[Callable[[dict], None], Callable[[], None]]:
    """Progress of the run: a tqdm bar on a terminal; into a file or a pipe (a log), a plain line
    at every tenth of the run and at least every :data:`PROGRESS_SECONDS` (``step 40/400 (10%)
    loss 0.4512, FVU 0.612, mean activation 0.0113 (target 0.01), 1.2 s``)."""
    noop = (lambda rec: None), (lambda: None)
    stream = sys.stderr if stream is None else stream
    if not cfg.progress or stream is None:
        return noop
    if not _isatty(stream):
        return _progress_lines(cfg, total, stream), (lambda: None)
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:
        return noop
    bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=False, file=stream)

    def update(rec: dict) -> None:
        bar.n = int(rec["step"])
        post = {"loss": f"{rec['loss']:.4g}"}
        if cfg.activation != "sigmoid":
            post["l0"] = f"{rec['l0']:.3g}"
        if cfg.penalty_key == "frequency_kl":
            post["freq"] = f"{rec['l0'] / _code_width(cfg):.4f}"
        else:
            post["rho"] = f"{rec['mean_activation']:.4f}"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    return update, bar.close


def _progress_lines(cfg: TrainConfig, total: int, stream) -> Callable[[dict], None]:
    every = max(1, math.ceil(total / 10))
    last = [time.perf_counter()]

    def update(rec: dict) -> None:
        step, now = int(rec["step"]), time.perf_counter()
        if step % every and step != total and now - last[0] < PROGRESS_SECONDS:
            return
        last[0] = now
        fvu = rec.get("fvu", float("nan"))
        stats = ", ".join([f"loss {rec['loss']:.4g}", *([] if math.isnan(fvu) else [f"FVU {fvu:.3f}"]),
                           *summary_statistics(cfg, rec)])
        pct = f" ({100 * step / total:.0f}%)" if total else ""
        seconds = f", {rec['seconds']:.1f} s" if "seconds" in rec else ""
        try:
            print(f"step {step}/{total}{pct} {stats}{seconds}", file=stream, flush=True)
        except (OSError, ValueError):  # a closed or broken log stream does not stop the run
            pass

    return update


def ground_truth_summary(gt: dict[str, float], n_true: int) -> str:
    """One line of :func:`~actsparse.evaluation.ground_truth_metrics` for the console."""
    line = f"dictionary recovery over {n_true} true features: MCC {gt['mcc']:.3f}, MMCS {gt['mmcs']:.3f}"
    if "f1" in gt:
        line += (f"; on {GROUND_TRUTH_EVAL_SAMPLES:,} held-out samples: F1 {gt['f1']:.3f}, variance explained "
                 f"{gt['variance_explained']:.3f}, L0 {gt['heldout_l0']:.1f} (true {gt['true_l0']:.1f}), "
                 f"{gt['dead_latents']} dead and {gt['dense_latents']} dense latents")
    return line


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
    names = [choose_run_name(cfg) if rank == 0 else None]
    if world_size > 1:  # rank 0 picks the name; the others must not pick the next one it just took
        torch.distributed.broadcast_object_list(names, src=0)
    cfg.name = names[0]
    out = Path(cfg.out)
    created = [f for f in (out / cfg.name, out) if not f.is_dir()]
    if rank != 0 and not cfg.overwrite:  # every rank refuses: none waits for a failed one
        claim_run_dir(out / cfg.name, resume=cfg.resume, overwrite=False)
    run_dir = prepare_run_dir(cfg) if rank == 0 else out / cfg.name
    if world_size > 1:
        torch.distributed.barrier()  # the folder exists (and an old run is gone) before any rank looks
    base = SAE_NAME if cfg.sae_recipe else DEFAULT_NAME
    if asked is None and cfg.name != base and not cfg.resume:
        echo(f"{Path(cfg.out) / base} holds another run: this run is {run_dir} (--name to choose)")
    try:
        return _run_in(cfg, run_dir, echo)
    except BaseException:
        if rank == 0:
            _remove_if_empty(created)
        raise


def _run_in(cfg: TrainConfig, run_dir: Path, echo: Callable[[str], None]) -> TrainResult:
    from .data import load_data
    from .distributed import world

    world_size = world()[1]
    if cfg.tensorboard is not None:  # a missing package ends the run here, on every rank, before any work
        from .tensorboard import require_tensorboard

        require_tensorboard()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    data = load_data(cfg)
    raise_if_pending()  # a signal that came during the imports of the data layer stops here
    source = data.stream if data.stream is not None else data.x
    rows, d_in = (data.stream.n_rows, data.stream.d) if data.stream else tuple(data.x.shape)
    echo(f"data: {data.description} -> {(rows, d_in)}" + (f", {world_size} processes" if world_size > 1 else ""))
    if cfg.threads is not None:
        return _train_and_report(cfg, run_dir, echo, data, source, t0)
    threads, why = _choose_threads(cfg, rows, d_in)
    echo(f"threads: {threads} ({why}; --threads N to set)")
    # recorded in config.json and the checkpoint, so that --resume uses the same count: another
    # count sums in another order, and the resumed run would not be bit-identical
    cfg.threads = threads
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train_and_report(cfg, run_dir, echo, data, source, t0)
    finally:  # a choice of the run's, not the caller's: a Python caller gets its own count back
        torch.set_num_threads(before)


def _train_and_report(cfg: TrainConfig, run_dir: Path, echo: Callable[[str], None], data, source,
                      t0: float) -> TrainResult:
    from .distributed import world

    rank, world_size = world()
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
    metrics = result.metrics | {"data": data.description, "threads": torch.get_num_threads()}
    gt = ground_truth_metrics(result.model, data, cfg.seed)
    if gt is not None:
        metrics |= gt
        echo(ground_truth_summary(gt, data.true_features.shape[0]))
    prefixes = prefix_report(result.model, data.x)
    if prefixes:  # a Matryoshka SAE: how well each nested dictionary reconstructs on its own
        metrics |= prefixes
        echo("matryoshka prefixes: " + ", ".join(
            f"{m} latents FVU {prefixes[f'prefix_{m}_fvu']:.3f} (L0 {prefixes[f'prefix_{m}_l0']:.1f})"
            for m in result.model.matryoshka))
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
    if cfg.model == "stacked":
        shape = "-".join(map(str, [data.x.shape[1], *cfg.sizes]))
    else:
        shape = f"{cfg.hidden} hidden units"
    fvu = "FVU undefined (the data have no variance)" if math.isnan(m["fvu"]) else f"FVU {m['fvu']:.3f}"
    echo(f"trained {shape}, {cfg.activation}, {cfg.optimizer} for {m['steps']} steps in "
         f"{m['seconds']:.1f} s: reconstruction {m['reconstruction']:.4g}, {fvu}, "
         f"{', '.join(summary_statistics(cfg, m))}")
    if m.get("lbfgs_stalled_at"):
        dtype = str(next(result.model.parameters()).dtype).replace("torch.", "")
        echo(f"L-BFGS stopped improving at step {m['lbfgs_stalled_at']}: no step along the gradient lowered the loss "
             f"any more (a minimum to the precision of its {dtype} values); the later steps left the weights as they "
             f"were")
    if m["fvu"] >= 0.99:
        echo(f"warning: FVU {m['fvu']:.3f}: the model reconstructs no better than the mean of the data; "
             f"{likely_cause(cfg, m)}")
    return result


def likely_cause(cfg: TrainConfig, m: dict[str, float]) -> str:
    """A one-line guess at why a run learnt nothing (FVU ≈ 1), from its settings and metrics."""
    penalty = cfg.penalty_key
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
