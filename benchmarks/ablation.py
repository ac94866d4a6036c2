"""Ablation of the pruning scorers: which one keeps domain and general retrieval at 50% / 60% MLP sparsity?
With --structure channels: which one keeps it when 25% / 50% of every layer's MLP channels are removed,
before and after 100 steps of retraining (retrain.py's defaults, on the seed's calibration triples)?
With --structure field: do they beat Wanda and SparseGPT at 50%, 60% and 2:4, with and without the OBS
reconstruction of the kept weights (all calibrated on the same texts), with the layer shares set by a
scorer's global ranking (--layer_shares aligned_saliency, magnitude), SparseGPT's 2:4 groups in Hessian
order (--group_order hessian), calibration tokens weighted by the loss's gradients (--calibration_weighting
loss_gradient), and the updated weights reproducing the dense model's outputs (--reconstruction_target dense)?
With --structure layers: which block scorer chooses the 1 or 2 whole transformer blocks to remove (the
measurements block_influence, skip_drift, skip_loss and greedy_drift on the seed's calibration triples, the
sums of magnitude, domain_fisher and aligned_saliency scores over each block, and the fixed rules "last
layers" (L3Prune) and "middle layers"), before and, for 2 blocks, after 100 steps of retraining?

For each seed, Fisher (domain, general) and gradient alignment (local and row cosine) are measured on a
seeded subset of the calibration split; then compare.py prunes with every scorer and evaluates on the
held-out split, whose terms never occur in calibration. Reported: mean and spread (sample std over
seeds) of the nDCG@10 change vs dense, and the share of each mask that magnitude pruning shares.

Data: the GCIDE definition-retrieval triples (GPL, generated on demand, not shipped):

    sudo apt-get install dict-gcide && python benchmarks/gcide_triples.py
    python benchmarks/ablation.py                         # all-MiniLM-L6-v2, the packaged default model
    python benchmarks/ablation.py --model tiny-qwen3      # a small Qwen3 built and trained here first
    python benchmarks/ablation.py --structure channels    # whole MLP channels removed, then retrained
    python benchmarks/ablation.py --structure field       # against Wanda and SparseGPT, 2:4, reconstruction
    python benchmarks/ablation.py --structure layers      # whole transformer blocks removed, then retrained

Writes <output_dir>/<model>/ablation.{json,md} (ablation_<structure>.* for the others) (and ablation.png when matplotlib is installed:
pip install -e .[plot]) and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import glob
import json
import logging
import os
import statistics
import sys
import textwrap

import torch

import gaprune
from gaprune.blocks import BLOCK_SCORERS, BlockContext, lowest_blocks, remove_blocks
from gaprune.data import load_triples
from gaprune.evaluation import evaluate_triples, relative_change
from gaprune.model import compare
from gaprune.modeling import DEFAULT_MODEL
from gaprune.fileio import model_dirname, write_json
from gaprune.layers import transformer_blocks
from gaprune.pruning import load_calibration
from gaprune.retraining import sparse_finetune
from gaprune.spec import RetrainSpec
from gaprune.toy_models import build_qwen3

log = logging.getLogger("ablation")

# scorers compared with the local-cosine alignment file; ROW_SCORERS again with the row-cosine one
SCORERS = ["magnitude", "random", "dai", "domain_fisher", "general_fisher", "dai_paper",
           "aligned_saliency:alignment_weight=0", "aligned_saliency", "aligned_saliency:fisher_norm=tensor"]
ROW_SCORERS = ["aligned_saliency"]
ROW_LABEL = " (row cosine)"
FIELD_SCORERS = ["magnitude", "wanda", "sparsegpt", "aligned_saliency"]
RECONSTRUCTED_SCORERS = ["magnitude", "aligned_saliency"]
RECONSTRUCTED = " + reconstruction"
# unstructured only (--layer_shares): each layer's share from a scorer's global ranking, the weights from the pruner
LAYER_SHARES = {"aligned_saliency": ["wanda", "sparsegpt"], "magnitude": ["sparsegpt"],
                "domain_fisher": ["sparsegpt"], "general_fisher": ["sparsegpt"]}
CHANNEL_SCORERS = ["magnitude", "random", "dai", "domain_fisher", "general_fisher", "aligned_saliency"]
RETRAINED = " +{steps} steps"
BLOCK_MEASURES = ["block_influence", "skip_drift", "skip_loss", "greedy_drift"]  # on the calibration texts
BLOCK_SUMS = ["magnitude", "domain_fisher", "aligned_saliency"]  # a weight scorer's scores summed over a block
FIXED_BLOCKS = {"last layers": lambda blocks, count: list(range(blocks - count, blocks)),  # L3Prune's rule
                "middle layers": lambda blocks, count: list(range((blocks - count) // 2, (blocks - count) // 2 + count))}


def subset(path: str, size: int, seed: int, out_path: str) -> str:
    """A seeded random subset of a triple file."""
    triples = load_triples(path)
    order = torch.randperm(len(triples), generator=torch.Generator().manual_seed(seed)).tolist()
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump([triples[i] for i in order[:size]], handle, ensure_ascii=False)
    return out_path


def calibrate(model: str, domain: str, general: str, out: str, batch_size: int,
              modes: tuple[str, ...] = ("local_cosine", "row_cosine"), reuse: bool = False) -> dict[str, str]:
    """Score files for one calibration subset, through the Python API on one loaded model (``reuse``: the
    first ones an earlier run wrote in ``out``, where there are)."""
    if reuse:
        found = {side: sorted(glob.glob(os.path.join(out, f"{side}-calibration_fisher_complete_scores_*.json")))
                 for side in ("domain", "general")}
        for mode in modes:
            found[mode] = [path for path in sorted(glob.glob(os.path.join(out, "*", "alignment_scores_*.json")))
                           if json.load(open(path))["metadata"].get("alignment_mode") == mode]
        if all(found.values()):
            return {kind: paths[0] for kind, paths in found.items()}
    embedder = gaprune.load_embedder(model)
    files = {side: gaprune.fisher(embedder, path, out, batch_size, max_samples=None).path
             for side, path in (("domain", domain), ("general", general))}
    for mode in modes:
        files[mode] = gaprune.alignment(embedder, general, domain, out, batch_size, max_samples=100_000,
                                        alignment_mode=mode).path
    return files


def compare_rows(model: str, files: dict[str, str], heldout: dict[str, str], sparsity: list[float], out: str,
                 alignment: str, scorers: list[str], seed: int, extra: list[str] = ()) -> list[dict]:
    path = compare.main(["--model_path", model, "--domain_data_paths", heldout["domain"], "--general_data_paths",
                         heldout["general"], "--domain_fisher_scores", files["domain"], "--general_fisher_scores",
                         files["general"], "--alignment_scores", files[alignment], "--sparsity",
                         *map(str, sparsity), "--scorers", *scorers, "--seed", str(seed), "--output_dir", out, *extra])
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["rows"]


def field_rows(model: str, files: dict[str, str], heldout: dict[str, str], calibration: dict[str, str],
               out: str, seed: int) -> list[dict]:
    """The field's pruners against gaprune's scorers, with and without reconstruction, at 50%, 60% and 2:4,
    (unstructured) Wanda and SparseGPT with their layer shares from aligned_saliency, magnitude or either side's
    Fisher (domain_fisher, general_fisher), SparseGPT 2:4 in Hessian group order, and SparseGPT (alone, with
    aligned_saliency shares, at 2:4 in both orders) and Wanda with aligned_saliency shares on statistics
    weighted by the loss's gradients, and SparseGPT and reconstruction towards the dense model's outputs;
    Wanda, SparseGPT and reconstruction use the first 128 of the seed's calibration triples of each side
    (cross-calibrated 50/50), the Fisher files all of them."""
    texts = ["--calibration_data", calibration["domain"], "--general_calibration_data", calibration["general"]]
    rows: list[dict] = []
    runs = [(pattern, [0.5, 0.6] if pattern == "unstructured" else [0.5], scorers, flags, label)
            for pattern in ("unstructured", "2:4")
            for scorers, flags, label in ((FIELD_SCORERS, [], ""), (RECONSTRUCTED_SCORERS, ["--reconstruct"],
                                                                    RECONSTRUCTED))]
    runs += [("unstructured", [0.5, 0.6], pruners, ["--layer_shares", shares], "")  # compare.py labels them
             for shares, pruners in LAYER_SHARES.items()]
    runs.append(("2:4", [0.5], ["sparsegpt"], ["--group_order", "hessian"], ""))
    weighted = ["--calibration_weighting", "loss_gradient"]  # compare.py labels these too
    runs += [("unstructured", [0.5, 0.6], ["sparsegpt"], weighted, ""),
             ("unstructured", [0.5, 0.6], ["wanda", "sparsegpt"], ["--layer_shares", "aligned_saliency", *weighted], ""),
             ("2:4", [0.5], ["sparsegpt"], weighted, ""),
             ("2:4", [0.5], ["sparsegpt"], ["--group_order", "hessian", *weighted], "")]
    dense = ["--reconstruction_target", "dense"]  # compare.py labels these too
    runs += [("unstructured", [0.5, 0.6], ["sparsegpt"], dense, ""), ("2:4", [0.5], ["sparsegpt"], dense, ""),
             ("unstructured", [0.5, 0.6], RECONSTRUCTED_SCORERS, ["--reconstruct", *dense], RECONSTRUCTED)]
    for pattern, sparsity, scorers, flags, label in runs:
        flags = [*texts, "--sparsity_pattern", pattern, *flags]
        for row in compare_rows(model, files, heldout, sparsity, out, "local_cosine", scorers, seed, flags):
            if row["method"] == "dense":
                if not rows:
                    rows.append(row)
                continue
            scorer, comma, options = row["method"].partition(", ")  # "magnitude + reconstruction, dense target"
            row["method"] = scorer + label + comma + options + ("" if pattern == "unstructured" else f" ({pattern})")
            rows.append(row)
    return rows


def channel_rows(model: str, files: dict[str, str], heldout: dict[str, list[dict]], calibration: dict[str, str],
                 shares: list[float], steps: int, seed: int, retrained_scorers: list[str]) -> list[dict]:
    """Channel pruning with every scorer at every share, evaluated before and after retraining; the dense
    model retrained the same way is the control (retraining on domain triples moves the dense scores too)."""
    dense = gaprune.load_embedder(model)
    domain, general = load_triples(calibration["domain"]), load_triples(calibration["general"])

    def evaluated(embedder, method: str, share: float, **extra) -> dict:
        metrics = {side: evaluate_triples(embedder, triples)["metrics"] for side, triples in heldout.items()}
        return {"method": method, "sparsity": share, **metrics, **extra}

    def retrained(embedder) -> None:  # retrain.py's defaults: lr 1e-5, batch 8, 10 warm-up steps, 25% general
        sparse_finetune(embedder, domain, RetrainSpec(steps=steps, seed=seed), {}, general)

    rows = [evaluated(dense, "dense", 0.0)]
    control = copy.deepcopy(dense)
    retrained(control)
    rows.append(evaluated(control, "dense" + RETRAINED.format(steps=steps), 0.0))
    for share in shares:
        for scorer in CHANNEL_SCORERS:
            embedder = copy.deepcopy(dense)
            result = gaprune.prune(embedder, gaprune.PruneSpec(scorer=scorer, structure="channels", sparsity=share,
                                                               seed=seed),
                                   gaprune.ScoreFiles(general_fisher=files["general"], domain_fisher=files["domain"],
                                                      alignment=files["local_cosine"]))
            agreement = {"mask_agreement_with_magnitude": result.diagnostics["mask_agreement_with_magnitude"],
                         "params_after": result.params_after}
            rows.append(evaluated(embedder, scorer, share, **agreement))
            if scorer not in retrained_scorers:
                continue
            retrained(embedder)
            rows.append(evaluated(embedder, scorer + RETRAINED.format(steps=steps), share, **agreement))
    for row in rows:
        for side in ("domain", "general"):
            row[f"{side}_change_percent"] = (None if row is rows[0] else
                                             relative_change(row[side]["ndcg@10"], rows[0][side]["ndcg@10"]))
    return rows


def layer_rows(model: str, files: dict[str, str], heldout: dict[str, list[dict]], calibration: dict[str, str],
               counts: list[int], steps: int, seed: int, batch_size: int) -> list[dict]:
    """Depth pruning: ``counts`` whole blocks removed as each block scorer or fixed rule chooses, evaluated one
    shot and, for the largest count, after ``steps`` steps of retraining (none at 0), beside the dense model
    retrained the same way. The measurements run once per scorer on the seed's calibration triples (both sides,
    blended 50/50) and serve every count; a set of removed blocks that several scorers choose is evaluated (and
    retrained, torch seeded alike) once."""
    dense = gaprune.load_embedder(model)
    blocks = len(transformer_blocks(dense.model))
    domain, general = load_triples(calibration["domain"]), load_triples(calibration["general"])
    texts = load_calibration(gaprune.CalibrationSpec(domain_data=calibration["domain"],
                                                     general_data=calibration["general"],
                                                     samples=len(domain), batch_size=batch_size))
    context = BlockContext(dense, texts.texts, texts.general_share, batch_size, seed=seed)
    scores = gaprune.ScoreFiles(general_fisher=files["general"], domain_fisher=files["domain"],
                                alignment=files["local_cosine"])
    measured: dict[tuple[str, frozenset], list[float]] = {}

    def measured_once(name: str):  # the registry's scorer, each (skipped blocks) measurement kept for the next count
        scorer = BLOCK_SCORERS[name]

        def score(block_context, skipped_before):
            if (name, skipped_before) not in measured:
                measured[name, skipped_before] = scorer.score(block_context, skipped_before)
            return measured[name, skipped_before]
        return dataclasses.replace(scorer, score=score)

    def chosen(name: str, count: int) -> tuple[list[int], list[float] | None]:
        if name in FIXED_BLOCKS:
            return FIXED_BLOCKS[name](blocks, count), None
        if name in BLOCK_MEASURES:
            return lowest_blocks(measured_once(name), context, count)
        result = gaprune.prune(copy.deepcopy(dense), gaprune.PruneSpec(structure="layers", block_count=count,
                                                                       block_scorer=name, seed=seed), scores)
        return result.removed, result.block_scores

    evaluations: dict[tuple[tuple[int, ...], bool], dict] = {}

    def evaluated(removed: list[int], retrain: bool) -> dict:
        key = (tuple(removed), retrain)
        if key not in evaluations:
            embedder = copy.deepcopy(dense)
            if removed:
                remove_blocks(embedder.model, removed)
            if retrain:  # retrain.py's defaults: lr 1e-5, batch 8, 10 warm-up steps, 25% general
                torch.manual_seed(seed)  # dropout draws alike for every model
                sparse_finetune(embedder, domain, RetrainSpec(steps=steps, seed=seed), {}, general)
            evaluations[key] = {side: evaluate_triples(embedder, triples)["metrics"] for side, triples in heldout.items()}
        return evaluations[key]

    rows = [{"method": "dense", "sparsity": 0.0, **evaluated([], False)}]
    one_shot = []
    for count in counts:
        for name in [*BLOCK_MEASURES, *BLOCK_SUMS, *FIXED_BLOCKS]:
            removed, block_scores = chosen(name, count)
            log.info("%s removes blocks %s of %d", name, removed, blocks)
            one_shot.append({"method": name, "sparsity": count / blocks, "layers_removed": count,
                             "removed_layers": removed, "block_scores": block_scores, **evaluated(removed, False)})
    rows += one_shot
    if steps:
        rows.append({"method": "dense" + RETRAINED.format(steps=steps), "sparsity": 0.0, **evaluated([], True)})
        rows += [{**row, "method": row["method"] + RETRAINED.format(steps=steps),
                  **evaluated(row["removed_layers"], True)} for row in one_shot if row["layers_removed"] == max(counts)]
    for row in rows:
        for side in ("domain", "general"):
            row[f"{side}_change_percent"] = (None if row is rows[0] else
                                             relative_change(row[side]["ndcg@10"], rows[0][side]["ndcg@10"]))
    return rows


def summarise(rows_per_seed: list[list[dict]]) -> list[dict]:
    """Mean and sample std over seeds of each (method, sparsity)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for rows in rows_per_seed:
        for row in rows:
            groups.setdefault((row["method"], row["sparsity"]), []).append(row)
    summary = []
    for (method, pct), rows in groups.items():
        entry = {"method": method, "sparsity": pct, "seeds": len(rows)}
        for side in ("domain", "general"):
            values = [r["domain" if side == "domain" else "general"]["ndcg@10"] for r in rows]
            entry[f"{side}_ndcg@10"] = statistics.mean(values)
            if method != "dense":
                changes = [r[f"{side}_change_percent"] for r in rows]
                entry[f"{side}_change_mean"] = statistics.mean(changes)
                entry[f"{side}_change_std"] = statistics.stdev(changes) if len(changes) > 1 else 0.0
        agreement = [r["mask_agreement_with_magnitude"] for r in rows if r.get("mask_agreement_with_magnitude") is not None]
        entry["mask_agreement_with_magnitude"] = statistics.mean(agreement) if agreement else None
        if any("removed_layers" in r for r in rows):  # layers: the blocks removed, seed by seed
            entry["removed_layers"] = [r["removed_layers"] for r in rows]
        summary.append(entry)
    return summary


