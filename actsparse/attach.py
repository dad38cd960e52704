"""Attach penalties to the layers of any model with forward hooks, without touching its code.

>>> reg = actsparse.attach(model, {"encoder.2": actsparse.BernoulliKL(0.05, weight=3.0)})
>>> loss = criterion(model(x), x) + reg.penalty()

What the hooks do, and why (each point is a pitfall of the hand-written hook in seed 004):

* Each call of a target module reduces its output to a scalar penalty (plus a few ``(units,)``
  statistics) *inside the hook*: no list of activation tensors is kept.
* Each forward of the model starts a fresh capture, so nothing grows across iterations and
  ``penalty()`` is always the penalty of the latest forward. A module called twice in one
  forward contributes twice. Submodules called directly (not through ``model``) form one capture
  that starts at the first such call after a forward of ``model`` or after ``penalty()`` was read.
* Nothing is captured while gradients are disabled or the module is in eval mode, unless
  ``capture="always"``.
* Hooks are removed by :meth:`Attachment.remove`, or on leaving a ``with`` block even if
  training raised.
* A penalty with a moving average keeps one per (layer, call), and :meth:`Attachment.stats`
  reports every call of a layer, so nothing mixes across layers or calls.
* The hooks are picklable objects (bound methods), not closures: ``copy.deepcopy(model)`` and
  ``torch.save(model)`` carry an attachment of their own, found with
  ``Attachment.find(copy)[0]``; the copy's forward never feeds the original's ``penalty()``.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import Tensor, nn

from . import functional as F
from .penalties import Penalty, _flatten

__all__ = ["attach", "regularize", "Regularized", "Attachment", "TargetStats", "find_targets"]

Target = Union[str, type, nn.Module]
Capture = Literal["train", "always"]

#: Attribute under which :func:`regularize` stores a layer's declared penalty (Keras' name).
REGULARIZER_ATTR = "activity_regularizer"


def regularize(module: nn.Module, penalty: Penalty) -> nn.Module:
    """Declare a penalty on ``module``'s output where the layer is built (Keras' habit).

    ``nn.Sequential(actsparse.regularize(nn.Linear(20, 80), actsparse.L1(1e-3)), nn.ReLU())``

    The penalty becomes the child module ``module.activity_regularizer`` (so it follows
    ``.to()``, ``.train()``/``.eval()`` and ``state_dict`` with the model) and is collected by
    :func:`attach` like any other target. Returns ``module`` itself, so its parameter names do
    not change — except for an ``nn.Sequential``, which runs every child in turn: it is wrapped
    in a :class:`Regularized` module (parameters then live under ``module.``).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"regularize() takes an nn.Module, got {type(module).__name__}")
    if not isinstance(penalty, Penalty):
        raise TypeError(f"regularize() takes an actsparse Penalty, got {type(penalty).__name__}")
    existing = getattr(module, REGULARIZER_ATTR, None)
    if existing is not None and not isinstance(existing, Penalty):
        raise ValueError(
            f"{type(module).__name__} already has an attribute {REGULARIZER_ATTR!r} that is not "
            "an actsparse Penalty"
        )
    if isinstance(existing, Penalty):
        penalty = existing + penalty
    if isinstance(module, nn.Sequential):
        return Regularized(module, penalty)
    module.add_module(REGULARIZER_ATTR, penalty)
    return module


class Regularized(nn.Module):
    """``module`` with a declared output penalty, for modules that cannot hold one as a child
    (``nn.Sequential`` would run it as a layer). Built by :func:`regularize`."""

    def __init__(self, module: nn.Module, penalty: Penalty) -> None:
        super().__init__()
        self.module = module
        self.add_module(REGULARIZER_ATTR, penalty)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _describe(target: Target) -> str:
    if isinstance(target, str):
        return repr(target)
    if isinstance(target, type):
        return target.__name__
    return f"module {type(target).__name__}"


