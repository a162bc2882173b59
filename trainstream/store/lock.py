"""
One server per history file: an exclusive lock, and ``PATH.lock`` saying who holds it.

The lock file tells who holds it: ``{"pid": N}``, and once that server
listens, its URLs too, so a second server refused the file can say where
the running one is (its dashboard, where to publish).

Where there is ``flock`` (POSIX), the lock is an ``flock`` on ``PATH.lock``
itself, and the server's writer process shares it (it inherits the
descriptor): a server killed with ``kill -9`` leaves its writer committing
what it was sent, and the file stays locked until that is done. A server
that finds the lock held by a pid that is gone waits for it
(``ORPHAN_WAIT``), so it reads where ids stand only once nothing else can
still write them.

Elsewhere (Windows) the lock is portalocker's on ``PATH.lock.held``: there
a child is not granted the locks of the handles it inherits, and a locked
range is unreadable to others (so who holds it is told in ``PATH.lock``,
never locked). The server notes its writer's pid in ``PATH.lock``
(``writer_started``) before it sends it anything; a server that takes the
lock after one that died waits, the same ``ORPHAN_WAIT``, for that writer
to be gone.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from types import ModuleType
from typing import IO, Any

from trainstream.errors import StoreError

#: Seconds a new server waits for the writer of a server that died to finish.
ORPHAN_WAIT = 30.0


def _fcntl() -> ModuleType | None:
    """``fcntl`` where the system has it (POSIX); None on Windows."""
    try:
        import fcntl
    except ImportError:
        return None
    return fcntl


_FCNTL = _fcntl()

#: The lock is an ``flock`` that the writer process inherits with its descriptor.
FLOCK = _FCNTL is not None and hasattr(_FCNTL, "flock")

#: ``creationflags`` of the writer process on Windows (0 elsewhere): a process
#: group of its own, for which the console's Ctrl-C is off (it is for the
#: server to handle; the writer ignores SIGINT too).
WRITER_CREATIONFLAGS: int = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)

#: ``os.open`` flags of the lock files (binary: no newline translation on Windows).
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0)

#: The locks this process holds, by the descriptor of their ``PATH.lock``
#: (what the writer thread is given), for ``writer_started``.
_HELD: dict[int, FileLock] = {}


class FileLock:
    """Held from construction until ``release()``; refused with a clear message."""

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self.path = db_path + ".lock"
        self._holder: dict[str, object] = {"pid": os.getpid()}
        self._writing = threading.Lock()  # announce (reactor) and writer_started (writer thread)
        self._held: IO[bytes] | None = None  # portalocker's file (no flock)
        fd = os.open(self.path, _OPEN_FLAGS, 0o644)
        try:
            if FLOCK:
                self._flock(fd)
            else:
                self._held = self._portalock(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        _HELD[fd] = self
        self._write()

    def _flock(self, fd: int) -> None:
        """Take the ``flock`` of ``PATH.lock``, or say why not (POSIX)."""
        assert _FCNTL is not None
        deadline = time.monotonic() + ORPHAN_WAIT
        while True:
            try:
                _FCNTL.flock(fd, _FCNTL.LOCK_EX | _FCNTL.LOCK_NB)
                return
            except OSError as e:
                holder = _read(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                if _holder_alive(holder):
                    raise StoreError(_in_use(self.db_path, holder)) from None
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"history file {self.db_path} is still locked by a process of a server "
                        f"that is gone ({_pid(holder)}): its writer should have finished "
                        f"within {ORPHAN_WAIT:g} s; find it (fuser {self.path}) and stop it"
                    ) from None
                time.sleep(0.05)  # its writer is finishing what it was sent

    def _portalock(self, fd: int) -> IO[bytes]:
        """
        Take portalocker's lock of ``PATH.lock.held``, then wait for the
        writer of a server that died to be gone (no ``flock``: Windows).
        """
        import portalocker

        held = open(self.path + ".held", "a+b")  # held until release()
        try:
            deadline = time.monotonic() + ORPHAN_WAIT
            while True:
                try:
                    held.seek(0)
                    portalocker.lock(
                        held, portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING
                    )
                    break
                except portalocker.AlreadyLocked:
                    holder = _read(fd)
                    # Held by a pid that is gone: the system has yet to drop its locks.
                    if _holder_alive(holder) or time.monotonic() > deadline:
                        raise StoreError(_in_use(self.db_path, holder)) from None
                    time.sleep(0.05)
                except portalocker.LockException as e:
                    raise StoreError(f"cannot lock history file {self.db_path}: {e}") from None
            holder = _read(fd)  # what the last server to hold it left
            writer = _writer(holder)
            while writer is not None and pid_alive(writer):
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"history file {self.db_path} is still being written by the writer "
                        f"process (pid {writer}) of a server that is gone ({_pid(holder)}): "
                        f"it should have finished within {ORPHAN_WAIT:g} s; stop that process"
                    )
                time.sleep(0.05)  # it is finishing what it was sent
        except BaseException:
            held.close()  # closing drops the lock
            raise
        return held

    def announce(self, urls: dict[str, str]) -> None:
        """Say where the server holding the file listens (for a refused second one)."""
        if self.fd >= 0 and urls:
            self._note("urls", urls)

    def _note(self, key: str, value: object) -> None:
        """Say ``key`` in ``PATH.lock`` (None: no longer)."""
        with self._writing:
            if value is None:
                self._holder.pop(key, None)
            else:
                self._holder[key] = value
            self._write()

    def _write(self) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, json.dumps(self._holder).encode())

    def release(self) -> None:
        if self.fd < 0:
            return
        writer = self._holder.get("writer")
        if isinstance(writer, int) and not pid_alive(writer):
            self._note("writer", None)  # done: the next server need not wait for it
        held, self._held = self._held, None
        if held is not None:
            import portalocker

            try:
                portalocker.unlock(held)  # at once: the system may take a while after close
            except portalocker.LockException:
                pass
            held.close()
        _HELD.pop(self.fd, None)
        os.close(self.fd)  # closing the descriptor drops the flock
        self.fd = -1


def writer_started(lock_fd: int, pid: int) -> None:
    """
    The writer process ``pid`` of the file locked by ``lock_fd`` started:
    where it does not inherit the lock (no ``flock``), note it in
    ``PATH.lock`` before it is sent anything, so a server that takes the file
    after this one died waits for it.
    """
    lock = _HELD.get(lock_fd)
    if lock is not None and lock.fd >= 0 and not FLOCK:
        lock._note("writer", pid)


def _read(fd: int) -> str:
    """What ``PATH.lock`` says (no ``pread`` on Windows: seek, then read)."""
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace")


def holder_pid(db_path: str) -> int | None:
    """The pid of the server that ``db_path``'s lock file names, if it runs."""
    try:
        with open(db_path + ".lock", encoding="utf-8") as f:
            pid = json.load(f).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) and pid_alive(pid) else None


