"""Pruning a model's candidate weights with a registered scorer, and the reports a pruned folder carries."""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from gaprune.blocks import (BLOCK_CONFIG_FIELD, BlockContext, DepthResult, block_weights, get_block_scorer,
                            lowest_blocks, remove_blocks, removal_order, weight_score_sums)
from gaprune.budget import Plan, Shape, choose, plan_grid
from gaprune.checkpoint import count_zeros, output_folder
from gaprune.calibration import TokenWeights, layer_widths, loss_gradient_weights, prune_block_by_block
from gaprune.families import family_of_names
from gaprune.input_stats import LayerInputs
from gaprune.layers import select_parameters, transformer_blocks
from gaprune.data import load_triples, triple_texts
from gaprune.distributed import current_world
from gaprune.errors import InputError
from gaprune.masking import MaskResult, checked_scores, layer_allocations, prune_lowest
from gaprune.patterns import Pattern, lowest_in_groups, lowest_in_rows
from gaprune.memory import (CalibrationPlan, gpu_capacity, measured_line, plan_calibration, score_cache_bytes,
                            warn_if_too_large)
from gaprune.modeling import Embedder
from gaprune.options import (BLOCK_MEASURES, LAYERS, OWN_TARGET, TOKEN_WEIGHTINGS, UNIFORM_SHARES, UNIFORM_WEIGHTING,
                             UNSTRUCTURED)
from gaprune.pruners import sparsegpt
from gaprune.scorers import REFERENCE_SCORER, Scorer, ScoringContext, get_scorer
from gaprune.coefficients import DAIConfig
from gaprune.scoring import ArrayFn
from gaprune.spec import PRUNER_OPTIONS, CalibrationSpec, PruneSpec, ScoreFiles, calibration_source
from gaprune.structure import (CONFIG_FIELDS, UNIT_LAYER_TYPES, UnitPlan, lowest_units, remove_units, unit_plan,
                               unit_scores, units_to_remove)


log = logging.getLogger(__name__)


def prune_candidates(candidates: Mapping[str, torch.Tensor], arrays: ArrayFn, scorer: str, config: DAIConfig,
                     pct: float, strategy: str = "global", rho_min: float = 0.05, rho_max: float = 0.95,
                     seed: int = 42, pattern: Pattern = Pattern(), keep_masks: bool = False,
                     apply: bool = True) -> MaskResult:
    """Score with ``scorer`` and zero the lowest ``int(total * pct)`` weights in place (global budget, or each
    layer's share: uniform; or N of every M with an N:M ``pattern``). Reports the scorer's diagnostics and
    how much of the mask magnitude pruning at the same budget shares."""
    context = ScoringContext(candidates, arrays, config, seed)
    chosen = _score_based(scorer, "this budget")
    diagnostics = chosen.diagnostics(context)
    result = prune_lowest(candidates, chosen.build(context), pct, strategy, rho_min, rho_max,
                          reference_fn=get_scorer(REFERENCE_SCORER).build(context), pattern=pattern,
                          keep_masks=keep_masks, apply=apply, cache_bytes=score_cache_bytes())
    diagnostics["mask_agreement_with_magnitude"] = result.reference_overlap / result.masked if result.masked else None
    result.diagnostics = diagnostics
    return result


def _score_based(scorer: str, what: str) -> Scorer:
    chosen = get_scorer(scorer)
    if chosen.needs_activations:
        raise InputError(f"{scorer} prunes layer by layer from calibration data; {what} needs a score-based scorer")
    return chosen


@dataclasses.dataclass
class Calibration:
    """Calibration texts by side ("domain", "general") and how they are used."""

    texts: dict[str, list[str]]
    general_share: float  # of the blended statistics (cross-calibration)
    batch_size: int = 8
    max_length: int | None = None  # tokens per text while calibrating (None: the model's)
    token_weighting: str = UNIFORM_WEIGHTING  # or "loss_gradient" (calibration.loss_gradient_weights)
    token_weights: TokenWeights | None = None  # loss_gradient: measured already on this model (measure_token_weights)
    measured_with: tuple | None = None  # the texts, batch size and max length the token weights were measured with

    def measuring_settings(self) -> tuple:
        """What the loss-gradient weights depend on besides the model: the texts and how they are batched and cut."""
        return self.texts, self.batch_size, self.max_length


