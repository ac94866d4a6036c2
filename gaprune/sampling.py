"""Diversity sampling: embed texts, run k-means, keep the record nearest to each centroid."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from gaprune.distributed import current_world
from gaprune.modeling import Embedder

# Distances are computed in blocks of at most this many entries, so n x k never sits in memory at once.
BLOCK_ELEMENTS = 1 << 24


def embed_texts(embedder: Embedder, texts: Sequence[str], batch_size: int, stream_dir: str | None = None,
                chunk_batches: int = 32) -> torch.Tensor:
    """L2-normalised float32 embeddings (n, d) on the model's device.

    With ``stream_dir``, every ``chunk_batches`` batches go to a .npy file there, so the model's
    activations and the growing embedding list never coexist; they are read back memory-mapped.
    """
    if stream_dir is None:
        return embedder.encode(texts, batch_size)
    chunk = batch_size * chunk_batches
    files = []
    for start in tqdm(range(0, len(texts), chunk), desc="embedding", unit="chunk",
                      disable=not current_world().is_main):
        files.append(os.path.join(stream_dir, f"chunk_{len(files):06d}.npy"))
        np.save(files[-1], embedder.encode(texts[start:start + chunk], batch_size, progress=False).cpu().numpy())
    return torch.cat([torch.from_numpy(np.load(path, mmap_mode="r").copy()) for path in files]).to(embedder.device)


def _nearest(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest center for each point, in blocks."""
    block = max(1, BLOCK_ELEMENTS // max(1, centers.shape[0]))
    center_sq = (centers * centers).sum(dim=1)
    out = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    for start in range(0, points.shape[0], block):
        chunk = points[start:start + block]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 does not change the argmin
        out[start:start + block] = (center_sq - 2 * chunk @ centers.T).argmin(dim=1)
    return out


def kmeans(points: torch.Tensor, k: int, iterations: int = 20, seed: int = 42) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; deterministic for a given seed and device."""
    n = points.shape[0]
    generator = torch.Generator(device=points.device).manual_seed(seed)
    centers = torch.empty(k, points.shape[1], dtype=points.dtype, device=points.device)
    first = torch.randint(n, (1,), generator=generator, device=points.device)
    centers[0] = points[first]
    closest = ((points - centers[0]) ** 2).sum(dim=1)
    for i in tqdm(range(1, k), desc="k-means++ seeding", unit="center", leave=False, disable=k < 1000):
        weights = closest.clamp(min=0)
        if float(weights.sum()) <= 0:  # fewer distinct points than k: any point will do
            weights = torch.ones_like(weights)
        pick = torch.multinomial(weights, 1, generator=generator)
        centers[i] = points[pick]
        closest = torch.minimum(closest, ((points - centers[i]) ** 2).sum(dim=1))
    for _ in tqdm(range(iterations), desc="k-means", unit="iter"):
        assignment = _nearest(points, centers)
        sums = torch.zeros_like(centers).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k).unsqueeze(1).to(points.dtype)
        centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers)  # empty clusters stay put
    return centers


def select_diverse(embeddings: torch.Tensor, k: int, iterations: int = 20, seed: int = 42) -> list[int]:
    """Indices of the points nearest to each of k centroids, duplicates dropped, in centroid order."""
    centers = kmeans(embeddings, k, iterations, seed)
    nearest = _nearest(centers, embeddings).tolist()
    return list(dict.fromkeys(nearest))


def streaming_dir() -> str:
    return tempfile.mkdtemp(prefix="gaprune-sample-")


def remove_dir(path: str | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
