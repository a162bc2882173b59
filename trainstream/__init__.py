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
    from trainstream.config import Config as Config
    from trainstream.embedded import (
        StreamServerManager as StreamServerManager,
        get_stream_server as get_stream_server,
        get_stream_server_manager as get_stream_server_manager,
        keep_serving as keep_serving,
        release_stream_server as release_stream_server,
        revisit_hint as revisit_hint,
        serve as serve,
    )
    from trainstream.errors import (
        ConfigConflictError as ConfigConflictError,
        ConfigError as ConfigError,
        ListenError as ListenError,
        PortInUseError as PortInUseError,
        ReactorThreadError as ReactorThreadError,
        TrainstreamError as TrainstreamError,
    )
    from trainstream.events import EventError as EventError
    from trainstream.quick import (
        current_run as current_run,
        finish as finish,
        init as init,
        log as log,
    )
    from trainstream.run import Run as Run
    from trainstream.server import StreamServer as StreamServer

_EXPORTS = {
    "Config": "trainstream.config",
    "ConfigConflictError": "trainstream.errors",
    "ConfigError": "trainstream.errors",
    "ListenError": "trainstream.errors",
    "PortInUseError": "trainstream.errors",
    "ReactorThreadError": "trainstream.errors",
    "TrainstreamError": "trainstream.errors",
    "EventError": "trainstream.events",
    "StreamServerManager": "trainstream.embedded",
    "get_stream_server": "trainstream.embedded",
    "get_stream_server_manager": "trainstream.embedded",
    "keep_serving": "trainstream.embedded",
    "release_stream_server": "trainstream.embedded",
    "revisit_hint": "trainstream.embedded",
    "serve": "trainstream.embedded",
    "Run": "trainstream.run",
    "init": "trainstream.quick",
    "log": "trainstream.quick",
    "finish": "trainstream.quick",
    "current_run": "trainstream.quick",
    "StreamServer": "trainstream.server",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trainstream' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
