"""fisher.py in bfloat16 against float32 on this CPU: time, and how far the scores and the mask move.

    python benchmarks/bench_bfloat16.py                                  # MiniLM, 48 chemistry triples
    python benchmarks/bench_bfloat16.py --model_dir PATH --triples 12

`--dtype auto` computes the scoring stages in bfloat16 on CPUs with native bfloat16 (AVX512-BF16, AMX).
This prints, for both dtypes, the best of --rounds timings of fisher_information (batch 1), then the
median and 90th-percentile relative difference of the per-weight Fisher values, the rank correlation of
the Fisher saliency F * w^2 over the MLP weights, and the share of the 50% saliency mask both dtypes
choose.
"""

from __future__ import annotations

import argparse
import time

import torch

from gaprune.data import load_triples
from gaprune.fisher_information import fisher_information
from gaprune.layers import select_parameters
from gaprune.masking import prune_lowest
from gaprune.modeling import DEFAULT_MODEL, cpu_has_native_bfloat16, load_embedder

SAMPLED = 2_000_000  # weights whose ranks are correlated (sorting all of an 8B model's would not fit)


def ranks(x: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(x)).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=DEFAULT_MODEL)
    parser.add_argument("--data_path", default="data/chem-example.json")
    parser.add_argument("--triples", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    triples = load_triples(args.data_path, args.triples)
    seconds: dict[str, float] = {}
    fisher: dict[str, dict[str, torch.Tensor]] = {}
    for _ in range(args.rounds):
        for dtype in ("float32", "bfloat16"):
            embedder = load_embedder(args.model_dir, "cpu", dtype)
            start = time.perf_counter()
            fisher[dtype] = fisher_information(embedder, triples, 1, ["attention", "mlp"]).per_weight
            seconds[dtype] = min(seconds.get(dtype, float("inf")), time.perf_counter() - start)
    weights = select_parameters(load_embedder(args.model_dir, "cpu", "float32").model.named_parameters(), ["mlp"])
    f32, bf16 = fisher["float32"], fisher["bfloat16"]
    relative = torch.cat([((bf16[n] - f32[n]).abs() / f32[n]).flatten() for n in weights])
    sample = torch.randperm(relative.numel(), generator=torch.Generator().manual_seed(0))[:SAMPLED]

    def saliency(scores: dict[str, torch.Tensor]):
        return lambda name, weight: (scores[name] * weight.detach().float() ** 2).flatten()
    flat = {dtype: torch.cat([saliency(scores)(n, w) for n, w in weights.items()]) for dtype, scores in fisher.items()}
    correlation = torch.corrcoef(torch.stack([ranks(flat["float32"][sample]), ranks(flat["bfloat16"][sample])]))[0, 1]
    masks = {dtype: prune_lowest(weights, saliency(scores), 0.5, keep_masks=True, apply=False).masks
             for dtype, scores in fisher.items()}
    shared = sum(int((masks["float32"][n] & masks["bfloat16"][n]).sum()) for n in weights)
    chosen = sum(int(masks["float32"][n].sum()) for n in weights)
    print(f"{args.model_dir}, {len(triples)} triples, CPU with native bfloat16: {cpu_has_native_bfloat16()}")
    print(f"fisher_information float32 {seconds['float32']:.1f} s, bfloat16 {seconds['bfloat16']:.1f} s "
          f"({seconds['float32'] / seconds['bfloat16']:.2f}x)")
    print(f"per-weight Fisher, bfloat16 against float32: median relative difference "
          f"{relative[sample].median():.2%}, 90th percentile {relative[sample].quantile(0.9):.2%}")
    print(f"rank correlation of F*w^2 over the MLP weights: {correlation:.5f}")
    print(f"50% saliency mask shared: {shared / chosen:.2%}")


if __name__ == "__main__":
    main()
