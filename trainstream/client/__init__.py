"""
The client library: talking to a trainstream server from another process,
with no reactor (blocking calls and threads of its own).

    http.py        where the server is (URL parsing), the small HTTP helper
    backoff.py     the one backoff policy of everything that retries
    clock.py       the clients' time: a thread of their own, or a test's Clock
    sse.py         the one SSE parser, and the resuming client of ``/events``
    publisher.py   :class:`Publisher`: the Run API, POSTing batches
    subscriber.py  :class:`Subscriber` and :func:`subscribe_deferred`

The terminal clients (``python -m trainstream tail|watch``) are in
:mod:`trainstream.cli`, built on this package; nothing here imports them.
"""

from __future__ import annotations

from trainstream.client.http import api_base
from trainstream.client.publisher import Publisher
from trainstream.client.subscriber import Subscriber, SubscriberError, subscribe_deferred

__all__ = ["Publisher", "Subscriber", "SubscriberError", "api_base", "subscribe_deferred"]
