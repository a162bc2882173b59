"""
Jupyter: a run shows as an iframe of its live dashboard (``?run=NAME``), the
embedded server serves while the kernel lives, and running the ``init`` cell
again reuses it. Driven in a real kernel with nbclient (the ``test`` extra);
the dashboard's ``?run=`` in a headless Chromium (as tests/test_dashboard.py).
"""

from __future__ import annotations

import re
import tempfile
import urllib.request
from collections.abc import Mapping
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.clients import ANY_PORTS
from trainstream.client import Publisher
from trainstream.integrations._target import Target
from trainstream.server import StreamServer

KERNEL_TIMEOUT_S = 120


class NoTransport:
    def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        raise OSError("not connected")

    def close(self) -> None:
        pass


class ReprTests(SynchronousTestCase):
    def target(self, run: str) -> Target:
        publisher = Publisher(
            "http://10.0.0.5:8890/api",
            run,
            report_every=0,
            flush_at_exit=0,
            clock=Clock(),
            transport=NoTransport(),
        )
        target = Target(publisher, flush_timeout=0)
        self.addCleanup(target.close)
        return target

    def test_iframe_of_the_runs_dashboard(self) -> None:
        """The HTML is an iframe of the server's dashboard at ``?run=`` (quoted, escaped)."""
        target = self.target("exp1/train:2")
        self.assertEqual(target.dashboard_url, "http://10.0.0.5:8890/?run=exp1%2Ftrain%3A2")
        page = target._repr_html_()
        (src,) = re.findall(r'<iframe src="([^"]+)"', page)
        self.assertEqual(src, "http://10.0.0.5:8890/?run=exp1%2Ftrain%3A2")
        self.assertIn("'exp1/train:2' (remote, created): http://10.0.0.5:8890/", repr(target))

    def test_name_is_escaped(self) -> None:
        from trainstream.integrations import _target

        target = self.target("a")
        target._name = 'a"<b>'  # names are checked (and fixed) before this; the HTML escapes anyway
        page = target._repr_html_()
        self.assertIn("<b>a&quot;&lt;b&gt;</b>", page)
        self.assertNotIn('a"<b>', page)
        self.assertIn(f'height="{_target.NOTEBOOK_HEIGHT}"', page)


INIT = """\
import trainstream
run = trainstream.init("nb-run", server_config={"listen": "tcp:0:interface=127.0.0.1",
                                                "memory": True})
"""
LOG = """\
for i in range(3):
    trainstream.log({"loss": 1.0 / (i + 1)})
trainstream.finish()
manager = trainstream.get_stream_server_manager()
store = manager.server.hub.store
print(manager.refcount, [r.event["step"] for r in store.after(0, lambda r: r.type == "metric")])
"""

STATE = """\
from trainstream.integrations import _failure
print(run.state, run in _failure.watched())
"""


def need_kernel() -> Any:
    try:
        import nbclient
        import nbformat
    except ImportError as e:
        reason = (
            f"{e.name} is not installed: pip install ipykernel jupyter_client nbformat nbclient"
        )
        print(f"SKIPPED: {reason}")
        raise SkipTest(reason) from None
    return nbclient, nbformat


def html_outputs(cell: Any) -> list[str]:
    return [
        o["data"]["text/html"]
        for o in cell.outputs
        if o.get("output_type") in ("display_data", "execute_result") and "text/html" in o["data"]
    ]


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


class KernelTests(SynchronousTestCase):
    def test_cells(self) -> None:
        """
        ``init`` shows the dashboard's iframe; after ``finish`` the server
        still serves (the kernel holds it); running the ``init`` cell again
        reuses that server (the same port, no "port in use"); a cell's error
        does not fail the run; the URL answers while the kernel lives, and no
        longer once it has ended.
        """
        nbclient, _ = need_kernel()
        from nbformat.v4 import new_code_cell, new_notebook

        cells = [new_code_cell(INIT), new_code_cell(LOG), new_code_cell(INIT)]
        cells += [new_code_cell("raise ValueError('a cell error')"), new_code_cell(STATE)]
        notebook = new_notebook(cells=cells)
        client = nbclient.NotebookClient(
            notebook,
            timeout=KERNEL_TIMEOUT_S,
            kernel_name="python3",
            allow_errors=True,
            resources={"metadata": {"path": tempfile.mkdtemp(prefix="trainstream-nb-")}},
        )
        with client.setup_kernel():
            for index, cell in enumerate(notebook.cells):
                client.execute_cell(cell, index)
            first, again = html_outputs(notebook.cells[0]), html_outputs(notebook.cells[2])
            self.assertEqual(len(first), 1, notebook.cells[0].outputs)
            (src,) = re.findall(r'<iframe src="([^"]+)"', first[0])
            self.assertRegex(src, r"^http://127\.0\.0\.1:\d+/\?run=nb-run$")
            self.assertEqual(re.findall(r'<iframe src="([^"]+)"', again[0]), [src])
            printed = "".join(o.get("text", "") for o in notebook.cells[1].outputs)
            self.assertEqual(printed.strip(), "1 [0, 1, 2]")  # finished; the kernel's hold
            # A cell's error is the kernel's to catch: the run goes on.
            self.assertEqual(notebook.cells[3].outputs[0]["ename"], "ValueError")
            printed = "".join(o.get("text", "") for o in notebook.cells[4].outputs)
            self.assertEqual(printed.strip(), "running True")
            status, page = get(src)
            self.assertEqual(status, 200)
            self.assertIn(b"app.js", page)
            status, health = get(src.split("?")[0] + "api/health")
            self.assertEqual(status, 200, health)
        with self.assertRaises(OSError):  # the kernel ended: so did its server
            get(src)


LISTED = "return document.querySelectorAll('#runs li').length"


class RunParameterTests(TestCase):
    """The dashboard at ``?run=NAME`` charts that run alone, selected (headless Chromium)."""

    timeout = 120

    def setUp(self) -> Deferred[Any]:
        from tests.test_dashboard import need_browser

        need_browser()
        self.server = StreamServer(ANY_PORTS, reactor)
        self.addCleanup(self.server.stop)
        return self.server.start()

    def test_run_parameter(self) -> Deferred[None]:
        from tests.test_dashboard import STATUS, Browser, loaded

        for run in ("exp1/train", "exp2/train"):
            self.server.run(run).log({"loss": 1.0}, 0)
        self.server.inbox.drain()

        async def go() -> None:
            browser = await deferToThread(Browser)
            self.addCleanup(deferToThread, browser.quit)
            base = self.server.urls["dashboard"]
            await deferToThread(browser.get, base + "?run=exp1%2Ftrain")
            await deferToThread(browser.wait, STATUS, loaded, "the page to load")
            await deferToThread(browser.wait, LISTED, lambda n: n == 2, "both runs listed")
            items = await deferToThread(
                browser.js,
                "return [...document.querySelectorAll('#runs li')].map((li) => [li.title,"
                " li.querySelector('input').checked, li.classList.contains('selected')])",
            )
            self.assertEqual(
                sorted(map(tuple, items)),
                [("exp1/train", True, True), ("exp2/train", False, False)],
            )
            await deferToThread(browser.get, base)  # no ?run=: every run on the charts
            await deferToThread(browser.wait, STATUS, loaded, "the page to load")
            await deferToThread(browser.wait, LISTED, lambda n: n == 2, "both runs listed")
            checked = await deferToThread(
                browser.js,
                "return [...document.querySelectorAll('#runs li input')].map((b) => b.checked)",
            )
            self.assertEqual(checked, [True, True])

        return Deferred.fromCoroutine(go())
