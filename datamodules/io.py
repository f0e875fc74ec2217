"""Reading rows from jsonl / json / csv / parquet files or a `datasets` name, with errors that name the place.

Every row comes back with where it came from (`file:line` for text files, `file:row N` otherwise), so that
validation errors and skip counts point at the offending input. Text files are read as UTF-8 with or without a
byte-order mark; a line that is not UTF-8 is an error naming the file and line (or a counted skip for jsonl and
csv when a `skipped` list is given).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_modules.storage import write_atomically  # noqa: F401 - re-exported: results are written atomically

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """Bad input data; the message names the file and the line or row."""


def check_at_least(owner: str, minimum: int, **settings: int) -> None:
    """A `ValueError` naming the first setting below `minimum`: sizes and counts that would give no data, checked
    when a module is built, before any work."""
    for name, value in settings.items():
        if value < minimum:
            raise ValueError(f"{owner}: {name} must be at least {minimum}, got {value}")


@dataclass
class Row:
    data: dict[str, Any]
    where: str  # "path:line" or "dataset[split] row N"


def read_rows(source: str, split: str = "train", skipped: list[str] | None = None) -> list[Row]:
    """Rows of a local file (by suffix) or, when `source` is not a file path, of a `datasets` dataset.

    A line that is not a JSON object raises `DataError`, or, when a `skipped` list is given, is recorded
    there (its message) and left out."""
    path = Path(source)
    if path.suffix in FILE_SUFFIXES or path.exists():
        if path.is_dir():
            raise DataError(f"{source} is a directory; data_path names a file ({', '.join(FILE_SUFFIXES)}), with "
                            "`{split}` where the split's name goes (e.g. data/{split}.jsonl)")
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {source}")
        reader = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}.get(path.suffix)
        if reader is None:
            raise DataError(f"{source}: unsupported file type (use one of {', '.join(FILE_SUFFIXES)})")
        return reader(path, skipped) if reader in (_jsonl, _csv) else reader(path)
    import datasets

    dataset = datasets.load_dataset(source, split=split)
    return [Row(dict(r), f"{source}[{split}] row {i}") for i, r in enumerate(dataset)]


def _lines(path: Path, skipped: list[str] | None):
    """(line number, text) of a UTF-8 file, a leading byte-order mark dropped; an undecodable line raises a
    `DataError` naming it, or is recorded in `skipped` and left out."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                error = f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                if skipped is None:
                    raise DataError(error) from None
                skipped.append(error)
                continue
            yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line


def _jsonl(path: Path, skipped: list[str] | None) -> list[Row]:
    rows = []
    for lineno, line in _lines(path, skipped):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            data, error = None, f"{path}:{lineno}: not valid JSON ({e.msg})"
        else:
            error = None if isinstance(data, dict) else f"{path}:{lineno}: expected a JSON object"
        if error is None:
            rows.append(Row(data, f"{path}:{lineno}"))
        elif skipped is None:
            raise DataError(error)
        else:
            skipped.append(error)
    return rows


def _json(path: Path) -> list[Row]:
    """A JSON list (or `{"data": [...]}`); a `.json` file of one object per line (AQuA's release) as JSON lines."""
    text = "".join(line for _, line in _lines(path, None))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _jsonl(path, None)
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects (or {{'data': [...]}})")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {i} is not an object")
    return [Row(item, f"{path} item {i}") for i, item in enumerate(data)]


def _csv(path: Path, skipped: list[str] | None) -> list[Row]:
    numbered = list(_lines(path, skipped))
    reader = csv.DictReader(line for _, line in numbered)
    return [Row(dict(r), f"{path}:{numbered[reader.line_num - 1][0]}") for r in reader]


def _parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    return [Row(r, f"{path} row {i}") for i, r in enumerate(pq.read_table(path).to_pylist())]
