"""
The TFRecord framing of TensorBoard event files, read from a byte offset.

Each record is::

    uint64 length (little-endian)
    uint32 masked crc32c of those 8 bytes
    bytes  data[length]
    uint32 masked crc32c of data

A writer appends records and flushes whenever it likes, so the end of a
file may hold part of one: :func:`read_records` stops before it and says
where, and the next call, once the file has grown, reads it whole. A
length or checksum that does not match is damage (:class:`DamagedFile`):
the rest of that file cannot be framed reliably.

Checksums are checked with the ``crc32c`` package when it is installed
(``trainstream[follow]``: hardware crc32c, about 1 GB/s), else with the
table-driven pure-Python code below (TensorBoard's own fallback; a few MB/s,
enough for scalar logs, slow for large image logs).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["Record", "crc32c", "frame", "masked_crc", "read_records"]

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
#: A record longer than this is taken for damage (a garbage length), not waited for.
MAX_RECORD_BYTES = 1 << 30

#: One record: its data and the offset just past it.
Record = tuple[bytes, int]


def _table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE: list[int] | None = None


def _crc32c_python(data: bytes) -> int:
    global _TABLE
    table = _TABLE = _TABLE or _table()
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _pick_crc32c() -> Callable[[bytes], int]:
    try:
        import crc32c as fast  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return _crc32c_python
    return fast.crc32c  # type: ignore[no-any-return]


crc32c: Callable[[bytes], int] = _pick_crc32c()


def masked_crc(data: bytes) -> int:
    """TFRecord's masked crc32c of ``data``."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(f: BinaryIO, offset: int, limit: int) -> tuple[list[Record], int, str | None]:
    """
    The whole records of ``f`` from ``offset`` (the start of a record), up
    to about ``limit`` bytes of them (at least one, however long).

    :return: the records; the offset after the last of them, where the next
        call begins (a partly written record at the end stays unread); and
        ``None``, or why the record at that offset is damaged (its length or
        a checksum is wrong: nothing after it can be framed).
    """
    records: list[Record] = []
    f.seek(offset)
    read = 0
    while not records or read < limit:
        header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            break
        length, length_crc = _HEADER.unpack(header)
        if masked_crc(header[:8]) != length_crc:
            return records, offset, f"at byte {offset}: the record's length fails its checksum"
        if length > MAX_RECORD_BYTES:
            return records, offset, f"at byte {offset}: a record of {length} bytes"
        body = f.read(length + _FOOTER.size)
        if len(body) < length + _FOOTER.size:
            break  # being written: read it whole next time
        data = body[:length]
        if masked_crc(data) != _FOOTER.unpack(body[length:])[0]:
            return records, offset, f"at byte {offset}: the record's data fails its checksum"
        offset += _HEADER.size + len(body)
        read += _HEADER.size + len(body)
        records.append((data, offset))
    return records, offset, None


def frame(data: bytes) -> bytes:
    """``data`` as one record (tests write event files with it)."""
    header = struct.pack("<Q", len(data))
    return (
        header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))
    )
