"""Time of the activation-aware pruners on one model: Wanda, SparseGPT and reconstruction under a mask.

    python benchmarks/bench_pruners.py                      # MiniLM MLP, 1,200 texts of at most 128 tokens

The calibration texts are the queries, positives and negatives of data/*-example.json, repeated to
--texts. Each method prunes a fresh copy of the model at 50% (and SparseGPT at 2:4, with tokens weighted by
the loss's gradients, the texts taken as triples, and towards the dense model's outputs) and the seconds of
the whole call (calibration pass included, model loading excluded) are printed with the peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import resource
import time

import torch

import gaprune
from gaprune.data import load_triples, triple_texts
from gaprune.modeling import DEFAULT_MODEL
from gaprune.options import OWN_TARGET, UNIFORM_WEIGHTING
from gaprune.pruning import option_words

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = [("wanda", "unstructured", False, UNIFORM_WEIGHTING, OWN_TARGET),
        ("sparsegpt", "unstructured", False, UNIFORM_WEIGHTING, OWN_TARGET),
        ("sparsegpt", "2:4", False, UNIFORM_WEIGHTING, OWN_TARGET),
        ("magnitude", "unstructured", True, UNIFORM_WEIGHTING, OWN_TARGET),
        ("sparsegpt", "unstructured", False, "loss_gradient", OWN_TARGET),
        ("sparsegpt", "unstructured", False, UNIFORM_WEIGHTING, "dense")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--texts", type=int, default=1200)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    pool = [text for name in ("chem-example.json", "general-example.json")
            for text in triple_texts(load_triples(os.path.join(REPO, "data", name)))]
    texts = [pool[i % len(pool)] for i in range(args.texts)]
    calibration = gaprune.CalibrationSpec(domain_data=texts, batch_size=args.batch_size, max_length=args.max_length)
    print(f"{args.model}: MLP weights at 50%, {len(texts)} calibration texts of at most {args.max_length} tokens, "
          f"{torch.get_num_threads()} CPU threads")
    print("| method | pattern | seconds | peak RSS (GiB) |")
    print("|---|---|---|---|")
    for scorer, pattern, reconstruct, weighting, target in RUNS:
        embedder = gaprune.load_embedder(args.model, args.device)
        start = time.perf_counter()
        spec = gaprune.PruneSpec(scorer=scorer, sparsity=0.5 if pattern == "unstructured" else 0.0, pattern=pattern,
                                 reconstruct=reconstruct, reconstruction_target=target,
                                 calibration=dataclasses.replace(calibration, weighting=weighting))
        gaprune.prune(embedder, spec)
        if embedder.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        options = spec.pruner_options()
        label = scorer + (" + reconstruction" if reconstruct else "") + "".join(f", {words}"
                                                                             for words in option_words(options))
        print(f"| {label} | {pattern} | {seconds:.1f} | {peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
