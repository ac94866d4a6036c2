"""Cross-check of gaprune's Wanda and SparseGPT against another tool's output on the same calibration texts.

    python benchmarks/peer_check.py --texts texts.json \
        --peer wanda=peer/wanda.safetensors sparsegpt=peer/sparsegpt.safetensors sparsegpt:2:4=peer/sparsegpt_2of4.safetensors

``--texts`` is a JSON list of the calibration strings the peer used; each ``--peer`` entry names a method
(``wanda``, ``sparsegpt``, optionally ``:2:4``) and a safetensors file of the peer's pruned MLP weights
(e.g. llm-compressor's ``oneshot`` on the same model, run in its own environment: nothing here imports
it). For each, gaprune prunes the same model on the same texts (at most --max_length tokens each) and
prints the seconds it took, how much of the peer's mask it shares, tensor by tensor, and, with
--heldout files, nDCG@10 of both pruned models.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from safetensors.torch import load_file

import gaprune
from gaprune.data import load_triples
from gaprune.evaluation import evaluate_triples
from gaprune.modeling import DEFAULT_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--texts", required=True)
    parser.add_argument("--peer", nargs="+", required=True, metavar="METHOD[:N:M]=FILE")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--heldout", nargs="*", default=[], help="triple files to evaluate both pruned models on")
    parser.add_argument("--heldout_size", type=int, default=500)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with open(args.texts, encoding="utf-8") as handle:
        texts = json.load(handle)
    calibration = gaprune.CalibrationSpec(domain_data=texts, batch_size=args.batch_size, max_length=args.max_length)
    heldout = {path: load_triples(path, args.heldout_size) for path in args.heldout}
    print(f"{args.model}: {len(texts)} calibration texts of at most {args.max_length} tokens, "
          f"{torch.get_num_threads()} CPU threads")
    for entry in args.peer:
        spec, _, path = entry.partition("=")
        method, _, pattern = spec.partition(":")
        peer_weights = load_file(path)
        ours = gaprune.load_embedder(args.model, "cpu", "float32")
        start = time.perf_counter()
        gaprune.prune(ours, gaprune.PruneSpec(scorer=method, sparsity=0.0 if pattern else 0.5,
                                              pattern=pattern or "unstructured", calibration=calibration))
        seconds = time.perf_counter() - start
        named = dict(ours.model.named_parameters())
        print(f"\n{spec}: gaprune {seconds:.1f} s")
        shared_total = peer_total = 0
        for name, peer in peer_weights.items():
            mine, theirs = named[name].detach() == 0, peer == 0
            shared, count = int((mine & theirs).sum()), int(theirs.sum())
            shared_total, peer_total = shared_total + shared, peer_total + count
            print(f"  {name:45s} mask shared {shared / count:7.2%}  kept weights max |diff| "
                  f"{(named[name].detach() - peer)[~theirs & ~mine].abs().max().item():.2e}")
        print(f"  all MLP weights: {shared_total / peer_total:.2%} of the peer's mask shared")
        if heldout:
            theirs_model = gaprune.load_embedder(args.model, "cpu", "float32")
            with torch.no_grad():
                for name, peer in peer_weights.items():
                    dict(theirs_model.model.named_parameters())[name].copy_(peer)
            for file, triples in heldout.items():
                scores = [evaluate_triples(model, triples)["metrics"]["ndcg@10"] for model in (ours, theirs_model)]
                print(f"  nDCG@10 on {file}: gaprune {scores[0]:.4f}, peer {scores[1]:.4f}")


if __name__ == "__main__":
    main()
