"""
trainstream without POSIX: what Windows lacks, taken away from a Linux Python.

CI cannot run Windows here, so each part runs in a child interpreter whose
``sitecustomize`` makes trainstream's own code see what a Windows Python
offers: ``fcntl``, ``termios`` (and the other POSIX-only modules) cannot
be imported, ``os.pread``/``os.pwrite`` and ``signal.SIGHUP`` are gone, the
other POSIX-only names of ``os`` and ``signal`` are hidden from it, and
``subprocess.Popen`` refuses it ``pass_fds``, ``start_new_session`` and
``preexec_fn`` as Windows does. Third-party code (Twisted's Linux reactor,
portalocker's Linux locker) keeps its POSIX branch: on Windows it takes its
own, which its own CI tests. ``docs/windows.md`` says what this does and
does not show.

The parts: the embedded lifecycle (get, log, flush, read back over SSE and
REST, release, a plain bind of the port, get again on the same port); the
SQLite store directly (write, close, reopen, ids continue, a second store
refused); ``twistd -n trainstream`` (ports file, health, SIGTERM). Then, in
this process, the no-``flock`` lock's own rules (``lock.FLOCK`` off).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.clients import PLAIN_BIND_SOURCE
from trainstream.errors import StoreError
from trainstream.store import lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The ``sitecustomize`` of a child without POSIX (for trainstream's code).
SITECUSTOMIZE = '''
import builtins, importlib, os, signal, subprocess, sys, types

BLOCKED = {"fcntl", "termios", "resource", "pwd", "grp", "posix", "tty", "pty", "syslog"}
OS_HIDDEN = {
    "statvfs", "fstatvfs", "lockf", "setsid", "setpgid", "getpgid", "killpg", "fork",
    "forkpty", "getuid", "geteuid", "getgid", "getegid", "getpgrp", "sync", "mkfifo", "mknod",
    "nice", "sched_getaffinity", "getloadavg", "posix_fadvise", "pipe2", "set_blocking",
    "get_blocking", "WNOHANG", "wait3", "wait4", "waitid", "O_NONBLOCK", "O_CLOEXEC",
    "O_NOFOLLOW", "openpty", "ttyname", "chown", "fchown", "lchown", "fchmod",
}
SIGNAL_HIDDEN = {
    "SIGHUP", "SIGKILL", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCHLD", "SIGALRM", "SIGPIPE",
    "SIGCONT", "SIGSTOP", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGWINCH", "SIGIO", "SIGXCPU",
    "alarm", "pause", "setitimer", "getitimer", "siginterrupt", "pthread_kill",
    "pthread_sigmask", "sigwait", "sigpending", "sigtimedwait", "sigwaitinfo",
}


def ours(g):
    """Whether the code whose globals are ``g`` is trainstream's."""
    if not isinstance(g, dict):
        return False
    spec = g.get("__spec__")
    name = getattr(spec, "name", None) or g.get("__name__") or ""
    return name == "trainstream" or name.startswith("trainstream.") or (
        name == "twisted.plugins.trainstream_plugin"
    )


real_import = builtins.__import__


def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name.partition(".")[0] in BLOCKED and ours(globals):
        raise ModuleNotFoundError(f"No module named {name!r} (no POSIX here)", name=name)
    return real_import(name, globals, locals, fromlist, level)


builtins.__import__ = guarded_import
real_import_module = importlib.import_module


def guarded_import_module(name, package=None):
    if name.partition(".")[0] in BLOCKED and ours(sys._getframe(1).f_globals):
        raise ModuleNotFoundError(f"No module named {name!r} (no POSIX here)", name=name)
    return real_import_module(name, package)


importlib.import_module = guarded_import_module


