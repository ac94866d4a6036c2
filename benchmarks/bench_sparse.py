"""SparseModel speed and memory on a random Qwen3 of a chosen shape with random score files.

    python benchmarks/bench_sparse.py --layers 1 2 4 --hidden 2560 --intermediate 9728 --heads 32 --kv_heads 8

For each layer count: builds the model (bfloat16 on disk, like Qwen3-Embedding), writes random
general/domain Fisher and alignment files for its MLP weights, runs SparseModel.py at 50% in a
subprocess, and prints seconds, peak RSS and the loaded model's bytes (target: RSS <= 1.3 x model + 1 GB).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from gaprune.layers import select_parameters
from gaprune.checkpoint import checkpoint_shapes
from gaprune.results import AlignmentResult, FisherResult
from gaprune.scorefiles import save_alignment, save_fisher
from gaprune.toy_models import build_qwen3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_score_files(model_dir: str, folder: str) -> dict[str, str]:
    """General and domain Fisher files and an alignment file for the model's MLP weights, written by
    gaprune's own writers; the arrays are drawn one tensor at a time as they are written."""
    shapes = checkpoint_shapes(model_dir)
    mlp = select_parameters(((n, torch.empty(s, device="meta")) for n, s in shapes.items()), ["mlp"])
    generator = torch.Generator().manual_seed(0)

    def fisher_arrays():
        return LazyArrays(mlp, lambda shape: torch.rand(shape, generator=generator).pow(4) * 1e-6 + 1e-8)

    files = {}
    for side in ("general", "domain"):
        result = FisherResult(per_weight=fisher_arrays(), mean_scores={n: 0.0 for n in shapes}, shapes=shapes,
                              num_samples=0, first_loss=0.0, mean_loss=0.0, batch_size=1, layer_types=["mlp"],
                              compute_dtype="float32")
        files[side] = save_fisher(result, folder, f"{side}.json", model_dir)
    alignment = AlignmentResult(
        alignment_scores={n: 0.0 for n in shapes}, conflict_rates={n: 0.0 for n in shapes}, cosine={},
        losses={"general": None, "domain": None, "mixed": None},
        elementwise=LazyArrays(mlp, lambda shape: torch.rand(shape, generator=generator) * 2e-4 - 1e-4),
        processed_batches=0, total_samples_processed=0, shapes=shapes, batch_size=2, max_samples=0, seed=0,
        alignment_mode="product", layer_types=["mlp"], compute_dtype="float32", general_data_size=0,
        domain_data_size=0)
    files["alignment"] = save_alignment(alignment, folder, model_dir, "general.json", "domain.json", False)
    return files


class LazyArrays(dict):
    """Parameter name -> array, each drawn only when ``values()`` reaches it (one array in memory at a time)."""

    def __init__(self, parameters, draw):
        super().__init__({name: p for name, p in parameters.items()})
        self._draw = draw

    def values(self):
        return (self._draw(p.shape) for p in super().values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--intermediate", type=int, default=9728)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=8)
    parser.add_argument("--dtype", default="auto", help="SparseModel's --dtype (auto: float32 on CPU)")
    args = parser.parse_args()

    rows = []
    for layers in args.layers:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = build_qwen3(os.path.join(tmp, f"qwen3-{layers}x{args.hidden}"), hidden_size=args.hidden,
                                    intermediate_size=args.intermediate, num_layers=layers, num_heads=args.heads,
                                    num_kv_heads=args.kv_heads, dtype=torch.bfloat16)
            files = random_score_files(model_dir, tmp)
            command = [sys.executable, os.path.join(REPO, "gaprune/model/SparseModel.py"), "--model_path", model_dir,
                       "--output_dir", os.path.join(tmp, "out"), "--sparsify_layers", "mlp", "--unstructured_pct",
                       "0.5", "--general_fisher_scores", files["general"], "--domain_fisher_scores", files["domain"],
                       "--alignment_scores", files["alignment"], "--dtype", args.dtype]
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            start = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if proc.returncode:
                sys.exit(proc.stderr)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
            if peak <= before * 1024:
                print("warning: peak RSS not above an earlier run's; run one layer count per process", file=sys.stderr)
            shapes = checkpoint_shapes(model_dir)
            params = sum(torch.Size(s).numel() for s in shapes.values())
            weights = sum(torch.Size(s).numel() for n, s in shapes.items() if "mlp" in n)
            loaded = params * (2 if args.dtype == "bfloat16" else 4)
            rows.append((layers, params, weights, seconds, peak, loaded))
            print(f"{layers} layers: {params / 1e6:.0f} M params, {weights / 1e6:.0f} M MLP weights, "
                  f"{seconds:.1f} s, peak RSS {peak / 2**30:.2f} GiB, model {loaded / 2**30:.2f} GiB, "
                  f"target {(1.3 * loaded + 2**30) / 2**30:.2f} GiB", flush=True)
    print("\nlayers  params(M)  mlp(M)  seconds  s/G-weights  peakRSS(GiB)  model(GiB)  RSS/(1.3*model+1GiB)")
    for layers, params, weights, seconds, peak, loaded in rows:
        print(f"{layers:6d}  {params / 1e6:9.0f}  {weights / 1e6:6.0f}  {seconds:7.1f}  {seconds / weights * 1e9:11.1f}"
              f"  {peak / 2**30:12.2f}  {loaded / 2**30:10.2f}  {peak / (1.3 * loaded + 2**30):20.2f}")


if __name__ == "__main__":
    main()
