"""
The server's configuration: one value type shared by twistd and the embedded API.

Each field says once what it is: its type and range (checked whoever builds
a ``Config``: a dict, keyword arguments, the command line) and its help
text, from which ``twistd trainstream``'s options are derived (``tap.py``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from attrs import frozen

from trainstream.errors import ConfigError

#: The environment variable a token is read from when none is given.
TOKEN_ENV = "TRAINSTREAM_TOKEN"
#: Fields whose values are secrets: never shown in a message.
_SECRET_FIELDS = frozenset({"token", "read_token"})
DEFAULT_SSE = "tcp:8888:interface=127.0.0.1"
DEFAULT_WS = "tcp:8889:interface=127.0.0.1"
DEFAULT_REST = "tcp:8890:interface=127.0.0.1"
#: Bytes of events that may wait for one slow client (``--client-buffer``).
DEFAULT_CLIENT_BUFFER = 1 << 20
#: MiB of the newest events kept in RAM (``--cache-mb``): the whole of a
#: ``--memory`` history, and the SQLite history's cache of recent events.
#: 32 MiB holds about 88,000 metric events (near the count bound,
#: ``max_history``, that governed before) or 550 log events of 60 KB, and
#: keeps a server's growth well under its targets (``bench/memory.py``).
DEFAULT_CACHE_MB = 32.0


def default_db_path() -> str:
    """The SQLite history file in the user's data directory."""
    from platformdirs import user_data_dir

    return os.path.join(user_data_dir("trainstream", appauthor=False), "history.sqlite3")


# Checks, each naming the key and the value it refuses.

Check = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _string(optional: bool) -> Check:
    def check(_: Any, a: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str):
            raise ConfigError(f"config {a.name!r} must be a string, not {value!r}")

    return check


def _flag(_: Any, a: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"config {a.name!r} must be true or false, not {value!r}")


