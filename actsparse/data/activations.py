"""Activations of one named module of any PyTorch model (a plain ``nn.Module`` or a Hugging Face
transformers model), collected by a forward hook over a stream of inputs.

>>> for rows in collect_activations(model, "h.0.mlp", token_batches(tokens, 128, 32)):
...     rows.shape            # (n, d): one row per kept (sequence, position)

Why it is built this way:

* The hook is registered for each forward and removed in a ``finally`` right after it, and
  ``torch.no_grad()``/``eval()`` are entered and left around that forward only. A generator that
  held them across ``yield`` would leak grad mode and eval mode into the caller's code between
  batches, and leave a hook behind if the caller stopped iterating early.
* By default the forward stops at the hooked module (an exception raised in the hook and caught
  here), so the layers after it cost nothing; a module that holds the output of a following
  in-place layer (``ReLU(inplace=True)``) cannot then be modified either.
* Positions are filtered inside the hook, so only the kept rows are copied out of the model.

Nothing here downloads anything: :func:`tiny_gpt2` builds a small randomly initialised GPT-2 from
a config, and :func:`load_hf_model` honours ``HF_HUB_OFFLINE=1`` with ``local_files_only``.
transformers is an optional extra (from a clone: ``pip install -e '.[hf]'``;
released: ``pip install 'actsparse[hf]'``), imported inside the
functions that need it.
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..attach import find_targets, first_tensor
from ..config import install_hint
from ..progress import progress_bar
from ._limits import MissingDependency, one_line
from .shards import INDEX_NAME, ShardStore, ShardWriter, check_store_dir

__all__ = [
    "Positions", "collect_activations", "cache_activations", "resolve_layer", "parse_positions", "position_mask",
    "token_batches", "random_token_batches", "tiny_gpt2", "load_hf_model", "cache_model_activations", "check_device",
]

#: ``"all"``, ``"last"``, ``"drop_first"`` (drop the first real token of each sequence, e.g. BOS),
#: an ``int`` position (negative from the end) or a ``slice`` of positions (step > 0).
Positions = Union[str, int, slice]

Inputs = Union[Tensor, Mapping[str, Any], Iterable[Union[Tensor, Mapping[str, Any]]]]

_POSITION_NAMES = ("all", "last", "drop_first")
HF_EXTRA = install_hint("hf")


class _Stop(Exception):
    """Raised by the hook to end the forward once the hooked module has run."""


# --------------------------------------------------------------------------- layer names
def resolve_layer(model: nn.Module, layer: str | nn.Module | type) -> tuple[str, nn.Module]:
    """The one module ``layer`` names in ``model``: ``(qualified_name, module)``.

    ``layer`` is anything :func:`actsparse.find_targets` takes (a qualified name, a glob, a class,
    an instance) and must match exactly one module. A name that matches nothing is also tried:

    * without or with the model's ``base_model_prefix`` (Hugging Face: ``transformer.h.0`` on a
      ``GPT2Model`` is ``h.0``, and ``h.0`` on a ``GPT2LMHeadModel`` is ``transformer.h.0``);
    * as the unique suffix of a qualified name (``h.0.mlp`` is ``transformer.h.0.mlp``).

    Raises:
        KeyError: nothing matches; the message lists the closest names.
        ValueError: several modules match; the message lists them.
    """
    try:
        found = find_targets(model, layer)
    except KeyError as err:
        if not isinstance(layer, str) or any(ch in layer for ch in "*?["):
            raise
        found = _fallback_names(model, layer)
        if not found:
            raise err from None
    if len(found) > 1:
        names = ", ".join(repr(n) for n, _ in found[:10]) + (" ..." if len(found) > 10 else "")
        raise ValueError(f"{layer!r} matches {len(found)} modules of {type(model).__name__} ({names}); "
                         "activations are collected from one module: name it exactly")
    return found[0]


def _fallback_names(model: nn.Module, layer: str) -> list[tuple[str, nn.Module]]:
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", None)
    if isinstance(prefix, str) and prefix:
        for candidate in (layer[len(prefix) + 1:] if layer.startswith(prefix + ".") else None, f"{prefix}.{layer}"):
            if candidate and candidate in modules:
                return [(candidate, modules[candidate])]
    return [(n, m) for n, m in modules.items() if n.endswith("." + layer)]


# --------------------------------------------------------------------------- positions
def parse_positions(spec: str | int | slice) -> Positions:
    """Turn a command-line position spec into a :data:`Positions` value.

    ``"all"``, ``"last"``, ``"drop_first"`` (or ``"drop-first"``), an integer (``"-1"``), or a
    Python slice ``"start:stop[:step]"`` (``"1:"`` drops the first position, ``"-8:"`` keeps the
    last eight). Raises ``ValueError`` for anything else.
    """
    if isinstance(spec, (int, slice)) and not isinstance(spec, bool):
        _check_positions(spec)
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"positions must be a str, int or slice, got {type(spec).__name__}")
    s = spec.strip()
    name = s.lower().replace("-", "_")
    if name in _POSITION_NAMES:
        return name
    if re.fullmatch(r"[+-]?\d+", s):
        return int(s)
    m = re.fullmatch(r"([+-]?\d*):([+-]?\d*)(?::([+-]?\d*))?", s)
    if m:
        start, stop, step = (int(g) if g else None for g in m.groups())
        out = slice(start, stop, step)
        _check_positions(out)
        return out
    raise ValueError(f"positions must be one of {', '.join(_POSITION_NAMES)}, an integer or a slice "
                     f"'start:stop[:step]', got {spec!r}")


def _check_positions(positions: Positions) -> None:
    if isinstance(positions, str):
        if positions not in _POSITION_NAMES:
            raise ValueError(f"positions must be one of {', '.join(_POSITION_NAMES)}, an int or a slice, "
                             f"got {positions!r}")
    elif isinstance(positions, slice):
        if positions.step is not None and positions.step <= 0:
            raise ValueError(f"a positions slice needs a step > 0, got {positions!r}")
        for v in (positions.start, positions.stop, positions.step):
            if v is not None and not isinstance(v, int):
                raise TypeError(f"a positions slice holds ints, got {positions!r}")
    elif isinstance(positions, bool) or not isinstance(positions, int):
        raise TypeError(f"positions must be a str, int or slice, got {type(positions).__name__}")


def position_mask(positions: Positions, shape: tuple[int, int], attention_mask: Tensor | None = None,
                  device: torch.device | None = None) -> Tensor | None:
    """Which ``(batch, seq)`` positions to keep, as a bool tensor; None means all of them.

    Positions count the *real* tokens of each sequence (``attention_mask == 1``), so ``"last"``
    is the last real token and ``"drop_first"`` drops the first real one, under left or right
    padding alike; padding is never kept. Without a mask every position is real.
    """
    _check_positions(positions)
    b, t = shape
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"the attention mask has shape {tuple(attention_mask.shape)}, but the layer's output "
                             f"has (batch, seq) = {(b, t)}")
        valid = attention_mask.to(device=device).bool()
    elif positions == "all":
        return None
    else:
        valid = torch.ones(b, t, dtype=torch.bool, device=device)
    if positions == "all":
        return valid
    rank = valid.long().cumsum(1) - 1  # 0 for the first real token of each sequence
    count = valid.sum(1, keepdim=True)  # (batch, 1) real tokens per sequence
    if positions == "last":
        return valid & (rank == count - 1)
    if positions == "drop_first":
        return valid & (rank >= 1)
    if isinstance(positions, int):  # negative: counted from the last real token
        return valid & (rank == (positions if positions >= 0 else count + positions))
    start, stop, step = positions.start, positions.stop, positions.step or 1

    def bound(v: int | None, default: Tensor) -> Tensor:
        if v is None:
            return default
        # Python slice semantics, per sequence: negative counts from the end, then clamp to [0, count]
        return (count + v).clamp(min=0) if v < 0 else torch.clamp(torch.full_like(count, v), max=count)

    lo, hi = bound(start, torch.zeros_like(count)), bound(stop, count)
    return valid & (rank >= lo) & (rank < hi) & ((rank - lo) % step == 0)


# --------------------------------------------------------------------------- batching
def _rows(batch: Tensor | Mapping[str, Any]) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else 1
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim()}
    if len(sizes) != 1:
        raise ValueError(f"the tensors of an input batch must share their first (batch) size, got {sorted(sizes)}")
    return sizes.pop()


def _chunk(batch: Tensor | Mapping[str, Any], batch_size: int) -> Iterator[Tensor | Mapping[str, Any]]:
    n = _rows(batch)
    if n <= batch_size:
        yield batch
        return
    for i in range(0, n, batch_size):
        if isinstance(batch, Tensor):
            yield batch[i:i + batch_size]
        else:
            yield {k: v[i:i + batch_size] if isinstance(v, Tensor) and v.dim() else v for k, v in batch.items()}


def _batches(inputs: Inputs, batch_size: int) -> Iterator[Tensor | Mapping[str, Any]]:
    if isinstance(inputs, (Tensor, Mapping)):
        yield from _chunk(inputs, batch_size)
        return
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
        raise TypeError(f"inputs must be a tensor, a mapping of tensors, or an iterable of them, got "
                        f"{type(inputs).__name__}")
    for i, item in enumerate(inputs):
        if not isinstance(item, (Tensor, Mapping)):
            raise TypeError(f"input batch {i} is a {type(item).__name__}; each batch must be a tensor or a mapping "
                            "such as {'input_ids': ..., 'attention_mask': ...} (map (x, y) pairs to x first)")
        yield from _chunk(item, batch_size)


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- collection
def collect_activations(
    model: nn.Module,
    layer: str | nn.Module | type,
    inputs: Inputs,
    *,
    batch_size: int = 8,
    positions: Positions = "all",
    dtype: torch.dtype | None = torch.float32,
    forward_kwargs: Mapping[str, Any] | None = None,
    stop_early: bool = True,
    skip: int = 0,
) -> Iterator[Tensor]:
    """Yield the activations of ``layer`` for each batch of ``inputs``, as ``(n, d)`` tensors.

    Args:
        model: any ``nn.Module``; a Hugging Face model works as is.
        layer: the module whose output is collected (see :func:`resolve_layer`: names, globs,
            ``h.0.mlp`` for ``transformer.h.0.mlp``). A tuple output (Hugging Face blocks) gives
            its first tensor. Outputs ``(batch, seq, d)`` give one row per kept position,
            ``(batch, d)`` one per sample (``positions`` must then be ``"all"``), and any other
            shape one row per element of every axis but the last.
        inputs: a tensor ``(samples, ...)`` (called as ``model(x)``), a mapping of tensors
            (``model(**batch)``; e.g. ``{"input_ids", "attention_mask"}``), or an iterable of either,
            each one batch. Everything is split into batches of at most ``batch_size`` samples
            and moved to the model's device. A mapping's ``attention_mask`` excludes padding.
        batch_size: most samples per forward (default 8).
        positions: which sequence positions to keep (:data:`Positions`, default ``"all"``).
        dtype: dtype of the yielded rows (default float32); None keeps the model's.
        forward_kwargs: extra keyword arguments of every forward (``{"use_cache": False}``).
        stop_early: end the forward once ``layer`` has run (default); with False the whole
            forward runs, and ``layer`` must run exactly once in it.
        skip: input batches to skip without running the model (used to resume a cache run).

    Yields:
        One ``(n, d)`` tensor per input batch, on the model's device, detached; ``n`` may be 0
        (every position filtered out), so the k-th tensor always belongs to the k-th batch.

    The model runs under ``torch.no_grad()`` in eval mode; each module's mode, the grad mode and
    the model's hooks are as before between batches and afterwards, also if a forward raises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"collect_activations() takes an nn.Module, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    _check_positions(positions)
    name, module = resolve_layer(getattr(model, "_orig_mod", model), layer)
    device = _model_device(model)
    kwargs = dict(forward_kwargs or {})
    d: int | None = None
    for index, batch in enumerate(_batches(inputs, batch_size)):
        if index < skip:
            continue
        rows = _forward_one(model, module, name, batch, device, kwargs, positions, dtype, stop_early)
        if d is None:
            d = rows.shape[1]
        elif rows.shape[1] != d:
            raise ValueError(f"the output width of {name!r} changed from {d} to {rows.shape[1]} at batch {index}")
        yield rows


