"""TensorBoard event files of scalars, written without importing tensorboard.

``torch.utils.tensorboard.SummaryWriter`` costs ~150 ms and ~30 MB to import
(tensorboard, protobuf) and ~100 us per ``add_scalar`` on the training
thread, plus a pure-Python checksum on its writer thread. Scalars need only a
few bytes of protobuf, encoded here by hand: one event holds all the scalars
of a log step, for ~50 us in all (the checksum, in pure Python, is most of it).

The format: a file named ``events.out.tfevents.<time>.<host>.<pid>.<n>`` of
TFRecords (length, masked CRC-32C of the length, data, masked CRC-32C of the
data), each holding an ``Event`` protobuf; the first event names the file
version. TensorBoard reads the file as it grows; a flush at most every few
seconds (and at close) keeps the cost off the training loop.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from pathlib import Path

FLUSH_EVERY_S = 2.0
_counter = itertools.count()


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= 0xFFFFFFFFFFFFFFFF  # int64 two's complement, as protobuf encodes negatives
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


SESSION_START = 1  # SessionLog.status START: TensorBoard drops earlier events of this step and after


def encode_event(wall_time: float, step: int | None = None, scalars: dict[str, float] | None = None,
                 file_version: str | None = None, session_status: int | None = None) -> bytes:
    """An ``Event``: wall_time (1, double), step (2, int64), file_version (3), summary (5), session_log (7)."""
    out = b"\x09" + struct.pack("<d", wall_time)
    if step is not None:
        out += b"\x10" + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if session_status is not None:
        out += _length_delimited(7, b"\x08" + _varint(session_status))  # SessionLog { status = 1 }
    if scalars:
        # Summary { repeated Value value = 1; }  Value { string tag = 1; float simple_value = 2; }
        values = b"".join(_length_delimited(1, _length_delimited(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                          for tag, value in scalars.items())
        out += _length_delimited(5, values)
    return out


def encode_record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


class ScalarEventWriter:
    """Appends scalar events to a new event file in ``log_dir``, as SummaryWriter.add_scalar would.

    ``purge_from``: the first step this run writes (after a resume); TensorBoard then drops the
    events of that step and later that earlier files hold, as SummaryWriter's ``purge_step``.
    """

    def __init__(self, log_dir: str | Path, purge_from: int | None = None):
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_counter)}"
        self.path = log_dir / name
        self._file = open(self.path, "wb")
        self._file.write(encode_record(encode_event(time.time(), file_version="brain.Event:2")))
        if purge_from is not None:
            self._file.write(encode_record(encode_event(time.time(), purge_from, session_status=SESSION_START)))
        self._file.flush()
        self._last_flush = time.monotonic()

    def write(self, step: int, scalars: dict[str, float], wall_time: float | None = None) -> None:
        scalars = {tag: float(value) for tag, value in scalars.items()}
        self._file.write(encode_record(encode_event(wall_time or time.time(), step, scalars)))
        now = time.monotonic()
        if now - self._last_flush > FLUSH_EVERY_S:
            self._file.flush()
            self._last_flush = now

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
