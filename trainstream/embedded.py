"""
The refcounted, process-wide server manager, and the reactor thread.

Only this module touches the global reactor's thread. Embedded, crochet runs
the reactor in one background thread for the life of the process (a stopped
reactor cannot run again, so we stop listeners, never the reactor). Under
twistd, crochet is told not to start one and the manager uses twistd's.

Every change of state runs in the reactor thread, one at a time behind a
``DeferredLock``: the refcount and the server's running state therefore
change together, whatever threads call in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.python import threadable

from trainstream.config import Config
from trainstream.errors import ConfigConflictError, ReactorThreadError, TrainstreamError
from trainstream.server import StreamServer, makeService

_log = Logger()

T = TypeVar("T")

ConfigLike = Config | Mapping[str, Any] | None

_setup_lock = threading.Lock()
#: set by ``StreamServerManager.adopt``: the reactor is twistd's (running, or
#: about to run), so crochet must never start one (imported only when asked)
_hosted = False
#: crochet was told (once) that the reactor runs elsewhere
_told_crochet = False


def ensure_reactor_thread() -> None:
    """
    Make sure a reactor is running: crochet's thread, unless the reactor
    already runs elsewhere (twistd, an application's own ``reactor.run``).
    """
    global _told_crochet
    import crochet
    from twisted.internet import reactor

    with _setup_lock:
        running = getattr(reactor, "running", False)
        if not (_hosted or running):
            crochet.setup()
        elif not _told_crochet:
            # Once: no_setup adds a shutdown trigger, so it runs in the
            # reactor's thread if the reactor runs (twistd's, before it runs:
            # no other thread is about).
            try:
                if running:
                    blockingCallFromThread(reactor, crochet.no_setup)  # type: ignore[arg-type]
                else:
                    crochet.no_setup()
            except RuntimeError:
                pass  # crochet already set up: it is crochet's thread that runs
            _told_crochet = True


def call_blocking(
    what: str, deferred_form: str, fn: Callable[..., Any], *args: Any, timeout: float
) -> Any:
    """
    Call ``fn`` in the reactor thread and wait for its (Deferred) result.

    :raises ReactorThreadError: when called from the reactor thread, where
        waiting would deadlock.
    """
    if threadable.isInIOThread():
        raise ReactorThreadError(what, deferred_form)
    ensure_reactor_thread()
    import crochet

    try:
        return crochet.run_in_reactor(fn)(*args).wait(timeout)
    except TrainstreamError as e:
        # What the user can act on (a busy port, a damaged file) reads as
        # one line at their own call, not the reactor's stack that found it.
        raise e.with_traceback(None) from None


class StreamServerManager:
    """
    Hands out one running ``StreamServer`` and counts its users. At refcount
    0 it stops the server, and the call that released it returns only once
    every port is free.

    Methods named ``acquire``/``release``/``restart``/``shutdown`` return
    Deferreds and are for the reactor thread; ``get``/``put``/
    ``force_restart``/``cleanup`` block and are for every other thread.
    """

    def __init__(self, reactor: Any = None, timeout: float = 60.0) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._lock = DeferredLock()
        self._server: StreamServer | None = None
        self._refcount = 0
        self._shutdown_hooked = False

    @property
    def refcount(self) -> int:
        return self._refcount

    @property
    def server(self) -> StreamServer | None:
        """The server, while one is running."""
        return self._server if self.is_server_running() else None

    def is_server_running(self) -> bool:
        server = self._server
        return server is not None and server.listening

    # Deferred forms: reactor thread only.

    def acquire(self, config: ConfigLike = None) -> Deferred[StreamServer]:
        """Refcount +1, starting the server first if none is running."""
        return self._locked(self._acquire, config)

    def release(self) -> Deferred[None]:
        """Refcount -1; at 0, fires once the server is stopped and its ports are free."""
        return self._locked(self._release)

    def restart(self) -> Deferred[StreamServer]:
        """Stop and start the server again on the same config, same refcount."""
        return self._locked(self._restart)

    def shutdown(self) -> Deferred[None]:
        """Stop the server whatever the refcount, which becomes 0."""
        return self._locked(self._shutdown)

    def adopt(self, server: StreamServer) -> None:
        """
        Under twistd: make the server twistd runs the process-wide one, held
        once by twistd itself, so embedded code in that process shares it.
        """
        global _hosted
        _hosted = True
        server.blocking = call_blocking
        self._server = server
        self._refcount = 1

    def _locked(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return self._lock.run(lambda: Deferred.fromCoroutine(fn(*args)))

    async def _acquire(self, config: ConfigLike) -> StreamServer:
        server = self._server
        if server is not None and self._refcount > 0:
            if config is not None:
                # As asked (not as a --config file or a reload made it).
                differences = server.requested.differences(Config.from_value(config))
                if differences:
                    raise ConfigConflictError(differences)
            if not server.listening:
                await server.start()
            self._refcount += 1
            return server
        server = makeService(config, self._reactor)
        server.blocking = call_blocking
        await server.start()  # a failed start leaves nothing open: ports, history file
        self._server = server
        self._refcount = 1
        self._hook_shutdown()
        return server

    async def _release(self) -> None:
        if self._refcount == 0:
            raise TrainstreamError(
                "release_stream_server() was called more often than get_stream_server(): "
                "no server is held"
            )
        self._refcount -= 1
        if self._refcount == 0 and self._server is not None:
            server, self._server = self._server, None
            try:
                await server.stop()
            finally:
                server.close()  # whatever the stop said: the history file is freed

    async def _restart(self) -> StreamServer:
        server = self._server
        if server is None or self._refcount == 0:
            raise TrainstreamError(
                "force_restart(): no server is running; call get_stream_server()"
            )
        await server.stop()
        await server.start()
        return server

    async def _shutdown(self) -> None:
        self._refcount = 0
        server, self._server = self._server, None
        if server is not None:
            try:
                await server.stop()
            finally:
                server.close()

    def _hook_shutdown(self) -> None:
        """When the reactor stops (process exit), free the ports first."""
        if self._shutdown_hooked:
            return
        self._shutdown_hooked = True
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        reactor.addSystemEventTrigger("before", "shutdown", self.shutdown)

    # Blocking forms: any thread but the reactor's.

    def get(self, config: ConfigLike = None) -> StreamServer:
        """Blocking ``acquire``: returns once every port is bound."""
        if config is not None:
            Config.from_value(config)  # a bad config fails here, in the caller's thread
        started: list[Deferred[StreamServer]] = []
        held: list[bool] = []

        def acquire() -> Deferred[StreamServer]:
            def hold(server: StreamServer) -> StreamServer:
                held.append(True)
                return server

            started.append(self.acquire(config).addCallback(hold))
            return started[-1]

        try:
            server: StreamServer = call_blocking(
                "get_stream_server()",
                "manager.acquire(config)",
                acquire,
                timeout=self._timeout,
            )
        except BaseException:
            # Ctrl-C or a timeout while waiting: the start goes on, and the
            # caller will never release what it did not get. Release it
            # once held, in the reactor thread, where ``started`` and
            # ``held`` are set (its calls run in order: acquire() first).
            self._in_reactor(lambda: self._release_if_held(started, held))
            raise
        return server

    def _release_if_held(self, started: list[Deferred[StreamServer]], held: list[bool]) -> None:
        if not started:
            return  # interrupted before the acquire was asked for

        def release(_: object) -> Deferred[None] | None:
            return self.release() if held else None

        started[0].addBoth(release).addErrback(
            lambda f: _log.failure("releasing an interrupted get_stream_server()", f)
        )

    def _in_reactor(self, f: Callable[[], None]) -> None:
        """``f`` in the reactor thread, after what ``call_blocking`` asked of it."""
        from twisted.internet import reactor  # crochet's: call_blocking's calls run in order

        reactor.callFromThread(f)  # type: ignore[attr-defined]

    def put(self) -> None:
        """Blocking ``release``: at refcount 0 returns once every port is free."""
        call_blocking(
            "release_stream_server()", "manager.release()", self.release, timeout=self._timeout
        )

    def force_restart(self) -> StreamServer:
        server: StreamServer = call_blocking(
            "force_restart()", "manager.restart()", self.restart, timeout=self._timeout
        )
        return server

    def cleanup(self) -> None:
        """Stop the server whatever the refcount; returns once every port is free."""
        call_blocking("cleanup()", "manager.shutdown()", self.shutdown, timeout=self._timeout)


_manager = StreamServerManager()


def get_stream_server_manager() -> StreamServerManager:
    """The process-wide manager."""
    return _manager


def get_stream_server(config: ConfigLike = None, training_system: object = None) -> StreamServer:
    """
    The process-wide server, started if none runs (refcount +1). Returns once
    every port is bound.

    :param config: a ``Config`` or a dict of option names; ``None`` for the
        defaults (or, when a server runs, whatever it runs with).
    :param training_system: accepted so that code written for the original
        tool (``get_stream_server(training_system=self.parent(),
        config=stream_config)``) runs unchanged. It is not used: the server is
        shared by the whole process and needs nothing from its caller.
    :raises PortInUseError: naming the port and endpoint; the refcount is unchanged.
    :raises ConfigConflictError: when a server runs with another config.
    """
    return _manager.get(config)


def release_stream_server() -> None:
    """Refcount -1; at 0 returns only when every port is free."""
    _manager.put()


def keep_serving(message: str | None = None) -> None:
    """
    Block the calling thread while the process-wide server serves, until
    Ctrl-C (or, in the main thread, SIGTERM); then return normally, so the
    caller releases the server as usual. For scripts whose dashboard should
    outlive their training loop.

    :param message: printed (and flushed) to stdout once Ctrl-C is caught,
        so a Ctrl-C the moment it appears still ends quietly.

    Once it has returned, a further Ctrl-C in the main thread only says the
    server is stopping: it would interrupt the caller's release, or
    Python's exit joining threads, with a traceback (a second Ctrl-C comes
    fast from an impatient user). SIGTERM and a second signal of another
    kind still end the process.

    :raises ReactorThreadError: from the reactor thread, where it would deadlock.
    :raises TrainstreamError: when no server is running.
    """
    import signal

    if threadable.isInIOThread():
        raise ReactorThreadError("keep_serving()", "nothing: the reactor already serves")
    if not _manager.is_server_running():
        raise TrainstreamError("keep_serving(): no server is running; call get_stream_server()")

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, interrupt) if main else None
    try:
        try:
            if message is not None:
                print(message, flush=True)
            forever = threading.Event()
            # Woken now and then: the kernel may hand a Ctrl-C to another
            # thread, and Python then runs its handler (KeyboardInterrupt)
            # only once the main thread wakes; a wait with no timeout never
            # would (seen in CI: three Ctrl-C, the main thread still waiting).
            while not forever.wait(_SIGNAL_CHECK):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            if main:
                signal.signal(signal.SIGINT, _stopping)
    except KeyboardInterrupt:
        pass  # the second arrived before the handler was in place
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


#: Seconds between the main thread's looks for a signal in ``keep_serving``.
_SIGNAL_CHECK = 0.2


def _stopping(signum: int, frame: object) -> None:
    """SIGINT once ``keep_serving`` has returned: the server is on its way down."""
    try:
        print("trainstream: stopping (saving the history and closing the ports)", flush=True)
    except (OSError, ValueError):  # stdout closed or gone
        pass


def revisit_hint(config: Config) -> str:
    """How to see a run again once this process has ended (for scripts to print)."""
    if config.memory:
        return (
            "the history was kept in memory and ends with this process; to watch a run "
            "after the script ends, run it with a history file, or keep serving "
            "(trainstream.keep_serving())"
        )
    from trainstream.config import default_db_path

    db = config.db or default_db_path()
    option = "" if config.db is None else f" --db {db}"
    return (
        f"the run is stored in {db}; to see it again: twistd -n trainstream{option} "
        "and open http://127.0.0.1:8890/ (or keep this process serving: trainstream.keep_serving())"
    )


@contextmanager
def serve(config: ConfigLike = None) -> Iterator[StreamServer]:
    """``with serve(config) as server:`` holds the server for the block."""
    server = get_stream_server(config)
    try:
        yield server
    finally:
        release_stream_server()
