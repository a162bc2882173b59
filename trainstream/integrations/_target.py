"""
What the framework integrations share: where a run publishes to, and how a
framework's names and values become valid trainstream events.

:func:`open_run` returns a :class:`Target` with the Run API
(:class:`trainstream.api.RunAPI`): through :class:`trainstream.client.Publisher`
when given a ``url``, else on the process-wide embedded server
(``get_stream_server(server_config)``), which ``close()`` releases.
:class:`LazyRun` is the constructor path of the Keras, Lightning and
transformers adapters (and of ``trainstream.init()``): their options checked
at once, the run opened on first use. Every target is watched until it ends:
an exception that ends the script marks it ``failed`` with its message
(:mod:`trainstream.integrations._failure`); on request it logs system
metrics (:mod:`trainstream.system`); in Jupyter it shows as its live
dashboard. This module imports no framework.
"""

from __future__ import annotations

import html
import math
import os
import threading
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from trainstream.api import Event, RunAPI
from trainstream.client import Publisher
from trainstream.events import BAD_NAME_CHAR_RE, INT_MAX, INT_MIN, MAX_NAME_LENGTH, MAX_RUN_LENGTH
from trainstream.integrations import _failure

if TYPE_CHECKING:
    from trainstream.run import Run
    from trainstream.system import SystemMonitor

__all__ = [
    "URL_ENV",
    "LazyRun",
    "Target",
    "check_options",
    "default_run_name",
    "metrics_of",
    "open_run",
    "params_of",
    "sanitize",
]

#: Longer string hyperparameters are cut, so the hparams event stays small.
MAX_PARAM_TEXT = 1000
#: A remote server for every run opened without ``url=`` (``TRAINSTREAM_TOKEN`` its token).
URL_ENV = "TRAINSTREAM_URL"
#: The height of a run's dashboard shown in a notebook (CSS pixels).
NOTEBOOK_HEIGHT = 600


class Target(RunAPI):
    """
    One run, remote or embedded, with the Run API plus ``flush`` and
    ``close`` that behave the same either way.

    :param sink: the ``Publisher`` or the embedded ``Run`` underneath; events
        are checked here and queued on it.
    :param release: ``close()`` releases the embedded server.
    :param flush_timeout: remote only: how long a flush waits for the server.
    :ivar state: the last status it was given (``created`` at first).
    """

    def __init__(
        self,
        sink: Publisher | Run,
        *,
        release: bool = False,
        flush_timeout: float | None = 30.0,
    ) -> None:
        super().__init__(sink.name)
        self.sink = sink
        self._release = release
        self._flush_timeout = flush_timeout
        self._lock = threading.Lock()
        self.closed = False
        self.state = "created"
        #: system metrics (``start_system_metrics``), while asked for
        self.system: SystemMonitor | None = None
        _failure.watch(self, _exit_flush)

    def _enqueue(self, events: list[Event]) -> None:
        self.sink._enqueue(events)

    def status(self, state: str, epoch: int | None = None, message: str | None = None) -> None:
        """
        Queue a status event. ``finished`` and ``failed`` end the run: an
        exception no longer changes it, and system metrics pause until it
        is ``running`` again.
        """
        super().status(state, epoch, message)
        self.state = state
        ended = state in ("finished", "failed")
        if ended:
            _failure.forget(self)
        elif not self.closed:
            _failure.watch(self, _exit_flush)
        system = self.system
        if system is not None:
            if ended:
                system.stop()
            elif not self.closed and state == "running":
                system.start()

    def start_system_metrics(self, interval: float) -> bool:
        """Log ``system/*`` metrics every ``interval`` seconds until the run ends."""
        from trainstream.system import SystemMonitor

        if self.system is None:
            self.system = SystemMonitor(self, interval)
        return self.system.start()

    @property
    def dashboard_url(self) -> str | None:
        """This run's live dashboard (``.../?run=NAME``), or ``None`` when its server is gone."""
        if isinstance(self.sink, Publisher):
            base = self.sink.endpoint.base + "/"
        else:
            import sys

            embedded = sys.modules.get("trainstream.embedded")
            server = embedded.get_stream_server_manager().server if embedded else None
            if server is None:
                return None
            base = server.urls.get("dashboard", "")
            if not base:
                return None
        return f"{base}?run={quote(self.name, safe='')}"

    def _repr_html_(self) -> str:
        """In Jupyter: the run's live dashboard, inline."""
        url = self.dashboard_url
        name = html.escape(self.name)
        if url is None:
            return f"<p>trainstream run <b>{name}</b> ({html.escape(self.state)}): no server</p>"
        link = html.escape(url, quote=True)
        return (
            f'<div class="trainstream-run"><p>trainstream run <b>{name}</b>: '
            f'<a href="{link}" target="_blank">{html.escape(url)}</a></p>'
            f'<iframe src="{link}" width="100%" height="{NOTEBOOK_HEIGHT}" '
            'style="border: 1px solid #ccc" loading="lazy"></iframe></div>'
        )

    def __repr__(self) -> str:
        where = "remote" if isinstance(self.sink, Publisher) else "embedded"
        return f"<trainstream run {self.name!r} ({where}, {self.state}): {self.dashboard_url}>"

    def log(self, metrics: Mapping[str, Any], step: int, time_s: float | None = None) -> None:
        self.sink.log(metrics, step, time_s)  # the sink's own path (Run's is the fast one)

    def flush(self, timeout: float | None = None) -> bool:
        """
        Wait until everything logged so far is stored; ``False`` if a remote
        server did not take it within ``timeout`` (by default ``flush_timeout``).
        """
        if isinstance(self.sink, Publisher):
            return self.sink.flush(self._flush_timeout if timeout is None else timeout)
        self.sink.flush()
        return True

    def close(self) -> bool:
        """
        Stop system metrics, flush, then stop the publisher or release the
        embedded server. Idempotent.
        """
        with self._lock:
            if self.closed:
                return True
            self.closed = True
        _failure.forget(self)
        if self.system is not None:
            self.system.stop()
        if isinstance(self.sink, Publisher):
            return self.sink.close(self._flush_timeout)
        try:
            self.sink.flush()
        finally:
            if self._release:
                from trainstream.embedded import release_stream_server

                release_stream_server()
        return True


