"""Hidden activations of sparse autoencoders: ``pre-activations (batch, d_sae) -> code (batch, d_sae)``.

==============  ================================================================  ==========================
name            what it keeps                                                      source
==============  ================================================================  ==========================
``sigmoid``     σ(z): a firing probability, for the Bernoulli KL                   Ng, CS294A notes
``relu``        max(z, 0), for L1 / Poisson KL / FrequencyKL                       —
``topk``        the k largest of ReLU(z) in each sample, zero elsewhere            Gao et al. 2024
``batchtopk``   the k·rows largest of ReLU(z) over the whole batch; at eval a      Bussmann et al. 2024
                threshold θ estimated in training (running mean of the smallest
                kept value)
``jumprelu``    z·H(z − θ) with a learned per-unit θ, straight-through for θ       Rajamanoharan et al. 2024
``gated``       1[π_gate > 0]·ReLU(π_mag): a gate path (the SAE's pre-activations)  Rajamanoharan et al. 2024a
                decides which units fire, a rescaled magnitude path how much
``ksparse``     the k largest of z (linear units, no ReLU); αk at eval; k          Makhzani & Frey 2013
                annealed from a large value to k over the first half of training
==============  ================================================================  ==========================
"""

from __future__ import annotations

import difflib
import math

import torch
from torch import Tensor, nn

from .. import functional as F

__all__ = ["Sigmoid", "ReLU", "TopK", "BatchTopK", "JumpReLU", "Gated", "KSparse", "ACTIVATIONS", "get_activation"]


class Sigmoid(nn.Sigmoid):
    """σ(z), values in (0, 1): the classic sparse autoencoder's hidden unit."""


class ReLU(nn.ReLU):
    """max(z, 0)."""


def _check_k(k: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name} must be a positive int, got {k!r}")
    return k


def _check_pre(z: Tensor) -> None:
    """Pre-activations must be a floating-point tensor ``(..., d_sae)`` (shape and dtype only: free)."""
    if not isinstance(z, Tensor):
        raise TypeError(f"pre-activations must be a tensor (batch, d_sae), got {type(z).__name__}")
    if not z.dtype.is_floating_point:
        raise TypeError(f"pre-activations must be a floating-point tensor, got dtype {z.dtype}")
    if z.dim() == 0:
        raise ValueError("pre-activations must be (batch, d_sae), got a 0-d tensor")


def _check_width(z: Tensor, k: int) -> None:
    _check_pre(z)
    if k > z.shape[-1]:
        raise ValueError(f"k={k} is larger than the number of hidden units d_sae={z.shape[-1]}")


def topk_mask_values(z: Tensor, k: int) -> Tensor:
    """Keep the k largest entries of each row of ``z`` (batch, d_sae), zero the rest (dense)."""
    values, indices = z.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(z).scatter(-1, indices, values)


