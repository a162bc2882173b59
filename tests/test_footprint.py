"""
What trainstream costs to install and to keep running idle:

- the wheel and sdist built from the tree ship uPlot's vendored files and
  its MIT license, and require no ``uplot-python``;
- static files are served gzipped to clients that accept it, with a strong
  ETag per representation, and answer 304 to a matching ``If-None-Match``;
- in a fresh interpreter, ``import trainstream`` and an idle embedded server
  load neither Autobahn (whose Twisted package imports its WAMP code and
  ``cryptography``) nor TLS, rich or numpy (checked in the child's ``sys.modules``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from tests.clients import ANY_PORTS
from trainstream.server import StreamServer
from trainstream.web.dashboard import UPLOT_FILES, accepts_gzip, matches, uplot_dir

REPO = Path(__file__).resolve().parent.parent
#: upstream's uPlot 1.6.16 build (github.com/leeoniya/uPlot, tag 1.6.16, dist/).
UPLOT_SHA256 = {
    "uPlot.iife.js": "655bc8aa33781e8721c5af6b59f1699c03c9bda951aa74a6ab518ac20cc4326d",
    "uPlot.min.css": "3f121cd4a997b634e07a887658850018e475c26f0bddd874109a8d382c19de87",
}
DASHBOARD = "trainstream/web/dashboard/"
CHILD_TIMEOUT_S = 60


def d(coro: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coro)


class VendoredUPlotTests(SynchronousTestCase):
    def test_files_are_upstreams_with_license(self) -> None:
        """The vendored files are upstream's 1.6.16 build, and the MIT license is beside them."""
        directory = uplot_dir()
        assert directory is not None
        for name, digest in UPLOT_SHA256.items():
            self.assertEqual(hashlib.sha256((directory / name).read_bytes()).hexdigest(), digest)
        self.assertIn(b"(v1.6.16)", (directory / "uPlot.iife.js").read_bytes()[:400])
        license_text = (directory / "uPlot.LICENSE").read_text(encoding="utf-8")
        self.assertIn("The MIT License", license_text)
        self.assertIn("Leon Sorokin", license_text)

    def test_wheel_and_sdist_ship_them(self) -> None:
        """
        The wheel and sdist setuptools builds from a copy of the tree hold
        uPlot's files and license; the wheel requires no uplot-python.
        """
        scratch = Path(tempfile.mkdtemp(prefix="trainstream-dist-"))
        self.addCleanup(shutil.rmtree, scratch, True)
        source = scratch / "src"
        source.mkdir()
        for name in ("setup.cfg", "pyproject.toml", "README.md"):
            shutil.copy(REPO / name, source / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
        for name in ("trainstream", "twisted"):
            shutil.copytree(REPO / name, source / name, ignore=ignore)
        out = scratch / "dist"
        out.mkdir()
        built = subprocess.run(
            [
                sys.executable,
                "-c",
                "import os, sys; from setuptools import build_meta as b; sys.argv[1:] = []; "
                "out = os.environ['DIST_DIR']; print(b.build_wheel(out), b.build_sdist(out))",
            ],
            env={**os.environ, "DIST_DIR": str(out)},
            cwd=source,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
        )
        self.assertEqual(built.returncode, 0, built.stderr[-2000:])
        wheel_name, sdist_name = built.stdout.splitlines()[-1].split()
        wanted = {*UPLOT_FILES, "index.html", "app.js", "app.css", "favicon.svg"}
        directory = uplot_dir()
        assert directory is not None
        with zipfile.ZipFile(out / wheel_name) as wheel:
            names = set(wheel.namelist())
            metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
            requires = [
                line
                for line in wheel.read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:")
            ]
            for name in UPLOT_SHA256:
                self.assertEqual(wheel.read(DASHBOARD + name), (directory / name).read_bytes())
        self.assertLessEqual({DASHBOARD + n for n in wanted}, names)
        self.assertFalse([r for r in requires if "uplot" in r.lower()], requires)
        with tarfile.open(out / sdist_name) as sdist:
            top = sdist.getnames()[0].split("/")[0]
            in_sdist = set(sdist.getnames())
        self.assertLessEqual({f"{top}/{DASHBOARD}{n}" for n in wanted}, in_sdist)


class FakeRequest:
    def __init__(self, **headers: bytes) -> None:
        self.headers = {k.replace("_", "-").encode(): v for k, v in headers.items()}

    def getHeader(self, name: bytes) -> bytes | None:
        return self.headers.get(name)


class NegotiationTests(SynchronousTestCase):
    def test_accept_encoding(self) -> None:
        """gzip, x-gzip or ``*`` with q > 0 allows gzip; q=0, other codings or none do not."""
        for header, ok in (
            (b"gzip, deflate, br", True),
            (b"deflate, GZIP;q=0.5", True),
            (b"*", True),
            (b"x-gzip", True),
            (b"gzip;q=0", False),
            (b"gzip;q=0.0, br", False),
            (b"br, deflate", False),
            (b"identity", False),
            (b"", False),
            (None, False),
        ):
            request: Any = FakeRequest() if header is None else FakeRequest(accept_encoding=header)
            self.assertEqual(accepts_gzip(request), ok, header)

    def test_if_none_match(self) -> None:
        """A list, ``*`` and weak tags match; another tag or no header does not."""
        etag = b'"abc"'
        self.assertTrue(matches(b'"abc"', etag))
        self.assertTrue(matches(b'"x", W/"abc"', etag))
        self.assertTrue(matches(b"*", etag))
        self.assertFalse(matches(b'"abc-gzip"', etag))
        self.assertFalse(matches(None, etag))


class CompressedStaticTests(TestCase):
    """Static files over a real loopback port, read raw (no decoding agent)."""

    def setUp(self) -> Deferred[Any]:  # type: ignore[override]
        self.server = StreamServer(dict(ANY_PORTS), reactor)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)
        self.addCleanup(self.server.stop)
        return self.server.start()

    async def get(self, path: str, **headers: bytes) -> tuple[int, dict[str, str], bytes]:
        url = self.server.urls["rest"].rsplit("/api", 1)[0] + path
        raw = Headers({k.replace("_", "-").encode(): [v] for k, v in headers.items()})
        response = await self.agent.request(b"GET", url.encode(), raw)
        body = await readBody(response)
        heads = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        return response.code, heads, body

    def test_gzip_etag_and_304(self) -> Deferred[None]:
        """
        uPlot and app.js: gzip when accepted (Vary says so), each
        representation its own strong ETag, 304 with no body when it matches.
        """

        async def go() -> None:
            directory = uplot_dir()
            assert directory is not None
            for name in ("uPlot.iife.js", "app.js", "uPlot.min.css"):
                plain = (directory / name).read_bytes()
                code, heads, body = await self.get(f"/static/{name}", accept_encoding=b"gzip")
                self.assertEqual(code, 200)
                self.assertEqual(heads.get("content-encoding"), "gzip")
                self.assertEqual(heads["vary"], "Accept-Encoding")
                self.assertEqual(gzip.decompress(body), plain)
                self.assertLess(len(body), len(plain) * 0.5)
                zipped_tag = heads["etag"]
                self.assertTrue(zipped_tag.startswith('"'), zipped_tag)  # strong, not W/
                self.assertIn("cache-control", heads)

                code, heads, body = await self.get(f"/static/{name}")
                self.assertEqual(code, 200)
                self.assertNotIn("content-encoding", heads)
                self.assertEqual(body, plain)
                self.assertNotEqual(heads["etag"], zipped_tag)

                code, heads, body = await self.get(
                    f"/static/{name}", accept_encoding=b"gzip", if_none_match=zipped_tag.encode()
                )
                self.assertEqual((code, body), (304, b""))
                self.assertEqual(heads["etag"], zipped_tag)

        return d(go())

    def test_caching_headers(self) -> Deferred[None]:
        """Our files revalidate on each use, uPlot's stay fresh a day; the page is no-store."""

        async def go() -> None:
            _, heads, _ = await self.get("/static/app.js")
            self.assertEqual(heads["cache-control"], "no-cache")
            _, heads, _ = await self.get("/static/uPlot.iife.js")
            self.assertIn("max-age=86400", heads["cache-control"])
            code, heads, _ = await self.get("/static/uPlot.LICENSE")
            self.assertEqual(code, 200)
            _, heads, _ = await self.get("/", accept_encoding=b"gzip")
            self.assertEqual(heads["cache-control"], "no-store")

        return d(go())


