"""Stage 4: DAI scores from the Fisher and alignment files, a mask of the lowest ones, and the pruned model.

With --structure channels (or heads) whole MLP channels (query heads) are removed instead, and with
--structure layers whole transformer blocks (chosen by --block_scoring): the saved model is smaller and
runs faster in any engine. --dry_run checks the whole request and loads no weights.

Example:
  python gaprune/model/SparseModel.py --model_path Qwen/Qwen3-Embedding-4B --output_dir output/model \
      --unstructured_scoring aligned_saliency --unstructured_pct 0.5 \
      --general_fisher_scores G.json --domain_fisher_scores D.json --alignment_scores A.json
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

from gaprune.checks import whole_number
from gaprune.cli import (ArgumentParser, add_calibration_args, add_layer_args, add_runtime_args, add_scoring_args,
                         finish, finite_float, positive_int, run)
from gaprune.errors import InputError
from gaprune.options import (BLOCK_MEASURES, BUDGET_STRATEGIES, DEFAULT_SCORER, LAYER_TYPES, LAYERS, STRUCTURES,
                             UNIFORM_SHARES, UNSTRUCTURED)
from gaprune.scorers import SCORERS

if TYPE_CHECKING:
    from gaprune.pruning import ModelZeros
    from gaprune.spec import PruneSpec, ScoreFiles

log = logging.getLogger("gaprune.sparse")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", required=True, help="model folder or hub id")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--general_fisher_scores", help="fisher.py JSON on general data (absent: 1.0 everywhere)")
    parser.add_argument("--domain_fisher_scores", help="fisher.py JSON on domain data (absent: 1.0 everywhere)")
    parser.add_argument("--alignment_scores", help="gradient.py JSON (absent: alignment 0)")
    add_layer_args(parser, ["mlp"])
    parser.add_argument("--unstructured_pct", type=finite_float, default=0.0,
                        help="share of candidate weights to zero, 0..1")
    parser.add_argument("--unstructured_scoring", default=DEFAULT_SCORER, choices=list(SCORERS),
                        help="; ".join(f"{s.name}: {s.summary}" for s in SCORERS.values()) + " (see README)")
    parser.add_argument("--structure", default="unstructured", choices=["unstructured", *STRUCTURES],
                        help="unstructured: zero single weights (default); channels: remove whole MLP channels; "
                             "heads: remove query heads (Qwen3); layers: remove whole transformer blocks. Channels, "
                             "heads and layers give a smaller model")
    parser.add_argument("--structured_pct", type=finite_float, default=0.0,
                        help="with --structure channels/heads: share of every layer's channels or heads to remove, "
                             "0..1 (the scores of the tensors that carry them are summed per unit); with "
                             "--structure layers: share of the transformer blocks (rounded to a whole count)")
    parser.add_argument("--num_layers_removed", type=positive_int,
                        help="with --structure layers: how many transformer blocks to remove (instead of "
                             "--structured_pct)")
    parser.add_argument("--block_scoring", default=BLOCK_MEASURES[0], metavar="SCORER",
                        help=f"with --structure layers, which blocks go (the lowest): {', '.join(BLOCK_MEASURES)} "
                             "(measured on the calibration texts: ShortGPT's 1 - cos(block input, output); the "
                             "embedding drift or the loss rise when the block is skipped; the drift re-measured "
                             "after each removal), or a score-based scorer's name (its scores summed over the block)")
    parser.add_argument("--target_speedup", type=finite_float,
                        help="a budget: this many times fewer FLOPs per token than the dense model; the layers, "
                             "MLP channels and (Qwen3) query heads that go are chosen together, the least "
                             "--unstructured_scoring importance removed (aligned_saliency or domain_fisher with their "
                             "score files; magnitude without)")
    parser.add_argument("--target_params", type=finite_float,
                        help="a budget: keep at most this share (0..1) of the transformer blocks' weights")
    parser.add_argument("--budget_sequence_length", type=positive_int, default=256,
                        help="tokens per text in the budget's cost model (attention grows with it)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the random scorer (default: 42)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--show_layer_types", action="store_true", help="print the layer types and exit")
    parser.add_argument("--dry_run", action="store_true",
                        help="check the whole request against the model's shapes, the score files' headers and the "
                             "calibration files, load no weights, write nothing (score files may be left out: "
                             "the scoring stages write them later)")
    parser.add_argument("--layer_budget_strategy", default="global", choices=BUDGET_STRATEGIES)
    parser.add_argument("--rho_min", type=finite_float, default=0.05, help="uniform: least share pruned per layer")
    parser.add_argument("--rho_max", type=finite_float, default=0.95, help="uniform: largest share pruned per layer")
    add_scoring_args(parser)
    add_calibration_args(parser)
    add_runtime_args(parser)
    return parser


def request_from_args(args) -> tuple[PruneSpec, ScoreFiles]:
    """The whole request the flags make, checked once (nothing is read yet)."""
    from gaprune.spec import coefficients_from_args, score_files_from_args, spec_from_args

    if args.structure == UNSTRUCTURED and args.structured_pct:
        raise InputError(f"--structured_pct needs --structure {' or '.join(STRUCTURES)}")
    if args.structure != UNSTRUCTURED and args.unstructured_pct:
        raise InputError(f"--unstructured_pct cannot be combined with --structure {args.structure}")
    whole_number(args.batch_size, "--batch_size")
    amount = args.unstructured_pct if args.structure == UNSTRUCTURED else args.structured_pct
    spec = spec_from_args(args, args.unstructured_scoring, amount, coefficients_from_args(args),
                          block_scorer=args.block_scoring, block_count=args.num_layers_removed,
                          target_speedup=args.target_speedup, target_params=args.target_params,
                          sequence_length=args.budget_sequence_length)
    scores = score_files_from_args(args)
    if not (args.dry_run and not scores.given()):  # a dry run before the scoring stages: their files come later
        spec.check_scores(scores)
    return spec, scores


def show_layer_types(model_path: str) -> None:
    import torch

    from gaprune.checkpoint import checkpoint_shapes
    from gaprune.layers import LAYER_PATTERNS, detect_family, name_matches
    from gaprune.modeling import resolve_model_dir

    shapes = checkpoint_shapes(resolve_model_dir(model_path))
    family = detect_family(shapes)
    print(f"Layer types for {model_path} ({family or 'unknown'} naming); candidates need 2+ dimensions:")
    for layer_type in LAYER_TYPES:
        names = [n for n, s in shapes.items() if len(s) >= 2 and name_matches(n, family, [layer_type])]
        weights = sum(int(torch.Size(shapes[n]).numel()) for n in names)
        patterns = ", ".join(LAYER_PATTERNS[family][layer_type]) if family else "-"
        print(f"  {layer_type:<15} {len(names):4d} tensors {weights:14,d} weights   patterns: {patterns}")


def dry_run(args, spec: PruneSpec, scores: ScoreFiles) -> str:
    """Everything that can be checked without the weights: the request against the model's shapes (a model
    built on the meta device), the score files' headers, the calibration files, the output folder."""
    import torch

    from gaprune.modeling import meta_model
    from gaprune.pruning import load_calibration, pruned_folder, scored_tensors
    from gaprune.scorefiles import open_score_files

    model = meta_model(args.model_path)
    for note in spec.notes() + spec.check_model(model):
        log.warning("%s", note)
    if scores.given():
        candidates = scored_tensors(model, spec)
        open_score_files(scores.paths(), {name: list(p.shape) for name, p in candidates.items()},
                         torch.device("cpu"), need_cosine=spec.reads_cosine(), model_name=args.model_path)
    if spec.uses_texts:
        load_calibration(spec.calibration)
    folder = pruned_folder(args.output_dir, args.model_path, spec)
    print(f"Request checked (no weights loaded): {spec.scorer}, {spec.structure}, share {spec.share:g}; "
          f"would write {folder}")
    return folder


