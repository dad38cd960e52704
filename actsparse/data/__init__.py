"""Data sources for ``actsparse train`` (nothing is downloaded at run time).

``load_data(cfg)`` returns a :class:`Dataset` for ``cfg.data``, which is one of:

* ``patches`` — random patches of the natural photographs scikit-learn ships (the default);
* ``digits`` — scikit-learn's 1,797 8×8 digits, scaled to [0, 1];
* ``synthetic`` — sparse combinations of known atoms (ground truth for MMCS);
* a folder of images, given as its path or as ``folder:DIR`` — random ``patch_size`` patches of
  the images, normalised as ``patches`` (:mod:`actsparse.data.images`);
* an MNIST-format IDX file: a name ending in ``.idx``, ``.idx3``, ``-ubyte``, each optionally
  followed by ``.gz`` (``train-images-idx3-ubyte.gz``; :mod:`actsparse.data.idx`);
* ``torchvision:NAME:ROOT`` — the training split of ``torchvision.datasets.NAME`` already stored
  under ``ROOT`` (needs torchvision, imported only here; ``download=False``);
* an array file ``.npy``/``.npz``/``.pt``/``.safetensors``/``.csv`` of shape ``(samples, features)``;
* ``shards:DIR`` — a finished activation store (:mod:`actsparse.data.shards`, written by
  ``actsparse cache-activations``); training streams it in minibatches (``x`` is a sample).

Sources with image samples (digits, IDX images, torchvision grey images, patches) set
``Dataset.image_shape`` so that figures show the filters as tiles.
"""

from __future__ import annotations

import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .idx import is_idx_path, load_idx, read_idx
from .images import folder_patches
from .synthetic import SyntheticDictionary, make_synthetic

__all__ = [
    "Dataset", "load_data", "load_array", "load_torchvision", "read_idx", "load_idx", "folder_patches",
    "make_synthetic", "SyntheticDictionary",
]

TORCHVISION_PREFIX = "torchvision:"
FOLDER_PREFIX = "folder:"
#: Named sources built in (anything else is a path or a ``prefix:`` spec).
BUILTIN_SOURCES = ("patches", "digits", "synthetic")
SHARDS_PREFIX = "shards:"
#: Rows of a streamed store held in memory for metrics and figures.
STREAM_SAMPLE = 65_536


@dataclass
class Dataset:
    """Training data and what is known about it.

    Attributes:
        x: ``(samples, features)`` float tensor.
        description: one line for logs and ``metrics.json``.
        image_shape: ``(h, w)`` if each sample is an image (figures show filters as tiles).
        true_features: ``(n, features)`` ground-truth atoms (synthetic data), for MMCS.
        stream: for a source too large for memory (``shards:DIR``), the
            :class:`~actsparse.data.shards.ShardStore` that training reads in minibatches; ``x``
            is then a sample of ``STREAM_SAMPLE`` rows of it.
    """

    x: Tensor
    description: str
    image_shape: tuple[int, int] | None = None
    true_features: Tensor | None = None
    stream: Any = None


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
            from safetensors import SafetensorError
            from safetensors.numpy import load_file

            try:
                tensors = load_file(str(p))
            except SafetensorError as err:  # not a ValueError: a damaged header, a cut-off file
                raise OSError(str(err)) from err
            if not tensors:
                raise ValueError(f"{p} holds no tensors")
            arr = next(iter(tensors.values()))
        elif suffix == ".csv":
            with warnings.catch_warnings():  # an empty file: the "no samples" error below says it
                warnings.filterwarnings("ignore", message="loadtxt: input contained no data")
                arr = np.loadtxt(p, delimiter=",", ndmin=2)
        else:
            raise ValueError(f"unsupported data file {p.name}: use .npy, .npz, .pt, .safetensors or .csv")
    except (ValueError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:  # garbage .pt: Unpickling
        if isinstance(err, ValueError) and str(err).startswith(("unsupported", str(p))):
            raise
        raise ValueError(f"cannot read {p}: {err}") from err
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"{p} must hold a 2-D array (samples, features), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{p} must hold numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{p} must hold real numbers, got dtype {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{p} holds no samples or no features: shape {arr.shape}")
    return arr


