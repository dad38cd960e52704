"""The standard-library corpus and the byte-level GPT-2: splits, baselines against a plain-Python
count, the loss against a hand computation, determinism, and the cache."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from actsparse.lm import corpus as C
from actsparse.lm.corpus import BOS, ngram_bits_per_byte, stdlib_corpus, training_windows, validation_windows

TEXT = {  # a small "library": enough files that both splits get some at validation=0.3
    f"pkg{i // 4}/mod{i}.py": (f"def f{i}(x):\n    return x + {i}\n\n# comment {i}\0\n" * (i % 3 + 1))
    for i in range(24)
}


@pytest.fixture
def root(tmp_path):
    for rel, text in TEXT.items():
        p = tmp_path / "lib" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (tmp_path / "lib" / "site-packages").mkdir()
    (tmp_path / "lib" / "site-packages" / "thirdparty.py").write_text("import this\n")
    (tmp_path / "lib" / "notes.txt").write_text("not python\n")
    return tmp_path / "lib"


def test_corpus_holds_whole_files_in_two_splits(root):
    c = stdlib_corpus(root, validation=0.3)
    assert sorted(c.train_files + c.validation_files) == sorted(TEXT)  # no site-packages, no .txt
    assert c.train_files and c.validation_files and not set(c.train_files) & set(c.validation_files)
    # each split is its files' bytes (NUL dropped), each followed by one separator, in sorted order
    for stream, files in ((c.train, c.train_files), (c.validation, c.validation_files)):
        expected = b"".join(TEXT[f].replace("\0", "").encode() + b"\0" for f in sorted(files))
        assert stream.tobytes() == expected
    # the split depends on the path alone: the same files are held out with a subset of the library
    again = stdlib_corpus(root, validation=0.3)
    assert again.validation_files == c.validation_files and again.fingerprint == c.fingerprint


def test_corpus_bad_input(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        stdlib_corpus(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .py files"):
        stdlib_corpus(tmp_path / "empty")
    with pytest.raises(ValueError, match="validation"):
        stdlib_corpus(root, validation=1.5)
    one = stdlib_corpus(root, validation=1e-9)  # a tiny share still holds out one file
    assert len(one.validation_files) == 1 and len(one.train_files) == len(TEXT) - 1
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "a.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="both splits"):
        stdlib_corpus(tmp_path / "single")


def test_the_real_standard_library_is_a_corpus():
    c = stdlib_corpus(max_bytes=2_000_000)
    assert c.train.shape[0] + c.validation.shape[0] >= 2_000_000
    assert not np.any(c.train[:-1][c.train[:-1] == BOS] != BOS)  # trivially true; the real check:
    assert set(np.flatnonzero(c.train == BOS) + 1) <= set(range(c.train.shape[0] + 1))
    assert int((c.train == BOS).sum()) == len(c.train_files)  # one separator per file, no NUL in text


def _reference_bits(train: bytes, val: bytes, order: int) -> float:
    """Add-one smoothed n-gram bits per byte, counted with Counters (separators not scored)."""
    uni = Counter(train)
    n = len(train)
    pairs = Counter(zip(train, train[1:]))
    ctx = Counter(train[:-1])
    total, count = 0.0, 0
    for i, b in enumerate(val):
        if b == BOS:
            continue
        if order == 1 or i == 0:
            p = (uni[b] + 1) / (n + 256)
        else:
            a = val[i - 1]
            p = (pairs[(a, b)] + 1) / (ctx[a] + 256)
        total -= math.log2(p)
        count += 1
    return total / count


@pytest.mark.parametrize("order", [1, 2])
def test_ngram_baselines_match_plain_counting(root, order):
    c = stdlib_corpus(root, validation=0.3)
    ours = ngram_bits_per_byte(c, order)
    ref = _reference_bits(c.train.tobytes(), c.validation.tobytes(), order)
    assert ours == pytest.approx(ref, rel=1e-12)
    assert 0 < ours < 8


def test_windows():
    stream = np.arange(1, 101, dtype=np.uint8)
    w = validation_windows(stream, 10)
    assert w.shape == (11, 10) and w.dtype == torch.int64
    assert torch.all(w[:, 0] == BOS)
    assert w[:, 1:].reshape(-1).tolist() == list(range(1, 100))  # consecutive, non-overlapping
    assert validation_windows(stream, 10, 3).shape == (3, 10)
    g = torch.Generator().manual_seed(0)
    t = training_windows(stream, 10, 64, g)
    assert t.shape == (64, 10) and torch.all(t[:, 0] == BOS)
    starts = t[:, 1] - 1
    assert torch.all(t[:, 1:] == starts[:, None] + torch.arange(1, 10)[None] )  # a contiguous slice each
    assert torch.equal(t, training_windows(stream, 10, 64, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="fewer than a window"):
        validation_windows(stream[:5], 10)


def test_next_byte_loss_by_hand():
    from actsparse.lm.byte_lm import next_byte_loss

    ids = torch.tensor([[BOS, 65, BOS]])  # predict 65 from BOS; the prediction of the separator is not scored
    logits = torch.zeros(1, 3, 256)
    logits[0, 0, 65] = 2.0
    s, n = next_byte_loss(logits, ids)
    expected = -(2.0 - math.log(math.exp(2.0) + 255))
    assert n == 1 and float(s) == pytest.approx(expected, rel=1e-6)


class _Uniform(nn.Module):
    def forward(self, ids, use_cache=False):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.zeros(*ids.shape, 256))


def test_a_uniform_model_scores_8_bits():
    from actsparse.lm.byte_lm import bits_per_byte

    w = validation_windows(np.arange(1, 250, dtype=np.uint8), 16)
    assert bits_per_byte(_Uniform(), w) == pytest.approx(8.0, rel=1e-6)


TINY = dict(n_layer=1, n_embd=16, n_head=2, context=16, batch_size=8, steps=40, warmup=5, lr=1e-2, eval_windows=20)


def test_training_learns_and_is_deterministic(root):
    pytest.importorskip("transformers")
    from actsparse.lm.byte_lm import LMRecipe, bits_per_byte, build_byte_gpt2, train_byte_lm

    c = stdlib_corpus(root, validation=0.3)
    recipe = LMRecipe(**TINY)
    val = validation_windows(c.validation, recipe.context)
    before = bits_per_byte(build_byte_gpt2(recipe), val)
    a = train_byte_lm(c, recipe, progress=False)
    b = train_byte_lm(c, recipe, progress=False)
    after = bits_per_byte(a, val)
    assert after < before - 2.0, (before, after)  # this text is very regular
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not a.training


def test_cache_trains_once_and_survives_damage(root, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from actsparse.lm import byte_lm

    c = stdlib_corpus(root, validation=0.3)
    recipe = byte_lm.LMRecipe(**TINY)
    said: list[str] = []
    m1, info = byte_lm.stdlib_lm(recipe, corpus=c, cache_dir=tmp_path / "cache", progress=False, echo=said.append)
    assert "training" in said[0]
    folder = tmp_path / "cache" / "lm" / f"stdlib-{recipe.key(c.fingerprint)}"
    assert info["path"] == str(folder) and (folder / "model.safetensors").is_file()
    assert info["bits_per_byte"] < info["unigram_bits_per_byte"] < 8
    assert json.loads((folder / "lm.json").read_text())["bits_per_byte"] == info["bits_per_byte"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, local_files_only=True)  # a plain HF folder too
    ids = torch.tensor([[BOS, 100, 101, 102]])
    assert torch.allclose(hf(ids).logits, m1(ids).logits, atol=1e-6)

    def refuse(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(byte_lm, "train_byte_lm", refuse)
    m2, info2 = byte_lm.stdlib_lm(recipe, corpus=c, cache_dir=tmp_path / "cache", progress=False, echo=said.append)
    assert "loaded" in said[-1] and info2["bits_per_byte"] == info["bits_per_byte"]
    assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))
    # another recipe is another model
    assert byte_lm.LMRecipe(**{**TINY, "steps": 41}).key(c.fingerprint) != recipe.key(c.fingerprint)
    # a damaged cache is trained again, not loaded
    (folder / "model.safetensors").write_bytes(b"garbage")
    monkeypatch.undo()
    m3, _ = byte_lm.stdlib_lm(recipe, corpus=c, cache_dir=tmp_path / "cache", progress=False, echo=said.append)
    assert "training" in said[-1]
    assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m3.state_dict().values()))


def test_an_unwritable_cache_fails_before_training(root, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from actsparse.lm import byte_lm

    def refuse(*a, **k):
        raise AssertionError("trained before checking the cache folder")

    monkeypatch.setattr(byte_lm, "train_byte_lm", refuse)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="ACTSPARSE_CACHE"):
        byte_lm.stdlib_lm(byte_lm.LMRecipe(**TINY), corpus=stdlib_corpus(root, validation=0.3), cache_dir=blocker,
                          progress=False)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    from actsparse.lm.byte_lm import cache_root

    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "a"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.delenv("ACTSPARSE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "actsparse"


def test_recipe_rejects_bad_values():
    from actsparse.lm.byte_lm import LMRecipe

    with pytest.raises(ValueError, match="multiple of n_head"):
        LMRecipe(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="steps"):
        LMRecipe(steps=0)
    with pytest.raises(ValueError, match="lr"):
        LMRecipe(lr=float("nan"))
    with pytest.raises(ValueError, match="precision"):
        LMRecipe(precision="float16")
    assert LMRecipe().precision in ("bfloat16", "float32")  # auto is resolved, so the cache key names it
    assert LMRecipe(precision="float32").key("c") != LMRecipe(precision="bfloat16").key("c")


def test_module_names():
    assert C.BOS == 0
