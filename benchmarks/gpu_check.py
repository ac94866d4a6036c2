"""One command for a GPU machine: every stage on random Qwen3-Embedding-shaped models, timed and measured.

    python benchmarks/gpu_check.py                         # 0.6B, 4B and 8B shapes, bfloat16, on CUDA
    python benchmarks/gpu_check.py --shapes 0.6B 4B --nproc 2    # the calibration stages under torchrun
    python benchmarks/gpu_check.py --one_pass              # also gradient.py --fisher_output_dir (one pass)
    python benchmarks/gpu_check.py --plan_only --capacity_gb 80   # the memory plans of the full shapes, any machine
    python benchmarks/gpu_check.py --plan_only --nproc 4          # ... on 4 GPUs (auto may shard the sums)

Builds each model from its published config (no download; the embedding matrix has the real vocabulary),
scores the MLP weights (Fisher files in bfloat16, to fit the device machine's disk), writes synthetic triples as long as the published data's (general about 230 words, chemistry about 485
per triple), and runs sample -> fisher (general, domain) -> gradient -> SparseModel (50% of MLP
weights) -> evaluate, each stage a process of its own. Prints per stage: seconds, tokens/s, the peak
memory (GPU: max allocated; CPU: resident) and what the stage's memory plan estimated beforehand.
On a CPU it runs a 2-layer slice of each shape (--layers to change), stored in bfloat16 as the published
checkpoints are and computed in float32. 8B needs about 75 GB of
disk for its model, score files and pruned copy (80 GB with --one_pass; 4B: 38 and 41 GB); each shape's
files are deleted before the next.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from gaprune.toy_models import QWEN3_EMBEDDING_SHAPES, build_qwen3

GB = 1024 ** 3
WORDS = ("acid base buffer titration catalyst polymer enzyme crystal lattice solvent reaction bond electron "
         "oxidation reduction molecule isotope spectrum chromatography ligand metal salt solution pressure "
         "temperature energy kinetic equilibrium gas liquid solid river city market travel music history "
         "science garden weather football recipe school computer network language country season mountain "
         "ocean forest bridge station museum library village harbour painting theatre").split()
LENGTHS = {"general": 230, "chem": 485}  # words per triple in the published data
REQUIRED_STAGES = ("sample (general)", "fisher (general)", "fisher (chem)", "gradient")  # the rest are extra rows


def synthetic_triples(count: int, words_per_triple: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))
    query = max(8, words_per_triple // 12)
    document = (words_per_triple - query) // 2
    return [{"query": text(query), "positive": text(document), "negative": text(document)} for _ in range(count)]


def stage_peak() -> None:
    """Run as ``gpu_check.py --stage MODULE ARGS...``: the stage's main, then its peak memory on stderr."""
    module, argv = sys.argv[2], sys.argv[3:]

    from gaprune.memory import peak_rss

    def report() -> None:
        rss = peak_rss()
        gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        print(f"GPU_CHECK_PEAK rss={rss} gpu={gpu}", file=sys.stderr, flush=True)
    import atexit
    import runpy
    atexit.register(report)
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__")


