"""
Several trainstream servers on one real Redis (``redis-server`` started by
the test on a free port, stopped by its pid): one history, one sequence of
ids, the same events everywhere; a server killed, Redis restarted, a server
joining late. docs/cluster.md says what is promised.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from tests.clients import SSEClient, WSClient, connect_sse, connect_ws
from tests.redisproc import RedisProcess
from tests.test_processes import Twistd, proto_pid, spawn_twistd
from trainstream.config import Config, parse_redis_url
from trainstream.errors import ConfigError


async def until(what: str, check: Callable[[], Any], seconds: float = 10.0) -> Any:
    """Poll ``check`` (sync, or returning a Deferred) until truthy; fail naming ``what``."""
    end = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < end:
        last = check()
        if isinstance(last, Deferred) or inspect.isawaitable(last):
            last = await last
        if last:
            return last
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"{what}: not within {seconds} s (last: {last!r})")


def metric(run: str, step: int) -> dict[str, Any]:
    return {"type": "metric", "run": run, "name": "m", "step": step, "value": float(step)}


def key(event: dict[str, Any]) -> tuple[str, int]:
    return (event["run"], event["step"])


class Server:
    """One ``twistd trainstream`` child: its process and its URLs."""

    def __init__(self, proto: Twistd, urls: dict[str, str]) -> None:
        self.proto = proto
        self.urls = urls

    @property
    def rest(self) -> str:
        return self.urls["rest"]

    def kill(self) -> Deferred[int | None]:
        os.kill(proto_pid(self.proto), signal.SIGKILL)
        return self.proto.ended


class ClusterCase(TestCase):
    timeout = 60
    appendonly: str | None = None
    redis_args: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.redis = RedisProcess(os.path.abspath(self.mktemp()), self.appendonly, self.redis_args)
        self.redis.start()
        self.addCleanup(self.redis.stop)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def server(self, *extra: str) -> Server:
        ports_file = os.path.abspath(self.mktemp())
        proto = spawn_twistd(
            self,
            "--listen=tcp:0:interface=127.0.0.1",
            f"--ports-file={ports_file}",
            f"--redis={self.redis.url}",
            *(extra or ("--memory",)),
        )
        await proto.listening
        with open(ports_file) as f:
            server = Server(proto, json.load(f))
        await until("the server has joined the cluster (health ok)", lambda: self.healthy(server))
        return server

    async def healthy(self, server: Server, code: int = 200) -> Any:
        """The health answer if its status code is ``code``, else ``None``."""
        answer = await self.get(server.rest + "/health")
        return answer if answer[0] == code else None

    async def get(self, url: str) -> tuple[int, Any]:
        response = await treq.get(url, pool=self.pool)
        return response.code, json.loads(await response.text())

    async def post(self, server: Server, events: list[dict[str, Any]]) -> tuple[int, Any, Any]:
        response = await treq.post(
            server.rest + "/events",
            json.dumps(events).encode(),
            headers={"Content-Type": "application/json"},
            pool=self.pool,
        )
        body = json.loads(await response.text())
        return response.code, body, response.headers.getRawHeaders("retry-after")

    async def events(self, server: Server, after: int = 0) -> list[dict[str, Any]]:
        code, body = await self.get(f"{server.rest}/events?after={after}&limit=10000")
        self.assertEqual(code, 200, body)
        events: list[dict[str, Any]] = body["events"]
        return events

    async def _count(self, server: Server, n: int) -> bool:
        """Whether ``server`` holds at least ``n`` events."""
        return len(await self.events(server)) >= n

    async def ws_publish(self, ws: WSClient, events: list[dict[str, Any]]) -> dict[str, Any]:
        before = len(ws.messages)
        ws.send_json({"op": "publish", "events": events})
        await until(
            "a WebSocket answer",
            lambda: any(m["op"] in ("ack", "error") for m in ws.messages[before:]),
        )
        answer: dict[str, Any] = next(
            m for m in ws.messages[before:] if m["op"] in ("ack", "error")
        )
        return answer

    def assert_one_history(self, streams: dict[str, list[dict[str, Any]]]) -> None:
        """Every stream holds the same events, ids and order, each once, ids 1..n."""
        first_name, first = next(iter(streams.items()))
        ids = [e["id"] for e in first]
        self.assertEqual(ids, list(range(1, len(ids) + 1)), first_name)
        for name, events in streams.items():
            self.assertEqual(events, first, f"{name} differs from {first_name}")


class ThreeServersTests(ClusterCase):
    def test_one_history_on_three_servers(self) -> Deferred[None]:
        """
        Three servers (two on memory, one on SQLite) on one Redis; an SSE and
        a WebSocket client on each; REST and WebSocket publishers on each.
        Every client gets every event once, with the same ids in the same
        order; no id is handed out twice; every 200 is readable at once on
        the server that gave it; runs, events and a downsampled series answer
        the same on every server, the spike kept.
        """

        async def go() -> None:
            db = os.path.abspath(self.mktemp())
            servers = [
                await self.server(),
                await self.server(),
                await self.server(f"--db={db}"),
            ]
            sses = [await connect_sse(s.urls["sse"]) for s in servers]
            wss = [await connect_ws(s.urls["ws"]) for s in servers]
            filtered = await connect_sse(servers[0].urls["sse"] + "?run=ws1")
            for ws in wss:
                ws.send_json({"op": "subscribe", "runs": ["*"]})
            publishers = [await connect_ws(s.urls["ws"]) for s in servers]
            acked: dict[int, tuple[str, int]] = {}
            pending = []
            for round_ in range(5):
                for i, s in enumerate(servers):
                    # In flight together (a run of its own each: no rewinds).
                    batch = [metric(f"rest{i}-{round_}", k) for k in range(4)]
                    pending.append((Deferred.fromCoroutine(self.post(s, batch)), batch))
                    ws_batch = [metric(f"ws{i}", round_ * 4 + k) for k in range(4)]
                    if round_ == 2 and i == 1:
                        ws_batch[2]["value"] = 1000.0  # a spike downsampling must keep
                    answer = await self.ws_publish(publishers[i], ws_batch)
                    self.assertEqual(answer["op"], "ack", answer)
                    for k, e in enumerate(ws_batch):
                        self.assertNotIn(answer["first_id"] + k, acked)
                        acked[answer["first_id"] + k] = key(e)
            for call, batch in pending:
                code, body, _ = await call
                self.assertEqual(code, 200, body)
                for k, e in enumerate(batch):
                    self.assertNotIn(body["first_id"] + k, acked)  # no id given twice
                    acked[body["first_id"] + k] = key(e)
            total = len(acked)
            self.assertEqual(total, 5 * 3 * 8)
            # Read-your-writes: a 200 is readable at once where it was given.
            code, body, _ = await self.post(servers[2], [metric("ryw", 1)])
            self.assertEqual(code, 200, body)
            got = await self.events(servers[2], body["first_id"] - 1)
            self.assertEqual([key(e) for e in got[:1]], [("ryw", 1)])
            acked[body["first_id"]] = ("ryw", 1)
            total += 1
            for c in sses:
                await until("SSE clients have every event", lambda c=c: len(c.events) >= total)
            for w in wss:
                await until("WS clients have every event", lambda w=w: len(w.events) >= total)
            streams: dict[str, list[dict[str, Any]]] = {}
            for i in range(3):
                streams[f"sse{i}"] = sses[i].events
                streams[f"ws{i}"] = wss[i].events
                streams[f"rest{i}"] = await self.events(servers[i])
            self.assert_one_history(streams)
            self.assertEqual({e["id"]: key(e) for e in sses[0].events}, acked)
            runs = [await self.get(s.rest + "/runs") for s in servers]
            self.assertEqual(len({json.dumps(r, sort_keys=True) for r in runs}), 1, runs)
            self.assertEqual(len(runs[0][1]["runs"]), 3 + 15 + 1)
            # A filtered client gets exactly what matches, once each.
            self.assertEqual(
                [e["id"] for e in filtered.events],
                [e["id"] for e in sses[0].events if e["run"] == "ws1"],
            )
            series = [await self.get(s.rest + "/runs/ws1/metrics/m?max_points=6") for s in servers]
            self.assertEqual(len({json.dumps(r) for r in series}), 1, series)
            code, body = series[0]
            self.assertTrue(body["downsampled"], body)
            self.assertIn(1000.0, [p[1] for p in body["points"]])
            healths = [(await self.get(s.rest + "/health"))[1] for s in servers]
            self.assertEqual({h["epoch"] for h in healths}, {healths[0]["epoch"]})
            self.assertEqual({h["status"] for h in healths}, {"ok"})
            self.assertEqual({h["cluster"]["feed_last_id"] for h in healths}, {total})

            async def one_leader() -> bool:
                answers = [(await self.get(s.rest + "/health"))[1] for s in servers]
                return sum(h["cluster"]["leader"] for h in answers) == 1

            await until("exactly one server leads", one_leader)
            for ws in wss + publishers:
                ws.dropConnection(abort=True)

        return Deferred.fromCoroutine(go())


class KillTests(ClusterCase):
    def test_killed_server_clients_resume_on_another(self) -> Deferred[None]:
        """
        A server is killed with SIGKILL while publishes to it are in flight:
        every one it acknowledged is in the others' history, no id was given
        twice; its SSE and WebSocket clients, resuming on another server with
        their last id, go on with no gap and no duplicate.
        """

        async def go() -> None:
            a, b, c = await self.server(), await self.server(), await self.server()
            sse = await connect_sse(a.urls["sse"])
            ws = await connect_ws(a.urls["ws"])
            ws.send_json({"op": "subscribe", "runs": ["*"]})
            acked: dict[int, tuple[str, int]] = {}
            for step in range(20):
                for name, s in (("viaA", a), ("viaB", b)):
                    code, body, _ = await self.post(s, [metric(name, step)])
                    self.assertEqual(code, 200, body)
                    acked[body["first_id"]] = (name, step)
            # Publishes in flight to A when it dies: those it answered count.
            flying = [
                Deferred.fromCoroutine(self.post(a, [metric(f"flying{k}", k)])) for k in range(60)
            ]
            await until(
                "some in-flight publishes answered", lambda: sum(d.called for d in flying) >= 5
            )
            await a.kill()
            for k, d in enumerate(flying):
                try:
                    code, body, _ = await d
                except Exception:
                    continue  # the connection died with A: not acknowledged
                if code == 200:
                    acked[body["first_id"]] = (f"flying{k}", k)
            await sse.lost
            seen = list(sse.events)
            resumed = await connect_sse(c.urls["sse"] + f"?last_event_id={seen[-1]['id']}")
            ws_seen = list(ws.events)
            ws2 = await connect_ws(c.urls["ws"])
            ws2.send_json({"op": "subscribe", "runs": ["*"], "after": ws_seen[-1]["id"]})
            for step in range(20, 30):
                code, body, _ = await self.post(b, [metric("viaB", step)])
                self.assertEqual(code, 200, body)
                acked[body["first_id"]] = ("viaB", step)
            top = max(acked)
            history = await self.events(c)
            self.assertEqual([e["id"] for e in history], list(range(1, top + 1)))
            by_id = {e["id"]: key(e) for e in history}
            self.assertEqual({i: by_id[i] for i in acked}, acked)  # every ack is there
            self.assertEqual(len(set(by_id.values())), len(by_id))  # each event once
            await until(
                "the resumed SSE client is live",
                lambda: resumed.events and resumed.events[-1]["id"] == top,
            )
            await until(
                "the resumed WS client is live", lambda: ws2.events and ws2.events[-1]["id"] == top
            )
            self.assertEqual(resumed.resets, [])
            self.assertEqual(seen + resumed.events, history)
            self.assertEqual(ws_seen + ws2.events, history)
            # A new server takes A's place: ids go on, none given twice.
            d = await self.server()
            code, body, _ = await self.post(d, [metric("viaD", 0)])
            self.assertEqual((code, body["first_id"]), (200, top + 1))
            self.assertEqual([e["id"] for e in await self.events(d)], list(range(1, top + 2)))
            for w in (ws, ws2):
                w.dropConnection(abort=True)

        return Deferred.fromCoroutine(go())


class RestartTests(ClusterCase):
    def test_restarted_server_catches_up_from_its_store(self) -> Deferred[None]:
        """
        A server on SQLite is stopped while the cluster goes on, then started
        again on its file: it continues from its own last id (XREAD from
        there), holds the whole history, and resumes a client with no reset.
        """

        async def go() -> None:
            db = os.path.abspath(self.mktemp())
            a, b = await self.server(), await self.server(f"--db={db}")
            for step in range(10):
                code, body, _ = await self.post(a, [metric("r", step)])
                self.assertEqual(code, 200, body)
            await until("B has the first ten", lambda: self._count(b, 10))
            os.kill(proto_pid(b.proto), signal.SIGTERM)
            await b.proto.ended
            for step in range(10, 20):
                code, body, _ = await self.post(a, [metric("r", step)])
                self.assertEqual(code, 200, body)
            again = await self.server(f"--db={db}")
            await until("the restarted server caught up", lambda: self._count(again, 20))
            self.assertEqual(await self.events(again), await self.events(a))
            client = await connect_sse(again.urls["sse"] + "?last_event_id=10")
            await until("the resume is replayed", lambda: len(client.events) >= 10)
            self.assertEqual([e["id"] for e in client.events], list(range(11, 21)))
            self.assertEqual(client.resets, [])

        return Deferred.fromCoroutine(go())


class RedisRestartTests(ClusterCase):
    appendonly = "always"

    def test_redis_restart_loses_nothing_acknowledged(self) -> Deferred[None]:
        """
        Redis (AOF, appendfsync always) is killed and started again: while it
        is away both servers serve what they hold, health says degraded naming
        Redis, REST publishers get 503 with Retry-After and WebSocket ones an
        error; once it is back everything recovers by itself, every
        acknowledged event is there, ids go on and live clients miss nothing.
        """

        async def go() -> None:
            a, b = await self.server(), await self.server()
            watcher = await connect_sse(b.urls["sse"])
            ws = await connect_ws(a.urls["ws"])
            acked: dict[int, tuple[str, int]] = {}
            for step in range(20):
                code, body, _ = await self.post(a if step % 2 else b, [metric("r", step)])
                self.assertEqual(code, 200, body)
                acked[body["first_id"]] = ("r", step)
            epoch = (await self.get(a.rest + "/health"))[1]["epoch"]
            self.redis.stop(signal.SIGKILL)
            for s in (a, b):
                code, health = await until("health says degraded", lambda s=s: self.healthy(s, 503))
                self.assertEqual(health["status"], "degraded")
                self.assertIn(f"Redis at 127.0.0.1:{self.redis.port}", health["reason"])
            code, body, retry = await self.post(a, [metric("r", 99)])
            self.assertEqual(code, 503, body)
            self.assertIn("Redis at 127.0.0.1", body["error"])
            self.assertEqual(retry, ["5"])
            answer = await self.ws_publish(ws, [metric("r", 99)])
            self.assertEqual(answer["op"], "error", answer)
            self.assertIn("Redis", answer["error"])
            held = await self.events(b)  # reads go on from what the server holds
            self.assertEqual({e["id"]: key(e) for e in held}, acked)
            self.redis.start()
            for s in (a, b):
                await until("health is ok again", lambda s=s: self.healthy(s))
            for step in range(20, 30):
                code, body, _ = await self.post(a if step % 2 else b, [metric("r", step)])
                self.assertEqual(code, 200, body)
                acked[body["first_id"]] = ("r", step)
            stream = self.redis.command("XRANGE", "trainstream:events", "-", "+")
            assert isinstance(stream, list)
            self.assertEqual([int(entry[0].split("-")[0]) for entry in stream], sorted(acked))
            await until("the watcher has every event", lambda: len(watcher.events) >= 30)
            self.assertEqual({e["id"]: key(e) for e in watcher.events}, acked)
            self.assertEqual([e["id"] for e in watcher.events], list(range(1, 31)))
            self.assertEqual((await self.get(b.rest + "/health"))[1]["epoch"], epoch)
            ws.dropConnection(abort=True)

        return Deferred.fromCoroutine(go())


class LostRedisTests(ClusterCase):
    appendonly = None  # no persistence: a restart is a Redis that lost everything

    def test_ids_never_go_back_and_the_epoch_changes(self) -> Deferred[None]:
        """
        Redis comes back empty: the servers raise its counter to what they
        have seen, so no id is given twice, and the cluster has a new epoch,
        the same on every server, so a client can tell.
        """

        async def go() -> None:
            a, b = await self.server(), await self.server()
            for step in range(10):
                code, body, _ = await self.post(b, [metric("r", step)])
                self.assertEqual(code, 200, body)
            await until("A has all ten", lambda: self._count(a, 10))
            before = (await self.get(a.rest + "/health"))[1]["epoch"]
            self.redis.stop(signal.SIGKILL)
            await until("A sees Redis gone", lambda: self.healthy(a, 503))
            self.redis.start()
            for s in (a, b):
                await until("health is ok again", lambda s=s: self.healthy(s))
            code, body, _ = await self.post(a, [metric("r", 10)])
            self.assertEqual((code, body["first_id"]), (200, 11))
            epochs = {(await self.get(s.rest + "/health"))[1]["epoch"] for s in (a, b)}
            self.assertEqual(len(epochs), 1, epochs)
            self.assertNotEqual(epochs, {before})
            for s in (a, b):
                await until("every server shows id 11", lambda s=s: self._count(s, 11))
                ids = [e["id"] for e in await self.events(s)]
                self.assertEqual(ids, list(range(1, 12)))

        return Deferred.fromCoroutine(go())


class DeleteTests(ClusterCase):
    def test_delete_acts_on_every_server(self) -> Deferred[None]:
        """
        ``DELETE /api/runs/{run}`` on one server removes the run from every
        server's history and registry, in its place in the stream; a server
        that joins afterwards replays it too; an unknown run is 404.
        """

        async def go() -> None:
            a, b = await self.server(), await self.server(f"--db={os.path.abspath(self.mktemp())}")
            for step in range(5):
                for run in ("gone", "kept"):
                    code, body, _ = await self.post(a, [metric(run, step)])
                    self.assertEqual(code, 200, body)
            await until("B has every event", lambda: self._count(b, 10))
            response = await treq.delete(b.rest + "/runs/gone", pool=self.pool)
            self.assertEqual(response.code, 200)
            self.assertEqual(json.loads(await response.text()), {"run": "gone", "deleted": 5})
            code, body, _ = await self.post(a, [metric("kept", 5)])
            self.assertEqual(code, 200, body)
            late = await self.server()
            for s in (a, b, late):

                async def settled(s: Server = s) -> Any:
                    events = await self.events(s)
                    return events if events and events[-1]["step"] == 5 else None

                events = await until("every server has the last point", settled)
                self.assertEqual({e["run"] for e in events}, {"kept"})
                self.assertEqual([e["step"] for e in events], list(range(6)))
                code, runs = await self.get(s.rest + "/runs")
                self.assertEqual([r["run"] for r in runs["runs"]], ["kept"])
                code, _ = await self.get(s.rest + "/runs/gone")
                self.assertEqual(code, 404)
            response = await treq.delete(a.rest + "/runs/never", pool=self.pool)
            self.assertEqual(response.code, 404)
            await response.text()

        return Deferred.fromCoroutine(go())


class PublisherOutageTests(ClusterCase):
    appendonly = "always"

    def test_remote_publisher_rides_out_a_redis_restart(self) -> Deferred[None]:
        """
        The remote ``Publisher`` keeps what a 503 refused and sends it again:
        points logged while Redis is away reach every server once it is back,
        each once, in order.
        """
        from twisted.internet.threads import deferToThread

        from trainstream.client import Publisher

        async def go() -> None:
            a, b = await self.server(), await self.server()
            publisher = Publisher(a.urls["dashboard"].rstrip("/"), "remote", max_backoff=0.5)
            self.addCleanup(deferToThread, publisher.close, 5)
            for step in range(10):
                publisher.log({"loss": 1.0}, step=step)
            self.assertTrue(await deferToThread(publisher.flush, 10))
            self.redis.stop(signal.SIGKILL)
            for step in range(10, 20):
                publisher.log({"loss": 0.5}, step=step)
            await until(
                "the publisher is refused with 503",
                lambda: publisher.last_error and "503" in publisher.last_error,
            )
            self.assertIn("Redis", publisher.last_error or "")
            self.redis.start()
            self.assertTrue(await deferToThread(publisher.flush, 20))

            async def b_has_all() -> Any:
                events = await self.events(b)
                steps = [e["step"] for e in events if e["type"] == "metric"]
                return steps if len(steps) >= 20 else None

            self.assertEqual(await until("B has every point", b_has_all), list(range(20)))

        return Deferred.fromCoroutine(go())


class RetentionTests(ClusterCase):
    # Small stream nodes, so that MAXLEN ~ trims close to the limit.
    redis_args = ("--stream-node-max-entries", "10")

    def test_late_server_catches_up_and_resets_older_resumes(self) -> Deferred[None]:
        """
        The stream keeps about ``--redis-maxlen`` events; a server that joins
        late loads what it keeps; a resume from before that window gets the
        contract's ``reset`` with ``oldest_id``, then the window; one inside
        it resumes with no reset; one past the cluster's newest id is reset.
        """

        async def go() -> None:
            a = await self.server("--memory", "--redis-maxlen=50")
            for step in range(0, 300, 20):
                code, body, _ = await self.post(a, [metric("r", s) for s in range(step, step + 20)])
                self.assertEqual(code, 200, body)
            stream = self.redis.command("XRANGE", "trainstream:events", "-", "+")
            assert isinstance(stream, list)
            first = int(stream[0][0].split("-")[0])
            self.assertGreater(first, 200)  # trimmed to about 50
            self.assertLessEqual(len(stream), 70)
            late = await self.server("--memory", "--redis-maxlen=50")

            async def caught_up() -> Any:
                ev = await self.events(late, first - 1)
                return ev if ev and ev[-1]["id"] == 300 else None

            history = await until("the late server has caught up", caught_up)
            self.assertEqual([e["id"] for e in history], list(range(first, 301)))
            old = await connect_sse(late.urls["sse"] + "?last_event_id=5")
            await until("the old resume is replayed", lambda: len(old.events) >= 301 - first)
            self.assertEqual([r["oldest_id"] for r in old.resets], [first])
            self.assertEqual(old.events[0]["id"], first)
            inside = await connect_sse(late.urls["sse"] + f"?last_event_id={first + 9}")
            await until("the inside resume is replayed", lambda: len(inside.events) >= 291 - first)
            self.assertEqual(inside.resets, [])
            self.assertEqual(inside.events[0]["id"], first + 10)
            ahead = await connect_sse(late.urls["sse"] + "?last_event_id=5000")
            await until("a resume past the cluster is reset", lambda: ahead.resets)
            self.assertIn("newer", ahead.resets[0]["reason"])

        return Deferred.fromCoroutine(go())

    def test_retention_by_time(self) -> Deferred[None]:
        """``--redis-retention`` seconds: older batches leave the stream (XTRIM MINID)."""

        async def go() -> None:
            a = await self.server("--memory", "--redis-retention=0.5")
            code, old, _ = await self.post(a, [metric("r", s) for s in range(5)])
            self.assertEqual(code, 200, old)

            async def trimmed() -> bool:
                code, _, _ = await self.post(a, [metric("r", 5)])
                stream = self.redis.command("XRANGE", "trainstream:events", "-", "+")
                assert isinstance(stream, list)
                return code == 200 and int(stream[0][0].split("-")[0]) > old["last_id"]

            await until("batches older than 0.5 s are trimmed", trimmed, 8)
            # The server itself keeps what it had: its store is its own.
            self.assertEqual((await self.events(a))[0]["id"], 1)

        return Deferred.fromCoroutine(go())


class InProcessTests(ClusterCase):
    appendonly = "always"

    def test_run_log_in_a_cluster_member(self) -> Deferred[None]:
        """
        An embedded server given ``redis=`` is a cluster member: ``run.log``
        events get the cluster's ids and reach a server in another process;
        while Redis is away they wait (``flush`` says why) and are published
        once, in order, when it is back.
        """
        from trainstream.cluster import ClusterUnavailableError
        from trainstream.server import StreamServer

        async def go() -> None:
            other = await self.server()
            server = StreamServer(
                {"redis": self.redis.url, "memory": True, "listen": "tcp:0:interface=127.0.0.1"},
                reactor,
            )
            await server.start()
            self.addCleanup(server.stop)
            await until("joined", lambda: not server.status().problems)
            run = server.run("embedded")
            for step in range(10):
                run.log({"loss": 1.0 / (step + 1)}, step=step)
            await server.flush_deferred()
            self.assertEqual(server.hub.last_id, 11)  # created, then 10 points
            self.redis.stop(signal.SIGKILL)
            await until("the member sees Redis gone", lambda: server.status().problems)
            self.assertIn(f"127.0.0.1:{self.redis.port}", server.status().problems[0])
            for step in range(10, 15):
                run.log({"loss": 0.01}, step=step)
            server.inbox.drain()
            with self.assertRaises(ClusterUnavailableError):  # a flush says Redis is away
                await server.flush_deferred()
            self.redis.start()
            await until("the queued points are published", lambda: server.hub.last_id >= 16)

            async def other_has_all() -> Any:
                events = await self.events(other)
                return events if len(events) >= 16 else None

            events = await until("the other server has them", other_has_all)
            self.assertEqual([e["id"] for e in events], list(range(1, 17)))
            points = [e["step"] for e in events if e["type"] == "metric"]
            self.assertEqual(points, list(range(15)))  # once each, in order

        return Deferred.fromCoroutine(go())


class LeaderTests(ClusterCase):
    def test_server_made_events_published_once(self) -> Deferred[None]:
        """
        Every server watches for stalled runs, but only the holder of the
        leader lease publishes the ``stalled`` status: one in the history.
        """

        async def go() -> None:
            servers = [await self.server("--memory", "--stall-after=0.5") for _ in range(3)]
            code, body, _ = await self.post(
                servers[1], [{"type": "status", "run": "quiet", "state": "running"}]
            )
            self.assertEqual(code, 200, body)

            async def stalled() -> Any:
                events = await self.events(servers[2])
                return [e for e in events if e.get("state") == "stalled"]

            await until("a stall is published", stalled)
            # Each server checks every 0.125 s: a second publisher would show by now.
            await deferLater(reactor, 1.0, lambda: None)
            for s in servers:
                events = await self.events(s)
                self.assertEqual([e["state"] for e in events], ["running", "stalled"])

        return Deferred.fromCoroutine(go())


class ConfigTests(SynchronousTestCase):
    def test_redis_url(self) -> None:
        url = parse_redis_url("redis://10.0.0.5:6380/2")
        self.assertEqual((url.host, url.port, url.db), ("10.0.0.5", 6380, 2))
        self.assertEqual(parse_redis_url("redis://cache").address, "cache:6379")
        for bad, why in [
            ("http://x:1/0", "scheme"),
            ("redis://x:port/0", "Port"),
            ("redis://x:1/db", "database"),
            ("redis://u:p@x:1/0", "credentials"),
            ("redis://:1/0", "no host"),
        ]:
            e = self.assertRaises(ConfigError, Config.from_value, {"redis": bad})
            self.assertIn(bad, str(e))
            self.assertIn(why, str(e))

    def test_missing_txredisapi_says_how_to_install(self) -> None:
        from trainstream.cluster.wire import load_txredisapi

        saved = sys.modules.get("txredisapi")
        sys.modules["txredisapi"] = None  # type: ignore[assignment]
        try:
            e = self.assertRaises(ConfigError, load_txredisapi)
        finally:
            if saved is not None:
                sys.modules["txredisapi"] = saved
            else:
                del sys.modules["txredisapi"]
        self.assertEqual(str(e), "--redis needs txredisapi: pip install 'trainstream[redis]'")


__all__ = ["ClusterCase", "SSEClient", "Server"]
