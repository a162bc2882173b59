"""
The remote publisher against a real server: batches from a background
thread, a bounded queue that counts drops while the server is away, retries,
flush, and its own cost as metrics.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.clients import free_port
from trainstream.client import Publisher, api_base
from trainstream.events import EventError
from trainstream.service import StreamServer


def one_port(port: int, **extra: Any) -> dict[str, Any]:
    return {"listen": f"tcp:{port}:interface=127.0.0.1", "memory": True, **extra}


class PublisherTests(TestCase):
    timeout = 60

    async def serve(self, config: dict[str, Any]) -> StreamServer:
        server = StreamServer(config, reactor)
        await server.start()
        self.addCleanup(server.stop)
        return server

    def publisher(self, port: int, **kw: Any) -> Publisher:
        kw.setdefault("report_every", 0)
        kw.setdefault("flush_at_exit", 0)
        publisher = Publisher(f"http://127.0.0.1:{port}", kw.pop("run", "remote"), **kw)
        self.addCleanup(lambda: deferToThread(publisher.close, 5))
        return publisher

    def test_everything_arrives_in_order(self) -> Deferred[None]:
        port = free_port()

        async def go() -> None:
            server = await self.serve(one_port(port))
            pub = self.publisher(port, hparams={"lr": 0.01}, batch_size=500)
            for step in range(1000):
                pub.log({"train/loss": 1.0 / (step + 1), "train/acc": step / 1000}, step=step)
            pub.log({"odd": float("nan")}, step=1000)
            pub.finish()
            self.assertTrue(await deferToThread(pub.flush, 20))
            events = [r.event for r in server.hub.store.after(0, lambda r: r.run == "remote")]
            kinds = [e["type"] for e in events if e["type"] != "alert"]  # the server's own
            self.assertEqual(kinds[:2], ["status", "hparams"])
            self.assertEqual(kinds[-1], "status")
            metrics = [e for e in events if e["type"] == "metric" and e["name"] != "odd"]
            self.assertEqual([e["step"] for e in metrics], [s for s in range(1000) for _ in (0, 1)])
            self.assertEqual(pub.sent, len(events) - 1)  # the NaN alert is the server's own
            self.assertEqual((pub.dropped, pub.rejected), (0, 0))

        return Deferred.fromCoroutine(go())

    def test_server_away_bounded_queue_then_retry(self) -> Deferred[None]:
        """
        Nobody listens: log() still returns at once; past max_queue the
        oldest are dropped and counted; once a server comes, the rest arrive.
        """
        port = free_port()

        async def go() -> None:
            pub = self.publisher(port, max_queue=20, max_backoff=0.2)
            for step in range(50):
                pub.log({"loss": float(step)}, step=step)
            self.assertLessEqual(pub.queue_depth, 20)
            self.assertGreaterEqual(pub.dropped, 31)  # 'created' + 50 metrics > 20
            self.assertFalse(await deferToThread(pub.flush, 0.3))
            self.assertIn("unreachable", pub.last_error or "")
            server = await self.serve(one_port(port))
            self.assertTrue(await deferToThread(pub.flush, 20))
            steps = [
                r.event["step"] for r in server.hub.store.after(0, lambda r: r.type == "metric")
            ]
            self.assertEqual(steps, list(range(30, 50)))  # the newest were kept
            self.assertEqual(pub.dropped, 31)

        return Deferred.fromCoroutine(go())

    def test_token(self) -> Deferred[None]:
        port = free_port()

        async def go() -> None:
            server = await self.serve(one_port(port, token="sesame"))
            wrong = self.publisher(port, run="wrong", token="nope", max_backoff=0.2)
            right = self.publisher(port, run="right", token="sesame")
            right.log({"x": 1}, step=1)
            self.assertTrue(await deferToThread(right.flush, 20))
            self.assertFalse(await deferToThread(wrong.flush, 0.5))
            self.assertIn("401", wrong.last_error or "")
            self.assertIn("token", wrong.last_error or "")
            runs = {r.run for r in server.hub.store.after(0, lambda r: True)}
            self.assertEqual(runs, {"right"})

        return Deferred.fromCoroutine(go())

    def test_reports_its_own_cost(self) -> Deferred[None]:
        port = free_port()

        async def go() -> None:
            server = await self.serve(one_port(port))
            pub = self.publisher(port, report_every=0.05)
            for step in range(100):
                pub.log({"loss": 0.5}, step=step)

            def reported() -> bool:
                names = {r.name for r in server.hub.store.after(0, lambda r: r.type == "metric")}
                return {
                    "trainstream/log_us",
                    "trainstream/queue_depth",
                    "trainstream/dropped",
                } <= names

            for _ in range(500):  # bounded wait (5 s) for the first report
                if reported():
                    break
                await deferLater(reactor, 0.01, lambda: None)
            self.assertTrue(reported())

        return Deferred.fromCoroutine(go())


class PublisherRefusalTests(TestCase):
    """The server takes a batch all or nothing: one bad event must not cost the rest."""

    timeout = 60

    async def serve(self) -> StreamServer:
        server = StreamServer({"listen": "tcp:0:interface=127.0.0.1", "memory": True}, reactor)
        await server.start()
        self.addCleanup(server.stop)
        return server

    def publisher(self, server: StreamServer) -> Publisher:
        publisher = Publisher(server.urls["rest"], "remote", report_every=0, flush_at_exit=0)
        self.addCleanup(lambda: deferToThread(publisher.close, 5))
        return publisher

    def test_a_bad_event_is_reported_and_the_rest_is_sent(self) -> Deferred[None]:
        def metric(step: int, value: object) -> dict[str, object]:
            event = {"type": "metric", "run": "remote", "name": "loss", "step": step}
            return {**event, "value": value, "time": 1.0}

        async def go() -> None:
            server = await self.serve()
            pub = self.publisher(server)
            # What log() would refuse, as if a server with other rules refused it.
            batch = [metric(s, float(s)) for s in range(10)]
            batch[3] = metric(3, 2**70)
            batch[7] = dict(metric(7, 7.0), colour="red")
            with self.assertLogs("trainstream.client", "WARNING") as logged:
                pub._put(batch)
                self.assertTrue(await deferToThread(pub.flush, 20))
            self.assertEqual(len(logged.records), 2)
            self.assertIn('"step":3', logged.output[0])
            steps = [
                r.event["step"] for r in server.hub.store.after(0, lambda r: r.type == "metric")
            ]
            self.assertEqual(steps, [0, 1, 2, 4, 5, 6, 8, 9])
            self.assertEqual(pub.rejected, 2)
            self.assertEqual([e["step"] for e, _ in pub.rejected_events], [3, 7])
            reasons = [reason for _, reason in pub.rejected_events]
            self.assertIn('field "value" must fit in 64 bits', reasons[0])
            self.assertIn('field "colour" is unknown', reasons[1])

        return Deferred.fromCoroutine(go())

    def test_a_batch_too_large_is_sent_in_halves(self) -> Deferred[None]:
        async def go() -> None:
            server = await self.serve()
            pub = self.publisher(server)
            text = "x" * 60_000
            lines = [
                {
                    "type": "log",
                    "run": "remote",
                    "level": "info",
                    "message": f"{i} {text}",
                    "time": 1.0,
                }
                for i in range(200)  # 12 MB: over the 8 MiB a request may carry
            ]
            pub._put(lines)
            self.assertTrue(await deferToThread(pub.flush, 30))
            got = [r.event["message"] for r in server.hub.store.after(0, lambda r: r.type == "log")]
            self.assertEqual([str(m).split()[0] for m in got], [str(i) for i in range(200)])
            self.assertEqual(pub.rejected, 0)

        return Deferred.fromCoroutine(go())


class PublisherInputTests(SynchronousTestCase):
    def test_bad_input_raises_in_the_caller(self) -> None:
        pub = Publisher("http://127.0.0.1:9", "r", report_every=0, flush_at_exit=0)
        self.addCleanup(pub.close, 0.1)
        for metrics, step in (({"loss": 1}, -1), ({"bad name!": 1}, 1), ({"loss": "x"}, 1)):
            with self.assertRaises(EventError):
                pub.log(metrics, step=step)
        with self.assertRaises(EventError):
            pub.status("sleeping")

    def test_urls(self) -> None:
        self.assertEqual(api_base("http://h:1/api"), ("http", "h", 1, ""))
        self.assertEqual(api_base("h:2/events"), ("http", "h", 2, ""))
        self.assertEqual(api_base("https://h/proxy/api/"), ("https", "h", 443, "/proxy"))
        with self.assertRaises(ValueError):
            api_base("ftp://h")
