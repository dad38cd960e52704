"""Buffers whose size is known only after the first batch (one value per unit)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


def adopt_saved_shapes(module: nn.Module, state_dict: Mapping[str, Tensor], prefix: str, *names: str) -> None:
    """Before ``load_state_dict`` copies into them, resize lazily-shaped buffers to the saved shape.

    Call from ``_load_from_state_dict``: an unused module holds ``torch.empty(0)`` and would
    otherwise reject a saved ``(units,)`` buffer with a size mismatch.
    """
    for name in names:
        key = prefix + name
        if key in state_dict:
            current = getattr(module, name)
            setattr(module, name, torch.empty_like(state_dict[key], device=current.device))
