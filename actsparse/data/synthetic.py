"""Synthetic ground truth: sparse combinations of known unit-norm dictionary atoms.

Toy data in the style of Sharkey et al. ("Taking features out of superposition with sparse
autoencoders", 2022): ``x = Σ_g c_g f_g`` where the atoms ``f_g`` are random unit vectors and each
coefficient ``c_g`` is non-zero with a small probability. A trained autoencoder's decoder atoms can
then be scored against the truth with :func:`actsparse.metrics.mmcs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SyntheticDictionary", "make_synthetic"]


@dataclass
class SyntheticDictionary:
    """Samples and the truth that generated them.

    Attributes:
        x: ``(n_samples, d)`` float32 data.
        features: ``(n_features, d)`` unit-norm atoms.
        codes: ``(n_samples, n_features)`` the sparse coefficients.
    """

    x: Tensor
    features: Tensor
    codes: Tensor


def make_synthetic(
    n_samples: int = 20_000,
    d: int = 32,
    n_features: int = 64,
    active: float = 4.0,
    *,
    seed: int = 0,
) -> SyntheticDictionary:
    """Draw ``n_samples`` sparse combinations of ``n_features`` random unit atoms in ``d`` dimensions.

    Each feature is active in a sample with probability ``active / n_features`` (so ``active`` is
    the mean L0), with an ``Uniform(0, 1]`` coefficient. Deterministic for a given ``seed``.
    """
    for name, v in (("n_samples", n_samples), ("d", d), ("n_features", n_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(active, bool) or not isinstance(active, (int, float)):
        raise TypeError(f"active (mean active features) must be a number, got {type(active).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 < active <= n_features:
        raise ValueError(f"active (mean active features) must be in (0, n_features={n_features}], got {active!r}")
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    on = torch.rand(n_samples, n_features, generator=g) < active / n_features
    mags = 1.0 - torch.rand(n_samples, n_features, generator=g)  # (0, 1]
    codes = on * mags
    return SyntheticDictionary(codes @ features, features, codes)
