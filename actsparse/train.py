"""Training loop: full-batch L-BFGS (the CS294A exercise) and minibatch optimisers.

The loss is the model's :class:`~actsparse.models.ForwardOutput` ``.loss`` (reconstruction +
weight decay + sparsity penalty + AuxK); the validation loss is reported without the penalty.
Math lives in the model and the penalties; this module only loops, logs and saves.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import metrics as M
from .config import TrainConfig
from .lbfgs import LBFGS
from .models import SparseAutoencoder, StackedAutoencoder
from .models.sae import squared_error
from .models.sparse_topk import SparseCode
from .penalties import get_penalty

__all__ = ["build_model", "train", "train_step", "minibatch_optimizer", "pretrain_greedy", "TrainResult", "evaluate",
           "save_checkpoint", "load_checkpoint"]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message names the step."""


def build_model(cfg: TrainConfig, d_in: int) -> torch.nn.Module:
    """The autoencoder a config describes, for inputs of size ``d_in``: a
    :class:`~actsparse.models.SparseAutoencoder`, or a :class:`~actsparse.models.StackedAutoencoder`
    for ``model="stacked"``."""
    penalty = None
    if cfg.penalty is not None:
        kwargs: dict[str, Any] = {"weight": cfg.weight}
        if cfg.penalty.lower().replace("-", "_") in ("kl", "bernoulli_kl", "poisson_kl", "frequency_kl"):
            kwargs["target"] = cfg.target
        penalty = get_penalty(cfg.penalty, **kwargs)
    recon = "half_sse" if cfg.activation == "sigmoid" else "mse"
    if cfg.model == "stacked":
        sizes = [d_in, *cfg.sizes]
        return StackedAutoencoder(sizes, cfg.activation, output=cfg.decoder, weight_decay=cfg.weight_decay,
                                  recon_loss=recon, penalties={len(sizes) - 2: penalty} if penalty else None)
    modern = cfg.activation in ("topk", "batchtopk", "jumprelu")
    return SparseAutoencoder(
        d_in, cfg.hidden, cfg.activation, k=cfg.k, decoder=cfg.decoder, tied=cfg.tied, penalty=penalty,
        weight_decay=cfg.weight_decay, recon_loss=recon,
        unit_norm_decoder=modern, init="orthogonal_tied" if modern else "ufldl", auxk=cfg.auxk, decode=cfg.decode,
    )


