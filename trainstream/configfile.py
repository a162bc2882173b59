"""
``--config FILE``: every option in a TOML file, and its hot reload.

The file's keys are ``Config``'s field names (``-`` may stand for ``_``),
at the top level::

    rest = "tcp:8890:interface=127.0.0.1"
    token_file = "/etc/trainstream/token"
    allow_origin = ["https://lab.example.org"]
    stall_after = 300
    lag_warn = 0.5

Options given to the server itself (on the command line, or embedded:
the keys of the config given that differ from the defaults) win over the
file, at start and at every reload. An unknown key, a value of the wrong
type, a file that is not TOML: refused with one line naming the file, the
key and the problem.

A reload (SIGHUP under twistd where the system has it, or ``POST
/api/config/reload`` with the write token) reads the file again and applies
what can change live (``LIVE``) without dropping a client: the tokens, the
allowed origins, retention, the client buffer (of clients connecting from
then on), the stall time, the lag threshold. A file that fails to load is
refused: the old config stays in force, and the reason is logged (and
answered, 400). A change to anything else (endpoints, ``db``, ...) is not
applied: the running value stays until the next start, and the reload
says so, naming each key, as a warning. ``/api/health``'s
``config_version`` counts the successful reloads (1 at start).
"""

from __future__ import annotations

import tomllib
from typing import Any

import attrs
from attrs import frozen
from twisted.logger import Logger

from trainstream.config import Config
from trainstream.errors import ConfigError

_log = Logger()

#: What a reload changes in a running server.
LIVE = frozenset(
    {
        "token",
        "token_file",
        "read_token",
        "read_token_file",
        "allow_origin",
        "retain_days",
        "max_db_mb",
        "client_buffer",
        "stall_after",
        "lag_warn",
    }
)


def load_file(path: str) -> dict[str, Any]:
    """
    The options of the TOML file at ``path``, checked one by one.

    :raises ConfigError: one line naming the file, the key and the problem.
    """
    where = f"config file {path!r}"
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from None
    fields = attrs.fields_dict(Config)
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key == "config":
            raise ConfigError(f"{where}: key 'config': a config file cannot name another one")
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown key {raw_key!r}; known keys: "
                f"{', '.join(sorted(set(fields) - {'config'}))}"
            )
        if isinstance(value, dict):
            raise ConfigError(f"{where}: key {raw_key!r}: a table is not an option value")
        try:
            Config.from_value({key: value})
        except ConfigError as e:
            raise ConfigError(f"{where}: key {raw_key!r}: {e}") from None
        values[key] = value
    return values


def overrides(given: Config) -> dict[str, Any]:
    """The options of ``given`` that differ from the defaults (they win over the file)."""
    default = Config()
    return {
        f.name: getattr(given, f.name)
        for f in attrs.fields(Config)
        if f.name != "config" and getattr(given, f.name) != getattr(default, f.name)
    }


def effective(given: Config) -> Config:
    """
    ``given`` with its config file's options under it (``given`` wins), or
    ``given`` itself when it names no file; checked as a start would
    (tokens resolved).

    :raises ConfigError: naming the file, the key and the problem.
    """
    if given.config is None:
        return given
    values = {**load_file(given.config), **overrides(given), "config": given.config}
    try:
        config = Config.from_value(values)
        config.resolve_token()
        config.resolve_read_tokens()
    except ConfigError as e:
        raise ConfigError(f"config file {given.config!r}: {e}") from None
    return config


@frozen
class Reloaded:
    """What a reload did: ``ok`` or not, and the message saying it."""

    ok: bool
    message: str
    changed: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    version: int = 0
    #: refused because the server was started without ``--config``
    no_file: bool = False

    def to_json(self) -> dict[str, object]:
        if not self.ok:
            return {"error": self.message}
        return {
            "reloaded": True,
            "config_version": self.version,
            "changed": list(self.changed),
            "not_applied": list(self.kept),
            "message": self.message,
        }


