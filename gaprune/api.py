"""The Python API: each stage as one call, taking a loaded Embedder or a model path.

    import gaprune
    model = gaprune.load_embedder("sentence-transformers/all-MiniLM-L6-v2")
    general = gaprune.fisher(model, "data/general-example.json", output_dir="output/fisher")
    domain = gaprune.fisher(model, "data/chem-example.json", output_dir="output/fisher")
    alignment = gaprune.alignment(model, "data/general-example.json", "data/chem-example.json",
                                  output_dir="output/gradient", alignment_mode="local_cosine")
    result = gaprune.prune(model, 0.5, scorer="aligned_saliency", general_fisher=general.path,
                           domain_fisher=domain.path, alignment=alignment.path)
    print(gaprune.evaluate(model, "data/chem-example.json")["metrics"]["ndcg@10"])

The command-line stages are thin front ends over these functions.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from gaprune.data import load_triples
from gaprune.evaluation import evaluate_triples
from gaprune.fisher_information import fisher_information
from gaprune.gradient_alignment import gradient_alignment
from gaprune.results import AlignmentResult, FisherResult
from gaprune.layers import gradients_of, select_parameters
from gaprune.errors import InputError
from gaprune.masking import MaskResult
from gaprune.patterns import parse_pattern
from gaprune.distributed import current_world
from gaprune.memory import MemoryPlan, alignment_plan, fisher_plan, measured_line, warn_if_too_large
from gaprune.options import NATURAL_ORDER, OWN_TARGET, SCORE_DTYPES, SUM_PLACES, UNIFORM_SHARES
from gaprune.modeling import Embedder, load_embedder
from gaprune.pruning import (Calibration, StructureResult, check_group_order, check_layer_shares,
                             check_reconstruction_target, prune_calibrated, prune_candidates, prune_structure,
                             scorers_used, structure_candidates)
from gaprune.scorefiles import open_score_files, save_alignment, save_fisher
from gaprune.scorers import get_scorer
from gaprune.scoring import ArrayFn, DAIConfig
from gaprune.structure import unit_plan

ModelLike = Embedder | str
log = logging.getLogger("gaprune")


def as_embedder(model: ModelLike, device: str = "auto", dtype: str = "auto",
                native_cpu_bfloat16: bool = False) -> Embedder:
    """An Embedder as given, or loaded from a folder or hub id (``native_cpu_bfloat16``: see resolve_dtype)."""
    return model if isinstance(model, Embedder) else load_embedder(model, device, dtype,
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
    embedder = as_embedder(model, native_cpu_bfloat16=True)
    triples = load_triples(data_path, max_samples)
    with _scoring(embedder, layer_types, gradients, accumulate_on, lambda selected, place, ranks: fisher_plan(
            embedder, selected, triples, batch_size, place, runtime_rss, ranks=ranks)) as plan:
        result = fisher_information(embedder, triples, batch_size, layer_types, on_first_loss,
                                    accumulate_on=plan.accumulate_on)
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
    if score_dtype not in SCORE_DTYPES:  # before the pass, not when writing after it
        raise InputError(f"score_dtype must be one of {sorted(SCORE_DTYPES)}, got {score_dtype!r}")
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
    if fisher_output_dir is not None:
        for side, data_path in (("general", general_data_path), ("domain", domain_data_path)):
            result.fisher[side].path = save_fisher(result.fisher[side], fisher_output_dir, data_path, embedder.name,
                                                   score_dtype)
    if output_dir is not None:
        result.path = save_alignment(result, output_dir, embedder.name, general_data_path, domain_data_path,
                                     use_distributed)
    return result


def prune(model: ModelLike, sparsity: float, scorer: str = "dai", general_fisher: str | None = None,
          domain_fisher: str | None = None, alignment: str | None = None, layer_types: Sequence[str] = ("mlp",),
          config: DAIConfig | None = None, strategy: str = "global", rho_min: float = 0.05,
          rho_max: float = 0.95, seed: int = 42, pattern: str = "unstructured",
          calibration: Calibration | None = None, reconstruct: bool = False,
          layer_shares: str = UNIFORM_SHARES, group_order: str = NATURAL_ORDER,
          reconstruction_target: str = OWN_TARGET) -> MaskResult:
    """Zero, in place, the ``sparsity`` share of the candidate weights that ``scorer`` ranks lowest,
    reading the given score files (results JSON paths); with an N:M ``pattern`` ("2:4"), N of every M
    weights of each row instead. Wanda and SparseGPT, and ``reconstruct`` (the OBS update of the kept
    weights under the mask), need ``calibration`` texts; ``layer_shares`` (a score-based scorer) sets Wanda's and
    SparseGPT's share of each layer from that scorer's global ranking, and ``group_order="hessian"`` the order
    of SparseGPT's N:M groups; ``reconstruction_target="dense"`` has SparseGPT's (or reconstruction's) updated
    weights reproduce the dense model's outputs. Save the model with gaprune.checkpoint.save_model."""
    embedder = as_embedder(model)
    config = config or DAIConfig()
    chosen = get_scorer(scorer)
    sparsity_pattern = parse_pattern(pattern)
    check_layer_shares([scorer], layer_shares, sparsity_pattern)
    check_group_order([scorer], group_order, sparsity_pattern)
    check_reconstruction_target([scorer], reconstruction_target, reconstruct)
    if (chosen.needs_activations or reconstruct) and calibration is None:
        raise InputError(f"{scorer if chosen.needs_activations else 'reconstruction'} needs calibration texts")
    candidates = select_parameters(embedder.model.named_parameters(), layer_types)
    arrays = _score_arrays(embedder, candidates, scorers_used(scorer, layer_shares), config, general_fisher,
                           domain_fisher, alignment)
    if chosen.needs_activations or reconstruct:
        return prune_calibrated(embedder, candidates, scorer, sparsity, calibration, reconstruct, sparsity_pattern,
                                arrays, config, strategy, rho_min, rho_max, seed, layer_shares, group_order,
                                reconstruction_target)
    return prune_candidates(candidates, arrays, scorer, config, sparsity, strategy, rho_min, rho_max, seed,
                            sparsity_pattern)


def prune_units(model: ModelLike, share: float, structure: str = "channels", scorer: str = "dai",
                general_fisher: str | None = None, domain_fisher: str | None = None, alignment: str | None = None,
                config: DAIConfig | None = None, seed: int = 42) -> StructureResult:
    """Remove, in place, the ``share`` of every layer's MLP channels (``structure="channels"``) or query heads
    (``"heads"``) that ``scorer`` ranks lowest; the model and its config become smaller. Score files are read
    for the weights that carry the units (MLP, or q_proj and o_proj)."""
    embedder = as_embedder(model)
    config = config or DAIConfig()
    plan = unit_plan(embedder.model, structure)
    candidates = structure_candidates(embedder.model, plan)
    arrays = _score_arrays(embedder, candidates, [scorer], config, general_fisher, domain_fisher, alignment)
    return prune_structure(embedder.model, plan, arrays, scorer, config, share, seed)


def _score_arrays(embedder: Embedder, candidates: dict[str, torch.Tensor], scorers: Sequence[str], config: DAIConfig,
                  general_fisher: str | None, domain_fisher: str | None, alignment: str | None) -> ArrayFn:
    """The given score files, once each ``scorers`` entry is checked to have what it needs."""
    paths = {"domain_fisher": domain_fisher, "general_fisher": general_fisher, "alignment": alignment}
    for scorer in scorers:
        get_scorer(scorer).check(config, {side for side, path in paths.items() if path})
    return open_score_files(paths, {name: list(p.shape) for name, p in candidates.items()}, embedder.device,
                            need_cosine=any(get_scorer(scorer).reads_cosine(config) for scorer in scorers),
                            model_name=embedder.name)


@torch.no_grad()
def evaluate(model: ModelLike, data_path: str, batch_size: int = 32, max_samples: int | None = None,
             instructions: str = "auto") -> dict:
    """nDCG@10, MRR@10, Recall@1 and Recall@10 of retrieving each query's positive among all the file's
    positives and negatives."""
    embedder = as_embedder(model)
    return evaluate_triples(embedder, load_triples(data_path, max_samples), batch_size, instructions)


__all__ = ["as_embedder", "fisher", "alignment", "prune", "prune_units", "evaluate", "load_embedder"]