@contextmanager
def calibration_length(embedder: Embedder, calibration: Calibration | None) -> Iterator[None]:
    """The embedder truncating texts to the calibration's ``max_length`` (where that is shorter) inside; with no
    calibration, as it is."""
    maximum = embedder.max_length
    if calibration is not None and calibration.max_length:
        embedder.max_length = min(maximum, calibration.max_length)
    try:
        yield
    finally:
        embedder.max_length = maximum


def measure_token_weights(embedder: Embedder, candidates: Mapping[str, torch.Tensor],
                          calibration: Calibration) -> Calibration:
    """``calibration`` with its loss-gradient token weights measured now, on the model as it is (after logging the
    memory plan with SparseGPT's statistics): several prunings of the same dense model (compare.py) then share
    one measurement. Uniform weighting needs none."""
    if calibration.token_weighting == UNIFORM_WEIGHTING:
        return calibration
    with calibration_length(embedder, calibration):
        _logged_plan(embedder, candidates, calibration, hessian=True)
        weights = loss_gradient_weights(embedder, calibration.texts, list(candidates), calibration.batch_size)
    return dataclasses.replace(calibration, token_weights=weights, measured_with=calibration.measuring_settings())


def _logged_plan(embedder: Embedder, candidates: Mapping[str, torch.Tensor], calibration: Calibration,
                 hessian: bool, dense_targets: bool = False) -> CalibrationPlan:
    """The calibration's memory plan, logged in one line (with a warning when it would not fit); without the
    loss-gradient graph when the token weights were measured before."""
    weighted = calibration.token_weighting != UNIFORM_WEIGHTING
    plan = plan_calibration(embedder, layer_widths(embedder.model, list(candidates)), calibration.texts,
                            calibration.batch_size, hessian, weighted, current_world().size,
                            gpu_capacity(embedder.device), dense_targets)
    if weighted and calibration.token_weights is not None:
        plan.graph = 0
    log.info("%s", plan.line())
    warn_if_too_large(plan)
    return plan


def load_calibration(spec: CalibrationSpec) -> Calibration:
    """The calibration texts ``spec`` names, read now."""
    texts = {side: triple_texts(load_triples(source, spec.samples)) if isinstance(source, str) else list(source)
             for side, source in spec.files().items()}
    return Calibration(texts, spec.general_share, spec.batch_size, spec.max_length, spec.weighting)


def prune_calibrated(embedder: Embedder, candidates: Mapping[str, torch.Tensor], spec: PruneSpec,
                     calibration: Calibration, arrays: ArrayFn | None = None) -> MaskResult:
    """Prune with an activation-aware scorer (Wanda, SparseGPT) layer by layer on ``calibration``, or with
    any scorer's mask followed (``spec.reconstruct``) by the OBS update of the kept weights under that mask and
    the calibration Hessian. The count per layer follows the scorer's own budget (Wanda: each row,
    SparseGPT: each block of columns; N:M patterns: each group), at the spec's share of every layer or at the
    shares ``spec.layer_shares`` (a score-based scorer) gives the layers; a score-based mask keeps its budget.
    ``spec.group_order``: the order in which SparseGPT prunes the groups of an N:M pattern (gaprune.pruners).
    ``spec.reconstruction_target``: what the updated weights reproduce, each layer's own outputs on the pruned
    model's inputs or the dense model's outputs (``dense``: the dense model runs beside the pruned one)."""
    chosen, pattern, pct = spec.chosen, spec.parsed_pattern, spec.share
    token_weights = _checked_token_weights(calibration, candidates)
    fixed: MaskResult | None = None
    if not chosen.needs_activations:  # the scorer's mask over all candidates; applied layer by layer below
        fixed = prune_candidates(candidates, arrays, spec.scorer, spec.config, pct, spec.strategy, spec.rho_min,
                                 spec.rho_max, spec.seed, pattern, keep_masks=True, apply=False)
        shares = {}
    else:
        shares = shares_of_layers(candidates, spec.layer_shares, arrays, spec.config, pct, spec.seed)
    per_param: dict[str, dict] = {}
    zeroed = [0]

    def prune_layers(inputs: dict[str, LayerInputs]) -> None:
        for name, layer_inputs in inputs.items():
            weight = candidates[name]
            if fixed is not None:  # the weight is still dense: its layer comes up for the first time
                start, mask = weight, fixed.masks.pop(name).to(weight.device)
            else:
                start, mask = _layer_mask(spec, name, weight, layer_inputs, shares[name], arrays)
            if spec.reconstruct:
                hessian = layer_inputs.hessian
                start, _ = sparsegpt(layer_inputs.start_weight(start, hessian), hessian, mask=mask)
            zeroed[0] += int(torch.count_nonzero(weight[mask]))
            weight.copy_(start.to(weight.dtype).masked_fill(mask, 0))
            masked = int(torch.count_nonzero(mask))
            per_param[name] = {"numel": weight.numel(), "masked": masked, "ratio": masked / weight.numel()}

    _calibrate(embedder, candidates, spec, calibration, token_weights, prune_layers)
    options = spec.pruner_options()
    if fixed is not None:  # the scorer's own report: its score statistics and budget
        fixed.masks = None
        fixed.diagnostics.update(options)
        return fixed
    return MaskResult(masked=sum(info["masked"] for info in per_param.values()), newly_zeroed=zeroed[0],
                      per_param=per_param, per_layer_allocations=layer_allocations(per_param), diagnostics=options)


