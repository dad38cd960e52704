"""Sparse-autoencoder metrics (GUIDE §3). Inputs are tensors; outputs are tensors or floats.

* FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² (fraction of variance unexplained).
* L0 = mean number of non-zero units per sample.
* dead fraction = fraction of units that have not fired in the last N samples (tracked by the model).
* MMCS = mean over true features g of max_d cos(f_g, d_d) (Sharkey et al.).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .models.sparse_topk import SparseCode

__all__ = ["fvu", "total_variance", "l0", "mmcs", "rho_hat_summary"]


def total_variance(x: Tensor) -> Tensor:
    """``Σ‖x − x̄‖²`` in float64, the denominator of the FVU; x: ``(batch, d_in)``."""
    x = x.double()
    return (x - x.mean(0)).square().sum()


def fvu(x: Tensor, x_hat: Tensor, total: Tensor | None = None) -> Tensor:
    """Fraction of variance unexplained, ``Σ‖x − x̂‖² / Σ‖x − x̄‖²``, in float64; x, x̂: ``(batch, d_in)``.

    ``total``: :func:`total_variance` of ``x`` if already known (the trainer logs the same full
    batch every L-BFGS iteration)."""
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    if total is None:
        total = total_variance(x)
    diff = x_hat.to(torch.float64, copy=True).sub_(x).reshape(-1)  # a copy: never write into the caller's x̂
    return torch.dot(diff, diff) / total.clamp_min(torch.finfo(torch.float64).tiny)


def l0(code: Tensor | SparseCode) -> Tensor:
    """Mean number of non-zero units per sample; code: ``(batch, d_hidden)`` or a SparseCode."""
    if isinstance(code, SparseCode):
        code = code.values  # its indices are distinct within a row: count the non-zero values
    samples = code.numel() // code.shape[-1] if code.shape[-1] else 0
    return torch.count_nonzero(code).double() / samples  # one pass, no (batch, d_hidden) bool


def mmcs(true_features: Tensor, learned: Tensor) -> Tensor:
    """Mean max cosine similarity: for each true feature (a row of ``true_features``
    ``(n_true, d)``), the best cosine with any learned atom (a row of ``learned`` ``(n_learned, d)``),
    averaged over true features."""
    if true_features.shape[-1] != learned.shape[-1]:
        raise ValueError(f"feature sizes differ: {true_features.shape[-1]} vs {learned.shape[-1]}")
    t = torch.nn.functional.normalize(true_features.double(), dim=-1)
    d = torch.nn.functional.normalize(learned.double(), dim=-1)
    return (t @ d.t()).max(dim=1).values.mean()


def rho_hat_summary(code: Tensor) -> dict[str, float]:
    """Mean, min and max over units of ρ̂_j, the mean activation of each unit; code ``(batch, d)``."""
    r = code.double().mean(0)
    return {"mean": float(r.mean()), "min": float(r.min()), "max": float(r.max())}
