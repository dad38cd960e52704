"""Ground-truth synthetic data for benchmarking sparse autoencoders against known features.

The data are sparse, non-negative combinations of ``N`` known unit-norm feature directions in ``d``
dimensions, ``x = codes @ features (+ bias + noise)``, the toy model of Sharkey et al. ("Taking
features out of superposition with sparse autoencoders", 2022) made closer to what SAEs meet in
real activations, in the manner of the SynthSAEBench benchmark of Chanin et al. (2025, in SAELens):
Zipfian firing frequencies, a feature hierarchy and correlated firing. The hierarchy (parents and
more specific children that fire only with them) is the structure Bussmann et al. ("Learning
multi-level features with Matryoshka SAEs", 2025) use to show feature absorption and splitting.
:func:`actsparse.metrics.mmcs` scores a trained dictionary against :attr:`GroundTruth.features`.

The model, feature ``i`` in ``0..N-1`` (all of it set by :class:`GroundTruth`'s arguments):

* **Features.** ``features[i]`` is a Gaussian random vector scaled to unit norm; with
  ``orthogonal=True`` (needs ``N <= d``) the same vectors orthonormalised by a QR decomposition.
* **Firing probabilities** (the marginals, ``probs``). Zipfian, ``p_i = min(1, c · (i+1)^-s)`` with
  ``s = zipf_exponent``, and ``c`` solved so that ``Σ p_i = mean_active``, the expected L0 of the
  true codes. ``mean_active`` must lie in ``(0, N]``. When the scaled weights of the most frequent
  features exceed 1 they are set to 1 and the others rescaled (water-filling), so the expected L0
  is still exactly ``mean_active``; a ``UserWarning`` then says how many features fire in every
  sample. Index order is frequency order: feature 0 is the most frequent.
* **Hierarchy** (``hierarchy=(n_roots, branching, depth)``, optional). The first
  ``n_tree = n_roots · (1 + b + … + b^(depth-1))`` features form ``n_roots`` full trees with
  branching ``b`` and ``depth`` levels, numbered breadth first: the roots are ``0..n_roots-1``,
  then the children of feature 0, of feature 1, … The parent of tree feature ``k >= n_roots`` is
  ``(k - n_roots) // b`` (:attr:`GroundTruth.parents`, -1 for roots and for the features after the
  trees, which fire independently). A child can fire only in a sample where its parent fires.
  Because a parent always has a smaller index, it is at least as frequent as its children, and
  each child fires with the conditional probability ``q_k = p_k / p_parent`` given that its parent
  fired (:attr:`GroundTruth.conditional`), so **every marginal is still exactly the Zipf
  probability** ``p_k``. With ``exclusive_children=True`` at most one child of a parent fires in a
  sample (child ``j`` is chosen with probability ``q_j``, none with ``1 - Σ q``); that needs
  ``Σ q <= 1`` over each parent's children, else a ``ValueError`` names the parent (with
  ``zipf_exponent >= 1`` it holds whenever ``n_roots >= branching``).
* **Correlated firing** (``correlation = ρ`` in ``[0, 1)``, optional). A Gaussian copula: each
  sample draws ``z = sqrt(1-ρ) ε + sqrt(ρ) L η`` with ``ε ~ N(0, I_N)``, ``η ~ N(0, I_r)`` and
  ``L`` (:attr:`GroundTruth.loadings`, ``(N, r)``, ``r = correlation_rank``) random rows of unit
  norm, so ``z ~ N(0, (1-ρ) I + ρ L Lᵀ)`` has unit variances and the correlation
  ``ρ · L_i·L_j`` between features ``i`` and ``j`` (of either sign). Feature ``i`` fires when
  ``Φ(z_i) < p_i``, i.e. ``z_i < Φ⁻¹(p_i)``, so **the marginals are kept exactly**. The cost is
  ``O(batch · N · r)``. With a hierarchy the copula drives the roots and the features outside the
  trees; children fire independently given their parents (which keeps their marginals exact).
* **Magnitudes.** A feature that fires has the coefficient ``|m|``, ``m ~ N(magnitude_mean,
  magnitude_std²)`` (a folded normal: positive, mean ≈ ``magnitude_mean`` when
  ``magnitude_std`` is well below it; ``magnitude_std = 0`` gives the constant
  ``magnitude_mean``); a feature that does not fire has 0. Codes are non-negative, like SAE latents.
* **Data.** ``x = codes @ features + bias + noise``: ``bias`` is a fixed random vector of norm
  ``bias_norm`` (the mean offset of real activations; default 0), ``noise ~ N(0, noise_std² I_d)``
  (default 0). With both 0, ``x`` is exactly ``codes @ features`` (float32).

Determinism. Everything is drawn from CPU :class:`torch.Generator` objects. The structure
(features, loadings, bias) is a function of ``seed`` alone; the features depend only on
``(n_features, d, orthogonal, seed)``, not on the firing options. Samples come from separate
streams: :meth:`GroundTruth.sample` with an int seed ``s`` and :meth:`GroundTruth.batches` with
``seed=s`` each start a fresh generator for ``s``, so each is a function of ``s`` (and, for
``batches``, of ``batch_size``); ``batches(b, n, s)`` with ``b >= n`` yields exactly
``sample(n, s)``, but smaller batches draw in another order and give other samples of the same
distribution. ``sample(n)`` without a seed continues the instance's own stream (seeded from
``seed``): reproducible from construction, new samples on each call.

Files. :meth:`GroundTruth.save` writes ``PATH.npy`` (``x``, ``(n, d)`` float32, readable by
:func:`actsparse.data.load_array`) and beside it ``PATH.features.npy`` (``(N, d)`` float32),
optionally ``PATH.codes.npy`` (``(n, N)`` float32) and ``PATH.truth.json`` (the constructor
arguments and the sampling seed and batch size, enough to draw the same data again).
:func:`load_true_features` finds the features of a data file.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["GroundTruth", "load_true_features", "truth_paths"]

_STRUCTURE, _OWN_STREAM, _SEEDED = 0, 1, 2  # the independent random streams derived from a seed
_FORMAT = "actsparse-ground-truth"


def _int(name: str, v: object, minimum: int) -> int:
    """``v`` as a Python int ``>= minimum``: TypeError for a non-int (a bool too), ValueError below it."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return int(v)


