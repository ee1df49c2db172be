"""Data manifests in SpeechBrain's CSV/JSON formats, and a dataset of dynamic items over them.

A manifest maps example ids to fields. CSV files have an ``ID`` column and write placeholders as
``$data_root``; JSON files are ``{id: {field: value}}`` and write them as ``{data_root}``.
A :class:`ManifestDataset` computes named items from each row (read the audio, tokenize ...) and
returns dicts that fbrain's Brain batches with :class:`fbrain.data.PaddedBatch`.

Example::

    >>> import json, os, tempfile
    >>> from fbrain.manifest import load_manifest, ManifestDataset
    >>> path = os.path.join(tempfile.mkdtemp(), "m.json")
    >>> json.dump({"a": {"wav": "{data_root}/a.wav", "duration": 2.0},
    ...            "b": {"wav": "{data_root}/b.wav", "duration": 1.0}}, open(path, "w"))
    >>> rows = load_manifest(path, {"data_root": "/data"})
    >>> rows["a"]["wav"]
    '/data/a.wav'
    >>> ds = ManifestDataset(rows, {"name": lambda row: os.path.basename(row["wav"])}, ["id", "name"])
    >>> [ex["name"] for ex in ds.sorted_by("duration")]
    ['b.wav', 'a.wav']
"""

from __future__ import annotations

import csv
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence

_CSV_VARIABLE = re.compile(r"\$([\w.]+)")
_JSON_VARIABLE = re.compile(r"\{([\w.]+)\}")


class ManifestError(ValueError):
    """A manifest that cannot be read, or a row whose items cannot be computed."""


def _substitute(value: str, pattern: re.Pattern, replacements: Mapping[str, str], where: str) -> str:
    def replace(match):
        name = match.group(1)
        if name not in replacements:
            raise ManifestError(f"{where}: placeholder {match.group(0)!r} has no replacement "
                                f"(given: {sorted(replacements)})")
        return str(replacements[name])

    return pattern.sub(replace, value)


def _load_csv(path: str, replacements: Mapping[str, str]) -> dict[str, dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        if reader.fieldnames is None or "ID" not in reader.fieldnames:
            raise ManifestError(f"{path}: a CSV manifest needs an 'ID' column, found {reader.fieldnames}")
        rows: dict[str, dict] = {}
        for line, row in enumerate(reader, start=2):
            where = f"{path}, line {line}"
            ident = row.pop("ID")
            if ident in rows:
                raise ManifestError(f"{where}: duplicate ID {ident!r}")
            fields = {k: _substitute(v or "", _CSV_VARIABLE, replacements, where) for k, v in row.items()}
            if "duration" in fields:
                try:
                    fields["duration"] = float(fields["duration"])
                except ValueError:
                    raise ManifestError(f"{where}: duration {fields['duration']!r} is not a number") from None
            rows[ident] = fields
    return rows


def _format_json(value: Any, replacements: Mapping[str, str], where: str) -> Any:
    if isinstance(value, str):
        return _substitute(value, _JSON_VARIABLE, replacements, where)
    if isinstance(value, dict):
        return {k: _format_json(v, replacements, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_format_json(v, replacements, where) for v in value]
    return value


def _load_json(path: str, replacements: Mapping[str, str]) -> dict[str, dict]:
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ManifestError(f"{path}: a JSON manifest must map ids to objects of fields")
    return {ident: _format_json(fields, replacements, f"{path}, id {ident!r}") for ident, fields in data.items()}


def load_manifest(path: str | os.PathLike, replacements: Mapping[str, str] | None = None) -> dict[str, dict]:
    """``{id: {field: value}}`` from a SpeechBrain CSV or JSON manifest, placeholders replaced."""
    path = os.fspath(path)
    replacements = dict(replacements or {})
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: manifest file not found")
    if path.endswith(".csv"):
        return _load_csv(path, replacements)
    if path.endswith(".json"):
        return _load_json(path, replacements)
    raise ManifestError(f"{path}: expected a .csv or .json manifest")


class ManifestDataset:
    """Examples computed from manifest rows by named item functions.

    ``items`` maps a name to ``fn(row) -> value``; a function sees the row's fields and the items
    defined before it. ``output_keys`` chooses what an example (a dict) holds; ``"id"`` is the row's id.
    Errors inside an item function are re-raised naming the manifest row and the item.
    """

    fbrain_padded_batch = True  # the Brain batches these examples with fbrain.data.PaddedBatch

    def __init__(self, rows: Mapping[str, Mapping[str, Any]], items: Mapping[str, Callable[[dict], Any]],
                 output_keys: Sequence[str], name: str = "manifest"):
        self.rows = dict(rows)
        self.ids = list(self.rows)
        self.items = dict(items)
        self.output_keys = list(output_keys)
        self.name = name
        known = {"id"} | set(self.items) | {k for row in self.rows.values() for k in row}
        unknown = [k for k in self.output_keys if k not in known]
        if unknown:
            raise ManifestError(f"{name}: output_keys {unknown} are neither items nor manifest fields")

    @classmethod
    def from_file(cls, path, items, output_keys, replacements=None) -> "ManifestDataset":
        return cls(load_manifest(path, replacements), items, output_keys, name=os.fspath(path))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        ident = self.ids[index]
        row = {"id": ident, **self.rows[ident]}
        for item, fn in self.items.items():
            try:
                row[item] = fn(row)
            except Exception as err:
                raise ManifestError(f"{self.name}, row {ident!r}, item {item!r}: {err}") from err
        return {k: row[k] for k in self.output_keys}

    def sorted_by(self, key: str, reverse: bool = False) -> "ManifestDataset":
        """A view ordered by a manifest field (e.g. ``duration``), as SpeechBrain's ``sorting``."""
        missing = [i for i in self.ids if key not in self.rows[i]]
        if missing:
            raise ManifestError(f"{self.name}: rows {missing[:3]} have no field {key!r} to sort by")
        out = ManifestDataset(self.rows, self.items, self.output_keys, self.name)
        out.ids = sorted(self.ids, key=lambda i: _sort_key(self.rows[i][key]), reverse=reverse)
        return out


def _sort_key(value: Any) -> Any:
    # JSON manifests often hold numbers as strings ("2.87"): sort those numerically.
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
