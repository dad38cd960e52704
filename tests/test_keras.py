"""Keras 3 activity regularizers against actsparse's PyTorch penalties, through Keras' torch backend.

References: the value and gradient of ``actsparse.BernoulliKL`` & co. on identical activations,
and ``model.losses`` after a forward (which shows the batch convention that Keras applies).
"""

from __future__ import annotations

import os

import pytest
import torch

# The backend is fixed when keras is first imported: this must come first.
os.environ["KERAS_BACKEND"] = "torch"
_DEFAULT_DTYPE, _DEFAULT_DEVICE = torch.get_default_dtype(), torch.get_default_device()

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("keras was imported earlier with another backend", allow_module_level=True)

import numpy as np  # noqa: E402
from keras import ops  # noqa: E402
from test_docs import doc_blocks, run_doc_block  # noqa: E402 (tests/ is on sys.path)

import actsparse  # noqa: E402
from actsparse.integrations import keras as ak  # noqa: E402

TOL = dict(rtol=1e-6, atol=1e-7)

# Keras' own saving code converts its variables with np.array(copy=False) (numpy 2 warns).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _torch_rng_restored():
    """keras.utils.set_random_seed reseeds torch's global generator: give it back afterwards."""
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)


def pairs():
    """(Keras regularizer, the actsparse penalty it must equal)."""
    return [
        pytest.param(ak.BernoulliKL(0.05, weight=3), actsparse.BernoulliKL(0.05, weight=3), id="bernoulli"),
        pytest.param(ak.PoissonKL(0.3, weight=0.5), actsparse.PoissonKL(0.3, weight=0.5), id="poisson"),
        pytest.param(ak.FrequencyKL(0.1, weight=2, threshold=0.5, bandwidth=0.2),
                     actsparse.FrequencyKL(0.1, weight=2, threshold=0.5, bandwidth=0.2), id="frequency"),
        pytest.param(ak.L1(0.01), actsparse.L1(0.01), id="l1"),
    ]


def activations(shape=(50, 30), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=dtype)
    a[:, 0] = 0.0  # a dead unit: ρ̂ = 0, clamped straight-through
    a[:, 1] = 1.0  # a saturated unit: ρ̂ = 1
    return a


def value_and_grad(fn, a):
    x = a.clone().requires_grad_(True)
    v = fn(x)
    v.backward()
    return v.detach(), x.grad


@pytest.mark.parametrize(("reg", "ref"), pairs())
@pytest.mark.parametrize("shape", [(50, 30), (8, 5, 5, 12)], ids=["dense", "conv_nhwc"])
def test_value_and_gradient_equal_actsparse(reg, ref, shape):
    a = activations(shape)
    v, g = value_and_grad(reg.penalty, a)
    v_ref, g_ref = value_and_grad(ref, a)
    torch.testing.assert_close(v, v_ref, **TOL)
    torch.testing.assert_close(g, g_ref, **TOL)
    assert g.abs().sum() > 0


@pytest.mark.parametrize(("reg", "ref"), pairs())
def test_float64_stays_float64(reg, ref):
    a = activations(dtype=torch.float64)
    v, g = value_and_grad(reg.penalty, a)
    v_ref, g_ref = value_and_grad(ref, a)
    assert v.dtype == torch.float64
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)


def test_frequency_with_nan_and_inf_activations_equals_actsparse():
    """A NaN never fires and an infinite activation always does; neither gets a gradient. (The
    PyTorch penalty raises on NaN activations by default; ``check=False`` gives the bare formula.)"""
    a = activations()
    a[3, 5], a[7, 6], a[9, 7] = float("nan"), float("inf"), -float("inf")
    kwargs = dict(weight=2, threshold=0.5, bandwidth=0.2)
    reg, ref = ak.FrequencyKL(0.1, **kwargs), actsparse.FrequencyKL(0.1, check=False, **kwargs)
    with pytest.raises(ValueError, match="NaN"):
        actsparse.FrequencyKL(0.1, **kwargs)(a)
    v, g = value_and_grad(reg.penalty, a)
    v_ref, g_ref = value_and_grad(ref, a)
    torch.testing.assert_close(v, v_ref, **TOL)
    torch.testing.assert_close(g, g_ref, **TOL)
    assert torch.isfinite(g).all()


def test_half_precision_reduces_in_float32():
    a = activations().to(torch.float16)
    v = ak.BernoulliKL(0.05, weight=3).penalty(a)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, actsparse.BernoulliKL(0.05, weight=3)(a.float()), rtol=1e-6, atol=1e-6)


def test_the_batch_division_flag_matches_installed_keras():
    """A regularizer that returns 1: what reaches layer.losses shows what Keras does with it."""
    layer = keras.layers.Identity(activity_regularizer=lambda x: ops.ones(()))
    layer(torch.rand(8, 3))
    expected = 1 / 8 if ak.KERAS_DIVIDES_BY_BATCH else 1.0
    assert float(sum(layer.losses)) == pytest.approx(expected)