class TopK(nn.Module):
    """ReLU, then keep the k largest units of each sample (Gao et al. 2024). ``k <= d_sae``."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = _check_k(k)

    def indices(self, z: Tensor) -> Tensor:
        """``(batch, k)`` indices of the kept units of pre-activations ``z`` ``(batch, d_sae)``.
        ReLU is monotone, so these are the k largest of ReLU(z) (ties at 0 keep a value of 0)."""
        _check_width(z, self.k)
        return z.topk(self.k, dim=-1, sorted=False).indices

    def forward(self, z: Tensor) -> Tensor:
        idx = self.indices(z)
        return torch.zeros_like(z).scatter(-1, idx, torch.relu(z.gather(-1, idx)))

    def extra_repr(self) -> str:
        return f"k={self.k}"


class BatchTopK(nn.Module):
    """ReLU, then keep the ``k·rows`` largest values of the whole batch (Bussmann et al. 2024,
    "BatchTopK sparse autoencoders").

    Pre-activations ``(..., d_sae)``: a row is one sample (or one position of a sequence), so a
    ``(batch, seq, d_sae)`` input keeps ``k·batch·seq`` values, k per row on average. In training
    it also keeps ``threshold``, a running mean (momentum 0.99) of the smallest kept value; in eval
    mode every unit above it is kept, so a row's code does not depend on the batch it is in.
    """

    threshold: Tensor

    def __init__(self, k: int, momentum: float = 0.99) -> None:
        super().__init__()
        self.k = _check_k(k)
        self.momentum = F.check_momentum(momentum)
        self.register_buffer("threshold", torch.tensor(float("nan")))

    def forward(self, z: Tensor) -> Tensor:
        _check_width(z, self.k)
        a = torch.relu(z)
        if not self.training:
            if torch.isnan(self.threshold):
                return topk_mask_values(a, self.k)  # never trained: per-row top-k
            return a * (a > self.threshold)
        flat = a.reshape(-1)
        if self.stats_group is not None:
            out, values = self._global_select(a)
        else:
            rows = flat.numel() // a.shape[-1]  # samples (or positions): every dimension but the units'
            n = min(self.k * rows, flat.numel())
            values, indices = flat.topk(n, sorted=False)
            out = torch.zeros_like(flat).scatter(0, indices, values).reshape(a.shape)
        with torch.no_grad():
            positive = values[values > 0]
            if positive.numel():
                smallest = positive.min().to(self.threshold.dtype)
                if torch.isnan(self.threshold):
                    self.threshold.copy_(smallest)
                else:
                    self.threshold.lerp_(smallest, 1 - self.momentum)
        return out

    #: The process group whose global batch the top k·rows is taken over (``None``: this
    #: process's batch); set by :func:`actsparse.distributed.sync_batch_statistics`.
    stats_group = None

    def _global_select(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """Keep the k·M largest values of the global batch (M rows over all ranks): the global
        top k·M lie among each rank's own top k·M, so only those candidates are gathered."""
        from ..distributed import all_gather_padded

        with torch.no_grad():
            d_sae = a.shape[-1]
            m = torch.tensor(a.numel() // d_sae, device=a.device)
            torch.distributed.all_reduce(m, group=self.stats_group)
            n = min(self.k * int(m), d_sae * int(m))
            local = a.reshape(-1).topk(min(n, a.numel()), sorted=False).values
            candidates = all_gather_padded(local, n, float("-inf"), self.stats_group)
            kept = candidates.topk(n, sorted=False).values
            cut = kept.min()
        out = a * (a >= cut)  # zeros below the cut; a tie at the cut keeps all tied values
        return out, kept

    def extra_repr(self) -> str:
        return f"k={self.k}"


class _JumpReLUFn(torch.autograd.Function):
    """z·H(z − θ); ∂/∂z = H(z − θ); ∂/∂θ := −(θ/ε)·K((z − θ)/ε) (Rajamanoharan et al. 2024, eq. 11).

    The kernel is evaluated in at least float32: in bf16, z − θ has a resolution of about θ/256,
    as coarse as the window ε itself, and the thresholds would see a gradient of noise."""

    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold.to(z.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        z, threshold = ctx.saved_tensors
        grad_z = grad * (z > threshold.to(z.dtype)) if ctx.needs_input_grad[0] else None
        grad_t = None
        if ctx.needs_input_grad[1]:
            wide = torch.promote_types(threshold.dtype, torch.float32)
            zw, tw = z.to(wide), threshold.to(wide)
            kernel = F.rectangle_kernel(zw, tw, ctx.bandwidth)
            grad_t = (-(tw * kernel) * grad.to(wide)).sum_to_size(threshold.shape).to(threshold.dtype)
        return grad_z, grad_t, None


class JumpReLU(nn.Module):
    """z·H(z − θ) with a learned threshold θ_j >= 0 per unit (Rajamanoharan et al. 2024, "Jumping
    Ahead: Improving reconstruction fidelity with JumpReLU sparse autoencoders").

    Args:
        d_sae: number of units.
        init_threshold: initial θ. Default 0.01.
        bandwidth: ε of the straight-through pseudo-derivative. Default 0.05. (The paper's 0.001
            and 0.001 assume inputs normalised to E‖x‖² = d_in; 0.01 and 0.05 are SAELens'
            defaults, which train on the ground-truth benchmark's unnormalised data: a window of
            0.001 sees almost no pre-activation and θ barely learns.)

    ``threshold`` ``(d_sae,)`` is the parameter itself, not its log: Adam moves a parameter by about
    its learning rate per step, so a log-threshold grows by a *factor* e^lr a step and a small
    θ₀ barely moves in a run's budget (θ₀ = 0.001 → 0.1 takes ln 100 / lr ≈ 4,600 steps at lr
    1e-3), while θ itself reaches 0.1 in about 100. θ is kept >= 0 by a projection in training
    forwards (a clamp in the graph would zero the gradient of a unit that reaches 0), and it stays
    float32 when the model is cast to bf16/fp16 (its steps of ~lr would round away in bf16: its
    spacing near 0.1 is 0.0005); it is cast to the pre-activations' dtype where it is used.

    ``threshold_lr_scale`` (default 10): θ asks to learn this many times faster than the weights
    (:meth:`lr_scales`; the trainer's optimiser and :func:`actsparse.train.parameter_groups` honour
    it). Adam moves θ by at most about lr a step, while the encoder can raise the pre-activations
    faster: measured on the ground-truth benchmark (d 256, 1,024 latents, lr 1e-3, L0 loss
    λ = 0.0117), θ at 1× rose 0.0002 a step and the L0 climbed from 387 to 990 as the encoder grew
    and θ never caught up; at 10× θ kept pace and the L0 came down to 28 within 350 steps.

    Pair it with the L0 penalty of the paper, :class:`actsparse.L0`: a
    :class:`~actsparse.models.SparseAutoencoder` binds an ``L0()`` to its JumpReLU's current θ
    (``L0(weight).toward(l0=k)`` to state the L0 instead of λ). Checkpoints that hold the former
    ``log_threshold`` load (θ = exp of it).
    """

    def __init__(self, d_sae: int, init_threshold: float = 0.01, bandwidth: float = 0.05,
                 *, threshold_lr_scale: float = 10.0, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae < 1:
            raise ValueError(f"d_sae must be a positive int, got {d_sae!r}")
        F.check_positive("init_threshold", init_threshold)
        F.check_positive("bandwidth", bandwidth)
        F.check_positive("threshold_lr_scale", threshold_lr_scale)
        self.bandwidth = float(bandwidth)
        self.threshold_lr_scale = float(threshold_lr_scale)
        self.threshold = nn.Parameter(torch.full((d_sae,), float(init_threshold), device=device,
                                                 dtype=_master_dtype(dtype)))

    def lr_scales(self) -> dict[str, float]:
        """The threshold's learning-rate multiplier (:func:`actsparse.train.parameter_groups`)."""
        return {"threshold": getattr(self, "threshold_lr_scale", 1.0)}

    def forward(self, z: Tensor) -> Tensor:
        _check_pre(z)
        if z.shape[-1] != self.threshold.shape[0]:  # (b, 1) would broadcast silently to (b, d_sae)
            raise ValueError(f"JumpReLU has d_sae={self.threshold.shape[0]} units, got pre-activations of shape "
                             f"{tuple(z.shape)}")
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():  # the projection on θ >= 0 (after the optimiser's last step)
                self.threshold.clamp_(min=0.0)
        return _JumpReLUFn.apply(z, self.threshold, self.bandwidth)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """``.to(device)``, ``.double()`` apply to θ; a cast to fp16/bf16 moves it but keeps it float32
        (taken out of the base class's cast, so it is never rounded)."""
        t = self._parameters.pop("threshold")
        try:
            super()._apply(fn, recurse)
        finally:
            probe = fn(torch.zeros((), dtype=torch.float32))
            keep = probe.dtype in (torch.float32, torch.float64)
            with torch.no_grad():
                t.data = fn(t.data) if keep else t.data.to(probe.device)
                if t.grad is not None:
                    t.grad = fn(t.grad) if keep else t.grad.to(probe.device)
            self._parameters["threshold"] = t
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        old = prefix + "log_threshold"
        if old in state_dict and prefix + "threshold" not in state_dict:  # a checkpoint from before θ was direct
            state_dict[prefix + "threshold"] = state_dict.pop(old).double().exp().to(self.threshold.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"d_sae={self.threshold.shape[0]}, bandwidth={self.bandwidth:g}"


def _master_dtype(dtype) -> torch.dtype:
    """The dtype of a JumpReLU's θ: float64 for a float64 model, else float32 (see :class:`JumpReLU`)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Gated(nn.Module):
    """Gated units (Rajamanoharan et al. 2024a, "Improving dictionary learning with gated sparse
    autoencoders"): which units fire and how much are estimated by two paths sharing one encoder.

    With ``x'`` the encoder input (``x − b_dec`` when the SAE has ``pre_bias``) and ``W_enc``,
    ``b_enc`` the SAE's encoder:

    * gate ``π_gate = W_enc x' + b_enc`` (the SAE's pre-activations);
    * magnitude ``π_mag = exp(r_mag) ⊙ (W_enc x') + b_mag``, the same weights rescaled per unit;
    * code ``f = 1[π_gate > 0] ⊙ ReLU(π_mag)``.

    ``forward(gate, wx)``: ``gate`` = π_gate and ``wx`` = ``W_enc x'`` (no bias), both
    ``(..., d_sae)``; returns f ``(..., d_sae)``. The Heaviside has zero gradient (the paper's
    design): the gate path is trained only by the two terms a
    :class:`~actsparse.models.SparseAutoencoder` with this activation adds, the sparsity penalty on
    ``ReLU(π_gate)`` and the auxiliary loss ``L_aux = recon(x̂_frozen(ReLU(π_gate)), x)`` through a
    detached copy of the decoder; the total loss is ``recon(x̂(f), x) + λ·P(ReLU(π_gate)) + L_aux``.

    Parameters: ``r_mag`` and ``b_mag`` ``(d_sae,)``, both initialised to 0 (π_mag = W_enc x' at init).
    """

    def __init__(self, d_sae: int, *, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae < 1:
            raise ValueError(f"d_sae must be a positive int, got {d_sae!r}")
        self.r_mag = nn.Parameter(torch.zeros(d_sae, device=device, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(d_sae, device=device, dtype=dtype))

    def magnitude(self, wx: Tensor) -> Tensor:
        """``π_mag = exp(r_mag) ⊙ wx + b_mag`` for ``wx = W_enc x'`` ``(..., d_sae)``."""
        return torch.addcmul(self.b_mag, self.r_mag.exp(), wx)

    def forward(self, gate: Tensor, wx: Tensor | None = None) -> Tensor:
        _check_pre(gate)
        if wx is None:
            raise TypeError("Gated units need two inputs: the gate pre-activations W_enc x' + b_enc and the "
                            "encoder product W_enc x' without bias (SparseAutoencoder passes both)")
        d_sae = self.r_mag.shape[0]
        if gate.shape[-1] != d_sae or wx.shape != gate.shape:
            raise ValueError(f"Gated has d_sae={d_sae} units, got gate {tuple(gate.shape)} and magnitude input "
                             f"{tuple(wx.shape)}")
        return torch.relu(self.magnitude(wx)) * (gate > 0)

    def extra_repr(self) -> str:
        return f"d_sae={self.r_mag.shape[0]}"


class KSparse(nn.Module):
    """k-sparse autoencoder units (Makhzani & Frey 2013): linear, keep the k largest of each sample.

    In eval mode the ``alpha * k`` largest are kept (α = 3 in the paper's MNIST runs). Call
    :meth:`set_progress` with the fraction of training done: k is annealed linearly from
    ``k_start`` (default ``d_sae``, i.e. dense) down to ``k`` over the first half of training.
    """

    def __init__(self, k: int, alpha: float = 3.0, k_start: int | None = None) -> None:
        super().__init__()
        self.k = _check_k(k)
        F.check_positive("alpha", alpha)
        self.alpha = float(alpha)
        self.k_start = None if k_start is None else _check_k(k_start, "k_start")
        self.progress = 1.0

    def set_progress(self, fraction: float) -> None:
        """Fraction of training done, in [0, 1]; sets the annealed k."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise TypeError(f"the training fraction must be a number in [0, 1], got {type(fraction).__name__}")
        if math.isnan(fraction):
            raise ValueError("the training fraction must be a number in [0, 1], got nan")
        self.progress = min(max(float(fraction), 0.0), 1.0)

    def current_k(self, d_sae: int) -> int:
        if not self.training:
            return min(d_sae, max(self.k, int(round(self.alpha * self.k))))
        start = d_sae if self.k_start is None else min(self.k_start, d_sae)
        t = min(self.progress / 0.5, 1.0)  # first half of training
        return max(self.k, int(round(start + (self.k - start) * t)))

    def forward(self, z: Tensor) -> Tensor:
        _check_width(z, self.k)
        return topk_mask_values(z, self.current_k(z.shape[-1]))

    def extra_repr(self) -> str:
        return f"k={self.k}, alpha={self.alpha:g}"


ACTIVATIONS = {"sigmoid": Sigmoid, "relu": ReLU, "topk": TopK, "batchtopk": BatchTopK,
               "jumprelu": JumpReLU, "gated": Gated, "ksparse": KSparse}


def activation_key(name: str) -> str:
    """The registry key of an activation name: case, ``-`` and ``_`` are ignored (``Jump_ReLU``)."""
    if not isinstance(name, str):
        raise TypeError(f"activation must be a name (str) or an nn.Module, got {type(name).__name__}")
    return name.lower().replace("-", "").replace("_", "")


def get_activation(name: str, *, d_sae: int, k: int | None = None, **kwargs) -> nn.Module:
    """Build a hidden activation by name (``sigmoid``, ``relu``, ``topk``, ``batchtopk``,
    ``jumprelu``, ``gated``, ``ksparse``). ``k`` is required by the top-k family and checked against d_sae."""
    key = activation_key(name)
    if key not in ACTIVATIONS:
        close = difflib.get_close_matches(key, ACTIVATIONS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown activation {name!r}.{hint} Valid: {', '.join(ACTIVATIONS)}")
    cls = ACTIVATIONS[key]
    if cls in (TopK, BatchTopK, KSparse):
        if k is None:
            raise ValueError(f"activation {name!r} needs k (the number of active units)")
        _check_k(k)
        if k > d_sae:
            raise ValueError(f"k={k} is larger than the number of hidden units d_sae={d_sae}")
        return cls(k, **kwargs)
    if cls in (JumpReLU, Gated):
        return cls(d_sae, **kwargs)
    if kwargs:
        raise TypeError(f"activation {name!r} takes no arguments, got {', '.join(sorted(kwargs))}")
    return cls()
