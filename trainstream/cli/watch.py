"""
``python -m trainstream watch``: a live table of runs. A feeder thread loads
a snapshot from REST (health, the runs, the recent points of the metrics
shown, health again), then streams events from the id taken before it (the
SSE client), and loads again after a reset; the screen loop applies what it
sends to the model (:mod:`trainstream.cli.model`) and draws it
(:mod:`trainstream.cli.render`).
"""

from __future__ import annotations

import http.client
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainstream.cli import ServerOptions
from trainstream.cli.model import (
    SPARK_LEN,
    RunView,
    Series,
    Snapshot,
    WatchModel,
    choose_columns,
    matches_any,
    to_float,
)
from trainstream.cli.render import render
from trainstream.client.backoff import Backoff
from trainstream.client.http import HTTP, ClientError, Endpoint, describe, error_text, quote_segment
from trainstream.client.sse import BACKOFF_INITIAL, BACKOFF_MAX, ConnState, Event, Reset, SSEClient

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

__all__ = ["Feeder", "WatchOptions", "load_snapshot", "run_watch"]


# Loading from REST


def load_snapshot(
    http_: HTTP,
    run_globs: Sequence[str] = (),
    name_globs: Sequence[str] = (),
    columns: int = 4,
    spark_len: int = SPARK_LEN,
) -> Snapshot:
    """Health, then the runs and the recent points of the shown metrics, then health."""
    health = _ok(http_, "/api/health")
    last_id = int(health.get("last_id", 0))
    listing = _ok(http_, "/api/runs").get("runs", [])
    wanted = [r for r in listing if not run_globs or matches_any(str(r.get("run")), run_globs)]
    shown = choose_columns((r.get("metrics", []) for r in wanted), columns, name_globs)
    views: list[RunView] = []
    for summary in wanted:
        run = str(summary["run"])
        status, detail = http_.get_json("/api/runs/" + quote_segment(run))
        if status == 404:
            continue  # deleted meanwhile
        if status != 200 or not isinstance(detail, dict):
            raise http.client.HTTPException(error_text(status, detail))
        view = RunView(
            run,
            state=str(detail.get("state", "created")),
            updated=_number(detail.get("updated", summary.get("updated"))),
            last_step=_int(detail.get("last_step", summary.get("last_step"))),
            hparams=dict(detail.get("hparams") or {}),
        )
        for name, info in (detail.get("metrics") or {}).items():
            series = Series(deque(maxlen=spark_len))
            if name in shown:
                for step, value in _recent_points(http_, run, name, info, spark_len):
                    series.add(step, value)
            last_step, last_value = _int(info.get("last_step")), to_float(info.get("last_value"))
            if last_step is not None and last_value is not None:
                if not series.points or series.points[-1][0] != last_step:
                    series.add(last_step, last_value)
            view.metrics[name] = series
        views.append(view)
    boundary = int(_ok(http_, "/api/health").get("last_id", last_id))
    return Snapshot(last_id, boundary, health.get("epoch"), views)


def _recent_points(
    http_: HTTP, run: str, name: str, info: Mapping[str, Any], n: int
) -> list[tuple[int, float]]:
    """About the last ``n`` points of the current segment."""
    count = _int(info.get("count")) or 0
    last_step = _int(info.get("last_step")) or 0
    path = f"/api/runs/{quote_segment(run)}/metrics/{quote_segment(name)}"
    query: dict[str, int] = {"max_points": max(2, 8 * n)}
    if count > 8 * n and last_step > 0:
        # Guess a step range holding ~2n points from the mean spacing.
        query["from_step"] = max(0, last_step - math.ceil(last_step * 2 * n / count))
    status, body = http_.get_json(path, query)
    points = body.get("points", []) if status == 200 and isinstance(body, dict) else []
    out = [
        (int(p[0]), v)
        for p in points
        if (v := to_float(p[1])) is not None and isinstance(p[0], int)
    ]
    return out[-n:]


def _ok(http_: HTTP, path: str) -> dict[str, Any]:
    status, body = http_.get_json(path)
    if status != 200 or not isinstance(body, dict):
        raise http.client.HTTPException(error_text(status, body, f"GET {path} failed"))
    return body


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class WatchOptions(ServerOptions):
    columns: int = 4
    frames: int | None = None
    refresh_hz: float = 4.0


