"""What the scoring passes return and the score files hold, as plain records (no engine imported here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FILE_KINDS = {"domain_fisher": "fisher", "general_fisher": "fisher", "alignment": "alignment"}  # side -> kind


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
