"""Choosing a pruning recipe by measuring it: compare.py's rows (each candidate pruned at one budget and evaluated
on the user's validation split) ranked under a stated objective, with a floor on the general text."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

from gaprune.errors import InputError

OBJECTIVES = ("domain", "general", "mean")
SIDES = ("domain", "general")


@dataclasses.dataclass(frozen=True)
class Objective:
    """Maximise the nDCG@10 of ``side`` (``mean``: the mean of both sides' changes against dense), among the
    candidates whose general nDCG@10 is at most ``max_general_drop`` percent below the dense model's (None: no
    floor). Ties go to the candidate with more general nDCG@10."""

    side: str = "domain"
    max_general_drop: float | None = None

    def __post_init__(self) -> None:
        if self.side not in OBJECTIVES:
            raise InputError(f"--select must be one of {', '.join(OBJECTIVES)}, got {self.side!r}")
        drop = self.max_general_drop
        if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float))
                                 or not math.isfinite(drop) or drop < 0):
            raise InputError(f"--max_general_drop must be a percentage of at least 0, got {drop!r}")

    def value(self, row: Mapping, dense: Mapping) -> float:
        if self.side != "mean":
            return row[self.side]["ndcg@10"]
        return sum(_change(row, dense, side) for side in SIDES) / len(SIDES)

    def meets(self, row: Mapping, dense: Mapping) -> bool:
        if self.max_general_drop is None:
            return True
        return row["general"]["ndcg@10"] >= dense["general"]["ndcg@10"] * (1 - self.max_general_drop / 100)

    def describe(self) -> str:
        target = ("the best mean of the domain and general nDCG@10 changes" if self.side == "mean"
                  else f"the most {self.side} nDCG@10")
        floor = ("" if self.max_general_drop is None
                 else f", general nDCG@10 at most {self.max_general_drop:g}% below the dense model's")
        return target + floor


def _change(row: Mapping, dense: Mapping, side: str) -> float:
    """Percent change of ``side``'s nDCG@10 against dense (0 where dense scores 0: nothing to lose)."""
    from gaprune.evaluation import relative_change  # torch: only once rows exist, so compare.py --help stays light

    return relative_change(row[side]["ndcg@10"], dense[side]["ndcg@10"]) or 0.0


def select(candidates: Sequence[Mapping], dense: Mapping, objective: Objective) -> Mapping:
    """The candidate row the objective prefers; refused, naming the closest one, when none meets the floor."""
    if not candidates:
        raise InputError("no candidate recipe to choose from")
    meeting = [row for row in candidates if objective.meets(row, dense)]
    if not meeting:
        closest = max(candidates, key=lambda row: row["general"]["ndcg@10"])
        general, domain = (_change(closest, dense, side) for side in ("general", "domain"))
        raise InputError(f"no candidate keeps the general nDCG@10 within {objective.max_general_drop:g}% of the "
                         f"dense model's; the closest is {closest['method']} (general {general:+.2f}%, "
                         f"domain {domain:+.2f}%)")
    return max(meeting, key=lambda row: (objective.value(row, dense), row["general"]["ndcg@10"]))
