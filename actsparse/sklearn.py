"""A scikit-learn transformer that learns a sparse code: ``Pipeline([("sae", SparseAutoencoderTransformer()), ...])``.

:class:`SparseAutoencoderTransformer` wraps :class:`~actsparse.models.SparseAutoencoder` in the
scikit-learn estimator API. ``fit`` trains with the library's own trainer,
:func:`actsparse.train.train` on a :class:`~actsparse.config.TrainConfig` built from the
constructor's arguments (there is no second training loop), so every hyperparameter means what it
means for ``actsparse train``. ``transform`` returns the dense hidden code ``(n_samples, hidden)``,
``inverse_transform`` decodes it.

scikit-learn >= 1.6 (the ``sklearn`` extra) is imported here, at module import time; the core
package never imports this module.
"""

from __future__ import annotations

import numbers
import re
from typing import Any, Literal

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_array, check_is_fitted

try:  # the estimator API of scikit-learn >= 1.6 (validate_data, __sklearn_tags__)
    from sklearn.utils.validation import validate_data
except ImportError as err:  # pragma: no cover - depends on the installed version
    import sklearn

    from .config import install_hint

    raise ImportError(f"actsparse.sklearn needs scikit-learn >= 1.6, found {sklearn.__version__}: "
                      f"{install_hint('sklearn')}") from err

from .config import ConfigError, TrainConfig
from .metrics import fvu
from .train import train

__all__ = ["SparseAutoencoderTransformer"]

_DTYPES = {"float32": (np.float32, torch.float32), "float64": (np.float64, torch.float64)}


def _flag_to_param(message: str) -> str:
    """TrainConfig's errors name CLI flags (``--batch-size``); here they are parameters (``batch_size``)."""
    return re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), message)


