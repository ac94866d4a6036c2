"""The scoring formulas: per-weight importance of one candidate tensor. Low scores are pruned.

Every function returns flat float32 scores of one tensor. Fisher and alignment arrays come in flat or
shaped like the weight; arrays handed to a formula are consumed (overwritten in place), so one tensor's
temporaries stay small on a 4B model. Which scorer reads which file, and how a scorer is chosen, is
gaprune.scorers; the masks built from the scores are gaprune.masking.
"""

from __future__ import annotations

import zlib
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from gaprune.coefficients import DAIConfig
from gaprune.options import FISHER_NORMS

# The constants of the published DAI formula.
ALIGNMENT_GAIN = 0.2  # factor = clamp(1 + 0.2 a, 0.8, 1.2)
FACTOR_MIN, FACTOR_MAX = 0.8, 1.2
SQRT_EPS = 1e-8  # sqrt(|W| + 1e-8)
FLAT_STD = 1e-6  # a score with a smaller std cannot rank
NORM_EPS = 1e-8  # denominators of postprocessing and of the flat-score tie-break


ArrayFn = Callable[[str, str], "torch.Tensor | None"]  # (side, parameter name) -> array on the device, or None


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """|w|, flat float32."""
    return weight.detach().reshape(-1).float().abs()


def flat(x: torch.Tensor | float) -> torch.Tensor | float:
    return x.reshape(-1).float() if isinstance(x, torch.Tensor) else x


# --- the published DAI ----------------------------------------------------------------------------

def dai_factor(alignment: torch.Tensor | float) -> torch.Tensor | float:
    """clamp(1 + 0.2 a, 0.8, 1.2)."""
    if isinstance(alignment, torch.Tensor):
        return alignment.mul_(ALIGNMENT_GAIN).add_(1).clamp_(FACTOR_MIN, FACTOR_MAX)
    return min(max(1 + ALIGNMENT_GAIN * alignment, FACTOR_MIN), FACTOR_MAX)


def compression_term(abs_w: torch.Tensor, compression_weight: float) -> torch.Tensor:
    """compression_weight sqrt(|W| + 1e-8)."""
    return torch.sqrt(abs_w + SQRT_EPS).mul_(compression_weight)


def dai_fisher_term(fd: torch.Tensor | float, fg: torch.Tensor | float, abs_w: torch.Tensor,
                    alignment: torch.Tensor | float, beta: float) -> torch.Tensor:
    """(Fd |W| - beta Fg |W|) clamp(1 + 0.2 a, 0.8, 1.2)."""
    if isinstance(fd, torch.Tensor):
        difference = fd.sub_(fg, alpha=beta) if isinstance(fg, torch.Tensor) else fd.sub_(beta * fg)
    elif isinstance(fg, torch.Tensor):
        difference = fg.mul_(-beta).add_(fd)
    else:
        difference = torch.full_like(abs_w, fd - beta * fg)
    return difference.mul_(abs_w).mul_(dai_factor(alignment))


def dai_score(weight: torch.Tensor, fisher_domain: torch.Tensor | float, fisher_general: torch.Tensor | float,
              alignment: torch.Tensor | float, config: DAIConfig) -> torch.Tensor:
    """The published score (an absent Fisher side is 1.0, an absent alignment 0):

        raw   = (Fd |W| - beta Fg |W|) clamp(1 + 0.2 a, 0.8, 1.2) + compression_weight sqrt(|W| + 1e-8)
        score = softplus(raw), tie-broken by |W| when flat, post-processed per tensor,
                then fusion_alpha Fd |W| + fusion_beta score when a fusion is set.
    """
    abs_w = magnitude(weight)
    fd, fg, a = flat(fisher_domain), flat(fisher_general), flat(alignment)
    fused = config.fusion_alpha * fd * abs_w if config.fuses else None
    raw = dai_fisher_term(fd, fg, abs_w, a, config.beta).add_(compression_term(abs_w, config.compression_weight))
    score = F.softplus(raw)
    del raw
    if score.std() < FLAT_STD:  # a flat score cannot rank: fall back to a magnitude-shaped tie-break
        score.mul_(abs_w.div_(abs_w.mean() + NORM_EPS).mul_(0.5).add_(0.5))
    score = postprocess(score, config.score_postproc, config.score_temperature)
    return score if fused is None else fused.add_(score, alpha=config.fusion_beta)


