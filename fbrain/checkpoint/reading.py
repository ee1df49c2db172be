"""Reading checkpoints: one reader for files and bytes, which no damaged or crafted input can crash.

The layout is in :mod:`fbrain.checkpoint.serialization`. Whatever the input, every failure is a
:class:`CheckpointError` naming it, and nothing is returned unless the checksum matched. In order:

1. **The envelope**, from the first and last bytes and the size alone (a file's body is not read):
   a pickle or ``torch.save`` file, a file too short, a missing header or trailer (truncated), another
   format version, and a tree offset outside the body are named here.
2. **The tree** (names, numbers, shapes, where each tensor's bytes lie; kilobytes) is decoded with
   limits: only fbrain's extension types, registered named types, nesting at most ``MAX_DEPTH`` deep.
   Each tensor's descriptor is checked *before* its memory is allocated: a known dtype, a shape of
   non-negative sizes whose bytes equal the spans it names, spans inside the tensor section (never
   the header), and all tensors together no larger than that section. After decoding, the spans must
   follow each other in file order without overlap and the last must end where the tree starts
   (where the writer put it: a changed tree offset cannot slip through).
3. **The checksum** over every byte of the file: those before the trailer, then (version 2) the
   trailer's tree offset. Held in memory, the bytes are verified
   first; a file is verified while its tensors are read straight into their own memory (one pass,
   the CRC on a second thread: ``readinto`` and ``zlib.crc32`` both release the GIL).

Example::

    tree = read_file("state.fbrain")      # the same tree as read(bytearray(open(...).read()))
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import zlib
from typing import Any, Callable

import msgpack
import torch

from fbrain.checkpoint import crc as crc_module
from fbrain.checkpoint import serialization as s
from fbrain.checkpoint.crc import BackgroundCrc
from fbrain.checkpoint.serialization import CheckpointError

MAX_DEPTH = 32  # nested tuples / named types; a TrainState needs about 6
MAX_TREE_BYTES = 1 << 28  # the tree holds names, numbers and tensor descriptors: megabytes at most
_HEAD_BYTES = 32
# What decoding a damaged tree can raise besides CheckpointError (msgpack's errors are ValueErrors).
_DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError, MemoryError)


def _looks_like_pickle(head: bytes) -> bool:
    return head[:1] == b"\x80" or head[:2] == b"PK"  # pickle protocol 2+ / torch.save's zip


def envelope(size: int, pread: Callable[[int, int], bytes], name: str) -> tuple[int, Callable[[int], bool]]:
    """``(tree_offset, matches)`` from the first and last bytes of a checkpoint of ``size`` bytes:
    ``matches(crc)`` says whether ``crc``, the CRC-32 of every byte before the trailer, is the one
    the trailer seals (for the file's format version)."""
    head = pread(0, min(size, _HEAD_BYTES))
    if _looks_like_pickle(head):
        raise CheckpointError(
            f"{name}: this is a pickle / torch.save file; fbrain never unpickles (loading a pickle can "
            "run code). Convert SpeechBrain checkpoints with fbrain.checkpoint.import_speechbrain.")
    tail = pread(size - s.TRAILER_BYTES, s.TRAILER_BYTES) if size >= s.TRAILER_BYTES else b""
    has_trailer = tail[:3] == bytes([0xC7, s._TRAILER.size, s.EXT_TRAILER])
    version = next((v for v, header in s._HEADERS.items() if head.startswith(header)), None)
    if not has_trailer:
        if version is not None:
            raise CheckpointError(f"{name}: truncated checkpoint (no trailer; the write did not finish)")
        raise CheckpointError(f"{name}: not an fbrain checkpoint (no fbrain header or trailer)")
    if version is None:
        try:
            first = next(msgpack.Unpacker(io.BytesIO(head), raw=False))
        except Exception:  # noqa: BLE001 - any garbage: the header is simply bad
            first = None
        if isinstance(first, dict) and first.get("format") == s.FORMAT:
            raise CheckpointError(f"{name}: checkpoint version {first.get('version')!r}, this fbrain reads "
                                  f"versions {', '.join(map(str, s.READABLE_VERSIONS))}; upgrade fbrain")
        raise CheckpointError(f"{name}: corrupted checkpoint (bad header)")
    tree_offset, stored = s._TRAILER.unpack(tail[3:])
    if not len(s._HEADER) <= tree_offset <= size - s.TRAILER_BYTES:
        raise CheckpointError(f"{name}: corrupted checkpoint (bad tree offset)")
    return tree_offset, lambda crc: s.seal(crc, tree_offset, version) == stored


def _descriptor(data: bytes, name: str, section: tuple[int, int], budget: list) -> tuple:
    """``(dtype, shape, spans)`` of a tensor extension object, checked before anything is allocated."""
    desc = msgpack.unpackb(data, raw=False)
    if not (isinstance(desc, list) and len(desc) == 3):
        raise CheckpointError(f"{name}: corrupted checkpoint (a tensor descriptor is not [dtype, shape, spans])")
    dtype_name, shape, spans = desc
    dtype = s._DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CheckpointError(f"{name}: unknown tensor dtype {dtype_name!r}")
    ints = lambda xs: isinstance(xs, list) and all(  # noqa: E731
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)
    if not ints(shape) or len(shape) > 64:
        raise CheckpointError(f"{name}: corrupted checkpoint (tensor shape {shape!r})")
    if not isinstance(spans, list) or not all(isinstance(p, list) and len(p) == 2 and ints(p) for p in spans):
        raise CheckpointError(f"{name}: corrupted checkpoint (tensor byte spans {spans!r})")
    count = 1
    for n in shape:
        count *= n
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    held = sum(length for _, length in spans)
    if held != nbytes:
        raise CheckpointError(f"{name}: corrupted checkpoint (tensor of shape {tuple(shape)} has {held} bytes)")
    low, high = section
    for start, length in spans:
        if start < low or start + length > high:
            raise CheckpointError(f"{name}: corrupted checkpoint (tensor bytes outside the tensor section)")
    budget[0] -= nbytes
    if budget[0] < 0:  # overlapping spans could claim the same bytes many times over
        raise CheckpointError(f"{name}: corrupted checkpoint (tensors larger than the file)")
    return dtype, shape, spans


def decode_tree(tree_bytes, tree_offset: int, name: str,
                make_tensor: Callable[[torch.dtype, list, list], torch.Tensor]) -> tuple[Any, list]:
    """The tree, with tensors from ``make_tensor(dtype, shape, spans)``, and every tensor's spans
    ``[(start, length, tensor, offset within it)]`` in file order, checked as the module says."""
    section = (len(s._HEADER), tree_offset)
    budget = [tree_offset - len(s._HEADER)]
    placed: list = []
    depth = [0]

    def nested(data: bytes) -> Any:
        depth[0] += 1
        try:
            if depth[0] > MAX_DEPTH:
                raise CheckpointError(f"{name}: corrupted checkpoint (nested deeper than {MAX_DEPTH})")
            return msgpack.unpackb(data, raw=False, ext_hook=ext_hook, strict_map_key=True)
        finally:
            depth[0] -= 1

    def ext_hook(code: int, data: bytes) -> Any:
        if code == s.EXT_TENSOR:
            dtype, shape, spans = _descriptor(data, name, section, budget)
            tensor = make_tensor(dtype, shape, spans)
            done = 0
            for start, length in spans:
                placed.append((start, length, tensor, done))
                done += length
            return tensor
        if code == s.EXT_TUPLE:
            items = nested(data)
            if not isinstance(items, list):
                raise CheckpointError(f"{name}: corrupted checkpoint (a tuple that is not a sequence)")
            return tuple(items)
        if code == s.EXT_NAMED:
            value = nested(data)
            if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
                    and isinstance(value[1], dict)):
                raise CheckpointError(f"{name}: corrupted checkpoint (a named type that is not [name, fields])")
            return s.build_named(value[0], value[1], name)
        raise CheckpointError(f"{name}: msgpack extension type {code} is not fbrain's; refusing to load it")

    try:
        tree = msgpack.unpackb(tree_bytes, raw=False, ext_hook=ext_hook, strict_map_key=True)
    except CheckpointError:
        raise
    except _DECODE_ERRORS as err:
        raise CheckpointError(f"{name}: corrupted checkpoint ({type(err).__name__}: {err})") from None
    placed.sort(key=lambda p: p[0])
    position = len(s._HEADER)
    for start, length, _, _ in placed:
        if start < position:
            raise CheckpointError(f"{name}: corrupted checkpoint (tensor bytes overlap)")
        position = start + length
    if placed and position != tree_offset:
        raise CheckpointError(f"{name}: corrupted checkpoint (the tree does not start after the last tensor)")
    return tree, placed


