"""actsparse's penalties as Keras 3 activity regularizers, written with ``keras.ops`` only.

>>> import keras
>>> from actsparse.integrations.keras import BernoulliKL
>>> layer = keras.layers.Dense(250, activation="sigmoid", activity_regularizer=BernoulliKL(0.05, weight=3))

The formulas are those of :mod:`actsparse.functional`, and the tests check value and
gradient against it to 1e-6:

===============  ===================================================  ================================
regularizer      term that reaches ``model.losses``                   source
===============  ===================================================  ================================
``BernoulliKL``  β Σ_j ρ log(ρ/ρ̂_j) + (1−ρ) log((1−ρ)/(1−ρ̂_j))        Ng, CS294A notes, p.14–15
``PoissonKL``    β Σ_j ρ log(ρ/ρ̂_j) − ρ + ρ̂_j                        generalised KL (I-divergence)
``FrequencyKL``  β Σ_j KL(ρ ‖ f̂_j), f̂_j = mean H(a − θ), straight-through  Rajamanoharan et al. 2024
``L1``           λ Σ|a| / batch                                       activity L1
===============  ===================================================  ================================

ρ̂_j (and f̂_j) is the mean of unit j over every axis but ``unit_dim`` (the last one, Keras'
``channels_last``): the batch and any spatial or sequence positions.

**The batch convention.** Keras 3.14 and later (keras-team/keras#22021) divide what an activity
regularizer returns by the batch size ``ops.shape(output)[0]`` before ``add_loss``; in Keras 3.15.1
this is ``keras/src/layers/layer.py``, ``Layer.__call__``, lines 1018–1029. Earlier Keras 3
releases add the value as it is. A regularizer here therefore returns ``penalty(x) · batch`` when
the installed Keras divides (:data:`KERAS_DIVIDES_BY_BATCH`) and ``penalty(x)`` when it does not,
so the term in ``model.losses`` is always :meth:`penalty`, which equals actsparse's PyTorch
penalty on the same activations: the KLs are *not* divided by the batch (ρ̂ already is a batch
mean), and ``L1`` is divided once, as ``actsparse.L1``.

Numerics follow :mod:`actsparse.functional`: reduction in float32 at least (float64 stays float64),
and ρ̂ clamped straight-through into ``[eps, 1 − eps]`` (value clamped, gradient of the identity).
The value is returned in that reduction dtype, not in a float16 layer's: it is multiplied by the
batch size, which could overflow float16. When the backend runs eagerly (torch outside
``torch.compile``, numpy, TensorFlow eager, JAX outside ``jit``) ``check=True`` raises the same
errors as actsparse — NaN/Inf activations, negative rates, and a Bernoulli ρ̂ above 1 (ReLU),
pointing to :class:`PoissonKL`; inside a traced graph the check is skipped and the clamp keeps the
value finite.

Regularizers are stateless, so the moving-average ρ̂ (``momentum``) of the PyTorch penalties is
not offered here. Each class is registered with ``keras.saving.register_keras_serializable``
(package ``"actsparse"``), so a saved ``.keras`` model reloads once this module is imported.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

try:
    import keras
    from keras import ops
except ImportError as err:
    from ..config import install_hint

    raise ModuleNotFoundError(f"actsparse.integrations.keras needs Keras 3: {install_hint('keras')}") from err

from .. import functional as F
from ..functional import _check_rate, check_finite_result
from ..penalties import _check_weight

__all__ = ["KERAS_DIVIDES_BY_BATCH", "BernoulliKL", "PoissonKL", "FrequencyKL", "L1"]


def _keras_version() -> tuple[int, int]:
    major, minor = re.findall(r"\d+", keras.version())[:2]
    return int(major), int(minor)


#: Whether the installed Keras divides an activity regularizer's value by the batch size
#: (Keras ≥ 3.14, keras-team/keras#22021; ``keras/src/layers/layer.py`` in ``Layer.__call__``).
KERAS_DIVIDES_BY_BATCH: bool = _keras_version() >= (3, 14)


# --------------------------------------------------------------------------------------------
# helpers


def _compute_dtype(x: Any) -> str:
    """Reduce in float32 at least; float64 stays float64 (as actsparse.functional)."""
    dtype = keras.backend.standardize_dtype(x.dtype)
    if not keras.backend.is_float_dtype(dtype):
        raise TypeError(f"activations must be a floating-point tensor, got dtype {dtype}")
    return "float64" if dtype == "float64" else "float32"


def _reduce_axes(x: Any, unit_dim: int) -> tuple[int, ...]:
    """Every axis but the unit axis: ρ̂_j averages over the batch and all positions."""
    ndim = len(x.shape)
    if ndim < 2:
        raise ValueError(
            f"activations must have at least 2 dimensions (batch, ..., units), got shape {tuple(x.shape)}"
        )
    if not -ndim <= unit_dim < ndim:
        raise IndexError(f"unit_dim={unit_dim} is out of range for activations of shape {tuple(x.shape)}")
    d = unit_dim % ndim
    return tuple(i for i in range(ndim) if i != d)


def _mean(x: Any, axes: tuple[int, ...]) -> Any:
    """Mean over ``axes`` in ``x``'s dtype (Keras' torch ``ops.mean`` computes float64 in float32)."""
    shape = ops.shape(x)
    count = ops.convert_to_tensor(1.0, dtype=x.dtype)
    for i in axes:
        count = count * ops.cast(shape[i], x.dtype)
    return ops.sum(x, axis=axes) / count


def _clamp_straight_through(x: Any, lo: float, hi: float) -> Any:
    """The value of ``x`` clamped into [lo, hi], the identity's gradient (actsparse's clamp)."""
    # Bounds as tensors of x's dtype: Keras turns a Python float into float32, and its type
    # promotion (ops.maximum, ops.where, ...) maps float64 to float32 outside TensorFlow.
    lo_t = ops.convert_to_tensor(lo, dtype=x.dtype)
    hi_t = ops.convert_to_tensor(hi, dtype=x.dtype)
    return x + ops.stop_gradient(ops.clip(x, lo_t, hi_t) - x)


def _readable(x: Any) -> torch.Tensor | None:
    """``x`` as a detached torch tensor if its values can be read now; None while a backend traces."""
    backend = keras.backend.backend()
    if backend == "torch":
        return None if torch.compiler.is_compiling() else x.detach()
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():
            return None
    elif backend == "jax":
        import jax

        if isinstance(x, jax.core.Tracer):
            return None
    elif backend != "numpy":
        return None
    return torch.from_numpy(np.array(ops.convert_to_numpy(x)))


def _check_rate_eagerly(rate: Any, *, upper: float | None, penalty: str) -> None:
    r = _readable(rate)
    if r is not None:
        _check_rate(r, upper=upper, penalty=penalty)


class _Regularizer(keras.regularizers.Regularizer):
    """Base: ``penalty(x) = weight · value(x)``; ``__call__`` returns what Keras must receive so that,
    after its division by the batch (if any), ``model.losses`` holds ``penalty(x)``."""

    def __init__(self, weight: float = 1.0, *, unit_dim: int = -1, check: bool = True) -> None:
        self.weight = _check_weight(weight)
        if isinstance(unit_dim, bool) or not isinstance(unit_dim, int):
            raise TypeError(f"unit_dim must be an int, got {type(unit_dim).__name__}")
        self.unit_dim = unit_dim
        self.check = bool(check)

    def value(self, x: Any) -> Any:
        """The unweighted penalty of activations ``x``, a scalar in the reduction dtype."""
        raise NotImplementedError

    def penalty(self, x: Any) -> Any:
        """The term that ends up in ``model.losses``: actsparse's PyTorch penalty of ``x``."""
        return self.value(ops.convert_to_tensor(x)) * self.weight

    def __call__(self, x: Any) -> Any:
        x = ops.convert_to_tensor(x)
        out = self.penalty(x)
        if KERAS_DIVIDES_BY_BATCH and len(x.shape) > 0:
            # Keras divides this by ops.shape(x)[0] (Layer.__call__); undo it so that the penalty's
            # own batch convention holds.
            out = out * ops.cast(ops.shape(x)[0], out.dtype)
        return out

    def get_config(self) -> dict[str, Any]:
        return {"weight": self.weight, "unit_dim": self.unit_dim, "check": self.check}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class _RateRegularizer(_Regularizer):
    """A divergence between a target rate ρ and each unit's rate ρ̂_j, summed over units."""

    def __init__(
        self,
        target: float,
        weight: float = 1.0,
        *,
        unit_dim: int = -1,
        eps: float = F.DEFAULT_EPS,
        check: bool = True,
    ) -> None:
        super().__init__(weight, unit_dim=unit_dim, check=check)
        self._check_target(target)
        self.target = float(target)
        F.check_probability("eps", eps)
        self.eps = float(eps)

    def _check_target(self, target: float) -> None:
        F.check_probability("target ρ", target)

    def rate(self, x: Any) -> Any:
        """ρ̂ ``(units,)`` in the reduction dtype."""
        return _mean(ops.cast(x, _compute_dtype(x)), _reduce_axes(x, self.unit_dim))

    def value(self, x: Any) -> Any:
        return self.divergence(self.rate(x))

    def divergence(self, r: Any) -> Any:
        raise NotImplementedError

    def _bernoulli(self, r: Any, penalty: str) -> Any:
        if self.check:
            _check_rate_eagerly(r, upper=1.0 + 1e-6, penalty=penalty)
        rho = self.target
        r = _clamp_straight_through(r, self.eps, 1.0 - self.eps)
        return ops.sum(rho * ops.log(rho / r) + (1 - rho) * ops.log((1 - rho) / (1 - r)))

    def get_config(self) -> dict[str, Any]:
        return {"target": self.target, **super().get_config(), "eps": self.eps}


