"""Read and write sparse autoencoders in the checkpoint layouts of eai-sparsify and SAELens.

A loaded checkpoint becomes an :class:`~actsparse.models.SparseAutoencoder` whose ``encode`` and
``decode`` give the original package's outputs on the same input; a saved one loads in that
package. Neither package is needed: the layouts are written out below from their save code, and
only ``safetensors`` (the ``cli`` extra) is used.

**sparsify** (eai-sparsify 1.3.3, ``sparsify/sparse_coder.py``: ``SparseCoder.save_to_disk`` /
``load_from_disk``; config fields from ``sparsify/config.py``: ``SparseCoderConfig``). A folder with

- ``cfg.json``: ``activation`` (``"topk"``; ``"groupmax"`` is not supported here),
  ``expansion_factor``, ``normalize_decoder``, ``num_latents`` (0: ``d_in · expansion_factor``),
  ``k``, ``multi_topk``, ``skip_connection``, ``transcode``, and ``d_in``;
- ``sae.safetensors``: ``encoder.weight`` ``(d_sae, d_in)``, ``encoder.bias`` ``(d_sae,)``,
  ``W_dec`` ``(d_sae, d_in)``, ``b_dec`` ``(d_in,)`` (``W_skip`` ``(d_in, d_in)`` with a skip
  connection: not supported here). The model's dtype is that of the tensors.

Forward: ``top-k of ReLU(encoder(x − b_dec))``, then ``code @ W_dec + b_dec``; a transcoder
(``transcode``) does not subtract ``b_dec``.

**SAELens** (sae-lens 6.54.12, ``sae_lens/saes/sae.py``: ``SAE.save_model`` / ``load_from_disk``,
``SAEConfig``; ``sae_lens/saes/{standard,topk,jumprelu,gated}_sae.py``; older configs as read by
``sae_lens/loading/pretrained_sae_loaders.py``: ``handle_pre_6_0_config``). A folder with

- ``cfg.json``: ``d_in``, ``d_sae``, ``dtype`` (``"float32"``, ``"torch.bfloat16"``, ...),
  ``device``, ``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``,
  ``metadata`` (``sae_lens_version``, ``hook_name``, ...), ``architecture`` (``"standard"``,
  ``"topk"``, ``"jumprelu"``, ``"gated"``), and for ``topk`` ``k`` and ``rescale_acts_by_decoder_norm``
  (before 6.0: ``activation_fn_str``/``activation_fn`` ``"topk"`` with ``activation_fn_kwargs.k``);
- ``sae_weights.safetensors``: ``W_enc`` ``(d_in, d_sae)``, ``b_enc`` ``(d_sae,)``, ``W_dec``
  ``(d_sae, d_in)``, ``b_dec`` ``(d_in,)``, and for ``jumprelu`` ``threshold`` ``(d_sae,)``
  (older files: ``log_threshold``); ``gated`` has no ``b_enc`` but ``b_gate``, ``r_mag`` and
  ``b_mag``, each ``(d_sae,)``. Tensors are cast to the config's ``dtype``.

Forward, with ``x' = x − b_dec·apply_b_dec_to_input`` and ``z = x' @ W_enc + b_enc``: ReLU(z)
(``standard``), the top k of it with ReLU (``topk``; with ``rescale_acts_by_decoder_norm`` the
pre-activations are scaled by ‖W_dec_j‖ and the code divided by it before decoding: loaded here
with the norms folded into the weights), ``z·H(z − θ)`` on ReLU(z) (``jumprelu``), or for
``gated`` ``1[x' @ W_enc + b_gate > 0] · ReLU(x' @ (W_enc · exp(r_mag)) + b_mag)``; then
``code @ W_dec + b_dec``.

actsparse stores the same matrices as ``W_enc`` ``(d_sae, d_in)`` (SAELens' ``W_enc`` transposed),
``b_enc``, ``W_dec`` ``(d_sae, d_in)`` (atoms as rows, as both packages), ``b_dec``; ``pre_bias``
is ``apply_b_dec_to_input`` / not ``transcode``; a JumpReLU threshold below 0 is stored as 0 (the
same function). A ``gated`` SAE is actsparse's ``gated`` activation: its gate is the SAE's own
encoder, so ``b_gate`` is ``b_enc``, and ``r_mag``, ``b_mag`` are ``activation.r_mag``,
``activation.b_mag``.

A Matryoshka SAE (``matryoshka`` prefix sizes) is at inference the SAE with its activation, so it
is written as that activation's SAE (BatchTopK: ``jumprelu`` with the learned inference threshold,
as SAELens saves its own ``matryoshka_batchtopk`` SAEs; TopK: ``topk``, for sparsify too). The
prefix sizes shape only the training loss and are not part of either package's model: SAELens
keeps them as information in ``metadata.training_architecture_details.matryoshka_widths`` (with
``metadata.training_architecture`` ``"matryoshka_batchtopk"``, as its ``save_inference_model``),
where :func:`save_saelens` writes them and :func:`load_saelens` reads them back into
``model.matryoshka``; sparsify's ``cfg.json`` has no place for them, so :func:`save_sparsify`
drops them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .models import SparseAutoencoder
from .models.activations import BatchTopK, Gated, JumpReLU, TopK

__all__ = [
    "CheckpointError",
    "detect_layout",
    "load_sae",
    "load_saelens",
    "load_sparsify",
    "save_saelens",
    "save_sparsify",
]

Layout = Literal["actsparse", "sparsify", "saelens"]

SPARSIFY_CFG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
ACTSPARSE_CFG, ACTSPARSE_WEIGHTS = "config.json", "model.safetensors"

#: The SAELens config layout that :func:`save_saelens` writes. SAELens reads a config without a
#: ``sae_lens_version`` through its pre-6.0 converter, so the version of the layout is stated.
SAELENS_LAYOUT_VERSION = "6.0.0"

#: ``cfg.json`` ``dtype`` strings (SAELens' ``constants.DTYPE_MAP``: with or without ``torch.``).
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

#: ``normalize_activations`` values under which a SAELens SAE itself computes nothing: the
#: scaling (or whitening) is applied to the activations by the caller or folded into the weights.
#: ``layer_norm`` and ``constant_norm_rescale`` normalise each input inside the SAE: not supported.
_SAELENS_PASSIVE_NORMS = ("none", "expected_average_only_in", "covariance_whitening")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and the key."""