def read(buffer: bytearray, name: str = "checkpoint") -> Any:
    """Decode a checkpoint held in a writable buffer (verified first); tensors share its memory,
    except one written in several chunks (over 1 GiB), which is joined into new memory."""
    view = memoryview(buffer)
    tree_offset, matches = envelope(len(view), lambda offset, n: bytes(view[offset:offset + n]), name)
    end = len(view) - s.TRAILER_BYTES
    if not matches(zlib.crc32(view[:end])):
        raise CheckpointError(f"{name}: corrupted checkpoint (checksum mismatch)")

    def make_tensor(dtype, shape, spans):
        parts = [torch.frombuffer(buffer, dtype=torch.uint8, count=length, offset=start)
                 for start, length in spans if length]
        raw = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
        return raw.view(dtype).reshape(shape)

    tree, _ = decode_tree(view[tree_offset:end], tree_offset, name, make_tensor)
    return tree


def _byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _fill(f, view: memoryview, name: str, crc: BackgroundCrc) -> None:
    """Read exactly ``len(view)`` bytes into ``view``, in pieces, each handed to ``crc``."""
    for start in range(0, len(view), crc_module.PIECE_BYTES):
        piece = view[start:start + crc_module.PIECE_BYTES]
        got = 0
        while got < len(piece):
            n = f.readinto(piece[got:])
            if not n:
                raise CheckpointError(f"{name}: corrupted checkpoint (the file shrank while being read)")
            got += n
        crc.add(piece)


