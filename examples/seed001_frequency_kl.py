"""Seed 001 reproduced: a firing-frequency penalty on a ReLU bottleneck that actually trains.

    python examples/seed001_frequency_kl.py                 # seeds 0 1 2, about 15 s on 2 cores
    python examples/seed001_frequency_kl.py --seeds 0 1 2 3 4

The user's model is kept exactly (20→80→40→4→40→80→20, ``F.relu`` inline in ``forward``, which
returns ``(encoded, decoded)``). Their penalty, a KL on ``(encoded > 0).sum(dim=0)``, has no
gradient, so it cannot change training. ``actsparse.FrequencyKL`` measures the same frequency
and has a straight-through pseudo-gradient. It is attached to ``"enc3"``: that hook sees the
pre-activation z, and a bottleneck unit fires (relu(z) > 0) exactly when z > 0.

The script trains the model with Adam twice per seed, with and without the penalty (same data,
same initial weights, same batches), and prints the fraction of active bottleneck units on a
held-out batch and the reconstruction MSE.

Data: 20-dimensional inputs in [0, 1] made from 4 sparse latent factors (each non-zero in a
quarter of the samples) through a fixed random linear map and a sigmoid.

Settings, and why (measured on seeds 0–4; see ``tests/test_seed001.py``):

* ρ = 0.2, β = 0.1, ``bandwidth=0.3``: the pseudo-gradient reaches only pre-activations within
  bandwidth/2 of the threshold, so the bandwidth must be on the scale of z (a few tenths here).
  With the default 0.1, a unit that fires on every sample and whose z all lie above 0.05 gets no
  gradient at all from the penalty and stays always-on (one seed in five ended at 0.41).
* Sparsity warm-up: the penalty is switched on after 300 of the 1,000 steps. From step 0, every
  z is still within a few hundredths of 0, the penalty holds them there, the decoder sees an
  almost constant input and the user's output ReLUs die: the MSE ends at 0.04–0.12, no better
  than predicting the mean (0.042).
* Adam, lr 3e-3, batch 512, 1,000 steps.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import actsparse

context_dimension = 20
output_neurons = 4

RHO = 0.2  # target firing frequency of each bottleneck unit
BETA = 0.1  # weight of the KL term
BANDWIDTH = 0.3  # width of the pseudo-gradient window, in units of the pre-activation z
STEPS = 1000
WARMUP = 300  # steps before the penalty is switched on
LR = 3e-3
BATCH = 512
N_TRAIN, N_TEST = 4096, 1024


class SparseAutoencoder(nn.Module):
    """The model of seed 001, unchanged."""

    def __init__(self):
        super(SparseAutoencoder, self).__init__()  # noqa: UP008 (the question's code, verbatim)

        # encoder
        self.enc1 = nn.Linear(in_features=context_dimension, out_features=80)
        self.enc2 = nn.Linear(in_features=80, out_features=40)
        self.enc3 = nn.Linear(in_features=40, out_features=output_neurons)

        # decoder
        self.dec1 = nn.Linear(in_features=output_neurons, out_features=40)
        self.dec2 = nn.Linear(in_features=40, out_features=80)
        self.dec3 = nn.Linear(in_features=80, out_features=context_dimension)

    def forward(self, x):
        # encoding
        x = F.relu(self.enc1(x))
        x = F.relu(self.enc2(x))
        x = F.relu(self.enc3(x))

        y = x  # encoded context

        # decoding
        x = F.relu(self.dec1(x))
        x = F.relu(self.dec2(x))
        x = F.relu(self.dec3(x))

        return y, x


def make_data(n: int, seed: int) -> torch.Tensor:
    """``(n, 20)`` inputs in [0, 1]: 4 sparse latent factors through a fixed random map and a sigmoid.

    Each factor is non-zero in a quarter of the samples, with a magnitude in [0.5, 1.5]. The map
    is the same for every seed; ``seed`` draws the samples.
    """
    fixed = torch.Generator().manual_seed(1000)
    A = 1.5 * torch.randn(4, context_dimension, generator=fixed)
    b = 0.5 * torch.randn(context_dimension, generator=fixed)
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(n, 4, generator=g) < 0.25
    z = on * (0.5 + torch.rand(n, 4, generator=g))
    return torch.sigmoid(z @ A + b)


def question_kl(encoded: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The penalty as written in the question (only ``torch.FloatTensor`` replaced by ``torch.full``)."""

    def kl_divergence(p, q):
        s1 = torch.sum(p * torch.log(p / q))
        s2 = torch.sum((1 - p) * torch.log((1 - p) / (1 - q)))
        return s1 + s2

    rho_hat = (encoded > 0).sum(dim=0)  # given the output neuron, sum of non-zeros outputs
    rho_hat = torch.div(rho_hat, batch_size / context_dimension)  # averaging over the batch
    for index in range(rho_hat.shape[0]):
        if rho_hat[index] == 0:
            rho_hat[index] = 0.001
        if rho_hat[index] == 1:
            rho_hat[index] = 0.999
    rho = torch.full((output_neurons,), RHO).unsqueeze(0)  # a vector of RHOs
    return BETA * kl_divergence(rho, rho_hat)


