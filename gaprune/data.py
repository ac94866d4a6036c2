"""Triple files (JSON lists of {"query", "positive", "negative"} records) and the batches drawn from them."""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch

from gaprune.errors import InputError
from gaprune.fileio import read_json

TRIPLE_KEYS = ("query", "positive", "negative")
RELEVANCE_KEYS = ("query", "positive")  # the pair a retrieval judgement is made of


def load_records(path: str, required_keys: Sequence[str] = TRIPLE_KEYS) -> list[dict]:
    """Read a JSON list of objects whose ``required_keys`` hold non-blank strings; empty lists are an error."""
    return check_records(read_json(path, "data file"), path, required_keys)


def check_records(records: object, source: str, required_keys: Sequence[str] = TRIPLE_KEYS) -> list[dict]:
    """``records`` if it is a non-empty list of objects whose ``required_keys`` hold non-blank strings."""
    if not isinstance(records, list):
        raise InputError(f"{source} must hold a JSON list of records, found {type(records).__name__}")
    if not records:
        raise InputError(f"{source} holds no records")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{source}: record {index} is not an object")
        for key in required_keys:
            if key not in record:
                raise InputError(f"{source}: record {index} has no '{key}' field")
            if not isinstance(record[key], str):
                raise InputError(f"{source}: record {index} field '{key}' is not a string")
            if not record[key].strip():  # an empty text embeds as special tokens only: silently useless
                raise InputError(f"{source}: record {index} field '{key}' is empty")
    return records


def load_triples(path: str, max_samples: int | None = None) -> list[dict]:
    """The first ``max_samples`` triples of a file, in file order."""
    triples = load_records(path)
    return triples if max_samples is None else triples[:max_samples]


def hold_out(records: Sequence[dict], size: int, seed: int,
             text_keys: Sequence[str] = RELEVANCE_KEYS) -> tuple[list[dict], list[dict]]:
    """Split off ``size`` records drawn at random (seeded) as a validation set, and return (rest, validation).
    A remaining record holding a validation record's ``text_keys`` text in any field (as its query, positive
    or hard negative) is dropped from the rest too, so that no validation query or positive is ever scored,
    calibrated or trained on. Validation negatives may recur: they carry no relevance judgement."""
    if not 1 <= size < len(records):
        raise InputError(f"--validation_size must be at least 1 and below the {len(records)} records, got {size}")
    chosen = set(random.Random(seed).sample(range(len(records)), size))
    validation = [records[i] for i in sorted(chosen)]
    held = {record[key] for record in validation for key in text_keys if isinstance(record.get(key), str)}
    rest = [record for i, record in enumerate(records) if i not in chosen
            and not any(isinstance(value, str) and value in held for value in record.values())]
    if not rest:
        raise InputError(f"every record shares a text with the {size} validation records: nothing is left")
    return rest, validation


def triple_texts(triples: Sequence[dict]) -> list[str]:
    """Every text of the triples: each query, positive and negative."""
    return [triple[key] for triple in triples for key in TRIPLE_KEYS]


def batched(items: Sequence, batch_size: int) -> list[Sequence]:
    """Consecutive batches in order; the last one may be smaller."""
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def shuffled_batches(records: Sequence[dict], batch_size: int, generator: torch.Generator) -> list[list[dict]]:
    """A shuffled pass over ``records`` in batches of ``batch_size``, dropping the last partial batch."""
    order = torch.randperm(len(records), generator=generator).tolist()
    return [[records[i] for i in order[start:start + batch_size]]
            for start in range(0, len(order) - batch_size + 1, batch_size)]


def endless_batches(records: Sequence[dict], size: int, rng: random.Random) -> Iterator[list[dict]]:
    """Endless shuffled batches of ``size`` records, reshuffled on each pass."""
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < size:
            if not order:
                order = list(range(len(records)))
                rng.shuffle(order)
            batch.append(records[order.pop()])
        yield batch