def find_targets(model: nn.Module, target: Target) -> list[tuple[str, nn.Module]]:
    """Resolve one target to ``[(qualified_name, module), ...]``.

    A target is a qualified module name (``"encoder.2"``), a glob over names (``"*.act"``,
    ``"enc*"``), a module class (``nn.ReLU``: every instance), or a module instance.

    Raises:
        KeyError: if nothing matches, listing the closest names.
        TypeError: for any other kind of target.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_targets() takes an nn.Module, got {type(model).__name__}")
    named = [(n, m) for n, m in model.named_modules() if not isinstance(m, Penalty)]
    if isinstance(target, str):
        if any(ch in target for ch in "*?["):
            found = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, target)]
        else:
            found = [(n, m) for n, m in named if n == target]
        if not found:
            names = [n for n, _ in named if n]
            close = difflib.get_close_matches(target, names, n=5, cutoff=0.4)
            hint = f" Closest: {', '.join(repr(c) for c in close)}." if close else ""
            listing = ", ".join(repr(n) for n in names[:30]) + (" ..." if len(names) > 30 else "")
            raise KeyError(f"no module named {target!r} in {type(model).__name__}.{hint} "
                           f"Modules: {listing}")
        return found
    if isinstance(target, type) and issubclass(target, nn.Module):
        found = [(n, m) for n, m in named if isinstance(m, target)]
        if not found:
            types = sorted({type(m).__name__ for _, m in named})
            raise KeyError(f"no module of type {target.__name__} in {type(model).__name__}; "
                           f"it has: {', '.join(types)}")
        return found
    if isinstance(target, nn.Module):
        found = [(n, m) for n, m in named if m is target]
        if not found:
            raise KeyError(f"module {type(target).__name__} is not part of {type(model).__name__}")
        return found
    raise TypeError(
        "a target is a module name, a glob, a module class or a module instance; got "
        f"{type(target).__name__}"
    )


def first_tensor(output: object, name: str, action: str = "penalise") -> Tensor:
    """The activation a module's ``output`` stands for: the tensor itself, the first item of a
    tuple (``nn.LSTM``, Hugging Face blocks before transformers 5), or a sub-model's
    ``last_hidden_state``. ``action`` names what the caller does with it, for the error."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]  # e.g. nn.LSTM: (output, (h, c))
    first = getattr(output, "last_hidden_state", None)  # a ModelOutput of a whole sub-model
    if isinstance(first, Tensor):
        return first
    raise TypeError(
        f"cannot {action} the output of {name!r}: expected a tensor (or a tuple whose first item "
        f"is one), got {type(output).__name__}. Choose a submodule that returns a tensor."
    )


@torch.no_grad()
def _unit_stats(a: Tensor, unit_dim: int, th: float | Tensor) -> tuple[Tensor, Tensor]:
    """Per-unit mean activation and firing fraction (``a > th``), both ``(units,)`` float32, detached."""
    a = a.detach()
    if a.dim() == 1:  # (batch,): one unit
        a = a.unsqueeze(-1)
    rho = a.mean(dim=F._reduce_dims(a, unit_dim), dtype=torch.float32)
    return rho, F._firing_share(a, th, unit_dim, torch.float32)


@dataclass
class TargetStats:
    """Statistics of one attached penalty over the latest forward (all plain Python numbers).

    Attributes:
        penalty: weighted penalty value, summed over calls.
        mean_rho_hat: mean over units of ρ̂_j (the mean activation).
        target: the penalty's target ρ, if it has one.
        active_fraction: fraction of activations above the firing threshold.
        dead_units: units that never fired in the latest forward, counted per call (a unit
            silent in both of two calls counts twice).
        units: number of units, summed over the calls (a module of 4 units called twice: 8).
        calls: how many times the module ran in the latest forward.
    """

    penalty: float
    mean_rho_hat: float
    target: float | None
    active_fraction: float
    dead_units: int
    units: int
    calls: int


