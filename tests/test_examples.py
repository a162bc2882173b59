"""
The examples are documentation that runs: each, in a child process, publishes
to a real server started here (``--url``), or starts its own (embedded).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.clients import ANY_PORTS
from trainstream.server import StreamServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def need_torch() -> None:
    if importlib.util.find_spec("torch") is None:
        reason = "torch is not importable; examples/train_torch.py not run"
        print(f"SKIPPED: {reason}", file=sys.stderr)
        raise SkipTest(reason)


class ExampleTests(TestCase):
    timeout = 180

    def setUp(self) -> Deferred[None]:
        self.server = StreamServer(ANY_PORTS, reactor)
        self.addCleanup(self.server.stop)
        return self.server.start()

    async def run_example(self, script: str, *args: str) -> str:
        """Run ``examples/SCRIPT ARGS``; its stdout once it has exited 0."""
        data = tempfile.mkdtemp(prefix="trainstream-example-")  # embedded history goes here
        env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_DATA_HOME": data, "HOME": data}
        out, err, code = await getProcessOutputAndValue(
            sys.executable, [str(EXAMPLES / script), *args], env=env, path=str(ROOT)
        )
        self.assertEqual(code, 0, f"{script} exited {code}:\n{err.decode()[-3000:]}")
        return out.decode()

    def events(self, run: str, kind: str) -> list[dict[str, Any]]:
        return [
            r.event
            for r in self.server.hub.store.after(0, lambda r: r.run == run)
            if r.type == kind
        ]

    def steps(self, run: str) -> dict[str, list[int]]:
        by_name: dict[str, list[int]] = {}
        for e in self.events(run, "metric"):
            by_name.setdefault(e["name"], []).append(e["step"])
        return by_name

    def test_plain_loop_remote(self) -> Deferred[None]:
        async def go() -> None:
            await self.run_example(
                "plain_loop.py", "--url", self.server.urls["rest"], "--run", "r", "--steps", "20"
            )
            steps = self.steps("r")
            for name in ("train/loss", "train/accuracy", "lr"):
                self.assertEqual(steps[name], list(range(20)), name)
            losses = [e["value"] for e in self.events("r", "metric") if e["name"] == "train/loss"]
            self.assertLess(losses[-1], losses[0])
            self.assertEqual(self.events("r", "hparams")[0]["params"]["steps"], 20)
            states = [e["state"] for e in self.events("r", "status")]
            self.assertEqual(states, ["created", "running", "finished"])

        return Deferred.fromCoroutine(go())

    def test_train_torch_remote(self) -> Deferred[None]:
        need_torch()

        async def go() -> None:
            await self.run_example(
                "train_torch.py", "--url", self.server.urls["rest"], "--run", "t", "--steps", "20"
            )
            steps = self.steps("t")
            for name in ("train/loss", "train/acc", "lr"):
                self.assertEqual(steps[name], list(range(20)), name)
            acc = [e["value"] for e in self.events("t", "metric") if e["name"] == "train/acc"]
            self.assertTrue(all(0.0 <= a <= 1.0 for a in acc), acc)
            self.assertEqual(self.events("t", "hparams")[0]["params"]["steps"], 20)
            states = [e["state"] for e in self.events("t", "status")]
            self.assertEqual(states, ["created", "running", "finished"])

        return Deferred.fromCoroutine(go())

    def test_embedded(self) -> Deferred[None]:
        """Without --url each example starts a server itself, prints its URL and exits 0."""

        async def go() -> None:
            listen = ["--listen", "tcp:0:interface=127.0.0.1"]
            out = await self.run_example("plain_loop.py", "--steps", "20", *listen)
            self.assertRegex(out, r"dashboard: http://127\.0\.0\.1:\d+/")
            if importlib.util.find_spec("torch") is not None:
                out = await self.run_example("train_torch.py", "--steps", "20", *listen)
                self.assertRegex(out, r"dashboard: http://127\.0\.0\.1:\d+/")
            else:
                print("SKIPPED: torch is not importable; train_torch.py embedded not run")

        return Deferred.fromCoroutine(go())


class ExampleErrorTests(TestCase):
    timeout = 120

    def test_a_busy_port_is_one_line(self) -> Deferred[None]:
        """The bug report's case, in the examples: exit 1 and the error, not a traceback."""
        import socket

        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        data = tempfile.mkdtemp(prefix="trainstream-example-")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_DATA_HOME": data, "HOME": data}

        async def go() -> None:
            for script in ("plain_loop.py", "train_torch.py"):
                if script == "train_torch.py" and importlib.util.find_spec("torch") is None:
                    print("SKIPPED: torch is not importable; train_torch.py not run")
                    continue
                args = [str(EXAMPLES / script), "--steps", "3"]
                args += ["--listen", f"tcp:{port}:interface=127.0.0.1"]
                _out, err, code = await getProcessOutputAndValue(
                    sys.executable, args, env=env, path=str(ROOT)
                )
                text = err.decode()
                self.assertEqual(code, 1, text)
                self.assertNotIn("Traceback", text)
                self.assertIn(f"{script}: cannot listen", text)
                self.assertIn(f"on port {port}", text)
                self.assertEqual(len(text.strip().splitlines()), 1, text)

        return Deferred.fromCoroutine(go())


def signal_state(pid: int) -> str:
    """A process's blocked, ignored and caught signal masks (``/proc``), for a failure's message."""
    try:
        with open(f"/proc/{pid}/status") as status:
            lines = [
                line.strip() for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt"))
            ]
    except OSError as e:
        return f"pid {pid}: no /proc status ({e})"
    return f"pid {pid}: " + ", ".join(lines)


