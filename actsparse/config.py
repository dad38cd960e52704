"""Typed configuration of a training run. The ``actsparse train`` flags are generated from it.

The defaults are the classic sparse-autoencoder exercise of Andrew Ng's CS294A lecture notes
("Sparse autoencoder", 2011) and the UFLDL tutorial: 10,000 8×8 natural-image patches,
64 → 25 → 64 sigmoid autoencoder, ρ = 0.01, λ = 1e-4, β = 3, L-BFGS for 400 iterations.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from .functional import DEFAULT_BANDWIDTH
from .penalties import PENALTIES

__all__ = ["TrainConfig", "load_config_file", "ConfigError", "check_run_name", "install_hint", "FIELD_GROUPS"]


def install_hint(extra: str) -> str:
    """The command that installs an optional extra, for error messages and docs: the form that works
    from a clone of the repository (actsparse is installed from source) and the released form.

    >>> install_hint("keras")
    "from a clone, in its folder: pip install -e '.[keras]' (released: pip install 'actsparse[keras]')"
    """
    return f"from a clone, in its folder: pip install -e '.[{extra}]' (released: pip install 'actsparse[{extra}]')"


class ConfigError(ValueError):
    """A configuration value or file that cannot be used (the message says which and why)."""


Activation = Literal["sigmoid", "relu", "topk", "batchtopk", "jumprelu", "gated", "ksparse"]
Recipe = Literal["auto", "classic", "sae"]
#: Activations that make a run an SAE recipe under ``--recipe auto``.
SAE_ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "gated")
#: The top-k family: they fix the number of active units themselves.
TOPK_FAMILY = ("topk", "batchtopk", "ksparse")
Optimizer = Literal["lbfgs", "adam", "sgd"]
Whiten = Literal["none", "1/f", "zca"]


#: ``--data model:NAME``.
MODEL_PREFIX = "model:"
#: What the unset settings of ``--data model:NAME`` become (``--positions``: drop-first with a BOS, else all).
MODEL_SOURCE_DEFAULTS: dict[str, Any] = {"layer": "h.0", "tokens": 1_000_000, "context": 128, "buffer": 65_536}


@dataclass
class TrainConfig:
    """Train a sparse autoencoder and write config, weights, metrics and figures to ``out/name``."""

    data: str = "patches"
    """Data source: ``patches`` (natural images shipped with the package), ``digits``
    (scikit-learn's 8×8 digits), ``synthetic`` (sparse ground truth), ``ground-truth`` (known
    features with Zipfian firing, a hierarchy and correlations; settings as
    ``ground-truth:n_features=512,d=64,mean_active=8``), a file (.npy, .npz, .pt,
    .safetensors, .csv, MNIST IDX ``*-ubyte[.gz]`` or ``*.idx``), an image folder (``folder:DIR`` or
    a directory: patches are cut from its images), ``torchvision:NAME:ROOT`` (needs torchvision;
    nothing is downloaded), ``shards:DIR``, an activation store written by ``actsparse
    cache-activations`` (streamed: it need not fit in memory), or ``model:NAME``, a model's
    activations streamed from its forward, no cache on disk (``stdlib-lm``, the byte-level GPT-2 of
    the standard library; ``tiny-gpt2``; a Hugging Face name or folder; see ``--layer``)."""
    samples: int = 10_000
    """Number of samples to draw (patches, image folders, synthetic)."""
    patch_size: int = 8
    """Side of the square patches."""
    whiten: Whiten = "1/f"
    """Whitening of the images before patches are cut: ``1/f``, ``zca`` (ε = 0.1) or ``none``."""

    layer: str | None = None
    """With ``--data model:NAME``: the module whose output the SAE learns, a qualified name (``h.0``,
    ``h.0.mlp``; ``transformer.h.0`` works too) or a glob that matches one module. Default: h.0."""
    tokens: int | None = None
    """Positions (rows) of one epoch, from windows of ``--context`` tokens.
    Default: 1,000,000."""
    context: int | None = None
    """Tokens per window, the BOS included. Default: 128."""
    buffer: int | None = None
    """Rows of the shuffle buffer; the activations of this many positions are
    computed at a time and shuffled among themselves (memory: about 2 × buffer × d floats); 0 or 1:
    no shuffle, the stream's order. Default: 65,536."""
    token_file: str | None = None
    """A 1-D ``.npy`` array of token ids, read in consecutive windows.
    Default: uniformly random tokens (stdlib-lm: random windows of its training files)."""
    bos: int | None = None
    """The token id put first in every window (e.g. 50256 for GPT-2).
    Default: none; 0 for stdlib-lm."""
    positions: str | None = None
    """The positions of each window the SAE learns: ``all``, ``last``,
    ``drop-first`` (leave out the BOS), an integer, or a slice ``start:stop[:step]``. Default:
    drop-first with a BOS, else all."""

    model: Literal["sae", "stacked"] = "sae"
    """``sae``: one hidden layer; ``stacked``: a deep autoencoder of ``--sizes``, mirrored."""
    sizes: tuple[int, ...] | None = None
    """For ``--model stacked``: encoder widths after the input, code last (seed 001: 80 40 4).
    The penalty applies to the code."""
    pretrain: bool = False
    """For ``--model stacked``: greedy layer-wise pretraining (one sparse autoencoder per layer,
    ``--iterations``/``--epochs`` each) before fine-tuning the whole stack."""
    recipe: Recipe = "auto"
    """What the settings below are when left unset: ``classic`` (Ng's CS294A
    autoencoder: sigmoid decoder, L-BFGS, KL penalty, UFLDL init, weight decay) or ``sae`` (a
    sparse autoencoder of the interpretability field: linear decoder, Adam with gradient
    clipping, SAELens' loss (the squared error summed over the inputs), L1 for ReLU and gated
    units, L0 for JumpReLU, none for the top-k family, encoder = decoderᵀ at init, no weight
    decay, the decoder bias subtracted from the input). ``auto``: ``sae`` for the topk,
    batchtopk, jumprelu and gated activations and for ``synthetic``, ``ground-truth`` and
    ``shards:`` data; else ``classic``."""
    hidden: int = 25
    """Number of hidden units (d_sae)."""
    activation: Activation = "sigmoid"
    """Hidden activation (``topk``, ``batchtopk`` and ``ksparse`` need ``--k``)."""
    k: int | None = None
    """Active units per sample for topk, batchtopk and ksparse."""
    decoder: Literal["sigmoid", "linear"] | None = None
    """Output units: ``sigmoid`` (inputs in [0, 1]) or ``linear``. Default: sigmoid for
    ``--recipe classic``, linear for ``sae``."""
    tied: bool = False
    """Tie the decoder to the encoder's transpose."""
    auxk: int | None = None
    """AuxK loss on this many dead latents (Gao et al. 2024; topk and batchtopk SAEs only)."""
    auxk_coef: float = 1 / 32
    """Coefficient of the AuxK loss (Gao et al. 2024 use 1/32)."""
    dead_after: int = 10_000
    """A unit is dead when it has not fired in this many training samples (AuxK, resampling,
    the logged dead fraction)."""
    resample_every: int | None = None
    """Resample dead units every this many steps (Bricken et al. 2023): a dead unit's atom is
    set to an input the model reconstructs badly, and its optimiser state is reset. Default: off."""
    matryoshka: tuple[int, ...] | None = None
    """Nested dictionary sizes m₁ < m₂ < … (Bussmann et al. 2025): each prefix of the latents
    must reconstruct the input on its own; the loss sums the prefixes' reconstructions."""
    init_scale: float | None = None
    """``--recipe sae``: the norm of each encoder row at init (encoder = decoderᵀ). Default: 0.1
    (Conerly et al. 2024; also for the top-k family, where Gao et al. use 1: on
    ``bench/bench_ground_truth.py`` TopK's MCC goes from 0.390 to 0.422 with it)."""
    unit_norm_decoder: bool | None = None
    """``--recipe sae``: hold each decoder atom at unit norm. Default: on for the top-k family;
    off for relu, jumprelu and gated units (an ``l1`` or ``lp`` penalty is then on each code times
    its atom's norm, Conerly et al. 2024, so a long atom cannot buy a small code)."""
    pre_bias: bool | None = None
    """Subtract the decoder bias from the input before encoding. Default: off; on for ``--recipe sae``."""
    decode: Literal["auto", "dense", "sparse"] = "auto"
    """TopK SAEs: ``sparse`` encodes and decodes with only the k active units per sample (same
    result, much faster when k ≪ hidden); ``auto`` picks it when it is faster."""
    topk_screen: Literal["exact", "bf16"] = "exact"
    """TopK SAEs on the sparse path: ``bf16`` picks each sample's k units from a bfloat16 product
    while training (faster on CPUs with bf16 instructions; approximate where two pre-activations
    are closer than bf16 rounding), then computes their values exactly. Evaluation is exact."""

    penalty: str | None = "auto"
    """Sparsity penalty on the hidden code: ``kl`` or ``bernoulli_kl`` (KL of the mean
    activation, for sigmoid units in [0, 1]), ``poisson_kl`` (generalised KL, for ReLU units),
    ``frequency_kl`` (KL of how often a unit fires, see ``--threshold``), ``l0`` (active units
    per sample; with ``--activation jumprelu`` it trains the learned thresholds, as in JumpReLU
    SAEs), ``l1``, ``lp`` (Σ|a|^p, p annealed from 1 to ``--p-end``), ``l2``, ``hoyer``, or
    ``none``. Default: kl for ``--recipe classic``; for ``sae``, l1 for relu and gated units, l0
    for jumprelu, none for the top-k family."""
    target: float | None = None
    """Target ρ of the KL penalties: the mean activation (``kl``, ``poisson_kl``) or the firing
    frequency (``frequency_kl``). Default: 0.01; 0.1 for ``--data digits`` (the MNIST exercise of
    the UFLDL tutorial)."""
    weight: float | None = None
    """Coefficient β (or λ for L1/L2/Hoyer/L0) of the penalty. Default: 3 (β of Ng's exercise);
    for ``--recipe sae``, 1 for l1/lp and 0.1 for l0 (the reconstruction loss is then the squared
    error summed over the inputs, as in SAELens, so λ means what its l1_coefficient and
    l0_coefficient mean)."""
    p_end: float | None = None
    """``--penalty lp``: the final p of p-annealing (Karvonen et al. 2024): p goes from 1 to this
    over training. Default: 1 (plain L1)."""
    bandwidth: float | None = None
    """``--penalty frequency_kl`` and ``--activation jumprelu``: width ε of the pseudo-gradient
    window around the threshold, in activation units. Only activations within ε/2 of the threshold
    are pushed, so choose ε on the scale of the activations."""
    threshold: float | None = None
    """``--penalty frequency_kl``: θ, a unit fires when its activation is > θ.
    ``--activation jumprelu``: the initial learned threshold θ₀."""

    target_l0: float | None = None
    """Adapt the penalty's coefficient during training, starting from ``--weight``, until the
    code has this many active units per sample (units > 0; > ``--threshold`` for
    ``frequency_kl``). Not for sigmoid units, which are never 0."""
    target_rate: float | None = None
    """Adapt the coefficient until units fire in this share of samples: on average over units,
    or each unit with ``--per-unit``."""
    target_mean: float | None = None
    """Adapt the coefficient until the mean activation ρ̂ is this: on average over units, or each
    unit with ``--per-unit`` (the KL penalties' ``--target`` ρ reached exactly)."""
    per_unit: bool = False
    """With ``--target-rate`` or ``--target-mean``: one coefficient per unit, each unit held to the
    target (not with ``hoyer``, which is no sum over units)."""
    control_rate: float | None = None
    """η, the step of log(coefficient) per training step under ``--target-*``: the coefficient
    moves by at most a factor e^η a step. Default: 0.2 for ``lbfgs`` (the model answers a new
    coefficient within a few iterations), 0.02 for minibatch optimisers (it takes tens of steps
    to answer, and a larger η overshoots)."""

    optimizer: Optimizer | None = None
    """``lbfgs`` (full batch) or a minibatch optimiser. Default: lbfgs for ``--recipe classic``,
    adam for ``sae``."""
    iterations: int = 400
    """L-BFGS iterations."""
    epochs: int = 10
    """Passes over the data for minibatch optimisers."""
    batch_size: int = 256
    """Minibatch size."""
    lr: float = 1e-3
    """Learning rate of minibatch optimisers."""
    clip_grad: float | None = None
    """Minibatch optimisers: clip the gradient's global norm at this value before each step (0: never).
    Default: off for ``--recipe classic``; 1 for ``sae`` (as SAELens clips, on the same loss)."""
    lr_decay: float | None = None
    """Minibatch optimisers: the learning rate decays linearly to 0 over this last fraction of the
    steps (Conerly et al. 2024 use 0.2). Default: 0."""
    weight_decay: float | None = None
    """λ of the weight decay (λ/2)Σ‖W‖², weights only. Default: 1e-4 (Ng's CS294A exercise);
    3e-3 for ``--data digits`` and for ``--whiten zca --decoder linear`` (the UFLDL tutorial's
    MNIST and linear-decoder exercises: with 1e-4 their filters come out as pixel noise)."""
    validation: float = 0.1
    """Fraction of samples held out for the validation loss (reported without the penalty)."""
    final_samples: int | None = None
    """The final metrics are measured on this many samples of the training split (a random
    subset; 0: on the validation split instead). Default: all of it (a streamed store: 65,536)."""
    on_nan: Literal["stop", "rollback"] = "stop"
    """When the loss or the weights become NaN/Inf: ``stop`` with a message naming the step and the
    loss terms (the last good checkpoint is kept), or ``rollback`` to the last good checkpoint with
    half the learning rate (L-BFGS: with its curvature pairs reset) and go on."""
    max_rollbacks: int = 3
    """With ``--on-nan rollback``: give up after this many rollbacks."""

    seed: int = 0
    """Random seed (data sampling, initialisation, shuffling)."""
    out: str = "runs"
    """Folder that receives the run folder."""
    name: str | None = None
    """Run name, one folder name: results go to ``out/name``. An explicit name that holds a run
    is refused unless ``--resume`` or ``--overwrite``. Default: ``classic``, or the next free
    ``classic-2``, ``classic-3``... when ``out/classic`` holds another run."""
    config: str | None = field(default=None)
    """A TOML or YAML file of these settings (the flags' names with ``_``: ``batch_size = 64``);
    flags given on the command line win."""
    resume: bool = False
    """Continue the run in ``out/name`` from its newest checkpoint that verifies (same seed: same
    result). A damaged ``checkpoint.pt`` is reported and ``checkpoint.prev.pt`` is used."""
    overwrite: bool = False
    """Replace the run in ``out/name``: every file of the old run is removed before the new run
    starts (other files in the folder are left alone)."""
    checkpoint_every: int = 100
    """Write a resumable checkpoint every this many steps (0: only at the end)."""
    plots: bool = True
    """Write PNG figures (``--no-plots``: none)."""
    device: str = "auto"
    """Where to train: ``auto`` (CUDA if available, else CPU; under torchrun each process takes
    the GPU of its ``LOCAL_RANK``), ``cpu``, ``cuda`` or ``cuda:N``."""
    threads: int | None = None
    """CPU threads for torch's operations. Default: chosen per run and printed: ``OMP_NUM_THREADS``
    if set, else never more than the cores other processes leave free (extra threads spin-wait
    for cores that other processes take, and a busy machine makes a run many times slower): all
    of them for a small model, one per share of work for a larger one."""

    progress: bool = True
    """Show a progress bar (``--no-progress``: none)."""
    tensorboard: str | None = None
    """Also log to TensorBoard event files in this folder (needs the ``tensorboard`` extra): each
    logged step's loss terms and metrics, the histogram of ρ̂ per unit and the filter grid every
    ``--checkpoint-every`` steps and at the end, the config and the final metrics. Default: off."""

    def __post_init__(self) -> None:
        choices, flags = _field_kinds()
        if isinstance(self.name, os.PathLike):
            self.name = os.fspath(self.name)
        if self.name is not None:
            check_run_name(self.name)
        for name in ("data", "out"):
            v = getattr(self, name)
            if isinstance(v, os.PathLike):  # a pathlib.Path is fine: stored as the str config.json keeps
                v = os.fspath(v)
                setattr(self, name, v)
            if not isinstance(v, str) or not v:
                raise ConfigError(f"--{name} must be a non-empty string, got {v!r}")
        for name in flags:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"--{name.replace('_', '-')} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be an integer in [0, 2**63), got {self.seed!r}")
        self._resolve_recipe_defaults()
        self._resolve_model_source()
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in out/name and --overwrite replaces it: choose one")
        positive_ints = ("samples", "patch_size", "hidden", "iterations", "epochs", "batch_size")
        for name in positive_ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) \
                or self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be an integer >= 0, got {self.checkpoint_every!r}")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda")
                                                    or self.device.startswith(("cuda:", "mps", "xpu"))):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if isinstance(self.tensorboard, os.PathLike):
            self.tensorboard = os.fspath(self.tensorboard)
        if self.tensorboard is not None and (not isinstance(self.tensorboard, str) or not self.tensorboard):
            raise ConfigError(f"--tensorboard must be a folder name, got {self.tensorboard!r}")
        if isinstance(self.max_rollbacks, bool) or not isinstance(self.max_rollbacks, int) or self.max_rollbacks < 0:
            raise ConfigError(f"--max-rollbacks must be an integer >= 0, got {self.max_rollbacks!r}")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ConfigError(f"--k must be a positive integer, got {self.k!r}")
        if self.activation in ("topk", "batchtopk", "ksparse"):
            if self.k is None:
                raise ConfigError(f"--activation {self.activation} needs --k (the number of active units)")
            if self.k > self.hidden:
                raise ConfigError(f"--k {self.k} is larger than --hidden {self.hidden}")
        if self.model == "stacked":
            if not self.sizes or any(not isinstance(v, int) or v < 1 for v in self.sizes):
                raise ConfigError("--model stacked needs --sizes, positive widths after the input, "
                                  "e.g. --sizes 80 40 4")
            self.sizes = tuple(self.sizes)  # a list when read back from config.json
            if self.activation not in ("sigmoid", "relu"):
                raise ConfigError(f"--model stacked takes --activation sigmoid or relu, got {self.activation}")
        elif self.model != "sae":
            raise ConfigError(f"--model must be 'sae' or 'stacked', got {self.model!r}")
        if self.auxk is not None and (not isinstance(self.auxk, int) or not 1 <= self.auxk <= self.hidden):
            raise ConfigError(f"--auxk must be an integer in [1, --hidden {self.hidden}], got {self.auxk!r}")
        if self.auxk is not None and (self.activation not in ("topk", "batchtopk") or self.model != "sae"):
            raise ConfigError(f"--auxk is the AuxK loss of TopK SAEs (Gao et al. 2024): it needs --model sae and "
                              f"--activation topk or batchtopk, got --activation {self.activation}")
        if self.penalty is not None and not isinstance(self.penalty, str):
            raise ConfigError(f"--penalty must be a name ({', '.join(sorted(PENALTIES))}, none), got {self.penalty!r}")
        if self.penalty is not None and self.penalty.lower() == "none":
            self.penalty = None
        if self.penalty is not None and self.penalty_key not in PENALTIES:
            raise ConfigError(f"unknown --penalty {self.penalty!r}; valid: {', '.join(sorted(PENALTIES))}, none")
        for name in ("weight", "weight_decay", "lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < math.inf):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v!r}")
        self._check_target()
        self._check_frequency_settings()
        self._check_control()
        self._check_sae_settings()
        if isinstance(self.validation, bool) or not isinstance(self.validation, (int, float)) \
                or not 0 <= self.validation < 1:
            raise ConfigError(f"--validation must be in [0, 1), got {self.validation!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ConfigError(f"--threads must be a positive integer, got {self.threads!r}")
        if self.topk_screen not in ("exact", "bf16"):
            raise ConfigError(f"--topk-screen must be exact or bf16, got {self.topk_screen!r}")
        if self.topk_screen != "exact" and (self.decode == "dense" or self.activation != "topk"
                                             or self.penalty is not None or self.model != "sae" or self.auxk):
            raise ConfigError("--topk-screen bf16 screens the sparse TopK path: it needs --activation topk, "
                              "--penalty none, --model sae, no --auxk and not --decode dense")
        if self.decode not in ("auto", "dense", "sparse"):
            raise ConfigError(f"--decode must be auto, dense or sparse, got {self.decode!r}")
        if self.decode == "sparse" and (self.activation != "topk" or self.penalty is not None or self.model != "sae"):
            raise ConfigError("--decode sparse needs --activation topk, --penalty none and --model sae "
                              f"(got --activation {self.activation}, --penalty {self.penalty or 'none'}, "
                              f"--model {self.model})")
        for name, valid in choices.items():  # the Literal fields that have no check of their own above
            if getattr(self, name) not in valid:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(map(str, valid))}, "
                                  f"got {getattr(self, name)!r}")

    #: The settings of ``--data model:NAME`` (None for other data).
    MODEL_SOURCE_FIELDS: ClassVar[tuple[str, ...]] = ("layer", "tokens", "context", "buffer", "token_file", "bos",
                                                       "positions")
    #: Fields whose default (None) is resolved from the other settings by _resolve_recipe_defaults
    #: (and _resolve_model_source).
    RECIPE_FIELDS: ClassVar[tuple[str, ...]] = ("weight_decay", "target", "control_rate", "decoder", "optimizer",
                                                 "penalty", "weight", "init_scale", "unit_norm_decoder", "pre_bias",
                                                 "lr_decay", "clip_grad", *MODEL_SOURCE_FIELDS)
    #: What a recipe field holds while unresolved (None, or ``auto`` for the penalty, whose None is "no penalty").
    UNRESOLVED: ClassVar[dict[str, Any]] = {"penalty": "auto"}

    @property
    def sae_recipe(self) -> bool:
        """Whether the run takes the ``sae`` recipe's defaults (``--recipe``, resolved for ``auto``)."""
        if self.recipe != "auto":
            return self.recipe == "sae"
        data = self.data if isinstance(self.data, str) else ""
        return self.activation in SAE_ACTIVATIONS or data == "synthetic" \
            or data.startswith(("ground-truth", "shards:", MODEL_PREFIX))

    def _resolve_recipe_defaults(self) -> None:
        """Fill ``weight_decay`` and ``target`` when they are None with the value of the recipe the
        data belong to, so that config.json always records the number used. Sources: Ng's CS294A
        sparse autoencoder exercise (natural patches: λ = 1e-4, ρ = 0.01) and the UFLDL tutorial's
        MNIST exercise (λ = 3e-3, ρ = 0.1) and linear-decoder exercise on ZCA-whitened patches
        (λ = 3e-3). Measured in ``bench/bench_filters.py``: median smoothness of the digit filters
        0.25 → 0.44, of the ZCA filters 0.41 → 0.83."""
        if self.recipe not in ("auto", "classic", "sae"):
            raise ConfigError(f"--recipe must be auto, classic or sae, got {self.recipe!r}")
        sae = self.sae_recipe
        topk = self.activation in TOPK_FAMILY
        if self.decoder is None:
            self.decoder = "linear" if sae else "sigmoid"
        if self.optimizer is None:
            self.optimizer = "adam" if sae else "lbfgs"
        if isinstance(self.penalty, str) and self.penalty.lower() == "auto":
            self.penalty = ("none" if topk else "l0" if self.activation == "jumprelu" else "l1") if sae else "kl"
        key = self.penalty_key if isinstance(self.penalty, str) else None
        if self.weight is None:  # sae: SAELens' l1_coefficient and l0_coefficient, on the same loss
            self.weight = (0.1 if key == "l0" else 1.0) if sae and key in ("l1", "lp", "l0") else 3.0
        if self.init_scale is None and sae:
            self.init_scale = 0.1
        if self.unit_norm_decoder is None and sae:
            self.unit_norm_decoder = topk
        if self.pre_bias is None:
            self.pre_bias = sae
        if self.lr_decay is None:  # 0.2 measured no better on bench/bench_ground_truth.py (relu_l1, jumprelu)
            self.lr_decay = 0.0
        if self.clip_grad is None and sae:
            self.clip_grad = 1.0
        digits = self.data == "digits"
        zca_linear = self.whiten == "zca" and self.decoder == "linear"
        if self.weight_decay is None:
            self.weight_decay = 0.0 if sae else 3e-3 if digits or zca_linear else 1e-4
        if self.target is None:
            self.target = 0.1 if digits else 0.01
        if self.control_rate is None:
            self.control_rate = 0.2 if self.optimizer == "lbfgs" else 0.02

    def _resolve_model_source(self) -> None:
        """``--data model:NAME``: fill the unset settings of the stream (layer h.0, 1,000,000 positions,
        windows of 128 tokens, a buffer of 65,536 rows, stdlib-lm's BOS 0, positions drop-first with a
        BOS) and check them; for other data, refuse them (they would be ignored silently)."""
        given = [n for n in self.MODEL_SOURCE_FIELDS if getattr(self, n) is not None]
        if not self.data.startswith(MODEL_PREFIX):
            if given:
                flags = " and ".join(f"--{n.replace('_', '-')}" for n in given)
                raise ConfigError(f"{flags} {'apply' if len(given) > 1 else 'applies'} to --data model:NAME (an SAE "
                                  f"trained straight from a model's activations), not to --data {self.data}")
            return
        name = self.data[len(MODEL_PREFIX):]
        if not name.strip():
            raise ConfigError("--data model:NAME needs a NAME: stdlib-lm, tiny-gpt2, or a Hugging Face name or folder")
        for field_name, value in MODEL_SOURCE_DEFAULTS.items():
            if getattr(self, field_name) is None:
                setattr(self, field_name, value)
        if isinstance(self.token_file, os.PathLike):
            self.token_file = os.fspath(self.token_file)
        for field_name, low in (("tokens", 1), ("context", 1), ("buffer", 0), ("bos", 0)):
            v = getattr(self, field_name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ConfigError(f"--{field_name} must be an integer >= {low}, got {v!r}")
        for field_name in ("layer", "token_file", "positions"):
            v = getattr(self, field_name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ConfigError(f"--{field_name.replace('_', '-')} must be a non-empty string, got {v!r}")
        if name == "stdlib-lm":
            if self.bos is None:
                self.bos = 0
            elif self.bos != 0:
                raise ConfigError(f"--bos {self.bos}: the BOS of model:stdlib-lm is byte 0 (it leads every window it "
                                  "was trained on); leave --bos out")
        if self.bos is not None and self.context < 2:
            raise ConfigError(f"--context {self.context} leaves no room for a token after --bos: use 2 or more")
        if self.positions is None:
            self.positions = "drop-first" if self.bos is not None else "all"
        from .data.activations import parse_positions  # here: the data layer imports this module

        try:
            parse_positions(self.positions)
        except ValueError as err:
            raise ConfigError(f"--positions: {err}") from None
        if self.tokens < self.batch_size:
            raise ConfigError(f"--tokens {self.tokens} is fewer positions than one --batch-size {self.batch_size}")

    def _check_target(self) -> None:
        """ρ must be a probability for the Bernoulli and frequency KLs, and > 0 for the Poisson KL
        (the other penalties have no target: it is not used)."""
        t = self.target
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ConfigError(f"--target must be a finite number, got {t!r}")
        key = None if self.penalty is None else PENALTIES[self.penalty_key].__name__
        if key in ("BernoulliKL", "FrequencyKL") and not 0 < t < 1:
            raise ConfigError(f"--target of --penalty {self.penalty} is a firing rate ρ and must lie strictly "
                              f"between 0 and 1, got {t!r}")
        if key == "PoissonKL" and not t > 0:
            raise ConfigError(f"--target of --penalty {self.penalty} is a mean activation ρ and must be > 0, got {t!r}")

    @property
    def penalty_key(self) -> str | None:
        """``--penalty`` as its registry key (``PENALTIES``: lower case, ``_`` for ``-``), or None."""
        return None if self.penalty is None else self.penalty.lower().replace("-", "_")

    #: The flags that ask for a controlled coefficient, and the statistic each holds.
    CONTROL_FLAGS: ClassVar[dict[str, str]] = {"target_l0": "l0", "target_rate": "rate", "target_mean": "mean"}

    def control(self) -> tuple[str, float] | None:
        """``(statistic, target)`` of the ``--target-*`` flag given, or None (a fixed coefficient)."""
        for name, statistic in self.CONTROL_FLAGS.items():
            if getattr(self, name) is not None:
                return statistic, float(getattr(self, name))
        return None

    def _check_control(self) -> None:
        """The ``--target-*`` flags: one at most, a number in range, a penalty to control, and a
        statistic the activation can show."""
        given = [n for n in self.CONTROL_FLAGS if getattr(self, n) is not None]
        flags = [f"--{n.replace('_', '-')}" for n in given]
        for name in given:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v!r}")
        v = self.control_rate
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise ConfigError(f"--control-rate is the step of log(coefficient) and must be in (0, 1], got {v!r}")
        if not isinstance(self.per_unit, bool):
            raise ConfigError(f"--per-unit must be true or false, got {self.per_unit!r}")
        if not given:
            if self.per_unit:
                raise ConfigError("--per-unit applies to --target-rate or --target-mean (a coefficient per unit)")
            return
        if len(given) > 1:
            raise ConfigError(f"{' and '.join(flags)}: give one target (each adapts the same coefficient)")
        if self.activation in TOPK_FAMILY:
            raise ConfigError(f"--activation {self.activation} fixes the number of active units itself (--k): "
                              f"{flags[0]} has nothing to adapt")
        if self.penalty is None:
            raise ConfigError(f"{flags[0]} adapts the penalty's coefficient: it needs a --penalty "
                              f"({', '.join(sorted(PENALTIES))})")
        name, key = given[0], self.penalty_key
        if name == "target_rate" and not self.target_rate < 1:
            raise ConfigError(f"--target-rate is a share of samples and must lie in (0, 1), got {self.target_rate!r}")
        width = self.hidden if self.model == "sae" else (self.sizes or (0,))[-1]
        if name == "target_l0" and self.target_l0 > width:
            raise ConfigError(f"--target-l0 {self.target_l0:g} is more than the {width} units of the code")
        if name in ("target_l0", "target_rate") and self.activation == "sigmoid" and key != "frequency_kl":
            raise ConfigError(f"{flags[0]} counts the units that are > 0, and sigmoid units always are: use "
                              "--target-mean with sigmoid units, or a ReLU-family --activation")
        if self.per_unit and name == "target_l0":
            raise ConfigError("--per-unit holds each unit's own statistic: use it with --target-rate or "
                              "--target-mean (L0 counts units per sample)")
        if self.per_unit and key == "hoyer":
            raise ConfigError("--per-unit needs a penalty that is a sum over units (kl, poisson_kl, frequency_kl, "
                              "l1, l2), not hoyer")
        if self.weight == 0:
            raise ConfigError(f"--weight is the starting coefficient of {flags[0]} and must be > 0")


    def _check_sae_settings(self) -> None:
        """The knobs of modern SAEs: types, ranges, and the model they belong to."""
        def bad(flag: str, what: str, v: object) -> ConfigError:
            return ConfigError(f"--{flag} must be {what}, got {v!r}")

        v = self.lr_decay
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise bad("lr-decay", "a fraction of the steps in [0, 1]", v)
        v = self.clip_grad
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf):
            raise bad("clip-grad", "a finite number >= 0 (0: no clipping)", v)
        v = self.auxk_coef
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise bad("auxk-coef", "a finite number >= 0", v)
        for name in ("dead_after", "resample_every"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise bad(name.replace("_", "-"), "a positive integer", v)
        if self.dead_after is None:
            raise bad("dead-after", "a positive integer", None)
        for name in ("unit_norm_decoder", "pre_bias"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise bad(name.replace("_", "-"), "true or false", v)
        v = self.init_scale
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise bad("init-scale", "a finite number > 0", v)
            if not self.sae_recipe:
                raise ConfigError("--init-scale sets the SAE init (encoder = decoderᵀ) of --recipe sae; the classic "
                                  "recipe uses the UFLDL init")
        if self.unit_norm_decoder and not self.sae_recipe:
            raise ConfigError("--unit-norm-decoder belongs to --recipe sae")
        v = self.final_samples
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise bad("final-samples", "an integer >= 0", v)
        if v == 0 and not self.validation:
            raise ConfigError("--final-samples 0 measures the final metrics on the validation split, but "
                              "--validation is 0: hold out some samples or measure a subset (--final-samples N)")
        if self.matryoshka is not None:
            m = self.matryoshka
            if isinstance(m, int) and not isinstance(m, bool):
                m = (m,)
            if not isinstance(m, (tuple, list)) or not m or any(
                    isinstance(s, bool) or not isinstance(s, int) for s in m):
                raise bad("matryoshka", "nested dictionary sizes, e.g. --matryoshka 128 512 2048", self.matryoshka)
            m = tuple(m)
            if any(b <= a for a, b in zip(m, m[1:])) or m[0] < 1 or m[-1] > self.hidden:
                raise ConfigError(f"--matryoshka sizes must increase and lie in [1, --hidden {self.hidden}], got "
                                  f"{' '.join(map(str, m))}")
            if self.model != "sae":
                raise ConfigError("--matryoshka needs --model sae")
            self.matryoshka = m
        if self.resample_every is not None and (self.model != "sae" or self.optimizer == "lbfgs"):
            raise ConfigError("--resample-every resamples dead units of a one-layer SAE between minibatch steps: it "
                              "needs --model sae and a minibatch --optimizer (adam, sgd)")
        if self.p_end is not None:
            v = self.p_end
            if self.penalty_key != "lp":
                raise ConfigError(f"--p-end is the final p of --penalty lp, not of --penalty {self.penalty or 'none'}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise bad("p-end", "in (0, 1] (p is annealed down from 1)", v)
        if self.activation == "gated" and self.model != "sae":
            raise ConfigError("--activation gated is a one-layer SAE: it needs --model sae")

    def _check_frequency_settings(self) -> None:
        """``bandwidth`` and ``threshold`` belong to the firing-frequency KL alone: for another
        penalty they would be ignored silently, so they are refused."""
        given = [n for n in ("bandwidth", "threshold") if getattr(self, n) is not None]
        for name in given:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"--{name} must be a finite number, got {v!r}")
            setattr(self, name, float(v))
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ConfigError(f"--bandwidth is a window width and must be > 0, got {self.bandwidth!r}")
        key = self.penalty_key
        if given and key != "frequency_kl" and self.activation != "jumprelu":
            flags = " and ".join(f"--{n}" for n in given)
            raise ConfigError(f"{flags} {'apply' if len(given) > 1 else 'applies'} only to --penalty frequency_kl "
                              f"(the firing-frequency KL) and --activation jumprelu (its initial threshold and "
                              f"pseudo-gradient window), not to --penalty {self.penalty or 'none'}")
        if self.activation == "jumprelu" and key != "frequency_kl" and self.threshold is not None \
                and self.threshold <= 0:
            raise ConfigError(f"--threshold is the JumpReLU's initial θ and must be > 0, got {self.threshold!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def check_run_name(name: object) -> str:
    """A run name is one folder name inside ``--out``: not empty, not ``.``/``..``, no path
    separator, not absolute (a name from a config file someone sent must not write elsewhere)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"--name must be a non-empty folder name, got {name!r}")
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if name in (".", "..") or any(sep in name for sep in seps) or "\0" in name or Path(name).is_absolute():
        raise ConfigError(f"--name {name!r} must be one folder name inside --out (no '/', '..' or absolute path)")
    return name


#: The groups of ``actsparse train --help``, in order; every field of :class:`TrainConfig` is in one.
FIELD_GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("data", "samples", "patch_size", "whiten"),
    "model activations (--data model:NAME)": ("layer", "tokens", "context", "buffer", "token_file", "bos",
                                              "positions"),
    "model": ("recipe", "model", "sizes", "pretrain", "hidden", "activation", "k", "decoder", "tied", "auxk",
              "auxk_coef", "dead_after", "resample_every", "matryoshka", "init_scale", "unit_norm_decoder",
              "pre_bias", "decode", "topk_screen"),
    "penalty (sparsity)": ("penalty", "target", "weight", "p_end", "bandwidth", "threshold", "target_l0",
                           "target_rate", "target_mean", "per_unit", "control_rate"),
    "optimisation": ("optimizer", "iterations", "epochs", "batch_size", "lr", "lr_decay", "clip_grad", "weight_decay",
                     "validation",
                     "final_samples", "on_nan", "max_rollbacks"),
    "run and output": ("seed", "out", "name", "config", "resume", "overwrite", "checkpoint_every", "plots",
                       "device", "threads"),
    "logging": ("progress", "tensorboard"),
}

#: ``--help``'s "Default:" for fields whose default ``None`` stands for a value.
NONE_MEANS: dict[str, str] = {
    "bandwidth": f"{DEFAULT_BANDWIDTH:g} (FrequencyKL's own); 0.05 for jumprelu",
    "threshold": "0; 0.01 for jumprelu",
    "target_l0": "off (a fixed coefficient)",
    "resample_every": "off",
    "matryoshka": "off (one dictionary)",
    "final_samples": "all",
    "clip_grad": "off; 1 for --recipe sae",
    "p_end": "1",
    "target_rate": "off",
    "target_mean": "off",
}


@functools.cache
def _field_kinds() -> tuple[dict[str, tuple], tuple[str, ...]]:
    """The choices of each ``Literal`` field and the names of the ``bool`` fields of TrainConfig."""
    hints = typing.get_type_hints(TrainConfig)
    choices = {}
    for n, t in hints.items():
        if typing.get_origin(t) is typing.Union:  # Literal[...] | None: a recipe field, resolved before the check
            t = next((a for a in typing.get_args(t) if typing.get_origin(a) is Literal), t)
        if typing.get_origin(t) is Literal:
            choices[n] = typing.get_args(t)
    return choices, tuple(n for n, t in hints.items() if t is bool)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file of :class:`TrainConfig` fields.

    Raises:
        ConfigError: missing file, parse error (with the parser's message), unknown keys.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {p}: {err}") from err
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            values = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError as err:
                raise ConfigError(f"reading YAML needs PyYAML: {install_hint('cli')}") from err
            values = yaml.safe_load(text) or {}
        elif suffix == ".json":
            values = json.loads(text)
        else:
            raise ConfigError(f"config file must be .toml, .yaml, .yml or .json, got {p.name}")
    except ConfigError:
        raise
    except Exception as err:  # parser errors of three libraries, some over several lines
        raise ConfigError(f"cannot parse {p}: {' '.join(str(err).split())}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{p} must hold a table of settings, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    settings: dict[str, Any] = {}
    unknown = []
    for key, value in values.items():
        name = key.replace("-", "_") if isinstance(key, str) else key  # batch-size, as the flag is spelled
        if name not in known:
            unknown.append(str(key))
        elif name in settings:
            raise ConfigError(f"{p}: {name} is set twice (as {name} and {name.replace('_', '-')})")
        else:
            settings[name] = value
    if unknown:
        raise ConfigError(f"{p}: unknown setting(s) {', '.join(_with_hint(k, known) for k in sorted(unknown))}; "
                          f"valid: {', '.join(sorted(known))}")
    return settings


def _with_hint(key: str, known: set[str]) -> str:
    """``key`` and, when a setting is close, the hint the command line gives: ``hiden (did you mean --hidden?)``."""
    close = difflib.get_close_matches(key.replace("-", "_").lower(), known, n=1, cutoff=0.6)
    return f"{key} (did you mean --{close[0].replace('_', '-')}?)" if close else key
