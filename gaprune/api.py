"""The Python API: each stage as one call, taking a loaded Embedder or a model path.

    import gaprune
    model = gaprune.load_embedder("sentence-transformers/all-MiniLM-L6-v2")
    general = gaprune.fisher(model, "data/general-example.json", output_dir="output/fisher")
    domain = gaprune.fisher(model, "data/chem-example.json", output_dir="output/fisher")
    alignment = gaprune.alignment(model, "data/general-example.json", "data/chem-example.json",
                                  output_dir="output/gradient", alignment_mode="local_cosine")
    spec = gaprune.PruneSpec(scorer="aligned_saliency", sparsity=0.5)  # the whole request, checked here
    scores = gaprune.ScoreFiles(general_fisher=general.path, domain_fisher=domain.path, alignment=alignment.path)
    result = gaprune.prune(model, spec, scores)
    print(gaprune.evaluate(model, "data/chem-example.json")["metrics"]["ndcg@10"])

The command-line stages are thin front ends over these functions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch

from gaprune.checks import file_path, integer, layer_type_list, one_of, optional_whole_number, whole_number
from gaprune.data import check_records, load_records, load_triples
from gaprune.distributed import current_world, warn_on_main
from gaprune.errors import InputError
from gaprune.evaluation import evaluate_triples
from gaprune.fileio import read_json
from gaprune.fisher_information import FISHER_EPS, fisher_information
from gaprune.gradient_alignment import gradient_alignment
from gaprune.layers import gradients_of, select_parameters
from gaprune.masking import MaskResult
from gaprune.memory import MemoryPlan, alignment_plan, fisher_plan, measured_line, warn_if_too_large
from gaprune.options import (ACCUMULATE_ON, ALIGNMENT_MODES, GRADIENTS, LAYER_TYPES, SCORE_DTYPES, STRUCTURES,
                             SUM_PLACES, LAYERS, UNSTRUCTURED)
from gaprune.modeling import Embedder, load_embedder, resolve_dtype
from gaprune.blocks import DepthResult
from gaprune.pruning import (BudgetResult, Calibration, StructureResult, load_calibration, prune_calibrated,
                             prune_candidates, prune_depth, prune_structure, prune_to_budget, scored_tensors)
from gaprune.retraining import sparse_finetune, teacher_embeddings, zero_masks
from gaprune.sampling import embed_texts, remove_dir, select_diverse, streaming_dir
from gaprune.results import AlignmentResult, FisherResult
from gaprune.scorefiles import open_score_files, save_alignment, save_fisher
from gaprune.spec import PruneSpec, RetrainSpec, ScoreFiles
from gaprune.structure import unit_plan

ModelLike = Embedder | str
log = logging.getLogger("gaprune")


def as_embedder(model: ModelLike, device: str = "auto", dtype: str = "auto",
                native_cpu_bfloat16: bool = False, max_length: int = 512) -> Embedder:
    """An Embedder as given, or loaded from a folder or hub id (``native_cpu_bfloat16``: see resolve_dtype)."""
    if not isinstance(model, (Embedder, str)):
        raise InputError(f"model must be a gaprune Embedder (gaprune.load_embedder) or a model folder or hub id, "
                         f"got {type(model).__name__}")
    return model if isinstance(model, Embedder) else load_embedder(model, device, dtype, max_length=max_length,
                                                                   native_cpu_bfloat16=native_cpu_bfloat16)


@contextmanager
def _scoring(embedder: Embedder, layer_types: Sequence[str], gradients: str, accumulate_on: str,
             plan_for: Callable[[dict[str, torch.Tensor], str, int], MemoryPlan]) -> Iterator[MemoryPlan]:
    """A scoring stage's surroundings: inside, only the gradients asked for (``gradients_of``) and the stage's
    memory plan (``plan_for(selected, accumulate_on, ranks)``), logged in one line (with a warning when it would
    not fit); afterwards, the peak really used. Under torchrun every rank takes the place for the sums that
    the most cautious rank's plan chose (their GPUs' free memory may differ)."""
    world = current_world()
    with gradients_of(embedder.model, layer_types, gradients) as frozen:
        if frozen:
            log.info("--gradients selected: %d weights outside --sparsify_layers take no gradient", frozen)
        selected = select_parameters(embedder.model.named_parameters(), layer_types)
        ranks = world.size if world.can_shard(embedder.device) else 1  # the ranks that sharded sums can use
        plan = plan_for(selected, accumulate_on, ranks)
        agreed = SUM_PLACES[world.most(SUM_PLACES.index(plan.accumulate_on), embedder.device)]
        if agreed != plan.accumulate_on:
            plan = plan_for(selected, agreed, ranks)
        log.info("%s", plan.line())
        warn_if_too_large(plan)
        yield plan
    log.info("%s", measured_line(plan, embedder.device))


def _check_scoring_args(data_path: object, flag: str, batch_size: object, max_samples: object, layer_types: object,
                        score_dtype: object, accumulate_on: object, gradients: object) -> None:
    """The scoring stages' arguments, checked as their flags are, before the model loads."""
    file_path(data_path, flag)
    whole_number(batch_size, "--batch_size")
    optional_whole_number(max_samples, "--max_samples")
    layer_type_list(layer_types, LAYER_TYPES)
    one_of(score_dtype, "--score_dtype", sorted(SCORE_DTYPES))
    one_of(accumulate_on, "--accumulate_on", ACCUMULATE_ON)
    one_of(gradients, "--gradients", GRADIENTS)


