"""
One server per history file: an exclusive ``flock`` on ``PATH.lock``.

The lock file tells who holds it: ``{"pid": N}``, and once that server
listens, its URLs too, so a second server refused the file can say where
the running one is (its dashboard, where to publish).

The server's writer process shares the lock (it inherits the descriptor):
a server killed with ``kill -9`` leaves its writer committing what it was
sent, and the file stays locked until that is done. A server that finds
the lock held by a pid that is gone waits for it (``ORPHAN_WAIT``), so it
reads where ids stand only once nothing else can still write them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time

from trainstream.errors import StoreError

#: Seconds a new server waits for the writer of a server that died to finish.
ORPHAN_WAIT = 30.0


class FileLock:
    """Held from construction until ``release()``; refused with a clear message."""

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self.path = db_path + ".lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + ORPHAN_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    os.close(fd)
                    raise
                if _holder_alive(holder):
                    os.close(fd)
                    raise StoreError(_in_use(db_path, holder)) from None
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise StoreError(
                        f"history file {db_path} is still locked by a process of a server "
                        f"that is gone ({_pid(holder)}): its writer should have finished "
                        f"within {ORPHAN_WAIT:g} s; find it (fuser {self.path}) and stop it"
                    ) from None
                time.sleep(0.05)  # its writer is finishing what it was sent
        self.fd = fd
        self._write({"pid": os.getpid()})

    def announce(self, urls: dict[str, str]) -> None:
        """Say where the server holding the file listens (for a refused second one)."""
        if self.fd >= 0 and urls:
            self._write({"pid": os.getpid(), "urls": urls})

    def _write(self, holder: dict[str, object]) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(holder).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1


def _pid(text: str) -> str:
    try:
        holder = json.loads(text)
    except ValueError:
        return f"pid {text.strip() or 'unknown'}"
    return f"pid {holder.get('pid', 'unknown')}" if isinstance(holder, dict) else "pid unknown"


def _holder_alive(text: str) -> bool:
    """Whether the server the lock file names still runs (unknown: yes)."""
    try:
        pid = int(_pid(text).removeprefix("pid "))
    except ValueError:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not reaped by its parent yet) is gone too.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return True


def _in_use(db_path: str, text: str) -> str:
    """What a server refused ``db_path`` is told: who has it, and what to do."""
    try:
        holder = json.loads(text)
    except ValueError:
        holder = {"pid": text.strip() or "unknown"}  # an older server wrote its bare pid
    if not isinstance(holder, dict):
        holder = {"pid": "unknown"}
    pid = holder.get("pid", "unknown")
    urls = holder.get("urls")
    where = ""
    publish = ""
    if isinstance(urls, dict) and isinstance(urls.get("dashboard"), str):
        dashboard = urls["dashboard"]
        base = dashboard.rstrip("/")
        where = f", dashboard {dashboard}"
        publish = (
            f"; to log to it from this process use "
            f"trainstream.client.Publisher({base!r}, 'my-run') (or TrainstreamLogger(url=...), "
            f"SummaryWriter(url=...)); "
        )
    else:
        publish = "; "
    return (
        f"history file {db_path} is in use by another trainstream server (pid {pid}{where})"
        f"{publish}or stop it, or give this server its own history: "
        "config {'db': 'other.sqlite3'} or {'memory': True} (twistd: --db or --memory)"
    )