def postprocess(score: torch.Tensor, mode: str, temperature: float = 1.0) -> torch.Tensor:
    """Per-tensor normalisation: zscore_sigmoid = sigmoid(z / max(1e-6, T)); minmax; rank / n; none."""
    if mode == "none":
        return score
    if mode == "zscore_sigmoid":
        z = (score - score.mean()) / (score.std() + NORM_EPS)
        return torch.sigmoid(z / max(1e-6, temperature))
    if mode == "minmax":
        return (score - score.min()) / (score.max() - score.min() + NORM_EPS)
    if mode == "rank":
        ranks = torch.empty_like(score)
        ranks[torch.argsort(score, stable=True)] = torch.arange(1, score.numel() + 1, dtype=score.dtype,
                                                                device=score.device)
        return ranks / score.numel()
    raise ValueError(f"unknown score post-processing {mode!r}")


# --- scorers whose Fisher and alignment terms act ----------------------------------------------------

def dai_paper_score(weight: torch.Tensor, fd_hat: torch.Tensor | float, fg_hat: torch.Tensor | float,
                    factor: torch.Tensor | None, config: DAIConfig) -> torch.Tensor:
    """[(F^d - beta F^g) |W| + compression_weight sqrt|W|] (1 + alpha s)."""
    abs_w = magnitude(weight)
    score = compression_term(abs_w, config.compression_weight).add_((fd_hat - config.beta * fg_hat) * abs_w)
    return score if factor is None else score.mul_(factor)


def aligned_saliency_score(weight: torch.Tensor, fd_hat: torch.Tensor | None, fg_hat: torch.Tensor | None,
                           factor: torch.Tensor | None, config: DAIConfig) -> torch.Tensor:
    """(lambda_d F^d + lambda_g F^g) W^2 (1 + alpha s); a side whose lambda is 0 is left out."""
    total = None
    for fisher_hat, side_weight in ((fd_hat, config.domain_weight), (fg_hat, config.general_weight)):
        if side_weight != 0:
            term = fisher_hat.mul_(side_weight)
            total = term if total is None else total.add_(term)
    if total is None:
        raise ValueError("aligned_saliency needs a nonzero domain_weight or general_weight")
    total.mul_(weight.detach().reshape(-1).float().square())
    return total if factor is None else total.mul_(factor)


def fisher_saliency(weight: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """F w^2: the second-order estimate of the loss increase from removing w."""
    return flat(fisher).mul_(weight.detach().reshape(-1).float().square())


def random_score(name: str, weight: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform scores, the same draw for a tensor in every pass."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.rand(weight.numel(), generator=generator).to(weight.device)


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


def alignment_factor(cosine: torch.Tensor | None, weight: torch.Tensor, alpha: float) -> torch.Tensor | None:
    """Flat 1 + alpha s, s the stored cosine (per weight, or per output row broadcast along it);
    None when alpha is 0 or there is no cosine."""
    if alpha == 0 or cosine is None:
        return None
    if cosine.shape != weight.shape:  # one value per output row
        cosine = cosine.reshape(-1, 1).expand(weight.shape[0], weight[0].numel())
    return cosine.reshape(-1).float().mul(alpha).add_(1)


def fisher_to_compression_ratio(candidates: Mapping[str, torch.Tensor], array: ArrayFn, config: DAIConfig,
                                sample: int = 4096, seed: int = 0) -> float | None:
    """Median over sampled weights of |dai_fisher_term| / compression_term: how much the Fisher signal can
    move a DAI score against the magnitude term (None without a compression term)."""
    if config.compression_weight == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    ratios = []
    for name, weight in candidates.items():
        numel = weight.numel()  # large tensors with replacement: a permutation of 25M weights costs most of a second
        index = (torch.randperm(numel, generator=generator) if numel <= sample
                 else torch.randint(numel, (sample,), generator=generator)).to(weight.device)
        abs_w = magnitude(weight)[index]

        def pick(side: str, absent: float) -> torch.Tensor | float:
            value = array(side, name)
            return absent if value is None else value.reshape(-1)[index].float()

        fisher_term = dai_fisher_term(pick("domain_fisher", 1.0), pick("general_fisher", 1.0), abs_w,
                                      pick("alignment", 0.0), config.beta)
        ratios.append(fisher_term.abs_() / compression_term(abs_w, config.compression_weight))
    return torch.cat(ratios).median().item()
