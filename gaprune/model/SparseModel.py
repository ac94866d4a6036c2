"""Stage 4: DAI scores from the Fisher and alignment files, a mask of the lowest ones, and the pruned model."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import torch

from gaprune.cli import (ArgumentParser, add_layer_args, add_runtime_args, add_scoring_args, check_scorer_inputs,
                         run, scoring_config)
from gaprune.dai import SCORERS, MaskResult, prune_candidates
from gaprune.errors import InputError
from gaprune.layers import LAYER_PATTERNS, LAYER_TYPES, detect_family, name_matches, select_parameters
from gaprune.modeling import checkpoint_shapes, embed_normalized, load_embedder, resolve_model_dir, save_model
from gaprune.scorefiles import atomic_dir, open_score_files, write_json

log = logging.getLogger("gaprune.sparse")

PROBE_SENTENCE = "What is the capital of France?"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Prune the lowest-DAI weights and save the pruned model.")
    parser.add_argument("--model_path", required=True, help="model folder or hub id")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--general_fisher_scores", help="fisher.py JSON on general data (absent: 1.0 everywhere)")
    parser.add_argument("--domain_fisher_scores", help="fisher.py JSON on domain data (absent: 1.0 everywhere)")
    parser.add_argument("--alignment_scores", help="gradient.py JSON (absent: alignment 0)")
    add_layer_args(parser, ["mlp"])
    parser.add_argument("--unstructured_pct", type=float, default=0.0, help="share of candidate weights to zero, 0..1")
    parser.add_argument("--unstructured_scoring", default="dai", choices=SCORERS,
                        help="dai (default, the published formula); dai_paper, aligned_saliency (Fisher and "
                             "gradient-cosine terms that act, see README); or a baseline: random, magnitude, "
                             "domain_fisher / general_fisher (Fisher saliency F*w^2; needs that side's file)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the random scorer (default: 42)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--show_layer_types", action="store_true", help="print the layer types and exit")
    parser.add_argument("--layer_budget_strategy", default="global", choices=["global", "uniform"])
    parser.add_argument("--rho_min", type=float, default=0.05, help="uniform: least share pruned per layer")
    parser.add_argument("--rho_max", type=float, default=0.95, help="uniform: largest share pruned per layer")
    add_scoring_args(parser)
    add_runtime_args(parser)
    return parser


def validate(args) -> None:
    if not 0.0 <= args.unstructured_pct <= 1.0:
        raise InputError(f"--unstructured_pct must be between 0 and 1, got {args.unstructured_pct}")
    if not 0.0 <= args.rho_min <= args.rho_max <= 1.0:
        raise InputError(f"need 0 <= --rho_min <= --rho_max <= 1, got {args.rho_min} and {args.rho_max}")
    if args.batch_size < 1:
        raise InputError(f"--batch_size must be at least 1, got {args.batch_size}")
    check_scorer_inputs(args.unstructured_scoring, scoring_config(args), args)


def show_layer_types(model_path: str) -> None:
    shapes = checkpoint_shapes(resolve_model_dir(model_path))
    family = detect_family(shapes)
    print(f"Layer types for {model_path} ({family or 'unknown'} naming); candidates need 2+ dimensions:")
    for layer_type in LAYER_TYPES:
        names = [n for n, s in shapes.items() if len(s) >= 2 and name_matches(n, family, [layer_type])]
        weights = sum(int(torch.Size(shapes[n]).numel()) for n in names)
        patterns = ", ".join(LAYER_PATTERNS[family][layer_type]) if family else "-"
        print(f"  {layer_type:<15} {len(names):4d} tensors {weights:14,d} weights   patterns: {patterns}")


def output_folder(args) -> str:
    pct = f"{round(args.unstructured_pct * 100, 2):g}%"
    base = os.path.basename(os.path.normpath(args.model_path))
    return os.path.join(args.output_dir, f"{base}_{args.unstructured_scoring}_prune_{pct}")


def count_zeros(model: torch.nn.Module) -> int:
    return sum(int((p == 0).sum()) for p in model.parameters())


def prune_stats(args, result: MaskResult, considered: int) -> dict:
    per_param = result.per_param
    mixed = sum(0 < p["masked"] < p["numel"] for p in per_param.values())
    return {
        "method": args.unstructured_scoring,
        "unstructured_pct_requested": args.unstructured_pct,
        "scoring": args.unstructured_scoring,
        "sparsify_layers": args.sparsify_layers,
        "layer_budget_strategy": args.layer_budget_strategy,
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


def main(argv: Sequence[str] | None = None) -> str | None:
    args = build_parser().parse_args(argv)
    validate(args)
    if args.show_layer_types:
        show_layer_types(args.model_path)
        return None
    embedder = load_embedder(args.model_path, args.device, args.dtype)
    candidates = select_parameters(embedder.model.named_parameters(), args.sparsify_layers)
    array = open_score_files({"domain_fisher": args.domain_fisher_scores, "general_fisher": args.general_fisher_scores,
                              "alignment": args.alignment_scores},
                             {name: list(p.shape) for name, p in candidates.items()}, embedder.device)
    considered = sum(p.numel() for p in candidates.values())
    log.info("%d candidate tensors (%d weights) in %s; pruning %.1f%% by %s (%s budget)", len(candidates),
             considered, " ".join(args.sparsify_layers), 100 * args.unstructured_pct, args.unstructured_scoring,
             args.layer_budget_strategy)
    config = scoring_config(args)
    zeros_before = count_zeros(embedder.model)
    result = prune_candidates(candidates, array, args.unstructured_scoring, config, args.unstructured_pct,
                              args.layer_budget_strategy, args.rho_min, args.rho_max, args.seed)
    embedding = embed_normalized(embedder, PROBE_SENTENCE)

    folder = output_folder(args)
    with atomic_dir(folder) as tmp:
        save_model(embedder, tmp)
        total = sum(p.numel() for p in embedder.model.parameters())
        zeros_after = count_zeros(embedder.model)
        write_json(os.path.join(tmp, "evaluation_config.json"), {
            "model_path": args.model_path,
            "batch_size": args.batch_size,
            "sparsify_layers": args.sparsify_layers,
            "pruning_method": f"unstructured_{args.unstructured_scoring}",
            "meta": {
                "unstructured_pruning": {
                    "unstructured_pct": args.unstructured_pct, "unstructured_scoring": args.unstructured_scoring,
                    "layer_budget_strategy": args.layer_budget_strategy, "rho_min": args.rho_min,
                    "rho_max": args.rho_max, **dataclasses.asdict(config)},
                "score_files": {"general_fisher_scores": args.general_fisher_scores,
                                "domain_fisher_scores": args.domain_fisher_scores,
                                "alignment_scores": args.alignment_scores},
                "mask_accounting": {
                    "total_params_before": total,
                    "total_params_after": total - zeros_after,
                    "masked_params": result.masked,
                    "masked_ratio": result.masked / total,
                    "zero_params_counted": zeros_after,
                    "unstructured_masked_params_reported": result.masked,
                    "zero_params_before": zeros_before,
                    "newly_zeroed_params": result.newly_zeroed},
            },
        })
        write_json(os.path.join(tmp, "unstructured_prune_stats.json"), prune_stats(args, result, considered))

    print(f"Masked {result.masked:,} of {considered:,} candidate weights ({result.masked / considered:.2%}); "
          f"model zeros {zeros_before:,} -> {zeros_after:,}")
    print(f"Embedding of {PROBE_SENTENCE!r} (dim {embedding.numel()}, L2-normalised): "
          f"[{', '.join(f'{v:.6f}' for v in embedding[:8].tolist())}, ...]")
    print(folder)
    return folder


if __name__ == "__main__":
    run(main)
