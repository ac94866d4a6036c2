"""MTEB on a gaprune model: an encoder that lets mteb embed with an Embedder, a local retrieval task made of a
triple file, and a run of named MTEB tasks and local ones that returns each task's scores.

The local task is the search gaprune.evaluation measures (the same corpus, the same relevant document, the same
query instructions), so that its nDCG@10 is evaluate_triples' as mteb computes it. It needs the optional extra
(``pip install -e .[mteb]``); mteb is imported inside the functions, so importing this module does not need it.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from gaprune.errors import InputError, first_line
from gaprune.evaluation import build_corpus, keeps_instructions, query_text, relative_change
from gaprune.modeling import Embedder

if TYPE_CHECKING:
    from mteb.abstasks import AbsTask
    from mteb.models import ModelMeta
    from mteb.results import TaskResult

LOCAL_PREFIX = "local:"
# mteb's retrieval scores under the names gaprune.evaluation.METRICS gives them
RETRIEVAL_METRICS = {"ndcg@10": "ndcg_at_10", "mrr@10": "mrr_at_10", "recall@1": "recall_at_1",
                     "recall@10": "recall_at_10"}


def import_mteb(flag: str = "--mteb_tasks") -> ModuleType:
    """The mteb module, or one line saying which extra to install (``flag``: the option that asked for it)."""
    try:
        import mteb
    except ImportError as err:
        reason = "" if err.name == "mteb" else f" ({first_line(err)})"  # installed, but a dependency is missing
        raise InputError(f"{flag} needs the mteb extra: pip install -e .[mteb]{reason}") from None
    return mteb


class MtebEncoder:
    """An Embedder as mteb's encoder: queries get evaluate.py's instruction treatment (Qwen3-Embedding's
    'Instruct: ...\\nQuery: ' prefix kept, an encoder's stripped, as ``instructions`` says), documents are embedded
    as mteb gives them, and the similarity is the dot product of the L2-normalised embeddings, as evaluate_triples
    scores."""

    def __init__(self, embedder: Embedder, batch_size: int = 32, instructions: str = "auto"):
        self.embedder, self.batch_size = embedder, batch_size
        self.keep_instructions = keeps_instructions(embedder, instructions)

    @property
    def mteb_model_meta(self) -> ModelMeta:
        from mteb.models import ModelMeta
        from mteb.models.model_meta import ScoringFunction

        # model_copy, as create_empty itself does: a folder path is no "org/model" name mteb's validation accepts
        return ModelMeta.create_empty().model_copy(update={
            "name": self.embedder.name or "gaprune/model", "embed_dim": self.embedder.dimension,
            "similarity_fn_name": ScoringFunction.COSINE, "use_instructions": self.keep_instructions,
            "framework": ["PyTorch"]})

    def encode(self, inputs: Iterable[dict], *, task_metadata: Any = None, hf_split: str = "", hf_subset: str = "",
               prompt_type: str | None = None, **kwargs: Any) -> np.ndarray:
        """mteb's batches (a DataLoader of dicts with "text") as one float32 array, ``batch_size`` texts at a time."""
        texts = [text for batch in inputs for text in batch["text"]]
        if prompt_type == "query":  # mteb's PromptType is a str enum: query or document
            texts = [query_text(text, self.keep_instructions) for text in texts]
        kind = "queries" if prompt_type == "query" else "documents" if prompt_type == "document" else "texts"
        embeddings = self.embedder.encode(texts, kwargs.get("batch_size") or self.batch_size, kind)
        return embeddings.float().cpu().numpy()

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        return torch.as_tensor(embeddings1).float() @ torch.as_tensor(embeddings2).float().T

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        return (torch.as_tensor(embeddings1).float() * torch.as_tensor(embeddings2).float()).sum(dim=-1)


def short_name(task_name: str) -> str:
    """A task's name for a table: a local task by its file's name alone."""
    if task_name.startswith(LOCAL_PREFIX):
        return LOCAL_PREFIX + os.path.basename(task_name[len(LOCAL_PREFIX):])
    return task_name


def triple_task(path: str, triples: Sequence[dict]) -> AbsTask:
    """A local MTEB retrieval task of a triple file, as evaluate_triples searches it: the corpus of build_corpus
    (every positive and negative, identical texts once), each triple's query under its own id (a query that
    stands twice counts twice) with its own positive the one relevant document. The queries keep their
    instructions; MtebEncoder treats them as evaluate.py does. (mteb strips the whitespace around a document;
    evaluate_triples embeds it as written: the one difference, for texts that have any.)"""
    import_mteb("--mteb_local")
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    documents, relevant = build_corpus(triples)
    metadata = TaskMetadata(
        name=LOCAL_PREFIX + path, description=f"the triples of {path}, searched as gaprune's evaluation does",
        type="Retrieval", category="t2t", main_score="ndcg_at_10", eval_splits=["test"],
        eval_langs=["eng-Latn"],  # mteb needs a language; the file's is not known
        dataset={"path": path, "revision": "local"})

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        self.dataset = {"default": {"test": {
            "queries": Dataset.from_dict({"id": [f"q{i}" for i in range(len(triples))],
                                          "text": [t["query"] for t in triples]}),
            "corpus": Dataset.from_dict({"id": [f"d{j}" for j in range(len(documents))], "text": documents}),
            "relevant_docs": {f"q{i}": {f"d{j}": 1} for i, j in enumerate(relevant)},
            "top_ranked": None}}}
        self.data_loaded = True

    # a class of its own per file: mteb keeps a task's metadata on its class (unloading a task drops the copy
    # on the instance)
    task = type("TripleFileRetrieval", (AbsTaskRetrieval,), {"metadata": metadata, "load_data": load_data})()
    task.load_data()
    return task


def load_tasks(names: Sequence[str] = (), files: Mapping[str, Sequence[dict]] | None = None) -> list[AbsTask]:
    """The named MTEB tasks with their data loaded (downloaded the first time), then a local task per triple file
    (path -> triples); none when neither is asked. An unknown name, or data that cannot be loaded (offline, say),
    is one InputError naming the task: load them before a model, so that a refusal comes first."""
    if not names and not files:
        return []
    mteb = import_mteb("--mteb_tasks" if names else "--mteb_local")
    tasks = []
    for name in dict.fromkeys(names):
        try:
            task = mteb.get_task(name)
        except KeyError as err:  # mteb's message: "KeyError: 'X' not found. Did you mean: 'Y'?"
            found = str(err.args[0]).removeprefix("KeyError: ") if err.args else f"{name!r} not found"
            raise InputError(f"MTEB task {found}") from None
        try:
            task.load_data()
        except Exception as err:  # offline, a missing dataset, a refused download: datasets raises many types
            raise InputError(f"MTEB task {name} cannot be loaded: {first_line(err)}") from None
        tasks.append(task)
    return tasks + [triple_task(path, triples) for path, triples in (files or {}).items()]


def task_scores(result: TaskResult, task: AbsTask) -> dict:
    """One mteb TaskResult of ``task`` as a record: its main score (the mean over splits and subsets), which metric
    that is, for a retrieval task mteb's nDCG@10, MRR@10, Recall@1 and Recall@10 under gaprune's names, and the
    seconds mteb took."""
    entries = [scores for split in result.scores.values() for scores in split]
    metrics = {name: float(np.mean([s[key] for s in entries])) for name, key in RETRIEVAL_METRICS.items()
               if all(key in s for s in entries)}
    return {"main_metric": task.metadata.main_score, "main_score": float(result.get_score()), "metrics": metrics,
            "evaluation_time_s": result.evaluation_time}


def run_tasks(embedder: Embedder, tasks: Sequence[AbsTask], batch_size: int = 32,
              instructions: str = "auto") -> dict[str, dict]:
    """Each task's scores on the model (task name -> task_scores), run by mteb without its result cache (a pruned
    folder would otherwise get the cached scores of whatever ran under its name before)."""
    mteb = import_mteb()
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # mteb maps each corpus once per run: a bar per map, not worth showing
    try:
        results = mteb.evaluate(MtebEncoder(embedder, batch_size, instructions), list(tasks), cache=None,
                                encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
                                show_progress_bar=False, co2_tracker=False)
    finally:
        if bars:
            datasets.enable_progress_bars()
    by_name = {task.metadata.name: task for task in tasks}
    return {result.task_name: task_scores(result, by_name[result.task_name]) for result in results.task_results}


def changes(results: Mapping[str, dict], baseline: Mapping[str, dict]) -> dict[str, dict[str, float | None]]:
    """Each task's percent change against the baseline: its main score and every metric both report."""
    return {name: {"main_score": relative_change(result["main_score"], baseline[name]["main_score"]),
                   **{m: relative_change(value, baseline[name]["metrics"][m]) for m, value in result["metrics"].items()
                      if m in baseline[name]["metrics"]}} for name, result in results.items()}
