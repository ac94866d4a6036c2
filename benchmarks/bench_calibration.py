"""The whole calibration (fisher.py general + domain, gradient.py) as three runs against one pass.

    python benchmarks/bench_calibration.py                       # MiniLM, 48 triples per side
    python benchmarks/bench_calibration.py --model_dir PATH --triples 100 --dtype bfloat16
    python benchmarks/bench_calibration.py --published_lengths --triples 24   # 230- and 485-word triples

In one process, on one loaded model, over the same triples (each side's file cut to --triples, and
gradient.py's --max_samples twice that, so its steps draw every triple once): the published settings
(fisher --batch_size 1 twice, gradient --batch_size 2) against gradient_alignment(with_fisher=True), and a
bare forward+backward over the same batches as the floor (its embeddings giving sparse gradients, as in
the scoring stages; PyTorch's dense default is timed beside it). Prints seconds, the ratios (targets: one pass
<= 0.55x three runs; fisher <= 1.05x bare) and the largest relative difference between the one-pass
Fisher arrays and the separate runs'.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_fisher import bare_forward_backward  # this folder is on the path when run as a script
from gpu_check import LENGTHS, synthetic_triples
from gaprune.data import load_triples
from gaprune.fisher_information import fisher_information
from gaprune.gradient_alignment import gradient_alignment
from gaprune.modeling import DEFAULT_MODEL, load_embedder

LAYERS = ["attention", "mlp"]


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def largest_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max()).item() for n in b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=DEFAULT_MODEL)
    parser.add_argument("--general_data", default="data/general-example.json")
    parser.add_argument("--domain_data", default="data/chem-example.json")
    parser.add_argument("--triples", type=int, default=48, help="triples per side")
    parser.add_argument("--published_lengths", action="store_true",
                        help="synthetic triples as long as the published data's (gpu_check.py's) instead of the files")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=2, help="the whole comparison, repeated; the best of each")
    args = parser.parse_args()
    torch.manual_seed(0)
    embedder = load_embedder(args.model_dir, args.device, args.dtype, native_cpu_bfloat16=True)  # as the CLI
    if args.published_lengths:
        general, domain = (synthetic_triples(args.triples, LENGTHS[side], seed) for seed, side in enumerate(LENGTHS))
    else:
        general = load_triples(args.general_data, args.triples)
        domain = load_triples(args.domain_data, args.triples)
    n = min(len(general), len(domain))
    general, domain = general[:n], domain[:n]
    times: dict[str, float] = {}

    def record(name: str, fn):
        result, seconds = timed(fn)
        times[name] = min(times.get(name, float("inf")), seconds)
        return result

    for _ in range(args.rounds):
        single = [[triple] for triple in general + domain]
        record("bare forward+backward (2 x triples)", lambda: bare_forward_backward(embedder, single))
        record("  the same, dense embedding gradients", lambda: bare_forward_backward(embedder, single, False))
        fisher_g = record("fisher.py general", lambda: fisher_information(embedder, general, 1, LAYERS))
        fisher_d = record("fisher.py domain", lambda: fisher_information(embedder, domain, 1, LAYERS))
        record("gradient.py", lambda: gradient_alignment(embedder, general, domain, 2, 2 * n, LAYERS))
        one = record("one pass", lambda: gradient_alignment(embedder, general, domain, 2, 2 * n, LAYERS,
                                                             with_fisher=True))
    three = times["fisher.py general"] + times["fisher.py domain"] + times["gradient.py"]
    fisher_both = times["fisher.py general"] + times["fisher.py domain"]
    print(f"{args.model_dir} on {embedder.device} ({embedder.model.dtype}), {n} triples per side, "
          f"best of {args.rounds}")
    for name, seconds in times.items():
        print(f"  {name:40s} {seconds:8.2f} s")
    print(f"  {'three runs':40s} {three:8.2f} s")
    print(f"one pass / three runs: {times['one pass'] / three:.3f} (target <= 0.55)")
    print(f"fisher / bare forward+backward: {fisher_both / times['bare forward+backward (2 x triples)']:.3f} "
          f"(target <= 1.05)")
    for side, separate in (("general", fisher_g), ("domain", fisher_d)):
        print(f"one-pass {side} Fisher vs fisher.py: largest relative difference "
              f"{largest_relative_difference(one.fisher[side].per_weight, separate.per_weight):.2e}")


if __name__ == "__main__":
    main()
