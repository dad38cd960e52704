"""One progress bar for long loops outside training (caching activations, the splice evaluation,
the language model's training): tqdm when it is installed and the caller wants a bar, else an
object with the same three methods that does nothing. tqdm is an optional extra (``[cli]``), so
the core never needs it. Training has its own display (``runner._progress``: a bar on a
terminal, a few plain lines to a pipe)."""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int | None, *, desc: str, unit: str, initial: int = 0, **options: Any):
    """A ``tqdm`` bar (``leave=False``, ``dynamic_ncols``) if ``enabled`` and tqdm is installed,
    else a no-op with ``update``, ``set_postfix`` and ``close``."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra: no bar
        return _NoBar()
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, leave=False, **options)
