"""Sparse-autoencoder metrics. Inputs are tensors; outputs are tensors or floats.

* FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² (fraction of variance unexplained).
* L0 = mean number of non-zero units per sample.
* dead fraction = fraction of units that have not fired in the last N samples (tracked by the model).
* MMCS = mean over true features g of max_d cos(f_g, d_d) (Sharkey et al.).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .models.sparse_topk import SparseCode

__all__ = ["fvu", "fvu_ratio", "total_variance", "l0", "mmcs", "rho_hat_summary"]


def _check(name: str, t: object, *, dims: int | None = None, what: str = "") -> None:
    """A real, non-empty tensor (of ``dims`` dimensions if given); shape and dtype only, no host sync."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor{what}, got {type(t).__name__}")
    if t.is_complex():
        raise TypeError(f"{name} must be a real tensor, got dtype {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {what.strip() or f'{dims}-D'}, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")


def total_variance(x: Tensor, chunk: int = 16384) -> Tensor:
    """``Σ‖x − x̄‖²`` in float64, the denominator of the FVU; x: ``(batch, d_in)``. Two passes (the
    mean, then the squares about it), ``chunk`` rows at a time, so no float64 copy of a large x."""
    _check("x", x)
    mean = x.sum(0, dtype=torch.float64) / x.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for xb in x.split(chunk):
        total += (xb.double() - mean).square().sum()
    return total


def fvu(x: Tensor, x_hat: Tensor, total: Tensor | None = None) -> Tensor:
    """Fraction of variance unexplained, ``Σ‖x − x̂‖² / Σ‖x − x̄‖²``, in float64; x, x̂: ``(batch, d_in)``.

    ``total``: :func:`total_variance` of ``x`` if already known (the trainer logs the same full
    batch every L-BFGS iteration). NaN where ``x`` has no variance (the ratio is undefined)."""
    _check("x", x)
    _check("x_hat", x_hat)
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    if total is None:
        total = total_variance(x)
    diff = x_hat.to(torch.float64, copy=True).sub_(x).reshape(-1)  # a copy: never write into the caller's x̂
    sse = torch.dot(diff, diff)
    # data with no variance (every sample equal): the FVU is undefined, NaN, not sse / tiny ≈ 1e308
    return torch.where(total > 0, sse / total.clamp_min(torch.finfo(torch.float64).tiny), float("nan"))


def fvu_ratio(sse: float, total: float) -> float:
    """``sse / total`` as floats: the FVU from its two sums, NaN (undefined) when ``total`` is 0."""
    return sse / total if total > 0 else float("nan")


def l0(code: Tensor | SparseCode) -> Tensor:
    """Mean number of non-zero units per sample; code: ``(batch, d_hidden)`` or a SparseCode."""
    if isinstance(code, SparseCode):
        code = code.values  # its indices are distinct within a row: count the non-zero values
    if not isinstance(code, Tensor):
        raise TypeError(f"code must be a tensor (batch, d_hidden) or a SparseCode, got {type(code).__name__}")
    if code.dim() == 0:
        raise ValueError("code must be (batch, d_hidden), got a 0-d tensor")
    if code.numel() == 0:
        raise ValueError(f"code is empty (shape {tuple(code.shape)}): no samples or no units to count")
    samples = code.numel() // code.shape[-1] if code.shape[-1] else 0
    return torch.count_nonzero(code).double() / samples  # one pass, no (batch, d_hidden) bool


def mmcs(true_features: Tensor, learned: Tensor) -> Tensor:
    """Mean max cosine similarity: for each true feature (a row of ``true_features``
    ``(n_true, d)``), the best cosine with any learned atom (a row of ``learned`` ``(n_learned, d)``),
    averaged over true features."""
    _check("true_features", true_features, dims=2, what=" (n_true, d)")
    _check("learned", learned, dims=2, what=" (n_learned, d)")
    if true_features.shape[-1] != learned.shape[-1]:
        raise ValueError(f"feature sizes differ: {true_features.shape[-1]} vs {learned.shape[-1]}")
    t = torch.nn.functional.normalize(true_features.double(), dim=-1)
    d = torch.nn.functional.normalize(learned.double(), dim=-1)
    out = (t @ d.t()).max(dim=1).values.mean()
    if not bool(torch.isfinite(out)):  # computed once per run, so the host read costs nothing
        raise ValueError("MMCS is not finite: the true or the learned features contain NaN or Inf")
    return out


def rho_hat_summary(code: Tensor) -> dict[str, float]:
    """Mean, min and max over units of ρ̂_j, the mean activation of each unit; code ``(batch, d)``."""
    _check("code", code, dims=2, what=" (batch, d)")
    r = code.double().mean(0)
    out = {"mean": float(r.mean()), "min": float(r.min()), "max": float(r.max())}
    if not all(math.isfinite(v) for v in out.values()):
        raise ValueError("the code contains NaN or Inf: its per-unit mean ρ̂ is not finite")
    return out
