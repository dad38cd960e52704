"""The SAE inside the model: splice a sparse autoencoder's reconstruction into the layer it was
trained on, and measure what the language model loses (downstream evaluation).

>>> metrics = downstream_metrics(lm, "transformer.h.6", sae, token_batches(tokens, 128, 16),
...                              positions="drop_first")
>>> metrics["ce_clean"], metrics["ce_spliced"], metrics["loss_recovered"], metrics["kl_clean_spliced"]

A reconstruction error that looks small (FVU) can still cost the model a lot of next-token loss,
so SAE users judge a dictionary by the cross-entropy of the model with its reconstruction in
place of the activation, against the clean model and against the layer ablated (SAELens'
``evals.py``, ``get_downstream_reconstruction_metrics``: "ce_loss_score"; dictionary_learning's
``evaluation.loss_recovered``: "frac_recovered"; Bricken et al. 2023, "Towards Monosemanticity",
report the same fraction of the loss recovered).

Why it is built this way:

* :func:`spliced` is one forward hook on the resolved layer, registered on entering the
  ``with`` block and removed in a ``finally`` on leaving it, also when the forward (or the
  replacement) raises. It replaces only the kept positions (:func:`position_mask`: the same
  positions the SAE was trained on, e.g. without BOS, never padding) and leaves the others,
  and the rest of a tuple output, as they were.
* :func:`downstream_metrics` puts the model and the SAE in eval mode under ``torch.no_grad()``
  for the whole evaluation and restores every module's mode afterwards (also on error). It runs
  one forward per variant per batch (clean, SAE-spliced, zero-ablated, mean-ablated), after one
  first pass that computes the mean activation for the mean ablation (stopped at the layer, by
  :func:`~actsparse.data.activations.collect_activations`). The input batches are therefore
  read twice: they are held in a list (token ids only).
* Only the predictions whose input position was spliced are scored, and only those with a next
  token in the sequence: the prediction at position 0 of an unspliced BOS is the model's own and
  would dilute every difference.
* The log-probabilities of the scored rows are computed in float64 (log-softmax of the logits),
  so that the KL divergence of two close distributions is not lost to float32 rounding; only the
  scored rows ``(n, vocab)`` are converted.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .attach import first_tensor
from .data.activations import (
    Positions,
    _model_device,
    collect_activations,
    parse_positions,
    position_mask,
    resolve_layer,
)
from .progress import progress_bar

__all__ = ["ABLATIONS", "Splice", "spliced", "downstream_metrics", "next_token_ce"]

#: The ablation baselines of :func:`downstream_metrics`: the layer's output replaced by zeros, or
#: by its mean over the evaluated tokens.
ABLATIONS = ("zero", "mean")


# --------------------------------------------------------------------------- splicing
@dataclass
class Splice:
    """What :func:`spliced` yields: the resolved layer ``name``, how many times its hook ran
    (``calls``), and the shape of the layer's last output (``shape``; None before a call)."""

    name: str
    calls: int = 0
    shape: tuple[int, ...] | None = field(default=None)


