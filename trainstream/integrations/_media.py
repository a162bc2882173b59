"""
Media events from arrays: histograms, images, PR curves and custom-scalar
layouts, as TensorBoard's writer makes them (``torch.utils.tensorboard.summary``),
turned into trainstream's media events (``docs/protocol.md``, "Media events").

Plain functions, so that any publisher (the ``SummaryWriter``, a logdir
follower) builds the same events: ``histogram_event``, ``image_event``,
``pr_curve_event``, ``layout_event`` return events checked by
``validate_event``, ready for ``RunAPI._enqueue``.

NumPy is imported when an array is first converted, never at import time.
PNG encoding uses Pillow when it is installed (as ``torch.utils.tensorboard``
does: extra ``trainstream[tensorboard]``), else a small writer on ``zlib``
(an 8-bit RGB or RGBA PNG: what every browser shows).
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from trainstream.events import validate_event
from trainstream.events.rules import DEFAULT_LIMITS, MAX_BUCKETS

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "fit_png",
    "histogram_buckets",
    "histogram_event",
    "image_array",
    "image_event",
    "layout_event",
    "make_grid",
    "png_bytes",
    "pr_curve",
    "pr_curve_event",
    "raw_buckets",
    "to_numpy",
]

Event = dict[str, object]
#: Room left in ``max_media_bytes`` for an image event's other fields.
_IMAGE_OVERHEAD = 1024
_default_bins: list[float] | None = None


def _tensorflow_bins() -> list[float]:
    """TensorBoard's default bucket edges: +-1e-12 * 1.1**k up to 1e20, and 0."""
    global _default_bins
    if _default_bins is None:
        v, buckets = 1e-12, []
        while v < 1e20:
            buckets.append(v)
            v *= 1.1
        _default_bins = [-b for b in reversed(buckets)] + [0.0] + buckets
    return _default_bins


def to_numpy(value: Any) -> np.ndarray[Any, Any]:
    """A NumPy array of ``value``: a torch tensor (detached, on the CPU), an array, a list."""
    import numpy as np

    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    elif hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()  # a TensorFlow or JAX array
    return np.asarray(value)


# Histograms


