"""The ``actsparse`` command. Parses arguments (generated from :class:`~actsparse.config.TrainConfig`
by tyro) and calls the library; bad input ends with one clear line and a non-zero exit."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Literal

__all__ = ["main"]

EXIT_USAGE = 2


class _MissingExtra(RuntimeError):
    pass


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise _MissingExtra(
            f"the actsparse command needs {module!r}: pip install 'actsparse[cli]'"
        ) from err


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RULE = re.compile(r"^[─━\-╭╮╰╯ ]*$")


def _one_line(box: str) -> str:
    """tyro's boxed parse error as one line: the box's first section (the message), without the
    borders, plus the first suggestion of an "unrecognized options" box."""
    lines = [ln.strip().strip("│┃|").strip() for ln in _ANSI.sub("", box).splitlines()]
    lines = [ln for ln in lines if ln]
    sections: list[list[str]] = [[]]
    for ln in lines[1:] if len(lines) > 1 else lines:  # lines[0]: the top border, with the box's title
        if _RULE.match(ln):
            sections.append([])
        else:
            sections[-1].append(ln)
    sections = [sec for sec in sections if sec]
    if not sections:
        return " ".join(lines) or "invalid arguments"
    msg = re.sub(r"\s+", " ", " ".join(sections[0]))
    msg = re.sub(r"^Error parsing [A-Z]\w*: ", "", msg)  # a config class's own check: its message says it all
    msg = re.sub(r"^Error parsing (-\S+): ", r"\1: ", msg)
    msg = re.sub(r"invalid literal for int\(\) with base 10: (.*)", r"expected an integer, got \1", msg)
    msg = re.sub(r"could not convert string to float: (.*)", r"expected a number, got \1", msg)
    if len(sections) > 1 and sections[1][0].startswith("Perhaps you meant") and len(sections[1]) > 1:
        msg += f" (did you mean {sections[1][1].split()[0]}?)"
    return msg


def _parse(tyro, cls, **kwargs):
    """``tyro.cli(cls, **kwargs)``, with tyro's multi-line error box turned into one ``ValueError``
    line, so that every bad flag ends the command with one clear line on stderr (``--help`` and
    successful parses pass through unchanged)."""
    import contextlib
    import io

    buf = io.StringIO()
    failed = False
    try:
        with contextlib.redirect_stderr(buf):
            return tyro.cli(cls, **kwargs)
    except SystemExit as exit_:
        if exit_.code in (0, None):
            raise
        failed = True
        raise ValueError(_one_line(buf.getvalue())) from None
    finally:
        if not failed and buf.getvalue():
            sys.stderr.write(buf.getvalue())  # warnings printed during a successful parse


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--config FILE`` (or ``--config=FILE``) out of argv: the file supplies defaults."""
    rest, path = [], None
    args = iter(argv)
    for a in args:
        if a == "--config":
            path = next(args, None)
            if path is None:
                raise ValueError("--config needs a file name")
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
    return path, rest


def cmd_train(argv: list[str]) -> int:
    """``actsparse train [flags]``: train and write ``runs/<name>/``.

    Settings come from, lowest first: the defaults, ``--config FILE``, the flags. With ``--resume``
    the run's saved config (``config.json``, or the config its checkpoint embeds) comes first; the
    file and the flags may then change only what a resume may change (the step budget and how the
    run is kept): anything else is refused by the trainer, naming the setting."""
    tyro = _need("tyro")
    from .config import TrainConfig, load_config_file

    path, rest = _split_config_flag(argv)
    from_file = load_config_file(path) if path else {}
    desc = "Train a sparse autoencoder. Defaults: the classic CS294A exercise."
    cfg = _parse(tyro, TrainConfig, default=TrainConfig(**from_file), args=rest, prog="actsparse train",
                 description=desc)
    if cfg.resume:  # the run's own settings are the defaults; the file and the flags given now come on top
        from pathlib import Path

        from .run_files import read_run_config
        from .runner import choose_run_name

        run_dir = Path(cfg.out) / choose_run_name(cfg)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"nothing to resume: {run_dir} does not exist")
        saved, _ = read_run_config(run_dir)
        values = saved.to_dict() | from_file | {"resume": True, "overwrite": False, "config": path,
                                                 "out": cfg.out, "name": run_dir.name}
        cfg = _parse(tyro, TrainConfig, default=TrainConfig(**values), args=rest, prog="actsparse train",
                     description=desc)
    cfg.config = path
    from .runner import run_training

    run_training(cfg, echo=print)
    return 0


