"""Per-weight importance signals measured on the contrastive loss.

fisher_information: the empirical Fisher diagonal, F = (1/N) sum_b (dL_b/dtheta)^2 + 1e-8.
gradient_alignment: how general-data and domain-data gradients agree, per parameter and per weight.

Sums are float32 (float64 for a float64 model), on the model's device unless ``accumulate_on="cpu"``
puts them in host memory. Under torchrun each rank sums its share of the batches and the sums are
added across ranks once, at the end (gaprune.distributed); with ``accumulate_on="sharded"`` each tensor's
sums live on one rank instead (memory.sharded_sums), and every step's gradients are reduced onto it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gaprune.data import batched, shuffled_batches
from gaprune.distributed import World, current_world
from gaprune.errors import InputError
from gaprune.layers import embedding_weights, select_parameters, sparse_embedding_gradients
from gaprune.loss import triplet_loss
from gaprune.memory import pinned_layouts, sharded_sums
from gaprune.options import SUM_PLACES
from gaprune.modeling import Embedder

log = logging.getLogger(__name__)

FISHER_EPS = 1e-8
NORM_EPS = 1e-8


def _accumulator_dtype(embedder: Embedder) -> torch.dtype:
    return torch.promote_types(embedder.model.dtype, torch.float32)


def _dtype_name(embedder: Embedder) -> str:
    return str(embedder.model.dtype).removeprefix("torch.")


def _grads(params: Sequence[torch.nn.Parameter], dtype: torch.dtype) -> list[torch.Tensor]:
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


def _selected(embedder: Embedder, layer_types: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """The ``layer_types`` parameters that take gradients (the model family is read from every name)."""
    chosen = select_parameters(embedder.model.named_parameters(), layer_types)
    frozen = [name for name, p in chosen.items() if not p.requires_grad]
    if frozen:
        log.warning("%d selected parameters take no gradient (frozen) and get no scores, e.g. %s", len(frozen),
                    frozen[0])
    return {name: p for name, p in chosen.items() if p.requires_grad}


class _PinnedStaging:
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


class _Sums:
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


def _dot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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


def _norms(grads: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Each gradient's L2 norm, computed in the gradients' dtype (the kernels accumulate in float32; asking
    for a float32 result from bfloat16 input is ten times slower on a CPU; coalesced sparse gradients are
    already in ``dtype``), returned in ``dtype``."""
    dense = [g for g in grads if not g.is_sparse]
    norms = iter(torch._foreach_norm(dense, 2) if dense else [])
    return torch.stack([g._values().norm() if g.is_sparse else next(norms) for g in grads]).to(dtype)


@dataclass
class FisherResult:
    per_weight: dict[str, torch.Tensor]  # float32 arrays for the selected parameters (under torchrun: rank 0's)
    mean_scores: dict[str, float]  # every parameter (on every rank)
    shapes: dict[str, list[int]]
    num_samples: int
    first_loss: float
    mean_loss: float
    batch_size: int
    layer_types: list[str]
    compute_dtype: str
    path: str | None = None  # the results JSON, once written


class _FisherSums:
    """Sum over batches of each squared gradient: a full array for the selected parameters, only the sum
    of squares for the others (all their mean score needs)."""

    def __init__(self, named: Sequence[tuple[str, torch.nn.Parameter]], selected: dict[str, torch.nn.Parameter],
                 dtype: torch.dtype, device: torch.device, world: World,
                 owners: Sequence[int | None] | None = None):
        self.named = named
        self.selected = list(selected)
        self.full = _Sums(list(selected.values()), dtype, device, world, owners, square=True)
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


