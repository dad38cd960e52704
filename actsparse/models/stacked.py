"""Stacked (deep) autoencoders from a list of sizes, e.g. seed 001's 20→80→40→4→40→80→20.

Greedy layer-wise pretraining (UFLDL "Stacked Autoencoders") lives in :mod:`actsparse.train`
(:func:`~actsparse.train.pretrain_greedy`); this module is only the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..penalties import Penalty
from .sae import ForwardOutput, check_input, reconstruction_loss

__all__ = ["StackedAutoencoder"]

_ACTS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "identity": nn.Identity}


class StackedAutoencoder(nn.Module):
    """Encoder ``sizes[0] → … → sizes[-1]`` (the code) and the mirrored decoder back to ``sizes[0]``.

    Args:
        sizes: layer widths of the encoder, input first, code last, e.g. ``[20, 80, 40, 4]``.
        activation: hidden nonlinearity (``relu``, ``sigmoid``, ``tanh``), after every layer but the
            output one.
        output: ``linear`` or ``sigmoid`` reconstruction.
        penalties: ``{layer index: Penalty}`` on the output of encoder layer i (0-based, after its
            activation); the code is layer ``len(sizes) - 2``.
        weight_decay: λ of (λ/2)Σ‖W‖² over all weight matrices.
        recon_loss: ``mse`` (default) or ``half_sse`` (CS294A).

    ``forward(x)`` returns a :class:`ForwardOutput` whose ``code`` is the bottleneck.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu", *, output: str = "linear",
                 penalties: Mapping[int, Penalty] | None = None, weight_decay: float = 0.0,
                 recon_loss: str = "mse", device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
            raise TypeError(f"sizes must be a list of layer widths, e.g. [20, 80, 40, 4]; got {type(sizes).__name__}")
        sizes = list(sizes)
        if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"sizes must be at least two positive ints, got {sizes!r}")
        if activation not in _ACTS:
            raise ValueError(f"activation must be one of {', '.join(_ACTS)}, got {activation!r}")
        if output not in ("linear", "sigmoid"):
            raise ValueError(f"output must be 'linear' or 'sigmoid', got {output!r}")
        if recon_loss not in ("mse", "half_sse"):
            raise ValueError(f"recon_loss must be 'mse' or 'half_sse', got {recon_loss!r}")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) \
                or not 0 <= weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        fk = {"device": device, "dtype": dtype}
        self.sizes = sizes
        self.encoder = nn.ModuleList(nn.Linear(a, b, **fk) for a, b in zip(sizes[:-1], sizes[1:]))
        rev = sizes[::-1]
        self.decoder = nn.ModuleList(nn.Linear(a, b, **fk) for a, b in zip(rev[:-1], rev[1:]))
        self.act = _ACTS[activation]()
        self.activation_name = activation
        self.output = output
        self.weight_decay = float(weight_decay)
        self.recon_loss = recon_loss
        penalties = dict(penalties or {})
        for i, p in penalties.items():
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"a penalty layer index must be an int (0-based encoder layer), got {i!r}")
            if not 0 <= i < len(self.encoder):
                raise ValueError(f"penalty layer index {i} out of range 0..{len(self.encoder) - 1}")
            if not isinstance(p, Penalty):
                raise TypeError(f"penalty for layer {i} must be an actsparse Penalty, got {type(p).__name__}")
        self.penalties = nn.ModuleDict({str(i): p for i, p in penalties.items()})
        self.unit_norm_decoder = False

    def encode(self, x: Tensor) -> Tensor:
        """The code ``(batch, sizes[-1])``."""
        return self._encode(x)[0]

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        penalty = x.new_zeros(())
        for i, layer in enumerate(self.encoder):
            x = self.act(layer(x))
            if str(i) in self.penalties:
                penalty = penalty + self.penalties[str(i)](x)
        return x, penalty

    def decode(self, h: Tensor) -> Tensor:
        """The reconstruction ``(batch, sizes[0])``."""
        for i, layer in enumerate(self.decoder):
            h = layer(h)
            if i < len(self.decoder) - 1:
                h = self.act(h)
        return torch.sigmoid(h) if self.output == "sigmoid" else h

    def forward(self, x: Tensor) -> ForwardOutput:
        check_input(x, self.sizes[0], self.encoder[0].weight)
        code, penalty = self._encode(x)
        x_hat = self.decode(code)
        recon = reconstruction_loss(x_hat, x, self.recon_loss)
        decay = x_hat.new_zeros(())
        if self.weight_decay:
            decay = 0.5 * self.weight_decay * sum(m.weight.square().sum() for m in [*self.encoder, *self.decoder])
        return ForwardOutput(x_hat, code, recon, penalty, decay, x_hat.new_zeros(()))

    def set_progress(self, fraction: float) -> None:  # the trainer's schedule hook; nothing to anneal
        pass
