"""
Searching a run's log events (``GET /api/runs/{run}/logs``): by level and
text, paged with ``next_after`` and bounded per request; through StubTreq
on the real site (memory store), and on SQLite through a real server.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from twisted.trial.unittest import SynchronousTestCase

from tests.test_rest import RestTestCase
from trainstream.web import logs as logs_module


def line(run: str, level: str, message: str) -> dict[str, Any]:
    return {"type": "log", "run": run, "level": level, "message": message}


class LogSearchTests(RestTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.publish(
            [
                line("a", "info", "epoch 1 started"),
                {"type": "metric", "run": "a", "name": "loss", "step": 1, "value": 0.5},
                line("a", "warning", "Loss is NaN at step 3"),
                line("b", "error", "CUDA out of memory"),
                line("a", "error", "CUDA out of memory: tried 2 GiB"),
                line("a", "debug", "grad norm 1.2"),
                line("exp1/train", "info", "a run with a slash"),
            ]
        )

    def search(self, run: str, query: str = "") -> dict[str, Any]:
        code, body = self.get(f"/api/runs/{run}/logs{query}")
        self.assertEqual(code, 200, body)
        return body  # type: ignore[no-any-return]

    def messages(self, body: dict[str, Any]) -> list[str]:
        return [e["message"] for e in body["logs"]]

    def test_all_of_a_run_in_order(self) -> None:
        body = self.search("a")
        self.assertEqual(body["run"], "a")
        self.assertEqual(
            self.messages(body),
            ["epoch 1 started", "Loss is NaN at step 3", "CUDA out of memory: tried 2 GiB",
             "grad norm 1.2"],
        )  # fmt: skip
        self.assertEqual([e["type"] for e in body["logs"]], ["log"] * 4)
        self.assertIsNone(body["next_after"])
        ids = [e["id"] for e in body["logs"]]
        self.assertEqual(ids, sorted(ids))

    def test_by_level_one_or_several(self) -> None:
        self.assertEqual(self.messages(self.search("a", "?level=error")), [
            "CUDA out of memory: tried 2 GiB"])  # fmt: skip
        both = self.search("a", "?level=warning,error")
        self.assertEqual(len(both["logs"]), 2)
        self.assertEqual(self.search("a", "?level=warning&level=error"), both)

    def test_by_text_case_insensitive(self) -> None:
        self.assertEqual(self.messages(self.search("a", "?q=nan")), ["Loss is NaN at step 3"])
        self.assertEqual(self.messages(self.search("a", "?q=CUDA&level=error")), [
            "CUDA out of memory: tried 2 GiB"])  # fmt: skip
        self.assertEqual(self.search("a", "?q=" + quote("no such text"))["logs"], [])
        self.assertEqual(self.messages(self.search("a", "?q=" + quote("memory: tried"))), [
            "CUDA out of memory: tried 2 GiB"])  # fmt: skip
        self.assertEqual(self.search("a", "?q=" + quote("memory,"))["logs"], [])

    def test_run_with_a_slash(self) -> None:
        self.assertEqual(self.messages(self.search("exp1/train")), ["a run with a slash"])
        self.assertEqual(self.messages(self.search("exp1%2Ftrain")), ["a run with a slash"])

    def test_limit_and_next_after_page_through(self) -> None:
        first = self.search("a", "?limit=3")
        self.assertEqual(len(first["logs"]), 3)
        self.assertEqual(first["next_after"], first["logs"][-1]["id"])
        rest = self.search("a", f"?limit=3&after={first['next_after']}")
        self.assertEqual(self.messages(rest), ["grad norm 1.2"])
        self.assertIsNone(rest["next_after"])

    def test_a_request_reads_a_bounded_number(self) -> None:
        self.patch(logs_module, "SCAN_BUDGET", 2)
        self.patch(logs_module, "PAGE", 2)
        body = self.search("a", "?q=grad")
        self.assertEqual((body["logs"], body["scanned"]), ([], 2))
        self.assertIsNotNone(body["next_after"])
        more = self.search("a", f"?q=grad&after={body['next_after']}")
        self.assertEqual(self.messages(more), ["grad norm 1.2"])

    def test_bad_queries_are_400_naming_the_parameter(self) -> None:
        for query, word in (
            ("?level=fatal", "level"),
            ("?level=", "level"),
            ("?level=info,", "level"),
            ("?limit=0", "limit"),
            ("?limit=100000", "limit"),
            ("?after=-1", "after"),
            ("?q=a&q=b", "q"),
            ("?q=" + "x" * 300, "q"),
        ):
            code, body = self.get("/api/runs/a/logs" + query)
            self.assertEqual(code, 400, (query, body))
            self.assertIn(word, body["error"], query)

    def test_unknown_run_is_404(self) -> None:
        code, body = self.get("/api/runs/nobody/logs")
        self.assertEqual(code, 404, body)

    def test_delete_is_not_allowed(self) -> None:
        code, body = self.request("DELETE", "/api/runs/a/logs")
        self.assertEqual(code, 405, body)  # nothing was deleted
        self.assertEqual(len(self.search("a")["logs"]), 4)


class SQLiteLogSearchTests(SynchronousTestCase):
    """On SQLite: read from the file off the reactor thread, past a small cache."""

    def test_search_on_sqlite_pages_past_the_cache(self) -> None:
        import os

        from tests.test_store_lifecycle import Pump, open_store
        from trainstream.hub import Hub

        pump = Pump()
        path = os.path.join(os.path.abspath(self.mktemp()), "history.sqlite3")
        store = open_store(self, path, pump, cache_events=10)
        hub = Hub(store)
        events = [line("r", "error" if i % 100 == 0 else "info", f"line {i}") for i in range(3000)]
        for start in range(0, 3000, 1000):
            hub.accept(events[start : start + 1000])
        pump.until(store.sync())
        self.patch(logs_module, "PAGE", 500)
        found = pump.until(logs_module.search_logs(store, hub.last_id, "r", ["error"], None))
        self.assertEqual(
            [r.event["message"] for r in found.logs], [f"line {i}" for i in range(0, 3000, 100)]
        )
        self.assertEqual((found.scanned, found.next_after), (3000, None))
        texts = pump.until(logs_module.search_logs(store, hub.last_id, "r", None, "LINE 29", 0, 5))
        self.assertEqual([r.event["message"] for r in texts.logs], ["line 29"] + [
            f"line {i}" for i in range(290, 294)])  # fmt: skip
        self.assertEqual(texts.next_after, texts.logs[-1].id)
