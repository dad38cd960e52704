"""The ``actsparse`` command. Parses arguments (generated from :class:`~actsparse.config.TrainConfig`
by tyro) and calls the library; bad input ends with one clear line and a non-zero exit."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Literal

from . import interrupt as _interrupt  # the standard library only: no torch at start

__all__ = ["main"]

EXIT_USAGE = 2


class _MissingExtra(RuntimeError):
    pass


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        from .config import install_hint

        raise _MissingExtra(f"the actsparse command needs {module!r}: {install_hint('cli')}") from err


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
    msg = re.sub(r"no type matching \{None\}\|(\w+) could be instantiated from \[(.*?)\]\..*",
                 lambda m: f"expected {_KINDS.get(m.group(1), m.group(1))} or None, got {m.group(2)}", msg)
    if len(sections) > 1 and sections[1][0].startswith("Perhaps you meant") and len(sections[1]) > 1:
        import difflib

        options = [o for o in sections[1][1].replace(",", " ").split() if o.startswith("-")]  # --plots, --no-plots
        bad = re.search(r"Unrecognized options: ([^,\s]+)", msg)
        close = difflib.get_close_matches(bad.group(1), options, n=1, cutoff=0) if bad and options else options
        if close:
            msg += f" (did you mean {close[0]}?)"
    return msg


_KINDS = {"INT": "an integer", "FLOAT": "a number", "STR": "a string"}


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


# ------------------------------------------------------------------------------------------- --help
# tyro parses the flags; the help is drawn here, from the same dataclass fields and docstrings, so
# that it can be grouped (TrainConfig stays flat: config.json and TrainConfig(hidden=...) keep
# their shape), rendered as plain text, and list every choice and one default per flag.

_RST_ROLE = re.compile(r":[\w:]+:`~?([^`]+)`")


def _plain(text: str) -> str:
    """A docstring as one paragraph of plain text: no RST markup (``x``, :class:`~a.B`)."""
    text = _RST_ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return " ".join(text.replace("``", "").split())


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of the dataclass ``cls`` (the strings tyro reads too)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # no source (a frozen install): help without the texts
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _show_default(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return str(value)


def _help_text(cls: type, default: object, prog: str, description: str, epilog: str = "",
               groups: dict[str, tuple[str, ...]] | None = None, choices: dict[str, list[str]] | None = None,
               metavars: dict[str, str] | None = None, none_means: dict[str, str] | None = None) -> str:
    """The ``--help`` of a command whose flags tyro generates from the dataclass ``cls``: the flags
    in ``groups`` (heading -> field names; fields left out go to a last "other" group), each with its
    choices (``Literal`` fields, or ``choices``), its docstring as plain text and one default (the
    field's value in ``default``; a docstring that says "Default:" itself keeps its own)."""
    import argparse
    import dataclasses
    import shutil
    import textwrap
    import types
    import typing

    width = max(40, min(shutil.get_terminal_size().columns, 100) - 2)
    choices, metavars, none_means = choices or {}, metavars or {}, none_means or {}
    fields = [f.name for f in dataclasses.fields(cls)]
    grouped = groups is not None
    groups = dict(groups or {"flags": tuple(fields)})
    left = [f for f in fields if not any(f in names for names in groups.values())]
    if left:
        groups["other"] = tuple(left)
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    field_defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    def fill(text: str) -> str:  # wrap the paragraphs; one with indented lines (examples) stays as written
        return "\n\n".join(par if "\n " in par else textwrap.fill(par, width) for par in text.split("\n\n"))

    parser = argparse.ArgumentParser(
        prog=prog, usage=f"{prog} [-h] [FLAGS]", description=fill(description), epilog=fill(epilog) or None,
        add_help=False, formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
            prog, max_help_position=26, width=width))
    for i, (heading, names) in enumerate(groups.items()):
        if i == 0:  # -h under "help:" above the groups, or first of the one group "flags:"
            first = parser.add_argument_group("help") if grouped else parser.add_argument_group(heading)
            first.add_argument("-h", "--help", action="store_true", help="Show this help and exit.")
        group = first if i == 0 and not grouped else parser.add_argument_group(heading)
        for name in names:
            flag = "--" + name.replace("_", "-")
            kind = hints[name]
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            optional = typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1
            if optional:
                kind = args[0]  # X | None: the flag takes an X
            doc = _plain(docs.get(name, ""))
            value = getattr(default, name)
            if "Default:" in doc and value is not None and value != field_defaults.get(name, value):
                doc = doc[:doc.index("Default:")].rstrip()  # a config file's value replaces the rule
            if "Default:" not in doc:
                shown = none_means.get(name, "none") if value is None else _show_default(value)
                doc = f"{doc} Default: {shown}.".strip()
            if kind is bool and optional:  # bool | None (a recipe's default): tyro takes --flag True|False
                group.add_argument(flag, metavar="{True,False}", help=doc)
                continue
            if kind is bool:
                group.add_argument(flag, f"--no-{flag[2:]}", action="store_true", help=doc)
                continue
            nargs = None
            if typing.get_origin(kind) is tuple:  # tuple[int, ...]: --sizes 80 40 4
                nargs, kind = "+", typing.get_args(kind)[0]
            if name in choices:
                metavar = "{" + ",".join(choices[name]) + "}"
            elif typing.get_origin(kind) is typing.Literal:
                metavar = "{" + ",".join(map(str, typing.get_args(kind))) + "}"
            else:
                metavar = metavars.get(name) or {int: "INT", float: "FLOAT"}.get(kind, "STR")
            group.add_argument(flag, metavar=metavar, nargs=nargs, help=doc)
    return parser.format_help()


