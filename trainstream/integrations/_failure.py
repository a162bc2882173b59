"""
An exception that ends the script marks its runs ``failed`` with the
exception's message, whoever opened them: ``trainstream.init()``, the Keras,
Hugging Face and Lightning adapters (through
:class:`~trainstream.integrations._target.Target`), the SummaryWriter.

Neither Keras' nor the ``transformers`` callbacks see an exception that ends
``fit``/``train``, so the frameworks' hooks cannot do it; Python's can. On
the first :func:`watch`, a ``sys.excepthook`` and a ``threading.excepthook``
are installed (once), each chained to the hook that was there before it,
which then runs as it would have (the traceback is still printed):

- ``sys.excepthook`` (the main thread's uncaught exception, the script ends):
  every watched run is marked failed;
- ``threading.excepthook`` (a thread's uncaught exception): the runs watched
  from that thread (the thread that opened them: the training thread).

A run is watched from its opening until it is finished or failed (and again
when it is marked ``running`` once more); each is then flushed (a remote one
for at most :data:`EXIT_FLUSH_S`), so the failure is stored before the
process exits. An exception caught by the code (or a notebook's cell, which
the kernel catches) never reaches these hooks: a notebook's run goes on.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

from trainstream.api import RunAPI

__all__ = ["EXIT_FLUSH_S", "fail_watched", "failure_message", "forget", "watch", "watched"]

#: The longest a hook waits for a remote server to store the failure (seconds).
EXIT_FLUSH_S = 5.0
#: The message is cut to this many characters.
MAX_MESSAGE = 2000

#: A function that stores what a run queued, waiting at most the given seconds.
Flush = Callable[[RunAPI, float], object]

_lock = threading.Lock()
_runs: dict[int, tuple[weakref.ref[RunAPI], int, Flush | None]] = {}
_installed = False
_previous_sys: Callable[[type[BaseException], BaseException, TracebackType | None], Any] | None
_previous_sys = None
_previous_threading: Callable[[Any], Any] | None = None


def failure_message(error: BaseException) -> str:
    """``"RuntimeError: CUDA out of memory"``: the type and the message, cut to 2000 characters."""
    text = str(error).strip()
    message = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return message[:MAX_MESSAGE]


def watch(run: RunAPI, flush: Flush | None = None) -> None:
    """
    Mark ``run`` failed if an exception ends the script (or the calling
    thread) before :func:`forget`. Installs the hooks on first use.

    :param flush: how to store what the run queued (``flush(run, seconds)``);
        ``None``: a ``Publisher``'s ``flush(seconds)``, else the run's own
        ``flush()`` (an embedded ``Run``'s), if it has one.
    """
    _install()
    key = id(run)
    with _lock:
        entry = _runs.get(key)
        if entry is not None and entry[0]() is run:
            return  # already watched: keep the thread that opened it
        ref = weakref.ref(run, functools.partial(_drop, key))
        _runs[key] = (ref, threading.get_ident(), flush)


def forget(run: RunAPI) -> None:
    """``run`` ended (finished, failed or closed): an exception no longer changes it."""
    with _lock:
        entry = _runs.get(id(run))
        if entry is not None and entry[0]() is run:
            del _runs[id(run)]


def watched() -> list[RunAPI]:
    """The runs an exception would mark failed now."""
    with _lock:
        runs = [entry[0]() for entry in _runs.values()]
    return [run for run in runs if run is not None]


def _drop(key: int, _: object = None) -> None:
    with _lock:
        entry = _runs.get(key)
        if entry is not None and entry[0]() is None:
            del _runs[key]


def fail_watched(error: BaseException, thread: int | None = None) -> list[str]:
    """
    Mark failed, with ``error``'s message, and flush every watched run (of
    ``thread`` only, when given); they are forgotten. Never raises.

    :return: the names of the runs marked failed.
    """
    with _lock:
        chosen = [
            (key, entry) for key, entry in _runs.items() if thread is None or entry[1] == thread
        ]
        for key, _ in chosen:
            del _runs[key]
    message = failure_message(error)
    failed: list[str] = []
    for _, (ref, _thread, flush) in chosen:
        run = ref()
        if run is None:
            continue
        try:
            run.fail(message)
            failed.append(run.name)
            (flush or _default_flush)(run, EXIT_FLUSH_S)
        except Exception as e:  # the script is ending: say so, never hide its own error
            print(f"trainstream: could not mark run {run.name!r} failed: {e}", file=sys.stderr)
    return failed


def _default_flush(run: RunAPI, seconds: float) -> object:
    """A ``Publisher`` waits at most ``seconds``; an embedded ``Run`` until stored."""
    from trainstream.client import Publisher

    if isinstance(run, Publisher):
        return run.flush(seconds)
    flush = getattr(run, "flush", None)
    return flush() if callable(flush) else None


def _sys_hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    try:
        fail_watched(error)
    finally:
        previous = _previous_sys or sys.__excepthook__
        previous(kind, error, tb)


def _threading_hook(args: Any) -> None:
    try:
        if args.exc_value is not None and not issubclass(args.exc_type, SystemExit):
            thread = args.thread.ident if args.thread is not None else None
            if thread is not None:
                fail_watched(args.exc_value, thread)
    finally:
        previous = _previous_threading or threading.__excepthook__
        previous(args)


def _install() -> None:
    """Chain our hooks before whatever is installed now, once per process."""
    global _installed, _previous_sys, _previous_threading
    with _lock:
        if _installed:
            return
        _installed = True
        _previous_sys = sys.excepthook
        sys.excepthook = _sys_hook
        _previous_threading = threading.excepthook
        threading.excepthook = _threading_hook
