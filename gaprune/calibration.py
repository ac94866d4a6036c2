"""Block-by-block calibration for activation-aware pruning (Wanda, SparseGPT, reconstruction).

The calibration texts run up to the first transformer block once. Then each block in turn, and inside it
each candidate linear layer in running order: the layer accumulates statistics of its inputs over the real
tokens (padding excluded) and the caller prunes it; the block finally runs again on its pruned weights to
give the next block its inputs. Every layer thus sees the outputs of the already pruned layers before it
(SparseGPT's "true sequential" order), and memory holds the model plus the hidden states at one block
boundary.

Texts come in sides ("domain", "general"); statistics are kept per side and blended on request
(cross-calibration, gaprune.input_stats): (1 - g) * domain mean + g * general mean, per token.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from gaprune.distributed import World, current_world
from gaprune.errors import InputError
from gaprune.input_stats import InputStats, LayerInputs
from gaprune.layers import parameter_owner, transformer_blocks
from gaprune.loss import info_nce
from gaprune.modeling import Embedder

log = logging.getLogger(__name__)


TokenWeights = dict[str, dict[str, list[torch.Tensor]]]  # side -> layer -> per text, its real tokens' weights


@contextmanager
def _activation_gradients_only(model: torch.nn.Module) -> Iterator[None]:
    """Every weight frozen and the input embeddings' output made to require gradients: backward then gives
    the activations' gradients and no weight's (nor are a layer's inputs saved for one)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_())
    try:
        with torch.enable_grad():
            yield
    finally:
        handle.remove()
        for p in trainable:
            p.requires_grad_(True)


def _output_gradient_squares(embedder: Embedder, triples: Sequence[Sequence[str]], names: Sequence[str],
                             outputs: list[tuple[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """For one batch of (query, positive, negative) triples: each named layer's mean over its outputs of
    (dL/dy_t)^2 at every real token, per text (the triples' texts in order), L the batch's InfoNCE loss;
    ``outputs`` is where the layers' forward hooks put (name, output).

    The loss couples the whole batch, but only one of its three fields is held for backward at a time (as
    gradient caching does): dL/d(embedding) first, from embeddings computed without a graph; then each
    field again with its graph, back-propagating that cached gradient to its layers' outputs."""
    fields = [embedder.tokenize([triple[key] for triple in triples]) for key in range(3)]
    embeddings = []
    with torch.no_grad():
        for tokens in fields:
            embeddings.append(embedder.embed_tokens(tokens).requires_grad_())
            outputs.clear()  # the hooks saw this pass too: hold none of its outputs
    cached = torch.autograd.grad(info_nce(*embeddings), embeddings)
    squares: dict[str, list[torch.Tensor | None]] = {name: [None] * (3 * len(triples)) for name in names}
    for key, tokens in enumerate(fields):  # queries, positives, negatives
        embedding = embedder.embed_tokens(tokens)
        grads = torch.autograd.grad(embedding, [out for _, out in outputs], grad_outputs=cached[key],
                                    allow_unused=True)
        real = tokens["attention_mask"].bool()
        for (name, out), grad in zip(outputs, grads):
            square = (torch.zeros(out.shape[:-1], device=out.device) if grad is None
                      else grad.float().square().mean(-1))
            for row in range(len(triples)):
                squares[name][3 * row + key] = square[row][real[row]]
        outputs.clear()
    return squares


def loss_gradient_weights(embedder: Embedder, texts: Mapping[str, Sequence[str]], names: Sequence[str],
                          batch_size: int = 8) -> TokenWeights:
    """How much each real token's output matters to the contrastive loss, per candidate layer: the mean
    square over the layer's outputs y_t of dL/dy_t, on the unpruned model, over the triples the texts come
    from (query, positive, negative in turn; in-batch InfoNCE over ``batch_size`` triples at a time).

    The Fisher of a linear layer's weights is E[(g g^T) (x) (x x^T)], g = dL/dy; keeping one scalar of the
    output factor per token, |g_t|^2 / out, weighting each token's x x^T by it turns SparseGPT's X^T X (and
    Wanda's ||X_j||^2) into that Fisher's input side: tokens the embedding does not depend on (e.g. all
    but the last under last-token pooling, in the last block) stop counting. Normalised to mean 1 over
    each side's tokens, so cross-calibration blends the sides as before; a layer that no gradient reaches
    on a side keeps uniform weights there (with a warning).

    Under torchrun the ranks share the batches of triples (each rank a contiguous block of them, so every
    batch is the one a single process runs) and then every rank holds every weight."""
    for side, side_texts in texts.items():
        if not side_texts or len(side_texts) % 3:
            raise InputError(f"loss-gradient weights need whole triples; the {side} side has {len(side_texts)} texts")
    triples = {side: [side_texts[i:i + 3] for i in range(0, len(side_texts), 3)]
               for side, side_texts in texts.items()}
    jobs = [(side, start) for side, side_triples in triples.items()
            for start in range(0, len(side_triples), batch_size)]
    world = current_world()
    mine = [jobs[index] for index in world.contiguous_share(len(jobs))]
    if world.is_distributed:
        log.info("loss gradients shared among %d ranks: this rank runs %d of %d batches", world.size, len(mine),
                 len(jobs))
    model = embedder.model
    modules = {name: parameter_owner(model, name)[0] for name in names}
    outputs: list[tuple[str, torch.Tensor]] = []
    handles = [module.register_forward_hook(lambda module, args, out, name=name: outputs.append((name, out)))
               for name, module in modules.items()]
    rows: list[torch.Tensor] = []  # per real token, its weight in each layer
    lengths: list[int] = []  # per text, its real tokens
    try:
        with _activation_gradients_only(model):
            for side, start in tqdm(mine, desc="loss gradients", unit="batch", disable=not world.is_main):
                squares = _output_gradient_squares(embedder, triples[side][start:start + batch_size], names, outputs)
                for per_layer in zip(*(squares[name] for name in names)):  # one text
                    rows.append(torch.stack(per_layer, dim=1))
                    lengths.append(len(per_layer[0]))
    finally:
        for handle in handles:
            handle.remove()
    local = torch.cat(rows) if rows else torch.zeros(0, len(names), device=embedder.device)
    rows.clear()  # held once, not twice, from here on
    per_text = world.gather_ragged(local).split(world.gather_ragged(torch.tensor(lengths, dtype=torch.int64)).tolist())
    del local
    if len(per_text) != sum(map(len, texts.values())):
        raise RuntimeError(f"the ranks' loss-gradient weights cover {len(per_text)} texts, not "
                           f"{sum(map(len, texts.values()))}")
    return _by_side(per_text, texts, names)


def _by_side(per_text: Sequence[torch.Tensor], texts: Mapping[str, Sequence[str]],
             names: Sequence[str]) -> TokenWeights:
    """Every text's rows of per-layer token weights, split into sides and layers, each normalised."""
    weights: TokenWeights = {}
    for side, side_texts in texts.items():  # the jobs, hence the texts, come side after side
        side_rows, per_text = per_text[:len(side_texts)], per_text[len(side_texts):]
        weights[side] = {name: _normalised([row[:, column] for row in side_rows], name, side)
                         for column, name in enumerate(names)}
    effective = [_effective_share(torch.cat(values)) for side_weights in weights.values()
                 for values in side_weights.values()]
    log.info("loss-gradient weights: the effective share of the tokens is %.1f%% to %.1f%% across the layers",
             100 * min(effective), 100 * max(effective))
    return weights


def _normalised(values: list[torch.Tensor], name: str, side: str) -> list[torch.Tensor]:
    mean = torch.cat(values).mean()
    if not mean > 0:
        log.warning("no loss gradient reaches %s on the %s texts: its tokens keep uniform weights", name, side)
        return [torch.ones_like(value) for value in values]
    return [value / mean for value in values]


def _effective_share(weights: torch.Tensor) -> float:
    """Kish's effective sample size over the count: the share of the tokens that in effect carries the weight."""
    return (weights.sum() ** 2 / weights.square().sum() / weights.numel()).item()


class _Stop(Exception):
    pass


class _Catcher(torch.nn.Module):
    """Stands in for the first block: records what the model passes it, then stops the forward pass."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block
        self.calls: list[tuple[tuple, dict]] = []

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # what the model reads off its blocks (ModernBERT: attention_type)
            return getattr(self._modules["block"], name)

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        raise _Stop


@dataclass
class _Batch:
    side: str
    first: int  # the index of its first text among the side's texts
    real: torch.Tensor  # (B, T) True at real tokens
    args: tuple
    kwargs: dict

    def with_hidden(self, hidden: torch.Tensor) -> None:
        if self.args:
            self.args = (hidden, *self.args[1:])
        else:
            self.kwargs["hidden_states"] = hidden


@torch.no_grad()
def _first_block_inputs(embedder: Embedder, texts: Mapping[str, Sequence[str]], batch_size: int,
                        world: World) -> tuple[list[_Batch], bool]:
    """Each batch's inputs to the first block, and whether the batches were shared out among the torchrun
    ranks (each rank holding its share; only when every rank gets one)."""
    jobs = [(side, start) for side, side_texts in texts.items() for start in range(0, len(side_texts), batch_size)]
    shared = world.is_distributed and len(jobs) >= world.size
    blocks = transformer_blocks(embedder.model)
    catcher = _Catcher(blocks[0])
    blocks[0] = catcher
    batches = []
    try:
        for side, start in world.shard(jobs) if shared else jobs:
            tokens = embedder.tokenize(texts[side][start:start + batch_size])
            try:
                embedder.model(**tokens, use_cache=False)  # a decoder's cache would grow with every replay
            except _Stop:
                args, kwargs = catcher.calls.pop()
                batches.append(_Batch(side, start, tokens["attention_mask"].bool(), args, kwargs))
    finally:
        blocks[0] = catcher.block
    return batches, shared


def _add_across_ranks(inputs: LayerInputs, world: World) -> None:
    """Each side's statistics summed over every rank's share of the batches."""
    for stats in inputs.sides.values():
        tokens = torch.tensor([stats.tokens], dtype=torch.int64, device=stats.input_sq.device)
        world.sum_([t for t in (stats.input_sq, stats.hessian, stats.cross, tokens) if t is not None])
        stats.tokens = int(tokens.item())


def _run_block(block: torch.nn.Module, batch: _Batch) -> torch.Tensor:
    out = block(*batch.args, **batch.kwargs)
    return out[0] if isinstance(out, tuple) else out


def _stages(block: torch.nn.Module, modules: Mapping[str, torch.nn.Module], names: set[str],
            batch: _Batch) -> list[list[str]]:
    """The block's candidate layers in the order they run, those reading the same input (q/k/v, gate/up) together."""
    calls: list[tuple[str, torch.Tensor]] = []  # the inputs stay referenced, so identity is meaningful
    handles = [modules[name].register_forward_pre_hook(
        lambda module, args, name=name: calls.append((name, args[0]))) for name in names]
    try:
        _run_block(block, batch)
    finally:
        for handle in handles:
            handle.remove()
    stages: list[list[str]] = []
    last_input = None
    for name, tensor in calls:
        if any(name in stage for stage in stages):
            continue
        if stages and tensor is last_input:
            stages[-1].append(name)
        else:
            stages.append([name])
        last_input = tensor
    missing = names - {name for stage in stages for name in stage}
    if missing:
        raise InputError(f"{sorted(missing)[0]} never ran on the calibration texts; it cannot be calibrated")
    return stages


def layers_by_block(model: torch.nn.Module, names: Sequence[str]) -> list[set[str]]:
    """The candidate layers in each transformer block, once checked to be calibrated block by block: linear
    layers inside the blocks of a model with one attention type."""
    if len(set(getattr(model.config, "layer_types", None) or [])) > 1:  # one captured mask serves every block
        raise InputError("activation-aware pruning replays one attention mask in every block; this model mixes "
                         f"attention types {sorted(set(model.config.layer_types))}")
    modules = {name: parameter_owner(model, name)[0] for name in names}
    if any(not isinstance(module, torch.nn.Linear) for module in modules.values()):
        raise InputError("activation-aware pruning works on linear layers only (select mlp or attention weights)")
    by_block = [{name for name, module in modules.items() if any(module is m for m in block.modules())}
                for block in transformer_blocks(model)]
    outside = set(names) - set().union(*by_block)
    if outside:
        raise InputError(f"{sorted(outside)[0]} lies outside the transformer blocks; activation-aware pruning "
                         f"calibrates block by block")
    return by_block


def layer_widths(model: torch.nn.Module, names: Sequence[str]) -> list[tuple[int, str, int, int]]:
    """(block, parent module, inputs, outputs) of each candidate layer, for the memory plan."""
    widths = []
    for index, block_names in enumerate(layers_by_block(model, names)):
        for name in sorted(block_names):
            module = parameter_owner(model, name)[0]
            widths.append((index, name.rsplit(".", 2)[0], module.in_features, module.out_features))
    return widths


def _empty_inputs(width: int, device: torch.device, sides: Sequence[str], hessian: bool, dense_targets: bool,
                  general_share: float) -> LayerInputs:
    """Zeroed statistics of a layer with ``width`` inputs on each side: sum x^2, and X^T X (``hessian``) and
    X_dense^T X (``dense_targets``)."""
    return LayerInputs({side: InputStats(torch.zeros(width, device=device),
                                         torch.zeros(width, width, device=device) if hessian else None,
                                         torch.zeros(width, width, device=device) if dense_targets else None)
                        for side in sides}, general_share)


def _collect_stage(block: torch.nn.Module, dense_block: torch.nn.Module | None, first: torch.nn.Module,
                   batches: Sequence[_Batch], dense_batches: Sequence[_Batch], inputs: dict[str, LayerInputs],
                   token_weights: TokenWeights | None) -> None:
    """Run every batch through ``block``, adding the stage's input (the input of its ``first`` layer, which the
    others share) to ``inputs``: once per token, or weighted per layer by ``token_weights``. With a
    ``dense_block`` (the block before any pruning) each batch's dense input to the stage comes along."""
    current: list[_Batch] = []
    dense_inputs: list[torch.Tensor] = []  # the current batch's input to the stage's layers in the dense model

    def add(module, args):
        batch = current[0]
        x = args[0][batch.real]
        dense = dense_inputs[0] if dense_inputs else None
        if token_weights is None:
            next(iter(inputs.values())).sides[batch.side].add(x, dense=dense)
            return
        lengths = batch.real.sum(1).tolist()
        for name, layer_inputs in inputs.items():
            per_text = token_weights[batch.side][name][batch.first:batch.first + len(batch.real)]
            if [len(w) for w in per_text] != lengths:
                raise RuntimeError(f"the token weights of {name} do not match the calibration tokens")
            layer_inputs.sides[batch.side].add(x, torch.cat(per_text), dense)

    def keep_dense(module, args):
        dense_inputs[:] = [args[0][current[0].real]]
        raise _Stop  # the rest of the dense block is not needed for this stage
    handles = [first.register_forward_pre_hook(add)]
    if dense_block is not None:
        twins = dict(zip(block.modules(), dense_block.modules()))
        handles.append(twins[first].register_forward_pre_hook(keep_dense))
    try:
        for index, batch in enumerate(batches):
            current[:] = [batch]
            if dense_block is not None:
                with suppress(_Stop):  # keep_dense stops it at the stage's input
                    _run_block(dense_block, dense_batches[index])
            _run_block(block, batch)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def prune_block_by_block(embedder: Embedder, candidates: Mapping[str, torch.Tensor],
                         texts: Mapping[str, Sequence[str]], prune_layers: Callable[[dict[str, LayerInputs]], None],
                         general_share: float = 0.0, hessian: bool = False, batch_size: int = 8,
                         token_weights: TokenWeights | None = None, dense_targets: bool = False) -> None:
    """Calibrate and prune ``candidates`` (weights of linear layers inside the blocks) one layer after another.

    ``prune_layers`` gets LayerInputs for the next candidate layers in running order (layers that read the
    same input come together) and changes their weights in place; the layers after them are calibrated
    on the pruned ones' outputs, and each block runs again on its pruned weights for the next block's inputs.
    With ``dense_targets`` the dense model runs beside the pruned one (its hidden states at the block
    boundary, and a copy of the block being pruned), and each layer's statistics also hold ``cross``, its
    inputs in the dense model against those in the pruned one, token by token.
    Under torchrun, where there are at least as many batches as ranks, the ranks share the batches: the
    statistics are summed across them before each prune, and every rank then takes rank 0's pruned weights
    (with fewer batches every rank runs them all).
    """
    model = embedder.model
    by_block = layers_by_block(model, candidates)
    modules = {name: parameter_owner(model, name)[0] for name in candidates}
    blocks = transformer_blocks(model)
    world = current_world()
    batches, shared_out = _first_block_inputs(embedder, texts, batch_size, world)
    if not batches:
        raise InputError("no calibration texts")
    if shared_out:
        log.info("calibration shared among %d ranks: this rank runs %d batches", world.size, len(batches))
    dense_batches = [_Batch(b.side, b.first, b.real, tuple(b.args), dict(b.kwargs)) for b in batches] \
        if dense_targets else []

    def new_inputs(name: str) -> LayerInputs:
        return _empty_inputs(modules[name].in_features, candidates[name].device, texts, hessian, dense_targets,
                             general_share)

    for block, names in tqdm(list(zip(blocks, by_block)), desc="calibrating blocks", unit="block",
                             disable=not world.is_main):
        dense_block = copy.deepcopy(block) if dense_targets and names else None  # the block before any pruning
        for stage in (_stages(block, modules, names, batches[0]) if names else []):
            if token_weights is None:  # the layers of a stage read one input: one set of statistics
                statistics = [new_inputs(stage[0])]
                inputs = {name: statistics[0] for name in stage}
            else:  # each layer weighs the tokens by its own output's gradients
                inputs = {name: new_inputs(name) for name in stage}
                statistics = list(inputs.values())
            _collect_stage(block, dense_block, modules[stage[0]], batches, dense_batches, inputs, token_weights)
            if shared_out:
                for layer_inputs in statistics:
                    _add_across_ranks(layer_inputs, world)
            prune_layers(inputs)
            if shared_out:  # rank 0's weights everywhere: the next layers calibrate on the same model
                world.broadcast_(candidates[name].data for name in stage)
            del inputs, statistics  # freed before the next stage's are made
        for index, batch in enumerate(batches):
            if dense_targets:
                dense_batches[index].with_hidden(_run_block(block if dense_block is None else dense_block,
                                                              dense_batches[index]))
            batch.with_hidden(_run_block(block, batch))
        del dense_block