def _forward_one(model: nn.Module, module: nn.Module, name: str, batch: Tensor | Mapping[str, Any],
                 device: torch.device, kwargs: dict[str, Any], positions: Positions,
                 dtype: torch.dtype | None, stop_early: bool) -> Tensor:
    return forward_layers(model, {name: module}, batch, device, kwargs, positions, dtype, stop_early)[name]


def forward_layers(model: nn.Module, modules: Mapping[str, nn.Module], batch: Tensor | Mapping[str, Any],
                   device: torch.device, kwargs: Mapping[str, Any], positions: Positions,
                   dtype: torch.dtype | None, stop_early: bool = True) -> dict[str, Tensor]:
    """One forward of ``batch`` with a hook on each of ``modules`` (name → module): the kept rows
    ``(n, d)`` of each (:func:`_select`). With ``stop_early`` the forward ends once every hooked
    module has run, so the layers after the last of them cost nothing. Grad mode, every module's
    mode and the model's hooks are as before afterwards, also if the forward raises.

    Raises:
        ValueError: a hooked module did not run in the forward, or ran more than once.
    """
    if isinstance(batch, Tensor):
        batch = batch.to(device, non_blocking=True)
        mask = None
    else:
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
        mask = batch.get("attention_mask")
    captured: dict[str, list[Tensor]] = {name: [] for name in modules}

    def hook_of(name: str):
        def hook(mod: nn.Module, args: object, output: object) -> None:
            captured[name].append(_select(first_tensor(output, name, "collect"), positions, mask, dtype))
            if stop_early and all(captured.values()):
                raise _Stop
        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [module.register_forward_hook(hook_of(name)) for name, module in modules.items()]
    try:
        model.eval()
        with torch.no_grad():
            try:
                model(batch, **kwargs) if isinstance(batch, Tensor) else model(**batch, **kwargs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    for name, got in captured.items():
        if len(got) != 1:
            why = "did not run in the forward" if not got else f"ran {len(got)} times in one forward"
            raise ValueError(f"the layer {name!r} {why}; collect from a module that runs once per forward")
    return {name: got[0] for name, got in captured.items()}


def _select(a: Tensor, positions: Positions, mask: Tensor | None, dtype: torch.dtype | None) -> Tensor:
    """``(n, d)`` rows of the kept positions of a ``(batch, seq, d)`` output, always a copy."""
    a = a.detach()
    dtype = dtype or a.dtype
    if a.dim() == 3:
        keep = position_mask(positions, (a.shape[0], a.shape[1]), mask, a.device)
        if keep is not None:
            return a[keep].to(dtype)  # boolean indexing copies
    elif positions != "all" or mask is not None:
        raise ValueError(f"positions={positions!r} and attention masks need a (batch, seq, d) output, got shape "
                         f"{tuple(a.shape)}")
    if a.dim() == 0:
        raise ValueError("the layer's output is a scalar; collect from a module that returns (batch, ..., d)")
    # a copy, so that layers after the hook (when the forward goes on) cannot change the rows
    return a.reshape(-1, a.shape[-1]).to(dtype, copy=True)


# --------------------------------------------------------------------------- token streams
def token_batches(tokens: Tensor | np.ndarray | Iterable, context: int, batch_size: int, *,
                  bos: int | None = None, max_sequences: int | None = None) -> Iterator[Tensor]:
    """Cut a flat token stream into ``(batch, context)`` int64 batches (the last may be smaller).

    Args:
        tokens: a 1-D tensor or array (a memory map works: it is read window by window), or an
            iterable of 1-D token arrays/lists (documents, concatenated in order).
        context: tokens per sequence, including the BOS token if ``bos`` is given.
        batch_size: sequences per batch.
        bos: a token id to put first in every sequence (then ``context - 1`` stream tokens each).
        max_sequences: stop after this many sequences (default: until the stream ends; a tail
            shorter than a sequence is dropped).
    """
    if context < 1 + (bos is not None) or batch_size < 1:
        raise ValueError(f"need context >= {1 + (bos is not None)} and batch_size >= 1, got {context}, {batch_size}")
    body = context - (bos is not None)
    emitted = 0
    rows: list[np.ndarray] = []

    def flush() -> Tensor:
        out = torch.from_numpy(np.stack(rows).astype(np.int64))
        if bos is not None:
            out = torch.cat([torch.full((out.shape[0], 1), bos, dtype=torch.int64), out], 1)
        rows.clear()
        return out

    def windows() -> Iterator[np.ndarray]:
        if isinstance(tokens, (Tensor, np.ndarray)):
            flat = tokens.numpy() if isinstance(tokens, Tensor) else tokens
            if flat.ndim != 1:
                raise ValueError(f"a token stream is 1-D, got shape {tuple(flat.shape)}")
            for i in range(0, flat.shape[0] - body + 1, body):
                yield np.asarray(flat[i:i + body])
            return
        pending: list[np.ndarray] = []
        have = 0
        for doc in tokens:
            arr = doc.numpy() if isinstance(doc, Tensor) else np.asarray(doc)
            pending.append(arr.reshape(-1))
            have += pending[-1].shape[0]
            if have >= body:
                joined = np.concatenate(pending)
                n = joined.shape[0] // body * body
                yield from joined[:n].reshape(-1, body)
                pending, have = [joined[n:]], joined.shape[0] - n

    for w in windows():
        if max_sequences is not None and emitted >= max_sequences:
            break
        rows.append(w)
        emitted += 1
        if len(rows) == batch_size:
            yield flush()
    if rows:
        yield flush()


def random_token_batches(n_sequences: int, context: int, batch_size: int, vocab_size: int, *,
                         seed: int = 0, bos: int | None = None) -> Iterator[Tensor]:
    """``n_sequences`` uniformly random token sequences in ``(batch, context)`` int64 batches.

    Deterministic for a seed (one generator, drawn batch after batch), so a resumed cache run
    sees the same tokens. With ``bos``, every sequence starts with that token.
    """
    if n_sequences < 0 or context < 1 or batch_size < 1 or vocab_size < 1:
        raise ValueError("need n_sequences >= 0 and context, batch_size, vocab_size >= 1")
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n_sequences, batch_size):
        ids = torch.randint(0, vocab_size, (min(batch_size, n_sequences - start), context), generator=g)
        if bos is not None:
            ids[:, 0] = bos
        yield ids


