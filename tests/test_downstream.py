"""actsparse.downstream: splicing an SAE into a model, and the downstream CE / KL / loss recovered."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from actsparse.data.activations import collect_activations
from actsparse.downstream import downstream_metrics, next_token_ce, spliced
from actsparse.models import SparseAutoencoder

VOCAB = 256


# --------------------------------------------------------------------------- helpers
class StandIn(nn.Module):
    """An SAE stand-in: ``forward(x).reconstruction = fn(x)``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return SimpleNamespace(reconstruction=self.fn(x))


class TableLM(nn.Module):
    """Logits = rows of a fixed (seq, vocab) table, passed through ``layer`` (an identity), so the
    spliced layer's output *is* the logits and every CE can be computed by hand."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32))
        self.layer = nn.Identity()

    def forward(self, ids, attention_mask=None):
        b, t = ids.shape
        return self.layer(self.table[:t].expand(b, t, -1).clone())


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x


class TinyLM(nn.Module):
    """embedding → layer → recorder (sees the layer's output after the splice) → head."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(vocab, d)
        self.layer = nn.Linear(d, d)
        self.rec = Recorder()
        self.head = nn.Linear(d, vocab)

    def forward(self, ids, attention_mask=None):
        return self.head(self.rec(self.layer(self.emb(ids))))


def lse(xs):
    return math.log(sum(math.exp(x) for x in xs))


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config)
        # a model that predicts something without training: with the head tied to the embedding and
        # small blocks, a larger embedding makes it predict "the next token repeats this one"
        with torch.no_grad():
            model.transformer.wte.weight.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def batches():
    """Runs of 4 repeated tokens (what the ``gpt2`` model predicts, 3 times in 4)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (3, 3), generator=g).repeat_interleave(4, dim=1) for _ in range(2)]


# --------------------------------------------------------------------------- hand-computed CE
def test_next_token_ce_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.3, -1.0, 4.0]]])
    ids = torch.tensor([[0, 1]])
    total, count = next_token_ce(logits, ids)  # one prediction: token 1 from the logits at 0
    assert count == 1
    assert total == pytest.approx(-(2.0 - lse([1.0, 2.0, 0.5])), abs=1e-12)
    # the last column of keep is ignored (no next token); keep=False at 0 scores nothing
    assert next_token_ce(logits, ids, torch.tensor([[True, True]])) == (total, 1)
    assert next_token_ce(logits, ids, torch.tensor([[False, True]])) == (0.0, 0)


def test_two_token_example_every_variant_by_hand():
    row0 = [1.0, 2.0, 0.5]
    model = TableLM([row0, [0.0, 0.0, 3.0]])
    ids = torch.tensor([[0, 1]])
    half = StandIn(lambda x: 0.5 * x)
    m = downstream_metrics(model, "layer", half, [ids], positions="all")
    ce_clean = -(2.0 - lse(row0))
    ce_spliced = -(1.0 - lse([0.5, 1.0, 0.25]))
    ce_zero = math.log(3)  # zeros: uniform logits
    mean = [(a + b) / 2 for a, b in zip(row0, [0.0, 0.0, 3.0])]  # over the kept positions 0 and 1
    ce_mean = -(mean[1] - lse(mean))
    assert m["tokens"] == 1
    assert m["ce_clean"] == pytest.approx(ce_clean, abs=1e-6)
    assert m["ce_spliced"] == pytest.approx(ce_spliced, abs=1e-6)
    assert m["ce_zero_ablated"] == pytest.approx(ce_zero, abs=1e-6)
    assert m["ce_mean_ablated"] == pytest.approx(ce_mean, abs=1e-6)
    assert m["loss_recovered_zero"] == pytest.approx((ce_zero - ce_spliced) / (ce_zero - ce_clean), abs=1e-5)
    assert m["loss_recovered_mean"] == pytest.approx((ce_mean - ce_spliced) / (ce_mean - ce_clean), abs=1e-5)
    assert m["loss_recovered"] == m["loss_recovered_zero"] and m["ablation"] == "zero"
    p = [math.exp(v - lse(row0)) for v in row0]
    q = [math.exp(v - lse([0.5, 1.0, 0.25])) for v in (0.5, 1.0, 0.25)]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert m["kl_clean_spliced"] == pytest.approx(kl, abs=1e-7)
    m_mean = downstream_metrics(model, "layer", half, [ids], positions="all", ablation="mean")
    assert m_mean["loss_recovered"] == m["loss_recovered_mean"] and m_mean["ablation"] == "mean"


def test_drop_first_does_not_score_position_zero():
    # a terrible prediction at position 0 (token 1 gets -20) must not count under drop_first
    table = [[0.0, -20.0, 0.0], [0.0, 1.0, 2.5], [9.0, 9.0, 9.0]]
    model = TableLM(table)
    ids = torch.tensor([[0, 1, 2]])
    ident = StandIn(lambda x: x)
    m = downstream_metrics(model, "layer", ident, [ids])  # default positions="drop_first"
    assert m["tokens"] == 1  # position 1 only: position 2 has no next token
    assert m["ce_clean"] == pytest.approx(-(2.5 - lse(table[1])), abs=1e-6)
    m_all = downstream_metrics(model, "layer", ident, [ids], positions="all")
    assert m_all["tokens"] == 2
    both = -(-20.0 - lse(table[0])) - (2.5 - lse(table[1]))
    assert m_all["ce_clean"] == pytest.approx(both / 2, abs=1e-5)


# --------------------------------------------------------------------------- splicing
def test_splice_keeps_unkept_positions_and_padding():
    model = TinyLM()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    model(ids)
    clean = model.rec.seen[-1]
    with spliced(model, "layer", lambda r: r + 100.0, positions="drop_first") as record:
        model(ids)
    out = model.rec.seen[-1]
    assert record.calls == 1 and record.name == "layer"
    torch.testing.assert_close(out[:, 0], clean[:, 0], rtol=0, atol=0)  # position 0 untouched
    torch.testing.assert_close(out[:, 1:], clean[:, 1:] + 100.0)
    # right and left padding: padded positions untouched; drop_first drops the first *real* token
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    with spliced(model, "layer", lambda r: r + 100.0, positions="drop_first", attention_mask=mask):
        model(ids, attention_mask=mask)
    out = model.rec.seen[-1]
    changed = (out - clean).abs().amax(-1) > 50
    assert changed.tolist() == [[False, True, True, False], [False, False, True, True]]
    assert hook_count(model) == 0
    model(ids)  # the hook is gone: the output is clean again
    torch.testing.assert_close(model.rec.seen[-1], clean, rtol=0, atol=0)


def test_splice_tuple_and_2d_outputs():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, "extra"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            return self.pair(x)

    net = Net()
    x = torch.arange(12.0).reshape(2, 6)  # (batch, d)
    with spliced(net, "pair", lambda r: -r):
        a, extra = net(x)
    torch.testing.assert_close(a, -2 * x)
    assert extra == "extra"
    with spliced(net, "pair", lambda r: -r, positions="drop_first"), pytest.raises(ValueError, match="batch, seq, d"):
        net(x)
    x3 = torch.arange(24.0).reshape(2, 3, 4).double()  # (batch, seq, d), float64 kept
    with spliced(net, "pair", lambda r: torch.zeros(r.shape, dtype=torch.float32), positions="last"):
        a, _ = net(x3)
    assert a.dtype == torch.float64
    assert (a[:, -1] == 0).all() and torch.equal(a[:, :-1], 2 * x3[:, :-1])
    with spliced(net, "pair", lambda r: r[:1]), pytest.raises(ValueError, match="keep the shape"):
        net(x3)
    assert hook_count(net) == 0


def test_hook_removed_on_error_and_modes_restored(gpt2, batches):
    before = hook_count(gpt2)
    with pytest.raises(RuntimeError, match="boom"), spliced(gpt2, "transformer.h.0", lambda r: r):
        raise RuntimeError("boom")
    assert hook_count(gpt2) == before

    def fail(x):
        raise RuntimeError("sae failed")

    sae = StandIn(fail)
    gpt2.train()
    sae.train()
    gpt2.transformer.h[1].eval()  # a mixed state must come back as it was
    modes = [m.training for m in gpt2.modules()]
    try:
        with pytest.raises(RuntimeError, match="sae failed"):
            downstream_metrics(gpt2, "transformer.h.0", sae, batches)
        assert hook_count(gpt2) == before
        assert [m.training for m in gpt2.modules()] == modes and sae.training
        assert torch.is_grad_enabled()
        downstream_metrics(gpt2, "transformer.h.0", StandIn(lambda x: x), batches)
        assert [m.training for m in gpt2.modules()] == modes and hook_count(gpt2) == before
    finally:
        gpt2.eval()


# --------------------------------------------------------------------------- GPT-2 end to end
@pytest.mark.parametrize("layer", ["transformer.h.0", "h.0.mlp"])
def test_identity_splice_recovers_everything(gpt2, batches, layer):
    m = downstream_metrics(gpt2, layer, StandIn(lambda x: x), batches)
    assert m["ce_spliced"] == m["ce_clean"]
    assert m["loss_recovered"] == 1.0 and m["loss_recovered_mean"] == 1.0
    assert m["kl_clean_spliced"] < 1e-12
    assert m["ce_zero_ablated"] - m["ce_clean"] > 1e-4  # the ablation matters, so 1.0 is not 0/0 luck
    assert m["tokens"] == 2 * 3 * (12 - 2)  # drop_first: positions 1..10 have a next token


def test_zero_splice_equals_zero_ablation(gpt2, batches):
    m = downstream_metrics(gpt2, "transformer.h.0", StandIn(torch.zeros_like), batches)
    assert m["ce_spliced"] == m["ce_zero_ablated"]
    assert m["loss_recovered_zero"] == 0.0
    assert m["kl_clean_spliced"] > 1e-4
    # a one-shot generator is read twice (mean pass, evaluation): it is held in a list
    assert downstream_metrics(gpt2, "transformer.h.0", StandIn(torch.zeros_like), (b for b in batches)) == m


def test_mean_ablation_is_the_collected_mean(gpt2, batches):
    rows = torch.cat(list(collect_activations(gpt2, "transformer.h.0", batches, positions="drop_first",
                                              dtype=torch.float64)))
    mean = rows.mean(0)
    m = downstream_metrics(gpt2, "transformer.h.0", StandIn(lambda x: mean.to(x.dtype).expand_as(x)), batches)
    assert m["ce_spliced"] == pytest.approx(m["ce_mean_ablated"], abs=1e-6)
    assert m["loss_recovered_mean"] == pytest.approx(0.0, abs=1e-4)
    other = mean + 0.5 * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0), dtype=mean.dtype)
    shifted = downstream_metrics(gpt2, "transformer.h.0", StandIn(lambda x: other.to(x.dtype).expand_as(x)), batches)
    assert abs(shifted["ce_spliced"] - m["ce_mean_ablated"]) > 1e-3  # another constant is told apart


def test_padding_neither_spliced_nor_scored(gpt2):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    mask[1, 8:] = 0
    # scored: kept (real, not the first real) and followed by a real token: 5 + 7 + 9 predictions
    expected_tokens = (6 - 2) + (8 - 2) + (10 - 2)
    other = ids.clone()
    other[mask == 0] = 0  # other padding ids: nothing may change
    sae = StandIn(lambda x: 0.5 * x)
    m1 = downstream_metrics(gpt2, "transformer.h.0", sae, [{"input_ids": ids, "attention_mask": mask}])
    m2 = downstream_metrics(gpt2, "transformer.h.0", sae, [{"input_ids": other, "attention_mask": mask}])
    assert m1["tokens"] == expected_tokens
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablated", "ce_mean_ablated", "kl_clean_spliced"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-6, abs=1e-9), key
    # and the splice itself leaves padded positions alone: the next block's input is the spliced output
    seen = []
    handle = gpt2.transformer.h[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            gpt2(input_ids=ids, attention_mask=mask)
            with spliced(gpt2, "transformer.h.0", lambda r: r + 10.0, positions="drop_first", attention_mask=mask):
                gpt2(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    changed = (seen[1] - seen[0]).abs().amax(-1) > 5
    assert torch.equal(changed, mask.bool() & (mask.cumsum(1) > 1))


def test_real_sparse_autoencoder(gpt2, batches):
    # an SAE that is exactly the identity: h = ReLU([I; -I] x), x̂ = [I, -I] h
    exact = SparseAutoencoder(32, 256, "relu")
    with torch.no_grad():
        eye = torch.eye(32)
        for w in (exact.W_enc, exact.W_dec):
            w.zero_()
        exact.W_enc[:32], exact.W_enc[32:64] = eye, -eye
        exact.W_dec[:32], exact.W_dec[32:64] = eye, -eye
    m = downstream_metrics(gpt2, "h.0", exact, batches)
    assert m["loss_recovered"] == pytest.approx(1.0, abs=1e-6) and m["kl_clean_spliced"] < 1e-10

    # untrained TopK SAEs (encoder = decoderᵀ): a lossy reconstruction, better with more latents
    results = {}
    for k in (2, 8):
        torch.manual_seed(0)
        sae = SparseAutoencoder(32, 256, "topk", k=k, init="orthogonal_tied")
        sae.train()
        fired = sae.samples_since_fired.clone()
        results[k] = r = downstream_metrics(gpt2, "h.0", sae, batches, ablation="mean")
        assert sae.training and torch.equal(sae.samples_since_fired, fired)  # eval mode inside: no firing tracked
        assert r["tokens"] == m["tokens"] == 2 * 3 * 10
        assert r["ce_clean"] == m["ce_clean"] and r["ce_zero_ablated"] == m["ce_zero_ablated"]
        assert m["ce_clean"] < r["ce_spliced"] < min(r["ce_zero_ablated"], r["ce_mean_ablated"])
        assert 0 < r["loss_recovered"] == r["loss_recovered_mean"] < 1 and 0 < r["loss_recovered_zero"] < 1
        assert r["kl_clean_spliced"] > 1e-3
    assert results[8]["kl_clean_spliced"] < results[2]["kl_clean_spliced"]
    assert results[8]["loss_recovered_zero"] > results[2]["loss_recovered_zero"]
    with_bar = downstream_metrics(gpt2, "h.0", sae, batches, ablation="mean", progress=True)
    assert with_bar == results[8]


# --------------------------------------------------------------------------- bad input
def test_bad_input(gpt2, batches):
    ident = StandIn(lambda x: x)
    with pytest.raises(ValueError, match="ablation must be one of zero, mean"):
        downstream_metrics(gpt2, "h.0", ident, batches, ablation="max")
    with pytest.raises(KeyError):
        downstream_metrics(gpt2, "transformer.h.9", ident, batches)
    with pytest.raises(TypeError, match="integer token ids"):
        downstream_metrics(gpt2, "h.0", ident, [batches[0].float()])
    with pytest.raises(TypeError, match="integer token ids"):
        downstream_metrics(gpt2, "h.0", ident, [{"input_ids": batches[0].bool()}])
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        downstream_metrics(gpt2, "h.0", ident, [batches[0][0]])
    with pytest.raises(ValueError, match="without 'input_ids'"):
        downstream_metrics(gpt2, "h.0", ident, [{"ids": batches[0]}])
    with pytest.raises(TypeError, match="batch 0 is a list"):
        downstream_metrics(gpt2, "h.0", ident, [[1, 2, 3]])
    with pytest.raises(ValueError, match="empty"):
        downstream_metrics(gpt2, "h.0", ident, [])
    with pytest.raises(ValueError, match="positions"):
        downstream_metrics(gpt2, "h.0", ident, batches, positions="middle")
    with pytest.raises(ValueError, match="width 16"):
        downstream_metrics(gpt2, "h.0", SparseAutoencoder(16, 32, "relu"), batches)
    with pytest.raises(ValueError, match="no prediction was scored"):
        downstream_metrics(gpt2, "h.0", ident, [batches[0][:, :2]])  # drop_first keeps only the last token
    assert hook_count(gpt2) == 0
