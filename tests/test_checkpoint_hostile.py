"""Damaged and crafted checkpoint files: always a CheckpointError naming the file, never a crash,
a hang, another exception, a silently wrong value or unbounded memory.

Each crafted file below carries a *valid* checksum (an attacker can compute one): the reader's
limits, not the checksum, must stop it. Written against fbrain 0.1's reader, which crashed the
interpreter on the first, raised msgpack/Unicode errors on the second, read the 2 GiB file whole,
and accepted tensor bytes pointing into the header.
"""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import msgpack
import pytest
import torch

import fbrain
from fbrain import checkpoint, optim
from fbrain.checkpoint import reading, serialization as s
from conftest import mlp, trees_equal

HEADER = s._HEADER


def crafted(tree_obj, blobs: bytes = b"", tree_offset: int | None = None) -> bytes:
    """A file with ``blobs`` after the header and ``tree_obj`` as its tree, with a valid checksum."""
    body = HEADER + blobs
    offset = len(body) if tree_offset is None else tree_offset
    body += msgpack.packb(tree_obj)
    return body + s.trailer(offset, zlib.crc32(body))


def load_both(data: bytes, tmp_path):
    """Load ``data`` as bytes and as a file; both must fail alike."""
    path = tmp_path / "crafted.fbrain"
    path.write_bytes(data)
    with pytest.raises(checkpoint.CheckpointError) as from_file:
        checkpoint.load(path)
    assert str(path) in str(from_file.value)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.from_bytes(data)
    return str(from_file.value)


def nested_tuples(depth: int):
    obj: object = 1
    for _ in range(depth):
        obj = msgpack.ExtType(s.EXT_TUPLE, msgpack.packb(obj, default=lambda o: o))
    return obj


