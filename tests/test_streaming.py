"""
Data flows end to end on real loopback sockets: REST publish, WebSocket
publish and ``run.log()`` from threads reach live SSE and WebSocket clients.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tests.clients import ANY_PORTS, connect_sse, connect_ws, keepalive_get
from trainstream.service import StreamServer


def d(coro: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coro)


def metric(
    run: str, step: int, value: float | str = 0.5, name: str = "train/loss"
) -> dict[str, Any]:
    return {"type": "metric", "run": run, "name": name, "step": step, "value": value}


class ServerTestCase(TestCase):
    """A started server on free ports, stopped (ports free) after each test."""

    config: dict[str, Any] = ANY_PORTS

    def setUp(self) -> Deferred[Any]:
        self.server = StreamServer(self.config, reactor)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.server.stop)
        return self.server.start()

    async def post(self, path: str, body: bytes, **headers: str) -> tuple[int, Any]:
        url = self.server.urls["rest"].rsplit("/api", 1)[0] + path
        response = await treq.post(
            url,
            data=body,
            headers={k.replace("_", "-"): [v] for k, v in headers.items()},
            pool=self.pool,
        )
        return response.code, json.loads(await response.text())

    async def get_json(self, path: str) -> tuple[int, Any]:
        url = self.server.urls["rest"].rsplit("/api", 1)[0] + path
        response = await treq.get(url, pool=self.pool)
        return response.code, json.loads(await response.text())


class PublishTests(ServerTestCase):
    def test_post_reaches_sse_and_ws(self) -> Deferred[None]:
        """POST /api/events: 200 with ids, and both kinds of client see each event once."""

        async def go() -> None:
            sse = await connect_sse(self.server.urls["sse"])
            ws = await connect_ws(self.server.urls["ws"])
            ws.send_json({"op": "subscribe", "runs": ["*"]})
            await ws.wait_for("ping", 0)
            # Round-trip a ping so the subscribe is processed before publishing.
            ws.send_json({"op": "ping", "nonce": "n1"})
            await ws.wait_for("pong", 1)
            code, body = await self.post(
                "/api/events",
                json.dumps([metric("r1", s, s / 10) for s in range(5)]).encode(),
                content_type="application/json",
            )
            self.assertEqual(code, 200)
            self.assertEqual(body["accepted"], 5)
            self.assertEqual(body["last_id"] - body["first_id"], 4)
            await sse.wait_for(5)
            await ws.wait_for("event", 5)
            for events in (sse.events, ws.events):
                ids = [e["id"] for e in events]
                self.assertEqual(ids, list(range(body["first_id"], body["last_id"] + 1)))
                self.assertEqual([e["step"] for e in events], [0, 1, 2, 3, 4])

        return d(go())

    def test_ws_publish_ack(self) -> Deferred[None]:
        async def go() -> None:
            sse = await connect_sse(self.server.urls["sse"])
            ws = await connect_ws(self.server.urls["ws"])
            ws.send_json({"op": "publish", "events": [metric("w", 1), metric("w", 2)]})
            await ws.wait_for("ack", 1)
            ack = next(m for m in ws.messages if m["op"] == "ack")
            self.assertEqual(ack["accepted"], 2)
            await sse.wait_for(2)
            self.assertEqual([e["id"] for e in sse.events], [ack["first_id"], ack["last_id"]])

        return d(go())

    def test_bad_batch_stores_nothing(self) -> Deferred[None]:
        """A bad event answers 400 naming its index; nothing of the batch is kept."""

        async def go() -> None:
            before = self.server.hub.last_id
            batch = [metric("r", 1), {"type": "metric", "run": "r", "name": "x", "step": -1}]
            code, body = await self.post(
                "/api/events", json.dumps(batch).encode(), content_type="application/json"
            )
            self.assertEqual(code, 400)
            self.assertEqual(body["index"], 1)
            self.assertIn("step", body["error"])
            self.assertEqual(self.server.hub.last_id, before)
            ws = await connect_ws(self.server.urls["ws"])
            ws.send_json({"op": "publish", "events": batch})
            await ws.wait_for("error", 1)
            error = next(m for m in ws.messages if m["op"] == "error")
            self.assertEqual(error["index"], 1)
            self.assertEqual(self.server.hub.last_id, before)

        return d(go())

    def test_malformed_bodies_are_400_and_harmless(self) -> Deferred[None]:
        """Every kind of bad body answers 400 naming the problem; the server goes on."""

        async def go() -> None:
            cases = [
                (b"[{", "application/json", "JSON"),
                (b"\xff\xfe[]", "application/json", "UTF-8"),
                (
                    b'[{"type": "metric", "run": "r", "name": "x", "step": 1, "value": NaN}]',
                    "application/json",
                    "NaN",
                ),
                (b"[]", "text/plain", "content-type"),
                (b'{"type": "log"}', "application/json", "array"),
                (
                    b'[{"type": "metric", "run": "r", "name": "x", "step": 1, "value": 1, '
                    b'"extra": 2}]',
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
                code, answer = await self.post("/api/events", body, content_type=ctype)
                self.assertEqual(code, 400, body)
                self.assertIn(word.lower(), answer["error"].lower(), body)
            self.assertEqual(self.server.hub.last_id, 0)
            code, answer = await self.post(
                "/api/events",
                json.dumps([metric("ok", 1)]).encode(),
                content_type="application/json",
            )
            self.assertEqual((code, answer["accepted"]), (200, 1))

        return d(go())

    def test_nan_round_trips_over_websocket(self) -> Deferred[None]:
        async def go() -> None:
            ws = await connect_ws(self.server.urls["ws"])
            ws.send_json({"op": "subscribe"})
            ws.send_json(
                {"op": "publish", "events": [metric("n", 1, "NaN"), metric("n", 2, "-Infinity")]}
            )
            await ws.wait_for("event", 2)
            self.assertEqual([e["value"] for e in ws.events], ["NaN", "-Infinity"])

        return d(go())

    def test_run_log_from_threads(self) -> Deferred[None]:
        """
        run.log() from eight threads: every event arrives once, ids strictly
        increase, and each thread's own order is kept.
        """
        threads, per_thread = 8, 250

        async def go() -> None:
            ws = await connect_ws(self.server.urls["ws"])
            ws.send_json({"op": "subscribe", "types": ["metric"]})
            ws.send_json({"op": "ping", "nonce": "sync"})
            await ws.wait_for("pong", 1)

            def train(i: int) -> None:
                run = self.server.run(f"thread-{i}")
                for step in range(per_thread):
                    run.log({"train/loss": 1.0 / (step + 1), "train/step": step}, step=step)

            def all_threads() -> None:
                workers = [threading.Thread(target=train, args=(i,)) for i in range(threads)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join(60)

            await deferToThread(all_threads)
            await ws.wait_for("event", threads * per_thread * 2)
            events = ws.events
            ids = [e["id"] for e in events]
            self.assertEqual(len(events), threads * per_thread * 2)
            self.assertEqual(ids, sorted(set(ids)))
            for i in range(threads):
                steps = [e["step"] for e in events if e["run"] == f"thread-{i}"]
                self.assertEqual(steps, [s for s in range(per_thread) for _ in range(2)])

        return d(go())

    def test_resume_with_last_event_id(self) -> Deferred[None]:
        """A client holding an id gets the stored events after it, then live ones."""

        async def go() -> None:
            self.server.hub.accept([metric("a", s) for s in range(10)])
            last_seen = self.server.hub.last_id - 4
            sse = await connect_sse(self.server.urls["sse"], **{"Last-Event-ID": str(last_seen)})
            ws = await connect_ws(self.server.urls["ws"])
            ws.send_json({"op": "subscribe", "after": last_seen})
            await sse.wait_for(4)
            await ws.wait_for("event", 4)
            self.server.hub.accept([metric("a", 10)])
            await sse.wait_for(5)
            await ws.wait_for("event", 5)
            expected = list(range(last_seen + 1, self.server.hub.last_id + 1))
            self.assertEqual([e["id"] for e in sse.events], expected)
            self.assertEqual([e["id"] for e in ws.events], expected)

        return d(go())

    def test_filters(self) -> Deferred[None]:
        async def go() -> None:
            base = self.server.urls["sse"]
            sse = await connect_sse(base, path="/events?run=keep*&type=metric")
            ws = await connect_ws(self.server.urls["ws"])
            ws.send_json({"op": "subscribe", "runs": ["keep*"], "types": ["metric"]})
            ws.send_json({"op": "ping", "nonce": "sync"})
            await ws.wait_for("pong", 1)
            self.server.hub.accept(
                [
                    metric("drop", 1),
                    {"type": "log", "run": "keep-1", "level": "info", "message": "hi"},
                    metric("keep-1", 2),
                ]
            )
            await sse.wait_for(1)
            await ws.wait_for("event", 1)
            self.assertEqual([(e["run"], e["step"]) for e in sse.events], [("keep-1", 2)])
            self.assertEqual([(e["run"], e["step"]) for e in ws.events], [("keep-1", 2)])

        return d(go())


class HealthAndPagesTests(ServerTestCase):
    def test_health(self) -> Deferred[None]:
        async def go() -> None:
            ws = await connect_ws(self.server.urls["ws"])
            code, body = await self.get_json("/api/health")
            self.assertEqual(code, 200)
            self.assertEqual(body["status"], "ok")
            self.assertEqual(set(body["listeners"]), {"sse", "ws", "rest"})
            self.assertEqual(body["clients"], {"sse": 0, "ws": 1})
            self.assertEqual(body["last_id"], self.server.hub.last_id)
            for key in ("version", "uptime_s", "epoch"):
                self.assertIn(key, body)
            ws.sendClose()
            await ws.lost

        return d(go())

    def test_unknown_api_path_is_json_404(self) -> Deferred[None]:
        async def go() -> None:
            code, body = await self.get_json("/api/nope")
            self.assertEqual(code, 404)
            self.assertIn("/api/nope", body["error"])

        return d(go())

    def test_seed_roots(self) -> Deferred[None]:
        """
        Seed clients: SSE at / of the SSE listener, a WebSocket upgrade at /
        of the WS listener; / elsewhere is the page.
        """

        async def go() -> None:
            urls = self.server.urls
            sse_root = urls["sse"].replace("/events", "/")
            sse = await connect_sse(sse_root)
            ws = await connect_ws(urls["ws"].replace("/ws", "/"))
            self.assertEqual(ws.messages[0]["op"], "hello")
            self.server.hub.accept([metric("seed", 1)])
            await sse.wait_for(1)
            await ws.wait_for("ping", 0)
            rest_port = int(urls["rest"].split(":")[2].split("/")[0])
            page = await keepalive_get(rest_port, "/")
            self.assertIn(b"text/html", page.raw)
            page.transport.loseConnection()
            await page.lost
            sse_port = int(sse_root.split(":")[2].split("/")[0])
            plain = await keepalive_get(sse_port, "/")
            self.assertIn(b"text/html", plain.raw)
            plain.transport.loseConnection()
            await plain.lost

        return d(go())


class SinglePortTests(ServerTestCase):
    config = {"listen": "tcp:0:interface=127.0.0.1", "memory": True}

    def test_one_listener_serves_everything(self) -> Deferred[None]:
        async def go() -> None:
            urls = self.server.urls
            self.assertEqual(len(self.server.listeners), 1)
            port = self.server.listeners[0].port_number
            for key in ("sse", "ws", "rest"):
                self.assertIn(f":{port}/", urls[key])
            sse = await connect_sse(urls["sse"])
            ws = await connect_ws(urls["ws"])
            root_ws = await connect_ws(urls["ws"].replace("/ws", "/"))
            self.server.hub.accept([metric("one", 1)])
            await sse.wait_for(1)
            ws.send_json({"op": "ping", "nonce": "x"})
            await ws.wait_for("pong", 1)
            self.assertEqual(root_ws.messages[0]["op"], "hello")
            code, body = await self.get_json("/api/health")
            self.assertEqual((code, list(body["listeners"])), (200, ["listen"]))

        return d(go())


class PortsFileTests(TestCase):
    def test_ports_file_names_bound_ports(self) -> Deferred[None]:
        path = os.path.join(self.mktemp() + "-dir", "ports.json")
        os.makedirs(os.path.dirname(path))
        server = StreamServer({**ANY_PORTS, "ports_file": path}, reactor)
        self.addCleanup(server.stop)

        async def go() -> None:
            await server.start()
            with open(path) as f:
                self.assertEqual(json.load(f), server.urls)
            self.assertNotIn(":0/", json.dumps(server.urls))
            self.assertEqual(os.listdir(os.path.dirname(path)), ["ports.json"])

        return d(go())
