"""Masks from scores: the k lowest over many tensors, exactly, in bounded memory.

The k-th smallest score over all candidates (or over one layer's) is found by a two-pass radix select
over the scores' bit patterns, holding one tensor's scores at a time; the mask then takes every score
below it and the ties it still needs in parameter order, so exactly k weights are masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from gaprune.errors import InputError
from gaprune.layers import layer_key
from gaprune.patterns import Pattern, lowest_in_groups

ScoreFn = Callable[[str, torch.Tensor], torch.Tensor]  # (parameter name, weight) -> flat float32 scores


def ordered_keys(score: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int32 keys whose integer order is the float order (flip the magnitude bits
    of negative numbers)."""
    bits = score.float().contiguous().view(torch.int32)
    return (bits >> 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)  # one temporary: a large one costs page faults


def key_to_float(key: int) -> float:
    bits = torch.tensor([key], dtype=torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(torch.float32).item()


@dataclass
class Threshold:
    value: float  # the k-th smallest score
    below: int  # scores strictly below it
    ties_to_take: int  # how many scores equal to it complete the k


def kth_smallest(scores: Callable[[], Iterable[torch.Tensor]], k: int) -> Threshold:
    """The k-th smallest value (1 <= k <= total) over the tensors ``scores()`` yields, in two counting passes.

    Pass 1 counts the upper 16 bits of every key, pass 2 the lower 16 bits of the keys in the bin that
    holds the k-th value; memory is two 65536-bin histograms plus one tensor's scores at a time.
    """
    high = None
    for s in scores():
        counts = torch.bincount(ordered_keys(s).bitwise_right_shift_(16).add_(1 << 15), minlength=1 << 16)  # signed
        high = counts if high is None else high + counts
    cum_high = torch.cumsum(high, 0)
    bin_high = int(torch.searchsorted(cum_high, torch.tensor(k, device=cum_high.device)))
    before_high = int(cum_high[bin_high - 1]) if bin_high > 0 else 0

    low = torch.zeros(1 << 16, dtype=torch.int64, device=cum_high.device)
    low_end = (bin_high - (1 << 15)) << 16  # the keys whose high half is bin_high
    for s in scores():
        keys = ordered_keys(s)
        keys = keys[(keys >= low_end) & (keys <= low_end + 0xFFFF)]  # int32 bounds: the top bin ends at 2**31 - 1
        if keys.numel():
            low += torch.bincount(keys & 0xFFFF, minlength=1 << 16).to(low.device)
    cum_low = torch.cumsum(low, 0)
    bin_low = int(torch.searchsorted(cum_low, torch.tensor(k - before_high, device=cum_low.device)))
    before_low = int(cum_low[bin_low - 1]) if bin_low > 0 else 0
    below = before_high + before_low
    key = ((bin_high - (1 << 15)) << 16) | bin_low
    return Threshold(value=key_to_float(key), below=below, ties_to_take=k - below)


def uniform_allocation(sizes: Mapping[str, int], k: int, rho_min: float, rho_max: float) -> dict[str, int]:
    """k spread over layers by size; the rounding remainder goes to the largest layers; then each layer
    is clamped to [floor(rho_min n), floor(rho_max n)]."""
    total = sum(sizes.values())
    alloc = {layer: (k * n) // total for layer, n in sizes.items()}
    remainder = k - sum(alloc.values())
    for layer in sorted(sizes, key=lambda name: -sizes[name])[:remainder]:
        alloc[layer] += 1
    return {layer: min(max(alloc[layer], math.floor(rho_min * n)), math.floor(rho_max * n))
            for layer, n in sizes.items()}


@dataclass
class MaskResult:
    masked: int  # weights in the mask
    newly_zeroed: int  # of those, the ones that were not zero already
    per_param: dict[str, dict]
    per_layer_allocations: dict[str, dict]
    reference_overlap: int | None = None  # masked weights that the reference scorer would also mask
    diagnostics: dict = field(default_factory=dict)
    masks: dict[str, torch.Tensor] | None = None  # name -> bool mask (on the host), when asked for


def _score_stats(score: torch.Tensor) -> dict[str, float]:
    return {"min": score.min().item(), "max": score.max().item(), "mean": score.mean().item(),
            "std": score.std().item() if score.numel() > 1 else 0.0}


class _MaskBuilder:
    """Masks at a threshold, taking the ties it still needs in parameter order."""

    def __init__(self, threshold: Threshold | None):
        self.threshold = threshold
        self.ties_left = threshold.ties_to_take if threshold else 0

    def __call__(self, score: torch.Tensor) -> torch.Tensor:
        if self.threshold is None:
            return torch.zeros_like(score, dtype=torch.bool)
        mask = score < self.threshold.value
        if self.ties_left:
            ties = torch.nonzero(score == self.threshold.value).flatten()[:self.ties_left]
            mask[ties] = True
            self.ties_left -= ties.numel()
        return mask


def all_finite(values: torch.Tensor) -> bool:
    """No NaN and no infinity: the smallest and largest values (min and max carry a NaN through) are finite.
    A reduction only, where isfinite() would first allocate a mask as large as the tensor."""
    if not values.numel():
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(values))).all())