def markdown(summary: list[dict]) -> str:
    layers = any("removed_layers" in e for e in summary)
    lines = ["| scorer | sparsity | domain nDCG@10 | Δ domain (mean ± std) | general nDCG@10 | Δ general (mean ± std) "
             f"| {'layers removed (per seed)' if layers else 'mask ∩ magnitude'} |", "|---|---|---|---|---|---|---|"]
    for e in summary:
        def change(side):
            return "" if e["method"] == "dense" else f"{e[f'{side}_change_mean']:+.2f}% ± {e[f'{side}_change_std']:.2f}"
        agreement = e["mask_agreement_with_magnitude"]
        last = (" / ".join(",".join(map(str, removed)) for removed in e.get("removed_layers", [])) if layers else
                "" if agreement is None else f"{agreement:.2%}")
        lines.append(f"| {e['method']} | {e['sparsity']:.0%} | {e['domain_ndcg@10']:.4f} | {change('domain')} | "
                     f"{e['general_ndcg@10']:.4f} | {change('general')} | {last} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: str, title: str) -> bool:
    """Grouped bars of the domain and general change per scorer and sparsity, with the seed spread."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install -e .[plot]); no plot")
        return False
    sparsities = sorted({e["sparsity"] for e in summary if e["method"] != "dense"})
    # random pruning loses 30-50%, which would squash every other bar; the table has it
    methods = [m for m in dict.fromkeys(e["method"] for e in summary) if m not in ("dense", "random")]
    fig, axes = plt.subplots(1, len(sparsities), figsize=(6.5 * len(sparsities), 0.6 * len(methods) + 2),
                             sharey=False, squeeze=False)
    for ax, pct in zip(axes[0], sparsities):
        entries = {e["method"]: e for e in summary if e["sparsity"] == pct}
        shown = [m for m in methods if m in entries]  # N:M rows sit in the panel of their share
        y = range(len(shown))
        for offset, side, color in ((-0.2, "domain", "tab:blue"), (0.2, "general", "tab:orange")):
            ax.barh([i + offset for i in y], [entries[m][f"{side}_change_mean"] for m in shown], height=0.4,
                    xerr=[entries[m][f"{side}_change_std"] for m in shown], color=color, label=side)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(list(y), [textwrap.fill(m, 28) for m in shown])  # long method names on two lines
        ax.invert_yaxis()
        ax.set_title(f"{pct:.0%} of the layers removed" if "removed_layers" in entries[shown[0]] else
                     f"{pct:.0%} of MLP weights pruned")
        ax.set_xlabel("nDCG@10 change vs dense (%)")
        ax.legend(loc="lower left")
    fig.suptitle(f"{title}\n(bars: mean over seeds, whiskers: sample std; random pruning not shown)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def train_tiny_qwen3(folder: str, calibration: dict[str, str], steps: int) -> str:
    """A 4-layer Qwen3 (hidden 128) with a BPE tokenizer fitted to the calibration text, trained densely on
    the calibration split so that it retrieves well above chance before anything is pruned."""
    texts = [t[key] for path in calibration.values() for t in load_triples(path) for key in ("query", "positive")]
    build_qwen3(os.path.join(folder, "tiny-qwen3-init"), hidden_size=128, intermediate_size=384, num_layers=4,
                num_heads=4, num_kv_heads=2, extra_text=texts)
    embedder = gaprune.load_embedder(os.path.join(folder, "tiny-qwen3-init"), dtype="float32", max_length=96)
    gaprune.retrain(embedder, RetrainSpec(steps=steps, lr=1e-3, batch_size=32, warmup_steps=20, general_ratio=0.5),
                    calibration["domain"], calibration["general"])
    trained = os.path.join(folder, f"tiny-qwen3-init_retrained_{steps}steps")  # the folder retrain.py would write
    gaprune.save_model(embedder, trained)
    return trained


def report(rows_per_seed: list[list[dict]], args: argparse.Namespace, out: str, model: str,
           heldout: dict[str, str]) -> None:
    """Write <out>/<name>.{json,md,png} from the seeds done so far and print the table."""
    summary = summarise(rows_per_seed)
    summary.sort(key=lambda e: (e["sparsity"], e["method"] != "dense"))
    table = markdown(summary)
    sizes = {side: len(load_triples(path)) for side, path in heldout.items()}
    header = (f"{args.model}: {len(rows_per_seed)} seeds x {args.calibration_size} calibration triples per domain; "
              f"held-out {sizes['domain']} chemistry / {sizes['general']} general triples")
    name = "ablation" if args.structure == "unstructured" else f"ablation_{args.structure}"
    if args.structure == "channels":
        header += "; sparsity = share of every layer's MLP channels removed"
    if args.structure == "layers":
        header += (f"; sparsity = share of the transformer layers removed ({', '.join(map(str, args.layers_removed))} "
                   f"of them)" + ("; Δ of the retrained rows vs the dense model before retraining"
                                  if args.retrain_steps else ""))
    write_json(os.path.join(out, f"{name}.json"), {"settings": vars(args), "model": model, "heldout_sizes": sizes,
                                                    "summary": summary, "rows_per_seed": rows_per_seed})
    with open(os.path.join(out, f"{name}.md"), "w", encoding="utf-8") as handle:
        handle.write(f"{header}\n\n{table}\n")
    plot(summary, os.path.join(out, f"{name}.png"), header)
    print(header)
    print(table)
    print(os.path.join(out, f"{name}.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder or id, or 'tiny-qwen3' (default: MiniLM)")
    parser.add_argument("--data_dir", default="output/gcide", help="benchmarks/gcide_triples.py output")
    parser.add_argument("--calibration_size", type=int, default=200, help="calibration triples per domain and seed")
    parser.add_argument("--heldout_size", type=int, default=500, help="held-out triples per domain")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sparsity", type=float, nargs="+", help="shares pruned (default: 0.5 0.6; channels: 0.25 0.5)")
    parser.add_argument("--batch_size", type=int, default=8, help="fisher/gradient batch size")
    parser.add_argument("--tiny_steps", type=int, default=600, help="dense training steps of the tiny Qwen3")
    parser.add_argument("--output_dir", default="output/ablation")
    parser.add_argument("--structure", default="unstructured", choices=["unstructured", "channels", "field", "layers"],
                        help="unstructured: gaprune's scorers; channels: channel removal and retraining; layers: "
                             "whole transformer blocks removed by each block scorer, and retraining; field: "
                             "Wanda, SparseGPT and reconstruction against the Fisher scorers, also at 2:4")
    parser.add_argument("--retrain_steps", type=int, default=100,
                        help="channels, layers: retraining steps (layers: 0 for one-shot rows only)")
    parser.add_argument("--layers_removed", type=int, nargs="+", default=[1, 2],
                        help="layers: how many transformer blocks go (the largest count is also retrained)")
    parser.add_argument("--reuse_scores", action="store_true", help="use the score files an earlier run left")
    parser.add_argument("--retrain_scorers", nargs="+", default=CHANNEL_SCORERS,
                        help="channels: the scorers whose pruned models are also retrained (default: all)")
    args = parser.parse_args()
    args.sparsity = args.sparsity or ([0.25, 0.5] if args.structure == "channels" else [0.5, 0.6])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    calibration = {side: os.path.join(args.data_dir, f"{name}-calibration.json")
                   for side, name in (("domain", "chem"), ("general", "general"))}
    heldout_files = {side: os.path.join(args.data_dir, f"{name}-heldout.json")
                     for side, name in (("domain", "chem"), ("general", "general"))}
    missing = [p for p in (*calibration.values(), *heldout_files.values()) if not os.path.isfile(p)]
    if missing:
        sys.exit(f"error: {missing[0]} not found; build the data first: python benchmarks/gcide_triples.py")

    out = os.path.join(args.output_dir, "tiny-qwen3" if args.model == "tiny-qwen3" else model_dirname(args.model))
    model = train_tiny_qwen3(out, calibration, args.tiny_steps) if args.model == "tiny-qwen3" else args.model
    heldout = {side: subset(path, args.heldout_size, 0, os.path.join(out, "data", f"{side}-heldout.json"))
               for side, path in heldout_files.items()}

    rows_per_seed = []
    for seed in args.seeds:
        seed_dir = os.path.join(out, f"seed{seed}")
        subsets = {side: subset(path, args.calibration_size, seed, os.path.join(seed_dir, f"{side}-calibration.json"))
                   for side, path in calibration.items()}
        files = calibrate(model, subsets["domain"], subsets["general"], os.path.join(seed_dir, "scores"),
                          args.batch_size, ("local_cosine",) if args.structure != "unstructured" else
                          ("local_cosine", "row_cosine"), args.reuse_scores)
        if args.structure == "field":
            rows_per_seed.append(field_rows(model, files, heldout, subsets, seed_dir, seed))
            report(rows_per_seed, args, out, model, heldout)
            continue
        if args.structure == "layers":
            triples = {side: load_triples(path) for side, path in heldout.items()}
            rows_per_seed.append(layer_rows(model, files, triples, subsets, args.layers_removed, args.retrain_steps,
                                            seed, args.batch_size))
            report(rows_per_seed, args, out, model, heldout)  # the seeds so far, in case the run is cut short
            continue
        if args.structure == "channels":
            triples = {side: load_triples(path) for side, path in heldout.items()}
            rows_per_seed.append(channel_rows(model, files, triples, subsets, args.sparsity, args.retrain_steps, seed,
                                              args.retrain_scorers))
            report(rows_per_seed, args, out, model, heldout)  # the seeds so far, in case the run is cut short
            continue
        rows = compare_rows(model, files, heldout, args.sparsity, seed_dir, "local_cosine", SCORERS, seed)
        for row in compare_rows(model, files, heldout, args.sparsity, seed_dir, "row_cosine", ROW_SCORERS, seed):
            if row["method"] != "dense":
                row["method"] += ROW_LABEL
                rows.append(row)
        rows_per_seed.append(rows)

    report(rows_per_seed, args, out, model, heldout)


if __name__ == "__main__":
    main()
