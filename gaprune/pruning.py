"""Pruning a model's candidate weights with a registered scorer, and the reports a pruned folder carries."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import torch

from gaprune.masking import MaskResult, prune_lowest
from gaprune.scorers import REFERENCE_SCORER, ScoringContext, get_scorer
from gaprune.scoring import ArrayFn, DAIConfig


def prune_candidates(candidates: Mapping[str, torch.Tensor], arrays: ArrayFn, scorer: str, config: DAIConfig,
                     pct: float, strategy: str = "global", rho_min: float = 0.05, rho_max: float = 0.95,
                     seed: int = 42) -> MaskResult:
    """Score with ``scorer`` and zero the lowest ``int(total * pct)`` weights in place (global budget, or each
    layer's share: uniform). Reports the scorer's diagnostics and how much of the mask magnitude pruning
    at the same budget shares."""
    context = ScoringContext(candidates, arrays, config, seed)
    chosen = get_scorer(scorer)
    diagnostics = chosen.diagnostics(context)
    result = prune_lowest(candidates, chosen.build(context), pct, strategy, rho_min, rho_max,
                          reference_fn=get_scorer(REFERENCE_SCORER).build(context))
    diagnostics["mask_agreement_with_magnitude"] = result.reference_overlap / result.masked if result.masked else None
    result.diagnostics = diagnostics
    return result


def prune_stats(result: MaskResult, scorer: str, pct: float, layer_types: Sequence[str], strategy: str) -> dict:
    """unstructured_prune_stats.json: the mask per parameter and per layer, and its validation counts."""
    per_param = result.per_param
    considered = sum(p["numel"] for p in per_param.values())
    mixed = sum(0 < p["masked"] < p["numel"] for p in per_param.values())
    return {
        "method": scorer,
        "unstructured_pct_requested": pct,
        "scoring": scorer,
        "sparsify_layers": list(layer_types),
        "layer_budget_strategy": strategy,
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


@dataclasses.dataclass
class ModelZeros:
    total: int  # parameters in the model
    before: int  # zeros before pruning
    after: int  # zeros after pruning


def evaluation_config(model_path: str, batch_size: int, layer_types: Sequence[str], scorer: str, pct: float,
                      strategy: str, rho_min: float, rho_max: float, config: DAIConfig,
                      score_files: Mapping[str, str | None], result: MaskResult, zeros: ModelZeros) -> dict:
    """evaluation_config.json: the settings, the score files and the mask accounting of a pruned folder."""
    return {
        "model_path": model_path,
        "batch_size": batch_size,
        "sparsify_layers": list(layer_types),
        "pruning_method": f"unstructured_{scorer}",
        "meta": {
            "unstructured_pruning": {
                "unstructured_pct": pct, "unstructured_scoring": scorer, "layer_budget_strategy": strategy,
                "rho_min": rho_min, "rho_max": rho_max, **dataclasses.asdict(config)},
            "score_files": {f"{side}_scores": score_files.get(side)
                            for side in ("general_fisher", "domain_fisher", "alignment")},
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