@contextmanager
def spliced(
    model: nn.Module,
    layer: str | nn.Module | type,
    replace: Callable[[Tensor], Tensor],
    *,
    positions: Positions = "all",
    attention_mask: Tensor | None = None,
) -> Iterator[Splice]:
    """Within the ``with`` block, the output of ``layer`` is replaced by ``replace(rows)`` at the
    kept positions.

    Args:
        model: any ``nn.Module`` (a Hugging Face model works as is).
        layer: the module whose output is replaced (:func:`resolve_layer`: ``h.0.mlp`` finds
            ``transformer.h.0.mlp``). A tuple output (a Hugging Face block in transformers < 5)
            has its first tensor replaced and keeps the rest; a ``ModelOutput`` its
            ``last_hidden_state``.
        replace: maps the kept rows ``(n_kept, d)`` to their replacements ``(n_kept, d)``; the
            result is cast to the output's dtype and device. It should return a new tensor, not
            modify ``rows`` in place. Not called when no position is kept.
        positions: which positions of a ``(batch, seq, d)`` output are replaced
            (:data:`~actsparse.data.activations.Positions`, default ``"all"``); the others keep
            the layer's value. A ``(batch, d)`` output (or one with more axes) is replaced whole,
            with ``positions="all"`` and no mask.
        attention_mask: ``(batch, seq)`` of the forwards run inside the block; padding
            (``0``) is never replaced, and positions count real tokens (:func:`position_mask`).

    Yields:
        A :class:`Splice` record (``.calls`` counts the hook's calls, so a caller can check that
        the layer ran once per forward).

    The hook is removed on leaving the block, also when the block raises. The model's modes and
    the grad mode are left as they are: the replacement is differentiable if ``replace`` is.

    Raises:
        KeyError, ValueError: ``layer`` names no module, or several (on entering).
        ValueError: (in the forward) ``positions`` or a mask with an output that is not
            ``(batch, seq, d)``, a mask of another shape, or a replacement of the wrong shape.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"spliced() takes an nn.Module, got {type(model).__name__}")
    if not callable(replace):
        raise TypeError(f"replace must be a callable mapping (n, d) rows to (n, d) rows, got {type(replace).__name__}")
    positions = parse_positions(positions)
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2):
        raise ValueError("attention_mask must be a (batch, seq) tensor, got "
                         f"{tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else attention_mask!r}")
    name, module = resolve_layer(getattr(model, "_orig_mod", model), layer)
    record = Splice(name)

    def hook(mod: nn.Module, args: object, output: object) -> object:
        a = first_tensor(output, name, "splice")
        record.calls += 1
        record.shape = tuple(a.shape)
        return _put_first(output, _splice(a, replace, positions, attention_mask, name))

    handle = module.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


def _splice(a: Tensor, replace: Callable[[Tensor], Tensor], positions: Positions, mask: Tensor | None,
            name: str) -> Tensor:
    """``a`` with its kept rows replaced: a new tensor, ``a`` itself is not modified."""
    if a.dim() < 2:
        raise ValueError(f"the output of {name!r} has shape {tuple(a.shape)}; splicing needs (batch, ..., d)")
    if a.dim() == 3:
        keep = position_mask(positions, (a.shape[0], a.shape[1]), mask, a.device)
    elif positions != "all" or mask is not None:
        raise ValueError(f"positions={positions!r} and attention masks need a (batch, seq, d) output, but "
                         f"{name!r} returns shape {tuple(a.shape)}: use positions='all' and no mask")
    else:
        keep = None
    if keep is None:  # every position: no copy of the rows
        rows = a.reshape(-1, a.shape[-1])
        return _replacement(replace, rows, name).reshape(a.shape)
    out = a.clone()
    rows = a[keep]  # (n_kept, d), a copy
    if rows.shape[0]:
        out[keep] = _replacement(replace, rows, name)
    return out


def _replacement(replace: Callable[[Tensor], Tensor], rows: Tensor, name: str) -> Tensor:
    new = replace(rows)
    if not isinstance(new, Tensor):
        raise TypeError(f"replace() must return a tensor for the rows of {name!r}, got {type(new).__name__}")
    if tuple(new.shape) != tuple(rows.shape):
        raise ValueError(f"replace() returned shape {tuple(new.shape)} for the {tuple(rows.shape)} rows of {name!r}; "
                         "it must keep the shape")
    return new.to(device=rows.device, dtype=rows.dtype)


def _put_first(output: object, new: Tensor) -> object:
    """``output`` with the tensor :func:`first_tensor` found replaced by ``new``."""
    if isinstance(output, Tensor):
        return new
    if isinstance(output, tuple):
        rest = output[1:]
        return output._make((new, *rest)) if hasattr(output, "_make") else type(output)((new, *rest))
    if isinstance(output, list):
        return [new, *output[1:]]
    output.last_hidden_state = new  # a ModelOutput (first_tensor accepted nothing else)
    return output


# --------------------------------------------------------------------------- cross-entropy
def _check_scored(logits: Tensor, ids: Tensor, keep: Tensor | None) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be a (batch, seq, vocab) tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    if not isinstance(ids, Tensor) or tuple(ids.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"ids must be (batch, seq) = {tuple(logits.shape[:2])} like the logits, got "
                         f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}")
    if keep is None:
        return torch.ones(ids.shape, dtype=torch.bool, device=logits.device)
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != tuple(ids.shape):
        raise ValueError(f"keep must be a (batch, seq) = {tuple(ids.shape)} bool tensor, got "
                         f"{(keep.dtype, tuple(keep.shape)) if isinstance(keep, Tensor) else type(keep).__name__}")
    return keep.to(logits.device)


def _scored_log_probs(logits: Tensor, keep: Tensor) -> Tensor:
    """float64 ``log softmax`` of the logits at the scored positions ``keep[:, :-1]``: ``(n, vocab)``
    (the last position has no next token and is never scored)."""
    return torch.log_softmax(logits[:, :-1][keep[:, :-1]].double(), dim=-1)


def _targets(ids: Tensor, keep: Tensor) -> Tensor:
    """The next tokens ``ids[:, t + 1]`` of the scored positions ``t``: ``(n,)`` int64."""
    return ids[:, 1:][keep[:, :-1].to(ids.device)].long()


def _nll_sum(log_probs: Tensor, targets: Tensor) -> float:
    return float(-log_probs.gather(1, targets.to(log_probs.device).unsqueeze(1)).sum())


def next_token_ce(logits: Tensor, ids: Tensor, keep: Tensor | None = None) -> tuple[float, int]:
    """Summed next-token cross-entropy in nats, and the number of predictions scored.

    ``Σ_{(b, t) scored} −log softmax(logits[b, t])[ids[b, t + 1]]`` (the cross-entropy of the
    prediction of token t+1 from the logits at t; mean = sum / count, as the CE of SAELens'
    ``evals.py`` and of Hugging Face's causal-LM loss), computed in float64.

    Args:
        logits: ``(batch, seq, vocab)``.
        ids: ``(batch, seq)`` token ids.
        keep: ``(batch, seq)`` bool, the prediction positions t to score (default: all). Its last
            column is ignored: the last position has no next token.

    Returns:
        ``(sum_nats, count)``.
    """
    keep = _check_scored(logits, ids, keep)
    targets = _targets(ids, keep)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[-1]):
        raise ValueError(f"the scored token ids lie in [{int(targets.min())}, {int(targets.max())}], outside the "
                         f"logits' vocabulary of {logits.shape[-1]}")
    return _nll_sum(_scored_log_probs(logits, keep), targets), int(targets.numel())


def _kl_sum(log_p: Tensor, log_q: Tensor) -> float:
    """``Σ_rows KL(p ‖ q) = Σ_rows Σ_v p_v (log p_v − log q_v)`` (Kullback & Leibler 1951), in
    float64, with ``0 · log 0 = 0`` (a token of probability 0 under p contributes nothing)."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return float(terms.sum())


# --------------------------------------------------------------------------- downstream metrics
@dataclass
class _Batch:
    inputs: Tensor | dict[str, Any]  # what the model is called with: model(x) or model(**batch)
    ids: Tensor  # (batch, seq)
    mask: Tensor | None  # (batch, seq) or None


def _check_ids(ids: object, where: str) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{where} must be a tensor of token ids, got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise TypeError(f"{where} must hold integer token ids (int64), got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{where} must be (batch, seq) token ids, got shape {tuple(ids.shape)}")
    return ids


def _prepare(batches: Iterable[Tensor | Mapping[str, Any]]) -> list[_Batch]:
    if isinstance(batches, (Tensor, Mapping)):
        batches = [batches]  # one batch
    elif isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of (batch, seq) token-id tensors or mappings, got "
                        f"{type(batches).__name__}")
    out: list[_Batch] = []
    for i, item in enumerate(batches):
        if isinstance(item, Tensor):
            out.append(_Batch(item, _check_ids(item, f"batch {i}"), None))
        elif isinstance(item, Mapping):
            if "input_ids" not in item:
                raise ValueError(f"batch {i} is a mapping without 'input_ids' (keys: {sorted(map(str, item))})")
            ids = _check_ids(item["input_ids"], f"batch {i}['input_ids']")
            mask = item.get("attention_mask")
            if mask is not None:
                if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(ids.shape):
                    raise ValueError(f"batch {i}['attention_mask'] must be a tensor shaped like input_ids "
                                     f"{tuple(ids.shape)}, got "
                                     f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
            out.append(_Batch(dict(item), ids, mask))
        else:
            raise TypeError(f"batch {i} is a {type(item).__name__}; each batch must be (batch, seq) token ids or a "
                            "mapping such as {'input_ids': ..., 'attention_mask': ...}")
    if not out:
        raise ValueError("batches is empty: downstream_metrics needs at least one batch of token ids")
    return out


def _to(batch: _Batch, device: torch.device) -> _Batch:
    if isinstance(batch.inputs, Tensor):
        inputs = batch.inputs.to(device)
        return _Batch(inputs, inputs, None)
    inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.inputs.items()}
    mask = inputs.get("attention_mask")
    return _Batch(inputs, inputs["input_ids"], mask)