class _Hooked:
    """One (module, penalty) pair and what its hook captured in the current forward.

    ``target`` is the pair's index among the targets of the same penalty object: with the call
    index it picks the penalty's moving average (``slot``), so targets and calls never share one.
    """

    __slots__ = ("name", "module", "penalty", "handle", "target", "value", "calls", "captured")

    def __init__(self, name: str, module: nn.Module, penalty: Penalty) -> None:
        self.name = name
        self.module = module
        self.penalty = penalty
        self.handle = None
        self.target = 0
        self.clear()

    # A copy or a pickle carries the pairing, not the capture: the captured values hang on the
    # original's autograd graph (deepcopy refuses non-leaf tensors) and belong to its step.
    def __getstate__(self) -> tuple:
        return self.name, self.module, self.penalty, self.handle, self.target

    def __setstate__(self, state: tuple) -> None:
        self.name, self.module, self.penalty, self.handle, self.target = state
        self.clear()

    def clear(self) -> None:
        self.value: Tensor | None = None
        self.calls = 0
        # (detached output, its version counter, firing threshold) per call. Statistics are
        # computed from these only when asked for, so a training step pays nothing for them; the
        # outputs are alive anyway until the backward, and are released at the next forward.
        self.captured: list[tuple[Tensor, int, float | Tensor]] = []

    def activations_finite(self) -> bool | None:
        """Whether every output captured in this forward is finite; None if they were not kept
        (``stats=False``) or were modified in place since. For error messages only."""
        if not self.captured or any(a._version != v for a, v, _ in self.captured):
            return None
        return all(bool(torch.isfinite(a).all()) for a, _, _ in self.captured)

    def unit_sums(self) -> dict[int, list] | None:
        """Per call of the latest forward: ``[1, ρ̂ (units,), firing fraction (units,)]``. Each call
        is its own entry, whatever its width: averaging two calls of one shared ReLU unit by unit
        would hide a unit that is dead in one of them. None if an output was modified in place
        after the hook saw it (e.g. a following ``ReLU(inplace=True)``): its statistics are gone."""
        sums: dict[int, list] = {}
        for call, (a, version, th) in enumerate(self.captured):
            if a._version != version:
                return None
            # statistics of what the penalty measures (penalty.of(fn): fn of the output), computed
            # now, when asked for, not in the training step
            rho, fire = _unit_stats(self.penalty.transform(a), self.penalty.unit_dim, th)
            sums[call] = [1, rho, fire]
        return sums


