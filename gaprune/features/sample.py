"""Stage 1: pick a diverse subset of a large triple file (k-means on query embeddings)."""

from __future__ import annotations

import logging
import random
from typing import Sequence

from gaprune import distributed
from gaprune.cli import ArgumentParser, finish, add_runtime_args, positive_int, run, str2bool
from gaprune.data import load_records
from gaprune.modeling import load_embedder
from gaprune.sampling import embed_texts, remove_dir, select_diverse, streaming_dir
from gaprune.fileio import check_output_file, write_json

log = logging.getLogger("gaprune.sample")

MAX_CANDIDATES = 50_000


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Diversity sampling of a triple file by k-means on embeddings.")
    parser.add_argument("--input_file", default="data/chem-example.json")
    parser.add_argument("--output_file", default="data/sample/chem-example-output.json")
    parser.add_argument("--model_name", default="Qwen/Qwen3-Embedding-0.6B")
    parser.add_argument("--target_sample_size", type=positive_int, default=5000)
    parser.add_argument("--text_key", default="query", help="record field to embed (default: query)")
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--max_length", type=positive_int, default=512)
    parser.add_argument("--use_streaming", type=str2bool, default=True,
                        help="embed in chunks through a temporary folder: True/False, 1/0, yes/no (default: True)")
    parser.add_argument("--kmeans_iterations", type=positive_int, default=20)
    parser.add_argument("--seed", type=int, default=42, help="seed of the subset and of k-means (default: 42)")
    add_runtime_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> str | None:
    """Under torchrun every rank embeds its share of the records; rank 0 runs k-means and writes."""
    args = build_parser().parse_args(argv)
    world = distributed.init_from_env(args.device)
    records = load_records(args.input_file, required_keys=[args.text_key])
    check_output_file(args.output_file, inputs=[args.input_file])
    if len(records) <= args.target_sample_size:
        log.warning("%s has %d records, not more than --target_sample_size %d: writing them all unchanged",
                    args.input_file, len(records), args.target_sample_size)
        if not world.is_main:
            return None
        write_json(args.output_file, records)
        print(f"Kept all {len(records)} records")
        return finish(args.output_file)
    if len(records) > MAX_CANDIDATES:
        log.info("%d records: k-means runs on a seeded random subset of %d", len(records), MAX_CANDIDATES)
        records = random.Random(args.seed).sample(records, MAX_CANDIDATES)

    embedder = load_embedder(args.model_name, args.device, args.dtype, max_length=args.max_length)
    stream = streaming_dir() if args.use_streaming else None
    try:
        embeddings = embed_texts(embedder, [r[args.text_key] for r in records], args.batch_size, stream)
    finally:
        remove_dir(stream)
    if not world.is_main:
        return None
    chosen = select_diverse(embeddings, args.target_sample_size, args.kmeans_iterations, args.seed)
    write_json(args.output_file, [records[i] for i in chosen])
    print(f"Selected {len(chosen)} of {len(records)} records "
          f"({args.target_sample_size - len(chosen)} centroids shared a nearest record)")
    return finish(args.output_file)


if __name__ == "__main__":
    run(main)