@torch.no_grad()
def evaluate(model: SparseAutoencoder, x: Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Metrics of ``model`` on ``x`` ``(n, d_in)``, in eval mode: reconstruction loss, FVU, L0,
    ρ̂ (mean over units, target), penalty value, and the fraction of units that never fired."""
    was_training = model.training
    model.eval()
    recon, penalty, n = 0.0, 0.0, 0
    codes, recons = [], []
    for xb in x.split(batch_size):
        out = model(xb)
        recon += float(out.reconstruction_loss) * xb.shape[0]
        penalty += float(out.sparsity_loss) * xb.shape[0]
        n += xb.shape[0]
        codes.append(out.code.to_dense() if isinstance(out.code, SparseCode) else out.code)
        recons.append(out.reconstruction)
    model.train(was_training)
    code, x_hat = torch.cat(codes), torch.cat(recons)
    rho = code.double().mean(0)
    return {
        "reconstruction": recon / n,
        "penalty": penalty / n,
        "fvu": float(M.fvu(x, x_hat)),
        "l0": float(M.l0(code)),
        "mean_activation": float(rho.mean()),
        "fraction_dead": float((code != 0).sum(0).eq(0).double().mean()),
    }


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)  # atomic on POSIX: a reader sees the old file or the new one


def save_checkpoint(run_dir: Path, model: torch.nn.Module, cfg: TrainConfig, d_in: int,
                    trainer_state: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` and ``config.json`` (and ``trainer_state.pt`` when training is
    to be resumable: optimiser state, step, RNG states), each atomically (write, then rename).

    The step is stored in both the weights' metadata and the trainer state, so a resume can tell
    whether the two files belong together."""
    from safetensors.torch import save_file

    step = str(trainer_state["step"]) if trainer_state else "final"
    if trainer_state is not None:
        _atomic_write(run_dir / "trainer_state.pt", lambda p: torch.save(trainer_state, p))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(run_dir / "model.safetensors", lambda p: save_file(state, str(p), metadata={"step": step}))
    cfg_dict = cfg.to_dict() | {"d_in": d_in}
    _atomic_write(run_dir / "config.json", lambda p: p.write_text(json.dumps(cfg_dict, indent=2) + "\n"))


def _load_trainer_state(run_dir: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Weights and trainer state of an interrupted run, checked to belong to the same step."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = run_dir / "model.safetensors"
    try:
        state = torch.load(run_dir / "trainer_state.pt", map_location="cpu", weights_only=True)
        with safe_open(str(weights), "pt") as f:
            step = (f.metadata() or {}).get("step")
        model.load_state_dict(load_file(str(weights)))
    except Exception as err:
        raise ValueError(f"cannot resume from {run_dir}: damaged checkpoint ({err})") from err
    if step != str(state["step"]):
        raise ValueError(f"cannot resume from {run_dir}: model.safetensors is from step {step}, "
                         f"trainer_state.pt from step {state['step']}")
    return state


def load_checkpoint(run_dir: str | Path) -> tuple[SparseAutoencoder, TrainConfig]:
    """Rebuild the model of a run folder from its ``config.json`` and ``model.safetensors``."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    for name in ("config.json", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} is missing: is {run_dir} an actsparse run folder?")
    values = json.loads((run_dir / "config.json").read_text())
    d_in = int(values.pop("d_in"))
    cfg = TrainConfig(**values)
    model = build_model(cfg, d_in)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    return model, cfg


@dataclass
class TrainResult:
    """What :func:`train` returns: the model, final metrics and the per-step history."""

    model: SparseAutoencoder
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    run_dir: Path | None = None


def _check_finite(step: int, out) -> None:
    if not math.isfinite(float(out.loss.detach())):
        terms = {k: float(getattr(out, k).detach()) for k in ("reconstruction_loss", "sparsity_loss",
                                                       "weight_decay_loss", "auxk_loss")}
        raise TrainingError(f"the loss became non-finite at step {step}: {terms}")


def train(
    cfg: TrainConfig,
    x: Tensor,
    *,
    run_dir: Path | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    model: torch.nn.Module | None = None,
) -> TrainResult:
    """Train the autoencoder ``cfg`` describes on ``x`` ``(n, d_in)``.

    Args:
        cfg: the run's configuration (optimizer, iterations/epochs, model, penalty, seed).
        x: training data, float, ``(n, d_in)``; ``cfg.validation`` of it is held out.
        run_dir: if given, ``metrics.jsonl`` (one line per logged step) and the checkpoint
            (``model.safetensors`` + ``config.json``) are written there.
        on_step: called with each logged record (the CLI's progress bar uses it).
        model: train this model instead of the one ``cfg`` describes (any module whose forward
            returns a :class:`~actsparse.models.ForwardOutput`; e.g. a stack being fine-tuned).

    Returns:
        A :class:`TrainResult` with final metrics on the training and validation splits.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"training data must be (samples, features) with at least 2 samples, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"training data contain {int((~torch.isfinite(x)).sum())} NaN/Inf values")
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_val = int(round(cfg.validation * x.shape[0]))
    x_val, x_train = x[perm[:n_val]], x[perm[n_val:]]
    if model is None:
        model = build_model(cfg, x.shape[1]).to(x.dtype)
    resume = None
    if cfg.resume and run_dir is not None and (run_dir / "trainer_state.pt").is_file():
        resume = _load_trainer_state(run_dir, model)
        torch.set_rng_state(resume["torch_rng"])
    history: list[dict[str, float]] = []
    log_file = None
    if run_dir is not None:
        log_path = run_dir / "metrics.jsonl"
        if resume is not None and log_path.is_file():  # keep the log up to the checkpoint's step
            history = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
            history = [h for h in history if h["step"] <= resume["step"]]
            log_path.write_text("".join(json.dumps(h) + "\n" for h in history))
        log_file = open(log_path, "a")  # noqa: SIM115
    start = time.perf_counter()

    # the logged FVU: Σ‖x − x̂‖² from the reconstruction loss the forward computed (no pass over
    # the data), over Σ‖x − x̄‖², computed once for full-batch L-BFGS (the same x every iteration)
    full_batch_total = M.total_variance(x_train) if cfg.optimizer == "lbfgs" else None
    recon_kind = getattr(model, "recon_loss", None)

    def logged_fvu(out, xb: Tensor) -> float:
        if recon_kind is None:  # a model of the caller's with another loss: the direct formula
            return float(M.fvu(xb, out.reconstruction.detach()))
        total = full_batch_total if xb is x_train else M.total_variance(xb)
        sse = squared_error(float(out.reconstruction_loss.detach()), recon_kind, tuple(xb.shape))
        return sse / max(float(total), torch.finfo(torch.float64).tiny)

    def record(step: int, out, xb: Tensor) -> None:
        code = out.code.detach()
        dead = getattr(model, "dead_mask", None)
        rec = {"step": step, "loss": float(out.loss.detach()),
               "reconstruction": float(out.reconstruction_loss.detach()),
               "penalty": float(out.sparsity_loss.detach()), "weight_decay": float(out.weight_decay_loss.detach()),
               "fvu": logged_fvu(out, xb),
               "l0": float(M.l0(code)), "mean_activation": float(code.mean()),
               "fraction_dead": float(dead.double().mean()) if dead is not None else float("nan"),
               "seconds": time.perf_counter() - start}
        history.append(rec)
        if log_file is not None:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
        if on_step is not None:
            on_step(rec)

    def checkpoint(step: int, opt: torch.optim.Optimizer, extra: dict[str, Any], last: bool) -> None:
        # every `checkpoint_every` steps, and always after the last one (so a finished run can
        # be extended with --resume --iterations N)
        if run_dir is not None and (last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            save_checkpoint(run_dir, model, cfg, x.shape[1], {"step": step, "optimizer": opt.state_dict(),
                                                              "torch_rng": torch.get_rng_state(), **extra})

    try:
        if cfg.optimizer == "lbfgs":
            _train_lbfgs(cfg, model, x_train, record, checkpoint, resume)
        else:
            _train_minibatch(cfg, model, x_train, g, record, checkpoint, resume)
    finally:
        if log_file is not None:
            log_file.close()
    seconds = time.perf_counter() - start
    final = evaluate(model, x_train)
    final |= {"target": cfg.target, "seconds": seconds, "steps": int(history[-1]["step"]) if history else 0}
    if n_val:
        val = evaluate(model, x_val)
        final |= {"val_reconstruction": val["reconstruction"], "val_fvu": val["fvu"]}
    if run_dir is not None and not (run_dir / "model.safetensors").is_file():
        save_checkpoint(run_dir, model, cfg, x.shape[1])  # e.g. resumed a run that had already finished
    return TrainResult(model, final, history, run_dir)


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
        cfg_i = dataclasses.replace(cfg, model="sae", sizes=None, hidden=enc.out_features, validation=0.0,
                                    activation=stack.activation_name, checkpoint_every=0)
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


def _train_lbfgs(cfg: TrainConfig, model, x: Tensor, record, checkpoint, resume) -> None:
    # actsparse.lbfgs: one iteration per step (logged after each), one evaluation per iteration,
    # 100 stored pairs (minFunc's default, the CS294A exercise's optimiser), strong-Wolfe steps.
    opt = LBFGS(model.parameters(), history=100, max_evals=25)
    first = 1
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        first = resume["step"] + 1

    def closure():
        out = model(x)
        out.loss.backward()
        return out.loss, out

    for it in range(first, cfg.iterations + 1):
        opt.step(closure)
        _check_finite(it, opt.aux)  # the output at the accepted point
        record(it, opt.aux, x)
        checkpoint(it, opt, {}, it == cfg.iterations)


def minibatch_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """``adam`` or ``sgd`` over ``params``. Adam is the fused kernel (one pass over each parameter
    instead of a dozen; bench/bench_dense_step.py measures the gain), where the parameters allow it."""
    params = list(params)
    if name == "adam":
        fused = all(p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) for p in params)
        return torch.optim.Adam(params, lr=lr, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown minibatch optimizer {name!r}; choose 'adam' or 'sgd'")


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: Tensor):
    """One minibatch step on ``x`` ``(batch, d_in)``: forward, backward, and for unit-norm decoders
    the parallel-gradient removal before the update and the renormalisation after it.
    Returns the :class:`~actsparse.models.ForwardOutput` (no host sync here)."""
    out = model(x)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    unit_norm = getattr(model, "unit_norm_decoder", False)
    if unit_norm:
        model.remove_parallel_gradient()
    opt.step()
    if unit_norm:
        model.normalize_decoder()
    return out


def _train_minibatch(cfg: TrainConfig, model, x: Tensor, g: torch.Generator, record, checkpoint, resume) -> None:
    opt = minibatch_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    steps_per_epoch = math.ceil(x.shape[0] / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    step, first_epoch, skip = 0, 0, 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        step, first_epoch, skip = resume["step"], resume["epoch"], resume["batch"]
        g.set_state(resume["g_epoch"])
    for epoch in range(first_epoch, cfg.epochs):
        g_epoch = g.get_state()  # enough to redraw this epoch's order on resume
        for b, idx in enumerate(torch.randperm(x.shape[0], generator=g).split(cfg.batch_size)):
            if epoch == first_epoch and b < skip:
                continue
            model.set_progress(step / total)
            out = train_step(model, opt, x[idx])
            step += 1
            if step % 10 == 0 or step == total:
                _check_finite(step, out)
                record(step, out, x[idx])
            checkpoint(step, opt, {"epoch": epoch, "batch": b + 1, "g_epoch": g_epoch}, step == total)
