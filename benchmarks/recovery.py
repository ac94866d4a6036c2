"""Recovery of all-MiniLM-L6-v2 with 2 of its 6 transformer layers removed, as a learning curve over three seeds.

For each seed, block_influence chooses the 2 blocks to remove on the seed's calibration subset (32 triples per
side, both sides blended 50/50, as benchmarks/ablation.py --structure layers does; the subsets ablation.py
wrote in --subsets_dir are reused, else drawn the same way: torch.randperm seeded with the seed). Then three
variants are retrained (retrain.py's defaults: AdamW, lr 1e-5, batch 8 with 25% general triples, 10 warm-up
steps; RetrainSpec seed = the seed, torch seeded with it before each retraining so dropout draws alike):

- dense: the dense model retrained the same way (the control);
- infonce: the 2 blocks removed, InfoNCE alone;
- distill: the 2 blocks removed, InfoNCE + 1.0 x the cosine distillation loss against the dense model's
  embeddings of the training texts (cached once).

The retraining runs on the FULL calibration files (every triple of --data_dir's chem-calibration.json and
general-calibration.json; 32 triples per side are far too few for hundreds of steps of batch 8): the seed's
32-triple subsets only choose the blocks. The held-out files share no query with the calibration files.

Each variant is evaluated before retraining (step 0: the untrained dense model, or the one-shot pruned model)
and after each of --eval_at steps, on the first --heldout_size held-out triples per side: nDCG@10 of the
model's own embeddings, and of its queries against the documents embedded by the untrained dense model (index
compatibility, as evaluate.py --index_model; those document embeddings are computed once). The learning rate
is constant after the warm-up, so the model at step k of one run is the model a k-step run would give.

Reported: the nDCG@10 change against the untrained dense model (mean and sample std over seeds), each row's
change against the dense control at the same step, and the seconds per training step (evaluation excluded).

    sudo apt-get install dict-gcide && python benchmarks/gcide_triples.py   # the GCIDE triples
    OMP_NUM_THREADS=1 python benchmarks/recovery.py --output_dir output/recovery
    python benchmarks/recovery.py --steps 4 --eval_at 2 4 --seeds 1          # a smoke run

Writes <output_dir>/recovery.{json,md} (after every run of a variant and seed, so that a cut-short run keeps
what it finished; --resume runs only the variants and seeds recovery.json does not hold yet, --variants
a subset of them) and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from typing import Sequence

import torch

import gaprune
from gaprune.blocks import BLOCK_SCORERS, BlockContext, lowest_blocks, remove_blocks
from gaprune.data import load_triples, triple_texts
from gaprune.evaluation import (build_corpus, evaluate_triples, keeps_instructions, query_text, ranking_metrics,
                                relative_change, relevant_ranks)
from gaprune.fileio import model_dirname
from gaprune.layers import transformer_blocks
from gaprune.modeling import DEFAULT_MODEL, Embedder
from gaprune.pruning import load_calibration
from gaprune.retraining import sparse_finetune, teacher_embeddings
from gaprune.spec import RetrainSpec

log = logging.getLogger("recovery")

SIDES = {"domain": "chem", "general": "general"}
VARIANTS = ("dense", "infonce", "distill")
LABELS = {"dense": "dense (control)", "infonce": "{n} removed, InfoNCE", "distill": "{n} removed, InfoNCE + distill"}
BLOCK_SCORER = "block_influence"
REMOVED = 2
METRIC = "ndcg@10"


def seed_subset(path: str, size: int, seed: int, saved: str) -> str | list[dict]:
    """The seed's calibration subset: ablation.py's file where it wrote one, else the same draw (torch.randperm
    seeded with the seed, its first ``size`` triples)."""
    if os.path.isfile(saved):
        found = load_triples(saved)
        if len(found) == size:
            return saved
        log.warning("%s holds %d triples, not %d: drawing the subset again", saved, len(found), size)
    triples = load_triples(path)
    order = torch.randperm(len(triples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [triples[i] for i in order[:size]]


def chosen_blocks(dense: Embedder, subsets: dict[str, str | list[dict]], size: int, seed: int,
                  batch_size: int, count: int = REMOVED) -> list[int]:
    """The ``count`` blocks block_influence scores lowest on the seed's calibration texts (both sides, 50/50)."""
    texts = {side: source if isinstance(source, str) else triple_texts(source) for side, source in subsets.items()}
    calibration = load_calibration(gaprune.CalibrationSpec(domain_data=texts["domain"], general_data=texts["general"],
                                                           samples=size,
                                                           batch_size=batch_size))
    context = BlockContext(dense, calibration.texts, calibration.general_share, batch_size, seed=seed)
    removed, scores = lowest_blocks(BLOCK_SCORERS[BLOCK_SCORER], context, count)
    log.info("seed %d: %s scores %s; removing blocks %s", seed, BLOCK_SCORER, [round(s, 4) for s in scores], removed)
    return removed