VANISHING_LOSS = 1e-4  # a contrastive loss this small has gradients at the level of rounding noise


def vanishing_gradients(mean_loss: float, fisher_means: Mapping[str, float] | None = None) -> list[str]:
    """Warnings for a scoring pass whose gradients cannot rank weights: the loss is almost 0 (the model already
    separates every triple), or every parameter's Fisher is within a factor of 2 of the 1e-8 floor."""
    warnings = []
    if mean_loss < VANISHING_LOSS:
        warnings.append(f"the contrastive loss is {mean_loss:.2g} on these triples: its gradients are rounding noise "
                        f"and cannot rank the weights (harder negatives or larger batches give a signal)")
    if fisher_means and max(fisher_means.values()) <= 2 * FISHER_EPS:
        warnings.append(f"every parameter's Fisher information is within 2x of the {FISHER_EPS:g} floor: the "
                        f"squared gradients are rounding noise and the scores rank nothing")
    return warnings


def fisher(model: ModelLike, data_path: str, output_dir: str | None = None, batch_size: int = 1,
           max_samples: int | None = 1000, layer_types: Sequence[str] = ("attention", "mlp"),
           score_dtype: str = "float32", on_first_loss=None, accumulate_on: str = "auto",
           gradients: str = "all", runtime_rss: int = 0) -> FisherResult:
    """Fisher information of every weight on the first ``max_samples`` triples of ``data_path``.
    With ``output_dir`` the score files are written and ``result.path`` is the results JSON.
    Under torchrun every rank computes its share and call it with ``output_dir`` on rank 0 only.
    ``gradients="selected"``: only the ``layer_types`` parameters take gradients and are reported (the
    model's requires_grad flags are restored afterwards). ``runtime_rss``: the process's resident memory
    before the model was loaded, for the memory plan on a CPU (0: not counted)."""
    _check_scoring_args(data_path, "--data_path", batch_size, max_samples, layer_types, score_dtype, accumulate_on,
                        gradients)
    embedder = as_embedder(model, native_cpu_bfloat16=True)
    triples = load_triples(data_path, max_samples)
    with _scoring(embedder, layer_types, gradients, accumulate_on, lambda selected, place, ranks: fisher_plan(
            embedder, selected, triples, batch_size, place, runtime_rss, ranks=ranks)) as plan:
        result = fisher_information(embedder, triples, batch_size, layer_types, on_first_loss,
                                    accumulate_on=plan.accumulate_on)
    warn_on_main(log, vanishing_gradients(result.mean_loss, result.mean_scores))
    if output_dir is not None:
        result.path = save_fisher(result, output_dir, data_path, embedder.name, score_dtype)
    return result


