"""
``twistd trainstream``: options and the service twistd runs.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from trainstream.config import Config, cli_fields
from trainstream.errors import ConfigError


class Options(usage.Options):
    """The options of PROTOCOL section 1."""

    synopsis = "[options]"
    longdesc = (
        "Stream machine-learning training runs live: SSE, WebSocket, REST and a "
        "dashboard on one reactor. Endpoints are Twisted endpoint strings "
        "(tcp:0 picks a free port)."
    )
    # Derived from the Config fields: one definition of each option.
    optParameters = [
        [
            f.name.replace("_", "-"),
            None,
            f.default,
            f.metadata["help"],
            None if f.metadata["kind"] is str else f.metadata["kind"],
        ]
        for f in cli_fields()
        if f.metadata["cli"] == "param"
    ]
    optFlags = [
        [f.name.replace("_", "-"), None, f.metadata["help"]]
        for f in cli_fields()
        if f.metadata["cli"] == "flag"
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["allow_origin"] = []
        self["read_token"] = []
        self["read_token_file"] = []

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

    def opt_read_token(self, token: str) -> None:
        """A token that may read (GET, SSE, WS subscribe, the page) but not write (repeatable)."""
        self["read_token"].append(token)

    def opt_read_token_file(self, path: str) -> None:
        """Read tokens from this file, one a line (repeatable)."""
        self["read_token_file"].append(path)

    def postOptions(self) -> None:
        from trainstream.configfile import effective

        try:
            self.config = config_from_options(self)
            # --config FILE: checked now (one line, no traceback); the
            # server reads it again, under the options given here.
            checked = effective(self.config)
            checked.resolve_token()
            checked.resolve_read_tokens()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def config_from_options(options: Any) -> Config:
    """The ``Config`` of parsed options (every check is the Config's own)."""
    values: dict[str, Any] = {f.name: options[f.name.replace("_", "-")] for f in cli_fields()}
    for f in cli_fields():
        if f.metadata["cli"] == "flag":
            values[f.name] = bool(values[f.name])
    for name in ("allow_origin", "read_token", "read_token_file"):
        values[name] = list(options[name])
    return Config.from_value(values)


def makeService(options: Options) -> IService:
    """
    The server twistd runs: the same services embedded code gets
    (``trainstream.server.makeService``), shared with embedded code in this
    process through the manager. Nothing starts here: the store opens and
    the ports bind when twistd starts the service, after it daemonized.
    """
    from twisted.internet import reactor

    from trainstream import gcpolicy
    from trainstream.embedded import get_stream_server_manager
    from trainstream.server import makeService as makeServerService

    # twistd owns the reactor: embedded calls in this process find it running
    # (ensure_reactor_thread), so crochet is neither imported nor started here.
    server = makeServerService(options.config, reactor)
    gcpolicy.tune()  # this process serves and does nothing else
    get_stream_server_manager().adopt(server)
    if server.config.config is not None:
        from trainstream.configfile import install_sighup

        install_sighup(server, reactor)  # where the system has SIGHUP (not Windows)
    return server