#: Run in a fresh interpreter: what ``import trainstream`` loads, then what
#: an idle embedded memory server loads. ``block`` names modules made
#: unimportable, as a ``pip install .`` without the tls extra has no pyOpenSSL.
CHILD = """
import json, sys
block = set(sys.argv[1].split(",")) - {""}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in block:
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
sys.meta_path.insert(0, Block())
import trainstream
after_import = sorted(sys.modules)
server = trainstream.get_stream_server(config={
    "memory": True, "demo": False, "sse": "tcp:0:interface=127.0.0.1",
    "ws": "tcp:0:interface=127.0.0.1", "rest": "tcp:0:interface=127.0.0.1"})
import urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(server.urls["rest"] + "/health", timeout=10) as answer:
    assert answer.status == 200
with opener.open(server.urls["dashboard"], timeout=10) as answer:
    assert answer.status == 200
idle = sorted(sys.modules)
trainstream.release_stream_server()
print(json.dumps({"import": after_import, "idle": idle}))
"""


def run_child(testcase: SynchronousTestCase, code: str, *args: str) -> str:
    """Run ``python -c code args`` from the tree in a fresh interpreter; its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tempfile.gettempdir(),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    testcase.assertEqual(done.returncode, 0, done.stderr[-2000:])
    return done.stdout


def child_modules(testcase: SynchronousTestCase, block: str = "") -> dict[str, set[str]]:
    report = json.loads(run_child(testcase, CHILD, block).strip().splitlines()[-1])
    return {k: set(v) for k, v in report.items()}


def loaded(modules: set[str], *prefixes: str) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


class IdleImportsTests(SynchronousTestCase):
    def test_import_trainstream_is_light(self) -> None:
        """``import trainstream`` loads no Twisted, Autobahn, TLS, rich or numpy."""
        modules = child_modules(self)["import"]
        self.assertEqual(
            loaded(modules, "twisted", "autobahn", "OpenSSL", "cryptography", "rich", "numpy"), []
        )

    def test_terminal_commands_import_rich_only_to_draw(self) -> None:
        """The CLI's modules load rich only when ``watch`` draws (inside its functions)."""
        out = run_child(
            self,
            "import sys, trainstream.__main__, trainstream.cli.watch, "
            "trainstream.cli.render, trainstream.cli.tail; "
            "print([m for m in sys.modules if m.split('.')[0] == 'rich'])",
        )
        self.assertEqual(out.strip(), "[]")

    def test_idle_server_loads_no_websocket_code(self) -> None:
        """
        An idle embedded server (health and page served, no WebSocket client)
        has not imported Autobahn, so none of its WAMP code either.
        """
        idle = child_modules(self)["idle"]
        self.assertEqual(loaded(idle, "autobahn", "trainstream.web.ws"), [])

    def test_idle_server_loads_no_prometheus_client(self) -> None:
        """``/metrics`` loads ``prometheus_client`` when first asked for, not before."""
        idle = child_modules(self)["idle"]
        self.assertEqual(loaded(idle, "prometheus_client"), [])

    def test_idle_server_loads_no_tls(self) -> None:
        """
        Without pyOpenSSL (a ``pip install .`` without the tls extra), an
        idle server loads no ``cryptography`` or ``service_identity`` either.
        (With pyOpenSSL installed, Twisted's own reactor imports it.)
        """
        idle = child_modules(self, block="OpenSSL")["idle"]
        self.assertEqual(loaded(idle, "OpenSSL", "cryptography", "service_identity"), [])