def alignment(model: ModelLike, general_data_path: str, domain_data_path: str, output_dir: str | None = None,
              batch_size: int = 2, max_samples: int = 1000, layer_types: Sequence[str] = ("attention", "mlp"),
              seed: int = 42, alignment_mode: str = "product", use_distributed: bool = True,
              fisher_output_dir: str | None = None, with_fisher: bool = False,
              accumulate_on: str = "auto", gradients: str = "all", runtime_rss: int = 0,
              score_dtype: str = "float32") -> AlignmentResult:
    """Agreement of general and domain gradients, per parameter and per weight. With ``output_dir`` the
    score files are written (in ``<output_dir>/<model>/``) and ``result.path`` is the results JSON.
    ``with_fisher`` also measures each side's Fisher information in the same pass (``result.fisher``);
    with ``fisher_output_dir`` those are written as fisher.py writes them (``result.fisher[side].path``),
    their arrays in ``score_dtype``.
    ``gradients`` and ``runtime_rss`` as for fisher()."""
    _check_scoring_args(general_data_path, "--general_data_path", batch_size, max_samples, layer_types, score_dtype,
                        accumulate_on, gradients)
    file_path(domain_data_path, "--domain_data_path")
    if batch_size < 2:
        raise InputError(f"--batch_size must be at least 2 (one general and one domain triple), got {batch_size}")
    one_of(alignment_mode, "--alignment_mode", list(ALIGNMENT_MODES))
    integer(seed, "--seed")
    embedder = as_embedder(model, native_cpu_bfloat16=True)
    if os.path.realpath(general_data_path) == os.path.realpath(domain_data_path):
        log.warning("the general and domain data are the same file (%s): their gradients can only agree",
                    domain_data_path)
    general, domain = load_triples(general_data_path), load_triples(domain_data_path)
    with_fisher = with_fisher or fisher_output_dir is not None
    with _scoring(embedder, layer_types, gradients, accumulate_on, lambda selected, place, ranks: alignment_plan(
            embedder, selected, general, domain, batch_size, with_fisher, place, runtime_rss, ranks=ranks,
            cosine=alignment_mode != "product")) as plan:
        result = gradient_alignment(embedder, general, domain, batch_size, max_samples, layer_types, seed,
                                    use_distributed, alignment_mode, with_fisher, accumulate_on=plan.accumulate_on)
    losses = [loss for loss in result.losses.values() if loss is not None]
    warn_on_main(log, vanishing_gradients(max(losses, default=0.0)))
    if fisher_output_dir is not None:
        for side, data_path in (("general", general_data_path), ("domain", domain_data_path)):
            result.fisher[side].path = save_fisher(result.fisher[side], fisher_output_dir, data_path, embedder.name,
                                                   score_dtype)
    if output_dir is not None:
        result.path = save_alignment(result, output_dir, embedder.name, general_data_path, domain_data_path,
                                     use_distributed)
    return result