def checked_scores(score_fn: ScoreFn) -> ScoreFn:
    """The score function, refusing non-finite scores (a NaN is never below a threshold: it would go unmasked).
    Each parameter is checked the first time it is scored: the scores are a function of the parameter, and the
    threshold passes score every tensor again."""
    seen: set[str] = set()

    def checked(name: str, weight: torch.Tensor) -> torch.Tensor:
        score = score_fn(name, weight)
        if name not in seen:
            if not all_finite(score):
                raise InputError(f"the scores of {name} are not all finite numbers (check the score files and flags)")
            seen.add(name)
        return score
    return checked


class _ScoreCache:
    """A score function whose scores are kept in host memory from the first pass over the tensors to the
    last (two counting passes find a global threshold, a third masks), while they fit in ``budget`` bytes;
    the rest are computed again each pass. Callers do not modify the scores they get."""

    def __init__(self, score_fn: ScoreFn, budget: int):
        self.score_fn, self.room = score_fn, budget
        self.kept: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name in self.kept:
            return self.kept[name].to(weight.device)
        score = self.score_fn(name, weight)
        size = score.numel() * score.element_size()
        if size <= self.room:
            self.kept[name] = score.cpu()
            self.room -= size
        return score

    def release(self, name: str) -> None:
        score = self.kept.pop(name, None)
        if score is not None:
            self.room += score.numel() * score.element_size()


def layer_allocations(per_param: Mapping[str, dict]) -> dict[str, dict]:
    """Per layer: the candidate weights, how many are masked, and the ratio."""
    allocations: dict[str, dict] = {}
    for name, info in per_param.items():
        layer = allocations.setdefault(layer_key(name, fallback_parts=2), {"size": 0, "masked": 0})
        layer["size"] += info["numel"]
        layer["masked"] += info["masked"]
    for info in allocations.values():
        info["ratio"] = info["masked"] / info["size"]
    return allocations


def _budget_groups(candidates: Mapping[str, torch.Tensor], strategy: str) -> dict[str, list[str]]:
    """The candidates a budget is taken over: all of them (global), or each layer's (uniform)."""
    groups: dict[str, list[str]] = {}
    for name in candidates:
        groups.setdefault("all" if strategy == "global" else layer_key(name, fallback_parts=2), []).append(name)
    return groups


