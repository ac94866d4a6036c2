"""Model folders on disk: the shapes a checkpoint holds, and saving a pruned or retrained model.

A saved folder loads with ``AutoModel.from_pretrained`` and ``SentenceTransformer`` and no gaprune code:
the weights in the dtype the model came in, the tokenizer, and the source's sentence-transformers files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Mapping

import torch
from safetensors import safe_open

from gaprune.fileio import atomic_dir, write_json, writing
from gaprune.modelcard import write_model_card
from gaprune.modeling import Embedder

PROBE_SENTENCE = "What is the capital of France?"  # embedded and printed after pruning or retraining
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")


def checkpoint_shapes(model_dir: str) -> dict[str, list[int]]:
    """Parameter names and shapes from a folder's safetensors headers, without loading any weight."""
    shapes: dict[str, list[int]] = {}
    for file in sorted(os.listdir(model_dir)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, file), framework="pt") as handle:
                shapes.update({name: handle.get_slice(name).get_shape() for name in handle.keys()})
    return shapes


def output_folder(output_dir: str, model_path: str, suffix: str) -> str:
    """``<output_dir>/<last part of model_path>_<suffix>``, e.g. Qwen3-Embedding-4B_dai_prune_50%."""
    return os.path.join(output_dir, f"{os.path.basename(os.path.normpath(model_path))}_{suffix}")


def write_sentence_transformers_files(folder: str, dim: int, pooling: str) -> None:
    """modules.json (Transformer, Pooling, Normalize) and 1_Pooling/config.json naming ``pooling``."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling_config = {"word_embedding_dimension": dim, "pooling_mode_cls_token": pooling == "cls",
                      "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
                      "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_lasttoken": pooling == "lasttoken"}
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    with open(os.path.join(folder, "modules.json"), "w", encoding="utf-8") as handle:
        json.dump(modules, handle, indent=2)
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w", encoding="utf-8") as handle:
        json.dump(pooling_config, handle, indent=2)


def save_model(embedder: Embedder, folder: str) -> None:
    """save_pretrained in the checkpoint's own dtype, the tokenizer, and the source's sentence-transformers
    files (modules.json, pooling and other module folders, prompts), so AutoModel and SentenceTransformer load it.
    A source without them gets ones naming the pooling gaprune used, so SentenceTransformer embeds the same.
    A failure to write (a full disk: safetensors raises its own error class) is an OutputError naming
    ``folder``; inside fileio.atomic_dir it names the final folder, and the partial one is removed."""
    with writing(folder):
        embedder.model.to(embedder.source_dtype).save_pretrained(folder, safe_serialization=True)
        embedder.tokenizer.save_pretrained(folder)
        source = embedder.model_dir
        if not os.path.isfile(os.path.join(source, "modules.json")):
            write_sentence_transformers_files(folder, embedder.model.config.hidden_size, embedder.pooling)
        for name in SENTENCE_TRANSFORMERS_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), folder)
        for entry in sorted(os.listdir(source)):
            path = os.path.join(source, entry)
            if os.path.isdir(path) and re.fullmatch(r"\d+_\w+", entry):  # 1_Pooling, 2_Normalize, ...
                shutil.copytree(path, os.path.join(folder, entry), dirs_exist_ok=True)


def probe_embedding(embedder: Embedder) -> torch.Tensor:
    """The L2-normalised embedding of PROBE_SENTENCE, on the host."""
    return embedder.encode([PROBE_SENTENCE], progress=False)[0].cpu()


def describe_probe(embedding: torch.Tensor) -> str:
    return (f"Embedding of {PROBE_SENTENCE!r} (dim {embedding.numel()}, L2-normalised): "
            f"[{', '.join(f'{v:.6f}' for v in embedding[:8].tolist())}, ...]")


def count_zeros(model: torch.nn.Module) -> int:
    return sum(p.numel() - int(torch.count_nonzero(p)) for p in model.parameters())


def save_pruned_folder(embedder: Embedder, folder: str, records: Mapping[str, dict], card: str) -> None:
    """The model, its records (JSON files by name) and its model card, written whole: into a temporary folder
    that is then renamed, so ``folder`` never holds half of them."""
    with atomic_dir(folder) as tmp:
        save_model(embedder, tmp)
        for name, record in records.items():
            write_json(os.path.join(tmp, name), record)
        write_model_card(tmp, card)  # README.md: after save_model, which may write one
