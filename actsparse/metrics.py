"""Sparse-autoencoder metrics. Inputs are tensors; outputs are tensors or floats.

* FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² (fraction of variance unexplained).
* variance explained = 1 − FVU.
* L0 = mean number of non-zero units per sample.
* dead fraction = fraction of units that have not fired in the last N samples (tracked by the model).
* MMCS = mean over true features g of max_d cos(f_g, d_d) (Sharkey et al.).

Against known ground-truth features (synthetic data: true dictionary f ``(n_true, d)`` and true
codes ``(batch, n_true)``), with learned decoder atoms d ``(n_learned, d)``:

* matching π = the one-to-one assignment of learned atoms to true features maximising
  Σ_g |cos(f_g, d_π(g))| (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``);
  min(n_true, n_learned) pairs. |cos|: a sign-flipped atom counts as found.
* MCC = mean over the matched pairs of |cos(f_g, d_π(g))|, the mean correlation coefficient of the
  identifiability literature (Khemakhem et al. 2020) as used for SAEs on synthetic data
  (O'Neill & Bui 2024; SynthSAEBench, Chanin et al. 2026, arXiv:2602.14687). Unlike MMCS, one atom
  cannot be credited to two features.
* feature F1: for each matched pair (g, j), latent j firing (code > threshold) predicts feature g
  being active (true code ≠ 0); per pair P = TP/(TP+FP), R = TP/(TP+FN), F1 = 2TP/(2TP+FP+FN);
  mean over the matched pairs whose feature is active in some sample (see :func:`feature_f1`).
* latent usage: dead = latents never non-zero in the given samples; dense = latents non-zero in
  more than 10% of them (the "high-frequency" cut-off of Rajamanoharan et al. 2024, JumpReLU SAEs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .models.sparse_topk import SparseCode, unit_sums

__all__ = [
    "fvu",
    "fvu_ratio",
    "total_variance",
    "variance_explained",
    "l0",
    "mmcs",
    "rho_hat_summary",
    "match_features",
    "mcc",
    "feature_f1",
    "latent_usage",
]


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


def total_variance(x: Tensor, chunk: int | None = None) -> Tensor:
    """``Σ‖x − x̄‖²`` in float64, the denominator of the FVU; x: ``(batch, d_in)``, or rows of a
    tensor gathered a chunk at a time (:class:`actsparse.data.IndexedRows`: the same result as for
    the copied rows, to the bit). Two passes (the mean, then the squares about it), ``chunk`` rows
    at a time (default: about 2²¹ values, a 16 MiB float64 chunk), so no float64 copy of a large x:
    one chunk in float64 at a time."""
    rows = _indexed_rows(x)
    if rows:
        _check("x", x.x)
        if len(x) == 0:
            raise ValueError(f"x is empty (shape {tuple(x.shape)})")
    else:
        _check("x", x)
    if chunk is None:
        chunk = max(1, (1 << 21) // max(1, math.prod(x.shape[1:])))
    # the sum chunk by chunk too: x.sum(0, dtype=float64) casts all of x to float64 first (a 400 MB
    # float32 array took 780 MB more); the cast chunk's sum is the same to the bit
    if rows:
        mean = sum(xb.sum(0) for xb in _float64_chunks(x, chunk)) / x.shape[0]
    else:
        mean = sum(xb.sum(0, dtype=torch.float64) for xb in x.split(chunk)) / x.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    chunks = _float64_chunks(x, chunk) if rows else (xb.to(torch.float64, copy=True) for xb in x.split(chunk))
    for xb in chunks:
        total += xb.sub_(mean).square_().sum()  # in place, on a float64 copy: one temporary, not three
    return total


def _indexed_rows(x: object) -> bool:
    if isinstance(x, Tensor):
        return False
    from .data import IndexedRows  # imported here: actsparse.data is not this module's dependency

    return isinstance(x, IndexedRows)


def _float64_chunks(rows, chunk: int, part: int = 2048):
    """The rows of an :class:`~actsparse.data.IndexedRows`, ``chunk`` at a time, in float64: one
    buffer, reused, filled ``part`` rows at a time (no float32 copy of the chunk beside it). Each
    chunk is overwritten by the next: use it before asking for the next."""
    buf = None
    for idx in rows.index.split(chunk):
        if buf is None or buf.shape[0] != idx.shape[0]:
            buf = None  # the last, shorter chunk: free the full-size buffer first
            buf = torch.empty((idx.shape[0], *rows.shape[1:]), dtype=torch.float64, device=rows.device)
        for a in range(0, idx.shape[0], part):
            buf[a:a + part] = rows.x.index_select(0, idx[a:a + part])
        yield buf


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


def variance_explained(x: Tensor, x_hat: Tensor, total: Tensor | None = None) -> Tensor:
    """``1 − FVU`` (:func:`fvu`), in float64; x, x̂: ``(batch, d_in)``. NaN where ``x`` has no
    variance; negative when x̂ is worse than predicting the mean."""
    return 1.0 - fvu(x, x_hat, total)


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


def _check_finite(name: str, t: Tensor) -> None:
    """ValueError if ``t`` holds NaN or Inf (one host read: for evaluation, not the training step)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _check_dictionaries(true_features: Tensor, learned: Tensor) -> None:
    """Two finite ``(n, d)`` dictionaries with the same ``d``."""
    _check("true_features", true_features, dims=2, what=" (n_true, d)")
    _check("learned", learned, dims=2, what=" (n_learned, d)")
    if true_features.shape[-1] != learned.shape[-1]:
        raise ValueError(f"feature sizes differ: {true_features.shape[-1]} vs {learned.shape[-1]}")
    _check_finite("true_features", true_features)
    _check_finite("learned", learned)