def _budgets(candidates: Mapping[str, torch.Tensor], groups: Mapping[str, list[str]], pct: float, strategy: str,
             rho_min: float, rho_max: float, pattern: Pattern) -> dict[str, int]:
    """How many weights each group masks: ``int(total * pct)`` in all, spread over the layers by
    uniform_allocation (uniform); n of every m with an N:M ``pattern``."""
    total = sum(p.numel() for p in candidates.values())
    k = int(total * pct)
    sizes = {g: sum(candidates[n].numel() for n in names) for g, names in groups.items()}
    if pattern.structured:
        return {g: sum(candidates[n].numel() // pattern.m * pattern.n for n in names) for g, names in groups.items()}
    if strategy == "global":
        return {"all": k}
    if strategy == "uniform":
        return uniform_allocation(sizes, k, rho_min, rho_max) if k > 0 else {g: 0 for g in groups}
    raise ValueError(f"unknown budget strategy {strategy!r}")


def _in_groups(score: torch.Tensor, weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """The flat N:M mask of a tensor's flat scores, groups taken along each row of ``weight``."""
    return lowest_in_groups(score.view(weight.shape[0], -1), pattern.n, pattern.m).view(-1)


def _param_info(score: torch.Tensor, masked: int, threshold: Threshold | None) -> dict:
    """A tensor's line in MaskResult.per_param: its size, what was masked, its score statistics."""
    stats = _score_stats(score)
    stats.update(threshold=threshold.value if threshold else None, masked_ratio=masked / score.numel())
    return {"numel": score.numel(), "masked": masked, "ratio": masked / score.numel(),
            "mean_importance": stats["mean"], "score_stats": stats}


@torch.no_grad()
def prune_lowest(candidates: Mapping[str, torch.Tensor], score_fn: ScoreFn, pct: float, strategy: str = "global",
                 rho_min: float = 0.05, rho_max: float = 0.95, reference_fn: ScoreFn | None = None,
                 pattern: Pattern = Pattern(), keep_masks: bool = False, apply: bool = True,
                 cache_bytes: int = 0) -> MaskResult:
    """Zero, in place, the lowest-scoring ``int(total * pct)`` candidate weights (global), or each layer's
    share of them (uniform). Ties at the threshold are taken in parameter order, so the count is exact.
    With an N:M ``pattern``, the N lowest of every M consecutive weights of each row instead (``pct`` unused).

    With ``reference_fn``, also count how many masked weights the same budget under that scorer masks.
    With ``keep_masks``, the result holds every tensor's mask; without ``apply`` the weights stay as they are.
    ``cache_bytes``: host memory that may keep scores between the passes instead of computing them again
    (0: one tensor's scores at a time).
    """
    groups = _budget_groups(candidates, strategy)
    budgets = _budgets(candidates, groups, pct, strategy, rho_min, rho_max, pattern)
    score_fn = _ScoreCache(checked_scores(score_fn), 0 if pattern.structured else cache_bytes)  # N:M: one pass
    reference_fn = reference_fn and checked_scores(reference_fn)

    def threshold_of(fn: ScoreFn, names: list[str], budget: int) -> Threshold | None:
        if pattern.structured or not budget:
            return None
        return kth_smallest(lambda: (fn(n, candidates[n]) for n in names), budget)

    per_param: dict[str, dict] = {}
    masks: dict[str, torch.Tensor] | None = {} if keep_masks else None
    masked_total = newly_zeroed = 0
    overlap = 0 if reference_fn else None
    for group, names in groups.items():
        build_mask = _MaskBuilder(threshold_of(score_fn, names, budgets[group]))
        build_reference = _MaskBuilder(threshold_of(reference_fn, names, budgets[group])) if reference_fn else None
        for name in names:
            weight = candidates[name]
            if build_reference is not None:
                reference_score = reference_fn(name, weight)
                reference_mask = (_in_groups(reference_score, weight, pattern) if pattern.structured
                                  else build_reference(reference_score))
            score = score_fn(name, weight)
            score_fn.release(name)  # the last pass over this tensor
            mask = _in_groups(score, weight, pattern) if pattern.structured else build_mask(score)
            if build_reference is not None:
                overlap += int(torch.count_nonzero(mask & reference_mask))
            if masks is not None:
                masks[name] = mask.view(weight.shape).cpu()
            flat = weight.view(-1)
            newly_zeroed += int(torch.count_nonzero(flat[mask]))
            if apply:
                flat[mask] = 0
            masked = int(torch.count_nonzero(mask))
            masked_total += masked
            per_param[name] = _param_info(score, masked, build_mask.threshold)
    if masked_total != sum(budgets.values()):  # exact counts are this module's promise
        raise RuntimeError(f"masked {masked_total} weights, but the budget was {sum(budgets.values())}")
    allocations = layer_allocations(per_param)
    if strategy == "uniform" and not pattern.structured:
        for layer, info in allocations.items():
            info["allocated"] = budgets[layer]
    return MaskResult(masked=masked_total, newly_zeroed=newly_zeroed, per_param=per_param,
                      per_layer_allocations=allocations, reference_overlap=overlap, masks=masks)
