"""Seed 002 in Keras 3: the sparse autoencoder's KL as an activity regularizer, with actsparse's math.

    pip install -e '.[keras,cli]'      # from a clone, in its folder (released: pip install 'actsparse[keras,cli]')
                                       # keras, and scikit-learn for the digits
    python examples/keras_activity_regularizer.py          # about 10 s on 2 cores (torch backend)
    KERAS_BACKEND=jax python examples/keras_activity_regularizer.py

A 64→25→64 sigmoid autoencoder on scikit-learn's 8×8 digits (scaled to [0, 1]), trained with Adam
twice from the same initial weights: with ``BernoulliKL(0.05, weight=3)`` on the hidden layer and
without. The script prints the mean hidden activation ρ̂ and the reconstruction MSE of both, checks
that the term Keras puts in ``model.losses`` is actsparse's β Σ_j KL(ρ ‖ ρ̂_j) on the same batch
(not divided by the batch size, whatever Keras does with it), and saves and reloads the model as a
``.keras`` file.
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "torch")  # the backend is read when keras is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from keras import ops  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import actsparse  # noqa: E402
from actsparse.integrations.keras import BernoulliKL  # noqa: E402

RHO, BETA = 0.05, 3.0


def build(regularizer: keras.regularizers.Regularizer | None) -> keras.Model:
    keras.utils.set_random_seed(0)  # the same initial weights for both models
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(25, activation="sigmoid", activity_regularizer=regularizer, name="hidden"),
        keras.layers.Dense(64, activation="sigmoid", name="decoder"),
    ])


def main() -> None:
    start = time.perf_counter()
    x = (load_digits().data / 16.0).astype("float32")  # (1797, 64) in [0, 1]
    results = {}
    for name, reg in [("BernoulliKL", BernoulliKL(RHO, weight=BETA)), ("none", None)]:
        model = build(reg)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        model.fit(x, x, batch_size=128, epochs=25, verbose=0)
        encoder = keras.Model(model.inputs, model.get_layer("hidden").output)
        rho_hat = float(encoder.predict(x, verbose=0).mean())
        mse = float(((model.predict(x, verbose=0) - x) ** 2).mean())
        results[name] = model
        print(f"{name:>12}: mean hidden activation {rho_hat:.3f} (target {RHO}), reconstruction MSE {mse:.4f}")

    # The batch convention: what Keras adds to the loss is actsparse's penalty on the same batch.
    model = results["BernoulliKL"]
    batch = x[:128]
    model(batch, training=True)
    in_losses = float(ops.convert_to_numpy(model.losses[0]))
    h = torch.as_tensor(keras.Model(model.inputs, model.get_layer("hidden").output).predict(batch, verbose=0))
    reference = float(actsparse.BernoulliKL(RHO, weight=BETA)(h))
    print(f"model.losses {in_losses:.6f} = actsparse.BernoulliKL {reference:.6f} "
          f"(β Σ_j KL(ρ‖ρ̂_j), not divided by the batch of {len(batch)})")
    assert abs(in_losses - reference) <= 1e-6 + 1e-5 * abs(reference)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sparse_ae.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)  # the regularizer is registered: no custom_objects
        print("reloaded:", loaded.get_layer("hidden").activity_regularizer)
        np.testing.assert_allclose(loaded.predict(batch, verbose=0), model.predict(batch, verbose=0), rtol=1e-6)
    print(f"backend {keras.backend.backend()}, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
