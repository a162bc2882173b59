"""
The one backoff policy of every client that retries: the SSE client's
reconnects, the watch feeder's reloads and the Publisher's POSTs.

The first delay is the client's own (or the server's ``retry:`` hint when it
sent one); each failure in a row doubles it, up to a ceiling; a success
starts again from the first.
"""

from __future__ import annotations

__all__ = ["Backoff"]


class Backoff:
    """
    Delays between attempts: ``initial``, ``2 * initial``, ``4 * initial``...
    capped at ``maximum``.

    :param initial: the first delay, in seconds.
    :param maximum: no delay is longer (seconds).
    :ivar failures: failures in a row since the last :meth:`reset`, as far
        as they still lengthen the delay.
    """

    def __init__(self, initial: float, maximum: float) -> None:
        if initial < 0 or maximum < 0:
            raise ValueError(f"backoff delays must be >= 0, got {initial!r} and {maximum!r}")
        self.initial = initial
        self.maximum = maximum
        self.failures = 0

    def next(self, first: float | None = None) -> float:
        """
        The delay before the next attempt, after one more failure.

        :param first: the first delay to double instead of ``initial`` (a
            server's ``retry:``).
        """
        delay = min(self.maximum, (self.initial if first is None else first) * 2.0**self.failures)
        if delay < self.maximum:  # past the ceiling it stays there (and 2.0**n cannot overflow)
            self.failures += 1
        return delay

    def reset(self) -> None:
        """An attempt succeeded: the next failure waits the first delay again."""
        self.failures = 0
