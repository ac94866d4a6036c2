"""How general-data and domain-data gradients agree on the contrastive loss, per parameter and per weight.

Per parameter: the cosine of the two averaged gradients, and how often (per step) the two gradients
point apart (conflict rate). Per selected weight: the maps of gaprune.alignment_maps.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from gaprune.alignment_maps import COSINE_MAPS, NORM_EPS, elementwise_alignment
from gaprune.data import shuffled_batches
from gaprune.distributed import World, current_world
from gaprune.errors import InputError
from gaprune.fisher_information import FisherSums
from gaprune.gradient_sums import (PinnedStaging, Sums, accumulator_dtype, current_gradients, dtype_name,
                                   gradient_dot, gradient_norms, scored_parameters, sum_owners)
from gaprune.layers import embedding_weights, sparse_embedding_gradients
from gaprune.loss import triplet_loss
from gaprune.modeling import Embedder
from gaprune.results import AlignmentResult

log = logging.getLogger(__name__)
SIDES = ("general", "domain")


def _step_count(general: Sequence[dict], domain: Sequence[dict], halves: tuple[int, int], batches: int,
                max_samples: int, world: World, gather: bool, with_fisher: bool) -> int:
    """Steps of one general and one domain half-batch: as many as both sides and ``max_samples`` allow (when
    gathering, a multiple of the world size: every step is a collective)."""
    general_half, domain_half = halves
    batch_size = general_half + domain_half
    steps = min(batches, max_samples // batch_size)
    if gather and with_fisher:  # all_gather's backward adds every rank's share: no longer per-sample gradients
        raise InputError("the one-pass Fisher files need each rank's own gradients: under torchrun give "
                         "--no-use_distributed with --fisher_output_dir")
    if gather and steps % world.size:  # every step is a collective: each rank must take as many
        log.warning("gathering across %d processes: dropping the last %d of %d steps", world.size,
                    steps % world.size, steps)
        steps -= steps % world.size
    if steps == 0:
        raise InputError(f"not enough data for one step: need {general_half} general and {domain_half} domain "
                         f"triples (have {len(general)} and {len(domain)}) and --max_samples >= {batch_size}"
                         + (f" per process ({world.size} processes gathering)" if gather else ""))
    return steps


class _AlignmentSums:
    """A pass's sums: each side's gradients (and, ``with_fisher``, its squared gradients), and per parameter
    the steps where both gradients are nonzero and those where they conflict; the two losses."""

    def __init__(self, embedder: Embedder, layer_types: Sequence[str], with_fisher: bool, world: World,
                 accumulate_on: str, gather: bool):
        self.embedder, self.world, self.gather = embedder, world, gather
        self.named = [(n, p) for n, p in embedder.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.selected = scored_parameters(embedder, layer_types)
        device, self.dtype = embedder.device, accumulator_dtype(embedder)
        self.chosen = [name in self.selected for name, _ in self.named]
        self.unchosen = ~torch.tensor(self.chosen, device=device)  # their Fisher keeps only a sum of squares
        self.host = PinnedStaging(self.params, accumulate_on, embedding_weights(embedder.model))
        owners = sum_owners(self.params, list(self.selected.values()), 2, 2 if with_fisher else 0, accumulate_on,
                            world, embedder)
        self.totals = {side: Sums(self.params, self.dtype, self.host.device, world, owners) for side in SIDES}
        selected_owners = [owner for owner, keep in zip(owners, self.chosen) if keep] if owners else None
        self.fisher = {side: FisherSums(self.named, self.selected, self.dtype, self.host.device, world, selected_owners)
                       for side in SIDES} if with_fisher else {}
        self.seen = torch.zeros(len(self.params), device=device)
        self.conflicts = torch.zeros(len(self.params), device=device)
        self.loss_sums = torch.zeros(2, dtype=self.dtype, device=device)
        self.first_losses = torch.full((2,), float("nan"), dtype=self.dtype, device=device)

    def side_gradients(self, side: str, batch: list[dict]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """One side's loss, gradients and gradient norms; the gradients are added to the side's sums (copied
        to the host once where the sums live there) and, in one pass, squared into its Fisher sums."""
        self.embedder.model.zero_grad(set_to_none=True)
        loss = triplet_loss(self.embedder, batch, self.gather)
        loss.backward()
        grads = current_gradients(self.params, self.dtype)
        norms = gradient_norms(grads, self.dtype)
        on_host = self.host(grads)
        self.totals[side].add(on_host)
        if self.fisher:
            self.fisher[side].add([g for g, keep in zip(on_host, self.chosen) if keep], norms[self.unchosen].square())
        return loss.detach(), grads, norms

    def step(self, index: int, general_batch: list[dict], domain_batch: list[dict]) -> None:
        """Both sides' gradients; a conflict where the cosine of the two is negative."""
        general_loss, general_grads, norms_g = self.side_gradients("general", general_batch)
        domain_loss, domain_grads, norms_d = self.side_gradients("domain", domain_batch)
        dots = torch.stack([gradient_dot(g, d, self.dtype) for g, d in zip(general_grads, domain_grads)])
        both = (norms_g > 0) & (norms_d > 0)
        cosines = dots / (norms_g * norms_d).clamp(min=torch.finfo(self.dtype).tiny)
        self.seen += both
        self.conflicts += both & (cosines < 0)
        losses = torch.stack([general_loss, domain_loss]).to(self.dtype)
        self.loss_sums += losses
        if index == 0:
            self.first_losses.copy_(losses)

    def no_step(self) -> None:
        """This rank's part in a step it has no batch for, as ``step`` would take part."""
        for side in SIDES:
            self.totals[side].add_nothing()
            if self.fisher:
                self.fisher[side].add_nothing()

    def finish(self) -> None:
        self.totals["general"].finish()
        self.totals["domain"].finish(self.seen, self.conflicts, self.loss_sums)
        for sums in self.fisher.values():
            sums.finish()

    def arrays(self, steps: int, cosine_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per parameter the cosine of the averaged gradients; per selected weight the element-wise map and the
        ``cosine_fn`` map, on rank 0. Each parameter is finished by the rank that speaks for it (its owner, else
        rank 0), and its arrays are sent to rank 0."""
        sum_general, sum_domain = self.totals["general"], self.totals["domain"]
        scores = torch.zeros(len(self.named), dtype=self.dtype, device=self.embedder.device)
        elementwise, cosine = {}, {}
        for index, (name, _) in enumerate(self.named):
            avg_g, avg_d = sum_general.take(index), sum_domain.take(index)
            products = cosines = None
            if avg_g is not None:
                avg_g, avg_d = avg_g.div_(steps), avg_d.div_(steps)
                norm_g, norm_d = avg_g.norm(), avg_d.norm()
                if norm_g > NORM_EPS and norm_d > NORM_EPS:
                    scores[index] = (torch.dot(avg_g.flatten(), avg_d.flatten()) / (norm_g * norm_d)).to(scores.device)
                if name in self.selected:
                    products = elementwise_alignment(avg_g, avg_d)
                    cosines = cosine_fn(avg_g, avg_d) if cosine_fn is not None else None
            del avg_g, avg_d
            if name in self.selected:
                products = sum_general.to_main(products, index)
                if cosine_fn is not None:
                    cosines = sum_general.to_main(cosines, index)
                if products is not None:
                    elementwise[name] = products
                if cosines is not None:
                    cosine[name] = cosines
        self.world.sum_([scores])
        return scores, elementwise, cosine

    def fisher_results(self, steps: int, halves: dict[str, int], layer_types: Sequence[str]) -> dict:
        """Each side's Fisher result, its samples the half-batches the steps drew."""
        losses = (self.loss_sums / steps).tolist()
        firsts = self.first_losses.tolist()
        return {side: sums.result(steps * halves[side], firsts[index], losses[index], halves[side], layer_types,
                                  dtype_name(self.embedder))
                for index, (side, sums) in enumerate(self.fisher.items())}


def gradient_alignment(embedder: Embedder, general: Sequence[dict], domain: Sequence[dict], batch_size: int,
                       max_samples: int, layer_types: Sequence[str], seed: int = 42,
                       distributed: bool = False, alignment_mode: str = "product", with_fisher: bool = False,
                       world: World | None = None, accumulate_on: str = "device") -> AlignmentResult:
    """Cosine agreement of general and domain gradients, per parameter and (for selected ones) per weight.

    Each step: a general half-batch of batch_size // 2 and a domain half-batch of the rest, each from
    its own seeded shuffled pass. Sums of both gradients give the averaged gradients; per step and
    parameter, the cosine of the two gradients counts a conflict when negative. Besides the published
    element-wise product, ``alignment_mode`` local_cosine / row_cosine also keeps a true cosine in [-1, 1].

    ``with_fisher``: the same pass also sums each half-batch's squared gradients into a Fisher result per
    side (``result.fisher``), equal to fisher.py --batch_size <half-batch> over the triples the steps drew.

    Under torchrun the steps are shared out among the ranks and every sum is added across ranks at the end
    (with ``accumulate_on="sharded"``, reduced every step onto the one rank that holds it); only rank 0's result
    has the per-weight arrays.
    With ``distributed`` the ranks' concurrent half-batches also form one contrastive loss (embeddings
    gathered: in-batch negatives from every rank), so a step covers world-size half-batches per side and the
    result is no longer the single-process one; without it the result equals one process.
    """
    world = world or current_world()
    cosine_fn = COSINE_MAPS[alignment_mode]
    general_half, domain_half = batch_size // 2, batch_size - batch_size // 2
    if general_half < 1:
        raise InputError(f"--batch_size must be at least 2 (one general and one domain triple), got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    general_batches = shuffled_batches(general, general_half, generator)
    domain_batches = shuffled_batches(domain, domain_half, generator)
    gather = distributed and world.is_distributed
    steps = _step_count(general, domain, (general_half, domain_half), min(len(general_batches), len(domain_batches)),
                        max_samples, world, gather, with_fisher)
    sums = _AlignmentSums(embedder, layer_types, with_fisher, world, accumulate_on, gather)
    mine = world.shard(range(steps))
    with sparse_embedding_gradients(embedder.model):
        for step in tqdm(mine, desc="alignment", unit="step", disable=not world.is_main):
            sums.step(step, general_batches[step], domain_batches[step])
    for _ in range(world.rounds(steps) - len(mine)):
        sums.no_step()
    embedder.model.zero_grad(set_to_none=True)
    sums.finish()
    scores, elementwise, cosine = sums.arrays(steps, cosine_fn)
    seen, conflicts = sums.seen, sums.conflicts
    rates = torch.where(seen > 0, conflicts / seen.clamp(min=1), torch.zeros_like(seen)).tolist()
    losses = (sums.loss_sums / steps).tolist()
    names = [name for name, _ in sums.named]
    return AlignmentResult(
        alignment_scores=dict(zip(names, scores.tolist())), conflict_rates=dict(zip(names, rates)),
        elementwise=elementwise, cosine=cosine, losses={"general": losses[0], "domain": losses[1], "mixed": None},
        processed_batches=steps, total_samples_processed=steps * batch_size,
        shapes={n: list(p.shape) for n, p in sums.named}, batch_size=batch_size, max_samples=max_samples, seed=seed,
        alignment_mode=alignment_mode, layer_types=list(layer_types), compute_dtype=dtype_name(embedder),
        general_data_size=len(general), domain_data_size=len(domain),
        fisher=sums.fisher_results(steps, {"general": general_half, "domain": domain_half}, layer_types))
