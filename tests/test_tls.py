"""
TLS listeners over real loopback: ``--listen ssl:...`` (or ``tls:``) with a
certificate made at test time (a trustme CA and a server certificate for
127.0.0.1 and localhost) serves REST and SSE over https and WebSocket over
wss, every client verifying the server against the test CA; the URLs the
server reports say https and wss; a plain-http client on the TLS port is
served nothing. Tested standalone (``twistd -n trainstream`` as a
subprocess), embedded (``get_stream_server`` in a plain script) and in
process (``StreamServer`` on the test's reactor).
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from typing import Any, TypeVar

import treq
import trustme
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from tests.clients import PLAIN_BIND_SOURCE, RawHTTP, SSEClient, WSClient, plain_bind
from tests.test_processes import proto_pid, script_result, spawn_twistd
from trainstream.errors import ConfigError
from trainstream.listeners import endpoint_string
from trainstream.server import StreamServer

T = TypeVar("T")

TOKEN = "tls-test-token"
#: What a browser (and curl) offers in its TLS hello.
BROWSER_ALPN = [b"h2", b"http/1.1"]
#: Seconds any one wait may take: every wait ends, with a clear failure.
WAIT = 10.0


class Certs:
    """A CA and a server certificate for 127.0.0.1 and localhost, as PEM files."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.ca = trustme.CA()
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.key = os.path.join(directory, "key.pem")
        self.cert = os.path.join(directory, "cert.pem")
        self.ca_file = os.path.join(directory, "ca.pem")
        server.private_key_pem.write_to_path(self.key)
        with open(self.cert, "wb") as f:
            f.write(b"".join(blob.bytes() for blob in server.cert_chain_pems))
        self.ca.cert_pem.write_to_path(self.ca_file)
        self.trust = Certificate.loadPEM(self.ca.cert_pem.bytes())

    def endpoint(self, port: int = 0, scheme: str = "ssl") -> str:
        return f"{scheme}:{port}:privateKey={self.key}:certKey={self.cert}:interface=127.0.0.1"


def within(d: Deferred[T], seconds: float = WAIT) -> Deferred[T]:
    """``d``, failed with a ``TimeoutError`` if it has not fired in ``seconds``."""
    return d.addTimeout(seconds, reactor)


def port_of(url: str) -> int:
    return int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


@implementer(IPolicyForHTTPS)
class TrustOnly:
    """An https policy for treq's Agent: verify against ``trust`` only, offer ``alpn``."""

    def __init__(self, trust: Certificate, alpn: list[bytes] | None = None) -> None:
        self.trust = trust
        self.alpn = alpn

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=self.trust, acceptableProtocols=self.alpn
        )


def https_client(
    test: TestCase, trust: Certificate, alpn: list[bytes] | None = BROWSER_ALPN
) -> Any:
    pool = HTTPConnectionPool(reactor, persistent=False)
    test.addCleanup(pool.closeCachedConnections)
    return treq.client.HTTPClient(Agent(reactor, contextFactory=TrustOnly(trust, alpn), pool=pool))


def tls_endpoint(port: int, trust: Certificate, alpn: list[bytes] | None = BROWSER_ALPN) -> Any:
    return wrapClientTLS(
        optionsForClientTLS("127.0.0.1", trustRoot=trust, acceptableProtocols=alpn),
        TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5),
    )


async def sse_over_tls(port: int, trust: Certificate, path: str, **headers: str) -> SSEClient:
    client = SSEClient(path, headers)
    await within(tls_endpoint(port, trust).connect(Factory.forProtocol(lambda: client)))
    await within(client.started)
    return client


async def wss_connect(port: int, trust: Certificate, path: str) -> WSClient:
    """A wss client on ``path``, connected (its ``hello`` may or may not come)."""
    factory = WebSocketClientFactory(f"wss://127.0.0.1:{port}{path}")
    factory.protocol = WSClient
    factory.setProtocolOptions(closeHandshakeTimeout=2, serverConnectionDropTimeout=2)
    client: WSClient = await within(tls_endpoint(port, trust).connect(factory))
    return client


async def plain_http_to(port: int, request: bytes) -> bytes:
    """What a plain-http client gets from ``port`` until the server closes."""
    client = RawHTTP(request)
    await within(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))
    )
    await within(client.lost)
    return client.raw


