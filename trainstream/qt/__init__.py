"""
``trainstream.qt.StreamMonitor``: a Qt widget that shows a trainstream
server live (its transports, its runs, their metrics), for a desktop app to
embed in one line. An optional extra: ``pip install 'trainstream[qt]'``
(PySide6 and pyqtgraph). ``import trainstream`` never imports Qt; only
this package does.
"""

from __future__ import annotations

_INSTALL = "pip install 'trainstream[qt]'"

try:
    import PySide6.QtNetwork  # noqa: F401  (imported first: pyqtgraph then uses it)
except ImportError:
    raise ImportError(f"trainstream.qt needs PySide6: {_INSTALL}") from None

try:
    import pyqtgraph  # type: ignore[import-untyped]
except ImportError:
    raise ImportError(f"trainstream.qt needs pyqtgraph: {_INSTALL}") from None

if pyqtgraph.Qt.QT_LIB != "PySide6":
    raise ImportError(
        f"trainstream.qt needs pyqtgraph on PySide6, but it uses {pyqtgraph.Qt.QT_LIB} "
        "(imported first, or PYQTGRAPH_QT_LIB): import PySide6 before pyqtgraph"
    )

from trainstream.qt._links import LinkStatus  # noqa: E402
from trainstream.qt._model import MonitorModel, RunInfo  # noqa: E402
from trainstream.qt._monitor import StreamMonitor  # noqa: E402

__all__ = ["LinkStatus", "MonitorModel", "RunInfo", "StreamMonitor"]
