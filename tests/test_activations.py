"""Collecting activations by forward hook (actsparse.data.activations), against independent references:
calling the submodules directly, a Hugging Face model's ``output_hidden_states``, and a naive
per-sequence loop for the position filter and the attention mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from actsparse.cli import main
from actsparse.data.activations import (
    cache_activations,
    collect_activations,
    parse_positions,
    position_mask,
    random_token_batches,
    resolve_layer,
    token_batches,
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    # ReLU(inplace=True) after the hooked Linear: the collected rows must be copies
    return nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))


@pytest.mark.parametrize("stop_early", [True, False])
def test_plain_module_matches_calling_the_submodules(stop_early):
    model = _mlp()
    x = torch.randint(0, 50, (10, 5))
    got = list(collect_activations(model, "1", x, batch_size=4, stop_early=stop_early))
    assert [r.shape for r in got] == [(20, 16), (20, 16), (10, 16)]
    with torch.no_grad():
        ref = model[1](model[0](x)).reshape(-1, 16)
    torch.testing.assert_close(torch.cat(got), ref, rtol=0, atol=0)
    assert (ref < 0).any(), "the reference must hold values that the in-place ReLU would have changed"


def test_mapping_and_iterable_inputs_and_tuple_outputs():
    class Block(nn.Module):  # returns a tuple, like a Hugging Face block
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 6)

        def forward(self, x):
            return self.lin(x), None

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, inputs_embeds, attention_mask=None):
            return self.block(inputs_embeds)[0].sum()

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(5, 4, 3)
    ref = net.block.lin(x).detach()
    got = torch.cat(list(collect_activations(net, "block", {"inputs_embeds": x}, batch_size=2)))
    torch.testing.assert_close(got, ref.reshape(-1, 6))
    got = torch.cat(list(collect_activations(net, "block", [x[:3], x[3:]], batch_size=2)))
    torch.testing.assert_close(got, ref.reshape(-1, 6))
    mask = torch.tensor([[1, 1, 0, 0]] * 5)
    got = torch.cat(list(collect_activations(net, "block", {"inputs_embeds": x, "attention_mask": mask}, batch_size=2)))
    torch.testing.assert_close(got, ref[:, :2].reshape(-1, 6))


def _naive_keep(positions, mask: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros_like(mask, dtype=torch.bool)
    for b in range(mask.shape[0]):
        real = [t for t in range(mask.shape[1]) if mask[b, t]]
        if positions == "all":
            chosen = real
        elif positions == "last":
            chosen = real[-1:]
        elif positions == "drop_first":
            chosen = real[1:]
        elif isinstance(positions, int):
            chosen = [real[positions]] if -len(real) <= positions < len(real) else []
        else:
            chosen = real[positions]
        keep[b, chosen] = True
    return keep


POSITIONS = ["all", "last", "drop_first", 0, 2, -1, -3, slice(1, None), slice(None, -1), slice(-3, None),
             slice(1, 6, 2), slice(0, 100), slice(-100, 2), slice(4, 2)]


@pytest.mark.parametrize("positions", POSITIONS, ids=str)
def test_position_mask_matches_a_naive_loop(positions):
    g = torch.Generator().manual_seed(1)
    t = 9
    lengths = torch.randint(0, t + 1, (12,), generator=g)
    right = torch.arange(t)[None] < lengths[:, None]  # right padding
    left = right.flip(1)  # left padding
    holes = torch.rand(12, t, generator=g) > 0.3  # any mask
    for mask in (right, left, holes):
        got = position_mask(positions, (12, t), mask.long())
        assert torch.equal(got, _naive_keep(positions, mask))
    no_mask = position_mask(positions, (12, t))
    assert (no_mask is None and positions == "all") or torch.equal(no_mask, _naive_keep(positions, torch.ones(12, t)))


def test_parse_positions():
    assert parse_positions("all") == "all"
    assert parse_positions("drop-first") == "drop_first"
    assert parse_positions("-1") == -1
    assert parse_positions("1:") == slice(1, None)
    assert parse_positions("-8::2") == slice(-8, None, 2)
    for bad in ("first", "1:2:0", "a:b", ""):
        with pytest.raises(ValueError, match="positions"):
            parse_positions(bad)


def test_layer_names_errors_and_cleanup():
    model = _mlp()
    with pytest.raises(KeyError, match="no module named 'lin'"):
        resolve_layer(model, "lin")
    with pytest.raises(ValueError, match="matches 2 modules"):
        resolve_layer(model, "[13]")
    assert resolve_layer(model, nn.ReLU)[0] == "2"
    x = torch.randint(0, 50, (10, 5))
    model.train()
    model[3].eval()  # per-module modes are restored, not flattened
    for _ in collect_activations(model, "1", x, batch_size=2):
        assert torch.is_grad_enabled(), "no_grad must not leak into the caller between batches"
        assert model.training and not model[3].training
        assert all(not m._forward_hooks for m in model.modules())
        break
    with pytest.raises(ValueError, match="need a .batch, seq, d. output"):
        next(collect_activations(model, "3", torch.randint(0, 50, (4,)), positions="last"))
    assert all(not m._forward_hooks for m in model.modules())


def test_a_layer_that_does_not_run_is_an_error():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    model = Skip()
    with pytest.raises(ValueError, match="'unused' did not run"):
        next(collect_activations(model, "unused", torch.randn(3, 2)))
    assert not model.unused._forward_hooks


def test_token_batches():
    stream = np.arange(103)
    batches = list(token_batches(stream, 10, 4))
    assert [tuple(b.shape) for b in batches] == [(4, 10), (4, 10), (2, 10)]
    assert torch.equal(torch.cat(batches), torch.arange(100).reshape(10, 10))
    docs = [list(range(0, 7)), list(range(7, 30)), list(range(30, 41))]  # documents, concatenated
    got = torch.cat(list(token_batches(docs, 5, 3, bos=99, max_sequences=6)))
    assert torch.equal(got[:, 0], torch.full((6,), 99)) and torch.equal(got[:, 1:], torch.arange(24).reshape(6, 4))
    a, b = list(random_token_batches(10, 4, 3, 7, seed=3)), list(random_token_batches(10, 4, 3, 7, seed=3))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and sum(len(x) for x in a) == 10


# --------------------------------------------------------------------------- Hugging Face
@pytest.fixture(scope="module")
def gpt2():
    pytest.importorskip("transformers")
    from actsparse.data.activations import tiny_gpt2

    return tiny_gpt2(0)


def test_gpt2_blocks_match_output_hidden_states(gpt2):
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = gpt2(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        ln = gpt2.h[1].ln_1(hidden[1])  # a submodule called directly on its known input
    for name in ("h.0", "transformer.h.0"):  # with and without the base-model prefix
        got = torch.cat(list(collect_activations(gpt2, name, ids, batch_size=2)))
        torch.testing.assert_close(got, hidden[1].reshape(-1, 64))
    got = torch.cat(list(collect_activations(gpt2, "h.1.ln_1", {"input_ids": ids}, batch_size=2, positions="last")))
    torch.testing.assert_close(got, ln[:, -1])


def test_gpt2_attention_mask_drops_padding(gpt2):
    g = torch.Generator().manual_seed(1)
    lengths = [12, 5, 9]
    ids = torch.randint(0, 256, (3, 12), generator=g)
    mask = (torch.arange(12)[None] < torch.tensor(lengths)[:, None]).long()  # right padding
    ids = ids.masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask}
    for positions in ("all", "last", "drop_first"):
        got = torch.cat(list(collect_activations(gpt2, "h.0", batch, batch_size=3, positions=positions,
                                                 forward_kwargs={"use_cache": False})))
        ref = []
        for i, n in enumerate(lengths):  # each sequence alone, unpadded
            with torch.no_grad():
                h = gpt2(input_ids=ids[i:i + 1, :n], output_hidden_states=True).hidden_states[1][0]
            ref.append({"all": h, "last": h[-1:], "drop_first": h[1:]}[positions])
        torch.testing.assert_close(got, torch.cat(ref), atol=1e-5, rtol=1e-5)


def test_cli_cache_activations_end_to_end(gpt2, tmp_path, capsys):
    out = tmp_path / "acts"
    argv = ["cache-activations", "--out", str(out), "--layer", "h.1.mlp", "--tokens", "640", "--context", "32",
            "--batch-size", "8", "--shard-size", "150", "--positions", "drop-first", "--no-progress"]
    assert main(argv) == 0
    assert "620 rows of h.1.mlp (d=64, float32) in 5 shards" in capsys.readouterr().out
    from actsparse.data.shards import ShardStore

    store = ShardStore(out)
    assert store.source["checkpoint"] == "tiny-gpt2" and store.shard_rows == [150] * 4 + [20]
    ref = torch.cat(list(collect_activations(gpt2, "h.1.mlp", random_token_batches(20, 32, 8, 256, seed=0),
                                             positions="drop_first")))
    torch.testing.assert_close(store.to_tensor(), ref)
    assert main(argv) == 0 and "already complete" in capsys.readouterr().out
    assert main(argv[:-1] + ["--shard-size", "100", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other arguments" in err[0] and "shard_size" in err[0]
    assert main(["cache-activations", "--layer", "h.9", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'h.9'" in err[0] and "Closest" in err[0]


def test_cache_activations_float16_and_max_rows(tmp_path):
    model = _mlp()
    x = torch.randint(0, 50, (40, 5))
    store = cache_activations(model, "1", x, tmp_path, batch_size=4, shard_size=32, dtype="float16", max_rows=70,
                              progress=False)
    with torch.no_grad():
        ref = model[1](model[0](x)).reshape(-1, 16)[:70]
    assert store.dtype == "float16" and store.shard_rows == [32, 32, 6]
    torch.testing.assert_close(store.to_tensor(), ref.half().float())