def load_torchvision(spec: str) -> tuple[np.ndarray, tuple[int, int] | None]:
    """The training split of a torchvision data set already on disk: ``spec`` is
    ``torchvision:NAME:ROOT`` (e.g. ``torchvision:MNIST:~/data``). Returns ``(x, image_shape)``:
    ``x`` is ``(samples, features)`` float32 (bytes scaled to [0, 1]); ``image_shape`` is
    ``(h, w)`` for grey images, None otherwise (colour images are flattened with their channels).

    Raises:
        ValueError: a malformed spec, or a name torchvision does not have.
        ModuleNotFoundError: torchvision is not installed.
        FileNotFoundError: the data set is not under ROOT (nothing is downloaded).
    """
    parts = spec.split(":", 2)
    if len(parts) != 3 or parts[0] + ":" != TORCHVISION_PREFIX or not parts[1] or not parts[2]:
        raise ValueError(f"a torchvision source is torchvision:NAME:ROOT (e.g. torchvision:MNIST:data), got {spec!r}")
    _, name, root = parts
    try:
        import torchvision.datasets as tvd
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"the source {spec!r} needs torchvision, which is not installed: pip install torchvision. "
            "For MNIST without torchvision, pass its IDX file: --data train-images-idx3-ubyte.gz"
        ) from err
    cls = getattr(tvd, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"torchvision.datasets has no data set {name!r} (e.g. MNIST, FashionMNIST, KMNIST, CIFAR10)")
    root = str(Path(root).expanduser())
    try:
        try:
            ds = cls(root, train=True, download=False)
        except TypeError:  # data sets without a train= flag
            ds = cls(root, download=False)
    except TypeError as err:
        raise ValueError(f"cannot build torchvision.datasets.{name}({root!r}, download=False): {err}") from err
    except RuntimeError as err:  # torchvision's "Dataset not found. You can use download=True ..."
        raise FileNotFoundError(
            f"torchvision {name} is not under {root} and nothing is downloaded here: {err}"
        ) from err
    data = getattr(ds, "data", None)
    if data is None or len(getattr(data, "shape", ())) < 2:  # no array attribute: stack the items
        data = np.stack([np.asarray(ds[i][0]) for i in range(len(ds))])
    arr = np.asarray(data)
    image_shape = (int(arr.shape[1]), int(arr.shape[2])) if arr.ndim == 3 else None
    x = arr.reshape(arr.shape[0], -1)
    return (x.astype(np.float32) / np.float32(255.0) if arr.dtype == np.uint8 else x.astype(np.float32)), image_shape


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
    elif kind.startswith(TORCHVISION_PREFIX):
        arr, shape = load_torchvision(kind)
        ds = Dataset(torch.from_numpy(arr), f"{arr.shape[0]} samples of {kind}", shape)
    elif kind.startswith(SHARDS_PREFIX):
        from .shards import ShardStore, describe_source

        if not kind[len(SHARDS_PREFIX):]:
            raise ValueError("a shard-store source is shards:DIR, got an empty DIR")
        store = ShardStore(kind[len(SHARDS_PREFIX):])
        about = describe_source(store.source)
        # training streams the store; x is a sample of it for metrics and figures
        ds = Dataset(store.sample(STREAM_SAMPLE, seed=cfg.seed),
                     f"{store.n_rows} rows (d={store.d}) of the shard store {store.directory}"
                     + (f" ({about})" if about else "") + ", streamed", stream=store)
    elif kind.startswith(FOLDER_PREFIX) or (kind and Path(kind).is_dir()):
        folder = kind[len(FOLDER_PREFIX):] if kind.startswith(FOLDER_PREFIX) else kind
        if not folder:
            raise ValueError("an image-folder source is folder:DIR, got an empty DIR")
        x, n_images = folder_patches(folder, cfg.samples, cfg.patch_size, cfg.whiten, cfg.seed)
        desc = (f"{cfg.samples} {cfg.patch_size}x{cfg.patch_size} patches of {n_images} images in {folder} "
                f"(whiten={cfg.whiten})")
        ds = Dataset(torch.tensor(x, dtype=torch.float32), desc, (cfg.patch_size, cfg.patch_size))
    elif is_idx_path(kind):
        arr, shape = load_idx(kind)
        ds = Dataset(torch.from_numpy(arr), f"{arr.shape[0]} samples from IDX file {kind}", shape)
    else:
        if not Path(kind).suffix and not Path(kind).exists():  # a mistyped source name, not a file name
            import difflib

            close = difflib.get_close_matches(kind, BUILTIN_SOURCES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FileNotFoundError(f"unknown data source {kind!r}{hint}: it is neither one of "
                                    f"{', '.join(BUILTIN_SOURCES)} nor an existing file or folder")
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