def prune(model: ModelLike, spec: PruneSpec, scores: ScoreFiles | None = None,
          calibration: Calibration | None = None) -> MaskResult | StructureResult | DepthResult | BudgetResult:
    """Prune ``model`` in place as ``spec`` asks, reading the score files ``scores`` names. Masks zero the
    ``spec.sparsity`` share of the candidate weights the scorer ranks lowest (or N of every M); a
    ``spec.structure`` removes whole channels or heads, or whole transformer blocks (``layers``), so the model
    and its config become smaller; a budget (``spec.target_speedup``, ``spec.target_params``) picks the mix of
    layers and channels itself. Wanda,
    SparseGPT and reconstruction calibrate on ``spec.calibration``'s texts (or on ``calibration``, texts loaded
    and measured before: compare.py reuses them). Save the model with gaprune.save_model."""
    if not isinstance(spec, PruneSpec):
        raise InputError(f"spec must be a gaprune.PruneSpec, got {type(spec).__name__}")
    scores = ScoreFiles() if scores is None else scores
    spec.check_scores(scores)
    embedder = as_embedder(model)
    warn_on_main(log, spec.notes() + spec.check_model(embedder.model))
    if not spec.uses_texts:
        calibration = None
    elif calibration is None:
        calibration = load_calibration(spec.calibration)
    candidates = scored_tensors(embedder.model, spec)
    arrays = (open_score_files(scores.paths(), {name: list(p.shape) for name, p in candidates.items()},
                               embedder.device, need_cosine=spec.reads_cosine(), model_name=embedder.name)
              if spec.scorers_used() else None)
    if spec.budgeted:
        return prune_to_budget(embedder, spec, arrays, calibration)
    if spec.structure == LAYERS:
        return prune_depth(embedder, spec, arrays, calibration)
    if spec.structure != UNSTRUCTURED:
        return prune_structure(embedder.model, unit_plan(embedder.model, spec.structure), arrays, spec.scorer,
                               spec.config, spec.sparsity, spec.seed)
    if spec.calibrated:
        return prune_calibrated(embedder, candidates, spec, calibration, arrays)
    return prune_candidates(candidates, arrays, spec.scorer, spec.config, spec.share, spec.strategy, spec.rho_min,
                            spec.rho_max, spec.seed, spec.parsed_pattern)


@torch.no_grad()
def evaluate(model: ModelLike, data_path: str, batch_size: int = 32, max_samples: int | None = None,
             instructions: str = "auto") -> dict:
    """nDCG@10, MRR@10, Recall@1 and Recall@10 of retrieving each query's positive among all the file's
    positives and negatives."""
    whole_number(batch_size, "--batch_size")
    optional_whole_number(max_samples, "--max_samples")
    one_of(instructions, "--query_instructions", ["auto", "keep", "strip"])
    embedder = as_embedder(model)
    return evaluate_triples(embedder, load_triples(data_path, max_samples), batch_size, instructions)


MAX_CANDIDATES = 50_000  # sample(): k-means runs on a seeded random subset of a larger file


def sample(model: ModelLike, data: str | Sequence[dict], size: int, text_key: str = "query", batch_size: int = 32,
           kmeans_iterations: int = 20, seed: int = 42, streaming: bool = True, device: str = "auto",
           dtype: str = "auto", max_length: int = 512) -> list[dict] | None:
    """A diverse ``size`` records of ``data`` (a JSON file or its records, e.g. the rest of
    ``gaprune.data.hold_out``): k-means on the embeddings of their ``text_key`` field, the record nearest each
    centroid (fewer when centroids share one). At most ``size`` records come back whole, and the model is then
    not loaded (``device``, ``dtype``, ``max_length``: how a model path is loaded).
    ``streaming`` embeds in chunks through a temporary folder. Under torchrun every rank embeds its share and
    rank 0 alone runs k-means: the other ranks get None (a file kept whole comes back on every rank)."""
    if isinstance(data, str):
        file_path(data, "--input_file")
    for value, flag in ((size, "--target_sample_size"), (batch_size, "--batch_size"),
                        (kmeans_iterations, "--kmeans_iterations"), (max_length, "--max_length")):
        whole_number(value, flag)
    records = (load_records(data, required_keys=[text_key]) if isinstance(data, str)
               else check_records(list(data) if isinstance(data, tuple) else data, "the records", [text_key]))
    if len(records) <= size:
        log.warning("%s has %d records, not more than --target_sample_size %d: keeping them all unchanged",
                    data if isinstance(data, str) else "the data", len(records), size)
        return records
    if len(records) > MAX_CANDIDATES:
        log.info("%d records: k-means runs on a seeded random subset of %d", len(records), MAX_CANDIDATES)
        records = random.Random(seed).sample(records, MAX_CANDIDATES)
    embedder = as_embedder(model, device, dtype, max_length=max_length)
    stream = streaming_dir() if streaming else None
    try:
        embeddings = embed_texts(embedder, [r[text_key] for r in records], batch_size, stream)
    finally:
        remove_dir(stream)
    if not current_world().is_main:
        return None
    return [records[i] for i in select_diverse(embeddings, size, kmeans_iterations, seed)]