def _logits(output: object, shape: tuple[int, int]) -> Tensor:
    """The ``(batch, seq, vocab)`` logits of a forward's output: a tensor, an object with
    ``.logits`` (Hugging Face), a mapping with ``"logits"``, or a tuple whose first item is them."""
    if isinstance(output, Tensor):
        logits = output
    elif isinstance(getattr(output, "logits", None), Tensor):
        logits = output.logits
    elif isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        logits = output["logits"]
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    else:
        raise TypeError(f"the model returned a {type(output).__name__}; downstream_metrics needs a causal LM that "
                        "returns (batch, seq, vocab) logits, as a tensor or as .logits")
    if logits.dim() != 3 or tuple(logits.shape[:2]) != shape:
        raise ValueError(f"the model's logits have shape {tuple(logits.shape)}; expected (batch, seq, vocab) with "
                         f"(batch, seq) = {shape} of the input ids")
    return logits


def _scored_mask(ids: Tensor, mask: Tensor | None, positions: Positions) -> Tensor:
    """``(batch, seq)`` bool: the prediction positions t that are scored — spliced (kept by
    ``positions`` and the mask) and followed by a real token t + 1 in the sequence."""
    b, t = ids.shape
    kept = position_mask(positions, (b, t), mask, ids.device)
    if kept is None:
        kept = torch.ones(b, t, dtype=torch.bool, device=ids.device)
    has_next = torch.zeros(b, t, dtype=torch.bool, device=ids.device)
    has_next[:, :-1] = True if mask is None else mask[:, 1:].to(ids.device).bool()
    return kept & has_next


