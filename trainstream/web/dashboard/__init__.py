"""
The dashboard at ``/``: one static page (``index.html``, ``app.js``,
``app.css``) that reads history from the REST API and live points from
``/events``, drawn with uPlot.

uPlot's two files come from the installed ``uplot-python`` wheel
(``uplot/static/``), so no CDN and no copy of a third-party file lives in this
repository. The wheel's package is located, not imported: importing ``uplot``
loads numpy (~150 ms and ~20 MB) for nothing the server needs.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
from pathlib import Path
from urllib.parse import quote

from attrs import frozen
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from trainstream.web.access import ErrorPage

#: Our own static files and their content types.
OWN_FILES = {
    "app.js": b"text/javascript; charset=utf-8",
    "app.css": b"text/css; charset=utf-8",
    "favicon.svg": b"image/svg+xml",
}
#: Files served from the ``uplot-python`` wheel.
UPLOT_FILES = {
    "uPlot.iife.js": b"text/javascript; charset=utf-8",
    "uPlot.min.css": b"text/css; charset=utf-8",
}

#: The page loads only its own files and talks only to its own origin.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def uplot_dir() -> Path | None:
    """The ``uplot/static`` directory of the installed wheel, or ``None``."""
    spec = importlib.util.find_spec("uplot")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    return static if static.is_dir() else None


@frozen
class Asset:
    """One file's bytes, type and validator."""

    body: bytes
    content_type: bytes
    etag: bytes

    @classmethod
    def of(cls, body: bytes, content_type: bytes) -> Asset:
        return cls(body, content_type, b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"')


def load_assets() -> dict[str, Asset]:
    """Every static file by name; uPlot's are missing when the wheel is."""
    own = importlib.resources.files(__name__)
    assets = {
        name: Asset.of(own.joinpath(name).read_bytes(), ctype) for name, ctype in OWN_FILES.items()
    }
    directory = uplot_dir()
    if directory is not None:
        for name, ctype in UPLOT_FILES.items():
            path = directory / name
            if path.is_file():
                assets[name] = Asset.of(path.read_bytes(), ctype)
    return assets


def _serve(request: Request, asset: Asset) -> bytes:
    request.setHeader(b"content-type", asset.content_type)
    request.setHeader(b"x-content-type-options", b"nosniff")
    # Revalidate each load (cheap: 304), so an upgraded server never runs old code.
    request.setHeader(b"cache-control", b"no-cache")
    request.setHeader(b"etag", asset.etag)
    if request.getHeader(b"if-none-match") == asset.etag:
        request.setResponseCode(304)
        return b""
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
        if name in UPLOT_FILES:
            return ErrorPage(
                404, f"{name} comes from the uplot-python package: pip install uplot-python"
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
