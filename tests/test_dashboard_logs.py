"""
The dashboard's log search (``static/logs.js``) in a real headless
Chromium against a real server: selecting a run in the runs list searches
its logs; the level select and the text box narrow them (matches marked);
"more" pages on; a run named with '/' works; with a token too. The
server's own alerts (run ``trainstream/server``) show in the events panel.
A screenshot goes to the test's temporary directory.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.threads import deferToThread

from tests.test_dashboard import STATUS, Browser, InProcessBrowserTestCase, loaded

LOGS = "return window.trainstreamLogs && window.trainstreamLogs.status()"
RESULTS = "return window.trainstreamLogs.results()"
RUN = "exp/lr-3e-4"


def log(run: str, level: str, message: str) -> dict[str, Any]:
    return {"type": "log", "run": run, "level": level, "message": message}


def done(count: int) -> Any:
    return lambda s: bool(s) and not s["busy"] and s["found"] == count


class LogSearchTests(InProcessBrowserTestCase):
    token = "logs-token"

    async def open(self) -> Browser:
        events = [log(RUN, "info", f"epoch {i} done, loss falling") for i in range(230)]
        events += [
            log(RUN, "warning", "gradient norm 1e4: clipping"),
            log(RUN, "error", "loss is NaN at step 1200"),
            log(RUN, "error", "CUDA out of memory; retrying with a smaller batch"),
            log("other", "error", "loss is NaN in another run"),
            {"type": "metric", "run": RUN, "name": "train/loss", "step": 1, "value": 0.5},
        ]
        await self.post(self.base, events, self.token)
        browser = await self.browser()
        await deferToThread(browser.get, self.page())
        await deferToThread(browser.wait, STATUS, loaded, "the page to load")
        await deferToThread(browser.wait, LOGS, bool, "logs.js to start")
        return browser

    async def test_search(self) -> None:
        browser = await self.open()
        # Select the run in the runs list: the search follows it.
        await deferToThread(
            browser.wait,
            f"return document.querySelector('#runs li[title=\"{RUN}\"]') !== null",
            bool,
            "the run in the list",
        )
        await deferToThread(
            browser.js, f"document.querySelector('#runs li[title=\"{RUN}\"]').click()"
        )
        status = await deferToThread(browser.wait, LOGS, done(200), "the first page")
        self.assertEqual(status["run"], RUN)
        self.assertTrue(status["more"])
        await deferToThread(browser.js, "document.getElementById('log-more').click()")
        await deferToThread(browser.wait, LOGS, done(233), "the second page")

        # Only errors.
        await deferToThread(
            browser.js,
            "const s = document.getElementById('log-level'); s.value = 'error';"
            "s.dispatchEvent(new Event('change'))",
        )
        await deferToThread(browser.wait, LOGS, done(2), "the errors")
        results = await deferToThread(browser.js, RESULTS)
        self.assertEqual({r["level"] for r in results}, {"error"})
        self.assertIn(
            "CUDA out of memory; retrying with a smaller batch", [r["message"] for r in results]
        )

        # Errors with "nan" in them (case-insensitive), the match marked; not the other run's.
        await deferToThread(
            browser.js,
            "document.getElementById('log-q').value = 'nan';"
            "document.getElementById('log-go').click()",
        )
        await deferToThread(browser.wait, LOGS, done(1), "the NaN error")
        results = await deferToThread(browser.js, RESULTS)
        self.assertEqual(results[0]["message"], "loss is NaN at step 1200")
        self.assertEqual(results[0]["marks"], ["NaN"])

        # Any level, a text no log has.
        await deferToThread(
            browser.js,
            "document.getElementById('log-level').value = '';"
            "document.getElementById('log-q').value = 'no such text';"
            "document.getElementById('log-go').click()",
        )
        status = await deferToThread(browser.wait, LOGS, done(0), "nothing found")
        self.assertIn("0 log lines", status["text"])
        await deferToThread(
            browser.js,
            "document.getElementById('log-q').value = 'clipping';"
            "document.getElementById('log-go').click()",
        )
        await deferToThread(browser.wait, LOGS, done(1), "the warning")
        await deferToThread(
            browser.element_screenshot,
            "return document.getElementById('log-search')",
            os.path.join(self.shots, "log-search.png"),
        )
        await deferToThread(browser.screenshot, os.path.join(self.shots, "page.png"))
        problems = [
            str(e["message"])
            for e in await deferToThread(browser.browser_logs)
            if e.get("level") == "SEVERE"
        ]
        self.assertEqual(problems, [])

    async def test_server_alerts_show(self) -> None:
        """An alert on the server's run is in the events panel, as every run's are."""
        browser = await self.open()
        await self.post(
            self.base,
            [
                {
                    "type": "alert",
                    "run": "trainstream/server",
                    "kind": "reactor_lag",
                    "message": "reactor lag: scheduled calls ran up to 900 ms late",
                }
            ],
            self.token,
        )
        text = await deferToThread(
            browser.wait,
            "return document.getElementById('events').textContent",
            lambda t: "reactor_lag" in t,
            "the alert in the events panel",
        )
        self.assertIn("trainstream/server", text)
        self.assertIn("900 ms late", text)
