"""
The OpenAPI document (``GET /api/openapi.json``) against the server, with
no sockets: the real ``Site`` of a small backend, asked through StubTreq.

It must be a valid OpenAPI 3.1 document, name every route Klein has, and
declare, for each operation, every status the server answers it with.
The live check (schemathesis against a running twistd) is ``.ci/schemathesis``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from tests.webtools import REST_PORT, Connection, FakeBackend, make_site, metric
from trainstream.web.openapi import openapi_document
from trainstream.web.rest import RestApi

BASE = f"http://127.0.0.1:{REST_PORT}"
TOKEN = "t0ken"


def _component(doc: dict[str, Any], name: str) -> Draft202012Validator:
    """A validator for ``#/components/schemas/name`` of ``doc``."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return Draft202012Validator(schema)


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _template(path: str) -> re.Pattern[str]:
    """A document path as a regular expression over request paths (a ``{run}`` may hold '/')."""
    pattern = re.escape(path).replace(r"\{run\}", "(?P<run>.+?)").replace(r"\{name\}", ".+")
    return re.compile(pattern + "$")


def _operation(doc: dict[str, Any], method: str, path: str) -> tuple[str, dict[str, Any]]:
    """The document path and operation that a request ``method path`` is."""
    path = path.partition("?")[0]
    # The server tries the longer paths first, as split_run_path/split_ranks_path do.
    for template in sorted(doc["paths"], key=lambda p: (p.count("/"), len(p)), reverse=True):
        if _template(template).match(path):
            item = doc["paths"][template]
            return template, item.get(method.lower(), {})
    raise AssertionError(f"{method} {path} is in no path of the document")


class DocumentedAnswersMixin:
    """Asks the site and checks each answer against the document."""

    token: str | None = None

    def setUp(self) -> None:
        self.doc = openapi_document()
        self.backend = FakeBackend()
        config = {"token": self.token} if self.token is not None else {}
        self.site = make_site(self.backend, **config)

    def ask(
        self, method: str, path: str, body: Any = None, auth: bool = True, **headers: str
    ) -> tuple[int, Any]:
        """
        Send the request, check that the document declares the answer's
        status for its operation, that a JSON answer validates against the
        declared schema, and that every header declared required is there.
        """
        case: Any = self
        sent = {k.replace("_", "-").title(): v for k, v in headers.items()}
        data = b""
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        if auth and self.token is not None:
            sent["Authorization"] = f"Bearer {self.token}"
        response = Connection(self.site).request(method, path, sent, data)
        case.assertTrue(response.complete, f"{method} {path}")
        content = response.body
        template, operation = _operation(self.doc, method, path)
        code = response.code
        if not operation:
            # A method the path does not have: 405 with Allow (common to every path).
            case.assertEqual(code, 405, f"{method} {path}")
            declared: dict[str, Any] = {"405": {"$ref": "#/components/responses/MethodNotAllowed"}}
        else:
            declared = operation["responses"]
        case.assertIn(str(code), declared, f"{method} {path} ({template}) answered {code}")
        answer = _resolve(self.doc, declared[str(code)])
        for name, header in answer.get("headers", {}).items():
            if _resolve(self.doc, header).get("required"):
                case.assertIsNotNone(
                    response.header(name), f"{method} {path}: {code} without {name}"
                )
        media = answer.get("content", {})
        ctype = response.header("content-type")
        if "application/json" in media:
            case.assertEqual(ctype, "application/json", f"{method} {path}")
            parsed = json.loads(content)
            schema = {**media["application/json"]["schema"], "components": self.doc["components"]}
            Draft202012Validator(schema).validate(parsed)
            return code, parsed
        return code, content


