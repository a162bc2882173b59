"""
The REST calls of PROTOCOL section 3 (runs, metric history, deletion,
publishing, health and Prometheus ``/metrics``)
through ``treq.testing.StubTreq`` on the real site of a small ``Backend``:
no sockets, no reactor. The OpenAPI document: tests/test_openapi.py.
"""

from __future__ import annotations

import io
import json
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from tests.webtools import (
    REST_PORT,
    Connection,
    ControlledStore,
    FakeBackend,
    SSEClient,
    log_event,
    make_site,
    metric,
)
from trainstream.store import StoreHealth
from trainstream.web.site import build_site

BASE = f"http://127.0.0.1:{REST_PORT}"


class RestTestCase(SynchronousTestCase):
    """The site of a fresh backend, asked through StubTreq."""

    store: Any = None

    def setUp(self) -> None:
        self.backend = FakeBackend(store=self.store() if self.store else None)
        self.site = make_site(self.backend)
        self.stub = StubTreq(self.site.resource)

    def raw(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Any:
        d = self.stub.request(
            method,
            BASE + path,
            data=body,
            headers={k.replace("_", "-"): [v] for k, v in headers.items()} or None,
        )
        self.stub.flush()
        return self.successResultOf(d)

    def text(self, response: Any) -> str:
        d = response.text()
        self.stub.flush()
        text: str = self.successResultOf(d)
        return text

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"content_type": "application/json"} if data else {}
        response = self.raw(method, path, data, **headers)
        text = self.text(response)
        self.assertNotIn("Traceback", text)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        return response.code, json.loads(text)

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def publish(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        code, body = self.request("POST", "/api/events", events)
        self.assertEqual(code, 200, body)
        return body  # type: ignore[no-any-return]

    def assertError(self, answer: tuple[int, Any], code: int, *words: str) -> None:
        self.assertEqual(answer[0], code, answer[1])
        self.assertEqual(set(answer[1]) - {"error", "parameter", "index"}, set())
        for word in words:
            self.assertIn(word, answer[1]["error"])


class RunsTests(RestTestCase):
    def test_api_root_is_an_index(self) -> None:
        """
        ``server.urls["rest"]`` (``.../api``) answers, with or without the
        slash, with links that themselves answer.
        """
        for path in ("/api", "/api/"):
            code, body = self.get(path)
            self.assertEqual(code, 200, path)
            self.assertEqual(body["name"], "trainstream")
            self.assertEqual(body["urls"], self.backend.urls)
        for name, link in body["links"].items():
            if "{" in link or " " in link:
                continue  # a template or a method, not a URL to follow
            # /ws answers a GET that is no upgrade with 426 Upgrade Required.
            expected = 426 if name == "ws" else 200
            self.assertEqual(self.raw("GET", link).code, expected, f"{name}: {link}")

    def test_list_runs(self) -> None:
        self.assertEqual(self.get("/api/runs"), (200, {"runs": []}))
        self.publish(
            [
                {"type": "status", "run": "a", "state": "created", "time": 100.0},
                {**metric("a", 3), "time": 101.0},
                {**metric("a", 4, name="val/acc"), "time": 102.5},
                {"type": "status", "run": "b", "state": "finished", "time": 50.0},
            ]
        )
        code, body = self.get("/api/runs")
        self.assertEqual(code, 200)
        self.assertEqual(
            body["runs"],
            [
                {
                    "run": "a",
                    "state": "running",
                    "created": 100.0,
                    "updated": 102.5,
                    "last_step": 4,
                    "metrics": ["train/loss", "val/acc"],
                },
                {
                    "run": "b",
                    "state": "finished",
                    "created": 50.0,
                    "updated": 50.0,
                    "last_step": None,
                    "metrics": [],
                },
            ],
        )

    def test_get_run(self) -> None:
        self.publish(
            [
                {"type": "hparams", "run": "r", "params": {"lr": 0.001, "bs": 32}},
                metric("r", 1, 2.0),
                metric("r", 2, "NaN"),
                metric("r", 3, 1.0),
                {"type": "status", "run": "r", "state": "paused", "epoch": 1},
            ]
        )
        code, body = self.get("/api/runs/r")
        self.assertEqual(code, 200)
        self.assertEqual(body["run"], "r")
        self.assertEqual(body["state"], "paused")
        self.assertEqual(body["hparams"], {"lr": 0.001, "bs": 32})
        self.assertEqual(
            body["metrics"],
            {
                "train/loss": {
                    "count": 3,
                    "last_step": 3,
                    "last_value": 1.0,
                    "min": 1.0,
                    "max": 2.0,
                }
            },
        )

    def test_unknown_run(self) -> None:
        self.assertError(self.get("/api/runs/nope"), 404, "no run named 'nope'")
        self.assertError(self.get("/api/runs/no/such/run"), 404, "'no/such/run'", "%2F")
        self.assertError(self.get("/api/runs/nope/metrics/train/loss"), 404, "'nope'")

    def test_slash_in_run_name(self) -> None:
        """A '/' in a run name works sent as is or as %2F; so does one in a metric name."""
        self.publish([metric("team/resnet-3", 1, 0.25)])
        for path in ("/api/runs/team/resnet-3", "/api/runs/team%2Fresnet-3"):
            code, body = self.get(path)
            self.assertEqual((code, body["run"]), (200, "team/resnet-3"), path)
        for path in (
            "/api/runs/team/resnet-3/metrics/train/loss",
            "/api/runs/team%2Fresnet-3/metrics/train/loss",
            "/api/runs/team%2Fresnet-3/metrics/train%2Floss",
        ):
            code, body = self.get(path)
            self.assertEqual(code, 200, path)
            self.assertEqual(
                (body["run"], body["name"], body["points"][0][:2]),
                ("team/resnet-3", "train/loss", [1, 0.25]),
            )

    def test_metrics_segment_in_run_name(self) -> None:
        """A run named a/metrics/b must be sent as a%2Fmetrics%2Fb: the path splits at 'metrics'."""
        self.publish([metric("a/metrics/b", 1)])
        self.assertError(self.get("/api/runs/a/metrics/b"), 404, "no run named 'a'")
        code, body = self.get("/api/runs/a%2Fmetrics%2Fb")
        self.assertEqual((code, body["run"]), (200, "a/metrics/b"))
        code, body = self.get("/api/runs/a%2Fmetrics%2Fb/metrics/train/loss")
        self.assertEqual((code, len(body["points"])), (200, 1))

    def test_wrong_method(self) -> None:
        self.assertError(self.request("POST", "/api/runs"), 405, "POST")
        self.assertError(self.request("PUT", "/api/runs/r"), 405, "PUT")

    def test_internal_error_has_no_traceback(self) -> None:
        def broken() -> list[Any]:
            raise RuntimeError("secret detail")

        self.patch(self.backend.runs, "all", broken)
        code, body = self.get("/api/runs")
        self.assertEqual(code, 500)
        self.assertNotIn("secret", body["error"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_unknown_api_path_is_json_404(self) -> None:
        code, body = self.get("/api/nope")
        self.assertEqual(code, 404)
        self.assertIn("/api/nope", body["error"])


class MetricHistoryTests(RestTestCase):
    def test_points(self) -> None:
        self.publish(
            [{**metric("r", s, s / 4), "time": 1000.0 + s} for s in range(5)]
            + [metric("r", 9, 5.0, name="other"), metric("q", 2, 7.0)]
        )
        code, body = self.get("/api/runs/r/metrics/train/loss")
        self.assertEqual(code, 200)
        self.assertEqual(
            body,
            {
                "run": "r",
                "name": "train/loss",
                "points": [[s, s / 4, 1000.0 + s] for s in range(5)],
                "downsampled": False,
            },
        )
        code, body = self.get("/api/runs/r/metrics/train/loss?from_step=1&to_step=3")
        self.assertEqual([p[0] for p in body["points"]], [1, 2, 3])
        code, body = self.get("/api/runs/r/metrics/train/loss?from_step=3")
        self.assertEqual([p[0] for p in body["points"]], [3, 4])
        code, body = self.get("/api/runs/r/metrics/train/loss?to_step=0")
        self.assertEqual([p[0] for p in body["points"]], [0])

    def test_non_finite_values_round_trip_as_strings(self) -> None:
        self.publish(
            [metric("r", 1, "NaN"), metric("r", 2, "Infinity"), metric("r", 3, "-Infinity")]
        )
        text = self.text(self.raw("GET", "/api/runs/r/metrics/train/loss"))
        # Strict JSON: a bare NaN/Infinity literal would fail here.
        body = json.loads(text, parse_constant=lambda c: self.fail(f"bare {c}"))
        self.assertEqual([p[1] for p in body["points"]], ["NaN", "Infinity", "-Infinity"])
        code, run = self.get("/api/runs/r")
        self.assertEqual(code, 200)
        self.assertEqual(run["metrics"]["train/loss"]["last_value"], "-Infinity")
        self.assertIsNone(run["metrics"]["train/loss"]["min"])

    def test_downsampled_keeps_the_spike(self) -> None:
        events = [metric("r", s, 1.0) for s in range(1000)]
        events[637]["value"] = 1e9
        events[100]["value"] = "NaN"
        self.publish(events)
        code, body = self.get("/api/runs/r/metrics/train/loss?max_points=50")
        self.assertEqual(code, 200)
        self.assertTrue(body["downsampled"])
        self.assertLessEqual(len(body["points"]), 50)
        steps = [p[0] for p in body["points"]]
        self.assertEqual(steps, sorted(steps))
        self.assertIn([637, 1e9], [p[:2] for p in body["points"]])
        self.assertIn([100, "NaN"], [p[:2] for p in body["points"]])
        code, body = self.get("/api/runs/r/metrics/train/loss?max_points=1000")
        self.assertEqual((len(body["points"]), body["downsampled"]), (1000, False))

    def test_bad_parameters(self) -> None:
        self.publish([metric("r", 1)])
        base = "/api/runs/r/metrics/train/loss?"
        for query, parameter in [
            ("from_step=abc", "from_step"),
            ("from_step=-1", "from_step"),
            ("to_step=1.5", "to_step"),
            ("max_points=1", "max_points"),
            ("max_points=", "max_points"),
            ("max_points=99999999999", "max_points"),
            ("from_step=1&from_step=2", "from_step"),
            ("segments=some", "segments"),
        ]:
            answer = self.get(base + query)
            self.assertError(answer, 400, parameter)
            self.assertEqual(answer[1]["parameter"], parameter, query)

    def test_unknown_metric(self) -> None:
        self.publish([metric("r", 1)])
        self.assertError(
            self.get("/api/runs/r/metrics/val/acc"), 404, "'r' has no metric 'val/acc'"
        )


class PublishTests(RestTestCase):
    def post(self, body: bytes, content_type: str | None = "application/json") -> tuple[int, Any]:
        headers = {"content_type": content_type} if content_type else {}
        response = self.raw("POST", "/api/events", body, **headers)
        return response.code, json.loads(self.text(response))

    def test_post_gives_ids(self) -> None:
        """200 with the ids of the batch, all stored, in order."""
        body = self.publish([metric("r1", s, s / 10) for s in range(5)])
        self.assertEqual(body["accepted"], 5)
        self.assertEqual(body["last_id"] - body["first_id"], 4)
        stored = self.backend.store.after(0, lambda r: True)
        self.assertEqual([r.id for r in stored], list(range(body["first_id"], body["last_id"] + 1)))
        self.assertEqual([r.event["step"] for r in stored], [0, 1, 2, 3, 4])

    def test_bad_batch_stores_nothing(self) -> None:
        """A bad event answers 400 naming its index; nothing of the batch is kept."""
        batch = [metric("r", 1), {"type": "metric", "run": "r", "name": "x", "step": -1}]
        code, body = self.request("POST", "/api/events", batch)
        self.assertEqual(code, 400)
        self.assertEqual(body["index"], 1)
        self.assertIn("step", body["error"])
        self.assertEqual(self.backend.hub.last_id, 0)

    def test_malformed_bodies_are_400_and_harmless(self) -> None:
        """Every kind of bad body answers 400 naming the problem; the server goes on."""
        cases = [
            (b"[{", "application/json", "JSON"),
            (b"\xff\xfe[]", "application/json", "UTF-8"),
            (
                b'[{"type": "metric", "run": "r", "name": "x", "step": 1, "value": NaN}]',
                "application/json",
                "NaN",
            ),
            (b'{"type": "log"}', "application/json", "array"),
            (
                b'[{"type": "metric", "run": "r", "name": "x", "step": 1, "value": 1, "extra": 2}]',
                "application/json",
                "extra",
            ),
            (
                b'[{"type": "metric", "run": "/r", "name": "x", "step": 1, "value": 1}]',
                "application/json",
                "run",
            ),
        ]
        for body, ctype, word in cases:
            code, answer = self.post(body, ctype)
            self.assertEqual(code, 400, body)
            self.assertIn(word.lower(), answer["error"].lower(), body)
        code, answer = self.post(b"[]", "text/plain")
        self.assertEqual(code, 415)
        self.assertIn("content-type", answer["error"].lower())
        self.assertEqual(self.backend.hub.last_id, 0)
        code, answer = self.post(json.dumps([metric("ok", 1)]).encode())
        self.assertEqual((code, answer["accepted"]), (200, 1))

    def test_duplicate_keys_refused_wherever_they_hide(self) -> None:
        """
        A duplicate key is refused however it is spaced, and in nested
        objects: the decoder sees the keys, it does not count them.
        """
        event = b'"type":"metric","name":"x","step":1,"value":1'
        for body in (
            b'[{"run":"a",' + event + b',"run":"b"}]',
            b'[{"run":"a",' + event + b',"run" :"b"}]',
            b'[{"run":"a",' + event + b',"run"\n:"b"}]',
            b'[{"run":"a",' + event.replace(b'"value":1', b'"value" :2,"value":1') + b"}]",
            b'[{"type":"hparams","run":"a","params":{"lr":1,"lr" :2}}]',
        ):
            code, answer = self.post(body)
            self.assertEqual(code, 400, body)
            self.assertIn("body is not valid JSON: duplicate key", answer["error"], body)
        self.assertEqual(self.backend.hub.last_id, 0)
        # A '":' inside a string is no key: nothing to count, nothing refused.
        code, answer = self.post(
            b'[{"type":"log","run":"a","level":"info","message":"x\\":  \\":"}]'
        )
        self.assertEqual(code, 200, answer)

    def test_polling(self) -> None:
        """``GET /api/events``: stored events after ``after``, filtered, at most ``limit``."""
        first = self.publish([metric("a", 1), log_event("b"), metric("a", 2)])["first_id"]
        code, page = self.get(f"/api/events?after={first}")
        self.assertEqual(code, 200)
        self.assertEqual([e["id"] for e in page["events"]], [first + 1, first + 2])
        self.assertEqual(page["last_id"], self.backend.hub.last_id)
        _, page = self.get("/api/events?run=a&type=metric&limit=1")
        self.assertEqual([(e["run"], e["step"]) for e in page["events"]], [("a", 1)])
        for query, parameter in [
            ("after=x", "after"),
            ("after=-1", "after"),
            ("limit=0", "limit"),
            ("limit=10001", "limit"),
        ]:
            answer = self.get("/api/events?" + query)
            self.assertError(answer, 400, parameter)
            self.assertEqual(answer[1]["parameter"], parameter)
        self.assertError(self.get("/api/events?type=bogus"), 400, "unknown event type 'bogus'")


class CommitTests(RestTestCase):
    """What a client is told is true once the history has committed it."""

    store = ControlledStore

    def test_answer_waits_for_the_commit(self) -> None:
        """200 means stored: the answer comes only once the history committed the batch."""
        d = self.stub.post(
            BASE + "/api/events",
            json.dumps([metric("r", 1)]).encode(),
            headers={"content-type": ["application/json"]},
        )
        self.stub.flush()
        self.assertNoResult(d)
        self.assertEqual(self.backend.hub.last_id, 1)  # accepted, not yet committed
        self.backend.store.commit()
        self.stub.flush()
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_history_read_after_commit(self) -> None:
        """A metric history is read once what was published before it is stored."""
        self.backend.hub.accept([metric("r", 1)])
        d = self.stub.get(BASE + "/api/runs/r/metrics/train/loss")
        self.stub.flush()
        self.assertNoResult(d)
        self.backend.store.commit()
        self.stub.flush()
        self.assertEqual(self.successResultOf(d).code, 200)


class HealthTests(RestTestCase):
    def test_health(self) -> None:
        SSEClient(self.site)
        code, body = self.get("/api/health")
        self.assertEqual(code, 200)
        self.assertEqual(body["status"], "ok")
        self.assertEqual(
            body["listeners"],
            {li.role: li.to_json() for li in self.backend.listeners},
        )
        self.assertEqual(set(body["listeners"]), {"sse", "ws", "rest"})
        self.assertEqual(body["clients"], {"sse": 1, "ws": 0})
        self.assertEqual(body["last_id"], self.backend.hub.last_id)
        self.assertEqual(body["uptime_s"], 12.5)
        self.assertEqual(body["epoch"], self.backend.store.epoch)
        self.assertIn("version", body)

    def test_degraded(self) -> None:
        """503 ``degraded`` naming the store's problems, then the server's."""
        self.patch(
            self.backend.store,
            "health",
            lambda: StoreHealth(problems=("writer died",), writer_restarts=2),
        )
        self.backend.problems = ("reactor lagging",)
        code, body = self.get("/api/health")
        self.assertEqual((code, body["status"]), (503, "degraded"))
        self.assertEqual(body["reasons"], ["writer died", "reactor lagging"])
        self.assertEqual(body["reason"], "writer died")
        self.assertEqual(body["store"]["writer_restarts"], 2)


class DeleteTests(RestTestCase):
    def test_delete_run(self) -> None:
        self.publish([metric("gone", 1), metric("kept", 1), metric("gone", 2, "NaN")])
        code, body = self.request("DELETE", "/api/runs/gone")
        self.assertEqual((code, body), (200, {"run": "gone", "deleted": 3}))  # with its alert
        self.assertError(self.get("/api/runs/gone"), 404, "gone")
        self.assertError(self.get("/api/runs/gone/metrics/train/loss"), 404)
        code, body = self.get("/api/events")
        self.assertEqual([e["run"] for e in body["events"]], ["kept"])
        code, body = self.get("/api/runs")
        self.assertEqual([r["run"] for r in body["runs"]], ["kept"])
        self.assertError(self.request("DELETE", "/api/runs/gone"), 404, "gone")

    def test_delete_slashed_run(self) -> None:
        self.publish([metric("team/a", 1), metric("team/b", 1)])
        code, body = self.request("DELETE", "/api/runs/team%2Fa")
        self.assertEqual((code, body["deleted"]), (200, 1))
        code, body = self.request("DELETE", "/api/runs/team/b")
        self.assertEqual((code, body["deleted"]), (200, 1))
        self.assertEqual(self.get("/api/runs")[1], {"runs": []})

    def test_delete_on_a_metric_is_refused(self) -> None:
        self.publish([metric("r", 1)])
        self.assertError(self.request("DELETE", "/api/runs/r/metrics/train/loss"), 405, "whole run")
        self.assertEqual(self.get("/api/runs/r")[0], 200)


class PrometheusTests(RestTestCase):
    def scrape(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        response = self.raw("GET", "/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(self.text(response)):
            for s in family.samples:
                samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return samples

    def test_mounted_on_the_site(self) -> None:
        """``/metrics`` is part of the site every listener serves, not added by a test."""
        self.assertIn(b"metrics", self.site.resource.children)
        self.assertIn("trainstream_info", self.scrape())

    def test_counters(self) -> None:
        before = self.scrape()
        self.assertEqual(before["trainstream_events_accepted_total"][()], 0)
        self.assertEqual(before["trainstream_runs"][()], 0)
        self.assertEqual(before["trainstream_degraded"][()], 0)
        SSEClient(self.site)
        reply = self.publish([metric("a", 1), metric("b", 1, "NaN")])
        samples = self.scrape()
        self.assertEqual(samples["trainstream_events_accepted_total"][()], 3)  # + the alert
        self.assertEqual(samples["trainstream_nan_alerts_total"][()], 1)
        self.assertEqual(samples["trainstream_last_event_id"][()], reply["last_id"] + 1)
        self.assertEqual(samples["trainstream_runs"][()], 2)
        self.assertEqual(samples["trainstream_runs_by_state"][(("state", "running"),)], 2)
        self.assertEqual(samples["trainstream_clients"][(("kind", "sse"),)], 1)
        self.assertEqual(samples["trainstream_clients"][(("kind", "ws"),)], 0)
        self.assertEqual(samples["trainstream_subscribers"][()], 1)
        self.assertEqual(samples["trainstream_uptime_seconds"][()], 12.5)
        # Each server has its own registry: nothing of ours in the global one.
        self.assertIsNone(REGISTRY.get_sample_value("trainstream_runs"))

    def test_degraded(self) -> None:
        self.backend.problems = ("a listener is gone",)
        self.assertEqual(self.scrape()["trainstream_degraded"][()], 1)
        self.assertEqual(self.scrape()["trainstream_store_degraded"][()], 0)


class AccessLogTests(SynchronousTestCase):
    def test_routine_publishing_is_not_logged(self) -> None:
        """
        A successful publish leaves no access-log line; every other request
        (a refused publish, a read) does; ``access_log`` logs them all.
        """
        site = make_site(FakeBackend())
        log = io.BytesIO()
        site.logFile = log
        event = json.dumps([metric("r", 1)]).encode()
        json_type = {"Content-Type": "application/json"}

        def ask(method: str, path: str, body: bytes = b"") -> int:
            return Connection(site).request(method, path, json_type, body).code

        self.assertEqual(ask("POST", "/api/events", event), 200)
        self.assertEqual(log.getvalue(), b"")
        self.assertEqual(ask("POST", "/api/events", b'[{"x": 1}]'), 400)
        self.assertEqual(ask("GET", "/api/health"), 200)
        lines = log.getvalue().decode().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn('"POST /api/events HTTP/1.1" 400', lines[0])
        self.assertIn('"GET /api/health HTTP/1.1" 200', lines[1])
        site.full_access_log = True  # type: ignore[attr-defined]
        self.assertEqual(ask("POST", "/api/events", event), 200)
        self.assertIn('"POST /api/events HTTP/1.1" 200', log.getvalue().decode())

    def test_option_turns_full_logging_on(self) -> None:
        from trainstream.tap import Options

        options = Options()
        options.parseOptions(["--access-log", "--memory"])
        self.assertTrue(options.config.access_log)
        backend = FakeBackend()
        site = build_site(backend, options.config, backend.clock)
        self.assertTrue(site.full_access_log)  # type: ignore[attr-defined]
        self.assertFalse(make_site(backend).full_access_log)  # type: ignore[attr-defined]
