"""Adapters for other frameworks, each an optional extra imported only when used.

* :mod:`actsparse.integrations.keras` — Keras 3 activity regularizers (from a clone: ``pip install -e '.[keras]'``;
released: ``pip install 'actsparse[keras]'``),
  written with ``keras.ops`` so they run on every Keras backend.
* :mod:`actsparse.integrations.lightning` — a Lightning callback that attaches penalties to a
  ``LightningModule`` and adds them to its training loss (from a clone: ``pip install -e '.[lightning]'``;
  released: ``pip install 'actsparse[lightning]'``).

Importing :mod:`actsparse` imports neither Keras nor Lightning; import the submodule you need.
"""

__all__: list[str] = []
