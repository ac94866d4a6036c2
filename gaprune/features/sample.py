"""Stage 1: pick a diverse subset of a large triple file (k-means on query embeddings).

Example:
  python gaprune/features/sample.py --input_file data/chem-example.json \
      --output_file data/sample/chem-example-output.json --model_name Qwen/Qwen3-Embedding-0.6B \
      --target_sample_size 5000 --validation_size 500
"""

from __future__ import annotations

import os
from typing import Sequence

from gaprune.cli import ArgumentParser, finish, add_runtime_args, non_negative_int, positive_int, run, str2bool


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
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
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of the subset, of k-means and of the validation split (default: 42)")
    parser.add_argument("--validation_size", type=non_negative_int, default=0,
                        help="first set aside N records drawn at random as a validation split that no later stage "
                             "reads, and drop every other record sharing a query or positive with them (default: 0)")
    parser.add_argument("--validation_file",
                        help="where the validation split goes (default: beside --output_file, ending -validation.json)")
    add_runtime_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> str | None:
    """Under torchrun every rank embeds its share of the records; rank 0 runs k-means and writes."""
    args = build_parser().parse_args(argv)
    from gaprune import api, distributed
    from gaprune.errors import InputError
    from gaprune.data import RELEVANCE_KEYS, hold_out, load_records
    from gaprune.fileio import atomic_files, check_output_file, write_json

    world = distributed.init_from_env(args.device)
    check_output_file(args.output_file, inputs=[args.input_file])
    data, validation = args.input_file, []
    if args.validation_file and not args.validation_size:
        raise InputError("--validation_file names where --validation_size's split goes: give --validation_size N")
    if args.validation_size:
        validation_file = args.validation_file or validation_path(args.output_file)
        check_output_file(validation_file, "--validation_file", inputs=[args.input_file, args.output_file])
        data, validation = hold_out(load_records(args.input_file, [args.text_key]), args.validation_size, args.seed,
                                    tuple(dict.fromkeys((args.text_key, *RELEVANCE_KEYS))))
    chosen = api.sample(args.model_name, data, args.target_sample_size, args.text_key, args.batch_size,
                        args.kmeans_iterations, args.seed, args.use_streaming, args.device, args.dtype, args.max_length)
    if not world.is_main:
        return None
    if validation:  # both files or neither
        with atomic_files(validation_file, args.output_file) as (validation_tmp, sample_tmp):
            write_json(validation_tmp, validation)
            write_json(sample_tmp, chosen)
        print(f"Validation split: {len(validation)} records of {args.input_file} in {validation_file} "
              f"({len(data)} left to sample from; evaluate on it, never score or calibrate on it)")
    else:
        write_json(args.output_file, chosen)
    print(f"Selected {len(chosen)} records of {args.input_file}")
    return finish(args.output_file)


def validation_path(output_file: str) -> str:
    """data/sample/chem-output.json -> data/sample/chem-output-validation.json"""
    stem, extension = os.path.splitext(output_file)
    return f"{stem}-validation{extension or '.json'}"


if __name__ == "__main__":
    run(main)
