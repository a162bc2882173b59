"""
``twistd trainstream``: options and the service twistd runs.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from trainstream.config import DEFAULT_REST, DEFAULT_SSE, DEFAULT_WS, Config
from trainstream.errors import ConfigError


class Options(usage.Options):
    """The options of PROTOCOL section 1."""

    synopsis = "[options]"
    longdesc = (
        "Stream machine-learning training runs live: SSE, WebSocket, REST and a "
        "dashboard on one reactor. Endpoints are Twisted endpoint strings "
        "(tcp:0 picks a free port)."
    )
    optParameters = [
        ["sse", None, DEFAULT_SSE, "Listener whose role is SSE."],
        ["ws", None, DEFAULT_WS, "Listener whose role is WebSocket."],
        ["rest", None, DEFAULT_REST, "Listener whose role is REST + dashboard."],
        ["listen", None, None, "Single-port mode: one listener serves everything."],
        ["db", None, None, "SQLite history file (default: in the user's data dir)."],
        ["token", None, None, "Require this bearer token."],
        ["token-file", None, None, "Read the bearer token from this file."],
        ["ports-file", None, None, "Write the bound URLs as JSON here once listening."],
        ["close-timeout", None, 2.0, "Seconds a client gets to answer a close handshake.", float],
        ["keepalive", None, 15.0, "Seconds between SSE keepalive comments.", float],
        ["stall-after", None, 120.0, "Seconds without events before a run is stalled.", float],
        ["retain-days", None, None, "SQLite: drop events older than this many days.", float],
        ["max-db-mb", None, None, "SQLite: drop the oldest events past this file size.", float],
        [
            "client-buffer",
            None,
            1 << 20,
            "Bytes of events that may wait for one slow client (then coalesced, then closed).",
            int,
        ],
    ]
    optFlags = [
        ["memory", None, "Keep history in RAM only."],
        ["demo", None, "Also publish a synthetic training run."],
        ["access-log", None, "Log every request (default: not successful publishes)."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["allow_origin"] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Refuse an abbreviated long option: getopt would take ``--port=8888``
        as ``--ports-file=8888``, silently; a prefix never selects an option.
        """
        import sys

        args = sys.argv[1:] if options is None else options
        known = {name.rstrip("=") for name in self.longOpt} | {"help", "version"}
        for arg in args:
            if arg == "--":
                break
            if not arg.startswith("--"):
                continue
            name = arg[2:].split("=", 1)[0]
            if name not in known:
                near = sorted(k for k in known if k.startswith(name))
                hint = f" (did you mean {', '.join('--' + k for k in near)}?)" if near else ""
                raise usage.UsageError(
                    f"unknown option --{name}{hint}: give the option's whole name; "
                    "see twistd trainstream --help"
                )
        super().parseOptions(options)  # type: ignore[no-untyped-call]

    def opt_allow_origin(self, origin: str) -> None:
        """Also accept WebSocket upgrades from this Origin (repeatable)."""
        self["allow_origin"].append(origin)

    def postOptions(self) -> None:
        try:
            self.config = config_from_options(self)
            self.config.resolve_token()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def config_from_options(options: Any) -> Config:
    return Config.from_value(
        {
            "sse": options["sse"],
            "ws": options["ws"],
            "rest": options["rest"],
            "listen": options["listen"],
            "db": options["db"],
            "memory": bool(options["memory"]),
            "token": options["token"],
            "token_file": options["token-file"],
            "ports_file": options["ports-file"],
            "demo": bool(options["demo"]),
            "allow_origin": list(options["allow_origin"]),
            "close_timeout": options["close-timeout"],
            "keepalive": options["keepalive"],
            "stall_after": options["stall-after"],
            "client_buffer": options["client-buffer"],
            "retain_days": options["retain-days"],
            "max_db_mb": options["max-db-mb"],
            "access_log": bool(options["access-log"]),
        }
    )


class TwistdService(MultiService):
    """
    What twistd runs. The server itself is built in ``privilegedStartService``,
    which twistd calls after it has daemonized: the SQLite writer thread
    must be started in the process that will use it (threads do not survive
    the fork), and a history file held by another server is reported then.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.server: Any = None

    def privilegedStartService(self) -> None:
        from trainstream.errors import TrainstreamError
        from trainstream.manager import get_stream_server_manager
        from trainstream.service import StreamServer

        try:
            self.server = StreamServer(self.config)
        except TrainstreamError as e:
            raise SystemExit(f"trainstream: {e}") from None
        get_stream_server_manager().adopt(self.server)
        self.server.setServiceParent(self)
        super().privilegedStartService()  # type: ignore[no-untyped-call]


def makeService(options: Options) -> IService:
    """The server twistd runs, shared with embedded code through the manager."""
    import crochet

    crochet.no_setup()  # twistd owns the reactor: crochet must not start another
    return TwistdService(options.config)
