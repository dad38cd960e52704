"""Sparse autoencoders: activations, the one-layer SAE, stacks."""

from .activations import ACTIVATIONS, BatchTopK, Gated, JumpReLU, KSparse, ReLU, Sigmoid, TopK, get_activation
from .sae import ForwardOutput, SparseAutoencoder
from .sparse_topk import SparseCode
from .stacked import StackedAutoencoder

__all__ = [
    "ACTIVATIONS",
    "BatchTopK",
    "ForwardOutput",
    "Gated",
    "JumpReLU",
    "KSparse",
    "ReLU",
    "Sigmoid",
    "SparseAutoencoder",
    "SparseCode",
    "StackedAutoencoder",
    "TopK",
    "get_activation",
]