# --------------------------------------------------------------------------- models
def _transformers():
    try:
        import transformers
    except ModuleNotFoundError as err:
        raise MissingDependency(f"this needs Hugging Face transformers, which is not installed: {HF_EXTRA}",
                                name="transformers") from err
    return transformers


def tiny_gpt2(seed: int = 0, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, vocab_size: int = 256,
              n_positions: int = 1024, device: torch.device | str | None = None) -> nn.Module:
    """A small randomly initialised ``GPT2Model`` (no LM head), built from a config: nothing is
    downloaded. The same seed gives the same weights. Its blocks are ``h.0`` … ``h.{n_layer-1}``
    (with ``attn``, ``mlp``, ``ln_1``, ``ln_2``); ``d = n_embd``. Needs transformers."""
    tf = _transformers()
    config = tf.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                           n_positions=n_positions, bos_token_id=0, eos_token_id=0)
    # the default init draws from the global generator: fork it, so callers' random state is untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.GPT2Model(config)
    return model.to(device).eval() if device is not None else model.eval()


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _safetensors_only(name: str, what: str) -> str:
    return (f"{what}: only safetensors checkpoints are loaded (a pickle can run code when it is read). Convert it "
            "on a machine where you trust the file, e.g. python -c \"from transformers import AutoModel; "
            f"AutoModel.from_pretrained('{name}').save_pretrained('{name}-safetensors')\" (save_pretrained writes "
            "model.safetensors), and pass that folder")


