"""Sparse recovery: a short contrastive fine-tune of a pruned model that keeps every pruned weight at zero,
optionally distilled from the dense model's embeddings so that the pruned model stays in its embedding space."""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from gaprune.data import TRIPLE_KEYS, endless_batches
from gaprune.loss import distillation_loss, info_nce
from gaprune.modeling import Embedder
from gaprune.spec import RetrainSpec


def zero_masks(parameters: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Where each parameter is zero now; those entries are held at zero while training."""
    return {name: p == 0 for name, p in parameters.items() if bool((p == 0).any())}


@dataclass
class TrainingResult:
    losses: list[float]
    seconds: float


@torch.no_grad()
def teacher_embeddings(teacher: Embedder, triples: Sequence[dict], batch_size: int = 32) -> dict[str, torch.Tensor]:
    """The teacher's L2-normalised embedding of every text of ``triples``, computed once (on the host), so
    that each training step looks them up instead of running the teacher again."""
    texts = list(dict.fromkeys(triple[key] for triple in triples for key in TRIPLE_KEYS))
    embeddings = teacher.encode(texts, batch_size, desc="teacher embeddings").cpu()
    return dict(zip(texts, embeddings))


def step_loss(embedder: Embedder, batch: Sequence[dict], spec: RetrainSpec,
              teacher: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """InfoNCE on the batch, plus ``spec.distill_weight`` times the distillation loss of every text of the batch
    against its cached teacher embedding."""
    embedded = [embedder.embed([triple[key] for triple in batch]) for key in TRIPLE_KEYS]
    loss = info_nce(*embedded)
    if spec.distills:
        student = torch.cat(embedded)
        target = torch.stack([teacher[triple[key]] for key in TRIPLE_KEYS for triple in batch]).to(student.device)
        loss = loss + spec.distill_weight * distillation_loss(student, target, spec.distill_loss)
    return loss


def sparse_finetune(embedder: Embedder, domain: Sequence[dict], spec: RetrainSpec, masks: Mapping[str, torch.Tensor],
                    general: Sequence[dict] = (), autocast_dtype: torch.dtype | None = None,
                    teacher: Mapping[str, torch.Tensor] | None = None,
                    on_step: Callable[[int, float], None] | None = None) -> TrainingResult:
    """AdamW on the InfoNCE loss (plus the distillation term against ``teacher``, the cached teacher embeddings
    of every training text, when the spec distills); each batch mixes round(batch_size * general_ratio) general
    triples into the domain ones. Masked gradients are zeroed before each step and masked weights re-zeroed
    after it. ``on_step(steps done, that step's loss)`` is called after each step (masked weights already
    re-zeroed), for example to evaluate during training: it may put the model in eval mode (it must, to evaluate
    without dropout), and training mode is restored when it returns; its time counts in ``seconds``."""
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
    for step in progress:
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for _ in range(grad_accum):
            batch = next(domain_batches) + (next(general_batches) if general_batches else [])
            with autocast:
                loss = step_loss(embedder, batch, spec, teacher) / grad_accum
            loss.backward()
            loss_sum += loss.item()
        with torch.no_grad():
            for name, mask in masks.items():
                if params[name].grad is not None:
                    params[name].grad.masked_fill_(mask, 0)
            optimizer.step()
            schedule.step()
            for name, mask in masks.items():
                params[name].masked_fill_(mask, 0)
        losses.append(loss_sum)
        progress.set_postfix(loss=f"{loss_sum:.4f}")
        if on_step is not None:
            on_step(step + 1, loss_sum)
            model.train()
    model.eval()
    return TrainingResult(losses=losses, seconds=time.perf_counter() - start)
