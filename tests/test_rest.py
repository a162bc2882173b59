"""
The REST calls of PROTOCOL section 3 on a real server on loopback: runs,
metric history, deletion, the OpenAPI document and Prometheus ``/metrics``.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tests.clients import ANY_PORTS, connect_sse
from trainstream.metrics import MetricsResource
from trainstream.service import StreamServer
from trainstream.web.openapi import openapi_document
from trainstream.web.rest import RestApi


def d(coro: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coro)


def metric(run: str, step: int, value: Any = 0.5, name: str = "train/loss") -> dict[str, Any]:
    return {"type": "metric", "run": run, "name": name, "step": step, "value": value}


class RestTestCase(TestCase):
    """A started server on free ports, stopped (ports free) after each test."""

    def setUp(self) -> Deferred[Any]:
        self.server = StreamServer(ANY_PORTS, reactor)
        root = self.server.site.resource
        if b"metrics" not in root.children:  # until site.py mounts it
            root.putChild(b"metrics", MetricsResource(self.server))
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.server.stop)
        return self.server.start()

    def url(self, path: str) -> str:
        return self.server.urls["rest"].rsplit("/api", 1)[0] + path

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        response = await treq.request(
            method,
            self.url(path).encode(),
            data=data,
            headers={"content-type": ["application/json"]} if data else None,
            pool=self.pool,
        )
        text = await response.text()
        self.assertNotIn("Traceback", text)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        return response.code, json.loads(text)

    async def get(self, path: str) -> tuple[int, Any]:
        return await self.request("GET", path)

    async def publish(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        code, body = await self.request("POST", "/api/events", events)
        self.assertEqual(code, 200, body)
        return body  # type: ignore[no-any-return]

    def assertError(self, answer: tuple[int, Any], code: int, *words: str) -> None:
        self.assertEqual(answer[0], code, answer[1])
        self.assertEqual(set(answer[1]) - {"error", "parameter", "index"}, set())
        for word in words:
            self.assertIn(word, answer[1]["error"])


class RunsTests(RestTestCase):
    def test_api_root_is_an_index(self) -> Deferred[None]:
        """
        ``server.urls["rest"]`` (``.../api``) answers, with or without the
        slash, with links that themselves answer.
        """

        async def go() -> None:
            for url in (self.server.urls["rest"], self.server.urls["rest"] + "/"):
                response = await treq.get(url, pool=self.pool)
                self.assertEqual(response.code, 200, url)
                body = json.loads(await response.text())
                self.assertEqual(body["name"], "trainstream")
                self.assertEqual(body["urls"], self.server.urls)
            for name, link in body["links"].items():
                if "{" in link or " " in link:
                    continue  # a template or a method, not a URL to follow
                code = (await treq.get(self.url(link), pool=self.pool)).code
                self.assertEqual(code, 200, f"{name}: {link}")

        return Deferred.fromCoroutine(go())

    def test_list_runs(self) -> Deferred[None]:
        async def go() -> None:
            self.assertEqual(await self.get("/api/runs"), (200, {"runs": []}))
            await self.publish(
                [
                    {"type": "status", "run": "a", "state": "created", "time": 100.0},
                    {**metric("a", 3), "time": 101.0},
                    {**metric("a", 4, name="val/acc"), "time": 102.5},
                    {"type": "status", "run": "b", "state": "finished", "time": 50.0},
                ]
            )
            code, body = await self.get("/api/runs")
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

        return d(go())

    def test_get_run(self) -> Deferred[None]:
        async def go() -> None:
            await self.publish(
                [
                    {"type": "hparams", "run": "r", "params": {"lr": 0.001, "bs": 32}},
                    metric("r", 1, 2.0),
                    metric("r", 2, "NaN"),
                    metric("r", 3, 1.0),
                    {"type": "status", "run": "r", "state": "paused", "epoch": 1},
                ]
            )
            code, body = await self.get("/api/runs/r")
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

        return d(go())

    def test_unknown_run(self) -> Deferred[None]:
        async def go() -> None:
            self.assertError(await self.get("/api/runs/nope"), 404, "no run named 'nope'")
            self.assertError(await self.get("/api/runs/no/such/run"), 404, "'no/such/run'", "%2F")
            self.assertError(await self.get("/api/runs/nope/metrics/train/loss"), 404, "'nope'")

        return d(go())

    def test_slash_in_run_name(self) -> Deferred[None]:
        """A '/' in a run name works sent as is or as %2F; so does one in a metric name."""

        async def go() -> None:
            await self.publish([metric("team/resnet-3", 1, 0.25)])
            for path in ("/api/runs/team/resnet-3", "/api/runs/team%2Fresnet-3"):
                code, body = await self.get(path)
                self.assertEqual((code, body["run"]), (200, "team/resnet-3"), path)
            for path in (
                "/api/runs/team/resnet-3/metrics/train/loss",
                "/api/runs/team%2Fresnet-3/metrics/train/loss",
                "/api/runs/team%2Fresnet-3/metrics/train%2Floss",
            ):
                code, body = await self.get(path)
                self.assertEqual(code, 200, path)
                self.assertEqual(
                    (body["run"], body["name"], body["points"][0][:2]),
                    ("team/resnet-3", "train/loss", [1, 0.25]),
                )

        return d(go())

    def test_metrics_segment_in_run_name(self) -> Deferred[None]:
        """A run named a/metrics/b must be sent as a%2Fmetrics%2Fb: the path splits at 'metrics'."""

        async def go() -> None:
            await self.publish([metric("a/metrics/b", 1)])
            self.assertError(await self.get("/api/runs/a/metrics/b"), 404, "no run named 'a'")
            code, body = await self.get("/api/runs/a%2Fmetrics%2Fb")
            self.assertEqual((code, body["run"]), (200, "a/metrics/b"))
            code, body = await self.get("/api/runs/a%2Fmetrics%2Fb/metrics/train/loss")
            self.assertEqual((code, len(body["points"])), (200, 1))

        return d(go())

    def test_wrong_method(self) -> Deferred[None]:
        async def go() -> None:
            self.assertError(await self.request("POST", "/api/runs"), 405, "POST")
            self.assertError(await self.request("PUT", "/api/runs/r"), 405, "PUT")

        return d(go())

    def test_internal_error_has_no_traceback(self) -> Deferred[None]:
        async def go() -> None:
            def broken() -> list[Any]:
                raise RuntimeError("secret detail")

            self.patch(self.server.runs, "all", broken)
            code, body = await self.get("/api/runs")
            self.assertEqual(code, 500)
            self.assertNotIn("secret", body["error"])
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

        return d(go())


class MetricHistoryTests(RestTestCase):
    def test_points(self) -> Deferred[None]:
        async def go() -> None:
            await self.publish(
                [{**metric("r", s, s / 4), "time": 1000.0 + s} for s in range(5)]
                + [metric("r", 9, 5.0, name="other"), metric("q", 2, 7.0)]
            )
            code, body = await self.get("/api/runs/r/metrics/train/loss")
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
            code, body = await self.get("/api/runs/r/metrics/train/loss?from_step=1&to_step=3")
            self.assertEqual([p[0] for p in body["points"]], [1, 2, 3])
            code, body = await self.get("/api/runs/r/metrics/train/loss?from_step=3")
            self.assertEqual([p[0] for p in body["points"]], [3, 4])
            code, body = await self.get("/api/runs/r/metrics/train/loss?to_step=0")
            self.assertEqual([p[0] for p in body["points"]], [0])

        return d(go())

    def test_non_finite_values_round_trip_as_strings(self) -> Deferred[None]:
        async def go() -> None:
            await self.publish(
                [metric("r", 1, "NaN"), metric("r", 2, "Infinity"), metric("r", 3, "-Infinity")]
            )
            response = await treq.get(self.url("/api/runs/r/metrics/train/loss"), pool=self.pool)
            text = await response.text()
            # Strict JSON: a bare NaN/Infinity literal would fail here.
            body = json.loads(text, parse_constant=lambda c: self.fail(f"bare {c}"))
            self.assertEqual([p[1] for p in body["points"]], ["NaN", "Infinity", "-Infinity"])
            code, run = await self.get("/api/runs/r")
            self.assertEqual(code, 200)
            self.assertEqual(run["metrics"]["train/loss"]["last_value"], "-Infinity")
            self.assertIsNone(run["metrics"]["train/loss"]["min"])

        return d(go())

    def test_downsampled_keeps_the_spike(self) -> Deferred[None]:
        async def go() -> None:
            events = [metric("r", s, 1.0) for s in range(1000)]
            events[637]["value"] = 1e9
            events[100]["value"] = "NaN"
            await self.publish(events)
            code, body = await self.get("/api/runs/r/metrics/train/loss?max_points=50")
            self.assertEqual(code, 200)
            self.assertTrue(body["downsampled"])
            self.assertLessEqual(len(body["points"]), 50)
            steps = [p[0] for p in body["points"]]
            self.assertEqual(steps, sorted(steps))
            self.assertIn([637, 1e9], [p[:2] for p in body["points"]])
            self.assertIn([100, "NaN"], [p[:2] for p in body["points"]])
            code, body = await self.get("/api/runs/r/metrics/train/loss?max_points=1000")
            self.assertEqual((len(body["points"]), body["downsampled"]), (1000, False))

        return d(go())

    def test_bad_parameters(self) -> Deferred[None]:
        async def go() -> None:
            await self.publish([metric("r", 1)])
            base = "/api/runs/r/metrics/train/loss?"
            for query, parameter in [
                ("from_step=abc", "from_step"),
                ("from_step=-1", "from_step"),
                ("to_step=1.5", "to_step"),
                ("max_points=1", "max_points"),
                ("max_points=", "max_points"),
                ("max_points=99999999999", "max_points"),
                ("from_step=5&to_step=2", "to_step"),
                ("from_step=1&from_step=2", "from_step"),
            ]:
                answer = await self.get(base + query)
                self.assertError(answer, 400, parameter)
                self.assertEqual(answer[1]["parameter"], parameter, query)

        return d(go())

    def test_unknown_metric(self) -> Deferred[None]:
        async def go() -> None:
            await self.publish([metric("r", 1)])
            self.assertError(
                await self.get("/api/runs/r/metrics/val/acc"), 404, "'r' has no metric 'val/acc'"
            )

        return d(go())


class DeleteTests(RestTestCase):
    def test_delete_run(self) -> Deferred[None]:
        async def go() -> None:
            await self.publish([metric("gone", 1), metric("kept", 1), metric("gone", 2, "NaN")])
            code, body = await self.request("DELETE", "/api/runs/gone")
            self.assertEqual((code, body), (200, {"run": "gone", "deleted": 3}))  # with its alert
            self.assertError(await self.get("/api/runs/gone"), 404, "gone")
            self.assertError(await self.get("/api/runs/gone/metrics/train/loss"), 404)
            code, body = await self.get("/api/events")
            self.assertEqual([e["run"] for e in body["events"]], ["kept"])
            code, body = await self.get("/api/runs")
            self.assertEqual([r["run"] for r in body["runs"]], ["kept"])
            self.assertError(await self.request("DELETE", "/api/runs/gone"), 404, "gone")

        return d(go())

    def test_delete_slashed_run(self) -> Deferred[None]:
        async def go() -> None:
            await self.publish([metric("team/a", 1), metric("team/b", 1)])
            code, body = await self.request("DELETE", "/api/runs/team%2Fa")
            self.assertEqual((code, body["deleted"]), (200, 1))
            code, body = await self.request("DELETE", "/api/runs/team/b")
            self.assertEqual((code, body["deleted"]), (200, 1))
            self.assertEqual((await self.get("/api/runs"))[1], {"runs": []})

        return d(go())

    def test_delete_on_a_metric_is_refused(self) -> Deferred[None]:
        async def go() -> None:
            await self.publish([metric("r", 1)])
            self.assertError(
                await self.request("DELETE", "/api/runs/r/metrics/train/loss"), 405, "whole run"
            )
            self.assertEqual((await self.get("/api/runs/r"))[0], 200)

        return d(go())


def _component(doc: dict[str, Any], name: str) -> Draft202012Validator:
    """A validator for ``#/components/schemas/name`` of ``doc``."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return Draft202012Validator(schema)


