"""
``python -m trainstream follow LOGDIR [--url URL] [--token T]``: publish a
TensorBoard logdir to a running server, live (see :mod:`trainstream.follow`).
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from types import FrameType
from typing import TextIO

from trainstream.client.http import ClientError

__all__ = ["FollowOptions", "run_follow"]

#: The server when neither ``--url`` nor ``$TRAINSTREAM_URL`` names one (the default REST port).
DEFAULT_URL = "http://127.0.0.1:8890"


#: Seconds ``--once`` waits for a server that cannot be reached, then gives up
#: (exit status 1); without ``--once``, ``follow`` retries until stopped.
ONCE_PATIENCE = 30.0


@dataclass
class FollowOptions:
    """What ``follow`` is told (see ``python -m trainstream follow --help``)."""

    logdir: str
    url: str = DEFAULT_URL
    token: str | None = None
    state: str | None = None
    interval: float = 0.25
    once: bool = False
    #: ``once``: how long the server may be unreachable before it exits 1
    patience: float = ONCE_PATIENCE


def run_follow(options: FollowOptions, stderr: TextIO) -> int:
    """Follow until Ctrl-C or SIGTERM (``once``: until the files are read); the exit status."""
    if os.path.exists(options.logdir) and not os.path.isdir(options.logdir):
        print(f"trainstream follow: {options.logdir} is a file, not a logdir", file=stderr)
        return 1
    try:
        from trainstream.follow.decode import load_protos

        protos = load_protos()
    except ModuleNotFoundError as e:
        print(f"trainstream follow: {e}", file=stderr)
        return 1
    from trainstream.follow.follower import Follower, Stopped
    from trainstream.follow.sinks import HTTPSink

    def report(level: str, message: str) -> None:
        prefix = "" if level == "info" else f"{level}: "
        print(f"trainstream follow: {prefix}{message}", file=stderr, flush=True)

    stop = threading.Event()
    patience = options.patience if options.once else None
    sink = HTTPSink(options.url, options.token, report, stop, give_up_after=patience)
    follower = Follower(options.logdir, sink, report, options.state, options.interval, protos, stop)

    def on_term(signum: int, frame: FrameType | None) -> None:
        follower.stop()

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        follower.start()
        if options.once:
            while follower.poll():
                pass
        else:
            follower.run()
    except Stopped:
        pass
    except KeyboardInterrupt:
        pass
    except ClientError as e:
        print(f"trainstream follow: {e}", file=stderr)
        return 1
    except OSError as e:  # the state file
        print(f"trainstream follow: {e}", file=stderr)
        return 1
    finally:
        sink.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    report("info", f"stopped: {follower.sent} events sent")
    return 0
