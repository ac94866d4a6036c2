"""Triple files: JSON lists of {"query", "positive", "negative"} records."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from gaprune.errors import InputError

TRIPLE_KEYS = ("query", "positive", "negative")


def read_json(path: str, what: str = "file") -> Any:
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None


def load_records(path: str, required_keys: Sequence[str] = TRIPLE_KEYS) -> list[dict]:
    """Read a JSON list of objects whose ``required_keys`` hold strings; empty lists are an error."""
    records = read_json(path, "data file")
    if not isinstance(records, list):
        raise InputError(f"{path} must hold a JSON list of records, found {type(records).__name__}")
    if not records:
        raise InputError(f"{path} holds no records")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{path}: record {index} is not an object")
        for key in required_keys:
            if key not in record:
                raise InputError(f"{path}: record {index} has no '{key}' field")
            if not isinstance(record[key], str):
                raise InputError(f"{path}: record {index} field '{key}' is not a string")
    return records


def load_triples(path: str, max_samples: int | None = None) -> list[dict]:
    """The first ``max_samples`` triples of a file, in file order."""
    triples = load_records(path)
    return triples if max_samples is None else triples[:max_samples]


def batched(items: Sequence, batch_size: int) -> list[Sequence]:
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
