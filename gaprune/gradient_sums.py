"""Sums of gradients over the steps of a scoring pass, and the gradient arithmetic the passes share.

Sums are float32 (float64 for a float64 model), on the model's device unless ``accumulate_on="cpu"``
puts them in host memory. Under torchrun each rank sums its share of the batches and the sums are
added across ranks once, at the end (gaprune.distributed); with ``accumulate_on="sharded"`` each tensor's
sums live on one rank instead (memory.sharded_sums), and every step's gradients are reduced onto it.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import torch

from gaprune.distributed import World
from gaprune.errors import InputError
from gaprune.layers import embedding_weights, select_parameters
from gaprune.memory import pinned_layouts, sharded_sums
from gaprune.modeling import Embedder
from gaprune.options import SUM_PLACES

log = logging.getLogger(__name__)


def accumulator_dtype(embedder: Embedder) -> torch.dtype:
    return torch.promote_types(embedder.model.dtype, torch.float32)



def dtype_name(embedder: Embedder) -> str:
    return str(embedder.model.dtype).removeprefix("torch.")



def current_gradients(params: Sequence[torch.nn.Parameter], dtype: torch.dtype) -> list[torch.Tensor]:
    """Each parameter's gradient; parameters the loss does not reach (e.g. BERT's pooler) get zeros. An
    embedding's sparse gradient is coalesced, its values in ``dtype`` (a token's repeats summed there)."""
    grads = []
    for p in params:
        if p.grad is None:
            grads.append(torch.zeros_like(p))
        elif p.grad.is_sparse:
            grads.append(torch.sparse_coo_tensor(p.grad._indices(), p.grad._values().to(dtype), p.shape,
                                                 check_invariants=False).coalesce())
        else:
            grads.append(p.grad)
    return grads



def scored_parameters(embedder: Embedder, layer_types: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """The ``layer_types`` parameters that take gradients (the model family is read from every name)."""
    chosen = select_parameters(embedder.model.named_parameters(), layer_types)
    frozen = [name for name, p in chosen.items() if not p.requires_grad]
    if frozen:
        log.warning("%d selected parameters take no gradient (frozen) and get no scores, e.g. %s", len(frozen),
                    frozen[0])
    return {name: p for name, p in chosen.items() if p.requires_grad}



class PinnedStaging:
    """Where the sums live, and for sums in host memory a pinned copy of the gradients to add from: a few
    pinned blocks per dtype (memory.pinned_layouts: not one allocation per parameter, and not one block that
    the allocator would round up to a power of two), filled by asynchronous copies and one wait on the
    gradients' GPU. A no-op when the sums live beside the model (or sharded). The ``sparse`` parameters
    (embeddings) have small sparse gradients, copied as they come."""

    def __init__(self, params: Sequence[torch.Tensor], accumulate_on: str, sparse: Sequence[torch.Tensor] = ()):
        if accumulate_on not in SUM_PLACES:
            raise ValueError(f"accumulate_on must be one of {SUM_PLACES} (auto is resolved by the memory plan), "
                             f"got {accumulate_on!r}")
        model_device = params[0].device if params else torch.device("cpu")
        self.device = torch.device("cpu") if accumulate_on == "cpu" else model_device
        self.buffers = None
        if self.device == model_device:
            return
        sparse_ids = {id(p) for p in sparse}
        staged = [p for p in params if id(p) not in sparse_ids]
        views: dict[int, torch.Tensor] = {}
        try:
            for group, used, places in pinned_layouts(staged):
                dtype = group[0].dtype
                blocks = [torch.empty(size // dtype.itemsize, dtype=dtype, pin_memory=True) for size in used]
                for p, (block, offset) in zip(group, places):
                    start = offset // dtype.itemsize
                    views[id(p)] = blocks[block][start:start + p.numel()].view(p.shape)
        except RuntimeError as err:
            raise InputError(f"cannot pin {sum(p.numel() * p.element_size() for p in staged) / 2 ** 30:.1f} GB of host "
                             f"memory for --accumulate_on cpu ({err}); raise the memlock limit or free memory") from None
        self.buffers = [views.get(id(p)) for p in params]

    def __call__(self, grads: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        if self.buffers is None:
            return grads
        on_host = [grad.to(self.device) if buffer is None else buffer.copy_(grad, non_blocking=True)
                   for buffer, grad in zip(self.buffers, grads)]
        torch.cuda.current_stream(grads[0].device).synchronize()
        return on_host



def _pieces(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Matching flat pieces of same-sized tensors: 256K elements at a time on a CPU (the float32 copy of a
    bfloat16 piece stays in cache), 16M on a GPU. Arithmetic across dtypes makes a temporary copy; a
    whole-tensor one would be fresh memory from the OS on a CPU at every call (page faults cost more than
    the arithmetic: 7x slower for a 155M-weight array) and 2.5 GB on a GPU for an 8B model's embedding."""
    flat = [t.reshape(-1) for t in tensors]
    size = 1 << 18 if flat[0].device.type == "cpu" else 1 << 24
    for start in range(0, flat[0].numel(), size):
        yield tuple(t[start:start + size] for t in flat)



