"""Retrieval quality of an embedding model on triple files: nDCG@10, MRR@10, Recall@1 and Recall@10.

Each triple's query is searched against a corpus made of every positive and negative of the file
(identical texts counted once); the query's own positive is the one relevant document.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import torch

from gaprune.errors import InputError
from gaprune.modeling import Embedder

METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10")
QUERY_MARKER = "\nQuery: "


def query_text(query: str, keep_instruction: bool) -> str:
    """The query as the model expects it: Qwen3-Embedding keeps its 'Instruct: ...\\nQuery: ' prefix;
    models trained without instructions get the query alone."""
    if keep_instruction or QUERY_MARKER not in query:
        return query
    return query.split(QUERY_MARKER, 1)[1]


def keeps_instructions(embedder: Embedder, mode: str) -> bool:
    """auto: instructions for decoders (Qwen3-Embedding is trained with them), not for encoders."""
    if mode == "auto":
        return embedder.pooling == "lasttoken"
    return mode == "keep"


def build_corpus(triples: Sequence[dict]) -> tuple[list[str], list[int]]:
    """Unique documents (positives and negatives, first-seen order) and each query's positive index."""
    index: dict[str, int] = {}
    for t in triples:
        for text in (t["positive"], t["negative"]):
            index.setdefault(text, len(index))
    return list(index), [index[t["positive"]] for t in triples]


def relevant_ranks(queries: torch.Tensor, corpus: torch.Tensor, relevant: Sequence[int],
                   block: int = 1024) -> torch.Tensor:
    """Rank of each query's relevant document: 1 + the documents scored strictly higher (cosine)."""
    target = torch.as_tensor(relevant, device=queries.device)
    ranks = []
    for start in range(0, queries.shape[0], block):
        scores = queries[start:start + block] @ corpus.T
        own = scores.gather(1, target[start:start + block, None])
        ranks.append((scores > own).sum(dim=1) + 1)
    return torch.cat(ranks)


def ranking_metrics(ranks: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Mean nDCG@k, MRR@k, Recall@1 and Recall@k for one relevant document per query."""
    ranks = ranks.double()
    hit = ranks <= k
    return {"ndcg@10": torch.where(hit, 1.0 / torch.log2(ranks + 1), 0.0).mean().item(),
            "mrr@10": torch.where(hit, 1.0 / ranks, 0.0).mean().item(),
            "recall@1": (ranks <= 1).double().mean().item(),
            "recall@10": hit.double().mean().item()}


@torch.no_grad()
def evaluate_triples(embedder: Embedder, triples: Sequence[dict], batch_size: int = 32,
                     instructions: str = "auto", index_embedder: Embedder | None = None) -> dict:
    """Retrieval metrics of the triples' queries against the corpus of their positives and negatives; with
    ``index_embedder`` the corpus is embedded by that model instead (index compatibility: a pruned model's
    queries against an index built with the dense model)."""
    return evaluate_corpora(embedder, triples, batch_size, instructions, [index_embedder or embedder])[0]


@torch.no_grad()
def evaluate_corpora(embedder: Embedder, triples: Sequence[dict], batch_size: int,
                     instructions: str, corpus_embedders: Sequence[Embedder]) -> list[dict]:
    """evaluate_triples's result for the corpus embedded by each of ``corpus_embedders``, the queries (embedded
    by ``embedder``) encoded once."""
    documents, relevant = build_corpus(triples)
    keep = keeps_instructions(embedder, instructions)
    for other in corpus_embedders:
        if other.dimension != embedder.dimension:
            raise InputError(f"the index model embeds in {other.dimension} dimensions and the model in "
                             f"{embedder.dimension}: they cannot share an index")
    queries = embedder.encode([query_text(t["query"], keep) for t in triples], batch_size, "queries")
    return [{"metrics": ranking_metrics(relevant_ranks(queries, other.encode(documents, batch_size, "documents"),
                                                       relevant)),
             "num_queries": len(triples), "corpus_size": len(documents),
             "query_instructions": "kept" if keep else "stripped"} for other in corpus_embedders]


def relative_change(value: float, baseline: float) -> float | None:
    """Percent change against the baseline (None when the baseline is 0)."""
    return None if baseline == 0 else 100.0 * (value - baseline) / baseline


def seen_data(model_dir: str) -> list[str]:
    """The triple files a gaprune folder was scored, calibrated, chosen or retrained on, as its records name them:
    evaluation_config.json's score files (their data) and calibration files, selection.json's validation files
    (compare.py --select chose the recipe on them), and retrain_config.json's training files and the pruned
    folder it started from."""
    def record(folder: str, name: str) -> dict:
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8") as handle:
                found = json.load(handle)
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    files: list[str] = []
    settings = record(model_dir, "retrain_config.json").get("settings", {})
    files += [settings.get("data_path"), settings.get("general_data_path")]
    folders = [model_dir] + ([settings["model_path"]] if isinstance(settings.get("model_path"), str) else [])
    for folder in folders:
        meta = record(folder, "evaluation_config.json").get("meta", {})
        for score_file in meta.get("score_files", {}).values():
            if isinstance(score_file, str):
                data = record(os.path.dirname(score_file) or ".", os.path.basename(score_file)).get("metadata", {})
                files += [data.get("data_path"), data.get("general_data_path"), data.get("domain_data_path")]
        calibration = next((part.get("calibration", {}) for part in meta.values() if isinstance(part, dict)
                            and "calibration" in part), {})
        files += [calibration.get("domain_data"), calibration.get("general_data")]
        chosen_on = record(folder, "selection.json").get("validation_data", {})
        files += [path for paths in chosen_on.values() if isinstance(paths, list) for path in paths]
    return list(dict.fromkeys(f for f in files if isinstance(f, str) and os.path.isfile(f)))


def overlap_warnings(model_dir: str, files: Mapping[str, Sequence[dict]]) -> list[str]:
    """One line per evaluated file whose queries the folder saw while it was pruned or retrained: such a
    figure is not a held-out measurement."""
    seen: dict[str, set[str]] = {}
    for path in seen_data(model_dir):
        try:
            with open(path, encoding="utf-8") as handle:
                records = json.load(handle)
        except (OSError, ValueError):
            continue
        seen[path] = {r.get("query") for r in records if isinstance(r, dict)} if isinstance(records, list) else set()
    lines = []
    for path, triples in files.items():
        for source, queries in seen.items():
            shared = sum(triple["query"] in queries for triple in triples)
            if shared:
                lines.append(f"{shared} of the {len(triples)} queries of {path} are in {source}, which "
                             f"{os.path.basename(os.path.normpath(model_dir))} was pruned, chosen or retrained on: "
                             f"not a held-out measurement")
    return lines
