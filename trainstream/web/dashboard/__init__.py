"""
The dashboard at ``/``: one static page (``index.html``, ``app.js``,
``app.css``) that reads history from the REST API and live points from
``/events``, drawn with uPlot.

uPlot 1.6.16 is vendored here, byte for byte upstream's build
(github.com/leeoniya/uPlot, tag 1.6.16, ``dist/uPlot.iife.js`` and
``dist/uPlot.min.css``), with its MIT license in ``uPlot.LICENSE``: no CDN,
and no ``uplot-python`` wheel (which pulled numpy, IPython and jedi, about
105 MB, for two files).

Static files are read once, gzipped once (for clients that accept it) and
served with a strong ETag per representation; a browser keeps them and
revalidates (a 304 with no body). The page itself is ``no-store``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
from pathlib import Path
from urllib.parse import quote

from attrs import frozen
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from trainstream.web.access import ErrorPage

#: Our own static files and their content types.
OWN_FILES = {
    "app.js": b"text/javascript; charset=utf-8",
    "logs.js": b"text/javascript; charset=utf-8",
    "app.css": b"text/css; charset=utf-8",
    "favicon.svg": b"image/svg+xml",
}
#: uPlot's files, vendored next to ours (``uPlot.LICENSE`` is served too).
UPLOT_FILES = {
    "uPlot.iife.js": b"text/javascript; charset=utf-8",
    "uPlot.min.css": b"text/css; charset=utf-8",
    "uPlot.LICENSE": b"text/plain; charset=utf-8",
}
#: ``Cache-Control`` of our files: kept, revalidated on each use, so a
#: browser never runs an old ``app.js`` against an upgraded server.
REVALIDATE = b"no-cache"
#: ``Cache-Control`` of uPlot's: a pinned third-party build, fresh for a day.
UPLOT_CACHE = b"public, max-age=86400"
#: Below this size gzip saves less than its header costs.
MIN_GZIP_BYTES = 512

#: The page loads only its own files and talks only to its own origin.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def uplot_dir() -> Path | None:
    """The directory holding uPlot's vendored files (this package's), or ``None``."""
    here = Path(str(importlib.resources.files(__name__)))
    return here if (here / "uPlot.iife.js").is_file() else None


@frozen
class Asset:
    """
    One file: its bytes, gzipped bytes (``None`` when gzip does not pay),
    type, ``Cache-Control`` and strong ETags (one per representation).
    """

    body: bytes
    gzipped: bytes | None
    content_type: bytes
    cache_control: bytes
    etag: bytes
    etag_gzip: bytes

    @classmethod
    def of(cls, body: bytes, content_type: bytes, cache_control: bytes = REVALIDATE) -> Asset:
        digest = hashlib.sha256(body).hexdigest()[:20].encode()
        gzipped = None
        if len(body) >= MIN_GZIP_BYTES:
            packed = gzip.compress(body, compresslevel=9, mtime=0)
            gzipped = packed if len(packed) < len(body) * 0.9 else None
        return cls(
            body,
            gzipped,
            content_type,
            cache_control,
            b'"' + digest + b'"',
            b'"' + digest + b'-gzip"',
        )


def load_assets() -> dict[str, Asset]:
    """Every static file by name, ours and uPlot's."""
    here = importlib.resources.files(__name__)
    assets = {}
    for files, cache in ((OWN_FILES, REVALIDATE), (UPLOT_FILES, UPLOT_CACHE)):
        for name, ctype in files.items():
            path = here.joinpath(name)
            if path.is_file():
                assets[name] = Asset.of(path.read_bytes(), ctype, cache)
    return assets


def accepts_gzip(request: Request) -> bool:
    """Whether ``Accept-Encoding`` allows gzip (``gzip``, ``x-gzip`` or ``*``, q > 0)."""
    raw = request.getHeader(b"accept-encoding")
    if not raw:
        return False
    for item in raw.decode("latin-1").split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip", "*"):
            continue
        q = params.strip().lower()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


def matches(if_none_match: bytes | None, etag: bytes) -> bool:
    """``If-None-Match`` (a list, ``*``, weak tags compared weakly) names ``etag``."""
    if not if_none_match:
        return False
    for tag in if_none_match.split(b","):
        tag = tag.strip()
        if tag == b"*" or tag.removeprefix(b"W/") == etag:
            return True
    return False


def _serve(request: Request, asset: Asset) -> bytes:
    gzipped = asset.gzipped is not None and accepts_gzip(request)
    etag = asset.etag_gzip if gzipped else asset.etag
    request.setHeader(b"content-type", asset.content_type)
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"cache-control", asset.cache_control)
    request.setHeader(b"etag", etag)
    if asset.gzipped is not None:
        request.setHeader(b"vary", b"Accept-Encoding")
    if matches(request.getHeader(b"if-none-match"), etag):
        request.setResponseCode(304)
        return b""
    if gzipped:
        assert asset.gzipped is not None
        request.setHeader(b"content-encoding", b"gzip")
        return asset.gzipped
    return asset.body


class StaticFile(Resource):
    isLeaf = True

    def __init__(self, asset: Asset) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.asset = asset

    def render_GET(self, request: Request) -> bytes:
        return _serve(request, self.asset)


class StaticFiles(Resource):
    """``/static/<name>``: the dashboard's files, read once."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._assets: dict[str, Asset] | None = None

    def assets(self) -> dict[str, Asset]:
        if self._assets is None:
            self._assets = load_assets()
        return self._assets

    def getChild(self, path: bytes, request: Request) -> IResource:
        name = path.decode("utf-8", "replace")
        asset = self.assets().get(name)
        if asset is not None:
            return StaticFile(asset)
        if name in UPLOT_FILES or name in OWN_FILES:
            return ErrorPage(
                404, f"{name} is missing from this install of trainstream: reinstall it"
            )
        return ErrorPage(404, f"no such file: /static/{name}")


class DashboardPage(Resource):
    """
    ``/``: ``index.html``. With a token in the page's URL (``/?token=T``),
    the page's own file URLs carry it too, since a browser sends no
    ``Authorization`` header for ``<script src>``.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._template: str | None = None

    def template(self) -> str:
        if self._template is None:
            page = importlib.resources.files(__name__).joinpath("index.html")
            self._template = page.read_text(encoding="utf-8")
        return self._template

    def render_GET(self, request: Request) -> bytes:
        tokens = (request.args or {}).get(b"token")
        query = "?token=" + quote(tokens[0], safe="") if tokens else ""
        body = self.template().replace("{{query}}", query).encode()
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return body


__all__ = ["DashboardPage", "StaticFiles", "load_assets", "uplot_dir"]
