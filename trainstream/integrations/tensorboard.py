"""
A drop-in for ``torch.utils.tensorboard.SummaryWriter`` that publishes to
trainstream instead of writing event files::

    from trainstream.integrations.tensorboard import SummaryWriter
    # was: from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter()                                   # embedded server
    writer = SummaryWriter(url="http://127.0.0.1:8890", run="resnet-3")  # remote
    writer.add_scalar("train/loss", loss.item(), step)

Only the scalar, text and hparams methods exist: ``add_scalar``,
``add_scalars``, ``add_text``, ``add_hparams``, ``flush``, ``close`` and the
context manager, with TensorBoard's signatures. This module does not import
torch; scalars may be Python numbers, numpy or torch scalars (``float()``).

How TensorBoard's model maps onto trainstream:

- **Run name**: ``run=`` if given, else the last component of ``log_dir``
  (what TensorBoard shows when started with ``--logdir`` on its parent),
  else TensorBoard's default ``DATE_HOST`` + ``comment`` (``Nov29_14-08-30_myhost``).
  It is sanitized like a tag (below) and cut to 128 characters.
- **Tags** become metric names. A character outside ``[A-Za-z0-9._:/-]``
  becomes ``_``, leading ``/`` are dropped, an empty tag becomes ``_``, and
  the name is cut to 256 characters: ``"Loss (train)"`` → ``"Loss__train_"``.
- **global_step=None**: TensorBoard then records step 0 every time (the
  protobuf default), which draws as a vertical line. Here each tag keeps a
  counter instead: the step is the tag's previous step + 1 (0 at first), so
  a series stays monotonic. An explicit step resets the counter to it. A
  step must be an integer >= 0 (trainstream's rule); a step below the tag's
  previous one is a checkpoint rewind (a new segment of the series).
- **add_scalars(main, {tag: v})**: like TensorBoard, one sub-run per tag,
  named ``RUN/MAIN_TAG`` (main tag with ``/`` replaced by ``_``), each logging
  the metric ``MAIN``; the dashboard's chart ``MAIN`` then has one line per tag.
- **add_text(tag, text)**: a log line (level ``info``) ``"TAG: TEXT"``, or
  ``"TAG (step N): TEXT"`` with a step.
- **add_hparams(h, m)**: an ``hparams`` event of the run (or of the sub-run
  ``RUN/run_name`` when ``run_name`` is given) and ``m`` logged as its
  metrics at ``global_step`` (per-tag counter when ``None``). Values that are
  not str, int, float, bool or None go through ``float()``.
  ``hparam_domain_discrete`` is accepted and ignored.
- Accepted and ignored: ``purge_step``, ``max_queue``, ``flush_secs``,
  ``filename_suffix``, ``new_style``, ``double_precision``, and ``walltime``
  of ``add_text`` (the time of ``add_scalar``/``add_scalars`` is kept).
- **Status**: the run is marked ``running`` at creation and ``finished`` on
  ``close()``, or ``failed`` when a ``with`` block ends with an exception.
  Unlike TensorBoard's, a closed writer cannot be used again.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from trainstream.events import MAX_RUN_LENGTH
from trainstream.integrations._target import check_options, sanitize

if TYPE_CHECKING:
    from trainstream.api import RunAPI
    from trainstream.client import Publisher
    from trainstream.run import Run

__all__ = ["SummaryWriter", "sanitize"]

_PARAM_TYPES = (str, int, float, bool, type(None))


def _default_run(log_dir: str | None, comment: str) -> str:
    if log_dir is None:
        stamp = datetime.now().strftime("%b%d_%H-%M-%S")
        return f"{stamp}_{socket.gethostname()}{comment}"
    parts = [p for p in str(log_dir).replace("\\", "/").split("/") if p and p != "."]
    return parts[-1] if parts else "run"


class SummaryWriter:
    """
    TensorBoard's ``SummaryWriter`` (scalars, text, hparams) publishing to trainstream.

    :param log_dir: names the run (its last component) unless ``run`` is given.
    :param comment: appended to the default run name when ``log_dir`` is None.
    :param url: a trainstream server (``http://host:port``): publish through
        :class:`trainstream.client.Publisher`. Without it, the process-wide
        embedded server is used (``trainstream.get_stream_server``), and
        released on ``close()``.
    :param run: the run's name.
    :param token: the remote server's bearer token.
    :param server_config: the embedded server's config (not with ``url``).
    :param flush_timeout: remote only: how long ``flush``/``close`` wait for
        the server (``None``: no limit).
    """

    def __init__(
        self,
        log_dir: str | None = None,
        comment: str = "",
        purge_step: int | None = None,
        max_queue: int = 10,
        flush_secs: int = 120,
        filename_suffix: str = "",
        *,
        url: str | None = None,
        run: str | None = None,
        token: str | None = None,
        server_config: Any = None,
        flush_timeout: float | None = 30.0,
    ) -> None:
        check_options("SummaryWriter", url, token, server_config)
        self.log_dir = log_dir
        self.run_name = sanitize(
            run if run is not None else _default_run(log_dir, comment), MAX_RUN_LENGTH
        )
        self.url = url
        self._token = token
        self._flush_timeout = flush_timeout
        self._lock = threading.Lock()
        self._steps: dict[tuple[str, str], int] = {}
        self._names: dict[str, str] = {}
        self._children: dict[str, RunAPI] = {}
        self._publishers: list[Publisher] = []
        self._closed = False
        self._server: Any = None
        if url is None:
            from trainstream.embedded import get_stream_server

            self._server = get_stream_server(server_config)
        try:
            self._main = self._open(self.run_name)
        except BaseException:
            self._release()
            raise

    # Where the dashboard is

    @property
    def dashboard_url(self) -> str:
        """The dashboard's address (the server's base URL when remote)."""
        if self._server is not None:
            return str(self._server.urls["dashboard"])
        return str(self.url)

    # TensorBoard's API

    def add_scalar(
        self,
        tag: str,
        scalar_value: Any,
        global_step: Any = None,
        walltime: float | None = None,
        new_style: bool = False,
        double_precision: bool = False,
    ) -> None:
        """Log ``scalar_value`` as metric ``tag`` (sanitized) of the run."""
        self._check_open()
        name = self._name(tag)
        step = self._step(self.run_name, name, global_step)
        self._main.log({name: _scalar(scalar_value)}, step, walltime)

    def add_scalars(
        self,
        main_tag: str,
        tag_scalar_dict: Mapping[str, Any],
        global_step: Any = None,
        walltime: float | None = None,
    ) -> None:
        """Log each value as metric ``main_tag`` of the sub-run ``RUN/MAIN_TAG``."""
        self._check_open()
        name = self._name(main_tag)
        prefix = main_tag.replace("/", "_")
        for tag, value in tag_scalar_dict.items():
            child = sanitize(f"{self.run_name}/{prefix}_{tag}", MAX_RUN_LENGTH)
            step = self._step(child, name, global_step)
            self._child(child).log({name: _scalar(value)}, step, walltime)

    def add_text(
        self,
        tag: str,
        text_string: str,
        global_step: Any = None,
        walltime: float | None = None,
    ) -> None:
        """A log line ``"TAG: TEXT"`` (``"TAG (step N): TEXT"`` with a step)."""
        self._check_open()
        if global_step is None:
            self._main.text(f"{tag}: {text_string}")
        else:
            self._main.text(f"{tag} (step {int(global_step)}): {text_string}")

    def add_hparams(
        self,
        hparam_dict: Mapping[str, Any],
        metric_dict: Mapping[str, Any],
        hparam_domain_discrete: Mapping[str, list[Any]] | None = None,
        run_name: str | None = None,
        global_step: Any = None,
    ) -> None:
        """The run's hyperparameters, and ``metric_dict`` as its metrics."""
        self._check_open()
        if not isinstance(hparam_dict, Mapping) or not isinstance(metric_dict, Mapping):
            raise TypeError("hparam_dict and metric_dict should be dictionary.")
        if run_name:
            target = sanitize(f"{self.run_name}/{run_name}", MAX_RUN_LENGTH)
            sink = self._child(target)
        else:
            target, sink = self.run_name, self._main
        sink.hparams(
            {
                str(k): v if isinstance(v, _PARAM_TYPES) else _scalar(v)
                for k, v in hparam_dict.items()
            }
        )
        for tag, value in metric_dict.items():
            name = self._name(tag)
            sink.log({name: _scalar(value)}, self._step(target, name, global_step))

    def flush(self) -> None:
        """Return once everything logged so far is stored (remote: at most ``flush_timeout``)."""
        if self._closed:
            return
        if self._server is not None:
            # An embedded run's flush stores what every run queued so far.
            cast("Run", self._main).flush()
            return
        for publisher in list(self._publishers):
            publisher.flush(self._flush_timeout)

    def close(self) -> None:
        """Mark the run finished, flush, and let the server go. Idempotent."""
        self._end(None)

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self._end(None if exc_type is None else f"{exc_type.__name__}: {exc_val}")

    # Inside

    def _end(self, failure: str | None) -> None:
        if self._closed:
            return
        try:
            for sink in (self._main, *self._children.values()):
                if failure is None:
                    sink.finish()
                else:
                    sink.fail(failure)
            self.flush()
        finally:
            self._closed = True
            for publisher in self._publishers:
                publisher.close(self._flush_timeout)
            self._release()

    def _release(self) -> None:
        if self._server is not None:
            from trainstream.embedded import release_stream_server

            self._server = None
            release_stream_server()

    def _open(self, run: str) -> RunAPI:
        sink: RunAPI
        if self._server is not None:
            sink = self._server.run(run)
        else:
            from trainstream.client import Publisher

            assert self.url is not None
            publisher = Publisher(self.url, run, token=self._token)
            self._publishers.append(publisher)
            sink = publisher
        sink.status("running")
        return sink

    def _child(self, run: str) -> RunAPI:
        sink = self._children.get(run)
        if sink is None:
            with self._lock:
                sink = self._children.get(run)
                if sink is None:
                    sink = self._children[run] = self._open(run)
        return sink

    def _name(self, tag: str) -> str:
        name = self._names.get(tag)
        if name is None:
            name = self._names[tag] = sanitize(tag)
        return name

    def _step(self, run: str, name: str, global_step: Any) -> int:
        key = (run, name)
        with self._lock:
            if global_step is None:
                step = self._steps.get(key, -1) + 1
            else:
                step = global_step if type(global_step) is int else int(global_step)
            self._steps[key] = step
        return step

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"SummaryWriter for run {self.run_name!r} is closed")


def _scalar(value: Any) -> float | int:
    kind = type(value)
    if kind is float or kind is int:
        return value  # type: ignore[no-any-return]
    return float(value)
