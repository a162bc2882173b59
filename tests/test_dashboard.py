"""
The dashboard at ``/``: its files as the server sends them, and the page
itself in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium) against real servers: history
and live points, a run that starts after the page opened, a rewind, a
token, and a server restart on the same port with a persistent history.

Selenium blocks, so every browser call runs in a thread (``deferToThread``)
while the server runs in the trial reactor or in a ``twistd`` child.
Screenshots go to each test's temporary directory; their paths are printed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import HTTPConnectionPool

from tests.clients import ANY_PORTS
from tests.test_processes import proto_pid, spawn_twistd
from trainstream.service import StreamServer
from trainstream.web.dashboard import CONTENT_SECURITY_POLICY, uplot_dir

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 30.0


def d(coro: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coro)


def metric(run: str, step: int, value: float | str, name: str = "train/loss") -> dict[str, Any]:
    return {"type": "metric", "run": run, "name": name, "step": step, "value": value}


def need_browser() -> None:
    """Skip (saying why) when the machine has no Chromium: CI installs it."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        reason = (
            f"{' and '.join(missing)} not installed: "
            "apt-get install -y chromium chromium-driver to run the browser tests"
        )
        print(f"\nSKIP dashboard browser test: {reason}")
        raise SkipTest(reason)
    try:
        import selenium  # noqa: F401
    except ImportError:
        print("\nSKIP dashboard browser test: selenium is not installed")
        raise SkipTest("selenium is not installed (pip install selenium)") from None


class Browser:
    """One headless Chromium; every method blocks (call it from a thread)."""

    def __init__(self) -> None:
        # Never let Selenium Manager look for or download a browser or driver.
        os.environ["SE_AVOID_BROWSER_DOWNLOAD"] = "true"
        os.environ["SE_OFFLINE"] = "true"
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="trainstream-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1400,900",
            f"--user-data-dir={self.profile}",
        ):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(
            service=Service(executable_path=CHROMEDRIVER), options=options
        )
        self.logs: list[dict[str, Any]] = []

    def get(self, url: str) -> None:
        self.driver.get(url)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, script: str, predicate: Callable[[Any], bool], what: str) -> Any:
        """Poll ``script`` until ``predicate`` holds for its value; fail after WAIT_S."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.wait import WebDriverWait

        last: list[Any] = [None]

        def check(_: Any) -> bool:
            last[0] = self.js(script)
            return predicate(last[0])

        try:
            WebDriverWait(self.driver, WAIT_S, poll_frequency=0.05).until(check)
        except TimeoutException:
            raise AssertionError(f"timed out waiting for {what}; last value: {last[0]!r}") from None
        return last[0]

    def points(self, run: str, name: str) -> list[int] | None:
        value: list[int] | None = self.js(
            "return window.trainstream.points(...arguments)", run, name
        )
        return value

    def screenshot(self, path: str) -> str:
        self.driver.save_screenshot(path)
        print(f"\nscreenshot: {path}")
        return path

    def browser_logs(self) -> list[dict[str, Any]]:
        self.logs += self.driver.get_log("browser")
        return self.logs

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


def severe(logs: list[dict[str, Any]], allowed: tuple[str, ...] = ()) -> list[str]:
    return [
        str(entry["message"])
        for entry in logs
        if entry.get("level") == "SEVERE" and not any(a in str(entry["message"]) for a in allowed)
    ]


STATUS = "return window.trainstream && window.trainstream.status()"


def loaded(status: Any) -> bool:
    return bool(status) and not status["loading"] and status["connection"] == "live"


class DashboardFilesTests(TestCase):
    """What the server sends for ``/`` and ``/static/``: no browser needed."""

    def setUp(self) -> Deferred[Any]:
        self.server = StreamServer(dict(ANY_PORTS, token="s3cret"), reactor)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.server.stop)
        return self.server.start()

    async def get(self, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        url = self.server.urls["rest"].rsplit("/api", 1)[0] + path
        response = await treq.get(
            url, headers={k.replace("_", "-"): [v] for k, v in headers.items()}, pool=self.pool
        )
        body = await response.content()
        heads = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        return response.code, heads, body

    def test_page_carries_token_to_its_files(self) -> Deferred[None]:
        """``/?token=T``: the page's file URLs carry the token, and the page a strict CSP."""

        async def go() -> None:
            code, heads, body = await self.get("/?token=s3cret")
            self.assertEqual(code, 200)
            self.assertTrue(heads["content-type"].startswith("text/html"))
            self.assertEqual(heads["content-security-policy"], CONTENT_SECURITY_POLICY.decode())
            self.assertEqual(heads["referrer-policy"], "no-referrer")
            self.assertIn(b'src="static/app.js?token=s3cret"', body)
            self.assertIn(b'href="static/uPlot.min.css?token=s3cret"', body)
            self.assertNotIn(b"{{query}}", body)
            code, _, _ = await self.get("/")
            self.assertEqual(code, 401)
            code, _, _ = await self.get("/static/app.js")
            self.assertEqual(code, 401)

        return d(go())

    def test_token_is_escaped_in_the_page(self) -> Deferred[None]:
        """A token is percent-encoded into the page, never raw HTML."""

        async def go() -> None:
            self.server.site.access.token = b'a"<b>'  # type: ignore[attr-defined]
            code, _, body = await self.get('/?token=a"<b>')
            self.assertEqual(code, 200)
            self.assertIn(b"static/app.js?token=a%22%3Cb%3E", body)
            self.assertNotIn(b"<b>", body)

        return d(go())

    def test_static_files(self) -> Deferred[None]:
        """uPlot comes from the uplot-python wheel; files revalidate with an ETag."""

        async def go() -> None:
            auth = {"authorization": "Bearer s3cret"}
            code, heads, body = await self.get("/static/uPlot.iife.js", **auth)
            self.assertEqual(code, 200)
            self.assertTrue(heads["content-type"].startswith("text/javascript"))
            directory = uplot_dir()
            assert directory is not None
            self.assertEqual(body, (directory / "uPlot.iife.js").read_bytes())
            code, heads, body = await self.get("/static/app.js", **auth)
            self.assertEqual(code, 200)
            self.assertIn(b"window.trainstream", body)
            code, _, body = await self.get("/static/app.js", if_none_match=heads["etag"], **auth)
            self.assertEqual((code, body), (304, b""))
            for name, ctype in (("app.css", "text/css"), ("favicon.svg", "image/svg+xml")):
                code, heads, _ = await self.get(f"/static/{name}", **auth)
                self.assertEqual(code, 200)
                self.assertTrue(heads["content-type"].startswith(ctype))
            code, _, _ = await self.get("/static/nope.js", **auth)
            self.assertEqual(code, 404)

        return d(go())


