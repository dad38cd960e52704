"""``actsparse lm-demo`` at smoke size: a tiny byte-level model on a small folder of files, the
whole pipeline (LM, cached activations, SAE run, splice, browser), and a second run that reuses
the caches."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tyro")

SMALL = ["--lm-layers", "1", "--lm-width", "16", "--context", "16", "--lm-steps", "60", "--hidden", "64", "--k", "4",
         "--tokens", "3000", "--epochs", "1", "--batch-size", "128", "--positions", "drop-first",
         "--eval-windows", "8", "--browser-windows", "16",
         "--no-progress", "--threads", "1"]


@pytest.fixture
def text(tmp_path):
    lib = tmp_path / "lib"
    for i in range(30):
        p = lib / f"pkg{i % 5}" / f"mod{i}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(f"def f{j}(x):\n    return x * {j} + {i}\n\n" for j in range(20)))
    return lib


def test_lm_demo_end_to_end(text, tmp_path, monkeypatch, capsys):
    from actsparse.cli import main

    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    args = ["lm-demo", *SMALL, "--text", str(text), "--out", str(tmp_path / "runs")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "training a byte-level GPT-2" in out and "loss recovered" in out
    run = tmp_path / "runs" / "lm-demo"
    for name in ("config.json", "model.safetensors", "metrics.json", "lm.json", "latents.html"):
        assert (run / name).is_file(), name
    m = json.loads((run / "metrics.json").read_text())
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablated", "loss_recovered", "kl_clean_spliced",
                "lm_bits_per_byte", "lm_bigram_bits_per_byte", "fvu", "l0"):
        assert key in m and math.isfinite(m[key]), key
    assert m["l0"] == pytest.approx(4, abs=1e-6)  # TopK k 4
    assert m["lm_bits_per_byte"] < 8  # learned something in 60 steps (test_lm checks learning properly)
    assert m["ce_clean"] <= m["ce_zero_ablated"]
    lm = json.loads((run / "lm.json").read_text())
    assert lm["layer"] == "transformer.h.0"

    # actsparse eval splices it again, on the same held-out windows
    assert main(["eval", str(run)]) == 0
    ev = json.loads(capsys.readouterr().out)
    for key in ("ce_clean", "ce_spliced", "loss_recovered", "loss_recovered_mean", "kl_clean_spliced"):
        assert ev[key] == pytest.approx(m[key], rel=1e-9, abs=1e-12), key

    # again: a new run folder (lm-demo-2), the model and the activations from the caches
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "loaded from" in out and "training a byte-level" not in out and "this run is" in out
    again = json.loads((tmp_path / "runs" / "lm-demo-2" / "metrics.json").read_text())
    assert again["lm_bits_per_byte"] == m["lm_bits_per_byte"]
    assert torch.equal(torch.tensor(again["fvu"]), torch.tensor(m["fvu"]))  # same seed, same data, same SAE


def test_lm_demo_bad_flags(capsys):
    from actsparse.cli import main

    assert main(["lm-demo", "--k", "80", "--hidden", "64"]) != 0
    assert "--k (80) must be at most --hidden (64)" in capsys.readouterr().err
    for bad in ("all", "0:", "5", "last"):
        assert main(["lm-demo", "--positions", bad]) != 0
        assert "--positions must be drop-first or a slice from position 1" in capsys.readouterr().err
    assert main(["lm-demo", "--lm-width", "30"]) != 0
    assert "--lm-width (30) must be a multiple of n_head (4)" in capsys.readouterr().err


def test_lm_demo_help(capsys):
    from actsparse.cli import main

    assert main(["lm-demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--hidden" in out and "standard library" in out
