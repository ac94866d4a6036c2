"""Retrieval quality (nDCG@10, MRR@10, Recall@1/@10) of a model folder, dense or pruned, on triple files,
optionally against a baseline, and optionally on MTEB tasks (the mteb extra). A folder that gaprune pruned or
retrained on the evaluated queries gets a warning: that is no held-out measurement.

Example:
  python gaprune/model/evaluate.py --model_path output/model/FOLDER \
      --baseline_model sentence-transformers/all-MiniLM-L6-v2 --data_paths heldout-chem.json heldout-web.json
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from typing import Sequence

from gaprune.cli import ArgumentParser, finish, add_runtime_args, positive_int, run

log = logging.getLogger("gaprune.evaluate")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", required=True,
                        help="model folder (dense or pruned), hub id, or an .onnx file of gaprune/model/export.py")
    parser.add_argument("--data_paths", nargs="+", required=True, help="triple files to evaluate on")
    parser.add_argument("--baseline_model", help="also evaluate this model and report the change against it")
    parser.add_argument("--query_instructions", default="auto", choices=["auto", "keep", "strip"],
                        help="keep the 'Instruct: ...\\nQuery: ' prefix (Qwen3-Embedding) or strip it; "
                             "auto keeps it for decoders only (default: auto)")
    parser.add_argument("--max_samples", type=positive_int, help="evaluate the first N triples of each file")
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--max_length", type=positive_int, default=512)
    parser.add_argument("--output_file", help="JSON report (default: output/eval/<model>_eval_<ts>.json)")
    parser.add_argument("--index_model",
                        help="also measure index compatibility: the model's queries against documents embedded by "
                             "this model (the dense one whose vector index a user keeps), under 'index_compatibility'")
    parser.add_argument("--mteb_tasks", nargs="+", metavar="NAME",
                        help="also run these MTEB tasks (e.g. SciFact NFCorpus; downloaded the first time) on the "
                             "model and the baseline, under 'mteb' (needs pip install -e .[mteb])")
    parser.add_argument("--mteb_local", action="store_true",
                        help="also run each --data_paths file as a local MTEB retrieval task: mteb's own figures of "
                             "the same search, under 'mteb' (needs pip install -e .[mteb])")
    add_runtime_args(parser)
    return parser


def evaluate_model(model_path: str, files: dict[str, list[dict]], args, index_model: str | None = None,
                   mteb_tasks: Sequence = ()) -> tuple[dict[str, dict], dict[str, dict] | None, dict[str, dict]]:
    """Each file's metrics; with ``index_model`` also each file's metrics with the documents embedded by that
    model (index compatibility); and each loaded MTEB task's scores; from the same loaded model."""
    from gaprune.evaluation import evaluate_corpora
    from gaprune.modeling import load_embedder
    from gaprune.mteb_tasks import run_tasks

    def load(path: str):
        if path.endswith(".onnx"):  # an export of gaprune/model/export.py, run by onnxruntime on the CPU
            from gaprune.export import OnnxEmbedder

            return OnnxEmbedder(path, args.max_length)
        return load_embedder(path, args.device, args.dtype, max_length=args.max_length)

    embedder = load(model_path)
    index = load(index_model) if index_model else None
    results, index_results = {}, ({} if index is not None else None)
    for path, triples in files.items():
        log.info("evaluating %s on %s (%d queries)", model_path, path, len(triples))
        own, *in_index = evaluate_corpora(embedder, triples, args.batch_size, args.query_instructions,
                                          [embedder, *([index] if index is not None else [])])
        results[path] = own
        if in_index:
            index_results[path] = in_index[0]
    mteb_results = run_tasks(embedder, mteb_tasks, args.batch_size, args.query_instructions) if mteb_tasks else {}
    return results, index_results, mteb_results


def format_table(report: dict) -> str:
    from gaprune.evaluation import METRICS
    from gaprune.mteb_tasks import short_name

    def line(name: str, label: str, values: dict, columns: Sequence[str], change: bool = False) -> str:
        def cell(m):
            value = values.get(m)
            return f"{'n/a':>10}" if value is None else f"{value:+10.2f}" if change else f"{value:10.4f}"
        return f"{name[:40]:<40} {label:<10} " + " ".join(cell(m) for m in columns)

    lines = [f"{'file':<40} {'model':<10} " + " ".join(f"{m:>10}" for m in METRICS)]
    for path, result in report["results"].items():
        lines.append(line(os.path.basename(path), "model", result["metrics"], METRICS))
        if report.get("index_compatibility"):
            lines.append(line("", "old index", report["index_compatibility"][path]["metrics"], METRICS))
        if report.get("baseline"):
            lines.append(line("", "baseline", report["baseline"][path]["metrics"], METRICS))
            lines.append(line("", "change %", report["change_percent"][path], METRICS, change=True))
    if report.get("mteb"):  # each task's main score, then mteb's retrieval metrics where it has them
        mteb, columns = report["mteb"], ("main_score", *METRICS)
        lines.append(f"{'mteb task (main metric)':<40} {'model':<10} " + " ".join(f"{m:>10}" for m in columns))
        for name, result in mteb["results"].items():
            metric = f" ({result['main_metric']})"
            lines.append(line(short_name(name)[:40 - len(metric)] + metric, "model",
                              {"main_score": result["main_score"], **result["metrics"]}, columns))
            if "baseline" in mteb:
                base = mteb["baseline"][name]
                lines.append(line("", "baseline", {"main_score": base["main_score"], **base["metrics"]}, columns))
                lines.append(line("", "change %", mteb["change_percent"][name], columns, change=True))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str | None:
    """Under torchrun every rank encodes its share of the texts; rank 0 writes and prints."""
    args = build_parser().parse_args(argv)
    from gaprune import distributed
    from gaprune.data import load_triples
    from gaprune.evaluation import METRICS, overlap_warnings, relative_change
    from gaprune.fileio import check_output_file, model_dirname, timestamp, write_json
    from gaprune.mteb_tasks import changes, load_tasks

    world = distributed.init_from_env(args.device)
    files = {path: load_triples(path, args.max_samples) for path in args.data_paths}
    if os.path.isdir(args.model_path):
        distributed.warn_on_main(log, overlap_warnings(args.model_path, files))
    output = args.output_file or os.path.join("output", "eval",
                                              f"{model_dirname(args.model_path)}_eval_{timestamp()}.json")
    check_output_file(output, inputs=args.data_paths)
    # before any model loads: a missing extra or an unknown or unreachable task is refused first
    mteb_tasks = load_tasks(args.mteb_tasks or (), files if args.mteb_local else None)
    results, index_results, mteb_results = evaluate_model(args.model_path, files, args, args.index_model, mteb_tasks)
    report = {"model_path": args.model_path, "baseline_model": args.baseline_model,
              "timestamp": datetime.now().isoformat(), "query_instructions": args.query_instructions,
              "results": results}
    if index_results is not None:
        report["index_compatibility"] = index_results
    if mteb_tasks:
        report["mteb"] = {"results": mteb_results}
    if args.baseline_model:
        report["baseline"], _, mteb_baseline = evaluate_model(args.baseline_model, files, args, mteb_tasks=mteb_tasks)
        report["change_percent"] = {
            path: {m: relative_change(report["results"][path]["metrics"][m], report["baseline"][path]["metrics"][m])
                   for m in METRICS} for path in files}
        if mteb_tasks:
            report["mteb"].update(baseline=mteb_baseline, change_percent=changes(mteb_results, mteb_baseline))
    if not world.is_main:
        return None
    write_json(output, report)
    print(format_table(report))
    return finish(output)


if __name__ == "__main__":
    run(main)