def _owners(params: Sequence[torch.Tensor], selected: Sequence[torch.Tensor], arrays_all: int, arrays_selected: int,
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
    mb = _accumulator_dtype(embedder).itemsize / 2 ** 20
    log.info("sums sharded across %d ranks: rank %d holds %d of %d tensors' sums, %.1f MB of the %.1f MB one "
             "process holds", world.size, world.rank, owners.count(world.rank), sum(o is not None for o in owners),
             held[world.rank] * mb, whole * mb)
    return owners


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
    selected = _selected(embedder, layer_types)
    host = _PinnedStaging(list(selected.values()), accumulate_on, embedding_weights(embedder.model))
    dtype = _accumulator_dtype(embedder)
    owners = _owners(list(selected.values()), list(selected.values()), 0, 1, accumulate_on, world, embedder)
    sums = _FisherSums(named, selected, dtype, host.device, world, owners)
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
            norms = _norms(_grads(other_params, dtype), dtype).square() if other_params else None
            sums.add(host(_grads(list(selected.values()), dtype)), norms)
    for _ in range(world.rounds(len(batches)) - len(mine)):
        sums.add_nothing()
    embedder.model.zero_grad(set_to_none=True)
    sums.finish(loss_sum)
    return sums.result(len(triples), first_loss, (loss_sum / len(batches)).item(), batch_size, layer_types,
                       _dtype_name(embedder))


def _window_sum(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over each element's zero-padded k x k window, padded as conv2d's padding="same" (a pooling
    kernel: five times faster than a one-channel conv2d on a CPU)."""
    before, after = (k - 1) // 2, k - 1 - (k - 1) // 2
    padded = F.pad(x[None, None], (before, after, before, after))
    return F.avg_pool2d(padded, k, stride=1, divisor_override=1)[0, 0]


def elementwise_alignment(avg_general: torch.Tensor, avg_domain: torch.Tensor) -> torch.Tensor:
    """u_gen * u_dom (unit vectors by whole-tensor norm), 2-D tensors smoothed by a zero-padded k x k mean filter."""
    norm_g, norm_d = avg_general.norm(), avg_domain.norm()
    if norm_g <= NORM_EPS or norm_d <= NORM_EPS:
        return torch.zeros_like(avg_general)
    product = (avg_general / norm_g) * (avg_domain / norm_d)
    if product.dim() != 2:
        return product
    k = min(3, *product.shape)
    return _window_sum(product, k).div_(k * k)


def local_cosine(avg_general: torch.Tensor, avg_domain: torch.Tensor) -> torch.Tensor:
    """Cosine of the two gradients over each weight's zero-padded k x k neighbourhood (k = min(3, smallest
    side)), shaped like the parameter: sum(g d) / sqrt(sum(g^2) sum(d^2)) over the window, so it lies in
    [-1, 1] (Cauchy-Schwarz); 0 where either gradient is zero on the whole window. Tensors with more than
    two dimensions are viewed as (rows, rest)."""
    g = avg_general.reshape(avg_general.shape[0], -1)
    d = avg_domain.reshape(avg_domain.shape[0], -1)
    k = min(3, *g.shape)
    denominator = (_window_sum(g * g, k) * _window_sum(d * d, k)).sqrt_()
    cosine = _window_sum(g * d, k).div_(denominator.clamp(min=torch.finfo(g.dtype).tiny))
    return cosine.masked_fill_(denominator <= 0, 0).clamp_(-1, 1).reshape(avg_general.shape)


def row_cosine(avg_general: torch.Tensor, avg_domain: torch.Tensor) -> torch.Tensor:
    """Cosine of the two gradients over each output row (one value per row, shape [rows]); 0 for a row
    where either gradient is zero."""
    g = avg_general.reshape(avg_general.shape[0], -1)
    d = avg_domain.reshape(avg_domain.shape[0], -1)
    denominator = g.norm(dim=1) * d.norm(dim=1)
    cosine = (g * d).sum(dim=1).div_(denominator.clamp(min=torch.finfo(g.dtype).tiny))
    return cosine.masked_fill_(denominator <= 0, 0).clamp_(-1, 1)


ALIGNMENT_MODES = {"product": None, "local_cosine": local_cosine, "row_cosine": row_cosine}


@dataclass
class AlignmentResult:
    alignment_scores: dict[str, float]
    conflict_rates: dict[str, float]
    elementwise: dict[str, torch.Tensor]  # under torchrun, on rank 0 only (as ``cosine``)
    cosine: dict[str, torch.Tensor]  # the --alignment_mode array (local_cosine / row_cosine); empty for product
    losses: dict[str, float | None]
    processed_batches: int
    total_samples_processed: int
    shapes: dict[str, list[int]]
    batch_size: int
    max_samples: int
    seed: int
    alignment_mode: str
    layer_types: list[str]
    compute_dtype: str
    general_data_size: int
    domain_data_size: int
    fisher: dict[str, FisherResult] = field(default_factory=dict)  # "general"/"domain", with_fisher only
    path: str | None = None  # the results JSON, once written


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
    cosine_fn = ALIGNMENT_MODES[alignment_mode]
    general_half, domain_half = batch_size // 2, batch_size - batch_size // 2
    if general_half < 1:
        raise InputError(f"--batch_size must be at least 2 (one general and one domain triple), got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    general_batches = shuffled_batches(general, general_half, generator)
    domain_batches = shuffled_batches(domain, domain_half, generator)
    steps = min(len(general_batches), len(domain_batches), max_samples // batch_size)
    gather = distributed and world.is_distributed
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

    named = [(n, p) for n, p in embedder.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    selected = _selected(embedder, layer_types)
    device, dtype = embedder.device, _accumulator_dtype(embedder)
    chosen = [name in selected for name, _ in named]
    unchosen = ~torch.tensor(chosen, device=device)  # the parameters whose Fisher keeps only a sum of squares
    host = _PinnedStaging(params, accumulate_on, embedding_weights(embedder.model))
    owners = _owners(params, list(selected.values()), 2, 2 if with_fisher else 0, accumulate_on, world, embedder)
    sum_general = _Sums(params, dtype, host.device, world, owners)
    sum_domain = _Sums(params, dtype, host.device, world, owners)
    totals = {"general": sum_general, "domain": sum_domain}
    selected_owners = [owner for owner, keep in zip(owners, chosen) if keep] if owners else None
    fisher = {side: _FisherSums(named, selected, dtype, host.device, world, selected_owners)
              for side in ("general", "domain")} if with_fisher else {}
    seen = torch.zeros(len(params), device=device)
    conflicts = torch.zeros(len(params), device=device)
    loss_sums = torch.zeros(2, dtype=dtype, device=device)
    first_losses = torch.full((2,), float("nan"), dtype=dtype, device=device)

    def side_gradients(side: str, batch: list[dict]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """One side's loss, gradients and gradient norms; the gradients are added to the side's sums (copied
        to the host once where the sums live there) and, in one pass, squared into its Fisher sums."""
        embedder.model.zero_grad(set_to_none=True)
        loss = triplet_loss(embedder, batch, gather)
        loss.backward()
        grads = _grads(params, dtype)
        norms = _norms(grads, dtype)
        on_host = host(grads)
        totals[side].add(on_host)
        if fisher:
            fisher[side].add([g for g, keep in zip(on_host, chosen) if keep], norms[unchosen].square())
        return loss.detach(), grads, norms

    def no_gradients(side: str) -> None:
        """This rank's part in a step it has no batch for, as side_gradients would take part."""
        totals[side].add_nothing()
        if fisher:
            fisher[side].add_nothing()

    mine = world.shard(range(steps))
    with sparse_embedding_gradients(embedder.model):
        for step in tqdm(mine, desc="alignment", unit="step", disable=not world.is_main):
            general_loss, general_grads, norms_g = side_gradients("general", general_batches[step])
            domain_loss, domain_grads, norms_d = side_gradients("domain", domain_batches[step])
            dots = torch.stack([_dot(g, d, dtype) for g, d in zip(general_grads, domain_grads)])
            both = (norms_g > 0) & (norms_d > 0)
            cosines = dots / (norms_g * norms_d).clamp(min=torch.finfo(dtype).tiny)
            seen += both
            conflicts += both & (cosines < 0)
            losses = torch.stack([general_loss, domain_loss]).to(dtype)
            loss_sums += losses
            if step == 0:
                first_losses.copy_(losses)
            del general_grads, domain_grads
    for _ in range(world.rounds(steps) - len(mine)):
        no_gradients("general")
        no_gradients("domain")
    embedder.model.zero_grad(set_to_none=True)
    sum_general.finish()
    sum_domain.finish(seen, conflicts, loss_sums)
    for sums in fisher.values():
        sums.finish()

    # each parameter finished by the rank that speaks for it (its owner, else rank 0); the arrays sent to rank 0
    scores = torch.zeros(len(named), dtype=dtype, device=device)
    elementwise, cosine = {}, {}
    for index, (name, _) in enumerate(named):
        avg_g, avg_d = sum_general.take(index), sum_domain.take(index)
        products = cosines = None
        if avg_g is not None:
            avg_g, avg_d = avg_g.div_(steps), avg_d.div_(steps)
            norm_g, norm_d = avg_g.norm(), avg_d.norm()
            if norm_g > NORM_EPS and norm_d > NORM_EPS:
                scores[index] = (torch.dot(avg_g.flatten(), avg_d.flatten()) / (norm_g * norm_d)).to(device)
            if name in selected:
                products = elementwise_alignment(avg_g, avg_d)
                cosines = cosine_fn(avg_g, avg_d) if cosine_fn is not None else None
        del avg_g, avg_d
        if name in selected:
            products = sum_general.to_main(products, index)
            if cosine_fn is not None:
                cosines = sum_general.to_main(cosines, index)
            if products is not None:
                elementwise[name] = products
            if cosines is not None:
                cosine[name] = cosines
    world.sum_([scores])
    alignment = dict(zip((name for name, _ in named), scores.tolist()))
    rates = torch.where(seen > 0, conflicts / seen.clamp(min=1), torch.zeros_like(seen)).tolist()
    losses = (loss_sums / steps).tolist()
    firsts = first_losses.tolist()
    halves = {"general": general_half, "domain": domain_half}
    fisher_results = {side: sums.result(steps * halves[side], firsts[index],
                                        losses[index], halves[side], layer_types, _dtype_name(embedder))
                      for index, (side, sums) in enumerate(fisher.items())}
    return AlignmentResult(
        alignment_scores=alignment,
        conflict_rates={name: rate for (name, _), rate in zip(named, rates)},
        elementwise=elementwise,
        cosine=cosine,
        losses={"general": losses[0], "domain": losses[1], "mixed": None},
        processed_batches=steps,
        total_samples_processed=steps * batch_size,
        shapes={n: list(p.shape) for n, p in named},
        batch_size=batch_size,
        max_samples=max_samples,
        seed=seed,
        alignment_mode=alignment_mode,
        layer_types=list(layer_types),
        compute_dtype=_dtype_name(embedder),
        general_data_size=len(general),
        domain_data_size=len(domain),
        fisher=fisher_results,
    )