def _add_into(total: torch.Tensor, grad: torch.Tensor, square: bool = False) -> None:
    """total += grad (grad * grad with ``square``), computed in total's dtype; a sparse (coalesced) gradient
    adds into its rows."""
    if grad.is_sparse:
        values = grad._values().to(total.dtype)
        total.index_add_(0, grad._indices()[0], values.square() if square else values)
        return
    for total_piece, grad_piece in _pieces(total.view(-1), grad):  # view: a copy would lose the sums
        grad_piece = grad_piece.to(total.dtype)
        if square:
            total_piece.addcmul_(grad_piece, grad_piece)
        else:
            total_piece.add_(grad_piece)



class Sums:
    """One sum per tensor over the steps, of gradients or (``square``) of their squares, in ``dtype``.

    Without ``owners`` (or an owner None) every rank sums its own steps and ``finish`` adds the sums across
    ranks. A tensor with an owner is held by that rank alone: every step each rank's contribution is reduced
    onto it, so every rank must add (or ``add_nothing``) as many times, in the same order."""

    def __init__(self, params: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device, world: World,
                 owners: Sequence[int | None] | None = None, square: bool = False):
        self.shapes = [p.shape for p in params]
        self.dtype, self.device, self.world, self.square = dtype, device, world, square
        self.owners = list(owners) if owners is not None else [None] * len(params)
        self.arrays = [torch.zeros(p.shape, dtype=dtype, device=device) if owner in (None, world.rank) else None
                       for p, owner in zip(params, self.owners)]

    def add(self, grads: Sequence[torch.Tensor]) -> None:
        for total, grad, owner in zip(self.arrays, grads, self.owners):
            if owner is None:
                _add_into(total, grad, self.square)
            else:  # the contribution is an argument only: freed before the next one is made
                self._reduce_into(total, self._contribution(grad), owner)

    def _contribution(self, grad: torch.Tensor) -> torch.Tensor:
        # a contiguous copy: the collectives need one, and the reduce overwrites it
        contribution = grad.to(self.dtype, memory_format=torch.contiguous_format, copy=True)
        return contribution.square_() if self.square else contribution

    def add_nothing(self) -> None:
        """This rank's part of a step it has no batch for (its share of the steps is one shorter)."""
        for total, shape, owner in zip(self.arrays, self.shapes, self.owners):
            if owner is not None:
                self._reduce_into(total, torch.zeros(shape, dtype=self.dtype, device=self.device), owner)

    def _reduce_into(self, total: torch.Tensor | None, contribution: torch.Tensor, owner: int) -> None:
        self.world.reduce_to(contribution, owner)
        if total is not None:
            total.add_(contribution)

    def finish(self, *others: torch.Tensor) -> None:
        """Add the unsharded sums (and ``others``) across ranks."""
        self.world.sum_([*(a for a, owner in zip(self.arrays, self.owners) if owner is None), *others])

    def speaker(self, index: int) -> int:
        """The rank that finishes tensor ``index`` and sends it to rank 0: its owner (rank 0 when unsharded)."""
        owner = self.owners[index]
        return 0 if owner is None else owner

    def take(self, index: int) -> torch.Tensor | None:
        """Tensor ``index``'s sum where this rank speaks for it, else None; the sums let go of it."""
        array, self.arrays[index] = self.arrays[index], None
        return array if self.speaker(index) == self.world.rank else None

    def to_main(self, finished: torch.Tensor | None, index: int) -> torch.Tensor | None:
        """What the speaker for tensor ``index`` made of it (``finished``), on rank 0; None elsewhere."""
        return self.world.to_main(finished, self.speaker(index), self.dtype, self.device)