def load_hf_model(name: str, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  local_files_only: bool | None = None) -> nn.Module:
    """``transformers.AutoModel.from_pretrained(name)`` (the base model, no task head), in eval mode.

    ``local_files_only`` defaults to True when ``HF_HUB_OFFLINE=1`` is set, so an offline machine
    fails at once with a clear message instead of retrying the network.

    Only safetensors weights are loaded (``use_safetensors=True``): a folder or checkpoint with only
    pickle weights (``pytorch_model.bin``...) is refused with a ``ValueError`` that says how to
    convert it; nothing is unpickled.

    Raises:
        ModuleNotFoundError: transformers is not installed.
        FileNotFoundError: the checkpoint is not a local folder nor in the local cache (offline).
        ValueError: the checkpoint has no safetensors weights.
    """
    folder = Path(name).expanduser()
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            what = f"{folder} holds only a pickle checkpoint ({', '.join(pickles[:3])})"
            raise ValueError(_safetensors_only(name, what))
    tf = _transformers()
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    kwargs: dict[str, Any] = {"local_files_only": local_files_only, "use_safetensors": True}
    if dtype is not None:
        kwargs["dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype"] = dtype
    try:
        model = tf.AutoModel.from_pretrained(name, **kwargs)
    except OSError as err:
        if "safetensors" in str(err) and (folder.is_dir() or "couldn't connect" not in str(err).lower()):
            raise ValueError(_safetensors_only(name, f"no safetensors weights found for {name!r} "
                                                     f"({one_line(err, 160)})")) from err
        where = " (HF_HUB_OFFLINE is set: only local files are used)" if local_files_only else ""
        raise FileNotFoundError(f"cannot load the model {name!r}{where}: {one_line(err)}") from err
    except pickle.UnpicklingError as err:  # should not happen with use_safetensors; never unpickle, say so
        raise ValueError(_safetensors_only(name, f"{name} is a pickle checkpoint")) from err
    return (model.to(device) if device is not None else model).eval()


