"""Stage 3: how general-data and domain-data gradients agree, per parameter and per weight.

Example:
  python gaprune/features/gradient.py --model_name Qwen/Qwen3-Embedding-4B \
      --general_data_path data/sample/general-example-output.json \
      --domain_data_path data/sample/chem-example-output.json --batch_size 4 --max_samples 5000 \
      --output_dir output/gradient --alignment_mode local_cosine
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from gaprune.cli import (SCORING_DTYPE_HELP, ArgumentParser, finish, add_layer_args, add_runtime_args, add_scale_args,
                         positive_int, run)
from gaprune.results import AlignmentResult
from gaprune.options import ALIGNMENT_MODES, SCORE_DTYPES

log = logging.getLogger("gaprune.gradient")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model_name", required=True, help="model folder or hub id, e.g. Qwen/Qwen3-Embedding-4B")
    parser.add_argument("--batch_size", type=positive_int, default=2,
                        help="triples per step: batch_size // 2 general, the rest domain (default: 2)")
    parser.add_argument("--max_samples", type=positive_int, default=1000, help="stop before processing more")
    parser.add_argument("--use_distributed", action=argparse.BooleanOptionalAction, default=True,
                        help="under torchrun, gather the ranks' embeddings into one contrastive loss per step "
                             "(in-batch negatives from every process); --no-use_distributed: every rank's "
                             "steps stand alone and the result equals one process (default: on)")
    parser.add_argument("--domain_data_path", default="data/sample/chem-example-output.json")
    # [fix] The published default, data/sample/general-example.json, is a file sample.py never writes: its
    # README (and example_usage.sh) samples data/general-example.json into data/sample/general-example-output.json.
    parser.add_argument("--general_data_path", default="data/sample/general-example-output.json",
                        help="general triples (default: data/sample/general-example-output.json, what sample.py "
                             "writes for data/general-example.json)")
    parser.add_argument("--output_dir", default="output")
    add_layer_args(parser, ["attention", "mlp"])
    parser.add_argument("--seed", type=int, default=42, help="seed of the shuffled loaders (default: 42)")
    parser.add_argument("--alignment_mode", default="product", choices=list(ALIGNMENT_MODES),
                        help="product: only the published element-wise arrays (u_gen*u_dom, 3x3 mean); "
                             "local_cosine / row_cosine: also a cosine in [-1, 1] of the two gradients over "
                             "each weight's 3x3 neighbourhood / output row, for the dai_paper and "
                             "aligned_saliency scorers (default: product)")
    parser.add_argument("--fisher_output_dir", default=None,
                        help="one calibration pass: also write the general and domain Fisher files (as fisher.py "
                             "--batch_size <half-batch> would over the triples the steps draw) into this folder")
    parser.add_argument("--score_dtype", default="float32", choices=sorted(SCORE_DTYPES),
                        help="dtype of the --fisher_output_dir files' per-weight arrays, as fisher.py's "
                             "(default: float32)")
    add_runtime_args(parser, SCORING_DTYPE_HELP)
    add_scale_args(parser)
    return parser


def print_report(result: AlignmentResult) -> None:
    import numpy as np

    from gaprune.scorefiles import alignment_statistics

    scores, rates, losses = result.alignment_scores, result.conflict_rates, result.losses
    stats = alignment_statistics(scores)
    total = len(scores)
    aligned, conflicting = stats["positive_aligned_count"], stats["negative_aligned_count"]
    between = total - aligned - conflicting
    print("Alignment statistics (cosine of averaged general and domain gradients):")
    print(f"  mean {stats['mean']:.4f}  std {stats['std']:.4f}  min {stats['min']:.4f}  max {stats['max']:.4f}")
    print("Distribution:")
    print(f"  aligned (> 0.1):        {aligned:6d} ({aligned / total:.1%})")
    print(f"  neutral (-0.1 .. 0.1):  {between:6d} ({between / total:.1%})")
    print(f"  conflicting (< -0.1):   {conflicting:6d} ({conflicting / total:.1%})")
    print(f"Average losses: general {losses['general']:.6f}, domain {losses['domain']:.6f}")
    print("Top 10 parameters by |alignment|:")
    for name, value in sorted(scores.items(), key=lambda item: abs(item[1]), reverse=True)[:10]:
        print(f"  {name}: {value:+.4f}")
    rate_values = np.array(list(rates.values()))
    print(f"Conflict rates: mean {rate_values.mean():.4f}, max {rate_values.max():.4f}, "
          f"parameters conflicting in over half the steps: {int((rate_values > 0.5).sum())}")


def main(argv: Sequence[str] | None = None) -> str | None:
    """Under torchrun every rank takes its share of the steps; rank 0 writes and prints."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.score_dtype != "float32" and args.fisher_output_dir is None:
        parser.error("--score_dtype sets the dtype of the --fisher_output_dir files: give --fisher_output_dir too")
    from gaprune import api, distributed
    from gaprune.data import load_triples
    from gaprune.fileio import check_output_dir
    from gaprune.memory import process_rss
    from gaprune.modeling import load_embedder
    from gaprune.scorefiles import tensor_file_for

    world = distributed.init_from_env(args.device)
    general = load_triples(args.general_data_path)  # bad data or output locations fail before the model loads
    domain = load_triples(args.domain_data_path)
    check_output_dir(args.output_dir)
    if args.fisher_output_dir is not None:
        check_output_dir(args.fisher_output_dir, "--fisher_output_dir")
    runtime_rss = process_rss()
    embedder = load_embedder(args.model_name, args.device, args.dtype, native_cpu_bfloat16=True)
    log.info("%d general and %d domain triples; model %s on %s (%s)", len(general), len(domain), args.model_name,
             embedder.device, embedder.model.dtype)
    result = api.alignment(embedder, args.general_data_path, args.domain_data_path,
                           args.output_dir if world.is_main else None, args.batch_size, args.max_samples,
                           args.sparsify_layers, args.seed, args.alignment_mode, args.use_distributed,
                           args.fisher_output_dir if world.is_main else None,
                           with_fisher=args.fisher_output_dir is not None, accumulate_on=args.accumulate_on,
                           gradients=args.gradients, runtime_rss=runtime_rss, score_dtype=args.score_dtype)
    if not world.is_main:
        return None
    print_report(result)
    for side, fisher in result.fisher.items():
        print(f"{side.capitalize()} Fisher scores (same pass, {fisher.num_samples} triples): {fisher.path}")
    print(f"Element-wise alignment for {len(result.elementwise)} parameters"
          f"{f' (with {args.alignment_mode} arrays)' if result.cosine else ''}: "
          f"{tensor_file_for(result.path)}")
    return finish(result.path)


if __name__ == "__main__":
    run(main)