class KeepServingTests(TestCase):
    """``--keep-serving``: the dashboard outlives the training loop until Ctrl-C."""

    timeout = 120

    def test_ctrl_c_while_the_banner_is_written_ends_quietly(self) -> None:
        """
        The banner is printed once Ctrl-C is caught: a Ctrl-C that lands while
        it is being written (as a fast user's or a test's can) is no traceback.
        """
        import io
        import signal

        from trainstream import embedded

        # keep_serving() leaves a SIGINT handler of its own: the later tests need theirs back
        self.addCleanup(signal.signal, signal.SIGINT, signal.getsignal(signal.SIGINT))

        class InterruptedStdout(io.StringIO):
            def write(self, text: str) -> int:
                raise KeyboardInterrupt

        self.patch(embedded.threadable, "isInIOThread", lambda: False)  # trial's own thread
        self.patch(embedded._manager, "is_server_running", lambda: True)
        self.patch(sys, "stdout", InterruptedStdout())
        embedded.keep_serving("serving http://127.0.0.1:1/ until Ctrl-C")  # returns

    def test_a_ctrl_c_the_kernel_gives_another_thread_still_stops_it(self) -> None:
        """
        A process-wide SIGINT may be delivered to any thread; Python runs its
        handler in the main thread, which keep_serving must wake to see.
        """
        import subprocess

        script = textwrap.dedent(
            """
            import signal, threading, time
            import trainstream

            def press():
                time.sleep(0.5)  # keep_serving waits by then
                signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # to this thread

            with trainstream.serve({"listen": "tcp:0:interface=127.0.0.1", "memory": True}):
                threading.Thread(target=press, daemon=True).start()
                trainstream.keep_serving()
            print("stopped")
            """
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        child = subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.addCleanup(lambda: child.poll() is None and child.kill())
        try:
            out, err = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            state = signal_state(child.pid)
            self.fail(f"keep_serving() did not see a Ctrl-C delivered to another thread; {state}")
        self.assertEqual((child.returncode, out), (0, "stopped\n"), err)

    def test_plain_loop_keeps_serving_until_ctrl_c(self) -> None:
        self.keep_serving_until(presses=1)

    def test_ctrl_c_pressed_again_while_stopping_is_no_traceback(self) -> None:
        """
        An impatient user's Ctrl-C, Ctrl-C, Ctrl-C: the second and third
        land while the server is released or Python joins its threads at
        exit; they only say it is stopping (before: "Exception ignored in
        threading._shutdown", a KeyboardInterrupt traceback).
        """
        err = self.keep_serving_until(presses=3)
        self.assertNotIn(b"Exception ignored", err)

    def keep_serving_until(self, presses: int) -> bytes:
        """Run plain_loop.py --keep-serving, check it serves, Ctrl-C it; its stderr."""
        import json
        import select
        import signal
        import subprocess
        import time
        import urllib.request

        from tests.clients import plain_bind

        data = tempfile.mkdtemp(prefix="trainstream-example-")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_DATA_HOME": data, "HOME": data}
        env["PYTHONFAULTHANDLER"] = "1"  # a hang's stacks, should it not stop
        child = subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLES / "plain_loop.py"),
                *("--steps", "20", "--keep-serving", "--run", "kept"),
                *("--listen", "tcp:0:interface=127.0.0.1"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # its own process group, as a terminal's job is
        )
        self.addCleanup(lambda: child.poll() is None and os.killpg(child.pid, signal.SIGKILL))
        out = b""
        deadline = time.monotonic() + 60
        assert child.stdout is not None
        while b"until Ctrl-C" not in out:
            self.assertLess(time.monotonic(), deadline, out)
            ready, _, _ = select.select([child.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(child.stdout.fileno(), 4096)
                if not chunk:
                    self.fail(f"exited early: {child.communicate(timeout=10)[1].decode()}")
                out += chunk
        url = out.decode().split("serving ", 1)[1].split(" ", 1)[0]
        # The loop is over and the server still answers, with the whole run.
        with urllib.request.urlopen(url + "api/runs/kept", timeout=10) as response:
            run = json.loads(response.read())
        self.assertEqual((run["state"], run["last_step"]), ("finished", 19))
        os.killpg(child.pid, signal.SIGINT)  # Ctrl-C: the whole group
        for _ in range(presses - 1):
            time.sleep(0.01)
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGINT)
        try:
            _, err = child.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            state = signal_state(child.pid)  # SIGINT blocked or ignored in it?
            os.killpg(child.pid, signal.SIGABRT)  # faulthandler: every thread's stack
            _, err = child.communicate(timeout=15)
            self.fail(
                f"the example did not stop within 15 s of Ctrl-C; {state}; "
                f"this process: {signal_state(os.getpid())}\n{err.decode()[-6000:]}"
            )
        # A press that lands after Python has put back the default handlers
        # (the very end of its exit, all saved by then) ends it as Ctrl-C does.
        codes = (0,) if presses == 1 else (0, -signal.SIGINT)
        self.assertIn(child.returncode, codes, err.decode())
        self.assertNotIn(b"Traceback", err)
        port = int(url.split(":")[2].split("/")[0])
        self.assertIsNone(plain_bind(port))
        return err

    def test_embedded_says_how_to_see_the_run_again(self) -> Deferred[None]:
        async def go() -> None:
            out = await ExampleTests.run_example(
                self, "plain_loop.py", "--steps", "5", "--listen", "tcp:0:interface=127.0.0.1"
            )  # type: ignore[arg-type]
            self.assertIn("the run is stored in", out)
            self.assertIn("twistd -n trainstream", out)

        return Deferred.fromCoroutine(go())
