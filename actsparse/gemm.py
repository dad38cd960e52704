"""The fastest exact float32 GEMM for ``x Wᵀ + b`` without a graph, chosen by measurement.

On some CPUs torch's default float32 matmul is far from the machine's best. On the 2-core AMD
EPYC (Zen 5) this project is measured on, ``F.linear`` runs at 140–205 GFLOP/s (an AVX2 kernel),
and oneDNN's (``torch.ops.mkldnn._linear_pointwise``, AVX-512) at 320–420 GFLOP/s, for the same
float32 product. Both are float32 GEMMs: they differ only in the order of the sums (rounding).

A TopK SAE's encoder forward is that product, and on the sparse TopK path it needs no graph (its
gradient is sparse: :mod:`actsparse.models.sparse_topk`), so :func:`linear` can take the faster
kernel there. Which one is faster is measured, not assumed from the CPU's name:

* :func:`choose` times both on the call's shape (the batch rounded up to a power of two),
  interleaved, the median of 5 each, and takes oneDNN only if it is at least 10 % faster;
* the choice is kept per process and in ``<cache>/gemm.json`` (see
  :func:`actsparse.lm.byte_lm.cache_root`), under a file lock, keyed by torch's version, the CPU's
  capability, the thread count and the shape. Every later process on the machine, a resumed run
  included, makes the same choice, so resuming stays bit-identical;
* ``ACTSPARSE_GEMM=default`` or ``=onednn`` overrides the choice; ``default`` is also used for
  anything but float32 2-D CPU tensors.

With a graph (a dense SAE's encoder and decoder while training), each of the three products is
chosen the same way on its own shape: the output ``x Wᵀ``, the input's gradient ``g W`` and the
weight's gradient ``gᵀ x``, the last two timed with the transposed copies oneDNN needs. A
product whose choice is the default runs as ``F.linear``'s own backward would (``g.mm(W)``,
``g.t().mm(x)``). Under ``create_graph`` (a gradient of a gradient), the backward takes those
default products, which autograd can differentiate again. The weight's gradient keeps the
default when its copies would pass :data:`COPY_LIMIT` (a full batch: they would hold the layer's
input twice), and a batch over :data:`MEASURE_ROWS` rows is timed on that many.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["linear", "choose", "PATHS", "KINDS", "onednn_available", "decisions"]

#: The GEMM paths: torch's ``F.linear``, and oneDNN's float32 linear.
PATHS = ("default", "onednn")

#: oneDNN must beat the default by this factor to be chosen (a tie keeps the default).
MIN_GAIN = 1.1

#: The most rows a measurement times (a bigger batch is timed on this many).
MEASURE_ROWS = 16384

#: A gradient product takes oneDNN only if the transposed copies it needs stay under this many
#: bytes: a full-batch layer (L-BFGS on 10⁵ rows) would otherwise copy its whole input again.
COPY_LIMIT = 64 * 2**20

_memo: dict[str, str] = {}


def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear op and oneDNN is usable."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """oneDNN's ``x wᵀ + b``; it takes contiguous operands (a copy of any that is not)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w.contiguous(), None if b is None else b.contiguous(),
                                              "none", [], "")