@dataclass
class GradcheckArgs:
    """Compare the analytic gradient with central differences (ε = 1e-4) in float64."""

    activation: Literal["sigmoid", "relu"] = "sigmoid"
    """Hidden activation. ReLU has a kink at 0: central differences across it are inexact (expect
    ~1e-5), so the 1e-9 bar is for the smooth sigmoid model."""
    penalty: str = "kl"
    """Penalty name (see actsparse.PENALTIES)."""
    target: float = 0.01
    """Target ρ of a KL penalty."""
    weight: float = 3.0
    """Penalty coefficient β."""
    weight_decay: float = 1e-4
    """λ."""
    d_in: int = 8
    """Input size of the small model checked."""
    hidden: int = 5
    """Hidden units of the small model checked."""
    samples: int = 20
    """Samples in the batch."""
    tolerance: float = 1e-9
    """Largest relative difference accepted (UFLDL's bar)."""
    seed: int = 0
    """Random seed."""

    def __post_init__(self) -> None:
        for name in ("d_in", "hidden", "samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if not 0 < self.tolerance < float("inf"):
            raise ValueError(f"--tolerance must be a finite number > 0, got {self.tolerance!r}")


def cmd_gradcheck(argv: list[str]) -> int:
    """``actsparse gradcheck``: exits 1 if the relative difference exceeds the tolerance."""
    tyro = _need("tyro")
    import torch

    from .config import TrainConfig
    from .gradcheck import relative_gradient_error
    from .train import build_model

    a = _parse(tyro, GradcheckArgs, args=argv, prog="actsparse gradcheck")
    cfg = TrainConfig(hidden=a.hidden, activation=a.activation, penalty=a.penalty, target=a.target,
                      weight=a.weight, weight_decay=a.weight_decay,
                      decoder="sigmoid" if a.activation == "sigmoid" else "linear", seed=a.seed)
    torch.manual_seed(a.seed)
    model = build_model(cfg, a.d_in).double()
    with torch.no_grad():  # non-zero biases so their gradients are checked too
        for p in (model.b_enc, model.b_dec):
            p.uniform_(-0.1, 0.1)
    x = torch.rand(a.samples, a.d_in, dtype=torch.float64) * 0.8 + 0.1
    err = relative_gradient_error(lambda: model(x).loss, list(model.parameters()), eps=1e-4)
    ok = err < a.tolerance
    print(f"gradient check ({a.activation}, {a.penalty}, float64, eps=1e-4): relative difference {err:.3e} "
          f"{'<' if ok else '>='} {a.tolerance:g} -> {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def _load_run(argv: list[str], prog: str):
    """``PROG RUN``: the one positional argument is a run folder written by ``actsparse train``."""
    from types import SimpleNamespace

    from .train import load_checkpoint

    if len(argv) != 1 or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: {prog} RUN\n  RUN  a run folder written by actsparse train, e.g. runs/classic")
            raise SystemExit(0)
        raise ValueError(f"usage: {prog} RUN (a run folder written by actsparse train, e.g. runs/classic)")
    model, cfg = load_checkpoint(argv[0])
    return SimpleNamespace(run=argv[0]), model, cfg


def cmd_eval(argv: list[str]) -> int:
    """``actsparse eval RUN``: recompute the metrics of a run on its data (same seed, same samples)."""
    import json

    from .data import load_data
    from .runner import dictionary_recovery
    from .train import evaluate

    a, model, cfg = _load_run(argv, "actsparse eval")
    data = load_data(cfg)
    m = evaluate(model, data.x)
    recovery = dictionary_recovery(model, data)
    if recovery is not None:
        m["mmcs"] = recovery
    print(json.dumps({"run": a.run, "data": data.description, **m}, indent=2))
    return 0


def cmd_plot(argv: list[str]) -> int:
    """``actsparse plot RUN``: redraw a run's figures from its weights, data and metrics.jsonl."""
    from pathlib import Path

    from .data import load_data
    from .plots import write_figures
    from .run_files import read_log
    from .train import TrainResult

    a, model, cfg = _load_run(argv, "actsparse plot")
    run = Path(a.run)
    history = read_log(run / "metrics.jsonl")  # a line a kill cut short is skipped, as train does
    written = write_figures(run, TrainResult(model, {}, history, run), load_data(cfg))
    print(f"wrote {run}/: {', '.join(written)}")
    return 0


@dataclass
class CacheArgs:
    """Run a transformer over a token stream and store one layer's activations as shards."""

    model: str = "tiny-gpt2"
    """``tiny-gpt2``: a randomly initialised GPT-2 (2 layers, width 64, 2 heads, vocabulary 256)
    built from a config and seeded by ``--seed``, nothing downloaded; or a Hugging Face checkpoint
    name or folder (``AutoModel.from_pretrained``; with HF_HUB_OFFLINE=1, local files only)."""
    layer: str = "h.0"
    """Module whose output is stored: a qualified name (``h.0``, ``h.0.mlp``; ``transformer.h.0``
    works too) or a glob that matches one module."""
    out: str = "activations"
    """Folder of the shard store (resumed if it holds an unfinished one with the same arguments)."""
    tokens: int = 65_536
    """Tokens to run through the model (whole sequences of ``--context``)."""
    context: int = 128
    """Tokens per sequence."""
    batch_size: int = 32
    """Sequences per forward."""
    positions: str = "all"
    """Positions kept: ``all``, ``last``, ``drop-first`` (drop the BOS), an integer, or a slice
    ``start:stop[:step]``."""
    shard_size: int = 65_536
    """Rows per shard."""
    dtype: Literal["float32", "float16"] = "float32"
    """Stored dtype."""
    token_file: str | None = None
    """A 1-D ``.npy`` array of token ids to read (memory-mapped); default: uniformly random tokens."""
    bos: int | None = None
    """Token id put first in every sequence (e.g. 50256 for GPT-2), or none."""
    seed: int = 0
    """Seeds the tiny model's weights and the random tokens."""
    device: str = "cpu"
    """Where the model runs (``cpu``, ``cuda``, ``cuda:1``...)."""
    overwrite: bool = False
    """Delete an existing store in ``--out`` first."""
    progress: bool = True
    """Show a progress bar (needs tqdm)."""

    def check(self) -> None:
        """Raise ``ValueError`` for values that cannot work. Called after parsing, not in
        ``__post_init__``: tyro would wrap the message in a multi-line box."""
        for name in ("tokens", "context", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.tokens < self.context:
            raise ValueError(f"--tokens ({self.tokens}) must be at least one sequence of --context ({self.context})")
        from .data.activations import parse_positions

        parse_positions(self.positions)


def cmd_cache_activations(argv: list[str]) -> int:
    """``actsparse cache-activations``: write a shard store of one layer's activations."""
    tyro = _need("tyro")
    from .data.activations import cache_model_activations

    a = _parse(tyro, CacheArgs, args=argv, prog="actsparse cache-activations")
    a.check()
    try:
        store, before = cache_model_activations(
            a.model, a.layer, a.out, tokens=a.tokens, context=a.context, batch_size=a.batch_size,
            positions=a.positions, shard_size=a.shard_size, dtype=a.dtype, token_file=a.token_file, bos=a.bos,
            seed=a.seed, device=a.device, overwrite=a.overwrite, progress=a.progress)
    except ModuleNotFoundError as err:
        raise _MissingExtra(str(err)) from err
    resumed = ("" if before is None else " (already complete)" if before.complete
               else f" (resumed after {before.n_rows} stored rows)")
    print(f"{store.n_rows} rows of {store.source['layer']} (d={store.d}, {store.dtype}) in {store.n_shards} "
          f"shards: {a.out}{resumed}")
    return 0


def cmd_report(argv: list[str]) -> int:
    """``actsparse report RUN``: write ``RUN/report.html``, one self-contained page of the run."""
    from .report import write_report

    if len(argv) != 1 or argv[0].startswith("-"):
        _load_run(argv, "actsparse report")  # prints the usage for --help, raises it otherwise
    print(f"wrote {write_report(argv[0])}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "plot": cmd_plot, "report": cmd_report, "gradcheck": cmd_gradcheck,
            "cache-activations": cmd_cache_activations}


def _usage() -> str:
    return ("usage: actsparse {train,eval,plot,report,gradcheck,cache-activations} [flags]\n"
            "  train      train a sparse autoencoder (defaults: the classic CS294A exercise)\n"
            "  eval RUN   recompute a run's metrics on its data\n"
            "  plot RUN   redraw a run's figures\n"
            "  report RUN write RUN/report.html: config, metrics, figures and units on one page\n"
            "  gradcheck  numerical vs analytic gradient of the classic model in float64\n"
            "  cache-activations  store a transformer layer's activations as shards\n"
            "Run 'actsparse COMMAND --help' for the flags of a command.")


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP outside a run's loop (where the trainer takes them over to checkpoint)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise _Terminated(signum)


_raise_terminated.actsparse = True  # type: ignore[attr-defined]  # the trainer may take it over in its loop


def _install_stop_handlers() -> None:
    """SIGTERM and SIGHUP end a command the way Ctrl-C does (one line, exit 128 + signal), instead
    of killing it silently; in main() only, so an embedding program keeps its own handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _raise_terminated)


def _interrupted(name: str, err: KeyboardInterrupt) -> int:
    """The one line and the exit status of a command stopped by a signal."""
    from .interrupt import RunInterrupted, signal_name

    if isinstance(err, RunInterrupted):
        hint = ""
        if err.checkpoint is not None:
            run = err.checkpoint.parent
            hint = f"; continue with: actsparse train --resume --out {run.parent} --name {run.name}"
        print(f"actsparse {name}: {err}{hint}", file=sys.stderr)
        return err.exit_code
    signum = err.signum if isinstance(err, _Terminated) else 2
    print(f"actsparse {name}: stopped by {signal_name(signum)}; the last checkpoint written (if any) is kept",
          file=sys.stderr)
    return 128 + signum


def main(argv: list[str] | None = None) -> int:
    _install_stop_handlers()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else EXIT_USAGE
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"actsparse {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"actsparse: error: unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)} "
              "(actsparse --help)", file=sys.stderr)
        return EXIT_USAGE
    import warnings

    def one_line_warning(message, category, filename, lineno, file=None, line=None):  # no source line
        print(f"actsparse {name}: warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line_warning
    try:
        return COMMANDS[name](rest)
    except BrokenPipeError:  # output piped into head & co.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM, SIGHUP; in a run's loop, after a checkpoint
        return _interrupted(name, err)
    except SystemExit:
        raise
    except (ValueError, KeyError, TypeError, OSError, _MissingExtra, RuntimeError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"actsparse {name}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # python -m actsparse.cli
    sys.exit(main())
