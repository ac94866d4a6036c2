"""Per-weight importance signals measured on the contrastive loss.

fisher_information: the empirical Fisher diagonal, F = (1/N) sum_b (dL_b/dtheta)^2 + 1e-8.
gradient_alignment: how general-data and domain-data gradients agree, per parameter and per weight.

Everything is accumulated on the model's device in float32 (float64 for a float64 model); nothing
goes to the host per batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gaprune.data import batched, shuffled_batches
from gaprune.errors import InputError
from gaprune.layers import select_parameters
from gaprune.loss import triplet_loss
from gaprune.modeling import Embedder

log = logging.getLogger(__name__)

FISHER_EPS = 1e-8
NORM_EPS = 1e-8


def _accumulator_dtype(embedder: Embedder) -> torch.dtype:
    return torch.promote_types(embedder.model.dtype, torch.float32)


def _dtype_name(embedder: Embedder) -> str:
    return str(embedder.model.dtype).removeprefix("torch.")


def _grads(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Each parameter's gradient; parameters the loss does not reach (e.g. BERT's pooler) get zeros."""
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


@dataclass
class FisherResult:
    per_weight: dict[str, torch.Tensor]  # float32 arrays for the selected parameters
    mean_scores: dict[str, float]  # every parameter
    shapes: dict[str, list[int]]
    num_samples: int
    first_loss: float
    mean_loss: float
    batch_size: int
    layer_types: list[str]
    compute_dtype: str
    path: str | None = None  # the results JSON, once written


def fisher_information(embedder: Embedder, triples: Sequence[dict], batch_size: int, layer_types: Sequence[str],
                       on_first_loss: Callable[[float], None] | None = None) -> FisherResult:
    """Fisher diagonal over ``triples`` in file order, batches of ``min(batch_size, len(triples))``.

    Selected parameters keep a full float32 array; for the rest only the sum of squares is kept,
    which is all their mean score needs.
    """
    named = [(n, p) for n, p in embedder.model.named_parameters() if p.requires_grad]
    selected = select_parameters(named, layer_types)
    device, dtype = embedder.device, _accumulator_dtype(embedder)
    full = {n: torch.zeros(p.shape, dtype=dtype, device=device) for n, p in selected.items()}
    others = [(n, p) for n, p in named if n not in selected]
    other_sums = torch.zeros(len(others), dtype=dtype, device=device)
    loss_sum = torch.zeros((), dtype=dtype, device=device)
    first_loss = float("nan")

    batches = batched(triples, min(batch_size, len(triples)))
    for index, batch in enumerate(tqdm(batches, desc="fisher", unit="batch")):
        embedder.model.zero_grad(set_to_none=True)
        loss = triplet_loss(embedder, batch)
        loss.backward()
        if index == 0:
            first_loss = loss.item()
            if on_first_loss:
                on_first_loss(first_loss)
        loss_sum += loss.detach()
        for name, grad in zip(full, _grads(list(selected.values()))):
            full[name].addcmul_(grad, grad)
        if others:
            norms = torch._foreach_norm(_grads([p for _, p in others]), 2, dtype=dtype)
            other_sums += torch.stack(norms).square()
    embedder.model.zero_grad(set_to_none=True)

    n = len(triples)
    for array in full.values():
        array.div_(n).add_(FISHER_EPS)
    numels = torch.tensor([p.numel() for _, p in others], dtype=dtype, device=device)
    other_means = dict(zip((name for name, _ in others), (other_sums / n / numels + FISHER_EPS).tolist()))
    mean_scores = {name: full[name].mean().item() if name in full else other_means[name] for name, _ in named}
    return FisherResult(per_weight=full, mean_scores=mean_scores, shapes={n: list(p.shape) for n, p in named},
                        num_samples=n, first_loss=first_loss, mean_loss=(loss_sum / len(batches)).item(),
                        batch_size=batch_size, layer_types=list(layer_types), compute_dtype=_dtype_name(embedder))


def elementwise_alignment(avg_general: torch.Tensor, avg_domain: torch.Tensor) -> torch.Tensor:
    """u_gen * u_dom (unit vectors by whole-tensor norm), 2-D tensors smoothed by a zero-padded k x k mean filter."""
    norm_g, norm_d = avg_general.norm(), avg_domain.norm()
    if norm_g <= NORM_EPS or norm_d <= NORM_EPS:
        return torch.zeros_like(avg_general)
    product = (avg_general / norm_g) * (avg_domain / norm_d)
    if product.dim() != 2:
        return product
    k = min(3, *product.shape)
    kernel = torch.full((1, 1, k, k), 1.0 / (k * k), dtype=product.dtype, device=product.device)
    return F.conv2d(product[None, None], kernel, padding="same")[0, 0]


