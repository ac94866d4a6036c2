"""Stage 4: DAI scores from the Fisher and alignment files, a mask of the lowest ones, and the pruned model.

With --structure channels (or heads) whole MLP channels (query heads) are removed instead: the saved
model is smaller and runs faster in any engine."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

from gaprune import api, distributed
from gaprune.checkpoint import (checkpoint_shapes, count_zeros, describe_probe, output_folder, probe_embedding,
                                save_model)
from gaprune.cli import (ArgumentParser, add_calibration_args, add_layer_args, add_runtime_args, add_scoring_args,
                        calibration_from_args, check_pruner_options, check_pruning_request, check_scorer_inputs,
                        effective_share, finish, finite_float, run, score_file_paths, scoring_config)
from gaprune.errors import InputError
from gaprune.fileio import atomic_dir, check_output_dir, write_json
from gaprune.layers import LAYER_PATTERNS, detect_family, name_matches
from gaprune.options import BUDGET_STRATEGIES, LAYER_TYPES, STRUCTURES, UNIFORM_SHARES
from gaprune.modeling import load_embedder, resolve_model_dir
from gaprune.pruning import (ModelZeros, evaluation_config, option_words, prune_stats, pruner_options,
                             structure_evaluation_config, structure_stats)
from gaprune.scorers import SCORERS, get_scorer
from gaprune.structure import CONFIG_FIELDS

log = logging.getLogger("gaprune.sparse")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Prune the lowest-DAI weights and save the pruned model.")
    parser.add_argument("--model_path", required=True, help="model folder or hub id")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--general_fisher_scores", help="fisher.py JSON on general data (absent: 1.0 everywhere)")
    parser.add_argument("--domain_fisher_scores", help="fisher.py JSON on domain data (absent: 1.0 everywhere)")
    parser.add_argument("--alignment_scores", help="gradient.py JSON (absent: alignment 0)")
    add_layer_args(parser, ["mlp"])
    parser.add_argument("--unstructured_pct", type=finite_float, default=0.0,
                        help="share of candidate weights to zero, 0..1")
    parser.add_argument("--unstructured_scoring", default="dai", choices=list(SCORERS),
                        help="; ".join(f"{s.name}: {s.summary}" for s in SCORERS.values()) + " (see README)")
    parser.add_argument("--structure", default="unstructured", choices=["unstructured", *STRUCTURES],
                        help="unstructured: zero single weights (default); channels: remove whole MLP channels; "
                             "heads: remove query heads (Qwen3). Channels and heads give a smaller model")
    parser.add_argument("--structured_pct", type=finite_float, default=0.0,
                        help="with --structure channels/heads: share of every layer's channels or heads to remove, "
                             "0..1 (the scores of the tensors that carry them are summed per unit)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the random scorer (default: 42)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--show_layer_types", action="store_true", help="print the layer types and exit")
    parser.add_argument("--layer_budget_strategy", default="global", choices=BUDGET_STRATEGIES)
    parser.add_argument("--rho_min", type=finite_float, default=0.05, help="uniform: least share pruned per layer")
    parser.add_argument("--rho_max", type=finite_float, default=0.95, help="uniform: largest share pruned per layer")
    add_scoring_args(parser)
    add_calibration_args(parser)
    add_runtime_args(parser)
    return parser


def validate(args) -> None:
    if not 0.0 <= args.unstructured_pct <= 1.0:
        raise InputError(f"--unstructured_pct must be between 0 and 1, got {args.unstructured_pct}")
    if args.structure == "unstructured" and args.structured_pct:
        raise InputError(f"--structured_pct needs --structure {' or '.join(STRUCTURES)}")
    if args.structure != "unstructured":
        if not 0.0 < args.structured_pct < 1.0:
            raise InputError(f"--structure {args.structure} needs --structured_pct between 0 and 1 (exclusive), "
                             f"got {args.structured_pct}")
        if args.unstructured_pct:
            raise InputError(f"--unstructured_pct cannot be combined with --structure {args.structure}")
    check_pruning_request([args.unstructured_scoring], args.structure,
                          [effective_share(args.unstructured_pct, args.sparsity_pattern)], args.sparsity_pattern,
                          args.reconstruct, args.layer_budget_strategy)
    if not 0.0 <= args.rho_min <= args.rho_max <= 1.0:
        raise InputError(f"need 0 <= --rho_min <= --rho_max <= 1, got {args.rho_min} and {args.rho_max}")
    if args.batch_size < 1:
        raise InputError(f"--batch_size must be at least 1, got {args.batch_size}")
    check_scorer_inputs(args.unstructured_scoring, scoring_config(args), args)
    check_pruner_options([args.unstructured_scoring], args, scoring_config(args))
    if not args.show_layer_types:
        check_output_dir(args.output_dir)
        check_output_dir(pruned_folder(args), "the pruned model's folder")


def pruned_folder(args) -> str:
    if args.structure != "unstructured":
        return output_folder(args.output_dir, args.model_path,
                             f"{args.unstructured_scoring}_{args.structure}_{round(args.structured_pct * 100, 2):g}%")
    amount = (args.sparsity_pattern.replace(":", "of") if args.sparsity_pattern != "unstructured"
              else f"{round(args.unstructured_pct * 100, 2):g}%")
    suffix = "_reconstructed" if args.reconstruct else ""
    suffix += "".join("_" + words.replace(" ", "_")  # _aligned_saliency_shares, _hessian_order
                      for words in option_words(pruner_options(args.layer_shares, args.group_order,
                                                               args.calibration_weighting,
                                                               args.reconstruction_target)))
    return output_folder(args.output_dir, args.model_path, f"{args.unstructured_scoring}_prune_{amount}{suffix}")


def show_layer_types(model_path: str) -> None:
    shapes = checkpoint_shapes(resolve_model_dir(model_path))
    family = detect_family(shapes)
    print(f"Layer types for {model_path} ({family or 'unknown'} naming); candidates need 2+ dimensions:")
    for layer_type in LAYER_TYPES:
        names = [n for n, s in shapes.items() if len(s) >= 2 and name_matches(n, family, [layer_type])]
        weights = sum(int(torch.Size(shapes[n]).numel()) for n in names)
        patterns = ", ".join(LAYER_PATTERNS[family][layer_type]) if family else "-"
        print(f"  {layer_type:<15} {len(names):4d} tensors {weights:14,d} weights   patterns: {patterns}")


def main(argv: Sequence[str] | None = None) -> str | None:
    args = build_parser().parse_args(argv)
    validate(args)
    if args.show_layer_types:
        show_layer_types(args.model_path)
        return None
    calibration = calibration_from_args(args, get_scorer(args.unstructured_scoring).needs_activations
                                        or args.reconstruct)
    world = distributed.init_from_env(args.device)
    embedder = load_embedder(args.model_path, args.device, args.dtype)
    log.info("model %s on %s (%s)", args.model_path, embedder.device, embedder.model.dtype)
    if args.structure == "unstructured":
        folder = mask_weights(args, embedder, calibration, world.is_main)
    else:
        folder = shrink_model(args, embedder, world.is_main)
    return finish(folder) if world.is_main else None


def mask_weights(args, embedder, calibration, writes: bool = True) -> str | None:
    """Under torchrun every rank prunes (the calibration texts shared out among them) and only rank 0
    (``writes``) saves."""
    config = scoring_config(args)
    share = effective_share(args.unstructured_pct, args.sparsity_pattern)
    strategy = (args.sparsity_pattern if args.sparsity_pattern != "unstructured"  # where the share is taken
                else get_scorer(args.unstructured_scoring).budget or args.layer_budget_strategy)
    log.info("pruning %.1f%% of %s by %s (%s budget%s, %s)", 100 * share, " ".join(args.sparsify_layers),
             args.unstructured_scoring, strategy,
             "" if args.layer_shares == UNIFORM_SHARES else f", layer shares by {args.layer_shares}",
             args.sparsity_pattern)
    zeros_before = count_zeros(embedder.model)
    files = score_file_paths(args)
    result = api.prune(embedder, share, args.unstructured_scoring, files["general_fisher"],
                       files["domain_fisher"], files["alignment"], args.sparsify_layers, config,
                       args.layer_budget_strategy, args.rho_min, args.rho_max, args.seed, args.sparsity_pattern,
                       calibration, args.reconstruct, args.layer_shares, args.group_order,
                       args.reconstruction_target)
    considered = sum(p["numel"] for p in result.per_param.values())
    log.info("%d candidate tensors (%d weights) in %s", len(result.per_param), considered,
             " ".join(args.sparsify_layers))
    embedding = probe_embedding(embedder)
    if not writes:
        return None

    folder = pruned_folder(args)
    with atomic_dir(folder) as tmp:
        save_model(embedder, tmp)
        zeros = ModelZeros(total=sum(p.numel() for p in embedder.model.parameters()), before=zeros_before,
                           after=count_zeros(embedder.model))
        write_json(os.path.join(tmp, "evaluation_config.json"), evaluation_config(
            args.model_path, args.batch_size, args.sparsify_layers, args.unstructured_scoring, share,
            strategy, args.rho_min, args.rho_max, config, files, result, zeros, calibration_record(args, calibration)))
        write_json(os.path.join(tmp, "unstructured_prune_stats.json"), prune_stats(
            result, args.unstructured_scoring, share, args.sparsify_layers, strategy))

    print(f"Masked {result.masked:,} of {considered:,} candidate weights ({result.masked / considered:.2%}); "
          f"model zeros {zeros.before:,} -> {zeros.after:,}")
    print(describe_probe(embedding))
    return folder


def calibration_record(args, calibration) -> dict:
    """What evaluation_config.json adds when a pattern, reconstruction or calibration texts were used."""
    record = {}
    if args.sparsity_pattern != "unstructured":
        record["sparsity_pattern"] = args.sparsity_pattern
    if args.reconstruct:
        record["reconstruct"] = True
    record.update(pruner_options(args.layer_shares, args.group_order, args.calibration_weighting,
                                 args.reconstruction_target))
    if calibration is not None:
        record["calibration"] = {"domain_data": args.calibration_data, "general_data": args.general_calibration_data,
                                 "texts": {side: len(texts) for side, texts in calibration.texts.items()},
                                 "general_share": calibration.general_share, "max_length": calibration.max_length}
    return record


def shrink_model(args, embedder, writes: bool = True) -> str | None:
    config = scoring_config(args)
    log.info("removing %.1f%% of every layer's %s by %s", 100 * args.structured_pct, args.structure,
             args.unstructured_scoring)
    files = score_file_paths(args)
    result = api.prune_units(embedder, args.structured_pct, args.structure, args.unstructured_scoring,
                             files["general_fisher"], files["domain_fisher"], files["alignment"], config, args.seed)
    embedding = probe_embedding(embedder)
    if not writes:
        return None

    folder = pruned_folder(args)
    with atomic_dir(folder) as tmp:
        save_model(embedder, tmp)
        write_json(os.path.join(tmp, "evaluation_config.json"), structure_evaluation_config(
            args.model_path, args.batch_size, args.unstructured_scoring, args.structured_pct, config, files, result))
        write_json(os.path.join(tmp, "structured_prune_stats.json"),
                   structure_stats(result, args.unstructured_scoring, args.structured_pct))

    print(f"Removed {result.units_before - result.units_after} of {result.units_before} {args.structure} in each of "
          f"{len(result.removed)} layers ({CONFIG_FIELDS[args.structure]} {result.units_before} -> {result.units_after}); "
          f"parameters {result.params_before:,} -> {result.params_after:,} "
          f"({1 - result.params_after / result.params_before:.1%} fewer)")
    print(describe_probe(embedding))
    return folder


if __name__ == "__main__":
    run(main)
