"""actsparse: sparsity penalties on the hidden activations of any PyTorch network.

>>> import actsparse
>>> reg = actsparse.attach(model, {"encoder.2": actsparse.BernoulliKL(0.05, weight=3.0)})
>>> loss = criterion(model(x), x) + reg.penalty()

Pure functions live in :mod:`actsparse.functional`; penalty objects, :func:`attach`,
:func:`regularize` and :class:`KLSparseReg` are exported here.
"""

from . import functional
from .attach import Attachment, TargetStats, attach, find_targets, regularize
from .diagnose import GradientReport, gradient_report
from .gradcheck import relative_gradient_error
from .identity_attach import KLSparseReg
from .penalties import (
    L1,
    L2,
    PENALTIES,
    BernoulliKL,
    FrequencyKL,
    Hoyer,
    Penalty,
    PenaltySum,
    PoissonKL,
    RatePenalty,
    get_penalty,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "functional",
    # penalties
    "Penalty",
    "RatePenalty",
    "PenaltySum",
    "BernoulliKL",
    "PoissonKL",
    "FrequencyKL",
    "L1",
    "L2",
    "Hoyer",
    "PENALTIES",
    "get_penalty",
    # attaching
    "attach",
    "regularize",
    "find_targets",
    "Attachment",
    "TargetStats",
    "KLSparseReg",
    # checking
    "gradient_report",
    "GradientReport",
    "relative_gradient_error",
]