def test_deeply_nested_extension_objects_are_refused_without_crashing(tmp_path):
    # 200 nested tuples: 975 bytes that killed the interpreter (SIGSEGV) in fbrain 0.1. Run in a
    # subprocess, so a crash fails this test instead of ending the test run.
    data = crafted({"x": nested_tuples(200)})
    path = tmp_path / "bomb.fbrain"
    path.write_bytes(data)
    script = textwrap.dedent(f"""
        from fbrain import checkpoint
        try:
            checkpoint.load({str(path)!r})
        except checkpoint.CheckpointError as err:
            print("CheckpointError", err)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nested deeper than" in done.stdout
    assert reading.MAX_DEPTH >= 8  # a TrainState's own nesting stays far below the limit
    assert "nested deeper than" in load_both(data, tmp_path)


def test_every_bit_of_the_trailer_is_checked(tmp_path):
    state = fbrain.TrainState.create(mlp(0), optim.adam(1e-3))
    good = checkpoint.to_bytes(state)
    for bit in range(8 * s.TRAILER_BYTES):
        data = bytearray(good)
        data[len(good) - s.TRAILER_BYTES + bit // 8] ^= 1 << (bit % 8)
        load_both(bytes(data), tmp_path)  # a CheckpointError, never a value (a list, say)


def test_the_checksum_covers_the_trailers_tree_offset(tmp_path):
    # Version 2 seals the tree offset into the CRC: a changed offset that still points at a
    # plausible place is a checksum mismatch, found before the tree is decoded from the wrong place.
    good = bytearray(checkpoint.to_bytes({"w": torch.arange(4.0)}))
    offset, stored = s._TRAILER.unpack(bytes(good[-s._TRAILER.size:]))
    assert stored == zlib.crc32(s._OFFSET.pack(offset), zlib.crc32(bytes(good[:-s.TRAILER_BYTES])))
    moved = good[:-s._TRAILER.size] + s._TRAILER.pack(offset - 1, stored)
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch"):
        checkpoint.from_bytes(bytes(moved))


def test_version_1_files_still_load(tmp_path):
    # fbrain 0.2's files: version 1 in the header, the CRC over the bytes before the trailer only.
    good = checkpoint.to_bytes({"w": torch.arange(4.0)})
    body = s._HEADERS[1] + good[len(s._HEADER):-s.TRAILER_BYTES]
    offset, _ = s._TRAILER.unpack(good[-s._TRAILER.size:])
    payload = s._TRAILER.pack(offset, zlib.crc32(body))
    path = tmp_path / "old.ckpt"
    path.write_bytes(body + bytes([0xC7, len(payload), s.EXT_TRAILER]) + payload)
    assert torch.equal(checkpoint.load(path)["w"], torch.arange(4.0))
    reading.verify_file(str(path))
    future = s._HEADERS[1].replace(b"\x01", b"\x07") + body[len(s._HEADER):]
    with pytest.raises(checkpoint.CheckpointError, match="version 7, this fbrain reads versions 1, 2"):
        checkpoint.from_bytes(future + bytes([0xC7, len(payload), s.EXT_TRAILER]) + payload)


def test_tensor_bytes_must_lie_in_the_tensor_section(tmp_path):
    blob = b"\xc6" + struct.pack(">I", 8) + bytes(8)
    start = len(HEADER) + 5
    into_header = msgpack.ExtType(s.EXT_TENSOR, msgpack.packb(["float32", [2], [[0, 8]]]))
    assert "outside the tensor section" in load_both(crafted({"w": into_header}, blob), tmp_path)
    into_tree = msgpack.ExtType(s.EXT_TENSOR, msgpack.packb(["float32", [4], [[start, 16]]]))
    assert "outside the tensor section" in load_both(crafted({"w": into_tree}, blob), tmp_path)
    fine = msgpack.ExtType(s.EXT_TENSOR, msgpack.packb(["float32", [2], [[start, 8]]]))
    assert torch.equal(checkpoint.from_bytes(crafted({"w": fine}, blob))["w"], torch.zeros(2))


def test_huge_declared_tensors_are_refused_before_anything_is_allocated(tmp_path):
    blob = b"\xc6" + struct.pack(">I", 8) + bytes(8)
    start = len(HEADER) + 5
    cases = {
        "has 8 bytes": ["float32", [1 << 40], [[start, 8]]],             # 4 TiB declared
        "larger than the file": None,                                    # the same 8 bytes claimed 10^6 times
        "tensor shape": ["float32", [-1], [[start, 8]]],
        "unknown tensor dtype": ["object", [2], [[start, 8]]],
    }
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for message, desc in cases.items():
        if desc is None:
            same = msgpack.ExtType(s.EXT_TENSOR, msgpack.packb(["float32", [2], [[start, 8]]]))
            tree = [same] * 1_000_000
        else:
            tree = {"w": msgpack.ExtType(s.EXT_TENSOR, msgpack.packb(desc))}
        assert message in load_both(crafted(tree, blob), tmp_path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: well under 0.5 GB


def test_a_large_file_that_is_not_a_checkpoint_is_refused_from_its_first_bytes(tmp_path):
    path = tmp_path / "sparse.ckpt"
    with open(path, "wb") as f:
        f.truncate(2 << 30)  # 2 GiB of holes: reading it whole took +2 GB and 14-25 s
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(checkpoint.CheckpointError, match="not an fbrain checkpoint"):
        checkpoint.load(path)
    assert time.perf_counter() - start < 5.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB
    with open(path, "r+b") as f:  # a valid header and trailer around 2 GiB: the tree offset decides
        f.write(HEADER)
        f.seek((2 << 30) - s.TRAILER_BYTES)
        f.write(s.trailer(len(HEADER), 0))
    with pytest.raises(checkpoint.CheckpointError, match="a tree of"):
        checkpoint.load(path)


def test_a_directory_or_a_dangling_link_where_a_file_should_be_is_a_checkpoint_error(tmp_path):
    (tmp_path / "dir.fbrain").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="dir.fbrain: cannot be read"):
        reading.read_file(str(tmp_path / "dir.fbrain"))
    os.symlink(tmp_path / "gone", tmp_path / "link.fbrain")
    with pytest.raises(checkpoint.CheckpointError, match="link.fbrain: cannot be read"):
        reading.read_file(str(tmp_path / "link.fbrain"))


def test_fuzzed_files_fail_as_checkpoint_errors_or_load_exactly():
    """Random damage to a real TrainState file (bit flips, byte runs, cuts, splices, re-checksummed
    tree damage) and crafted bombs: a seeded 20-second slice of ``python -m benchmarks.checkpoint_fuzz``.
    Every outcome is a CheckpointError, the exact state, or (checksum recomputed) another valid tree."""
    from benchmarks.checkpoint_fuzz import fuzz

    counts = fuzz(seconds=20, seed=0, limit=5000)
    assert counts["findings"] == []
    assert counts["tried"] >= 200 and counts["rejected"] > 0
