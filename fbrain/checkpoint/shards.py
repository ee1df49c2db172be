"""Per-rank shard files: each rank of a sharded run writes only its part of a recoverable.

A recoverable saved as ``<name>.fbrain`` keeps the parts sharded across N ranks beside it, in the
folder ``<name>.shards``: one file per rank, ``rank-00001-of-00004.fbrain`` (rank 1 of 4), in
fbrain's format (verified on reading, never pickle), each written atomically by its own rank. The
Checkpointer makes the whole checkpoint folder appear only once every rank has written its file
(see ``Checkpointer.save_checkpoint``), so a checkpoint either has all N files or does not exist.

Why not ``torch.distributed.checkpoint``: its reader unpickles the ``.metadata`` file (a crafted
checkpoint runs code), and it writes into the final folder in place (a crash leaves a folder that
looks complete). Here every file is checked (CRC, bounded reading) and the folder is atomic.

Example::

    >>> import tempfile, pathlib, torch
    >>> from fbrain.checkpoint import shards
    >>> folder = shards.folder_of(pathlib.Path(tempfile.mkdtemp(), "brain.fbrain"))
    >>> for rank in range(2):  # each rank writes its own, in a real run
    ...     shards.write(folder, rank, 2, {"mu": torch.full((2,), float(rank))})
    >>> [part["mu"].tolist() for part in shards.read(folder, 2)]
    [[0.0, 0.0], [1.0, 1.0]]
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from fbrain.checkpoint.files import fsync_dir, load, save
from fbrain.checkpoint.reading import verify_file
from fbrain.checkpoint.serialization import CheckpointError

SUFFIX = ".shards"
MAX_WORLD = 1 << 16  # a crafted count of ranks is refused before any file is looked for


def folder_of(paramfile: str | os.PathLike) -> pathlib.Path:
    """The shards folder of the recoverable saved in ``paramfile`` (``brain.fbrain`` -> ``brain.shards``)."""
    path = pathlib.Path(paramfile)
    return path.with_name(path.name.split(".", 1)[0] + SUFFIX)


def file_of(folder: pathlib.Path, rank: int, world: int) -> pathlib.Path:
    return pathlib.Path(folder, f"rank-{rank:05d}-of-{world:05d}.fbrain")


def write(folder: str | os.PathLike, rank: int, world: int, tree: Any) -> None:
    """Write this rank's part ``tree`` into ``folder`` (created if needed), atomically."""
    folder = pathlib.Path(folder)
    folder.mkdir(exist_ok=True)
    save(file_of(folder, rank, world), {"rank": rank, "world": world, "part": tree})
    fsync_dir(str(folder.parent))


def check_world(world: Any, where: str) -> int:
    if not isinstance(world, int) or isinstance(world, bool) or not 1 <= world <= MAX_WORLD:
        raise CheckpointError(f"{where}: expected a number of ranks in 1..{MAX_WORLD}, got {world!r:.40}")
    return world


def read(folder: str | os.PathLike, world: int) -> list[Any]:
    """Every rank's part, in rank order: ``world`` files, each verified and naming its own rank.
    A missing, damaged or misplaced file is a CheckpointError naming it."""
    folder = pathlib.Path(folder)
    check_world(world, str(folder))
    parts = []
    for rank in range(world):
        path = file_of(folder, rank, world)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; the checkpoint was saved by {world} ranks and needs each "
                                  "one's shard file")
        record = load(path)
        if not isinstance(record, dict) or record.keys() != {"rank", "world", "part"} or \
                (record["rank"], record["world"]) != (rank, world):
            raise CheckpointError(f"{path}: not rank {rank} of {world}'s shard file")
        parts.append(record["part"])
    return parts


def verify(folder: str | os.PathLike) -> None:
    """Check every shard file in ``folder`` (their checksums) without reading them into memory:
    what a Checkpointer checks before it changes anything."""
    for entry in sorted(os.listdir(folder)):
        path = pathlib.Path(folder, entry)
        if not path.is_file():
            raise CheckpointError(f"{path}: not a regular file")
        verify_file(path)
