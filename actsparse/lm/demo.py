"""``actsparse lm-demo``: an SAE on a real language model, end to end, with nothing downloaded.

1. The byte-level GPT-2 trained on the standard library (:func:`~actsparse.lm.byte_lm.stdlib_lm`,
   cached; its held-out bits per byte against the n-gram baselines are printed).
2. The activations of one layer over random training windows, BOS excluded, stored once in the
   cache next to the model (:func:`~actsparse.data.activations.cache_activations`: resumable).
3. A TopK SAE trained on them by ``actsparse train``'s own code (``--recipe sae``), into a normal
   run folder: ``eval``, ``plot`` and ``report`` work on it.
4. The SAE spliced into the model on held-out files: loss recovered and KL
   (:func:`actsparse.downstream.downstream_metrics`), added to ``metrics.json``.
5. The latent browser ``latents.html`` on held-out files, and how many latents have a measurable
   meaning (:func:`actsparse.latent_browser.purity`).

The held-out files are cut in two: the first windows score the splice, the next ones feed the
browser, so neither sees text the SAE or the model trained on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .byte_lm import LMRecipe, stdlib_lm
from .corpus import BOS, stdlib_corpus, training_windows, validation_windows

__all__ = ["LMDemoConfig", "run_lm_demo", "LM_SOURCE", "load_lm_run", "lm_downstream", "held_out_windows"]

#: The ``checkpoint`` a shard store made from the standard-library model records in its source.
LM_SOURCE = "actsparse-stdlib-lm"

#: File of the run folder that describes the language model and the layer.
LM_INFO = "lm.json"


@dataclass
class LMDemoConfig:
    """What ``actsparse lm-demo`` does (defaults: about 8 minutes on 2 cores the first time, the
    language model included; about 3 once it is cached)."""

    layer: str = "h.0"
    """The hooked module: ``h.0`` is the residual stream after the first of the 2 blocks."""
    hidden: int = 1024
    """SAE latents (8× the model's width of 128)."""
    k: int = 32
    """Active latents per token (TopK)."""
    tokens: int = 400_000
    """Token positions the SAE trains on (BOS excluded), from random windows of the training files."""
    epochs: int = 4
    """Passes over them."""
    batch_size: int = 1024
    """SAE minibatch."""
    positions: str = "8:"
    """Positions of each window the SAE trains on, is spliced into and is browsed at: ``8:``
    leaves out the BOS and the next 7 bytes, which have almost no context (their residual stream
    is unusual, and they would fill the browser's top contexts); ``drop-first`` leaves out the BOS
    alone."""
    eval_windows: int = 256
    """Held-out windows of 128 bytes the splice is scored on."""
    browser_windows: int = 512
    """Held-out windows the latent browser reads."""
    lm_steps: int = LMRecipe.steps
    """Training steps of the language model (any change of the language model's settings trains
    and caches another model)."""
    lm_layers: int = LMRecipe.n_layer
    """Transformer blocks of the language model."""
    lm_width: int = LMRecipe.n_embd
    """Width (d_model) of the language model; 4 attention heads."""
    context: int = LMRecipe.context
    """Bytes per window, BOS included."""
    text: str | None = None
    """A folder of ``.py`` files to train the language model on instead of the standard library."""
    retrain_lm: bool = False
    """Train the language model again even if it is cached."""
    out: str = "runs"
    """Folder of run folders."""
    name: str | None = None
    """Run folder name (default ``lm-demo``, or the first of ``lm-demo-2``, ``lm-demo-3``... that
    holds no run: a run never replaces another)."""
    seed: int = 0
    """Seeds the SAE and its training windows (the language model keeps its own seed, 0)."""
    overwrite: bool = False
    """Replace an existing run folder of that name."""
    threads: int | None = None
    """CPU threads (default: chosen as for ``actsparse train``)."""
    progress: bool = True
    """Progress bars (need tqdm)."""

    def check(self) -> None:
        for name in ("hidden", "k", "tokens", "epochs", "batch_size", "eval_windows", "browser_windows", "lm_steps",
                     "lm_layers", "lm_width", "context"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.k > self.hidden:
            raise ValueError(f"--k ({self.k}) must be at most --hidden ({self.hidden})")
        from ..data.activations import parse_positions

        pos = parse_positions(self.positions)
        if not (pos == "drop_first" or (isinstance(pos, slice) and (pos.start or 0) >= 1)):
            raise ValueError(f"--positions must be drop-first or a slice from position 1 or later (position 0 is "
                             f"the BOS), e.g. 8:, got {self.positions!r}")
        self.lm_recipe()  # its own checks (a width that 4 heads divide, a context of 2 or more)

    def lm_recipe(self) -> LMRecipe:
        """The language model's :class:`LMRecipe`."""
        try:
            return LMRecipe(n_layer=self.lm_layers, n_embd=self.lm_width, context=self.context, steps=self.lm_steps)
        except ValueError as err:
            raise ValueError(str(err).replace("LMRecipe.n_embd", "--lm-width").replace("LMRecipe.", "--")) from err


def _training_batches(stream, context: int, n_windows: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """``n_windows`` random windows of ``stream`` in batches, the same for a seed (resumable)."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n_windows, batch_size):
        yield training_windows(stream, context, min(batch_size, n_windows - start), g)


def _free_name(out: Path, base: str, overwrite: bool) -> str:
    """``base``, or the first of ``base-2``, ``base-3``... in ``out`` that holds no run
    (``base`` itself with ``overwrite``)."""
    from ..run_files import holds_run

    name, i = base, 1
    while not overwrite and holds_run(out / name):
        i += 1
        name = f"{base}-{i}"
    return name


def held_out_windows(lm_info: dict[str, Any], corpus) -> tuple[Tensor, Tensor]:
    """The held-out windows an LM run is scored on, and the next ones its browser reads: the
    first ``eval_windows`` whole windows of the validation files, then ``browser_windows`` more."""
    held = validation_windows(corpus.validation, lm_info["recipe"]["context"])
    if held.shape[0] < 2:
        raise ValueError("the held-out files are too short to score the splice (fewer than 2 windows)")
    n_eval = min(lm_info["eval_windows"], held.shape[0] // 2)
    return held[:n_eval], held[n_eval:n_eval + lm_info["browser_windows"]]


def load_lm_run(run_dir: str | Path, *, echo: Callable[[str], None] | None = None):
    """The language model and corpus of a run written by the demo (its ``lm.json``): ``(model,
    corpus, lm_info)``, or None if ``run_dir`` holds no ``lm.json``. The model comes from the cache
    (trained again, with the same recipe, if the cache was cleared)."""
    path = Path(run_dir) / LM_INFO
    if not path.is_file():
        return None
    try:
        lm_info = json.loads(path.read_text())
        recipe = LMRecipe(**lm_info["recipe"])
        text = lm_info.get("text")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a language-model description written by actsparse lm-demo ({err})") from err
    corpus = stdlib_corpus(text)
    if corpus.fingerprint != lm_info.get("corpus_fingerprint", corpus.fingerprint):
        raise ValueError(f"the text the run's language model was trained on ({text or 'the standard library'}) has "
                         "changed since: its held-out windows are not the ones the run was scored on")
    model, _ = stdlib_lm(recipe, corpus=corpus, echo=echo)
    return model, corpus, lm_info


def lm_downstream(model, sae, lm_info: dict[str, Any], corpus, *, progress: bool = False) -> dict[str, Any]:
    """:func:`actsparse.downstream.downstream_metrics` of ``sae`` spliced into ``lm_info["layer"]`` on
    the run's held-out windows (BOS excluded; zero ablation, mean ablation also given)."""
    from ..data.activations import parse_positions
    from ..downstream import downstream_metrics

    evaluated, _ = held_out_windows(lm_info, corpus)
    return downstream_metrics(model, lm_info["layer"], sae, evaluated.split(32),
                              positions=parse_positions(lm_info.get("positions", "drop_first")),
                              ablation="zero", progress=progress)


def downstream_record(down: dict[str, Any]) -> dict[str, Any]:
    """The downstream metrics as metrics.json keys (``tokens`` and ``ablation`` prefixed)."""
    return {k if k.startswith(("loss_recovered", "kl_", "ce_")) else f"downstream_{k}": v for k, v in down.items()}


def describe_downstream(layer: str, down: dict[str, Any]) -> str:
    """One line: loss recovered (both ablations), KL and the CEs."""
    return (f"spliced into {layer}: loss recovered {down['loss_recovered']:.3f} (zero ablation; "
            f"{down['loss_recovered_mean']:.3f} against mean ablation), KL(clean || spliced) "
            f"{down['kl_clean_spliced']:.4f} nats per byte; CE clean {down['ce_clean']:.4f}, spliced "
            f"{down['ce_spliced']:.4f}, zero-ablated {down['ce_zero_ablated']:.4f}, mean-ablated "
            f"{down['ce_mean_ablated']:.4f} nats per byte")


def run_lm_demo(cfg: LMDemoConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns the run's metrics."""
    from ..config import TrainConfig
    from ..data.activations import cache_activations, parse_positions, position_mask, resolve_layer
    from ..latent_browser import byte_token, collect_latent_records, lm_latent_codes, purity, write_latent_browser
    from ..run_files import atomic_write
    from ..runner import run_training

    cfg.check()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    recipe = cfg.lm_recipe()
    corpus = stdlib_corpus(cfg.text)
    model, info = stdlib_lm(recipe, corpus=corpus, retrain=cfg.retrain_lm, progress=cfg.progress, echo=echo)
    echo(f"language model: {info['bits_per_byte']:.3f} bits per byte on held-out files (a bigram byte model: "
         f"{info['bigram_bits_per_byte']:.3f}, a unigram one: {info['unigram_bits_per_byte']:.3f}, uniform: 8)")
    layer, _ = resolve_layer(model, cfg.layer)
    positions = parse_positions(cfg.positions)

    # 2. the activations, once per (model, layer, tokens, seed)
    kept = position_mask(positions, (1, recipe.context))
    per_window = recipe.context if kept is None else int(kept.sum())
    if per_window < 1:
        raise ValueError(f"--positions {cfg.positions} keeps no position of a window of --context {recipe.context}")
    n_windows = math.ceil(cfg.tokens / per_window)
    n_rows = n_windows * per_window
    store_dir = (Path(info["path"]) / "activations"
                 / f"{layer}-{n_rows}-seed{cfg.seed}-{cfg.positions.replace(':', '_')}")
    source = {"checkpoint": LM_SOURCE, "recipe": info["recipe"], "inputs": f"{n_windows} random windows of "
              f"{recipe.context} bytes of the training files (seed {cfg.seed})", "context": recipe.context,
              "bos": BOS}
    echo(f"activations of {layer}: {n_rows} positions, cached in {store_dir}")
    cache_activations(model, layer, _training_batches(corpus.train, recipe.context, n_windows, 32, cfg.seed),
                      store_dir, batch_size=32, positions=positions, source=source,
                      forward_kwargs={"use_cache": False}, progress=cfg.progress)

    # 3. the SAE, by actsparse train
    name = cfg.name if cfg.name is not None else _free_name(Path(cfg.out), "lm-demo", cfg.overwrite)
    if cfg.name is None and name != "lm-demo":
        echo(f"{Path(cfg.out) / 'lm-demo'} holds another run: this run is {Path(cfg.out) / name} (--name to choose)")
    tc = TrainConfig(data=f"shards:{store_dir}", recipe="sae", activation="topk", k=cfg.k, hidden=cfg.hidden,
                     epochs=cfg.epochs, batch_size=cfg.batch_size, out=cfg.out, name=name, seed=cfg.seed,
                     overwrite=cfg.overwrite, threads=cfg.threads, progress=cfg.progress)
    result = run_training(tc, echo)
    run_dir = Path(result.run_dir)
    sae = result.model.eval()

    lm_info = {"checkpoint": LM_SOURCE, "layer": layer, "recipe": info["recipe"], "text": cfg.text,
               "corpus_fingerprint": corpus.fingerprint, "eval_windows": cfg.eval_windows,
               "browser_windows": cfg.browser_windows, "positions": cfg.positions,
               **{k: info[k] for k in ("bits_per_byte", "unigram_bits_per_byte", "bigram_bits_per_byte",
                                       "uniform_bits_per_byte", "corpus")}}
    atomic_write(run_dir / LM_INFO, lambda p: p.write_text(json.dumps(lm_info, indent=2) + "\n"))

    # 4. the splice, on the first held-out windows
    evaluated, browsed = held_out_windows(lm_info, corpus)
    echo(f"splicing the SAE into {layer} on {evaluated.shape[0]} held-out windows ...")
    down = lm_downstream(model, sae, lm_info, corpus, progress=cfg.progress)

    # 5. the browser, on the next held-out windows
    records = collect_latent_records(lm_latent_codes(model, layer, sae, browsed.split(32),
                                                     positions=positions), k=20)
    pure = purity(records, browsed)
    meta = {"model": f"byte-level GPT-2, {recipe.n_layer} layers, width {recipe.n_embd} "
                     f"({info['bits_per_byte']:.2f} bits/byte held out)",
            "layer": layer, "SAE": f"TopK, {cfg.hidden} latents, k {cfg.k}",
            "FVU": f"{result.metrics['fvu']:.4f}", "loss recovered (zero ablation)": f"{down['loss_recovered']:.4f}",
            "held-out windows": f"{browsed.shape[0]} × {recipe.context} bytes (⊳ marks the BOS)"}
    page = write_latent_browser(records, run_dir / "latents.html", tokens=browsed, meta=meta,
                                title=f"Latents of {layer}", decode=lambda t: "⊳" if t == BOS else byte_token(t))

    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics |= {f"lm_{k}": v for k, v in lm_info.items() if k.endswith("bits_per_byte")}
    metrics |= downstream_record(down)
    metrics |= {f"purity_{k}": v for k, v in pure.items() if isinstance(v, (int, float))}
    atomic_write(run_dir / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    echo(describe_downstream(layer, down))
    echo(f"latents: {int((records.fire_count == 0).sum())} dead of {records.d_sae} on the held-out windows; "
         f"{pure['same_token']:.0%} have top-20 contexts that all activate on the same byte, "
         f"{pure['same_bigram']:.0%} on the same 2 bytes")
    echo(f"wrote {page}")
    return metrics