def _positive(kind: type, optional: bool = False) -> Check:
    def check(_: Any, a: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        ok = not isinstance(value, bool) and (
            isinstance(value, int) if kind is int else isinstance(value, int | float)
        )
        if not ok or not 0 < value < math.inf:  # NaN and infinity are refused too
            what = "a positive integer" if kind is int else "a positive number"
            raise ConfigError(f"config {a.name!r} must be {what}, not {value!r}")

    return check


def _strings(name: str) -> Check:
    def check(_: Any, a: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config {name!r} must be a list of strings, not {value!r}")

    return check


_origins = _strings("allow_origin")


def _count(_: Any, a: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
        raise ConfigError(f"config {a.name!r} must be an integer from 0 to 1000, not {value!r}")


@frozen
class RedisURL:
    """Where a cluster's Redis is: ``redis://HOST:PORT/DB`` (port 6379, db 0 by default)."""

    host: str
    port: int
    db: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_redis_url(url: str) -> RedisURL:
    """
    ``redis://HOST[:PORT][/DB]`` as a :class:`RedisURL`.

    :raises ConfigError: naming the URL and what is wrong with it.
    """
    from urllib.parse import urlsplit

    def bad(why: str) -> ConfigError:
        return ConfigError(f"--redis {url!r}: {why}; give redis://HOST:PORT/DB")

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise bad(str(e)) from None
    if parts.scheme != "redis":
        raise bad("the scheme must be redis://")
    if parts.username or parts.password:
        raise bad("credentials in the URL are not supported")
    if not parts.hostname:
        raise bad("no host")
    if parts.query or parts.fragment:
        raise bad("no query or fragment is understood")
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise bad(f"the database must be a number, not {db_text!r}")
    return RedisURL(parts.hostname, 6379 if port is None else port, int(db_text))


def _redis_url(_: Any, a: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise ConfigError(f"config {a.name!r} must be a string, not {value!r}")
    parse_redis_url(value)


def _as_origins(value: Any) -> Any:
    """One origin or a list of them, as a tuple (anything else is refused by ``_origins``)."""
    if isinstance(value, str):
        return (value,)
    return tuple(value) if isinstance(value, list) else value


def _hidden(value: object) -> str:
    """The repr of a secret: whether there is one, never what it is."""
    return "(hidden)" if value else repr(value)


def _option(
    default: Any,
    check: Check,
    help: str,
    cli: str | None = "param",
    kind: type = str,
    secret: bool = False,
) -> Any:
    """
    A field: its default, its check, and how twistd offers it (``cli``:
    param, flag, None); a ``secret`` is never shown by the repr.
    """
    return attrs.field(
        default=default,
        validator=check,
        repr=_hidden if secret else True,
        metadata={"help": help, "cli": cli, "kind": kind},
    )


@frozen
class Config:
    """
    Everything a server is started with. Field names are the long options of
    ``twistd trainstream`` with ``_`` for ``-``; each field's help says what it
    is (``twistd trainstream --help`` shows the same text).
    """

    sse: str = _option(DEFAULT_SSE, _string(False), "Listener whose role is SSE.")
    ws: str = _option(DEFAULT_WS, _string(False), "Listener whose role is WebSocket.")
    rest: str = _option(DEFAULT_REST, _string(False), "Listener whose role is REST + dashboard.")
    listen: str | None = _option(
        None, _string(True), "Single-port mode: one listener serves everything."
    )
    db: str | None = _option(
        None, _string(True), "SQLite history file (default: in the user's data dir)."
    )
    memory: bool = _option(False, _flag, "Keep history in RAM only.", "flag")
    token: str | None = _option(None, _string(True), "Require this bearer token.", secret=True)
    token_file: str | None = _option(None, _string(True), "Read the bearer token from this file.")
    read_token: tuple[str, ...] = attrs.field(
        default=(),
        converter=_as_origins,
        validator=_strings("read_token"),
        repr=_hidden,
        metadata={"help": "A token that may read but not write (repeatable).", "cli": None},
    )
    read_token_file: tuple[str, ...] = attrs.field(
        default=(),
        converter=_as_origins,
        validator=_strings("read_token_file"),
        metadata={"help": "Read read tokens from this file, one a line (repeatable).", "cli": None},
    )
    ports_file: str | None = _option(
        None, _string(True), "Write the bound URLs as JSON here once listening."
    )
    demo: bool = _option(False, _flag, "Also publish a synthetic training run.", "flag")
    allow_origin: tuple[str, ...] = attrs.field(
        default=(),
        converter=_as_origins,
        validator=_origins,
        metadata={"help": "Also accept WebSocket upgrades from this Origin.", "cli": None},
    )
    keepalive: float = _option(
        15.0, _positive(float), "Seconds between SSE keepalive comments.", kind=float
    )
    retry_ms: int = _option(3000, _positive(int), "The retry: an SSE client is told.", None, int)
    close_timeout: float = _option(
        2.0, _positive(float), "Seconds a client gets to answer a close handshake.", kind=float
    )
    max_history: int = _option(
        100_000,
        _positive(int),
        "Events kept in RAM at most (the --memory history, the SQLite cache), within --cache-mb.",
        None,
        int,
    )
    cache_mb: float = _option(
        DEFAULT_CACHE_MB,
        _positive(float),
        "MiB of the newest events kept in RAM: the whole --memory history, "
        "the SQLite history's cache.",
        kind=float,
    )
    stall_after: float = _option(
        120.0, _positive(float), "Seconds without events before a run is stalled.", kind=float
    )
    client_buffer: int = _option(
        DEFAULT_CLIENT_BUFFER,
        _positive(int),
        "Bytes of events that may wait for one slow client (then coalesced, then closed).",
        kind=int,
    )
    retain_days: float | None = _option(
        None, _positive(float, True), "SQLite: drop events older than this many days.", kind=float
    )
    max_db_mb: float | None = _option(
        None,
        _positive(float, True),
        "SQLite: drop the oldest events past this file size.",
        kind=float,
    )
    header_timeout: float = _option(
        10.0,
        _positive(float),
        "Seconds a request's line and headers may take to arrive; then the connection is closed.",
        kind=float,
    )
    request_timeout: float = _option(
        60.0,
        _positive(float),
        "Seconds a whole request (headers and body) may take to arrive.",
        kind=float,
    )
    idle_timeout: float = _option(
        60.0,
        _positive(float),
        "Seconds an idle keep-alive connection (not a stream) stays open.",
        kind=float,
    )
    access_log: bool = _option(
        False, _flag, "Log every request (default: not successful publishes).", "flag"
    )
    redis: str | None = _option(
        None,
        _redis_url,
        "Cluster: share one history with every server on this Redis (redis://HOST:PORT/DB).",
    )
    redis_prefix: str = _option(
        "trainstream:",
        _string(False),
        "Cluster: prefix of its Redis keys (two clusters may share one Redis).",
    )
    redis_maxlen: int = _option(
        1_000_000,
        _positive(int),
        "Cluster: events the Redis stream keeps at most (MAXLEN ~, approximate).",
        kind=int,
    )
    redis_retention: float | None = _option(
        None,
        _positive(float, True),
        "Cluster: seconds of events the Redis stream keeps (XTRIM MINID); default: no limit.",
        kind=float,
    )
    logdir: str | None = _option(
        None,
        _string(True),
        "Follow this TensorBoard logdir live: its runs, new event files and runs "
        "(docs/follow.md; needs trainstream[follow] or tensorboard).",
    )
    lag_warn: float = _option(
        0.5,
        _positive(float),
        "Seconds of reactor lag (how late scheduled calls run) past which health "
        "is degraded and a warning is logged (docs/operations.md).",
        kind=float,
    )
    port_fallback: int = _option(
        0,
        _count,
        "When a configured tcp port is busy, try the next N ports (the URLs chosen are reported).",
        kind=int,
    )
    config: str | None = _option(
        None,
        _string(True),
        "Read every option from this TOML file (keys: these options, '_' for '-'); "
        "SIGHUP or POST /api/config/reload reloads what can change live.",
    )

    def __attrs_post_init__(self) -> None:
        if self.db is not None and self.db.strip() in ("", ":memory:"):
            raise ConfigError(
                f"config 'db' {self.db!r} names no file (the history is written by a "
                "process of its own, which cannot share SQLite's ':memory:'): give a file "
                "path, or set 'memory' (--memory) to keep the history in RAM only"
            )
        # Whole numbers given for float fields are floats from here on.
        for f in attrs.fields(Config):
            value = getattr(self, f.name)
            if f.metadata.get("kind") is float and isinstance(value, int):
                object.__setattr__(self, f.name, float(value))

    @classmethod
    def from_value(cls, value: Config | Mapping[str, Any] | None) -> Config:
        """
        Accept a ``Config``, a plain dict of option names (``-`` or ``_``), or
        ``None`` for the defaults; refuse unknown keys and wrong values, naming them.
        """
        if value is None:
            return cls()
        if isinstance(value, Config):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"config must be a trainstream.Config or a dict, not {type(value).__name__}"
            )
        fields = attrs.fields_dict(cls)
        kwargs: dict[str, Any] = {}
        for raw_key, item in value.items():
            key = str(raw_key).replace("-", "_")
            if key not in fields:
                raise ConfigError(
                    f"unknown config key {raw_key!r}; known keys: {', '.join(sorted(fields))}"
                )
            kwargs[key] = os.fspath(item) if isinstance(item, os.PathLike) else item
        return cls(**kwargs)

    def differences(self, other: Config) -> list[str]:
        """
        Name every field where ``other`` differs from this config; tokens
        are named, never shown (the text may reach a log).
        """

        def shown(name: str, value: object) -> str:
            return _hidden(value) if name in _SECRET_FIELDS else repr(value)

        return [
            f"{f.name}: running {shown(f.name, getattr(self, f.name))}, "
            f"requested {shown(f.name, getattr(other, f.name))}"
            for f in attrs.fields(Config)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def listeners(self) -> list[tuple[str, str]]:
        """The (role, endpoint string) pairs to bind, in bind order."""
        if self.listen is not None:
            return [("listen", self.listen)]
        return [("sse", self.sse), ("ws", self.ws), ("rest", self.rest)]

    def resolve_token(self) -> str | None:
        """
        The token in force: ``token``, else the one in ``token_file``, else
        ``$TRAINSTREAM_TOKEN`` (the two that keep it off command lines).
        """
        if self.token is not None and self.token_file is not None:
            raise ConfigError("give --token or --token-file, not both")
        if self.token_file is None:
            if self.token == "":
                raise ConfigError("--token is empty: give a non-empty token or none")
            return self.token if self.token is not None else os.environ.get(TOKEN_ENV) or None
        try:
            with open(self.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise ConfigError(f"cannot read --token-file {self.token_file!r}: {e.strerror}") from e
        if not token:
            raise ConfigError(f"--token-file {self.token_file!r} is empty")
        return token

    def resolve_read_tokens(self) -> tuple[str, ...]:
        """
        The read tokens in force: ``read_token`` and every line of each
        ``read_token_file`` (blank lines and ``#`` comments skipped).

        :raises ConfigError: for an unreadable or empty file, an empty token,
            read tokens without a (write) token, or one equal to it.
        """
        tokens = list(self.read_token)
        for path in self.read_token_file:
            try:
                with open(path, encoding="utf-8") as f:
                    lines = [line.strip() for line in f]
            except OSError as e:
                raise ConfigError(f"cannot read --read-token-file {path!r}: {e.strerror}") from e
            found = [line for line in lines if line and not line.startswith("#")]
            if not found:
                raise ConfigError(f"--read-token-file {path!r} holds no token")
            tokens += found
        if any(not t.strip() for t in tokens):
            raise ConfigError("--read-token is empty: give a non-empty token")
        if tokens:
            token = self.resolve_token()
            if token is None:
                raise ConfigError(
                    "--read-token needs --token (or --token-file): without a token "
                    "anyone may write, so a read-only token would restrict nothing"
                )
            if token in tokens:
                raise ConfigError("a --read-token must differ from --token")
        return tuple(tokens)


_FIXED_PORT = re.compile(r"^(?:tcp6?|ssl|tls):(?:port=)?(\d+)", re.IGNORECASE)


def fallback_endpoints(description: str, fallback: int) -> list[str]:
    """
    ``description``, then, for a tcp/ssl endpoint on a fixed port, the same
    endpoint on each of the next ``fallback`` ports (``--port-fallback``).
    ``tcp:0`` (any free port) and other endpoints (``unix:``) have no fallback.
    """
    m = _FIXED_PORT.match(description)
    if fallback <= 0 or m is None or int(m.group(1)) == 0:
        return [description]
    port = int(m.group(1))
    head, tail = description[: m.start(1)], description[m.end(1) :]
    return [f"{head}{p}{tail}" for p in range(port, min(port + fallback, 65535) + 1)]


def cli_fields() -> list[attrs.Attribute[Any]]:
    """The fields twistd offers as options, in order."""
    return [f for f in attrs.fields(Config) if f.metadata.get("cli")]
