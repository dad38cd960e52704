"""A Lightning callback that attaches actsparse penalties to a ``LightningModule`` and trains them.

>>> from actsparse.integrations.lightning import SparsityCallback
>>> cb = SparsityCallback({"net.1": actsparse.BernoulliKL(0.05, weight=3)})
>>> Trainer(callbacks=[cb]).fit(module)

At ``on_fit_start`` the callback runs ``actsparse.attach(pl_module, targets)`` (targets are module
names relative to the ``LightningModule``, globs, classes or instances; penalties declared with
:func:`actsparse.regularize` are collected too) and removes the hooks at ``on_fit_end``, or when
fit raises (``on_exception``).

**How the penalty reaches the loss.** Lightning has no callback hook that may change the loss.
``on_before_backward(trainer, pl_module, loss)`` sees it, but its return value is ignored, and the
automatic-optimisation loop calls ``backward`` on what ``training_step`` returned
(``lightning/pytorch/loops/optimization/automatic.py``: ``_AutomaticOptimization._training_step``
passes the step's output to ``ClosureResult.from_training_step_output``, which divides it by
``accumulate_grad_batches``). So the callback wraps the module's ``training_step`` for the
duration of fit: an instance attribute shadows the method (the class is untouched, and the
attribute is deleted at fit end), and it adds ``reg.penalty()`` of that step's forward to the
returned loss — a tensor, or the ``"loss"`` entry of a dict; a step that returns ``None`` is
skipped as Lightning skips it. Lightning's strategies call ``lightning_module.training_step`` by
attribute (``Strategy.training_step``, also through the DDP forward redirection), so the wrapped
step is the one that runs. Gradient accumulation divides the penalty with the loss.

Manual optimisation (``automatic_optimization = False``) is refused with a clear error: there the
module calls ``manual_backward`` itself, so use ``actsparse.attach`` in the module directly.

**Logging.** Each training step logs, with ``pl_module.log`` (``on_step=True``):
``sparsity/penalty`` (the total) and ``sparsity/<target>/penalty``, as detached tensors (no host
sync). With ``log_stats=True`` it also logs ``sparsity/<target>/rho_hat`` (mean over units of
ρ̂_j) and ``sparsity/<target>/active_fraction`` from :meth:`actsparse.Attachment.stats`, computed
only on the steps that Lightning writes to its loggers (``log_every_n_steps``), since each costs a
host sync.

Works with ``lightning`` (``lightning.pytorch``), and with the older ``pytorch_lightning``
package when ``lightning`` is not installed. Install with ``pip install -e '.[lightning]'``
from a clone (released: ``pip install 'actsparse[lightning]'``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ..attach import Attachment, PenaltySpec, Target, attach
from ..penalties import Penalty

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package of Lightning < 2
    try:
        import pytorch_lightning as pl
    except ImportError as err:
        from ..config import install_hint

        raise ModuleNotFoundError(
            f"actsparse.integrations.lightning needs Lightning: {install_hint('lightning')}") from err

__all__ = ["SparsityCallback"]


def _step_penalty(output: Any, penalty: Tensor) -> Any:
    """``output`` of ``training_step`` with ``penalty`` added to its loss."""
    if isinstance(output, Tensor):
        return output + penalty
    if isinstance(output, Mapping) and "loss" in output:
        return {**output, "loss": output["loss"] + penalty}
    if output is None:
        return None  # Lightning skips this step
    raise TypeError(
        "SparsityCallback adds the penalty to the loss that training_step returns: a Tensor or a dict "
        f"with a 'loss' key, got {type(output).__name__}"
    )


class SparsityCallback(pl.Callback):
    """Attach ``targets`` to the ``LightningModule`` at fit start and add ``reg.penalty()`` to its loss.

    Args:
        targets: ``{target: penalty}`` as for :func:`actsparse.attach`; targets are resolved in the
            ``LightningModule`` (e.g. ``"encoder.1"``, ``nn.ReLU``). ``None`` collects only the
            penalties declared with :func:`actsparse.regularize`.
        log_stats: also log the mean ρ̂ and the active fraction of each target.
        prefix: the first part of every logged name.

    Attributes:
        attachment: the :class:`actsparse.Attachment` while fit runs, else ``None``.
    """

    def __init__(
        self,
        targets: Mapping[Target, PenaltySpec] | None = None,
        log_stats: bool = True,
        *,
        prefix: str = "sparsity",
    ) -> None:
        super().__init__()
        self.targets = dict(targets or {})
        self.log_stats = bool(log_stats)
        self.prefix = prefix
        self.attachment: Attachment | None = None
        self._module: nn.Module | None = None
        self._restore: tuple[bool, Any] = (False, None)
        # the penalties given by name hold the moving averages: saved in Lightning's checkpoints
        given = [p for spec in self.targets.values() for p in (spec if isinstance(spec, (list, tuple)) else [spec])]
        self._penalties = nn.ModuleList(dict.fromkeys(p for p in given if isinstance(p, Penalty)))

    @property
    def state_key(self) -> str:
        return self._generate_state_key(targets=sorted(map(repr, self.targets)), prefix=self.prefix)

    # ---------------------------------------------------------------- lifecycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "SparsityCallback adds the penalty to the loss that training_step returns, which needs "
                "automatic optimization. With manual optimization, call reg = actsparse.attach(self, ...) "
                "in the module and pass loss + reg.penalty() to manual_backward."
            )
        self._detach()
        self.attachment = attach(pl_module, self.targets, stats=self.log_stats).to(pl_module.device)
        self._module = pl_module
        step = pl_module.training_step  # the bound method (or a user's own instance attribute)
        shadowed = "training_step" in vars(pl_module)

        @functools.wraps(step)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = step(*args, **kwargs)
            if output is None:
                return None
            penalty = self.attachment.penalty()
            self._log(trainer, pl_module, penalty)
            return _step_penalty(output, penalty)

        self._restore = (shadowed, step)
        pl_module.training_step = training_step

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._detach()

    def _detach(self) -> None:
        """Remove the hooks and the wrapped ``training_step`` (idempotent)."""
        if self.attachment is not None:
            self.attachment.remove()
            self.attachment = None
        if self._module is not None:
            shadowed, step = self._restore
            if shadowed:
                self._module.training_step = step
            else:
                vars(self._module).pop("training_step", None)
            self._module = None

    # ---------------------------------------------------------------- logging
    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, total: Tensor) -> None:
        reg = self.attachment
        by_target = reg.penalties_by_target()
        if not by_target:
            return
        log = functools.partial(pl_module.log, on_step=True, on_epoch=False, batch_size=1)
        log(f"{self.prefix}/penalty", total.detach())
        for key, value in by_target.items():
            log(f"{self.prefix}/{key}/penalty", value.detach())
        if self.log_stats and _writes_logs_this_step(trainer):
            for key, s in reg.stats().items():
                if s.calls:
                    log(f"{self.prefix}/{key}/rho_hat", s.mean_rho_hat)
                    log(f"{self.prefix}/{key}/active_fraction", s.active_fraction)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return self._penalties.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._penalties.load_state_dict(state_dict)


def _writes_logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this step's metrics to its loggers (``log_every_n_steps``).

    Lightning's own test, ``trainer._logger_connector.should_update_logs``, is not public API:
    without it, every step counts.
    """
    connector = getattr(trainer, "_logger_connector", None)
    flag = getattr(connector, "should_update_logs", None)
    return True if flag is None else bool(flag)
