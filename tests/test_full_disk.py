"""
A full disk, from outside: a real ``twistd`` whose history cannot grow.

Without root the disk is SQLite's ``max_page_count`` in the writer process
(``TRAINSTREAM_TEST_MAX_PAGES``); as root (CI), a small tmpfs filled to the
brim. Either way the publisher is told (507 naming the disk and the file,
a WebSocket ``error`` on a connection that stays), health says
``degraded``, nothing of a refused batch is served or streamed, the server
recovers by itself once space frees, and nothing acknowledged is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from tests.faultkit import (
    Ledger,
    Server,
    SSEReader,
    call,
    stored_events,
    wait_until,
    ws_connect,
    ws_until,
)
from trainstream.store import writer


def logs(run: str, n: int, size: int) -> list[dict[str, object]]:
    return [
        {"type": "log", "run": run, "level": "info", "message": f"{run}:{i}:" + "x" * size}
        for i in range(n)
    ]


class FullDiskScenario:
    """The steps both kinds of full disk share; ``fill`` and ``free`` differ."""

    def check(
        self,
        test: SynchronousTestCase,
        server: Server,
        fill: Callable[[], None],
        free: Callable[[], set[str]],
    ) -> None:
        """``free`` returns the runs it deleted to make room."""
        status, body = call("POST", server.rest + "/events", logs("old", 40, 2000))
        test.assertEqual(status, 200, body)
        acknowledged = {body["first_id"] + i: "old" for i in range(40)}
        ledger = Ledger()
        reader = SSEReader(server, ledger, after=0)
        reader.start()
        test.addCleanup(reader.stop)
        test.assertTrue(reader.read_until(lambda: len(reader.events) >= 40, 5, 20))
        ws = ws_connect(server.ws)
        test.addCleanup(ws.close)
        fill()

        # Refused with a clear answer, every time, by REST and WebSocket alike.
        status, body = call("POST", server.rest + "/events", logs("big", 200, 4000))
        test.assertEqual(status, 507, body)
        test.assertIn("the disk is full", body["error"])
        test.assertIn(server.db, body["error"])
        test.assertIn("filesystem ", body["error"])
        ws.send(json.dumps({"op": "publish", "events": logs("big", 100, 4000)}))
        messages, ended = ws_until(ws, lambda m: m["op"] in ("ack", "error"), 15)
        test.assertIsNone(ended)
        test.assertEqual(messages[-1]["op"], "error", messages)
        test.assertIn("the disk is full", messages[-1]["error"])
        ws.send('{"op": "ping", "nonce": 7}')  # the connection stays
        messages, ended = ws_until(ws, lambda m: m["op"] == "pong", 10)
        test.assertIsNone(ended)
        status, health = call("GET", server.rest + "/health")
        test.assertEqual((status, health["status"]), (503, "degraded"), health)
        test.assertTrue(any("the disk is full" in r for r in health["reasons"]), health)
        status, page = call("GET", server.rest + "/events?run=big")
        test.assertEqual((status, page["events"]), (200, []))
        test.assertFalse([e for e in reader.events if e["run"] == "big"])

        deleted = free()
        wait_until(
            lambda: call("GET", server.rest + "/health")[0] == 200,
            20,
            "health ok again once space freed",
        )
        status, body = call("POST", server.rest + "/events", logs("after", 20, 100))
        test.assertEqual(status, 200, body)
        acknowledged |= {body["first_id"] + i: "after" for i in range(20)}
        test.assertTrue(
            reader.read_until(lambda: any(e["run"] == "after" for e in reader.events), 5, 20)
        )
        test.assertFalse([e for e in reader.events if e["run"] == "big"])
        reader.stop()
        ws.close()

        test.assertIn(server.terminate(30), (0, -15))  # twistd ends by the signal it got
        server.start()
        stored = stored_events(server.rest)
        kept = {i for i, run in acknowledged.items() if run not in deleted}
        test.assertFalse(kept - set(stored), "acknowledged events missing")
        test.assertFalse([e for e in stored.values() if e["run"] == "big"])
        test.assertNotIn("Traceback", server.output())


class PageCapTests(SynchronousTestCase):
    def test_full_then_freed_by_deleting_a_run(self) -> None:
        db = os.path.abspath(self.mktemp()) + ".sqlite3"
        server = Server(self, db).start()
        call("POST", server.rest + "/events", logs("seed", 1, 10))
        server.terminate(30)
        with sqlite3.connect(db) as file:
            pages = file.execute("PRAGMA page_count").fetchone()[0]
        # Room for the old run (40 x 2 KB), not for the big batch (200 x 4 KB).
        self.patch(os, "environ", {**os.environ, writer.MAX_PAGES_ENV: str(pages + 60)})
        server.start()

        def fill() -> None:
            pass  # the cap leaves room for the old run only

        def free() -> set[str]:
            status, body = call("DELETE", server.rest + "/runs/old")
            self.assertEqual((status, body["deleted"]), (200, 40), body)
            return {"old"}

        FullDiskScenario().check(self, server, fill, free)


class TmpfsTests(SynchronousTestCase):
    """A real full disk (ENOSPC): a 6 MiB tmpfs, as root only (CI is root)."""

    def setUp(self) -> None:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            raise self.skipTest("mounting a tmpfs needs root (.ci/run runs as root)")
        self.mount = os.path.abspath(self.mktemp())
        os.makedirs(self.mount)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", self.mount], capture_output=True
        )
        if result.returncode != 0:
            raise self.skipTest(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", self.mount], check=False)

    def test_full_then_freed_by_removing_a_file(self) -> None:
        server = Server(self, os.path.join(self.mount, "history.sqlite3")).start()
        filler = os.path.join(self.mount, "filler")

        def fill() -> None:
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
            try:  # everything that is left
                while os.write(fd, b"\0" * 65536):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)

        def free() -> set[str]:
            os.unlink(filler)
            return set()

        FullDiskScenario().check(self, server, fill, free)
