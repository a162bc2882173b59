"""
A drop-in for ``torch.utils.tensorboard.SummaryWriter`` (and tensorboardX's)
that publishes to trainstream instead of writing event files::

    from trainstream.integrations.tensorboard import SummaryWriter
    # was: from torch.utils.tensorboard import SummaryWriter
    # or:  from tensorboardX import SummaryWriter

    writer = SummaryWriter()                                   # embedded server
    writer = SummaryWriter(url="http://127.0.0.1:8890", run="resnet-3")  # remote
    writer.add_scalar("train/loss", loss.item(), step)

Every public method of torch's writer exists with its signature (torch's
parameters in torch's order; tensorboardX's extra keywords after them).
What each one publishes (``docs/protocol.md``, "Media events"):

- ``add_scalar``, ``add_scalars``, ``add_text``, ``add_hparams``: metric,
  log and hparams events (below).
- ``add_histogram`` (values binned like TensorBoard: ``bins="tensorflow"``
  its exponential edges, or any ``numpy.histogram`` bins) and
  ``add_histogram_raw``: a ``histogram`` event.
- ``add_image`` (``CHW`` default, ``HWC``, ``HW``), ``add_images`` (``NCHW``
  default, ``NHWC``: one grid of 8 columns, as TensorBoard's),
  ``add_image_with_boxes`` (boxes drawn in red, labels not), ``add_figure``
  (matplotlib figures rendered by Agg, closed when ``close=True``): an
  ``image`` event holding a PNG. Floats are in [0, 1], ``uint8`` in [0, 255].
  An image whose event would be over ``max_media_bytes`` (256 KiB) is
  halved until it fits, with one warning per tag.
- ``add_pr_curve`` (computed as TensorBoard does, at most 127 thresholds)
  and ``add_pr_curve_raw``: a ``pr_curve`` event.
- ``add_custom_scalars`` and its ``multilinechart``/``marginchart``
  helpers: a ``layout`` event (the run's latest one holds).
- ``add_graph``, ``add_onnx_graph``, ``add_openvino_graph``,
  ``add_embedding``, ``add_mesh``, ``add_video``, ``add_audio``,
  ``add_tensor``, ``export_scalars_to_json``: accepted, nothing stored, one
  warning per writer naming the method.
- ``file_writer`` and ``_get_file_writer()``: a stand-in with
  ``get_logdir``, ``flush``, ``close``; ``add_event``/``add_summary`` warn once
  and store nothing. ``get_logdir()`` is the ``log_dir`` (torch's default
  ``runs/DATE_HOST``+``comment`` when not given).

Arrays may be torch tensors, NumPy arrays or lists. This module imports
none of torch, NumPy, matplotlib or Pillow; the array methods import NumPy
when called (it comes with torch; else ``pip install trainstream[tensorboard]``,
which brings NumPy and Pillow). PNGs are encoded by Pillow, as torch's writer
does, else by a small zlib writer.

How TensorBoard's model maps onto trainstream:

- **Run name**: ``run=`` if given, else ``log_dir`` as TensorBoard shows it:
  its path relative to the logdir root. The root is ``logdir_root=``, else
  ``$TRAINSTREAM_LOGDIR_ROOT``, else the deepest ``runs`` directory of the
  path (torch's default root), else the first component of a relative path
  (``logs/fit/1`` as ``tensorboard --logdir logs`` shows it: ``fit/1``),
  else the last component. So ``runs/exp1/train`` and ``runs/exp2/train``
  are the runs ``exp1/train`` and ``exp2/train``. Without ``log_dir``:
  TensorBoard's default ``DATE_HOST`` + ``comment`` (``Nov29_14-08-30_myhost``).
  It is sanitized like a tag (below) and cut to 128 characters.
- **Tags** become metric (and media) names. A character outside
  ``[A-Za-z0-9._:/-]`` becomes ``_``, leading ``/`` are dropped, an empty tag
  becomes ``_``, and the name is cut to 256 characters: ``"Loss (train)"`` →
  ``"Loss__train_"``.
- **global_step=None**: TensorBoard then records step 0 every time (the
  protobuf default), which draws as a vertical line. Here each tag keeps a
  counter instead (one per kind: scalar, histogram, image, PR curve): the
  step is the tag's previous step + 1 (0 at first), so a series stays
  monotonic. An explicit step resets the counter to it. A step must be an
  integer >= 0 (trainstream's rule); a step below the tag's previous one is
  a checkpoint rewind (a new segment of the series).
- **add_scalars(main, {tag: v})**: like TensorBoard, one sub-run per tag,
  named ``RUN/MAIN_TAG`` (main tag with ``/`` replaced by ``_``), each logging
  the metric ``MAIN``; the dashboard's chart ``MAIN`` then has one line per tag.
- **add_text(tag, text)**: a log line (level ``info``) ``"TAG: TEXT"``, or
  ``"TAG (step N): TEXT"`` with a step.
- **add_hparams(h, m)**: an ``hparams`` event of the run (or of the sub-run
  ``RUN/run_name`` when ``run_name``, tensorboardX's ``name``, is given) and
  ``m`` logged as its metrics at ``global_step`` (per-tag counter when
  ``None``). Values that are not str, int, float, bool or None go through
  ``float()``. ``hparam_domain_discrete`` is accepted and ignored.
- Accepted and ignored: ``purge_step``, ``max_queue``, ``flush_secs``,
  ``filename_suffix``, ``new_style``, ``double_precision``, tensorboardX's
  ``write_to_disk``, ``comet_config``, ``display_name``,
  ``summary_description``, and ``walltime`` of ``add_text``.
- **Status**: the run is marked ``running`` at creation and ``finished`` on
  ``close()``, or ``failed`` when a ``with`` block ends with an exception.
  Unlike TensorBoard's, a closed writer cannot be used again.
"""