def _checked_token_weights(calibration: Calibration, candidates: Mapping[str, torch.Tensor]) -> TokenWeights | None:
    """The loss-gradient weights measured before (None: uniform, or not measured yet), refused when they were
    measured for other texts, batches or layers."""
    if calibration.token_weighting not in TOKEN_WEIGHTINGS:
        raise ValueError(f"unknown token weighting {calibration.token_weighting!r}")
    token_weights = calibration.token_weights if calibration.token_weighting != UNIFORM_WEIGHTING else None
    if token_weights is not None and (calibration.measured_with != calibration.measuring_settings() or
                                      any(set(side) != set(candidates) for side in token_weights.values())):
        raise ValueError("the calibration's token weights were measured for other texts, batches or layers")
    return token_weights


def _layer_mask(spec: PruneSpec, name: str, weight: torch.Tensor, layer_inputs: LayerInputs, share: float,
                arrays: ArrayFn | None) -> tuple[torch.Tensor, torch.Tensor]:
    """An activation-aware pruner's (start weight, mask) for one layer: SparseGPT's own, or Wanda's score
    compared within each row (or each N:M group)."""
    chosen, pattern = spec.chosen, spec.parsed_pattern
    if chosen.layer_pruner is not None:
        return chosen.layer_pruner(weight, layer_inputs, share, pattern, spec.group_order)
    score = chosen.build(ScoringContext({name: weight}, arrays, spec.config, spec.seed, {name: layer_inputs}))
    score = checked_scores(score)(name, weight).view(weight.shape)
    return weight, (lowest_in_groups(score, pattern.n, pattern.m) if pattern.structured
                    else lowest_in_rows(score, share))


MIN_CALIBRATION_TOKENS = 4  # fewer per text on average, and a layer's statistics are mostly special tokens


def _warn_if_short(embedder: Embedder, calibration: Calibration) -> None:
    """A warning when the calibration texts, cut to the calibration length, average under 4 tokens."""
    texts = [text for side in calibration.texts.values() for text in side]
    if not texts:
        return
    ids = embedder.tokenizer(texts, truncation=True, max_length=embedder.max_length)["input_ids"]
    mean = sum(map(len, ids)) / len(ids)
    if mean < MIN_CALIBRATION_TOKENS and current_world().is_main:
        log.warning("the calibration texts average %.1f tokens (special tokens included, at most %d each): "
                    "each layer's statistics come from little more than the special tokens", mean, embedder.max_length)


def _calibrate(embedder: Embedder, candidates: Mapping[str, torch.Tensor], spec: PruneSpec,
               calibration: Calibration, token_weights: TokenWeights | None, prune_layers) -> None:
    """Run the calibration block by block, ``prune_layers`` taking each block's layer inputs, with the memory
    plan logged before and the peak after (CUDA)."""
    hessian = spec.reconstruct or spec.chosen.layer_pruner is not None
    dense_targets = spec.reconstruction_target != OWN_TARGET
    weighted = calibration.token_weighting != UNIFORM_WEIGHTING
    with calibration_length(embedder, calibration):
        _warn_if_short(embedder, calibration)
        plan = _logged_plan(embedder, candidates, calibration, hessian, dense_targets)
        if embedder.device.type == "cuda":  # the peak of calibration, from the model up
            torch.cuda.reset_peak_memory_stats(embedder.device)
        if weighted and token_weights is None:
            token_weights = loss_gradient_weights(embedder, calibration.texts, list(candidates),
                                                  calibration.batch_size)
        prune_block_by_block(embedder, candidates, calibration.texts, prune_layers, calibration.general_share,
                             hessian=hessian, batch_size=calibration.batch_size, token_weights=token_weights,
                             dense_targets=dense_targets)
        if embedder.device.type == "cuda":  # (resident memory on a CPU also holds the runtime, which it leaves out)
            log.info("%s", measured_line(plan, embedder.device))