def local_cosine(avg_general: torch.Tensor, avg_domain: torch.Tensor) -> torch.Tensor:
    """Cosine of the two gradients over each weight's zero-padded k x k neighbourhood (k = min(3, smallest
    side)), shaped like the parameter: sum(g d) / sqrt(sum(g^2) sum(d^2)) over the window, so it lies in
    [-1, 1] (Cauchy-Schwarz); 0 where either gradient is zero on the whole window. Tensors with more than
    two dimensions are viewed as (rows, rest)."""
    g = avg_general.reshape(avg_general.shape[0], -1)
    d = avg_domain.reshape(avg_domain.shape[0], -1)
    k = min(3, *g.shape)
    kernel = torch.ones((1, 1, k, k), dtype=g.dtype, device=g.device)

    def window_sum(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x[None, None], kernel, padding="same")[0, 0]

    denominator = (window_sum(g * g) * window_sum(d * d)).sqrt_()
    cosine = window_sum(g * d).div_(denominator.clamp(min=torch.finfo(g.dtype).tiny))
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
    elementwise: dict[str, torch.Tensor]
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
    path: str | None = None  # the results JSON, once written


def gradient_alignment(embedder: Embedder, general: Sequence[dict], domain: Sequence[dict], batch_size: int,
                       max_samples: int, layer_types: Sequence[str], seed: int = 42,
                       distributed: bool = False, alignment_mode: str = "product") -> AlignmentResult:
    """Cosine agreement of general and domain gradients, per parameter and (for selected ones) per weight.

    Each step: a general half-batch of batch_size // 2 and a domain half-batch of the rest, each from
    its own seeded shuffled pass. Sums of both gradients give the averaged gradients; per step and
    parameter, the cosine of the two gradients counts a conflict when negative. Besides the published
    element-wise product, ``alignment_mode`` local_cosine / row_cosine also keeps a true cosine in [-1, 1].
    """
    cosine_fn = ALIGNMENT_MODES[alignment_mode]
    general_half, domain_half = batch_size // 2, batch_size - batch_size // 2
    if general_half < 1:
        raise InputError(f"--batch_size must be at least 2 (one general and one domain triple), got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    general_batches = shuffled_batches(general, general_half, generator)
    domain_batches = shuffled_batches(domain, domain_half, generator)
    steps = min(len(general_batches), len(domain_batches), max_samples // batch_size)
    if steps == 0:
        raise InputError(f"not enough data for one step: need {general_half} general and {domain_half} domain "
                         f"triples (have {len(general)} and {len(domain)}) and --max_samples >= {batch_size}")

    named = [(n, p) for n, p in embedder.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    selected = select_parameters(named, layer_types)
    device, dtype = embedder.device, _accumulator_dtype(embedder)
    sum_general = [torch.zeros(p.shape, dtype=dtype, device=device) for p in params]
    sum_domain = [torch.zeros(p.shape, dtype=dtype, device=device) for p in params]
    seen = torch.zeros(len(params), device=device)
    conflicts = torch.zeros(len(params), device=device)
    loss_sums = torch.zeros(2, dtype=dtype, device=device)

    for step in tqdm(range(steps), desc="alignment", unit="step"):
        embedder.model.zero_grad(set_to_none=True)
        general_loss = triplet_loss(embedder, general_batches[step], distributed)
        general_loss.backward()
        general_grads = _grads(params)
        embedder.model.zero_grad(set_to_none=True)
        domain_loss = triplet_loss(embedder, domain_batches[step], distributed)
        domain_loss.backward()
        domain_grads = _grads(params)

        torch._foreach_add_(sum_general, general_grads)
        torch._foreach_add_(sum_domain, domain_grads)
        norms_g = torch.stack(torch._foreach_norm(general_grads, 2, dtype=dtype))
        norms_d = torch.stack(torch._foreach_norm(domain_grads, 2, dtype=dtype))
        dots = torch.stack([torch.dot(g.flatten().to(dtype), d.flatten().to(dtype))
                            for g, d in zip(general_grads, domain_grads)])
        both = (norms_g > 0) & (norms_d > 0)
        cosines = dots / (norms_g * norms_d).clamp(min=torch.finfo(dtype).tiny)
        seen += both
        conflicts += both & (cosines < 0)
        loss_sums += torch.stack([general_loss.detach(), domain_loss.detach()]).to(dtype)
        del general_grads, domain_grads
    embedder.model.zero_grad(set_to_none=True)

    alignment, elementwise, cosine = {}, {}, {}
    for index, (name, _) in enumerate(named):
        avg_g = sum_general[index].div_(steps)
        avg_d = sum_domain[index].div_(steps)
        norm_g, norm_d = avg_g.norm(), avg_d.norm()
        if norm_g <= NORM_EPS or norm_d <= NORM_EPS:
            alignment[name] = 0.0
        else:
            alignment[name] = (torch.dot(avg_g.flatten(), avg_d.flatten()) / (norm_g * norm_d)).item()
        if name in selected:
            elementwise[name] = elementwise_alignment(avg_g, avg_d)
            if cosine_fn is not None:
                cosine[name] = cosine_fn(avg_g, avg_d)
        sum_general[index] = sum_domain[index] = None  # free as we go
    rates = torch.where(seen > 0, conflicts / seen.clamp(min=1), torch.zeros_like(seen)).tolist()
    losses = (loss_sums / steps).tolist()
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
    )
