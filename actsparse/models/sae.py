"""Sparse autoencoders, from the classic sigmoid/KL autoencoder (CS294A) to TopK, JumpReLU, Gated
and Matryoshka SAEs.

``forward(x)`` returns a :class:`ForwardOutput` with every loss term; the trainer weights and
sums them. The sparsity term is an actsparse :class:`~actsparse.penalties.Penalty` applied to the
hidden code — the same object users attach to their own models, so there is one implementation
of each formula. The families are options of the one :class:`SparseAutoencoder`: an activation
(``topk``, ``batchtopk``, ``jumprelu``, ``gated``, ...), nested dictionaries (``matryoshka``),
and for dead units AuxK (``auxk``) or resampling (:meth:`SparseAutoencoder.resample_dead`).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from .. import gemm
from ..penalties import Penalty
from .activations import BatchTopK, Gated, JumpReLU, KSparse, TopK, activation_key, get_activation
from .sparse_topk import SCREENS, SparseCode, gathered_linear, sparse_decode, topk_linear

__all__ = ["ForwardOutput", "SparseAutoencoder", "check_input", "reconstruction_loss", "squared_error"]

Decoder = Literal["linear", "sigmoid"]
ReconLoss = Literal["half_sse", "mse", "sse"]
Decode = Literal["auto", "dense", "sparse"]

#: ``decode="auto"`` takes the sparse TopK path when ``d_sae >= SPARSE_MIN_RATIO * k``. Measured
#: (bench/bench_scaling.py, docs/benchmarks.md §6; d_in 512, batch 512, 2 cores; 2026-12-02, with
#: the blocked top-k and the CSR backward): the paths tie at d_sae/k = 4 (sparse/dense 0.96),
#: sparse is 1.6x faster at 8 and 1.9-5.9x beyond; dense wins below 4 (0.56x at 2).
SPARSE_MIN_RATIO = 8


#: Rows of the dictionary :meth:`SparseAutoencoder.normalize_decoder` and
#: :meth:`SparseAutoencoder.remove_parallel_gradient` take at a time (512 × 512 float32 is 1 MiB).
ROW_BLOCK = 512


def reconstruction_loss(x_hat: Tensor, x: Tensor, kind: ReconLoss) -> Tensor:
    """``half_sse``: ``(1/m) Σ ½‖x̂ − x‖²`` (CS294A, m = batch); ``mse``: the mean over elements;
    ``sse``: ``(1/m) Σ ‖x̂ − x‖²``, the squared error summed over the inputs and averaged over the
    batch (SAELens' ``mse_loss``, so that penalty coefficients mean the same as there).
    x̂, x: ``(batch, d_in)``. One fused kernel forward and backward (``mse_loss``)."""
    if kind == "half_sse":
        return nn.functional.mse_loss(x_hat, x, reduction="sum") * (0.5 / x.shape[0])
    if kind == "sse":
        return nn.functional.mse_loss(x_hat, x, reduction="sum") * (1.0 / x.shape[0])
    return nn.functional.mse_loss(x_hat, x)


def check_input(x: Tensor, d_in: int, weight: Tensor) -> None:
    """An autoencoder's input: a floating-point ``(batch, d_in)`` tensor with batch >= 1, in the
    weights' dtype (unless autocast casts it). Shape and dtype only, no host sync."""
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != d_in:
        raise ValueError(f"expected input of shape (batch, {d_in}), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}; cast with .float()")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"input dtype {x.dtype} does not match the model's {weight.dtype}: convert one of them "
                        f"(x.to({weight.dtype}) or model.to({x.dtype}))")
    if x.shape[0] == 0:
        raise ValueError(f"the input is empty (shape {tuple(x.shape)}): a batch needs at least one sample")


def squared_error(loss: float, kind: ReconLoss, shape: tuple[int, ...]) -> float:
    """``Σ‖x̂ − x‖²`` recovered from a :func:`reconstruction_loss` value for inputs of ``shape``
    (the training log's FVU then costs no pass over the data)."""
    if kind == "half_sse":
        return loss * 2 * shape[0]
    return loss * shape[0] if kind == "sse" else loss * math.prod(shape)