class BrowserTestCase(TestCase):
    timeout = 120

    def setUp(self) -> None:
        need_browser()
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.shots = os.path.abspath(self.mktemp())
        os.makedirs(self.shots)

    async def browser(self) -> Browser:
        browser: Browser = await deferToThread(Browser)
        self.addCleanup(deferToThread, browser.quit)
        return browser

    def shot(self, browser: Browser, name: str) -> Deferred[str]:
        return deferToThread(browser.screenshot, os.path.join(self.shots, name))

    async def post(self, base: str, events: list[dict[str, Any]], token: str | None = None) -> Any:
        headers = {"content-type": ["application/json"]}
        if token:
            headers["authorization"] = [f"Bearer {token}"]
        response = await treq.post(
            base + "/api/events", data=json.dumps(events).encode(), headers=headers, pool=self.pool
        )
        body = json.loads(await response.text())
        self.assertEqual(response.code, 200, body)
        return body

    async def wait_points(
        self, browser: Browser, run: str, name: str, expected: list[int]
    ) -> list[int]:
        got: list[int] = await deferToThread(
            browser.wait,
            f"return window.trainstream.points({json.dumps(run)}, {json.dumps(name)})",
            lambda v: v is not None and len(v) >= len(expected),
            f"{len(expected)} points of {run} {name}",
        )
        return got


