"""
The dashboard at ``/``: its files as the server sends them, and the page
itself in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium) against real servers: history
and live points, a run that starts after the page opened, a rewind, a
token, a server restart on the same port with a persistent history, and
what a reader sees: y labels, long run names and legend values.

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
from trainstream.server import StreamServer
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

    def element_screenshot(self, script: str, path: str) -> str:
        """Save a picture of the element ``script`` returns (a closer look than the page)."""
        self.js(script).screenshot(path)
        print(f"\nscreenshot: {path}")
        return path

    def hover(self, script: str, fraction: float) -> None:
        """Put the mouse on the element ``script`` returns, ``fraction`` of its width in."""
        from selenium.webdriver.common.action_chains import ActionChains

        element = self.js(script)
        width = element.size["width"]
        ActionChains(self.driver).move_to_element_with_offset(
            element, int(width * (fraction - 0.5)), 0
        ).perform()

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
        """uPlot is served from the package; files revalidate with an ETag."""

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


class InProcessBrowserTestCase(BrowserTestCase):
    """A server in the trial reactor (``token``: with ``--token``)."""

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


class InProcessBrowserTests(InProcessBrowserTestCase):
    """The page against a server in the trial reactor."""

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


# Two runs whose long names share all but their end, and values whose tick
# labels are long: a narrow range near 1.2346e+11 and near 2.995e-4; and a
# loss from 1 to about 0 (its labels change while uPlot settles its layout).
# Run B stops earlier than run A, so at A's last step B has no point.
RUN_A = "experiment-resnet50-imagenet-cosine-warmup-lr3e-4-seed1"
RUN_B = "experiment-resnet50-imagenet-cosine-warmup-lr3e-4-seed2"
STEPS = {RUN_A: 100, RUN_B: 60}
LAST = {
    (RUN_A, "train/tokens"): 1.2346e11,
    (RUN_B, "train/tokens"): 1.23455e11,
    (RUN_A, "train/lr"): 2.995e-4,
    (RUN_B, "train/lr"): 2.99e-4,
}
RISE = {"train/tokens": 1e6, "train/lr": 1e-8}


def labelled_value(run: str, name: str, step: int) -> float:
    """The value ``run`` logged for ``name`` at ``step``: rising to ``LAST``."""
    if name == "train/loss":
        return 1.0 / (step + 1) if run == RUN_A else 0.5 / (step + 1) + 0.1
    last = LAST[(run, name)]
    below = STEPS[run] - 1 - step
    return last if below == 0 else last - below * RISE[name]


def parse(text: str) -> float:
    """A number as the page shows it ("1,234.5", "2.995e-4")."""
    return float(text.replace(",", ""))


def card(name: str) -> str:
    """JS for the chart card of metric ``name``."""
    return (
        "[...document.querySelectorAll('.chart')]"
        f".find(c => c.querySelector('h3 span').textContent === {json.dumps(name)})"
    )


# What each chart's legend shows for the runs (the raw rows, hidden, left out).
LEGEND = """
const card = %s;
const rows = [...card.querySelectorAll('.u-legend .u-series')];
const cell = (row) => {
  const label = row.querySelector('.u-label');
  const value = row.querySelector('.u-value').textContent;
  return {label: label.textContent, title: label.title, value,
          fits: label.scrollWidth <= label.clientWidth};
};
return {x: cell(rows[0]), runs: rows.slice(1).filter(r => !r.classList.contains('raw')).map(cell)};
"""

# Where uPlot drew each y tick label, measured with the axis's canvas font:
# right-aligned at pos - tick - gap, so its left edge is that minus its width.
Y_LABELS = """
const axis = window.trainstream.yAxis(arguments[0]);
if (!axis) return null;
const ctx = document.createElement('canvas').getContext('2d');
ctx.font = axis.font;
const right = axis.pos - axis.tick - axis.gap;
return {...axis, left: axis.labels.map(t => right - ctx.measureText(t).width / axis.pxRatio)};
"""

RUN_NAMES = """
return [...document.querySelectorAll('#runs li')].map(li => {
  const name = li.querySelector('.name');
  return {li: li.title, text: name.textContent, title: name.title,
          fits: name.scrollWidth <= name.clientWidth};
});
"""


class ReadableBrowserTests(InProcessBrowserTestCase):
    """
    What a new user reads: y labels that fit their values, long run names
    that stay apart, legends with the latest values before any hover.
    """

    async def open_page(self) -> Browser:
        events = [
            metric(run, step, labelled_value(run, name, step), name)
            for run in (RUN_A, RUN_B)
            for name in ("train/tokens", "train/lr", "train/loss")
            for step in range(STEPS[run])
        ]
        await self.post(self.base, events, self.token)
        browser = await self.browser()
        await deferToThread(browser.get, self.page())
        await deferToThread(browser.wait, STATUS, loaded, "the page to load")
        await deferToThread(
            browser.wait,
            STATUS,
            lambda s: sorted(s["drawn"]) == ["train/loss", "train/lr", "train/tokens"],
            "the charts drawn",
        )
        return browser

    async def chart_shots(self, browser: Browser, prefix: str) -> None:
        await self.shot(browser, f"{prefix}.png")
        for name in ("train/tokens", "train/lr", "train/loss"):
            path = os.path.join(self.shots, f"{prefix}-{name.replace('/', '-')}.png")
            await deferToThread(browser.element_screenshot, f"return {card(name)}", path)

    def assert_middle_cut(self, shown: str, full: str) -> None:
        """``shown`` is ``full`` or its start and end around an ellipsis."""
        if shown == full:
            return
        head, sep, tail = shown.partition("…")
        self.assertEqual(sep, "…", f"{shown!r} is cut but not in the middle")
        self.assertTrue(full.startswith(head) and full.endswith(tail), (shown, full))
        self.assertGreaterEqual(len(head), 4, shown)
        self.assertGreaterEqual(len(tail), 4, shown)

    def test_y_labels_fit_their_values(self) -> Deferred[None]:
        """
        Every y tick label (near 1.2346e+11, near 2.995e-4, from 1 to 0) is
        drawn whole inside the canvas (its left edge, measured with the axis
        font, at x >= 0), stands for its tick value, and the labels of one
        axis are distinct and in one notation.
        """

        async def go() -> None:
            browser = await self.open_page()
            await self.chart_shots(browser, "labels")
            for name, form in (
                ("train/tokens", r"\d\.\d+e\+11"),
                ("train/lr", r"\d\.\d+e-4"),
                ("train/loss", r"\d\.\d+"),
            ):
                axis = await deferToThread(browser.js, Y_LABELS, name)
                labels = axis["labels"]
                self.assertGreaterEqual(len(labels), 2, axis)
                for label, left in zip(labels, axis["left"], strict=True):
                    self.assertGreaterEqual(left, 0, f"{name}: {label!r} cut on the left: {axis}")
                self.assertEqual(len(set(labels)), len(labels), f"{name}: {labels}")
                for label, split in zip(labels, axis["splits"], strict=True):
                    self.assertAlmostEqual(parse(label), split, delta=abs(split) * 1e-9, msg=labels)
                # One notation, one length: "1.23450e+11", "1.23452e+11"; "0.00", "0.25".
                for label in labels:
                    self.assertRegex(label, rf"^{form}$")
                self.assertEqual(len({len(label) for label in labels}), 1, labels)

        return d(go())

    def test_long_run_names_stay_distinguishable(self) -> Deferred[None]:
        """
        Two long names that differ only at the end: in the run list and in
        each chart's legend they are shown cut in the middle (start and end
        kept), so the two differ, fit their box, and carry the whole name
        in their title.
        """

        async def go() -> None:
            browser = await self.open_page()
            names = await deferToThread(browser.js, RUN_NAMES)
            self.assertEqual([n["li"] for n in names], [RUN_A, RUN_B])
            self.assertEqual([n["title"] for n in names], [RUN_A, RUN_B])
            self.assertNotEqual(names[0]["text"], names[1]["text"], names)
            for shown, full in zip(names, (RUN_A, RUN_B), strict=True):
                self.assertTrue(shown["fits"], f"run list: {shown} overflows")
                self.assertIn("…", shown["text"], "the run list has room for the whole name?")
                self.assert_middle_cut(shown["text"], full)
            for name in ("train/tokens", "train/lr"):
                legend = await deferToThread(browser.js, LEGEND % card(name))
                runs = legend["runs"]
                self.assertEqual([r["title"] for r in runs], [RUN_A, RUN_B], legend)
                self.assertNotEqual(runs[0]["label"], runs[1]["label"], legend)
                for shown, full in zip(runs, (RUN_A, RUN_B), strict=True):
                    self.assertTrue(shown["fits"], f"{name} legend: {shown} overflows")
                    self.assert_middle_cut(shown["label"], full)
            await self.chart_shots(browser, "names")

        return d(go())

    def test_legend_shows_latest_values(self) -> Deferred[None]:
        """
        Without a hover each legend shows each run's latest value (run B's
        too, though it has no point at A's last step), also after a live
        point; on hover the values at the cursor (B's nearest point where
        it has none); after the mouse leaves, the latest values again.
        """

        async def go() -> None:
            browser = await self.open_page()
            expected = {
                "train/tokens": ["1.2346e+11", "1.23455e+11"],
                "train/lr": ["2.995e-4", "2.99e-4"],
            }
            for name, values in expected.items():
                legend = await deferToThread(browser.js, LEGEND % card(name))
                self.assertEqual([r["value"] for r in legend["runs"]], values, legend)
            await self.chart_shots(browser, "legend")

            # A live point: the legend follows without a hover.
            await self.post(self.base, [metric(RUN_A, 100, 1.2347e11, "train/tokens")], self.token)
            await deferToThread(
                browser.wait,
                LEGEND % card("train/tokens"),
                lambda legend: legend["runs"][0]["value"] == "1.2347e+11",
                "the legend to show the live point",
            )

            over = f"return {card('train/tokens')}.querySelector('.u-over')"
            for fraction in (0.25, 0.8):
                await deferToThread(browser.hover, over, fraction)
                legend = await deferToThread(
                    browser.wait,
                    LEGEND % card("train/tokens"),
                    lambda legend: legend["x"]["value"] not in ("--", "\N{EN DASH}", "100"),
                    "the legend to follow the cursor",
                )
                step = int(parse(legend["x"]["value"]))
                values = [parse(r["value"]) for r in legend["runs"]]
                near_b = min(step, STEPS[RUN_B] - 1)  # B's nearest point
                self.assertAlmostEqual(
                    values[0] / labelled_value(RUN_A, "train/tokens", step), 1, delta=1e-6
                )
                self.assertAlmostEqual(
                    values[1] / labelled_value(RUN_B, "train/tokens", near_b), 1, delta=1e-6
                )
                # The other chart's cursor follows (uPlot's cursor sync).
                lr = await deferToThread(browser.js, LEGEND % card("train/lr"))
                self.assertEqual(lr["x"]["value"], str(step))
                self.assertAlmostEqual(
                    parse(lr["runs"][0]["value"]) / labelled_value(RUN_A, "train/lr", step),
                    1,
                    delta=1e-6,
                )
                if fraction == 0.8:
                    self.assertGreater(step, STEPS[RUN_B] - 1)
                    await self.chart_shots(browser, "legend-hover")

            await deferToThread(browser.hover, "return document.querySelector('.bar h1')", 0.5)
            left = await deferToThread(
                browser.wait,
                LEGEND % card("train/lr"),
                lambda legend: [r["value"] for r in legend["runs"]] == expected["train/lr"],
                "the latest values after the mouse left",
            )
            self.assertEqual(left["x"]["value"], "99")
            tokens = await deferToThread(browser.js, LEGEND % card("train/tokens"))
            self.assertEqual(
                [r["value"] for r in tokens["runs"]], ["1.2347e+11", "1.23455e+11"], tokens
            )
            logs = await deferToThread(browser.browser_logs)
            self.assertEqual(severe(logs), [])

        return d(go())


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


def image(run: str, step: int, width: int, rgb: tuple[int, int, int], name: str = "samples") -> Any:
    """An ``image`` event: a ``width`` x 8 PNG of one colour (its width tells the step apart)."""
    import numpy as np

    from trainstream.integrations._media import image_event, png_bytes

    pixels = np.zeros((8, width, 3), dtype=np.uint8)
    pixels[:, :] = rgb
    return image_event(run, name, step, png_bytes(pixels), width, 8)


def histogram(run: str, step: int, name: str = "fc.weight") -> Any:
    """A ``histogram`` event: a normal sample whose mean moves with the step."""
    import numpy as np

    from trainstream.integrations._media import histogram_event

    values = np.random.default_rng(step).normal(step / 10, 1.0, 500)
    return histogram_event(run, name, step, values, bins=40)


MEDIA = "return window.trainstream && window.trainstream.media()"


def card_of(kind: str, run: str, name: str) -> Callable[[Any], Any]:
    def find(cards: Any) -> Any:
        for c in cards or []:
            if (c["kind"], c["run"], c["name"]) == (kind, run, name):
                return c
        return None

    return find


class MediaBrowserTests(InProcessBrowserTestCase):
    """Images (with a step slider) and histograms (over steps), from history and live."""

    def setUp(self) -> Deferred[Any]:  # type: ignore[override]
        try:
            import numpy  # noqa: F401
        except ImportError as e:
            raise SkipTest(f"numpy is not importable ({e}): media events are made with it") from e
        return super().setUp()

    def test_images_and_histograms_live(self) -> Deferred[None]:
        """
        A run whose images and histograms are published after the page
        opened shows them; the slider follows the latest step until moved,
        shows the step it is moved to (fetched by id), and follows again at
        the end; the histogram panel gains steps live.
        """
        colours = [(230, 60, 60), (60, 160, 60), (60, 90, 230), (200, 160, 40)]

        async def go() -> None:
            browser = await self.browser()
            await deferToThread(browser.get, self.page())
            await deferToThread(browser.wait, STATUS, loaded, "the page to load")
            self.assertEqual(await deferToThread(browser.js, MEDIA), [])
            events = [metric("vision", s, 1.0 / (s + 1)) for s in range(10)]
            events += [histogram("vision", s) for s in range(10)]
            events += [image("vision", s, 10 + s, colours[s % 4]) for s in range(4)]
            await self.post(self.base, events, self.token)
            find = card_of("image", "vision", "samples")
            shown = await deferToThread(
                browser.wait,
                MEDIA,
                lambda cards: (c := find(cards)) is not None and c["width"] == 13,
                "the latest image shown",
            )
            self.assertEqual(find(shown)["steps"], [0, 1, 2, 3])
            self.assertEqual((find(shown)["shown"], find(shown)["follow"]), (3, True))
            hist = card_of("histogram", "vision", "fc.weight")
            await deferToThread(
                browser.wait,
                MEDIA,
                lambda cards: (c := hist(cards)) is not None and c["steps"] == list(range(10)),
                "ten histogram steps",
            )
            await self.shot(browser, "media-live.png")
            # Move the slider to step 1: that image (10 + 1 pixels wide) is shown.
            slider = (
                "const card = document.querySelector("
                '\'.media-card[data-kind="image"][data-name="samples"]\');'
                "const s = card.querySelector('input[type=range]');"
            )
            await deferToThread(
                browser.js,
                slider + "s.value = '1'; s.dispatchEvent(new Event('input'));",
            )
            moved = await deferToThread(
                browser.wait,
                MEDIA,
                lambda cards: find(cards)["width"] == 11,
                "step 1 shown after moving the slider",
            )
            self.assertEqual((find(moved)["shown"], find(moved)["follow"]), (1, False))
            label = await deferToThread(browser.js, slider + "return card.innerText")
            self.assertIn("step 1 (2/4)", label)
            # New steps arrive: the slider stays where the user put it.
            await self.post(
                self.base,
                [image("vision", 4, 14, colours[0]), *(histogram("vision", s) for s in (10, 11))],
                self.token,
            )
            await deferToThread(
                browser.wait,
                MEDIA,
                lambda cards: (
                    find(cards)["steps"] == [0, 1, 2, 3, 4] and hist(cards)["steps"][-1] == 11
                ),
                "step 4 listed and histogram step 11",
            )
            self.assertEqual(find(await deferToThread(browser.js, MEDIA))["shown"], 1)
            # Back at the end: it follows again.
            await deferToThread(
                browser.js, slider + "s.value = s.max; s.dispatchEvent(new Event('input'));"
            )
            await self.post(self.base, [image("vision", 5, 15, colours[1])], self.token)
            last = await deferToThread(
                browser.wait,
                MEDIA,
                lambda cards: find(cards)["width"] == 15,
                "the new latest step 5 shown",
            )
            self.assertEqual((find(last)["shown"], find(last)["follow"]), (5, True))
            drawn = await deferToThread(
                browser.js,
                "const c = document.querySelector('.media-card[data-kind=\"histogram\"] canvas');"
                "const g = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                "let n = 0; for (let i = 3; i < g.length; i += 4) if (g[i] > 0) n++; return n;",
            )
            self.assertGreater(drawn, 1000)  # the histogram panel has painted pixels
            await self.shot(browser, "media-slider.png")
            await deferToThread(browser.js, "document.getElementById('theme').click()")
            await deferToThread(
                browser.wait, STATUS, lambda s: "train/loss" in s["drawn"], "redrawn in dark"
            )
            await self.shot(browser, "media-dark.png")
            await deferToThread(
                browser.element_screenshot,
                "return document.querySelector('.media-card[data-kind=\"histogram\"]')",
                os.path.join(self.shots, "media-histogram.png"),
            )
            logs = await deferToThread(browser.browser_logs)
            self.assertEqual(severe(logs), [])

        return d(go())

    def test_media_history_pr_curve_and_layout(self) -> Deferred[None]:
        """Published before the page opened: cards from the run's detail, the latest shown."""

        async def go() -> None:
            from trainstream.integrations._media import layout_event, pr_curve_event

            events = [image("old", s, 20 + s, (90, 90, 90), "grid") for s in range(3)]
            events += [histogram("old", s, "w") for s in range(30)]
            events.append(
                pr_curve_event("old", "cat", 0, [0.5, 0.8, 1.0], [1.0, 0.6, 0.1], [0, 0.5, 1])
            )
            offsets = {"a": 0.0, "b": 0.2, "c": 0.1}  # c between a and b: the Margin chart
            events += [
                metric("old", s, s / 10 + o, n) for s in range(5) for n, o in offsets.items()
            ]
            events.append(
                layout_event(
                    "old",
                    {
                        "losses": {"both": ["Multiline", ["a", "b"]], "all": ["Multiline", [".*"]]},
                        "band": {"c in a..b": ["Margin", ["c", "a", "b"]]},
                    },
                )
            )
            await self.post(self.base, events, self.token)
            browser = await self.browser()
            await deferToThread(browser.get, self.page())
            await deferToThread(browser.wait, STATUS, loaded, "the page to load")
            grid = card_of("image", "old", "grid")
            cards = await deferToThread(
                browser.wait,
                MEDIA,
                lambda cards: (c := grid(cards)) is not None and c["width"] == 22,
                "the latest image of the history shown",
            )
            self.assertEqual(grid(cards)["steps"], [0, 1, 2])
            hist = card_of("histogram", "old", "w")
            cards = await deferToThread(
                browser.wait,
                MEDIA,
                lambda cards: (c := hist(cards)) is not None and len(c["steps"]) == 20,
                "the latest 20 histogram steps",
            )
            self.assertEqual(hist(cards)["steps"], list(range(10, 30)))
            self.assertEqual(card_of("pr_curve", "old", "cat")(cards)["steps"], [0])
            text = await deferToThread(browser.js, "return document.body.innerText")
            self.assertIn("losses / both (Multiline): a, b", text)
            layouts = await deferToThread(
                browser.wait,
                "return window.trainstream.layouts()",
                # every chart with all its series: each one's points load on their own
                lambda v: v and [len(c["drawn"]) for c in v.get("old", [])] == [2, 3, 3],
                "the custom scalars drawn",
            )
            drawn = [c["drawn"] for c in layouts["old"]]
            self.assertEqual(drawn, [["a", "b"], ["a", "b", "c"], ["c", "a", "b"]])
            plots = await deferToThread(
                browser.js, "return document.querySelectorAll('.layout-chart .u-over').length"
            )
            self.assertEqual(plots, 3)
            await self.shot(browser, "media-history.png")
            await deferToThread(
                browser.element_screenshot,
                "const e = document.querySelector('.media-layout'); e.scrollIntoView(); return e",
                os.path.join(self.shots, "media-layout.png"),
            )
            logs = await deferToThread(browser.browser_logs)
            self.assertEqual(severe(logs), [])

        return d(go())
