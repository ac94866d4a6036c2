"""Retrain a pruned model for a few steps on domain triples; pruned weights stay exactly zero."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

from gaprune.checkpoint import describe_probe, output_folder, probe_embedding, save_model
from gaprune.cli import ArgumentParser, finite_float, finish, add_runtime_args, positive_int, run
from gaprune.data import load_triples
from gaprune.errors import InputError
from gaprune.fileio import atomic_dir, check_output_dir, read_json, write_json
from gaprune.layers import select_parameters
from gaprune.modeling import load_embedder, resolve_device, resolve_dtype
from gaprune.retraining import sparse_finetune, zero_masks
from gaprune.options import STRUCTURES

log = logging.getLogger("gaprune.retrain")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Sparse recovery fine-tuning of a pruned embedding model.")
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
    add_runtime_args(parser, dtype_help="compute dtype (autocast); weights and optimizer state stay float32. "
                                        "auto = bfloat16 on CUDA, float32 on CPU (default: auto)")
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.general_ratio < 1.0:
        raise InputError(f"--general_ratio must be in [0, 1), got {args.general_ratio}")
    if args.lr <= 0 or args.warmup_steps < 0:
        raise InputError("--lr must be positive and --warmup_steps not negative")
    if args.warmup_steps > args.steps:
        log.warning("--warmup_steps %d is more than --steps %d: the learning rate never reaches --lr",
                    args.warmup_steps, args.steps)
    if args.general_data_path:
        n_general = round(args.batch_size * args.general_ratio)
        if args.general_ratio > 0 and n_general == 0:
            raise InputError(f"--general_ratio {args.general_ratio} of --batch_size {args.batch_size} rounds to no "
                             f"general triple per batch; raise either")
        if n_general >= args.batch_size:
            raise InputError(f"--general_ratio {args.general_ratio} of --batch_size {args.batch_size} leaves no domain "
                             f"triple per batch; lower the ratio or raise the batch size")
    check_output_dir(args.output_dir)
    check_output_dir(output_folder(args.output_dir, args.model_path, f"retrained_{args.steps}steps"),
                     "the retrained model's folder")
    domain = load_triples(args.data_path)
    general = load_triples(args.general_data_path) if args.general_data_path else []
    compute = resolve_dtype(args.dtype, resolve_device(args.device))
    embedder = load_embedder(args.model_path, args.device, "float32", max_length=args.max_length)
    if args.gradient_checkpointing:
        embedder.model.gradient_checkpointing_enable()

    config_file = os.path.join(embedder.model_dir, "evaluation_config.json")
    named = dict(embedder.model.named_parameters())
    pruning = read_json(config_file, "pruned model's evaluation_config.json") if os.path.isfile(config_file) else None
    if isinstance(pruning, dict) and pruning.get("structure") in STRUCTURES:  # removed, not masked: nothing to hold
        held = {}
        log.info("%s were removed from this model; every weight trains", pruning["structure"])
    elif pruning is not None:  # a SparseModel.py folder: hold the zeros of its candidate layers
        layers = (pruning.get("sparsify_layers") if isinstance(pruning, dict) else None) or ["all"]
        held = select_parameters(named.items(), layers)
    else:
        held = {n: p for n, p in named.items() if p.dim() >= 2}
    masks = zero_masks(held)
    masked = sum(int(torch.count_nonzero(m)) for m in masks.values())
    log.info("%d zero weights in %d tensors are held at zero", masked, len(masks))

    result = sparse_finetune(embedder, domain, args.steps, args.lr, args.batch_size, masks, general,
                             args.general_ratio, args.warmup_steps, args.grad_accum, args.weight_decay, args.seed,
                             None if compute == torch.float32 else compute)
    zeros_after = masked - sum(int(torch.count_nonzero(named[n][m])) for n, m in masks.items())
    embedding = probe_embedding(embedder)

    folder = output_folder(args.output_dir, args.model_path, f"retrained_{args.steps}steps")
    with atomic_dir(folder) as tmp:
        save_model(embedder, tmp)
        write_json(os.path.join(tmp, "retrain_config.json"), {
            "settings": {k: v for k, v in vars(args).items()},
            "held_zero_weights": masked, "held_zero_weights_after": zeros_after,
            "seconds": result.seconds, "loss_curve": result.losses})
    print(f"Loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} over {args.steps} steps in {result.seconds:.1f} s; "
          f"{zeros_after:,} of {masked:,} pruned weights still zero")
    print(describe_probe(embedding))
    return finish(folder)


if __name__ == "__main__":
    run(main)
