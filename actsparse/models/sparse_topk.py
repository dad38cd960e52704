"""The sparse TopK path: encode and decode with only the k active units of each sample.

A TopK SAE keeps k of ``d_sae`` units per sample (Gao et al. 2024), yet the dense path builds the
``(batch, d_sae)`` code, decodes it with a full matmul, and its backward runs two more full
matmuls (the decoder's and the encoder's weight gradients), almost all of them on zeros. Here:

* the code is a :class:`SparseCode`: ``values`` and ``indices``, both ``(batch, k)``;
* decoding is an embedding-bag sum of the k active decoder rows (:func:`sparse_decode`):
  ``x̂_b = b_dec + Σ_j v_bj · atoms[i_bj]``; its backward touches only those rows;
* the encoder's backward (:func:`gathered_linear`) is a sparse outer-product sum: the weight
  gradient row ``s`` is ``Σ_{(b,j): i_bj = s} g_bj · x_b`` — ``batch·k·d_in`` multiply-adds
  instead of the dense ``batch·d_sae·d_in``.

The encoder's forward matmul ``x W_encᵀ + b_enc`` stays dense: the top-k needs every
pre-activation. It is the floor of a training step.

Same values and gradients as the dense path, to rounding (``tests/test_sparse_topk.py``).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import gemm

__all__ = ["SparseCode", "gathered_dots", "gathered_linear", "scatter_outer", "sparse_decode", "topk_linear",
           "topk_rows", "TOPK_CHUNK", "SCREENS"]


class SparseCode(NamedTuple):
    """The hidden code of a TopK SAE as its k active units per sample.

    Attributes:
        values: ``(batch, k)`` activations (ReLU'd, so some may be 0 when fewer than k units are
            positive).
        indices: ``(batch, k)`` int64 unit indices, distinct within a row.
        d_sae: number of hidden units.
    """

    values: Tensor
    indices: Tensor
    d_sae: int

    @property
    def shape(self) -> tuple[int, int]:
        """The dense shape ``(batch, d_sae)``."""
        return (self.values.shape[0], self.d_sae)

    def detach(self) -> SparseCode:
        return SparseCode(self.values.detach(), self.indices, self.d_sae)

    def to_dense(self) -> Tensor:
        """The dense code ``(batch, d_sae)`` (allocates it: for evaluation and figures)."""
        out = self.values.new_zeros(self.shape)
        return out.scatter_(-1, self.indices, self.values)

    def mean(self, dim: int | None = None) -> Tensor:
        """Mean activation over all entries (``dim=None``) or per unit over the batch (``dim=0``,
        shape ``(d_sae,)``), without building the dense code."""
        batch = self.values.shape[0]
        if dim is None:
            return self.values.sum() / (batch * self.d_sae)
        if dim != 0:
            raise ValueError(f"SparseCode.mean supports dim=None or dim=0, got {dim!r}")
        return unit_sums(self.indices, self.values, self.d_sae) / batch

    def fired(self) -> Tensor:
        """``(d_sae,)`` bool: units with a non-zero activation in some sample."""
        out = torch.zeros(self.d_sae, dtype=torch.bool, device=self.values.device)
        return out.index_fill_(0, self.indices[self.values != 0], True)


def unit_sums(indices: Tensor, coef: Tensor, n: int) -> Tensor:
    """``out[s] = Σ_{(b,j): indices[b,j] = s} coef[b,j]``, shape ``(n,)``."""
    out = coef.new_zeros(n)
    return out.index_add_(0, indices.reshape(-1), coef.reshape(-1))


#: Bytes of the ``(samples·k, d)`` outer-product block the fallback of :func:`scatter_outer` builds
#: at a time: small enough to stay in a core's cache between the multiply and the ``index_add_``.
SCATTER_BLOCK_BYTES = 1 << 20


def _mkl_sparse(t: Tensor) -> bool:
    """Whether ``t``'s products can go through MKL's sparse (CSR) kernels: float32/64 on a CPU
    build with MKL."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and torch.backends.mkl.is_available()


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix from valid parts (made here, so no invariant check; torch's beta warning muted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _by_unit(indices: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``(batch, k)`` pairs of ``indices`` grouped by unit, as the CSR parts of the ``(n, batch)``
    matrix ``Gᵀ``: row pointers ``(n + 1,)`` int32, the order of the flattened pairs ``(batch·k,)``
    and each one's sample ``(batch·k,)`` int32.

    A sort of ``batch·k`` integers (1 ms for 16,384 here) that both weight gradients of a TopK step
    need for the same indices: kept on the ``indices`` tensor, for as long as it is not modified.
    """
    key = (indices._version, n, indices.shape)
    cached = getattr(indices, "_actsparse_by_unit", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)  # stable: the same sums in the same order on every run
    crow = torch.zeros(n + 1, dtype=torch.int32, device=indices.device)
    torch.cumsum(torch.bincount(flat, minlength=n), 0, out=crow[1:])
    parts = (crow, order, (order // indices.shape[1]).to(torch.int32))
    indices._actsparse_by_unit = (key, parts)
    return parts


def scatter_outer(indices: Tensor, coef: Tensor, rows: Tensor, n: int, out: Tensor | None = None) -> Tensor:
    """``out[s] = Σ_{(b,j): indices[b,j] = s} coef[b,j] · rows[b]``, shape ``(n, d)``.

    Args:
        indices: ``(batch, k)`` int64 in ``[0, n)``.
        coef: ``(batch, k)``.
        rows: ``(batch, d)``.
        out: ``(n, d)`` to add into (default: a new tensor).

    It is ``Gᵀ rows`` for the ``(batch, n)`` matrix G with ``coef`` at ``indices``: ``batch·k·d``
    multiply-adds, never the dense G. On a CPU with MKL (float32/64), ``Gᵀ`` is built in CSR form
    (the pairs sorted by unit) and multiplied by MKL's sparse kernel into a fresh output: on the
    2-core EPYC of docs/benchmarks.md 1.6× (batch 512) to 2.9× (batch 4096) faster than blocks of
    outer products added with ``index_add_`` (the fallback, :data:`SCATTER_BLOCK_BYTES` at a time),
    and 3–5× faster than torch's COO matmul (which sorts, coalesces and copies).
    """
    batch, k = indices.shape
    d = rows.shape[1]
    coef = coef.to(rows.dtype)
    if out is None and _mkl_sparse(rows) and batch * k < 2**31:
        crow, order, sample = _by_unit(indices, n)
        g_t = _csr(crow, sample, coef.reshape(-1)[order], (n, batch))
        result = rows.new_empty(n, d)
        # beta=0: the output is written, not read (rows of units no sample chose come out 0)
        return torch.addmm(result, g_t, rows.contiguous(), beta=0, out=result)
    if out is None and rows.device.type != "cpu" and rows.dtype in (torch.float32, torch.float64):
        # on an accelerator: one sparse COO product (cuSPARSE), not many small launches
        sample = torch.arange(batch, device=indices.device).repeat_interleave(k)
        g_t = torch.sparse_coo_tensor(torch.stack([indices.reshape(-1), sample]), coef.reshape(-1), (n, batch),
                                      check_invariants=False)
        return torch.sparse.mm(g_t, rows)
    if out is None:
        out = rows.new_zeros(n, d)
    step = max(1, SCATTER_BLOCK_BYTES // max(1, k * d * rows.element_size()))
    for start in range(0, batch, step):
        stop = start + step
        block = torch.mul(coef[start:stop].unsqueeze(-1), rows[start:stop].unsqueeze(1))
        out.index_add_(0, indices[start:stop].reshape(-1), block.reshape(-1, d))
    return out


def gathered_dots(indices: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """``out[b, j] = ⟨rows[b], table[indices[b, j]]⟩``, shape ``(batch, k)``.

    Args:
        indices: ``(batch, k)`` int64; table: ``(n, d)``; rows: ``(batch, d)``.

    The gradient of an embedding-bag sum with respect to its per-sample weights: ``rows · tableᵀ``
    sampled at the k units of each sample. On a CPU with MKL (float32/64) that is torch's
    ``sampled_addmm`` on the pattern of ``indices`` grouped by unit (1.7–2× faster here than the
    fallback at batch 512 and 4096: blocks of samples whose gathered table rows stay in cache,
    dotted with ``vecdot``).
    """
    batch, k = indices.shape
    d = table.shape[1]
    rows = rows.to(table.dtype)
    if _mkl_sparse(table) and batch * k < 2**31:
        # the (n, batch) pattern grouped by unit (the grouping the weight gradients use too): each
        # table row is read once, and the rows of `rows` (a batch: cache-sized) as often as needed
        crow, order, sample = _by_unit(indices, table.shape[0])
        pattern = _csr(crow, sample, table.new_zeros(batch * k), (table.shape[0], batch))
        dots = torch.sparse.sampled_addmm(pattern, table, rows.contiguous().t(), beta=0).values()
        return dots.new_empty(batch * k).index_copy_(0, order, dots).view(batch, k)
    out = rows.new_empty(batch, k)
    step = max(1, SCATTER_BLOCK_BYTES // max(1, k * d * table.element_size()))
    for start in range(0, batch, step):
        stop = start + step
        picked = table.index_select(0, indices[start:stop].reshape(-1)).view(-1, k, d)
        out[start:stop] = torch.linalg.vecdot(picked, rows[start:stop].unsqueeze(1))
    return out


class _GatheredLinear(torch.autograd.Function):
    """``(x Wᵀ + b)`` at ``indices`` only, with the sparse backward (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor,  # type: ignore[override]
                gathered: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, indices)
        return gathered.clone()  # a new tensor: the output of a Function must not alias an input

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight, indices = ctx.saved_tensors
        grad = grad.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # ∂/∂x_b = Σ_j g_bj W[i_bj]: an embedding-bag sum of W's rows
            gx = F.embedding_bag(indices, weight, per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            gw = scatter_outer(indices, grad, x, weight.shape[0])
        if ctx.needs_input_grad[2]:
            gb = unit_sums(indices, grad, weight.shape[0])
        return gx, gw, gb, None, None


def gathered_linear(x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor, pre: Tensor | None = None, *,
                    values: Tensor | None = None) -> Tensor:
    """The entries ``indices`` of the linear map ``x Wᵀ + b``, differentiable, with a sparse backward.

    Args:
        x: ``(batch, d_in)``.
        weight: ``(d_sae, d_in)``; bias: ``(d_sae,)`` or None.
        indices: ``(batch, k)`` int64.
        pre: ``(batch, d_sae)``, the already computed ``x Wᵀ + b`` (no graph needed): the forward
            only gathers from it.
        values: instead of ``pre``, the entries already gathered, ``(batch, k)`` (e.g. from
            :func:`topk_linear`).

    Returns:
        ``(batch, k)``: ``pre.gather(-1, indices)`` (or ``values``), whose gradient reaches ``x``,
        ``weight`` and ``bias`` through the k selected units of each sample only.
    """
    if (pre is None) == (values is None):
        raise TypeError("gathered_linear() takes the pre-activations or the gathered values, one of them")
    gathered = pre.detach().gather(-1, indices) if values is None else values.detach()
    return _GatheredLinear.apply(x, weight, bias, indices, gathered)


def _block_size(n: int, k: int) -> int:
    """The block width of :func:`topk_rows` for rows of ``n`` and ``k`` kept: about ``8k`` blocks
    (the selection among block maxima is then cheap), a power of two ≥ 8 that divides ``n``; 0 when
    the blocks would not pay (the row is short next to k)."""
    width = 1 << max(0, (n // (8 * k)).bit_length() - 1) if n >= 8 * k else 0
    while width >= 8 and n % width:
        width //= 2
    return width if width >= 8 else 0


@torch.no_grad()
def topk_rows(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``pre`` ``(batch, n)`` and their indices, exactly
    (the same as ``pre.topk(k, dim=-1, sorted=False)``, in no particular order, ties aside).

    torch's CPU ``topk`` is a partial sort of every row: ~1 G elements/s here, slower than the
    GEMM that made ``pre`` would suggest. This selects among candidates instead:

    1. cut each row into blocks of ``w`` (:func:`_block_size`) and take each block's maximum;
    2. take the k largest block maxima; ``t`` is the smallest of them. At least k entries are
       ≥ t (one per chosen block), so every entry of the row's top k is ≥ t, and lies in one of
       the k chosen blocks (a block whose maximum is below t holds nothing ≥ t);
    3. the top k of the entries ≥ t of those ``k·w`` candidates (usually k plus a few).

    Falls back to ``torch.topk`` where the blocks do not pay (short rows, see :func:`_block_size`),
    off the CPU, and for rows with NaN (which ``topk`` ranks above everything).

    Returns:
        ``values`` ``(batch, k)`` and ``indices`` ``(batch, k)`` int64.
    """
    batch, n = pre.shape
    width = _block_size(n, k)
    if width == 0 or pre.device.type != "cpu" or batch == 0:
        return pre.topk(k, dim=-1, sorted=False)
    n_blocks = n // width
    blocks = pre.view(batch, n_blocks, width)
    top_max, top_block = blocks.amax(-1).topk(k, dim=-1, sorted=False)            # (batch, k)
    t = top_max.amin(-1, keepdim=True)
    rows = torch.arange(batch, device=pre.device).unsqueeze(1)
    cand = pre.view(batch * n_blocks, width).index_select(0, (top_block + rows * n_blocks).view(-1))
    cand = cand.view(batch, k * width)                                              # the k blocks' entries
    keep = cand >= t
    counts = keep.sum(-1)
    if bool((counts < k).any()):  # only a NaN makes fewer than k entries ≥ t
        return pre.topk(k, dim=-1, sorted=False)
    row, pos = keep.nonzero().unbind(1)                                             # row-major: by row
    col = top_block[row, pos // width] * width + pos % width                        # column in pre
    most = int(counts.max())
    if most == k:  # exactly k candidates in every row: they are the top k
        return cand[row, pos].view(batch, k), col.view(batch, k)
    # rows with more than k candidates: pad each row's candidates to `most`, with -inf, and topk them
    slot = torch.arange(row.shape[0], device=pre.device) - (counts.cumsum(0) - counts)[row]
    pad_v = pre.new_full((batch, most), float("-inf")).index_put_((row, slot), cand[row, pos])
    pad_c = torch.zeros(batch, most, dtype=torch.int64, device=pre.device).index_put_((row, slot), col)
    values, j = pad_v.topk(k, dim=-1, sorted=False)
    return values, pad_c.gather(1, j)


#: Rows of the pre-activation matrix :func:`topk_linear` computes at a time: 512 × 8192 float32
#: is 16 MiB, which the allocator keeps and reuses (a whole batch of 4096 is 128 MiB, above
#: glibc's largest mmap threshold, so it was mapped afresh and page-faulted in at every step).
TOPK_CHUNK = 512


def _linear_bf16(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x wᵀ + b`` in bfloat16: through oneDNN on the CPU where it is there (on the EPYC of
    docs/benchmarks.md 6 ms for 512 × 512 × 8192, against 12 ms for ``F.linear``'s bf16 path)."""
    if x.device.type == "cpu" and gemm.onednn_available():
        return gemm._onednn(x, w, b)
    return F.linear(x, w, b)


#: The top-k selections :func:`topk_linear` offers: ``exact`` (float32 pre-activations) and
#: ``bf16`` (choose the k units from a bfloat16 GEMM, then compute their values exactly).
SCREENS = ("exact", "bf16")


@torch.no_grad()
def topk_linear(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, chunk: int | None = None,
                screen: str = "exact") -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``x Wᵀ + b`` and their indices, ``chunk`` rows at
    a time (the ``(batch, d_sae)`` matrix is never built), without a graph.

    Args:
        x: ``(batch, d_in)``; weight: ``(d_sae, d_in)``; bias: ``(d_sae,)`` or None; k ≤ d_sae.
        chunk: rows at a time (default :data:`TOPK_CHUNK`, read at each call).
        screen: ``exact`` (default): the top k of the float32 (x's dtype) product, through
            :func:`actsparse.gemm.linear` (the float32 path measured fastest) and :func:`topk_rows`.
            ``bf16``: an approximation, opt-in. The k units are chosen from the product in
            bfloat16 (2–4× the float32 GEMM's speed on CPUs with bf16 instructions), then their
            values are computed exactly, as float32 dot products. Where two pre-activations are
            closer than bfloat16's rounding (8 bits of mantissa) the chosen set may differ from
            the exact top k; ``bench/bench_topk_bound.py`` reports how often, and the FVU after
            the same steps.

    Returns:
        ``values`` ``(batch, k)`` (x's dtype) and ``indices`` ``(batch, k)`` int64, in no particular
        order within a row: with ``exact``, the same sets as ``(x Wᵀ + b).topk(k, sorted=False)``.
    """
    if screen not in SCREENS:
        raise ValueError(f"screen must be one of {', '.join(SCREENS)}, got {screen!r}")
    batch, chunk = x.shape[0], chunk or TOPK_CHUNK
    indices = torch.empty(batch, k, dtype=torch.int64, device=x.device)
    if screen == "bf16":
        w16, b16 = weight.to(torch.bfloat16), None if bias is None else bias.to(torch.bfloat16)
        for start in range(0, batch, chunk):  # (the selection in float32: reductions over bf16 are 8x slower)
            part = _linear_bf16(x[start:start + chunk].to(torch.bfloat16), w16, b16).float()
            indices[start:start + chunk] = topk_rows(part, k)[1]
        # the chosen units' exact values: one pass, sharing the backward's grouping by unit
        values = gathered_dots(indices, weight, x)
        return (values, indices) if bias is None else (values + bias[indices], indices)
    values = x.new_empty(batch, k)
    for start in range(0, batch, chunk):
        part = gemm.linear(x[start:start + chunk], weight, bias)
        values[start:start + chunk], indices[start:start + chunk] = topk_rows(part, k)
    return values, indices


class _SparseDecode(torch.autograd.Function):
    """``Σ_j values[b,j] · atoms[indices[b,j]]`` with the blocked backward of :func:`scatter_outer`
    and :func:`gathered_dots` (the embedding bag's own backward zero-fills and scatters 1.5–2×
    slower here)."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, atoms: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(values, indices, atoms)
        return F.embedding_bag(indices, atoms, per_sample_weights=values, mode="sum")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        values, indices, atoms = ctx.saved_tensors
        grad = grad.contiguous()
        gv = gathered_dots(indices, atoms, grad).to(values.dtype) if ctx.needs_input_grad[0] else None
        ga = scatter_outer(indices, values, grad.to(atoms.dtype), atoms.shape[0]) if ctx.needs_input_grad[2] else None
        return gv, None, ga


def sparse_decode(values: Tensor, indices: Tensor, atoms: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x̂_b = bias + Σ_j values[b,j] · atoms[indices[b,j]]``: decode k active units per sample.

    Args:
        values: ``(batch, k)``; indices: ``(batch, k)`` int64.
        atoms: ``(d_sae, d_in)``, one dictionary atom per row (contiguous rows are what makes this
            fast); bias: ``(d_in,)`` or None.

    Returns:
        ``(batch, d_in)``; equal to ``dense_code @ atoms + bias``. The backward touches only the
        active rows of ``atoms`` (an embedding-bag sum; Gao et al. 2024 use sparse kernels to the
        same end on GPUs).
    """
    if atoms.device.type == "cpu":
        out = _SparseDecode.apply(values.to(atoms.dtype), indices, atoms)
    else:  # on an accelerator the embedding bag's own backward (one kernel each) is the fast one
        out = F.embedding_bag(indices, atoms, per_sample_weights=values.to(atoms.dtype), mode="sum")
    return out if bias is None else out + bias