class OpenApiTests(RestTestCase):
    def test_document_is_valid_openapi(self) -> Deferred[None]:
        async def go() -> None:
            code, doc = await self.get("/api/openapi.json")
            self.assertEqual(code, 200)
            self.assertEqual(doc["openapi"], "3.1.0")
            validate_openapi(doc)  # raises on an invalid document
            self.assertEqual(doc, json.loads(json.dumps(openapi_document())))
            # Served twice, the same document.
            self.assertEqual((await self.get("/api/openapi.json"))[1], doc)

        return d(go())

    def test_every_call_is_documented(self) -> Deferred[None]:
        async def go() -> None:
            doc = openapi_document()
            documented = {(p, m.upper()) for p, item in doc["paths"].items() for m in item}
            documented -= {(p, "PARAMETERS") for p in doc["paths"]}
            expected = {
                ("/api", "GET"),
                ("/api/health", "GET"),
                ("/api/events", "GET"),
                ("/api/events", "POST"),
                ("/api/runs", "GET"),
                ("/api/runs/{run}", "GET"),
                ("/api/runs/{run}", "DELETE"),
                ("/api/runs/{run}/metrics/{name}", "GET"),
                ("/api/openapi.json", "GET"),
                ("/events", "GET"),
                ("/ws", "GET"),
                ("/metrics", "GET"),
            }
            self.assertEqual(documented, expected)
            # Every Klein route is one of them.
            for rule in RestApi.app.url_map.iter_rules():
                path = ("/api" + rule.rule.replace("<path:tail>", "{run}")).rstrip("/")
                for method in rule.methods - {"HEAD", "OPTIONS"}:
                    self.assertIn((path, method), documented)

        return d(go())

    def test_answers_match_the_document(self) -> Deferred[None]:
        """Real answers validate against the schemas the document gives them."""

        async def go() -> None:
            doc = openapi_document()
            batch = [
                {"type": "hparams", "run": "team/r", "params": {"lr": 0.1, "note": None}},
                metric("team/r", 1, "NaN"),
                metric("team/r", 2, 3),
                {"type": "log", "run": "team/r", "level": "info", "message": "hi"},
                {"type": "status", "run": "team/r", "state": "running", "epoch": 2},
            ]
            for event in batch:
                _component(doc, "NewEvent").validate(event)
            _component(doc, "Accepted").validate(await self.publish(batch))
            checks = [
                ("/api/runs", "RunList"),
                ("/api/runs/team%2Fr", "RunDetail"),
                ("/api/runs/team/r/metrics/train/loss?max_points=2", "MetricSeries"),
                ("/api/events", "EventPage"),
                ("/api/health", "Health"),
                ("/api/runs/nope", "Error"),
                ("/api/runs/team/r/metrics/train/loss?max_points=x", "Error"),
            ]
            for path, schema in checks:
                _, body = await self.get(path)
                _component(doc, schema).validate(body)
            _, page = await self.get("/api/events")
            self.assertIn("alert", [e["type"] for e in page["events"]])
            self.assertFalse(_component(doc, "NewEvent").is_valid({**metric("r", 1), "extra": 1}))
            self.assertFalse(_component(doc, "NewEvent").is_valid({**metric("r", 1), "id": 3}))
            code, body = await self.request("DELETE", "/api/runs/team/r")
            self.assertEqual(code, 200)
            _component(doc, "Deleted").validate(body)

        return d(go())


