"""Encoding speed and file size of a dense model against its channel-pruned version, side by side.

    python benchmarks/bench_inference.py                       # MiniLM, 50% of MLP channels removed
    python benchmarks/bench_inference.py --pruned output/model/all-MiniLM-L6-v2_aligned_saliency_channels_50%

Without --pruned, the pruned model is made here by removing --structured_pct of every layer's MLP channels
by magnitude (speed and size depend on the shapes, not on which channels go). Both models encode the same
texts (queries, positives and negatives of data/*-example.json, batch 32), batch by batch in turn; the
best of several rounds is reported as texts/s, with the ratio and the weight files' sizes. On CUDA the models also
run in bfloat16. The parameter counts of the Qwen3-Embedding shapes with the same share removed are
printed from their configs (nothing is downloaded).

On CUDA (compute capability 8.0+) it also races the dense model against a 2:4 copy in bfloat16 whose MLP
weights are stored as PyTorch semi-structured sparse tensors (`to_sparse_semi_structured`), the one
sparse pattern GPUs still accelerate; elsewhere that row says why it was skipped.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import torch

import gaprune
from gaprune.data import load_triples
from gaprune.layers import select_parameters
from gaprune.modeling import DEFAULT_MODEL, resolve_model_dir
from gaprune.toy_models import QWEN3_EMBEDDING_SHAPES, qwen3_parameter_count

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = [os.path.join(REPO, "data", name) for name in ("chem-example.json", "general-example.json")]


def example_texts(count: int) -> list[str]:
    texts = [t[key] for path in DATA for t in load_triples(path) for key in ("query", "positive", "negative")]
    return [texts[i % len(texts)] for i in range(count)]


def weight_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def race(embedders: dict, texts: list[str], batch_size: int, rounds: int) -> dict[str, float]:
    """Texts/s of each model: batch by batch in turn (so load from elsewhere hits both alike), after one
    full warm-up pass each (the first pass over new sequence lengths is several times slower); the best
    of ``rounds`` totals."""
    labels = list(embedders)
    for embedder in embedders.values():
        embedder.encode(texts, batch_size, progress=False)
    best = {label: float("inf") for label in labels}
    for _ in range(rounds):
        seconds = dict.fromkeys(labels, 0.0)
        for start in range(0, len(texts), batch_size):
            for label, embedder in embedders.items():
                synchronize(embedder.device)
                begin = time.perf_counter()
                embedder.encode(texts[start:start + batch_size], batch_size, progress=False)
                synchronize(embedder.device)
                seconds[label] += time.perf_counter() - begin
        best = {label: min(best[label], seconds[label]) for label in labels}
    return {label: len(texts) / value for label, value in best.items()}


def semi_structured_copy(model: str, texts: list[str]):
    """The model in bfloat16 on CUDA with 2:4 magnitude masks on its MLP weights, stored as semi-structured
    sparse tensors (cuSPARSELt), with the largest difference of its embeddings from the masked dense copy's;
    or the reason it cannot run here."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability() < (8, 0):
        return f"compute capability {torch.cuda.get_device_capability()} < 8.0"
    if not torch.backends.cusparselt.is_available():
        return "this PyTorch build has no cuSPARSELt"
    from torch.sparse import to_sparse_semi_structured

    embedder = gaprune.load_embedder(model, "cuda", "bfloat16")
    gaprune.prune(embedder, gaprune.PruneSpec(scorer="magnitude", pattern="2:4"))
    masked = embedder.encode(texts[:64], progress=False)
    mlp = set(select_parameters(embedder.model.named_parameters(), ["mlp"]))
    try:
        for name, module in embedder.model.named_modules():
            if isinstance(module, torch.nn.Linear) and f"{name}.weight" in mlp:
                module.weight = torch.nn.Parameter(to_sparse_semi_structured(module.weight.detach()),
                                                   requires_grad=False)
        difference = (embedder.encode(texts[:64], progress=False) - masked).abs().max().item()
    except RuntimeError as err:
        return f"semi-structured kernels failed: {str(err).splitlines()[0]}"
    return embedder, difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="dense model folder or id (default: MiniLM)")
    parser.add_argument("--pruned", help="a SparseModel.py --structure channels folder (default: made here)")
    parser.add_argument("--structured_pct", type=float, default=0.5, help="share of MLP channels removed here")
    parser.add_argument("--texts", type=int, default=384)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True,
                        help="also race on the CPU in float32 (--no-cpu: CUDA rows only, for large models)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    texts = example_texts(args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        pruned = args.pruned
        if pruned is None:
            embedder = gaprune.load_embedder(args.model, "cpu", "float32")
            gaprune.prune(embedder, gaprune.PruneSpec(scorer="magnitude", structure="channels",
                                                      sparsity=args.structured_pct))
            pruned = os.path.join(tmp, "pruned")
            gaprune.save_model(embedder, pruned)
        folders = {"dense": resolve_model_dir(args.model), "pruned": pruned}
        sizes = {label: weight_bytes(folder) for label, folder in folders.items()}
        settings = ([("cpu", "float32")] if args.cpu else []) + ([("cuda", "float32"), ("cuda", "bfloat16")]
                                                                if torch.cuda.is_available() else [])
        results = [(device, dtype, race({label: gaprune.load_embedder(folder, device, dtype)
                                         for label, folder in folders.items()}, texts, args.batch_size, args.rounds))
                   for device, dtype in settings]
        sparse = semi_structured_copy(args.model, texts)
        semi = None
        if not isinstance(sparse, str):
            try:
                semi = race({"dense": gaprune.load_embedder(args.model, "cuda", "bfloat16"), "2:4": sparse[0]}, texts,
                            args.batch_size, args.rounds)
            except RuntimeError as err:  # the other rows still print
                sparse = f"the 2:4 race failed: {str(err).splitlines()[0]}"

    print(f"{args.model} against {pruned}: {len(texts)} texts of the example data, batch {args.batch_size}, "
          f"best of {args.rounds} rounds, batches in turn, {torch.get_num_threads()} CPU threads")
    print("| device | dtype | dense texts/s | pruned texts/s | speed-up |")
    print("|---|---|---|---|---|")
    for device, dtype, speed in results:
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        print(f"| {name} | {dtype} | {speed['dense']:.1f} | {speed['pruned']:.1f} | "
              f"{speed['pruned'] / speed['dense']:.2f}x |")
    if semi is None:
        print(f"2:4 semi-structured MLP weights: skipped ({sparse})")
    else:
        print(f"| {torch.cuda.get_device_name()} | bfloat16, 2:4 MLP | {semi['dense']:.1f} | {semi['2:4']:.1f} | "
              f"{semi['2:4'] / semi['dense']:.2f}x |")
        print(f"2:4 kernels against the masked dense copy: largest embedding difference {sparse[1]:.2e}")
    print(f"weight files: dense {sizes['dense'] / 1e6:.1f} MB, pruned {sizes['pruned'] / 1e6:.1f} MB "
          f"({1 - sizes['pruned'] / sizes['dense']:.1%} smaller)")
    for name, shape in QWEN3_EMBEDDING_SHAPES.items():
        dense = qwen3_parameter_count(shape)
        smaller = qwen3_parameter_count(shape, intermediate_size=round(shape["intermediate_size"]
                                                                        * (1 - args.structured_pct)))
        print(f"{name}: {dense / 1e9:.2f} B parameters, {smaller / 1e9:.2f} B with {args.structured_pct:.0%} of MLP "
              f"channels removed ({1 - smaller / dense:.1%} smaller)")


if __name__ == "__main__":
    main()