def _run(path: str, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return _onednn(x, w, b) if path == "onednn" else F.linear(x, w, b)


#: The products of a linear layer, each chosen on its own: the output, and the two gradients.
KINDS = ("forward", "grad_input", "grad_weight")


def _grad_input(path: str, g: Tensor, w: Tensor) -> Tensor:
    """``g W``: ``(batch, d_out) @ (d_out, d_in)``."""
    return _onednn(g, w.t(), None) if path == "onednn" else g.mm(w)


def _grad_weight(path: str, g: Tensor, x: Tensor) -> Tensor:
    """``gᵀ x``: ``(d_out, batch) @ (batch, d_in)``."""
    return _onednn(g.t(), x.t(), None) if path == "onednn" else g.t().mm(x)


def _key(batch: int, d_in: int, d_out: int, kind: str = "forward") -> str:
    bucket = 1 << max(6, (batch - 1).bit_length())  # 64, 128, ... : the last, shorter batch shares its key
    cap = torch.backends.cpu.get_cpu_capability()
    what = "" if kind == "forward" else f"{kind} of "  # forward keys as before: stored choices stay valid
    return f"torch {torch.__version__}|{cap}|threads {torch.get_num_threads()}|{what}{bucket}x{d_in}->{d_out}"


def _measure(batch: int, d_in: int, d_out: int, repeats: int = 5, kind: str = "forward") -> dict[str, float]:
    """Median seconds of each path of the product ``kind`` of a ``(batch, d_in) -> (batch, d_out)``
    linear layer, on random float32 data, interleaved."""
    g = torch.Generator().manual_seed(0)
    batch = min(batch, MEASURE_ROWS)  # each row costs alike past this: a full batch of 10⁵ rows is not timed whole
    x, w, b = (torch.randn(*s, generator=g) for s in ((batch, d_in), (d_out, d_in), (d_out,)))
    grad = torch.randn(batch, d_out, generator=g)
    run = {"forward": lambda p: _run(p, x, w, b), "grad_input": lambda p: _grad_input(p, grad, w),
           "grad_weight": lambda p: _grad_weight(p, grad, x)}[kind]
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    with torch.no_grad():
        for p in PATHS:  # warm-up: the first oneDNN call creates its primitive
            run(p)
        for _ in range(repeats):
            for p in PATHS:
                t = time.perf_counter()
                run(p)
                times[p].append(time.perf_counter() - t)
    return {p: statistics.median(v) for p, v in times.items()}


def _cache_file() -> Path:
    from .lm.byte_lm import cache_root

    return cache_root() / "gemm.json"


def _faster(seconds: dict[str, float]) -> str:
    """oneDNN if its time is at least :data:`MIN_GAIN` times shorter, else the default."""
    return "onednn" if seconds["default"] >= MIN_GAIN * seconds["onednn"] else "default"


def _decide(key: str, batch: int, d_in: int, d_out: int, kind: str = "forward") -> str:
    """The choice stored for ``key``, or a new measurement stored under a lock."""
    path = _cache_file()
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process measures; the others then read its choice
            try:
                stored = json.loads(path.read_text()) if path.is_file() else {}
            except (OSError, ValueError):
                stored = {}
            if not isinstance(stored, dict):
                stored = {}
            entry = stored.get(key)
            if isinstance(entry, dict) and entry.get("path") in PATHS:
                return entry["path"]
            t = _measure(batch, d_in, d_out, kind=kind)
            choice = _faster(t)
            stored[key] = {"path": choice, "seconds": t}
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, path)
            return choice
    except (OSError, ImportError):  # no writable cache (or no fcntl): measure, keep it for this process
        return _faster(_measure(batch, d_in, d_out, kind=kind))


def choose(batch: int, d_in: int, d_out: int, kind: str = "forward") -> str:
    """The float32 CPU GEMM path for the product ``kind`` (:data:`KINDS`) of a linear layer
    ``(batch, d_in) @ (d_out, d_in)ᵀ``: ``ACTSPARSE_GEMM`` if set, else the measured choice
    (module docstring)."""
    forced = os.environ.get("ACTSPARSE_GEMM", "").strip().lower()
    if forced:
        if forced not in PATHS:
            raise ValueError(f"ACTSPARSE_GEMM must be one of {', '.join(PATHS)}, got {forced!r}")
        return forced if forced == "default" or onednn_available() else "default"
    if not onednn_available():
        return "default"
    key = _key(batch, d_in, d_out, kind)
    if key not in _memo:
        _memo[key] = _decide(key, batch, d_in, d_out, kind)
    return _memo[key]


def decisions() -> dict[str, str]:
    """The choices made in this process so far, by key (for logs and benchmarks)."""
    return dict(_memo)


class _Linear(torch.autograd.Function):
    """``x Wᵀ + b`` with each product on its chosen path (``paths``: forward, grad_input, grad_weight)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, paths: tuple[str, str, str]) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.paths, ctx.has_bias = paths, b is not None
        return _run(paths[0], x, w, b)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        twice = torch.is_grad_enabled()  # create_graph: products autograd can differentiate again
        _, p_in, p_w = ("default",) * 3 if twice else ctx.paths
        gx = _grad_input(p_in, g, w) if ctx.needs_input_grad[0] else None
        gw = _grad_weight(p_w, g, x) if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, each product through oneDNN where that was measured faster.

    Args:
        x: ``(batch, d_in)``; weight: ``(d_out, d_in)``; bias: ``(d_out,)`` or None.

    Returns:
        ``(batch, d_out)``, equal to ``F.linear`` to float32 rounding, with the gradients of
        ``F.linear`` to float32 rounding. Anything but float32 2-D on the CPU goes through
        ``F.linear``, and so does a graph whose three products all chose the default.
    """
    if (x.dim() != 2 or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32)
            or x.shape[0] == 0):
        return F.linear(x, weight, bias)
    batch, d_in, d_out = x.shape[0], x.shape[1], weight.shape[0]
    needs_graph = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                               or (bias is not None and bias.requires_grad))
    if needs_graph:
        copies = 4 * batch * (d_in + d_out)  # grad_weight's transposed g and x (grad_input's W is small)
        paths = (choose(batch, d_in, d_out),
                 choose(batch, d_in, d_out, "grad_input") if x.requires_grad else "default",
                 choose(batch, d_in, d_out, "grad_weight") if weight.requires_grad and copies <= COPY_LIMIT
                 else "default")
        return _Linear.apply(x, weight, bias, paths) if "onednn" in paths else F.linear(x, weight, bias)
    return _run(choose(batch, d_in, d_out), x, weight, bias)