# --------------------------------------------------------------------------- caching
def _describe_positions(positions: Positions) -> str:
    if isinstance(positions, slice):
        return ":".join("" if v is None else str(v) for v in (positions.start, positions.stop, positions.step))
    return str(positions)


def cache_activations(
    model: nn.Module,
    layer: str | nn.Module | type,
    inputs: Inputs,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    positions: Positions = "all",
    shard_size: int = 65536,
    dtype: str | torch.dtype = "float32",
    max_rows: int | None = None,
    source: Mapping[str, Any] | str | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ShardStore:
    """Collect the activations of ``layer`` over ``inputs`` (:func:`collect_activations`) into
    a shard store in ``out_dir`` (:class:`~actsparse.data.shards.ShardWriter`), and open it.

    Rerunning with the same arguments after a crash resumes: the stored input batches are
    skipped without running the model, and the final store is the same as an uninterrupted
    run's. That needs ``inputs`` to yield the same batches again (a seeded or stored stream).
    A finished store is returned at once.

    Args:
        out_dir: the store's folder.
        batch_size: samples per forward (default 8). Part of the resume key.
        positions: which positions to keep (default ``"all"``).
        shard_size: rows per shard (default 65,536).
        dtype: stored dtype, ``"float32"`` (default), ``"float16"`` or ``"float64"``.
        max_rows: stop after this many rows (default: when ``inputs`` end).
        source: a description of the inputs and model (e.g. the checkpoint and the token data),
            kept in the index with the layer, positions and batch size; resuming checks it.
        forward_kwargs: extra keyword arguments of every forward (``{"use_cache": False}``).
        overwrite: delete an existing store in ``out_dir`` first.
        progress: show a tqdm bar (if tqdm is installed).

    Raises:
        ValueError: ``out_dir`` holds a store made with other arguments, or nothing was collected.
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    name, _ = resolve_layer(getattr(model, "_orig_mod", model), layer)
    described: dict[str, Any] = {"model": type(getattr(model, "_orig_mod", model)).__name__, "layer": name,
                                 "positions": _describe_positions(positions), "batch_size": batch_size,
                                 "max_rows": max_rows}
    if isinstance(source, str):
        described["inputs"] = source
    elif source is not None:
        described.update(source)
    writer = ShardWriter(out_dir, None, dtype, shard_size, source=described, overwrite=overwrite)
    if writer.complete:
        return ShardStore(out_dir)
    start, offset = (writer.resume["batch"], writer.resume["row"]) if writer.resume else (0, 0)
    bar = progress_bar(progress, max_rows, desc="caching activations", unit="rows", initial=writer.rows,
                       unit_scale=True)
    try:
        with writer:
            stream = collect_activations(model, layer, inputs, batch_size=batch_size, positions=positions,
                                         dtype=None, forward_kwargs=forward_kwargs, skip=start)
            for index, rows in enumerate(stream, start=start):
                first = offset if index == start else 0  # rows of the resumed batch already stored
                rows = rows[first:]
                if max_rows is not None:
                    rows = rows[:max_rows - writer.n_rows]
                writer.write(rows, position=(index, first))
                bar.update(rows.shape[0])
                if max_rows is not None and writer.n_rows >= max_rows:
                    break
            if writer.d is None:
                raise ValueError(f"no activations were collected from {name!r}: the inputs were empty or every "
                                 f"position was filtered out (positions={_describe_positions(positions)!r})")
    finally:
        bar.close()
    return ShardStore(out_dir)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine, else a one-line ``ValueError``
    (a malformed name, ``cuda`` without CUDA, ``cuda:3`` with fewer GPUs, ``mps`` without MPS)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:N, mps): "
                         f"{' '.join(str(err).split())}") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"--device {device}: CUDA is not available ({why}, torch {torch.__version__}); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: only cpu, cuda, cuda:N and mps are supported here")
    return dev


#: The vocabulary of :func:`tiny_gpt2`'s default config.
TINY_GPT2_VOCAB = 256


def _check_bos(bos: int | None, vocab: int | None) -> None:
    if bos is None:
        return
    if isinstance(bos, bool) or not isinstance(bos, int) or bos < 0 or (vocab is not None and bos >= vocab):
        where = f"0..{vocab - 1}, the model's vocabulary of {vocab}" if vocab is not None else "ids >= 0"
        raise ValueError(f"--bos {bos!r} is not a token id of the model: use one in {where}")


def _check_token_ids(path: Path, ids: np.ndarray, vocab: int | None) -> None:
    """Every id of the 1-D integer array ``ids`` in ``0..vocab-1`` (one pass over a memory map)."""
    if not ids.size:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0:
        raise ValueError(f"{path} holds token id {lo} at position {int(np.argmin(ids))}: token ids are >= 0"
                         f"{f' and < {vocab}, the size of the model vocabulary' if vocab is not None else ''}")
    if vocab is not None and hi >= vocab:
        raise ValueError(f"{path} holds token id {hi} at position {int(np.argmax(ids))}, outside the model's "
                         f"vocabulary of {vocab} (ids 0..{vocab - 1}): were they made by another tokenizer?")


def load_token_file(path: str | os.PathLike, vocab: int | None) -> np.ndarray:
    """The 1-D integer ``.npy`` array of ``--token-file``, memory-mapped, its ids checked against
    ``vocab`` (None: only that they are >= 0)."""
    p = Path(path)
    if p.suffix.lower() != ".npy" or not p.is_file():
        raise FileNotFoundError(f"--token-file must be an existing 1-D .npy array of token ids, got {p}")
    try:
        ids = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{p} is not a readable .npy array of token ids ({one_line(err, 160)})") from err
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{p} must hold a 1-D integer array of token ids, got {ids.dtype} {ids.shape}")
    _check_token_ids(p, ids, vocab)
    return ids


def cache_model_activations(
    checkpoint: str,
    layer: str,
    out_dir: str | os.PathLike,
    *,
    tokens: int = 65_536,
    context: int = 128,
    batch_size: int = 32,
    positions: str | Positions = "all",
    shard_size: int = 65_536,
    dtype: str = "float32",
    token_file: str | os.PathLike | None = None,
    bos: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[ShardStore, ShardStore | None]:
    """What ``actsparse cache-activations`` runs: load ``checkpoint`` (``"tiny-gpt2"``: :func:`tiny_gpt2`
    seeded by ``seed``; else :func:`load_hf_model`), feed it ``tokens // context`` sequences
    (uniformly random ids, or those of the 1-D ``.npy`` array ``token_file``, each led by ``bos`` if
    given), and :func:`cache_activations` of ``layer`` into ``out_dir``.

    Returns:
        The store, and the store that was in ``out_dir`` before (``None`` if there was none), so a
        caller can say whether the run resumed or found the store complete.
    """
    device = check_device(device)
    check_store_dir(out_dir, overwrite=overwrite)  # before the model is loaded: a folder that is not a store
    # the cheap checks first, with the vocabulary known without loading the model (tiny-gpt2's), then
    # again with the loaded model's
    known = TINY_GPT2_VOCAB if checkpoint == "tiny-gpt2" else None
    _check_bos(bos, known)
    ids = load_token_file(token_file, known) if token_file is not None else None
    path = Path(token_file) if token_file is not None else None
    model = tiny_gpt2(seed, device=device) if checkpoint == "tiny-gpt2" else load_hf_model(checkpoint, device=device)
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab != known:
        _check_bos(bos, vocab)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit is not None and context > limit:
        raise ValueError(f"--context {context} exceeds the model's {limit} positions")
    n_seq = tokens // context
    if ids is None:
        if vocab is None:
            raise ValueError(f"{checkpoint} has no config.vocab_size to draw random tokens from: pass --token-file")
        inputs = random_token_batches(n_seq, context, batch_size, vocab, seed=seed, bos=bos)
        described = f"{n_seq} x {context} uniformly random tokens (seed {seed})"
    else:
        if vocab != known:
            _check_token_ids(path, ids, vocab)
        inputs = token_batches(ids, context, batch_size, bos=bos, max_sequences=n_seq)
        described = f"{n_seq} x {context} tokens of {path}"
    forward_kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else None
    source = {"checkpoint": checkpoint, "seed": seed if checkpoint == "tiny-gpt2" else None, "inputs": described,
              "context": context, "bos": bos}
    before = None
    if (Path(out_dir) / INDEX_NAME).is_file() and not overwrite:
        try:
            before = ShardStore(out_dir, allow_incomplete=True, verify=False)
        except (ValueError, FileNotFoundError):
            pass  # cache_activations reports it
    store = cache_activations(model, layer, inputs, out_dir, batch_size=batch_size,
                              positions=parse_positions(positions) if isinstance(positions, str) else positions,
                              shard_size=shard_size, dtype=dtype, source=source, forward_kwargs=forward_kwargs,
                              overwrite=overwrite, progress=progress)
    return store, before