def match_features(true_features: Tensor, learned: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One-to-one matching of learned atoms to true features that maximises the summed |cosine|.

    Args:
        true_features: ``(n_true, d)``, one true feature direction per row.
        learned: ``(n_learned, d)``, one learned atom (decoder direction) per row.

    Returns:
        ``(true_idx, learned_idx, cos)``, each ``(p,)`` with ``p = min(n_true, n_learned)``:
        true feature ``true_idx[i]`` is matched to atom ``learned_idx[i]``, with the *signed*
        cosine ``cos[i]`` (float64). ``true_idx`` is increasing. Rows of norm 0 have cosine 0 with
        everything. The assignment maximises ``Σ |cos|`` (Hungarian algorithm,
        ``scipy.optimize.linear_sum_assignment``; scipy is needed, it comes with the ``cli`` extra):
        an atom pointing opposite to a feature counts as that feature, as for :func:`mcc`.
        The ``(n_true, n_learned)`` cosine matrix is built on the inputs' device and copied to the
        host for the assignment, which costs O(n³) time.
    """
    _check_dictionaries(true_features, learned)
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:
        from .config import install_hint

        raise ModuleNotFoundError(
            f"matching learned atoms to true features needs scipy (linear_sum_assignment): {install_hint('cli')}"
        ) from err
    t = torch.nn.functional.normalize(true_features.double(), dim=-1)
    d = torch.nn.functional.normalize(learned.double(), dim=-1)
    cos = t @ d.t()
    rows, cols = linear_sum_assignment(cos.abs().cpu().numpy(), maximize=True)
    true_idx = torch.as_tensor(rows, dtype=torch.long, device=cos.device)
    learned_idx = torch.as_tensor(cols, dtype=torch.long, device=cos.device)
    return true_idx, learned_idx, cos[true_idx, learned_idx]


def mcc(true_features: Tensor, learned: Tensor) -> Tensor:
    """Mean correlation coefficient: the mean |cosine| over the pairs of :func:`match_features`.

    Args:
        true_features: ``(n_true, d)``, one true feature direction per row.
        learned: ``(n_learned, d)``, one learned atom per row (any scale and sign).

    Returns:
        0-d float64 tensor in [0, 1]: ``mean_i |cos(f_g_i, d_j_i)|`` over the
        ``min(n_true, n_learned)`` matched pairs (g_i, j_i). The mean is over the matched pairs
        only: with fewer atoms than true features, the unmatched features do not lower it; with
        more atoms, the unmatched atoms are ignored. 1 iff every matched atom is parallel or
        anti-parallel to its feature. As in SynthSAEBench (Chanin et al. 2026) and O'Neill & Bui
        (2024), after the identifiability literature (Khemakhem et al. 2020).
    """
    return match_features(true_features, learned)[2].abs().mean()


def feature_f1(
    true_codes: Tensor,
    codes: Tensor,
    true_features: Tensor,
    learned: Tensor,
    *,
    threshold: float = 0.0,
    chunk: int = 16384,
    matching: str = "best",
) -> dict[str, float]:
    """F1 of feature detection: does latent j fire exactly when its matched true feature is active?

    Args:
        true_codes: ``(batch, n_true)`` true feature coefficients; feature g is *active* in a
            sample where its coefficient is non-zero.
        codes: ``(batch, n_learned)`` the SAE's code of the same samples (a
            :class:`~actsparse.models.sparse_topk.SparseCode`: pass ``code.to_dense()``); latent j
            *fires* where its code is ``> threshold``.
        true_features: ``(n_true, d)``; learned: ``(n_learned, d)`` decoder atoms.
        threshold: firing threshold on ``codes`` (default 0: any positive activation).
        chunk: rows processed at a time (only ``(chunk, p)`` temporaries).
        matching: ``best`` (default): every latent is paired with the true feature its atom is
            closest to (largest |cosine|; several latents may share one), and the means are over
            all latents, with a precision, recall or F1 of 0 where its denominator is 0 — the rule
            of SynthSAEBench (Chanin et al. 2026; SAELens' ``ClassificationMetricsCalculator``),
            so the numbers compare with that benchmark's. ``hungarian``: the one-to-one pairs of
            :func:`match_features`, with the rule below.

    Rule (``hungarian``): latents are matched to true features one-to-one by :func:`match_features` (decoder
    |cosine|, Hungarian). For each matched pair (g, j), over the samples, TP = feature active and
    latent firing, FP = latent firing and feature inactive, FN = feature active and latent silent;
    precision = TP/(TP+FP) (0 when the latent never fires), recall = TP/(TP+FN),
    F1 = 2TP/(2TP+FP+FN). A pair whose feature is never active in these samples has no recall to
    measure: it is left out of every mean and counted in ``excluded`` (pass more samples); a ValueError
    if that leaves no pair. Unmatched features and latents (when n_true ≠ n_learned) are ignored.

    Returns:
        ``f1``, ``precision``, ``recall``: means over the evaluated pairs; ``f1_pooled``:
        ``2ΣTP / (2ΣTP + ΣFP + ΣFN)`` with the counts summed over those pairs (the micro average,
        weighted by how often each feature is active); ``pairs``: number evaluated; ``excluded``:
        matched pairs left out; ``mcc``: :func:`mcc` of the same matching.
    """
    _check("true_codes", true_codes, dims=2, what=" (batch, n_true)")
    _check("codes", codes, dims=2, what=" (batch, n_learned)")
    _check_dictionaries(true_features, learned)
    if true_codes.shape[0] != codes.shape[0]:
        raise ValueError(
            f"true_codes and codes must have the same number of samples, got {true_codes.shape[0]} and {codes.shape[0]}"
        )
    if true_codes.shape[1] != true_features.shape[0]:
        raise ValueError(
            f"true_codes has {true_codes.shape[1]} columns but there are {true_features.shape[0]} true features"
        )
    if codes.shape[1] != learned.shape[0]:
        raise ValueError(f"codes has {codes.shape[1]} columns but there are {learned.shape[0]} learned atoms")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if matching not in ("best", "hungarian"):
        raise ValueError(f"matching must be 'best' or 'hungarian', got {matching!r}")
    if matching == "best":
        t = torch.nn.functional.normalize(true_features.double(), dim=-1)
        d = torch.nn.functional.normalize(learned.double(), dim=-1)
        cos = (d @ t.t()).abs().max(dim=1)
        true_idx, learned_idx = cos.indices, torch.arange(learned.shape[0], device=cos.indices.device)
        cos = cos.values
    else:
        true_idx, learned_idx, cos = match_features(true_features, learned)
    true_idx, learned_idx = true_idx.to(true_codes.device), learned_idx.to(codes.device)
    tp, active, fired = torch.zeros(3, true_idx.numel(), dtype=torch.long, device=true_codes.device)
    for tb, cb in zip(true_codes.split(chunk), codes.split(chunk)):
        _check_finite("true_codes", tb)
        _check_finite("codes", cb)
        a = tb[:, true_idx] != 0
        f = (cb[:, learned_idx] > threshold).to(a.device)
        tp = tp + (a & f).sum(0)
        active = active + a.sum(0)
        fired = fired + f.sum(0)
    if matching == "best":  # every latent counts; 0 where a ratio is undefined
        tp, active, fired = tp.double(), active.double(), fired.double()
        precision = torch.where(fired > 0, tp / fired.clamp_min(1), 0.0)
        recall = torch.where(active > 0, tp / active.clamp_min(1), 0.0)
        f1 = torch.where(active + fired > 0, 2 * tp / (active + fired).clamp_min(1), 0.0)
        return {"f1": float(f1.mean()), "precision": float(precision.mean()), "recall": float(recall.mean()),
                "f1_pooled": float(2 * tp.sum() / (active.sum() + fired.sum()).clamp_min(1)),
                "pairs": int(tp.numel()), "excluded": 0, "mcc": float(mcc(true_features, learned))}
    keep = active > 0
    n = int(keep.sum())
    if n == 0:
        raise ValueError("none of the matched true features is active (non-zero) in these samples: F1 is undefined")
    tp, active, fired = tp[keep].double(), active[keep].double(), fired[keep].double()
    precision = torch.where(fired > 0, tp / fired.clamp_min(1), 0.0)
    recall = tp / active
    f1 = 2 * tp / (active + fired)  # 2TP / (2TP + FP + FN); active > 0
    return {
        "f1": float(f1.mean()),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1_pooled": float(2 * tp.sum() / (active.sum() + fired.sum())),
        "pairs": n,
        "excluded": int(keep.numel() - n),
        "mcc": float(cos.abs().mean()),
    }


def latent_usage(code: Tensor | SparseCode, dense_threshold: float = 0.1, chunk: int = 16384) -> dict[str, float]:
    """How many latents are dead or dense in these samples; code: ``(batch, n_latents)`` or a SparseCode.

    A latent *fires* in a sample where its code is non-zero (as for :func:`l0` and the model's dead
    tracking). It is *dead* if it never fires in these samples (so the count depends on how many
    samples are passed) and *dense* if it fires in more than ``dense_threshold`` of them (default
    0.1: the "high-frequency" latents, firing on over 10% of inputs, of Rajamanoharan et al. 2024).

    Returns:
        ``latents``, ``samples``; ``dead``, ``dead_fraction``; ``dense``, ``dense_fraction``;
        ``max_frequency`` (largest fraction of samples any latent fires in); ``l0`` (:func:`l0`).
    """
    if (
        isinstance(dense_threshold, bool)
        or not isinstance(dense_threshold, (int, float))
        or not 0 <= dense_threshold < 1
    ):
        raise ValueError(f"dense_threshold must be a fraction in [0, 1), got {dense_threshold!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if isinstance(code, SparseCode):
        _check("code.values", code.values, dims=2, what=" (batch, k)")
        _check_finite("code", code.values)
        batch, n = code.values.shape[0], code.d_sae
        counts = unit_sums(code.indices, (code.values != 0).double(), n)
    else:
        _check("code", code, dims=2, what=" (batch, n_latents)")
        batch, n = code.shape
        counts = torch.zeros(n, dtype=torch.float64, device=code.device)
        for cb in code.split(chunk):
            _check_finite("code", cb)
            counts += (cb != 0).sum(0)
    freq = counts / batch
    dead, dense = int((counts == 0).sum()), int((freq > dense_threshold).sum())
    return {
        "latents": n,
        "samples": batch,
        "dead": dead,
        "dead_fraction": dead / n,
        "dense": dense,
        "dense_fraction": dense / n,
        "max_frequency": float(freq.max()),
        "l0": float(l0(code)),
    }