class Attachment:
    """Penalties attached to a model's layers; returned by :func:`attach`.

    Use :meth:`penalty` after each forward, :meth:`stats` to monitor, :meth:`diagnose` to check
    that every penalty reaches the parameters, and :meth:`remove` (or a ``with`` block) to detach.
    """

    def __init__(
        self,
        model: nn.Module,
        hooked: list[_Hooked],
        *,
        capture: Capture = "train",
        stats: bool = True,
    ) -> None:
        if capture not in ("train", "always"):
            raise ValueError(f"capture must be 'train' or 'always', got {capture!r}")
        self.model = model
        self.capture = capture
        self.track_stats = bool(stats)
        self._hooked = hooked
        self._consumed = False
        self._in_root = False  # inside a forward of the attached model
        self._direct = False  # the current capture comes from direct submodule calls
        # Penalties check their own input eagerly; under torch.compile they cannot, so the total
        # is checked here, outside the compiled region (one host sync per step).
        self._check = any(h.penalty.check for h in hooked)
        _number_targets(hooked)
        # Bound methods and partials, not closures: deepcopy and pickle copy them with the model,
        # so a copy gets hooks that feed a copy of this attachment (see find()).
        self._handles = [
            model.register_forward_pre_hook(self._begin_forward),
            model.register_forward_hook(self._end_forward, always_call=True),
        ]
        for h in hooked:
            h.handle = h.module.register_forward_hook(functools.partial(self._on_output, h))
            self._handles.append(h.handle)
        # Penalties attached by name are not children of the model: keep them in one container
        # for state_dict and .to().
        self.penalties = nn.ModuleList(dict.fromkeys(h.penalty for h in hooked))

    # ---------------------------------------------------------------- hooks
    def _clear(self) -> None:
        for h in self._hooked:
            h.clear()
        self._consumed = False

    def _begin_forward(self, module: nn.Module, args: object) -> None:
        self._clear()
        self._in_root = True
        self._direct = False

    def _end_forward(self, module: nn.Module, args: object, output: object) -> None:
        self._in_root = False

    def _should_capture(self, module: nn.Module) -> bool:
        if self.capture == "always":
            return True
        return module.training and torch.is_grad_enabled()

    def _on_output(self, h: _Hooked, module: nn.Module, args: object, output: object) -> None:
        """The forward hook of target ``h`` (bound with functools.partial)."""
        if not self._should_capture(module):
            return
        if not self._in_root and (self._consumed or not self._direct):
            # A submodule called directly, not through the model: a new capture starts at the
            # first such call after a model forward or after penalty() was read.
            self._clear()
            self._direct = True
        a = first_tensor(output, h.name)
        penalty = h.penalty
        if penalty.training != module.training:
            penalty.train(module.training)
        try:
            # not penalty(a): nothing hooks a penalty, skip Module.__call__
            if penalty.stateful:  # its moving average for this target and call
                value = penalty.forward(a, slot=(h.target, h.calls))
            else:
                value = penalty.forward(a)
        except (ValueError, IndexError, TypeError) as err:
            raise type(err)(f"penalty on {h.name!r} ({type(penalty).__name__}): {err}") from err
        h.value = value if h.value is None else h.value + value
        h.calls += 1
        if self.track_stats:
            th = penalty.firing_threshold  # a learned threshold moves at the next step: keep today's
            h.captured.append((a.detach(), a._version, th.detach().clone() if isinstance(th, Tensor) else th))

    # ---------------------------------------------------------------- results
    def _device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def penalties_by_target(self) -> dict[str, Tensor]:
        """``{target name: weighted penalty of the latest forward}`` for targets that ran."""
        out: dict[str, Tensor] = {}
        for key, h in self._keyed():
            if h.value is not None:
                out[key] = h.value
        return out

    def penalty(self) -> Tensor:
        """The sum of all attached penalties over the latest forward of the model (a scalar).

        Returns a zero tensor if nothing was captured (eval mode, ``no_grad``).
        """
        self._consumed = True
        values = [h.value for h in self._hooked if h.value is not None]
        if not values:
            return torch.zeros((), device=self._device())
        if len(values) > 1 and len({(v.dtype, v.device) for v in values}) == 1:
            total = torch.stack(values).sum()  # one node (a chain of additions is one per target)
        else:
            total = values[0]
            for v in values[1:]:  # mixed dtypes or devices: add with type promotion
                total = total + v
        if self._check and not math.isfinite(float(total.detach())):
            raise ValueError(self._not_finite(total))
        return total

    def _not_finite(self, total: Tensor) -> str:
        """Why the total is NaN/Inf, in one line: which targets, and whether their activations
        were finite (a float16 value above 65504 is an overflow, not a NaN in the layer)."""
        dtype = _dtype_name(total.dtype)
        keyed = [(k, h) for k, h in self._keyed() if h.value is not None]
        bad = [(k, h) for k, h in keyed if not bool(torch.isfinite(h.value.detach()))]
        if not bad:  # every target is finite: their sum is not
            exact = sum(float(h.value.detach().double()) for _, h in keyed)
            top = torch.finfo(total.dtype).max
            return (f"the sum of the penalties ({exact:.4g}) overflows {dtype} (max {top:.5g}) although each "
                    "is finite; lower the weights, or compute the penalties in float32")
        causes = []
        for key, h in bad:
            finite = h.activations_finite()
            if finite is None:
                causes.append(f"{key} (NaN/Inf activations, or a value too large for {_dtype_name(h.value.dtype)})")
            elif finite:
                causes.append(f"{key} (overflows {_dtype_name(h.value.dtype)} although its activations are finite: "
                              "lower the weight or compute in float32)")
            else:
                causes.append(f"{key} (its activations contain NaN or Inf: check the layer's input "
                              "and the learning rate)")
        return "the penalty is not finite for: " + "; ".join(causes)

    def _keyed(self) -> Iterator[tuple[str, _Hooked]]:
        """``(key, pair)`` with unique keys: the module name; ``name:Class`` when a module has
        several penalties; ``name:Class#2``, ``#3``... when those coincide too."""
        counts: dict[str, int] = {}
        for h in self._hooked:
            counts[h.name] = counts.get(h.name, 0) + 1
        seen: dict[str, int] = {}
        for h in self._hooked:
            key = h.name or "<model>"
            if counts[h.name] > 1:
                key = f"{key}:{type(h.penalty).__name__}"
            seen[key] = seen.get(key, 0) + 1
            yield (key if seen[key] == 1 else f"{key}#{seen[key]}"), h

    def stats(self) -> dict[str, TargetStats]:
        """Per target: penalty, mean ρ̂, target, active fraction and dead units of the latest forward.

        Targets that did not run in the latest forward are reported with ``calls=0`` and NaN
        values. Statistics need ``attach(..., stats=True)`` (the default); they are computed
        here, from the outputs the hooks kept, so training steps do not pay for them. A target
        whose output was modified in place after its hook ran (e.g. by ``ReLU(inplace=True)``) is
        reported with NaN statistics and a warning.
        """
        out: dict[str, TargetStats] = {}
        for key, h in self._keyed():
            target = getattr(h.penalty, "target", None)
            sums = h.unit_sums()
            if sums is None:
                warnings.warn(f"the output of {key!r} was modified in place after the penalty read it (an "
                              "inplace=True layer after it?): its statistics are not available", stacklevel=2)
            if h.calls == 0 or not sums:
                value = float(h.value.detach()) if h.value is not None else math.nan
                out[key] = TargetStats(value, math.nan, target, math.nan, 0, 0, h.calls)
                continue
            # every call's units side by side: a unit dead in one call of a shared module counts there
            rho = torch.cat([r for _, r, _ in sums.values()])
            fire = torch.cat([f for _, _, f in sums.values()])
            out[key] = TargetStats(
                penalty=float(h.value.detach()) if h.value is not None else math.nan,
                mean_rho_hat=float(rho.mean()),
                target=target,
                active_fraction=float(fire.mean()),
                dead_units=int((fire == 0).sum()),
                units=int(fire.numel()),
                calls=h.calls,
            )
        return out

    def diagnose(self, loss: Tensor | None = None, *, warn: bool = True):
        """Check that each attached penalty reaches the model's parameters.

        For every target, computes the gradient norm of its penalty (latest forward) on the
        model's trainable parameters, without touching ``.grad`` and keeping the graph, so you
        can still call ``loss.backward()``. Warns (``UserWarning``) when a penalty reaches no
        parameter or was not computed at all. If ``loss`` is given, its gradient norm is
        reported too, so you can compare the scales.

        Returns:
            A list of :class:`actsparse.diagnose.GradientReport`, one per term.
        """
        from .diagnose import gradient_report

        terms: dict[str, Tensor | None] = {}
        if loss is not None:
            terms["loss"] = loss
        for key, h in self._keyed():
            terms[f"penalty {key}"] = h.value
        return gradient_report(self.model, terms, warn=warn)

    # ---------------------------------------------------------------- lifecycle
    def remove(self) -> None:
        """Remove every hook this attachment registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for h in self._hooked:
            h.clear()

    @property
    def active(self) -> bool:
        """Whether the hooks are still registered."""
        return bool(self._handles)

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def state_dict(self) -> dict[str, Tensor]:
        """Moving averages of the attached penalties (those declared by name or type)."""
        return self.penalties.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.penalties.load_state_dict(state)

    def to(self, *args, **kwargs) -> Attachment:
        self.penalties.to(*args, **kwargs)
        return self

    def __getstate__(self) -> dict:
        # a copy starts between forwards (the captures stay with the original: see _Hooked)
        return {**self.__dict__, "_consumed": False, "_in_root": False, "_direct": False}

    @staticmethod
    def find(model: nn.Module) -> list[Attachment]:
        """The attachments whose hooks are on ``model``, oldest first.

        This is how to reach the attachment of a copy: ``copy.deepcopy(model)`` and
        ``torch.save``/``torch.load`` copy the hooks with the model, each copy feeding its own
        attachment (and its own penalty objects, unless they are the model's children)::

            clone = copy.deepcopy(model)
            (reg,) = actsparse.Attachment.find(clone)
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"Attachment.find() takes an nn.Module, got {type(model).__name__}")
        model = getattr(model, "_orig_mod", model)
        found = []
        for hook in model._forward_pre_hooks.values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, Attachment) and getattr(hook, "__func__", None) is Attachment._begin_forward:
                found.append(owner)
        return found

    def __repr__(self) -> str:
        lines = [f"{key}: {h.penalty!r}" for key, h in self._keyed()]
        state = "active" if self.active else "removed"
        return f"Attachment({state}; " + "; ".join(lines) + ")"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _number_targets(hooked: list[_Hooked]) -> None:
    """Give each pair its index among the targets of its penalty object (its moving averages).

    Raises ``ValueError`` when one stateful penalty is a term of two different penalty objects
    (``p`` on one layer, ``p + L1(...)`` on another): both would use its first average.
    """
    seen: dict[int, int] = {}
    owner: dict[int, tuple[Penalty, str]] = {}
    for h in hooked:
        if not h.penalty.stateful:
            continue
        h.target = seen.get(id(h.penalty), 0)
        seen[id(h.penalty)] = h.target + 1
        for term in _flatten(h.penalty):
            if not term.stateful:
                continue
            first, where = owner.setdefault(id(term), (h.penalty, h.name))
            if first is not h.penalty:
                raise ValueError(
                    f"one {type(term).__name__} with momentum is part of two different penalties (on "
                    f"{where!r} and {h.name!r}), whose moving averages would mix; build a separate "
                    "penalty object for each"
                )


