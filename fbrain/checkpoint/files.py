"""Checkpoint files on disk: written atomically, verified when read.

A file is written to a temporary name in the same folder, flushed and fsynced, renamed over the
final name, and the folder is fsynced: a crash at any moment leaves either the old file or the
new one, never half of one.

Example::

    >>> import tempfile, os, torch
    >>> from fbrain import checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "state.fbrain")
    >>> checkpoint.save(path, {"w": torch.ones(2)})
    >>> checkpoint.load(path, template={"w": torch.zeros(2)})["w"]
    tensor([1., 1.])
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, BinaryIO, Callable, Iterator

import torch

from fbrain.checkpoint.restore import restore
from fbrain.checkpoint.serialization import write
from fbrain.checkpoint.streaming import read_file


def fsync_dir(folder: str) -> None:
    """Make a rename or creation inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` only if the block completes."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, fill: Callable[[BinaryIO], None]) -> None:
    """Write a file atomically with ``fill(file_object)``."""
    with atomic_open(path) as out:
        fill(out)


def save(path: str | os.PathLike, tree: Any) -> None:
    """Write ``tree`` (a TrainState or any tree of tensors and plain values) to ``path`` atomically."""
    write_atomic(path, lambda out: write(tree, out))


def load(path: str | os.PathLike, template: Any = None, device: torch.device | str | None = None) -> Any:
    """Read a checkpoint, verify its checksum, and restore it (strictly into ``template`` if given)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    return restore(read_file(path), template, device)
