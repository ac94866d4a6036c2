"""Depth pruning: whole transformer blocks scored, and the lowest removed, leaving a shallower standard model.

A block scorer gives every block a number; the blocks with the lowest numbers go. The registry holds:

- ``block_influence`` (ShortGPT): 1 - cos(block input, block output), averaged over the real tokens of the
  calibration texts; a block that barely turns the hidden state changes little when it is skipped;
- ``skip_drift``: the measured effect of skipping the block, 1 - cos(embedding without it, dense embedding),
  averaged over the calibration texts;
- ``skip_loss``: the change of the contrastive loss on the calibration triples when the block is skipped;
- ``greedy_drift``: ``skip_drift`` one block at a time, every measurement with the blocks chosen before it
  already skipped;
- any score-based weight scorer (``aligned_saliency``, ``domain_fisher``, ``magnitude``, ...): the sum of
  its scores over the block's weight matrices (for Fisher saliency F w^2, the diagonal estimate of the loss
  increase from zeroing them).

Every measurement runs on each calibration side (domain, general) and is blended with the calibration's
general share, as cross-calibration blends Wanda's and SparseGPT's statistics.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from gaprune.coefficients import DAIConfig
from gaprune.data import batched
from gaprune.errors import InputError
from gaprune.layers import blocks_path, transformer_blocks
from gaprune.loss import info_nce
from gaprune.masking import ScoreFn
from gaprune.modeling import Embedder
from gaprune.scorers import SCORERS, ScoringContext, get_scorer
from gaprune.scoring import ArrayFn

BLOCK_CONFIG_FIELD = "num_hidden_layers"


@dataclasses.dataclass
class BlockContext:
    """What a block scorer may use: the model, the calibration texts by side and their blend, score files."""

    embedder: Embedder
    texts: Mapping[str, Sequence[str]]  # side -> texts (a triple file gives query, positive, negative in turn)
    general_share: float
    batch_size: int = 8
    arrays: ArrayFn | None = None  # the score files, for the weight-score sums
    config: DAIConfig = dataclasses.field(default_factory=DAIConfig)
    seed: int = 42


BlockScoreFn = Callable[[BlockContext, frozenset], list[float]]  # (context, blocks already skipped) -> score per block


@dataclasses.dataclass(frozen=True)
class BlockScorer:
    name: str
    summary: str
    score: BlockScoreFn
    needs_texts: bool = True
    greedy: bool = False  # re-measured after each removal, with the blocks chosen so far skipped


BlockHook = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]  # (hidden in, hidden out) -> new out or None


@contextlib.contextmanager
def block_hooks(hooks: Mapping[torch.nn.Module, BlockHook]) -> Iterator[None]:
    """Inside, each block's hook sees the hidden state that enters it and the one it returns (and may replace
    the latter), whether the block takes the state by position or by keyword and returns a tensor or a tuple."""
    def wrap(hook: BlockHook):
        def forward_hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            replaced = hook(hidden_in, output[0] if isinstance(output, tuple) else output)
            if replaced is None:
                return None
            return (replaced, *output[1:]) if isinstance(output, tuple) else replaced
        return forward_hook

    handles = [block.register_forward_hook(wrap(hook), with_kwargs=True) for block, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def skipped(model: torch.nn.Module, indices: Sequence[int]) -> contextlib.AbstractContextManager:
    """Inside, the blocks ``indices`` pass their input hidden state through unchanged."""
    blocks = transformer_blocks(model)
    return block_hooks({blocks[i]: lambda hidden_in, hidden_out: hidden_in for i in indices})


def _blend(context: BlockContext, per_side: Callable[[str, Sequence[str]], torch.Tensor]) -> list[float]:
    """(1 - g) * the domain side's measurement + g * the general side's, g the calibration's general share."""
    weights = {"domain": 1.0 - context.general_share, "general": context.general_share}
    total = sum(weights[side] * per_side(side, texts).double() for side, texts in context.texts.items() if texts)
    return total.tolist()