PenaltySpec = Union[Penalty, Sequence[Penalty]]


def attach(
    model: nn.Module,
    penalties: Mapping[Target, PenaltySpec] | None = None,
    *,
    capture: Capture = "train",
    stats: bool = True,
) -> Attachment:
    """Attach sparsity penalties to layers of ``model`` by forward hooks.

    Args:
        model: any ``nn.Module`` (also the module inside a ``torch.compile`` wrapper).
        penalties: ``{target: penalty}``; a target is a qualified module name, a glob over names,
            a module class or a module instance; a value is a :class:`Penalty` or a list of them.
            Penalties declared with :func:`regularize` are collected too. The penalty applies to
            the target's *output* (for a tuple output, its first item).
        capture: ``"train"`` (default) captures only when the module is in training mode and
            gradients are enabled; ``"always"`` also under ``no_grad``/eval (e.g. for validation).
        stats: also keep per-unit ρ̂ and firing fraction for :meth:`Attachment.stats`.

    Returns:
        An :class:`Attachment`: ``reg.penalty()`` after each forward, ``reg.stats()``,
        ``reg.diagnose()``, ``reg.remove()``; also a context manager.

    Raises:
        KeyError: a target that matches nothing (the message lists close names).
        TypeError: a value that is not a Penalty.
        ValueError: nothing to attach.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach() takes an nn.Module, got {type(model).__name__}")
    if penalties is not None and not isinstance(penalties, Mapping):
        raise TypeError(f"penalties must be a mapping {{target: penalty}}, e.g. {{'encoder.1': actsparse.L1(1e-3)}}; "
                        f"got {type(penalties).__name__}")
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper: hook the real modules
    hooked: list[_Hooked] = []
    for target, spec in (penalties or {}).items():
        items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
        for p in items:
            if not isinstance(p, Penalty):
                raise TypeError(
                    f"the penalty for {_describe(target)} must be an actsparse Penalty (e.g. "
                    f"actsparse.L1(1e-3)), got {type(p).__name__}"
                )
        for name, module in find_targets(model, target):
            for p in items:
                hooked.append(_Hooked(name, module, p))
    for name, module in model.named_modules():
        declared = getattr(module, REGULARIZER_ATTR, None)
        if isinstance(declared, Penalty) and not isinstance(module, Penalty):
            hooked.append(_Hooked(name, module, declared))
    if not hooked:
        raise ValueError(
            "nothing to attach: pass {target: penalty} or declare penalties with "
            "actsparse.regularize(layer, penalty)"
        )
    return Attachment(model, hooked, capture=capture, stats=stats)

