"""The empirical Fisher diagonal on the contrastive loss: F = (1/N) sum_b (dL_b/dtheta)^2 + 1e-8."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from gaprune.data import batched
from gaprune.distributed import World, current_world
from gaprune.gradient_sums import (PinnedStaging, Sums, accumulator_dtype, current_gradients, dtype_name,
                                   gradient_norms, scored_parameters, sum_owners)
from gaprune.layers import embedding_weights, sparse_embedding_gradients
from gaprune.loss import triplet_loss
from gaprune.modeling import Embedder
from gaprune.results import FisherResult

FISHER_EPS = 1e-8


class FisherSums:
    """Sum over batches of each squared gradient: a full array for the selected parameters, only the sum
    of squares for the others (all their mean score needs)."""

    def __init__(self, named: Sequence[tuple[str, torch.nn.Parameter]], selected: dict[str, torch.nn.Parameter],
                 dtype: torch.dtype, device: torch.device, world: World,
                 owners: Sequence[int | None] | None = None):
        self.named = named
        self.selected = list(selected)
        self.full = Sums(list(selected.values()), dtype, device, world, owners, square=True)
        self.others = [(n, p) for n, p in named if n not in selected]
        self.other_sums = torch.zeros(len(self.others), dtype=dtype, device=named[0][1].device)

    def add(self, selected_grads: Sequence[torch.Tensor], other_sq_norms: torch.Tensor | None) -> None:
        self.full.add(selected_grads)
        if other_sq_norms is not None:
            self.other_sums += other_sq_norms

    def add_nothing(self) -> None:
        self.full.add_nothing()

    def finish(self, *others: torch.Tensor) -> None:
        """Add the ranks' sums (and ``others``) together."""
        self.full.finish(self.other_sums, *others)

    def result(self, num_samples: int, first_loss: float, mean_loss: float, batch_size: int,
               layer_types: Sequence[str], compute_dtype: str) -> FisherResult:
        """F = sum / num_samples + 1e-8, and every parameter's mean F, after ``finish`` (call it on every rank:
        each array is finished by the rank holding it, and under torchrun only rank 0's result has them)."""
        full, arrays = self.full, {}
        means = torch.zeros(len(self.selected), dtype=full.dtype, device=self.other_sums.device)
        for index, name in enumerate(self.selected):
            array = full.take(index)
            if array is not None:
                means[index] = array.div_(num_samples).add_(FISHER_EPS).mean().to(means.device)  # host sums: cpu
            array = full.to_main(array, index)
            if array is not None:
                arrays[name] = array
        full.world.sum_([means])
        numels = torch.tensor([p.numel() for _, p in self.others], dtype=self.other_sums.dtype,
                              device=self.other_sums.device)
        mean_scores = dict(zip(self.selected, means.tolist()))
        mean_scores.update(zip((name for name, _ in self.others),
                               (self.other_sums / num_samples / numels + FISHER_EPS).tolist()))
        return FisherResult(per_weight=arrays, mean_scores={name: mean_scores[name] for name, _ in self.named},
                            shapes={n: list(p.shape) for n, p in self.named}, num_samples=num_samples,
                            first_loss=first_loss, mean_loss=mean_loss, batch_size=batch_size,
                            layer_types=list(layer_types), compute_dtype=compute_dtype)



def fisher_information(embedder: Embedder, triples: Sequence[dict], batch_size: int, layer_types: Sequence[str],
                       on_first_loss: Callable[[float], None] | None = None, world: World | None = None,
                       accumulate_on: str = "device") -> FisherResult:
    """Fisher diagonal over ``triples`` in file order, batches of ``min(batch_size, len(triples))``.

    Under torchrun each rank takes every world-size-th batch and the sums are added across ranks at the
    end: the result is the single-process one. ``accumulate_on="cpu"`` keeps the float32 sums in host memory;
    ``"sharded"`` splits them among the ranks. Under torchrun only rank 0's result has the per-weight arrays.
    """
    world = world or current_world()
    named = [(n, p) for n, p in embedder.model.named_parameters() if p.requires_grad]
    selected = scored_parameters(embedder, layer_types)
    host = PinnedStaging(list(selected.values()), accumulate_on, embedding_weights(embedder.model))
    dtype = accumulator_dtype(embedder)
    owners = sum_owners(list(selected.values()), list(selected.values()), 0, 1, accumulate_on, world, embedder)
    sums = FisherSums(named, selected, dtype, host.device, world, owners)
    other_params = [p for _, p in sums.others]
    loss_sum = torch.zeros((), dtype=dtype, device=embedder.device)
    first_loss = float("nan")

    batches = batched(triples, min(batch_size, len(triples)))
    mine = world.shard(list(enumerate(batches)))
    with sparse_embedding_gradients(embedder.model):
        for index, batch in tqdm(mine, desc="fisher", unit="batch", disable=not world.is_main):
            embedder.model.zero_grad(set_to_none=True)
            loss = triplet_loss(embedder, batch)
            loss.backward()
            if index == 0:
                first_loss = loss.item()
                if on_first_loss:
                    on_first_loss(first_loss)
            loss_sum += loss.detach()
            norms = gradient_norms(current_gradients(other_params, dtype), dtype).square() if other_params else None
            sums.add(host(current_gradients(list(selected.values()), dtype)), norms)
    for _ in range(world.rounds(len(batches)) - len(mine)):
        sums.add_nothing()
    embedder.model.zero_grad(set_to_none=True)
    sums.finish(loss_sum)
    return sums.result(len(triples), first_loss, (loss_sum / len(batches)).item(), batch_size, layer_types,
                       dtype_name(embedder))
