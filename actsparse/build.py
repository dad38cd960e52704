"""The model and the device a :class:`~actsparse.config.TrainConfig` describes."""

from __future__ import annotations

import os
from typing import Any

import torch

from .config import TrainConfig
from .models import SparseAutoencoder, StackedAutoencoder
from .penalties import get_penalty

__all__ = ["build_model", "resolve_device"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if available (under torchrun, the process's ``LOCAL_RANK`` device), else CPU;
    or any name ``torch.device`` takes."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch has no CUDA device")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def build_model(cfg: TrainConfig, d_in: int) -> torch.nn.Module:
    """The autoencoder a config describes, for inputs of size ``d_in``: a
    :class:`~actsparse.models.SparseAutoencoder`, or a :class:`~actsparse.models.StackedAutoencoder`
    for ``model="stacked"``."""
    penalty = None
    if cfg.penalty is not None:
        kwargs: dict[str, Any] = {"weight": cfg.weight}
        key = cfg.penalty_key
        if key in ("kl", "bernoulli_kl", "poisson_kl", "frequency_kl"):
            kwargs["target"] = cfg.target
        if key == "frequency_kl":  # None: FrequencyKL's own default (TrainConfig refuses them for other penalties)
            kwargs.update({n: getattr(cfg, n) for n in ("bandwidth", "threshold") if getattr(cfg, n) is not None})
        if key == "lp" and cfg.p_end is not None:
            kwargs["p_end"] = cfg.p_end
        penalty = get_penalty(cfg.penalty, **kwargs)
        control = cfg.control()
        if control is not None:  # --target-*: the coefficient adapted during training, --weight its start
            statistic, target = control
            # (L-BFGS steps it once per iteration: the trainer turns its update in forward off)
            penalty = penalty.toward(**{statistic: target}, per_unit=cfg.per_unit, rate_of_change=cfg.control_rate)
    # the SAE recipe: SAELens' loss (squared error summed over the inputs), so λ means the same there
    recon = "half_sse" if cfg.activation == "sigmoid" else "sse" if cfg.sae_recipe and cfg.model == "sae" else "mse"
    if cfg.model == "stacked":
        sizes = [d_in, *cfg.sizes]
        return StackedAutoencoder(sizes, cfg.activation, output=cfg.decoder, weight_decay=cfg.weight_decay,
                                  recon_loss=recon, penalties={len(sizes) - 2: penalty} if penalty else None)
    activation: Any = cfg.activation
    if cfg.activation == "jumprelu":  # --threshold: θ₀, --bandwidth: ε (None: the JumpReLU's own defaults)
        from .models.activations import JumpReLU

        kw = {"init_threshold": cfg.threshold, "bandwidth": cfg.bandwidth}
        activation = JumpReLU(cfg.hidden, **{k: v for k, v in kw.items() if v is not None})
    sae = cfg.sae_recipe
    # the SAE recipe: encoder = decoderᵀ at init; a penalty on free decoder norms is weighted by them
    unit_norm = bool(cfg.unit_norm_decoder) if sae else False
    extra: dict[str, Any] = {}
    if cfg.matryoshka is not None:
        extra["matryoshka"] = cfg.matryoshka
    if cfg.resample_every is not None:
        extra["resample_every"] = cfg.resample_every
    return SparseAutoencoder(
        d_in, cfg.hidden, activation, k=cfg.k, decoder=cfg.decoder, tied=cfg.tied, penalty=penalty,
        weight_decay=cfg.weight_decay, recon_loss=recon, unit_norm_decoder=unit_norm,
        init="orthogonal_tied" if sae else "ufldl", init_scale=cfg.init_scale if sae else 1.0,
        penalty_on_decoder_norm=sae and not unit_norm and cfg.penalty_key in ("l1", "lp"),
        pre_bias=bool(cfg.pre_bias), auxk=cfg.auxk,
        auxk_coef=cfg.auxk_coef, dead_after=cfg.dead_after, decode=cfg.decode,
        topk_screen=getattr(cfg, "topk_screen", "exact"), **extra,
    )
