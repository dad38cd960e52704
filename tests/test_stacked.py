"""Stacked autoencoders and greedy layer-wise pretraining."""

from __future__ import annotations

import pytest
import torch

import actsparse
from actsparse.config import TrainConfig
from actsparse.models import StackedAutoencoder
from actsparse.train import pretrain_greedy, train


def test_seed001_shape_and_penalty_by_hand():
    torch.manual_seed(0)
    stack = StackedAutoencoder([20, 80, 40, 4], "relu", penalties={2: actsparse.L1(1e-2)}).double()
    x = torch.rand(16, 20, dtype=torch.float64)
    out = stack(x)
    h = x
    for layer in stack.encoder:  # reference by hand
        h = torch.relu(layer(h))
    y = h
    for i, layer in enumerate(stack.decoder):
        y = layer(y) if i == len(stack.decoder) - 1 else torch.relu(layer(y))
    assert out.code.shape == (16, 4) and out.reconstruction.shape == (16, 20)
    torch.testing.assert_close(out.code, h)
    torch.testing.assert_close(out.reconstruction, y)
    assert float(out.sparsity_loss) == pytest.approx(float(1e-2 * h.abs().sum() / 16), rel=1e-12)
    assert float(out.reconstruction_loss) == pytest.approx(float(((y - x) ** 2).mean()), rel=1e-12)


def test_greedy_pretraining_copies_layers_and_fine_tuning_improves():
    torch.manual_seed(0)
    x = torch.rand(600, 16) * 0.8 + 0.1
    stack = StackedAutoencoder([16, 12, 6], "sigmoid", output="sigmoid", recon_loss="half_sse")
    cfg = TrainConfig(penalty="kl", target=0.1, weight=0.5, weight_decay=1e-4, iterations=40, decoder="sigmoid",
                      progress=False, plots=False, validation=0.0)
    results = pretrain_greedy(stack, x, cfg)
    assert len(results) == 2
    torch.testing.assert_close(stack.encoder[0].weight, results[0].model.W_enc)
    torch.testing.assert_close(stack.decoder[1].weight, results[0].model.decoder_weight)
    torch.testing.assert_close(stack.encoder[1].weight, results[1].model.W_enc)
    with torch.no_grad():
        before = float(stack(x).reconstruction_loss)
    res = train(cfg, x, model=stack)
    assert res.metrics["reconstruction"] < before


def test_bad_sizes():
    with pytest.raises(ValueError, match="sizes"):
        StackedAutoencoder([20])
    with pytest.raises(ValueError, match="out of range"):
        StackedAutoencoder([20, 4], penalties={3: actsparse.L1(1.0)})
