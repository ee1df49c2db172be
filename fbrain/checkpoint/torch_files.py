"""Module files in torch's own format, for SpeechBrain's tools and ``torch.load``.

A checkpoint's module recoverables are written with ``torch.save(module.state_dict())`` under
SpeechBrain's name ``<name>.ckpt``, so SpeechBrain's ``average_checkpoints``, ``Pretrainer`` and
``torch_parameter_transfer``, and a user's ``torch.load(path, weights_only=True)``, read them as
they read SpeechBrain's own folders. fbrain keeps its promises for these files too:

- written atomically (a temporary file, fsynced, renamed);
- verified before anything is built from them: torch's zip format stores a CRC-32 of every
  record, which torch's reader does not check; :func:`verify` checks each one, and refuses
  compressed records (torch never writes them; they could inflate without bound);
- read with ``torch.load(weights_only=True)``, which builds tensors and plain containers only and
  never runs code from the file; any failure is a :class:`CheckpointError` naming the file.

The TrainState keeps fbrain's own format (``.fbrain``), which holds what torch's cannot check.

Example::

    >>> import tempfile, os, torch
    >>> from fbrain.checkpoint import torch_files
    >>> path = os.path.join(tempfile.mkdtemp(), "model.ckpt")
    >>> torch_files.save(path, torch.nn.Linear(2, 1).state_dict())
    >>> sorted(torch.load(path, weights_only=True))
    ['bias', 'weight']
    >>> sorted(torch_files.load_state_dict(path))
    ['bias', 'weight']
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from typing import Any

import torch

from fbrain.checkpoint.files import atomic_open
from fbrain.checkpoint.serialization import CheckpointError

ZIP_MAGIC = b"PK\x03\x04"
MAX_RECORDS = 1_000_000  # a state_dict with more tensors than this is not one fbrain wrote


@contextlib.contextmanager
def _crc32_on():
    """torch writes each record's CRC-32 unless a user turned it off globally
    (``torch.serialization.set_crc32_options``); :func:`verify` needs it."""
    config = getattr(getattr(torch.utils, "serialization", None), "config", None)
    save_config = getattr(config, "save", None)
    if save_config is None or getattr(save_config, "compute_crc32", True):
        yield
        return
    save_config.compute_crc32 = True
    try:
        yield
    finally:
        save_config.compute_crc32 = False


def save(path: str | os.PathLike, state: Any) -> None:
    """``torch.save(state, path)``, atomically, with every record's checksum."""
    with _crc32_on(), atomic_open(path) as out:
        torch.save(state, out)


def is_torch_zip(path: str | os.PathLike) -> bool:
    """Whether the file starts like a zip archive (torch's format since 1.6); reads 4 bytes."""
    with open(path, "rb") as f:
        return f.read(len(ZIP_MAGIC)) == ZIP_MAGIC


def verify(path: str | os.PathLike) -> None:
    """Raise a CheckpointError unless ``path`` is a sound torch zip file whose records all match
    their CRC-32: distinct names, stored (never compressed), laid out one after another without
    overlapping, each read once, so checking reads at most the file's size and never inflates."""
    name = os.fspath(path)
    try:
        size = os.path.getsize(name)
        with zipfile.ZipFile(name) as archive:
            records = archive.infolist()
            if len(records) > MAX_RECORDS:
                raise CheckpointError(f"{name}: {len(records)} records; not a state_dict this fbrain wrote")
            if len({r.filename for r in records}) != len(records):
                raise CheckpointError(f"{name}: two records share a name; torch never writes such archives "
                                      "(a reader would see only one of them)")
            end = 0
            with open(name, "rb") as raw:
                for record in sorted(records, key=lambda r: r.header_offset):
                    if record.compress_type != zipfile.ZIP_STORED or record.file_size > size:
                        raise CheckpointError(f"{name}: record {record.filename!r} is compressed or larger than "
                                              "the file; torch never writes such records")
                    if record.header_offset < end:
                        raise CheckpointError(f"{name}: record {record.filename!r} overlaps the one before it")
                    end = _data_start(raw, record) + record.compress_size
            bad = None
            for record in records:  # each record object (not its name: a name may be reused)
                with archive.open(record) as data:
                    while data.read(1 << 20):
                        pass  # reading to the end checks the CRC-32 (BadZipFile when it differs)
    except CheckpointError:
        raise
    except zipfile.BadZipFile as err:
        bad = str(err)
        if "CRC" not in bad:
            raise CheckpointError(f"{name}: damaged torch file (BadZipFile: {err})") from None
    except (OSError, zipfile.LargeZipFile, ValueError, EOFError, RuntimeError, NotImplementedError,
            UnicodeDecodeError, OverflowError) as err:
        raise CheckpointError(f"{name}: damaged torch file ({type(err).__name__}: {err})") from None
    if bad is not None:
        raise CheckpointError(f"{name}: checksum mismatch ({bad}): the file changed after it was written "
                              "(damaged or edited)")


def _data_start(raw, record: zipfile.ZipInfo) -> int:
    """Where ``record``'s bytes start: after its local header, whose name and extra field (torch pads
    it to align the tensors) may be longer than the central directory says."""
    raw.seek(record.header_offset)
    header = raw.read(30)
    if len(header) < 30 or header[:4] != ZIP_MAGIC:
        raise CheckpointError(f"{raw.name}: record {record.filename!r} has no local header where the directory "
                              "points")
    name_length, extra_length = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    return record.header_offset + 30 + name_length + extra_length


def load(path: str | os.PathLike, verified: bool = False) -> Any:
    """What ``path`` holds, read with ``torch.load(weights_only=True)`` onto the CPU, after
    :func:`verify` (unless the caller just verified it). Nothing in the file can run code."""
    name = os.fspath(path)
    if not verified and is_torch_zip(name):
        verify(name)
    try:
        return torch.load(name, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch raises many kinds; all mean "not readable safely"
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"{name}: cannot be read with torch.load(weights_only=True) "
                              f"({type(err).__name__}: {first}); only tensors and plain values are read, "
                              "nothing that would run code") from None


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A module's state_dict from a verified torch file: a mapping of names to tensors (a module's
    extra state may be any plain value)."""
    state = load(path)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{os.fspath(path)}: expected a module's state_dict (names to tensors), "
                              f"got a {type(state).__name__}")
    for key, value in state.items():
        # A crafted view (zero strides over one stored value) can declare far more elements than the
        # file holds; anything that copies it (averaging, a module's load) would allocate them all.
        if isinstance(value, torch.Tensor) and value.numel() and \
                value.numel() * value.element_size() > value.untyped_storage().nbytes():
            raise CheckpointError(f"{os.fspath(path)}: {key}: declares {value.numel()} elements over "
                                  f"{value.untyped_storage().nbytes()} stored bytes; not a tensor torch.save writes")
    return state
