"""Stage 2: Fisher information of every weight on the contrastive loss of one triple file (run it for
general and for domain data).

Example:
  python gaprune/features/fisher.py --model_name Qwen/Qwen3-Embedding-4B \
      --data_path data/sample/chem-example-output.json --batch_size 4 --max_samples 5000 \
      --output_dir output/fisher
"""

from __future__ import annotations

import logging
from typing import Sequence

from gaprune.cli import (SCORING_DTYPE_HELP, ArgumentParser, finish, add_layer_args, add_runtime_args, add_scale_args,
                         positive_int, run)
from gaprune.results import FisherResult
from gaprune.options import SCORE_DTYPES

log = logging.getLogger("gaprune.fisher")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model_name", required=True, help="model folder or hub id, e.g. Qwen/Qwen3-Embedding-4B")
    parser.add_argument("--data_path", required=True, help="JSON list of {query, positive, negative} triples")
    parser.add_argument("--batch_size", type=positive_int, default=1)
    parser.add_argument("--max_samples", type=positive_int, default=1000, help="use the first N triples")
    parser.add_argument("--output_dir", default="results")
    add_layer_args(parser, ["attention", "mlp"])
    parser.add_argument("--score_dtype", default="float32", choices=sorted(SCORE_DTYPES),
                        help="dtype of the per-weight arrays on disk (default: float32)")
    add_runtime_args(parser, SCORING_DTYPE_HELP)
    add_scale_args(parser)
    return parser


def print_report(result: FisherResult) -> None:
    from gaprune.scorefiles import ranked_parameters

    ranked = ranked_parameters(result.mean_scores)
    print(f"Mean loss over {result.num_samples} samples: {result.mean_loss:.6f}")
    print("Top 10 most important parameter groups (mean Fisher score):")
    for name, score in ranked[:10]:
        print(f"  {name}: {score:.6e}")
    print("Top 5 least important parameter groups:")
    for name, score in ranked[-5:]:
        print(f"  {name}: {score:.6e}")


def main(argv: Sequence[str] | None = None) -> str | None:
    """Under torchrun every rank scores its share of the batches; rank 0 writes and prints."""
    args = build_parser().parse_args(argv)
    from gaprune import api, distributed
    from gaprune.data import load_triples
    from gaprune.fileio import check_output_dir
    from gaprune.memory import process_rss
    from gaprune.modeling import load_embedder
    from gaprune.scorefiles import tensor_file_for

    world = distributed.init_from_env(args.device)
    triples = load_triples(args.data_path, args.max_samples)  # bad data or output locations fail before the model loads
    check_output_dir(args.output_dir)
    runtime_rss = process_rss()
    embedder = load_embedder(args.model_name, args.device, args.dtype, native_cpu_bfloat16=True)
    log.info("%d triples from %s; model %s on %s (%s), pooling %s", len(triples), args.data_path, args.model_name,
             embedder.device, embedder.model.dtype, embedder.pooling)
    result = api.fisher(embedder, args.data_path, args.output_dir if world.is_main else None, args.batch_size,
                        args.max_samples, args.sparsify_layers, args.score_dtype,
                        on_first_loss=lambda loss: print(f"First batch loss: {loss:.6f}"),
                        accumulate_on=args.accumulate_on, gradients=args.gradients, runtime_rss=runtime_rss)
    if not world.is_main:
        return None
    print_report(result)
    print(f"Per-weight scores for {len(result.per_weight)} parameters: "
          f"{tensor_file_for(result.path)}")
    return finish(result.path)


if __name__ == "__main__":
    run(main)