class SparseAutoencoderTransformer(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Learn a sparse autoencoder on ``X`` and use its hidden code as features.

    The arguments are :class:`~actsparse.config.TrainConfig`'s fields of the same names (see
    ``actsparse train --help``); only the defaults differ, chosen for arbitrary real-valued
    features rather than for [0, 1] image patches: a linear decoder, ReLU units with an L1
    penalty, 200 full-batch L-BFGS iterations, and no held-out split. Scale the features first
    (``StandardScaler``) as for any neural network.

    Args:
        hidden: number of hidden units, the output dimension (``d_sae``). Default 64.
        activation: ``relu`` (default), ``sigmoid``, ``topk``, ``batchtopk``, ``jumprelu`` or ``ksparse``.
        k: active units per sample for ``topk``/``batchtopk``/``ksparse``. Default None.
        decoder: ``linear`` (default) or ``sigmoid`` output units (inputs in [0, 1]).
        tied: tie the decoder to the encoder's transpose. Default False.
        penalty: sparsity penalty name (``l1``, default; ``kl``, ``poisson_kl``, ``frequency_kl``,
            ``l2``, ``hoyer``) or None.
        target: target ρ of the KL penalties. Default 0.05.
        weight: the penalty's coefficient β or λ. Default 1e-3.
        weight_decay: λ of ``(λ/2) Σ‖W‖²``, weights only. Default 0.
        optimizer: ``lbfgs`` (full batch, default), ``adam`` or ``sgd``.
        iterations: L-BFGS iterations. Default 200.
        epochs: passes over the data for ``adam``/``sgd``. Default 10.
        batch_size: minibatch size for ``adam``/``sgd``. Default 256.
        lr: learning rate for ``adam``/``sgd``. Default 1e-3.
        auxk: AuxK loss on this many dead latents (``topk``), or None (default).
        validation: fraction of ``X`` held out for the validation metrics in ``metrics_``. Default 0.
        seed: random seed of the initialisation, split and shuffling. Default 0. ``fit`` leaves
            the caller's global torch random state as it found it.
        dtype: ``float32`` (default) or ``float64``, the precision of the model and of the output
            of ``transform``.
        device: where to train and keep the model: ``cpu`` (default), ``cuda``, ``cuda:N`` or
            ``auto`` (as ``actsparse train --device``). ``transform`` moves its input there and
            returns NumPy arrays; a model pickled on a GPU unpickles only where that GPU exists.

    Attributes:
        model_: the trained :class:`~actsparse.models.SparseAutoencoder` (eval mode, on ``device``).
        components_: the decoder atoms ``(hidden, n_features_in_)``: row j is what unit j adds to
            the reconstruction (as ``PCA.components_``).
        metrics_: final training metrics (``fvu``, ``l0``, ``fraction_dead``, ...), from
            :func:`actsparse.train.evaluate`.
        n_iter_: optimiser steps taken.
        n_features_in_, feature_names_in_: as every scikit-learn estimator.
    """

    def __init__(
        self,
        hidden: int = 64,
        *,
        activation: Literal["sigmoid", "relu", "topk", "batchtopk", "jumprelu", "ksparse"] = "relu",
        k: int | None = None,
        decoder: Literal["linear", "sigmoid"] = "linear",
        tied: bool = False,
        penalty: str | None = "l1",
        target: float = 0.05,
        weight: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: Literal["lbfgs", "adam", "sgd"] = "lbfgs",
        iterations: int = 200,
        epochs: int = 10,
        batch_size: int = 256,
        lr: float = 1e-3,
        auxk: int | None = None,
        validation: float = 0.0,
        seed: int = 0,
        dtype: Literal["float32", "float64"] = "float32",
        device: str = "cpu",
    ) -> None:
        # scikit-learn's contract: __init__ stores the arguments as given, and fit validates them
        self.hidden = hidden
        self.activation = activation
        self.k = k
        self.decoder = decoder
        self.tied = tied
        self.penalty = penalty
        self.target = target
        self.weight = weight
        self.weight_decay = weight_decay
        self.optimizer = optimizer
        self.iterations = iterations
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.auxk = auxk
        self.validation = validation
        self.seed = seed
        self.dtype = dtype
        self.device = device

    # ------------------------------------------------------------------ configuration
    def _dtypes(self) -> tuple[type, torch.dtype]:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        return _DTYPES[self.dtype]

    def _train_config(self) -> TrainConfig:
        """The :class:`TrainConfig` these parameters describe; its validation is the only one."""
        values: dict[str, Any] = {}
        for f in ("hidden", "activation", "k", "decoder", "tied", "penalty", "target", "weight", "weight_decay",
                  "optimizer", "iterations", "epochs", "batch_size", "lr", "auxk", "validation", "seed",
                  "device"):
            v = getattr(self, f)
            # grid searches hand over NumPy scalars; TrainConfig checks for Python ints and floats
            if isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)):
                v = int(v)
            elif isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)):
                v = float(v)
            values[f] = v
        # no files, figures, progress bar or periodic checkpoints: the estimator keeps the model
        values |= {"plots": False, "progress": False, "checkpoint_every": 0, "name": type(self).__name__}
        try:
            return TrainConfig(**values)
        except ConfigError as err:
            raise ValueError(f"{type(self).__name__}: {_flag_to_param(str(err))}") from err

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None) -> SparseAutoencoderTransformer:
        """Train the autoencoder on ``X`` ``(n_samples, n_features)``; ``y`` is ignored.

        Raises:
            ValueError: invalid parameters (named as here), or ``X`` that is not a finite 2-D
                numeric array with at least 2 samples.
        """
        np_dtype, torch_dtype = self._dtypes()
        cfg = self._train_config()
        X = validate_data(self, X, dtype=np_dtype, ensure_min_samples=2)
        x = torch.tensor(X, dtype=torch_dtype)  # a copy: X may be a read-only memory map; train() moves it
        # train() seeds the global torch RNGs (for a reproducible run); a fit must not change the caller's.
        # The CUDA generators are saved too when training may use them (saving them initialises CUDA)
        gpus = [] if self.device == "cpu" or not torch.cuda.is_available() else list(range(torch.cuda.device_count()))
        with torch.random.fork_rng(devices=gpus):
            result = train(cfg, x)
        self.model_ = result.model.eval()
        self.metrics_ = dict(result.metrics)
        self.n_iter_ = int(result.metrics.get("steps", 0))
        self.components_ = self.model_.atoms.detach().cpu().numpy().copy()
        return self

    # ------------------------------------------------------------------ using
    def _tensor(self, a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """``a`` as a new tensor on the model's device (a copy: ``a`` may be a read-only memory map)."""
        return torch.tensor(a, dtype=dtype, device=self.model_.b_dec.device)

    @property
    def _n_features_out(self) -> int:
        """Output width for ``get_feature_names_out`` (``sparseautoencodertransformer0``, ...)."""
        return self.components_.shape[0]

    def transform(self, X) -> np.ndarray:
        """The dense hidden code ``(n_samples, hidden)`` of ``X`` ``(n_samples, n_features_in_)``, in eval mode."""
        check_is_fitted(self)
        np_dtype, torch_dtype = self._dtypes()
        X = validate_data(self, X, dtype=np_dtype, reset=False)
        with torch.no_grad():
            code = self.model_.encode(self._tensor(X, torch_dtype))
        return code.cpu().numpy()

    def inverse_transform(self, X) -> np.ndarray:
        """Decode a code ``(n_samples, hidden)`` back to ``(n_samples, n_features_in_)``."""
        check_is_fitted(self)
        np_dtype, torch_dtype = self._dtypes()
        Z = check_array(X, dtype=np_dtype)
        if Z.shape[1] != self.components_.shape[0]:
            raise ValueError(f"X has {Z.shape[1]} features, but {type(self).__name__}.inverse_transform is "
                             f"expecting {self.components_.shape[0]} (the number of hidden units)")
        with torch.no_grad():
            return self.model_.decode(self._tensor(Z, torch_dtype)).cpu().numpy()

    def score(self, X, y=None) -> float:
        """Fraction of the variance of ``X`` that the reconstruction explains, ``1 − FVU``
        (higher is better, as scikit-learn's model selection expects); ``y`` is ignored."""
        check_is_fitted(self)
        np_dtype, torch_dtype = self._dtypes()
        X = validate_data(self, X, dtype=np_dtype, reset=False)
        with torch.no_grad():
            x = self._tensor(X, torch_dtype)
            return 1.0 - float(fvu(x, self.model_.decode(self.model_.encode(x))))  # the trainer's FVU, in float64

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # transform's output has the model's precision, whatever the input's was
        tags.transformer_tags.preserves_dtype = [self.dtype] if self.dtype in _DTYPES else []
        tags.input_tags.allow_nan = False
        return tags

