"""
trainstream: watch a machine-learning training run live.

The public API of PROTOCOL section 7. Names are loaded on first use, so
``import trainstream`` stays cheap and starts no reactor.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trainstream._version import __version__

if TYPE_CHECKING:
    from trainstream.config import Config
    from trainstream.errors import (
        ConfigConflictError,
        ConfigError,
        ListenError,
        PortInUseError,
        ReactorThreadError,
        TrainstreamError,
    )
    from trainstream.events import EventError
    from trainstream.manager import (
        StreamServerManager,
        get_stream_server,
        get_stream_server_manager,
        release_stream_server,
        serve,
    )
    from trainstream.run import Run
    from trainstream.service import StreamServer

_EXPORTS = {
    "Config": "trainstream.config",
    "ConfigConflictError": "trainstream.errors",
    "ConfigError": "trainstream.errors",
    "ListenError": "trainstream.errors",
    "PortInUseError": "trainstream.errors",
    "ReactorThreadError": "trainstream.errors",
    "TrainstreamError": "trainstream.errors",
    "EventError": "trainstream.events",
    "StreamServerManager": "trainstream.manager",
    "get_stream_server": "trainstream.manager",
    "get_stream_server_manager": "trainstream.manager",
    "release_stream_server": "trainstream.manager",
    "serve": "trainstream.manager",
    "Run": "trainstream.run",
    "StreamServer": "trainstream.service",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trainstream' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
