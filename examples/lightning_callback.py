"""A sparsity penalty on a LightningModule's hidden layer, added by a callback, with no change to the module.

    pip install -e '.[lightning,cli]'  # from a clone, in its folder (released: pip install 'actsparse[lightning,cli]')
                                       # lightning, and scikit-learn for the digits
    python examples/lightning_callback.py        # about 10 s on 2 cores

The module is a plain 64→25→64 sigmoid autoencoder on scikit-learn's 8×8 digits: its
``training_step`` returns the reconstruction MSE and knows nothing of sparsity. The callback
attaches ``BernoulliKL(0.05, weight=3)`` to ``"encoder.1"`` (the sigmoid) at fit start, adds
``reg.penalty()`` to the loss of every training step, logs ``sparsity/penalty``,
``sparsity/encoder.1/penalty``, ``.../rho_hat`` and ``.../active_fraction`` to the logger (CSV
here), and removes its hooks when fit ends. The script prints the logged metrics of the last step
and the mean hidden activation before and after training.
"""

from __future__ import annotations

import csv
import tempfile
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import actsparse
from actsparse.integrations.lightning import SparsityCallback

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
except ImportError:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

RHO, BETA = 0.05, 3.0


class AutoEncoder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 25), nn.Sigmoid())
        self.decoder = nn.Sequential(nn.Linear(25, 64), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = nn.functional.mse_loss(self(x), x)
        self.log("mse", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    x = torch.as_tensor(load_digits().data / 16.0, dtype=torch.float32)  # (1797, 64) in [0, 1]
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=128, shuffle=True)
    model = AutoEncoder()
    with torch.no_grad():
        before = float(model.encoder(x).mean())

    callback = SparsityCallback({"encoder.1": actsparse.BernoulliKL(RHO, weight=BETA)})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(max_epochs=25, accelerator="cpu", devices=1, callbacks=[callback],
                             logger=CSVLogger(tmp, name="sparse_ae"), log_every_n_steps=5,
                             enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
        trainer.fit(model, data)
        with open(f"{trainer.logger.log_dir}/metrics.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("sparsity/penalty")]
    last = {k: round(float(v), 4) for k, v in rows[-1].items() if v}
    print(f"logged at step {int(last.pop('step'))}:", last)

    with torch.no_grad():
        after = float(model.encoder(x).mean())
    print(f"mean hidden activation {before:.3f} -> {after:.3f} (target {RHO})")
    assert callback.attachment is None and not model.encoder[1]._forward_hooks  # hooks removed
    assert after < 0.2
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