def _mean_activation(model: nn.Module, name: str, batches: list[_Batch], positions: Positions,
                     kwargs: dict[str, Any]) -> Tensor:
    """The mean of the layer's output over the kept positions of every batch, ``(d,)`` float64:
    ``(1/N) Σ_rows a`` over the N rows :func:`collect_activations` keeps (padding excluded)."""
    size = max(b.ids.shape[0] for b in batches)  # no batch is split
    total: Tensor | None = None
    count = 0
    for rows in collect_activations(model, name, [b.inputs for b in batches], batch_size=size, positions=positions,
                                    dtype=torch.float64, forward_kwargs=kwargs):
        total = rows.sum(0) if total is None else total + rows.sum(0)
        count += rows.shape[0]
    if not count:
        raise ValueError(f"no position of {name!r} is kept (positions={positions!r}): nothing to splice or score")
    return total / count


def _sae_replace(sae: Callable[[Tensor], Any], name: str) -> Callable[[Tensor], Tensor]:
    """``rows ↦ sae(rows).reconstruction``, the rows cast to the SAE's dtype and device (an SAE
    that returns a tensor is taken to return the reconstruction)."""
    ref = next(iter(sae.parameters()), None) if isinstance(sae, nn.Module) else None

    def replace(rows: Tensor) -> Tensor:
        x = rows if ref is None else rows.to(device=ref.device, dtype=ref.dtype)
        out = sae(x)
        recon = out if isinstance(out, Tensor) else getattr(out, "reconstruction", None)
        if not isinstance(recon, Tensor):
            raise TypeError(f"the SAE returned a {type(out).__name__} for the rows of {name!r}; it must return an "
                            "object with .reconstruction (as SparseAutoencoder does) or the reconstruction itself")
        return recon

    return replace