class InProcessBrowserTests(BrowserTestCase):
    """The page against a server in the trial reactor."""

    token: str | None = None

    def setUp(self) -> Deferred[Any]:  # type: ignore[override]
        super().setUp()
        config = dict(ANY_PORTS)
        if self.token:
            config["token"] = self.token
        self.server = StreamServer(config, reactor)
        self.addCleanup(self.server.stop)
        started: Deferred[Any] = self.server.start()
        return started

    @property
    def base(self) -> str:
        return self.server.urls["rest"].rsplit("/api", 1)[0]

    def page(self) -> str:
        return self.base + "/" + (f"?token={self.token}" if self.token else "")

    def test_loads_history_without_console_errors(self) -> Deferred[None]:
        """
        History published before the page opened is drawn (a run name with
        '/', NaN values, two runs on one chart, hparams, a log line); the
        browser logs no error; screenshots in light and dark.
        """

        async def go() -> None:
            history = [
                {"type": "hparams", "run": "exp/a", "params": {"lr": 0.001, "batch": 64}},
                *(metric("exp/a", s, 1.0 / (s + 1)) for s in range(300)),
                *(metric("exp/a", s, 0.5 + s / 600, "val/acc") for s in range(0, 300, 10)),
                *(metric("exp-b", s, 1.2 / (s + 1) + 0.01) for s in range(200)),
                metric("exp-b", 200, "NaN"),
                {"type": "log", "run": "exp/a", "level": "warning", "message": "warmup over"},
                {"type": "status", "run": "exp-b", "state": "failed", "message": "CUDA OOM"},
            ]
            await self.post(self.base, history, self.token)
            browser = await self.browser()
            await deferToThread(browser.get, self.page())
            status = await deferToThread(browser.wait, STATUS, loaded, "the page to load")
            self.assertEqual(sorted(status["charts"]), ["train/loss", "val/acc"])
            states = {r["run"]: r["state"] for r in status["runs"]}
            self.assertEqual(states, {"exp/a": "running", "exp-b": "failed"})
            self.assertEqual(
                await self.wait_points(browser, "exp/a", "train/loss", list(range(300))),
                list(range(300)),
            )
            self.assertEqual(
                await deferToThread(browser.points, "exp-b", "train/loss"), list(range(201))
            )
            await deferToThread(
                browser.wait,
                STATUS,
                lambda s: sorted(s["drawn"]) == ["train/loss", "val/acc"],
                "both charts drawn",
            )
            # The run list, the event panel and (after a click) the hparams.
            text = await deferToThread(browser.js, "return document.body.innerText")
            for expected in ("exp/a", "exp-b", "failed", "warmup over", "CUDA OOM"):
                self.assertIn(expected, text)
            await deferToThread(
                browser.js,
                "[...document.querySelectorAll('#runs li')]"
                ".find(li => li.title === 'exp/a').click()",
            )
            hparams = await deferToThread(
                browser.wait,
                "return document.getElementById('hparams').innerText",
                lambda t: "batch" in t,
                "hparams of exp/a",
            )
            self.assertIn("0.001", hparams)
            await self.shot(browser, "history-light.png")
            await deferToThread(browser.js, "document.getElementById('theme').click()")
            theme = await deferToThread(browser.js, "return document.documentElement.dataset.theme")
            self.assertEqual(theme, "dark")
            await deferToThread(
                browser.wait, STATUS, lambda s: len(s["drawn"]) == 2, "charts redrawn in dark"
            )
            await self.shot(browser, "history-dark.png")
            logs = await deferToThread(browser.browser_logs)
            self.assertEqual(severe(logs), [])

        return d(go())

    def test_run_started_after_page_opened_grows_live(self) -> Deferred[None]:
        """A run that starts after the page opened shows up, and its chart gains points live."""

        async def go() -> None:
            browser = await self.browser()
            await deferToThread(browser.get, self.page())
            await deferToThread(browser.wait, STATUS, loaded, "the page to load")
            self.assertIsNone(await deferToThread(browser.points, "late/run", "train/loss"))
            await self.post(
                self.base, [metric("late/run", s, 1.0 / (s + 1)) for s in range(20)], self.token
            )
            first = await self.wait_points(browser, "late/run", "train/loss", list(range(20)))
            self.assertEqual(first, list(range(20)))
            for batch in range(20, 100, 20):
                await self.post(
                    self.base,
                    [metric("late/run", s, 1.0 / (s + 1)) for s in range(batch, batch + 20)],
                    self.token,
                )
            grown = await self.wait_points(browser, "late/run", "train/loss", list(range(100)))
            self.assertEqual(grown, list(range(100)))
            status = await deferToThread(
                browser.wait, STATUS, lambda s: "train/loss" in s["drawn"], "the chart drawn"
            )
            self.assertEqual([r["run"] for r in status["runs"]], ["late/run"])
            drawn = await deferToThread(
                browser.js,
                "return document.querySelector('.chart .u-over') !== null",
            )
            self.assertTrue(drawn)
            await self.shot(browser, "live.png")
            logs = await deferToThread(browser.browser_logs)
            self.assertEqual(severe(logs), [])

        return d(go())

    def test_rewind_drops_stale_tail(self) -> Deferred[None]:
        """
        A run resumed from a checkpoint: each chart of the run keeps the
        steps below ``rewind_to``, then the new ones.
        """

        async def go() -> None:
            history = [metric("r", s, float(s)) for s in range(50)]
            history += [metric("r", s, 1.0, "val/loss") for s in range(0, 50, 10)]
            await self.post(self.base, history, self.token)
            browser = await self.browser()
            await deferToThread(browser.get, self.page())
            await deferToThread(browser.wait, STATUS, loaded, "the page to load")
            await self.wait_points(browser, "r", "train/loss", list(range(50)))
            await self.post(
                self.base, [metric("r", s, -float(s)) for s in range(30, 40)], self.token
            )
            steps = await deferToThread(
                browser.wait,
                "return window.trainstream.points('r', 'train/loss')",
                lambda v: v is not None and v[-1] == 39 and len(v) == 40,
                "the rewound series",
            )
            self.assertEqual(steps, list(range(40)))
            values = await deferToThread(
                browser.js, "return window.trainstream.values('r', 'train/loss')"
            )
            self.assertEqual(values[29:], [29.0, *(-float(s) for s in range(30, 40))])
            # A series of the run that did not go back drops its stale tail too.
            val = await deferToThread(browser.points, "r", "val/loss")
            self.assertEqual(val, [0, 10, 20])
            text = await deferToThread(browser.js, "return document.body.innerText")
            self.assertIn("rewound to step 30", text)

        return d(go())