@torch.no_grad()
def _influence(context: BlockContext, texts: Sequence[str]) -> torch.Tensor:
    """Per block: the mean over real tokens of 1 - cos(block input, block output)."""
    embedder, blocks = context.embedder, transformer_blocks(context.embedder.model)
    sums, tokens = torch.zeros(len(blocks), dtype=torch.float64), 0
    mask: list[torch.Tensor] = []

    def measure(index: int) -> BlockHook:
        def hook(hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
            cosine = F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            sums[index] += ((1 - cosine) * mask[0]).sum().double().cpu()
        return hook

    with block_hooks({block: measure(i) for i, block in enumerate(blocks)}):
        for batch in batched(list(texts), context.batch_size):
            encoded = embedder.tokenize(batch)
            mask[:] = [encoded["attention_mask"].float()]
            tokens += int(encoded["attention_mask"].sum())
            embedder.model(**encoded)
    return sums / tokens


def _embeddings(context: BlockContext, texts: Sequence[str]) -> torch.Tensor:
    return context.embedder.encode(list(texts), context.batch_size, progress=False)


def _drift(context: BlockContext, skipped_before: frozenset) -> list[float]:
    """Per block: 1 - cos(embedding with the block skipped too, dense embedding), mean over the texts."""
    model, count = context.embedder.model, len(transformer_blocks(context.embedder.model))
    dense = {side: _embeddings(context, texts) for side, texts in context.texts.items() if texts}

    def per_side(side: str, texts: Sequence[str]) -> torch.Tensor:
        drift = torch.zeros(count, dtype=torch.float64)
        for index in set(range(count)) - skipped_before:  # the blocks skipped before stay at 0 (not chosen again)
            with skipped(model, sorted(skipped_before | {index})):
                drift[index] = (1 - (_embeddings(context, texts) * dense[side]).sum(-1)).mean().double().cpu()
        return drift
    return _blend(context, per_side)


def _as_triples(texts: Sequence[str]) -> list[dict]:
    if len(texts) % 3:
        raise InputError(f"skip_loss needs whole calibration triples; a side has {len(texts)} texts")
    return [{"query": texts[i], "positive": texts[i + 1], "negative": texts[i + 2]} for i in range(0, len(texts), 3)]


@torch.no_grad()
def _loss(context: BlockContext, triples: Sequence[dict]) -> float:
    batches = batched(list(triples), context.batch_size)
    total = 0.0
    for batch in batches:
        q, p, n = (context.embedder.embed([t[key] for t in batch]) for key in ("query", "positive", "negative"))
        total += float(info_nce(q, p, n)) * len(batch)
    return total / len(triples)


def _skip_loss(context: BlockContext, skipped_before: frozenset) -> list[float]:
    """Per block: the contrastive loss with the block skipped, less the dense loss."""
    model, count = context.embedder.model, len(transformer_blocks(context.embedder.model))

    def per_side(side: str, texts: Sequence[str]) -> torch.Tensor:
        triples = _as_triples(texts)
        dense = _loss(context, triples)
        change = torch.zeros(count, dtype=torch.float64)
        for index in range(count):
            with skipped(model, [index]):
                change[index] = _loss(context, triples) - dense
        return change
    return _blend(context, per_side)


def block_weights(model: torch.nn.Module) -> dict[int, dict[str, torch.Tensor]]:
    """Every weight matrix of each transformer block, by its name in the model, block by block."""
    prefix = blocks_path(model)
    return {index: {f"{prefix}.{index}.{name}": p for name, p in block.named_parameters() if p.dim() >= 2}
            for index, block in enumerate(transformer_blocks(model))}


def weight_score_sums(score_fn: ScoreFn, by_block: Mapping[int, Mapping[str, torch.Tensor]]) -> list[float]:
    """Per block: the sum of ``score_fn``'s scores over the block's weight matrices (``block_weights``)."""
    return [sum(float(score_fn(name, weight.detach()).double().sum()) for name, weight in weights.items())
            for weights in by_block.values()]


def _weight_sum(scorer: str) -> BlockScoreFn:
    """Per block: the sum of ``scorer``'s scores over the block's weight matrices."""
    def score(context: BlockContext, skipped_before: frozenset) -> list[float]:
        by_block = block_weights(context.embedder.model)
        named = {name: p for weights in by_block.values() for name, p in weights.items()}
        arrays = context.arrays or (lambda side, name: None)
        return weight_score_sums(get_scorer(scorer).build(ScoringContext(named, arrays, context.config,
                                                                         context.seed)), by_block)
    return score


BLOCK_SCORERS: dict[str, BlockScorer] = {scorer.name: scorer for scorer in (
    BlockScorer("block_influence", "ShortGPT's 1 - cos(block input, block output) on the calibration texts",
                lambda context, skipped_before: _blend(context, lambda side, texts: _influence(context, texts))),
    BlockScorer("skip_drift", "1 - cos(embedding with the block skipped, dense embedding)", _drift),
    BlockScorer("skip_loss", "the contrastive loss's rise when the block is skipped", _skip_loss),
    BlockScorer("greedy_drift", "skip_drift re-measured after each removal", _drift, greedy=True),
    *(BlockScorer(name, f"the sum of {name}'s scores over the block's weights", _weight_sum(name), needs_texts=False)
      for name, entry in SCORERS.items() if not entry.needs_activations),
)}


def get_block_scorer(name: str) -> BlockScorer:
    if name not in BLOCK_SCORERS:
        raise InputError(f"unknown block scorer {name!r}; choose from {', '.join(BLOCK_SCORERS)}")
    return BLOCK_SCORERS[name]


def removal_order(scorer: BlockScorer, context: BlockContext, count: int) -> tuple[list[int], list[float]]:
    """The first ``count`` blocks to remove, in the order they go, and the scores they were chosen by (for a
    greedy scorer, each block's score when it was chosen); ties go to the later block, whose removal disturbs
    fewer others."""
    if not scorer.greedy:
        scores = scorer.score(context, frozenset())
        return sorted(range(len(scores)), key=lambda i: (scores[i], -i))[:count], scores
    chosen: list[int] = []
    at_choice = [float("nan")] * len(transformer_blocks(context.embedder.model))
    for _ in range(count):
        scores = scorer.score(context, frozenset(chosen))
        best = min((i for i in range(len(scores)) if i not in chosen), key=lambda i: (scores[i], -i))
        chosen.append(best)
        at_choice[best] = scores[best]
    return chosen, at_choice


def lowest_blocks(scorer: BlockScorer, context: BlockContext, count: int) -> tuple[list[int], list[float]]:
    """The ``count`` blocks to remove (ascending) and the scores they were chosen by."""
    order, scores = removal_order(scorer, context, count)
    return sorted(order), scores


@torch.no_grad()
def remove_blocks(model: torch.nn.Module, removed: Sequence[int]) -> None:
    """Delete the blocks ``removed`` from the model in place, renumber the rest, and lower the config's
    num_hidden_layers (its per-layer lists, such as Qwen3's layer_types, keep the kept blocks' entries;
    max_window_layers counts the kept blocks below it)."""
    path = blocks_path(model)
    blocks = model.get_submodule(path)
    count = len(blocks)
    kept = [i for i in range(count) if i not in set(removed)]
    if not kept or len(kept) + len(set(removed)) != count:
        raise ValueError(f"cannot remove blocks {sorted(removed)} of {count}")
    parent, _, attribute = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute,
            torch.nn.ModuleList([blocks[i] for i in kept]))
    for position, index in enumerate(kept):  # the attention's cache slot and per-layer type follow the position
        for module in model.get_submodule(path)[position].modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    config = model.config
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == count and key != "architectures":
            setattr(config, key, [value[i] for i in kept])
    if isinstance(getattr(config, "max_window_layers", None), int):
        config.max_window_layers = sum(i < config.max_window_layers for i in kept)
    config.num_hidden_layers = len(kept)


@dataclasses.dataclass
class DepthResult:
    scorer: str
    removed: list[int]  # block indices in the dense model
    blocks_before: int
    block_scores: list[float]
    params_before: int
    params_after: int
