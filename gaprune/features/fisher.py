"""Stage 2: Fisher information of every weight on one triple file (run it for general and for domain data)."""

from __future__ import annotations

import logging
import os
from datetime import datetime
from typing import Sequence

import numpy as np

from gaprune.cli import ArgumentParser, add_layer_args, add_runtime_args, positive_int, run
from gaprune.data import load_triples
from gaprune.importance import fisher_information
from gaprune.layers import layer_key
from gaprune.modeling import load_embedder
from gaprune.scorefiles import SCORE_DTYPES, domain_name, tensor_file_for, timestamp, write_json, write_tensors

log = logging.getLogger("gaprune.fisher")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Fisher information of each weight on the contrastive loss of one data set.")
    parser.add_argument("--model_name", required=True, help="model folder or hub id, e.g. Qwen/Qwen3-Embedding-4B")
    parser.add_argument("--data_path", required=True, help="JSON list of {query, positive, negative} triples")
    parser.add_argument("--batch_size", type=positive_int, default=1)
    parser.add_argument("--max_samples", type=positive_int, default=1000, help="use the first N triples")
    parser.add_argument("--output_dir", default="results")
    add_layer_args(parser, ["attention", "mlp"])
    parser.add_argument("--score_dtype", default="float32", choices=sorted(SCORE_DTYPES),
                        help="dtype of the per-weight arrays on disk (default: float32)")
    add_runtime_args(parser)
    return parser


def per_layer_statistics(mean_scores: dict[str, float]) -> dict[str, dict]:
    """Mean, std (at least 1e-12) and count of the parameters' mean scores, per layer."""
    groups: dict[str, list[float]] = {}
    for name, score in mean_scores.items():
        groups.setdefault(layer_key(name, fallback_parts=1), []).append(score)
    return {layer: {"mean": float(np.mean(s)), "std": max(float(np.std(s)), 1e-12), "count": len(s)}
            for layer, s in groups.items()}


def main(argv: Sequence[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    triples = load_triples(args.data_path, args.max_samples)
    embedder = load_embedder(args.model_name, args.device, args.dtype)
    log.info("%d triples from %s; model %s on %s (%s), pooling %s", len(triples), args.data_path,
             args.model_name, embedder.device, embedder.model.dtype, embedder.pooling)

    result = fisher_information(embedder, triples, args.batch_size, args.sparsify_layers,
                                on_first_loss=lambda loss: print(f"First batch loss: {loss:.6f}"))

    now = datetime.now()
    domain = domain_name(args.data_path)
    json_path = os.path.join(args.output_dir, f"{domain}_fisher_complete_scores_{timestamp(now)}.json")
    tensor_path = tensor_file_for(json_path)
    layers = per_layer_statistics(result.mean_scores)
    metadata = {
        "method": f"{domain}_fisher",
        "timestamp": now.isoformat(),
        "total_parameters": len(result.mean_scores),
        "total_weights": int(sum(np.prod(s) for s in result.shapes.values())),
        "model_name": args.model_name,
        "data_path": args.data_path,
        "num_samples": result.num_samples,
        "batch_size": args.batch_size,
        "sparsify_layers": args.sparsify_layers,
        "compute_dtype": str(embedder.model.dtype).removeprefix("torch."),
        "score_dtype": args.score_dtype,
        "first_batch_loss": result.first_loss,
        "mean_loss": result.mean_loss,
        "tensor_file": os.path.basename(tensor_path),
    }
    write_tensors(tensor_path, result.per_weight, SCORE_DTYPES[args.score_dtype],
                  metadata={"model_name": args.model_name, "method": metadata["method"]})
    write_json(json_path, {
        "metadata": metadata,
        "summary_statistics": {name: {"mean_score": m} for name, m in result.mean_scores.items()},
        "complete_scores": {name: {"shape": shape, "in_tensor_file": name in result.per_weight}
                            for name, shape in result.shapes.items()},
        "per_layer_statistics": layers,
    })
    ranked = sorted(result.mean_scores.items(), key=lambda item: item[1], reverse=True)
    write_json(os.path.join(args.output_dir, f"{domain}_fisher_summary_{timestamp(now)}.json"), {
        "metadata": metadata,
        "per_layer_statistics": layers,
        "most_important": dict(ranked[:10]),
        "least_important": dict(ranked[-5:]),
    })

    print(f"Mean loss over {result.num_samples} samples: {result.mean_loss:.6f}")
    print("Top 10 most important parameter groups (mean Fisher score):")
    for name, score in ranked[:10]:
        print(f"  {name}: {score:.6e}")
    print("Top 5 least important parameter groups:")
    for name, score in ranked[-5:]:
        print(f"  {name}: {score:.6e}")
    print(f"Per-weight scores for {len(result.per_weight)} parameters: {tensor_path}")
    print(json_path)
    return json_path


if __name__ == "__main__":
    run(main)