class ForwardOutput(NamedTuple):
    """Everything one forward computes. Shapes: ``x`` is ``(batch, d_in)``; the losses are scalars.

    Attributes:
        reconstruction: x̂ ``(batch, d_in)``.
        code: the hidden code ``(batch, d_hidden)``; on the sparse TopK path a
            :class:`~actsparse.models.sparse_topk.SparseCode` (values and indices ``(batch, k)``,
            ``.to_dense()``).
        reconstruction_loss: scalar; ``(1/m) Σ ½‖x̂ − x‖²`` (``half_sse``, CS294A) or the mean
            squared error per element (``mse``).
        sparsity_loss: scalar, the weighted penalty on the code (0 without a penalty).
        weight_decay_loss: scalar, ``(λ/2) Σ‖W‖²`` over the weight matrices (not biases).
        auxk_loss: scalar, the AuxK loss for dead latents (0 unless enabled).
        aux_loss: scalar, the auxiliary reconstruction losses of an SAE family (0 otherwise, and
            the default, so the six-field form still builds): a Matryoshka SAE's losses of its
            prefixes but the full one (Bussmann et al. 2025), plus a Gated SAE's reconstruction
            from ``ReLU(π_gate)`` through the frozen decoder (Rajamanoharan et al. 2024a).
            ``reconstruction_loss`` stays the full dictionary's.
    """

    reconstruction: Tensor
    code: Tensor | SparseCode
    reconstruction_loss: Tensor
    sparsity_loss: Tensor
    weight_decay_loss: Tensor
    auxk_loss: Tensor
    aux_loss: Tensor | float = 0.0

    @property
    def loss(self) -> Tensor:
        """The training objective: the sum of all terms."""
        return self.reconstruction_loss + self.sparsity_loss + self.weight_decay_loss + self.auxk_loss + self.aux_loss


def _unbound_l0(penalty):
    """The :class:`~actsparse.penalties.L0` a penalty is (or controls, through ``toward``), if no
    threshold was given to it; else None."""
    from ..control import TargetSparsity
    from ..penalties import L0

    p = penalty
    while isinstance(p, TargetSparsity):
        p = p.inner
    return p if isinstance(p, L0) and not p.bound else None


def _check_matryoshka(sizes, d_hidden: int) -> tuple[int, ...] | None:
    """Nested prefix sizes m₁ < m₂ < … in (0, d_hidden], with d_hidden appended when the last is
    smaller; None stays None."""
    if sizes is None:
        return None
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise TypeError(f"matryoshka must be a tuple of increasing ints, got {sizes!r}")
    sizes = tuple(sizes)
    if not sizes or any(isinstance(m, bool) or not isinstance(m, int) for m in sizes):
        raise ValueError(f"matryoshka must be a non-empty tuple of ints, got {sizes!r}")
    if any(not 0 < m <= d_hidden for m in sizes):
        raise ValueError(f"matryoshka prefix sizes must lie in (0, d_hidden={d_hidden}], got {sizes!r}")
    if any(a >= b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"matryoshka prefix sizes must be strictly increasing, got {sizes!r}")
    return sizes if sizes[-1] == d_hidden else (*sizes, d_hidden)