class TokenBrowserTests(InProcessBrowserTests):
    """The same page with ``--token``: REST with the header, SSE with ``?token=``."""

    token = "t0k-en"


class RestartBrowserTests(BrowserTestCase):
    def test_resumes_after_server_restart_without_duplicates(self) -> Deferred[None]:
        """
        ``twistd`` with a ``--db`` file: the page has history and live
        points; SIGTERM; a new ``twistd`` on the same port and file; the page
        reconnects by itself and gets the points published since, with no
        step twice and none missing.
        """
        db = os.path.abspath(self.mktemp())
        ports_file = os.path.abspath(self.mktemp())

        async def go() -> None:
            first = spawn_twistd(
                self,
                f"--db={db}",
                "--listen=tcp:0:interface=127.0.0.1",
                f"--ports-file={ports_file}",
                "--close-timeout=0.5",
            )
            await first.listening
            with open(ports_file) as f:
                urls = json.load(f)
            base = urls["rest"].rsplit("/api", 1)[0]
            port = int(base.rsplit(":", 1)[1])
            await self.post(base, [metric("resumed", s, 1.0 / (s + 1)) for s in range(50)])
            browser = await self.browser()
            await deferToThread(browser.get, base + "/")
            before = await deferToThread(browser.wait, STATUS, loaded, "the page to load")
            await self.post(base, [metric("resumed", s, 1.0 / (s + 1)) for s in range(50, 60)])
            await self.wait_points(browser, "resumed", "train/loss", list(range(60)))
            await self.shot(browser, "before-restart.png")

            os.kill(proto_pid(first), signal.SIGTERM)
            await first.ended
            await deferToThread(
                browser.wait,
                STATUS,
                lambda s: s["connection"] != "live",
                "the page to notice the server went away",
            )
            second = spawn_twistd(
                self,
                f"--db={db}",
                f"--listen=tcp:{port}:interface=127.0.0.1",
                "--close-timeout=0.5",
            )
            await second.listening
            await self.post(base, [metric("resumed", s, 1.0 / (s + 1)) for s in range(60, 100)])
            steps = await self.wait_points(browser, "resumed", "train/loss", list(range(100)))
            self.assertEqual(steps, list(range(100)))
            after = await deferToThread(browser.wait, STATUS, loaded, "the page live again")
            self.assertEqual(after["epoch"], before["epoch"])
            # Later live points still arrive once each.
            await self.post(base, [metric("resumed", s, 0.0) for s in range(100, 110)])
            steps = await self.wait_points(browser, "resumed", "train/loss", list(range(110)))
            self.assertEqual(steps, list(range(110)))
            await self.shot(browser, "after-restart.png")
            logs = await deferToThread(browser.browser_logs)
            # While the server was down the browser logs the refused reconnects.
            self.assertEqual(severe(logs, ("ERR_CONNECTION_REFUSED", "/events")), [])
            os.kill(proto_pid(second), signal.SIGTERM)
            await second.ended

        return d(go())