def reload(server: Any) -> Reloaded:
    """
    Read the config file of ``server`` (a ``StreamServer``) again and apply
    what can change live; refuse (the old config kept) a file that fails
    to load. Reactor thread.
    """
    running = server.config
    path = running.config
    if path is None:
        message = "no config file to reload: start the server with --config FILE"
        _log.warn("config reload refused: {message}", message=message)
        return Reloaded(False, message, no_file=True)
    try:
        new = effective(attrs.evolve(server.requested, config=path))
    except ConfigError as e:
        message = f"{e}; the running config is kept"
        _log.error("config reload refused: {message}", message=message)
        return Reloaded(False, message)
    names = [
        f.name for f in attrs.fields(Config) if getattr(running, f.name) != getattr(new, f.name)
    ]
    changed = tuple(n for n in names if n in LIVE)
    kept = tuple(n for n in names if n not in LIVE)
    live = {n: getattr(new, n) for n in changed}
    applied = attrs.evolve(running, **live)
    _apply(server, running, applied)
    server.config = applied
    server.config_version += 1
    message = f"config file {path!r} reloaded (version {server.config_version})"
    message += f": changed {', '.join(changed)}" if changed else ": nothing changed live"
    _log.info("{message}", message=message)
    if kept:
        warning = (
            f"config file {path!r}: {', '.join(kept)} changed, but cannot change while "
            "running: the running values stay until the next start"
        )
        _log.warn("{text}", text=warning)
        message += f"; {warning}"
    return Reloaded(True, message, changed, kept, server.config_version)


def _apply(server: Any, old: Config, new: Config) -> None:
    """Put the live options of ``new`` in force (nothing is closed or dropped)."""
    site: Any = server.site
    access = site.access
    if access is not None:
        token = new.resolve_token()
        access.token = token.encode() if token is not None else None
        access.read_tokens = tuple(t.encode() for t in new.resolve_read_tokens())
        access.allow_origin = {o.rstrip("/").lower() for o in new.allow_origin}
        from urllib.parse import urlsplit

        access.allow_hosts = {urlsplit(o).hostname for o in access.allow_origin} - {None}
    root = site.resource
    sse = getattr(root, "sse", None)
    if sse is not None:
        sse.buffer_bytes = new.client_buffer
    ws = getattr(root, "ws", None)
    if ws is not None:
        built = getattr(ws, "_ws", None)
        if built is not None:
            built._factory.buffer_bytes = new.client_buffer
        else:
            build = ws._build

            def with_buffer() -> Any:
                resource = build()
                resource._factory.buffer_bytes = server.config.client_buffer
                return resource

            ws._build = with_buffer
    server.runs.stall_after = new.stall_after
    monitoring = getattr(server, "monitoring", None)
    if monitoring is not None:
        monitoring.lag.warn = new.lag_warn
    if (old.retain_days, old.max_db_mb) != (new.retain_days, new.max_db_mb):
        _retention(server, new)


def _retention(server: Any, new: Config) -> None:
    from trainstream.store.service import RetentionService
    from trainstream.store.sqlite import SQLiteStore

    for child in server:
        if isinstance(child, RetentionService):
            child.retain_days, child.max_db_mb = new.retain_days, new.max_db_mb
            return
    if isinstance(server.store, SQLiteStore) and (new.retain_days or new.max_db_mb):
        service = RetentionService(server.store, server.reactor, new.retain_days, new.max_db_mb)
        service.setServiceParent(server)  # type: ignore[no-untyped-call]


def install_sighup(server: Any, reactor: Any) -> bool:
    """
    Reload on SIGHUP, where the system has it (not Windows): twistd only,
    since embedded code leaves the process's signals to its application.
    """
    import signal

    if not hasattr(signal, "SIGHUP"):
        return False

    def hup(signum: int, frame: object) -> None:
        reactor.callFromThread(reload, server)

    signal.signal(signal.SIGHUP, hup)
    return True


__all__ = ["LIVE", "Reloaded", "effective", "install_sighup", "load_file", "reload"]
