"""The contrastive loss that Fisher information, gradient alignment and retraining are measured on."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from gaprune.distributed import current_world
from gaprune.modeling import Embedder

SCALE = 20.0


def gather_across_processes(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, with gradients flowing back to this rank's, among the ranks that joined through
    gaprune.distributed.init_from_env (torchrun); otherwise ``x`` itself."""
    if not current_world().is_distributed:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def info_nce(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
             scale: float = SCALE) -> torch.Tensor:
    """In-batch InfoNCE with hard negatives: query i against all 2B documents, its own positive as target.

    logits = scale * cos(Q, [P; N]) of shape (B, 2B); loss = mean cross-entropy with target i.
    """
    dtype = torch.promote_types(queries.dtype, torch.float32)  # half-precision embeddings: similarities in float32
    documents = torch.cat([positives, negatives], dim=0).to(dtype)
    logits = scale * F.normalize(queries.to(dtype), dim=-1) @ F.normalize(documents, dim=-1).T
    targets = torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(logits, targets)


def triplet_loss(embedder: Embedder, batch: Sequence[dict], distributed: bool = False) -> torch.Tensor:
    """InfoNCE over a batch of {query, positive, negative} records; each field padded to its own longest text."""
    q, p, n = (embedder.embed([record[key] for record in batch]) for key in ("query", "positive", "negative"))
    if distributed:
        q, p, n = gather_across_processes(q), gather_across_processes(p), gather_across_processes(n)
    return info_nce(q, p, n)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """How far the student's embeddings sit from the teacher's (rows paired): the mean of 1 - cos (``cosine``),
    or the mean squared difference of the L2-normalised embeddings (``mse``, summed over the dimensions). Either
    keeps the student in the teacher's embedding space, so an index built with the teacher still serves it."""
    student, teacher = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
    if kind == "cosine":
        return (1 - (student * teacher).sum(-1)).mean()
    return (student - teacher).pow(2).sum(-1).mean()