def _recovered(ablated: float, spliced_ce: float, clean: float) -> float:
    """``(CE_ablated − CE_spliced) / (CE_ablated − CE_clean)``; NaN when the ablation costs
    nothing (the denominator is 0)."""
    denom = ablated - clean
    return (ablated - spliced_ce) / denom if denom != 0 else math.nan


def downstream_metrics(
    model: nn.Module,
    layer: str | nn.Module | type,
    sae: Callable[[Tensor], Any],
    batches: Iterable[Tensor | Mapping[str, Any]],
    *,
    positions: Positions = "drop_first",
    ablation: str = "zero",
    forward_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, float | int | str]:
    """Next-token cross-entropy of a causal LM with ``layer``'s output replaced by ``sae``'s
    reconstruction, against the clean model and the layer ablated.

    Args:
        model: a causal LM (a Hugging Face ``GPT2LMHeadModel``, or any module whose forward
            returns ``(batch, seq, vocab)`` logits, as a tensor or as ``.logits``).
        layer: the module the SAE was trained on (:func:`~actsparse.data.activations.resolve_layer`);
            it must run once per forward.
        sae: the autoencoder: ``sae(rows).reconstruction`` ``(n, d)`` for rows ``(n, d)`` (a
            :class:`~actsparse.models.SparseAutoencoder`); rows are cast to its parameters' dtype
            and device. It runs in eval mode without gradients.
        batches: held-out token batches, each ``(batch, seq)`` integer ids (``model(ids)``) or a
            mapping with ``input_ids`` and optionally ``attention_mask`` (``model(**batch)``;
            every key is passed). They are read twice (mean pass, then evaluation) and held in a
            list (a one-shot generator works); a tensor or mapping alone is one batch. Each is moved
            to the model's device for its forwards.
        positions: the positions spliced and scored (default ``"drop_first"``: not the first real
            token, e.g. BOS; use the positions the SAE was trained on).
        ablation: the baseline of ``loss_recovered``: ``"zero"`` (default) or ``"mean"``.
        forward_kwargs: extra keyword arguments of every forward; default ``{"use_cache": False}``
            when the model's forward takes ``use_cache``, else none.
        progress: show a tqdm bar over the batches (if tqdm is installed).

    Returns:
        A dict, every CE in nats per scored prediction:

        * ``ce_clean``, ``ce_spliced`` (the layer's kept outputs replaced by the SAE's
          reconstruction), ``ce_zero_ablated`` (by zeros), ``ce_mean_ablated`` (by the mean of
          the layer's output over the kept positions of all ``batches``, computed in a first pass);
        * ``loss_recovered_zero`` and ``loss_recovered_mean``:
          ``(CE_ablated − CE_spliced) / (CE_ablated − CE_clean)`` (SAELens ``evals.py``
          "ce_loss_score"; dictionary_learning "frac_recovered"; Bricken et al. 2023): 1 when
          splicing costs nothing, 0 when it is as bad as the ablation, NaN when the ablation
          itself costs nothing; ``loss_recovered`` is the one ``ablation`` names;
        * ``kl_clean_spliced``: the mean over scored predictions of ``KL(p_clean ‖ p_spliced)
          = Σ_v p_clean(v) (log p_clean(v) − log p_spliced(v))`` in nats (float64 log-softmax;
          SAELens reports it as "kl_div_with_sae");
        * ``tokens``: the number of predictions scored; ``ablation``: the baseline named.

    Scored predictions: the prediction of token t+1 from the logits at t, for each position t
    whose activation is spliced (kept by ``positions`` and the attention mask: never padding)
    and whose next token is in the sequence and not padding.

    Every module of ``model`` and ``sae`` is back in its mode afterwards, and no hook is left,
    also if a forward raises.

    Raises:
        ValueError: unknown ``ablation``, bad ``positions``, an empty or malformed batch, no
            position kept, a layer that does not run once per forward, or an SAE whose width
            is not the layer's.
        KeyError: ``layer`` names no module of ``model``.
        TypeError: token batches that are not integer tensors, or a model without logits.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"downstream_metrics() takes an nn.Module model, got {type(model).__name__}")
    if not callable(sae):
        raise TypeError(f"sae must be a callable module (a SparseAutoencoder), got {type(sae).__name__}")
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}")
    positions = parse_positions(positions)
    name, _ = resolve_layer(getattr(model, "_orig_mod", model), layer)
    items = _prepare(batches)
    if forward_kwargs is None:
        try:
            takes_cache = "use_cache" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            takes_cache = False
        kwargs: dict[str, Any] = {"use_cache": False} if takes_cache else {}
    else:
        kwargs = dict(forward_kwargs)
    device = _model_device(model)
    modules = [*model.modules(), *(sae.modules() if isinstance(sae, nn.Module) else ())]
    modes = [(m, m.training) for m in modules]
    bar = progress_bar(progress, len(items), desc="downstream evaluation", unit="batch")
    try:
        model.eval()
        if isinstance(sae, nn.Module):
            sae.eval()
        with torch.no_grad():
            mean = _mean_activation(model, name, items, positions, kwargs)
            d_sae = getattr(sae, "d_in", None)
            if isinstance(d_sae, int) and d_sae != mean.shape[0]:
                raise ValueError(f"the SAE takes inputs of width {d_sae}, but {name!r} outputs width {mean.shape[0]}")
            variants: dict[str, Callable[[Tensor], Tensor]] = {
                "spliced": _sae_replace(sae, name),
                "zero_ablated": torch.zeros_like,
                "mean_ablated": lambda rows: mean.to(device=rows.device, dtype=rows.dtype).expand_as(rows),
            }
            nats = dict.fromkeys(("clean", *variants), 0.0)
            kl = 0.0
            tokens = 0
            for item in items:
                batch = _to(item, device)
                shape = (batch.ids.shape[0], batch.ids.shape[1])
                scored = _scored_mask(batch.ids, batch.mask, positions)
                targets = _targets(batch.ids, scored)
                clean = _scored_log_probs(_logits(_run(model, batch.inputs, kwargs), shape), scored)
                if targets.numel() and int(targets.max()) >= clean.shape[-1]:
                    raise ValueError(f"token id {int(targets.max())} is outside the model's vocabulary of "
                                     f"{clean.shape[-1]}")
                nats["clean"] += _nll_sum(clean, targets)
                tokens += int(targets.numel())
                for variant, replace in variants.items():
                    with spliced(model, name, replace, positions=positions, attention_mask=batch.mask) as splice:
                        out = _run(model, batch.inputs, kwargs)
                    _check_splice(splice, shape)
                    log_q = _scored_log_probs(_logits(out, shape), scored)
                    nats[variant] += _nll_sum(log_q, targets)
                    if variant == "spliced":
                        kl += _kl_sum(clean, log_q)
                bar.update(1)
    finally:
        bar.close()
        for m, mode in modes:
            m.training = mode
    if not tokens:
        raise ValueError(f"no prediction was scored: every kept position (positions={positions!r}) is the last real "
                         "token of its sequence; use longer sequences")
    ce = {k: v / tokens for k, v in nats.items()}
    rec = {a: _recovered(ce[f"{a}_ablated"], ce["spliced"], ce["clean"]) for a in ABLATIONS}
    return {
        "ce_clean": ce["clean"],
        "ce_spliced": ce["spliced"],
        "ce_zero_ablated": ce["zero_ablated"],
        "ce_mean_ablated": ce["mean_ablated"],
        "loss_recovered": rec[ablation],
        "loss_recovered_zero": rec["zero"],
        "loss_recovered_mean": rec["mean"],
        "kl_clean_spliced": kl / tokens,
        "tokens": tokens,
        "ablation": ablation,
    }


def _run(model: nn.Module, inputs: Tensor | Mapping[str, Any], kwargs: Mapping[str, Any]) -> object:
    return model(inputs, **kwargs) if isinstance(inputs, Tensor) else model(**inputs, **kwargs)


def _check_splice(splice: Splice, shape: tuple[int, int]) -> None:
    if splice.calls != 1:
        why = "did not run in the forward" if not splice.calls else f"ran {splice.calls} times in one forward"
        raise ValueError(f"the layer {splice.name!r} {why}; splice a module that runs once per forward")
    if splice.shape is not None and len(splice.shape) == 3 and splice.shape[:2] != shape:
        raise ValueError(f"the output of {splice.name!r} has (batch, seq) = {splice.shape[:2]}, not the input ids' "
                         f"{shape}: positions cannot be matched to predictions")
