"""Domain Alignment Importance (DAI) scores and the masks built from them.

For a candidate weight W with domain/general Fisher arrays Fd, Fg and element-wise alignment a:

    factor = clamp(1 + 0.2 a, 0.8, 1.2)
    raw    = (Fd |W| - beta Fg |W|) factor + compression_weight sqrt(|W| + 1e-8)
    score  = softplus(raw)

Low scores are pruned. The k lowest scores over all candidates (or per layer) are found exactly
without ever holding every score at once: a two-pass radix select over the scores' bit patterns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from gaprune.layers import layer_key

ScoreFn = Callable[[str, torch.Tensor], torch.Tensor]
POSTPROCESSING = ("none", "zscore_sigmoid", "minmax", "rank")


@dataclass
class DAIConfig:
    beta: float = 1.0
    compression_weight: float = 0.5
    score_postproc: str = "none"
    score_temperature: float = 1.0
    fusion_alpha: float = 0.0
    fusion_beta: float = 1.0


def postprocess(score: torch.Tensor, mode: str, temperature: float = 1.0) -> torch.Tensor:
    """Per-tensor normalisation of a flat score vector."""
    if mode == "none":
        return score
    if mode == "zscore_sigmoid":
        z = (score - score.mean()) / (score.std() + 1e-8)
        return torch.sigmoid(z / max(1e-6, temperature))
    if mode == "minmax":
        return (score - score.min()) / (score.max() - score.min() + 1e-8)
    if mode == "rank":
        ranks = torch.empty_like(score)
        ranks[torch.argsort(score, stable=True)] = torch.arange(1, score.numel() + 1, dtype=score.dtype,
                                                                device=score.device)
        return ranks / score.numel()
    raise ValueError(f"unknown score post-processing {mode!r}")


def dai_score(weight: torch.Tensor, fisher_domain: torch.Tensor | float, fisher_general: torch.Tensor | float,
              alignment: torch.Tensor | float, config: DAIConfig) -> torch.Tensor:
    """The flat float32 DAI scores of one tensor (Fisher/alignment arrays flat or shaped like ``weight``).

    Array arguments are consumed (overwritten) to keep one tensor's temporaries small.
    """
    magnitude = weight.detach().reshape(-1).float().abs()

    def flat(x):
        return x.reshape(-1).float() if isinstance(x, torch.Tensor) else x

    fd, fg, a = flat(fisher_domain), flat(fisher_general), flat(alignment)
    fused = config.fusion_alpha * fd * magnitude if config.fusion_alpha != 0 or config.fusion_beta != 1 else None
    if isinstance(fd, torch.Tensor):
        raw = fd.sub_(fg, alpha=config.beta) if isinstance(fg, torch.Tensor) else fd.sub_(config.beta * fg)
    elif isinstance(fg, torch.Tensor):
        raw = fg.mul_(-config.beta).add_(fd)
    else:
        raw = torch.full_like(magnitude, fd - config.beta * fg)
    raw.mul_(magnitude)
    if isinstance(a, torch.Tensor):
        raw.mul_(a.mul_(0.2).add_(1).clamp_(0.8, 1.2))
    else:
        raw.mul_(min(max(1 + 0.2 * a, 0.8), 1.2))
    raw.add_(torch.sqrt(magnitude + 1e-8).mul_(config.compression_weight))
    score = F.softplus(raw)
    del raw
    if score.std() < 1e-6:  # a flat score cannot rank: fall back to a magnitude-shaped tie-break
        score.mul_(magnitude.div_(magnitude.mean() + 1e-8).mul_(0.5).add_(0.5))
    score = postprocess(score, config.score_postproc, config.score_temperature)
    if fused is not None:
        score = fused.add_(score, alpha=config.fusion_beta)
    return score


# --- exact k-th smallest over many tensors -------------------------------------------------------

def ordered_keys(score: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int32 keys whose integer order is the float order (flip the magnitude bits
    of negative numbers)."""
    bits = score.float().contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


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
        counts = torch.bincount((ordered_keys(s) >> 16) + (1 << 15), minlength=1 << 16)  # signed high half
        high = counts if high is None else high + counts
    cum_high = torch.cumsum(high, 0)
    bin_high = int(torch.searchsorted(cum_high, torch.tensor(k, device=cum_high.device)))
    before_high = int(cum_high[bin_high - 1]) if bin_high > 0 else 0

    low = torch.zeros(1 << 16, dtype=torch.int64, device=cum_high.device)
    for s in scores():
        keys = ordered_keys(s)
        keys = keys[(keys >> 16) == bin_high - (1 << 15)]
        if keys.numel():
            low += torch.bincount(keys & 0xFFFF, minlength=1 << 16).to(low.device)
    cum_low = torch.cumsum(low, 0)
    bin_low = int(torch.searchsorted(cum_low, torch.tensor(k - before_high, device=cum_low.device)))
    before_low = int(cum_low[bin_low - 1]) if bin_low > 0 else 0
    below = before_high + before_low
    key = ((bin_high - (1 << 15)) << 16) | bin_low
    return Threshold(value=key_to_float(key), below=below, ties_to_take=k - below)


