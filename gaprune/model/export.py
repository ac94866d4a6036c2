"""Export a model folder (dense or pruned) as ONNX, and with --int8 also as int8 by onnxruntime's dynamic
quantization: the file a CPU serving stack runs, pruning and quantization stacked. The graph embeds end to end
(transformer, pooling, Dense modules, normalisation); evaluate.py scores the .onnx file it prints. Needs
pip install -e .[onnx].

Example:
  python gaprune/model/export.py --model_path output/model/FOLDER --int8
  python gaprune/model/evaluate.py --model_path output/onnx/FOLDER_onnx/model_int8.onnx \\
      --baseline_model sentence-transformers/all-MiniLM-L6-v2 --data_paths heldout-chem.json
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

from gaprune.cli import ArgumentParser, finish, positive_int, run

log = logging.getLogger("gaprune.export")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", required=True, help="model folder (dense or pruned) or hub id")
    parser.add_argument("--output_dir", default="output/onnx")
    parser.add_argument("--int8", action="store_true", help="also write model_int8.onnx (dynamic int8 quantization)")
    parser.add_argument("--max_length", type=positive_int, default=512, help="tokens per text when run")
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    from gaprune.checkpoint import output_folder
    from gaprune.export import check_extra, export_onnx
    from gaprune.fileio import atomic_dir, check_output_dir
    from gaprune.modeling import load_embedder

    check_extra()  # before the model loads
    folder = output_folder(args.output_dir, args.model_path, "onnx")
    check_output_dir(args.output_dir)
    check_output_dir(folder, "the export's folder")
    embedder = load_embedder(args.model_path, "cpu", "float32", max_length=args.max_length)
    with atomic_dir(folder) as tmp:
        files = export_onnx(embedder, tmp, args.int8)
    for kind, path in files.items():
        log.info("%s: %s (%.1f MB)", kind, os.path.join(folder, os.path.basename(path)),
                 os.path.getsize(os.path.join(folder, os.path.basename(path))) / 2**20)
    return finish(os.path.join(folder, os.path.basename(files["int8" if args.int8 else "float32"])))


if __name__ == "__main__":
    run(main)
