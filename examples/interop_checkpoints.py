"""Train a TopK SAE with actsparse, hand it to sparsify and SAELens, and read it back.

    python examples/interop_checkpoints.py                 # a few seconds; writes to a temporary folder
    python examples/interop_checkpoints.py --out ckpts     # keep the folders

1. A TopK SAE (d_in 32, d_sae 256, k 8) is trained on synthetic sparse ground-truth data with
   ``actsparse.train.train`` (Adam, 5 epochs), which writes an actsparse run folder.
2. It is saved as an eai-sparsify folder (``cfg.json`` + ``sae.safetensors``) and as a SAELens
   folder (``cfg.json`` + ``sae_weights.safetensors``) with :mod:`actsparse.interop`.
3. Every folder is read back with ``load_sae``, which tells the layouts apart, and the codes and
   reconstructions are compared with the trained model's on held-out data.
4. If eai-sparsify or sae-lens is installed, their own loaders read our folders and their models'
   outputs are compared too (the packages are optional: nothing here needs them).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import torch

from actsparse.config import TrainConfig
from actsparse.data.synthetic import make_synthetic
from actsparse.interop import detect_layout, load_sae, save_saelens, save_sparsify
from actsparse.train import train


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for the checkpoints (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the model is small: 1 is fastest)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        return run(args.out or Path(tmp))


def run(out: Path) -> dict[str, float]:
    data = make_synthetic(6000, d=32, n_features=128, active=4.0, seed=0)
    x, x_test = data.x[:5000], data.x[5000:]
    cfg = TrainConfig(hidden=256, activation="topk", k=8, decoder="linear", penalty=None, weight_decay=0.0,
                      optimizer="adam", epochs=5, batch_size=256, lr=3e-3, validation=0.0, seed=0,
                      plots=False, progress=False, checkpoint_every=0, overwrite=True)  # a rerun replaces it
    run_dir = out / "actsparse-run"
    run_dir.mkdir(parents=True, exist_ok=True)
    model = train(cfg, x, run_dir=run_dir).model.eval()

    save_sparsify(model, out / "sparsify")
    save_saelens(model, out / "saelens", metadata={"model_name": "synthetic", "hook_name": "x"})

    diffs = {}
    with torch.no_grad():
        code, recon = model.encode(x_test), model.decode(model.encode(x_test))
        fvu = float((x_test - recon).square().sum() / (x_test - x_test.mean(0)).square().sum())
        print(f"trained: FVU {fvu:.3f} on held-out data, L0 {float((code != 0).sum(1).double().mean()):.1f}")
        print(f"{'folder':<14} {'layout':<10} {'max |Δ code|':>13} {'max |Δ recon|':>14}")
        for name in ("actsparse-run", "sparsify", "saelens"):
            loaded = load_sae(out / name)
            c = loaded.encode(x_test)
            diffs[name] = max(max_diff(c, code), max_diff(loaded.decode(c), recon))
            print(f"{name:<14} {detect_layout(out / name):<10} {max_diff(c, code):13.2e} "
                  f"{max_diff(loaded.decode(c), recon):14.2e}")

        if importlib.util.find_spec("sparsify") is not None:
            from sparsify import SparseCoder

            coder = SparseCoder.load_from_disk(out / "sparsify")
            acts, idx, _ = coder.encode(x_test)
            theirs = torch.zeros_like(code).scatter(-1, idx, acts)
            diffs["sparsify package"] = max(max_diff(theirs, code), max_diff(coder.decode(acts, idx), recon))
            print(f"{'SparseCoder':<14} {'(package)':<10} {max_diff(theirs, code):13.2e} "
                  f"{max_diff(coder.decode(acts, idx), recon):14.2e}")
        if importlib.util.find_spec("sae_lens") is not None:
            from sae_lens import SAE

            sae = SAE.load_from_disk(out / "saelens")
            c = sae.encode(x_test)
            diffs["sae_lens package"] = max(max_diff(c, code), max_diff(sae.decode(c), recon))
            print(f"{type(sae).__name__:<14} {'(package)':<10} {max_diff(c, code):13.2e} "
                  f"{max_diff(sae.decode(c), recon):14.2e}")
    return diffs


if __name__ == "__main__":
    main()
