"""
Jupyter: a run shows as its live dashboard, inline, and the embedded server
serves as long as the kernel lives.

A run (:class:`~trainstream.integrations._target.Target`, what
``trainstream.init()`` and the adapters' ``.run``/``.experiment`` return)
has ``_repr_html_``: the last expression of a cell, or ``display(run)``,
shows an iframe of the dashboard at ``?run=NAME`` (that run alone on the
charts). ``trainstream.init()`` displays it itself.

In a kernel, the first run on the embedded server takes one more hold on it
for the kernel's life (:func:`hold_server`): ``finish()`` then leaves the
dashboard up, and running the cell again finds the server already there
(same ports, no "port in use"). The ports are freed when the kernel ends
(the reactor's shutdown stops the server).

Importing this module imports no IPython.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

__all__ = ["display", "hold_server", "in_notebook"]

_lock = threading.Lock()
_held = False


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (IPython with a kernel), not a plain shell."""
    if "ipykernel" not in sys.modules:
        return False
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if callable(get) else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def hold_server() -> bool:
    """
    In a kernel: hold the process-wide embedded server once more, for the
    kernel's life (once per process). ``True`` if this call took the hold.
    """
    global _held
    if not in_notebook():
        return False
    with _lock:
        if _held:
            return False
        from trainstream.embedded import get_stream_server

        get_stream_server()
        _held = True
        return True


def display(run: Any) -> None:
    """Show ``run`` (its dashboard) in the notebook's output, if this is a kernel."""
    if not in_notebook():
        return
    from IPython.display import display as ipython_display

    ipython_display(run)  # type: ignore[no-untyped-call, unused-ignore]