@dataclasses.dataclass
class RetrainResult:
    losses: list[float]  # per step
    seconds: float
    held_zero_weights: int  # zeros of the pruned layers held at zero while training
    held_zero_weights_after: int  # of those, still zero afterwards (all, unless something is wrong)


def retrain(model: ModelLike, spec: RetrainSpec, data_path: str, general_data_path: str | None = None,
            compute_dtype: str = "auto", teacher: ModelLike | None = None) -> RetrainResult:
    """Retrain a pruned model in place as ``spec`` says, on the triples of ``data_path`` (and of
    ``general_data_path`` mixed into each batch), holding its pruned weights at zero: those of the candidate
    layers its SparseModel.py records name (none when whole units were removed), else every zero of a matrix.
    A model path is loaded in float32; ``compute_dtype`` is the autocast dtype (auto: bfloat16 on CUDA). A spec
    that distills learns from ``teacher`` (the dense model, an Embedder or a path): its embeddings of every
    training text are computed once, before the first step, and the teacher is then let go."""
    if not isinstance(spec, RetrainSpec):
        raise InputError(f"spec must be a gaprune.RetrainSpec, got {type(spec).__name__}")
    file_path(data_path, "--data_path")
    file_path(general_data_path, "--general_data_path", optional=True)
    one_of(compute_dtype, "--dtype", ["auto", "float32", "bfloat16", "float16"])
    spec.general_per_batch(general_data_path is not None)
    if spec.distills and teacher is None:
        raise InputError("--distill_weight learns from a teacher's embeddings: give the dense model (--teacher_model)")
    if not spec.distills and teacher is not None:
        log.warning("a teacher was given but --distill_weight is 0: it is not used")
    warn_on_main(log, spec.notes())
    domain = load_triples(data_path)
    general = load_triples(general_data_path) if general_data_path else []
    cached = teacher_embeddings(as_embedder(teacher), [*domain, *general]) if spec.distills else None
    embedder = as_embedder(model, dtype="float32")
    masks = zero_masks(held_weights(embedder))
    held = sum(int(torch.count_nonzero(mask)) for mask in masks.values())
    log.info("%d zero weights in %d tensors are held at zero", held, len(masks))
    compute = resolve_dtype(compute_dtype, embedder.device)
    result = sparse_finetune(embedder, domain, spec, masks, general, None if compute == torch.float32 else compute,
                             cached)
    named = dict(embedder.model.named_parameters())
    after = held - sum(int(torch.count_nonzero(named[name][mask])) for name, mask in masks.items())
    return RetrainResult(result.losses, result.seconds, held, after)


def held_weights(embedder: Embedder) -> dict[str, torch.Tensor]:
    """The tensors whose zeros retraining holds: the candidate layers of a SparseModel.py folder's records,
    nothing when whole units were removed, every matrix when the folder has no records."""
    config_file = os.path.join(embedder.model_dir, "evaluation_config.json")
    named = dict(embedder.model.named_parameters())
    if not os.path.isfile(config_file):
        return {name: p for name, p in named.items() if p.dim() >= 2}
    pruning = read_json(config_file, "pruned model's evaluation_config.json")
    if isinstance(pruning, dict) and pruning.get("structure") in STRUCTURES:
        log.info("%s were removed from this model; every weight trains", pruning["structure"])
        return {}
    layers = (pruning.get("sparsify_layers") if isinstance(pruning, dict) else None) or ["all"]
    return select_parameters(named.items(), layers)


__all__ = ["as_embedder", "fisher", "alignment", "prune", "evaluate", "load_embedder", "sample", "retrain"]
