"""Stage 3: how general-data and domain-data gradients agree, per parameter and per weight."""

from __future__ import annotations

import argparse
import logging
import os
from datetime import datetime
from typing import Sequence

import numpy as np

from gaprune.cli import ArgumentParser, add_layer_args, add_runtime_args, positive_int, run
from gaprune.data import load_triples
from gaprune.importance import ALIGNMENT_MODES, gradient_alignment
from gaprune.modeling import load_embedder
from gaprune.scorefiles import COSINE_PREFIX, model_dirname, tensor_file_for, timestamp, write_json, write_tensors

log = logging.getLogger("gaprune.gradient")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Gradient alignment between general and domain data.")
    parser.add_argument("--model_name", required=True, help="model folder or hub id, e.g. Qwen/Qwen3-Embedding-4B")
    parser.add_argument("--batch_size", type=positive_int, default=2,
                        help="triples per step: batch_size // 2 general, the rest domain (default: 2)")
    parser.add_argument("--max_samples", type=positive_int, default=1000, help="stop before processing more")
    parser.add_argument("--use_distributed", action=argparse.BooleanOptionalAction, default=True,
                        help="gather embeddings across processes when torch.distributed is initialised (default: on)")
    parser.add_argument("--domain_data_path", default="data/sample/chem-example-output.json")
    parser.add_argument("--general_data_path", default="data/sample/general-example.json")
    parser.add_argument("--output_dir", default="output")
    add_layer_args(parser, ["attention", "mlp"])
    parser.add_argument("--seed", type=int, default=42, help="seed of the shuffled loaders (default: 42)")
    parser.add_argument("--alignment_mode", default="product", choices=list(ALIGNMENT_MODES),
                        help="product: only the published element-wise arrays (u_gen*u_dom, 3x3 mean); "
                             "local_cosine / row_cosine: also a cosine in [-1, 1] of the two gradients over "
                             "each weight's 3x3 neighbourhood / output row, for the dai_paper and "
                             "aligned_saliency scorers (default: product)")
    add_runtime_args(parser)
    return parser


def alignment_statistics(scores: dict[str, float]) -> dict[str, float | int]:
    values = np.array(list(scores.values()), dtype=np.float64)
    return {"mean": float(values.mean()), "max": float(values.max()), "min": float(values.min()),
            "std": float(values.std()), "positive_aligned_count": int((values > 0.1).sum()),
            "negative_aligned_count": int((values < -0.1).sum())}


def print_summary(stats: dict, scores: dict[str, float], rates: dict[str, float], losses: dict) -> None:
    total = len(scores)
    between = total - stats["positive_aligned_count"] - stats["negative_aligned_count"]
    print("Alignment statistics (cosine of averaged general and domain gradients):")
    print(f"  mean {stats['mean']:.4f}  std {stats['std']:.4f}  min {stats['min']:.4f}  max {stats['max']:.4f}")
    print("Distribution:")
    print(f"  aligned (> 0.1):        {stats['positive_aligned_count']:6d} ({stats['positive_aligned_count'] / total:.1%})")
    print(f"  neutral (-0.1 .. 0.1):  {between:6d} ({between / total:.1%})")
    print(f"  conflicting (< -0.1):   {stats['negative_aligned_count']:6d} ({stats['negative_aligned_count'] / total:.1%})")
    print(f"Average losses: general {losses['general']:.6f}, domain {losses['domain']:.6f}")
    print("Top 10 parameters by |alignment|:")
    for name, value in sorted(scores.items(), key=lambda item: abs(item[1]), reverse=True)[:10]:
        print(f"  {name}: {value:+.4f}")
    rate_values = np.array(list(rates.values()))
    print(f"Conflict rates: mean {rate_values.mean():.4f}, max {rate_values.max():.4f}, "
          f"parameters conflicting in over half the steps: {int((rate_values > 0.5).sum())}")


def main(argv: Sequence[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    general = load_triples(args.general_data_path)
    domain = load_triples(args.domain_data_path)
    embedder = load_embedder(args.model_name, args.device, args.dtype)
    log.info("%d general and %d domain triples; model %s on %s (%s)", len(general), len(domain),
             args.model_name, embedder.device, embedder.model.dtype)

    result = gradient_alignment(embedder, general, domain, args.batch_size, args.max_samples, args.sparsify_layers,
                                seed=args.seed, distributed=args.use_distributed,
                                alignment_mode=args.alignment_mode)

    now = datetime.now()
    model = model_dirname(args.model_name)
    folder = os.path.join(args.output_dir, model)
    json_path = os.path.join(folder, f"alignment_scores_{model}_{timestamp(now)}.json")
    tensor_path = tensor_file_for(json_path)
    stats = alignment_statistics(result.alignment_scores)
    metadata = {
        "timestamp": now.isoformat(),
        "model_name": args.model_name,
        "batch_size": args.batch_size,
        "max_samples": args.max_samples,
        "use_distributed": args.use_distributed,
        "processed_batches": result.processed_batches,
        "total_samples_processed": result.total_samples_processed,
        "general_data_size": len(general),
        "domain_data_size": len(domain),
        "domain_data_path": args.domain_data_path,
        "general_data_path": args.general_data_path,
        "seed": args.seed,
        "alignment_mode": args.alignment_mode,
        "sparsify_layers": args.sparsify_layers,
        "compute_dtype": str(embedder.model.dtype).removeprefix("torch."),
        "tensor_file": os.path.basename(tensor_path),
        "parameter_shapes": result.shapes,
    }
    arrays = {**result.elementwise, **{COSINE_PREFIX + name: a for name, a in result.cosine.items()}}
    write_tensors(tensor_path, arrays, metadata={"model_name": args.model_name,
                                                            "method": "alignment_elementwise"})
    write_json(json_path, {"metadata": metadata, "losses": result.losses,
                           "alignment_scores": result.alignment_scores, "conflict_rates": result.conflict_rates})
    write_json(os.path.join(folder, f"alignment_summary_{model}_{timestamp(now)}.json"), {
        "timestamp": metadata["timestamp"],
        "model_name": args.model_name,
        "total_parameters": len(result.alignment_scores),
        "processed_batches": result.processed_batches,
        "total_samples_processed": result.total_samples_processed,
        "alignment_statistics": stats,
        "losses": result.losses,
        "conflict_rates": result.conflict_rates,
    })

    print_summary(stats, result.alignment_scores, result.conflict_rates, result.losses)
    print(f"Element-wise alignment for {len(result.elementwise)} parameters"
          f"{f' (with {args.alignment_mode} arrays)' if result.cosine else ''}: {tensor_path}")
    print(json_path)
    return json_path


if __name__ == "__main__":
    run(main)
