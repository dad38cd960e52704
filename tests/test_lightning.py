"""SparsityCallback: the penalty it adds and logs is actsparse's, and it cleans up after fit.

Reference: a LightningModule that adds the same penalty to its loss by hand (the formulas written
out); with the same seed and data, both trainings must end with the same weights.
"""

from __future__ import annotations

import copy
import csv
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from test_docs import doc_blocks, run_doc_block  # noqa: E402 (tests/ is on sys.path)

import actsparse  # noqa: E402
from actsparse.integrations.lightning import SparsityCallback  # noqa: E402

RHO, BETA, LAM = 0.05, 3.0, 1e-3

# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")


def targets():
    return {"net.1": actsparse.BernoulliKL(RHO, weight=BETA), "net.3": actsparse.L1(LAM)}


def by_hand_penalty(h1, h2):
    r = h1.mean(dim=0)
    kl = (RHO * torch.log(RHO / r) + (1 - RHO) * torch.log((1 - RHO) / (1 - r))).sum()
    return BETA * kl + LAM * h2.abs().sum() / h2.shape[0]


class AE(pl.LightningModule):
    def __init__(self, by_hand: bool = False, manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 16), nn.Sigmoid(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 12))
        self.by_hand = by_hand
        self.automatic_optimization = not manual

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        if self.by_hand:
            h1 = self.net[1](self.net[0](x))
            h2 = self.net[3](self.net[2](h1))
            return nn.functional.mse_loss(self.net[4](h2), x) + by_hand_penalty(h1, h2)
        return {"loss": nn.functional.mse_loss(self(x), x)}  # the dict form of a step's output

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Snapshots(pl.Callback):
    """The weights and the batch at the start of every training step."""

    def __init__(self) -> None:
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append((copy.deepcopy(pl_module.net.state_dict()), batch[0].clone()))


def loader():
    x = torch.rand(64, 12, generator=torch.Generator().manual_seed(1))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=16, shuffle=False)


def fit(module, callbacks, tmp_path, steps=6):
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="run"), callbacks=callbacks,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        log_every_n_steps=1, max_epochs=4,  # max_epochs: a bound even if no optimizer step ran
    )
    trainer.fit(module, loader())
    return trainer


def read_metrics(trainer):
    with open(f"{trainer.logger.log_dir}/metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One fit with the callback (6 steps), shared by the tests below."""
    torch.set_num_threads(1)
    module, cb, snaps = AE(), SparsityCallback(targets()), Snapshots()
    trainer = fit(module, [cb, snaps], tmp_path_factory.mktemp("lightning"))
    return module, cb, snaps, trainer


def test_logged_penalty_equals_actsparse_on_the_same_batch(run):
    module, cb, snaps, trainer = run
    rows = [r for r in read_metrics(trainer) if r.get("sparsity/penalty")]
    assert len(rows) == len(snaps.steps) == 6
    net = copy.deepcopy(module.net)
    for row, (state, x) in zip(rows, snaps.steps):
        net.load_state_dict(state)
        h1 = net[1](net[0](x))
        h2 = net[3](net[2](h1))
        kl, l1 = actsparse.BernoulliKL(RHO, weight=BETA)(h1), actsparse.L1(LAM)(h2)
        assert float(row["sparsity/net.1/penalty"]) == pytest.approx(float(kl), rel=1e-6)
        assert float(row["sparsity/net.3/penalty"]) == pytest.approx(float(l1), rel=1e-6)
        assert float(row["sparsity/penalty"]) == pytest.approx(float(kl + l1), rel=1e-6)
        assert float(row["sparsity/net.1/rho_hat"]) == pytest.approx(float(h1.mean()), rel=1e-6)
        assert float(row["sparsity/net.3/active_fraction"]) == pytest.approx(float((h2 > 0).float().mean()))


def test_penalty_is_in_the_loss(run, tmp_path):
    """Same seed, same data: the callback's training equals the one that adds the penalty by hand."""
    module, *_ = run
    reference = AE(by_hand=True)
    fit(reference, [], tmp_path)
    for (name, p), q in zip(module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    untouched = AE()  # initial weights: the penalty did move them
    assert not torch.allclose(untouched.net[0].weight, module.net[0].weight)


def test_hooks_and_wrapper_removed_after_fit(run):
    module, cb, *_ = run
    assert cb.attachment is None
    assert "training_step" not in vars(module)
    for m in module.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_manual_optimization_is_refused_and_cleaned_up(tmp_path):
    module, cb = AE(manual=True), SparsityCallback(targets())
    with pytest.raises(RuntimeError, match="automatic optimization"):
        fit(module, [cb], tmp_path, steps=1)
    assert cb.attachment is None and "training_step" not in vars(module)


def test_moving_averages_go_into_checkpoints():
    kl = actsparse.BernoulliKL(RHO, momentum=0.9)
    kl(torch.rand(8, 5))  # one training-mode call starts the moving average
    cb = SparsityCallback({"net.1": kl})
    state = cb.state_dict()
    assert state["0.running_rate"].shape == (5,)
    fresh = SparsityCallback({"net.1": actsparse.BernoulliKL(RHO, momentum=0.9)})
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.state_dict()["0.running_rate"], state["0.running_rate"])


def test_only_the_integrations_import_keras_or_lightning():
    """``import actsparse`` must not need the extras: no module outside integrations/ imports them."""
    root = Path(actsparse.__file__).parent
    pattern = re.compile(r"^\s*(import|from)\s+(keras|lightning|pytorch_lightning)\b", re.M)
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "integrations" not in p.parts and pattern.search(p.read_text(encoding="utf-8"))]
    assert not offenders


@pytest.mark.parametrize(("line", "code"), doc_blocks("integrations.md", "integrations.lightning"))
def test_docs_examples_run(line, code):
    run_doc_block("integrations.md", line, code)


def test_no_nan_in_logged_stats(run):
    _, _, _, trainer = run
    for row in read_metrics(trainer):
        for key, value in row.items():
            if key.startswith("sparsity/") and value:
                assert math.isfinite(float(value)), key