def option_words(entries: Mapping[str, object]) -> list[str]:
    """The pruner options among ``entries``, each as its value and the option's last word ("aligned_saliency
    shares", "hessian order", "loss_gradient weighting"): how folder names and report rows name them."""
    return [f"{entries[key]} {key.rpartition('_')[2]}" for key in PRUNER_OPTIONS if key in entries]


def shares_of_layers(candidates: Mapping[str, torch.Tensor], layer_shares: str, arrays: ArrayFn | None,
                     config: DAIConfig, pct: float, seed: int = 42) -> dict[str, float]:
    """The share of each candidate tensor an activation-aware pruner takes: ``pct`` everywhere (uniform), or
    the share of the tensor among the lowest ``int(total * pct)`` weights of all candidates as ranked by the
    score-based scorer ``layer_shares``. That scorer decides how much each layer loses, the pruner which
    weights."""
    if layer_shares == UNIFORM_SHARES:
        return {name: pct for name in candidates}
    ranked = prune_candidates(candidates, arrays, layer_shares, config, pct, "global", seed=seed, apply=False)
    return {name: info["ratio"] for name, info in ranked.per_param.items()}


def scored_tensors(model: torch.nn.Module, spec: PruneSpec) -> dict[str, torch.Tensor]:
    """The tensors a request scores, and its score files must cover: every matrix of the transformer blocks
    (whole layers, budgets), the tensors that carry its channels or heads, or its candidate weights."""
    if spec.structure == LAYERS or spec.budgeted:
        return {name: p for weights in block_weights(model).values() for name, p in weights.items()}
    if spec.structure != UNSTRUCTURED:
        return structure_candidates(model, unit_plan(model, spec.structure))
    return select_parameters(model.named_parameters(), spec.layer_types)


def structure_candidates(model: torch.nn.Module, plan: UnitPlan) -> dict[str, torch.Tensor]:
    """The scored tensors of a unit plan: every weight matrix that carries a unit."""
    named = dict(model.named_parameters())
    return {name: named[name] for layer in plan.layers for name in layer.slices if named[name].dim() >= 2}


@dataclasses.dataclass
class StructureResult:
    structure: str
    removed: dict[str, list[int]]  # layer -> indices of the removed units (in the dense model)
    units_before: int  # per layer
    units_after: int
    params_before: int  # in the whole model
    params_after: int
    unit_score_stats: dict[str, dict]  # layer -> min/max/mean of its unit scores and the highest removed
    diagnostics: dict = dataclasses.field(default_factory=dict)


def prune_structure(model: torch.nn.Module, plan: UnitPlan, arrays: ArrayFn, scorer: str, config: DAIConfig,
                    share: float, seed: int = 42) -> StructureResult:
    """Score every unit with ``scorer`` (its weights' scores summed), remove the lowest ``share`` of the units of
    every layer (the same count in each) and shrink the model in place. Reports how many of the removed units
    magnitude scores would also remove."""
    chosen = _score_based(scorer, f"--structure {plan.structure}")
    count = units_to_remove(plan, share)
    candidates = structure_candidates(model, plan)
    context = ScoringContext(candidates, arrays, config, seed)
    diagnostics = chosen.diagnostics(context)
    score_fn = checked_scores(chosen.build(context))
    reference_fn = checked_scores(get_scorer(REFERENCE_SCORER).build(context))
    removed, stats, overlap = {}, {}, 0
    for layer in plan.layers:
        scores = unit_scores(candidates, layer, score_fn)
        removed[layer.layer] = lowest_units(scores, count, plan.groups)
        reference = lowest_units(unit_scores(candidates, layer, reference_fn), count, plan.groups)
        overlap += len(set(removed[layer.layer].tolist()) & set(reference.tolist()))
        stats[layer.layer] = {"min": scores.min().item(), "max": scores.max().item(), "mean": scores.mean().item(),
                              "highest_removed": scores[removed[layer.layer]].max().item()}
    params_before = sum(p.numel() for p in model.parameters())
    remove_units(model, plan, removed)
    diagnostics["mask_agreement_with_magnitude"] = overlap / (count * len(plan.layers))
    return StructureResult(plan.structure, {layer: indices.tolist() for layer, indices in removed.items()},
                           plan.units, plan.units - count, params_before, sum(p.numel() for p in model.parameters()),
                           stats, diagnostics)


