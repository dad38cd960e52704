"""Language models for SAE demos and evaluation with nothing downloaded: the Python standard library
as a byte corpus (:mod:`.corpus`) and a byte-level tiny GPT-2 trained on it (:mod:`.byte_lm`).
transformers is needed for the model (an optional extra), not for the corpus."""

from .byte_lm import LMRecipe, bits_per_byte, build_byte_gpt2, cache_root, stdlib_lm, train_byte_lm
from .corpus import BOS, ByteCorpus, ngram_bits_per_byte, stdlib_corpus

__all__ = ["BOS", "ByteCorpus", "LMRecipe", "bits_per_byte", "build_byte_gpt2", "cache_root", "ngram_bits_per_byte",
           "stdlib_corpus", "stdlib_lm", "train_byte_lm"]
