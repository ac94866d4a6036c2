"""Prune one model with every scorer at each sparsity, evaluate dense and pruned, print the paper-style table.

Under torchrun every rank prunes (rank 0's weights are then given to all, so they cannot drift apart) and
encodes its share of the evaluation texts; rank 0 writes and prints."""

from __future__ import annotations

import dataclasses
import logging
import os
from datetime import datetime
from typing import Sequence

import torch

from gaprune import distributed
from gaprune.cli import (ArgumentParser, add_calibration_args, add_layer_args, add_runtime_args, add_scoring_args,
                        calibration_from_args, check_pruner_options, check_pruning_request, check_scorer_inputs,
                        effective_share, finish, finite_float, positive_int, run, score_file_paths, scoring_config)
from gaprune.data import load_triples
from gaprune.errors import InputError
from gaprune.evaluation import METRICS, evaluate_triples, relative_change
from gaprune.fileio import check_output_dir, model_dirname, timestamp, write_json, write_text
from gaprune.layers import select_parameters
from gaprune.options import BUDGET_STRATEGIES, NATURAL_ORDER, OWN_TARGET, STRUCTURES, UNIFORM_SHARES
from gaprune.modeling import load_embedder
from gaprune.patterns import parse_pattern
from gaprune.pruning import (measure_token_weights, option_words, prune_calibrated, prune_candidates, prune_structure,
                             scorers_used, structure_candidates)
from gaprune.scorefiles import open_score_files
from gaprune.scorers import SCORERS, get_scorer
from gaprune.scoring import DAIConfig
from gaprune.structure import unit_plan, units_to_remove

log = logging.getLogger("gaprune.compare")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Compare pruning scorers on domain and general retrieval.")
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--domain_data_paths", nargs="+", required=True, help="held-out domain triple files")
    parser.add_argument("--general_data_paths", nargs="+", required=True, help="held-out general triple files")
    parser.add_argument("--general_fisher_scores")
    parser.add_argument("--domain_fisher_scores")
    parser.add_argument("--alignment_scores")
    parser.add_argument("--sparsity", type=finite_float, nargs="+", default=[0.5],
                        help="shares of candidate weights to zero (with --structure: of every layer's channels or "
                             "heads to remove)")
    parser.add_argument("--structure", default="unstructured", choices=["unstructured", *STRUCTURES],
                        help="unstructured: zero single weights (default); channels / heads: remove whole MLP "
                             "channels / query heads (each pruned model is loaded afresh)")
    parser.add_argument("--scorers", nargs="+", metavar="SCORER[:KEY=VALUE,...]",
                        help=f"scorers to compare: {', '.join(SCORERS)}; a scorer may override coefficients, "
                             "e.g. aligned_saliency:alignment_weight=0,fisher_norm=tensor (default: all; wanda and "
                             "sparsegpt only with calibration data)")
    add_layer_args(parser, ["mlp"])
    parser.add_argument("--layer_budget_strategy", default="global", choices=BUDGET_STRATEGIES)
    parser.add_argument("--query_instructions", default="auto", choices=["auto", "keep", "strip"])
    parser.add_argument("--max_samples", type=positive_int, help="evaluate the first N triples of each file")
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--seed", type=int, default=42, help="seed of the random scorer")
    parser.add_argument("--output_dir", default="output/compare")
    add_scoring_args(parser)
    add_calibration_args(parser)
    add_runtime_args(parser)
    return parser


