"""Fuzz the checkpoint reader: damaged and crafted files must give a CheckpointError or the exact tree.

    python -m benchmarks.checkpoint_fuzz [--seconds 600] [--seed 0]

Mutates a real TrainState file (bit flips, byte runs, cuts, splices of its own bytes) and crafts
structural bombs (deep nesting, wide arrays, huge declared tensors), loads each from bytes, and
counts the outcomes. Damage under the original checksum must give a ``CheckpointError`` or the
exact tree. A variant whose checksum was recomputed (what an attacker does, and what lets damage
reach the decoder) may load as another valid tree, but must never give anything but a
``CheckpointError`` or a tree. Anything else is a finding: printed with its case number, and the run
exits 1. The test suite runs a 20-second slice of the same loop (``tests/test_checkpoint_hostile.py``).
"""

from __future__ import annotations

import argparse
import random
import resource
import time
import zlib

import msgpack
import torch

import fbrain
from fbrain import checkpoint, optim
from fbrain.checkpoint import serialization as s


def reference_state() -> fbrain.TrainState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    return fbrain.TrainState.create(model, optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3)))


def rechecksum(data: bytearray) -> bytearray:
    """``data`` with its trailer's CRC recomputed (when it still has a trailer), as an attacker would."""
    if len(data) >= s.TRAILER_BYTES and data[-s.TRAILER_BYTES:-s._TRAILER.size] == bytes(
            [0xC7, s._TRAILER.size, s.EXT_TRAILER]):
        offset, _ = s._TRAILER.unpack(bytes(data[-s._TRAILER.size:]))
        data[-s.TRAILER_BYTES:] = s.trailer(offset, zlib.crc32(bytes(data[:-s.TRAILER_BYTES])))
    return data


def damaged(good: bytes, rng: random.Random) -> bytearray:
    """``good`` with random damage: bit flips, a run of random bytes, a cut, or a splice of its
    own bytes (any file format)."""
    data = bytearray(good)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        at = rng.randrange(len(data))
        data[at:at + rng.randint(1, 16)] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 2:
        data = data[:rng.randrange(len(data))]
    else:
        at = rng.randrange(len(data))
        data = data[:at] + good[rng.randrange(len(good)):][:rng.randint(1, 64)] + data[at:]
    return data


def mutate(good: bytes, rng: random.Random) -> tuple[bytes, bool]:
    """One damaged or crafted variant of the checkpoint ``good``, and whether its checksum was
    recomputed (so it may be another valid file)."""
    kind = rng.randrange(6)
    if kind == 4:  # damage the tree (the end of the file), then fix the checksum
        data = bytearray(good)
        at = len(data) - s.TRAILER_BYTES - rng.randint(1, 200)
        data[at] ^= 1 << rng.randrange(8)
        return bytes(rechecksum(data)), True
    if kind == 5:
        return crafted_bomb(rng), True
    data = damaged(good, rng)
    forged = rng.random() < 0.5
    return bytes(rechecksum(data) if forged else data), forged


def crafted_bomb(rng: random.Random) -> bytes:
    """A small file with a valid checksum and a hostile tree."""
    which = rng.randrange(3)
    if which == 0:  # nesting
        obj: object = 0
        for _ in range(rng.randint(30, 400)):
            code = rng.choice([s.EXT_TUPLE, s.EXT_NAMED])
            inner = obj if code == s.EXT_TUPLE else ["fbrain.optim.base.EmptyState", {"x": obj}]
            obj = msgpack.ExtType(code, msgpack.packb(inner, default=lambda o: o))
        tree = {"x": obj}
    elif which == 1:  # a tensor declaring far more than the file holds
        shape = [rng.choice([1 << 20, 1 << 30, 1 << 40]), rng.randint(1, 8)]
        tree = {"w": msgpack.ExtType(s.EXT_TENSOR, msgpack.packb(["float32", shape, [[len(s._HEADER), 8]]]))}
    else:  # many aliases of one span
        one = msgpack.ExtType(s.EXT_TENSOR, msgpack.packb(["float64", [1], [[len(s._HEADER), 8]]]))
        tree = [one] * rng.randint(2, 100_000)
    body = s._HEADER + msgpack.packb(tree)
    return body + s.trailer(len(s._HEADER), zlib.crc32(body))


def same(a, b) -> bool:
    la, sa = fbrain.tree.tree_flatten(a)
    lb, sb = fbrain.tree.tree_flatten(b)
    return sa == sb and all(
        (torch.equal(x, y) and x.dtype == y.dtype) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb))


def fuzz(seconds: float, seed: int = 0, limit: int | None = None) -> dict:
    """Run the loop; returns outcome counts and ``findings`` (seed, what happened) for anything else."""
    state = reference_state()
    good = checkpoint.to_bytes(state)
    counts = {"tried": 0, "rejected": 0, "loaded exactly": 0, "loaded another valid tree": 0, "findings": []}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (limit is None or counts["tried"] < limit):
        case = seed * 1_000_003 + counts["tried"]
        data, forged = mutate(good, random.Random(case))
        counts["tried"] += 1
        try:
            back = checkpoint.from_bytes(data, state)
        except checkpoint.CheckpointError:
            counts["rejected"] += 1
            continue
        except BaseException as err:  # noqa: BLE001 - any other outcome is what this looks for
            counts["findings"].append((case, f"{type(err).__name__}: {err}"[:300]))
            continue
        if same(back, state):
            counts["loaded exactly"] += 1
        elif forged:
            counts["loaded another valid tree"] += 1
        else:
            counts["findings"].append((case, "loaded a different tree under the original checksum"))
    counts["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = fuzz(args.seconds, args.seed)
    print(f"tried {counts['tried']}: {counts['rejected']} CheckpointErrors, {counts['loaded exactly']} loaded "
          f"exactly, {counts['loaded another valid tree']} re-checksummed loaded as another valid tree, "
          f"{len(counts['findings'])} findings; max RSS {counts['max_rss_mb']:.0f} MB")
    for case, what in counts["findings"][:20]:
        print(f"  case {case}: {what}")
    raise SystemExit(1 if counts["findings"] else 0)


if __name__ == "__main__":
    main()