# ---------------------------------------------------------------------------------------- reading
def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_tensors(file: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing")
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own SafetensorError for damaged files
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err


def _cfg_int(cfg: dict[str, Any], file: Path, key: str, *, minimum: int = 1) -> int:
    if key not in cfg:
        raise CheckpointError(f"{file}: missing key {key!r}")
    v = cfg[key]
    if isinstance(v, float) and v.is_integer():  # JSON writers may turn 16 into 16.0
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise CheckpointError(f"{file}: {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def _cfg_bool(cfg: dict[str, Any], file: Path, key: str, default: bool) -> bool:
    v = cfg.get(key, default)
    if not isinstance(v, bool):
        raise CheckpointError(f"{file}: {key!r} must be true or false, got {v!r}")
    return v


def _cfg_str(cfg: dict[str, Any], file: Path, key: str, default: str | None) -> str | None:
    """``cfg[key]`` (``default`` when absent or null), which must be a string: a list or an object
    would otherwise reach comparisons and dict look-ups that fail with a TypeError, not a message."""
    v = cfg.get(key)
    if v is None:
        return default
    if not isinstance(v, str):
        raise CheckpointError(f"{file}: {key!r} must be a string, got {type(v).__name__} {v!r}")
    return v


def _check_finite(file: Path, key: str, t: Tensor, *, allow_neg_inf: bool = False, after: str = "") -> None:
    """Refuse NaN or ±inf weights: they give NaN codes and reconstructions, not an error, much later.

    ``allow_neg_inf``: a log-threshold may be −inf (threshold 0). ``after``: how the tensor was
    derived from the file's (e.g. a cast), for the message."""
    bad = torch.isnan(t) | (t == torch.inf) if allow_neg_inf else ~torch.isfinite(t)
    if bool(bad.any()):
        n = int(bad.sum())
        raise CheckpointError(f"{file}: tensor {key!r} has {n} non-finite value(s) (NaN or inf){after}; "
                              "refusing to load it")


class _Tensors:
    """The tensors of one file, taken by name and checked for shape; leftovers are an error."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.tensors = _read_tensors(file)

    def take(self, key: str, shape: tuple[int, ...], dims: str) -> Tensor:
        if key not in self.tensors:
            raise CheckpointError(f"{self.file}: missing key {key!r} (found: {', '.join(sorted(self.tensors))})")
        t = self.tensors.pop(key)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{self.file}: {key!r} has shape {tuple(t.shape)}, expected {shape} = {dims}")
        if not t.is_floating_point():
            raise CheckpointError(f"{self.file}: {key!r} must be floating point, got {t.dtype}")
        _check_finite(self.file, key, t)
        return t

    def pop(self, key: str) -> Tensor | None:
        return self.tensors.pop(key, None)

    def done(self) -> None:
        if self.tensors:
            raise CheckpointError(f"{self.file}: unexpected key(s) {', '.join(sorted(self.tensors))}: this layout "
                                  "has features that actsparse's SparseAutoencoder cannot represent")


def _build(d_in: int, d_sae: int, activation: str, tensors: dict[str, Tensor], *, k: int | None, pre_bias: bool,
           unit_norm: bool, dtype: torch.dtype, device, file: Path,
           matryoshka: tuple[int, ...] | None = None) -> SparseAutoencoder:
    """A SparseAutoencoder holding ``tensors`` (actsparse names and shapes), without a random init.

    Built on the meta device and filled with ``load_state_dict(assign=True)``: no memory or time is
    spent initialising weights that are overwritten, and the caller's RNG is untouched. ``file``
    (the weights file) names the source when a tensor is not finite after the cast to ``dtype``."""
    model = SparseAutoencoder(d_in, d_sae, activation, k=k, decoder="linear", pre_bias=pre_bias,
                              recon_loss="mse", matryoshka=matryoshka, device="meta", dtype=dtype)
    # set after construction: the constructor would renormalise the meta weights, and a norm on the
    # meta device imports torch's compiler stack (seconds) for nothing
    model.unit_norm_decoder = unit_norm
    state = {name: t.to(device=device, dtype=dtype).contiguous().clone() for name, t in tensors.items()}
    for name, t in state.items():  # the file's values were finite; a cast to a narrower dtype may overflow
        _check_finite(file, name, t, allow_neg_inf=name.endswith("log_threshold"),
                      after=f" once cast to {dtype} (out of its range)")
    state["samples_since_fired"] = torch.zeros(d_sae, dtype=torch.long, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _nonnegative_threshold(threshold: Tensor) -> Tensor:
    # SAELens computes ReLU(z)·H(z − θ), which for θ <= 0 is ReLU(z) = z·H(z − 0): actsparse's
    # z·H(z − θ) with θ clamped at 0 is exactly that
    return threshold.clamp_min(0)


# ---------------------------------------------------------------------------------------- sparsify
def load_sparsify(path: str | Path, *, device=None, dtype: torch.dtype | None = None) -> SparseAutoencoder:
    """Load a sparsify checkpoint folder (``cfg.json`` + ``sae.safetensors``).

    Args:
        path: the folder (one hookpoint's folder of a sparsify run).
        device: where to put the model. Default: CPU.
        dtype: cast the weights to it. Default: the file's dtype (as sparsify).

    Returns:
        A ``topk`` :class:`~actsparse.models.SparseAutoencoder` with ``pre_bias`` (not for a
        transcoder) and ``unit_norm_decoder = normalize_decoder``, in eval mode.

    Raises:
        FileNotFoundError: a missing file. CheckpointError: a bad config value (wrong type or
        value), a missing key, a wrong shape, a weight that is NaN or infinite (in the file or
        after the cast to ``dtype``), or a feature that actsparse does not have (groupmax, skip
        connection).
    """
    path = Path(path)
    cfg_file, weights_file = path / SPARSIFY_CFG, path / SPARSIFY_WEIGHTS
    cfg = _read_json(cfg_file)
    d_in, k = _cfg_int(cfg, cfg_file, "d_in"), _cfg_int(cfg, cfg_file, "k")
    num_latents = _cfg_int(cfg, cfg_file, "num_latents", minimum=0) if "num_latents" in cfg else 0
    d_sae = num_latents or d_in * _cfg_int(cfg, cfg_file, "expansion_factor")
    activation = _cfg_str(cfg, cfg_file, "activation", "topk")
    if activation != "topk":
        raise CheckpointError(f"{cfg_file}: 'activation' {activation!r} is not supported (only 'topk')")
    if _cfg_bool(cfg, cfg_file, "skip_connection", False):
        raise CheckpointError(f"{cfg_file}: 'skip_connection' true is not supported (SparseAutoencoder has no W_skip)")
    if k > d_sae:
        raise CheckpointError(f"{cfg_file}: 'k' {k} is larger than the number of latents {d_sae}")
    transcode = _cfg_bool(cfg, cfg_file, "transcode", False)
    # multi_topk only adds a training loss (the FVU with 4k latents): the forward is the same

    dims = f"(d_sae={d_sae}, d_in={d_in})"
    t = _Tensors(weights_file)
    tensors = {"W_enc": t.take("encoder.weight", (d_sae, d_in), dims),
               "b_enc": t.take("encoder.bias", (d_sae,), "(d_sae,)"),
               "W_dec": t.take("W_dec", (d_sae, d_in), dims),
               "b_dec": t.take("b_dec", (d_in,), "(d_in,)")}
    t.done()
    model = _build(d_in, d_sae, "topk", tensors, k=k, pre_bias=not transcode,
                   unit_norm=_cfg_bool(cfg, cfg_file, "normalize_decoder", True),
                   dtype=dtype or tensors["W_enc"].dtype, device=device, file=weights_file)
    return model.eval()


def _check_savable(model: SparseAutoencoder, fmt: str) -> None:
    if not isinstance(model, SparseAutoencoder):
        raise TypeError(f"save_{fmt} takes an actsparse SparseAutoencoder, got {type(model).__name__}")
    if model.decoder_kind != "linear":
        raise CheckpointError(f"{fmt} decoders are linear; this model has a {model.decoder_kind} decoder")


def save_sparsify(model: SparseAutoencoder, path: str | Path) -> Path:
    """Write ``model`` as a sparsify checkpoint folder (``cfg.json`` + ``sae.safetensors``) that
    ``SparseCoder.load_from_disk`` reads. Creates ``path``; overwrites those two files.

    The model must be a ``topk`` SAE with a linear decoder. sparsify always subtracts ``b_dec``
    before encoding, so a model without ``pre_bias`` is written with ``W_enc·b_dec`` folded into
    ``encoder.bias`` (same outputs to rounding). A tied model is written with ``W_dec = W_enc``.
    Weights keep the model's dtype. Returns ``path``.
    """
    _check_savable(model, "sparsify")
    if type(model.activation) is not TopK:
        raise CheckpointError(f"sparsify SAEs are TopK; this model's activation is {type(model.activation).__name__} "
                              "(save_saelens writes ReLU, TopK, JumpReLU, Gated and BatchTopK SAEs)")
    with torch.no_grad():
        w_enc, b_enc, b_dec = model.W_enc.detach(), model.b_enc.detach(), model.b_dec.detach()
        if not model.pre_bias:
            # W (x − b_dec) + (b + W b_dec) = W x + b, in float64 so that only the final rounding is lost
            b_enc = (b_enc.double() + w_enc.double() @ b_dec.double()).to(b_enc.dtype)
        tensors = {"encoder.weight": w_enc, "encoder.bias": b_enc, "W_dec": model.atoms.detach(), "b_dec": b_dec}
    d_in, d_sae = model.d_in, model.d_hidden
    cfg = {  # SparseCoderConfig's fields in its order, then d_in (as save_to_disk)
        "activation": "topk",
        # sparsify ignores expansion_factor when num_latents > 0; keep it consistent where it can be
        "expansion_factor": max(1, d_sae // d_in),
        "normalize_decoder": bool(model.unit_norm_decoder),
        "num_latents": d_sae,
        "k": int(model.k),
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d_in,
    }
    return _write(Path(path), SPARSIFY_CFG, cfg, SPARSIFY_WEIGHTS, tensors)


# ---------------------------------------------------------------------------------------- SAELens
def _saelens_dtype(cfg: dict[str, Any], file: Path) -> torch.dtype:
    name = cfg.get("dtype", "float32")
    # a list or an object is unhashable: test the type before the look-up
    key = name.removeprefix("torch.") if isinstance(name, str) else None
    if key not in _DTYPES:
        raise CheckpointError(f"{file}: 'dtype' {name!r} is not one of {', '.join(_DTYPES)} "
                              "(optionally prefixed 'torch.')")
    return _DTYPES[key]


def _saelens_architecture(cfg: dict[str, Any], file: Path) -> tuple[str, int | None]:
    """``(architecture, k)``, also for configs written before SAELens 6.0 (``activation_fn_str``)."""
    act = _cfg_str(cfg, file, "activation_fn" if "activation_fn" in cfg else "activation_fn_str", None)
    kwargs = cfg.get("activation_fn_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{file}: 'activation_fn_kwargs' must be a JSON object (e.g. {{\"k\": 32}}), "
                              f"got {type(kwargs).__name__} {kwargs!r}")
    arch = _cfg_str(cfg, file, "architecture", None)
    if arch is None or (arch == "standard" and act == "topk"):
        # pre-6.0: the architecture field was added later; a "standard" SAE with a topk activation is a TopK SAE
        arch = "topk" if act == "topk" and kwargs.get("k") is not None else "standard"
    if arch == "standard" and act not in (None, "relu"):
        raise CheckpointError(f"{file}: activation {act!r} is not supported (standard SAEs: 'relu')")
    supported = ("standard", "topk", "jumprelu", "gated")
    if arch not in supported:
        hint = " (save the inference model: save_inference_model writes it as 'jumprelu')" \
            if arch in ("batchtopk", "matryoshka_batchtopk") else ""
        raise CheckpointError(f"{file}: 'architecture' {arch!r} is not supported{hint}; "
                              f"supported: {', '.join(supported)}")
    k = None
    if arch == "topk":
        k = _cfg_int(cfg if "k" in cfg else kwargs, file, "k")
    return arch, k


_MATRYOSHKA_KEY = "metadata.training_architecture_details.matryoshka_widths"


def _saelens_matryoshka(cfg: dict[str, Any], file: Path, d_sae: int) -> tuple[int, ...] | None:
    """The Matryoshka prefix sizes of ``metadata.training_architecture_details.matryoshka_widths``
    (SAELens' ``save_inference_model`` of a ``matryoshka_batchtopk`` SAE; :func:`save_saelens`),
    or None when the config has none."""
    meta = cfg.get("metadata")
    details = meta.get("training_architecture_details") if isinstance(meta, dict) else None
    widths = details.get("matryoshka_widths") if isinstance(details, dict) else None
    if widths is None:
        return None
    if isinstance(widths, list):
        widths = [int(w) if isinstance(w, float) and w.is_integer() else w for w in widths]
    if not isinstance(widths, list) or not widths or \
            any(isinstance(w, bool) or not isinstance(w, int) or not 0 < w <= d_sae for w in widths) or \
            any(a >= b for a, b in zip(widths, widths[1:])):
        raise CheckpointError(f"{file}: {_MATRYOSHKA_KEY!r} must be a non-empty, strictly increasing list of "
                              f"ints in (0, d_sae={d_sae}], got {widths!r}")
    return tuple(widths)


def load_saelens(path: str | Path, *, device=None, dtype: torch.dtype | None = None) -> SparseAutoencoder:
    """Load a SAELens checkpoint folder (``cfg.json`` + ``sae_weights.safetensors``), as written
    by ``SAE.save_model`` or a training SAE's ``save_inference_model`` (and configs from before 6.0).

    Args:
        path: the folder.
        device: where to put the model. Default: CPU.
        dtype: cast the weights to it. Default: the config's ``dtype`` (as SAELens).

    Returns:
        A :class:`~actsparse.models.SparseAutoencoder` in eval mode: ``relu`` for ``standard``,
        ``topk`` for ``topk`` (with ``rescale_acts_by_decoder_norm`` the decoder norms are folded
        into the encoder, so the atoms are unit norm and ``unit_norm_decoder`` is set), ``jumprelu``
        for ``jumprelu``, ``gated`` for ``gated`` (``b_gate`` as ``b_enc``); ``pre_bias =
        apply_b_dec_to_input``; ``matryoshka`` from ``metadata.training_architecture_details.
        matryoshka_widths`` when the config has them (d_sae appended when the last is smaller).

    Raises:
        FileNotFoundError: a missing file. CheckpointError: a bad config value (wrong type or
        value, e.g. a ``dtype`` that is not a dtype name, an ``activation_fn_kwargs`` that is not
        an object), an unsupported architecture or input normalisation, a missing or unexpected
        key, a wrong shape, a weight that is NaN or infinite (in the file or after the cast to
        ``dtype``).
    """
    path = Path(path)
    cfg_file, weights_file = path / SAELENS_CFG, path / SAELENS_WEIGHTS
    cfg = _read_json(cfg_file)
    d_in, d_sae = _cfg_int(cfg, cfg_file, "d_in"), _cfg_int(cfg, cfg_file, "d_sae")
    arch, k = _saelens_architecture(cfg, cfg_file)
    if k is not None and k > d_sae:
        raise CheckpointError(f"{cfg_file}: 'k' {k} is larger than d_sae {d_sae}")
    norm = cfg.get("normalize_activations", "none")
    if isinstance(norm, bool):  # before 6.0: true meant expected_average_only_in
        norm = "expected_average_only_in" if norm else "none"
    elif norm is not None:
        norm = _cfg_str(cfg, cfg_file, "normalize_activations", "none")
    if norm is not None and norm not in _SAELENS_PASSIVE_NORMS:
        raise CheckpointError(f"{cfg_file}: 'normalize_activations' {norm!r} normalises each input inside the SAE, "
                              f"which actsparse does not; supported: {', '.join(_SAELENS_PASSIVE_NORMS)}")
    file_dtype = _saelens_dtype(cfg, cfg_file)
    pre_bias = _cfg_bool(cfg, cfg_file, "apply_b_dec_to_input", True)
    rescale = arch == "topk" and _cfg_bool(cfg, cfg_file, "rescale_acts_by_decoder_norm", False)
    matryoshka = _saelens_matryoshka(cfg, cfg_file, d_sae)

    dims_enc, dims_dec = f"(d_in={d_in}, d_sae={d_sae})", f"(d_sae={d_sae}, d_in={d_in})"
    t = _Tensors(weights_file)
    w_enc = t.take("W_enc", (d_in, d_sae), dims_enc).to(file_dtype)
    # a Gated SAE has no b_enc: its gate bias b_gate is the bias of actsparse's pre-activations
    b_enc = t.take("b_gate" if arch == "gated" else "b_enc", (d_sae,), "(d_sae,)").to(file_dtype)
    w_dec = t.take("W_dec", (d_sae, d_in), dims_dec).to(file_dtype)
    b_dec = t.take("b_dec", (d_in,), "(d_in,)").to(file_dtype)
    scaling = t.pop("scaling_factor")  # files of SAELens < 6 carried one; all ones means "none"
    if scaling is not None and not bool((scaling == 1).all()):
        raise CheckpointError(f"{weights_file}: 'scaling_factor' (finetuning scaling) other than 1 is not supported")
    tensors = {"b_dec": b_dec}
    if arch == "jumprelu":
        if "threshold" in t.tensors:
            theta = t.take("threshold", (d_sae,), "(d_sae,)").to(file_dtype)
        else:  # files before the threshold was stored directly (SAELens' process_state_dict_for_loading)
            theta = t.take("log_threshold", (d_sae,), "(d_sae,)").to(file_dtype).exp()
        tensors["activation.threshold"] = _nonnegative_threshold(theta)
    elif arch == "gated":
        tensors["activation.r_mag"] = t.take("r_mag", (d_sae,), "(d_sae,)").to(file_dtype)
        tensors["activation.b_mag"] = t.take("b_mag", (d_sae,), "(d_sae,)").to(file_dtype)
    t.done()
    if rescale:
        # TopK on z·‖W_dec_j‖ and code/‖W_dec_j‖ @ W_dec equal TopK on z' and code @ W_dec' with
        # W_enc_j, b_enc_j scaled by ‖W_dec_j‖ and W_dec_j unit norm (SAELens' fold_W_dec_norm)
        n = w_dec.double().norm(dim=1)
        w_enc = (w_enc.double() * n).to(file_dtype)
        b_enc = (b_enc.double() * n).to(file_dtype)
        w_dec = torch.where(n[:, None] > 0, w_dec.double() / n.clamp_min(1e-300)[:, None], 0.0).to(file_dtype)
    tensors |= {"W_enc": w_enc.t(), "b_enc": b_enc, "W_dec": w_dec}
    activation = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}[arch]
    model = _build(d_in, d_sae, activation, tensors, k=k, pre_bias=pre_bias, unit_norm=rescale,
                   dtype=dtype or file_dtype, device=device, file=weights_file, matryoshka=matryoshka)
    return model.eval()


def save_saelens(model: SparseAutoencoder, path: str | Path, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a SAELens checkpoint folder (``cfg.json`` + ``sae_weights.safetensors``)
    that ``SAE.load_from_disk`` reads. Creates ``path``; overwrites those two files.

    Args:
        model: a SparseAutoencoder with a linear decoder and a ``relu`` (written as ``standard``),
            ``topk``, ``jumprelu``, ``gated`` (``b_enc`` written as ``b_gate``, with ``r_mag`` and
            ``b_mag``) or trained ``batchtopk`` activation. BatchTopK at inference keeps the units
            above one threshold θ, so it is written as ``jumprelu`` with θ for every unit (as
            SAELens saves its BatchTopK SAEs). A Matryoshka SAE is written as its activation's
            SAE (its inference model), its prefix sizes in ``metadata.training_architecture_details
            .matryoshka_widths`` (information for SAELens, which builds no Matryoshka inference
            SAE; read back by :func:`load_saelens`).
        path: the folder.
        metadata: extra ``metadata`` entries for SAELens, e.g. ``{"model_name": "gpt2", "hook_name":
            "blocks.8.hook_resid_pre"}``.

    Returns ``path``.
    """
    _check_savable(model, "saelens")
    act = model.activation
    extra: dict[str, Any] = {}
    with torch.no_grad():
        tensors = {"W_enc": model.W_enc.detach().t(), "b_enc": model.b_enc.detach(),
                   "W_dec": model.atoms.detach(), "b_dec": model.b_dec.detach()}
        if type(act) is TopK:
            arch = "topk"
            extra = {"k": int(act.k), "rescale_acts_by_decoder_norm": False}
        elif isinstance(act, JumpReLU):
            arch = "jumprelu"
            tensors["threshold"] = act.threshold.detach()
        elif isinstance(act, Gated):
            # the gate is the SAE's own encoder: b_gate is b_enc (SAELens' GatedSAE has no b_enc)
            arch = "gated"
            tensors["b_gate"] = tensors.pop("b_enc")
            tensors |= {"r_mag": act.r_mag.detach(), "b_mag": act.b_mag.detach()}
        elif isinstance(act, BatchTopK):
            if bool(torch.isnan(act.threshold)):
                raise CheckpointError("this BatchTopK model has no inference threshold yet (train it first)")
            arch = "jumprelu"
            tensors["threshold"] = act.threshold.detach().to(model.b_enc.dtype).expand(model.d_hidden)
        elif isinstance(act, torch.nn.ReLU):
            arch = "standard"
        else:
            raise CheckpointError(f"SAELens has no {type(act).__name__} SAE; save_saelens writes ReLU ('standard'), "
                                  "TopK, JumpReLU, Gated and BatchTopK SAEs")
    dtype = model.W_enc.dtype
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"SAELens configs take {', '.join(_DTYPES)}; this model is {dtype}")
    from . import __version__

    meta = {"sae_lens_version": SAELENS_LAYOUT_VERSION, "sae_lens_training_version": None,
            "written_by": f"actsparse {__version__}"}
    sizes = getattr(model, "matryoshka", None)
    if sizes:  # where SAELens' save_inference_model keeps a matryoshka_batchtopk SAE's widths
        if isinstance(act, BatchTopK):
            meta["training_architecture"] = "matryoshka_batchtopk"
        meta["training_architecture_details"] = {"matryoshka_widths": [int(m) for m in sizes]} | \
            ({"k": int(act.k)} if isinstance(act, BatchTopK) else {})
    cfg = {  # SAEConfig's fields in its order, then the architecture's, then architecture (as to_dict)
        "d_in": model.d_in,
        "d_sae": model.d_hidden,
        "dtype": _DTYPE_NAMES[dtype],
        "device": model.W_enc.device.type,
        "apply_b_dec_to_input": bool(model.pre_bias),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta | (metadata or {}),
        **extra,
        "architecture": arch,
    }
    return _write(Path(path), SAELENS_CFG, cfg, SAELENS_WEIGHTS, tensors)


# ---------------------------------------------------------------------------------------- both
def _write(path: Path, cfg_name: str, cfg: dict[str, Any], weights_name: str, tensors: dict[str, Tensor]) -> Path:
    from safetensors.torch import save_file

    from .checkpoint import atomic_write  # a reader sees the old file or the new one, never half of one

    path.mkdir(parents=True, exist_ok=True)
    # own, contiguous CPU copies: safetensors refuses views that share storage (a tied W_dec = W_enc)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path / weights_name, lambda p: save_file(state, str(p)))
    atomic_write(path / cfg_name, lambda p: p.write_text(json.dumps(cfg)))
    return path


def detect_layout(path: str | Path) -> Layout:
    """Which checkpoint layout the folder ``path`` holds: ``actsparse`` (a run folder:
    ``config.json`` + ``model.safetensors``), ``saelens`` (``cfg.json`` + ``sae_weights.safetensors``)
    or ``sparsify`` (``cfg.json`` + ``sae.safetensors``). A file's folder is looked at.

    Raises:
        FileNotFoundError: ``path`` does not exist. CheckpointError: none of the three.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_file():
        p = p.parent
    if (p / ACTSPARSE_CFG).is_file() and (p / ACTSPARSE_WEIGHTS).is_file():
        return "actsparse"
    if (p / SAELENS_CFG).is_file() and (p / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (p / SPARSIFY_CFG).is_file() and (p / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    found = sorted(f.name for f in p.iterdir())[:12]
    raise CheckpointError(
        f"{p}: not a known checkpoint layout (found: {', '.join(found) or 'nothing'}). Expected an actsparse run "
        f"({ACTSPARSE_CFG} + {ACTSPARSE_WEIGHTS}), SAELens ({SAELENS_CFG} + {SAELENS_WEIGHTS}) or sparsify "
        f"({SPARSIFY_CFG} + {SPARSIFY_WEIGHTS}); a sparsify run keeps one such folder per hookpoint")


def load_sae(path: str | Path, *, device=None, dtype: torch.dtype | None = None) -> SparseAutoencoder:
    """Load a sparse autoencoder from a folder in any layout :func:`detect_layout` knows.

    An actsparse run folder goes through :func:`actsparse.train.load_checkpoint` (its model, which
    for ``--model stacked`` is a StackedAutoencoder); the others through :func:`load_saelens` or
    :func:`load_sparsify`. ``device`` and ``dtype`` as those; the model is in eval mode.

    Raises:
        FileNotFoundError, CheckpointError: as :func:`detect_layout` and the loaders.
        ValueError: an actsparse ``model.safetensors`` that is corrupt (its SHA-256 does not
        match), unreadable, or holds NaN or infinite weights (CheckpointError, a ValueError).
    """
    p = Path(path)
    layout = detect_layout(p)
    p = p.parent if p.is_file() else p
    if layout == "saelens":
        return load_saelens(p, device=device, dtype=dtype)
    if layout == "sparsify":
        return load_sparsify(p, device=device, dtype=dtype)
    from .train import load_checkpoint

    model, _ = load_checkpoint(p)  # verifies model.safetensors' SHA-256 (actsparse.weights)
    weights = p / ACTSPARSE_WEIGHTS
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    # a file that verifies can still hold NaN (an old file, or one written by other code): refuse it
    # as load_saelens and load_sparsify do, after the cast (which may overflow)
    after = f" once cast to {dtype} (out of its range)" if dtype is not None else ""
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            _check_finite(weights, name, t, allow_neg_inf=name.endswith("log_threshold"), after=after)
    return model.eval()