class SparseAutoencoder(nn.Module):
    """A one-hidden-layer sparse autoencoder ``x → act(W_enc (x − b_pre) + b_enc) → W_dec h + b_dec``.

    Args:
        d_in: input size.
        d_hidden: number of hidden units (``d_sae``).
        activation: ``sigmoid`` (default), ``relu``, ``topk``, ``batchtopk``, ``jumprelu``,
            ``gated``, ``ksparse``, or an ``nn.Module``. With ``gated`` (Rajamanoharan et al. 2024a,
            :class:`~actsparse.models.Gated`) the penalty applies to ``ReLU(π_gate)``, not to the
            code, and ``aux_loss`` holds the gate's reconstruction through the frozen decoder.
        k: active units for the top-k family.
        decoder: ``sigmoid`` output units (classic; inputs in [0, 1]) or ``linear`` (default).
        tied: decoder weight = encoder weightᵀ.
        penalty: a Penalty on the hidden code (e.g. ``BernoulliKL(0.01, weight=3)``), or None.
        weight_decay: λ of ``(λ/2)(‖W_enc‖² + ‖W_dec‖²)``, weights only. Default 0.
        recon_loss: ``half_sse`` (CS294A, default), ``mse`` (mean over elements) or ``sse``
            (summed over the inputs, mean over the batch: SAELens' loss).
        unit_norm_decoder: keep each dictionary atom (a column of :attr:`decoder_weight`
            ``(d_in, d_hidden)``, one per hidden unit) at unit norm; call
            :meth:`normalize_decoder` after each optimiser step and
            :meth:`remove_parallel_gradient` before it.
        pre_bias: subtract the decoder bias from the input before encoding (Gao et al. 2024).
        auxk: number of dead latents used by the AuxK loss (Gao et al. 2024); None disables it.
        auxk_coef: coefficient of the AuxK loss. Default 1/32.
        dead_after: a unit is dead when it has not fired in this many samples. Default 10,000.
        init: ``ufldl`` (uniform ±√(6/(d_in + d_hidden + 1)), zero biases) or ``orthogonal_tied``
            (random decoder rows of norm ``init_scale``, encoder = decoderᵀ, as in Gao et al.).
        init_scale: ``orthogonal_tied`` only: the norm of each encoder row, and of each decoder
            atom unless ``unit_norm_decoder`` holds them at 1. Default 1 (Gao et al.'s TopK init);
            0.1 is the L1 SAE's (Conerly et al. 2024, "Circuits Updates — April 2024"): unit-norm
            encoder rows start every latent with large pre-activations, and an L1 SAE then spends
            its budget shrinking them.
        penalty_on_decoder_norm: apply the penalty to ``h_j·‖W_dec_j‖`` instead of ``h_j``
            (Conerly et al. 2024): with free decoder norms, an L1 that ignores them is cheated by
            small codes on long atoms. Default False.
        decode: ``sparse`` encodes and decodes a TopK code with only its k active units per
            sample (:mod:`~actsparse.models.sparse_topk`: same values and gradients, much less
            work when k ≪ d_hidden); ``dense`` builds the ``(batch, d_hidden)`` code; ``auto``
            (default) takes the sparse path for ``topk`` without a penalty when
            ``d_hidden >= SPARSE_MIN_RATIO · k`` (8).
        matryoshka: nested prefix sizes ``m₁ < m₂ < …`` in (0, d_hidden] (d_hidden is appended if
            the last is smaller), for a Matryoshka SAE (Bussmann et al. 2025, "Learning
            multi-level features with Matryoshka sparse autoencoders"; Nabeshima 2024): each prefix
            of the latents must reconstruct the input alone. The loss is
            ``Σ_i recon(x̂_i, x)`` with ``x̂_i = h[:, :m_i] W_dec[:m_i] + b_dec`` (cumulative partial
            sums, one decode's work); ``reconstruction_loss`` is the full dictionary's, the other
            prefixes' sum is in ``aux_loss``. Any activation; on the sparse TopK path each prefix
            decodes the active units below its size (``n`` embedding-bag sums of k rows instead of
            one). See :meth:`prefix_metrics`.
        resample_every: resample dead units (:meth:`resample_dead`, Bricken et al. 2023) every this
            many minibatch steps of :func:`actsparse.train.train`; None (default) never.
        topk_screen: how the sparse TopK path picks the k units while training: ``exact``
            (default) or ``bf16`` (opt-in, approximate: chosen from a bfloat16 GEMM, values then
            computed exactly; :func:`~actsparse.models.sparse_topk.topk_linear`). Evaluation
            (``model.eval()``) always takes the exact top k.
        device, dtype: factory arguments.

    Parameters: ``W_enc`` ``(d_hidden, d_in)``, ``b_enc`` ``(d_hidden,)``, ``W_dec``
    ``(d_hidden, d_in)`` (one dictionary atom per row; absent when tied), ``b_dec`` ``(d_in,)``.
    """

    def __init__(
        self,
        d_in: int,
        d_hidden: int,
        activation: str | nn.Module = "sigmoid",
        *,
        k: int | None = None,
        decoder: Decoder = "linear",
        tied: bool = False,
        penalty: Penalty | None = None,
        weight_decay: float = 0.0,
        recon_loss: ReconLoss = "half_sse",
        unit_norm_decoder: bool = False,
        pre_bias: bool = False,
        auxk: int | None = None,
        auxk_coef: float = 1 / 32,
        dead_after: int = 10_000,
        init: Literal["ufldl", "orthogonal_tied"] = "ufldl",
        init_scale: float = 1.0,
        penalty_on_decoder_norm: bool = False,
        decode: Decode = "auto",
        matryoshka: tuple[int, ...] | None = None,
        resample_every: int | None = None,
        topk_screen: str = "exact",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, v in (("d_in", d_in), ("d_hidden", d_hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if decoder not in ("linear", "sigmoid"):
            raise ValueError(f"decoder must be 'linear' or 'sigmoid', got {decoder!r}")
        if recon_loss not in ("half_sse", "mse", "sse"):
            raise ValueError(f"recon_loss must be 'half_sse', 'mse' or 'sse', got {recon_loss!r}")
        if not (isinstance(weight_decay, (int, float)) and 0 <= weight_decay < math.inf):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        if penalty is not None and not isinstance(penalty, Penalty):
            raise TypeError(f"penalty must be an actsparse Penalty, got {type(penalty).__name__}")
        if auxk is not None and (isinstance(auxk, bool) or not isinstance(auxk, int) or not 1 <= auxk <= d_hidden):
            raise ValueError(f"auxk must be an int in [1, d_hidden={d_hidden}], got {auxk!r}")
        if isinstance(auxk_coef, bool) or not (isinstance(auxk_coef, (int, float)) and 0 <= auxk_coef < math.inf):
            raise ValueError(f"auxk_coef must be a finite number >= 0, got {auxk_coef!r}")
        if isinstance(dead_after, bool) or not isinstance(dead_after, int) or dead_after < 1:
            raise ValueError(f"dead_after must be a positive int (a number of samples), got {dead_after!r}")
        if decode not in ("auto", "dense", "sparse"):
            raise ValueError(f"decode must be 'auto', 'dense' or 'sparse', got {decode!r}")
        if resample_every is not None and (isinstance(resample_every, bool) or not isinstance(resample_every, int)
                                           or resample_every < 1):
            raise ValueError(f"resample_every must be a positive int (steps) or None, got {resample_every!r}")
        self.matryoshka = _check_matryoshka(matryoshka, d_hidden)
        self.resample_every = resample_every
        fk = {"device": device, "dtype": dtype}
        self.d_in, self.d_hidden = d_in, d_hidden
        if isinstance(activation, nn.Module):
            self.activation = activation
        else:
            # JumpReLU and Gated own parameters, so they take the factory arguments (for every spelling of the name)
            extra = fk if activation_key(activation) in ("jumprelu", "gated") else {}
            self.activation = get_activation(activation, d_sae=d_hidden, k=k, **extra)
        self.decoder_kind = decoder
        self.tied = bool(tied)
        self.penalty = penalty
        # a JumpReLU's L0 (Rajamanoharan et al. 2024): an unbound L0 takes this JumpReLU's θ and reads
        # the pre-activations, detached (the L0 term trains θ only, with both sides of its kernel)
        l0 = _unbound_l0(penalty)
        self._l0_on_pre = isinstance(self.activation, JumpReLU) and l0 is not None
        if self._l0_on_pre:
            l0.bind(self.activation)
        self.weight_decay = float(weight_decay)
        self.recon_loss = recon_loss
        self.unit_norm_decoder = bool(unit_norm_decoder)
        self.pre_bias = bool(pre_bias)
        self.auxk = auxk
        self.auxk_coef = float(auxk_coef)
        self.dead_after = int(dead_after)
        if isinstance(init_scale, bool) or not (isinstance(init_scale, (int, float)) and 0 < init_scale < math.inf):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
        self.init_scale = float(init_scale)
        self.penalty_on_decoder_norm = bool(penalty_on_decoder_norm)
        self.sparse = self._choose_sparse(decode)
        if topk_screen not in SCREENS:
            raise ValueError(f"topk_screen must be one of {', '.join(SCREENS)}, got {topk_screen!r}")
        if topk_screen != "exact" and not self.sparse:
            raise ValueError(f"topk_screen={topk_screen!r} screens the top-k of the sparse TopK path; this model takes "
                             "the dense path (it needs the topk activation, no penalty, and decode='sparse', or "
                             f"decode='auto' with d_sae >= {SPARSE_MIN_RATIO}·k)")
        if topk_screen != "exact" and auxk:
            raise ValueError("topk_screen needs the top k alone; AuxK ranks every pre-activation of the dead units, "
                             "so it takes the full pre-activation matrix: drop auxk or keep topk_screen='exact'")
        self.topk_screen = topk_screen

        self.W_enc = nn.Parameter(torch.empty(d_hidden, d_in, **fk))
        self.b_enc = nn.Parameter(torch.zeros(d_hidden, **fk))
        # atoms as rows (d_hidden, d_in), as in sparsify and SAELens: the sparse path gathers rows
        self.W_dec = None if tied else nn.Parameter(torch.empty(d_hidden, d_in, **fk))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **fk))
        # samples since each unit last fired (dead-unit tracking, AuxK)
        self.register_buffer("samples_since_fired", torch.zeros(d_hidden, dtype=torch.long, device=device))
        self.reset_parameters(init)

    def _choose_sparse(self, decode: str) -> bool:
        topk = isinstance(self.activation, TopK)
        if decode == "sparse":
            if not topk:
                raise ValueError(f"decode='sparse' needs the topk activation, got {type(self.activation).__name__}; "
                                 "use decode='dense'")
            if self.penalty is not None:
                raise ValueError("decode='sparse' cannot apply a penalty (it needs the dense code); "
                                 "use decode='dense' or drop the penalty")
            if self.k > self.d_hidden:
                raise ValueError(f"k={self.k} is larger than the number of hidden units d_sae={self.d_hidden}")
            return True
        return decode == "auto" and topk and self.penalty is None and self.d_hidden >= SPARSE_MIN_RATIO * self.k

    # ------------------------------------------------------------------ parameters
    @property
    def atoms(self) -> Tensor:
        """The dictionary ``(d_hidden, d_in)``: row j is hidden unit j's decoder atom
        (``W_dec``, or ``W_enc`` when tied)."""
        return self.W_enc if self.W_dec is None else self.W_dec

    @property
    def decoder_weight(self) -> Tensor:
        """The decoder matrix ``(d_in, d_hidden)`` (a view of :attr:`atoms` transposed);
        column j is hidden unit j's dictionary atom."""
        return self.atoms.t()

    @torch.no_grad()
    def reset_parameters(self, init: str = "ufldl") -> None:
        if init == "ufldl":
            r = math.sqrt(6.0 / (self.d_in + self.d_hidden + 1))  # CS294A exercise
            self.W_enc.uniform_(-r, r)
            if self.W_dec is not None:
                self.W_dec.uniform_(-r, r)
        elif init == "orthogonal_tied":
            w = torch.randn_like(self.W_enc)
            w *= getattr(self, "init_scale", 1.0) / w.norm(dim=1, keepdim=True)
            if self.W_dec is not None:
                self.W_dec.copy_(w)
            self.W_enc.copy_(w)
        else:
            raise ValueError(f"init must be 'ufldl' or 'orthogonal_tied', got {init!r}")
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.unit_norm_decoder:
            self.normalize_decoder()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale each hidden unit's decoder atom to unit norm (call after the optimiser step)."""
        w = self.atoms
        for part in w.split(ROW_BLOCK):  # rows in blocks that stay in cache between the norm and the division
            part /= part.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Remove from the decoder gradient its component parallel to each atom (unit-norm SAEs).

        With tied weights the decoder gradient is ``W_enc.grad`` (both uses of W_enc).
        A no-op when there is no gradient yet.
        """
        w = self.atoms
        g = w.grad
        if g is None:
            return
        # project on the atom's direction, so the result is orthogonal even if the atom is not
        # unit-norm yet: g −= (g·w / ‖w‖²) w, with row dots and an in-place update. vecdot, not
        # einsum (whose row dots go through bmm: 1.9 ms against 1.0 ms for 8192 × 512 here), and
        # ROW_BLOCK rows at a time, so vecdot's product and the update find the rows in cache
        # (1.4× faster than the whole matrix at once, same values: every row is its own sum)
        for gs, ws in zip(g.split(ROW_BLOCK), w.split(ROW_BLOCK)):
            coef = torch.linalg.vecdot(gs, ws, dim=1) / torch.linalg.vector_norm(ws, dim=1).square().clamp_min(1e-24)
            gs.addcmul_(coef.unsqueeze(1), ws, value=-1)

    # ------------------------------------------------------------------ forward
    def _encoder_input(self, x: Tensor) -> Tensor:
        return x - self.b_dec if self.pre_bias else x

    def _pre(self, x_in: Tensor) -> Tensor:
        # through the GEMM measured fastest here (with a graph: each of its three products)
        return gemm.linear(x_in, self.W_enc, self.b_enc)

    def encode_pre(self, x: Tensor) -> Tensor:
        """Pre-activations ``(batch, d_hidden)``."""
        return self._pre(self._encoder_input(x))

    def encode(self, x: Tensor) -> Tensor:
        """The hidden code ``(batch, d_hidden)``."""
        x_in = self._encoder_input(x)
        if isinstance(self.activation, Gated):
            wx = nn.functional.linear(x_in, self.W_enc)
            return self.activation(wx + self.b_enc, wx)
        return self.activation(self._pre(x_in))

    def decode(self, h: Tensor | SparseCode) -> Tensor:
        """The reconstruction ``(batch, d_in)`` of a dense code ``(batch, d_hidden)`` or a
        :class:`~actsparse.models.sparse_topk.SparseCode`."""
        if isinstance(h, SparseCode):
            out = sparse_decode(h.values, h.indices, self.atoms, self.b_dec)
        else:
            out = gemm.linear(h, self.decoder_weight, self.b_dec)
        return torch.sigmoid(out) if self.decoder_kind == "sigmoid" else out

    def forward(self, x: Tensor) -> ForwardOutput:
        """Encode, decode and compute every loss term. ``x``: ``(batch, d_in)``."""
        check_input(x, self.d_in, self.W_enc)
        x_in = self._encoder_input(x)
        gated = isinstance(self.activation, Gated)
        auxk = self.auxk and self.training
        if self.sparse and not auxk:
            # the top-k of the pre-activations, a chunk of rows at a time: the (batch, d_hidden)
            # matrix is never built (AuxK needs all of it, so it takes the path below)
            # an approximate screen (opt-in) only while training: evaluation takes the exact top k
            screen = getattr(self, "topk_screen", "exact") if self.training else "exact"
            values, idx = topk_linear(x_in, self.W_enc, self.b_enc, self.activation.k, screen=screen)
            h = SparseCode(torch.relu(gathered_linear(x_in, self.W_enc, self.b_enc, idx, values=values)), idx,
                           self.d_hidden)
            pre = None
        else:
            # the sparse path needs every pre-activation for the top-k, but no graph: its gradient is sparse
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.sparse):
                if gated:  # the gate π_gate = W_enc x' + b_enc, and W_enc x' for the magnitude path
                    wx = nn.functional.linear(x_in, self.W_enc)
                    pre = wx + self.b_enc
                else:
                    pre = self._pre(x_in)
        if self.sparse:
            if pre is not None:
                idx = self.activation.indices(pre)
                h = SparseCode(torch.relu(self._select(x_in, pre, idx)), idx, self.d_hidden)
        else:
            h = self.activation(pre, wx) if gated else self.activation(pre)
        recons = self._decode_prefixes(h)
        x_hat = recons[-1]
        zero = x_hat.new_zeros(())
        recon = reconstruction_loss(x_hat, x, self.recon_loss)
        # Matryoshka: the prefixes' losses but the full dictionary's
        aux = sum((reconstruction_loss(r, x, self.recon_loss) for r in recons[:-1]), zero)
        on_pre = getattr(self, "_l0_on_pre", False)  # (a model pickled before L0 existed has no flag)
        if gated:  # the penalty on ReLU(π_gate), and the gate's reconstruction through the frozen decoder
            gate = torch.relu(pre)
            sparsity = self._sparsity(gate) if self.penalty is not None else zero
            aux = aux + self._gate_aux_loss(gate, x)
        else:
            sparsity = self._sparsity(pre.detach() if on_pre else h) if self.penalty is not None else zero
        decay = zero
        if self.weight_decay:
            mats = [self.W_enc] if self.W_dec is None else [self.W_enc, self.W_dec]
            decay = 0.5 * self.weight_decay * sum(w.square().sum() for w in mats)
        if self.training:
            self._track_firing(h)
        auxk = self._auxk_loss(x_in, pre, x, x_hat) if auxk else zero
        return ForwardOutput(x_hat, h, recon, sparsity, decay, auxk, aux)

    def _decode_prefixes(self, h: Tensor | SparseCode) -> list[Tensor]:
        """The reconstructions ``(batch, d_in)`` of each Matryoshka prefix, the full one last
        (one element, :meth:`decode`, without prefixes): ``x̂_i = x̂_{i−1} + h[:, m_{i−1}:m_i]
        W_dec[m_{i−1}:m_i]``, ``x̂_0 = b_dec`` (Bussmann et al. 2025)."""
        sizes = getattr(self, "matryoshka", None)  # (a model pickled before Matryoshka existed has none)
        if sizes is None or len(sizes) == 1:
            return [self.decode(h)]
        atoms, outs, acc, lo = self.atoms, [], None, 0
        for hi in sizes:
            bias = self.b_dec if acc is None else None
            if isinstance(h, SparseCode):  # the active units of this group only
                in_group = (h.indices >= lo) & (h.indices < hi)
                part = sparse_decode(h.values * in_group, h.indices, atoms, bias)
            else:
                part = nn.functional.linear(h[:, lo:hi], atoms[lo:hi].t(), bias)
            acc = part if acc is None else acc + part
            outs.append(acc)
            lo = hi
        return [torch.sigmoid(o) for o in outs] if self.decoder_kind == "sigmoid" else outs

    def _gate_aux_loss(self, gate: Tensor, x: Tensor) -> Tensor:
        """Gated SAE (Rajamanoharan et al. 2024a): ``recon(ReLU(π_gate) W_decᵀ + b_dec, x)`` with
        ``W_dec`` and ``b_dec`` detached, so it trains the gate path only. ``gate``: ReLU(π_gate)
        ``(batch, d_hidden)``."""
        out = nn.functional.linear(gate, self.atoms.detach().t(), self.b_dec.detach())
        if self.decoder_kind == "sigmoid":
            out = torch.sigmoid(out)
        return reconstruction_loss(out, x, self.recon_loss)

    @torch.no_grad()
    def prefix_metrics(self, x: Tensor) -> list[dict[str, float]]:
        """Per-prefix evaluation of a Matryoshka SAE (Bussmann et al. 2025) on ``x``
        ``(batch, d_in)``, in eval mode without gradients: for each prefix size ``m_i`` (the full
        dictionary last; one entry without ``matryoshka``), ``{"size": m_i, "fvu":
        Σ‖x − x̂_i‖² / Σ‖x − x̄‖², "l0": mean non-zero units among the first m_i per sample}``,
        with ``x̂_i = h[:, :m_i] W_dec[:m_i] + b_dec``."""
        from ..metrics import fvu, l0, total_variance

        check_input(x, self.d_in, self.W_enc)
        was = self.training
        self.eval()
        try:
            h = self.encode(x)
            recons = self._decode_prefixes(h)
        finally:
            self.train(was)
        sizes = getattr(self, "matryoshka", None) or (self.d_hidden,)
        sizes = sizes if len(recons) > 1 else sizes[-1:]
        total = total_variance(x)
        return [{"size": m, "fvu": float(fvu(x, r, total)), "l0": float(l0(h[:, :m]))} for m, r in zip(sizes, recons)]

    def _sparsity(self, h: Tensor) -> Tensor:
        """The penalty on the code ``h`` ``(batch, d_hidden)``, on ``h_j·‖W_dec_j‖`` when
        ``penalty_on_decoder_norm`` (not for an L0 on a JumpReLU's pre-activations: a count)."""
        if getattr(self, "penalty_on_decoder_norm", False) and not getattr(self, "_l0_on_pre", False):
            h = h * torch.linalg.vector_norm(self.atoms, dim=1)
        return self.penalty(h)

    def _select(self, x_in: Tensor, pre: Tensor, idx: Tensor) -> Tensor:
        """Pre-activations at ``idx`` ``(batch, k)``; on the sparse path with the sparse backward."""
        if self.sparse:
            return gathered_linear(x_in, self.W_enc, self.b_enc, idx, pre)
        return pre.gather(-1, idx)

    @torch.no_grad()
    def _track_firing(self, h: Tensor | SparseCode) -> None:
        if isinstance(h, SparseCode):
            fired = h.fired()
        else:
            # h != 0, not h > 0: k-sparse units are linear and may fire negative. Σ|h| over the batch is
            # the fastest column test for every shape measured ((h != 0).any(0) is 5-10x slower, and
            # amax/amin slow on tall (10000, 25) codes)
            fired = h.abs().sum(dim=0) > 0
        batch: int | Tensor = h.shape[0]
        if self.stats_group is not None:  # a unit is alive if it fired on any rank
            from ..distributed import all_max_

            all_max_(fired, self.stats_group)
            batch = torch.tensor(batch, device=fired.device, dtype=self.samples_since_fired.dtype)
            torch.distributed.all_reduce(batch, group=self.stats_group)  # the global batch, kept on the device
        self.samples_since_fired += batch
        self.samples_since_fired.masked_fill_(fired, 0)

    #: The process group over which dead units are counted (``None``: this process); set by
    #: :func:`actsparse.distributed.sync_batch_statistics` for DDP training.
    stats_group = None

    @property
    def dead_mask(self) -> Tensor:
        """``(d_hidden,)`` bool: units that have not fired in the last ``dead_after`` samples."""
        return self.samples_since_fired >= self.dead_after

    @torch.no_grad()
    def resample_dead(self, x: Tensor, optimizer: torch.optim.Optimizer | None = None, *,
                      generator: torch.Generator | None = None) -> int:
        """Neuron resampling (Bricken et al. 2023, "Towards Monosemanticity"): give each unit of
        :attr:`dead_mask` a new direction, an input the model reconstructs badly.

        Rule, on the batch ``x`` ``(batch, d_in)``:

        * each sample's loss is its squared error ``‖x_b − x̂_b‖²`` (eval mode, so no batch
          statistic moves; any reconstruction-loss kind is proportional to it); one input per dead
          unit is drawn with probability ∝ loss², without replacement while enough samples have a
          non-zero loss, with replacement beyond (from ``generator``, on the CPU);
        * the unit's decoder atom becomes ``d = (x_b − b_dec) / ‖x_b − b_dec‖``, its encoder row
          ``0.2 · mean‖W_enc_j‖ · d`` (the mean over alive units; 1 when none is alive), its
          ``b_enc`` 0, and its ``samples_since_fired`` 0;
        * in ``optimizer``'s state, every tensor shaped like ``W_enc``, ``b_enc`` or ``W_dec``
          (Adam's ``exp_avg``, ``exp_avg_sq``, also fused; SGD's momentum) has those rows zeroed;
          the rest of the state, and the other units' rows, are untouched.

        Returns the number of units resampled. Needs an untied decoder, and one process (under
        DDP the ranks' batches differ).
        """
        if self.W_dec is None:
            raise ValueError("resample_dead needs an untied decoder: a tied unit cannot take a unit-norm atom and "
                             "a 0.2-scaled encoder row at once")
        if self.stats_group is not None:
            raise RuntimeError("resample_dead runs in one process: under DDP each rank's batch differs, so the ranks "
                               "would draw different atoms")
        check_input(x, self.d_in, self.W_enc)
        dead = self.dead_mask
        idx = dead.nonzero().squeeze(1)
        n = idx.numel()
        if n == 0:
            return 0
        was = self.training
        self.eval()
        try:
            x_hat = self.decode(self.encode(x))
        finally:
            self.train(was)
        weight = (x - x_hat).double().square().sum(1).square().cpu()  # (per-sample loss)²
        if not bool(torch.isfinite(weight).all()) or not float(weight.sum()) > 0:
            weight = torch.ones_like(weight)
        replace = n > int((weight > 0).sum())
        pick = torch.multinomial(weight, n, replacement=replace, generator=generator).to(x.device)
        d = x[pick] - self.b_dec
        d = d / torch.linalg.vector_norm(d, dim=1, keepdim=True).clamp_min(1e-12)
        alive = ~dead
        norm = torch.linalg.vector_norm(self.W_enc[alive], dim=1).mean() if n < self.d_hidden else 1.0
        self.W_dec.index_copy_(0, idx, d.to(self.W_dec.dtype))
        self.W_enc.index_copy_(0, idx, (d * (0.2 * norm)).to(self.W_enc.dtype))
        self.b_enc.index_fill_(0, idx, 0.0)
        self.samples_since_fired.index_fill_(0, idx, 0)
        if optimizer is not None:
            for p in (self.W_enc, self.b_enc, self.W_dec):
                for v in optimizer.state.get(p, {}).values():
                    if isinstance(v, Tensor) and v.shape == p.shape:
                        v.index_fill_(0, idx, 0)
        return n

    def _auxk_loss(self, x_in: Tensor, pre: Tensor, x: Tensor, x_hat: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024): reconstruct the residual with the top-k_aux *dead* latents,
        normalised by the residual's variance; zero when no unit is dead."""
        dead = self.dead_mask
        n_dead = int(dead.sum())
        if n_dead == 0:
            return x_hat.new_zeros(())
        k_aux = min(self.auxk, n_dead)
        with torch.no_grad():  # k_aux <= n_dead, so every chosen unit is dead
            idx = torch.where(dead, pre, float("-inf")).topk(k_aux, dim=-1, sorted=False).indices
        values = torch.relu(self._select(x_in, pre, idx))
        residual = (x - x_hat).detach()
        r_hat = sparse_decode(values, idx, self.atoms)
        if self.stats_group is None:
            denom = (residual - residual.mean(0)).square().sum().clamp_min(1e-12)
            return self.auxk_coef * (r_hat - residual).square().sum() / denom
        # DDP: the residual variance of the global batch (two passes: its mean, then the squares
        # about it), and the rank's sum scaled by the world size, because DDP averages gradients
        group = self.stats_group
        moments = torch.cat([residual.new_tensor([residual.shape[0]]), residual.sum(0)])
        torch.distributed.all_reduce(moments, group=group)
        denom = (residual - moments[1:] / moments[0]).square().sum()
        torch.distributed.all_reduce(denom, group=group)
        world = torch.distributed.get_world_size(group)
        return self.auxk_coef * world * (r_hat - residual).square().sum() / denom.clamp_min(1e-12)

    def set_progress(self, fraction: float) -> None:
        """Tell schedules how far training is, in [0, 1]: k-sparse annealing, and any penalty with a
        schedule (p-annealing of :class:`~actsparse.penalties.Lp`, also inside ``toward`` or a sum)."""
        if isinstance(self.activation, KSparse):
            self.activation.set_progress(fraction)
        if self.penalty is not None:
            for m in self.penalty.modules():
                if m is not self and callable(getattr(m, "set_progress", None)):
                    m.set_progress(fraction)

    @property
    def k(self) -> int | None:
        act = self.activation
        return act.k if isinstance(act, (TopK, BatchTopK, KSparse)) else None

    @property
    def threshold(self) -> Tensor | None:
        return self.activation.threshold if isinstance(self.activation, JumpReLU) else None

    def extra_repr(self) -> str:
        sizes = getattr(self, "matryoshka", None)
        return (f"d_in={self.d_in}, d_hidden={self.d_hidden}, decoder={self.decoder_kind}, tied={self.tied}, "
                f"weight_decay={self.weight_decay:g}" + (f", matryoshka={sizes}" if sizes else ""))
