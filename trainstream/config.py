"""
The server's configuration: one value type shared by twistd and the embedded API.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs
from attrs import frozen

from trainstream.errors import ConfigError

DEFAULT_SSE = "tcp:8888:interface=127.0.0.1"
DEFAULT_WS = "tcp:8889:interface=127.0.0.1"
DEFAULT_REST = "tcp:8890:interface=127.0.0.1"


def default_db_path() -> str:
    """The SQLite history file in the user's data directory."""
    from platformdirs import user_data_dir

    return os.path.join(user_data_dir("trainstream", appauthor=False), "history.sqlite3")


@frozen
class Config:
    """
    Everything a server is started with. Field names are the long options of
    ``twistd trainstream`` with ``_`` for ``-``.

    :param sse: endpoint string of the listener whose role is SSE.
    :param ws: endpoint string of the listener whose role is WebSocket.
    :param rest: endpoint string of the listener whose role is REST + dashboard.
    :param listen: single-port mode: one endpoint that replaces the three.
    :param db: SQLite history file; ``None`` means the default path.
    :param memory: keep history in RAM only.
    :param token: bearer token every call but ``/api/health`` must carry.
    :param token_file: a file holding the token.
    :param ports_file: where to write ``server.urls`` once every port is bound.
    :param demo: also publish a synthetic training run.
    :param allow_origin: extra ``Origin`` values accepted for WebSocket upgrades.
    :param keepalive: seconds between SSE keepalive comments.
    :param retry_ms: the ``retry:`` an SSE client is told.
    :param close_timeout: seconds a client gets to answer a close handshake
        before its connection is reset.
    :param max_history: events the in-memory history keeps.
    :param client_buffer: bytes of events that may wait for one slow client
        before its metrics are coalesced, and past that it is disconnected.
    :param retain_days: SQLite: drop events older than this many days.
    :param max_db_mb: SQLite: drop the oldest events while the file holds more.
    :param stall_after: seconds without an event after which a running run is
        marked ``stalled``.
    :param access_log: log every request; by default a successful publish
        (``POST /api/events`` answered 2xx) is not logged, every other one is.
    """

    sse: str = DEFAULT_SSE
    ws: str = DEFAULT_WS
    rest: str = DEFAULT_REST
    listen: str | None = None
    db: str | None = None
    memory: bool = False
    token: str | None = None
    token_file: str | None = None
    ports_file: str | None = None
    demo: bool = False
    allow_origin: tuple[str, ...] = ()
    keepalive: float = 15.0
    retry_ms: int = 3000
    close_timeout: float = 2.0
    max_history: int = 100_000
    stall_after: float = 120.0
    client_buffer: int = 1 << 20
    retain_days: float | None = None
    max_db_mb: float | None = None
    access_log: bool = False

    @classmethod
    def from_value(cls, value: Config | Mapping[str, Any] | None) -> Config:
        """
        Accept a ``Config``, a plain dict of option names, or ``None`` for the
        defaults; refuse unknown keys and wrong types, naming them.
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
            kwargs[key] = _coerce(key, item)
        return cls(**kwargs)

    def differences(self, other: Config) -> list[str]:
        """Name every field where ``other`` differs from this config."""
        return [
            f"{f.name}: running {getattr(self, f.name)!r}, requested {getattr(other, f.name)!r}"
            for f in attrs.fields(Config)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def listeners(self) -> list[tuple[str, str]]:
        """The (role, endpoint string) pairs to bind, in bind order."""
        if self.listen is not None:
            return [("listen", self.listen)]
        return [("sse", self.sse), ("ws", self.ws), ("rest", self.rest)]

    def resolve_token(self) -> str | None:
        """The token in force, reading ``token_file`` if one is named."""
        if self.token is not None and self.token_file is not None:
            raise ConfigError("give --token or --token-file, not both")
        if self.token_file is None:
            if self.token == "":
                raise ConfigError("--token is empty: give a non-empty token or none")
            return self.token
        try:
            with open(self.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise ConfigError(f"cannot read --token-file {self.token_file!r}: {e.strerror}") from e
        if not token:
            raise ConfigError(f"--token-file {self.token_file!r} is empty")
        return token


_STR_OR_NONE = {"listen", "db", "token", "token_file", "ports_file"}
_STR = {"sse", "ws", "rest"}
_BOOL = {"memory", "demo", "access_log"}
_FLOAT = {"keepalive", "close_timeout", "stall_after"}
_FLOAT_OR_NONE = {"retain_days", "max_db_mb"}
_INT = {"retry_ms", "max_history", "client_buffer"}


def _coerce(key: str, value: object) -> Any:
    """Check one config value's type, naming the key when it is wrong."""
    if key in _STR or key in _STR_OR_NONE:
        if value is None and key in _STR_OR_NONE:
            return None
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(f"config {key!r} must be a string, not {value!r}")
        return value
    if key in _BOOL:
        if not isinstance(value, bool):
            raise ConfigError(f"config {key!r} must be true or false, not {value!r}")
        return value
    if key in _FLOAT_OR_NONE:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"config {key!r} must be a positive number, not {value!r}")
        return float(value)
    if key in _FLOAT:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"config {key!r} must be a positive number, not {value!r}")
        return float(value)
    if key in _INT:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"config {key!r} must be a positive integer, not {value!r}")
        return value
    if key == "allow_origin":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config 'allow_origin' must be a list of strings, not {value!r}")
        return tuple(value)
    raise ConfigError(f"unknown config key {key!r}")  # pragma: no cover - fields_dict guards