def run_stage(module: str, args: list[str], nproc: int, required: bool = True) -> dict:
    """One stage in its own process (torchrun with ``nproc`` > 1): seconds, peaks, plan, last stdout line. A
    failed stage ends the check, unless not ``required``: then its row says why and the check goes on."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    start = time.perf_counter()
    done = subprocess.run([*launcher, os.path.abspath(__file__), "--stage", module, *args],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        if required:
            sys.exit(f"{module} failed:\n{done.stderr[-4000:]}")
        print(done.stderr[-4000:], file=sys.stderr)
        lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("GPU_CHECK_PEAK")]
        reason = (lines or [f"exit status {done.returncode}"])[-1]
        return {"seconds": seconds, "failed": reason[:120].replace("|", "/")}  # a markdown table cell
    peaks = [tuple(map(int, m)) for m in re.findall(r"GPU_CHECK_PEAK rss=(\d+) gpu=(\d+)", done.stderr)]
    plan = re.search(r"memory plan \(.*?= ([\d.]+) GB", done.stderr)
    host_plan = re.search(r"; host .*?= ([\d.]+) GB", done.stderr)
    return {"seconds": seconds, "rss": max(p[0] for p in peaks), "gpu": max(p[1] for p in peaks),
            "plan": float(plan.group(1)) * GB if plan else None,
            "host_plan": float(host_plan.group(1)) * GB if host_plan else None,
            "output": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""}


def token_count(model_dir: str, triples: list[dict], max_length: int, keys=("query", "positive", "negative")) -> int:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return sum(len(tokenizer(t[k], truncation=True, max_length=max_length)["input_ids"]) for t in triples for k in keys)


def check_shape(name: str, shape: dict, args: argparse.Namespace, folder: str, on_gpu: bool) -> list[dict]:
    layers = shape["num_hidden_layers"] if on_gpu and not args.layers else (args.layers or 2)
    data = {side: synthetic_triples(args.triples, words, seed) for seed, (side, words) in enumerate(LENGTHS.items())}
    paths = {}
    for side, triples in data.items():
        paths[side] = os.path.join(folder, f"{side}-synthetic.json")
        with open(paths[side], "w", encoding="utf-8") as handle:
            json.dump(triples, handle)
    model = os.path.join(folder, f"{name}-{layers}-layers")
    build_qwen3(model, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                num_layers=layers, num_heads=shape["num_attention_heads"], num_kv_heads=shape["num_key_value_heads"],
                head_dim=shape["head_dim"], vocab_size=shape["vocab_size"], tokenizer_vocab=2000,
                dtype=torch.bfloat16, device="cuda" if on_gpu else "cpu",  # stored as the published checkpoints are
                extra_text=[t["positive"] for t in data["general"][:50]])
    if on_gpu:
        torch.cuda.empty_cache()  # the stages run in their own processes: hold no GPU memory here
    tokens = {side: token_count(model, triples, args.max_length) for side, triples in data.items()}
    runtime = ["--device", "cuda" if on_gpu else "cpu", "--dtype", "bfloat16" if on_gpu else "float32"]
    scored = ["--sparsify_layers", "mlp"]
    out = os.path.join(folder, "output")
    nproc = args.nproc
    stages = [
        ("sample (general)", "gaprune.features.sample", 1, token_count(model, data["general"], args.max_length, ["query"]), [
            "--input_file", paths["general"], "--output_file", os.path.join(out, "sample.json"), "--model_name", model,
            "--target_sample_size", str(args.triples // 2), "--max_length", str(args.max_length), *runtime]),
        ("fisher (general)", "gaprune.features.fisher", nproc, tokens["general"], [
            "--model_name", model, "--data_path", paths["general"], "--max_samples", str(args.triples),
            "--output_dir", out, "--score_dtype", "bfloat16", *scored, *runtime]),
        ("fisher (chem)", "gaprune.features.fisher", nproc, tokens["chem"], [
            "--model_name", model, "--data_path", paths["chem"], "--max_samples", str(args.triples),
            "--output_dir", out, "--score_dtype", "bfloat16", *scored, *runtime]),
    ]
    def gradient_row(label: str, folder: str | None, *flags: str) -> tuple:
        """gradient.py over both files; an extra row writes into ``folder`` (deleted after it)."""
        return (label, "gaprune.features.gradient", nproc, tokens["general"] + tokens["chem"], [
            "--model_name", model, "--general_data_path", paths["general"], "--domain_data_path", paths["chem"],
            "--max_samples", str(2 * args.triples), "--output_dir", os.path.join(out, folder) if folder else out,
            "--no-use_distributed", *flags, *scored, *runtime])

    extra = {"one-pass": ("gradient + fisher, one pass", args.one_pass,
                          ["--fisher_output_dir", os.path.join(out, "one-pass"), "--score_dtype", "bfloat16"]),
             "sharded-sums": ("gradient, sums sharded across ranks", args.sharded_sums, ["--accumulate_on", "sharded"]),
             "host-sums": ("gradient, sums in host memory", args.host_sums, ["--accumulate_on", "cpu"])}
    stages += [gradient_row(label, folder, *flags) for folder, (label, wanted, flags) in extra.items() if wanted]
    stages.append(gradient_row("gradient", None))  # after the extra rows, whose files are deleted first: less disk
    rows = []
    results = {}
    for label, module, processes, stage_tokens, stage_args in stages:
        result = run_stage(module, stage_args, processes, required=label in REQUIRED_STAGES)
        results[label] = result.get("output")
        for folder in extra:  # the extra rows' files: only their timing counts
            shutil.rmtree(os.path.join(out, folder), ignore_errors=True)
        rows.append({"shape": name, "layers": layers, "stage": label, "tokens": stage_tokens, **result})
        print(format_row(rows[-1]), flush=True)
    pruned_dir = os.path.join(out, "model")
    prune = ["--model_path", model, "--output_dir", pruned_dir, "--sparsify_layers", "mlp", "--unstructured_pct",
             "0.5", "--general_fisher_scores", results["fisher (general)"], "--domain_fisher_scores",
             results["fisher (chem)"], "--alignment_scores", results["gradient"], *runtime]
    result = run_stage("gaprune.model.SparseModel", prune, 1)
    rows.append({"shape": name, "layers": layers, "stage": "SparseModel (50% of MLP)", "tokens": 0, **result})
    print(format_row(rows[-1]), flush=True)
    calibrated = ["--model_path", model, "--sparsify_layers", "mlp", "--unstructured_pct", "0.5",
                  "--unstructured_scoring", "sparsegpt", "--calibration_data", paths["chem"],
                  "--general_calibration_data", paths["general"], "--calibration_samples", str(args.triples), *runtime]
    for label, options in (("SparseModel (sparsegpt 50%)", []),
                           ("SparseModel (sparsegpt 50%, loss-gradient weights)",
                            ["--calibration_weighting", "loss_gradient"]),
                           ("SparseModel (sparsegpt 50%, dense target)", ["--reconstruction_target", "dense"])):
        calibrated_dir = os.path.join(out, "calibrated")  # the plan line's total is the row's plan
        stage = run_stage("gaprune.model.SparseModel", [*calibrated, "--output_dir", calibrated_dir, *options], 1,
                          required=False)
        shutil.rmtree(calibrated_dir, ignore_errors=True)
        rows.append({"shape": name, "layers": layers, "stage": label, "tokens": 0, **stage})
        print(format_row(rows[-1]), flush=True)
    evaluate = ["--model_path", result["output"], "--data_paths", paths["chem"], "--output_file",
                os.path.join(out, "eval.json"), *runtime]
    result = run_stage("gaprune.model.evaluate", evaluate, 1)
    rows.append({"shape": name, "layers": layers, "stage": "evaluate (chem)", "tokens": tokens["chem"], **result})
    print(format_row(rows[-1]), flush=True)
    return rows


HEADER = "| shape | layers | stage | seconds | tokens/s | peak GPU GB | peak resident GB | plan GB |\n|---|---|---|---|---|---|---|---|"


def format_row(row: dict) -> str:
    if "failed" in row:
        return f"| {row['shape']} | {row['layers']} | {row['stage']} | failed: {row['failed']} | | | | |"
    rate = f"{row['tokens'] / row['seconds']:,.0f}" if row["tokens"] else ""
    plan = "" if row["plan"] is None else f"{row['plan'] / GB:.2f}"
    if row.get("host_plan"):
        plan += f" (+{row['host_plan'] / GB:.2f} host)"
    gpu = f"{row['gpu'] / GB:.2f}" if row["gpu"] else ""
    return (f"| {row['shape']} | {row['layers']} | {row['stage']} | {row['seconds']:.1f} | {rate} | {gpu} | "
            f"{row['rss'] / GB:.2f} | {plan} |")


def print_plans(args: argparse.Namespace) -> None:
    """The memory plans for the full shapes in bfloat16 on --nproc GPUs of --capacity_gb each, from models on
    the meta device (nothing allocated) and the synthetic triples: the scoring stages, and SparseGPT's
    calibration on the MLP weights with SparseModel.py's defaults (128 triples per side, batches of 8),
    uniform, with --calibration_weighting loss_gradient, and with --reconstruction_target dense."""
    from transformers import Qwen3Config, Qwen3Model
    from gaprune.calibration import layer_widths
    from gaprune.data import triple_texts
    from gaprune.layers import select_parameters
    from gaprune.memory import alignment_plan, fisher_plan, plan_calibration
    from gaprune.modeling import Embedder
    from gaprune.toy_models import qwen3_tokenizer

    data = {side: synthetic_triples(args.triples, words, seed) for seed, (side, words) in enumerate(LENGTHS.items())}
    tokenizer = qwen3_tokenizer([t["positive"] for t in data["general"][:50]], vocab_size=2000)
    capacity = int(args.capacity_gb * GB)
    calibration = {side: triple_texts(synthetic_triples(128, words, seed)) for seed, (side, words) in
                   enumerate(LENGTHS.items())}
    for name in args.shapes:
        with torch.device("meta"):
            model = Qwen3Model(Qwen3Config(**QWEN3_EMBEDDING_SHAPES[f"Qwen3-Embedding-{name}"])).to(torch.bfloat16)
        embedder = Embedder(model, tokenizer, "lasttoken", "", torch.bfloat16, name, args.max_length)
        selected = select_parameters(model.named_parameters(), ["attention", "mlp"])
        print(f"Qwen3-Embedding-{name}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters:")
        ranks = args.nproc
        for plan in (fisher_plan(embedder, selected, data["chem"], 1, capacity=capacity, ranks=ranks),
                     alignment_plan(embedder, selected, data["general"], data["chem"], 2, False, capacity=capacity,
                                    ranks=ranks),
                     alignment_plan(embedder, selected, data["general"], data["chem"], 2, True, capacity=capacity,
                                    ranks=ranks)):
            print("  " + plan.line())
        widths = layer_widths(model, list(select_parameters(model.named_parameters(), ["mlp"])))
        for weighted, dense in ((False, False), (True, False), (False, True)):
            print("  " + plan_calibration(embedder, widths, calibration, 8, True, weighted, ranks, capacity,
                                          dense).line())


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--stage":
        return stage_peak()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["0.6B", "4B", "8B"], choices=["0.6B", "4B", "8B"],
                        help="the shapes run, in order (8B needs about 75 GB of free disk)")
    parser.add_argument("--triples", type=int, default=None, help="triples per side (default: 64 on CUDA, 4 on CPU)")
    parser.add_argument("--layers", type=int, default=0, help="layers of each model (default: all on CUDA, 2 on CPU)")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--nproc", type=int, default=1, help="processes for fisher/gradient (torchrun)")
    parser.add_argument("--one_pass", action="store_true", help="also time gradient.py --fisher_output_dir")
    parser.add_argument("--host_sums", action="store_true", help="also time gradient.py --accumulate_on cpu")
    parser.add_argument("--sharded_sums", action="store_true",
                        help="also time gradient.py --accumulate_on sharded (needs --nproc 2 or more)")
    parser.add_argument("--work_dir", default=None, help="where models and outputs go (default: a temporary folder)")
    parser.add_argument("--plan_only", action="store_true", help="print the memory plans of the full shapes only")
    parser.add_argument("--capacity_gb", type=float, default=80.0, help="--plan_only: the GPU's memory")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    args.triples = args.triples or (64 if on_gpu else 4)
    if args.plan_only:
        return print_plans(args)
    if args.sharded_sums and args.nproc < 2:
        parser.error("--sharded_sums shares the sums among torchrun processes: give --nproc 2 or more")
    print(f"{'CUDA ' + torch.cuda.get_device_name() if on_gpu else 'CPU'}, torch {torch.__version__}, "
          f"{args.triples} triples per side, {args.nproc} process(es) for the scoring stages\n{HEADER}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as folder:
        for name in args.shapes:
            shape = QWEN3_EMBEDDING_SHAPES[f"Qwen3-Embedding-{name}"]
            shape_dir = os.path.join(folder, name)
            os.makedirs(shape_dir)
            rows += check_shape(name, shape, args, shape_dir, on_gpu)
            shutil.rmtree(shape_dir)
    print(f"\n{HEADER}")
    for row in rows:
        print(format_row(row))


if __name__ == "__main__":
    main()
