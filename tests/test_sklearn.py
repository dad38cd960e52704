"""actsparse.sklearn: the scikit-learn estimator contract, and that fit is the library's trainer."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", minversion="1.6")  # the estimator API actsparse.sklearn uses

from sklearn.base import clone  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import MinMaxScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import actsparse.sklearn as sk  # noqa: E402
from actsparse.config import TrainConfig  # noqa: E402
from actsparse.sklearn import SparseAutoencoderTransformer  # noqa: E402

#: Tiny models, so that the ~47 checks (each fits a few times on 20-30 samples) take seconds:
#: the default (ReLU + L1, full-batch L-BFGS) and a minibatch TopK SAE in float64.
CHECKED = [
    SparseAutoencoderTransformer(8, iterations=10),
    SparseAutoencoderTransformer(6, activation="topk", k=2, penalty=None, optimizer="adam", epochs=1, batch_size=16,
                                 dtype="float64"),
]


def _expected_failed_checks(estimator) -> dict[str, str]:
    # Every check that applies passes: no sample_weight, no sparse input (refused with
    # scikit-learn's own TypeError, which check_estimator_sparse_* accept), y ignored.
    return {}


@parametrize_with_checks(CHECKED, expected_failed_checks=_expected_failed_checks)
def test_sklearn_estimator_checks(estimator, check) -> None:
    check(estimator)


@pytest.fixture
def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((60, 10))


def test_fit_trains_with_actsparse_train(monkeypatch, data) -> None:
    calls = []
    real = sk.train

    def spy(cfg, x, **kwargs):
        calls.append((cfg, x))
        return real(cfg, x, **kwargs)

    monkeypatch.setattr(sk, "train", spy)
    est = SparseAutoencoderTransformer(12, activation="topk", k=3, penalty=None, weight_decay=1e-4, iterations=7,
                                       seed=3).fit(data)
    (cfg, x), = calls
    assert isinstance(cfg, TrainConfig)
    assert (cfg.hidden, cfg.activation, cfg.k, cfg.penalty, cfg.weight_decay, cfg.iterations, cfg.seed, cfg.decoder) \
        == (12, "topk", 3, None, 1e-4, 7, 3, "linear")
    assert (cfg.plots, cfg.progress, cfg.validation, cfg.device) == (False, False, 0.0, "cpu")
    assert x.shape == (60, 10) and x.dtype == torch.float32
    assert est.n_iter_ == 7 and est.n_features_in_ == 10


def test_transform_is_the_models_code(data) -> None:
    est = SparseAutoencoderTransformer(16, activation="topk", k=4, penalty=None, iterations=20).fit(data)
    code = est.transform(data)
    assert code.shape == (60, 16) and code.dtype == np.float32
    assert ((code != 0).sum(1) <= 4).all()
    with torch.no_grad():
        x = torch.tensor(data, dtype=torch.float32)
        np.testing.assert_array_equal(code, est.model_.encode(x).numpy())
        np.testing.assert_allclose(est.inverse_transform(code), est.model_.decode(est.model_.encode(x)).numpy(),
                                   rtol=1e-6, atol=1e-6)
    # components_ are the decoder atoms: inverse_transform is code @ components_ + b_dec
    np.testing.assert_allclose(est.inverse_transform(code), code @ est.components_ + est.model_.b_dec.detach().numpy(),
                               rtol=1e-5, atol=1e-5)
    assert est.components_.shape == (16, 10)
    # score is 1 − FVU; on the training data it is the trainer's own FVU
    assert est.score(data) == pytest.approx(1 - est.metrics_["fvu"], abs=1e-5)
    assert list(est.get_feature_names_out()[:2]) == ["sparseautoencodertransformer0", "sparseautoencodertransformer1"]


def test_fit_is_reproducible_and_leaves_the_torch_rng_alone(data) -> None:
    state = torch.get_rng_state()
    a = SparseAutoencoderTransformer(8, iterations=5, seed=1).fit_transform(data)
    assert torch.equal(torch.get_rng_state(), state)
    b = clone(SparseAutoencoderTransformer(8, iterations=5, seed=1)).fit(data).transform(data)
    np.testing.assert_array_equal(a, b)
    c = SparseAutoencoderTransformer(8, iterations=5, seed=2).fit_transform(data)
    assert not np.array_equal(a, c)


def test_numpy_scalars_from_a_grid_are_accepted(data) -> None:
    est = SparseAutoencoderTransformer(np.int64(5), weight=np.float32(1e-3), iterations=np.int64(3)).fit(data)
    assert est.transform(data).shape == (60, 5)


@pytest.mark.parametrize(("params", "message"), [
    ({"activation": "topk"}, "activation topk needs k"),
    ({"hidden": 0}, "hidden must be a positive integer"),
    ({"penalty": "nope"}, "unknown penalty 'nope'; valid:"),
    ({"activation": "topk", "k": 99, "hidden": 4}, "k 99 is larger than hidden 4"),
    ({"lr": -1.0}, "lr must be a finite number"),
    ({"dtype": "float16"}, "dtype must be 'float32' or 'float64'"),
    ({"device": "tpu"}, "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bad_parameters_are_named(params, message, data) -> None:
    est = SparseAutoencoderTransformer(**params)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        est.fit(data)


def test_bad_input(data) -> None:
    bad = data.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SparseAutoencoderTransformer(4, iterations=2).fit(bad)
    with pytest.raises(ValueError, match="minimum of 2 is required"):
        SparseAutoencoderTransformer(4, iterations=2).fit(data[:1])
    est = SparseAutoencoderTransformer(4, iterations=2).fit(data)
    with pytest.raises(ValueError, match="X has 9 features, but SparseAutoencoderTransformer is expecting 10"):
        est.transform(data[:, :9])
    with pytest.raises(ValueError, match="expecting 4 \\(the number of hidden units\\)"):
        est.inverse_transform(np.zeros((2, 5)))


def test_in_a_pipeline_with_a_classifier() -> None:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = X[:400], y[:400]
    pipe = Pipeline([("scale", MinMaxScaler()),
                     ("sae", SparseAutoencoderTransformer(32, activation="topk", k=8, penalty=None, iterations=30)),
                     ("clf", LogisticRegression(max_iter=500))])
    pipe.fit(X[:300], y[:300])
    assert pipe.named_steps["sae"].transform(MinMaxScaler().fit(X[:300]).transform(X[:5])).shape == (5, 32)
    assert pipe.score(X[300:], y[300:]) > 0.8  # 10 classes: chance is 0.1


def test_only_actsparse_sklearn_imports_sklearn_at_module_level() -> None:
    """The core must import without scikit-learn: no other module imports it outside a function.
    (A static check of every module: a subprocess importing them all costs seconds of torch import.)"""
    root = Path(sk.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path == Path(sk.__file__):
            continue
        for node in ast.parse(path.read_text()).body:  # module level only: function bodies import lazily
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            if any(n == "sklearn" or n.startswith("sklearn.") for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, f"sklearn imported at module level in {offenders}"
