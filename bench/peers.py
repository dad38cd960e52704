"""TopK-SAE trainers of two peer libraries, driven the same way as actsparse's, for the benchmarks.

Each ``make_*`` returns a :class:`Contender`: ``step(x)`` is one training step on a batch
``x`` ``(batch, d_in)`` (forward, the peer's own reconstruction loss, backward, the decoder
handling the peer's own trainer does, a plain ``torch.optim.Adam`` step at ``lr``), and
``reconstruct(x)`` is x̂ ``(batch, d_in)`` without gradients, for the FVU.

What is made the same for every contender, so that they do the same work:

* the optimiser: ``torch.optim.Adam(params, lr, fused=fused)``, the same for all (``fused``: the
  one-kernel implementation actsparse's trainer uses); no learning-rate warm-up or schedule,
  no gradient clipping (sae-lens's trainer clips the gradient norm to 1, sparsify's picks its
  own lr and defaults to Signum; neither is done here);
* the auxiliary (AuxK, dead-latent) loss is off: sparsify gets no ``dead_mask``, sae-lens a
  ``dead_neuron_mask`` of None, and both then return a constant 0 for it;
* float32 on the CPU, no autocast.

What stays each peer's own: its initialisation, its loss (sparsify: FVU; sae-lens: squared
error summed over features, averaged over the batch) and its decoder-norm handling.

The peers are imported lazily, and are not dependencies of actsparse: they are installed only
in the benchmark's environment (``bench/requirements-peers.txt``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class Contender(NamedTuple):
    """One trainer under test.

    Attributes:
        step: one training step on ``x`` ``(batch, d_in)``.
        reconstruct: x̂ ``(batch, d_in)`` for ``x`` ``(batch, d_in)``, without gradients.
        version: the library's version.
        notes: how it is driven, for the result file.
    """

    step: Callable[[Tensor], None]
    reconstruct: Callable[[Tensor], Tensor]
    version: str
    notes: str


def _missing(package: str, module: str) -> ImportError:
    return ImportError(f"the peer library {package!r} (module {module!r}) is not installed; "
                       "install it in the benchmark's environment, see bench/requirements-peers.txt")


def make_sparsify(d_in: int, d_sae: int, k: int, lr: float, seed: int, fused: bool = False) -> Contender:
    """EleutherAI's ``sparsify.SparseCoder`` (PyPI ``eai-sparsify``): a TopK SAE with a fused
    encoder (dense matmul, then top-k, with a sparse backward) and a sparse ``embedding_bag``
    decoder. Its trainer's step, for ``loss_fn="fvu"`` and ``auxk_alpha=0``: unit-norm decoder
    rows before the forward, loss = FVU, remove the gradient parallel to each decoder row."""
    try:
        # sparsify prints which decoder it picked (no Triton on CPU) on import: keep stdout JSON-only
        with contextlib.redirect_stdout(sys.stderr):
            from sparsify import SaeConfig, SparseCoder
    except ImportError as e:
        raise _missing("eai-sparsify", "sparsify") from e
    from importlib.metadata import version

    torch.manual_seed(seed)
    model = SparseCoder(d_in, SaeConfig(activation="topk", num_latents=d_sae, k=k, normalize_decoder=True),
                        device="cpu", dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=fused)

    def step(x: Tensor) -> None:
        # as sparsify.Trainer: renormalise before the forward (the Adam step moved the rows)
        model.set_decoder_norm_to_unit_norm()
        out = model(x)  # no dead_mask: auxk_loss is a constant 0
        out.fvu.backward()
        model.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def reconstruct(x: Tensor) -> Tensor:
        return model(x).sae_out

    return Contender(step, reconstruct, version("eai-sparsify"),
                     "SparseCoder(topk, normalize_decoder); loss=fvu; no AuxK; decoder rows renormalised before "
                     "each forward and parallel gradient removed; sparse embedding_bag decoder (no Triton on CPU); "
                     "sparsify's b_dec init to the data mean at step 0 is not done")


def make_saelens(d_in: int, d_sae: int, k: int, lr: float, seed: int, fused: bool = False) -> Contender:
    """sae-lens's ``TopKTrainingSAE`` with its default config (decoder rows initialised to norm
    0.1, pre-activations rescaled by the decoder-row norms instead of normalising the decoder,
    dense activations and decoder). Loss = ``training_forward_pass(...).loss`` (the MSE loss;
    the AuxK term is 0 without a dead-neuron mask)."""
    try:
        import sae_lens
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except ImportError as e:
        raise _missing("sae-lens", "sae_lens") from e

    torch.manual_seed(seed)
    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu")
    model = TopKTrainingSAE(cfg)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=fused)
    n_steps = 0

    def step(x: Tensor) -> None:
        nonlocal n_steps
        out = model.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=None,  # no mask: the AuxK term is 0
            n_training_steps=n_steps, is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_steps += 1

    @torch.no_grad()
    def reconstruct(x: Tensor) -> Tensor:
        return model.decode(model.encode(x))

    return Contender(step, reconstruct, sae_lens.__version__,
                     "TopKTrainingSAE default cfg (rescale_acts_by_decoder_norm, decoder_init_norm=0.1, dense "
                     "activations); loss=training_forward_pass().loss (mse summed over d_in, mean over batch); "
                     "no AuxK (dead_neuron_mask=None); the trainer's clip_grad_norm_(1.0) and lr schedule not done")