class Feeder:
    """
    Runs in a thread: loads a snapshot from REST, then streams events from
    the id taken before it; after a reset, loads again. Puts ``Snapshot``,
    ``Event`` and ``Reset`` items on ``sink``.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        token: str | None,
        runs: Sequence[str],
        names: Sequence[str],
        columns: int,
        sink: Callable[[Snapshot | Event | Reset], None],
        backoff_initial: float = BACKOFF_INITIAL,
    ) -> None:
        self.http = HTTP(endpoint, token)
        self.endpoint = endpoint
        self.token = token
        self.runs, self.names = tuple(runs), tuple(names)
        self.columns = columns
        self.sink = sink
        self.backoff_initial = backoff_initial
        self.state = ConnState("connecting")
        self.error: ClientError | None = None
        self._closed = threading.Event()
        self._client: SSEClient | None = None

    def close(self) -> None:
        self._closed.set()
        client = self._client
        if client is not None:
            client.close()

    def _set_state(self, state: ConnState) -> None:
        self.state = state

    def run(self) -> None:
        try:
            self._run()
        except ClientError as e:
            self.error = e
            self.state = ConnState("stopped", str(e))

    def _run(self) -> None:
        backoff = Backoff(self.backoff_initial, BACKOFF_MAX)
        while not self._closed.is_set():
            try:
                snapshot = load_snapshot(self.http, self.runs, self.names, self.columns)
            except (OSError, http.client.HTTPException, ValueError) as e:
                delay = backoff.next()
                self.state = ConnState("reconnecting", describe(e), time.monotonic() + delay)
                if self._closed.wait(delay):
                    return
                continue
            backoff.reset()
            self.sink(snapshot)
            client = SSEClient(
                self.endpoint,
                self.token,
                self.runs,
                self.names,
                after=snapshot.last_id,
                on_state=self._set_state,
                backoff_initial=self.backoff_initial,
            )
            client.epoch = snapshot.epoch
            self._client = client
            if self._closed.is_set():
                return
            for item in client.items():
                self.sink(item)
                if isinstance(item, Reset):
                    client.close()
                    break  # load again: the snapshot is the truth after a reset


def run_watch(options: WatchOptions, console: Console | None = None) -> int:
    """
    On a terminal, a live screen until Ctrl-C (or ``frames``); otherwise
    (a pipe, a file) nothing until the end, then the last frame.
    """
    from rich.console import Console
    from rich.live import Live

    endpoint, runs, token = options.where()
    console = console or Console()
    model = WatchModel()
    inbox: queue.Queue[Snapshot | Event | Reset] = queue.Queue()
    feeder = Feeder(endpoint, token, runs, options.names, options.columns, inbox.put)
    thread = threading.Thread(target=feeder.run, name="trainstream-feed", daemon=True)
    thread.start()
    period = 1.0 / max(0.1, options.refresh_hz)

    def screen() -> RenderableType:
        columns = model.columns(options.columns, options.names)
        return render(model, feeder.state, endpoint.base, columns, width=console.width)

    live = Live(screen(), console=console, auto_refresh=False) if console.is_terminal else None
    try:
        if live is not None:
            live.start()
        frames = 0
        while feeder.error is None:
            _drain(inbox, model, time.monotonic() + period)
            if live is not None:
                live.update(screen(), refresh=True)
            frames += model.loaded
            if options.frames is not None and frames >= options.frames:
                break
    except KeyboardInterrupt:
        pass
    finally:
        feeder.close()
        if live is not None:
            live.stop()
    if live is None:
        console.print(screen())
    if feeder.error is not None:
        console.print(f"trainstream watch: {feeder.error}", style="red")
        return 1
    return 0


def _drain(inbox: queue.Queue[Snapshot | Event | Reset], model: WatchModel, until: float) -> None:
    """Apply what the feeder sends until ``until`` (monotonic)."""
    while (left := until - time.monotonic()) > 0:
        try:
            item = inbox.get(timeout=left)
        except queue.Empty:
            return
        if isinstance(item, Snapshot):
            model.load(item)
        elif isinstance(item, Reset):
            model.reset(item)
        else:
            model.apply(item.data)