class PrometheusTests(RestTestCase):
    async def scrape(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        response = await treq.get(self.url("/metrics"), pool=self.pool)
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(await response.text()):
            for s in family.samples:
                samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return samples

    def test_counters(self) -> Deferred[None]:
        async def go() -> None:
            before = await self.scrape()
            self.assertEqual(before["trainstream_events_accepted_total"][()], 0)
            self.assertEqual(before["trainstream_runs"][()], 0)
            sse = await connect_sse(self.server.urls["sse"])
            self.addCleanup(sse.transport.loseConnection)
            reply = await self.publish([metric("a", 1), metric("b", 1, "NaN")])
            samples = await self.scrape()
            self.assertEqual(samples["trainstream_events_accepted_total"][()], 3)  # + the alert
            self.assertEqual(samples["trainstream_nan_alerts_total"][()], 1)
            self.assertEqual(samples["trainstream_last_event_id"][()], reply["last_id"] + 1)
            self.assertEqual(samples["trainstream_runs"][()], 2)
            self.assertEqual(samples["trainstream_runs_by_state"][(("state", "running"),)], 2)
            self.assertEqual(samples["trainstream_clients"][(("kind", "sse"),)], 1)
            self.assertEqual(samples["trainstream_clients"][(("kind", "ws"),)], 0)
            self.assertGreater(samples["trainstream_uptime_seconds"][()], 0)
            # Each server has its own registry: nothing of ours in the global one.
            self.assertIsNone(REGISTRY.get_sample_value("trainstream_runs"))

        return d(go())


class AccessLogTests(RestTestCase):
    def test_routine_publishing_is_not_logged(self) -> Deferred[None]:
        """
        A successful publish leaves no access-log line; every other request
        (a refused publish, a read) does; ``access_log`` logs them all.
        """
        import io

        log = io.BytesIO()
        self.server.site.logFile = log
        event = {"type": "metric", "run": "r", "name": "loss", "step": 1, "value": 0.5}

        async def go() -> None:
            self.assertEqual((await self.request("POST", "/api/events", [event]))[0], 200)
            self.assertEqual(log.getvalue(), b"")
            self.assertEqual((await self.request("POST", "/api/events", [{"x": 1}]))[0], 400)
            self.assertEqual((await self.get("/api/health"))[0], 200)
            lines = log.getvalue().decode().splitlines()
            self.assertEqual(len(lines), 2, lines)
            self.assertIn('"POST /api/events HTTP/1.1" 400', lines[0])
            self.assertIn('"GET /api/health HTTP/1.1" 200', lines[1])
            self.server.site.full_access_log = True
            self.assertEqual((await self.request("POST", "/api/events", [event]))[0], 200)
            self.assertIn('"POST /api/events HTTP/1.1" 200', log.getvalue().decode())

        return Deferred.fromCoroutine(go())

    def test_option_turns_full_logging_on(self) -> None:
        from trainstream.tap import Options

        options = Options()
        options.parseOptions(["--access-log", "--memory"])
        self.assertTrue(options.config.access_log)
        self.assertTrue(StreamServer(options.config, reactor).site.full_access_log)
        self.assertFalse(self.server.site.full_access_log)
