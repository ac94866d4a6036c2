"""Sparsity patterns: unstructured or N:M, and the masks of the lowest scores within a row or an N:M group.

Masks are True where a weight is pruned; ties go to the earlier weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gaprune.errors import InputError


@dataclass(frozen=True)
class Pattern:
    """unstructured, or exactly n pruned in every m consecutive input weights of a row."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else "unstructured"


def parse_pattern(text: str) -> Pattern:
    if text == "unstructured":
        return Pattern()
    n, sep, m = text.partition(":")
    if not (sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise InputError(f"sparsity pattern must be 'unstructured' or N:M with 0 < N < M, got {text!r}")
    return Pattern(int(n), int(m))


def lowest_in_groups(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the n lowest of every m consecutive scores along the last axis (ties: the earlier one)."""
    if scores.shape[-1] % m:
        raise InputError(f"a {n}:{m} pattern needs rows whose length is a multiple of {m}, got {scores.shape[-1]}")
    groups = scores.reshape(-1, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, torch.argsort(groups, dim=1, stable=True)[:, :n], True)
    return mask.view(scores.shape)


def lowest_in_rows(scores: torch.Tensor, share: float) -> torch.Tensor:
    """Mask of the ``int(share * row length)`` lowest scores of every row (ties: the earlier one)."""
    k = int(scores.shape[1] * share)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], True)
    return mask
