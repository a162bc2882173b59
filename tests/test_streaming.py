"""
Data flows end to end on real loopback sockets, where sockets are the point:
a REST publish and ``run.log()`` from threads reach live SSE and WebSocket
clients through real listeners; health names the bound listeners; one port
serves everything; the ports file names the ports bound.

The web layer's own behaviour (publishing rules, resume, filters, framing,
errors) is tested without sockets: ``test_rest``, ``test_sse_unit``,
``test_ws``, ``test_access``.
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

from tests.clients import ANY_PORTS, connect_sse, connect_ws
from trainstream.server import StreamServer


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


class LargePostTests(ServerTestCase):
    """
    A body over ``rest.OFF_THREAD_BYTES`` is decoded and checked in a
    thread (the reactor serves others meanwhile): the answers and the
    stored events are those of the inline path.
    """

    def test_a_large_batch_in_a_thread_same_answers(self) -> Deferred[None]:
        from trainstream.web import rest

        n = 20_000

        def body(events: list[dict[str, Any]]) -> bytes:
            data = json.dumps(events).encode()
            self.assertGreater(len(data), rest.OFF_THREAD_BYTES)
            return data

        events = [
            {"type": "metric", "run": "big", "name": f"m{i % 7}", "step": i // 7, "value": i * 0.5}
            for i in range(n)
        ]

        async def go() -> None:
            self.assertEqual(
                (
                    await self.post(
                        "/api/events",
                        b'[{"type": "status", "run": "x", "state": "running"}]',
                        content_type="application/json",
                    )
                )[0],
                200,
            )
            code, answer = await self.post(
                "/api/events", body(events), content_type="application/json"
            )
            first = answer.get("first_id", 0)  # (the server's own alerts may come before)
            self.assertEqual(
                (code, answer), (200, {"accepted": n, "first_id": first, "last_id": first + n - 1})
            )
            bad = [dict(e) for e in events]
            bad[12_345]["step"] = -1
            code, answer = await self.post(
                "/api/events", body(bad), content_type="application/json"
            )
            self.assertEqual((code, answer["index"]), (400, 12_345))
            self.assertIn('field "step" must be an integer >= 0', answer["error"])
            code, answer = await self.post("/api/events", body(events), content_type="text/plain")
            self.assertEqual(code, 415, answer)
            stored = list(self.server.hub.store.after(1, lambda r: r.run == "big"))
            self.assertEqual([r.id for r in stored], list(range(first, first + n)))
            self.assertEqual(
                [json.loads(r.json) for r in stored[:3]],
                [{"id": first + i, **events[i], "time": stored[i].event["time"]} for i in range(3)],
            )

        return Deferred.fromCoroutine(go())


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


class HealthAndPagesTests(ServerTestCase):
    def test_health(self) -> Deferred[None]:
        async def go() -> None:
            await connect_ws(self.server.urls["ws"])  # open until the server stops
            code, body = await self.get_json("/api/health")
            self.assertEqual(code, 200)
            self.assertEqual(body["status"], "ok")
            self.assertEqual(set(body["listeners"]), {"sse", "ws", "rest"})
            self.assertEqual(body["clients"], {"sse": 0, "ws": 1})
            self.assertEqual(body["last_id"], self.server.hub.last_id)
            for key in ("version", "uptime_s", "epoch"):
                self.assertIn(key, body)

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
