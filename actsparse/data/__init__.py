"""Data sources for ``actsparse train`` (nothing is downloaded at run time).

``load_data(cfg)`` returns a :class:`Dataset` for ``cfg.data``, which is one of:

* ``patches`` — random patches of the natural photographs scikit-learn ships (the default);
* ``digits`` — scikit-learn's 1,797 8×8 digits, scaled to [0, 1];
* ``synthetic`` — sparse combinations of known atoms (ground truth for MMCS);
* ``ground-truth`` or ``ground-truth:KEY=VALUE,...`` — known features with Zipfian firing, a
  hierarchy and correlated firing (:class:`~actsparse.data.ground_truth.GroundTruth`; the keys are
  its arguments, the defaults :data:`GROUND_TRUTH_DEFAULTS`), for MCC/F1 against the truth;
* a folder of images, given as its path or as ``folder:DIR`` — random ``patch_size`` patches of
  the images, normalised as ``patches`` (:mod:`actsparse.data.images`);
* an MNIST-format IDX file: a name ending in ``.idx``, ``.idx3``, ``-ubyte``, each optionally
  followed by ``.gz`` (``train-images-idx3-ubyte.gz``; :mod:`actsparse.data.idx`);
* ``torchvision:NAME:ROOT`` — the training split of ``torchvision.datasets.NAME`` already stored
  under ``ROOT`` (needs torchvision, imported only here; ``download=False``);
* an array file ``.npy``/``.npz``/``.pt``/``.safetensors``/``.csv`` of shape ``(samples, features)``;
  a ``PATH.npy`` with ``PATH.features.npy`` beside it (and ``PATH.codes.npy``, as
  :meth:`GroundTruth.save <actsparse.data.ground_truth.GroundTruth.save>` writes) comes with its
  true features (and codes);
* ``shards:DIR`` — a finished activation store (:mod:`actsparse.data.shards`, written by
  ``actsparse cache-activations``); training streams it in minibatches (``x`` is a sample);
* ``model:NAME`` — one layer's activations streamed from a model's forward, with no cache on disk
  (:mod:`actsparse.data.model_stream`; ``cfg.layer``, ``tokens``, ``context``, ``buffer``,
  ``token_file``, ``bos``, ``positions``); ``x`` is a sample.

Sources with image samples (digits, IDX images, torchvision grey images, patches) set
``Dataset.image_shape`` so that figures show the filters as tiles.
"""

from __future__ import annotations

import difflib
import math
import pickle
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import MODEL_PREFIX
from ._limits import MAX_BYTES_ENV, MissingDependency, one_line
from .ground_truth import GroundTruth, load_true_features, truth_paths
from .idx import is_idx_path, load_idx, read_idx
from .images import folder_patches
from .synthetic import SyntheticDictionary, make_synthetic

__all__ = [
    "Dataset", "load_data", "load_array", "load_torchvision", "read_idx", "load_idx", "folder_patches",
    "make_synthetic", "SyntheticDictionary", "MissingDependency", "MAX_BYTES_ENV", "torchvision_install_hint",
    "digits_array", "GroundTruth", "GROUND_TRUTH_DEFAULTS", "ground_truth_source", "IndexedRows",
]