def gradient_dot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a . b accumulated in ``dtype``; half-precision gradients are multiplied in their own dtype. Sparse
    (coalesced) gradients meet on the rows they share."""
    if a.is_sparse or b.is_sparse:
        if not b.is_sparse:
            a, b = b, a
        rows_b, values_b = b._indices()[0], b._values()
        if not a.is_sparse:
            return (a[rows_b] * values_b).sum(dtype=dtype)
        rows_a, values_a = a._indices()[0], a._values()
        if not len(rows_a):
            return torch.zeros((), dtype=dtype, device=a.device)
        at = torch.searchsorted(rows_a, rows_b).clamp_(max=len(rows_a) - 1)
        elsewhere = (rows_a[at] != rows_b).unsqueeze(1)  # a mask, not a selection: no wait on a GPU
        return (values_a[at] * values_b).masked_fill_(elsewhere, 0).sum(dtype=dtype)
    if a.dtype == dtype and b.dtype == dtype:
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return sum((a_piece * b_piece).sum(dtype=dtype) for a_piece, b_piece in _pieces(a, b))



def gradient_norms(grads: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Each gradient's L2 norm, computed in the gradients' dtype (the kernels accumulate in float32; asking
    for a float32 result from bfloat16 input is ten times slower on a CPU; coalesced sparse gradients are
    already in ``dtype``), returned in ``dtype``."""
    dense = [g for g in grads if not g.is_sparse]
    norms = iter(torch._foreach_norm(dense, 2) if dense else [])
    return torch.stack([g._values().norm() if g.is_sparse else next(norms) for g in grads]).to(dtype)



def sum_owners(params: Sequence[torch.Tensor], selected: Sequence[torch.Tensor], arrays_all: int, arrays_selected: int,
            accumulate_on: str, world: World, embedder: Embedder) -> list[int | None] | None:
    """Which rank holds each of ``params``' sums under ``accumulate_on="sharded"`` (None: not sharded)."""
    if accumulate_on != "sharded" or not world.is_distributed:
        return None
    if not world.can_shard(embedder.device):
        raise InputError(f"--accumulate_on sharded needs nccl for a model on CUDA and gloo for one on the CPU; "
                         f"this process group uses {torch.distributed.get_backend()} with the model on "
                         f"{embedder.device}")
    sparse = embedding_weights(embedder.model)
    owners, held = sharded_sums(params, selected, arrays_all, arrays_selected, world.size, sparse)
    [whole] = sharded_sums(params, selected, arrays_all, arrays_selected, 1, sparse)[1]
    mb = accumulator_dtype(embedder).itemsize / 2 ** 20
    log.info("sums sharded across %d ranks: rank %d holds %d of %d tensors' sums, %.1f MB of the %.1f MB one "
             "process holds", world.size, world.rank, owners.count(world.rank), sum(o is not None for o in owners),
             held[world.rank] * mb, whole * mb)
    return owners
