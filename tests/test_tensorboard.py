"""``actsparse train --tensorboard DIR``: the event files hold what the run logged (metrics.jsonl and
metrics.json are the references), ρ̂ of the saved model, the tiled filters and the config."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actsparse.cli import main
from actsparse.data import Dataset

needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="needs tensorboard: pip install 'actsparse[tensorboard]'")

H, W, HIDDEN = 5, 7, 10  # non-square images: a transposed tile would show
RUN = ["--hidden", str(HIDDEN), "--iterations", "20", "--checkpoint-every", "10", "--no-progress", "--no-plots"]


@pytest.fixture
def images(monkeypatch):
    """200 random 5×7 "images" in [0, 1] in place of the run's data (so the filters are images)."""
    x = torch.rand(200, H * W, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr("actsparse.data.load_data", lambda cfg: Dataset(x, "test images", (H, W)))
    return x


def events(log_dir):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(log_dir), size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    return acc


def text(acc, tag: str) -> str:
    return acc.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


@needs_tensorboard
def test_event_files_hold_what_the_run_logged(tmp_path, images):
    from PIL import Image

    from actsparse.tensorboard import SCALARS
    from actsparse.train import load_checkpoint

    assert main(["train", *RUN, "--out", str(tmp_path), "--name", "tb", "--tensorboard", str(tmp_path / "tb")]) == 0
    run = tmp_path / "tb"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    acc = events(tmp_path / "tb")

    # scalars: every record of metrics.jsonl that has the key, at its step (TensorBoard stores
    # float32); a key no record has (coefficient: no --target-*) is no tag
    tags = set(acc.Tags()["scalars"])
    for key in SCALARS:
        expected = [(r["step"], float(np.float32(r[key]))) for r in records if key in r]
        if not expected:
            assert f"train/{key}" not in tags, key
            continue
        logged = [(e.step, e.value) for e in acc.Scalars(f"train/{key}")]
        assert logged == expected, key
    assert "train/val_reconstruction" in tags and "train/coefficient" not in tags

    # ρ̂ histogram at steps 10 and 20; the last one is ρ̂ of the saved model, recomputed here with
    # the full forward (the logger uses encode) on the same 200 samples
    hist = acc.Histograms("rho_hat")
    assert [h.step for h in hist] == [10, 20]
    model, _ = load_checkpoint(run)
    model.eval()
    with torch.no_grad():
        rho = model(images).code.double().mean(0)
    last = hist[-1].histogram_value
    assert last.num == HIDDEN
    assert last.sum / last.num == pytest.approx(float(rho.mean()), rel=1e-9)
    assert (last.min, last.max) == pytest.approx((float(rho.min()), float(rho.max())), rel=1e-9)

    # the filter grid: 10 tiles in 4 columns × 3 rows, 1-pixel frame; tile (r, c) holds encoder row
    # 4r + c as an h×w image scaled to its own max |w| (0 -> grey)
    imgs = acc.Images("filters")
    assert [i.step for i in imgs] == [10, 20]
    cols, rows = 4, 3
    assert (imgs[-1].width, imgs[-1].height) == (cols * (W + 1) + 1, rows * (H + 1) + 1)
    pixels = np.asarray(Image.open(io.BytesIO(imgs[-1].encoded_image_string)).convert("L"), dtype=np.float64)
    w_enc = load_file(str(run / "model.safetensors"))["W_enc"].double().numpy()
    for unit in (0, 5, 9):
        r, c = divmod(unit, cols)
        tile = pixels[1 + r * (H + 1):1 + r * (H + 1) + H, 1 + c * (W + 1):1 + c * (W + 1) + W]
        atom = w_enc[unit].reshape(H, W)
        np.testing.assert_allclose(tile, 255 * (0.5 + 0.5 * atom / np.abs(atom).max()), atol=1.01)
    assert pixels[1 + 2 * (H + 1):, 1 + 2 * (W + 1):].max() == 0  # slots 10 and 11 are empty

    # the config and the final metrics as text (indented JSON)
    config = json.loads(textwrap.dedent(text(acc, "config")))
    saved = json.loads((run / "config.json").read_text())
    assert config | {"d_in": saved["d_in"]} == saved and config["tensorboard"] == str(tmp_path / "tb")
    assert json.loads(textwrap.dedent(text(acc, "metrics"))) == json.loads((run / "metrics.json").read_text())


@needs_tensorboard
def test_tensorboard_does_not_change_the_run(tmp_path, images):
    """The runner builds the model for the logger, seeded as train() would: the same weights."""
    assert main(["train", *RUN, "--out", str(tmp_path), "--name", "a", "--tensorboard", str(tmp_path / "tb")]) == 0
    assert main(["train", *RUN, "--out", str(tmp_path), "--name", "b"]) == 0
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_tensorboard
def test_snapshots_at_each_multiple_of_every(tmp_path):
    """Records every 10 steps, every=15: snapshots at the first record at or after 15, 30, 45, 60,
    and none again at the end when the last step already has one."""
    from actsparse.models import SparseAutoencoder
    from actsparse.tensorboard import TensorBoardLogger

    model = SparseAutoencoder(6, 4)
    logger = TensorBoardLogger(tmp_path, model, torch.rand(30, 6), every=15)
    for step in range(10, 70, 10):
        logger.on_step({"step": step, "loss": 1.0 / step, "fraction_dead": float("nan")})
    logger.close({"steps": 60, "fvu": 0.5, "data": "x"})
    acc = events(tmp_path)
    assert [h.step for h in acc.Histograms("rho_hat")] == [20, 30, 50, 60]
    assert [e.step for e in acc.Scalars("train/loss")] == [10, 20, 30, 40, 50, 60]
    assert "train/fraction_dead" not in acc.Tags()["scalars"]  # NaN: left out
    assert [e.value for e in acc.Scalars("final/fvu")] == [0.5]
    assert "images" not in acc.Tags() or not acc.Tags()["images"]  # no image shape: no filters
    logger.close()  # again: nothing


def test_missing_tensorboard_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    rc = main(["train", *RUN, "--out", str(tmp_path), "--tensorboard", str(tmp_path / "tb")])
    out, err = capsys.readouterr()
    assert rc == 2
    assert err.strip().splitlines() == [
        "actsparse train: error: --tensorboard needs the tensorboard package: from a clone, in its folder: "
        "pip install -e '.[tensorboard]' (released: pip install 'actsparse[tensorboard]')"]
    assert "data:" not in out and not (tmp_path / "classic" / "metrics.jsonl").exists()  # before any work
    assert not (tmp_path / "tb").exists()