TORCHVISION_PREFIX = "torchvision:"
FOLDER_PREFIX = "folder:"
#: Named sources built in (anything else is a path or a ``prefix:`` spec).
BUILTIN_SOURCES = ("patches", "digits", "synthetic", "ground-truth")
GROUND_TRUTH_PREFIX = "ground-truth"
#: ``--data ground-truth``: 2,048 features in 128 dims, 16 active per sample on average, Zipfian
#: firing (exponent 0.5: from 18 % of samples down to 0.4 %), 64 parents with 4 children each (a
#: child fires only with its parent), correlated roots (ρ = 0.1), magnitudes |N(1, 0.15²)|: the
#: kind of data of SynthSAEBench (Chanin et al. 2026), at a size a laptop trains in a minute.
GROUND_TRUTH_DEFAULTS: dict[str, Any] = {
    "n_features": 2048, "d": 128, "mean_active": 16.0, "zipf_exponent": 0.5, "hierarchy": (64, 4, 2),
    "correlation": 0.1, "magnitude_std": 0.15,
}
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
        true_features: ``(n, features)`` ground-truth atoms (synthetic data), for MMCS and MCC.
        truth: the :class:`~actsparse.data.ground_truth.GroundTruth` that drew ``x``
            (``ground-truth`` data): fresh held-out samples with their codes, for F1.
        true_codes: ``(samples, n)`` the true codes of ``x`` (a ``.npy`` saved with its codes).
        stream: for a source too large for memory (``shards:DIR``, ``model:NAME``), the
            :class:`~actsparse.train.TrainingStream` that training reads in minibatches (a
            :class:`~actsparse.data.shards.ShardStore`, a
            :class:`~actsparse.data.model_stream.ModelActivationStream`); ``x`` is then a sample of
            ``STREAM_SAMPLE`` rows of it.
        value_range: ``(lo, hi)``, the smallest and largest value of ``x`` (set by
            :func:`load_data`; for a streamed store, of its sample). A sigmoid decoder outputs
            (0, 1), so it can only reconstruct data with ``0 <= lo`` and ``hi <= 1``
            (:attr:`in_unit_interval`).
    """

    x: Tensor
    description: str
    image_shape: tuple[int, int] | None = None
    true_features: Tensor | None = None
    stream: Any = None
    value_range: tuple[float, float] | None = None
    truth: Any = None
    true_codes: Tensor | None = None

    @property
    def in_unit_interval(self) -> bool | None:
        """Whether every value lies in [0, 1] (what a sigmoid decoder can output); None if unknown."""
        if self.value_range is None:
            return None
        return 0.0 <= self.value_range[0] and self.value_range[1] <= 1.0


def _tensor_to_array(p: Path, t: Tensor) -> np.ndarray:
    """A tensor read from a ``.pt`` file as a NumPy array, refusing what ``.npy`` would refuse too."""
    if t.is_complex():
        raise ValueError(f"{p} must hold real numbers, got dtype {str(t.dtype).removeprefix('torch.')} "
                         "(complex values would lose their imaginary part): store the real part, or the real and "
                         "imaginary parts as separate features")
    if t.dtype == torch.bool:
        raise ValueError(f"{p} must hold numbers, got dtype {str(t.dtype).removeprefix('torch.')}")
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _unreadable_pt(p: Path, err: BaseException) -> ValueError:
    """One line for a ``.pt`` file ``torch.load(weights_only=True)`` refuses: the reason only, never
    torch's advice to load it unsafely."""
    text = str(err)
    m = re.search(r"WeightsUnpickler error:\s*([^\n]*)", text)
    reason = m.group(1) if m else next((ln for ln in text.splitlines() if ln.strip()), type(err).__name__)
    reason = one_line(re.sub(r"\s*(Please use|Check the documentation|You can use|In PyTorch 2\.6).*$", "", reason))
    if "weights_only" in reason:
        reason = type(err).__name__
    return ValueError(f"{p} is not a readable tensor file ({reason}), so actsparse cannot read it: only tensors "
                      "saved with torch.save (or a dict of them) are read; save the data with torch.save(tensor, path) "
                      "or as .npy")


