"""
Where events are kept: one interface, with memory (and later SQLite) behind it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from attrs import frozen


@frozen
class Record:
    """
    One accepted event: its id, the fields filters look at, the event as a
    dict, and its JSON encoded once for every client.
    """

    id: int
    type: str
    run: str
    name: str | None
    event: dict[str, object]
    json: str


class Store(Protocol):
    """What the Hub needs of a history."""

    epoch: str

    @property
    def last_id(self) -> int:
        """The id of the newest stored event, 0 when there is none."""

    @property
    def oldest_id(self) -> int:
        """The id of the oldest stored event, ``last_id + 1`` when empty."""

    def append(self, records: Sequence[Record]) -> None:
        """Keep ``records`` (ids strictly above ``last_id``, in order)."""

    def after(
        self, after_id: int, match: Callable[[Record], bool], limit: int | None = None
    ) -> list[Record]:
        """Stored records with id above ``after_id`` that ``match``, in id order."""

    def close(self) -> None:
        """Release what the store holds open."""


__all__ = ["Record", "Store"]
