"""
:class:`StreamMonitor`, the widget: a status panel (SSE stream, WebSocket,
REST), the runs and their states, and a live chart per metric with a curve
per run (pyqtgraph). Everything runs in the GUI thread's event loop, on Qt's
own networking (see ``_links``); drawing is coalesced on a timer, so a fast
stream costs the GUI one redraw per tick, not one per event.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlencode

import pyqtgraph as pg  # type: ignore[import-untyped]
from PySide6.QtCore import QCoreApplication, Qt, QTimer, Signal
from PySide6.QtGui import QCloseEvent, QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QGridLayout,
    QGroupBox,
    QHeaderView,
    QLabel,
    QScrollArea,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from trainstream.client.http import quote_segment
from trainstream.qt._links import Http, LinkStatus, RestLink, SSELink, WSLink
from trainstream.qt._model import MonitorModel
from trainstream.qt._source import Source

__all__ = ["StreamMonitor"]

#: Milliseconds between two redraws of what changed.
REDRAW_MS = 250
#: Points asked per (run, metric) when loading what was there before the
#: monitor opened (the server keeps each bucket's extremes).
BACKFILL_POINTS = 2000
#: Points asked at most to fill one gap the server's coalescing left.
FILL_POINTS = 20_000
#: Series loaded that way at most, per history.
BACKFILL_SERIES = 400
#: Columns of charts.
COLUMNS = 2
CHART_HEIGHT = 220

_ROLES = (("sse", "SSE stream"), ("ws", "WebSocket"), ("rest", "REST API"))
_STATE_COLORS = {
    "connected": "#2e7d32",
    "connecting": "#9e9e9e",
    "reconnecting": "#ef6c00",
    "down": "#c62828",
}
_RUN_COLORS = {
    "running": "#2e7d32",
    "finished": "#1565c0",
    "failed": "#c62828",
    "stalled": "#ef6c00",
    "paused": "#9e9e9e",
    "created": "#9e9e9e",
}
#: One color per run, in the order runs appear (matplotlib's tab10).
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
_RUN_COLUMNS = ("run", "state", "last step", "metrics", "updated")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 1:
        return "now"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    return f"{seconds / 60:.0f} min ago"


class StreamMonitor(QWidget):
    """
    A live view of a trainstream server, for a desktop app to embed in one
    line::

        layout.addWidget(trainstream.qt.StreamMonitor(server))

    :param url: a base URL (``http://host:8890``), or (one-line form) the
        embedded server or its manager, as ``server`` takes them.
    :param server: the embedded server (``trainstream.get_stream_server()``),
        its manager (``trainstream.get_stream_server_manager()``: whichever
        server runs, across get/release cycles). Neither given: this
        process's embedded server, else ``$TRAINSTREAM_URL``, else
        ``http://127.0.0.1:8890``.
    :param token: the bearer token, if the server wants one (by default the
        embedded server's own, or ``$TRAINSTREAM_TOKEN``).
    :param runs: the runs shown: a pattern (``*`` globs) or a list of them.
    :raises ValueError: a URL that names no server.

    It connects once the event loop runs (the constructor does no I/O) and
    stops when closed or :meth:`stop` is called. It holds no reference
    count on the embedded server: releasing it stops the server as usual,
    and the monitor shows it down until the next one starts.
    """

    #: ``(role, state)`` each time a transport's state changes (``"sse"``,
    #: ``"ws"``, ``"rest"``; ``connecting|connected|down|reconnecting``).
    state_changed = Signal(str, str)

    def __init__(
        self,
        url: object = None,
        server: object = None,
        token: str | None = None,
        parent: QWidget | None = None,
        *,
        runs: str | Sequence[str] = "*",
    ) -> None:
        # PROTOCOL section 7's order; the first may also be the server (or
        # the manager), so an app embeds it in one line: StreamMonitor(server).
        super().__init__(parent)
        given = [t for t in (url, server) if t is not None]
        if len(given) > 1:
            raise ValueError("StreamMonitor: give one server or one URL, not both")
        patterns = [runs] if isinstance(runs, str) else list(runs) or ["*"]
        self.source = Source(given[0] if given else None, token, patterns)
        self.model = MonitorModel(patterns)
        #: Every change of a transport's state, in order: ``(role, state)``.
        self.state_log: list[tuple[str, str]] = []
        self._states: dict[str, str] = {}
        self.epoch: object = None
        self.health: dict[str, Any] | None = None
        self._generation = 0
        self._plots: dict[str, Any] = {}
        self._curves: dict[tuple[str, str], Any] = {}
        self._colors: dict[str, QColor] = {}

        self._http = Http(self.source.token, self)
        self.rest = RestLink(self._http, self._api_url, self)
        self.sse = SSELink(
            self._http,
            self._stream_urls,
            self._position,
            self._on_epoch,
            self.model.apply,
            self.model.reset,
            self,
        )
        self.ws = WSLink(self._ws_url, self.source.token, patterns, self)
        self.links = {"sse": self.sse, "ws": self.ws, "rest": self.rest}
        for link in self.links.values():
            link.changed.connect(self._link_changed)
        self.rest.health.connect(self._on_health)

        self._build()
        self._timer = QTimer(self)
        self._timer.timeout.connect(self.refresh)
        self._timer.start(REDRAW_MS)
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.stop)
        QTimer.singleShot(0, self, self.start)

    # Control

    def start(self) -> None:
        """Connect (done by itself once the event loop runs)."""
        for link in self.links.values():
            if link.stopped:
                link.start()

    def stop(self) -> None:
        """Close every connection and stop retrying; :meth:`start` again to resume."""
        for link in self.links.values():
            link.stop()

    def closeEvent(self, event: QCloseEvent) -> None:
        self.stop()
        super().closeEvent(event)

    # What tests and apps read

    def link_status(self, role: str) -> LinkStatus:
        """``"sse"``, ``"ws"`` or ``"rest"``: its state, clients, last event time."""
        return self.links[role].status

    def curve_data(self, run: str, name: str) -> tuple[list[float], list[float]]:
        """The points the chart of ``name`` draws for ``run`` (as drawn, at the last redraw)."""
        curve = self._curves.get((run, name))
        if curve is None:
            return [], []
        xs, ys = curve.getData()
        if xs is None:
            return [], []
        return [float(x) for x in xs], [float(y) for y in ys]

    # Where to connect

    def _api_url(self) -> str | None:
        urls = self.source.urls()
        return urls.api if urls is not None else None

    def _stream_urls(self) -> tuple[str, str] | None:
        urls = self.source.urls()
        return (urls.api, self.source.stream_url(urls)) if urls is not None else None

    def _ws_url(self) -> str | None:
        urls = self.source.urls()
        return urls.ws if urls is not None else None

    def _position(self) -> int | None:
        return self.model.last_id

    # What the links say

    def _link_changed(self, role: str) -> None:
        state = self.links[role].status.state
        if self._states.get(role) != state:
            self._states[role] = state
            self.state_log.append((role, state))
            self.state_changed.emit(role, state)
        self._draw_status()

    def _on_health(self, body: dict[str, Any]) -> None:
        self.health = body
        clients = body.get("clients") or {}
        for role in ("sse", "ws"):
            count = clients.get(role)
            if isinstance(count, int):
                self.links[role].status.clients = count

    def _on_epoch(self, body: dict[str, Any]) -> None:
        """Before each stream: a new history (or the first) is loaded afresh."""
        epoch = body.get("epoch")
        if epoch == self.epoch and self.model.last_id is not None:
            return
        if self.epoch is not None and epoch != self.epoch:
            self.model.clear()
            self.model.notice = "the server's history changed (new epoch): reloaded"
        self.epoch = epoch
        last_id = body.get("last_id")
        self.model.last_id = last_id if isinstance(last_id, int) else 0
        self._backfill()

    def _backfill(self) -> None:
        """The runs, and the points they had before the stream's position."""
        self._generation += 1
        generation = self._generation
        api = self._api_url()
        if api is None:
            return

        def runs_answered(status: int | None, body: Any, error: str) -> None:
            if generation != self._generation or status != 200 or not isinstance(body, dict):
                return
            missing = self.model.load_runs(body.get("runs") or [])
            for run, name in missing[:BACKFILL_SERIES]:
                url = f"{api}/runs/{quote_segment(run)}/metrics/{quote_segment(name)}?" + urlencode(
                    {"max_points": BACKFILL_POINTS}
                )
                self._http.get_json(url, self._points_answered(generation, run, name))

        self._http.get_json(api + "/runs", runs_answered)

    def _fill_gaps(self) -> None:
        """Reload the steps the server folded away for this (slow) reader."""
        api = self._api_url()
        gaps, self.model.gaps = self.model.gaps, []
        if api is None:
            return
        ranges: dict[tuple[str, str], tuple[int, int]] = {}
        for run, name, lo, hi in gaps:
            old = ranges.get((run, name))
            ranges[(run, name)] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
        generation = self._generation
        for (run, name), (lo, hi) in ranges.items():
            query = {"from_step": lo, "to_step": hi, "max_points": FILL_POINTS}
            url = f"{api}/runs/{quote_segment(run)}/metrics/{quote_segment(name)}?"
            self._http.get_json(
                url + urlencode(query), self._points_answered(generation, run, name)
            )

    def _points_answered(
        self, generation: int, run: str, name: str
    ) -> Callable[[int | None, Any, str], None]:
        def answered(status: int | None, body: Any, error: str) -> None:
            if generation != self._generation or status != 200 or not isinstance(body, dict):
                return
            self.model.load_points(run, name, body.get("points") or [])

        return answered

    # The view

    def _build(self) -> None:
        self.setWindowTitle("trainstream monitor")
        layout = QVBoxLayout(self)
        self._header = QLabel(f"watching {self.source.description}")
        self._header.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self._header)

        box = QGroupBox("Transports")
        grid = QGridLayout(box)
        for col, title in enumerate(("", "state", "clients", "last event", "")):
            label = QLabel(f"<b>{title}</b>")
            grid.addWidget(label, 0, col)
        self._status_labels: dict[str, tuple[QLabel, QLabel, QLabel, QLabel]] = {}
        for row, (role, title) in enumerate(_ROLES, start=1):
            labels = (QLabel(), QLabel(), QLabel(), QLabel())
            grid.addWidget(QLabel(title), row, 0)
            for col, label in enumerate(labels, start=1):
                grid.addWidget(label, row, col)
            labels[3].setWordWrap(True)
            self._status_labels[role] = labels
        grid.setColumnStretch(4, 1)
        layout.addWidget(box)

        self._notice = QLabel()
        self._notice.setWordWrap(True)
        self._notice.hide()
        layout.addWidget(self._notice)

        splitter = QSplitter(Qt.Orientation.Vertical)
        self._table = QTableWidget(0, len(_RUN_COLUMNS))
        self._table.setHorizontalHeaderLabels([c.capitalize() for c in _RUN_COLUMNS])
        self._table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self._table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self._table.verticalHeader().setVisible(False)
        self._table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        splitter.addWidget(self._table)

        self._charts = pg.GraphicsLayoutWidget()
        self._charts.setBackground("w")
        self._empty = self._charts.addLabel("no metrics yet", color="#777")
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self._charts)
        splitter.addWidget(scroll)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 3)
        layout.addWidget(splitter, 1)
        self._draw_status()

    def refresh(self, new_charts: int = 1) -> None:
        """
        Draw what changed (the timer calls it; tests may too).

        :param new_charts: charts made at most by this call: one costs the
            GUI thread about 0.1 s, so a run that brings many metrics at
            once gets its charts one per tick, never one long freeze.
        """
        model = self.model
        if model.cleared:
            model.cleared = False
            self._clear_charts()
        if model.gaps:
            self._fill_gaps()
        if model.dirty:
            dirty, model.dirty = model.dirty, set()
            for run, name in sorted(dirty):
                steps, values = model.points(run, name)
                curve = self._curves.get((run, name))
                if curve is None:
                    if not steps:
                        continue
                    if name not in self._plots:
                        if new_charts <= 0:
                            model.dirty.add((run, name))  # next tick
                            continue
                        new_charts -= 1
                    curve = self._curve(run, name)
                curve.setData(
                    steps, [v if math.isfinite(v) else math.nan for v in values], connect="finite"
                )
        if model.runs_changed:
            model.runs_changed = False
            self._draw_runs()
        self._draw_status()

    def _color(self, run: str) -> QColor:
        color = self._colors.get(run)
        if color is None:
            color = self._colors[run] = QColor(_PALETTE[len(self._colors) % len(_PALETTE)])
        return color

    def _curve(self, run: str, name: str) -> Any:
        plot = self._plots.get(name)
        if plot is None:
            if self._empty is not None:
                self._charts.removeItem(self._empty)
                self._empty = None
            index = len(self._plots)
            plot = self._charts.addPlot(row=index // COLUMNS, col=index % COLUMNS, title=name)
            plot.showGrid(x=True, y=True, alpha=0.3)
            # Long series: draw each pixel column's extremes, and only what is in view.
            plot.setDownsampling(auto=True, mode="peak")
            plot.setClipToView(True)
            plot.setLabel("bottom", "step")
            plot.addLegend(offset=(-10, 10))
            self._plots[name] = plot
            rows = (len(self._plots) + COLUMNS - 1) // COLUMNS
            self._charts.setMinimumHeight(rows * CHART_HEIGHT)
        curve = plot.plot(name=run, pen=pg.mkPen(self._color(run), width=2))
        self._curves[(run, name)] = curve
        return curve

    def _clear_charts(self) -> None:
        """
        Another history: its curves go, the charts stay for its metrics to
        come (taking charts out of a layout while Qt may paint them crashes
        pyqtgraph on PySide6 6.11, seen here).
        """
        for (_, name), curve in self._curves.items():
            self._plots[name].removeItem(curve)
        self._curves.clear()
        self._colors.clear()

    def _draw_runs(self) -> None:
        runs = sorted(self.model.runs.values(), key=lambda r: r.run)
        table = self._table
        table.setRowCount(len(runs))
        now = time.time()
        for row, info in enumerate(runs):
            updated = None if info.updated is None else max(0.0, now - info.updated)
            cells = (
                info.run,
                info.state + (f" ({info.message})" if info.message else ""),
                "" if info.last_step is None else str(info.last_step),
                str(len(info.metrics)),
                _age(updated),
            )
            for col, text in enumerate(cells):
                item = table.item(row, col)
                if item is None:
                    item = QTableWidgetItem()
                    table.setItem(row, col, item)
                item.setText(text)
                if col == 0:
                    item.setForeground(self._color(info.run))
                elif col == 1:
                    item.setForeground(QColor(_RUN_COLORS.get(info.state, "#000")))

    def _draw_status(self) -> None:
        now = time.monotonic()
        for role, (state, clients, last, detail) in self._status_labels.items():
            status = self.links[role].status
            color = _STATE_COLORS.get(status.state, "#9e9e9e")
            state.setText(f'<span style="color:{color}">\u25cf</span> {status.state}')
            clients.setText("" if status.clients is None else str(status.clients))
            last.setText(_age(None if status.last_at is None else now - status.last_at))
            text = status.detail
            if status.state == "down" and status.retry_at is not None:
                text += f" (retry in {max(0.0, status.retry_at - now):.1f} s)"
            detail.setText(f"{text}<br><small>{status.url}</small>" if status.url else text)
        health = self.health
        where = self.source.description
        if health is not None:
            self._header.setText(
                f"watching {where}: trainstream {health.get('version', '?')}, "
                f"{health.get('status', '?')}, up {float(health.get('uptime_s', 0)):.0f} s, "
                f"last id {health.get('last_id', '?')}"
            )
        if self.model.notice:
            self._notice.setText(self.model.notice)
            self._notice.show()
