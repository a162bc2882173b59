"""
What the web layer needs of a server, and nothing more.

``web/`` builds every resource from a ``Backend``: the hub (the one way in
for events, subscriptions, the store), the runs and ranks registries, the
live clients, and a ``status()`` snapshot for health and ``/metrics``. It
never sees the server object, its listeners or its lifecycle, so a test can
hand it a small fake, and nothing in ``web/`` imports the server module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from attrs import Factory, frozen

if TYPE_CHECKING:
    from trainstream.hub import Hub
    from trainstream.lag import LagStatus
    from trainstream.ranks import RanksService
    from trainstream.runs import RunsService
    from trainstream.web.clients import Clients


@frozen
class ListenerStatus:
    """One bound listener as health shows it."""

    role: str
    endpoint: str
    port: int | None
    url: str
    connections: int
    loopback: bool

    def to_json(self) -> dict[str, object]:
        return {
            "endpoint": self.endpoint,
            "port": self.port,
            "url": self.url,
            "connections": self.connections,
        }


@frozen
class ServerStatus:
    """
    A snapshot of the server for ``/api/health``, ``/metrics`` and the access
    checks; cheap to make (no I/O).

    :ivar problems: reasons the server is degraded (empty: ok), besides the
        store's own (``hub.store.health()``).
    """

    uptime_s: float
    urls: Mapping[str, str]
    listeners: tuple[ListenerStatus, ...] = ()
    problems: tuple[str, ...] = Factory(tuple)
    #: The reactor lag (``trainstream.lag``), if measured.
    lag: LagStatus | None = None
    #: Changes with each successful config reload (``trainstream.configfile``).
    config_version: int = 1
    #: A cluster member's view of its cluster (``ClusterEngine.describe``), else ``None``.
    cluster: Mapping[str, object] | None = None

    @property
    def ports(self) -> frozenset[int]:
        return frozenset(li.port for li in self.listeners if li.port)

    @property
    def loopback_only(self) -> bool:
        """Every listener is bound to a loopback address (the Host check applies)."""
        return bool(self.listeners) and all(li.loopback for li in self.listeners)


class Backend(Protocol):
    """The server as the web layer sees it."""

    @property
    def hub(self) -> Hub: ...

    @property
    def runs(self) -> RunsService: ...

    @property
    def ranks(self) -> RanksService | None: ...

    @property
    def clients(self) -> Clients: ...

    def status(self) -> ServerStatus: ...
