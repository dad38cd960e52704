"""Evaluation of a trained autoencoder: one eval-mode pass over the data, in batches.

One definition of ρ̂ serves the whole run: the mean activation of each unit over the run's
**training split** in eval mode, as :func:`evaluate` computes it for ``metrics.json``
(``mean_activation`` is the mean of these ρ̂_j). :func:`training_split` recomputes that split
from the run's data and config alone, so the figures and ``actsparse report`` show the same
numbers as ``metrics.json``."""

from __future__ import annotations

import torch
from torch import Tensor

from . import metrics as M
from .models.sparse_topk import SparseCode

__all__ = ["evaluate", "unit_statistics", "split_indices", "training_split", "penalty_target",
           "ground_truth_metrics", "GROUND_TRUTH_EVAL_SAMPLES", "prefix_report"]

#: Fresh samples drawn from a ground-truth generator to score feature detection (F1).
GROUND_TRUTH_EVAL_SAMPLES = 20_000


@torch.no_grad()
def _eval_pass(model: torch.nn.Module, x: Tensor, batch_size: int, threshold: float | None = None
               ) -> tuple[dict[str, float], Tensor, Tensor]:
    """One eval-mode pass over ``x`` in batches (memory of one batch, sums in float64, statistics of
    this process only): the metrics of :func:`evaluate`, and ρ̂ and the firing fraction per unit,
    from which L0, the mean activation and the dead fraction follow. With ``threshold``, the
    "firing" count is of activations > ``threshold`` instead of ≠ 0 (and so are L0 and the dead
    fraction)."""
    from .distributed import local_statistics
    from .models.sparse_topk import unit_sums

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    recon = penalty = sse = 0.0
    sums = counts = None
    try:
        with local_statistics(model):
            for xb in x.split(batch_size):
                xd = xb.to(device)
                out = model(xd)
                recon += float(out.reconstruction_loss) * xb.shape[0]
                penalty += float(out.sparsity_loss) * xb.shape[0]
                sse += float((out.reconstruction.double() - xd.double()).square().sum())
                code = out.code
                if isinstance(code, SparseCode):
                    on = code.values != 0 if threshold is None else code.values > threshold
                    s = unit_sums(code.indices, code.values.double(), code.d_sae)
                    c = unit_sums(code.indices, on.double(), code.d_sae)
                else:
                    on = code != 0 if threshold is None else code > threshold
                    s, c = code.double().sum(0), on.double().sum(0)
                sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    finally:
        model.train(was_training)
    n = x.shape[0]
    rho, firing = sums / n, counts / n
    metrics = {
        "reconstruction": recon / n,
        "penalty": penalty / n,
        "fvu": M.fvu_ratio(sse, float(M.total_variance(x))),  # NaN: data with no variance
        "l0": float(firing.sum()),
        "mean_activation": float(rho.mean()),
        "fraction_dead": float((firing == 0).double().mean()),
    }
    return metrics, rho, firing


