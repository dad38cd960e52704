"""A byte-level tiny GPT-2 that learns the Python standard library: a real language model with no
download, trained once (a few minutes on 2 cores) and cached.

>>> model, info = stdlib_lm()        # trains on the first call, loads from the cache after
>>> info["bits_per_byte"], info["bigram_bits_per_byte"]

Why it is built this way:

* ``transformers.GPT2LMHeadModel`` built from a config (vocabulary 256 = bytes, tied input and
  output embeddings), so every tool that takes a Hugging Face causal LM takes this one, and the
  same code path serves ``--model NAME``.
* Training: AdamW (Loshchilov & Hutter 2019) with a linear warm-up and a cosine decay of the
  learning rate, gradients clipped at norm 1 (the nanoGPT/GPT-2 recipe), in bfloat16 autocast
  where the CPU has bfloat16 instructions (float32 weights and optimiser; measured 2× faster per
  step here) and in float32 elsewhere, on windows drawn
  uniformly from the training stream (:func:`~actsparse.lm.corpus.training_windows`), each led
  by BOS. The initial weights and every window come from one seed (same seed and thread count,
  same model).
* Scored in bits per byte on held-out files: next-byte cross-entropy / ln 2, over every
  prediction of a window but those of a separator (:data:`~actsparse.lm.corpus.BOS`), so it is
  comparable with :func:`~actsparse.lm.corpus.ngram_bits_per_byte`.
* The cache key hashes the recipe, the corpus' contents and the code's version
  (:data:`RECIPE_VERSION`): another Python's standard library, or another recipe, trains anew.
  A model is written to a temporary folder and renamed into place, so a killed training leaves
  no half model, and two processes training at once both end with a whole one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data._limits import MissingDependency
from ..data.activations import HF_EXTRA
from ..progress import progress_bar
from .corpus import BOS, ByteCorpus, ngram_bits_per_byte, stdlib_corpus, training_windows, validation_windows

__all__ = ["LMRecipe", "build_byte_gpt2", "train_byte_lm", "bits_per_byte", "next_byte_loss", "stdlib_lm",
           "cache_root", "RECIPE_VERSION"]

#: Bumped whenever training changes what a recipe produces, so cached models are retrained.
RECIPE_VERSION = 2

#: The name the language model's metrics are saved under in its cache folder.
INFO_NAME = "lm.json"


@dataclass(frozen=True)
class LMRecipe:
    """How the byte-level GPT-2 is built and trained (defaults: about 4 minutes on 2 cores).

    Attributes:
        n_layer, n_embd, n_head: the transformer (default 2 blocks of width 128, 4 heads).
        context: bytes per window, BOS included (default 128).
        batch_size: windows per step (default 32).
        steps: optimiser steps (default 800).
        lr: peak learning rate (default 3e-3), reached after ``warmup`` steps (default 50), then
            a cosine decay to ``lr / 10``.
        weight_decay: AdamW's decoupled decay on the matrices (default 0.1).
        seed: the initial weights and the windows (default 0).
        eval_windows: held-out windows scored (default 1,000, i.e. 127,000 predictions).
        precision: ``"auto"`` (default: ``"bfloat16"`` autocast where the CPU has bfloat16
            instructions, AVX512-BF16 or AMX, else ``"float32"``), ``"bfloat16"`` or ``"float32"``.
            The cache key holds the resolved value. Scoring is always in float32.
    """

    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    context: int = 128
    batch_size: int = 32
    steps: int = 800
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    eval_windows: int = 1000
    precision: str = "auto"

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "context", "batch_size", "steps", "eval_windows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LMRecipe.{name} must be a positive integer, got {v!r}")
        if self.context < 2:
            raise ValueError(f"LMRecipe.context must be at least 2 (BOS and one byte), got {self.context}")
        if self.n_embd % self.n_head:
            raise ValueError(f"LMRecipe.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ValueError(f"LMRecipe.lr must be a finite number > 0, got {self.lr!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"LMRecipe.warmup must be an integer >= 0, got {self.warmup!r}")
        if self.precision not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"LMRecipe.precision must be auto, bfloat16 or float32, got {self.precision!r}")
        if self.precision == "auto":  # resolved at once, so the cache key says what was trained
            object.__setattr__(self, "precision", "bfloat16" if _fast_bf16() else "float32")

    def key(self, corpus_fingerprint: str) -> str:
        """The cache key: a hash of every field, the corpus and :data:`RECIPE_VERSION`."""
        blob = json.dumps({"recipe": dataclasses.asdict(self), "corpus": corpus_fingerprint,
                           "version": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _fast_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX): without them a bfloat16
    matmul is emulated and slower than float32."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(p()) for p in probes if p is not None)


def _transformers():
    try:
        import transformers
    except ModuleNotFoundError as err:
        raise MissingDependency(f"the byte-level language model needs Hugging Face transformers, which is not "
                                f"installed: {HF_EXTRA}", name="transformers") from err
    return transformers


def build_byte_gpt2(recipe: LMRecipe = LMRecipe()) -> nn.Module:
    """A randomly initialised ``GPT2LMHeadModel`` for ``recipe`` (vocabulary 256, BOS = byte 0),
    its weights drawn from ``recipe.seed`` without touching the global random state. Its blocks
    are ``transformer.h.0`` … (``h.0`` works too: see :func:`actsparse.data.activations.resolve_layer`)."""
    tf = _transformers()
    config = tf.GPT2Config(vocab_size=256, n_positions=recipe.context, n_embd=recipe.n_embd, n_layer=recipe.n_layer,
                           n_head=recipe.n_head, bos_token_id=BOS, eos_token_id=BOS, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return tf.GPT2LMHeadModel(config)


def next_byte_loss(logits: Tensor, ids: Tensor) -> tuple[Tensor, int]:
    """Summed next-byte cross-entropy (nats) and the number of predictions scored.

    ``logits`` ``(batch, seq, 256)``, ``ids`` ``(batch, seq)``: the logits at position t predict
    ``ids[:, t + 1]``; predictions whose target is :data:`BOS` (a file separator) are not scored.
    """
    target = ids[:, 1:]
    keep = target != BOS
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return nll[keep].sum(), int(keep.sum())


@torch.no_grad()
def bits_per_byte(model: nn.Module, windows: Tensor, batch_size: int = 64) -> float:
    """Held-out bits per byte of ``model`` on ``windows`` ``(n, context)`` (see :func:`next_byte_loss`),
    in eval mode (the model's mode is restored)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for chunk in windows.split(batch_size):
            out = model(chunk, use_cache=False)
            s, c = next_byte_loss(out.logits, chunk)
            total += float(s)
            count += c
    finally:
        model.train(was)
    return total / max(count, 1) / math.log(2)


def _lr_at(step: int, recipe: LMRecipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_byte_lm(corpus: ByteCorpus, recipe: LMRecipe = LMRecipe(), *, progress: bool = True,
                  log: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train :func:`build_byte_gpt2` on ``corpus.train`` for ``recipe.steps`` steps; returns it in
    eval mode. ``log(step, loss)`` is called every 50 steps and at the last (the batch's mean
    next-byte loss in nats). A tqdm bar shows the steps when ``progress`` and tqdm is installed."""
    model = build_byte_gpt2(recipe)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(recipe.seed)
    bar = progress_bar(progress, recipe.steps, desc="training the byte-level LM", unit="step")
    model.train()
    try:
        for step in range(recipe.steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, recipe)
            ids = training_windows(corpus.train, recipe.context, recipe.batch_size, g)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.precision == "bfloat16"):
                logits = model(ids, use_cache=False).logits
            s, c = next_byte_loss(logits, ids)  # log-softmax in float32
            loss = s / c
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(bits_per_byte=f"{loss.item() / math.log(2):.2f}")
            if log is not None and (step % 50 == 0 or step == recipe.steps - 1):
                log(step, loss.item())
    finally:
        bar.close()
    return model.eval()


def cache_root() -> Path:
    """Where actsparse caches what it trains: ``$ACTSPARSE_CACHE``, else ``$XDG_CACHE_HOME/actsparse``,
    else ``~/.cache/actsparse``."""
    if os.environ.get("ACTSPARSE_CACHE"):
        return Path(os.environ["ACTSPARSE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "actsparse"


def _load_cached(folder: Path) -> tuple[nn.Module, dict[str, Any]] | None:
    """The model and metrics cached in ``folder``, or None if it is missing or damaged (then it is
    trained again: a cache is never a reason to fail)."""
    info_path = folder / INFO_NAME
    if not info_path.is_file():
        return None
    tf = _transformers()
    from safetensors.torch import load_model

    try:
        info = json.loads(info_path.read_text())
        model = tf.GPT2LMHeadModel(tf.GPT2Config.from_json_file(folder / "config.json"))
        load_model(model, folder / "model.safetensors")
    except Exception:  # noqa: BLE001 - any damage (truncated JSON, a bad safetensors header...) means: train again
        return None
    return model.eval(), info


def _save(model: nn.Module, folder: Path) -> None:
    """``config.json`` and ``model.safetensors`` (tied embeddings stored once), readable by
    ``GPT2LMHeadModel.from_pretrained`` too."""
    from safetensors.torch import save_model

    model.config.to_json_file(folder / "config.json")
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written in it, else a one-line ``PermissionError``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"cannot write the language model's cache in {folder} ({err.strerror or err}): set "
                              "ACTSPARSE_CACHE to a writable folder") from err


def stdlib_lm(recipe: LMRecipe = LMRecipe(), *, corpus: ByteCorpus | None = None, cache_dir: str | Path | None = None,
              retrain: bool = False, progress: bool = True, echo: Callable[[str], None] | None = None
              ) -> tuple[nn.Module, dict[str, Any]]:
    """The byte-level GPT-2 trained on the standard library: loaded from the cache, or trained
    (:func:`train_byte_lm`), scored and cached.

    Args:
        recipe: what to build and train (:class:`LMRecipe`).
        corpus: the text (default :func:`~actsparse.lm.corpus.stdlib_corpus`).
        cache_dir: the cache (default :func:`cache_root`); the model goes to
            ``cache_dir/lm/stdlib-<key>/`` (``config.json``, ``model.safetensors``, ``lm.json``).
        retrain: train even if a cached model exists (it is replaced).
        progress: a progress bar while training.
        echo: called with one-line messages (what is loaded or trained, where it goes).

    Returns:
        The model in eval mode, and its metrics: ``bits_per_byte`` (held out), the
        ``unigram_bits_per_byte`` and ``bigram_bits_per_byte`` baselines, ``uniform_bits_per_byte``
        (8), ``train_seconds``, ``corpus``, ``recipe``, ``path``.
    """
    say = echo or (lambda msg: None)
    _transformers()  # a missing extra is said first, not after the corpus is read and training announced
    corpus = corpus if corpus is not None else stdlib_corpus()
    folder = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    folder = folder / "lm" / f"stdlib-{recipe.key(corpus.fingerprint)}"
    if not retrain:
        cached = _load_cached(folder)
        if cached is not None:
            say(f"language model: loaded from {folder}")
            return cached[0], {**cached[1], "path": str(folder)}
    _check_writable(folder.parent)  # before minutes of training, not after
    say(f"language model: training a byte-level GPT-2 ({recipe.n_layer} layers, width {recipe.n_embd}, context "
        f"{recipe.context}, {recipe.steps} steps) on the {corpus.describe()}; it is cached in {folder}")
    start = time.perf_counter()
    model = train_byte_lm(corpus, recipe, progress=progress)
    seconds = time.perf_counter() - start
    val = validation_windows(corpus.validation, recipe.context, recipe.eval_windows)
    info = {"bits_per_byte": bits_per_byte(model, val), "unigram_bits_per_byte": ngram_bits_per_byte(corpus, 1),
            "bigram_bits_per_byte": ngram_bits_per_byte(corpus, 2), "uniform_bits_per_byte": 8.0,
            "train_seconds": seconds, "eval_predictions": int((val[:, 1:] != BOS).sum()),
            "corpus": corpus.describe(), "corpus_fingerprint": corpus.fingerprint, "recipe": dataclasses.asdict(recipe),
            "recipe_version": RECIPE_VERSION, "threads": torch.get_num_threads()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _save(model, tmp)
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        if folder.exists():  # retrain, or another process finished first: the newest wins
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / INFO_NAME).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, {**info, "path": str(folder)}