class HeldOut:
    """The held-out triples of each side, their corpora and the untrained dense model's document embeddings."""

    def __init__(self, triples: dict[str, list[dict]], dense: Embedder, batch_size: int):
        self.triples, self.batch_size = triples, batch_size
        self.one_shot: dict[tuple[int, ...], dict[str, float]] = {}  # removed blocks -> scores, untrained
        self.corpora = {side: build_corpus(t) for side, t in triples.items()}
        self.dense_documents = {side: dense.encode(documents, batch_size, "dense documents", progress=False)
                                for side, (documents, _) in self.corpora.items()}

    @torch.no_grad()
    def scores(self, embedder: Embedder) -> dict[str, dict[str, float]]:
        """nDCG@10 per side, own embeddings (``side``) and queries against the dense documents (``side_index``):
        evaluation.evaluate_triples's measurement, the queries embedded once for both."""
        embedder.model.eval()
        keep = keeps_instructions(embedder, "auto")
        result = {}
        for side, triples in self.triples.items():
            documents, relevant = self.corpora[side]
            queries = embedder.encode([query_text(t["query"], keep) for t in triples], self.batch_size, "queries",
                                      progress=False)
            own = embedder.encode(documents, self.batch_size, "documents", progress=False)
            result[side] = ranking_metrics(relevant_ranks(queries, own, relevant))[METRIC]
            result[f"{side}_index"] = ranking_metrics(relevant_ranks(queries, self.dense_documents[side],
                                                                     relevant))[METRIC]
        return result


def run_variant(dense: Embedder, variant: str, removed: list[int], seed: int, steps: int, eval_at: Sequence[int],
                heldout: HeldOut, training: dict[str, list[dict]], teacher: dict[str, torch.Tensor] | None,
                distill_weight: float = 1.0, lr: float = 1e-5) -> dict:
    """One variant of one seed: its scores at step 0 and at each of ``eval_at``, its losses and its time."""
    embedder = copy.deepcopy(dense)
    if variant != "dense":
        remove_blocks(embedder.model, removed)
    spec = RetrainSpec(steps=steps, seed=seed, lr=lr, **({"distill_weight": distill_weight, "distill_loss": "cosine"}
                                                  if variant == "distill" else {}))
    key = () if variant == "dense" else tuple(removed)
    if key not in heldout.one_shot:  # the untrained dense model, and each set of removed blocks, scored once
        heldout.one_shot[key] = heldout.scores(embedder)
    curve = {0: heldout.one_shot[key]}
    log.info("seed %d %s step 0: %s", seed, variant, curve[0])
    evaluating = [0.0]

    def on_step(step: int, loss: float) -> None:
        if step in eval_at:
            start = time.perf_counter()
            curve[step] = heldout.scores(embedder)
            evaluating[0] += time.perf_counter() - start
            log.info("seed %d %s step %d (loss %.4f): %s", seed, variant, step, loss, curve[step])

    torch.manual_seed(seed)  # dropout draws alike for every variant
    result = sparse_finetune(embedder, training["domain"], spec, {}, training["general"], None,
                             teacher if spec.distills else None, on_step=on_step)
    train_seconds = result.seconds - evaluating[0]
    return {"variant": variant, "seed": seed, "removed_layers": [] if variant == "dense" else removed,
            "curve": {str(step): scores for step, scores in curve.items()}, "losses": result.losses,
            "train_seconds": train_seconds, "seconds_per_step": train_seconds / steps}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict], steps: list[int], untrained: dict[str, float]) -> list[dict]:
    """Per variant and step: the mean nDCG@10, the change against the untrained dense model (over the seeds
    that ran the variant) and against the dense control at the same step (over the seeds that ran both), mean
    and sample std, and the seconds per step."""
    by_key = {(run["variant"], run["seed"]): run for run in runs}
    seeds = sorted({run["seed"] for run in runs})
    summary = []
    for variant in VARIANTS:
        done = [s for s in seeds if (variant, s) in by_key]
        controlled = [s for s in done if ("dense", s) in by_key]
        if not done:
            continue
        for step in steps:
            entry = {"variant": variant, "step": step, "seeds": done, "control_seeds": controlled}
            for column in ("domain", "general", "domain_index", "general_index"):
                base = untrained[column.split("_")[0]]
                values = [by_key[variant, s]["curve"][str(step)][column] for s in done]
                pairs = [(by_key[variant, s]["curve"][str(step)][column],
                          by_key["dense", s]["curve"][str(step)][column]) for s in controlled]
                entry[column] = statistics.mean(values)
                entry[f"{column}_change"] = mean_std([relative_change(v, base) for v in values])
                entry[f"{column}_vs_control"] = (mean_std([relative_change(v, c) for v, c in pairs]) if pairs
                                                 else None)
            entry["seconds_per_step"] = statistics.mean(by_key[variant, s]["seconds_per_step"] for s in done)
            summary.append(entry)
    return summary