def load_array(path: str | Path) -> np.ndarray:
    """Read a 2-D array from .npy, .npz (first array), .pt, .safetensors (first tensor) or .csv.

    Every format is held to the same rules: a 2-D array of real numbers (integers or floats; not
    complex, not bool), with at least one sample and one feature. A ``.pt`` file is read with
    ``torch.load(weights_only=True)`` only: anything else in it is refused, never unpickled.

    A ``.npy`` is memory-mapped copy-on-write: its pages are read as they are used and held once,
    in the page cache; writes to the array stay in this process. Do not rewrite the file in place
    while the array is in use (a truncated mapping faults): write a new file and rename it over.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            # memory-mapped copy-on-write: the page cache holds the data once (read() would hold them
            # twice, in the cache and in the process), pages are read as they are used, and a float32
            # C-order array becomes a tensor without a copy; writes stay in this process
            arr = np.load(p, mmap_mode="c", allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if not z.files:
                    raise ValueError(f"{p} holds no arrays")
                arr = z[z.files[0]]
        elif suffix == ".pt":
            try:
                obj = torch.load(p, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError,
                    ImportError, IndexError, KeyError, UnicodeDecodeError) as err:
                raise _unreadable_pt(p, err) from err
            if isinstance(obj, dict):
                obj = next(iter(obj.values()), None)
            if not isinstance(obj, Tensor):
                raise ValueError(f"{p} does not hold a tensor")
            arr = _tensor_to_array(p, obj)
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
    except (ValueError, OSError, RuntimeError, EOFError, TypeError, pickle.UnpicklingError) as err:
        if isinstance(err, ValueError) and str(err).startswith(("unsupported", str(p))):
            raise
        raise ValueError(f"cannot read {p}: {one_line(err)}") from err
    arr = np.asarray(arr)  # a memmap as a plain array over the same pages
    if arr.ndim != 2:
        raise ValueError(f"{p} must hold a 2-D array (samples, features), got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{p} must hold real numbers, got dtype {arr.dtype} (complex values would lose their "
                         "imaginary part): store the real part, or the real and imaginary parts as separate features")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{p} must hold numbers, got dtype {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{p} holds no samples or no features: shape {arr.shape}")
    return arr


#: torchvision's minor release built for each torch minor release (torch 2.X pairs with 0.(X+15)).
TORCHVISION_FOR_TORCH = {"2.9": "0.24", "2.13": "0.28", "2.14": "0.29"}


def torchvision_install_hint(torch_version: str | None = None) -> str:
    """The pip command that installs the torchvision matching the installed torch without
    replacing it (``--no-deps``: pip cannot then pull another, e.g. CUDA, torch)."""
    version = torch_version or torch.__version__
    release, _, local = version.partition("+")
    parts = release.split(".")
    minor = ".".join(parts[:2])
    tv = TORCHVISION_FOR_TORCH.get(minor)
    index = f" --index-url https://download.pytorch.org/whl/{local}" if local.startswith(("cpu", "cu", "rocm")) else ""
    if tv is None:
        return f"pip install torchvision==<the release built for torch {release}> --no-deps{index}"
    patch = parts[2] if len(parts) > 2 and parts[2].isdigit() else "0"
    return f"pip install torchvision=={tv}.{patch} --no-deps{index}"


def load_torchvision(spec: str) -> tuple[np.ndarray, tuple[int, int] | None]:
    """The training split of a torchvision data set already on disk: ``spec`` is
    ``torchvision:NAME:ROOT`` (e.g. ``torchvision:MNIST:~/data``). Returns ``(x, image_shape)``:
    ``x`` is ``(samples, features)`` float32 (bytes scaled to [0, 1]); ``image_shape`` is
    ``(h, w)`` for grey images, None otherwise (colour images are flattened with their channels).

    Raises:
        ValueError: a malformed spec, or a name torchvision does not have.
        ModuleNotFoundError: torchvision is not installed or does not match torch (a
            :class:`~actsparse.data._limits.MissingDependency`, also a ``RuntimeError``; its message
            gives the ``pip install --no-deps`` command for the installed torch).
        FileNotFoundError: the data set is not under ROOT (nothing is downloaded).
    """
    parts = spec.split(":", 2)
    if len(parts) != 3 or parts[0] + ":" != TORCHVISION_PREFIX or not parts[1] or not parts[2]:
        raise ValueError(f"a torchvision source is torchvision:NAME:ROOT (e.g. torchvision:MNIST:data), got {spec!r}")
    _, name, root = parts
    try:
        import torchvision.datasets as tvd
    except ModuleNotFoundError as err:
        raise MissingDependency(
            f"the source {spec!r} needs torchvision, which is not installed: {torchvision_install_hint()} "
            f"(torchvision must match the installed torch {torch.__version__} exactly; --no-deps keeps pip from "
            "replacing torch). For MNIST without torchvision, pass its IDX file: --data train-images-idx3-ubyte.gz",
            name="torchvision"
        ) from err
    except (ImportError, RuntimeError, OSError, AttributeError) as err:  # installed, but built for another torch
        raise MissingDependency(
            f"torchvision is installed but cannot be imported ({one_line(err, 160)}); it must match the installed "
            f"torch {torch.__version__} exactly: {torchvision_install_hint()} (--no-deps keeps pip from replacing "
            "torch)", name="torchvision"
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


def digits_array(shift: int = 0) -> np.ndarray:
    """scikit-learn's 1,797 8×8 digits ``(samples, 64)`` float64, scaled from 0..16 to [0, 1].

    With ``shift`` = s > 0, each digit also appears moved by every (dy, dx) with |dy|, |dx| ≤ s
    pixels (the pixels moved in are 0): ``(2s + 1)² × 1,797`` samples, the unmoved ones first.
    The digits are small and few: 100 units with the classic settings (ρ = 0.01, λ = 1e-4) fit
    single digits and their pixel noise; moved copies make each unit see a stroke in several places.
    """
    if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift < 8:
        raise ValueError(f"shift must be an int in 0..7 (pixels), got {shift!r}")
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as err:
        from ..config import install_hint

        raise MissingDependency(f"the digits data set needs scikit-learn: {install_hint('cli')}",
                                name="sklearn") from err
    x = load_digits().data / 16.0
    if shift == 0:
        return x
    img = x.reshape(-1, 8, 8)
    moves = [(0, 0)] + [(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1) if dy or dx]
    out = np.zeros((len(moves),) + img.shape)
    for k, (dy, dx) in enumerate(moves):  # (2s+1)² slices, not a loop over digits
        out[k, :, max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)] = \
            img[:, max(-dy, 0):8 + min(-dy, 0), max(-dx, 0):8 + min(-dx, 0)]
    return out.reshape(-1, 64)


def _float32_tensor(arr: np.ndarray) -> Tensor:
    """``arr`` as a float32 tensor, sharing its memory when it is float32 already (a file's data
    are not held twice while they load)."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not arr.flags.writeable:  # torch tensors are writable: copy read-only buffers
        arr = arr.copy()
    return torch.from_numpy(arr)