def evaluate(model: torch.nn.Module, x: Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Metrics of ``model`` on ``x`` ``(n, d_in)``, in eval mode: reconstruction loss, FVU, L0,
    ρ̂ (mean over units, target), penalty value, and the fraction of units that never fired.
    Memory is one batch's: nothing of size ``(n, d_hidden)`` is kept."""
    return _eval_pass(model, x, batch_size)[0]


def unit_statistics(model: torch.nn.Module, x: Tensor, batch_size: int = 4096,
                    threshold: float | None = None) -> tuple[Tensor, Tensor]:
    """ρ̂_j (the mean activation) and the firing fraction (share of samples where unit j ≠ 0) of each
    unit of ``model``'s code on ``x`` ``(n, d_in)``, from the pass of :func:`evaluate`: two
    ``(d_hidden,)`` float64 tensors on the CPU. A unit is dead on ``x`` where its firing fraction is 0.

    ``threshold``: count activations > ``threshold`` instead of ≠ 0, e.g. 0.5 for sigmoid units,
    which are never exactly 0 (their firing fraction ≠ 0 is 1 for every unit). ρ̂ is the same."""
    _, rho, firing = _eval_pass(model, x, batch_size, threshold)
    return rho.cpu(), firing.cpu()


def split_indices(n: int, validation: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The validation and training rows of an in-memory data set of ``n`` samples, as
    :func:`actsparse.train.train` draws them: one ``randperm(n)`` from ``generator`` (the run's
    generator, seeded with ``cfg.seed`` and not used before), the first ``round(validation · n)``
    held out. The training rows keep the permuted order (the order of the batches evaluated)."""
    perm = torch.randperm(n, generator=generator)
    n_val = int(round(validation * n))
    return perm[:n_val], perm[n_val:]


def training_split(data, cfg):
    """The samples ``metrics.json`` was computed on, recomputed from the run's data and config
    alone: for an in-memory data set (``data.x``), the training split that ``train`` draws with
    ``cfg.seed`` and ``cfg.validation`` (:func:`split_indices`), as the rows of ``data.x`` it
    holds (:class:`~actsparse.data.IndexedRows`: not a copy); for a streamed store, ``data.x``,
    the sample of the store that the run's metrics use. ``data`` is what
    :func:`actsparse.data.load_data` returns for ``cfg``."""
    from .data import IndexedRows

    if getattr(data, "stream", None) is not None:
        return data.x
    _, train_idx = split_indices(data.x.shape[0], cfg.validation, torch.Generator().manual_seed(cfg.seed))
    return IndexedRows(data.x, train_idx)


def penalty_target(model: torch.nn.Module) -> tuple[float, str] | None:
    """The target ρ of ``model``'s sparsity penalty and what it is a target for: ``"mean
    activation"`` (the KL penalties on ρ̂: ``kl``, ``poisson_kl``) or ``"firing frequency"``
    (``frequency_kl``: the share of samples where a unit's activation exceeds its threshold).
    With ``toward``: the statistic it holds, ``mean`` or ``rate`` (an ``l0`` target counts units
    per sample, not a value per unit: None). None without a penalty or for a penalty without a
    target (L1, L2, Hoyer)."""
    from .penalties import FrequencyKL

    pen = getattr(model, "penalty", None)
    pens = getattr(model, "penalties", None)
    if pen is None and isinstance(pens, (dict, torch.nn.ModuleDict)) and len(pens):
        pen = list(pens.values())[-1]  # a stacked model: the penalty on its code layer
    from .control import TargetSparsity

    if isinstance(pen, TargetSparsity):  # --target-*: the statistic it holds (an L0 is no per-unit target)
        kind = {"mean": "mean activation", "rate": "firing frequency"}.get(pen.statistic_name)
        return (float(pen.target), kind) if kind else None
    target = getattr(pen, "target", None)
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        return None
    return float(target), "firing frequency" if isinstance(pen, FrequencyKL) else "mean activation"


@torch.no_grad()
def ground_truth_metrics(model: torch.nn.Module, data, seed: int = 0) -> dict[str, float] | None:
    """How well a one-layer SAE's dictionary recovers the data's known features, or None when the
    data have none (or the model is not a one-layer SAE).

    Always: ``mmcs`` (:func:`~actsparse.metrics.mmcs`) and ``mcc`` (one-to-one Hungarian
    matching, :func:`~actsparse.metrics.mcc`) of the decoder atoms against ``data.true_features``.
    With true codes — fresh samples from ``data.truth`` (:data:`GROUND_TRUTH_EVAL_SAMPLES`, seed
    ``seed + 1``: held out from training) or the ``true_codes`` saved with the data — also
    ``f1``, ``precision``, ``recall`` of feature detection (:func:`~actsparse.metrics.feature_f1`,
    SynthSAEBench's rule), ``variance_explained``, ``heldout_l0``, ``true_l0`` (of the true codes)
    and ``dead_latents``/``dense_latents``
    (:func:`~actsparse.metrics.latent_usage`) on those samples, in eval mode."""
    if getattr(data, "true_features", None) is None or not hasattr(model, "atoms"):
        return None
    atoms = model.atoms.detach().float().cpu()
    truth = data.true_features.float().cpu()
    out: dict[str, float] = {"mmcs": float(M.mmcs(truth, atoms))}
    if getattr(data, "truth", None) is not None:
        x, codes = data.truth.sample(GROUND_TRUTH_EVAL_SAMPLES, seed + 1)
    elif getattr(data, "true_codes", None) is not None:
        x, codes = data.x[:GROUND_TRUTH_EVAL_SAMPLES], data.true_codes[:GROUND_TRUTH_EVAL_SAMPLES]
    else:
        return out | {"mcc": float(M.mcc(truth, atoms))}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = model.atoms.dtype
    try:
        parts = [model(xb.to(device, dtype)) for xb in x.split(4096)]
    finally:
        model.train(was_training)
    code = torch.cat([(p.code.to_dense() if isinstance(p.code, SparseCode) else p.code).float().cpu() for p in parts])
    x_hat = torch.cat([p.reconstruction.float().cpu() for p in parts])
    f1 = M.feature_f1(codes, code, truth, atoms, threshold=0.0)
    usage = M.latent_usage(code)
    out |= {"mcc": f1["mcc"], "f1": f1["f1"], "precision": f1["precision"], "recall": f1["recall"],
            "variance_explained": float(M.variance_explained(x, x_hat)), "heldout_l0": usage["l0"],
            "dead_latents": usage["dead"], "dense_latents": usage["dense"],
            "true_l0": float((codes != 0).sum(1).double().mean())}
    return out


@torch.no_grad()
def prefix_report(model: torch.nn.Module, x: Tensor, limit: int = GROUND_TRUTH_EVAL_SAMPLES) -> dict[str, float]:
    """A Matryoshka SAE's per-prefix FVU and L0 on the first ``limit`` rows of ``x`` ``(n, d_in)``,
    as flat ``metrics.json`` keys ``prefix_<m>_fvu`` and ``prefix_<m>_l0``; ``{}`` for other models."""
    if not getattr(model, "matryoshka", None) or not hasattr(model, "prefix_metrics"):
        return {}
    device = next(model.parameters()).device
    rows = model.prefix_metrics(x[:limit].to(device, model.W_enc.dtype))
    return {f"prefix_{r['size']}_{key}": r[key] for r in rows for key in ("fvu", "l0")}
