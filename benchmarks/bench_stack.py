"""Pruning stacked with int8: encode throughput and held-out nDCG@10 of the dense and a pruned model, each in
PyTorch float32, PyTorch dynamic int8 (torch.ao.quantization.quantize_dynamic of the Linear layers) and as an
onnxruntime int8 export (gaprune/model/export.py --int8), side by side in one run.

    python benchmarks/bench_stack.py --pruned output/model/FOLDER --dense_onnx output/onnx/DENSE_onnx/model_int8.onnx \\
        --pruned_onnx output/onnx/FOLDER_onnx/model_int8.onnx --heldout output/gcide/chem-heldout.json \\
        output/gcide/general-heldout.json

Every variant encodes the same texts in batches of --batch_size, the variants in turn within each round; the
best of --rounds rounds is reported (needs pip install -e .[onnx]).
"""

from __future__ import annotations

import argparse
import time

import torch

from gaprune.data import load_triples, triple_texts
from gaprune.evaluation import evaluate_triples
from gaprune.export import OnnxEmbedder
from gaprune.modeling import DEFAULT_MODEL, load_embedder


def dynamic_int8(embedder):
    """The embedder with its Linear layers quantized to int8 weights, activations quantized on the fly."""
    embedder.model = torch.ao.quantization.quantize_dynamic(embedder.model, {torch.nn.Linear}, dtype=torch.qint8)
    return embedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", default=DEFAULT_MODEL)
    parser.add_argument("--pruned", required=True)
    parser.add_argument("--dense_onnx", required=True)
    parser.add_argument("--pruned_onnx", required=True)
    parser.add_argument("--heldout", nargs="+", required=True, help="triple files: timing texts and nDCG@10")
    parser.add_argument("--size", type=int, default=100, help="triples per held-out file")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    models = {"dense, PyTorch float32": load_embedder(args.dense, "cpu", "float32"),
              "pruned, PyTorch float32": load_embedder(args.pruned, "cpu", "float32"),
              "dense, PyTorch dynamic int8": dynamic_int8(load_embedder(args.dense, "cpu", "float32")),
              "pruned, PyTorch dynamic int8": dynamic_int8(load_embedder(args.pruned, "cpu", "float32")),
              "dense, onnxruntime int8": OnnxEmbedder(args.dense_onnx),
              "pruned, onnxruntime int8": OnnxEmbedder(args.pruned_onnx)}
    heldout = {path: load_triples(path, args.size) for path in args.heldout}
    texts = triple_texts(next(iter(heldout.values())))
    best = dict.fromkeys(models, float("inf"))
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            with torch.no_grad():
                model.encode(texts, args.batch_size, progress=False) if hasattr(model, "model") else \
                    model.encode(texts, args.batch_size)
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"{len(texts)} texts, batch {args.batch_size}, {torch.get_num_threads()} threads, best of {args.rounds}")
    print("| variant | texts/s | × dense float32 | " + " | ".join(f"nDCG@10 {p.split('/')[-1]}" for p in heldout) + " |")
    print("|---|---|---|" + "---|" * len(heldout))
    dense = best["dense, PyTorch float32"]
    for name, model in models.items():
        scores = [evaluate_triples(model, triples, args.batch_size)["metrics"]["ndcg@10"] for triples in heldout.values()]
        print(f"| {name} | {len(texts) / best[name]:.1f} | {dense / best[name]:.2f} | "
              + " | ".join(f"{s:.4f}" for s in scores) + " |")


if __name__ == "__main__":
    main()
