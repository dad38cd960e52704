"""Training loop: full-batch L-BFGS (the CS294A exercise) and minibatch optimisers.

The loss is the model's :class:`~actsparse.models.ForwardOutput` ``.loss`` (reconstruction +
weight decay + sparsity penalty + AuxK + the Matryoshka/Gated auxiliary terms); the validation loss
is reported without the penalty.
Math lives in the model and the penalties; this module only loops, logs and saves.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from . import metrics as M
from .build import build_model, resolve_device
from .checkpoint import CHECKPOINT
from .config import TrainConfig
from .control import TargetSparsity
from .data import STREAM_SAMPLE, IndexedRows, count_not_finite
from .distributed import local_batch_statistics, sync_batch_statistics, world
from .errors import NonFiniteError, TrainingError, TrainingWarning
from .evaluation import evaluate, split_indices, unit_statistics
from .interrupt import RunInterrupted, StopSignals
from .lbfgs import LBFGS
from .models import SparseAutoencoder
from .models.sae import squared_error
from .run_files import (
    check_free_space,
    check_weights_finite,
    checkpoint_bytes,
    claim_run_dir,
    load_checkpoint,
    load_resume_state,
    read_log,
    save_checkpoint,
)

__all__ = ["build_model", "resolve_device", "train", "train_together", "TrainingStream", "train_step", "planned_steps",
           "minibatch_optimizer", "parameter_groups",
           "pretrain_greedy", "TrainResult", "evaluate", "unit_statistics", "save_checkpoint", "load_checkpoint",
           "checkpoint_bytes", "TrainingError", "NonFiniteError", "RunInterrupted"]


@runtime_checkable
class TrainingStream(Protocol):
    """Data the trainer streams instead of holding them: a
    :class:`~actsparse.data.shards.ShardStore` (rows on disk), a
    :class:`~actsparse.data.model_stream.ModelActivationStream` (rows from a model's forward), or
    any object with these four members. A streamed run has no validation split; it takes
    ``epochs × (n_rows // batch_size)`` steps and its checkpoints record the epoch and the
    batches done in it, which ``epoch_batches(skip=...)`` must resume from."""

    @property
    def n_rows(self) -> int:
        """Rows of one epoch."""

    @property
    def d(self) -> int:
        """Row width."""

    def sample(self, n: int, *, seed: int = 0) -> Tensor:
        """``(min(n, n_rows), d)`` rows for metrics and figures, the same for a seed, bounded by ``n``."""

    def epoch_batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                      skip: int = 0) -> Iterator[tuple[int, Tensor]]:
        """``(b, rows)`` for each batch ``b >= skip`` of ``epoch``, an order drawn from
        ``(seed, epoch)`` alone: this process's ``np.array_split(…, world_size)[rank]`` share of
        the ``batch_size`` rows of global batch ``b`` (so N processes see the rows one would)."""


_TERMS = ("loss", "reconstruction", "penalty", "weight_decay", "auxk", "aux")


class _FiniteGuard:
    """Finds the first step whose loss is not finite without a host sync per step (an
    ``.item()`` per step would sync the device every step): each step's
    loss terms are kept as detached references (no kernel
    runs), and the steps since the last check are tested together, with one sync, at logged and
    checkpoint steps."""

    def __init__(self, distributed: bool = False) -> None:
        self.distributed = distributed  # every rank must stop at the same check, or the others hang
        self.pending: list[tuple[int, tuple[Tensor, ...]]] = []  # (step, terms in _TERMS order)

    def update(self, step: int, out) -> None:
        aux = getattr(out, "aux_loss", 0.0)  # Matryoshka prefixes, Gated SAE (a float 0 by default)
        aux = aux if isinstance(aux, Tensor) else torch.tensor(float(aux))
        self.pending.append((step, tuple(t.detach() for t in (
            out.loss, out.reconstruction_loss, out.sparsity_loss, out.weight_decay_loss, out.auxk_loss, aux))))

    def check(self) -> None:
        """Raise :class:`NonFiniteError` for the first non-finite step since the last check; either
        way the pending steps are cleared, so the guard can be used again after a rollback."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        finite = torch.isfinite(torch.stack([terms[0] for _, terms in pending]))
        if self.distributed:  # a step is finite only if it is on every rank
            flags = finite.to(torch.uint8)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
            finite = flags.bool()
        if bool(finite.all()):
            return
        step, terms = pending[int((~finite).nonzero()[0, 0])]
        values = {k: float(v) for k, v in zip(_TERMS, terms)}
        shown = ", ".join(f"{k} {v:.6g}" for k, v in values.items())
        raise NonFiniteError(step, values, f"the loss became non-finite at step {step} ({shown})")


@dataclass
class TrainResult:
    """What :func:`train` returns: the model, final metrics and the per-step history."""

    model: SparseAutoencoder
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    run_dir: Path | None = None


class _RunLog:
    """``metrics.jsonl``, one JSON line per logged step, and the same records in memory. On resume
    and on rollback it is rewound to the checkpoint's step, so the log never holds steps that the
    weights have not seen (a killed run may also have left half a last line: it is dropped)."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.records, self._file = path, [], None

    def rewind(self, step: int) -> None:
        self.close()
        if self.path is not None and self.path.is_file():
            self.records = read_log(self.path)
        self.records = [r for r in self.records if r.get("step", math.inf) <= step]
        if self.path is not None:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            self._file = open(self.path, "a")  # noqa: SIM115 (closed by close())

    def append(self, rec: dict[str, float]) -> None:
        self.records.append(rec)
        if self._file is not None:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def train(
    cfg: TrainConfig,
    x: Tensor,
    *,
    run_dir: Path | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    model: torch.nn.Module | None = None,
    on_start: Callable[[torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train the autoencoder ``cfg`` describes on ``x`` ``(n, d_in)``.

    Args:
        cfg: the run's configuration (optimizer, iterations/epochs, model, penalty, seed).
        x: training data, float, ``(n, d_in)``; ``cfg.validation`` of it is held out.
        run_dir: if given, ``metrics.jsonl`` (one line per logged step), the resumable
            ``checkpoint.pt`` (every ``cfg.checkpoint_every`` steps and after the last one) and
            ``model.safetensors`` + ``config.json`` are written there; with ``cfg.resume`` the run
            continues from its newest checkpoint that verifies. A folder that holds another run is
            refused unless ``cfg.resume`` or ``cfg.overwrite`` (which removes the old run's files first).
        on_step: called with each logged record (the CLI's progress bar uses it).
        model: train this model instead of the one ``cfg`` describes (any module whose forward
            returns a :class:`~actsparse.models.ForwardOutput`; e.g. a stack being fine-tuned).
        on_start: called once with the model about to be trained (on its device, with a resumed
            run's weights loaded), before the first step; e.g. a logger that reads its weights.

    Returns:
        A :class:`TrainResult` with final metrics on the training and validation splits.

    Raises:
        NonFiniteError: the loss or the weights became NaN/Inf; the message names the first such
            step and the loss terms there, and the last good checkpoint is left in place. With
            ``cfg.on_nan="rollback"`` the run first goes back to its last good checkpoint (in
            memory) with half the learning rate, up to ``cfg.max_rollbacks`` times.
        RunInterrupted: SIGINT, SIGTERM or SIGHUP arrived; the run stopped after the step it was in
            and wrote a checkpoint there (``--resume`` continues bit for bit).
        ValueError: a checkpoint to resume was trained with other settings (each one is named), or
            the data or the weights cannot be trained on (the message says why).
        FileExistsError: ``run_dir`` holds another run (neither ``resume`` nor ``overwrite``).
        OSError: ``run_dir`` has too little free space for this run's checkpoints (before step 1).
        actsparse.checkpoint.CheckpointError: a checkpoint cannot be written (e.g. the disk
            filled up); the previous one is kept.
    """
    return _Run(cfg, x, run_dir, model, on_step).run(on_start)


class _Run:
    """One call of :func:`train`, one concern per method: ``__init__`` checks the data and builds
    the model; :meth:`begin` resumes (:meth:`resume` loads a checkpoint); :meth:`steps` yields
    the optimiser's steps (:meth:`loop`), calling :meth:`after_step` after each step, which logs
    (:meth:`record`), saves (:meth:`checkpoint`) and stops on a signal (:meth:`stop_if_signalled`);
    :meth:`rollback` goes back after a NaN; :meth:`result` evaluates the result
    (:meth:`final_metrics`). :meth:`run` does it all; :func:`train_together` interleaves the
    steps of several runs."""

    def __init__(self, cfg: TrainConfig, x, run_dir: Path | None, model: torch.nn.Module | None,
                 on_step: Callable[[dict[str, float]], None] | None) -> None:
        self.cfg, self.on_step = cfg, on_step
        self.rank, self.world_size = world()
        self.streaming = streaming = not isinstance(x, Tensor)  # read in minibatches, never whole
        if streaming and not isinstance(x, TrainingStream):
            raise TypeError(f"train() takes a (samples, features) tensor or a TrainingStream (a ShardStore, a "
                            f"ModelActivationStream: n_rows, d, sample(), epoch_batches()), got {type(x).__name__}")
        self._check_data(x)
        self.d_in = int(x.d) if streaming else x.shape[1]
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.g = torch.Generator().manual_seed(cfg.seed)
        if streaming:
            self.n_val, self.x_train, self.x_val = 0, x, None
        else:
            # the one definition of the split, which the report and the figures rebuild from the run folder
            val_idx, train_idx = split_indices(x.shape[0], cfg.validation, self.g)
            self.n_val = len(val_idx)
            # both splits are rows of the one copy of x, gathered a batch at a time (copied splits
            # would hold the data twice); the minibatches and the evaluations see the same rows in
            # the same order as in copies
            self.x_val, self.x_train = IndexedRows(x, val_idx), IndexedRows(x, train_idx)
            if self.x_train.shape[0] < 2:
                raise ValueError(f"--validation {cfg.validation:g} holds out {self.n_val} of {x.shape[0]} samples and "
                                 f"leaves {self.x_train.shape[0]} for training: lower --validation or give more data")
            if cfg.optimizer == "lbfgs":
                self.x_train = self.x_train.tensor().to(self.device)  # full batch: one copy, moved once
        self.total = planned_steps(cfg, x)
        if model is None:
            model = build_model(cfg, self.d_in).to(torch.float32 if streaming else x.dtype)
            self._check_decoder_range()
        self.model = model.to(self.device)
        self.writer = run_dir if self.rank == 0 else None  # only rank 0 writes files
        self.run_dir = run_dir
        if self.writer is not None:
            claim_run_dir(self.writer, resume=cfg.resume, overwrite=cfg.overwrite)
            check_free_space(self.writer, self.model, cfg.optimizer)
        self.forward = self.model
        self.lr_scale, self.rollbacks = 1.0, 0
        self.lbfgs_stalled_at: int | None = None  # the L-BFGS iteration after which nothing decreased
        self.last_good: dict[str, Any] | None = None  # the payload to roll back to (on_nan="rollback" only)
        self.log = _RunLog(self.writer / "metrics.jsonl" if self.writer is not None else None)
        self.guard = _FiniteGuard(self.world_size > 1)
        self.signals = StopSignals()
        self._any_rank_signalled = False  # under DDP: a signal seen by any rank at the last logged step
        # the logged FVU: Σ‖x − x̂‖² from the reconstruction loss the forward computed (no pass over
        # the data), over Σ‖x − x̄‖², computed once for full-batch L-BFGS (the same x every iteration)
        self.full_batch_total = M.total_variance(self.x_train) if cfg.optimizer == "lbfgs" else None
        self.recon_kind = getattr(self.model, "recon_loss", None)
        # --target-*: the controlled penalties (their coefficients are logged; L-BFGS steps them)
        self.controllers = [m for m in self.model.modules() if isinstance(m, TargetSparsity)]
        if cfg.optimizer == "lbfgs":
            for c in self.controllers:
                c.update_in_forward = False  # the line search evaluates several times per iteration
        self.start = time.perf_counter()

    # ---------------------------------------------------------------- checks before any work
    def _check_data(self, x) -> None:
        cfg = self.cfg
        if self.streaming:
            if cfg.optimizer == "lbfgs":
                raise ValueError("L-BFGS is full-batch: streamed activations (a shard store, a model) train with "
                                 "--optimizer adam or sgd")
        else:
            if x.dim() != 2 or x.shape[0] < 2:
                raise ValueError(f"training data must be (samples, features) with at least 2 samples, "
                                 f"got {tuple(x.shape)}")
            bad = count_not_finite(x)  # in chunks: a whole-array isfinite takes 1.25x the data in temporaries
            if bad:
                raise ValueError(f"training data contain {bad} NaN/Inf values")
        if self.world_size > 1 and cfg.optimizer == "lbfgs":
            raise ValueError(f"L-BFGS is full-batch and runs in one process; with {self.world_size} processes use "
                             "--optimizer adam or sgd")
        if self.world_size > 1 and cfg.batch_size < self.world_size:
            raise ValueError(f"--batch-size {cfg.batch_size} is the global batch: it must be at least the number of "
                             f"processes ({self.world_size})")

    def _check_decoder_range(self) -> None:
        """A sigmoid decoder outputs values in (0, 1): on data outside [0, 1] it cannot reconstruct
        (e.g. ZCA-whitened patches, in about [-1.3, 1.3]), and the run would end at FVU ≈ 1."""
        if self.cfg.decoder != "sigmoid":
            return
        x = self.x_train.sample(4096, seed=self.cfg.seed) if self.streaming else self.x_train
        parts = x.split(max(1, (1 << 20) // max(1, math.prod(x.shape[1:])))) if isinstance(x, IndexedRows) else (x,)
        lo, hi = math.inf, -math.inf
        for part in parts:
            lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
        if lo < 0 or hi > 1:
            raise ValueError(f"--decoder sigmoid outputs values in (0, 1), but the data lie in [{lo:.3g}, {hi:.3g}]: "
                             f"use --decoder linear (or data scaled to [0, 1]; for model activations, --recipe sae)")

    # ---------------------------------------------------------------- resume and rollback
    def resume(self) -> dict[str, Any] | None:
        """The checkpoint state to continue from (weights loaded), or None for a fresh run; checks
        that the weights are finite either way (NaN weights are not the data's fault)."""
        state = None
        if self.cfg.resume and self.run_dir is not None:
            state = load_resume_state(self.run_dir, self.model, self.cfg)
            self.lr_scale = float(state.get("lr_scale", 1.0))
            self.rollbacks = int(state.get("rollbacks", 0))
        bad = [name for name, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            where = "the checkpoint resumed" if state else "the model given"
            raise ValueError(f"the weights of {where} contain NaN/Inf before training ({', '.join(bad)}): "
                             "nothing can be learnt from them; start from a fresh model")
        if self.cfg.on_nan == "rollback":
            self.last_good = copy.deepcopy(state) if state else {
                "step": 0, "model": copy.deepcopy(self.model.state_dict()), "optimizer": None,
                "torch_rng": torch.get_rng_state(), "epoch": 0, "batch": 0, "g_epoch": self.g.get_state()}
        return state

    def rollback(self, err: NonFiniteError) -> dict[str, Any]:
        """After a non-finite step: re-raise with what was kept, or (``on_nan="rollback"``) return
        the last good state to continue from, with half the learning rate."""
        cfg = self.cfg
        saved = self.writer / CHECKPOINT if self.writer is not None else None
        kept = f"; the last good checkpoint {saved} is kept" if saved and saved.is_file() else ""
        if cfg.on_nan != "rollback" or self.last_good is None:
            hint = " (--on-nan rollback restarts from it with half the learning rate)" if kept else ""
            raise NonFiniteError(err.step, err.terms, f"{err}{kept}{hint}") from None
        if self.rollbacks >= cfg.max_rollbacks:
            raise NonFiniteError(err.step, err.terms, f"{err}, after {self.rollbacks} rollbacks "
                                 f"(--max-rollbacks){kept}") from None
        self.rollbacks += 1
        self.lr_scale *= 0.5
        how = ("L-BFGS's curvature pairs reset" if cfg.optimizer == "lbfgs"
               else f"learning rate {cfg.lr * self.lr_scale:g}")
        warnings.warn(f"{err}; rolling back to step {self.last_good['step']} with {how} "
                      f"(rollback {self.rollbacks} of {cfg.max_rollbacks})", TrainingWarning, stacklevel=3)
        # L-BFGS restarts its curvature pairs at the rolled-back point: the same pairs would take
        # the same step into the same blow-up
        state = copy.deepcopy(self.last_good) | ({"optimizer": None} if cfg.optimizer == "lbfgs" else {})
        self.model.load_state_dict(state["model"])
        torch.set_rng_state(state["torch_rng"])
        self.log.rewind(state["step"])
        return state

    # ---------------------------------------------------------------- after each step
    def record(self, step: int, out, xb: Tensor) -> None:
        """Log step ``step`` (after checking that no step since the last record was non-finite)."""
        self.guard.check()  # a non-finite step since the last record stops here, before it is logged
        code = out.code.detach()
        dead = getattr(self.model, "dead_mask", None)
        sse, total = self._sse_and_total(out, xb)
        means = {"loss": out.loss, "reconstruction": out.reconstruction_loss, "penalty": out.sparsity_loss,
                 "weight_decay": out.weight_decay_loss, "l0": M.l0(code), "mean_activation": code.mean()}
        means = {k: float(v.detach()) for k, v in means.items()}
        if self.world_size > 1:  # the log shows the global batch: means over the ranks' equal shares, summed SSE
            signalled = float(self.signals.signum is not None)
            both = torch.tensor([*means.values(), sse, total, signalled], dtype=torch.float64)
            torch.distributed.all_reduce(both)
            *values, sse, total, signalled = both.tolist()
            means = {k: v / self.world_size for k, v in zip(means, values)}
            self._any_rank_signalled = signalled > 0
        rec = {"step": step, **means, "fvu": M.fvu_ratio(sse, total),
               "fraction_dead": float(dead.double().mean()) if dead is not None else float("nan"),
               "seconds": time.perf_counter() - self.start}
        for c in self.controllers[:1]:  # --target-*: the coefficient (geometric mean per unit) and the statistic
            rec["coefficient"] = c.mean_coefficient
            rec["statistic"] = float(c.statistic.mean())
        if self.n_val and self.rank == 0 and self._validation_due(step):
            # the validation curve of loss.png: eval mode, no penalty, about 20 points a run
            rec["val_reconstruction"] = evaluate(self.model, self.x_val)["reconstruction"]
            rec["seconds"] = time.perf_counter() - self.start
        self.log.append(rec)
        if self.on_step is not None:
            self.on_step(rec)

    def _validation_due(self, step: int) -> bool:
        """Whether the record of ``step`` gets ``val_reconstruction``: about 20 times a run, on
        logged steps (every step of L-BFGS, every 10th minibatch step), and at the last step."""
        logged_every = 1 if self.cfg.optimizer == "lbfgs" else 10
        every = max(1, math.ceil(self.total / 20 / logged_every)) * logged_every
        return step % every == 0 or step == self.total

    def _sse_and_total(self, out, xb: Tensor) -> tuple[float, float]:
        if self.recon_kind is None:  # a model of the caller's with another loss: the direct formula
            return float((xb - out.reconstruction.detach()).square().sum()), float(M.total_variance(xb))
        total = self.full_batch_total if xb is self.x_train else M.total_variance(xb)
        sse = squared_error(float(out.reconstruction_loss.detach()), self.recon_kind, tuple(xb.shape))
        return sse, float(total)

    def checkpoint(self, step: int, opt, extra: dict[str, Any], *, force: bool = False) -> None:
        """Every ``checkpoint_every`` steps, after the last one (so a finished run can be extended
        with ``--resume --iterations N``), and when ``force``d (a signal): write the resumable
        checkpoint (rank 0) after checking that every step so far was finite."""
        cfg = self.cfg
        if not (force or step == self.total or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            return
        self.guard.check()  # never checkpoint after a non-finite step
        payload = {"step": step, "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
                   "lr_scale": self.lr_scale, "rollbacks": self.rollbacks, **extra}
        if self.writer is not None:
            save_checkpoint(self.writer, self.model, cfg, self.d_in, payload)
        else:
            check_weights_finite(self.model, step)
        if cfg.on_nan == "rollback":  # a copy: the optimiser's state tensors change in place
            self.last_good = copy.deepcopy(payload | {"model": self.model.state_dict()})

    def stop_if_signalled(self, step: int, opt, extra: dict[str, Any], logged: bool) -> None:
        """After a complete step: if SIGINT/SIGTERM/SIGHUP arrived, checkpoint here and raise
        :class:`RunInterrupted`. One process looks at its flag every step; under DDP the ranks
        look at the flag they all-reduced at the last logged step, so all stop at the same step."""
        if self.world_size > 1:
            if not (logged and self._any_rank_signalled):
                return
        elif self.signals.signum is None:
            return
        self.checkpoint(step, opt, extra, force=True)
        written = self.writer / CHECKPOINT if self.writer is not None else None
        raise RunInterrupted(self.signals.signum or signal.SIGTERM, step, written)

    def after_step(self, step: int, out, xb: Tensor, opt, extra: dict[str, Any], log_now: bool) -> None:
        self.guard.update(step, out)
        if log_now:
            self.record(step, out, xb)
        self.checkpoint(step, opt, extra)
        self.stop_if_signalled(step, opt, extra, log_now)

    # ---------------------------------------------------------------- the loops
    def loop(self, state: dict[str, Any] | None) -> Iterator[int]:
        """The optimiser's steps from ``state`` (None: the first), yielding each step's number once it is done."""
        return self._loop_lbfgs(state) if self.cfg.optimizer == "lbfgs" else self._loop_minibatch(state)

    def _loop_lbfgs(self, state: dict[str, Any] | None) -> Iterator[int]:
        # actsparse.lbfgs: one iteration per step (logged after each), one evaluation per iteration,
        # 100 stored pairs (minFunc's default, the CS294A exercise's optimiser), strong-Wolfe steps.
        model, x = self.model, self.x_train
        opt = LBFGS(model.parameters(), history=100, max_evals=25)
        first = 1
        if state is not None:
            if state.get("optimizer") is not None:
                opt.load_state_dict(state["optimizer"])
            first = state["step"] + 1

        def closure():
            out = model(x)
            out.loss.backward()
            return out.loss, out

        for it in range(first, self.cfg.iterations + 1):
            opt.step(closure)
            self.lbfgs_stalled_at = opt.stalled_at
            if self.controllers:  # --target-*: one coefficient update per iteration, from the accepted point
                for c in self.controllers:
                    c.step(opt.aux.code if len(self.controllers) == 1 else None)
                opt.objective_changed()
            self.after_step(it, opt.aux, x, opt, {}, True)  # opt.aux: the output at the accepted point
            yield it

    def _loop_minibatch(self, state: dict[str, Any] | None) -> Iterator[int]:
        cfg, model, g = self.cfg, self.model, self.g
        lr = cfg.lr * self.lr_scale
        opt = minibatch_optimizer(cfg.optimizer, parameter_groups(model, lr), lr)
        step, first_epoch, skip = 0, 0, 0
        if state is not None:
            if state.get("optimizer") is not None:
                opt.load_state_dict(state["optimizer"])
                for group in opt.param_groups:  # a rollback lowers the rate the saved state holds
                    group["lr"] = cfg.lr * self.lr_scale * group.get("lr_factor", 1.0)
            step, first_epoch, skip = state["step"], state["epoch"], state["batch"]
            g.set_state(state["g_epoch"])
        # dead-unit resampling (Bricken et al. 2023), e.g. SparseAutoencoder(resample_every=...)
        every = getattr(model, "resample_every", None) if hasattr(model, "resample_dead") else None
        if every and self.world_size > 1:
            raise ValueError("resample_every resamples from one process's batch: train in one process, or use AuxK")
        for epoch in range(first_epoch, cfg.epochs):
            g_epoch = g.get_state()  # enough to redraw this epoch's order on resume
            done = skip if epoch == first_epoch else 0
            for b, xb in _epoch_batches(self.x_train, epoch, g, cfg, self.rank, self.world_size, self.device, done):
                model.set_progress(step / self.total)
                decay = lr_decay_factor(step, self.total, getattr(cfg, "lr_decay", 0.0) or 0.0)
                for group in opt.param_groups:  # a function of the step alone: a resume sets the same rate
                    group["lr"] = cfg.lr * self.lr_scale * group.get("lr_factor", 1.0) * decay
                out = train_step(model, opt, xb, forward=self.forward, clip_grad=getattr(cfg, "clip_grad", None))
                step += 1
                if every and step % every == 0:  # the draw is seeded by (seed, step): a resumed run redraws it
                    model.resample_dead(xb, opt, generator=torch.Generator().manual_seed(
                        (cfg.seed * 1_000_003 + step) % 2**63))
                self.after_step(step, out, xb, opt, {"epoch": epoch, "batch": b + 1, "g_epoch": g_epoch},
                                step % 10 == 0 or step == self.total)
                yield step

    # ---------------------------------------------------------------- the whole run
    def run(self, on_start: Callable[[torch.nn.Module], None] | None) -> TrainResult:
        state = self.begin(on_start)
        with self.signals:
            for _ in self.steps(state):
                pass
        return self.result()

    def begin(self, on_start: Callable[[torch.nn.Module], None] | None) -> dict[str, Any] | None:
        """Before the first step: resume, wrap the model for DDP, call ``on_start``, rewind the
        log. Returns the state to continue from (None: a fresh run)."""
        state = self.resume()
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            sync_batch_statistics(self.model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=ids)
        if on_start is not None:
            on_start(self.model)
        self.log.rewind(state["step"] if state else 0)
        return state

    def steps(self, state: dict[str, Any] | None) -> Iterator[int]:
        """The run's steps from ``state``, rolling back after a NaN if the config says so, yielding
        each step's number once it is done (logged, checkpointed); the log is closed when the
        generator ends, however it ends. The caller holds :attr:`signals` around it."""
        try:
            while True:
                try:
                    yield from self.loop(state)
                    return
                except NonFiniteError as err:
                    state = self.rollback(err)
        finally:
            self.log.close()
            if self.world_size > 1:  # from here on each rank works alone (rank 0 evaluates)
                local_batch_statistics(self.model)

    def result(self) -> TrainResult:
        """After the last step: the final metrics, and the weights saved if no checkpoint did."""
        cfg = self.cfg
        history = self.log.records
        final = self.final_metrics(history)
        if self.writer is not None and not (self.writer / "model.safetensors").is_file():
            save_checkpoint(self.writer, self.model, cfg, self.d_in)
        return TrainResult(self.model, final, history, self.run_dir)

    def final_metrics(self, history: list[dict[str, float]]) -> dict[str, float]:
        cfg = self.cfg
        final: dict[str, float] = {"target": cfg.target, "seconds": time.perf_counter() - self.start,
                                   **({"coefficient": self.controllers[0].mean_coefficient}
                                      if self.controllers else {}),
                                   "steps": int(history[-1]["step"]) if history else 0, "rollbacks": self.rollbacks,
                                   "processes": self.world_size,
                                   **({"lbfgs_stalled_at": self.lbfgs_stalled_at} if self.lbfgs_stalled_at else {})}
        if self.rank == 0:  # the metrics are rank 0's to report; every rank holds the same weights
            # a streamed store is measured on a sample of its rows (it may not fit in memory)
            x = self.x_train.sample(STREAM_SAMPLE, seed=cfg.seed) if self.streaming else self.x_train
            n = getattr(cfg, "final_samples", None)
            if n is not None and n < x.shape[0]:  # --final-samples: a random subset (0: the validation split alone)
                pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[:n]
                x = x[pick.to(x.device)] if n else None
            # --final-samples 0: the final metrics are the validation split's (no pass over the training data)
            final = evaluate(self.model, x if x is not None else self.x_val) | final
            if self.n_val:
                val = evaluate(self.model, self.x_val)
                final |= {"val_reconstruction": val["reconstruction"], "val_fvu": val["fvu"]}
        return final


def train_together(cfgs: Sequence[TrainConfig], xs: Sequence[Any], *, run_dirs: Sequence[Path | None] | None = None,
                   on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[TrainResult]:
    """Several runs of :func:`train` in lockstep: step s of every run, then step s + 1 of every
    run... Each run is what :func:`train` of ``cfgs[i]`` on ``xs[i]`` (into ``run_dirs[i]``) gives,
    to the bit: only the order of the steps between runs changes. What it is for: streams that share
    their source read each part of it once, e.g. the layers of one model pass
    (:meth:`~actsparse.data.model_stream.ModelActivationStream.for_layers`: one forward per block
    serves every layer's SAE).

    ``on_step(i, record)`` is called with each logged record of run ``i``. A signal (SIGINT,
    SIGTERM, SIGHUP) stops every run after its step and checkpoints it there (:func:`train`'s
    rule); the :class:`RunInterrupted` of the first run is raised once all have stopped. Any other
    error stops them all, each keeping its last checkpoint.

    Returns:
        One :class:`TrainResult` per run, in order.
    """
    if len(cfgs) != len(xs) or (run_dirs is not None and len(run_dirs) != len(cfgs)):
        raise ValueError(f"train_together() takes as many data sources (and run folders) as configs, got {len(cfgs)} "
                         f"configs, {len(xs)} sources{'' if run_dirs is None else f', {len(run_dirs)} folders'}")
    dirs = list(run_dirs) if run_dirs is not None else [None] * len(cfgs)

    def reporter(i: int):
        return None if on_step is None else (lambda rec: on_step(i, rec))

    runs = [_Run(cfg, x, d, None, reporter(i)) for i, (cfg, x, d) in enumerate(zip(cfgs, xs, dirs))]
    signals = StopSignals()  # one handler: every run sees the signal, and each stops after its own step
    for r in runs:
        r.signals = signals
    stopped: RunInterrupted | None = None
    with contextlib.ExitStack() as stack:
        states = []
        for r in runs:
            states.append(r.begin(None))
            stack.callback(r.log.close)  # also if a later run cannot begin
        with signals:
            active = [stack.enter_context(contextlib.closing(r.steps(s))) for r, s in zip(runs, states)]
            while active:
                for gen in list(active):
                    try:
                        next(gen)
                    except StopIteration:
                        active.remove(gen)
                    except RunInterrupted as err:  # checkpointed: the others stop at their next step
                        stopped = stopped or err
                        active.remove(gen)
    if stopped is not None:
        raise stopped
    return [r.result() for r in runs]


def pretrain_greedy(stack, x: Tensor, cfg: TrainConfig) -> list[TrainResult]:
    """Greedy layer-wise pretraining of a :class:`~actsparse.models.StackedAutoencoder` (UFLDL).

    Layer i is trained as a one-layer sparse autoencoder (``cfg`` with ``hidden = sizes[i+1]`` and the
    stack's activation, which must be ``sigmoid`` or ``relu``) on
    the codes of layers < i; its encoder initialises the stack's encoder layer i and its decoder the
    mirrored decoder layer. Fine-tune afterwards with ``train(cfg, x, model=stack)``.
    """
    import dataclasses

    results = []
    h = x
    n = len(stack.encoder)
    for i, enc in enumerate(stack.encoder):
        # a --target-* holds the code (the last layer); the layers before it pretrain with the fixed --weight
        no_target = {name: None for name in cfg.CONTROL_FLAGS} | {"per_unit": False} if i < n - 1 else {}
        cfg_i = dataclasses.replace(cfg, model="sae", sizes=None, hidden=enc.out_features, validation=0.0,
                                    activation=stack.activation_name, checkpoint_every=0, **no_target)
        res = train(cfg_i, h, model=build_model(cfg_i, enc.in_features).to(x.dtype))
        sae = res.model
        dec = stack.decoder[n - 1 - i]
        with torch.no_grad():
            enc.weight.copy_(sae.W_enc)
            enc.bias.copy_(sae.b_enc)
            dec.weight.copy_(sae.decoder_weight)
            dec.bias.copy_(sae.b_dec)
            h = stack.act(enc(h))
        results.append(res)
    return results


def lr_decay_factor(step: int, total: int, fraction: float) -> float:
    """The learning-rate multiplier of step ``step`` (0-based) of ``total`` when the last
    ``fraction`` of the steps decay linearly to 0 (Conerly et al. 2024, "Circuits Updates — April
    2024": the last 20 %): 1 before, then ``(total − step) / (fraction · total)``."""
    if fraction <= 0 or total <= 0:
        return 1.0
    span = fraction * total
    return min(1.0, max(0.0, (total - step) / span))


def parameter_groups(model: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
    """``model``'s parameters as optimiser groups: one at ``lr``, and one per learning-rate multiplier
    that a submodule asks for in ``lr_scales()`` (``{parameter name: multiplier}``; a
    :class:`~actsparse.models.JumpReLU`'s threshold learns 10× faster). Pass the result to any
    ``torch.optim`` optimiser: ``torch.optim.Adam(parameter_groups(model, 1e-3))``."""
    scale: dict[int, float] = {}
    for module in model.modules():
        scales = getattr(module, "lr_scales", None)
        if callable(scales):
            for name, factor in scales().items():
                scale[id(getattr(module, name))] = float(factor)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for p in model.parameters():
        groups.setdefault(scale.get(id(p), 1.0), []).append(p)
    return [{"params": ps, "lr": lr * factor, "lr_factor": factor} for factor, ps in groups.items()]


def minibatch_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """``adam`` or ``sgd`` over ``params`` (parameters, or groups from :func:`parameter_groups`, each
    at its own lr). Adam is the fused kernel (one pass over each parameter instead of a dozen;
    bench/bench_dense_step.py measures the gain), where the parameters allow it."""
    params = list(params)
    if name == "adam":
        flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
        fused = all(p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) for p in flat)
        return torch.optim.Adam(params, lr=lr, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown minibatch optimizer {name!r}; choose 'adam' or 'sgd'")


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: Tensor, *,
               forward: torch.nn.Module | None = None, clip_grad: float | None = None):
    """One minibatch step on ``x`` ``(batch, d_in)``: forward, backward, and for unit-norm decoders
    the parallel-gradient removal before the update and the renormalisation after it.
    ``forward`` runs the model (default ``model``; e.g. its ``DistributedDataParallel`` wrapper).
    ``clip_grad``: clip the gradient's global norm at this value first (default None or 0: no clipping).
    Returns the :class:`~actsparse.models.ForwardOutput` (no host sync here)."""
    out = (forward or model)(x)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    if clip_grad:  # the global norm; under DDP the gradients are already averaged, so every rank agrees
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    unit_norm = getattr(model, "unit_norm_decoder", False)
    if unit_norm:
        model.remove_parallel_gradient()
    opt.step()
    if unit_norm:
        model.normalize_decoder()
    return out


def planned_steps(cfg: TrainConfig, x) -> int:
    """The steps a run of ``cfg`` on ``x`` takes: ``iterations`` for L-BFGS, else ``epochs`` times the
    batches of the training split (the data less ``validation``) of a tensor, or the whole batches
    of a streamed store (every rank takes the same steps)."""
    if cfg.optimizer == "lbfgs":
        return cfg.iterations
    if isinstance(x, Tensor):
        n_train = x.shape[0] - int(round(cfg.validation * x.shape[0]))
        return cfg.epochs * math.ceil(n_train / cfg.batch_size)
    if x.n_rows < cfg.batch_size:
        raise ValueError(f"the streamed data have {x.n_rows} rows: fewer than one batch of {cfg.batch_size}")
    return cfg.epochs * (x.n_rows // cfg.batch_size)


def _epoch_batches(x, epoch: int, g: torch.Generator, cfg: TrainConfig, rank: int, world_size: int,
                   device: torch.device, skip: int = 0):
    """This rank's minibatches of one epoch. ``--batch-size`` is the global batch, drawn the same way
    on every rank (from ``g`` in memory; from ``(seed, epoch)`` for a :class:`TrainingStream`) and
    split into ``world_size`` near-equal parts: N processes see exactly the samples one process
    would, and each reads only its own part. The first ``skip`` batches (done before a resume) are
    not read (a stream skips them without making them). In memory (a tensor, or the rows of one:
    :class:`~actsparse.data.IndexedRows`) each batch is gathered from the data when it is reached.
    Yields ``(batch index, batch)``."""
    if isinstance(x, (Tensor, IndexedRows)):
        for b, idx in enumerate(torch.randperm(x.shape[0], generator=g).split(cfg.batch_size)):
            if b >= skip:
                part = idx.tensor_split(world_size)[rank]
                xb = x[part] if isinstance(x, Tensor) else x.gather(part)
                yield b, xb.to(device, non_blocking=True)
    else:
        for b, xb in x.epoch_batches(cfg.batch_size, seed=cfg.seed, epoch=epoch, rank=rank, world_size=world_size,
                                     skip=skip):
            yield b, xb.to(device, non_blocking=True)