def _real(name: str, v: object, lo: float, hi: float = math.inf, *, lo_open: bool = False,
          hi_open: bool = False) -> float:
    """``v`` as a finite float in the interval (lo, hi) with the ends open or closed as given."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__} {v!r}")
    v = float(v)
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number in {interval}, got {v!r}")
    if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
        raise ValueError(f"{name} must be in {interval}, got {v!r}")
    return v


def _derive(seed: int, stream: int) -> int:
    """A 64-bit generator seed for stream ``stream`` of ``seed`` (independent streams per seed)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0])


def _zipf_probabilities(n: int, exponent: float, mean_active: float) -> tuple[Tensor, int]:
    """``p_i = min(1, c (i+1)^-s)`` with ``Σ p = mean_active`` (float64), and how many are 1.

    Water-filling: with the ``k`` most frequent at 1, ``c = (mean_active - k) / Σ_{i>=k} w_i``; the
    smallest ``k`` with ``c w_k <= 1`` is the solution (``k = n - 1`` always qualifies as
    ``mean_active <= n``)."""
    w = torch.arange(1, n + 1, dtype=torch.float64).pow(-exponent)
    tail = w.flip(0).cumsum(0).flip(0)  # tail[k] = Σ_{i>=k} w_i
    k = torch.arange(n, dtype=torch.float64)
    c = (mean_active - k) / tail
    ok = (c * w <= 1 + 1e-12).nonzero()
    k0 = int(ok[0]) if len(ok) else n - 1
    p = torch.ones(n, dtype=torch.float64)
    p[k0:] = (c[k0] * w[k0:]).clamp(max=1.0)
    return p, k0