def frequency_penalty() -> actsparse.FrequencyKL:
    return actsparse.FrequencyKL(target=RHO, weight=BETA, threshold=0.0, bandwidth=BANDWIDTH)


def train(seed: int, sparsity: bool, steps: int = STEPS, *, penalty: actsparse.Penalty | None = None,
          warmup: int | None = None) -> dict:
    """Train one model; returns its active fraction and MSE on held-out data, and the model.

    ``penalty``: the penalty on ``enc3`` (default :func:`frequency_penalty`); ``warmup``: the steps
    before it is switched on (default ``min(WARMUP, steps // 3)``)."""
    x_train, x_test = make_data(N_TRAIN, seed), make_data(N_TEST, seed + 10_000)
    torch.manual_seed(seed)
    model = SparseAutoencoder()
    reg = actsparse.attach(model, {"enc3": penalty or frequency_penalty()}) if sparsity else None
    warmup = min(WARMUP, steps // 3) if warmup is None else warmup
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    batches = torch.Generator().manual_seed(seed)
    for step in range(steps):
        data = x_train[torch.randint(0, N_TRAIN, (BATCH,), generator=batches)]
        encoded, outputs = model(data)
        loss = F.mse_loss(outputs, data)
        if reg is not None and step >= warmup:
            loss = loss + reg.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        encoded, outputs = model(x_test)
    model.train()
    if reg is not None:
        reg.remove()
    return {
        "active_fraction": float((encoded > 0).float().mean()),
        "unit_fractions": (encoded > 0).float().mean(dim=0).tolist(),
        "mse": float(F.mse_loss(outputs, x_test)),
        "mse_of_mean": float((x_test - x_test.mean(0)).square().mean()),
        "model": model,
    }


def gradient_check(seed: int = 0) -> tuple[actsparse.GradientReport, list[actsparse.GradientReport]]:
    """One forward of a fresh model: the question's KL and actsparse's penalty, term by term."""
    torch.manual_seed(seed)
    model = SparseAutoencoder()
    reg = actsparse.attach(model, {"enc3": frequency_penalty()})
    data = make_data(BATCH, seed)
    encoded, outputs = model(data)
    mse = F.mse_loss(outputs, data)
    (theirs,) = actsparse.gradient_report(model, {"question's KL": question_kl(encoded, BATCH)}, warn=False)
    ours = reg.diagnose(mse + reg.penalty(), warn=False)
    reg.remove()
    return theirs, ours


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"Adam steps per run (default {STEPS})")
    args = parser.parse_args(argv)

    theirs, ours = gradient_check()
    print("Does each loss term reach the parameters? (one forward of an untrained model)")
    for report in (theirs, *ours):
        print(f"  {report}")
    print("  (the question's value is NaN as well: dividing the count by batch_size/20 gives rho_hat up to 20)\n")

    print(f"FrequencyKL(target={RHO}, weight={BETA}, threshold=0.0, bandwidth={BANDWIDTH}) on 'enc3'; "
          f"Adam lr={LR:g}, batch {BATCH}, {args.steps} steps, penalty from step {min(WARMUP, args.steps // 3)}")
    print("active fraction = mean of (encoded > 0) over a held-out batch of 1,024 samples\n")
    header = (f"{'seed':>4}  {'active: without':>15}  {'with':>6}  {'MSE: without':>12}  {'with':>8}  "
              f"{'MSE of mean':>11}  per-unit fractions with penalty")
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    for seed in args.seeds:
        off = train(seed, sparsity=False, steps=args.steps)
        on = train(seed, sparsity=True, steps=args.steps)
        units = " ".join(f"{f:.2f}" for f in on["unit_fractions"])
        print(f"{seed:>4}  {off['active_fraction']:>15.3f}  {on['active_fraction']:>6.3f}  {off['mse']:>12.5f}  "
              f"{on['mse']:>8.5f}  {on['mse_of_mean']:>11.5f}  {units}")
    print(f"\n{2 * len(args.seeds)} runs in {time.perf_counter() - start:.1f} s; target ρ = {RHO}")


if __name__ == "__main__":
    main()
