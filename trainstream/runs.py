"""
What the server knows of each run: state, hyperparameters, per-metric
summaries; stall detection and NaN alerts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service

from trainstream.hub import Hub
from trainstream.store import Record


class RunsService(Service):
    """Watches every published batch (``Hub.observers``)."""

    def __init__(self, hub: Hub, clock: Any, stall_after: float) -> None:
        self.hub = hub
        self.clock = clock
        self.stall_after = stall_after
        hub.observers.append(self.observe)

    def observe(self, records: Sequence[Record]) -> None:
        """Update the registry from a published batch."""