def is_fbrain_file(path: str) -> bool:
    """Whether the file at ``path`` starts with fbrain's header, of any version this fbrain reads
    (reads its first bytes only)."""
    with open(path, "rb") as f:
        return f.read(len(s._HEADER)) in s._HEADERS.values()


@contextlib.contextmanager
def _opened(path: str):
    """``(file, tree_offset, matches, tree bytes)`` of a checkpoint file whose envelope is sound."""
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO must not block
    except OSError as err:
        raise CheckpointError(f"{name}: cannot be read ({err.strerror or err})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise CheckpointError(
                f"{name}: cannot be read: it is a folder; expected a checkpoint file such as CKPT+.../brain.fbrain; "
                "to recover a Checkpointer's folder use Checkpointer(folder).recover_if_possible()")
        raise CheckpointError(f"{name}: cannot be read: not a regular file; expected a checkpoint file")
    with os.fdopen(fd, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        pread = lambda offset, n: os.pread(f.fileno(), n, offset)  # noqa: E731
        tree_offset, matches = envelope(size, pread, name)
        tree_size = size - s.TRAILER_BYTES - tree_offset
        if tree_size > MAX_TREE_BYTES:
            raise CheckpointError(f"{name}: corrupted checkpoint (a tree of {tree_size} bytes; at most "
                                  f"{MAX_TREE_BYTES})")
        yield f, tree_offset, matches, pread(tree_offset, tree_size)


def verify_file(path: str) -> None:
    """Raise a CheckpointError unless ``path`` is an intact fbrain checkpoint: the checks of
    :func:`read_file`, without allocating any tensor (one read of the file for the checksum)."""
    name = str(path)
    with _opened(path) as (f, tree_offset, matches, tree_bytes):
        decode_tree(tree_bytes, tree_offset, name, lambda dtype, shape, spans: torch.empty(0))
        f.seek(0)
        piece, value, done = memoryview(bytearray(min(crc_module.PIECE_BYTES, tree_offset))), 0, 0
        while done < tree_offset:  # one piece of memory, reused: verifying never holds the file
            n = f.readinto(piece[:tree_offset - done])
            if not n:
                raise CheckpointError(f"{name}: corrupted checkpoint (the file shrank while being read)")
            value = zlib.crc32(piece[:n], value)
            done += n
        if not matches(zlib.crc32(tree_bytes, value)):
            raise CheckpointError(f"{name}: corrupted checkpoint (checksum mismatch)")


def read_file(path: str) -> Any:
    """Decode the checkpoint file at ``path``: each tensor's bytes are read straight into it."""
    name = str(path)
    with _opened(path) as (f, tree_offset, matches, tree_bytes):
        tree, placed = decode_tree(tree_bytes, tree_offset, name,
                                   lambda dtype, shape, spans: torch.empty(shape, dtype=dtype))
        crc, position = BackgroundCrc(), 0
        try:
            f.seek(0)
            for start, length, tensor, offset in placed:
                _fill(f, memoryview(bytearray(start - position)), name, crc)  # header, bin headers, padding
                _fill(f, _byte_view(tensor)[offset:offset + length], name, crc)
                position = start + length
            _fill(f, memoryview(bytearray(tree_offset - position)), name, crc)
        finally:
            value = crc.result()
        if not matches(zlib.crc32(tree_bytes, value)):
            raise CheckpointError(f"{name}: corrupted checkpoint (checksum mismatch)")
    return tree