#: twistd's service made as twistd makes it, then what an embedded call in
#: that process does before the reactor runs; prints the modules and threads.
TWISTD_SERVICE_CHILD = """
import json, sys, threading
from trainstream.tap import Options, makeService
options = Options()
options.parseOptions(["--memory"])
makeService(options)
made = sorted(sys.modules)
from trainstream.embedded import ensure_reactor_thread
ensure_reactor_thread()
print(json.dumps({"made": made, "threads": threading.active_count()}))
"""


class TwistdImportsTests(SynchronousTestCase):
    def test_twistd_service_needs_no_crochet(self) -> None:
        """
        twistd owns the reactor, so its service imports no crochet (nor its
        wrapt), and an embedded call in that process, even one made before
        the reactor runs, starts no reactor thread of its own.
        """
        report = json.loads(run_child(self, TWISTD_SERVICE_CHILD).strip().splitlines()[-1])
        self.assertEqual(loaded(set(report["made"]), "crochet", "wrapt"), [])
        self.assertEqual(report["threads"], 1)


class HostedCrochetTests(TestCase):
    def test_told_in_the_reactor_thread_once(self) -> Deferred[None]:
        """
        In a process whose reactor runs already (twistd's, adopted), the
        first embedded call from another thread has crochet's no_setup run
        in the reactor's thread (it adds a shutdown trigger), and only once.
        """
        import crochet
        from twisted.internet.threads import deferToThread
        from twisted.python import threadable

        from trainstream import embedded

        where: list[bool] = []
        self.patch(embedded, "_hosted", True)
        self.patch(embedded, "_told_crochet", False)
        self.patch(crochet, "no_setup", lambda: where.append(threadable.isInIOThread()))

        def twice() -> None:
            embedded.ensure_reactor_thread()
            embedded.ensure_reactor_thread()

        return deferToThread(twice).addCallback(lambda _: self.assertEqual(where, [True]))