def histogram_buckets(
    values: Any, bins: Any = "tensorflow", max_bins: int | None = None
) -> tuple[list[list[float]], dict[str, float]]:
    """
    The ``[[left, right, count], ...]`` buckets and the statistics (``min``,
    ``max``, ``num``, ``sum``, ``sum_squares``) of ``values``, binned like
    TensorBoard: ``bins="tensorflow"`` its exponential edges, else any
    ``numpy.histogram`` bins (a count, ``"auto"``, ``"fd"``, edges); only
    the span from the first to the last non-empty bucket is kept, at most
    ``max_bins`` buckets (neighbours summed), else ``MAX_BUCKETS``, and each
    run of empty buckets becomes one (the same counts, a smaller event).

    :raises ValueError: for no values, or a value that is not finite.
    """
    import numpy as np

    array = to_numpy(values).astype(np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError("add_histogram: the values are empty")
    if not np.isfinite(array).all():
        raise ValueError("add_histogram: the values hold NaN or infinity")
    if isinstance(bins, str) and bins == "tensorflow":
        bins = _tensorflow_bins()
    counts, edges = np.histogram(array, bins=bins)
    nonzero = np.flatnonzero(counts)
    first, last = int(nonzero[0]), int(nonzero[-1]) + 1
    counts, edges = counts[first:last], edges[first : last + 1]
    most = min(max_bins or MAX_BUCKETS, MAX_BUCKETS)
    if len(counts) > most:
        group = math.ceil(len(counts) / most)
        pad = (-len(counts)) % group
        counts = np.pad(counts, (0, pad)).reshape(-1, group).sum(axis=1)
        edges = np.append(edges[:-1:group], edges[-1])
    lefts, rights = edges[:-1].tolist(), edges[1:].tolist()
    buckets: list[list[float]] = []
    for lo, hi, count in zip(lefts, rights, counts.tolist(), strict=True):
        if count == 0 and buckets and buckets[-1][2] == 0:
            buckets[-1][1] = hi  # a run of empty buckets is one: the same counts, smaller
        else:
            buckets.append([lo, hi, float(count)])
    stats = {
        "min": float(array.min()),
        "max": float(array.max()),
        "num": float(array.size),
        "sum": float(array.sum()),
        "sum_squares": float(array.dot(array)),
    }
    return buckets, stats


def raw_buckets(
    minimum: float, maximum: float, bucket_limits: Sequence[float], bucket_counts: Sequence[float]
) -> list[list[float]]:
    """
    TensorBoard's ``HistogramProto`` (right edges ``bucket_limits``) as
    ``[[left, right, count], ...]``, the way TensorBoard itself reads it
    (``data_compat``): lefts are ``[min] + limits[:-1]``, rights
    ``limits[:-1] + [max]``; a first limit below ``min`` (TensorBoard's empty
    leading bucket) keeps its own edge.
    """
    limits = [float(x) for x in to_numpy(bucket_limits).reshape(-1).tolist()]
    counts = [float(x) for x in to_numpy(bucket_counts).reshape(-1).tolist()]
    if not limits or len(limits) != len(counts):
        raise ValueError(
            f"add_histogram_raw: bucket_limits ({len(limits)}) and bucket_counts "
            f"({len(counts)}) must be non-empty and of one length"
        )
    lo, hi = float(minimum), float(maximum)
    lefts = [min(lo, limits[0]), *limits[:-1]]
    rights = [*limits[:-1], max(hi, limits[-1]) if len(limits) > 1 else max(hi, lo)]
    return [
        [left, max(left, right), count]
        for left, right, count in zip(lefts, rights, counts, strict=True)
    ]


def histogram_event(
    run: str,
    name: str,
    step: int,
    data: Any,
    time: float | None = None,
    *,
    bins: Any = "tensorflow",
    max_bins: int | None = None,
    stats: Mapping[str, float] | None = None,
) -> Event:
    """
    A checked ``histogram`` event of ``run``.

    :param data: the values to bin (an array, a tensor, a list; see
        :func:`histogram_buckets`), or buckets already made
        (``[[left, right, count], ...]``, e.g. :func:`raw_buckets`) when
        ``stats`` is given.
    :param stats: with buckets: their ``min``, ``max``, ``num``, ``sum``,
        ``sum_squares`` (any of them).
    """
    if stats is None:
        buckets, stats = histogram_buckets(data, bins, max_bins)
    else:
        buckets = [list(b) for b in data]
    event: Event = {"type": "histogram", "run": run, "name": name, "step": step}
    event["buckets"] = buckets
    event.update(stats)
    if time is not None:
        event["time"] = time
    return validate_event(event)


# Images


def image_array(value: Any, dataformats: str = "CHW") -> np.ndarray[Any, Any]:
    """
    ``value`` as an ``HxWx3`` (or ``x4``) ``uint8`` array, as TensorBoard's
    ``image()`` makes it: ``dataformats`` names the axes (``CHW``, ``HWC``,
    ``HW``, or ``NCHW``/``NHWC`` for a batch, made one grid of 8 columns);
    floats are in [0, 1] (scaled by 255), ``uint8`` in [0, 255]; out of
    range is clipped.

    :raises ValueError: naming the shape and the formats when they disagree.
    """
    import numpy as np

    array = to_numpy(value)
    form = dataformats.upper()
    if len(set(form)) != len(form) or not set(form) <= set("NCHW") or array.ndim != len(form):
        raise ValueError(
            f"image of shape {tuple(array.shape)} does not match dataformats {dataformats!r} "
            "(one of CHW, HWC, HW, NCHW, NHWC, ...)"
        )
    scale = 1 if array.dtype == np.uint8 else 255
    if len(form) == 4:
        array = make_grid(array.transpose([form.index(c) for c in "NCHW"])).transpose(1, 2, 0)
    elif len(form) == 3:
        array = array.transpose([form.index(c) for c in "HWC"])
    elif form in ("HW", "WH"):
        array = array.transpose([form.index(c) for c in "HW"])[:, :, None]
    else:
        raise ValueError(f"dataformats {dataformats!r} must name H and W")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.shape[2] not in (3, 4):
        raise ValueError(f"an image has 1, 3 or 4 channels, got {array.shape[2]}")
    out = (array.astype(np.float32) * scale).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


def make_grid(batch: Any, ncols: int = 8) -> np.ndarray[Any, Any]:
    """``NxCxHxW`` images as one ``CxH'xW'`` grid of ``ncols`` columns (TensorBoard's)."""
    import numpy as np

    array = to_numpy(batch)
    if array.ndim != 4 or array.shape[0] == 0:
        raise ValueError(f"a batch of images is NCHW with N >= 1, got shape {array.shape}")
    if array.shape[1] == 1:
        array = np.concatenate([array] * 3, axis=1)
    n, c, h, w = array.shape
    cols = min(n, ncols)
    rows = math.ceil(n / cols)
    grid = np.zeros((c, h * rows, w * cols), dtype=array.dtype)
    for i in range(n):
        y, x = divmod(i, cols)
        grid[:, y * h : (y + 1) * h, x * w : (x + 1) * w] = array[i]
    return grid


def png_bytes(hwc: np.ndarray[Any, Any]) -> bytes:
    """An ``HxWx3|4`` ``uint8`` array as PNG: by Pillow if installed, else zlib."""
    try:
        from PIL import Image
    except ImportError:
        return _png_zlib(hwc)
    import io

    out = io.BytesIO()
    Image.fromarray(hwc).save(out, format="PNG", optimize=False)
    return out.getvalue()


def _png_zlib(hwc: np.ndarray[Any, Any]) -> bytes:
    height, width, channels = hwc.shape
    raw = b"".join(b"\x00" + hwc[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    color = 2 if channels == 3 else 6
    head = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", head)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def fit_png(
    hwc: np.ndarray[Any, Any], max_event_bytes: int = DEFAULT_LIMITS.max_media_bytes
) -> tuple[bytes, int, int, bool]:
    """
    ``hwc`` as PNG small enough for one media event (its base64 within
    ``max_event_bytes``): halved in each side (2x2 means) until it fits.

    :return: ``(png, width, height, scaled)``.
    """
    import numpy as np

    budget = (max_event_bytes - _IMAGE_OVERHEAD) * 3 // 4
    scaled = False
    while True:
        png = png_bytes(hwc)
        height, width = hwc.shape[:2]
        if len(png) <= budget or (height <= 8 and width <= 8):
            return png, width, height, scaled
        h2, w2 = max(1, height // 2), max(1, width // 2)
        crop = hwc[: h2 * 2, : w2 * 2].astype(np.float32) if height > 1 and width > 1 else None
        if crop is None:
            hwc = hwc[:: 2 if height > 1 else 1, :: 2 if width > 1 else 1]
        else:
            means = crop.reshape(h2, 2, w2, 2, -1).mean(axis=(1, 3))
            hwc = np.ascontiguousarray(means.round().astype(np.uint8))
        scaled = True


def image_event(
    run: str,
    name: str,
    step: int,
    png: bytes,
    width: int,
    height: int,
    time: float | None = None,
    image_format: str = "png",
) -> Event:
    """A checked ``image`` event of ``run``: ``png`` (encoded image bytes) in base64."""
    event: Event = {"type": "image", "run": run, "name": name, "step": step}
    event.update(format=image_format, width=width, height=height)
    event["data"] = base64.b64encode(png).decode("ascii")
    if time is not None:
        event["time"] = time
    return validate_event(event)


def figure_array(figure: Any, close: bool = True) -> np.ndarray[Any, Any]:
    """A matplotlib figure rendered by Agg as ``HxWx3`` ``uint8`` (closed after, if ``close``)."""
    import importlib

    import numpy as np

    agg = importlib.import_module("matplotlib.backends.backend_agg")
    canvas = agg.FigureCanvasAgg(figure)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    if close:
        importlib.import_module("matplotlib.pyplot").close(figure)
    return np.ascontiguousarray(rgba[:, :, :3])


# PR curves and layouts


def pr_curve(
    labels: Any, predictions: Any, num_thresholds: int = 127, weights: Any = None
) -> tuple[list[float], list[float], list[float]]:
    """
    ``(precision, recall, thresholds)`` of binary ``labels`` against
    ``predictions`` in [0, 1], as TensorBoard computes them
    (``compute_curve``): ``num_thresholds`` (at most 127) evenly spaced.
    """
    import numpy as np

    n = max(2, min(int(num_thresholds), 127))
    labels_np = to_numpy(labels).astype(np.float64).reshape(-1)
    scores = to_numpy(predictions).astype(np.float64).reshape(-1)
    w = 1.0 if weights is None else to_numpy(weights).astype(np.float64).reshape(-1)
    index = np.floor(np.clip(scores, 0, 1) * (n - 1)).astype(np.int64)
    tp_b = np.bincount(index, weights=labels_np * w, minlength=n)
    fp_b = np.bincount(index, weights=(1.0 - labels_np) * w, minlength=n)
    tp = np.cumsum(tp_b[::-1])[::-1]
    fp = np.cumsum(fp_b[::-1])[::-1]
    fn = tp[0] - tp
    precision = tp / np.maximum(1e-7, tp + fp)
    recall = tp / np.maximum(1e-7, tp + fn)
    thresholds = [i / (n - 1) for i in range(n)]
    return precision.tolist(), recall.tolist(), thresholds


def pr_curve_event(
    run: str,
    name: str,
    step: int,
    precision: Sequence[float],
    recall: Sequence[float],
    thresholds: Sequence[float],
    time: float | None = None,
) -> Event:
    """A checked ``pr_curve`` event of ``run``."""
    event: Event = {"type": "pr_curve", "run": run, "name": name, "step": step}
    event.update(precision=list(precision), recall=list(recall), thresholds=list(thresholds))
    if time is not None:
        event["time"] = time
    return validate_event(event)


def layout_event(run: str, layout: Mapping[str, Any], time: float | None = None) -> Event:
    """A checked ``layout`` event: custom scalars ``{category: {title: [kind, [tags]]}}``."""
    event: Event = {"type": "layout", "run": run, "layout": layout}
    if time is not None:
        event["time"] = time
    return validate_event(event)
