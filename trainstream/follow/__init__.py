"""
Following TensorBoard logdirs live (``python -m trainstream follow LOGDIR``,
``twistd trainstream --logdir LOGDIR``; docs/follow.md):

    records.py   the TFRecord framing, read from a byte offset (pure, a file object)
    decode.py    TensorBoard ``Event`` records as trainstream events (pure)
    follower.py  the steps: find event files, read what they gained, publish, keep a state
    sinks.py     the command's way to the server: POST /api/events, retried
    service.py   the steps in the server (--logdir): disk in a thread pool, hub in the reactor

The reader, and why: event files are read by our own framing (40 lines:
length, masked crc32c, data, masked crc32c) and parsed with the compiled
protobuf messages of TensorBoard or, when it is not installed, of
tensorboardX (``trainstream[follow]`` installs tensorboardX and ``crc32c``).
TensorBoard's own loader (``event_file_loader``) was measured and not
used: its reader cannot start at an offset ("start offset not supported by
compat reader"), so a restart would read every file again from the start;
it checks checksums in pure Python; and the ``tensorboard`` package with
its dependencies is 152 MB (grpcio, protobuf, numpy, markdown, werkzeug,
tensorboard-data-server, pillow: 16 packages) against 77 MB for
tensorboardX + crc32c (numpy is 73 MB of it, and already there for anyone
who writes event files) and 3 MB for protobuf + crc32c. Its protos are
still preferred when it is installed (``torch.utils.tensorboard`` needs it):
they import in about 20 ms, tensorboardX's in 0.1-1 s (its package imports
its writer, and torch when present). Both are maintained with TensorBoard's
``.proto`` files; neither is imported until a follower starts.
"""

from __future__ import annotations

from trainstream.follow.follower import Follower, Sink, Stopped, run_name

__all__ = ["Follower", "Sink", "Stopped", "run_name"]
