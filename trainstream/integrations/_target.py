"""
What the framework integrations share: where a run publishes to, and how a
framework's names and values become valid trainstream events.

:func:`open_run` returns a :class:`Target` with the Run API: through
:class:`trainstream.client.Publisher` when given a ``url``, else on the
process-wide embedded server (``get_stream_server(server_config)``), which
``close()`` releases. This module imports no framework.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from trainstream.events import MAX_NAME_LENGTH, MAX_RUN_LENGTH

__all__ = [
    "Target",
    "check_options",
    "default_run_name",
    "metrics_of",
    "open_run",
    "params_of",
    "sanitize",
]

_BAD = re.compile(r"[^A-Za-z0-9._:/\-]")
_INT_MAX = 2**63 - 1
#: Longer string hyperparameters are cut, so the hparams event stays small.
MAX_PARAM_TEXT = 1000


class Sink(Protocol):
    """What ``trainstream.Run`` and ``trainstream.client.Publisher`` both offer."""

    def log(self, metrics: Mapping[str, Any], step: int, time_s: float | None = None) -> None: ...
    def status(self, state: str, epoch: int | None = None, message: str | None = None) -> None: ...
    def text(self, message: str, level: str = "info") -> None: ...
    def hparams(self, params: Mapping[str, object]) -> None: ...
    def finish(self) -> None: ...
    def fail(self, message: str) -> None: ...


class Target:
    """
    One run, remote or embedded, with the Run API plus ``flush`` and
    ``close`` that behave the same either way.

    :ivar sink: the ``Publisher`` or the embedded ``Run`` underneath.
    """

    def __init__(
        self,
        name: str,
        sink: Sink,
        *,
        publisher: Any = None,
        release: bool = False,
        flush_timeout: float | None = 30.0,
    ) -> None:
        self.name = name
        self.sink = sink
        self._publisher = publisher
        self._release = release
        self._flush_timeout = flush_timeout
        self._lock = threading.Lock()
        self.closed = False

    # The Run API

    def log(self, metrics: Mapping[str, Any], step: int, time_s: float | None = None) -> None:
        self.sink.log(metrics, step, time_s)

    def status(self, state: str, epoch: int | None = None, message: str | None = None) -> None:
        self.sink.status(state, epoch, message)

    def text(self, message: str, level: str = "info") -> None:
        self.sink.text(message, level)

    def hparams(self, params: Mapping[str, object]) -> None:
        self.sink.hparams(params)

    def finish(self) -> None:
        self.sink.finish()

    def fail(self, message: str) -> None:
        self.sink.fail(message)

    def flush(self) -> bool:
        """
        Wait until everything logged so far is stored; ``False`` if a remote
        server did not take it within ``flush_timeout``.
        """
        if self._publisher is not None:
            return bool(self._publisher.flush(self._flush_timeout))
        self.sink.flush()  # type: ignore[attr-defined]
        return True

    def close(self) -> bool:
        """Flush, then stop the publisher or release the embedded server. Idempotent."""
        with self._lock:
            if self.closed:
                return True
            self.closed = True
        if self._publisher is not None:
            return bool(self._publisher.close(self._flush_timeout))
        try:
            self.sink.flush()  # type: ignore[attr-defined]
        finally:
            if self._release:
                from trainstream.manager import release_stream_server

                release_stream_server()
        return True


def open_run(
    run: str,
    *,
    url: str | None = None,
    token: str | None = None,
    server_config: Any = None,
    hparams: Mapping[str, object] | None = None,
    flush_timeout: float | None = 30.0,
    who: str = "trainstream",
) -> Target:
    """
    A run named ``run`` (sanitized), announced as ``created``.

    :param url: a trainstream server (``http://host:port``): publish over
        HTTP. Without it, the process-wide embedded server is acquired.
    :param token: the remote server's bearer token (only with ``url``).
    :param server_config: the embedded server's config (only without ``url``).
    :param who: names the caller in error messages.
    """
    check_options(who, url, token, server_config)
    name = sanitize(run, MAX_RUN_LENGTH)
    if url is not None:
        from trainstream.client import Publisher

        publisher = Publisher(url, name, token=token, hparams=hparams)
        return Target(name, publisher, publisher=publisher, flush_timeout=flush_timeout)
    from trainstream.manager import get_stream_server, release_stream_server

    server = get_stream_server(server_config)
    try:
        embedded = server.run(name, hparams)
    except BaseException:
        release_stream_server()
        raise
    return Target(name, embedded, release=True, flush_timeout=flush_timeout)


def check_options(who: str, url: str | None, token: str | None, server_config: Any) -> None:
    """Fail at once on options that do not go together."""
    if url is not None and server_config is not None:
        raise ValueError(f"{who}: server_config is for the embedded server, not url=")
    if url is None and token is not None:
        raise ValueError(f"{who}: token is for a remote server (url=)")


def sanitize(name: object, max_length: int = MAX_NAME_LENGTH) -> str:
    """
    A framework's metric or run name made valid for trainstream: characters
    outside ``[A-Za-z0-9._:/-]`` become ``_``, leading ``/`` are dropped, and
    it is cut to ``max_length`` (``"val loss"`` → ``"val_loss"``).
    """
    clean = _BAD.sub("_", str(name)).lstrip("/")[:max_length]
    return clean or "_"


def default_run_name(prefix: str) -> str:
    """``PREFIX-YYYYmmdd-HHMMSS``, when the caller names no run."""
    return f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def number(value: object) -> float | int | None:
    """
    ``value`` as a Python number, or ``None`` when it is none: Python
    numbers, numpy scalars, one-element numpy arrays and torch/jax tensors
    are numbers; booleans, strings, ``None`` and larger arrays are not.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes)):
        return None
    if isinstance(value, int):
        value = int(value)
        return value if -_INT_MAX - 1 <= value <= _INT_MAX else float(value)
    if isinstance(value, float):
        return float(value)  # numpy's float64 is a float too
    size = getattr(value, "size", None)
    if callable(size):  # torch: size() is a method; numel() counts
        numel = getattr(value, "numel", None)
        size = numel() if callable(numel) else None
    if size is not None and size != 1:
        return None
    item = getattr(value, "item", None)
    try:
        result = item() if callable(item) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        return None
    if isinstance(result, bool) or not isinstance(result, (int, float)):
        try:
            return float(result)
        except (TypeError, ValueError):
            return None
    return number(result)


def metrics_of(values: Mapping[str, Any], prefix: str = "") -> dict[str, float | int]:
    """
    The numeric entries of a framework's ``logs`` dict, names sanitized
    (and prefixed); entries that are not numbers are left out.
    """
    out: dict[str, float | int] = {}
    for key, value in values.items():
        n = number(value)
        if n is not None:
            out[sanitize(f"{prefix}{key}")] = n
    return out


def params_of(params: Mapping[str, Any], prefix: str = "") -> dict[str, object]:
    """
    Hyperparameters as trainstream takes them: nested mappings are
    flattened (``{"opt": {"lr": 1}}`` → ``{"opt/lr": 1}``), strings, bools,
    ``None`` and finite numbers kept (strings cut to 1000 characters),
    anything else (lists, objects, NaN) left out.
    """
    out: dict[str, object] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if not name:
            continue
        if isinstance(value, Mapping):
            out.update(params_of(value, name + "/"))
        elif value is None or isinstance(value, bool):
            out[name] = value
        elif isinstance(value, str):
            out[name] = value[:MAX_PARAM_TEXT]
        else:
            n = number(value)
            if n is not None and (isinstance(n, int) or math.isfinite(n)):
                out[name] = n
    return out