from __future__ import annotations

import os
import socket
import threading
import warnings
from collections.abc import Mapping
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from trainstream.client.http import TOKEN_ENV
from trainstream.events import MAX_RUN_LENGTH
from trainstream.integrations import _failure
from trainstream.integrations._target import URL_ENV, check_options, sanitize
from trainstream.integrations._writer_media import FileWriter, MediaMethods

if TYPE_CHECKING:
    from trainstream.api import RunAPI
    from trainstream.client import Publisher
    from trainstream.run import Run

__all__ = ["SummaryWriter", "sanitize"]

_PARAM_TYPES = (str, int, float, bool, type(None))


def _parts(path: str) -> list[str]:
    return [p for p in str(path).replace("\\", "/").split("/") if p and p != "."]


def _default_run(log_dir: str | None, comment: str, root: str | None = None) -> str:
    """The run of ``log_dir`` as TensorBoard shows it (see the module's docstring)."""
    if log_dir is None:
        stamp = datetime.now().strftime("%b%d_%H-%M-%S")
        return f"{stamp}_{socket.gethostname()}{comment}"
    parts = _parts(log_dir)
    root = root if root is not None else os.environ.get("TRAINSTREAM_LOGDIR_ROOT") or None
    if root is not None:
        base = _parts(os.path.relpath(log_dir, root))
        if base and ".." not in base:
            return "/".join(base)
    if "runs" in parts[:-1]:
        return "/".join(parts[len(parts) - parts[::-1].index("runs") :])
    relative = not str(log_dir).replace("\\", "/").startswith("/") and ":" not in str(log_dir)
    if relative and len(parts) > 1 and ".." not in parts:
        return "/".join(parts[1:])
    return parts[-1] if parts else "run"


class SummaryWriter(MediaMethods):
    """
    TensorBoard's ``SummaryWriter`` publishing to trainstream (see the module).

    :param log_dir: names the run (as TensorBoard shows it) unless ``run`` is given.
    :param comment: appended to the default run name when ``log_dir`` is None.
    :param url: a trainstream server (``http://host:port``): publish through
        :class:`trainstream.client.Publisher`; without it and ``server_config``,
        ``$TRAINSTREAM_URL`` (and ``$TRAINSTREAM_TOKEN``). Without any, the process-wide
        embedded server is used (``trainstream.get_stream_server``), and
        released on ``close()``.
    :param run: the run's name.
    :param token: the remote server's bearer token.
    :param server_config: the embedded server's config (not with ``url``).
    :param flush_timeout: remote only: how long ``flush``/``close`` wait for
        the server (``None``: no limit).
    :param logdir_root: the directory TensorBoard would be started on
        (``--logdir``): the run is ``log_dir`` relative to it.
    :param logdir: tensorboardX's name of ``log_dir``; ``write_to_disk``,
        ``comet_config`` and other tensorboardX keywords are accepted and ignored.
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
        logdir_root: str | None = None,
        logdir: str | None = None,
        write_to_disk: bool = True,
        comet_config: Any = None,
        **kwargs: Any,
    ) -> None:
        if url is None and server_config is None and os.environ.get(URL_ENV):
            url = os.environ[URL_ENV]  # the same script publishes there, unchanged
            token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        check_options("SummaryWriter", url, token, server_config)
        if kwargs:
            unknown = ", ".join(sorted(kwargs))
            warnings.warn(f"SummaryWriter: keyword(s) {unknown} ignored", stacklevel=2)
        log_dir = log_dir if log_dir is not None else logdir  # tensorboardX's name
        if log_dir is None:  # torch's default, as get_logdir() gives it
            log_dir = os.path.join("runs", _default_run(None, comment))
            default = os.path.basename(log_dir)  # the run TensorBoard shows for it
        else:
            default = _default_run(log_dir, comment, logdir_root)
        self.run_name = sanitize(run if run is not None else default, MAX_RUN_LENGTH)
        self.log_dir = log_dir
        self.logdir = log_dir  # tensorboardX's name
        self._warned: set[str] = set()
        self.file_writer: FileWriter = FileWriter(self)
        self.all_writers = {str(log_dir): self.file_writer}
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
        *,
        display_name: str | None = "",
        summary_description: str | None = "",
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
        *,
        name: str | None = None,
    ) -> None:
        """The run's hyperparameters, and ``metric_dict`` as its metrics."""
        self._check_open()
        if isinstance(hparam_domain_discrete, str):
            # tensorboardX's positional add_hparams(h, m, name, global_step)
            if global_step is None and not isinstance(run_name, str):
                global_step, run_name = run_name, None
            name, hparam_domain_discrete = hparam_domain_discrete, None
        run_name = run_name if run_name is not None else name  # tensorboardX's name
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
                _failure.forget(sink)
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
        _failure.watch(sink)  # an exception that ends the script marks it failed
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
