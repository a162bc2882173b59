"""
What an event may be (``PROTOCOL.md`` section 2), each rule defined once:
the types and their fields, the name alphabet, the 64-bit range, the
strings that stand for NaN and the infinities, the size limits, and the
error every violation raises.

Everything else that needs one of these rules (the validator, the codec,
the OpenAPI document, the web layer's body limit, the integrations' name
cleaning) imports it from here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

import attrs

#: The media types (trainstream's own, beyond PROTOCOL.md; see docs/protocol.md,
#: "Media events"): what TensorBoard's writer logs besides scalars and text.
MEDIA_TYPES: frozenset[str] = frozenset({"histogram", "image", "pr_curve", "layout"})
EVENT_TYPES: frozenset[str] = (
    frozenset({"metric", "status", "log", "hparams", "alert"}) | MEDIA_TYPES
)
STATES: frozenset[str] = frozenset(
    {"created", "running", "paused", "finished", "failed", "stalled"}
)
LEVELS: frozenset[str] = frozenset({"debug", "info", "warning", "error"})

#: Maximum lengths of a run name and of a metric (or alert) name.
MAX_RUN_LENGTH = 128
MAX_NAME_LENGTH = 256

#: Every integer an event holds fits in a signed 64-bit integer.
INT_MIN = -(2**63)
INT_MAX = 2**63 - 1

#: One event, encoded, at most (bytes of UTF-8).
MAX_EVENT_BYTES = 64 * 1024
#: One request body (REST) or message (WebSocket) at most, in bytes.
MAX_BODY_BYTES = 8 * 1024 * 1024
#: One media event (an image above all), encoded, at most: base64 PNG of a
#: few hundred pixels a side. The writer scales a larger image down to fit.
MAX_MEDIA_BYTES = 256 * 1024
#: Image formats an ``image`` event may hold, and its largest side in pixels.
IMAGE_FORMATS: frozenset[str] = frozenset({"png", "jpeg"})
MAX_IMAGE_SIDE = 16384
#: Buckets of one ``histogram``, points of one ``pr_curve``, at most.
MAX_BUCKETS = 4096
MAX_CURVE_POINTS = 4096
#: A ``layout`` (custom scalars): its chart kinds, and tags per chart at most.
CHART_KINDS: frozenset[str] = frozenset({"Multiline", "Margin"})
MAX_LAYOUT_TAGS = 256

# The name alphabet, as a regular-expression class: a run or metric name is
# 1..N of these characters, and "/" too, but not first.
_NAME_CLASS = r"A-Za-z0-9._:\-"
#: A whole name (anchor it to match a whole string; JSON Schema takes it too).
NAME_PATTERN = rf"[{_NAME_CLASS}][{_NAME_CLASS}/]*"
NAME_RE = re.compile(NAME_PATTERN)
#: One character a name may not hold.
BAD_NAME_CHAR_RE = re.compile(rf"[^{_NAME_CLASS}/]")

#: The strings that stand for the floats JSON has no literal for.
NON_FINITE: Mapping[str, float] = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def non_finite_name(value: float) -> str:
    """The protocol string of a non-finite float (see ``NON_FINITE``)."""
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


_COMMON_FIELDS = frozenset({"type", "run", "time"})
#: The fields each type of event may have (``type``, ``run``, ``time`` and its own).
FIELDS: Mapping[str, frozenset[str]] = {
    "metric": _COMMON_FIELDS | {"name", "step", "value", "rank"},
    "status": _COMMON_FIELDS | {"state", "epoch", "message"},
    "log": _COMMON_FIELDS | {"level", "message"},
    "hparams": _COMMON_FIELDS | {"params"},
    "alert": _COMMON_FIELDS | {"kind", "message", "name"},
    "histogram": _COMMON_FIELDS
    | {"name", "step", "buckets", "min", "max", "num", "sum", "sum_squares"},
    "image": _COMMON_FIELDS | {"name", "step", "format", "width", "height", "data"},
    "pr_curve": _COMMON_FIELDS | {"name", "step", "precision", "recall", "thresholds"},
    "layout": _COMMON_FIELDS | {"layout"},
}
#: Fields only the server may set: named as such instead of as unknown.
SERVER_FIELDS: Mapping[str, str] = {"id": "assigned", "rewind_to": "added"}


@attrs.frozen
class Limits:
    """
    Size limits on what a publisher may send.

    :ivar max_event_bytes: one event, encoded by ``encode_event``, in
        bytes of UTF-8 (over it: HTTP 400).
    :ivar max_body_bytes: one request body or WebSocket message in bytes
        (over it: HTTP 413, WebSocket close 1009).
    :ivar max_media_bytes: one event of a ``MEDIA_TYPES`` type, encoded, in
        bytes (over it: HTTP 400).
    """

    max_event_bytes: int = attrs.field(
        default=MAX_EVENT_BYTES,
        validator=[attrs.validators.instance_of(int), attrs.validators.gt(0)],
    )
    max_body_bytes: int = attrs.field(
        default=MAX_BODY_BYTES,
        validator=[attrs.validators.instance_of(int), attrs.validators.gt(0)],
    )
    #: One media event (``MEDIA_TYPES``: an image above all) in bytes, in
    #: place of ``max_event_bytes``; ``Hub(limits=Limits(max_media_bytes=N))``.
    max_media_bytes: int = attrs.field(
        default=MAX_MEDIA_BYTES,
        validator=[attrs.validators.instance_of(int), attrs.validators.gt(0)],
    )


DEFAULT_LIMITS = Limits()


class EventError(ValueError):
    """
    A publisher's mistake: maps to HTTP 400 ``{"error": message, "index": index}``.

    :ivar message: what is wrong and where, fit to show to the publisher.
    :ivar index: position of the bad event in its batch, or ``None`` when
        the problem is not in one event (the body, the batch itself).
    :ivar field: name of the offending field, or ``None``.
    :ivar detail: what is wrong, without where (``message`` says where): the
        same text whichever entry point (REST, WebSocket, ``run.log``) met it.
    """

    def __init__(
        self,
        message: str,
        index: int | None = None,
        field: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.index = index
        self.field = field
        self.detail = message if detail is None else detail

    def to_json(self) -> dict[str, object]:
        """
        :return: the HTTP error body; ``index`` only when known.
        """
        result: dict[str, object] = {"error": self.message}
        if self.index is not None:
            result["index"] = self.index
        return result


class BodyTooLarge(EventError):  # noqa: N818 (the name is the public API)
    """
    The request body is over :attr:`Limits.max_body_bytes`: maps to HTTP 413.
    """


def show(value: object) -> str:
    """
    Show ``value`` briefly, as JSON where possible, for error messages.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = json.dumps(value[:40])
        return shown if len(value) <= 40 else shown[:-1] + '..."'
    if isinstance(value, int):
        if abs(value) > 10**30:
            return f"an integer of {value.bit_length()} bits"
        return repr(int(value))
    if isinstance(value, float):
        # A JSON number too large for a float (1e400) arrives as infinity.
        return repr(float(value)) if math.isfinite(value) else non_finite_name(value)
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    kind = type(value)
    named = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    return f"a Python {named}"
