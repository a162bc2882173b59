"""
The one-line start, as ML users know it from other trackers::

    import trainstream

    run = trainstream.init(config={"lr": 3e-4})   # named <script>-<date>-<time>-<4 hex>
    for step in range(100):
        trainstream.log({"loss": loss})           # step 0, 1, 2, ... by itself
    trainstream.finish()

Where the run goes, first match wins:

1. ``url=`` (``token=``), else ``$TRAINSTREAM_URL`` (``$TRAINSTREAM_TOKEN``):
   that server, through :class:`trainstream.client.Publisher`. The same
   script publishes elsewhere with no code change.
2. ``server_config=``: the embedded server with that config (``{}``: the
   defaults), never a remote one.
3. The embedded server of this process, when one already runs (a notebook
   cell run again, a script that called ``get_stream_server()``).
4. A trainstream server already running on this machine, found by asking
   ``GET /api/health`` at :data:`DISCOVER_URL` (the default REST port,
   127.0.0.1:8890) with a short timeout: an answer with trainstream's health
   fields (``version``, ``last_id``, ``listeners``) is one. Why a probe and
   not a discovery file each server writes: it finds every server that
   listens there (``twistd trainstream``, another script's embedded server,
   an older version), it cannot be misled by a file a killed server left
   behind, and it costs one loopback connection (refused at once when
   nothing listens). A server elsewhere, or on other ports, is named with
   ``$TRAINSTREAM_URL``.
5. Otherwise the embedded server starts (``trainstream.get_stream_server()``),
   released by :func:`finish`.

One run is current per process. A second :func:`init` finishes the current
run and starts a new one, unless it names the current run (``init(run="a")``
twice, as a notebook cell run again): then it returns the same run (its
``config`` logged again, if given), its step counter going on.

An exception that ends the script (or the thread that called :func:`init`)
marks the run ``failed`` with its message
(:mod:`trainstream.integrations._failure`); a script that ends without
:func:`finish` finishes the run at exit (unless the thread that called
:func:`init` still runs then). In Jupyter, :func:`init` shows the
run's live dashboard inline (:mod:`trainstream.notebook`).
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import sys
import threading
from argparse import Namespace
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from trainstream.errors import TrainstreamError
from trainstream.events import MAX_RUN_LENGTH
from trainstream.integrations._target import (
    URL_ENV,
    Target,
    check_options,
    open_run,
    params_of,
    sanitize,
)

__all__ = [
    "DISCOVER_URL",
    "CurrentRun",
    "current_run",
    "find_local_server",
    "finish",
    "init",
    "log",
]

#: Where :func:`init` looks for a trainstream server already running on this machine.
DISCOVER_URL = "http://127.0.0.1:8890"
#: Seconds the probe of :data:`DISCOVER_URL` waits for an answer.
DISCOVER_TIMEOUT = 0.5
_WHO = "trainstream.init()"
_logger = logging.getLogger(__name__)

_lock = threading.RLock()
_current: CurrentRun | None = None


class CurrentRun(Target):
    """
    The run :func:`init` returns: the Run API, with ``log``'s step optional.

    :ivar step: the last step logged (``None`` before the first).
    :ivar where: how its server was chosen (``url``, ``env``, ``config``,
        ``embedded``, ``found``, ``started``: see the module's docstring).
    """

    step: int | None = None
    where = ""
    #: the thread that called :func:`init`
    opener: threading.Thread | None = None

    def log(
        self, metrics: Mapping[str, Any], step: int | None = None, time_s: float | None = None
    ) -> None:
        """
        Queue ``metrics`` at ``step``; without it, at the last step + 1 (0
        at first). An explicit step sets the counter: the next ``log()``
        without a step is at ``step + 1``.
        """
        if step is None:
            step = 0 if self.step is None else self.step + 1
        super().log(metrics, step, time_s)
        self.step = step


def _script_stem() -> str:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or "ipykernel" in sys.modules:
        return "notebook" if "ipykernel" in sys.modules else "python"
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem or "python"


def default_name() -> str:
    """``<script-stem>-<YYYYmmdd-HHMMSS>-<4 hex>``: dated, and unique across processes."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = f"-{stamp}-{secrets.token_hex(2)}"
    return sanitize(_script_stem(), MAX_RUN_LENGTH - len(suffix)) + suffix


def find_local_server(url: str | None = None, timeout: float = DISCOVER_TIMEOUT) -> str | None:
    """
    The base URL of the trainstream server answering at ``url`` (by default
    :data:`DISCOVER_URL`), or ``None`` when nothing answers there or what
    answers is not trainstream.
    """
    from trainstream.client.http import HTTP, UNREACHABLE, ClientError, parse_endpoint

    endpoint = parse_endpoint(url or DISCOVER_URL)
    try:
        status, body = HTTP(endpoint, None, timeout).get_json("/api/health")
    except (*UNREACHABLE, ClientError):
        return None
    if status not in (200, 503) or not isinstance(body, dict):
        return None
    if not {"version", "last_id", "listeners"} <= body.keys():
        return None
    return endpoint.base


def _check_token(base: str, token: str | None) -> None:
    """A found server that needs a token we do not have: say so, in one line."""
    from trainstream.client.http import HTTP, UNREACHABLE, ClientError, parse_endpoint

    try:
        HTTP(parse_endpoint(base), token, DISCOVER_TIMEOUT * 4).get_json("/api")
    except ClientError:
        raise TrainstreamError(
            f"{_WHO}: the trainstream server running at {base} needs a token: "
            "set $TRAINSTREAM_TOKEN (or pass token=), or name another server with "
            "$TRAINSTREAM_URL, or start an embedded one with server_config={...}"
        ) from None
    except UNREACHABLE:
        pass  # gone since the probe: the publisher retries, and says why


def _check_remote(url: str, token: str | None, how: str) -> None:
    """
    The server named by ``url=`` or ``$TRAINSTREAM_URL``, asked once: a
    refused token is an error (no event would ever be taken); something
    that is not trainstream answering is a warning. Nothing answering is
    the publisher's to say (it keeps the events and retries).
    """
    from trainstream.client.http import (
        HTTP,
        TOKEN_ENV,
        UNREACHABLE,
        ClientError,
        parse_endpoint,
    )

    endpoint = parse_endpoint(url)
    named = f"${URL_ENV}={url}" if how == "env" else f"url={url!r}"
    try:
        status, body = HTTP(endpoint, token, DISCOVER_TIMEOUT * 4).get_json("/api")
    except ClientError:
        given = "none was given" if not token else "refused the one given"
        raise TrainstreamError(
            f"{_WHO}: the trainstream server at {endpoint.base} ({named}) needs a token "
            f"and {given} (HTTP 401): set ${TOKEN_ENV} (or pass token=) to the server's "
            "token"
        ) from None
    except UNREACHABLE:
        return  # the publisher says so at its first POST, keeps the events and retries
    if status != 200 or not isinstance(body, dict):
        _logger.warning(
            "%s: what answers at %s (%s) does not look like a trainstream server "
            "(GET %s/api: HTTP %s); events sent there may be lost",
            _WHO,
            endpoint.base,
            named,
            endpoint.prefix,
            status,
        )


def _where(
    url: str | None, token: str | None, server_config: Any
) -> tuple[str | None, str | None, Any, str]:
    """``(url, token, server_config, how)``: where the run goes (the module's docstring)."""
    from trainstream.client.http import TOKEN_ENV

    if url is not None or server_config is not None:
        check_options(_WHO, url, token, server_config)
        return url, token, server_config, "url" if url is not None else "config"
    env_token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    if os.environ.get(URL_ENV):
        return os.environ[URL_ENV], env_token, None, "env"
    embedded = sys.modules.get("trainstream.embedded")
    if embedded is not None and embedded.get_stream_server_manager().is_server_running():
        check_options(_WHO, None, token, None)
        return None, None, None, "embedded"
    found = find_local_server()
    if found is not None:
        _check_token(found, env_token)
        return found, env_token, None, "found"
    check_options(_WHO, None, token, None)  # token= with nothing remote: say so
    return None, None, None, "started"


def _params(config: object) -> dict[str, object] | None:
    if config is None:
        return None
    if isinstance(config, Namespace):
        config = vars(config)
    if not isinstance(config, Mapping):
        raise TypeError(
            f"{_WHO}: config must be a dict (or argparse.Namespace) of hyperparameters, "
            f"not {type(config).__name__}"
        )
    return params_of(config)


def init(
    run: str | None = None,
    config: Mapping[str, Any] | Namespace | None = None,
    *,
    url: str | None = None,
    token: str | None = None,
    server_config: Any = None,
    system_metrics: bool | float | None = None,
    flush_timeout: float | None = 30.0,
) -> CurrentRun:
    """
    Start (or return) the current run, marked ``running``.

    :param run: its name (sanitized: characters outside ``[A-Za-z0-9._:/-]``
        become ``_``); by default ``<script>-<YYYYmmdd-HHMMSS>-<4 hex>``.
    :param config: the run's hyperparameters (a dict, nested dicts flattened
        with ``/``, or an ``argparse.Namespace``), logged as its ``hparams``.
    :param url, token: a trainstream server to publish to (see the module's
        docstring for ``$TRAINSTREAM_URL`` and the search that follows).
    :param server_config: the embedded server's config (never a remote one).
    :param system_metrics: ``system/*`` metrics (CPU, memory, GPUs) every 5 s
        (``True``) or that many seconds; ``None``: as
        ``$TRAINSTREAM_SYSTEM_METRICS`` says (off unless set).
    :param flush_timeout: remote only: how long ``flush``/``finish`` wait.
    :raises ValueError: for options that do not go together, a bad name.
    """
    global _current
    params = _params(config)
    with _lock:
        current = _current
        if current is not None and not current.closed:
            if run is not None and sanitize(run, MAX_RUN_LENGTH) == current.name:
                if params:
                    current.hparams(params)
                _show(current)
                return current
            _end(current)
        url, token, server_config, how = _where(url, token, server_config)
        if how in ("url", "env") and url is not None:
            _check_remote(url, token, how)
        name = default_name() if run is None else run
        made = open_run(
            name,
            url=url,
            token=token,
            server_config=server_config,
            hparams=params or None,
            flush_timeout=flush_timeout,
            who=_WHO,
            system_metrics=system_metrics,
            target=CurrentRun,
        )
        assert isinstance(made, CurrentRun)
        made.where = how
        made.opener = threading.current_thread()
        made.status("running")
        _current = made
        _finish_at_exit()
    _show(made)
    return made


def _show(run: CurrentRun) -> None:
    from trainstream import notebook

    notebook.display(run)


def current_run() -> CurrentRun | None:
    """The run of the last :func:`init`, until :func:`finish`."""
    current = _current
    return current if current is not None and not current.closed else None


def log(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """
    Log ``metrics`` (``{name: number}``) on the current run at ``step``;
    without it, at the last step + 1 (0 at first).

    :raises TrainstreamError: when no run is current (call :func:`init` first).
    :raises EventError: for a bad name or value, naming it.
    """
    current = current_run()
    if current is None:
        raise TrainstreamError("trainstream.log(): no run; call trainstream.init() first")
    current.log(metrics, step)


def _end(run: CurrentRun, failure: str | None = None) -> None:
    try:
        if run.state not in ("finished", "failed"):
            if failure is None:
                run.finish()
            else:
                run.fail(failure)
    finally:
        run.close()


def finish(failure: str | None = None) -> None:
    """
    End the current run: ``finished`` (or ``failed`` with ``failure``),
    flushed, its system metrics stopped, its server released. Nothing to
    do when no run is current.
    """
    global _current
    with _lock:
        current, _current = _current, None
    if current is not None and not current.closed:
        _end(current, failure)


_exit_hooked = False


def _finish_at_exit() -> None:
    """
    Have :func:`_at_exit` run when the script ends: as ``threading``'s exit
    functions do (``concurrent.futures`` too), while the main thread is still
    alive, so before crochet's watchdog stops the embedded server's reactor
    (``atexit`` functions run after that).
    """
    global _exit_hooked
    if _exit_hooked:
        return
    _exit_hooked = True
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError("no threading._register_atexit")
        register(_at_exit)
    except RuntimeError:  # an older Python, or already shutting down
        atexit.register(_at_exit)


def _at_exit() -> None:
    """
    A script that ends without finish(): the run finished (a failure was
    marked already). Not while the thread that opened it still runs (a
    training thread the main thread did not join): that one is not done.
    """
    current = current_run()
    opener = current.opener if current is not None else None
    if opener is not None and opener is not threading.current_thread() and opener.is_alive():
        return
    try:
        finish()
    except Exception as e:  # the process is ending: one line, no traceback
        print(f"trainstream: could not finish the run at exit: {e!r}", file=sys.stderr)
