"""
Errors a user of trainstream can cause, each naming the thing at fault.
"""

from __future__ import annotations


class TrainstreamError(Exception):
    """Base class of trainstream's own errors."""


class ConfigError(TrainstreamError, ValueError):
    """A configuration value is unknown, of the wrong type or unusable."""


class ConfigConflictError(ConfigError):
    """
    ``get_stream_server(config)`` was called with a config that differs from
    the one the running server was started with.
    """

    def __init__(self, differences: list[str]) -> None:
        self.differences = differences
        super().__init__(
            "a trainstream server is already running with another config ("
            + "; ".join(differences)
            + "): call get_stream_server() without a config to share it, or "
            "release it first"
        )


class StoreError(TrainstreamError):
    """The history file cannot be used (held by another server, unreadable, too new)."""


class DiskFullError(StoreError):
    """Events were not stored for want of disk space (a temporary state: free space)."""


class ListenError(TrainstreamError, OSError):
    """A listener could not bind its endpoint."""

    def __init__(self, role: str, endpoint: str, port: int | None, reason: str) -> None:
        self.role = role
        self.endpoint = endpoint
        self.port = port
        self.reason = reason
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"port {self.port}" if self.port is not None else "its address"
        return (
            f"cannot listen for {self.role} on {where} (endpoint {self.endpoint!r}): {self.reason}"
        )

    def __str__(self) -> str:
        return self._message()


class PortInUseError(ListenError):
    """
    A listener could not bind because its address is held by another socket.
    """

    def _message(self) -> str:
        return (
            super()._message() + "; another process holds it: stop that process or "
            f"choose another endpoint (--{self.role} tcp:0 picks a free port; "
            f"embedded: config {{{self.role!r}: 'tcp:0'}})"
        )


class ReactorThreadError(TrainstreamError, RuntimeError):
    """A blocking call was made from the reactor thread, where it would deadlock."""

    def __init__(self, what: str, deferred_form: str) -> None:
        super().__init__(
            f"{what} blocks until the reactor answers, so it cannot be called "
            f"from the reactor thread (it would deadlock): use {deferred_form}, "
            "which returns a Deferred"
        )
