"""TopK SAE training throughput vs peers: eai-sparsify's ``SparseCoder``, sae-lens's ``TopKTrainingSAE``.

A TopK SAE (d_in=512, d_sae=8192, k=32) trains on batches of 512 synthetic samples
(:func:`actsparse.data.make_synthetic`: sparse combinations of 16,384 random unit atoms, 32
active on average, seed 0), the same tensor for every contender. Each contender does the
same training step, driven as :mod:`peers` describes: forward, its own reconstruction loss,
backward, its own decoder-norm handling, a plain ``torch.optim.Adam`` step at the same lr.

actsparse side: ``SparseAutoencoder(d_in, d_sae, "topk", k=k, decoder="linear",
unit_norm_decoder=True, init="orthogonal_tied", recon_loss="mse")``, stepped as
``actsparse.train`` does (forward → ``out.loss.backward()`` → ``remove_parallel_gradient()`` →
Adam → ``normalize_decoder()``). ``--decode`` picks its path (default ``auto``: the sparse
TopK path here); the dense path is timed too, as ``actsparse_dense``.

Timing: the steps are timed interleaved (rounds of a few steps each, the order reversed every
round); each contender walks the same fixed sequence of batches. After the timing, every
contender is topped up (untimed) to the same total number of steps, and its FVU is measured
on a held-out slice. "The floor" is the encoder's forward matmul alone (``x @ W_encᵀ + b``,
one batch): no training step can beat it.

Reported: samples/s per contender (median over rounds, min..max), the ratio of actsparse's
samples/s to each peer's and to the faster peer's (per round, median, min..max), actsparse's
samples/s as a fraction of the floor's, and each contender's held-out FVU. A peer that is not
installed is reported as ``"not installed"``.

Run: ``/work/benchenv/bin/python bench/bench_topk_peers.py --threads 2 --rounds 5`` (the peers
live only in the benchmark's environment, see ``bench/requirements-peers.txt``); ``--smoke``
(d_in=16, d_sae=64, k=4, batch 32) finishes in seconds, with or without the peers.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, matmul_flops, parse_args, ratio, summary, time_block, topk_sae, write_result  # noqa: E402
from peers import Contender, make_saelens, make_sparsify  # noqa: E402

import actsparse  # noqa: E402
from actsparse.data import make_synthetic  # noqa: E402
from actsparse.metrics import fvu  # noqa: E402
from actsparse.train import train_step  # noqa: E402

FULL = {"d_in": 512, "d_sae": 8192, "k": 32, "batch": 512, "n_features": 16_384, "active": 32.0,
        "train_batches": 16, "heldout": 2048, "steps": 40, "min_seconds": 1.0}
SMOKE = {"d_in": 16, "d_sae": 64, "k": 4, "batch": 32, "n_features": 32, "active": 4.0,
         "train_batches": 4, "heldout": 128, "steps": 8, "min_seconds": 0.01}


def make_actsparse(d_in: int, d_sae: int, k: int, lr: float, seed: int, decode: str = "auto",
                   fused: bool = False) -> Contender:
    """actsparse's TopK SAE (``decode``: ``auto``/``dense``/``sparse``), stepped by
    ``actsparse.train.train_step`` as its trainer does."""
    model = topk_sae(d_in, d_sae, k, decode, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=fused)

    def step(x: Tensor) -> None:
        # forward, backward of the mse (no penalty, no weight decay, AuxK off), parallel-gradient
        # removal, Adam, decoder renormalisation
        train_step(model, opt, x)

    @torch.no_grad()
    def reconstruct(x: Tensor) -> Tensor:
        return model(x).reconstruction

    return Contender(step, reconstruct, actsparse.__version__,
                     f"SparseAutoencoder(topk, linear, unit_norm_decoder, orthogonal_tied, mse), decode={decode}; "
                     "remove_parallel_gradient before Adam, normalize_decoder after")


class Walker:
    """Steps a contender through the batches ``pool[0], pool[1], ...`` (cycling), counting steps.

    ``pool``: ``(n_batches, batch, d_in)``."""

    def __init__(self, contender: Contender, pool: Tensor) -> None:
        self.contender, self.pool, self.steps = contender, pool, 0

    def __call__(self) -> None:
        self.contender.step(self.pool[self.steps % len(self.pool)])
        self.steps += 1


def floor_fn(d_in: int, d_sae: int, batch: int, seed: int) -> Callable[[], object]:
    """The encoder's forward matmul alone, ``x @ W_encᵀ + b`` with x ``(batch, d_in)``, W_enc
    ``(d_sae, d_in)``: one fused addmm into a preallocated ``(batch, d_sae)``."""
    g = torch.Generator().manual_seed(seed)
    x, w, b = (torch.randn(*s, generator=g) for s in ((batch, d_in), (d_sae, d_in), (d_sae,)))
    out = torch.empty(batch, d_sae)
    return lambda: torch.addmm(b, x, w.t(), out=out)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0],
                      steps=dict(type=int, default=None,
                                 help="training steps of every contender before the FVU (default 40; smoke 8); "
                                      "raised to the most any contender did while timed"),
                      lr=dict(type=float, default=1e-3, help="Adam's learning rate, for every contender"),
                      decode=dict(choices=("auto", "dense", "sparse"), default="auto",
                                  help="actsparse's decode path, where supported (default auto)"),
                      seed=dict(type=int, default=0, help="seed of the data and of every model's init"),
                      adam=dict(choices=("fused", "plain"), default="fused",
                                help="Adam for every contender: the fused kernel (actsparse's trainer) or the "
                                     "default implementation (default fused)"))
    p = dict(SMOKE if args.smoke else FULL)
    fused = args.adam == "fused"
    d_in, d_sae, k, batch = p["d_in"], p["d_sae"], p["k"], p["batch"]

    # one fixed draw for everyone: the training batches, then the held-out slice
    n_train = p["train_batches"] * batch
    x = make_synthetic(n_train + p["heldout"], d=d_in, n_features=p["n_features"], active=p["active"],
                       seed=args.seed).x
    pool = x[:n_train].reshape(p["train_batches"], batch, d_in).contiguous()
    heldout = x[n_train:].contiguous()
    del x

    makers: dict[str, Callable[[], Contender]] = {
        "actsparse": lambda: make_actsparse(d_in, d_sae, k, args.lr, args.seed, decode=args.decode, fused=fused)}
    if args.decode != "dense":
        makers["actsparse_dense"] = lambda: make_actsparse(d_in, d_sae, k, args.lr, args.seed, decode="dense",
                                                           fused=fused)
    makers["sparsify"] = lambda: make_sparsify(d_in, d_sae, k, args.lr, args.seed, fused=fused)
    makers["sae_lens"] = lambda: make_saelens(d_in, d_sae, k, args.lr, args.seed, fused=fused)

    contenders: dict[str, Contender] = {}
    missing: dict[str, str] = {}
    for name, make in makers.items():
        try:
            contenders[name] = make()
        except ImportError as e:
            missing[name] = "not installed"
            print(f"{name}: skipped ({e})", file=sys.stderr)
    peers = [n for n in ("sparsify", "sae_lens") if n in contenders]

    walkers = {name: Walker(c, pool) for name, c in contenders.items()}
    fns: dict[str, Callable[[], object]] = {**walkers, "floor": floor_fn(d_in, d_sae, batch, args.seed)}
    times = interleaved(fns, rounds=args.rounds, min_seconds=p["min_seconds"], warmup=1)

    # the same number of steps, on the same batches, for everyone before the FVU
    total = max([args.steps or p["steps"], *(w.steps for w in walkers.values())])
    for w in walkers.values():
        while w.steps < total:
            w()
    fvus = {name: float(fvu(heldout, c.reconstruct(heldout))) for name, c in contenders.items()}

    def sps(name: str) -> dict[str, float]:
        return summary([batch / t for t in times[name]])

    results: dict[str, Any] = {
        name: {"samples_per_s": sps(name), "fvu": fvus[name], "steps": walkers[name].steps,
               "version": c.version, "how": c.notes}
        for name, c in contenders.items()}
    results.update(missing)
    # samples/s ratios: actsparse / X = X's time / actsparse's time, per round
    ratios: dict[str, Any] = {f"actsparse_over_{n}": ratio(times, n, "actsparse")
                              for n in contenders if n != "actsparse"}
    if peers:
        faster = min(peers, key=lambda n: statistics.median(times[n]))
        ratios["actsparse_over_faster_peer"] = {"peer": faster, **ratio(times, faster, "actsparse")}
    ratios["actsparse_fraction_of_floor"] = ratio(times, "floor", "actsparse")

    gflops = None if args.smoke else 2 * 2048**3 / time_block(matmul_flops(), 3) / 1e9
    payload: dict[str, Any] = {
        "_gflops": gflops,
        "problem": {"d_in": d_in, "d_sae": d_sae, "k": k, "batch": batch, "lr": args.lr,
                    "optimizer": f"Adam ({args.adam})",
                    "steps": total, "train_batches": p["train_batches"], "heldout": p["heldout"],
                    "data": f"make_synthetic(n_features={p['n_features']}, active={p['active']}, seed={args.seed})",
                    "decode": args.decode, "rounds": args.rounds,
                    "threads": torch.get_num_threads()},
        "contenders": results,
        "floor": {"what": "x @ W_enc.T + b, one batch (addmm)", "samples_per_s": sps("floor")},
        "ratios": ratios,
        "fvu_heldout": fvus,
    }
    write_result(f"topk_peers_{args.adam}_adam", payload, args)
    for name in contenders:
        s = results[name]["samples_per_s"]
        print(f"{name:16s} {s['median']:10.0f} samples/s ({s['min']:.0f}..{s['max']:.0f})  FVU {fvus[name]:.4f}",
              file=sys.stderr)
    for name in missing:
        print(f"{name:16s} not installed", file=sys.stderr)
    s = payload["floor"]["samples_per_s"]
    print(f"{'floor':16s} {s['median']:10.0f} samples/s", file=sys.stderr)
    for key, r in ratios.items():
        print(f"{key}: {r['median']:.3f} ({r['min']:.3f}..{r['max']:.3f})", file=sys.stderr)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