class Hiding(types.ModuleType):
    """A module whose POSIX-only names trainstream's code cannot see."""

    def __init__(self, real, hidden):
        super().__init__(real.__name__)
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_hidden", frozenset(hidden))

    def __getattribute__(self, name):
        real = object.__getattribute__(self, "_real")
        if name in object.__getattribute__(self, "_hidden") and ours(sys._getframe(1).f_globals):
            raise AttributeError(f"module {real.__name__!r} has no attribute {name!r} (no POSIX)")
        return getattr(real, name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_real"), name, value)


del os.pread, os.pwrite
del signal.SIGHUP
sys.modules["os"] = Hiding(os, OS_HIDDEN)
sys.modules["signal"] = Hiding(signal, SIGNAL_HIDDEN)


class WindowsPopen(subprocess.Popen):
    """What Windows's Popen refuses, refused to trainstream's code."""

    def __init__(self, *args, **kwargs):
        if ours(sys._getframe(1).f_globals):
            for name in ("pass_fds", "start_new_session", "preexec_fn", "process_group"):
                if kwargs.get(name):
                    raise ValueError(f"{name} is not supported on Windows")
        super().__init__(*args, **kwargs)


subprocess.Popen = WindowsPopen
os.environ["TRAINSTREAM_NO_POSIX"] = "1"
'''

#: Run first in every child: the simulation is in effect, and trainstream's
#: own choices show it (no send-queue check, no ``flock``).
PREAMBLE = """
import json, os, signal, sys
assert os.environ.get("TRAINSTREAM_NO_POSIX") == "1", "sitecustomize did not run"
assert not hasattr(os, "pread") and not hasattr(os, "pwrite"), "os.pread is still there"
assert not hasattr(signal, "SIGHUP"), "signal.SIGHUP is still there"
from trainstream import listeners
from trainstream.store import lock
assert listeners._SEND_QUEUE is None, "the send-queue check found fcntl"
assert lock.FLOCK is False, "the lock found flock"
_probe = {"__name__": "trainstream._probe"}  # code of ours, as the simulation sees it
try:
    exec("import fcntl", _probe)
    raise AssertionError("fcntl is importable by trainstream")
except ModuleNotFoundError:
    pass
exec("import os, signal; assert not (hasattr(os, 'statvfs') or hasattr(signal, 'SIGKILL'))", _probe)
"""

EMBEDDED = """
import socket, time, urllib.parse, urllib.request
import trainstream

db = sys.argv[1]
out = {}
server = trainstream.get_stream_server({"listen": "tcp:0:interface=127.0.0.1", "db": db})
rest = server.urls["rest"]
port = urllib.parse.urlsplit(rest).port
out["port"] = port
run = server.run("portable", hparams={"lr": 0.1})
for step in range(5):
    run.log({"loss": 1.0 / (step + 1)}, step=step)
run.flush()
query = "?run=portable&type=metric&last_event_id=0"  # replayed from the start
stream = urllib.request.urlopen(server.urls["sse"] + query, timeout=20)
seen = []
while len(seen) < 5:
    line = stream.readline()
    if not line:
        break
    if line.startswith(b"data:"):
        seen.append(json.loads(line[5:])["step"])
out["sse_steps"] = seen
with urllib.request.urlopen(rest + "/runs/portable/metrics/loss", timeout=20) as r:
    out["rest_points"] = [p[0] for p in json.load(r)["points"]]
trainstream.release_stream_server()  # the SSE client is still connected
rest_of_stream = b""
while True:
    chunk = stream.read(65536)
    if not chunk:
        break
    rest_of_stream += chunk
out["stream_ended"] = True
stream.close()
out["plain_bind"] = plain_bind(port)
again = trainstream.get_stream_server({"listen": f"tcp:{port}:interface=127.0.0.1", "db": db})
out["again_rest"] = again.urls["rest"]
with urllib.request.urlopen(again.urls["rest"] + "/runs/portable/metrics/loss", timeout=20) as r:
    out["again_points"] = [p[0] for p in json.load(r)["points"]]
trainstream.release_stream_server()
out["plain_bind_again"] = plain_bind(port)
out["running"] = trainstream.get_stream_server_manager().is_server_running()
print("RESULT " + json.dumps(out), flush=True)
"""

STORE = """
import queue, time
from trainstream.errors import StoreError
from trainstream.store import Record
from trainstream.store.sqlite import SQLiteStore

db = sys.argv[1]
calls = queue.SimpleQueue()


def until(d, within=30):
    results = []
    d.addBoth(results.append)
    deadline = time.monotonic() + within
    while not results:
        f, args = calls.get(timeout=max(0.01, deadline - time.monotonic()))
        f(*args)
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def record(i):
    event = {"id": i, "type": "log", "run": "r", "time": 1.0, "level": "info", "message": f"m{i}"}
    return Record(id=i, type="log", run="r", name=None, event=event,
                  json=json.dumps(event, separators=(",", ":")))


def pump(f, *args):
    calls.put((f, args))


out = {}
store = SQLiteStore(db, pump)
store.start()
out["first_last_id"] = store.last_id
until(store.append([record(1), record(2), record(3)]))
until(store.sync())
with open(db + ".lock", encoding="utf-8") as f:
    out["lock_file"] = json.load(f)
out["writer_pid"] = store._child.pid if getattr(store, "_child", None) else None
second = SQLiteStore(db, pump)
try:
    second.start()
    out["second"] = "started"
except StoreError as e:
    out["second"] = str(e)
store.close()
reopened = SQLiteStore(db, pump)
reopened.start()
out["reopened_last_id"] = reopened.last_id
out["after"] = [r.id for r in reopened.after(0, lambda record: True)]
until(reopened.append([record(4)]))
until(reopened.sync())
reopened.close()
print("RESULT " + json.dumps(out), flush=True)
"""


def posixless_env(test: SynchronousTestCase) -> dict[str, str]:
    """The environment of a child without POSIX (its ``sitecustomize`` first on the path)."""
    site = os.path.abspath(test.mktemp())
    os.makedirs(site)
    with open(os.path.join(site, "sitecustomize.py"), "w", encoding="utf-8") as f:
        f.write(SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([site, REPO, env.get("PYTHONPATH", "")])
    env.pop("TRAINSTREAM_URL", None)
    return env


def run_child(test: SynchronousTestCase, source: str, *args: str, within: float = 90) -> Any:
    """Run ``PREAMBLE + source`` without POSIX; its RESULT, or a failure saying what it wrote."""
    script = PLAIN_BIND_SOURCE + PREAMBLE + textwrap.dedent(source)
    child = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=posixless_env(test),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    test.addCleanup(_stop, child)
    try:
        output, _ = child.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        child.kill()
        output, _ = child.communicate(timeout=10)
        test.fail(f"no result within {within:g} s; it wrote:\n{output.decode(errors='replace')}")
    text = output.decode(errors="replace")
    results = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if child.returncode != 0 or not results:
        test.fail(f"the child exited with {child.returncode}; it wrote:\n{text}")
    return json.loads(results[-1].removeprefix("RESULT "))


def _stop(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.kill()
        child.wait(10)
    for stream in (child.stdin, child.stdout, child.stderr):
        if stream is not None:
            stream.close()


class WithoutPosixTests(SynchronousTestCase):
    """The three ways trainstream runs, in an interpreter without POSIX."""

    def test_embedded_lifecycle(self) -> None:
        db = os.path.abspath(self.mktemp()) + ".sqlite3"
        out = run_child(self, EMBEDDED, db)
        self.assertEqual(out["sse_steps"], [0, 1, 2, 3, 4])
        self.assertEqual(out["rest_points"], [0, 1, 2, 3, 4])
        self.assertTrue(out["stream_ended"])
        # Released with a client connected: nothing of ours left on the port,
        # so a bind without SO_REUSEADDR (Windows's default in Twisted) works.
        self.assertIsNone(out["plain_bind"])
        self.assertEqual(out["again_rest"], f"http://127.0.0.1:{out['port']}/api")
        self.assertEqual(out["again_points"], [0, 1, 2, 3, 4])  # the history was kept
        self.assertIsNone(out["plain_bind_again"])
        self.assertFalse(out["running"])

    def test_sqlite_store(self) -> None:
        db = os.path.abspath(self.mktemp()) + ".sqlite3"
        out = run_child(self, STORE, db)
        self.assertEqual(out["first_last_id"], 0)
        # No flock to inherit: the server notes its writer in the lock file.
        self.assertEqual(out["lock_file"]["pid"] > 0, True)
        self.assertIsInstance(out["lock_file"].get("writer"), int)
        self.assertIn(f"history file {db} is in use by another trainstream server", out["second"])
        self.assertEqual(out["reopened_last_id"], 3)
        self.assertEqual(out["after"], [1, 2, 3])
        self.assertTrue(os.path.exists(db + ".lock.held"))

    def test_twistd(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        ports_file = os.path.join(workdir, "ports.json")
        db = os.path.join(workdir, "history.sqlite3")
        log = open(os.path.join(workdir, "twistd.out"), "w+b")
        self.addCleanup(log.close)
        twistd = subprocess.Popen(
            [
                sys.executable,
                "-c",
                PREAMBLE + "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
                "-n",
                "--pidfile=",
                "trainstream",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--db",
                db,
                "--ports-file",
                ports_file,
            ],
            env=posixless_env(self),
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.addCleanup(_stop, twistd)

        def output() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")

        deadline = time.monotonic() + 60
        while not os.path.exists(ports_file):
            if twistd.poll() is not None:
                self.fail(f"twistd exited with {twistd.returncode}:\n{output()}")
            if time.monotonic() > deadline:
                self.fail(f"no ports file within 60 s:\n{output()}")
            time.sleep(0.05)
        with open(ports_file, encoding="utf-8") as f:
            urls = json.load(f)
        with urllib.request.urlopen(urls["rest"] + "/health", timeout=20) as r:
            health = json.load(r)
            status = r.status
        self.assertEqual((status, health["status"]), (200, "ok"), output())
        with open(db + ".lock", encoding="utf-8") as f:
            holder = json.load(f)
        self.assertEqual(holder["pid"], twistd.pid)
        writer = holder.get("writer")
        self.assertIsInstance(writer, int, holder)
        # A stop that is portable as far as it goes: SIGTERM here; on Windows
        # Ctrl-C (docs/windows.md).
        twistd.send_signal(signal.SIGTERM)
        try:
            code = twistd.wait(60)
        except subprocess.TimeoutExpired:
            self.fail(f"twistd did not stop within 60 s of SIGTERM:\n{output()}")
        text = output()
        # twistd ends a SIGTERM'd run by re-raising it (as tests/test_faults.py's CLEAN_EXITS).
        self.assertIn(code, (0, -signal.SIGTERM), text)
        self.assertIn("Server Shut Down.", text)
        self.assertNotIn("Traceback", text)
        self.assertFalse(lock.pid_alive(writer), "its writer process outlived twistd")


class NoFlockLockTests(SynchronousTestCase):
    """The lock where there is no ``flock``, in this process (``lock.FLOCK`` off)."""

    def setUp(self) -> None:
        self.patch(lock, "FLOCK", False)
        self.path = os.path.abspath(self.mktemp()) + ".sqlite3"

    def sleeper(self) -> subprocess.Popen[bytes]:
        """A process that stays until it is killed (a writer still finishing)."""
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.addCleanup(_stop, child)
        return child

    def dead_pid(self) -> int:
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait(30)
        return child.pid

    def test_a_second_holder_is_told_who_has_it(self) -> None:
        held = lock.FileLock(self.path)
        self.addCleanup(held.release)
        held.announce({"dashboard": "http://127.0.0.1:9/"})
        with self.assertRaises(StoreError) as e:
            lock.FileLock(self.path)
        self.assertIn(
            f"history file {self.path} is in use by another trainstream server "
            f"(pid {os.getpid()}, dashboard http://127.0.0.1:9/)",
            str(e.exception),
        )
        held.release()
        lock.FileLock(self.path).release()  # free once released

    def test_the_writer_is_noted_and_forgotten_once_gone(self) -> None:
        held = lock.FileLock(self.path)
        child = self.sleeper()
        lock.writer_started(held.fd, child.pid)
        with open(self.path + ".lock", encoding="utf-8") as f:
            self.assertEqual(json.load(f), {"pid": os.getpid(), "writer": child.pid})
        child.kill()
        child.wait(10)
        held.release()
        with open(self.path + ".lock", encoding="utf-8") as f:
            self.assertEqual(json.load(f), {"pid": os.getpid()})

    def test_the_writer_of_a_server_that_died_is_waited_for(self) -> None:
        writer = self.sleeper()
        with open(self.path + ".lock", "w", encoding="utf-8") as f:
            json.dump({"pid": self.dead_pid(), "writer": writer.pid}, f)
        taken: list[lock.FileLock | BaseException] = []

        def take() -> None:
            try:
                taken.append(lock.FileLock(self.path))
            except BaseException as e:
                taken.append(e)

        thread = threading.Thread(target=take, daemon=True)
        thread.start()
        thread.join(0.5)
        self.assertEqual(taken, [], "the lock was taken while the writer still ran")
        writer.kill()
        writer.wait(10)
        thread.join(10)
        self.assertEqual(len(taken), 1)
        got = taken[0]
        assert isinstance(got, lock.FileLock), got
        got.release()

    def test_a_writer_that_never_ends_is_named(self) -> None:
        self.patch(lock, "ORPHAN_WAIT", 0.2)
        writer = self.sleeper()
        dead = self.dead_pid()
        with open(self.path + ".lock", "w", encoding="utf-8") as f:
            json.dump({"pid": dead, "writer": writer.pid}, f)
        with self.assertRaises(StoreError) as e:
            lock.FileLock(self.path)
        self.assertEqual(
            str(e.exception),
            f"history file {self.path} is still being written by the writer process "
            f"(pid {writer.pid}) of a server that is gone (pid {dead}): it should have "
            "finished within 0.2 s; stop that process",
        )
        lock.writer_started(-1, 1)  # no such lock: nothing to note
        writer.kill()
        writer.wait(10)
        lock.FileLock(self.path).release()  # and free once it is gone


class FakeKernel32:
    """``OpenProcess``, ``GetExitCodeProcess``, ``CloseHandle`` as Windows answers them."""

    def __init__(self, handle: int, exit_code: int = 259, error: int = 0) -> None:
        self.handle, self.exit_code, self.error = handle, exit_code, error
        self.closed: list[int] = []

    def OpenProcess(self, access: int, inherit: int, pid: int) -> int:
        assert access == 0x1000 and inherit == 0
        return self.handle

    def GetExitCodeProcess(self, handle: int, code: Any) -> int:
        code._obj.value = self.exit_code
        return 1

    def CloseHandle(self, handle: int) -> int:
        self.closed.append(handle)
        return 1


class WindowsPidTests(SynchronousTestCase):
    """``pid_alive`` on Windows asks the kernel, never ``os.kill(pid, 0)`` (a Ctrl-C there)."""

    def test_running(self) -> None:
        kernel = FakeKernel32(handle=7)
        self.assertTrue(lock._win32_alive(42, kernel, lambda: 0))
        self.assertEqual(kernel.closed, [7])

    def test_exited(self) -> None:
        kernel = FakeKernel32(handle=7, exit_code=0)
        self.assertFalse(lock._win32_alive(42, kernel, lambda: 0))
        self.assertEqual(kernel.closed, [7])

    def test_no_such_process(self) -> None:
        self.assertFalse(lock._win32_alive(42, FakeKernel32(handle=0), lambda: 87))

    def test_another_users(self) -> None:
        self.assertTrue(lock._win32_alive(42, FakeKernel32(handle=0), lambda: 5))