def _wants_help(argv: list[str]) -> bool:
    args = argv[:argv.index("--")] if "--" in argv else argv
    return any(a in ("-h", "--help") for a in args)


_TRAIN_DESCRIPTION = (
    "Train a sparse autoencoder and write its config, weights, metrics and figures to OUT/NAME "
    "(runs/classic by default). The defaults are the classic exercise of Ng's CS294A notes: "
    "10,000 8×8 natural-image patches, a 64-25-64 sigmoid autoencoder, KL penalty with ρ = 0.01 "
    "and β = 3, weight decay 1e-4, 400 L-BFGS iterations.\n\n"
    "Settings come from, lowest first: the defaults, --config FILE, the flags. A flag whose "
    "default is none takes the word None to unset a value a config file gave.")

_TRAIN_EPILOG = (
    "examples:\n"
    "  actsparse train --data digits --hidden 64 --name digits\n"
    "  actsparse train --data synthetic --activation topk --k 8 --decoder linear \\\n"
    "      --penalty none --optimizer adam --hidden 256\n"
    "  actsparse train --activation relu --decoder linear \\\n"
    "      --penalty frequency_kl --target 0.1 --bandwidth 0.3\n"
    "  actsparse train --resume --name digits --iterations 800")


def train_help(default: object = None) -> str:
    """``actsparse train --help``: TrainConfig's flags in groups, at the terminal's width."""
    from .config import FIELD_GROUPS, NONE_MEANS, TrainConfig
    from .penalties import PENALTIES

    return _help_text(
        TrainConfig, default if default is not None else TrainConfig(), "actsparse train", _TRAIN_DESCRIPTION,
        _TRAIN_EPILOG, groups=FIELD_GROUPS, choices={"penalty": [*PENALTIES, "none"]},
        metavars={"data": "SOURCE", "out": "DIR", "name": "NAME", "config": "FILE", "tensorboard": "DIR",
                  "device": "DEVICE", "layer": "MODULE", "token_file": "FILE", "positions": "WHICH"},
        none_means=NONE_MEANS)


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


