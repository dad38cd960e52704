"""The ``actsparse`` command. Parses arguments (generated from :class:`~actsparse.config.TrainConfig`
by tyro) and calls the library; bad input ends with one clear line and a non-zero exit."""

from __future__ import annotations

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
    """``actsparse train [flags]``: train and write ``runs/<name>/``."""
    tyro = _need("tyro")
    from .config import TrainConfig, load_config_file

    path, rest = _split_config_flag(argv)
    defaults = TrainConfig(**load_config_file(path)) if path else TrainConfig()
    desc = "Train a sparse autoencoder. Defaults: the classic CS294A exercise."
    cfg = tyro.cli(TrainConfig, default=defaults, args=rest, prog="actsparse train", description=desc)
    if cfg.resume:  # the run's own settings are the defaults; flags given now still win
        import json
        from pathlib import Path

        saved = Path(cfg.out) / cfg.name / "config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"nothing to resume: {saved} does not exist")
        values = json.loads(saved.read_text())
        values.pop("d_in", None)
        values.update(resume=True, config=path)
        cfg = tyro.cli(TrainConfig, default=TrainConfig(**values), args=rest, prog="actsparse train",
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


def cmd_gradcheck(argv: list[str]) -> int:
    """``actsparse gradcheck``: exits 1 if the relative difference exceeds the tolerance."""
    tyro = _need("tyro")
    import torch

    from .config import TrainConfig
    from .gradcheck import relative_gradient_error
    from .train import build_model

    a = tyro.cli(GradcheckArgs, args=argv, prog="actsparse gradcheck")
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
    import json
    from pathlib import Path

    from .data import load_data
    from .plots import write_figures
    from .train import TrainResult

    a, model, cfg = _load_run(argv, "actsparse plot")
    run = Path(a.run)
    log = run / "metrics.jsonl"
    history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    written = write_figures(run, TrainResult(model, {}, history, run), load_data(cfg))
    print(f"wrote {run}/: {', '.join(written)}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "plot": cmd_plot, "gradcheck": cmd_gradcheck}


def _usage() -> str:
    return ("usage: actsparse {train,eval,plot,gradcheck} [flags]\n"
            "  train      train a sparse autoencoder (defaults: the classic CS294A exercise)\n"
            "  eval RUN   recompute a run's metrics on its data\n"
            "  plot RUN   redraw a run's figures\n"
            "  gradcheck  numerical vs analytic gradient of the classic model in float64\n"
            "Run 'actsparse COMMAND --help' for the flags of a command.")


def main(argv: list[str] | None = None) -> int:
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
        print(f"actsparse: error: unknown command {name!r}{hint}\n{_usage()}", file=sys.stderr)
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
    except KeyboardInterrupt:
        print("actsparse: interrupted; the last checkpoint written (if any) is kept", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except (ValueError, KeyError, TypeError, OSError, _MissingExtra, RuntimeError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"actsparse {name}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # python -m actsparse.cli
    sys.exit(main())
