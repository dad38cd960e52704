"""Evaluation of a trained autoencoder: one eval-mode pass over the data, in batches."""

from __future__ import annotations

import torch
from torch import Tensor

from . import metrics as M
from .models.sparse_topk import SparseCode

__all__ = ["evaluate", "unit_statistics"]


@torch.no_grad()
def _eval_pass(model: torch.nn.Module, x: Tensor, batch_size: int) -> tuple[dict[str, float], Tensor, Tensor]:
    """One eval-mode pass over ``x`` in batches (memory of one batch, sums in float64, statistics of
    this process only): the metrics of :func:`evaluate`, and ρ̂ and the firing fraction per unit,
    from which L0, the mean activation and the dead fraction follow."""
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
                    s = unit_sums(code.indices, code.values.double(), code.d_sae)
                    c = unit_sums(code.indices, (code.values != 0).double(), code.d_sae)
                else:
                    s, c = code.double().sum(0), (code != 0).double().sum(0)
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


def unit_statistics(model: torch.nn.Module, x: Tensor, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """ρ̂_j (the mean activation) and the firing fraction (share of samples where unit j ≠ 0) of each
    unit of ``model``'s code on ``x`` ``(n, d_in)``, from the pass of :func:`evaluate`: two
    ``(d_hidden,)`` float64 tensors on the CPU. A unit is dead on ``x`` where its firing fraction is 0."""
    _, rho, firing = _eval_pass(model, x, batch_size)
    return rho.cpu(), firing.cpu()