@keras.saving.register_keras_serializable(package="actsparse")
class BernoulliKL(_RateRegularizer):
    """β Σ_j KL(ρ ‖ ρ̂_j), ρ̂_j the mean activation: the sparse-autoencoder penalty (Ng, CS294A, p.14–15).

    For activations in [0, 1] (``activation="sigmoid"``). Not divided by the batch: the same value
    as ``actsparse.BernoulliKL(target, weight=weight)``.

    Args:
        target: ρ in (0, 1).
        weight: β ≥ 0.
        unit_dim: the unit axis (``-1``: Keras' ``channels_last``).
        eps: ρ̂ is clamped straight-through into ``[eps, 1 − eps]``.
        check: raise ``ValueError`` for NaN/Inf, negative or > 1 rates when the backend runs eagerly.
    """

    def divergence(self, r: Any) -> Any:
        return self._bernoulli(r, "BernoulliKL")


@keras.saving.register_keras_serializable(package="actsparse")
class PoissonKL(_RateRegularizer):
    """β Σ_j [ρ log(ρ/ρ̂_j) − ρ + ρ̂_j]: the generalised KL, for unbounded activations ≥ 0 (ReLU).

    ``target`` is any ρ > 0. Not divided by the batch, as ``actsparse.PoissonKL``.
    """

    def _check_target(self, target: float) -> None:
        F.check_positive("target ρ", target)

    def divergence(self, r: Any) -> Any:
        if self.check:
            _check_rate_eagerly(r, upper=None, penalty="PoissonKL")
        rho = self.target
        r = _clamp_straight_through(r, self.eps, float("inf"))
        return ops.sum(rho * ops.log(rho / r) - rho + r)


