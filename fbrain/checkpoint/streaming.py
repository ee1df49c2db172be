"""Reading a checkpoint file straight into its tensors, verifying it on a second thread.

:func:`fbrain.checkpoint.serialization.read` decodes a file held whole in memory: one
allocation the size of the file, a CRC pass, then tensors viewing that buffer. For a large state
that single huge allocation is the slow part (every page of it is fresh memory), and the CRC pass
cannot start before the last byte is in. Here the small parts (header, trailer, tree) are read
first; the tree says where every tensor's bytes lie, so each tensor is allocated on its own
(ordinary allocations the allocator can reuse) and its bytes are read into it directly, while a
worker thread runs the CRC over the pieces already read, in file order (``readinto`` and
``zlib.crc32`` both release the GIL). Nothing is returned before the checksum matched.

Any file that does not read cleanly this way (truncated, corrupted, a pickle, an older layout)
is handed to the whole-file reader, whose checks give the precise error.

Example::

    tree = read_file("state.fbrain")   # same result as read(bytearray(open(...).read()))
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import msgpack
import torch

from fbrain.checkpoint import serialization as s
from fbrain.checkpoint import crc as crc_module
from fbrain.checkpoint.crc import BackgroundCrc


def _byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _fill(f, view: memoryview, name: str, crc: BackgroundCrc | None = None) -> None:
    """Read exactly ``len(view)`` bytes into ``view``, in pieces; each piece goes to ``crc`` if given."""
    for start in range(0, len(view), crc_module.PIECE_BYTES):
        piece = view[start:start + crc_module.PIECE_BYTES]
        got = 0
        while got < len(piece):
            n = f.readinto(piece[got:])
            if not n:
                raise s.CheckpointError(f"{name}: file shrank while being read")
            got += n
        if crc is not None:
            crc.add(piece)


def _layout(f, size: int) -> tuple[int, int, bytes]:
    """``(tree_offset, crc, tree bytes)`` from a healthy file's header, trailer and tree."""
    if size < len(s._HEADER) + s.TRAILER_BYTES:
        raise s.CheckpointError("too short")
    head = os.pread(f.fileno(), len(s._HEADER), 0)
    tail = os.pread(f.fileno(), s.TRAILER_BYTES, size - s.TRAILER_BYTES)
    if head != s._HEADER or tail[:3] != bytes([0xC7, s._TRAILER.size, s.EXT_TRAILER]):
        raise s.CheckpointError("not a healthy fbrain file")
    tree_offset, crc = s._TRAILER.unpack(tail[3:])
    body_end = size - s.TRAILER_BYTES
    if not len(s._HEADER) <= tree_offset <= body_end:
        raise s.CheckpointError("bad tree offset")
    return tree_offset, crc, os.pread(f.fileno(), body_end - tree_offset, tree_offset)


def _decode_tree(tree_bytes: bytes, tree_offset: int) -> tuple[Any, list[tuple[int, int, memoryview]]]:
    """The tree with empty tensors, and where each tensor's bytes lie: ``(start, length, destination)``."""
    spans: list[tuple[int, int, memoryview]] = []

    def make_tensor(dtype: torch.dtype, shape: list[int], tensor_spans: list) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype)
        view = _byte_view(tensor) if tensor.numel() else memoryview(b"")
        done = 0
        for start, length in tensor_spans:
            if length:
                spans.append((start, length, view[done:done + length]))
            done += length
        if done != len(view):
            raise s.CheckpointError("tensor size does not match its bytes")
        return tensor

    tree = msgpack.unpackb(tree_bytes, raw=False, ext_hook=s.decoder("checkpoint", make_tensor),
                           strict_map_key=True)
    spans.sort(key=lambda span: span[0])
    position = len(s._HEADER)
    for start, length, _ in spans:
        if start < position or start + length > tree_offset:
            raise s.CheckpointError("tensor bytes overlap or lie outside the tensor section")
        position = start + length
    return tree, spans


def _read_streaming(path: str) -> Any:
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        tree_offset, expected_crc, tree_bytes = _layout(f, size)
        tree, spans = _decode_tree(tree_bytes, tree_offset)
        crc, position = BackgroundCrc(), 0
        try:
            f.seek(0)
            for start, length, destination in spans:
                _fill(f, memoryview(bytearray(start - position)), path, crc)  # header, bin headers, padding
                _fill(f, destination, path, crc)
                position = start + length
            _fill(f, memoryview(bytearray(tree_offset - position)), path, crc)
        finally:
            value = crc.result()
        if zlib.crc32(tree_bytes, value) != expected_crc:
            raise s.CheckpointError("checksum mismatch")
    return tree


def _read_whole(path: str) -> bytearray:
    buffer = bytearray(os.path.getsize(path))
    with open(path, "rb", buffering=0) as f:
        _fill(f, memoryview(buffer), path)
    return buffer


def read_file(path: str) -> Any:
    """Decode the checkpoint file at ``path``, verified (see the module docstring)."""
    try:
        return _read_streaming(path)
    except Exception:  # noqa: BLE001 - any doubt: the whole-file reader decides, with its precise errors
        return s.read(_read_whole(path), path)
