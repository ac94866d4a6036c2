"""Prune one model with every scorer at each sparsity, evaluate dense and pruned, print the paper-style table.

With --select, the best row under a stated objective (the most domain nDCG@10 with general text at most
--max_general_drop percent below dense, say) is pruned again and saved like SparseModel.py, with the table of
every candidate in its folder: give it a validation split (sample.py --validation_size), and measure the saved
model on other held-out data, since the choice was made on that split.

Under torchrun every rank prunes (rank 0's weights are then given to all, so they cannot drift apart) and
encodes its share of the evaluation texts; rank 0 writes and prints.

Example:
  python gaprune/model/compare.py --model_path sentence-transformers/all-MiniLM-L6-v2 \
      --domain_data_paths heldout-chem.json --general_data_paths heldout-web.json \
      --scorers magnitude aligned_saliency --sparsity 0.5 0.6 \
      --general_fisher_scores G.json --domain_fisher_scores D.json --alignment_scores A.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import time
from datetime import datetime
from typing import TYPE_CHECKING, Sequence

from gaprune.cli import (ArgumentParser, add_calibration_args, add_layer_args, add_runtime_args, add_scoring_args,
                         finish, finite_float, positive_int, run, str2bool)
from gaprune.coefficients import DAIConfig
from gaprune.errors import InputError
from gaprune.options import (BLOCK_MEASURES, BUDGET_STRATEGIES, DEFAULT_SCORER, LAYERS, NATURAL_ORDER, OWN_TARGET,
                             UNIFORM_SHARES, UNIT_STRUCTURES, UNSTRUCTURED)
from gaprune.scorers import SCORERS
from gaprune.selection import OBJECTIVES, Objective, select

if TYPE_CHECKING:
    import torch

    from gaprune.distributed import World
    from gaprune.masking import MaskResult
    from gaprune.modeling import Embedder
    from gaprune.blocks import DepthResult
    from gaprune.pruning import Calibration, StructureResult
    from gaprune.scoring import ArrayFn
    from gaprune.spec import PruneSpec, ScoreFiles

log = logging.getLogger("gaprune.compare")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--domain_data_paths", nargs="+", required=True, help="held-out domain triple files")
    parser.add_argument("--general_data_paths", nargs="+", required=True, help="held-out general triple files")
    parser.add_argument("--general_fisher_scores")
    parser.add_argument("--domain_fisher_scores")
    parser.add_argument("--alignment_scores")
    parser.add_argument("--sparsity", type=finite_float, nargs="+", default=[0.5],
                        help="shares of candidate weights to zero (with --structure: of every layer's channels or "
                             "heads, or of the transformer blocks, to remove)")
    parser.add_argument("--structure", default="unstructured", choices=["unstructured", *UNIT_STRUCTURES, LAYERS],
                        help="unstructured: zero single weights (default); channels / heads: remove whole MLP "
                             "channels / query heads; layers: whole transformer blocks, the rows being block scorers "
                             f"({', '.join(BLOCK_MEASURES)}, on the calibration texts) or the scorers whose sums rank "
                             "the blocks (each pruned model is loaded afresh)")
    parser.add_argument("--scorers", nargs="+", metavar="SCORER[:KEY=VALUE,...]",
                        help=f"scorers to compare: {', '.join(SCORERS)}; a scorer may override coefficients, "
                             "e.g. aligned_saliency:alignment_weight=0,fisher_norm=tensor, and take pruner options of "
                             "its own row: sparsegpt:layer_shares=aligned_saliency, :group_order=hessian, "
                             ":reconstruction_target=dense, aligned_saliency:reconstruct=true (default: all; wanda "
                             "and sparsegpt only with calibration data)")
    add_layer_args(parser, ["mlp"])
    parser.add_argument("--layer_budget_strategy", default="global", choices=BUDGET_STRATEGIES)
    parser.add_argument("--query_instructions", default="auto", choices=["auto", "keep", "strip"])
    parser.add_argument("--max_samples", type=positive_int, help="evaluate the first N triples of each file")
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--seed", type=int, default=42, help="seed of the random scorer")
    parser.add_argument("--output_dir", default="output/compare")
    parser.add_argument("--select", choices=OBJECTIVES,
                        help="choose the best row and save its model like SparseModel.py, with the table of every "
                             "candidate in its folder: the most domain or general nDCG@10, or the best mean change "
                             "of both (give the validation split as the data paths; default: compare only)")
    parser.add_argument("--max_general_drop", type=finite_float, metavar="PCT",
                        help="--select: only rows whose general nDCG@10 is at most PCT percent below the dense "
                             "model's (default: no floor)")
    parser.add_argument("--mteb_tasks", nargs="+", metavar="NAME",
                        help="also run these MTEB tasks (e.g. SciFact NFCorpus; downloaded the first time) on the "
                             "dense model and every row: a column each, main score and change against dense "
                             "(needs pip install -e .[mteb])")
    parser.add_argument("--mteb_local", action="store_true",
                        help="also run each domain and general file as a local MTEB retrieval task: mteb's own "
                             "nDCG@10 of the same search, a column each (needs pip install -e .[mteb])")
    add_scoring_args(parser)
    add_calibration_args(parser)
    add_runtime_args(parser)
    return parser


RECIPE_OPTIONS = ("layer_shares", "group_order", "reconstruction_target", "reconstruct")


def parse_scorer(spec: str, base: DAIConfig) -> tuple[str, DAIConfig, dict]:
    """'sparsegpt:layer_shares=aligned_saliency' or 'aligned_saliency:alignment_weight=0,fisher_norm=tensor' ->
    the scorer, its coefficients and the pruner options of this row alone (the flags of the same names)."""
    scoring, _, overrides = spec.partition(":")
    if scoring not in SCORERS:
        raise InputError(f"unknown scorer {scoring!r} in {spec!r}; choose from {', '.join(SCORERS)}")
    changes, options = {}, {}
    for item in filter(None, overrides.split(",")):
        key, sep, value = item.partition("=")
        if key in RECIPE_OPTIONS and sep:
            try:
                options[key] = str2bool(value) if key == "reconstruct" else value
            except argparse.ArgumentTypeError as err:
                raise InputError(f"bad value for {key} in {spec!r}: {err}") from None
            continue
        if not sep or not hasattr(base, key):
            raise InputError(f"bad override {item!r} in {spec!r}; use KEY=VALUE with KEY one of "
                             f"{', '.join([*(f.name for f in dataclasses.fields(DAIConfig)), *RECIPE_OPTIONS])}")
        try:
            changes[key] = type(getattr(base, key))(value)
        except ValueError:
            raise InputError(f"bad value {value!r} for {key} in {spec!r}") from None
    config = dataclasses.replace(base, **changes)
    try:
        config.check()
    except InputError as err:
        raise InputError(f"{err} in {spec!r}") from None
    return scoring, config, options


def mean_metrics(results: dict[str, dict]) -> dict[str, float]:
    from gaprune.evaluation import METRICS

    return {m: sum(r["metrics"][m] for r in results.values()) / len(results) for m in METRICS}


def markdown_table(rows: list[dict]) -> str:
    """The paper-style table; with MTEB tasks, a column pair per task: its main score and the change against
    dense."""
    from gaprune.mteb_tasks import short_name

    tasks = list(rows[0].get("mteb", {}))
    lines = ["| method | sparsity | domain nDCG@10 | Δ vs dense | general nDCG@10 | Δ vs dense | mask ∩ magnitude |"
             + "".join(f" {short_name(name)} | Δ vs dense |" for name in tasks),
             "|---|---|---|---|---|---|---|" + "---|---|" * len(tasks)]

    def percent(value):
        return "" if value is None else f"{value:+.2f}%"

    for row in rows:
        agreement = row.get("mask_agreement_with_magnitude")
        task_changes = row.get("mteb_change_percent", {})
        lines.append(f"| {row['method']} | {row['sparsity']:.0%} | {row['domain']['ndcg@10']:.4f} "
                     f"| {percent(row['domain_change_percent'])} | {row['general']['ndcg@10']:.4f} "
                     f"| {percent(row['general_change_percent'])} | {'' if agreement is None else f'{agreement:.2%}'} |"
                     + "".join(f" {row['mteb'][name]['main_score']:.4f} | {percent(task_changes.get(name))} |"
                               for name in tasks))
    return "\n".join(lines)


SELECT_CANDIDATES = ("magnitude", "domain_fisher", "dai", "aligned_saliency")
SELECT_CANDIDATES_WITH_TEXTS = ("wanda", "wanda:layer_shares=aligned_saliency", "sparsegpt",
                                "sparsegpt:layer_shares=aligned_saliency", "sparsegpt:reconstruction_target=dense",
                                "sparsegpt:group_order=hessian", "aligned_saliency:reconstruct=true")


def row_specs(args, scores: ScoreFiles | None = None) -> list[tuple[str, PruneSpec]]:
    """One checked request per row (each share, each scorer with its coefficient overrides and pruner options);
    the options and calibration texts of Wanda and SparseGPT go to them alone, and an option no row takes is
    refused. Under --select without --scorers, the candidates are SELECT_CANDIDATES (and, with calibration texts,
    SELECT_CANDIDATES_WITH_TEXTS) less those whose score files were not given."""
    from gaprune.spec import NO_STATISTICS, coefficients_from_args, spec_from_args

    for pct in args.sparsity:
        if not 0.0 <= pct <= 1.0:
            raise InputError(f"--sparsity values must be between 0 and 1, got {pct}")
    calibrated = bool(args.calibration_data or args.general_calibration_data)
    if args.select and len(args.sparsity) > 1:
        raise InputError("--select chooses among recipes at one budget: give one --sparsity")
    if args.max_general_drop is not None and not args.select:
        raise InputError("--max_general_drop is the floor of --select's choice: give --select")
    if args.scorers:
        names = args.scorers
    elif args.structure == LAYERS:
        names = [*(BLOCK_MEASURES if calibrated else ()), *SELECT_CANDIDATES]
    elif args.select:
        names = [*SELECT_CANDIDATES, *(SELECT_CANDIDATES_WITH_TEXTS if calibrated else ())]
    else:
        names = [name for name, s in SCORERS.items() if calibrated or not s.needs_activations]
    base = coefficients_from_args(args)
    scorers = [(name, name, base, {}) if args.structure == LAYERS and name in BLOCK_MEASURES
               else (name, *parse_scorer(name, base)) for name in names]
    defaults = bool(args.select and not args.scorers)
    with _as_compare_flags():
        rows = {(label, spec.share): (label, spec) for pct in args.sparsity for label, *recipe in scorers
                for spec in [default_candidate(args, label, pct, recipe, scores) if defaults
                             else row_spec(args, label, pct, *recipe)] if spec is not None}
        if not rows:
            raise InputError("none of --select's default candidates can run this request; name them with --scorers")
        taken = {key for _, spec in rows.values() for key in spec.pruner_options()}
        if set(_options_asked(args)) - taken:
            spec_from_args(args, scorers[0][1], args.sparsity[0], scorers[0][2])  # raises the one-scorer message
    if not any(spec.uses_texts for _, spec in rows.values()) and args.calibration_weighting != "uniform":
        raise InputError(NO_STATISTICS)
    return list(rows.values())


def row_spec(args, label: str, share: float, scoring: str, config: DAIConfig, options: dict) -> PruneSpec:
    """A row's request: the flags, with the row's own pruner options in place of theirs; with --structure layers,
    the blocks ``scoring`` ranks lowest (a measurement on the calibration texts, or a scorer's sums)."""
    from gaprune.spec import spec_from_args

    if args.structure == LAYERS:  # the block scorer is the row; the texts go to the measurements
        return spec_from_args(args, DEFAULT_SCORER, share, config, block_scorer=scoring)
    try:
        spec = spec_from_args(argparse.Namespace(**{**vars(args), **options}), scoring, share, config,
                              for_this_scorer=True)
    except InputError as err:
        raise InputError(f"{label}: {err}" if options else str(err)) from None
    ignored = [key for key, value in options.items() if getattr(spec, key) != value]
    if ignored:
        raise InputError(f"{label}: {scoring} does not take {', '.join(ignored)} here")
    return spec


def default_candidate(args, label: str, share: float, recipe: list, scores: ScoreFiles | None) -> PruneSpec | None:
    """A default --select candidate's request, or None (with an info line) when this request or the given score
    files rule it out: a pattern that fixes the layer shares, a structure Wanda cannot remove, a missing file."""
    from gaprune.scorefiles import ScoreArrays

    try:
        spec = row_spec(args, label, share, *recipe)
        if scores is not None:
            spec.check_scores(scores)
            if spec.reads_cosine() and scores.alignment:
                ScoreArrays(scores.alignment, "alignment").require_cosine()
    except InputError as err:
        log.info("candidate %s left out: %s", label, err)
        return None
    return spec


@contextlib.contextmanager
def _as_compare_flags():
    """A request refused in compare.py names its --sparsity where SparseModel.py's would name the pct flags."""
    try:
        yield
    except InputError as err:
        raise InputError(_compare_flags(str(err))) from None


def _compare_flags(text: str) -> str:
    """A message of SparseModel.py's flags as compare.py names them: its --sparsity for either share."""
    return re.sub(r"--(un)?structured_pct", "--sparsity", text)


def request_notes(specs: list[PruneSpec], calibration_given: bool) -> list[str]:
    """The notes of the whole comparison: a row's share notes, and a setting ignored only if every row ignores
    it (the texts of Wanda and SparseGPT, a coefficient that one scorer reads and another does not)."""
    from gaprune.spec import CALIBRATION_IGNORED

    notes = [_compare_flags(note) for spec in specs for note in spec.share_notes()]
    if calibration_given and not any(spec.uses_texts for spec in specs):
        notes.append(CALIBRATION_IGNORED)
    unread = set.intersection(*(set(spec.unread_coefficients()) for spec in specs))
    if unread:
        notes.append(f"{', '.join('--' + name for name in sorted(unread))}: read by none of the scorers; ignored")
    return list(dict.fromkeys(notes))


def _options_asked(args) -> list[str]:
    defaults = {"layer_shares": UNIFORM_SHARES, "group_order": NATURAL_ORDER, "reconstruction_target": OWN_TARGET}
    return [key for key, default in defaults.items() if getattr(args, key) != default]


@dataclasses.dataclass
class DenseModel:
    """The dense model every row prunes afresh, and what the rows share: the candidate weights (and a copy of
    them to restore), the score files, the calibration texts with their loss-gradient weights."""

    args: argparse.Namespace
    embedder: Embedder
    candidates: dict[str, torch.Tensor]
    arrays: ArrayFn
    calibration: Calibration | None
    dense_weights: dict[str, torch.Tensor]
    zeros_before: int  # the dense model's zero weights

    @classmethod
    def load(cls, args: argparse.Namespace, specs: list[PruneSpec], scores: ScoreFiles,
             calibration: Calibration | None) -> DenseModel:
        from gaprune.checkpoint import count_zeros
        from gaprune.distributed import warn_on_main
        from gaprune.modeling import load_embedder
        from gaprune.pruning import measure_token_weights, scored_tensors
        from gaprune.scorefiles import open_score_files

        embedder = load_embedder(args.model_path, args.device, args.dtype)
        notes = request_notes(specs, bool(args.calibration_data or args.general_calibration_data))
        warn_on_main(log, dict.fromkeys(notes + [note for spec in specs for note in spec.check_model(embedder.model)]))
        structure = specs[0].structure
        candidates = scored_tensors(embedder.model, specs[0])
        arrays = open_score_files(scores.paths(), {name: list(p.shape) for name, p in candidates.items()},
                                  embedder.device, need_cosine=any(spec.reads_cosine() for spec in specs),
                                  model_name=args.model_path)
        if structure == UNSTRUCTURED and calibration is not None:  # every row prunes the same dense model:
            calibration = measure_token_weights(embedder, candidates, calibration)  # one loss-gradient measurement
        dense_weights = ({name: p.detach().to("cpu", copy=True) for name, p in candidates.items()}
                         if structure == UNSTRUCTURED else {})  # structures load each model afresh
        return cls(args, embedder, candidates, arrays, calibration, dense_weights, count_zeros(embedder.model))

    def pruned(self, spec: PruneSpec, world: World) -> tuple[Embedder, MaskResult | StructureResult | DepthResult]:
        """The model pruned as ``spec`` asks (as gaprune.prune would), and what was pruned."""
        import torch

        from gaprune.modeling import load_embedder
        from gaprune.pruning import prune_calibrated, prune_candidates, prune_depth, prune_structure
        from gaprune.structure import unit_plan

        if spec.structure == UNSTRUCTURED:
            with torch.no_grad():
                for name, p in self.candidates.items():
                    p.copy_(self.dense_weights[name])
            if spec.calibrated:
                result = prune_calibrated(self.embedder, self.candidates, spec, self.calibration, self.arrays)
            else:
                result = prune_candidates(self.candidates, self.arrays, spec.scorer, spec.config, spec.share,
                                          spec.strategy, spec.rho_min, spec.rho_max, spec.seed, spec.parsed_pattern)
            world.broadcast_(p.data for p in self.candidates.values())
            return self.embedder, result
        fresh = load_embedder(self.args.model_path, self.args.device, self.args.dtype)
        if spec.structure == LAYERS:
            result = prune_depth(fresh, spec, self.arrays, self.calibration)
        else:
            result = prune_structure(fresh.model, unit_plan(fresh.model, spec.structure), self.arrays, spec.scorer,
                                     spec.config, spec.sparsity, spec.seed)
        world.broadcast_(p.data for p in fresh.model.parameters())  # the same count removed: the same shapes
        return fresh, result


def row_entries(result: MaskResult | StructureResult | DepthResult) -> dict:
    """What a row records of its pruning: the weights masked, the parameters and units left, or the blocks."""
    from gaprune.blocks import DepthResult
    from gaprune.masking import MaskResult

    if isinstance(result, MaskResult):
        return {"masked_params": result.masked, **result.diagnostics}
    if isinstance(result, DepthResult):
        return {"params_after": result.params_after, "removed_layers": result.removed,
                "block_scores": result.block_scores}
    return {"params_after": result.params_after, "units_after": result.units_after, **result.diagnostics}


def evaluated(model: Embedder, held_out: dict[str, dict[str, list[dict]]], args: argparse.Namespace,
              mteb_tasks: Sequence = ()) -> dict:
    """The row's metrics: the mean over each side's files, and every file's own; with MTEB tasks, each task's
    scores."""
    from gaprune.evaluation import evaluate_triples
    from gaprune.mteb_tasks import run_tasks

    results = {side: {path: evaluate_triples(model, triples, args.batch_size, args.query_instructions)
                      for path, triples in files.items()} for side, files in held_out.items()}
    row = {"domain": mean_metrics(results["domain"]), "general": mean_metrics(results["general"]),
           "files": {**results["domain"], **results["general"]}}
    if mteb_tasks:
        row["mteb"] = run_tasks(model, mteb_tasks, args.batch_size, args.query_instructions)
    return row


def main(argv: Sequence[str] | None = None) -> str | None:
    args = build_parser().parse_args(argv)
    from gaprune import distributed
    from gaprune.data import load_triples
    from gaprune.fileio import check_output_dir, model_dirname, timestamp, write_json, write_text
    from gaprune.mteb_tasks import load_tasks
    from gaprune.pruning import load_calibration, pruned_folder
    from gaprune.spec import score_files_from_args
    from tqdm import tqdm

    scores = score_files_from_args(args)
    rows_asked = row_specs(args, scores)
    objective = Objective(args.select, args.max_general_drop) if args.select else None
    for _, spec in rows_asked:
        spec.check_scores(scores)
    calibration = next((load_calibration(spec.calibration) for _, spec in rows_asked if spec.uses_texts), None)
    check_output_dir(args.output_dir)
    if objective is not None:  # whichever row wins, its folder can be written: known before hours of work
        for _, spec in rows_asked:
            check_output_dir(pruned_folder(args.output_dir, args.model_path, spec), "the selected model's folder")
    world = distributed.init_from_env(args.device)
    held_out = {"domain": {p: load_triples(p, args.max_samples) for p in args.domain_data_paths},
                "general": {p: load_triples(p, args.max_samples) for p in args.general_data_paths}}
    # before the model loads: a missing extra or an unknown or unreachable task is refused first
    mteb_tasks = load_tasks(args.mteb_tasks or (), {**held_out["domain"], **held_out["general"]}
                            if args.mteb_local else None)
    dense = DenseModel.load(args, [spec for _, spec in rows_asked], scores, calibration)
    start = time.perf_counter()
    rows = [{"method": "dense", "sparsity": 0.0, **evaluated(dense.embedder, held_out, args, mteb_tasks),
             "domain_change_percent": None, "general_change_percent": None}]
    if objective is not None and world.is_main:
        print(selection_plan(rows_asked, objective, held_out, calibration, time.perf_counter() - start))
    for label, spec in tqdm(rows_asked, desc="candidates", unit="row", disable=not world.is_main):
        rows.append(candidate_row(label, spec, dense, world, held_out, mteb_tasks, rows[0]))
    table = markdown_table(rows)
    base = os.path.join(args.output_dir, f"compare_{model_dirname(args.model_path)}_{timestamp()}")
    if world.is_main:
        write_json(base + ".json", {"model_path": args.model_path, "timestamp": datetime.now().isoformat(),
                                    "settings": {k: v for k, v in vars(args).items()}, "rows": rows})
        write_text(base + ".md", table + "\n")
        print(table)
    if objective is None:
        return finish(base + ".json") if world.is_main else None
    return save_selected(args, rows, objective, dict(rows_asked), scores, dense, world, table)


def candidate_row(label: str, spec: PruneSpec, dense: DenseModel, world: World, held_out: dict,
                  mteb_tasks: Sequence, dense_row: dict) -> dict:
    """One row: the dense model pruned as ``spec`` asks, evaluated, and its changes against ``dense_row``."""
    import torch

    from gaprune.evaluation import relative_change
    from gaprune.mteb_tasks import changes
    from gaprune.pruning import option_words

    log.info("pruning %.0f%% by %s", 100 * spec.share, label)
    model, result = dense.pruned(spec, world)
    entries = row_entries(result)
    row = {"method": label + "".join(f", {words}" for words in option_words(entries)), "recipe": label,
           "scoring": spec.scorer, "config": dataclasses.asdict(spec.config), "sparsity": spec.share,
           "structure": spec.structure, "sparsity_pattern": spec.pattern, "reconstruct": spec.reconstruct,
           **evaluated(model, held_out, dense.args, mteb_tasks), **entries}
    if model is not dense.embedder:  # a fresh smaller model: free it before the next one loads
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for side in ("domain", "general"):
        row[f"{side}_change_percent"] = relative_change(row[side]["ndcg@10"], dense_row[side]["ndcg@10"])
    if mteb_tasks:
        row["mteb_change_percent"] = {name: change["main_score"]
                                      for name, change in changes(row["mteb"], dense_row["mteb"]).items()}
    return row


def selection_plan(rows_asked: list[tuple[str, PruneSpec]], objective: Objective, held_out: dict,
                   calibration: Calibration | None, dense_seconds: float) -> str:
    """What --select will run: the candidates, the validation data, and the time the evaluations alone take
    (one like the dense model's per candidate); calibrated candidates add their pass over the calibration texts."""
    triples = sum(len(triples) for files in held_out.values() for triples in files.values())
    calibrated = sum(spec.uses_texts for _, spec in rows_asked)
    texts = sum(len(side) for side in calibration.texts.values()) if calibration is not None else 0
    extra = f"; {calibrated} of them also calibrate on {texts} texts" if calibrated and texts else ""
    lines = [f"Selecting among {len(rows_asked)} candidates at {rows_asked[0][1].share:.0%} by {objective.describe()}, "
             f"on {triples} validation triples (their evaluations alone: about "
             f"{len(rows_asked) * dense_seconds / 60:.1f} min here, {dense_seconds:.1f} s each{extra}):"]
    return "\n".join(lines + [f"  {label}" for label, _ in rows_asked])


def save_selected(args, rows: list[dict], objective: Objective, specs: dict[str, PruneSpec], scores: ScoreFiles,
                  dense: DenseModel, world: World, table: str) -> str | None:
    """Prune the dense model again with the row the objective prefers and save it as SparseModel.py does, with
    the table of every candidate (selection.json, a section of the model card)."""
    from gaprune.checkpoint import save_pruned_folder
    from gaprune.evaluation import relative_change
    from gaprune.modelcard import model_card
    from gaprune.pruning import ModelZeros, folder_records, pruned_folder

    chosen = select(rows[1:], rows[0], objective)
    spec = specs[chosen["recipe"]]
    folder = pruned_folder(args.output_dir, args.model_path, spec)
    model, result = dense.pruned(spec, world)
    if not world.is_main:
        return None
    log.info("selected %s (domain %+.2f%%, general %+.2f%% against dense)", chosen["method"],
             chosen["domain_change_percent"] or 0.0, chosen["general_change_percent"] or 0.0)
    zeros = ModelZeros.counted(model.model, dense.zeros_before) if spec.structure == UNSTRUCTURED else None
    records = folder_records(args.model_path, args.batch_size, spec, scores, result, zeros,
                             dense.calibration if spec.uses_texts else None)
    selection = {"objective": objective.describe(), "selected": chosen["recipe"], "table": table,
                 "validation_data": {"domain": args.domain_data_paths, "general": args.general_data_paths},
                 "rows": [{key: row.get(key) for key in ("method", "recipe", "sparsity", "domain", "general",
                                                         "domain_change_percent", "general_change_percent")}
                          for row in rows]}
    dense_files = rows[0]["files"]
    evaluation = {"results": chosen["files"],  # the validation figures the choice was made on
                  "change_percent": {path: {m: relative_change(value, dense_files[path]["metrics"][m])
                                            for m, value in result["metrics"].items()}
                                     for path, result in chosen["files"].items()}}
    save_pruned_folder(model, folder, {**records, "selection.json": selection},
                       model_card(*records.values(), evaluation, selection=selection))
    print(f"Selected {chosen['method']}: saved as {folder}")
    return finish(folder)


if __name__ == "__main__":
    run(main)