@keras.saving.register_keras_serializable(package="actsparse")
class FrequencyKL(_RateRegularizer):
    """β Σ_j KL(ρ ‖ f̂_j), f̂_j the fraction of samples with ``a > threshold``: an L0-style penalty.

    f̂_j has actsparse's straight-through pseudo-gradient (``functional.activation_frequency``,
    Rajamanoharan et al. 2024, eq. 11): the value is the exact frequency, and each element with
    ``|a − θ| < bandwidth/2`` receives ``+1/bandwidth`` (times the mean's ``1/count``). Written as
    ``H + (s − stop_gradient(s))`` with ``s = clip((a − θ)/ε, −½, ½)``; unlike actsparse's kernel,
    an element exactly on an edge ``|a − θ| = ε/2`` also receives the gradient (a set of measure 0).

    Args:
        target: ρ in (0, 1), the desired firing frequency.
        weight: β.
        threshold: θ, a float; a unit fires when ``a > θ``.
        bandwidth: ε > 0, the width of the pseudo-gradient window around θ.
        eps: clamp of f̂; default ``min(0.01, target/2)``, as ``actsparse.FrequencyKL``.
        unit_dim, check: as :class:`BernoulliKL`.
    """

    def __init__(
        self,
        target: float,
        weight: float = 1.0,
        threshold: float = 0.0,
        *,
        bandwidth: float = F.DEFAULT_BANDWIDTH,
        unit_dim: int = -1,
        eps: float | None = None,
        check: bool = True,
    ) -> None:
        F.check_probability("target ρ", target)
        if eps is None:
            eps = min(1e-2, target / 2)  # why: see actsparse.FrequencyKL
        super().__init__(target, weight, unit_dim=unit_dim, eps=eps, check=check)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a float (a Keras regularizer holds no tensors), "
                            f"got {type(threshold).__name__}")
        self.threshold = float(threshold)
        F.check_positive("bandwidth", bandwidth)
        self.bandwidth = float(bandwidth)

    def rate(self, x: Any) -> Any:
        cd = _compute_dtype(x)
        axes = _reduce_axes(x, self.unit_dim)
        x = ops.cast(x, cd)
        fired = ops.cast(ops.greater(x, self.threshold), cd)  # H(a − θ)
        u = (x - self.threshold) / self.bandwidth
        # d surrogate / d a = (1/ε)·1{|u| ≤ 1/2}: actsparse's rectangle kernel (which excludes the
        # two edges |u| = 1/2 exactly). nan_to_num first, so that a NaN or infinite activation gets
        # zero gradient, as in actsparse, instead of turning the value into NaN.
        half = ops.convert_to_tensor(0.5, dtype=cd)
        surrogate = ops.clip(ops.nan_to_num(u, nan=1.0), -half, half)
        # fired + (s − stop_gradient(s)): the value is exactly H, the gradient that of s
        fired = fired + (surrogate - ops.stop_gradient(surrogate))
        return _mean(fired, axes)

    def divergence(self, r: Any) -> Any:
        return self._bernoulli(r, "FrequencyKL")

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "threshold": self.threshold, "bandwidth": self.bandwidth}


@keras.saving.register_keras_serializable(package="actsparse")
class L1(_Regularizer):
    """λ Σ|a| / batch (batch = ``a.shape[0]``): the activity L1 of ``actsparse.L1``, on every Keras 3.

    Args:
        weight: λ ≥ 0.
        check: raise ``ValueError`` if the value is NaN/Inf when the backend runs eagerly.
    """

    def __init__(self, weight: float = 1.0, *, check: bool = True) -> None:
        super().__init__(weight, check=check)

    def value(self, x: Any) -> Any:
        cd = _compute_dtype(x)
        if len(x.shape) < 1:
            raise ValueError("activations must have a batch axis, got a scalar")
        batch = ops.cast(ops.shape(x)[0], cd)
        out = ops.sum(ops.absolute(ops.cast(x, cd))) / batch
        if self.check:
            v = _readable(out)
            if v is not None and not bool(torch.isfinite(v)):
                check_finite_result(v, _readable(x))
        return out

    def get_config(self) -> dict[str, Any]:
        return {"weight": self.weight, "check": self.check}
