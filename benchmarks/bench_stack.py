"""Pruning stacked with int8: encode throughput, file size and held-out nDCG@10 of the dense model and of one or
more pruned folders (whole layers, a budget's layers and channels, ...), each in PyTorch float32, PyTorch dynamic
int8 (torch.ao.quantization.quantize_dynamic of the Linear layers) and as an onnxruntime int8 export
(gaprune/model/export.py --int8), side by side in one run.

    python benchmarks/bench_stack.py --pruned output/model/LAYERS output/model/BUDGET \
        --dense_onnx output/onnx/DENSE_onnx/model_int8.onnx \
        --pruned_onnx output/onnx/LAYERS_onnx/model_int8.onnx output/onnx/BUDGET_onnx/model_int8.onnx \
        --heldout output/gcide/chem-heldout.json output/gcide/general-heldout.json

Every variant encodes the same texts in batches of --batch_size, the variants in turn within each round; the
best of --rounds rounds is reported, with each variant's speed against the dense model in the same runtime.
The file is the folder's model.safetensors for PyTorch (dynamic int8 quantises it when loading) and the .onnx
file for onnxruntime (needs pip install -e .[onnx]).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from gaprune.data import load_triples, triple_texts
from gaprune.evaluation import evaluate_triples
from gaprune.export import OnnxEmbedder
from gaprune.modeling import DEFAULT_MODEL, load_embedder, resolve_model_dir


def dynamic_int8(embedder):
    """The embedder with its Linear layers quantized to int8 weights, activations quantized on the fly."""
    embedder.model = torch.ao.quantization.quantize_dynamic(embedder.model, {torch.nn.Linear}, dtype=torch.qint8)
    return embedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", default=DEFAULT_MODEL)
    parser.add_argument("--pruned", nargs="+", required=True, help="pruned folders")
    parser.add_argument("--dense_onnx", required=True)
    parser.add_argument("--pruned_onnx", nargs="+", required=True, help="their int8 exports, in the same order")
    parser.add_argument("--heldout", nargs="+", required=True, help="triple files: timing texts and nDCG@10")
    parser.add_argument("--size", type=int, default=100, help="triples per held-out file")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if len(args.pruned) != len(args.pruned_onnx):
        parser.error("give one --pruned_onnx per --pruned folder")
    named = {"dense": (args.dense, args.dense_onnx),
             **{os.path.basename(os.path.normpath(f)): (f, o) for f, o in zip(args.pruned, args.pruned_onnx)}}
    models, files = {}, {}
    for runtime in ("PyTorch float32", "PyTorch dynamic int8", "onnxruntime int8"):
        for name, (folder, onnx) in named.items():
            key = (name, runtime)
            if runtime == "onnxruntime int8":
                models[key], files[key] = OnnxEmbedder(onnx), onnx
            else:
                embedder = load_embedder(folder, "cpu", "float32")
                models[key] = dynamic_int8(embedder) if runtime == "PyTorch dynamic int8" else embedder
                files[key] = os.path.join(resolve_model_dir(folder), "model.safetensors")
    heldout = {path: load_triples(path, args.size) for path in args.heldout}
    texts = triple_texts(next(iter(heldout.values())))
    best = dict.fromkeys(models, float("inf"))
    for _ in range(args.rounds):
        for key, model in models.items():
            start = time.perf_counter()
            with torch.no_grad():
                model.encode(texts, args.batch_size, progress=False) if hasattr(model, "model") else \
                    model.encode(texts, args.batch_size)
            best[key] = min(best[key], time.perf_counter() - start)
    print(f"{len(texts)} texts, batch {args.batch_size}, {torch.get_num_threads()} threads, best of {args.rounds}")
    print("| model | runtime | texts/s | × dense float32 | × dense, same runtime | file MB | "
          + " | ".join(f"nDCG@10 {p.split('/')[-1]}" for p in heldout) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(heldout))
    dense = best["dense", "PyTorch float32"]
    for (name, runtime), model in models.items():
        scores = [evaluate_triples(model, triples, args.batch_size)["metrics"]["ndcg@10"]
                  for triples in heldout.values()]
        size = os.path.getsize(files[name, runtime]) / 1e6 if os.path.isfile(files[name, runtime]) else float("nan")
        print(f"| {name} | {runtime} | {len(texts) / best[name, runtime]:.1f} | {dense / best[name, runtime]:.2f} | "
              f"{best['dense', runtime] / best[name, runtime]:.2f} | {size:.1f} | "
              + " | ".join(f"{s:.4f}" for s in scores) + " |")


if __name__ == "__main__":
    main()
