"""Sparse autoencoders: activations, the one-layer SAE, stacks."""

from .activations import ACTIVATIONS, BatchTopK, JumpReLU, KSparse, ReLU, Sigmoid, TopK, get_activation
from .sae import ForwardOutput, SparseAutoencoder
from .stacked import StackedAutoencoder

__all__ = [
    "ACTIVATIONS",
    "BatchTopK",
    "ForwardOutput",
    "JumpReLU",
    "KSparse",
    "ReLU",
    "Sigmoid",
    "SparseAutoencoder",
    "StackedAutoencoder",
    "TopK",
    "get_activation",
]