def parse_scorer(spec: str, base: DAIConfig) -> tuple[str, DAIConfig]:
    """'aligned_saliency:alignment_weight=0,fisher_norm=tensor' -> ('aligned_saliency', config with those set)."""
    scoring, _, overrides = spec.partition(":")
    if scoring not in SCORERS:
        raise InputError(f"unknown scorer {scoring!r} in {spec!r}; choose from {', '.join(SCORERS)}")
    changes = {}
    for item in filter(None, overrides.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not hasattr(base, key):
            raise InputError(f"bad override {item!r} in {spec!r}; use KEY=VALUE with KEY one of "
                             f"{', '.join(f.name for f in dataclasses.fields(DAIConfig))}")
        try:
            changes[key] = type(getattr(base, key))(value)
        except ValueError:
            raise InputError(f"bad value {value!r} for {key} in {spec!r}") from None
    config = dataclasses.replace(base, **changes)
    try:
        config.check()
    except InputError as err:
        raise InputError(f"{err} in {spec!r}") from None
    return scoring, config


def mean_metrics(results: dict[str, dict]) -> dict[str, float]:
    return {m: sum(r["metrics"][m] for r in results.values()) / len(results) for m in METRICS}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | sparsity | domain nDCG@10 | Δ vs dense | general nDCG@10 | Δ vs dense | mask ∩ magnitude |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        def change(key):
            value = row[f"{key}_change_percent"]
            return "" if value is None else f"{value:+.2f}%"
        agreement = row.get("mask_agreement_with_magnitude")
        lines.append(f"| {row['method']} | {row['sparsity']:.0%} | {row['domain']['ndcg@10']:.4f} | {change('domain')} "
                     f"| {row['general']['ndcg@10']:.4f} | {change('general')} | "
                     f"{'' if agreement is None else f'{agreement:.2%}'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str | None:
    args = build_parser().parse_args(argv)
    world = distributed.init_from_env(args.device)
    for pct in args.sparsity:
        if not 0.0 <= pct <= 1.0:
            raise InputError(f"--sparsity values must be between 0 and 1, got {pct}")
    calibrated = bool(args.calibration_data or args.general_calibration_data)
    specs = args.scorers or [name for name, s in SCORERS.items() if calibrated or not s.needs_activations]
    scorers = [(spec, *parse_scorer(spec, scoring_config(args))) for spec in specs]
    for _, scoring, config in scorers:
        check_scorer_inputs(scoring, config, args)
    check_pruner_options([scoring for _, scoring, _ in scorers], args, scoring_config(args))
    shares = [effective_share(pct, args.sparsity_pattern, "--sparsity") for pct in args.sparsity]
    check_pruning_request([scoring for _, scoring, _ in scorers], args.structure, shares, args.sparsity_pattern,
                          args.reconstruct, args.layer_budget_strategy)
    calibration = calibration_from_args(args, args.reconstruct or any(get_scorer(scoring).needs_activations
                                                                      for _, scoring, _ in scorers))
    check_output_dir(args.output_dir)
    domain = {p: load_triples(p, args.max_samples) for p in args.domain_data_paths}
    general = {p: load_triples(p, args.max_samples) for p in args.general_data_paths}
    embedder = load_embedder(args.model_path, args.device, args.dtype)
    if args.structure == "unstructured":
        candidates = select_parameters(embedder.model.named_parameters(), args.sparsify_layers)
    else:
        plan = unit_plan(embedder.model, args.structure)
        for pct in args.sparsity:
            units_to_remove(plan, pct)  # a share that removes nothing or everything fails before the dense run
        candidates = structure_candidates(embedder.model, plan)
    array = open_score_files(score_file_paths(args), {name: list(p.shape) for name, p in candidates.items()},
                             embedder.device,
                             need_cosine=any(get_scorer(name).reads_cosine(config) for _, scoring, config in scorers
                                             for name in scorers_used(scoring, args.layer_shares)),
                             model_name=args.model_path)
    if args.structure == "unstructured" and calibration is not None:  # every row prunes the same dense model:
        calibration = measure_token_weights(embedder, candidates, calibration)  # one loss-gradient measurement
    dense_weights = ({name: p.detach().to("cpu", copy=True) for name, p in candidates.items()}
                     if args.structure == "unstructured" else {})  # structures load each model afresh

    def evaluate(model) -> tuple[dict, dict]:
        return ({p: evaluate_triples(model, t, args.batch_size, args.query_instructions) for p, t in domain.items()},
                {p: evaluate_triples(model, t, args.batch_size, args.query_instructions) for p, t in general.items()})

    def pruned(scoring: str, config: DAIConfig, pct: float):
        """The model pruned by ``scoring``, and the row entries of what was pruned."""
        if args.structure == "unstructured":
            with torch.no_grad():
                for name, p in candidates.items():
                    p.copy_(dense_weights[name])
            chosen = get_scorer(scoring)
            if chosen.needs_activations or args.reconstruct:  # the flags of Wanda and SparseGPT go to them alone
                result = prune_calibrated(embedder, candidates, scoring, pct, calibration, args.reconstruct,
                                          parse_pattern(args.sparsity_pattern), array, config,
                                          args.layer_budget_strategy, seed=args.seed,
                                          layer_shares=args.layer_shares if chosen.needs_activations else UNIFORM_SHARES,
                                          group_order=args.group_order if chosen.layer_pruner else NATURAL_ORDER,
                                          reconstruction_target=args.reconstruction_target
                                          if chosen.layer_pruner or args.reconstruct else OWN_TARGET)
            else:
                result = prune_candidates(candidates, array, scoring, config, pct, args.layer_budget_strategy,
                                          seed=args.seed, pattern=parse_pattern(args.sparsity_pattern))
            world.broadcast_(p.data for p in candidates.values())
            return embedder, {"masked_params": result.masked, **result.diagnostics}
        fresh = load_embedder(args.model_path, args.device, args.dtype)
        result = prune_structure(fresh.model, unit_plan(fresh.model, args.structure), array, scoring, config, pct,
                                 args.seed)
        world.broadcast_(p.data for p in fresh.model.parameters())  # the same count removed: the same shapes
        return fresh, {"params_after": result.params_after, "units_after": result.units_after, **result.diagnostics}

    dense_domain, dense_general = evaluate(embedder)
    dense = {"method": "dense", "sparsity": 0.0, "domain": mean_metrics(dense_domain),
             "general": mean_metrics(dense_general), "domain_change_percent": None, "general_change_percent": None,
             "files": {**dense_domain, **dense_general}}
    rows = [dense]
    for pct in dict.fromkeys(shares):
        for spec, scoring, config in scorers:
            log.info("pruning %.0f%% by %s", 100 * pct, spec)
            model, entries = pruned(scoring, config, pct)
            by_domain, by_general = evaluate(model)
            if model is not embedder:  # a fresh smaller model: free it before the next one loads
                del model
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            label = "".join(f", {words}" for words in option_words(entries))
            row = {"method": spec + label, "scoring": scoring, "config": dataclasses.asdict(config), "sparsity": pct,
                   "structure": args.structure, "sparsity_pattern": args.sparsity_pattern,
                   "reconstruct": args.reconstruct, "domain": mean_metrics(by_domain), "general": mean_metrics(by_general),
                   "files": {**by_domain, **by_general}, **entries}
            for side in ("domain", "general"):
                row[f"{side}_change_percent"] = relative_change(row[side]["ndcg@10"], dense[side]["ndcg@10"])
            rows.append(row)

    if not world.is_main:
        return None
    table = markdown_table(rows)
    base = os.path.join(args.output_dir, f"compare_{model_dirname(args.model_path)}_{timestamp()}")
    write_json(base + ".json", {"model_path": args.model_path, "timestamp": datetime.now().isoformat(),
                                "settings": {k: v for k, v in vars(args).items()}, "rows": rows})
    write_text(base + ".md", table + "\n")
    print(table)
    return finish(base + ".json")


if __name__ == "__main__":
    run(main)
