"""Batch statistics across processes, for training with DistributedDataParallel (torchrun).

DDP averages the parameter gradients of N processes, which makes a per-sample mean loss equal to
its value over the global batch. Batch statistics are not per-sample: ρ̂ of a KL penalty, the
BatchTopK threshold and the dead-unit counts must be computed over the *global* batch, or N
processes with batch B train a different model than one process with batch N·B.

:func:`sync_batch_statistics` marks the modules of a model that compute such statistics (like
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``): each gets a ``stats_group`` attribute, the
process group to reduce over (``None``, the default, means this process only).

Why the gradients come out equal: ρ̂ = Σ_ranks s_r / M, with s_r the rank's sum of activations
and M the global batch. Its all-reduce is differentiable (``torch.distributed.nn.functional``):
the backward of a sum over ranks is the sum over ranks of the upstream gradients, so each rank
receives N·β·KL'(ρ̂)/M per own sample, and DDP's average over N ranks leaves β·KL'(ρ̂)/M, the
gradient of the one-process loss (``_AllSum``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["world", "is_distributed", "all_sum", "global_mean", "all_max_", "all_gather_padded",
           "sync_batch_statistics", "local_batch_statistics", "local_statistics", "init_from_env"]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if not is_distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment): NCCL for
    CUDA devices, gloo otherwise. Returns whether this process is part of one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not torch.distributed.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return is_distributed()


class _AllSum(torch.autograd.Function):
    """y = Σ_ranks x. Every rank's loss depends on every rank's x, so ∂L/∂x on a rank is the sum
    over the ranks of their upstream gradients: the backward is the same all-reduce."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        y = x.clone()
        torch.distributed.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def all_sum(t: Tensor, group=None) -> Tensor:
    """Σ over the ranks of ``group`` of ``t``, differentiable (the backward sums the gradients
    over the ranks too)."""
    return _AllSum.apply(t, group)


def global_mean(local_mean: Tensor, local_count: int, group=None) -> Tensor:
    """The mean over all ranks' samples from each rank's mean over its ``local_count`` samples
    (``(units,)`` → ``(units,)``), exact for unequal counts, differentiable."""
    count = torch.tensor(float(local_count), device=local_mean.device, dtype=local_mean.dtype)
    torch.distributed.all_reduce(count, group=group)
    return all_sum(local_mean * local_count, group) / count


@torch.no_grad()
def all_max_(t: Tensor, group=None) -> Tensor:
    """In place: the element-wise maximum over the ranks (booleans as 0/1)."""
    if t.dtype == torch.bool:
        as_int = t.to(torch.uint8)
        torch.distributed.all_reduce(as_int, op=torch.distributed.ReduceOp.MAX, group=group)
        t.copy_(as_int.bool())
    else:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    return t


@torch.no_grad()
def all_gather_padded(t: Tensor, n: int, fill: float, group=None) -> Tensor:
    """Every rank's 1-D ``t`` (at most ``n`` values), padded with ``fill`` to ``n`` and concatenated:
    ``(world_size · n,)``."""
    padded = t.new_full((n,), fill)
    padded[: t.numel()] = t
    parts = [torch.empty_like(padded) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, padded, group=group)
    return torch.cat(parts)


def sync_batch_statistics(model: nn.Module, group=None) -> int:
    """Compute the batch statistics of ``model`` over the ranks of ``group`` (default: every
    process): the rate ρ̂ of rate penalties (:class:`~actsparse.RatePenalty`, also those attached
    with :func:`~actsparse.attach`), the BatchTopK selection and the dead-unit tracking of
    :class:`~actsparse.models.SparseAutoencoder`. Returns how many modules were set.

    Outside a process group it does nothing (and returns 0), so the same script runs with and
    without torchrun."""
    if not is_distributed():
        return 0
    return _set_group(model, group if group is not None else torch.distributed.group.WORLD)


def local_batch_statistics(model: nn.Module) -> int:
    """Undo :func:`sync_batch_statistics`: statistics over this process's batch again (e.g. for
    evaluation on one rank after training, when the other ranks no longer take part)."""
    return _set_group(model, None)


@contextlib.contextmanager
def local_statistics(model: nn.Module) -> Iterator[None]:
    """For the duration, batch statistics of this process only, then the groups set before: for a
    pass that one rank makes alone (evaluation, a logger's sample), which must not wait for the others."""
    saved = [(m, m.stats_group) for m in model.modules() if getattr(m, "stats_group", None) is not None]
    for m, _ in saved:
        m.stats_group = None
    try:
        yield
    finally:
        for m, group in saved:
            m.stats_group = group


def _set_group(model: nn.Module, group) -> int:
    n = 0
    for module in model.modules():
        if hasattr(module, "stats_group"):
            module.stats_group = group
            n += 1
    return n