class DocumentTests(SynchronousTestCase):
    def test_document_is_valid_openapi(self) -> None:
        doc = openapi_document()
        self.assertEqual(doc["openapi"], "3.1.0")
        validate_openapi(doc)  # raises on an invalid document
        # Plain JSON, served as built, a new copy each call.
        self.assertEqual(doc, json.loads(json.dumps(doc)))
        doc["paths"]["/api/runs/{run}"]["parameters"][0]["name"] = "@mutated@"
        doc["paths"]["/api/events"]["get"]["parameters"][2]["name"] = "@mutated@"
        doc["paths"]["/api/runs"]["get"]["responses"]["405"]["$ref"] = "@mutated@"
        self.assertNotIn("@mutated@", json.dumps(openapi_document()))

    def test_served(self) -> None:
        stub = StubTreq(make_site(FakeBackend()).resource)
        d = stub.get(BASE + "/api/openapi.json")
        stub.flush()
        response = self.successResultOf(d)
        d = response.json()
        stub.flush()
        self.assertEqual(self.successResultOf(d), json.loads(json.dumps(openapi_document())))

    def test_every_call_is_documented(self) -> None:
        doc = openapi_document()
        documented = {(p, m.upper()) for p, item in doc["paths"].items() for m in item}
        documented -= {(p, "PARAMETERS") for p in doc["paths"]}
        self.assertEqual(
            documented,
            {
                ("/api", "GET"),
                ("/api/health", "GET"),
                ("/api/events", "GET"),
                ("/api/events", "POST"),
                ("/api/runs", "GET"),
                ("/api/runs/{run}", "GET"),
                ("/api/runs/{run}", "DELETE"),
                ("/api/runs/{run}/metrics/{name}", "GET"),
                ("/api/runs/{run}/ranks", "GET"),
                ("/api/runs/{run}/logs", "GET"),
                ("/api/config/reload", "POST"),
                ("/api/openapi.json", "GET"),
                ("/events", "GET"),
                ("/ws", "GET"),
                ("/metrics", "GET"),
            },
        )
        # Every Klein route and method is one of them.
        for rule in RestApi.app.url_map.iter_rules():
            path = ("/api" + rule.rule.replace("<path:tail>", "{run}")).rstrip("/")
            methods = set(rule.methods or ()) - {"HEAD", "OPTIONS"}
            self.assertTrue(methods, rule.rule)
            for method in methods:
                self.assertIn((path, method), documented)
        # ... and every path the server splits a run path into (split_run_path, split_ranks_path).
        self.assertIn("/api/runs/{run}/metrics/{name}", doc["paths"])
        self.assertIn("/api/runs/{run}/ranks", doc["paths"])

    def test_auth_is_required_but_for_health(self) -> None:
        doc = openapi_document()
        schemes = doc["components"]["securitySchemes"]
        self.assertEqual(
            schemes["bearer"], {**schemes["bearer"], "type": "http", "scheme": "bearer"}
        )
        self.assertEqual(
            schemes["query_token"],
            {**schemes["query_token"], "type": "apiKey", "in": "query", "name": "token"},
        )
        # Either scheme; never the empty requirement that made auth optional.
        self.assertEqual(doc["security"], [{"bearer": []}, {"query_token": []}])
        for path, item in doc["paths"].items():
            for method, operation in item.items():
                if method == "parameters":
                    continue
                responses = operation["responses"]
                if path == "/api/health":
                    self.assertEqual(operation["security"], [])
                    self.assertNotIn("401", responses)
                else:
                    self.assertNotIn("security", operation, path)
                    self.assertIn("401", responses, f"{method} {path}")
                for code in ("403", "405", "500"):
                    self.assertIn(code, responses, f"{method} {path}")
                for code, answer in responses.items():
                    if code.startswith(("4", "5")) and path not in ("/ws",):
                        media = _resolve(doc, answer).get("content", {})
                        self.assertIn("application/json", media, f"{method} {path} {code}")

    def test_every_parameter_the_server_reads(self) -> None:
        doc = openapi_document()

        def names(path: str, method: str = "get") -> set[str]:
            item = doc["paths"][path]
            params = [*item.get("parameters", []), *item[method].get("parameters", [])]
            return {p["name"] for p in params if p["in"] != "header"}

        self.assertEqual(names("/api/events"), {"after", "limit", "run", "name", "type"})
        self.assertEqual(
            names("/api/runs/{run}/metrics/{name}"),
            {"run", "name", "from_step", "to_step", "max_points", "segments"},
        )
        self.assertEqual(names("/events"), {"run", "name", "type", "last_event_id"})
        self.assertEqual(names("/api/runs/{run}/ranks"), {"run"})


