"""Domain Alignment Importance (DAI) scores and the masks built from them.

For a candidate weight W with domain/general Fisher arrays Fd, Fg and element-wise alignment a:

    factor = clamp(1 + 0.2 a, 0.8, 1.2)
    raw    = (Fd |W| - beta Fg |W|) factor + compression_weight sqrt(|W| + 1e-8)
    score  = softplus(raw)

Beside it (the default, unchanged), two scorers whose Fisher and alignment terms actually move the mask
(the published Fisher term is ~1e-5 of the sqrt term, so its mask is in practice magnitude pruning):

    dai_paper:        [(F^_d - beta F^_g) |W| + compression_weight sqrt|W|] (1 + alpha s)
    aligned_saliency: (lambda_d F^_d + lambda_g F^_g) W^2 (1 + alpha s)

with F^ = F / mean F (over all candidates, or per tensor: --fisher_norm) and s in [-1, 1] the cosine of
general and domain gradients (gradient.py --alignment_mode local_cosine / row_cosine).

Low scores are pruned. The k lowest scores over all candidates (or per layer) are found exactly
without ever holding every score at once: a two-pass radix select over the scores' bit patterns.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from gaprune.layers import layer_key

ScoreFn = Callable[[str, torch.Tensor], torch.Tensor]
ArrayFn = Callable[[str, str], "torch.Tensor | None"]  # (side, parameter name) -> array on the device, or None
POSTPROCESSING = ("none", "zscore_sigmoid", "minmax", "rank")
SCORERS = ("dai", "dai_paper", "aligned_saliency", "random", "magnitude", "domain_fisher", "general_fisher")
FISHER_NORMS = ("global", "tensor", "none")


@dataclass
class DAIConfig:
    beta: float = 1.0
    compression_weight: float = 0.5
    score_postproc: str = "none"
    score_temperature: float = 1.0
    fusion_alpha: float = 0.0
    fusion_beta: float = 1.0
    # dai_paper and aligned_saliency
    alignment_weight: float = 0.5  # alpha
    domain_weight: float = 1.0  # lambda_d
    general_weight: float = 1.0  # lambda_g
    fisher_norm: str = "global"


def required_score_files(scoring: str, config: DAIConfig) -> list[str]:
    """The score-file sides a scorer cannot run without."""
    if scoring in ("domain_fisher", "general_fisher"):
        return [scoring]
    if scoring == "aligned_saliency":
        return [side for side, weight in (("domain_fisher", config.domain_weight),
                                          ("general_fisher", config.general_weight)) if weight != 0]
    return []


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


def normalized_fisher(array: ArrayFn, candidates: Mapping[str, torch.Tensor], mode: str) -> ArrayFn:
    """Fisher arrays made scale-free: F / (mean F over every candidate weight) for ``global``, F / (mean F of
    the tensor) for ``tensor``, F itself for ``none``. Global keeps the Fisher ranking across tensors and
    puts the domain and general sides (whose losses differ in scale) on one footing; tensor removes
    the cross-tensor differences, leaving the budget split between tensors to |W|."""
    if mode not in FISHER_NORMS:
        raise ValueError(f"unknown Fisher normalisation {mode!r}")
    global_means: dict[str, float] = {}

    def mean_over_candidates(side: str) -> float:
        if side not in global_means:
            total = sum(array(side, name).double().sum().item() for name in candidates)
            global_means[side] = total / sum(p.numel() for p in candidates.values())
        return global_means[side]

    def fisher(side: str, name: str) -> torch.Tensor | None:
        value = array(side, name)
        if value is None:
            return None
        value = value.reshape(-1).float()
        if mode == "none":
            return value
        return value.div_(value.mean() if mode == "tensor" else mean_over_candidates(side))

    return fisher


def alignment_factor(array: ArrayFn, name: str, weight: torch.Tensor, alpha: float) -> torch.Tensor | None:
    """Flat 1 + alpha*s for one tensor, s the stored cosine (per weight, or per row broadcast along it);
    None when alpha is 0 or there is no alignment file."""
    if alpha == 0:
        return None
    cosine = array("alignment_cosine", name)
    if cosine is None:
        return None
    if cosine.shape != weight.shape:  # one value per output row
        cosine = cosine.reshape(-1, 1).expand(weight.shape[0], weight[0].numel())
    return cosine.reshape(-1).float().mul(alpha).add_(1)


def make_score_fn(scoring: str, array: ArrayFn, config: DAIConfig, seed: int = 42,
                  candidates: Mapping[str, torch.Tensor] | None = None) -> ScoreFn:
    """The per-tensor score function of a scorer. Baselines: random, magnitude |w|, and the Fisher
    saliency F*w^2 of one side (the usual second-order estimate of the loss change from removing w).
    ``candidates`` is needed for the global Fisher normalisation of dai_paper and aligned_saliency."""
    if scoring == "dai":
        def dai(name, weight):
            def side(key, absent):
                value = array(key, name)
                return absent if value is None else value
            return dai_score(weight, side("domain_fisher", 1.0), side("general_fisher", 1.0),
                             side("alignment", 0.0), config)
        return dai
    if scoring in ("dai_paper", "aligned_saliency"):
        fisher = normalized_fisher(array, candidates or {}, config.fisher_norm)

        def scaled(name, weight):
            return alignment_factor(array, name, weight, config.alignment_weight)

        if scoring == "dai_paper":
            def dai_paper(name, weight):
                magnitude = weight.detach().reshape(-1).float().abs()
                fd, fg = fisher("domain_fisher", name), fisher("general_fisher", name)
                fisher_term = (1.0 if fd is None else fd) - config.beta * (1.0 if fg is None else fg)
                score = torch.sqrt(magnitude + 1e-8).mul_(config.compression_weight).add_(fisher_term * magnitude)
                factor = scaled(name, weight)
                return score if factor is None else score.mul_(factor)
            return dai_paper

        def aligned_saliency(name, weight):
            total = None
            for side, weight_of_side in (("domain_fisher", config.domain_weight),
                                         ("general_fisher", config.general_weight)):
                if weight_of_side != 0:
                    term = fisher(side, name).mul_(weight_of_side)
                    total = term if total is None else total.add_(term)
            if total is None:
                raise ValueError("aligned_saliency needs a nonzero domain_weight or general_weight")
            total.mul_(weight.detach().reshape(-1).float().square())
            factor = scaled(name, weight)
            return total if factor is None else total.mul_(factor)
        return aligned_saliency
    if scoring == "random":
        def random_score(name, weight):  # the same draw for a tensor in every pass
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            return torch.rand(weight.numel(), generator=generator).to(weight.device)
        return random_score
    if scoring == "magnitude":
        return lambda name, weight: weight.detach().reshape(-1).float().abs()
    if scoring in ("domain_fisher", "general_fisher"):
        def saliency(name, weight):
            fisher = array(scoring, name)
            return fisher.reshape(-1).float().mul_(weight.detach().reshape(-1).float().square())
        return saliency
    raise ValueError(f"unknown scorer {scoring!r}")


def fisher_to_compression_ratio(candidates: Mapping[str, torch.Tensor], array: ArrayFn, config: DAIConfig,
                                sample: int = 4096, seed: int = 0) -> float | None:
    """Median over sampled weights of |(Fd - beta Fg)|w| factor| / (compression_weight sqrt(|w| + 1e-8)):
    how much the Fisher signal can move a DAI score compared with the magnitude term (None without one)."""
    if config.compression_weight == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    ratios = []
    for name, weight in candidates.items():
        index = torch.randperm(weight.numel(), generator=generator)[:sample].to(weight.device)
        magnitude = weight.detach().reshape(-1)[index].float().abs()

        def pick(key, absent):
            value = array(key, name)
            return absent if value is None else value.reshape(-1)[index].float()

        factor = torch.clamp(1 + 0.2 * torch.as_tensor(pick("alignment", 0.0)), 0.8, 1.2)
        fisher_term = ((pick("domain_fisher", 1.0) - config.beta * pick("general_fisher", 1.0)) * magnitude * factor).abs()
        ratios.append(fisher_term / (config.compression_weight * torch.sqrt(magnitude + 1e-8)))
    return torch.cat(ratios).median().item()


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
    reference_overlap: int | None = None  # masked weights that the reference scorer would also mask
    diagnostics: dict = field(default_factory=dict)


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


@torch.no_grad()
def prune_lowest(candidates: Mapping[str, torch.Tensor], score_fn: ScoreFn, pct: float, strategy: str = "global",
                 rho_min: float = 0.05, rho_max: float = 0.95, reference_fn: ScoreFn | None = None) -> MaskResult:
    """Zero, in place, the lowest-scoring ``int(total * pct)`` candidate weights (global), or each layer's
    share of them (uniform). Ties at the threshold are taken in parameter order, so the count is exact.

    With ``reference_fn``, also count how many masked weights the same budget under that scorer masks.
    """
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

    def threshold_of(fn: ScoreFn, names: list[str], budget: int) -> Threshold | None:
        return kth_smallest(lambda: (fn(n, candidates[n]) for n in names), budget) if budget else None

    per_param: dict[str, dict] = {}
    masked_total = newly_zeroed = 0
    overlap = 0 if reference_fn else None
    for group, names in groups.items():
        build_mask = _MaskBuilder(threshold_of(score_fn, names, budgets[group]))
        build_reference = _MaskBuilder(threshold_of(reference_fn, names, budgets[group])) if reference_fn else None
        for name in names:
            weight = candidates[name]
            if build_reference is not None:
                reference_mask = build_reference(reference_fn(name, weight))
            score = score_fn(name, weight)
            mask = build_mask(score)
            if build_reference is not None:
                overlap += int((mask & reference_mask).sum())
            flat = weight.view(-1)
            newly_zeroed += int((flat[mask] != 0).sum())
            flat[mask] = 0
            masked = int(mask.sum())
            masked_total += masked
            stats = _score_stats(score)
            threshold = build_mask.threshold
            stats.update(threshold=threshold.value if threshold else None, masked_ratio=masked / score.numel())
            per_param[name] = {"numel": score.numel(), "masked": masked, "ratio": masked / score.numel(),
                               "mean_importance": stats["mean"], "score_stats": stats}
    allocations: dict[str, dict] = {}
    for name, info in per_param.items():
        layer = allocations.setdefault(layer_key(name, fallback_parts=2), {"size": 0, "masked": 0})
        layer["size"] += info["numel"]
        layer["masked"] += info["masked"]
    for layer, info in allocations.items():
        info["ratio"] = info["masked"] / info["size"]
        if strategy == "uniform":
            info["allocated"] = budgets[layer]
    return MaskResult(masked=masked_total, newly_zeroed=newly_zeroed, per_param=per_param,
                      per_layer_allocations=allocations, reference_overlap=overlap)


def prune_candidates(candidates: Mapping[str, torch.Tensor], array: ArrayFn, scoring: str, config: DAIConfig,
                     pct: float, strategy: str = "global", rho_min: float = 0.05, rho_max: float = 0.95,
                     seed: int = 42) -> MaskResult:
    """Score with ``scoring`` and zero the lowest weights in place. Also report how much of the mask plain
    magnitude pruning at the same budget shares and, for dai, how large the Fisher term is."""
    score_fn = make_score_fn(scoring, array, config, seed, candidates)
    reference = make_score_fn("magnitude", array, config)
    diagnostics = {}
    if scoring == "dai":
        diagnostics["median_fisher_to_compression_ratio"] = fisher_to_compression_ratio(candidates, array, config)
    result = prune_lowest(candidates, score_fn, pct, strategy, rho_min, rho_max, reference_fn=reference)
    if reference is not None:
        diagnostics["mask_agreement_with_magnitude"] = (result.reference_overlap / result.masked
                                                        if result.masked else None)
    result.diagnostics = diagnostics
    return result
