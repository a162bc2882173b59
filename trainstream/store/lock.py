"""
One server per history file: an exclusive ``flock`` on ``PATH.lock``.

The lock file tells who holds it: ``{"pid": N}``, and once that server
listens, its URLs too, so a second server refused the file can say where
the running one is (its dashboard, where to publish).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os

from trainstream.errors import StoreError


class FileLock:
    """Held from construction until ``release()``; refused with a clear message."""

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self.path = db_path + ".lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise StoreError(_in_use(db_path, holder)) from None
            raise
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