# --- budgets and masking -------------------------------------------------------------------------

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


def _score_stats(score: torch.Tensor) -> dict[str, float]:
    return {"min": score.min().item(), "max": score.max().item(), "mean": score.mean().item(),
            "std": score.std().item() if score.numel() > 1 else 0.0}


@torch.no_grad()
def prune_lowest(candidates: Mapping[str, torch.Tensor], score_fn: ScoreFn, pct: float, strategy: str = "global",
                 rho_min: float = 0.05, rho_max: float = 0.95) -> MaskResult:
    """Zero, in place, the lowest-scoring ``int(total * pct)`` candidate weights (global), or each layer's
    share of them (uniform). Ties at the threshold are taken in parameter order, so the count is exact."""
    total = sum(p.numel() for p in candidates.values())
    k = int(total * pct)
    groups: dict[str, list[str]] = {}
    for name in candidates:
        groups.setdefault("all" if strategy == "global" else layer_key(name, fallback_parts=2), []).append(name)
    sizes = {g: sum(candidates[n].numel() for n in names) for g, names in groups.items()}
    if strategy == "global":
        budgets = {"all": k}
    elif strategy == "uniform":
        budgets = uniform_allocation(sizes, k, rho_min, rho_max) if k > 0 else {g: 0 for g in groups}
    else:
        raise ValueError(f"unknown budget strategy {strategy!r}")

    per_param: dict[str, dict] = {}
    allocations: dict[str, dict] = {}
    masked_total = newly_zeroed = 0
    for group, names in groups.items():
        budget = budgets[group]
        threshold = kth_smallest(lambda: (score_fn(n, candidates[n]) for n in names), budget) if budget else None
        ties_left = threshold.ties_to_take if threshold else 0
        for name in names:
            weight = candidates[name]
            score = score_fn(name, weight)
            if threshold is None:
                mask = torch.zeros_like(score, dtype=torch.bool)
            else:
                mask = score < threshold.value
                if ties_left:
                    ties = torch.nonzero(score == threshold.value).flatten()[:ties_left]
                    mask[ties] = True
                    ties_left -= ties.numel()
            flat = weight.view(-1)
            newly_zeroed += int((flat[mask] != 0).sum())
            flat[mask] = 0
            masked = int(mask.sum())
            masked_total += masked
            stats = _score_stats(score)
            stats.update(threshold=threshold.value if threshold else None, masked_ratio=masked / score.numel())
            per_param[name] = {"numel": score.numel(), "masked": masked, "ratio": masked / score.numel(),
                               "mean_importance": stats["mean"], "score_stats": stats}
    for name, info in per_param.items():
        layer = allocations.setdefault(layer_key(name, fallback_parts=2), {"size": 0, "masked": 0})
        layer["size"] += info["numel"]
        layer["masked"] += info["masked"]
    for layer, info in allocations.items():
        info["ratio"] = info["masked"] / info["size"]
        if strategy == "uniform":
            info["allocated"] = budgets[layer]
    return MaskResult(masked=masked_total, newly_zeroed=newly_zeroed, per_param=per_param,
                      per_layer_allocations=allocations)