def _writer(text: str) -> int | None:
    """The writer pid a lock file notes (no ``flock``), if any."""
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    writer = holder.get("writer") if isinstance(holder, dict) else None
    return writer if isinstance(writer, int) and not isinstance(writer, bool) else None


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
    return pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """
    Whether process ``pid`` runs (unknown: yes; a zombie, killed and not
    reaped yet: no). Never ``os.kill(pid, 0)`` on Windows: there signal 0 is
    ``CTRL_C_EVENT``, sent to a console process group.
    """
    if sys.platform == "win32":
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.restype = ctypes.c_void_p
        kernel32.OpenProcess.argtypes = (ctypes.c_ulong, ctypes.c_int, ctypes.c_ulong)
        kernel32.GetExitCodeProcess.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong))
        kernel32.CloseHandle.argtypes = (ctypes.c_void_p,)
        return _win32_alive(pid, kernel32, ctypes.get_last_error)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return True  # no /proc (macOS): no zombie check


#: Windows: ``PROCESS_QUERY_LIMITED_INFORMATION``, ``STILL_ACTIVE``, ``ERROR_ACCESS_DENIED``.
_QUERY, _STILL_ACTIVE, _ACCESS_DENIED = 0x1000, 259, 5


def _win32_alive(pid: int, kernel32: Any, last_error: Any) -> bool:
    """``pid_alive`` on Windows, through ``kernel32`` (given, so a test can fake it)."""
    import ctypes

    handle = kernel32.OpenProcess(_QUERY, 0, pid)
    if not handle:
        return bool(last_error() == _ACCESS_DENIED)  # another user's; else no such process
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == _STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


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