def main(argv: Sequence[str] | None = None) -> str | None:
    args = build_parser().parse_args(argv)
    spec, scores = request_from_args(args)
    if args.show_layer_types:
        show_layer_types(args.model_path)
        return None
    from gaprune.fileio import check_output_dir
    from gaprune.pruning import pruned_folder

    folder = pruned_folder(args.output_dir, args.model_path, spec)
    check_output_dir(args.output_dir)
    check_output_dir(folder, "the pruned model's folder")
    if args.dry_run:
        return dry_run(args, spec, scores)
    return prune_and_save(args, spec, scores, folder)


def prune_and_save(args, spec: PruneSpec, scores: ScoreFiles, folder: str) -> str | None:
    """Prune as ``spec`` asks and write the folder: the model, its records and its model card. Under torchrun
    every rank prunes (the calibration texts shared out) and rank 0 saves."""
    from gaprune import api, distributed
    from gaprune.checkpoint import count_zeros, describe_probe, probe_embedding, save_pruned_folder
    from gaprune.modelcard import model_card
    from gaprune.modeling import load_embedder
    from gaprune.budget import texts_per_second
    from gaprune.pruning import ModelZeros, budget_records, folder_records, load_calibration

    calibration = load_calibration(spec.calibration) if spec.uses_texts else None
    world = distributed.init_from_env(args.device)
    embedder = load_embedder(args.model_path, args.device, args.dtype)
    log.info("model %s on %s (%s)", args.model_path, embedder.device, embedder.model.dtype)
    log.info("pruning %s", describe_request(spec))
    zeros_before = count_zeros(embedder.model)
    speed = speed_texts(spec) if spec.budgeted else None
    dense_speed = texts_per_second(embedder, speed) if speed else None
    result = api.prune(embedder, spec, scores, calibration)
    if spec.budgeted:
        log.info("%s", result.plan.line(result.shape))
        measured = texts_per_second(embedder, speed) / dense_speed
        log.info("measured on this device: %.2fx the dense model's texts/s", measured)
    embedding = probe_embedding(embedder)
    if not world.is_main:
        return None
    zeros = ModelZeros.counted(embedder.model, zeros_before) if spec.structure == UNSTRUCTURED else None
    records = (budget_records(args.model_path, args.batch_size, spec, scores, result,
                              {"measured_speedup": measured, "measured_on": str(embedder.device)})
               if spec.budgeted else folder_records(args.model_path, args.batch_size, spec, scores, result, zeros,
                                                    calibration))
    save_pruned_folder(embedder, folder, records, model_card(*records.values()))
    print(describe_result(result, spec, zeros))
    print(describe_probe(embedding))
    return finish(folder)


