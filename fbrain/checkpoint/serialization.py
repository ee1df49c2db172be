"""A TrainState (or any tree of tensors, numbers, strings, lists and dicts) as msgpack, never pickle.

A file is a sequence of msgpack objects:

1. a header map ``{"format": "fbrain", "version": 1}``;
2. the raw bytes of every tensor, as ``bin`` objects of at most 1 GiB each (a larger tensor
   is written in several), each starting at a 64-byte-aligned offset;
3. the tree, in which a tensor is an extension object (code 1) holding its dtype, shape and
   the file offsets of its bytes, a tuple is code 2 and a registered named type (TrainState,
   optimizer states ...) is code 3 with its type name and fields;
4. a fixed-size trailer (extension code 9): where the tree starts and a CRC-32 of every byte
   before the trailer, which loading verifies before it decodes anything.

Reading (:mod:`fbrain.checkpoint.reading`) maps tensors straight onto bytes held in memory, and
reads a file's tensor bytes straight into each tensor's own memory. Only extension codes 1-3 and 9
are accepted, and named types come from a registry, so loading never runs code named by the file;
every limit and check a reader applies is listed there.

Example::

    >>> import torch
    >>> from fbrain.checkpoint import to_bytes, from_bytes
    >>> tree = {"w": torch.arange(3, dtype=torch.bfloat16), "step": 7, "tag": ("a", None)}
    >>> back = from_bytes(to_bytes(tree))
    >>> torch.equal(back["w"], tree["w"]), back["step"], back["tag"]
    (True, 7, ('a', None))
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from typing import Any, BinaryIO

import msgpack
import torch

from fbrain.checkpoint import crc as crc_module
from fbrain.checkpoint.crc import BackgroundCrc

FORMAT = "fbrain"
VERSION = 2  # 2: the checksum also covers the trailer's tree offset (1: the bytes before the trailer)
READABLE_VERSIONS = (1, 2)
CHUNK_BYTES = 1 << 30  # tensors above 1 GiB are written as several bin objects
ALIGN = 64

EXT_TENSOR, EXT_TUPLE, EXT_NAMED, EXT_TRAILER = 1, 2, 3, 9
_TRAILER = struct.Struct("<QI")  # tree offset, CRC-32
TRAILER_BYTES = 3 + _TRAILER.size  # ext8 header (0xc7, length, code) + payload

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64,
)}
_NAMED: dict[str, type] = {}
_HEADERS = {v: msgpack.packb({"format": FORMAT, "version": v}) for v in READABLE_VERSIONS}
_HEADER = _HEADERS[VERSION]  # every version's header has this length
_OFFSET = struct.Struct("<Q")


def seal(body_crc: int, tree_offset: int, version: int = VERSION) -> int:
    """The checksum a trailer stores: the CRC-32 of every byte before the trailer, continued (from
    version 2 on) over the tree offset the trailer holds, so no byte of the file is unchecked."""
    return zlib.crc32(_OFFSET.pack(tree_offset), body_crc) if version >= 2 else body_crc


def trailer(tree_offset: int, body_crc: int) -> bytes:
    """The last bytes of a checkpoint file (the current version) whose body has CRC ``body_crc``."""
    payload = _TRAILER.pack(tree_offset, seal(body_crc, tree_offset))
    return bytes([0xC7, len(payload), EXT_TRAILER]) + payload


class CheckpointError(ValueError):
    """A checkpoint file or tree that cannot be written or read as asked."""


def register_type(cls: type) -> type:
    """Allow instances of ``cls`` (a NamedTuple or dataclass) in checkpoints; usable as a decorator.

    Only registered types are rebuilt on loading: a file cannot make fbrain import anything.
    """
    if not (hasattr(cls, "_fields") or dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_type: {cls.__qualname__} is neither a NamedTuple nor a dataclass")
    _NAMED[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def _fields(obj) -> dict[str, Any]:
    if hasattr(obj, "_fields"):
        return dict(zip(obj._fields, obj))
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _type_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# -- writing ---------------------------------------------------------------------------------------


class _Writer:
    """Streams the file: tensor bytes go straight from their storage to the file."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.crc = BackgroundCrc()  # checksums a piece while the next one is written
        self.offset = 0

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), crc_module.PIECE_BYTES):
            part = view[start:start + crc_module.PIECE_BYTES]
            self.out.write(part)
            self.crc.add(part)
        self.offset += len(view)

    def pad_to(self, boundary: int) -> None:
        # Padding is a msgpack nil per byte, so the file stays a plain sequence of msgpack objects.
        gap = (-(self.offset + 5)) % boundary  # 5 = the bin32 header that follows
        if gap:
            self.write(b"\xc0" * gap)

    def blob(self, data: memoryview) -> tuple[int, int]:
        """Write one bin object; return where its bytes start and how many there are."""
        self.pad_to(ALIGN)
        self.write(b"\xc6" + struct.pack(">I", len(data)))
        start = self.offset
        self.write(data)
        return start, len(data)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _write_tensors(tree: Any, writer: _Writer, path: str) -> Any:
    """The tree with each tensor replaced by its descriptor, writing the bytes as it goes."""
    if isinstance(tree, torch.Tensor):
        name = str(tree.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise CheckpointError(f"{path or 'tree'}: dtype {tree.dtype} cannot be saved")
        data = _tensor_bytes(tree)
        spans = [writer.blob(data[i:i + CHUNK_BYTES]) for i in range(0, max(len(data), 1), CHUNK_BYTES)]
        return msgpack.ExtType(EXT_TENSOR, msgpack.packb([name, list(tree.shape), spans]))
    if isinstance(tree, dict):
        for key in tree:
            if not isinstance(key, str):
                raise CheckpointError(f"{path or 'tree'}: dict keys must be strings, got {key!r}")
        return {k: _write_tensors(v, writer, f"{path}[{k!r}]") for k, v in tree.items()}
    if isinstance(tree, list):
        return [_write_tensors(v, writer, f"{path}[{i}]") for i, v in enumerate(tree)]
    if hasattr(tree, "_fields") or dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        name = _type_name(tree)
        if name not in _NAMED:
            raise CheckpointError(
                f"{path or 'tree'}: type {name} is not registered; call fbrain.checkpoint.register_type on it")
        fields = {k: _write_tensors(v, writer, f"{path}.{k}") for k, v in _fields(tree).items()}
        return msgpack.ExtType(EXT_NAMED, msgpack.packb([name, fields], default=_nested_ext))
    if isinstance(tree, tuple):
        items = [_write_tensors(v, writer, f"{path}[{i}]") for i, v in enumerate(tree)]
        return msgpack.ExtType(EXT_TUPLE, msgpack.packb(items, default=_nested_ext))
    if tree is None or isinstance(tree, (bool, int, float, str, bytes)):
        return tree
    raise CheckpointError(f"{path or 'tree'}: cannot save a {type(tree).__name__} (no pickle: tensors, "
                          "numbers, strings, bytes, None, lists, tuples, dicts and registered types only)")


def _nested_ext(obj):
    if isinstance(obj, msgpack.ExtType):
        return obj
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def write(tree: Any, out: BinaryIO) -> None:
    """Write ``tree`` to a binary file object (see :func:`fbrain.checkpoint.save` for files on disk)."""
    writer = _Writer(out)
    writer.write(_HEADER)
    try:
        encoded = _write_tensors(tree, writer, "")
        tree_offset = writer.offset
        writer.write(msgpack.packb(encoded, default=_nested_ext))
    finally:
        crc = writer.crc.result()  # also stops the worker when writing failed
    out.write(trailer(tree_offset, crc))


def to_bytes(tree: Any) -> bytes:
    """``tree`` as the bytes of a checkpoint file."""
    buffer = io.BytesIO()
    write(tree, buffer)
    return buffer.getvalue()


# -- reading (the reader itself is fbrain.checkpoint.reading) ----------------------------------------


def build_named(type_name: str, fields: dict, name: str) -> Any:
    """An instance of the registered type ``type_name`` from a file's ``fields``."""
    cls = _NAMED.get(type_name)
    if cls is None:
        raise CheckpointError(f"{name}: type {type_name!r} is not registered; refusing to build it")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as err:  # missing, extra or invalid fields
        raise CheckpointError(f"{name}: a {type_name} with fields it cannot have ({err})") from None