class GroundTruth:
    """A synthetic data source with known features (the model is in the module docstring).

    Args:
        n_features: ``N``, the number of true features (>= 1).
        d: the data dimension (>= 1).
        mean_active: the expected number of active features per sample (the true L0), in
            ``(0, n_features]``. Default 4.
        zipf_exponent: ``s`` in ``p_i ∝ (i+1)^-s`` (>= 0; 0 gives equal probabilities). Default 1.
        hierarchy: ``(n_roots, branching, depth)``, ints >= 1, for ``n_roots`` full trees over the
            first features; None (default) for independent features.
        exclusive_children: at most one child of a parent fires per sample (needs a hierarchy).
        correlation: ``ρ`` in ``[0, 1)``, the strength of the low-rank Gaussian copula. Default 0.
        correlation_rank: ``r``, the rank of its factor (>= 1). Default 16.
        magnitude_mean: mean of the normal whose absolute value is a firing coefficient (> 0).
            Default 1.
        magnitude_std: its standard deviation (>= 0). Default 0.25.
        noise_std: standard deviation of isotropic Gaussian noise added to ``x`` (>= 0). Default 0.
        bias_norm: norm of a fixed random offset added to ``x`` (>= 0). Default 0.
        orthogonal: orthonormal features (needs ``n_features <= d``). Default False.
        seed: a non-negative int; everything here is a function of it. Default 0.

    Attributes (tensors on the CPU):
        features: ``(N, d)`` float32, unit-norm rows.
        probs: ``(N,)`` float64, the marginal firing probabilities (sum ``mean_active``).
        parents: ``(N,)`` int64, each feature's parent, -1 for one without.
        conditional: ``(N,)`` float64, the probability of firing given that the parent fired
            (``probs`` for features without a parent).
        loadings: ``(N, r)`` float32 unit rows, the copula's factor ``L`` (drawn also when
            ``correlation`` is 0, so that turning it on changes nothing else).
        bias: ``(d,)`` float32, zeros unless ``bias_norm > 0``.
        n_saturated: how many of the most frequent features fire with probability 1.

    Raises:
        TypeError: an argument of the wrong type (a bool or float where an int belongs, …).
        ValueError: a value out of range (the message names the argument and the allowed range),
            a hierarchy larger than ``n_features``, ``orthogonal`` with ``n_features > d``, or
            exclusive children whose conditional probabilities sum above 1.
    """

    def __init__(self, n_features: int, d: int, mean_active: float = 4.0, *, zipf_exponent: float = 1.0,
                 hierarchy: Sequence[int] | None = None, exclusive_children: bool = False,
                 correlation: float = 0.0, correlation_rank: int = 16, magnitude_mean: float = 1.0,
                 magnitude_std: float = 0.25, noise_std: float = 0.0, bias_norm: float = 0.0,
                 orthogonal: bool = False, seed: int = 0) -> None:
        self.n_features = n = _int("n_features", n_features, 1)
        self.d = _int("d", d, 1)
        self.mean_active = _real("mean_active", mean_active, 0.0, float(n), lo_open=True)
        self.zipf_exponent = _real("zipf_exponent", zipf_exponent, 0.0)
        self.correlation = _real("correlation", correlation, 0.0, 1.0, hi_open=True)
        self.correlation_rank = _int("correlation_rank", correlation_rank, 1)
        self.magnitude_mean = _real("magnitude_mean", magnitude_mean, 0.0, lo_open=True)
        self.magnitude_std = _real("magnitude_std", magnitude_std, 0.0)
        self.noise_std = _real("noise_std", noise_std, 0.0)
        self.bias_norm = _real("bias_norm", bias_norm, 0.0)
        self.seed = _int("seed", seed, 0)
        for name, flag in (("exclusive_children", exclusive_children), ("orthogonal", orthogonal)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
        self.orthogonal, self.exclusive_children = orthogonal, exclusive_children
        if orthogonal and n > self.d:
            raise ValueError(f"orthogonal features need n_features <= d, got n_features={n} > d={self.d}")
        self.hierarchy = self._check_hierarchy(hierarchy)
        if exclusive_children and self.hierarchy is None:
            raise ValueError("exclusive_children=True needs a hierarchy=(n_roots, branching, depth)")

        # structure: features, then loadings, then the bias direction, always all three in this order
        g = torch.Generator().manual_seed(_derive(self.seed, _STRUCTURE))
        f = torch.randn(n, self.d, generator=g, dtype=torch.float64)
        if orthogonal:
            f = torch.linalg.qr(f.T)[0].T  # Gram-Schmidt of the same Gaussian rows
        self.features = (f / f.norm(dim=1, keepdim=True)).float()
        lo = torch.randn(n, self.correlation_rank, generator=g, dtype=torch.float64)
        self.loadings = (lo / lo.norm(dim=1, keepdim=True)).float()
        b = torch.randn(self.d, generator=g, dtype=torch.float64)
        self.bias = (b * (self.bias_norm / b.norm())).float() if self.bias_norm > 0 else torch.zeros(self.d)

        self.probs, self.n_saturated = _zipf_probabilities(n, self.zipf_exponent, self.mean_active)
        if self.n_saturated:
            warnings.warn(
                f"GroundTruth: mean_active={self.mean_active:g} with zipf_exponent={self.zipf_exponent:g} over "
                f"{n} features puts the {self.n_saturated} most frequent feature(s) in every sample (probability "
                "clipped to 1, the others rescaled so that the expected L0 is still mean_active); lower "
                "mean_active or zipf_exponent for features that all come and go", UserWarning, stacklevel=2)
        self._thresholds = torch.special.ndtri(self.probs).float()  # Φ⁻¹(p): +inf where p = 1

        self.parents = torch.full((n,), -1, dtype=torch.int64)
        self._levels: list[tuple[int, int]] = []  # [start, end) of each child level, in order
        if self.hierarchy is not None:
            roots, branching, depth = self.hierarchy
            start, size = 0, roots
            for _ in range(depth - 1):
                child_start = start + size
                k = torch.arange(child_start, child_start + size * branching)
                self.parents[k] = (k - roots) // branching
                self._levels.append((child_start, child_start + size * branching))
                start, size = child_start, size * branching
        has_parent = self.parents >= 0
        self.conditional = self.probs.clone()
        self.conditional[has_parent] = self.probs[has_parent] / self.probs[self.parents[has_parent]]
        self.conditional.clamp_(max=1.0)  # parents come first, so p_child <= p_parent: only rounding
        self._q = self.conditional.float()
        if exclusive_children:
            self._check_exclusive(has_parent)
        self._independent = ~has_parent
        self._stream = torch.Generator().manual_seed(_derive(self.seed, _OWN_STREAM))

    def _check_hierarchy(self, hierarchy: object) -> tuple[int, int, int] | None:
        if hierarchy is None:
            return None
        if isinstance(hierarchy, (str, bytes)) or not isinstance(hierarchy, Sequence) or len(hierarchy) != 3:
            raise TypeError(f"hierarchy must be None or (n_roots, branching, depth), got {hierarchy!r}")
        roots, branching, depth = (_int(f"hierarchy {name}", v, 1)
                                   for name, v in zip(("n_roots", "branching", "depth"), hierarchy))
        n_tree = roots * depth if branching == 1 else roots * (branching ** depth - 1) // (branching - 1)
        if n_tree > self.n_features:
            raise ValueError(f"hierarchy=({roots}, {branching}, {depth}) has {n_tree} features, more than "
                             f"n_features={self.n_features}")
        return roots, branching, depth

    def _check_exclusive(self, has_parent: Tensor) -> None:
        """Each parent's children need ``Σ q <= 1``; store each child's slot ``[lo, hi)`` in [0, 1)."""
        _, branching, _ = self.hierarchy
        kids = has_parent.nonzero().squeeze(1)
        if not len(kids):  # depth 1: no children
            return
        q = self.conditional[kids].reshape(-1, branching)  # siblings are contiguous, b per parent
        total = q.sum(1)
        worst = int(total.argmax())
        if float(total[worst]) > 1 + 1e-9:
            parent = int(self.parents[kids[worst * branching]])
            raise ValueError(
                f"exclusive_children: the {branching} children of feature {parent} fire with conditional "
                f"probabilities summing to {float(total[worst]):.3f} > 1 given their parent; raise zipf_exponent, "
                "lower branching or use at least as many roots as branching")
        hi = q.cumsum(1)
        self._slot_hi = hi.reshape(-1).float()
        self._slot_lo = (hi - q).reshape(-1).float()
        self._first_sibling = kids - (kids - self.hierarchy[0]) % branching

    # ------------------------------------------------------------------------------------------
    # sampling

    @property
    def expected_l0(self) -> float:
        """``Σ probs``, the expected number of active true features per sample (= ``mean_active``)."""
        return float(self.probs.sum())

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-ready: ``GroundTruth(**gt.config())`` rebuilds it."""
        return {"n_features": self.n_features, "d": self.d, "mean_active": self.mean_active,
                "zipf_exponent": self.zipf_exponent,
                "hierarchy": list(self.hierarchy) if self.hierarchy else None,
                "exclusive_children": self.exclusive_children, "correlation": self.correlation,
                "correlation_rank": self.correlation_rank, "magnitude_mean": self.magnitude_mean,
                "magnitude_std": self.magnitude_std, "noise_std": self.noise_std, "bias_norm": self.bias_norm,
                "orthogonal": self.orthogonal, "seed": self.seed}

    def __repr__(self) -> str:
        return "GroundTruth(" + ", ".join(f"{k}={v!r}" for k, v in self.config().items()) + ")"

    def _generator(self, generator: object) -> torch.Generator:
        if generator is None:
            return self._stream
        if isinstance(generator, torch.Generator):
            if generator.device.type != "cpu":
                raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
            return generator
        if isinstance(generator, bool) or not isinstance(generator, numbers.Integral):
            raise TypeError(f"generator must be None, an int seed or a torch.Generator, got "
                            f"{type(generator).__name__} {generator!r}")
        return torch.Generator().manual_seed(_derive(_int("seed", generator, 0), _SEEDED))

    def _draw(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` samples ``(x, codes)`` from ``g``; memory ``O(n · N)``."""
        N, rho = self.n_features, self.correlation
        need_u = rho == 0 or bool(self._levels)
        u = torch.rand(n, N, generator=g) if need_u else None
        if rho > 0:
            z = torch.randn(n, N, generator=g).mul_(math.sqrt(1 - rho))
            eta = torch.randn(n, self.correlation_rank, generator=g)
            z.addmm_(eta, self.loadings.T, alpha=math.sqrt(rho))
            fired = z < self._thresholds
            del z
        else:
            fired = u < self.probs.float()
        for start, end in self._levels:  # breadth first: a parent's column is final before its children's
            par = self.parents[start:end]
            if self.exclusive_children:
                s = u[:, self._first_sibling[start - self.hierarchy[0]:end - self.hierarchy[0]]]
                lo = self._slot_lo[start - self.hierarchy[0]:end - self.hierarchy[0]]
                hi = self._slot_hi[start - self.hierarchy[0]:end - self.hierarchy[0]]
                chosen = (s >= lo) & (s < hi)
            else:
                chosen = u[:, start:end] < self._q[start:end]
            fired[:, start:end] = fired[:, par] & chosen
        del u
        if self.magnitude_std > 0:
            codes = torch.randn(n, N, generator=g).mul_(self.magnitude_std).add_(self.magnitude_mean).abs_()
            codes.mul_(fired)
        else:
            codes = fired.float().mul_(self.magnitude_mean)
        x = codes @ self.features
        if self.bias_norm > 0:
            x += self.bias
        if self.noise_std > 0:
            x.add_(torch.randn(n, self.d, generator=g), alpha=self.noise_std)
        return x, codes

    def sample(self, n: int, generator: int | torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples.

        Args:
            n: the number of samples (>= 1).
            generator: None (default) to continue this instance's own stream; an int seed for a
                fresh stream of that seed (the same samples on every call); or a CPU
                :class:`torch.Generator`, which is advanced.

        Returns:
            ``(x, codes)``: ``x`` ``(n, d)`` float32, ``codes`` ``(n, n_features)`` float32 (>= 0).
        """
        n = _int("n", n, 1)
        return self._draw(n, self._generator(generator))

    def batches(self, batch_size: int, n_samples: int,
                seed: int | torch.Generator | None = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``n_samples`` samples as ``(x, codes)`` batches, drawn on the fly.

        Only one batch exists at a time (memory ``O(batch_size · n_features)``); the last batch
        holds the remaining ``n_samples % batch_size`` samples if that is not 0. ``seed`` is read
        as ``generator`` in :meth:`sample`; with an int the batches are a function of
        ``(batch_size, n_samples, seed)``, and the first batch equals ``sample(batch_size, seed)``.
        The arguments are checked here, not at the first ``next()``.
        """
        batch_size = _int("batch_size", batch_size, 1)
        n_samples = _int("n_samples", n_samples, 1)
        g = self._generator(seed)
        return self._iter_batches(batch_size, n_samples, g)

    def _iter_batches(self, batch_size: int, n_samples: int, g: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, n_samples, batch_size):
            yield self._draw(min(batch_size, n_samples - start), g)

    # ------------------------------------------------------------------------------------------
    # files

    def save(self, path: str | os.PathLike, n_samples: int, *, seed: int = 0, batch_size: int = 65_536,
             codes: bool = False) -> dict[str, Path]:
        """Write ``n_samples`` samples (``batches(batch_size, n_samples, seed)``) and the truth.

        Files (``PATH`` is ``path`` without ``.npy``): ``PATH.npy`` the data ``x`` ``(n, d)``
        float32; ``PATH.features.npy`` the true features ``(N, d)`` float32; ``PATH.codes.npy`` the
        codes ``(n, N)`` float32 if ``codes``, else an older one there is deleted (it would not
        belong to the new data); ``PATH.truth.json`` :meth:`config`, ``seed``, ``batch_size`` and
        ``n_samples``. The arrays are written batch by batch into memory-mapped ``.tmp`` files,
        renamed when complete; existing files of these names are replaced.

        Returns:
            The paths written, by key ``"x"``, ``"features"``, ``"truth"`` (and ``"codes"``).
        """
        n_samples = _int("n_samples", n_samples, 1)
        batch_size = _int("batch_size", batch_size, 1)
        seed = _int("seed", seed, 0)
        if not isinstance(codes, bool):
            raise TypeError(f"codes must be a bool, got {type(codes).__name__} {codes!r}")
        paths = truth_paths(path)
        if not paths["x"].parent.is_dir():
            raise FileNotFoundError(f"the folder of {paths['x']} does not exist")
        tmp = {k: p.with_name(p.name + ".tmp") for k, p in paths.items()}
        x_out = np.lib.format.open_memmap(tmp["x"], mode="w+", dtype=np.float32, shape=(n_samples, self.d))
        c_out = (np.lib.format.open_memmap(tmp["codes"], mode="w+", dtype=np.float32,
                                           shape=(n_samples, self.n_features)) if codes else None)
        row = 0
        for xb, cb in self.batches(batch_size, n_samples, seed):
            x_out[row:row + len(xb)] = xb.numpy()
            if c_out is not None:
                c_out[row:row + len(cb)] = cb.numpy()
            row += len(xb)
        for out in (x_out, c_out):
            if out is not None:
                out.flush()
        del x_out, c_out
        with open(tmp["features"], "wb") as fh:
            np.save(fh, self.features.numpy())
        truth = {"format": _FORMAT, "version": 1, "config": self.config(), "n_samples": n_samples, "seed": seed,
                 "batch_size": batch_size, "codes": codes}
        tmp["truth"].write_text(json.dumps(truth, indent=1) + "\n")
        written = ["x", "features", "truth"] + (["codes"] if codes else [])
        for k in written:
            os.replace(tmp[k], paths[k])
        if not codes:
            paths["codes"].unlink(missing_ok=True)
        return {k: paths[k] for k in written}


def truth_paths(path: str | os.PathLike) -> dict[str, Path]:
    """The files of a saved data set ``PATH.npy``: keys ``x`` (``PATH.npy``), ``features``
    (``PATH.features.npy``), ``codes`` (``PATH.codes.npy``) and ``truth`` (``PATH.truth.json``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if p.suffix.lower() != ".npy":
        raise ValueError(f"the data file must be a .npy path, got {str(p)!r}")
    stem = p.name[:-len(p.suffix)]
    return {"x": p, "features": p.with_name(stem + ".features.npy"), "codes": p.with_name(stem + ".codes.npy"),
            "truth": p.with_name(stem + ".truth.json")}


def load_true_features(path: str | os.PathLike) -> Tensor:
    """The true features saved beside the data file ``PATH.npy``: ``PATH.features.npy``.

    Returns:
        ``(N, d)`` float32 tensor.

    Raises:
        FileNotFoundError: no ``PATH.features.npy``.
        ValueError: it is not a 2-D array of real numbers, or its ``d`` differs from that of
            ``PATH.npy`` (when that file exists).
    """
    paths = truth_paths(path)
    fp = paths["features"]
    if not fp.is_file():
        raise FileNotFoundError(f"no true features beside {paths['x']}: {fp} does not exist (GroundTruth.save "
                                "writes it)")
    try:
        arr = np.load(fp, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"cannot read the true features {fp}: {err}") from err
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{fp} must hold a 2-D real array (n_features, d), got {arr.dtype} shape {arr.shape}")
    if paths["x"].is_file():
        x = np.load(paths["x"], mmap_mode="r", allow_pickle=False)
        if x.ndim != 2 or x.shape[1] != arr.shape[1]:
            raise ValueError(f"the true features {fp} have d={arr.shape[1]} but the data {paths['x']} have shape "
                             f"{x.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