def speed_texts(spec: PruneSpec) -> list[str]:
    """32 texts of about the budget's sequence length, for timing the dense and the pruned model."""
    from gaprune.checkpoint import PROBE_SENTENCE

    return [" ".join([PROBE_SENTENCE] * max(1, spec.sequence_length // 8))] * 32


def describe_request(spec: PruneSpec) -> str:
    if spec.budgeted:
        budget = " and ".join(part for part in (f"{spec.target_speedup:g}x fewer FLOPs" if spec.target_speedup else "",
                                                f"at most {spec.target_params:.0%} of the weights"
                                                if spec.target_params else "") if part)
        return (f"layers, MLP channels (and query heads where the family allows) to a budget of {budget}, the least "
                f"{spec.scorer} importance removed")
    if spec.structure == LAYERS:
        amount = spec.block_count if spec.block_count is not None else f"{100 * spec.sparsity:.1f}%"
        return f"{amount} of the transformer blocks, the lowest by {spec.block_scorer}"
    if spec.structure != UNSTRUCTURED:
        return f"{100 * spec.sparsity:.1f}% of every layer's {spec.structure} by {spec.scorer}"
    from gaprune.pruning import budget_of

    budget = budget_of(spec)
    shares = "" if spec.layer_shares == UNIFORM_SHARES else f", layer shares by {spec.layer_shares}"
    return (f"{100 * spec.share:.1f}% of {' '.join(spec.layer_types)} by {spec.scorer} ({budget} budget{shares}, "
            f"{spec.pattern})")


def describe_result(result, spec: PruneSpec, zeros: ModelZeros | None) -> str:
    if spec.budgeted:
        heads = f" and {result.plan.heads_removed} query heads" if result.plan.heads_removed else ""
        return (f"Removed {len(result.plan.blocks_removed)} layers {result.plan.blocks_removed} and "
                f"{result.plan.channels_removed} MLP channels{heads} per remaining layer; parameters "
                f"{result.params_before:,} -> {result.params_after:,} "
                f"({1 - result.params_after / result.params_before:.1%} fewer)")
    from gaprune.structure import CONFIG_FIELDS

    if spec.structure == LAYERS:
        return (f"Removed layers {result.removed} of {result.blocks_before} (num_hidden_layers {result.blocks_before}"
                f" -> {result.blocks_before - len(result.removed)}); parameters {result.params_before:,} -> "
                f"{result.params_after:,} ({1 - result.params_after / result.params_before:.1%} fewer)")
    if zeros is None:
        return (f"Removed {result.units_before - result.units_after} of {result.units_before} {spec.structure} in "
                f"each of {len(result.removed)} layers ({CONFIG_FIELDS[spec.structure]} {result.units_before} -> "
                f"{result.units_after}); parameters {result.params_before:,} -> {result.params_after:,} "
                f"({1 - result.params_after / result.params_before:.1%} fewer)")
    considered = sum(p["numel"] for p in result.per_param.values())
    return (f"Masked {result.masked:,} of {considered:,} candidate weights ({result.masked / considered:.2%}); "
            f"model zeros {zeros.before:,} -> {zeros.after:,}")


if __name__ == "__main__":
    run(main)
