"""An independent, deliberately plain re-implementation of the embedding and loss, for checking gaprune."""

import json
import math
import os

import torch
from transformers import AutoModel, AutoTokenizer


def load(model_dir, dtype=torch.float32):
    config = json.load(open(os.path.join(model_dir, "config.json")))
    encoder = config["model_type"] == "bert"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="right" if encoder else "left")
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).to(dtype).eval()
    return model, tokenizer, encoder


def embed(model, tokenizer, encoder, texts, padding=True):
    batch = tokenizer(texts, padding=padding, truncation=True, max_length=512, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"]
    rows = []
    for i in range(len(texts)):
        if encoder:  # mean over real tokens
            real = mask[i].bool()
            rows.append(hidden[i][real].mean(dim=0))
        else:  # last real token
            last = int(mask[i].nonzero().max())
            rows.append(hidden[i, last])
    return torch.stack(rows)


def info_nce(q, p, n, scale=20.0):
    docs = torch.cat([p, n])
    total = 0.0
    for i in range(q.shape[0]):
        sims = torch.stack([scale * torch.dot(q[i], d) / (q[i].norm() * d.norm()) for d in docs])
        total = total + (torch.logsumexp(sims, dim=0) - sims[i])
    return total / q.shape[0]


def batch_loss(model, tokenizer, encoder, batch, padding=True):
    q, p, n = (embed(model, tokenizer, encoder, [r[k] for r in batch], padding) for k in ("query", "positive", "negative"))
    return info_nce(q, p, n)


def grads(model, loss):
    names = [n for n, _ in model.named_parameters()]
    values = torch.autograd.grad(loss, [p for _, p in model.named_parameters()], allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)) for n, g, (_, p) in zip(names, values, model.named_parameters())}


def mean_filter_3x3(x):
    """Zero-padded mean filter written out element by element."""
    k = min(3, *x.shape)
    rows, cols = x.shape
    out = torch.zeros_like(x)
    lo = (k - 1) // 2
    for r in range(rows):
        for c in range(cols):
            acc = 0.0
            for dr in range(-lo, k - lo):
                for dc in range(-lo, k - lo):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < rows and 0 <= cc < cols:
                        acc += float(x[rr, cc])
            out[r, c] = acc / (k * k)
    return out


def cosine(a, b):
    na, nb = a.norm(), b.norm()
    if na <= 1e-8 or nb <= 1e-8:
        return 0.0
    return float(torch.dot(a.flatten().double(), b.flatten().double()) / (na.double() * nb.double()))


__all__ = ["load", "embed", "info_nce", "batch_loss", "grads", "mean_filter_3x3", "cosine", "math"]


def window_cosine_3x3(g, d):
    """Cosine of g and d over each entry's zero-padded 3x3 window, written out with loops (0 where a
    window of either is all zero)."""
    rows, cols = g.shape
    out = torch.zeros_like(g)
    for i in range(rows):
        for j in range(cols):
            window = (slice(max(i - 1, 0), i + 2), slice(max(j - 1, 0), j + 2))
            a, b = g[window].flatten(), d[window].flatten()
            if a.norm() > 0 and b.norm() > 0:
                out[i, j] = torch.dot(a, b) / (a.norm() * b.norm())
    return out
