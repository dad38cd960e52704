"""A run with TensorBoard logging, then its one-page HTML report.

    pip install -e '.[cli,tensorboard]'   # from a clone, in its folder
                                          # (released: pip install 'actsparse[cli,tensorboard]')
    python examples/tensorboard_and_report.py [--out runs]
    tensorboard --logdir runs/tb_example/tb        # scalars, ρ̂ histograms, the filter grid, the config

The same as the two commands
    actsparse train --name tb_example --iterations 100 --tensorboard runs/tb_example/tb
    actsparse report runs/tb_example
"""

from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.cli import main as actsparse


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs", help="folder that receives the run folder")
    p.add_argument("--iterations", type=int, default=100, help="L-BFGS iterations of the classic exercise")
    args = p.parse_args(argv)
    run = Path(args.out) / "tb_example"
    code = actsparse(["train", "--out", args.out, "--name", "tb_example", "--iterations", str(args.iterations),
                      "--samples", "4000", "--checkpoint-every", str(max(1, args.iterations // 4)),
                      "--tensorboard", str(run / "tb"), "--no-progress"])
    if code != 0:
        raise SystemExit(code)
    if actsparse(["report", str(run)]) != 0:
        raise SystemExit(2)
    print(f"open {run / 'report.html'} in a browser; tensorboard --logdir {run / 'tb'}")
    return run


if __name__ == "__main__":
    main()
