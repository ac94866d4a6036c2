"""Retrain a pruned model for a few steps on domain triples; pruned weights stay exactly zero.

Example:
  python gaprune/model/retrain.py --model_path output/model/FOLDER --data_path data/sample/chem-example-output.json \
      --general_data_path data/sample/general-example-output.json --steps 100
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

from gaprune.cli import ArgumentParser, finite_float, finish, add_runtime_args, positive_int, run
from gaprune.options import DISTILL_LOSSES

log = logging.getLogger("gaprune.retrain")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", required=True, help="pruned model folder (SparseModel.py output)")
    parser.add_argument("--data_path", required=True, help="domain triples to train on")
    parser.add_argument("--output_dir", default="output/retrain")
    parser.add_argument("--steps", type=positive_int, default=100)
    parser.add_argument("--lr", type=finite_float, default=1e-5)
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--warmup_steps", type=int, default=10)
    parser.add_argument("--grad_accum", type=positive_int, default=1)
    parser.add_argument("--weight_decay", type=finite_float, default=0.0)
    parser.add_argument("--max_length", type=positive_int, default=512)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--general_data_path", help="general triples mixed into each batch")
    parser.add_argument("--general_ratio", type=finite_float, default=0.25,
                        help="share of each batch from --general_data_path (default: 0.25)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for memory")
    parser.add_argument("--distill_weight", type=finite_float, default=0.0,
                        help="weight of a distillation term against the teacher's embeddings of every training text "
                             "(0: InfoNCE alone); it keeps the pruned model in the dense model's embedding space, so "
                             "an index built with the dense model still serves it")
    parser.add_argument("--distill_loss", default="cosine", choices=DISTILL_LOSSES,
                        help="cosine: mean 1 - cos; mse: mean squared distance of the normalised embeddings")
    parser.add_argument("--teacher_model", default="auto",
                        help="the teacher of --distill_weight; auto: the dense model the pruned folder records")
    add_runtime_args(parser, dtype_help="compute dtype (autocast); weights and optimizer state stay float32. "
                                        "auto = bfloat16 on CUDA, float32 on CPU (default: auto)")
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    from gaprune import api
    from gaprune.checkpoint import describe_probe, output_folder, probe_embedding, save_model
    from gaprune.data import load_triples
    from gaprune.fileio import atomic_dir, check_output_dir, read_json, write_json
    from gaprune.modelcard import model_card, write_model_card
    from gaprune.modeling import load_embedder, resolve_model_dir
    from gaprune.spec import RetrainSpec

    spec = RetrainSpec(steps=args.steps, lr=args.lr, batch_size=args.batch_size, warmup_steps=args.warmup_steps,
                       grad_accum=args.grad_accum, weight_decay=args.weight_decay, general_ratio=args.general_ratio,
                       seed=args.seed, distill_weight=args.distill_weight, distill_loss=args.distill_loss)
    spec.general_per_batch(args.general_data_path is not None)
    folder = output_folder(args.output_dir, args.model_path, f"retrained_{args.steps}steps")
    check_output_dir(args.output_dir)
    check_output_dir(folder, "the retrained model's folder")
    for path in filter(None, (args.data_path, args.general_data_path)):  # bad data fails before the model loads
        load_triples(path)
    config_file = os.path.join(resolve_model_dir(args.model_path), "evaluation_config.json")
    pruning = read_json(config_file, "pruned model's evaluation_config.json") if os.path.isfile(config_file) else None
    teacher = teacher_of(args, pruning) if spec.distills else None
    embedder = load_embedder(args.model_path, args.device, "float32", max_length=args.max_length)
    if args.gradient_checkpointing:
        embedder.model.gradient_checkpointing_enable()
    result = api.retrain(embedder, spec, args.data_path, args.general_data_path, args.dtype, teacher)
    embedding = probe_embedding(embedder)
    with atomic_dir(folder) as tmp:
        save_model(embedder, tmp)
        record = {"settings": {k: v for k, v in vars(args).items()},
                  "held_zero_weights": result.held_zero_weights,
                  "held_zero_weights_after": result.held_zero_weights_after,
                  "seconds": result.seconds, "loss_curve": result.losses}
        write_json(os.path.join(tmp, "retrain_config.json"), record)
        # Last, so it replaces any README.md that saving the model wrote.
        write_model_card(tmp, model_card(pruning if isinstance(pruning, dict) else None,
                                         pruned_stats(embedder.model_dir), retrain=record))
    print(f"Loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} over {args.steps} steps in {result.seconds:.1f} s; "
          f"{result.held_zero_weights_after:,} of {result.held_zero_weights:,} pruned weights still zero")
    print(describe_probe(embedding))
    return finish(folder)


def teacher_of(args, pruning: dict | None) -> str:
    """--teacher_model, or with auto the dense model the pruned folder's evaluation_config.json records."""
    from gaprune.errors import InputError

    if args.teacher_model != "auto":
        return args.teacher_model
    if not isinstance(pruning, dict) or not isinstance(pruning.get("model_path"), str):
        raise InputError(f"--teacher_model auto needs the dense model recorded in {args.model_path}'s "
                         f"evaluation_config.json; name the teacher with --teacher_model")
    return pruning["model_path"]


def pruned_stats(folder: str) -> dict | None:
    """The pruned folder's unstructured_ or structured_prune_stats.json, for the model card (None if absent)."""
    from gaprune.fileio import read_json

    for name in ("unstructured_prune_stats.json", "structured_prune_stats.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            stats = read_json(path, f"pruned model's {name}")
            return stats if isinstance(stats, dict) else None
    return None


if __name__ == "__main__":
    run(main)
