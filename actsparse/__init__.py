"""actsparse: sparsity penalties on the hidden activations of any PyTorch network.

>>> import actsparse
>>> reg = actsparse.attach(model, {"encoder.2": actsparse.BernoulliKL(0.05, weight=3.0)})
>>> loss = criterion(model(x), x) + reg.penalty()

Pure functions live in :mod:`actsparse.functional`; penalty objects, :func:`attach`,
:func:`regularize` and :class:`KLSparseReg` are exported here.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING

# The names below are imported on first use (PEP 562), not with the package: ``actsparse.cli``
# starts without importing torch, so a Ctrl-C or SIGTERM in the first second of a command ends
# with one line instead of a traceback from inside torch's import.
_EXPORTS = {
    "functional": None,
    "Attachment": "attach", "TargetStats": "attach", "attach": "attach", "find_targets": "attach",
    "regularize": "attach",
    "GradientReport": "diagnose", "gradient_report": "diagnose",
    "relative_gradient_error": "gradcheck",
    "KLSparseReg": "identity_attach",
    "L0": "penalties", "L1": "penalties", "Lp": "penalties", "L2": "penalties", "PENALTIES": "penalties",
    "BernoulliKL": "penalties",
    "FrequencyKL": "penalties", "Hoyer": "penalties", "Penalty": "penalties", "PenaltyOf": "penalties",
    "PenaltySum": "penalties",
    "PoissonKL": "penalties", "RatePenalty": "penalties", "get_penalty": "penalties",
    "TargetSparsity": "control", "TargetNotReachedWarning": "control",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from . import functional
    from .attach import Attachment, TargetStats, attach, find_targets, regularize
    from .control import TargetNotReachedWarning, TargetSparsity
    from .diagnose import GradientReport, gradient_report
    from .gradcheck import relative_gradient_error
    from .identity_attach import KLSparseReg
    from .penalties import (
        L0,
        L1,
        L2,
        PENALTIES,
        BernoulliKL,
        FrequencyKL,
        Hoyer,
        Lp,
        Penalty,
        PenaltyOf,
        PenaltySum,
        PoissonKL,
        RatePenalty,
        get_penalty,
    )


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'actsparse' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name] or name}", __name__)
    value = module if _EXPORTS[name] is None else getattr(module, name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The package's module type. Importing the submodule ``actsparse.attach`` makes Python set the
    package's attribute ``attach`` to that module, over the exported function of the same name (an
    eager ``from .attach import attach`` used to set it back); the function stays exported."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "attach" and isinstance(value, types.ModuleType):
            value = value.attach
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"

__all__ = [
    "__version__",
    "functional",
    # penalties
    "Penalty",
    "PenaltyOf",
    "RatePenalty",
    "PenaltySum",
    "BernoulliKL",
    "PoissonKL",
    "FrequencyKL",
    "L0",
    "L1",
    "Lp",
    "L2",
    "Hoyer",
    "PENALTIES",
    "get_penalty",
    "TargetSparsity",
    "TargetNotReachedWarning",
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