def _train_defaults(values: dict):
    """``TrainConfig(**values)`` (checked) as the defaults under the flags, with the fields whose
    default depends on other settings (``TrainConfig.RECIPE_FIELDS``: weight decay, target) left
    None unless ``values`` gives them, so that ``--data digits`` on the command line still gets
    its own recipe's values."""
    from .config import TrainConfig

    cfg = TrainConfig(**values)
    for name in TrainConfig.RECIPE_FIELDS:
        if name not in values or values[name] is None and name not in TrainConfig.UNRESOLVED:
            setattr(cfg, name, TrainConfig.UNRESOLVED.get(name))
    return cfg


def cmd_train(argv: list[str]) -> int:
    """``actsparse train [flags]``: train and write ``runs/<name>/``.

    Settings come from, lowest first: the defaults, ``--config FILE``, the flags. With ``--resume``
    the run's saved config (``config.json``, or the config its checkpoint embeds) comes first; the
    file and the flags may then change only what a resume may change (the step budget and how the
    run is kept): anything else is refused by the trainer, naming the setting."""
    from .config import TrainConfig, load_config_file

    path, rest = _split_config_flag(argv)
    from_file = load_config_file(path) if path else {}
    if _wants_help(rest):  # the defaults shown are those of the file, if one is given
        print(train_help(_train_defaults(from_file)), end="")
        return 0
    tyro = _need("tyro")
    desc = "Train a sparse autoencoder. Defaults: the classic CS294A exercise."
    cfg = _parse(tyro, TrainConfig, default=_train_defaults(from_file), args=rest, prog="actsparse train",
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
    """Penalty name (a name of ``actsparse.PENALTIES``, or ``none``)."""
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

    if _wants_help(argv):
        from .penalties import PENALTIES

        print(_help_text(GradcheckArgs, GradcheckArgs(), "actsparse gradcheck", _plain(GradcheckArgs.__doc__ or ""),
                         choices={"penalty": [*PENALTIES, "none"]}), end="")
        return 0
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
    from .evaluation import ground_truth_metrics, prefix_report
    from .train import evaluate

    a, model, cfg = _load_run(argv, "actsparse eval")
    data = load_data(cfg)
    m = evaluate(model, data.x)
    gt = ground_truth_metrics(model, data, cfg.seed)
    if gt is not None:
        m |= gt
    m |= prefix_report(model, data.x)
    m |= _lm_run_metrics(a.run, model)
    print(json.dumps({"run": a.run, "data": data.description, **m}, indent=2))
    return 0


def _lm_run_metrics(run: str, model) -> dict:
    """For a run of ``actsparse lm-demo`` (it holds ``lm.json``): the SAE spliced into its language
    model on the run's held-out windows (loss recovered, KL, the CEs); else nothing."""
    import sys

    from .lm.demo import downstream_record, lm_downstream, load_lm_run

    try:
        loaded = load_lm_run(run, echo=lambda line: print(line, file=sys.stderr))
    except ModuleNotFoundError as err:
        raise _MissingExtra(str(err)) from err
    if loaded is None:
        return {}
    lm, corpus, lm_info = loaded
    return downstream_record(lm_downstream(lm, model.eval(), lm_info, corpus))


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
    """A 1-D ``.npy`` array of token ids to read (memory-mapped). Default: uniformly random tokens."""
    bos: int | None = None
    """Token id put first in every sequence (e.g. 50256 for GPT-2)."""
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

    if _wants_help(argv):
        print(_help_text(CacheArgs, CacheArgs(), "actsparse cache-activations", _plain(CacheArgs.__doc__ or ""),
                         metavars={"model": "NAME", "layer": "MODULE", "out": "DIR", "positions": "WHICH",
                                   "token_file": "FILE", "device": "DEVICE"}), end="")
        return 0
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


def cmd_lm_demo(argv: list[str]) -> int:
    """``actsparse lm-demo``: a TopK SAE on a byte-level GPT-2 trained on the standard library."""
    tyro = _need("tyro")
    from .lm.demo import LMDemoConfig, run_lm_demo

    doc = ("Train (once, then cached) a byte-level GPT-2 on the Python standard library, a TopK SAE on one of "
           "its layers, splice the SAE into the model on held-out files (loss recovered, KL) and write a run "
           "folder with metrics, figures and a latent browser (latents.html). Nothing is downloaded.")
    if _wants_help(argv):
        print(_help_text(LMDemoConfig, LMDemoConfig(), "actsparse lm-demo", doc,
                         metavars={"layer": "MODULE", "out": "DIR", "name": "NAME"}), end="")
        return 0
    a = _parse(tyro, LMDemoConfig, args=argv, prog="actsparse lm-demo")
    a.check()
    try:
        run_lm_demo(a)
    except ModuleNotFoundError as err:
        raise _MissingExtra(str(err)) from err
    return 0


def cmd_report(argv: list[str]) -> int:
    """``actsparse report RUN``: write ``RUN/report.html``, one self-contained page of the run."""
    from .report import write_report

    if len(argv) != 1 or argv[0].startswith("-"):
        _load_run(argv, "actsparse report")  # prints the usage for --help, raises it otherwise
    print(f"wrote {write_report(argv[0])}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "plot": cmd_plot, "report": cmd_report, "gradcheck": cmd_gradcheck,
            "cache-activations": cmd_cache_activations, "lm-demo": cmd_lm_demo}


def _usage() -> str:
    return ("usage: actsparse {train,eval,plot,report,gradcheck,cache-activations,lm-demo} [flags]\n"
            "  train      train a sparse autoencoder (defaults: the classic CS294A exercise)\n"
            "  eval RUN   recompute a run's metrics on its data\n"
            "  plot RUN   redraw a run's figures\n"
            "  report RUN write RUN/report.html: config, metrics, figures and units on one page\n"
            "  gradcheck  numerical vs analytic gradient of the classic model in float64\n"
            "  cache-activations  store a transformer layer's activations as shards\n"
            "  lm-demo    an SAE on a byte-level GPT-2 trained on the Python standard library, spliced back in\n"
            "Run 'actsparse COMMAND --help' for the flags of a command.")


_Terminated = _interrupt.Stopped


def _raise_terminated(signum, frame) -> None:
    """SIGINT, SIGTERM, SIGHUP outside a run's loop: stop with one line. Inside an import the
    signal is only noted (see actsparse.interrupt.in_import) and acted on at the next safe point:
    the data loaded, the training loop, or the command's end."""
    _interrupt.note_pending(signum)
    if _interrupt.in_import(frame):
        return
    _interrupt.take_pending()
    raise _Terminated(signum)


_raise_terminated.actsparse = True  # type: ignore[attr-defined]  # the trainer may take it over in its loop


def _install_stop_handlers() -> dict:
    """SIGTERM and SIGHUP end a command the way Ctrl-C does (one line, exit 128 + signal), instead
    of killing it silently; for the length of main() only (the handlers it replaced are returned,
    and main() puts them back), so an embedding program keeps its own."""
    import signal
    import threading

    saved: dict = {}
    if threading.current_thread() is not threading.main_thread():
        return saved
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        # Ctrl-C too: Python's own handler raises a plain KeyboardInterrupt, which a library that
        # swallows exceptions around an import would lose; ours also notes the signal
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            saved[sig] = signal.signal(sig, _raise_terminated)
    return saved


def _interrupted(name: str, err: KeyboardInterrupt) -> int:
    """The one line and the exit status of a command stopped by a signal."""
    from .interrupt import RunInterrupted, signal_name

    _interrupt.take_pending()  # handled here: nothing left for later

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
    import signal

    saved = _install_stop_handlers()
    try:
        code = _main(argv)
        late = _interrupt.take_pending()
        if late is not None and code == 0:  # a signal that a library swallowed: still one line and 128 + signal
            args = sys.argv[1:] if argv is None else argv
            return _interrupted(args[0] if args else "", _Terminated(late))
        return code
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
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
        late = _interrupt.take_pending()
        if late is not None:  # the error followed a signal that interrupted an import: report the signal
            return _interrupted(name, _Terminated(late))
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"actsparse {name}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # python -m actsparse.cli
    sys.exit(main())
