"""
TensorBoard ``Event`` records as trainstream events: pure, no I/O.

What each summary value becomes (``tag`` sanitized like the writer's, see
:func:`trainstream.integrations._target.sanitize`):

- ``simple_value`` (TF1 style, tensorboardX, torch's ``add_scalar``) and a
  one-element tensor of the ``scalars`` plugin (TensorBoard 2 summaries,
  torch's ``add_scalar(new_style=True)``): a ``metric`` at the event's step
  and wall time; NaN and infinities as the protocol's strings.
- a string tensor of the ``text`` plugin: a ``log`` line (``info``),
  ``"TAG (step N): TEXT"``; a table's cells are joined by newlines.
- the ``hparams`` plugin's ``session_start_info``: an ``hparams`` event.
- histograms (``histo``: TF1 style, what torch and tensorboardX write) and
  images (``image``, PNG or JPEG): ``histogram`` and ``image`` events, built
  by :mod:`trainstream.integrations._media` like the writer's. An image
  larger than a media event may hold is skipped (said once per tag).
  TensorBoard 2's histogram and image *tensors* (the ``histograms`` and
  ``images`` plugins of ``tf.summary``) are skipped.
- PR curves (the ``pr_curves`` plugin's ``[6, N]`` tensor): ``pr_curve``
  events (precision, recall, N evenly spaced thresholds); custom scalar
  layouts: a ``layout`` event in the writer's ``{category: {title: [kind, tags]}}``.
- anything else (audio, meshes, video, graphs, run metadata): skipped, and
  said once per run and tag (:attr:`Decoder.skipped`).

A writer stores a tag's plugin metadata on its first value only, so the
decoder remembers each run's ``tag -> plugin`` (:attr:`Decoder.plugins`);
the follower keeps it in its state so a restart mid-file knows it too.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from trainstream.events import BAD_NAME_CHAR_RE, INT_MAX, MAX_NAME_LENGTH, non_finite_name

__all__ = ["Decoder", "Protos", "load_protos"]

Event = dict[str, object]

#: Longest log message kept of a text summary (bytes of UTF-8; an event is at most 64 KiB).
MAX_TEXT_BYTES = 60_000

# TensorProto dtypes (tensorflow/core/framework/types.proto) of a scalar's tensor_content.
_CONTENT = {1: "<f", 2: "<d", 3: "<i", 4: "<B", 5: "<h", 6: "<b", 9: "<q", 10: "<?", 19: "<e"}


@dataclass(frozen=True)
class Protos:
    """The compiled protobuf messages the decoder parses, and whose they are."""

    event: Any
    hparams_plugin_data: Any
    source: str
    #: custom scalars' ``Layout``
    layout: Any = None


def load_protos() -> Protos:
    """
    The ``Event`` and ``HParamsPluginData`` messages of TensorBoard (when
    ``tensorboard`` is installed: what ``torch.utils.tensorboard`` needs;
    about 20 ms to import) or else of tensorboardX (what ``trainstream[follow]``
    installs: protobuf and numpy, no more).

    :raises ModuleNotFoundError: naming what to install when neither is there.
    """
    try:
        from tensorboard.compat.proto import event_pb2  # type: ignore[import-untyped,import-not-found]
        from tensorboard.plugins.custom_scalar import (  # type: ignore[import-untyped,import-not-found]
            layout_pb2,
        )
        from tensorboard.plugins.hparams import plugin_data_pb2  # type: ignore[import-untyped,import-not-found]

        return Protos(
            event_pb2.Event, plugin_data_pb2.HParamsPluginData, "tensorboard", layout_pb2.Layout
        )
    except ImportError:
        pass
    try:
        from tensorboardX.proto import (  # type: ignore[import-untyped,import-not-found]
            event_pb2 as x_event_pb2,
            layout_pb2 as x_layout_pb2,
            plugin_hparams_pb2,
        )
    except ImportError:
        raise ModuleNotFoundError(
            "following a TensorBoard logdir needs TensorBoard's or tensorboardX's "
            "event protos: pip install 'trainstream[follow]' (or tensorboard)",
            name="tensorboardX",
        ) from None
    return Protos(
        x_event_pb2.Event, plugin_hparams_pb2.HParamsPluginData, "tensorboardX", x_layout_pb2.Layout
    )


def _media() -> Any:
    """``trainstream.integrations._media`` (the media event builders), or ``None`` without them."""
    try:
        from trainstream.integrations import _media
    except ImportError:
        return None
    return _media


_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"))


def sanitize(name: object, max_length: int = MAX_NAME_LENGTH) -> str:
    """
    A tag or directory made a valid name, by the writer's rule
    (``trainstream.integrations._target.sanitize``, not imported: it would
    bring the embedded server in): characters outside the alphabet become
    ``_``, leading ``/`` go, cut to ``max_length``.
    """
    clean = BAD_NAME_CHAR_RE.sub("_", str(name)).lstrip("/")[:max_length]
    return clean or "_"


@dataclass
class Decoder:
    """
    Decodes one logdir's records, run by run, remembering each run's
    ``tag -> plugin`` (``plugins``) and what it skipped.

    :ivar skipped: ``(run, tag, what)`` not shown, each once; the follower
        logs and clears it.
    """

    protos: Protos
    plugins: MutableMapping[str, dict[str, str]] = field(default_factory=dict)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    _said: set[tuple[str, str]] = field(default_factory=set)

    def events(self, run: str, data: bytes) -> Iterator[Event]:
        """The trainstream events of one record of ``run``'s files."""
        event = self.protos.event.FromString(data)
        kind = event.WhichOneof("what")
        if kind != "summary":
            if kind in ("graph_def", "meta_graph_def", "tagged_run_metadata"):
                self._skip(run, kind, "a graph")
            return
        t = event.wall_time
        step = event.step
        if not 0 <= step <= INT_MAX:
            self._skip(run, "step", f"step {step} (a step is an integer >= 0)")
            return
        known = self.plugins.setdefault(run, {})
        for value in event.summary.value:
            plugin = value.metadata.plugin_data.plugin_name
            if plugin:
                known[value.tag] = plugin
            else:
                plugin = known.get(value.tag, "")
            yield from self._value(run, t, step, value, plugin)

    def _value(self, run: str, t: float, step: int, value: Any, plugin: str) -> Iterator[Event]:
        tag = value.tag
        which = value.WhichOneof("value")
        if which == "simple_value":
            yield _metric(run, t, sanitize(tag), step, value.simple_value)
        elif which == "tensor" and plugin == "scalars":
            number = _scalar(value.tensor)
            if number is None:
                self._skip(run, tag, "a scalar tensor with more than one value")
            else:
                yield _metric(run, t, sanitize(tag), step, number)
        elif which == "tensor" and plugin == "text":
            text = "\n".join(s.decode("utf-8", "replace") for s in value.tensor.string_val)
            message = f"{tag} (step {step}): {text}".encode()[:MAX_TEXT_BYTES]
            yield {
                "type": "log",
                "run": run,
                "time": t,
                "level": "info",
                "message": message.decode("utf-8", "ignore"),
            }
        elif plugin == "hparams":
            params = self._hparams(value.metadata.plugin_data.content)
            if params is not None:
                yield {"type": "hparams", "run": run, "time": t, "params": params}
        elif which == "tensor" and plugin == "pr_curves":
            yield from self._pr_curve(run, t, tag, step, value.tensor)
        elif which == "tensor" and plugin == "custom_scalars" and self.protos.layout is not None:
            yield from self._layout(run, t, tag, value.tensor)
        elif which == "histo" or plugin == "histograms":
            yield from self._media(run, t, tag, step, value, "histogram")
        elif which == "image" or plugin == "images":
            yield from self._media(run, t, tag, step, value, "image")
        else:
            self._skip(run, tag, plugin or which or "an empty value")

    def _hparams(self, content: bytes) -> dict[str, object] | None:
        data = self.protos.hparams_plugin_data.FromString(content)
        if data.WhichOneof("data") != "session_start_info":
            return None  # the experiment's domains, the session's end: nothing to show
        params: dict[str, object] = {}
        for name, v in data.session_start_info.hparams.items():
            kind = v.WhichOneof("kind")
            if kind == "number_value":
                number = v.number_value
                params[name] = number if math.isfinite(number) else non_finite_name(number)
            elif kind in ("string_value", "bool_value"):
                params[name] = getattr(v, kind)
            else:
                params[name] = None
        return params

    def _media(
        self, run: str, t: float, tag: str, step: int, value: Any, kind: str
    ) -> Iterator[Event]:
        media = _media()
        if media is None:
            self._skip(run, tag, f"a {kind} (this trainstream has no {kind} events)")
            return
        which = value.WhichOneof("value")
        try:
            if kind == "histogram":
                if which != "histo":
                    self._skip(run, tag, "a TensorBoard 2 histogram tensor")
                    return
                h = value.histo
                buckets = media.raw_buckets(h.min, h.max, list(h.bucket_limit), list(h.bucket))
                stats = {"min": h.min, "max": h.max, "num": h.num, "sum": h.sum}
                stats["sum_squares"] = h.sum_squares
                yield media.histogram_event(run, sanitize(tag), step, buckets, t, stats=stats)
                return
            if which != "image":
                self._skip(run, tag, "a TensorBoard 2 image tensor")
                return
            img = value.image
            data = img.encoded_image_string
            form = next((f for magic, f in _IMAGE_MAGIC if data.startswith(magic)), None)
            if form is None:
                self._skip(run, tag, "an image neither PNG nor JPEG")
                return
            yield media.image_event(run, sanitize(tag), step, data, img.width, img.height, t, form)
        except (TypeError, ValueError) as e:  # EventError is a ValueError: too large, ...
            self._skip(run, tag, f"a {kind} that cannot be shown: {e}")

    def _pr_curve(self, run: str, t: float, tag: str, step: int, tensor: Any) -> Iterator[Event]:
        """The plugin's ``[6, N]`` tensor: TP, FP, TN, FN, precision, recall at N thresholds."""
        media = _media()
        dims = [d.size for d in tensor.tensor_shape.dim]
        values = _floats(tensor)
        if media is None or len(dims) != 2 or dims[0] != 6 or len(values) != 6 * dims[1]:
            self._skip(run, tag, "a PR curve" + ("" if media else " (no pr_curve events here)"))
            return
        n = dims[1]
        thresholds = [i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        try:
            yield media.pr_curve_event(
                run, sanitize(tag), step, values[4 * n : 5 * n], values[5 * n :], thresholds, t
            )
        except (TypeError, ValueError) as e:
            self._skip(run, tag, f"a PR curve that cannot be shown: {e}")

    def _layout(self, run: str, t: float, tag: str, tensor: Any) -> Iterator[Event]:
        """Custom scalars' ``Layout`` as the writer's ``{category: {title: [kind, tags]}}``."""
        media = _media()
        if media is None or len(tensor.string_val) != 1:
            self._skip(run, tag, "a custom scalars layout")
            return
        layout: dict[str, dict[str, list[object]]] = {}
        for category in self.protos.layout.FromString(tensor.string_val[0]).category:
            charts = layout.setdefault(category.title, {})
            for chart in category.chart:
                if chart.WhichOneof("content") == "margin":
                    for series in chart.margin.series:
                        charts[chart.title] = ["Margin", [series.value, series.lower, series.upper]]
                else:
                    charts[chart.title] = ["Multiline", list(chart.multiline.tag)]
        try:
            yield media.layout_event(run, layout, t)
        except (TypeError, ValueError) as e:
            self._skip(run, tag, f"a custom scalars layout that cannot be shown: {e}")

    def _skip(self, run: str, tag: str, what: str) -> None:
        if (run, tag) not in self._said:
            self._said.add((run, tag))
            self.skipped.append((run, tag, what))


def _metric(run: str, t: float, name: str, step: int, value: float) -> Event:
    shown: object = value if math.isfinite(value) else non_finite_name(value)
    return {"type": "metric", "run": run, "time": t, "name": name, "step": step, "value": shown}


def _floats(tensor: Any) -> list[float]:
    """Every number of a float tensor, from ``float_val`` or ``tensor_content``."""
    if len(tensor.float_val):
        return [float(x) for x in tensor.float_val]
    content = tensor.tensor_content
    if tensor.dtype == 1 and len(content) % 4 == 0:
        return [float(x) for x in struct.unpack(f"<{len(content) // 4}f", content)]
    return []


def _scalar(tensor: Any) -> float | None:
    """The one number of a scalar tensor, or ``None`` if it holds another count."""
    for name in ("float_val", "double_val", "int_val", "int64_val", "bool_val"):
        values = getattr(tensor, name)
        if len(values):
            return float(values[0]) if len(values) == 1 else None
    if len(tensor.half_val):
        if len(tensor.half_val) != 1:
            return None
        return float(struct.unpack("<e", struct.pack("<H", tensor.half_val[0]))[0])
    fmt = _CONTENT.get(tensor.dtype)
    content = tensor.tensor_content
    if fmt is None or len(content) != struct.calcsize(fmt):
        return None
    return float(struct.unpack(fmt, content)[0])
