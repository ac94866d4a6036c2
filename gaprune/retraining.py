"""Sparse recovery: a short contrastive fine-tune of a pruned model that keeps every pruned weight at zero."""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from gaprune.data import endless_batches
from gaprune.loss import triplet_loss
from gaprune.modeling import Embedder
from gaprune.spec import RetrainSpec


def zero_masks(parameters: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Where each parameter is zero now; those entries are held at zero while training."""
    return {name: p == 0 for name, p in parameters.items() if bool((p == 0).any())}


@dataclass
class TrainingResult:
    losses: list[float]
    seconds: float


def sparse_finetune(embedder: Embedder, domain: Sequence[dict], spec: RetrainSpec, masks: Mapping[str, torch.Tensor],
                    general: Sequence[dict] = (), autocast_dtype: torch.dtype | None = None) -> TrainingResult:
    """AdamW on the InfoNCE loss; each batch mixes round(batch_size * general_ratio) general triples into the
    domain ones. Masked gradients are zeroed before each step and masked weights re-zeroed after it."""
    model = embedder.model
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(params.values(), lr=spec.lr, weight_decay=spec.weight_decay)
    warmup_steps, grad_accum = spec.warmup_steps, spec.grad_accum
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0)
    rng = random.Random(spec.seed)
    n_general = spec.general_per_batch(bool(general))
    domain_batches = endless_batches(domain, spec.batch_size - n_general, rng)
    general_batches = endless_batches(general, n_general, rng) if n_general else None
    autocast = (torch.autocast(device_type=embedder.device.type, dtype=autocast_dtype) if autocast_dtype
                else contextlib.nullcontext())

    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    progress = tqdm(range(spec.steps), desc="retraining", unit="step")
    for _ in progress:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(grad_accum):
            batch = next(domain_batches) + (next(general_batches) if general_batches else [])
            with autocast:
                loss = triplet_loss(embedder, batch) / grad_accum
            loss.backward()
            step_loss += loss.item()
        with torch.no_grad():
            for name, mask in masks.items():
                if params[name].grad is not None:
                    params[name].grad.masked_fill_(mask, 0)
            optimizer.step()
            schedule.step()
            for name, mask in masks.items():
                params[name].masked_fill_(mask, 0)
        losses.append(step_loss)
        progress.set_postfix(loss=f"{step_loss:.4f}")
    model.eval()
    return TrainingResult(losses=losses, seconds=time.perf_counter() - start)