def _exit_flush(run: RunAPI, seconds: float) -> object:
    """How an exception's hook stores a failed target: a bounded flush."""
    assert isinstance(run, Target)
    return run.flush(seconds)


def open_run(
    run: str,
    *,
    url: str | None = None,
    token: str | None = None,
    server_config: Any = None,
    hparams: Mapping[str, object] | None = None,
    flush_timeout: float | None = 30.0,
    who: str = "trainstream",
    system_metrics: bool | float | None = None,
    target: type[Target] = Target,
) -> Target:
    """
    A run named ``run`` (sanitized), announced as ``created``.

    :param url: a trainstream server (``http://host:port``): publish with
        :class:`trainstream.client.Publisher`. Without it, the process-wide
        embedded server is acquired (``trainstream.get_stream_server``), and
        released by the run's ``close()``.
    :param token: the remote server's bearer token (only with ``url``).
    :param server_config: the embedded server's config (only without ``url``).
    :param flush_timeout: remote only: how long ``flush`` and ``close`` wait
        for the server (``None``: no limit).
    :param who: names the caller in error messages.
    :param system_metrics: ``system/*`` metrics every 5 s (``True``), every
        that many seconds, or none (``False``); ``None``: as
        ``$TRAINSTREAM_SYSTEM_METRICS`` says (:mod:`trainstream.system`).
    :param target: the class made (a :class:`Target`, or a subclass).
    """
    check_options(who, url, token, server_config)
    from trainstream.system import interval_from

    interval = interval_from(system_metrics)
    name = sanitize(run, MAX_RUN_LENGTH)
    if url is not None:
        made = target(
            Publisher(url, name, token=token, hparams=hparams), flush_timeout=flush_timeout
        )
    else:
        from trainstream.embedded import get_stream_server, release_stream_server

        server = get_stream_server(server_config)
        try:
            embedded = server.run(name, hparams)
        except BaseException:
            release_stream_server()
            raise
        made = target(embedded, release=True, flush_timeout=flush_timeout)
        from trainstream import notebook

        notebook.hold_server()  # in Jupyter: the dashboard stays up while the kernel lives
    if interval is not None:
        made.start_system_metrics(interval)
    return made


class LazyRun:
    """
    The run of a framework adapter, as its constructor was told: the
    options are checked at once, the run is opened on first use (once).
    The adapters pass their own constructor's options, in this order.

    :param who: the adapter, for error messages.
    :param name: the run's name (sanitized when opened).
    :param prefix: without ``name``, name the run ``PREFIX-YYYYmmdd-HHMMSS``
        now; without either, :meth:`open` is given the name.
    :param url, token, server_config, flush_timeout, system_metrics: as
        :func:`open_run`'s; without ``url`` and ``server_config``,
        ``$TRAINSTREAM_URL`` (and ``$TRAINSTREAM_TOKEN``) name a remote
        server, so a script publishes there with no code change.
    :ivar target: the :class:`Target`, once opened.
    """

    def __init__(
        self,
        who: str,
        name: str | None,
        prefix: str | None,
        url: str | None,
        token: str | None,
        server_config: Any,
        flush_timeout: float | None,
        *,
        system_metrics: bool | float | None = None,
    ) -> None:
        if url is None and server_config is None and os.environ.get(URL_ENV):
            url = os.environ[URL_ENV]
            if token is None:
                from trainstream.client.http import TOKEN_ENV

                token = os.environ.get(TOKEN_ENV) or None
        check_options(who, url, token, server_config)
        from trainstream.system import interval_from

        interval_from(system_metrics)  # a bad value fails here, at the constructor
        self.who = who
        self.name = default_run_name(prefix) if name is None and prefix is not None else name
        self._where: dict[str, Any] = {"url": url, "token": token, "server_config": server_config}
        self._where["flush_timeout"] = flush_timeout
        self._where["system_metrics"] = system_metrics
        self.target: Target | None = None

    def open(self, default_name: str | None = None) -> Target:
        """The run, opened now if it is not yet (named ``name``, else ``default_name``)."""
        if self.target is None:
            name = self.name or default_name  # an empty name too takes the default
            self.target = open_run(name or "", **self._where, who=self.who)
            self.name = self.target.name
        return self.target

    def end(self, failure: str | None = None) -> None:
        """Training ended: ``finished`` (or ``failed`` with ``failure``), then a flush."""
        if self.target is None:
            return
        if failure is None:
            self.target.finish()
        else:
            self.target.fail(failure)
        self.target.flush()

    def flush(self) -> None:
        if self.target is not None:
            self.target.flush()

    def close(self) -> None:
        """Flush and close the run (releasing the embedded server), if it was opened."""
        if self.target is not None:
            self.target.close()


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
    clean = BAD_NAME_CHAR_RE.sub("_", str(name)).lstrip("/")[:max_length]
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
        return value if INT_MIN <= value <= INT_MAX else float(value)
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