def metric(step: int, value: float) -> dict[str, Any]:
    return {"type": "metric", "run": "tls-run", "name": "train/loss", "step": step, "value": value}


class EndpointStringTests(SynchronousTestCase):
    """``tls:`` is accepted for ``ssl:``; Twisted's own ``tls:`` form passes."""

    def test_tls_with_ssl_arguments_is_ssl(self) -> None:
        self.assertEqual(
            endpoint_string("tls:8443:privateKey=k.pem:certKey=c.pem:interface=127.0.0.1"),
            "ssl:8443:privateKey=k.pem:certKey=c.pem:interface=127.0.0.1",
        )
        self.assertEqual(
            endpoint_string("TLS:port=0:privateKey=k.pem"), "ssl:port=0:privateKey=k.pem"
        )

    def test_others_pass_unchanged(self) -> None:
        for description in (
            "ssl:0:privateKey=k.pem",
            "tcp:0:interface=127.0.0.1",
            "tls:/etc/pems:port=8443",  # Twisted's own: a directory of PEMs, by SNI
            "unix:/tmp/s.sock",
        ):
            self.assertEqual(endpoint_string(description), description)


class InProcessTests(TestCase):
    """``StreamServer`` on the test's reactor, TLS clients on loopback."""

    timeout = 30

    def setUp(self) -> None:
        self.certs = Certs(os.path.abspath(self.mktemp()))

    async def started(self, **config: Any) -> StreamServer:
        server = StreamServer({"memory": True, **config}, reactor)
        self.addCleanup(server.stop)
        await within(server.start())
        return server

    def test_browser_alpn_offer_is_served_http11(self) -> Deferred[None]:
        """
        A client that offers ALPN h2 and http/1.1, as browsers and curl do,
        completes the handshake and is answered over http/1.1 (no h2: SSE and
        WebSocket upgrades need HTTP/1.1). Without an answer to ALPN, Twisted
        refused every such client with a TLS internal-error alert.
        """

        async def go() -> None:
            server = await self.started(listen=self.certs.endpoint())
            port = port_of(server.urls["rest"])
            client = RawHTTP(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await within(
                tls_endpoint(port, self.certs.trust).connect(Factory.forProtocol(lambda: client))
            )
            raw = await within(client.answered)
            transport: Any = client.transport
            self.assertEqual(transport.negotiatedProtocol, b"http/1.1")
            self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:200])
            transport.loseConnection()
            await within(client.lost)

        return Deferred.fromCoroutine(go())

    def test_tls_alias_serves_https_and_urls_say_so(self) -> Deferred[None]:
        """``listen=tls:0:privateKey=...`` serves https; urls and health say https/wss."""

        async def go() -> None:
            server = await self.started(listen=self.certs.endpoint(scheme="tls"))
            port = port_of(server.urls["rest"])
            self.assertEqual(
                server.urls,
                {
                    "sse": f"https://127.0.0.1:{port}/events",
                    "ws": f"wss://127.0.0.1:{port}/ws",
                    "rest": f"https://127.0.0.1:{port}/api",
                    "dashboard": f"https://127.0.0.1:{port}/",
                },
            )
            http = https_client(self, self.certs.trust)
            response = await within(http.get(server.urls["rest"] + "/health"))
            self.assertEqual(response.code, 200)
            health = await within(response.json())
            self.assertEqual(health["listeners"]["listen"]["url"], f"https://127.0.0.1:{port}/")

        return Deferred.fromCoroutine(go())

    def test_one_tls_role_among_plain_ones(self) -> Deferred[None]:
        """Three roles, only SSE and REST on TLS: each URL has its own listener's scheme."""

        async def go() -> None:
            server = await self.started(
                sse=self.certs.endpoint(),
                ws="tcp:0:interface=127.0.0.1",
                rest=self.certs.endpoint(),
            )
            urls = server.urls
            self.assertTrue(urls["sse"].startswith("https://127.0.0.1:"), urls)
            self.assertTrue(urls["ws"].startswith("ws://127.0.0.1:"), urls)
            self.assertTrue(urls["rest"].startswith("https://127.0.0.1:"), urls)
            self.assertTrue(urls["dashboard"].startswith("https://127.0.0.1:"), urls)
            http = https_client(self, self.certs.trust)
            response = await within(http.get(urls["rest"] + "/health"))
            health = await within(response.json())
            schemes = {role: li["url"].split(":")[0] for role, li in health["listeners"].items()}
            self.assertEqual(schemes, {"sse": "https", "ws": "http", "rest": "https"})

        return Deferred.fromCoroutine(go())

    def test_server_is_verified_against_the_ca(self) -> Deferred[None]:
        """A client that trusts another CA refuses the server: the certificate is checked."""

        async def go() -> None:
            server = await self.started(listen=self.certs.endpoint())
            other = Certificate.loadPEM(trustme.CA().cert_pem.bytes())
            http = https_client(self, other)
            with self.assertRaises(ResponseNeverReceived):
                await within(http.get(server.urls["rest"] + "/health"))
            response = await within(https_client(self, self.certs.trust).get(server.urls["rest"]))
            self.assertEqual(response.code, 200)
            await within(response.text())

        return Deferred.fromCoroutine(go())

    def test_stop_ends_tls_streams_cleanly_and_frees_the_port(self) -> Deferred[None]:
        """
        A stop with an https SSE stream and a wss session open: the SSE
        response ends with its last chunk (the tracker waits for the TLS
        layer's bytes to reach the client before it resets), the wss client
        gets close 1001, and the port binds again at once without
        SO_REUSEADDR.
        """

        async def go() -> None:
            server = await self.started(listen=self.certs.endpoint())
            port = port_of(server.urls["rest"])
            sse = await sse_over_tls(port, self.certs.trust, "/events")
            ws = await wss_connect(port, self.certs.trust, "/ws")
            await within(ws.hello)
            ws.send_json({"op": "subscribe", "runs": ["*"], "after": 0})
            ws.send_json({"op": "publish", "events": [metric(1, 0.5)]})
            await within(ws.wait_for("ack", 1))
            await within(sse.wait_for(1))
            await within(server.stop())
            await within(sse.lost)
            self.assertTrue(sse.finished_cleanly, sse.raw[-200:])
            self.assertEqual((await within(ws.closed))[1], 1001)
            await within(ws.lost)
            self.assertIsNone(plain_bind(port))

        return Deferred.fromCoroutine(go())

    def test_closes_leave_no_time_wait_on_our_port(self) -> Deferred[None]:
        """
        Connections that end before the stop: an https answer the client
        closes with close_notify (the TLS layer would then close TCP with a
        FIN of ours), a plain-http request (a failed handshake, dropped the
        same way), a client that does not trust the certificate. None leaves
        a TIME_WAIT on our port: after the stop it binds at once without
        SO_REUSEADDR.
        """

        async def go() -> None:
            server = await self.started(listen=self.certs.endpoint())
            port = port_of(server.urls["rest"])
            for _ in range(3):
                response = await within(
                    https_client(self, self.certs.trust).get(server.urls["rest"])
                )
                self.assertEqual(response.code, 200)
                await within(response.text())
            raw = await plain_http_to(port, b"GET /api HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            self.assertFalse(raw.startswith(b"HTTP/"), raw[:200])
            other = Certificate.loadPEM(trustme.CA().cert_pem.bytes())
            with self.assertRaises(ResponseNeverReceived):
                await within(https_client(self, other).get(server.urls["rest"]))
            await within(server.stop())
            self.assertIsNone(plain_bind(port))

        return Deferred.fromCoroutine(go())

    def test_unusable_certificate_or_key_is_named(self) -> Deferred[None]:
        """A missing, mismatched or non-PEM key fails the start with a ConfigError naming it."""
        missing = os.path.join(os.path.dirname(self.certs.key), "missing.pem")
        cases = [
            (
                f"ssl:0:privateKey={missing}:certKey={self.certs.cert}:interface=127.0.0.1",
                f"cannot read {missing}",
            ),
            (
                f"ssl:0:privateKey={self.certs.key}:certKey={self.certs.ca_file}:interface=127.0.0.1",
                "the private key is not the certificate's",
            ),
            (
                f"ssl:0:privateKey={self.certs.cert}:certKey={self.certs.cert}:interface=127.0.0.1",
                "not a PEM file OpenSSL can load",
            ),
        ]

        async def go() -> None:
            for description, words in cases:
                server = StreamServer({"memory": True, "listen": description}, reactor)
                with self.assertRaises(ConfigError) as caught:
                    await within(server.start())
                message = str(caught.exception)
                self.assertIn(words, message)
                self.assertIn(f"--listen {description!r}", message)
                self.assertIn("ssl:PORT:privateKey=KEY.pem:certKey=CERT.pem", message)
                self.assertFalse(server.listening)

        return Deferred.fromCoroutine(go())


class TwistdTLSTests(TestCase):
    """``twistd -n trainstream --listen ssl:...`` in its own process, with a token."""

    timeout = 60

    def test_https_sse_and_wss_with_a_token(self) -> Deferred[None]:
        """
        One TLS port serves everything: the ports file and the startup log
        line say https and wss; health over https (no token needed); REST
        without the token is 401, with it a POST stores two events; SSE over
        https replays them with ids and goes live; wss (``?token=``)
        replays after=0, publishes and is acked, and a wss upgrade without
        the token is refused; a plain-http request to the port is served
        nothing; SIGTERM ends the streams and frees the port.
        """
        certs = Certs(os.path.abspath(self.mktemp()))
        ports_file = os.path.abspath(self.mktemp())
        auth = {"Authorization": f"Bearer {TOKEN}"}

        async def go() -> None:
            proto = spawn_twistd(
                self,
                f"--listen={certs.endpoint()}",
                f"--ports-file={ports_file}",
                "--memory",
                f"--token={TOKEN}",
            )
            await within(proto.listening, 30)
            with open(ports_file) as f:
                urls = json.load(f)
            port = port_of(urls["rest"])
            self.assertEqual(
                urls,
                {
                    "sse": f"https://127.0.0.1:{port}/events",
                    "ws": f"wss://127.0.0.1:{port}/ws",
                    "rest": f"https://127.0.0.1:{port}/api",
                    "dashboard": f"https://127.0.0.1:{port}/",
                },
            )
            log = proto.output.decode(errors="replace")
            self.assertIn(f"'rest': 'https://127.0.0.1:{port}/api'", log)
            self.assertIn(f"'ws': 'wss://127.0.0.1:{port}/ws'", log)
            self.assertNotIn("http://", log)

            http = https_client(self, certs.trust)
            response = await within(http.get(urls["rest"] + "/health"))
            self.assertEqual(response.code, 200)
            self.assertEqual((await within(response.json()))["status"], "ok")

            response = await within(http.get(urls["rest"] + "/events"))
            self.assertEqual(response.code, 401)
            await within(response.text())
            response = await within(
                http.post(
                    urls["rest"] + "/events",
                    json.dumps([metric(1, 0.5), metric(2, 0.25)]).encode(),
                    headers={**auth, "Content-Type": "application/json"},
                )
            )
            self.assertEqual(response.code, 200)
            self.assertEqual(
                await within(response.json()), {"accepted": 2, "first_id": 1, "last_id": 2}
            )

            sse = await sse_over_tls(port, certs.trust, "/events?last_event_id=0", **auth)
            await within(sse.wait_for(2))
            head = sse.raw.split(b"\r\n\r\n", 1)[0].lower()
            self.assertTrue(head.startswith(b"http/1.1 200 "), head)
            self.assertIn(b"content-type: text/event-stream", head)
            self.assertIn(b"id: 1\n", sse.raw)
            self.assertIn(b"id: 2\n", sse.raw)
            self.assertEqual([(e["id"], e["value"]) for e in sse.events], [(1, 0.5), (2, 0.25)])

            ws = await wss_connect(port, certs.trust, f"/ws?token={TOKEN}")
            self.assertEqual((await within(ws.hello))["last_id"], 2)
            ws.send_json({"op": "subscribe", "runs": ["*"], "after": 0})
            await within(ws.wait_for("event", 2))
            ws.send_json({"op": "publish", "events": [metric(3, 0.125)]})
            await within(ws.wait_for("ack", 1))
            ack = next(m for m in ws.messages if m["op"] == "ack")
            self.assertEqual((ack["accepted"], ack["first_id"], ack["last_id"]), (1, 3, 3))
            await within(ws.wait_for("event", 3))
            self.assertEqual([e["id"] for e in ws.events], [1, 2, 3])
            await within(sse.wait_for(3))  # live, across transports
            self.assertEqual(sse.events[2]["value"], 0.125)

            refused = await wss_connect(port, certs.trust, "/ws")
            await within(refused.closed)
            self.assertFalse(refused.hello.called)
            self.assertEqual(refused.messages, [])

            for request in (
                f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {TOKEN}\r\n\r\n",
                f"GET /events?token={TOKEN}&last_event_id=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Accept: text/event-stream\r\n\r\n",
            ):
                raw = await plain_http_to(port, request.encode())
                self.assertFalse(raw.startswith(b"HTTP/"), raw[:200])
                self.assertNotIn(b"tls-run", raw)
            # And the port still serves TLS after the plain-http noise.
            response = await within(http.get(urls["rest"] + "/health"))
            self.assertEqual(response.code, 200)
            await within(response.text())

            os.kill(proto_pid(proto), signal.SIGTERM)
            code = await within(proto.ended, 30)
            self.assertEqual(
                (code, proto.signal), (None, signal.SIGTERM), proto.output.decode(errors="replace")
            )
            await within(sse.lost)
            self.assertTrue(sse.finished_cleanly, sse.raw[-200:])
            self.assertEqual((await within(ws.closed))[1], 1001)
            await within(ws.lost)
            self.assertIsNone(plain_bind(port))
            self.assertNotIn("Traceback", proto.output.decode(errors="replace"))
            self.assertNotIn(TOKEN, proto.output.decode(errors="replace"))

        return Deferred.fromCoroutine(go())


EMBEDDED_TLS = PLAIN_BIND_SOURCE + textwrap.dedent(
    """
    import json, socket, ssl, sys, urllib.request
    import trainstream


    listen, ca_file = sys.argv[1], sys.argv[2]
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["h2", "http/1.1"])  # as a browser offers
    out = {}
    server = trainstream.get_stream_server({"listen": listen, "memory": True})
    out["urls"] = server.urls
    port = int(server.urls["rest"].rsplit(":", 1)[1].split("/")[0])
    with urllib.request.urlopen(server.urls["rest"] + "/health", context=context, timeout=10) as r:
        out["health"] = json.load(r)["status"]
    run = server.run("embedded-tls")
    run.log({"train/loss": 0.5}, step=1)
    run.flush()
    url = server.urls["rest"] + "/events?type=metric"
    with urllib.request.urlopen(url, context=context, timeout=10) as r:
        out["values"] = [e["value"] for e in json.load(r)["events"]]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            out["alpn"] = s.selected_alpn_protocol()
            s.sendall(b"GET /events?type=metric&last_event_id=0 HTTP/1.1\\r\\n"
                      b"Host: 127.0.0.1\\r\\nAccept: text/event-stream\\r\\n\\r\\n")
            data = b""
            while b"train/loss" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            out["sse"] = data.decode("utf-8", "replace")
    trainstream.release_stream_server()
    out["running"] = trainstream.get_stream_server_manager().is_server_running()
    out["bind"] = plain_bind(port)
    print("RESULT " + json.dumps(out))
    """
)


class EmbeddedTLSTests(SynchronousTestCase):
    def test_embedded_server_serves_https_and_frees_its_port(self) -> None:
        """
        ``get_stream_server({"listen": "ssl:0:..."})`` in a plain script:
        its urls say https/wss; health, a logged metric (REST) and an SSE
        stream come over https to a client that verifies the CA and offers
        ALPN; after ``release_stream_server()`` the port binds at once.
        """
        certs = Certs(os.path.abspath(self.mktemp()))
        result, out = script_result(EMBEDDED_TLS, certs.endpoint(), certs.ca_file, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        port = port_of(out["urls"]["rest"])
        self.assertEqual(out["urls"]["sse"], f"https://127.0.0.1:{port}/events")
        self.assertEqual(out["urls"]["ws"], f"wss://127.0.0.1:{port}/ws")
        self.assertEqual(out["health"], "ok")
        self.assertEqual(out["values"], [0.5])
        self.assertEqual(out["alpn"], "http/1.1")
        self.assertIn("text/event-stream", out["sse"])
        self.assertIn("event: metric", out["sse"])
        self.assertFalse(out["running"])
        self.assertIsNone(out["bind"])
