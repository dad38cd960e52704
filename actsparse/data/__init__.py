"""Data sources for ``actsparse train`` (nothing is downloaded at run time).

``load_data(cfg)`` returns a :class:`Dataset` for ``cfg.data``: ``patches`` (embedded natural
images), ``digits`` (scikit-learn's 8×8 digits), ``synthetic`` (sparse ground truth), or a file
``.npy``/``.npz``/``.pt``/``.safetensors``/``.csv`` of shape ``(samples, features)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .synthetic import SyntheticDictionary, make_synthetic

__all__ = ["Dataset", "load_data", "load_array", "make_synthetic", "SyntheticDictionary"]


@dataclass
class Dataset:
    """Training data and what is known about it.

    Attributes:
        x: ``(samples, features)`` float tensor.
        description: one line for logs and ``metrics.json``.
        image_shape: ``(h, w)`` if each sample is an image (figures show filters as tiles).
        true_features: ``(n, features)`` ground-truth atoms (synthetic data), for MMCS.
    """

    x: Tensor
    description: str
    image_shape: tuple[int, int] | None = None
    true_features: Tensor | None = None


def load_array(path: str | Path) -> np.ndarray:
    """Read a 2-D array from .npy, .npz (first array), .pt, .safetensors (first tensor) or .csv."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if not z.files:
                    raise ValueError(f"{p} holds no arrays")
                arr = z[z.files[0]]
        elif suffix == ".pt":
            obj = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = next(iter(obj.values()), None)
            if not isinstance(obj, Tensor):
                raise ValueError(f"{p} does not hold a tensor")
            arr = obj.float().numpy()
        elif suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(p))
            if not tensors:
                raise ValueError(f"{p} holds no tensors")
            arr = next(iter(tensors.values()))
        elif suffix == ".csv":
            arr = np.loadtxt(p, delimiter=",", ndmin=2)
        else:
            raise ValueError(f"unsupported data file {p.name}: use .npy, .npz, .pt, .safetensors or .csv")
    except (ValueError, OSError, RuntimeError) as err:
        if isinstance(err, ValueError) and str(err).startswith(("unsupported", str(p))):
            raise
        raise ValueError(f"cannot read {p}: {err}") from err
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"{p} must hold a 2-D array (samples, features), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{p} must hold numbers, got dtype {arr.dtype}")
    return arr


def load_data(cfg) -> Dataset:
    """The :class:`Dataset` a :class:`~actsparse.config.TrainConfig` names (see module docstring)."""
    kind = cfg.data
    if kind == "patches":
        from .patches import natural_patches

        x = natural_patches(cfg.samples, cfg.patch_size, cfg.whiten, cfg.seed)
        desc = f"{cfg.samples} {cfg.patch_size}x{cfg.patch_size} natural-image patches (whiten={cfg.whiten})"
        ds = Dataset(torch.tensor(x, dtype=torch.float32), desc, (cfg.patch_size, cfg.patch_size))
    elif kind == "digits":
        try:
            from sklearn.datasets import load_digits
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError("the digits data set needs scikit-learn: pip install 'actsparse[cli]'") from err
        x = load_digits().data / 16.0
        ds = Dataset(torch.tensor(x, dtype=torch.float32), "scikit-learn digits (8x8, scaled to [0, 1])", (8, 8))
    elif kind == "synthetic":
        syn = make_synthetic(cfg.samples, seed=cfg.seed)
        ds = Dataset(syn.x, f"{cfg.samples} synthetic sparse combinations of {syn.features.shape[0]} atoms",
                     None, syn.features)
    else:
        arr = load_array(kind)
        side = int(math.isqrt(arr.shape[1]))
        shape = (side, side) if side * side == arr.shape[1] else None
        ds = Dataset(torch.tensor(arr, dtype=torch.float32), f"{arr.shape[0]} samples from {kind}", shape)
    bad = int((~torch.isfinite(ds.x)).sum())
    if bad:
        raise ValueError(f"the data ({ds.description}) contain {bad} NaN/Inf values")
    if ds.x.shape[0] < 2:
        raise ValueError(f"the data ({ds.description}) need at least 2 samples, got {ds.x.shape[0]}")
    return ds
