"""Fisher stage speed: gaprune's fisher_information against a bare forward+backward over the same batches.

    python benchmarks/bench_fisher.py --data_path data/chem-example.json --triples 20 --batch_size 4 \
        --layers 4 --hidden 256 --intermediate 768
    python benchmarks/bench_fisher.py --model_dir PATH ...        # an existing model folder instead

Prints seconds, the ratio fisher / bare (target <= 1.3), tokens/s and, on CUDA, peak GPU memory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

import torch

from gaprune.data import batched, load_triples
from gaprune.loss import triplet_loss
from gaprune.fisher_information import fisher_information
from gaprune.layers import sparse_embedding_gradients
from gaprune.modeling import load_embedder
from gaprune.toy_models import build_qwen3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward_backward(embedder, batches, sparse_embeddings: bool = True) -> float:
    """Seconds for the forward and backward passes alone; with ``sparse_embeddings`` the embeddings give
    sparse gradients, as in the scoring stages (the stricter floor), else PyTorch's dense default."""
    start = time.perf_counter()
    with sparse_embedding_gradients(embedder.model) if sparse_embeddings else contextlib.nullcontext():
        for batch in batches:
            embedder.model.zero_grad(set_to_none=True)
            triplet_loss(embedder, batch).backward()
    sync(embedder.device)
    return time.perf_counter() - start


def count_tokens(embedder, triples) -> int:
    texts = [t[k] for t in triples for k in ("query", "positive", "negative")]
    return sum(len(ids) for ids in embedder.tokenizer(texts, truncation=True, max_length=embedder.max_length)["input_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", help="existing model folder; otherwise a random Qwen3 of the shape below")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--vocab_size", type=int, default=0, help="embedding rows (default: the toy tokenizer's)")
    parser.add_argument("--data_path", default="data/chem-example.json")
    parser.add_argument("--triples", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--sparsify_layers", nargs="+", default=["attention", "mlp"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    args = parser.parse_args()

    triples = load_triples(args.data_path, args.triples)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = build_qwen3(os.path.join(tmp, "model"), hidden_size=args.hidden,
                                    intermediate_size=args.intermediate, num_layers=args.layers,
                                    num_heads=args.heads, num_kv_heads=args.kv_heads, vocab_size=args.vocab_size,
                                    extra_text=[t[k] for t in triples for k in ("query", "positive", "negative")])
        embedder = load_embedder(model_dir, args.device, args.dtype)
        device = embedder.device
        params = sum(p.numel() for p in embedder.model.parameters())
        batches = batched(triples, min(args.batch_size, len(triples)))
        tokens = count_tokens(embedder, triples)

        bare_forward_backward(embedder, batches[:1])  # warm-up
        bare, fisher = [], []
        for _ in range(args.repeats):
            bare.append(bare_forward_backward(embedder, batches))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            fisher_information(embedder, triples, args.batch_size, args.sparsify_layers)
            sync(device)
            fisher.append(time.perf_counter() - start)

    print(f"model: {model_dir if args.model_dir else f'random Qwen3 {args.layers}x{args.hidden} (intermediate {args.intermediate})'}"
          f", {params / 1e6:.1f} M parameters, {embedder.model.dtype}, {device}, torch threads {torch.get_num_threads()}")
    print(f"data: {len(triples)} triples, batch {args.batch_size}, {tokens} tokens")
    print(f"bare forward+backward: {min(bare):.3f} s (sparse embedding gradients, as fisher_information)")
    print(f"fisher_information:    {min(fisher):.3f} s")
    print(f"ratio fisher / bare:   {min(fisher) / min(bare):.3f}")
    print(f"tokens/s (fisher):     {tokens / min(fisher):.0f}")
    if device.type == "cuda":
        print(f"peak GPU memory:       {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())