def _block_context(embedder: Embedder, spec: PruneSpec, calibration: Calibration | None,
                   arrays: ArrayFn | None) -> BlockContext:
    """What the block scorers measure on: the calibration texts (none for weight-score sums) and score files."""
    if calibration is None:
        if spec.block_scorer in BLOCK_MEASURES and spec.structure == LAYERS:
            raise InputError(f"{spec.block_scorer} measures the blocks on calibration texts: give --calibration_data")
        return BlockContext(embedder, {}, 0.0, arrays=arrays, config=spec.config, seed=spec.seed)
    return BlockContext(embedder, calibration.texts, calibration.general_share, calibration.batch_size, arrays,
                        spec.config, spec.seed)


def prune_depth(embedder: Embedder, spec: PruneSpec, arrays: ArrayFn | None,
                calibration: Calibration | None) -> DepthResult:
    """Remove, in place, the whole transformer blocks ``spec.block_scorer`` ranks lowest (the share or count the
    spec asks for); the model and its config lose them."""
    model = embedder.model
    blocks_before = len(transformer_blocks(model))
    context = _block_context(embedder, spec, calibration, arrays)
    with calibration_length(embedder, calibration):
        removed, scores = lowest_blocks(get_block_scorer(spec.block_scorer), context,
                                        spec.blocks_to_remove(blocks_before))
    params_before = sum(p.numel() for p in model.parameters())
    remove_blocks(model, removed)
    return DepthResult(spec.block_scorer, removed, blocks_before, scores, params_before,
                       sum(p.numel() for p in model.parameters()))


@dataclasses.dataclass
class BudgetResult:
    plan: Plan
    shape: Shape
    removed_channels: dict[int, list[int]]  # kept block (dense index) -> its removed channels
    params_before: int
    params_after: int
    removed_heads: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # kept block -> removed heads


def prune_to_budget(embedder: Embedder, spec: PruneSpec, arrays: ArrayFn | None,
                    calibration: Calibration | None = None) -> BudgetResult:
    """Remove, in place, the mix of whole layers and MLP channels that meets the spec's budget with the least
    of ``spec.scorer``'s importance removed (gaprune.budget): every block's and every channel's scores in one
    scoring context, the channels first (the score files name the dense model's layers), then the layers. With
    calibration texts the layers go in the order ``spec.block_scorer`` measures on them."""
    model = embedder.model
    by_block = block_weights(model)
    named = {name: p for weights in by_block.values() for name, p in weights.items()}
    score_fn = checked_scores(_score_based(spec.scorer, "a budget").build(
        ScoringContext(named, arrays or (lambda side, name: None), spec.config, spec.seed)))
    block_importance = weight_score_sums(score_fn, by_block)
    family = family_of_names(named)
    channels = _units_in_block_order(model, "channels", named, score_fn)
    heads = _units_in_block_order(model, "heads", named, score_fn) if "heads" in family.units else None
    shape = Shape.of(model.config, family.gated_mlp)
    order = None
    if calibration is not None:
        with calibration_length(embedder, calibration):
            order, _ = removal_order(get_block_scorer(spec.block_scorer),
                                     _block_context(embedder, spec, calibration, arrays), shape.blocks - 1)
    head_importance = None if heads is None else [_lowest_per_group(scores, heads[0].groups) for scores in heads[2]]
    plan = choose(plan_grid(shape, block_importance, [scores.sort().values for scores in channels[2]],
                            spec.sequence_length, order, head_importance), spec.target_speedup, spec.target_params)
    params_before = sum(p.numel() for p in model.parameters())
    removed = {"channels": _remove_lowest(model, channels, plan.channels_removed, plan.blocks_removed)}
    if heads is not None:
        removed["heads"] = _remove_lowest(model, heads, plan.heads_removed, plan.blocks_removed)
    if plan.blocks_removed:
        remove_blocks(model, plan.blocks_removed)
    return BudgetResult(plan, shape, removed["channels"], params_before, sum(p.numel() for p in model.parameters()),
                        removed.get("heads", {}))


