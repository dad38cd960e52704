"""The errors and warnings of a training run."""

from __future__ import annotations

__all__ = ["TrainingError", "TrainingWarning", "NonFiniteError"]


class TrainingError(RuntimeError):
    """Training cannot go on; the message names the step."""


class TrainingWarning(UserWarning):
    """Training went on after a recoverable problem (e.g. a rollback after a NaN)."""


class NonFiniteError(TrainingError):
    """The loss or the weights became NaN/Inf.

    Attributes:
        step: the first step whose loss was not finite.
        terms: the loss terms at that step (``loss``, ``reconstruction``, ``penalty``,
            ``weight_decay``, ``auxk``), as floats.
    """

    def __init__(self, step: int, terms: dict[str, float], message: str) -> None:
        super().__init__(message)
        self.step, self.terms = step, terms
