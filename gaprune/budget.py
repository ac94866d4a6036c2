"""Pruning to a budget: a cost model of a transformer's work per token, and the mix of whole layers, MLP
channels and (where the family allows, Qwen3) query heads that meets "N times as fast" and/or "keep P of the
transformer's parameters" while removing the least importance.

The cost of a block per token (multiply-adds x 2, from the config): the q, k, v and o projections, attention
over ``sequence_length`` tokens, and the MLP (three matrices when gated, two for BERT-style encoders);
embedding lookups and pooling are left out. Importance is one currency for both structures: a score-based
scorer's scores summed over what goes (for Fisher saliency F w^2, the diagonal estimate of the loss increase),
a block's over all its matrices, a channel's over its rows and column, a head's over its query rows and output
columns. For every number of blocks removed (the least important first), every channel share on a grid and
every head count (the same from each key/value group, up to half), the plan's cost and removed importance
follow; the cheapest in importance among the plans that meet the budget wins.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import torch

from gaprune.errors import InputError

CHANNEL_GRID = 32  # channel shares tried: 0, 1/32, ..., up to MAX_CHANNEL_SHARE
MAX_CHANNEL_SHARE = 0.75
MAX_HEAD_SHARE = 0.5  # of every key/value group's query heads


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the cost model reads from a config."""

    blocks: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    gated: bool

    @classmethod
    def of(cls, config, gated: bool) -> Shape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim, gated)

    def block_flops(self, intermediate: int, sequence_length: int, heads: int | None = None) -> float:
        """Multiply-adds x 2 of one block for one token, with ``intermediate`` MLP channels and ``heads`` query
        heads (default: all)."""
        q, kv = (self.heads if heads is None else heads) * self.head_dim, self.kv_heads * self.head_dim
        projections = 2 * self.hidden * (2 * q + 2 * kv)
        attention = 2 * 2 * sequence_length * q  # the scores and the weighted sum
        return projections + attention + 2 * (3 if self.gated else 2) * self.hidden * intermediate

    def block_params(self, intermediate: int, heads: int | None = None) -> int:
        """The weights of one block's matrices with ``intermediate`` MLP channels and ``heads`` query heads
        (default: all; biases and norms left out)."""
        q, kv = (self.heads if heads is None else heads) * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv) + (3 if self.gated else 2) * self.hidden * intermediate


@dataclasses.dataclass
class Plan:
    blocks_removed: list[int]  # block indices of the dense model
    channels_removed: int  # per kept block (the same count in every block)
    speedup: float  # predicted by the cost model: dense FLOPs / plan FLOPs
    params_kept: float  # share of the blocks' matrix weights kept
    removed_importance: float
    heads_removed: int = 0  # query heads per kept block (the same from each key/value group)

    def line(self, shape: Shape) -> str:
        heads = f" and {self.heads_removed} of {shape.heads} query heads" if self.heads_removed else ""
        return (f"plan: {len(self.blocks_removed)} of {shape.blocks} layers {self.blocks_removed} and "
                f"{self.channels_removed} of {shape.intermediate} MLP channels{heads} in each remaining layer; "
                f"predicted {self.speedup:.2f}x faster, {self.params_kept:.1%} of the transformer's weights kept")


def plan_grid(shape: Shape, block_importance: Sequence[float], channel_importance: Sequence[torch.Tensor],
              sequence_length: int, order: Sequence[int] | None = None,
              head_importance: Sequence[torch.Tensor] | None = None) -> list[Plan]:
    """Every plan on the grid: the first k blocks of ``order`` removed (k = 0 .. blocks - 1; by default the least
    important first), c channels from each kept block, c the lowest of its channel scores (``channel_importance[b]``
    sorted ascending, per block), and, with ``head_importance``, h query heads from each kept block:
    ``head_importance[b][g]`` is the importance of its g lowest heads in each key/value group, h = g x groups."""
    order = order or sorted(range(shape.blocks), key=lambda b: (block_importance[b], -b))
    cumulative = [torch.cat([torch.zeros(1, dtype=torch.float64), scores.double().cumsum(0)])
                  for scores in channel_importance]
    dense_flops = shape.blocks * shape.block_flops(shape.intermediate, sequence_length)
    dense_params = shape.blocks * shape.block_params(shape.intermediate)
    steps = sorted({round(shape.intermediate * MAX_CHANNEL_SHARE * i / CHANNEL_GRID) for i in range(CHANNEL_GRID + 1)})
    per_group = shape.heads // shape.kv_heads
    head_steps = range(int(per_group * MAX_HEAD_SHARE) + 1) if head_importance is not None else range(1)
    plans = []
    for k in range(shape.blocks):
        removed = sorted(order[:k])
        kept = [b for b in range(shape.blocks) if b not in removed]
        for channels in steps:
            width = shape.intermediate - channels
            for g in head_steps:
                heads = shape.heads - g * shape.kv_heads
                importance = (sum(block_importance[b] for b in removed) + sum(float(cumulative[b][channels])
                              + (float(head_importance[b][g]) if g else 0.0) for b in kept))
                plans.append(Plan(removed, channels,
                                  dense_flops / (len(kept) * shape.block_flops(width, sequence_length, heads)),
                                  len(kept) * shape.block_params(width, heads) / dense_params, importance,
                                  g * shape.kv_heads))
    return plans


def reachable(shape: Shape, sequence_length: int) -> tuple[float, float]:
    """The most any plan reaches: (speedup, smallest share of weights kept)."""
    width = shape.intermediate - round(shape.intermediate * MAX_CHANNEL_SHARE)
    return (shape.blocks * shape.block_flops(shape.intermediate, sequence_length) / shape.block_flops(width,
                                                                                                      sequence_length),
            shape.block_params(width) / (shape.blocks * shape.block_params(shape.intermediate)))


def choose(plans: Sequence[Plan], target_speedup: float | None, target_params: float | None) -> Plan:
    """The plan that removes the least importance among those meeting the budget (ties: fewer layers removed)."""
    feasible = [plan for plan in plans if (target_speedup is None or plan.speedup >= target_speedup) and
                (target_params is None or plan.params_kept <= target_params)]
    if not feasible:
        best = max(plans, key=lambda plan: plan.speedup)
        raise InputError(f"no plan meets the budget; the most the grid reaches is {best.speedup:.2f}x with "
                         f"{best.params_kept:.1%} of the weights kept")
    return min(feasible, key=lambda plan: (plan.removed_importance, len(plan.blocks_removed)))


@torch.no_grad()
def texts_per_second(embedder, texts: Sequence[str], batch_size: int = 16, rounds: int = 3) -> float:
    """Encoding throughput on ``texts``, the best of ``rounds`` (one warm-up pass first)."""
    embedder.encode(list(texts[:batch_size]), batch_size, progress=False)
    best = float("inf")
    for _ in range(rounds):
        if embedder.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        embedder.encode(list(texts), batch_size, progress=False)
        if embedder.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return len(texts) / best