def _units_in_block_order(model: torch.nn.Module, structure: str, named: Mapping[str, torch.Tensor],
                          score_fn) -> tuple[UnitPlan, list, list[torch.Tensor]]:
    """The model's units of ``structure``, its layers in block order, and each layer's unit scores."""
    units = unit_plan(model, structure)
    layers = sorted(units.layers, key=lambda layer: int(layer.layer.rsplit(".", 1)[1]))
    return units, layers, [unit_scores(named, layer, score_fn) for layer in layers]


def _lowest_per_group(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """[0, the importance of the lowest unit of every group, of the 2 lowest of every group, ...]."""
    per_group = scores.view(groups, -1).sort(dim=1).values.double().cumsum(1).sum(0)
    return torch.cat([torch.zeros(1, dtype=torch.float64), per_group])


def _remove_lowest(model: torch.nn.Module, units: tuple[UnitPlan, list, list[torch.Tensor]], count: int,
                   blocks_removed: Sequence[int]) -> dict[int, list[int]]:
    """Remove the ``count`` lowest-scored units of every layer (the same from each group); the removed units of
    the blocks that stay, by block index."""
    plan, layers, scores = units
    if not count:
        return {}
    lowest = {layer.layer: lowest_units(s, count, plan.groups) for layer, s in zip(layers, scores)}
    remove_units(model, plan, lowest)
    return {index: lowest[layer.layer].tolist() for index, layer in enumerate(layers) if index not in blocks_removed}


def budget_records(model_path: str, batch_size: int, spec: PruneSpec, scores: ScoreFiles, result: BudgetResult,
                   measured: dict | None = None) -> dict[str, dict]:
    """evaluation_config.json and structured_prune_stats.json of a folder pruned to a budget."""
    plan, shape = result.plan, result.shape
    kept_blocks = shape.blocks - len(plan.blocks_removed)
    record = {"structure": "budget", "scoring": spec.scorer, "target_speedup": spec.target_speedup,
              "target_params": spec.target_params, "sequence_length": spec.sequence_length,
              "layers_removed": len(plan.blocks_removed), "removed_layers": plan.blocks_removed,
              "channels_removed_per_layer": plan.channels_removed, "heads_removed_per_layer": plan.heads_removed,
              "predicted_speedup": plan.speedup,
              "params_kept": plan.params_kept, **(measured or {}), **dataclasses.asdict(spec.config)}
    size = {"params_before": result.params_before, "params_after": result.params_after,
            BLOCK_CONFIG_FIELD: {"before": shape.blocks, "after": kept_blocks},
            "intermediate_size": {"before": shape.intermediate, "after": shape.intermediate - plan.channels_removed},
            "num_attention_heads": {"before": shape.heads, "after": shape.heads - plan.heads_removed}}
    stats = {**record, "removed_importance": plan.removed_importance, "removed_channels": result.removed_channels,
             "removed_heads": result.removed_heads,
             "params_before": result.params_before, "params_after": result.params_after}
    config = {"model_path": model_path, "batch_size": batch_size, "structure": "budget", "sparsify_layers": ["all"],
              "pruning_method": f"budget_{spec.scorer}",
              "meta": {"structured_pruning": record, "score_files": _score_file_entries(scores), "size": size}}
    return {"evaluation_config.json": config, "structured_prune_stats.json": stats}


def depth_stats(result: DepthResult, spec: PruneSpec) -> dict:
    """structured_prune_stats.json of a folder whose layers were removed."""
    return {
        "structure": LAYERS,
        "scoring": result.scorer,
        "share_requested": spec.sparsity if spec.block_count is None else None,
        "layers_requested": spec.block_count,
        "config_field": BLOCK_CONFIG_FIELD,
        "layers_before": result.blocks_before,
        "layers_after": result.blocks_before - len(result.removed),
        "removed_layers": result.removed,
        "layer_scores": result.block_scores,
        "params_before": result.params_before,
        "params_after": result.params_after,
    }


def depth_evaluation_config(model_path: str, batch_size: int, spec: PruneSpec, scores: ScoreFiles,
                            result: DepthResult, calibration: Calibration | None) -> dict:
    """evaluation_config.json of a folder whose layers were removed."""
    record = {"structure": LAYERS, "share": spec.sparsity if spec.block_count is None else None,
              "layers_removed": len(result.removed), "removed_layers": result.removed, "scoring": result.scorer,
              **dataclasses.asdict(spec.config)}
    if calibration is not None:
        record.update(_calibration_record(spec, calibration))
    return {
        "model_path": model_path,
        "batch_size": batch_size,
        "structure": LAYERS,
        "sparsify_layers": ["all"],
        "pruning_method": f"layers_{result.scorer}",
        "meta": {
            "structured_pruning": record,
            "score_files": _score_file_entries(scores),
            "size": {"params_before": result.params_before, "params_after": result.params_after,
                     BLOCK_CONFIG_FIELD: {"before": result.blocks_before,
                                          "after": result.blocks_before - len(result.removed)}},
        },
    }


def structure_stats(result: StructureResult, scorer: str, share: float) -> dict:
    """structured_prune_stats.json: what was removed, layer by layer, and the size before and after."""
    return {
        "structure": result.structure,
        "scoring": scorer,
        "share_requested": share,
        "config_field": CONFIG_FIELDS[result.structure],
        "units_per_layer_before": result.units_before,
        "units_per_layer_after": result.units_after,
        "removed_per_layer": result.units_before - result.units_after,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "diagnostics": result.diagnostics,
        "per_layer": {layer: {"removed": indices, "unit_scores": result.unit_score_stats[layer]}
                      for layer, indices in result.removed.items()},
    }


def prune_stats(result: MaskResult, spec: PruneSpec) -> dict:
    """unstructured_prune_stats.json: the mask per parameter and per layer, and its validation counts."""
    per_param = result.per_param
    considered = sum(p["numel"] for p in per_param.values())
    mixed = sum(0 < p["masked"] < p["numel"] for p in per_param.values())
    return {
        "method": spec.scorer,
        "unstructured_pct_requested": spec.share,
        "scoring": spec.scorer,
        "sparsify_layers": list(spec.layer_types),
        "layer_budget_strategy": budget_of(spec),
        "total_params_considered": considered,
        "masked_params": result.masked,
        "actual_mask_ratio": result.masked / considered,
        "diagnostics": result.diagnostics,
        "per_param": per_param,
        "per_layer_allocations": result.per_layer_allocations,
        "validation": {
            "parameters_with_mixed_pruning": mixed,
            "parameters_all_pruned": sum(p["masked"] == p["numel"] for p in per_param.values()),
            "parameters_none_pruned": sum(p["masked"] == 0 for p in per_param.values()),
            "mixed_pruning_percentage": 100.0 * mixed / len(per_param),
        },
    }


def budget_of(spec: PruneSpec) -> str:
    """Where a mask's share is taken, as the records name it: the N:M pattern, the pruner's own (row, block),
    or the score-based strategy (global, uniform)."""
    return spec.pattern if spec.parsed_pattern.structured else spec.chosen.budget or spec.strategy


@dataclasses.dataclass
class ModelZeros:
    total: int  # parameters in the model
    before: int  # zeros before pruning
    after: int  # zeros after pruning

    @classmethod
    def counted(cls, model: torch.nn.Module, before: int) -> ModelZeros:
        """The zeros of ``model`` now, against ``before``."""
        return cls(total=sum(p.numel() for p in model.parameters()), before=before,
                   after=count_zeros(model))


def evaluation_config(model_path: str, batch_size: int, spec: PruneSpec, scores: ScoreFiles, result: MaskResult,
                      zeros: ModelZeros, calibration: Calibration | None = None) -> dict:
    """evaluation_config.json: the settings, the score files and the mask accounting of a pruned folder (the
    pattern, reconstruction and calibration recorded only when used)."""
    return {
        "model_path": model_path,
        "batch_size": batch_size,
        "sparsify_layers": list(spec.layer_types),
        "pruning_method": f"unstructured_{spec.scorer}",
        "meta": {
            "unstructured_pruning": {
                "unstructured_pct": spec.share, "unstructured_scoring": spec.scorer,
                "layer_budget_strategy": budget_of(spec), "rho_min": spec.rho_min, "rho_max": spec.rho_max,
                **dataclasses.asdict(spec.config), **_calibration_record(spec, calibration)},
            "score_files": _score_file_entries(scores),
            "mask_accounting": {
                "total_params_before": zeros.total,
                "total_params_after": zeros.total - zeros.after,
                "masked_params": result.masked,
                "masked_ratio": result.masked / zeros.total,
                "zero_params_counted": zeros.after,
                "unstructured_masked_params_reported": result.masked,
                "zero_params_before": zeros.before,
                "newly_zeroed_params": result.newly_zeroed},
        },
    }


def _calibration_record(spec: PruneSpec, calibration: Calibration | None) -> dict:
    """What evaluation_config.json adds when a pattern, reconstruction or calibration texts were used."""
    record = {}
    if spec.parsed_pattern.structured:
        record["sparsity_pattern"] = spec.pattern
    if spec.reconstruct:
        record["reconstruct"] = True
    record.update(spec.pruner_options())
    if calibration is not None:
        files = spec.calibration
        record["calibration"] = {"domain_data": calibration_source(files.domain_data),
                                 "general_data": calibration_source(files.general_data),
                                 "texts": {side: len(texts) for side, texts in calibration.texts.items()},
                                 "general_share": calibration.general_share, "max_length": calibration.max_length}
    return record


def structure_evaluation_config(model_path: str, batch_size: int, spec: PruneSpec, scores: ScoreFiles,
                                result: StructureResult) -> dict:
    """evaluation_config.json of a folder whose channels or heads were removed."""
    field = CONFIG_FIELDS[result.structure]
    return {
        "model_path": model_path,
        "batch_size": batch_size,
        "structure": result.structure,
        "sparsify_layers": UNIT_LAYER_TYPES[result.structure],
        "pruning_method": f"{result.structure}_{spec.scorer}",
        "meta": {
            "structured_pruning": {"structure": result.structure, "share": spec.sparsity, "scoring": spec.scorer,
                                   **dataclasses.asdict(spec.config)},
            "score_files": _score_file_entries(scores),
            "size": {"params_before": result.params_before, "params_after": result.params_after,
                     field: {"before": result.units_before, "after": result.units_after}},
        },
    }


def _score_file_entries(scores: ScoreFiles) -> dict[str, str | None]:
    paths = scores.paths()
    return {f"{side}_scores": paths.get(side) for side in ("general_fisher", "domain_fisher", "alignment")}


def folder_records(model_path: str, batch_size: int, spec: PruneSpec, scores: ScoreFiles, result,
                   zeros: ModelZeros | None, calibration: Calibration | None) -> dict[str, dict]:
    """A pruned folder's records, by file name: evaluation_config.json and the stats of what was removed."""
    if spec.structure == UNSTRUCTURED:
        return {"evaluation_config.json": evaluation_config(model_path, batch_size, spec, scores, result, zeros,
                                                            calibration),
                "unstructured_prune_stats.json": prune_stats(result, spec)}
    if spec.structure == LAYERS:
        return {"evaluation_config.json": depth_evaluation_config(model_path, batch_size, spec, scores, result,
                                                                  calibration),
                "structured_prune_stats.json": depth_stats(result, spec)}
    return {"evaluation_config.json": structure_evaluation_config(model_path, batch_size, spec, scores, result),
            "structured_prune_stats.json": structure_stats(result, spec.scorer, spec.sparsity)}


def pruned_folder(output_dir: str, model_path: str, spec: PruneSpec) -> str:
    """Where SparseModel.py (and compare.py --select) writes the model ``spec`` makes of ``model_path``."""
    if spec.budgeted:
        budget = "_".join(part for part in (f"{spec.target_speedup:g}x" if spec.target_speedup else "",
                                            f"params{round(spec.target_params * 100, 2):g}%" if spec.target_params
                                            else "") if part)
        return output_folder(output_dir, model_path, f"{spec.scorer}_budget_{budget}")
    if spec.structure == LAYERS:
        amount = (f"minus{spec.block_count}" if spec.block_count is not None
                  else f"{round(spec.sparsity * 100, 2):g}%")
        return output_folder(output_dir, model_path, f"{spec.block_scorer}_layers_{amount}")
    if spec.structure != UNSTRUCTURED:
        return output_folder(output_dir, model_path,
                             f"{spec.scorer}_{spec.structure}_{round(spec.sparsity * 100, 2):g}%")
    amount = (spec.pattern.replace(":", "of") if spec.parsed_pattern.structured
              else f"{round(spec.sparsity * 100, 2):g}%")
    suffix = "_reconstructed" if spec.reconstruct else ""
    suffix += "".join("_" + words.replace(" ", "_")  # _aligned_saliency_shares, _hessian_order
                      for words in option_words(spec.pruner_options()))
    return output_folder(output_dir, model_path, f"{spec.scorer}_prune_{amount}{suffix}")
