"""
Automatic fault detection: the server's own faults as events on a run of
their own, ``trainstream/server``, which the dashboard lists like any run.

Every ``interval`` seconds (and at once when the reactor lag crosses its
threshold) the monitor asks its sources what is wrong now, each fault under
a key: the store (its writer process dead, a write failing, the disk
full: ``hub.store.health()``), the reactor lag (``lag.py``), each listener
that stopped accepting connections (``AcceptChecks`` below). A fault that
appears is published once through ``Hub.accept`` as an ``alert`` (``kind``
the fault's kind, ``name`` the listener's role if any); one that ends, as a
``log`` line (``info``, "resolved: ..."). ``/api/health`` says
``degraded`` with the reasons meanwhile (the store's from the store, the
others from ``ServerStatus.problems``).

A full disk is the exception: an event accepted then is numbered, refused
by the store and shown to nobody (the hub shows only what was committed),
so no alert can be published while the disk is full. That one is logged at
once (an error line), health says so meanwhile, and the alert is published
once the disk has room again, saying since when it was full, followed by
the "resolved" line; the events of other faults that start or end
meanwhile are held until then, in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.base import ReactorBase
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from trainstream.lag import LagMonitor

_log = Logger()

#: The run the server's own alerts are published on.
SERVER_RUN = "trainstream/server"
#: Kinds of fault (the ``kind`` of their alerts).
DISK_FULL, STORE_WRITER, STORE, REACTOR_LAG, LISTENER = (
    "disk_full",
    "store_writer",
    "store",
    "reactor_lag",
    "listener",
)

#: A source: what is wrong now, ``{key: message}``; a key is ``kind`` or ``kind:name``.
Source = Callable[[], Mapping[str, str]]


def store_faults(health: Callable[[], Any]) -> Source:
    """
    The store's problems (``Store.health``), each under the kind it is; a
    writer process that died and was restarted between two looks counts
    too (``writer_restarts`` grew), for one look.
    """
    seen = [health().writer_restarts]

    def faults() -> dict[str, str]:
        found: dict[str, str] = {}
        now = health()
        for problem in now.problems:
            if "disk is full" in problem:
                found[DISK_FULL] = problem
            elif "writer process" in problem:
                found[STORE_WRITER] = problem
            else:
                found[STORE] = problem
        if now.writer_restarts > seen[0] and STORE_WRITER not in found:
            found[STORE_WRITER] = (
                f"the history's writer process died and was restarted "
                f"({now.writer_restarts} restarts since the server started)"
            )
        seen[0] = now.writer_restarts
        return found

    return faults


class FaultMonitor(Service):
    """
    Publishes the faults its sources report, as they start and end.

    :param accept: ``Hub.accept``: the one way in.
    :param sources: what to ask, every ``interval`` seconds.
    """

    name = "faults"

    def __init__(
        self,
        accept: Callable[[list[dict[str, object]]], object],
        clock: IReactorTime,
        sources: list[Source],
        interval: float = 1.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.accept = accept
        self.clock = clock
        self.sources = sources
        self.interval = interval
        self._now = now
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock
        #: key -> (message, when it started): the faults in force.
        self.active: dict[str, tuple[str, float]] = {}
        self._announced = False
        self._held: list[dict[str, object]] = []  # while the disk is full
        self.alerts_total = 0

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop.running:
            self._loop.stop()
        self.active.clear()  # looked at afresh at the next start

    def check(self) -> None:
        """Ask every source; publish what started and what ended."""
        current: dict[str, str] = {}
        for source in self.sources:
            try:
                current.update(source())
            except Exception:
                _log.failure("fault source {source!r} failed", source=source)
        events: list[dict[str, object]] = []
        for key, message in current.items():
            if key in self.active:
                continue
            self.active[key] = (message, self._now())
            if key.split(":", 1)[0] == DISK_FULL:
                # Refused by the store and shown to nobody if published now.
                _log.error(
                    "server fault: {message} (alerted once the disk has room)", message=message
                )
                continue
            events.append(self._alert(key, message))
        for key in [k for k in self.active if k not in current]:
            message, since = self.active.pop(key)
            if key.split(":", 1)[0] == DISK_FULL:
                events.append(
                    self._alert(
                        key,
                        f"the disk was full for {self._now() - since:.0f} s "
                        f"(from {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}): "
                        f"{message}",
                    )
                )
            events.append(
                {
                    "type": "log",
                    "run": SERVER_RUN,
                    "level": "info",
                    "message": f"resolved ({key}): {message}",
                }
            )
        if DISK_FULL in self.active:
            # Nothing published now could be stored: held until there is room.
            self._held += events
            return
        events, self._held = self._held + events, []
        if events:
            self._publish(events)

    def _alert(self, key: str, message: str) -> dict[str, object]:
        kind, _, name = key.partition(":")
        alert: dict[str, object] = {
            "type": "alert",
            "run": SERVER_RUN,
            "kind": kind,
            "message": message,
        }
        if name:
            alert["name"] = name
        _log.warn("server fault ({kind}): {message}", kind=key, message=message)
        return alert

    def _publish(self, events: list[dict[str, object]]) -> None:
        if not self._announced:
            # Not a training run: a state the stall check leaves alone.
            events.insert(
                0,
                {
                    "type": "status",
                    "run": SERVER_RUN,
                    "state": "paused",
                    "message": "the server's own faults: alerts, and a log line when one ends",
                },
            )
            self._announced = True
        self.alerts_total += sum(1 for e in events if e["type"] == "alert")
        try:
            self.accept(events)
        except Exception as e:  # a store not open (stopping): said, and the checks go on
            _log.error("server fault events dropped: {e}", e=e)


class _Probe(Protocol):
    def __init__(self, done: Callable[[object], None]) -> None:
        self.done = done

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.done(self.transport)


class _ProbeFactory(ClientFactory):
    noisy = False

    def __init__(self) -> None:
        self.result: Deferred[Any] = Deferred()

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Probe(self._connected)

    def _connected(self, transport: object) -> None:
        if not self.result.called:
            self.result.callback(transport)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.result.called:
            self.result.errback(reason)


class AcceptChecks:
    """
    Whether each TCP listener still accepts connections: every ``interval``
    seconds, a connection to each bound port, from the reactor (never
    blocking it), must be taken by the listener itself (it shows among the
    listener's connections) within ``timeout`` seconds. The probe then
    resets its connection (no TIME_WAIT anywhere), having sent nothing, so
    no request is logged. UNIX listeners are not probed.

    :param listeners: the bound listeners now (``Listeners.bound``).
    """

    def __init__(
        self,
        reactor: Any,
        listeners: Callable[[], list[Any]],
        interval: float = 5.0,
        timeout: float = 2.0,
    ) -> None:
        self.reactor = reactor
        self.listeners = listeners
        self.interval = interval
        self.timeout = timeout
        self.failing: dict[str, str] = {}
        self._loop = LoopingCall(self.probe_all)
        self._loop.clock = reactor
        self._inflight: set[_Attempt] = set()
        self.probes = 0
        #: Whether the reactor itself lags (then a timed-out probe proves nothing).
        self.lagging: Callable[[], bool] = lambda: False

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        for probe in list(self._inflight):
            probe.cancel()
        self._inflight.clear()
        self.failing.clear()

    def faults(self) -> dict[str, str]:
        return dict(self.failing)

    def probe_all(self) -> Deferred[None]:
        """Probe every listener; fires once each answered or timed out."""
        probes = [self.probe(li) for li in self.listeners()]
        return gatherResults(probes, consumeErrors=True).addCallback(lambda _: None)

    def probe(self, listener: Any) -> Deferred[None]:
        """Probe one listener; note its fault (or that it has none)."""
        address = listener.port.getHost()
        key = f"{LISTENER}:{listener.role}"
        port = getattr(address, "port", None)
        if not isinstance(port, int) or getattr(listener.port, "socket", None) is None:
            return succeed(None)  # UNIX, or no socket at all (a test's memory reactor)
        host = str(address.host)
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
        where = f"listener {listener.role} ({listener.description!r}) on port {port}"
        self.probes += 1
        probe = _Attempt(self.reactor, self.timeout)
        self._inflight.add(probe)

        def outcome(result: object) -> None:
            self._inflight.discard(probe)
            if isinstance(result, Failure) and result.check(TimeoutError) and self.lagging():
                return  # a reactor too late to take it: the lag is the fault, said as such
            if isinstance(result, Failure):
                message = f"{where} does not accept connections: {result.getErrorMessage()}"
                if self.failing.get(key) != message:
                    _log.error("{message}", message=message)
                self.failing[key] = message
            elif self.failing.pop(key, None) is not None:
                _log.info("{where} accepts connections again", where=where)

        return probe.run(host, port, listener.factory).addBoth(outcome)


class _Attempt:
    """One probe: connect, see the listener take it, reset; cancellable."""

    def __init__(self, reactor: Any, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.factory = _ProbeFactory()
        self.connector: Any = None
        self.transport: Any = None
        self.calls: list[IDelayedCall] = []
        self.result: Deferred[None] = Deferred()

    def run(self, host: str, port: int, listening: Any) -> Deferred[None]:
        self.connector = self.reactor.connectTCP(host, port, self.factory, timeout=self.timeout)
        self.calls.append(self.reactor.callLater(self.timeout, self._fail, "no answer in time"))
        self.factory.result.addCallbacks(lambda t: self._look(t, listening), self._failed)
        return self.result

    def _look(self, transport: Any, listening: Any) -> None:
        self.transport = transport
        local = transport.getHost().port
        if any(getattr(w.getPeer(), "port", None) == local for w in list(listening.protocols)):
            self._end(None)
            return
        self.calls.append(self.reactor.callLater(0.01, self._look, transport, listening))

    def _failed(self, failure: Failure) -> None:
        self._end(failure)

    def _fail(self, why: str) -> None:
        what = "connected, but the listener never took it" if self.transport else why
        self._end(Failure(TimeoutError(f"{what} ({self.timeout:g} s)")))

    def _end(self, result: Failure | None) -> None:
        if self.result.called:
            return
        self.cancel()
        if result is None:
            self.result.callback(None)
        else:
            self.result.errback(result)

    def cancel(self) -> None:
        """Stop waiting: no call left pending, no connection left open."""
        for call in self.calls:
            if call.active():
                call.cancel()
        self.calls = []
        if self.transport is not None:
            self.transport.abortConnection()
            self.transport = None
        elif self.connector is not None and not self.factory.result.called:
            self.factory.result.addErrback(lambda _: None)
            self.connector.disconnect()


class Monitoring(MultiService):
    """
    The reactor lag, the listeners' accept checks and the fault monitor of
    one server, started after everything else and stopped first.

    :param listeners: the bound listeners now.
    """

    def __init__(
        self,
        hub: Any,
        reactor: Any,
        lag_warn: float,
        listeners: Callable[[], list[Any]],
        check_interval: float = 5.0,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.setName("monitoring")  # type: ignore[no-untyped-call]
        self.lag = LagMonitor(reactor, lag_warn)
        # A test's memory reactor or Clock advances in jumps: not lag.
        self.lag.enabled = isinstance(reactor, ReactorBase)
        self.lag.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.accept_checks = AcceptChecks(reactor, listeners, check_interval)
        checks = self.accept_checks
        checks.lagging = lambda: self.lag.status().max_s >= checks.timeout / 4
        self.faults = FaultMonitor(
            hub.accept,
            reactor,
            [store_faults(hub.store.health), self._lag_faults, self.accept_checks.faults],
        )
        self.faults.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.lag.on_change = lambda _: self.faults.check()

    def _lag_faults(self) -> dict[str, str]:
        problem = self.lag.problem()
        return {REACTOR_LAG: problem} if problem else {}

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.accept_checks.start()

    def stopService(self) -> Deferred[None]:
        self.accept_checks.stop()
        d: Deferred[None] = super().stopService()  # type: ignore[no-untyped-call]
        return d

    def problems(self) -> tuple[str, ...]:
        """What health says besides the store: the lag, listeners that stopped accepting."""
        lag = self.lag.problem()
        return (*([lag] if lag else []), *self.accept_checks.failing.values())


__all__ = ["SERVER_RUN", "AcceptChecks", "FaultMonitor", "Monitoring", "store_faults"]