def count_not_finite(x: Tensor, chunk_rows: int | None = None) -> int:
    """NaN and ±Inf entries of ``x``, counted ``chunk_rows`` rows at a time (default: about 2²⁰
    values). Each chunk's temporaries are about 3× its size: ``isfinite`` takes an ``abs`` copy,
    and a ``sum`` of booleans an int64 copy (``count_nonzero`` takes none); chunks of 65,536 rows
    of 512 floats took 290 MiB."""
    rows = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)
    if chunk_rows is None:
        chunk_rows = max(1, (1 << 20) // max(1, rows.shape[1]))
    return sum(int(torch.count_nonzero(rows[i:i + chunk_rows].isfinite().logical_not_()))
               for i in range(0, rows.shape[0], chunk_rows))


class IndexedRows:
    """Rows ``index`` of ``x`` ``(n, d)``, in that order, gathered a chunk at a time: ``x[index]``
    without the copy.

    :func:`actsparse.train.train` keeps an in-memory data set's training and validation splits as
    these, rows of the one copy of the data (``x[index]`` would hold a second copy of them). They
    have what a batched pass over the data uses, so :func:`~actsparse.evaluation.evaluate` and
    :func:`~actsparse.metrics.total_variance` take them as they take a tensor, with the same results
    to the bit: ``shape``, ``dtype``, ``device``, ``split(n)`` (an iterator over the chunks that
    ``x[index].split(n)`` holds, each gathered when it is reached), :meth:`gather` and indexing by a
    slice or a 1-D index tensor (more rows of ``x``, still not copied). :meth:`tensor` makes the copy.
    Rows are gathered with ``index_select`` (the same values as ``x[index]``; 3.7× faster for rows
    of 64 floats).
    """

    def __init__(self, x: Tensor, index: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise TypeError(f"IndexedRows takes a tensor of rows, got {type(x).__name__}")
        if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype != torch.long:
            raise TypeError("IndexedRows takes a 1-D int64 index tensor")
        self.x, self.index = x, index.to(x.device)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.index.shape[0], *self.x.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    def __len__(self) -> int:
        return self.index.shape[0]

    def dim(self) -> int:
        return self.x.dim()

    def numel(self) -> int:
        return math.prod(self.shape)

    def split(self, size: int) -> Iterator[Tensor]:
        """The rows ``size`` at a time, as new tensors (the chunks of ``x[index].split(size)``)."""
        return (self.x.index_select(0, i) for i in self.index.split(size))

    def gather(self, positions: Tensor) -> Tensor:
        """Rows ``positions`` (positions in this view) of ``x``, as a new tensor."""
        return self.x.index_select(0, self.index[positions.to(self.index.device)])

    def __getitem__(self, key: slice | Tensor) -> IndexedRows:
        if isinstance(key, Tensor):
            key = key.to(self.index.device)
        elif not isinstance(key, slice):
            raise TypeError(f"IndexedRows is indexed by a slice or a 1-D index tensor, got {type(key).__name__}")
        return IndexedRows(self.x, self.index[key])

    def tensor(self) -> Tensor:
        """The rows as one new tensor ``x[index]``: a copy of them."""
        return self.x.index_select(0, self.index)

    def __repr__(self) -> str:
        return f"IndexedRows({self.shape[0]} of {self.x.shape[0]} rows, shape {tuple(self.shape)}, {self.dtype})"


def load_data(cfg) -> Dataset:
    """The :class:`Dataset` a :class:`~actsparse.config.TrainConfig` names (see module docstring)."""
    kind = cfg.data
    if kind == "patches":
        from .patches import natural_patches

        x = natural_patches(cfg.samples, cfg.patch_size, cfg.whiten, cfg.seed)
        desc = f"{cfg.samples} {cfg.patch_size}x{cfg.patch_size} natural-image patches (whiten={cfg.whiten})"
        ds = Dataset(torch.tensor(x, dtype=torch.float32), desc, (cfg.patch_size, cfg.patch_size))
    elif kind == "digits":
        x = digits_array()
        ds = Dataset(torch.tensor(x, dtype=torch.float32), "scikit-learn digits (8x8, scaled to [0, 1])", (8, 8))
    elif kind == "synthetic":
        syn = make_synthetic(cfg.samples, seed=cfg.seed)
        ds = Dataset(syn.x, f"{cfg.samples} synthetic sparse combinations of {syn.features.shape[0]} atoms",
                     None, syn.features)
    elif kind == GROUND_TRUTH_PREFIX or kind.startswith(GROUND_TRUTH_PREFIX + ":"):
        truth = ground_truth_source(kind, cfg.seed)
        x, _ = truth.sample(cfg.samples, cfg.seed)
        h = truth.hierarchy
        about = (f"{truth.n_features} true features in {truth.d} dims, {truth.mean_active:g} active per sample, "
                 f"Zipf exponent {truth.zipf_exponent:g}, hierarchy {'/'.join(map(str, h)) if h else 'none'}, "
                 f"correlation {truth.correlation:g}")
        ds = Dataset(x, f"{cfg.samples} ground-truth samples ({about})", None, truth.features, truth=truth)
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
    elif kind.startswith(MODEL_PREFIX):
        from .model_stream import stream_from_config

        stream = stream_from_config(cfg)  # training streams it; x is a sample for metrics and figures
        ds = Dataset(stream.sample(STREAM_SAMPLE, seed=cfg.seed), stream.description, stream=stream)
    elif kind.startswith(FOLDER_PREFIX) or (kind and Path(kind).is_dir()):
        folder = kind[len(FOLDER_PREFIX):] if kind.startswith(FOLDER_PREFIX) else kind
        if not folder:
            raise ValueError("an image-folder source is folder:DIR, got an empty DIR")
        if (Path(folder) / "index.json").is_file() and not kind.startswith(FOLDER_PREFIX):
            raise ValueError(f"{folder} is a shard store of activations, not a folder of images: pass --data "
                             f"{SHARDS_PREFIX}{folder}")
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
        ds = Dataset(_float32_tensor(arr), f"{arr.shape[0]} samples from {kind}", shape)
        _attach_saved_truth(ds, kind)
    bad = count_not_finite(ds.x)
    if bad:
        raise ValueError(f"the data ({ds.description}) contain {bad} NaN/Inf values")
    if ds.x.shape[0] < 2:
        raise ValueError(f"the data ({ds.description}) need at least 2 samples, got {ds.x.shape[0]}")
    ds.value_range = (float(ds.x.min()), float(ds.x.max()))
    return ds


def ground_truth_source(spec: str, seed: int = 0) -> GroundTruth:
    """The :class:`GroundTruth` of ``ground-truth`` or ``ground-truth:KEY=VALUE,...`` (keys: its
    arguments; ``hierarchy=64/4/2`` or ``hierarchy=none``), over :data:`GROUND_TRUTH_DEFAULTS`."""
    import inspect

    settings = dict(GROUND_TRUTH_DEFAULTS)
    body = spec[len(GROUND_TRUTH_PREFIX) + 1:] if spec.startswith(GROUND_TRUTH_PREFIX + ":") else ""
    valid = [n for n in inspect.signature(GroundTruth).parameters if n != "seed"]
    for item in filter(None, (t.strip() for t in body.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"--data {spec}: {item!r} is not KEY=VALUE with a GroundTruth argument{hint}; valid: "
                             f"{', '.join(valid)}")
        settings[key] = _parse_setting(key, value.strip(), spec)
    return GroundTruth(**settings, seed=seed)


def _parse_setting(key: str, value: str, spec: str) -> Any:
    if key == "hierarchy":
        if value.lower() in ("none", "off", ""):
            return None
        try:
            return tuple(int(v) for v in value.split("/"))
        except ValueError:
            raise ValueError(f"--data {spec}: hierarchy is n_roots/branching/depth (e.g. 64/4/2) or none, "
                             f"got {value!r}") from None
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--data {spec}: {key} must be a number, got {value!r}") from None


def _attach_saved_truth(ds: Dataset, path: str) -> None:
    """The true features (and codes) saved beside a ``.npy`` data file, if there are any."""
    if not path.lower().endswith(".npy"):
        return
    paths = truth_paths(path)
    if not paths["features"].is_file():
        return
    ds.true_features = load_true_features(path)
    if paths["codes"].is_file():
        # memory-mapped as the data: the metrics read only their first rows (a float32 file is not copied)
        codes = np.load(paths["codes"], mmap_mode="c", allow_pickle=False)
        if codes.ndim != 2 or codes.shape != (ds.x.shape[0], ds.true_features.shape[0]):
            raise ValueError(f"the true codes {paths['codes']} have shape {codes.shape}, not (samples, features) = "
                             f"{(ds.x.shape[0], ds.true_features.shape[0])}")
        ds.true_codes = _float32_tensor(np.asarray(codes))
    ds.description += f", with {ds.true_features.shape[0]} true features"