class EventSchemaTests(SynchronousTestCase):
    """``NewEvent`` says what the validator takes, at the edges it can state."""

    def test_new_event_agrees_with_the_validator(self) -> None:
        doc = openapi_document()
        schema = _component(doc, "NewEvent")
        big = 2**63
        cases: list[tuple[dict[str, Any], bool]] = [
            (metric("r", 1), True),
            ({**metric("r", 1), "rank": None, "time": None}, True),  # null is absent
            ({**metric("r", big - 1), "value": -big}, True),
            ({**metric("r", 1), "value": 1.5}, True),
            # (A float such as 1e300 is an integer to JSON Schema, past 64 bits:
            # the schema refuses it, the validator takes it as a float value.)
            ({**metric("r", 1), "value": "NaN"}, True),
            ({**metric("r", big)}, False),  # step past 64 bits
            ({**metric("r", 1), "value": big}, False),
            ({**metric("r", 1), "time": big}, False),
            ({**metric("r", -1)}, False),
            ({**metric("r", 1), "extra": 1}, False),
            ({**metric("r", 1), "id": 3}, False),
            (metric("/r", 1), False),
            ({"type": "hparams", "run": "r", "params": {"lr": 0.1, "n": None}}, True),
            ({"type": "hparams", "run": "r", "params": {"": 1}}, False),
            ({"type": "hparams", "run": "r", "params": {"n": big}}, False),
            ({"type": "status", "run": "r", "state": "running", "epoch": -big}, True),
            ({"type": "status", "run": "r", "state": "running", "message": None}, True),
            ({"type": "alert", "run": "r", "kind": "", "message": ""}, False),
            ({"type": "log", "run": "r", "level": "info", "message": None}, False),
        ]
        backend = FakeBackend()
        for event, valid in cases:
            self.assertEqual(schema.is_valid(event), valid, event)
            try:
                backend.hub.accept([event])
            except ValueError:
                accepted = False
            else:
                accepted = True
            self.assertEqual(accepted, valid, event)