COLUMNS = (("domain", "chemistry"), ("general", "general"), ("domain_index", "chemistry, dense index"),
           ("general_index", "general, dense index"))


def markdown(summary: list[dict], key: str, values: bool = True, removed: int = REMOVED) -> str:
    """One row per variant and step: the change ``key`` names of every column (with the mean nDCG@10 when
    ``values``) and the seeds it averages."""
    seeds_key = "seeds" if key == "change" else "control_seeds"
    lines = ["| variant | steps | seeds | " + " | ".join((f"{label} nDCG@10 | " if values else "") + f"Δ {label}"
                                                        for _, label in COLUMNS)
             + " | s/step |", "|---|---|---|" + ("---|---|" if values else "---|") * len(COLUMNS) + "---|"]
    for e in summary:
        if e[f"domain_{key}"] is None:
            continue
        cells = [(f"{e[column]:.4f} | " if values else "") + f"{e[f'{column}_{key}'][0]:+.2f}% ± "
                 f"{e[f'{column}_{key}'][1]:.2f}" for column, _ in COLUMNS]
        seconds = f"{e['seconds_per_step']:.3f}" if e["step"] else ""
        lines.append(f"| {LABELS[e['variant']].format(n=removed)} | {e['step']} | {','.join(map(str, e[seeds_key]))} | "
                     + " | ".join(cells) + f" | {seconds} |")
    return "\n".join(lines)


