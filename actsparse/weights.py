"""``model.safetensors``: the exported weights of a run, written and read in one place."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import atomic_write

__all__ = ["save_weights", "load_weights"]


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``state`` (name -> CPU tensor) to ``path`` atomically, as safetensors."""
    from safetensors.torch import save_file

    atomic_write(Path(path), lambda p: save_file(state, str(p), metadata=metadata or {}))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a ``model.safetensors`` written by :func:`save_weights`."""
    from safetensors.torch import load_file

    return load_file(str(path))
