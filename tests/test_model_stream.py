"""Training an SAE straight from a model's forward (``--data model:NAME``): the blocks cover the
stream and resume from any batch, buffer-disabled training equals cache-then-train, a run stopped
mid-block resumes bit for bit, several layers share one forward per block, torchrun with 2
processes matches one process, and bad settings are one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from actsparse.checkpoint import load_latest  # noqa: E402
from actsparse.config import TrainConfig  # noqa: E402
from actsparse.data.activations import cache_activations, tiny_gpt2  # noqa: E402
from actsparse.data.model_stream import (  # noqa: E402
    ActivationBlocks,
    FileWindows,
    ModelActivationStream,
    RandomTokens,
)
from actsparse.data.shards import ShardStore  # noqa: E402
from actsparse.train import TrainingStream, train, train_together  # noqa: E402

ENV = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
CONTEXT = 16


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(0)


def _stream(model, layer="h.0", *, tokens=3000, buffer=500, **kw) -> ModelActivationStream:
    return ModelActivationStream.for_layer(model, layer, RandomTokens(256, CONTEXT, seed=1), tokens=tokens,
                                           buffer=buffer, **kw)


def _cfg(**kw) -> TrainConfig:
    base = dict(data="model:tiny-gpt2", tokens=3000, context=CONTEXT, buffer=500, hidden=32, activation="topk", k=4,
                epochs=2, batch_size=64, lr=3e-3, checkpoint_every=0, plots=False, progress=False, device="cpu")
    return TrainConfig(**(base | kw))


def _computed_blocks(stream: ModelActivationStream, monkeypatch) -> list[int]:
    """The blocks ``stream`` computes from now on (cache misses), in order."""
    seen: list[int] = []
    blocks = stream.blocks
    compute = blocks._compute_block
    monkeypatch.setattr(blocks, "_compute_block", lambda k: seen.append(k) or compute(k))
    return seen


def test_epochs_cover_the_stream_and_resume_from_any_batch(model, monkeypatch):
    """Every epoch reads each of the first whole batches' rows once (a permutation of the stream
    within blocks); skip=b yields exactly the batches from b on, computing only the blocks that
    hold them; two processes' shares of each batch make up the one-process batch."""
    s = _stream(model)
    assert isinstance(s, TrainingStream) and s.n_rows == 3000 and s.d == 64
    b = s.blocks
    assert (b.rows_per_window, b.block_windows, b.n_blocks) == (16, 31, 7)
    assert b.block_rows.tolist() == [496] * 6 + [24]  # the last block: the rows up to --tokens
    stream_rows = torch.cat([b.block(k)["h.0"] for k in range(b.n_blocks)])
    full = list(s.epoch_batches(64, seed=3, epoch=1))
    assert [i for i, _ in full] == list(range(3000 // 64)) and all(x.shape == (64, 64) for _, x in full)
    seen = torch.cat([x for _, x in full])
    order, starts = b.epoch_plan(3, 1)
    expected = torch.cat([b.block(int(k))["h.0"][torch.from_numpy(b.row_order(int(k), 3, 1))] for k in order])
    assert torch.equal(seen, expected[:seen.shape[0]])  # blocks in a drawn order, rows shuffled within each
    assert not torch.equal(seen, stream_rows[:seen.shape[0]])
    assert sorted(map(tuple, expected.tolist())) == sorted(map(tuple, stream_rows.tolist()))

    fresh = _stream(model)
    computed = _computed_blocks(fresh, monkeypatch)
    where = fresh.position(64, seed=3, epoch=1, batch=21)  # rows 1344..1407: inside the third block visited
    assert where["block"] == int(order[2]) and where["row"] == 1344 - int(starts[2])
    tail = list(fresh.epoch_batches(64, seed=3, epoch=1, skip=21))
    assert [i for i, _ in tail] == list(range(21, len(full)))
    assert all(torch.equal(x, full[i][1]) for i, x in tail)
    read = [int(k) for k, start in zip(order, starts) if start < len(full) * 64]
    assert computed == read[2:]  # the model never ran on the blocks before

    for i, (_, whole) in enumerate(full[:8]):
        parts = [dict(s.epoch_batches(64, seed=3, epoch=1, rank=r, world_size=2, skip=i))[i] for r in (0, 1)]
        assert torch.equal(torch.cat(parts), whole)


class _StoreInOrder:
    """A shard store read in store order, batch after batch (the TrainingStream of cache-then-train
    with the buffer disabled)."""

    def __init__(self, store: ShardStore) -> None:
        self.store, self.n_rows, self.d = store, store.n_rows, store.d

    def sample(self, n, *, seed=0):
        return self.store.sample(n, seed=seed)

    def epoch_batches(self, batch_size, *, seed=0, epoch=0, rank=0, world_size=1, skip=0):
        for b in range(skip, self.n_rows // batch_size):
            rows = np.arange(b * batch_size, (b + 1) * batch_size)
            yield b, self.store.read_rows(np.array_split(rows, world_size)[rank])


def test_buffer_disabled_equals_cache_then_train(model, tmp_path):
    """--buffer 0 trains on the stream in its order; caching the same rows with cache_activations
    and training on them in store order gives the same weights. The order is equal by
    construction: the cache is fed the stream's own forwards (blocks of FORWARD_BATCH windows,
    in order), so every row comes from an identical forward, and both read batch b as rows
    [b·B, (b+1)·B)."""
    s = _stream(model, buffer=0, positions="drop_first", tokens=2900)
    b = s.blocks
    assert not b.shuffle and b.rows_per_window == CONTEXT - 1
    forwards = (b.windows.take(np.arange(w, min(w + b.forward_batch, b.n_windows)))
                for w in range(0, b.n_windows, b.forward_batch))
    store = cache_activations(model, "h.0", forwards, tmp_path / "store", batch_size=b.forward_batch,
                              positions="drop_first", shard_size=1000, max_rows=s.n_rows, progress=False)
    assert store.n_rows == s.n_rows
    assert torch.equal(store.to_tensor(), torch.cat([x for _, x in s.epoch_batches(100)]))  # 2900 = 29 batches
    cfg = _cfg(tokens=2900, buffer=0, positions="drop-first", lr_decay=0.2)
    online = train(cfg, s).model.state_dict()
    cached = train(cfg, _StoreInOrder(store)).model.state_dict()
    for k in online:
        torch.testing.assert_close(online[k], cached[k], rtol=0, atol=1e-6, msg=k)


def _log(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_stopped_inside_a_block_resumes_bit_for_bit(model, tmp_path, monkeypatch):
    """Stopped after the checkpoint at step 67 (epoch 2, batch 21: inside the third block that
    epoch visits), the resumed run computes only the blocks from there on and ends on the weights
    and the log of a run never stopped."""
    cfg = _cfg(checkpoint_every=67)  # 46 batches an epoch, 92 steps
    for name in ("full", "cut"):
        (tmp_path / name).mkdir()
    train(cfg, _stream(model), run_dir=tmp_path / "full")

    def interrupt(rec):
        if rec["step"] == 70:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, _stream(model), run_dir=tmp_path / "cut", on_step=interrupt)
    state = load_latest(tmp_path / "cut")[0]
    assert (state["step"], state["epoch"], state["batch"]) == (67, 1, 21)
    resumed = _stream(model)
    computed = _computed_blocks(resumed, monkeypatch)
    train(dataclasses.replace(cfg, resume=True), resumed, run_dir=tmp_path / "cut")
    order, starts = resumed.blocks.epoch_plan(cfg.seed, 1)
    read = [int(k) for k, start in zip(order, starts) if start < 46 * 64]  # the rows after the last whole batch: not
    assert computed == read[2:]
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _log(tmp_path / "full") == _log(tmp_path / "cut")


def test_several_layers_share_one_forward_per_block(model):
    """Two layers hooked in one forward: each SAE, trained in lockstep with the other, equals the
    SAE trained alone on its layer, and the model ran as often as for one layer alone."""
    cfg = _cfg(epochs=1)
    both = ModelActivationStream.for_layers(model, ["h.0", "h.1"], RandomTokens(256, CONTEXT, seed=1), tokens=3000,
                                            buffer=500)
    assert both[0].blocks is both[1].blocks
    together = train_together([cfg, cfg], both)
    for layer, res in zip(("h.0", "h.1"), together):
        alone_stream = _stream(model, layer)
        alone = train(cfg, alone_stream)
        assert all(torch.equal(v, alone.model.state_dict()[k]) for k, v in res.model.state_dict().items()), layer
        assert both[0].blocks.forwards == alone_stream.blocks.forwards  # one pass per block for both layers
    assert together[0].metrics["fvu"] != together[1].metrics["fvu"]


def test_several_layers_stopped_by_a_signal_resume_together(model, tmp_path):
    """SIGTERM during a lockstep run: every SAE stops after the same step with a checkpoint there,
    and resuming them together ends on the weights of runs never stopped."""
    import signal

    from actsparse.interrupt import RunInterrupted

    cfg = _cfg(epochs=1)
    dirs = [tmp_path / "h0", tmp_path / "h1"]
    for d in dirs:
        d.mkdir()

    def streams():
        return ModelActivationStream.for_layers(model, ["h.0", "h.1"], RandomTokens(256, CONTEXT, seed=1),
                                                tokens=3000, buffer=500)

    def stop(i, rec):
        if i == 0 and rec["step"] == 20:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(RunInterrupted) as stopped:
        train_together([cfg, cfg], streams(), run_dirs=dirs, on_step=stop)
    assert stopped.value.step == 20 and [load_latest(d)[0]["step"] for d in dirs] == [20, 20]
    resumed = train_together([dataclasses.replace(cfg, resume=True)] * 2, streams(), run_dirs=dirs)
    for res, whole in zip(resumed, train_together([cfg, cfg], streams())):
        assert all(torch.equal(v, whole.model.state_dict()[k]) for k, v in res.model.state_dict().items())


def _cli(*args: str, n: int = 1) -> subprocess.CompletedProcess:
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 \
        else [sys.executable]
    return subprocess.run([*run, "-m", "actsparse", *args], capture_output=True, text=True, timeout=240, env=ENV)


def test_torchrun_two_processes_match_one(tmp_path):
    """torchrun with 2 processes (each computes every block, trains on its half of each batch)
    ends on the weights and metrics of one process."""
    args = ["train", "--data", "model:tiny-gpt2", "--tokens", "4096", "--context", "32", "--buffer", "1000",
            "--hidden", "64", "--activation", "topk", "--k", "4", "--epochs", "2", "--batch-size", "128",
            "--no-progress", "--no-plots", "--threads", "1", "--out", str(tmp_path)]
    one = _cli(*args, "--name", "one")
    assert one.returncode == 0, one.stderr
    two = _cli(*args, "--name", "two", n=2)
    assert two.returncode == 0, two.stderr
    assert "2 processes" in two.stdout and "streamed from the model" in two.stdout
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("one", "two"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    ma, mb = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert mb["processes"] == 2 and mb["steps"] == ma["steps"] == 64
    assert mb["fvu"] == pytest.approx(ma["fvu"], rel=1e-4)


def test_a_token_file_is_read_in_consecutive_windows(model, tmp_path):
    ids = np.arange(1000, dtype=np.int32) % 256
    w = FileWindows(ids, 10, bos=7)
    assert w.n_windows == 111 and w.take(np.array([2, 0])).tolist() == [[7, *range(18, 27)], [7, *range(0, 9)]]
    with pytest.raises(ValueError, match="needs 112 windows of 10 tokens, but there are 111"):
        ActivationBlocks(model, ["h.0"], w, tokens=112 * 9, positions="drop_first")  # 9 rows a window


def _error(capsys, *args: str) -> str:
    from actsparse.cli import main

    assert main(["train", *args, "--no-progress", "--no-plots", "--threads", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_settings_are_one_line_errors(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = ["--out", str(tmp_path)]
    assert "--layer applies to --data model:NAME" in _error(capsys, "--layer", "h.1", *out)
    assert "--tokens 100 is fewer positions than one --batch-size 256" in _error(
        capsys, "--data", "model:tiny-gpt2", "--tokens", "100", *out)
    assert "did you mean model:tiny-gpt2?" in _error(capsys, "--data", "model:tiny-gtp2", *out)
    msg = _error(capsys, "--data", "model:tiny-gpt2", "--layer", "h.9", "--tokens", "1000", *out)
    assert "no module named 'h.9'" in msg and "'h.0'" in msg
    assert "exceeds the 1024 positions" in _error(capsys, "--data", "model:tiny-gpt2", "--context", "2000", *out)
    assert "the BOS of model:stdlib-lm is byte 0" in _error(capsys, "--data", "model:stdlib-lm", "--bos", "5", *out)
    assert "keeps no position" in _error(capsys, "--data", "model:tiny-gpt2", "--positions", "20:", "--context",
                                         "16", "--tokens", "1000", *out)
    np.save(tmp_path / "ids.npy", np.arange(300) % 256)
    assert "there are 20 (consecutive windows" in _error(capsys, "--data", "model:tiny-gpt2", "--token-file",
                                                         str(tmp_path / "ids.npy"), "--context", "16", "--bos", "0",
                                                         "--tokens", "1000", *out)
    assert not list(tmp_path.glob("*/config.json"))  # nothing ran


def test_a_hugging_face_folder_with_an_lm_head_trains(tmp_path, capsys, monkeypatch):
    """``model:FOLDER``: a ``GPT2LMHeadModel`` saved with ``save_pretrained`` (built from a config:
    nothing downloaded) is loaded, ``h.1`` finds its ``transformer.h.1`` block, and a TopK SAE
    trains on its activations for the planned steps (FVU below 1 at L0 4)."""
    import transformers

    from actsparse.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "lm")
    args = ["train", "--data", f"model:{tmp_path / 'lm'}", "--layer", "h.1", "--context", "16", "--tokens", "3000",
            "--activation", "topk", "--k", "4", "--hidden", "64", "--epochs", "2", "--batch-size", "100",
            "--no-plots", "--no-progress", "--threads", "1", "--out", str(tmp_path / "runs")]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "h.1" in out and "(d=32)" in out
    m = json.loads((tmp_path / "runs" / "sae" / "metrics.json").read_text())
    assert m["steps"] == 60 and m["l0"] == pytest.approx(4) and 0 < m["fvu"] < 1


def test_stdlib_lm_streams_its_training_windows(tmp_path, monkeypatch):
    """``model:stdlib-lm``: the byte-level LM (here a tiny recipe on a small folder), hooked at
    ``h.0`` (its ``transformer.h.0``), over random windows of its training files led by BOS 0,
    which --positions drop-first leaves out."""
    import functools

    import actsparse.lm as lm
    from actsparse.data import load_data

    lib = tmp_path / "lib"
    for i in range(12):
        (lib / f"m{i}.py").parent.mkdir(parents=True, exist_ok=True)
        (lib / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}  # comment {i}\n" * 20)
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    corpus = lm.stdlib_corpus(lib, validation=0.2)
    recipe = lm.LMRecipe(n_layer=1, n_embd=16, n_head=2, context=16, steps=5, eval_windows=4)
    monkeypatch.setattr(lm, "stdlib_corpus", lambda: corpus)
    monkeypatch.setattr(lm, "stdlib_lm", functools.partial(lm.stdlib_lm, recipe))
    cfg = TrainConfig(data="model:stdlib-lm", context=16, tokens=600, batch_size=64, buffer=200)
    assert (cfg.bos, cfg.positions) == (0, "drop-first")
    data = load_data(cfg)
    s = data.stream
    assert s.layer == "transformer.h.0" and s.d == 16 and data.x.shape == (600, 16)
    assert s.blocks.rows_per_window == 15 and "random offsets of its training files" in data.description
    windows = s.blocks.windows.take(np.arange(5))
    assert (windows[:, 0] == 0).all() and (windows[:, 1:] != 0).any()
    assert train(dataclasses.replace(cfg, epochs=1, plots=False, progress=False), s).metrics["steps"] == 9


@pytest.mark.slow
def test_bench_model_stream_rss_smoke(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_model_stream_rss.py"
    r = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path / "rss.json")],
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "rss.json").read_text())
    assert len(result["runs"]) == 2 and result["peak_rss_ratio"] < 1.25
