"""A CRC-32 computed on a worker thread, so checksumming overlaps the file I/O it covers.

``zlib.crc32`` and file ``readinto``/``write`` all release the GIL on large buffers: while one
piece is written (or read), the previous one is checksummed. Pieces are taken in order.

Example::

    crc = BackgroundCrc()
    for piece in pieces:
        out.write(piece)
        crc.add(piece)
    value = crc.result()   # == zlib.crc32(b"".join(pieces))
"""

from __future__ import annotations

import queue
import threading
import zlib

PIECE_BYTES = 64 << 20  # file I/O and checksumming go in pieces of this size, so the two overlap


class BackgroundCrc:
    """CRC-32 of the pieces handed to :meth:`add`, in order; :meth:`result` waits for the last."""

    def __init__(self, initial: int = 0):
        self.value = initial
        self._pieces: queue.Queue = queue.Queue(maxsize=8)  # bounds the memory held by pending pieces
        self._thread = threading.Thread(target=self._run, name="fbrain-crc", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (piece := self._pieces.get()) is not None:
            self.value = zlib.crc32(piece, self.value)

    def add(self, piece) -> None:
        self._pieces.put(piece)

    def result(self) -> int:
        self._pieces.put(None)
        self._thread.join()
        return self.value
