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

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["SparseCode", "gathered_linear", "scatter_outer", "sparse_decode", "topk_linear", "TOPK_CHUNK"]


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


def scatter_outer(indices: Tensor, coef: Tensor, rows: Tensor, n: int) -> Tensor:
    """``out[s] = Σ_{(b,j): indices[b,j] = s} coef[b,j] · rows[b]``, shape ``(n, d)``.

    Args:
        indices: ``(batch, k)`` int64 in ``[0, n)``.
        coef: ``(batch, k)``.
        rows: ``(batch, d)``.

    It is ``Gᵀ rows`` for the ``(batch, n)`` matrix G with ``coef`` at ``indices``: one sparse-dense
    product with ``batch·k`` non-zeros, never the dense G.
    """
    batch, k = indices.shape
    if rows.dtype in (torch.float32, torch.float64):
        sample = torch.arange(batch, device=indices.device).repeat_interleave(k)
        g_t = torch.sparse_coo_tensor(torch.stack([indices.reshape(-1), sample]), coef.reshape(-1).to(rows.dtype),
                                      (n, batch), check_invariants=False)
        return torch.sparse.mm(g_t, rows)
    # other dtypes (bf16, half): sparse matmul is not implemented for them on every device
    contrib = (coef.unsqueeze(-1) * rows.unsqueeze(1)).reshape(batch * k, -1)
    return rows.new_zeros(n, rows.shape[1]).index_add_(0, indices.reshape(-1), contrib.to(rows.dtype))


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


#: Rows of the pre-activation matrix :func:`topk_linear` computes at a time: 512 × 8192 float32
#: is 16 MiB, which the allocator keeps and reuses (a whole batch of 4096 is 128 MiB, above
#: glibc's largest mmap threshold, so it was mapped afresh and page-faulted in at every step).
TOPK_CHUNK = 512


@torch.no_grad()
def topk_linear(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, chunk: int | None = None
                ) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``x Wᵀ + b`` and their indices, ``chunk`` rows at
    a time (the ``(batch, d_sae)`` matrix is never built), without a graph.

    Args:
        x: ``(batch, d_in)``; weight: ``(d_sae, d_in)``; bias: ``(d_sae,)`` or None; k ≤ d_sae.
        chunk: rows at a time (default :data:`TOPK_CHUNK`, read at each call).

    Returns:
        ``values`` ``(batch, k)`` (x's dtype) and ``indices`` ``(batch, k)`` int64, in no particular
        order within a row: the same sets as ``(x Wᵀ + b).topk(k, sorted=False)``. The GEMM is
        :func:`actsparse.gemm.linear`'s (the float32 path measured fastest).
    """
    from ..gemm import linear

    batch, chunk = x.shape[0], chunk or TOPK_CHUNK
    values = x.new_empty(batch, k)
    indices = torch.empty(batch, k, dtype=torch.int64, device=x.device)
    for start in range(0, batch, chunk):
        part = linear(x[start:start + chunk], weight, bias).topk(k, dim=-1, sorted=False)
        values[start:start + chunk] = part.values
        indices[start:start + chunk] = part.indices
    return values, indices


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
    out = F.embedding_bag(indices, atoms, per_sample_weights=values.to(atoms.dtype), mode="sum")
    return out if bias is None else out + bias