class AnswersTests(DocumentedAnswersMixin, SynchronousTestCase):
    """Representative requests: each answer's status is one the document declares."""

    def publish(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        code, body = self.ask("POST", "/api/events", events)
        self.assertEqual(code, 200, body)
        return body  # type: ignore[no-any-return]

    def test_reads(self) -> None:
        self.publish(
            [
                {"type": "hparams", "run": "team/r", "params": {"lr": 0.1, "note": None}},
                metric("team/r", 1, "NaN"),
                {**metric("team/r", 2, 3), "rank": 0},
                {"type": "log", "run": "team/r", "level": "info", "message": "hi", "time": None},
                {"type": "status", "run": "team/r", "state": "running", "epoch": -2},
            ]
        )
        for path in [
            "/api",
            "/api/health",
            "/api/openapi.json",
            "/api/runs",
            "/api/runs/team%2Fr",
            "/api/runs/team/r/metrics/train/loss?max_points=2&segments=all",
            "/api/runs/team/r/ranks",
            "/api/events?after=0&limit=10&type=metric,log&type=&run=team/*",
            "/metrics",
        ]:
            code, _ = self.ask("GET", path)
            self.assertEqual(code, 200, path)

    def test_not_found(self) -> None:
        self.publish([metric("r", 1)])
        for path in [
            "/api/runs/nope",
            "/api/runs/nope/ranks",
            "/api/runs/nope/metrics/train/loss",
            "/api/runs/r/metrics/val/acc",
        ]:
            self.assertEqual(self.ask("GET", path)[0], 404, path)
        self.assertEqual(self.ask("DELETE", "/api/runs/nope")[0], 404)

    def test_bad_queries(self) -> None:
        self.publish([metric("r", 1)])
        for path in [
            "/api/events?after=x",
            "/api/events?after=1.5",
            "/api/events?after=+1",
            "/api/events?after=%201",
            "/api/events?after=%D9%A3",  # an Arabic-Indic 3: no ASCII digit
            "/api/events?limit=0",
            "/api/events?after=1&after=2",
            f"/api/events?after={2**63}",
            "/api/events?type=metric,nope",
            "/api/runs/r/metrics/train/loss?max_points=1",
            "/api/runs/r/metrics/train/loss?segments=some",
            "/api/runs/r/metrics/train/loss?segments=all&segments=current",
        ]:
            code, body = self.ask("GET", path)
            self.assertEqual(code, 400, path)
            self.assertIn("parameter", body, path)

    def test_empty_parameters_are_refused(self) -> None:
        """``?after=`` is no integer: 400 naming it, as the document says (not taken as absent)."""
        self.publish([metric("r", 1)])
        for path, name in [
            ("/api/events?after=", "after"),
            ("/api/events?limit=", "limit"),
            ("/api/runs/r/metrics/train/loss?from_step=", "from_step"),
            ("/api/runs/r/metrics/train/loss?to_step=", "to_step"),
            ("/api/runs/r/metrics/train/loss?max_points=", "max_points"),
            ("/api/runs/r/metrics/train/loss?segments=", "segments"),
        ]:
            code, body = self.ask("GET", path)
            self.assertEqual((code, body.get("parameter")), (400, name), path)
        documented = openapi_document()["paths"]["/api/events"]["get"]["parameters"]
        self.assertFalse(any(p.get("allowEmptyValue") for p in documented))
        # A filter's empty value is no filter, as the document says of them.
        code, page = self.ask("GET", "/api/events?run=&type=&name=")
        self.assertEqual((code, len(page["events"])), (200, 1))

    def test_from_step_above_to_step_is_an_empty_range(self) -> None:
        self.publish([metric("r", step) for step in range(10)])
        code, body = self.ask("GET", "/api/runs/r/metrics/train/loss?from_step=5&to_step=2")
        self.assertEqual((code, body["points"], body["downsampled"]), (200, [], False))
        code, body = self.ask("GET", "/api/runs/r/metrics/train/loss?from_step=5&to_step=5")
        self.assertEqual([p[0] for p in body["points"]], [5])
        description = openapi_document()["paths"]["/api/runs/{run}/metrics/{name}"]["get"]
        self.assertIn("from_step above to_step is an empty range", description["description"])

    def test_writes(self) -> None:
        self.assertEqual(
            self.ask("POST", "/api/events", b"[", content_type="application/json")[0], 400
        )
        self.assertEqual(self.ask("POST", "/api/events", [{"type": "metric"}])[0], 400)
        self.assertEqual(self.ask("POST", "/api/events", [], content_type="text/plain")[0], 415)
        self.publish([metric("r", 1)])
        code, body = self.ask("DELETE", "/api/runs/r")
        self.assertEqual((code, body["deleted"]), (200, 1))

    def test_methods_not_allowed(self) -> None:
        self.publish([metric("r", 1)])
        for method, path in [
            ("DELETE", "/api/runs/r/metrics/train/loss"),
            ("DELETE", "/api/runs/r/ranks"),
            ("PUT", "/api/events"),
            ("DELETE", "/api/runs"),
            ("POST", "/api/health"),
        ]:
            self.assertEqual(self.ask(method, path)[0], 405, f"{method} {path}")


class TokenAnswersTests(DocumentedAnswersMixin, SynchronousTestCase):
    """With a token set: 401 everywhere the document says, never on health."""

    token = TOKEN

    def test_token_needed_but_for_health(self) -> None:
        for path in ["/api", "/api/events", "/api/runs", "/api/openapi.json", "/metrics"]:
            self.assertEqual(self.ask("GET", path, auth=False)[0], 401, path)
            self.assertEqual(self.ask("GET", path)[0], 200, path)
        self.assertEqual(self.ask("GET", f"/api/runs?token={TOKEN}", auth=False)[0], 200)
        self.assertEqual(self.ask("POST", "/api/events", [], auth=False)[0], 401)
        self.assertEqual(self.ask("GET", "/api/health", auth=False)[0], 200)