def write_atomic(path: str, text: str) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def report(args: argparse.Namespace, runs: list[dict], removed: dict[int, list[int]], sizes: dict[str, int],
           training_sizes: dict[str, int], untrained: dict[str, float]) -> str:
    steps = [0, *args.eval_at]
    summary = summarise(runs, steps, untrained)
    seeds = sorted(removed)
    header = (f"{args.model}: {args.layers_removed} of its transformer layers removed ({BLOCK_SCORER} on "
              f"{args.calibration_size}+{args.calibration_size} calibration triples per seed; blocks removed per seed: "
              f"{'; '.join(f'seed {s}: {removed[s]}' for s in seeds)}), retrained {args.steps} steps on "
              f"{training_sizes['domain']} chemistry + {training_sizes['general']} general calibration triples "
              f"(lr {args.lr:g}, batch 8, 25% general, 10 warm-up steps; distill: + {args.distill_weight:g} x cosine "
              f"distillation to the dense model); {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); nDCG@10 on "
              f"the first {sizes['domain']} chemistry / {sizes['general']} general held-out triples; dense index: "
              f"the model's queries against documents embedded by the untrained dense model; "
              f"{torch.get_num_threads()} CPU thread(s); s/step excludes evaluation.")
    text = (f"{header}\n\nΔ against the untrained dense model (mean ± sample std over seeds):\n\n"
            f"{markdown(summary, 'change', removed=args.layers_removed)}\n\nΔ against the dense control retrained the "
            f"same number of steps (same seed):\n\n"
            f"{markdown([e for e in summary if e['variant'] != 'dense'], 'vs_control', False, args.layers_removed)}\n")
    os.makedirs(args.output_dir, exist_ok=True)
    write_atomic(os.path.join(args.output_dir, "recovery.json"),
                 json.dumps({"settings": vars(args), "removed_layers": {str(s): removed[s] for s in seeds},
                             "untrained_dense": untrained, "heldout_sizes": sizes,
                             "training_sizes": training_sizes, "summary": summary,
                             "runs": runs}, indent=1, ensure_ascii=False))
    write_atomic(os.path.join(args.output_dir, "recovery.md"), text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data_dir", default="output/gcide", help="benchmarks/gcide_triples.py output")
    parser.add_argument("--subsets_dir", default=None,
                        help="where ablation.py wrote seed<N>/{domain,general}-calibration.json (default: "
                             "output/ablation_cpu/<model>)")
    parser.add_argument("--calibration_size", type=int, default=32, help="calibration triples per side that choose "
                                                                          "the blocks")
    parser.add_argument("--heldout_size", type=int, default=100, help="first held-out triples per side evaluated")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--distill_weight", type=float, default=1.0, help="the distill variant's weight")
    parser.add_argument("--layers_removed", type=int, default=REMOVED)
    parser.add_argument("--lr", type=float, default=1e-5, help="retrain.py's default; a tiny model trained here "
                                                              "needs more (1e-4)")
    parser.add_argument("--eval_at", type=int, nargs="+", default=[100, 250, 500])
    parser.add_argument("--batch_size", type=int, default=16, help="block scoring and evaluation batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--output_dir", default="output/recovery")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs (variant, seed) of <output_dir>/recovery.json made with the same --model, "
                             "--steps, --eval_at, --heldout_size and --calibration_size, and run only the others")
    args = parser.parse_args()
    args.eval_at = sorted(set(args.eval_at))
    if args.eval_at[-1] > args.steps or args.eval_at[0] < 1:
        parser.error(f"--eval_at must lie in 1..--steps ({args.steps})")
    args.subsets_dir = args.subsets_dir or os.path.join("output", "ablation_cpu", model_dirname(args.model))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    calibration = {side: os.path.join(args.data_dir, f"{name}-calibration.json") for side, name in SIDES.items()}
    heldout_files = {side: os.path.join(args.data_dir, f"{name}-heldout.json") for side, name in SIDES.items()}
    missing = [p for p in (*calibration.values(), *heldout_files.values()) if not os.path.isfile(p)]
    if missing:
        sys.exit(f"error: {missing[0]} not found; build the data first: python benchmarks/gcide_triples.py")

    dense = gaprune.load_embedder(args.model, "cpu", "float32")
    log.info("%s: %d transformer blocks", args.model, len(transformer_blocks(dense.model)))
    training = {side: load_triples(path) for side, path in calibration.items()}
    heldout_triples = {side: load_triples(path, args.heldout_size) for side, path in heldout_files.items()}
    seen = {t["query"] for triples in training.values() for t in triples}
    shared = sum(t["query"] in seen for triples in heldout_triples.values() for t in triples)
    if shared:
        sys.exit(f"error: {shared} held-out queries are in the calibration files")
    heldout = HeldOut(heldout_triples, dense, args.batch_size)
    sizes = {side: len(t) for side, t in heldout_triples.items()}
    training_sizes = {side: len(t) for side, t in training.items()}

    heldout.one_shot[()] = untrained = heldout.scores(dense)
    runs: list[dict] = []
    removed: dict[int, list[int]] = {}
    earlier = os.path.join(args.output_dir, "recovery.json")
    if args.resume and os.path.isfile(earlier):
        with open(earlier, encoding="utf-8") as handle:
            found = json.load(handle)
        same = ("model", "steps", "eval_at", "heldout_size", "calibration_size")
        if any(found["settings"][key] != getattr(args, key) for key in same):
            sys.exit(f"error: {earlier} was made with other settings ({', '.join(same)}); not resuming")
        runs = found["runs"]
        removed = {int(seed): blocks for seed, blocks in found["removed_layers"].items()}
        log.info("resuming: %d runs of %s kept", len(runs), earlier)
    done = {(run["variant"], run["seed"]) for run in runs}
    teacher = None
    if any(("distill", seed) not in done for seed in args.seeds) and "distill" in args.variants:
        start = time.perf_counter()
        teacher = teacher_embeddings(dense, [*training["domain"], *training["general"]])
        log.info("teacher embeddings of %d texts in %.0f s", len(teacher), time.perf_counter() - start)
    checked = False
    for seed in args.seeds:
        subsets = {side: seed_subset(path, args.calibration_size, seed,
                                     os.path.join(args.subsets_dir, f"seed{seed}", f"{side}-calibration.json"))
                   for side, path in calibration.items()}
        removed[seed] = chosen_blocks(dense, subsets, args.calibration_size, seed, args.batch_size,
                                      args.layers_removed)
        if not checked:  # the cached measurement against evaluate.py's, once
            pruned = copy.deepcopy(dense)
            remove_blocks(pruned.model, removed[seed])
            ours = heldout.scores(pruned)
            for side, triples in heldout_triples.items():
                reference = (evaluate_triples(pruned, triples)["metrics"][METRIC],
                             evaluate_triples(pruned, triples, index_embedder=dense)["metrics"][METRIC])
                if abs(reference[0] - ours[side]) > 1e-6 or abs(reference[1] - ours[f"{side}_index"]) > 1e-6:
                    sys.exit(f"error: the cached evaluation disagrees with evaluate_triples: {reference} "
                             f"against {ours[side]}, {ours[f'{side}_index']}")
            log.info("the cached evaluation equals evaluate_triples's (own and dense index)")
            checked = True
        for variant in [v for v in args.variants if (v, seed) not in done]:
            run = run_variant(dense, variant, removed[seed], seed, args.steps, args.eval_at, heldout, training,
                              teacher, args.distill_weight, args.lr)
            log.info("seed %d %s: %.3f s/step", seed, variant, run["seconds_per_step"])
            runs.append(run)
            report(args, runs, removed, sizes, training_sizes, untrained)  # after every run, in case of a cut
    print(report(args, runs, removed, sizes, training_sizes, untrained))
    print(os.path.join(args.output_dir, "recovery.json"))


if __name__ == "__main__":
    main()
