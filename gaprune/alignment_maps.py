"""Per-weight agreement of two averaged gradients (general and domain), shaped like the parameter.

elementwise_alignment is the published element-wise product; local_cosine and row_cosine are true cosines
in [-1, 1] (``--alignment_mode``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-8


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


COSINE_MAPS = {"product": None, "local_cosine": local_cosine, "row_cosine": row_cosine}  # by options.ALIGNMENT_MODES
