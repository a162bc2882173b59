"""
``python -m trainstream watch URL`` and ``python -m trainstream tail URL``:
terminal clients of a running server (see :mod:`trainstream.cli`);
``python -m trainstream check PATH`` and ``repair PATH``: a history file
that may be damaged (see :mod:`trainstream.store.check`, ``repair``);
``python -m trainstream follow LOGDIR``: a TensorBoard logdir published live
(see :mod:`trainstream.follow`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from trainstream._version import __version__


def _split(values: Sequence[str] | None) -> list[str]:
    """Repeatable options that also take comma-separated lists."""
    return [part.strip() for v in values or () for part in v.split(",") if part.strip()]


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 3600 seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainstream",
        description="Terminal clients of a trainstream server, and tools for its history file.",
    )
    parser.add_argument("--version", action="version", version=f"trainstream {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "url",
            metavar="URL",
            help="the server: its base (http://127.0.0.1:8890; any listener serves "
            "everything) or its SSE URL (http://127.0.0.1:8888/events)",
        )
        sub.add_argument(
            "--run",
            action="append",
            metavar="GLOB",
            help="only these runs (repeatable, * globs)",
        )
        sub.add_argument(
            "--name",
            action="append",
            metavar="GLOB",
            help="only these metric names (repeatable, * globs)",
        )
        sub.add_argument(
            "--token",
            default=os.environ.get("TRAINSTREAM_TOKEN") or None,
            help="bearer token (default: $TRAINSTREAM_TOKEN)",
        )

    watch = commands.add_parser(
        "watch",
        help="a live table of runs, their latest values and sparklines",
        description="A live table of runs: state, age of the last event, last step, and "
        "the latest value and a sparkline of the most common metrics. Reconnects and "
        "resumes by itself. Ctrl-C quits.",
    )
    common(watch)
    watch.add_argument(
        "--columns", type=_non_negative, default=4, help="metric columns (default 4)"
    )
    watch.add_argument(
        "--frames",
        type=_positive,
        metavar="N",
        help="exit after N frames once the runs are loaded (--frames 1: print one snapshot)",
    )
    watch.add_argument(
        "--refresh", type=float, default=4.0, metavar="HZ", help="frames a second (default 4)"
    )

    tail = commands.add_parser(
        "tail",
        help="print events as JSON lines (for scripts and jq)",
        description="Print each event as one compact JSON line on stdout, live, resuming "
        "after disconnects without gap or duplicate. A reset (history no longer "
        'holds what came after the last id) is printed as {"type": "reset", "reason", '
        '"oldest_id"}; events have an "id", resets do not. Reconnect news goes to stderr.',
    )
    common(tail)
    tail.add_argument(
        "--type",
        action="append",
        metavar="TYPE",
        help="only these event types (repeatable or comma-separated: metric,status,...)",
    )
    tail.add_argument(
        "--after",
        type=_non_negative,
        metavar="ID",
        help="first print the stored events after this id (--after 0: the whole history)",
    )
    tail.add_argument("--limit", type=_positive, metavar="N", help="exit after printing N events")
    tail.add_argument(
        "--once",
        action="store_true",
        help="print the stored events (after --after, default 0) up to now, then exit",
    )
    tail.add_argument("-q", "--quiet", action="store_true", help="no reconnect news on stderr")

    check = commands.add_parser(
        "check",
        help="check a history file (reads only)",
        description="Check a history file without changing it: SQLite's integrity_check, "
        "its tables and meta, and that every event row decodes. Prints a short report; "
        "exits 0 if the file is whole, 1 if it is damaged.",
    )
    check.add_argument("path", metavar="PATH", help="the history file (--db)")
    repair = commands.add_parser(
        "repair",
        help="replace a damaged history file with what can be read of it",
        description="Write a new history file from every event a damaged one still holds "
        "(ids, series summaries and rollups as before; ids go on after the highest ever "
        "given), and move the damaged file (with its -wal and -shm) to "
        "PATH.damaged-<UTC time>. Refused while a server holds the file.",
    )
    repair.add_argument("path", metavar="PATH", help="the history file (--db)")
    add_follow(commands)
    return parser


def add_follow(commands: Any) -> None:
    """``follow LOGDIR``: publish a TensorBoard logdir to a server, live."""
    follow = commands.add_parser(
        "follow",
        help="publish a TensorBoard logdir to a running server, live",
        description="Load every run of a TensorBoard logdir (each directory with event "
        "files is a run, named by its path: exp1/train), then follow it: new points, "
        "event files and runs reach the server within a second of being flushed. A "
        "restart goes on where it stopped, with no point twice. Needs TensorBoard's "
        "or tensorboardX's protos: pip install 'trainstream[follow]'.",
    )
    follow.add_argument("logdir", metavar="LOGDIR", help="the TensorBoard logdir")
    follow.add_argument(
        "--url",
        default=os.environ.get("TRAINSTREAM_URL") or "http://127.0.0.1:8890",
        help="the server (default: $TRAINSTREAM_URL, else http://127.0.0.1:8890)",
    )
    follow.add_argument(
        "--token",
        default=os.environ.get("TRAINSTREAM_TOKEN") or None,
        help="bearer token (default: $TRAINSTREAM_TOKEN)",
    )
    follow.add_argument(
        "--state",
        metavar="FILE",
        help="where to remember how far it got (default: a file in the user's data "
        "directory, one per logdir and server history)",
    )
    follow.add_argument(
        "--interval",
        type=_seconds,
        default=0.25,
        metavar="S",
        help="seconds between looks at the files (default 0.25)",
    )
    follow.add_argument(
        "--once",
        action="store_true",
        help="publish what the files hold now, then exit (status 1 if the server "
        "stays unreachable for 30 s)",
    )


def history_file(command: str, path: str) -> int:
    """``check`` or ``repair`` the history file ``path``; the exit status."""
    from trainstream.errors import StoreError

    if command == "check":
        from trainstream.store.check import check

        report = check(path)
        print("\n".join(report.lines()))
        return 0 if report.ok else 1
    from trainstream.store.repair import repair

    try:
        repaired = repair(path)
    except StoreError as e:
        print(f"trainstream repair: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"trainstream repair: interrupted; {path} is left as it was", file=sys.stderr)
        return 130
    print("\n".join(repaired.lines()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("check", "repair"):
        return history_file(args.command, args.path)
    if args.command == "follow":
        from trainstream.cli.follow import FollowOptions, run_follow

        options = FollowOptions(
            args.logdir, args.url, args.token, args.state, args.interval, args.once
        )
        return run_follow(options, sys.stderr)
    from trainstream.client.http import ClientError

    server: dict[str, Any] = {
        "url": args.url,
        "runs": _split(args.run),
        "names": _split(args.name),
        "token": args.token,
    }
    try:
        if args.command == "tail":
            from trainstream.cli.tail import TailOptions, run_tail

            tail = TailOptions(
                **server,
                types=_split(args.type),
                after=args.after,
                limit=args.limit,
                once=args.once,
                quiet=args.quiet,
            )
            return run_tail(tail, sys.stdout, sys.stderr)
        try:
            import rich.live  # noqa: F401  (the screen; imported here to say what is missing)

            from trainstream.cli.watch import WatchOptions, run_watch
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] != "rich":
                raise
            print(
                "trainstream watch: the live screen needs the rich package, which is "
                "missing: pip install 'rich>=13' (or reinstall trainstream with its "
                "dependencies); tail needs nothing more",
                file=sys.stderr,
            )
            return 1

        watch = WatchOptions(
            **server, columns=args.columns, frames=args.frames, refresh_hz=args.refresh
        )
        return run_watch(watch)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        quiet_broken_pipe()
        return 0
    except ClientError as e:
        print(f"trainstream {args.command}: {e}", file=sys.stderr)
        return 1


def quiet_broken_pipe() -> None:
    """After EPIPE on stdout: make the interpreter's final flush silent."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