@pytest.mark.parametrize(("reg", "ref"), pairs())
@pytest.mark.parametrize("batch", [8, 64])
def test_layer_losses_and_gradient_equal_actsparse(reg, ref, batch):
    """The term in layer.losses is actsparse's penalty, whatever the batch size, with its gradient."""
    a = activations((batch, 30), seed=batch)
    layer = keras.layers.Identity(activity_regularizer=reg)

    def keras_loss(x):
        layer(x)
        (loss,) = layer.losses
        return loss

    v, g = value_and_grad(keras_loss, a)
    v_ref, g_ref = value_and_grad(ref, a)
    torch.testing.assert_close(v, v_ref, **TOL)
    torch.testing.assert_close(g, g_ref, **TOL)


def test_model_losses_after_forward():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).random((32, 20), dtype=np.float32)
    model = keras.Sequential([
        keras.Input((20,)),
        keras.layers.Dense(30, activation="sigmoid", activity_regularizer=ak.BernoulliKL(0.05, weight=3)),
        keras.layers.Dense(16, activation="relu", activity_regularizer=ak.L1(1e-3)),
    ])
    model(x, training=True)
    kl_loss, l1_loss = model.losses
    dense1, dense2 = model.layers
    h1 = dense1(x)
    h2 = dense2(h1)
    torch.testing.assert_close(kl_loss, actsparse.BernoulliKL(0.05, weight=3)(h1), **TOL)
    torch.testing.assert_close(l1_loss, actsparse.L1(1e-3)(h2), **TOL)
    # Keras' own L1 activity regularizer follows the installed Keras' convention; on Keras >= 3.14
    # it is the same λ Σ|a| / batch.
    if ak.KERAS_DIVIDES_BY_BATCH:
        own = keras.layers.Identity(activity_regularizer=keras.regularizers.L1(1e-3))
        own(h2)
        torch.testing.assert_close(own.losses[0], l1_loss, **TOL)


@pytest.mark.parametrize(("reg", "ref"), pairs())
def test_config_round_trip(reg, ref):
    config = reg.get_config()
    again = type(reg).from_config(config)
    assert again.get_config() == config
    restored = keras.regularizers.deserialize(keras.regularizers.serialize(reg))
    assert type(restored) is type(reg) and restored.get_config() == config
    a = activations()
    torch.testing.assert_close(restored.penalty(a), reg.penalty(a), rtol=0, atol=0)


def test_save_and_load_keras_model(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(8, activation="sigmoid", activity_regularizer=ak.FrequencyKL(0.2, weight=2, threshold=0.5)),
        keras.layers.Dense(6, activation="relu", activity_regularizer=ak.PoissonKL(0.1, weight=0.5)),
        keras.layers.Dense(12),
    ])
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects: the classes are registered
    for before, after in zip(model.layers, loaded.layers):
        r0, r1 = before.activity_regularizer, after.activity_regularizer
        assert type(r0) is type(r1)
        if r0 is not None:
            assert r1.get_config() == r0.get_config()
    x = np.random.default_rng(1).random((16, 12), dtype=np.float32)
    model(x, training=True)
    loaded(x, training=True)
    for a, b in zip(model.losses, loaded.losses):
        torch.testing.assert_close(a, b, **TOL)


def test_fit_moves_the_mean_activation_toward_rho():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).random((256, 20), dtype=np.float32)
    hidden = keras.layers.Dense(16, activation="sigmoid", activity_regularizer=ak.BernoulliKL(0.05, weight=3))
    model = keras.Sequential([keras.Input((20,)), hidden, keras.layers.Dense(20)])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    before = float(ops.mean(hidden(x)))
    model.fit(x, x, batch_size=64, epochs=8, verbose=0)
    after = float(ops.mean(hidden(x)))
    assert before > 0.3 and after < 0.1, (before, after)


def test_bernoulli_on_relu_raises_and_points_to_poisson():
    a = torch.relu(torch.randn(32, 10) + 2.0)  # every ρ̂_j > 1
    layer = keras.layers.Identity(activity_regularizer=ak.BernoulliKL(0.1))
    with pytest.raises(ValueError, match="PoissonKL"):
        layer(a)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ak.PoissonKL(0.1).penalty(torch.full((4, 3), float("nan")))
    with pytest.raises(ValueError, match="NaN or Inf"):
        ak.L1(0.1).penalty(torch.full((4, 3), float("inf")))


def test_argument_errors():
    with pytest.raises(ValueError, match="between 0 and 1"):
        ak.BernoulliKL(1.5)
    with pytest.raises(ValueError, match="weight"):
        ak.L1(-1.0)
    with pytest.raises(TypeError, match="threshold must be a float"):
        ak.FrequencyKL(0.1, threshold=torch.zeros(3))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        ak.BernoulliKL(0.1).penalty(torch.rand(5))
    with pytest.raises(TypeError, match="floating-point"):
        ak.BernoulliKL(0.1).penalty(torch.ones(5, 3, dtype=torch.int64))


@pytest.mark.parametrize(("line", "code"), doc_blocks("integrations.md", "integrations.keras"))
def test_docs_examples_run(line, code):
    run_doc_block("integrations.md", line, code)


def test_torch_global_state_unchanged_by_keras():
    assert torch.get_default_dtype() == _DEFAULT_DTYPE
    assert torch.get_default_device() == _DEFAULT_DEVICE
    assert torch.is_grad_enabled()
