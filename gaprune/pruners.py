"""Activation-aware pruning of one linear layer, free of models and files: Wanda, SparseGPT, and the
SparseGPT (OBS) update of the kept weights under a mask chosen by anything else.

W is (out, in); X are the layer's calibration inputs, seen only through their statistics:
``input_sq`` = sum over tokens of x_j^2 (Wanda), ``hessian`` = X^T X summed over tokens (SparseGPT).
Scaling either by a constant changes nothing below. Masks are True where a weight is pruned.
"""

from __future__ import annotations

import torch

from gaprune.errors import InputError
from gaprune.patterns import Pattern, lowest_in_groups, lowest_in_rows
from gaprune.options import GROUP_ORDERS, NATURAL_ORDER

DAMPENING = 0.01  # SparseGPT: add 1% of the mean Hessian diagonal to the diagonal
BLOCK_SIZE = 128  # SparseGPT: columns per lazy-update block


def wanda_scores(weight: torch.Tensor, input_sq: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2: the weight's magnitude times the norm of the input it multiplies."""
    return weight.float().abs() * input_sq.float().sqrt().unsqueeze(0)


def wanda_mask(weight: torch.Tensor, input_sq: torch.Tensor, share: float, pattern: Pattern = Pattern()) -> torch.Tensor:
    """Wanda: the lowest-scoring weights of each output row (or of each N:M group)."""
    scores = wanda_scores(weight, input_sq)
    return lowest_in_groups(scores, pattern.n, pattern.m) if pattern.structured else lowest_in_rows(scores, share)


def _dampened(hessian: torch.Tensor, dtype: torch.dtype,
              dampening: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """H + lambda I in ``dtype``, lambda = dampening * mean diag H, once H_jj = 1 for the inputs that were always
    zero; those inputs; lambda."""
    hessian = hessian.to(dtype, copy=True)
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    index = torch.arange(hessian.shape[0], device=hessian.device)
    shift = dampening * torch.mean(torch.diag(hessian))
    hessian[index, index] += shift
    return hessian, dead, shift


def inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor, dampening: float = DAMPENING,
                           zero_dead: bool = True) -> torch.Tensor:
    """The upper Cholesky factor U of (H + lambda I)^-1, lambda = dampening * mean diag H. Inputs that were
    always zero get H_jj = 1 and (``zero_dead``) their weights zeroed in place: they never mattered. Row i
    of U, scaled by 1 / U_ii, is the OBS update of the weights after column i when column i is pruned."""
    hessian, dead, _ = _dampened(hessian, weight.dtype, dampening)  # weight: the float32 (or float64) working copy
    if zero_dead:
        weight[:, dead] = 0
    factor = torch.linalg.cholesky(hessian)
    del hessian  # beside the caller's H, at most two in x in matrices alive at once
    inverse = torch.cholesky_inverse(factor)
    del factor
    return torch.linalg.cholesky(inverse, upper=True)


def dense_target_weight(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor,
                        dampening: float = DAMPENING) -> torch.Tensor:
    """W* = W (C + lambda I)(H + lambda I)^-1, the weight from which SparseGPT (or a fixed mask's update) makes
    the layer reproduce the dense model's outputs rather than its own.

    X are the layer's inputs in the dense model and X~ in the pruned one, for the same tokens; H = X~^T X~ (the
    usual ``hessian``) and C = X^T X~ (``cross``). The pruned weight V should minimise ||X W^T - X~ V^T||^2, which
    also repairs the error the pruned layers before it left in X~. With SparseGPT's dampening as a pull
    towards W, ||X W^T - X~ V^T||^2 + lambda ||W - V||^2 = ||V - W*||^2 under H + lambda I, plus a constant: the
    OBS saliency and updates that SparseGPT computes on W* with H therefore minimise it. Where X~ = X, W* = W
    (inputs that never fired included)."""
    work = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    dampened, dead, shift = _dampened(hessian, work.dtype, dampening)
    cross = cross.to(work.dtype, copy=True)
    cross[dead, dead] = 1  # as H_jj: an input that never fired keeps its weight, as it would with X~ = X
    target = work @ cross + shift * work
    del cross
    return torch.cholesky_solve(target.T, torch.linalg.cholesky(dampened)).T  # float32 (or float64), for SparseGPT


def hessian_group_order(hessian: torch.Tensor, m: int) -> torch.Tensor:
    """The column permutation that takes the groups of ``m`` consecutive columns by decreasing sum of H_jj
    (the inputs' energy), each group's columns kept together and in order (ties: the earlier group)."""
    if hessian.shape[0] % m:
        raise InputError(f"an N:M pattern needs rows whose length is a multiple of {m}, got {hessian.shape[0]}")
    energy = torch.diag(hessian).float().view(-1, m).sum(1)
    groups = torch.argsort(energy, descending=True, stable=True)
    return (groups.unsqueeze(1) * m + torch.arange(m, device=hessian.device)).reshape(-1)


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, share: float = 0.5, pattern: Pattern = Pattern(),
              mask: torch.Tensor | None = None, block_size: int = BLOCK_SIZE,
              dampening: float = DAMPENING, group_order: str = NATURAL_ORDER) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one layer: returns (the new weight, the mask), the layer's weight left untouched.

    Columns are taken left to right in blocks. Within a block, the mask is chosen by the OBS saliency
    w^2 / [U_ii]^2 (the ``share`` lowest of the block, or the N lowest of each M columns), unless ``mask`` is
    given: then only the kept weights are updated (reconstruction under a fixed mask). Pruning column i
    moves its error (w_i - q_i) / U_ii onto the columns after it along row i of U; the updates to later
    blocks are applied once per block (the lazy batch update).

    With an N:M ``pattern`` and ``group_order="hessian"``, the groups are taken by decreasing input energy
    instead (GPTQ's activation order, by whole groups so the pattern holds): the inputs that carry the most
    are pruned first, before any error lands on them, and later, weaker groups absorb the updates. A given
    ``mask`` or an unstructured pattern keeps the natural order. Blocks hold whole groups.
    """
    if group_order not in GROUP_ORDERS:
        raise ValueError(f"unknown group order {group_order!r}")
    if pattern.structured:
        block_size = max(pattern.m, block_size - block_size % pattern.m)
    if group_order == "hessian" and pattern.structured and mask is None:
        order = hessian_group_order(hessian, pattern.m)
        new, pruned = sparsegpt(weight[:, order], hessian[order][:, order], share, pattern, None, block_size,
                                dampening)
        inverse = torch.argsort(order)
        return new[:, inverse], pruned[:, inverse]
    W = weight.detach().to(torch.promote_types(weight.dtype, torch.float32), copy=True)  # float32 or float64
    U = inverse_hessian_factor(hessian, W, dampening, zero_dead=mask is None)  # a given mask is kept as given
    rows, columns = W.shape
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        W1, U1 = W[:, start:end].clone(), U[start:end, start:end]
        errors = torch.zeros_like(W1)
        if mask is not None:
            mask1 = mask[:, start:end]
        elif pattern.structured:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            saliency = W1.square() / torch.diag(U1).square().unsqueeze(0)
            mask1 = lowest_in_rows(saliency.reshape(1, -1), share).view_as(W1)
        for i in range(end - start):
            if mask is None and pattern.structured and i % pattern.m == 0:
                saliency = W1[:, i:i + pattern.m].square() / torch.diag(U1)[i:i + pattern.m].square().unsqueeze(0)
                mask1[:, i:i + pattern.m] = lowest_in_groups(saliency, pattern.n, pattern.m)
            w, d = W1[:, i], U1[i, i]
            q = w.masked_fill(mask1[:, i], 0)
            error = (w - q) / d
            W1[:, i:] -= error.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            errors[:, i] = error
        W[:, start:end] = W1
        pruned[:, start:end] = mask1
        W[:, end:] -= errors @ U[start:end, end:]
    return W.to(weight.dtype), pruned
