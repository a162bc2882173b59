"""
Security from the outside (issue 4/8): tokens never reach a log, no page of
another site can write, bad requests get a JSON 4xx, duplicate keys are
refused everywhere, and read tokens read but never write.

Most run on the real site over a ``StringTransport``; one runs ``twistd``
and reads everything it printed.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request

from tests.test_processes import proto_pid, spawn_twistd
from tests.webtools import (
    REST_PORT,
    UPGRADE,
    WS_PORT,
    Connection,
    FakeBackend,
    MemoryWS,
    SSEClient,
    log_event,
    make_site,
    metric,
    ws_factory,
)
from trainstream.config import Config
from trainstream.errors import ConfigError
from trainstream.web.access import redact

TOKEN = "write-s3cret-4242"
READER = "read-s3cret-7777"
WRONG = "wrong-s3cret-1313"
JSON = {"Content-Type": "application/json"}
OWN_ORIGIN = f"http://127.0.0.1:{REST_PORT}"


def body(*events: dict[str, Any]) -> bytes:
    return json.dumps(list(events)).encode()


class SiteTestCase(SynchronousTestCase):
    config: dict[str, Any] = {}

    def setUp(self) -> None:
        self.backend = FakeBackend()
        self.site = make_site(self.backend, **self.config)

    def ask(
        self, method: str, path: str, headers: dict[str, str] | None = None, data: bytes = b""
    ) -> Any:
        return Connection(self.site).request(method, path, headers or {}, data)

    def post(self, headers: dict[str, str], path: str = "/api/events") -> Any:
        return self.ask("POST", path, headers, body(metric("r", 1, 0.5)))

    def assert_json_error(self, answer: Any, code: int, fragment: str = "") -> str:
        self.assertEqual(answer.code, code, answer.body[:300])
        self.assertEqual(answer.header("content-type"), "application/json")
        error: str = answer.json()["error"]
        self.assertIn(fragment, error)
        self.assertNotIn("Traceback", error)
        return error


class RedactTests(SynchronousTestCase):
    def test_every_token_parameter_is_redacted(self) -> None:
        for uri, expected in (
            (b"/events?token=abc", b"/events?token=REDACTED"),
            (b"/events?run=a&token=abc&x=1", b"/events?run=a&token=REDACTED&x=1"),
            (b"/?token=a&token=b", b"/?token=REDACTED&token=REDACTED"),
            (b"/?x=1;token=abc", b"/?x=1;token=REDACTED"),
            (b"/?tok%65n=abc", b"/?tok%65n=REDACTED"),  # Twisted decodes names too
            (b"/?token=", b"/?token=REDACTED"),
            (b"/?tokens=abc", b"/?tokens=abc"),
            (b"/plain", b"/plain"),
            # Shapes no token is read from, hidden anyway (a Referer may be anything):
            (b"http://h/#token=abc", b"http://h/#token=REDACTED"),
            (b"http://h/x?y=1?token=abc", b"http://h/x?y=1?token=REDACTED"),
            (b"http://h/;token=abc", b"http://h/;token=REDACTED"),
            (b"token=abc", b"token=REDACTED"),
            (b"/?TOKEN=abc", b"/?TOKEN=REDACTED"),
        ):
            self.assertEqual(redact(uri), expected, uri)


class AccessLogTests(SiteTestCase):
    config = {"token": TOKEN, "read_token": [READER], "access_log": True}

    def test_no_token_in_any_access_log_line(self) -> None:
        """
        Every request kind that carries a token in its URL (the page, its
        files, EventSource, browser WebSocket, REST, a refused one) and a
        Referer holding one: the log shows ``token=REDACTED`` only.
        """
        log = io.StringIO()
        self.site._logFile = log  # type: ignore[attr-defined]
        self.site._logDateTime = "[01/Dec/2026:00:00:00 +0000]"  # type: ignore[attr-defined]
        referer = {"Referer": f"http://127.0.0.1:{REST_PORT}/?token={TOKEN}"}
        self.assertEqual(self.ask("GET", f"/?token={TOKEN}").code, 200)
        self.assertEqual(self.ask("GET", f"/static/app.js?token={READER}", referer).code, 200)
        self.assertEqual(self.ask("GET", f"/api/runs?run=x&token={READER}").code, 200)
        self.assertEqual(self.post(JSON, f"/api/events?token={TOKEN}").code, 200)
        self.assertEqual(self.ask("GET", f"/api/runs?token={WRONG}").code, 401)
        self.assertEqual(self.post(JSON, f"/api/events?token={READER}").code, 403)
        sse = SSEClient(self.site, f"/events?token={READER}")
        self.assertEqual(sse.response.code, 200)
        self.patch_txaio()
        ws = Connection(self.site, "ws", WS_PORT)
        self.assertEqual(ws.request("GET", f"/ws?token={TOKEN}", UPGRADE).code, 101)
        sse.connection.close()
        text = log.getvalue()
        self.assertGreaterEqual(text.count("token=REDACTED"), 7, text)
        for secret in (TOKEN, READER, WRONG):
            self.assertNotIn(secret, text)

    def patch_txaio(self) -> None:
        import txaio

        self.patch(txaio.config, "loop", self.backend.clock)

    def test_request_repr_has_no_token(self) -> None:
        """A request shown in a log message (its repr) hides the token too."""
        seen: list[str] = []

        class Show(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> bytes:
                seen.append(repr(request))
                return b"{}"

        self.site.resource.putChild(b"show", Show())
        self.ask("GET", f"/show?token={TOKEN}")
        self.assertEqual(len(seen), 1)
        self.assertNotIn(TOKEN, seen[0])
        self.assertIn("REDACTED", seen[0])


class CrossSiteWriteTests(SiteTestCase):
    """With no token (the loopback default), a page of another site changes nothing."""

    def test_simple_requests_are_refused_415(self) -> None:
        """A "simple" request needs no preflight: text/plain, a form, no type at all."""
        for ctype in (
            None,
            "text/plain",
            "text/plain; charset=utf-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "multipart/form-data",
        ):
            headers = {} if ctype is None else {"Content-Type": ctype}
            self.assert_json_error(self.post(headers), 415, "application/json")
        self.assertEqual(self.backend.hub.last_id, 0)

    def test_foreign_origin_refused_403(self) -> None:
        self.assertEqual(self.post(JSON).code, 200)
        last = self.backend.hub.last_id
        for origin in ("http://evil.example", "null", "http://127.0.0.1:1", "http://localhost"):
            answer = self.post({**JSON, "Origin": origin})
            self.assert_json_error(answer, 403, f"from Origin {origin!r}")
            deleted = self.ask("DELETE", "/api/runs/r", {"Origin": origin})
            self.assert_json_error(deleted, 403, "DELETE refused")
        # A browser that sends no Origin still says the page is of another site.
        for fetch_site in ("cross-site", "same-site", "Cross-Site"):
            answer = self.post({**JSON, "Sec-Fetch-Site": fetch_site})
            self.assert_json_error(answer, 403, "another site")
        self.assertEqual(self.backend.hub.last_id, last)
        self.assertIsNotNone(self.backend.runs.get("r"))

    def test_own_origin_and_allowed_origins_write(self) -> None:
        self.assertEqual(self.post({**JSON, "Origin": OWN_ORIGIN}).code, 200)
        self.assertEqual(self.post({**JSON, "Sec-Fetch-Site": "same-origin"}).code, 200)
        site = make_site(self.backend, allow_origin=["https://friend.example"])
        answer = Connection(site).request(
            "POST",
            "/api/events",
            {**JSON, "Origin": "https://friend.example"},
            body(metric("r", 2)),
        )
        self.assertEqual(answer.code, 200)
        self.assertEqual(self.backend.hub.last_id, 3)

    def test_reads_from_any_origin_are_answered(self) -> None:
        """Reading is not refused (the browser keeps the answer from the page: no CORS)."""
        answer = self.ask("GET", "/api/runs", {"Origin": "http://evil.example"})
        self.assertEqual(answer.code, 200)
        self.assertIsNone(answer.header("access-control-allow-origin"))


class BadRequestTests(SiteTestCase):
    def test_unparsable_host_is_400(self) -> None:
        for host in ("[", "[::1", "[zz]", "a:b:c]"):
            self.assert_json_error(self.ask("GET", "/api/runs", {"Host": host}), 400, "Host")

    def test_unknown_methods_are_405_with_allow(self) -> None:
        for method, path, allow in (
            ("TRACE", "/", "GET"),
            ("TRACE", "/api/health", "GET"),
            ("PUT", "/api/events", "POST"),
            ("TRACE", "/events", "GET"),
            ("TRACE", "/static/app.js", "GET"),
            ("TRACE", "/metrics", "GET"),
            ("PATCH", "/api/runs/r", "DELETE"),
            ("POST", "/", "GET"),
        ):
            answer = self.ask(method, path)
            self.assert_json_error(answer, 405, f"{method} is not allowed")
            self.assertIn(allow, answer.header("allow") or "", (method, path))

    def test_unknown_paths_are_json_404(self) -> None:
        for path in ("/nope", "/static/nope.js", "/api/nope", "/static/"):
            self.assert_json_error(self.ask("GET", path), 404)

    def test_ws_path_without_upgrade_is_426(self) -> None:
        answer = self.ask("GET", "/ws")
        self.assert_json_error(answer, 426, "WebSocket")
        self.assertEqual(answer.header("upgrade"), "websocket")

    def test_a_failing_resource_answers_json_500(self) -> None:
        class Boom(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> bytes:
                raise RuntimeError("internal detail 0xdeadbeef")

        self.site.resource.putChild(b"boom", Boom())
        answer = self.ask("GET", "/boom")
        error = self.assert_json_error(answer, 500, "internal server error")
        self.assertNotIn("deadbeef", answer.body.decode())
        self.assertNotIn("deadbeef", error)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_malformed_requests_get_a_json_400(self) -> None:
        """What Twisted cannot parse: a JSON 400 and ``Connection: close``, then no more."""
        for data in (
            b"GARBAGE\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nNoColonHere\r\n\r\n",
            b"POST /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
        ):
            connection = Connection(self.site)
            connection.send(data)
            answer = connection.response()
            self.assert_json_error(answer, 400, "malformed HTTP request")
            self.assertEqual(answer.header("connection"), "close")
            self.assertTrue(connection.transport.disconnecting)
            connection.send(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            self.assertEqual(connection.transport.value().count(b"HTTP/1.1"), 1, data)

    def test_odd_paths_are_4xx_not_500(self) -> None:
        """An empty segment (Werkzeug's redirect) and a path that is not UTF-8."""
        for method in ("GET", "DELETE"):
            for path in ("/api/runs//metrics/y", "/api/runs/%2F/metrics/y"):
                self.assert_json_error(self.ask(method, path), 404, "no such API path")
        for path in ("/api/runs/%FF", "/api/runs/%C0%AF", "/static/%E2%82"):
            self.assert_json_error(self.ask("GET", path), 400, "not UTF-8")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_too_long_a_line_is_431(self) -> None:
        for data in (
            b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"a" * 17_000 + b"\r\n\r\n",
        ):
            connection = Connection(self.site)
            connection.send(data)
            self.assert_json_error(connection.response(), 431, "over 16384 bytes")

    def test_upgrades_autobahn_would_refuse_bare_are_json(self) -> None:
        for headers, code, fragment in (
            ({"Upgrade": "websocket", "Connection": "Upgrade"}, 426, "version none"),
            ({**UPGRADE, "Sec-WebSocket-Version": "99"}, 426, "version '99'"),
            ({**UPGRADE, "Sec-WebSocket-Key": ""}, 400, "Sec-WebSocket-Key"),
        ):
            answer = Connection(self.site, "ws", WS_PORT).request("GET", "/ws", headers)
            self.assert_json_error(answer, code, fragment)
            if code == 426:
                self.assertEqual(answer.header("sec-websocket-version"), "13")
                self.assertEqual(answer.status_line, "HTTP/1.1 426 Upgrade Required")

    def test_multipart_without_boundary_is_answered(self) -> None:
        """Twisted's form parser used to answer a bare 400 and drop the connection."""
        connection = Connection(self.site)
        answer = connection.request(
            "POST", "/api/events", {"Content-Type": "multipart/form-data"}, b"abc"
        )
        self.assert_json_error(answer, 415, "multipart/form-data")
        self.assertFalse(connection.transport.disconnecting)


class DuplicateKeyTests(SiteTestCase):
    BODIES = (
        b'[{"type":"metric","run":"a","name":"x","step":1,"value" :2,"value":3}]',
        b'[{"type":"metric","run":"a","name":"x","step":1,"value":2,"run"\n:"b"}]',
        b'[{"type":"hparams","run":"a","params":{"lr":1,"lr"\t:2}}]',
    )

    def test_rest_and_ws_refuse_them_alike(self) -> None:
        memory = MemoryWS(self, ws_factory(self.backend), self.backend.clock)
        for data in self.BODIES:
            answer = self.ask("POST", "/api/events", JSON, data)
            error = self.assert_json_error(answer, 400, "duplicate key")
            memory.send_raw(b'{"op":"publish","events":' + data + b"}")
            ws_error = memory.last("error")["error"]
            self.assertIn("duplicate key", ws_error)
            self.assertEqual(error.split(": ", 1)[1], ws_error.split(": ", 1)[1])
        self.assertEqual(self.backend.hub.last_id, 0)


class ReadTokenTests(SiteTestCase):
    config = {"token": TOKEN, "read_token": [READER, "second-reader"]}

    def bearer(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def test_read_token_reads(self) -> None:
        self.assertEqual(self.post({**JSON, **self.bearer(TOKEN)}).code, 200)
        for token in (READER, "second-reader"):
            for path in ("/", "/api/runs", "/api/runs/r", "/api/events?after=0", "/metrics"):
                self.assertEqual(self.ask("GET", path, self.bearer(token)).code, 200, path)
            self.assertEqual(self.ask("GET", f"/static/app.js?token={token}").code, 200)
            sse = SSEClient(self.site, f"/events?token={token}&last_event_id=0")
            self.assertEqual([e["id"] for e in sse.events], [1])
        import txaio

        self.patch(txaio.config, "loop", self.backend.clock)
        ws = Connection(self.site, "ws", WS_PORT).request("GET", f"/ws?token={READER}", UPGRADE)
        self.assertEqual(ws.code, 101)

    def test_read_token_never_writes(self) -> None:
        self.assertEqual(self.post({**JSON, **self.bearer(TOKEN)}).code, 200)
        for headers, path in (
            (self.bearer(READER), "/api/events"),
            ({}, f"/api/events?token={READER}"),
        ):
            self.assert_json_error(self.post({**JSON, **headers}, path), 403, "may read but not")
            deleted = self.ask("DELETE", path.replace("events", "runs/r"), headers)
            self.assert_json_error(deleted, 403, "--token")
        self.assertEqual(self.backend.hub.last_id, 1)
        self.assertIsNotNone(self.backend.runs.get("r"))
        self.assert_json_error(self.ask("GET", "/api/runs", self.bearer(WRONG)), 401)
        # The health check stays open.
        self.assertEqual(self.ask("GET", "/api/health").code, 200)

    def test_write_token_still_does_everything(self) -> None:
        self.assertEqual(self.post({**JSON, **self.bearer(TOKEN)}).code, 200)
        self.assertEqual(self.ask("DELETE", "/api/runs/r", self.bearer(TOKEN)).code, 200)


class ReadTokenConfigTests(SynchronousTestCase):
    def test_file_form_and_refusals(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# team dashboards\nalpha-reader\n\nbeta-reader\n")
        config = Config(token=TOKEN, read_token=("gamma",), read_token_file=(path,))
        self.assertEqual(config.resolve_read_tokens(), ("gamma", "alpha-reader", "beta-reader"))
        for kwargs, fragment in (
            ({"read_token": ("x",)}, "--read-token needs --token"),
            ({"token": TOKEN, "read_token": (TOKEN,)}, "must differ"),
            ({"token": TOKEN, "read_token": (" ",)}, "empty"),
            ({"token": TOKEN, "read_token_file": (path + ".missing",)}, "cannot read"),
        ):
            with self.assertRaises(ConfigError) as cm:
                Config(**kwargs).resolve_read_tokens()
            self.assertIn(fragment, str(cm.exception))
        empty = self.mktemp()
        with open(empty, "w") as f:
            f.write("# nothing\n")
        with self.assertRaises(ConfigError) as cm:
            Config(token=TOKEN, read_token_file=(empty,)).resolve_read_tokens()
        self.assertIn("holds no token", str(cm.exception))

    def test_config_never_shows_a_token(self) -> None:
        """Its repr and the conflict message of a second embedded start name no token."""
        config = Config(token=TOKEN, read_token=(READER,))
        other = Config(token=WRONG)
        for text in (repr(config), *config.differences(other)):
            for secret in (TOKEN, READER, WRONG):
                self.assertNotIn(secret, text)
        self.assertEqual(
            config.differences(other),
            [
                "token: running (hidden), requested (hidden)",
                "read_token: running (hidden), requested ()",
            ],
        )

    def test_token_from_the_environment(self) -> None:
        self.patch(os, "environ", {**os.environ, "TRAINSTREAM_TOKEN": "from-env"})
        self.assertEqual(Config().resolve_token(), "from-env")
        self.assertEqual(Config(token="given").resolve_token(), "given")


class TwistdLogTests(TestCase):
    timeout = 60

    def test_twistd_output_never_holds_a_token(self) -> Deferred[None]:
        """
        ``twistd -n trainstream`` with the token from ``$TRAINSTREAM_TOKEN``
        and read tokens from a file, every request logged: neither its
        command line nor anything it prints holds a token.
        """
        ports_file = os.path.abspath(self.mktemp())
        readers = os.path.abspath(self.mktemp())
        with open(readers, "w") as f:
            f.write(READER + "\n")
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.patch(os, "environ", {**os.environ, "TRAINSTREAM_TOKEN": TOKEN})

        async def go() -> None:
            proto = spawn_twistd(
                self,
                "--memory",
                "--listen=tcp:0:interface=127.0.0.1",
                f"--read-token-file={readers}",
                "--access-log",
                f"--ports-file={ports_file}",
            )
            await proto.listening
            with open(ports_file) as f:
                base = json.load(f)["rest"].removesuffix("/api")
            with open(f"/proc/{proto_pid(proto)}/cmdline", "rb") as f:
                cmdline = f.read()
            self.assertNotIn(TOKEN.encode(), cmdline)
            self.assertNotIn(READER.encode(), cmdline)
            referer = {"Referer": [f"{base}/?token={TOKEN}"]}
            answers = []
            for method, url, data in (
                ("GET", f"{base}/?token={TOKEN}", None),
                ("GET", f"{base}/api/runs?token={READER}", None),
                ("GET", f"{base}/api/runs?token={WRONG}", None),
                ("POST", f"{base}/api/events?token={TOKEN}", body(log_event("r"))),
                ("POST", f"{base}/api/events?token={READER}", body(log_event("r"))),
                ("GET", f"{base}/api/events?after=0&token={READER}", None),
            ):
                response = await treq.request(
                    method,
                    url,
                    data=data,
                    headers={"Content-Type": ["application/json"], **referer},
                    pool=pool,
                )
                await response.content()
                answers.append(response.code)
            self.assertEqual(answers, [200, 200, 401, 200, 403, 200])
            proto.transport.signalProcess("TERM")  # type: ignore[union-attr]
            await proto.ended
            output = proto.output.decode(errors="replace")
            self.assertGreaterEqual(output.count("token=REDACTED"), 6, output)
            for secret in (TOKEN, READER, WRONG):
                self.assertNotIn(secret, output)

        return Deferred.fromCoroutine(go())
