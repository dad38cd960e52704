"""Sparse autoencoders: activations, the one-layer SAE, stacks."""

from .activations import ACTIVATIONS, BatchTopK, JumpReLU, KSparse, ReLU, Sigmoid, TopK, get_activation
from .sae import ForwardOutput, SparseAutoencoder

__all__ = [
    "ACTIVATIONS",
    "BatchTopK",
    "ForwardOutput",
    "JumpReLU",
    "KSparse",
    "ReLU",
    "Sigmoid",
    "SparseAutoencoder",
    "TopK",
    "get_activation",
]
