"""A Hugging Face model card (README.md) for a pruned or retrained folder, built from the records already in it.

``model_card`` is a pure function of plain dicts: ``evaluation_config.json`` (SparseModel.py's settings, score
files and mask accounting, or the size of a channel/head-pruned model), ``unstructured_prune_stats.json`` or
``structured_prune_stats.json``, optionally an evaluation (evaluate.py's report, or ``gaprune.evaluate``'s result)
and ``retrain_config.json`` for a retrained folder. ``write_model_card`` writes it as the folder's README.md,
replacing any README.md that saving the model left there; call it after the model is saved.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Mapping

from gaprune.coefficients import DAIConfig

README = "README.md"
PAPER = "https://arxiv.org/abs/2509.10844"
PROJECT = "gaprune"
METRIC_NAMES = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "recall@1": "Recall@1", "recall@10": "Recall@10"}
COEFFICIENT_DEFAULTS = dataclasses.asdict(DAIConfig())  # a flag is listed on the card only where it differs
PRUNER_FLAGS = ("sparsity_pattern", "layer_shares", "group_order", "calibration_weighting", "reconstruction_target")
UNIT_WORDS = {"channels": "MLP channels", "heads": "query heads"}
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./:@+-]*")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def model_card(evaluation_config: Mapping | None, stats: Mapping | None = None, evaluation: Mapping | None = None,
               *, retrain: Mapping | None = None, model_id: str | None = None,
               library_name: str = "sentence-transformers", selection: Mapping | None = None) -> str:
    """The README.md text of a pruned folder: a YAML header (base_model, library_name, tags, pipeline_tag) and a
    body naming the base model, the method and its flags, the calibration data, what was removed, the evaluation
    figures when given, how to load the model, and that gaprune made it.

    ``evaluation_config``: the folder's evaluation_config.json (None: the model was not pruned by gaprune, e.g. a
    dense model retrained). ``stats``: its unstructured_ or structured_prune_stats.json, if at hand.
    ``evaluation``: evaluate.py's report ({"results": {file: {"metrics": ...}}, "baseline", "change_percent"}),
    one ``gaprune.evaluate`` result ({"metrics": ...}), or {name: result}; None or empty: not evaluated.
    ``retrain``: retrain.py's retrain_config.json, for a retrained folder (its base model is then the base of
    the pruned folder it was retrained from). ``model_id``: what the loading snippet loads (default: a
    placeholder path). ``selection``: compare.py --select's record (objective, validation data, table)."""
    config = dict(evaluation_config or {})
    meta = config.get("meta") or {}
    structured = meta.get("structured_pruning")
    unstructured = meta.get("unstructured_pruning")
    settings = (retrain or {}).get("settings") or {}
    base = config.get("model_path") or settings.get("model_path")
    scorer = (structured or {}).get("scoring") or (unstructured or {}).get("unstructured_scoring")
    structure = (structured or {}).get("structure") or ("unstructured" if unstructured is not None else None)

    tags = [PROJECT, "pruned"] if evaluation_config is not None else [PROJECT]
    tags += [t for t in (scorer, structure, (unstructured or {}).get("sparsity_pattern")) if t]
    if retrain is not None:
        tags.append("retrained")
    header = ["---"]
    if base and is_hub_id(base):
        header.append(f"base_model: {yaml_scalar(base)}")
    header += [f"library_name: {yaml_scalar(library_name)}", "tags:"]
    header += [f"- {yaml_scalar(tag)}" for tag in dict.fromkeys(tags)]
    header += ["pipeline_tag: sentence-similarity", "---", ""]

    lines = [f"# {title(base, scorer, structure, retrain is not None)}", ""]
    lines += [summary(base, config, structured, unstructured, stats, retrain), ""]
    lines += ["## Method", ""] + method_rows(base, config, structured, unstructured) + [""]
    lines += ["## What was removed", ""] + removed_lines(config, structured, unstructured, stats) + [""]
    if retrain is not None:
        lines += ["## Retraining", ""] + retrain_lines(retrain, structured is not None) + [""]
    lines += ["## Evaluation", ""] + evaluation_lines(evaluation) + [""]
    if selection is not None:
        lines += ["## How this recipe was chosen", "", selection_text(selection), "", selection["table"], ""]
    lines += ["## How to load it", ""] + loading_lines(model_id or "path/to/this/folder", library_name) + [""]
    lines += ["## Made with gaprune", "",
              f"Made with gaprune, an implementation of GAPrune (Tang & Yang, 2025, "
              f"[arXiv:2509.10844]({PAPER})): Fisher information on domain and general data and the alignment of "
              "their gradients decide which weights an embedding model keeps for its domain. "
              + ("This folder's `retrain_config.json` and the pruned folder's `evaluation_config.json` and "
                 "`*_prune_stats.json` hold the full record." if retrain is not None else
                 "The folder's `evaluation_config.json` and `*_prune_stats.json` hold the full record."), "",
              "```bibtex",
              "@misc{tang2025gaprune,",
              "  title={GAPrune: Gradient-Alignment Pruning for Domain-Aware Embeddings},",
              "  author={Yixuan Tang and Yi Yang}, year={2025}, eprint={2509.10844}, archivePrefix={arXiv}, "
              "primaryClass={cs.CL}",
              "}",
              "```", ""]
    return "\n".join(header + lines)


def selection_text(selection: Mapping) -> str:
    files = ", ".join(f"`{path}`" for paths in selection["validation_data"].values() for path in paths)
    return (f"`compare.py --select` pruned the base model with each candidate recipe below at the same budget, "
            f"evaluated every one on the validation data ({files}) and kept `{selection['selected']}`: "
            f"{selection['objective']}.")


def write_model_card(folder: str, card_text: str) -> str:
    """Write ``card_text`` as ``folder``/README.md, replacing one that saving the model may have written (through
    a temporary file and a rename, so a reader never sees half a card); returns its path."""
    path = os.path.join(folder, README)
    tmp = os.path.join(folder, f".{README}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(card_text)
    os.replace(tmp, path)
    return path


def folder_model_card(folder: str, evaluation: Mapping | None = None, model_id: str | None = None) -> str:
    """``model_card`` from the records a SparseModel.py folder holds (evaluation_config.json and its stats)."""
    config = _read(os.path.join(folder, "evaluation_config.json"))
    stats = (_read(os.path.join(folder, "unstructured_prune_stats.json"))
             or _read(os.path.join(folder, "structured_prune_stats.json")))
    return model_card(config, stats, evaluation, model_id=model_id)


def _read(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        record = json.load(handle)
    return record if isinstance(record, dict) else None


def is_hub_id(name: str) -> bool:
    """``owner/name``, as the Hub's base_model field takes it (a local folder is named in the body only)."""
    return bool(_HUB_ID.fullmatch(name)) and not name.startswith(".") and not os.path.isabs(name)


def yaml_scalar(value: str) -> str:
    """A plain YAML scalar where that is safe, else a double-quoted one (JSON strings are YAML)."""
    text = str(value)
    plain = _PLAIN.fullmatch(text) and text.lower() not in {"true", "false", "yes", "no", "null", "on", "off"}
    return text if plain and not re.fullmatch(r"[0-9.:+-]+", text) else json.dumps(text)


def title(base: str | None, scorer: str | None, structure: str | None, retrained: bool) -> str:
    name = os.path.basename(os.path.normpath(base)) if base else "model"
    what = f"{structure} pruning by {scorer}" if scorer else "pruned with gaprune"
    if not scorer and not structure:
        what = "gaprune"
    return f"{name}: {what}" + (", retrained" if retrained else "")


def _pct(value) -> str:
    return f"{100 * float(value):.2f}%" if isinstance(value, (int, float)) else "unknown"


def _count(value) -> str:
    return f"{int(value):,}" if isinstance(value, (int, float)) else "unknown"


def _code(value) -> str:
    return f"`{value}`"


def summary(base, config, structured, unstructured, stats, retrain) -> str:
    source = _code(base) if base else "an unnamed model"
    if structured is not None and structured.get("structure") == "budget":
        heads = (f" and {structured['heads_removed_per_layer']} query heads"
                 if structured.get("heads_removed_per_layer") else "")
        text = (f"A smaller copy of {source}, pruned to a budget: {structured.get('layers_removed')} whole "
                f"transformer layers (indices {structured.get('removed_layers')}) and "
                f"{structured.get('channels_removed_per_layer')} MLP channels{heads} of every remaining layer removed, "
                f"the least `{structured.get('scoring')}` importance; predicted "
                f"{structured.get('predicted_speedup', 0):.2f}x fewer FLOPs per token. It is a standard checkpoint: "
                "`config.json` gives the new sizes and no gaprune code is needed to load it.")
    elif structured is not None and structured.get("structure") == "layers":
        text = (f"A shallower copy of {source}: {structured.get('layers_removed')} whole transformer layers "
                f"(indices {structured.get('removed_layers')}) removed, chosen by gaprune's "
                f"`{structured.get('scoring')}` block scorer. It is a standard checkpoint: `config.json` gives the "
                "new depth and no gaprune code is needed to load it.")
    elif structured is not None:
        text = (f"A smaller copy of {source}: {_pct(structured.get('share'))} of every layer's "
                f"{UNIT_WORDS.get(structured.get('structure'), structured.get('structure'))} removed by gaprune's "
                f"`{structured.get('scoring')}` scorer. It is a standard checkpoint: `config.json` gives the new "
                "sizes and no gaprune code is needed to load it.")
    elif unstructured is not None:
        share = (stats or {}).get("actual_mask_ratio", unstructured.get("unstructured_pct"))
        layers = " ".join(config.get("sparsify_layers") or []) or "candidate"
        text = (f"{source} with {_pct(share)} of its {layers} weights set to zero by gaprune's "
                f"`{unstructured.get('unstructured_scoring')}` scorer. The zeros sit inside dense matrices: the "
                "folder has the dense model's size and runs at its speed unless a sparse kernel is used.")
    else:
        text = f"{source}, not pruned by gaprune (no evaluation_config.json in the folder it came from)."
    if retrain is not None:
        steps = (retrain.get("settings") or {}).get("steps", len(retrain.get("loss_curve") or []))
        text += f" It was then retrained for {steps} steps with gaprune's retrain.py."
    return text


def flags(config: Mapping, structured: Mapping | None, unstructured: Mapping | None) -> list[str]:
    """The SparseModel.py flags that reproduce the folder, from its evaluation_config.json."""
    out = []
    if structured is not None and structured.get("structure") == "budget":
        out += [flag for key in ("target_speedup", "target_params") if structured.get(key) is not None
                for flag in (f"--{key}", str(structured[key]))]
        out += ["--budget_sequence_length", str(structured.get("sequence_length")),
                "--unstructured_scoring", str(structured.get("scoring"))]
        record = structured
    elif structured is not None and structured.get("structure") == "layers":
        amount = (["--structured_pct", str(structured["share"])] if structured.get("share")
                  else ["--num_layers_removed", str(structured.get("layers_removed"))])
        out += ["--structure", "layers", *amount, "--block_scoring", str(structured.get("scoring"))]
        record = structured
    elif structured is not None:
        out += ["--structure", str(structured.get("structure")), "--structured_pct", str(structured.get("share")),
                "--unstructured_scoring", str(structured.get("scoring"))]
        record = structured
    elif unstructured is not None:
        record = unstructured
        pattern = record.get("sparsity_pattern")
        if not pattern:
            out += ["--unstructured_pct", str(record.get("unstructured_pct"))]
        out += ["--unstructured_scoring", str(record.get("unstructured_scoring")),
                "--sparsify_layers", *[str(t) for t in config.get("sparsify_layers") or []]]
        if record.get("layer_budget_strategy") == "uniform":
            out += ["--layer_budget_strategy", "uniform", "--rho_min", str(record.get("rho_min")),
                    "--rho_max", str(record.get("rho_max"))]
        for key in PRUNER_FLAGS:
            if record.get(key):
                out += [f"--{key}", str(record[key])]
        if record.get("reconstruct"):
            out.append("--reconstruct")
    else:
        return []
    for key, default in COEFFICIENT_DEFAULTS.items():
        if key in record and record[key] != default:
            out += [f"--{key}", str(record[key])]
    return out


def method_rows(base, config, structured, unstructured) -> list[str]:
    if structured is None and unstructured is None:
        return ["No pruning record: this model was not pruned by gaprune."]
    rows = [("base model", _code(base) if base else "unknown"),
            ("method", _code(config.get("pruning_method", "unknown"))),
            ("flags", _code(" ".join(flags(config, structured, unstructured))))]
    files = (config.get("meta") or {}).get("score_files") or {}
    for key, label in (("general_fisher_scores", "general Fisher scores"),
                       ("domain_fisher_scores", "domain Fisher scores"), ("alignment_scores", "alignment scores")):
        if files.get(key):
            rows.append((label, _code(files[key])))
    calibration = (unstructured or structured or {}).get("calibration")
    if calibration:
        texts = calibration.get("texts") or {}
        used = ", ".join(f"{_code(calibration.get(key))} ({texts.get(side, '?')} texts)"
                         for key, side in (("domain_data", "domain"), ("general_data", "general"))
                         if calibration.get(key))
        rows.append(("calibration data", used or "none"))
        if calibration.get("domain_data") and calibration.get("general_data"):
            rows.append(("calibration blend", f"{_pct(calibration.get('general_share'))} general"))
    else:
        rows.append(("calibration data", "none beyond the score files (the scorer reads no calibration texts)"))
    if not any(files.get(key) for key in ("general_fisher_scores", "domain_fisher_scores", "alignment_scores")):
        rows.append(("score files", "none"))
    return ["| | |", "|---|---|"] + [f"| {label} | {value} |" for label, value in rows]


def removed_lines(config, structured, unstructured, stats) -> list[str]:
    meta = config.get("meta") or {}
    if structured is not None:
        size = meta.get("size") or {}
        stats = stats or {}
        field = stats.get("config_field") or next((k for k in size if k not in ("params_before", "params_after")),
                                                  "units")
        units = size.get(field) or {}
        before = stats.get("params_before", size.get("params_before"))
        after = stats.get("params_after", size.get("params_after"))
        if structured.get("structure") == "budget":
            depth, width = size.get("num_hidden_layers") or {}, size.get("intermediate_size") or {}
            heads = size.get("num_attention_heads") or {}
            lines = [f"- layers: `num_hidden_layers` {_count(depth.get('before'))} -> {_count(depth.get('after'))}",
                     f"- MLP channels: `intermediate_size` {_count(width.get('before'))} -> "
                     f"{_count(width.get('after'))} per layer"]
            if heads.get("before") != heads.get("after"):
                lines.append(f"- query heads: `num_attention_heads` {_count(heads.get('before'))} -> "
                             f"{_count(heads.get('after'))} per layer")
        elif structured.get("structure") == "layers":
            lines = [f"- layers: `{field}` {_count(units.get('before'))} -> {_count(units.get('after'))} (indices "
                     f"{structured.get('removed_layers')} of the dense model removed)"]
        else:
            lines = [f"- {UNIT_WORDS.get(structured.get('structure'), 'units')}: `{field}` "
                     f"{_count(units.get('before', stats.get('units_per_layer_before')))} -> "
                     f"{_count(units.get('after', stats.get('units_per_layer_after')))} per layer "
                     f"({_pct(structured.get('share'))} removed)"]
        if isinstance(before, int) and isinstance(after, int) and before:
            lines.append(f"- parameters: {before:,} -> {after:,} ({100 * (before - after) / before:.1f}% fewer)")
        return lines
    if unstructured is not None:
        accounting = meta.get("mask_accounting") or {}
        stats = stats or {}
        masked = stats.get("masked_params", accounting.get("masked_params"))
        considered = stats.get("total_params_considered")
        total = accounting.get("total_params_before")
        lines = []
        if considered:
            lines.append(f"- masked: {_count(masked)} of {_count(considered)} candidate weights "
                         f"({_pct(masked / considered if isinstance(masked, int) else None)}) in "
                         f"{', '.join(config.get('sparsify_layers') or [])}")
        else:
            lines.append(f"- masked: {_count(masked)} weights ({_pct(unstructured.get('unstructured_pct'))} of the "
                         "candidates requested)")
        if isinstance(total, int) and total:
            nonzero_before = total - int(accounting.get("zero_params_before", 0) or 0)
            nonzero_after = accounting.get("total_params_after")
            lines.append(f"- parameters: {total:,} stored; nonzero {nonzero_before:,} -> {_count(nonzero_after)} "
                         f"({_pct(accounting.get('masked_ratio'))} of the model masked)")
        lines.append("- the zeros are stored: the weight file keeps the dense model's shape and size")
        return lines
    return ["Nothing: no pruning record."]


def retrain_lines(retrain: Mapping, structured: bool) -> list[str]:
    settings = retrain.get("settings") or {}
    curve = retrain.get("loss_curve") or []
    text = (f"- {settings.get('steps', len(curve))} steps of AdamW (lr {settings.get('lr')}, batch "
            f"{settings.get('batch_size')}) on the InfoNCE loss over {_code(settings.get('data_path'))}")
    if settings.get("general_data_path"):
        text += f", {_pct(settings.get('general_ratio'))} of each batch from {_code(settings['general_data_path'])}"
    lines = [text]
    if curve:
        lines.append(f"- loss {curve[0]:.4f} -> {curve[-1]:.4f}")
    if structured:
        lines.append("- every weight trained (the removed units are gone; there is no mask to hold)")
    elif "held_zero_weights" in retrain:
        lines.append(f"- {_count(retrain.get('held_zero_weights_after'))} of {_count(retrain.get('held_zero_weights'))}"
                     " pruned weights still zero")
    if settings.get("model_path"):
        lines.append(f"- retrained from {_code(settings['model_path'])}")
    return lines


def _results(evaluation: Mapping) -> tuple[dict, dict]:
    """{name: metrics} and {name: change_percent} from any of the accepted evaluation shapes."""
    if "results" in evaluation:
        results = {name: (r or {}).get("metrics") or {} for name, r in (evaluation.get("results") or {}).items()}
        return results, dict(evaluation.get("change_percent") or {})
    if "metrics" in evaluation:
        return {"evaluation": dict(evaluation.get("metrics") or {})}, {}
    return {name: (r or {}).get("metrics", r) or {} for name, r in evaluation.items() if isinstance(r, Mapping)}, {}


def evaluation_lines(evaluation: Mapping | None) -> list[str]:
    results, changes = _results(evaluation) if evaluation else ({}, {})
    results = {name: metrics for name, metrics in results.items() if metrics}
    if not results:
        return ["Not evaluated when this card was written (`python gaprune/model/evaluate.py --model_path <folder> "
                "--baseline_model <base> --data_paths ...` measures it)."]
    metrics = [m for m in METRIC_NAMES if any(m in values for values in results.values())]
    lines = ["| data | " + " | ".join(METRIC_NAMES[m] for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for name, values in results.items():
        change = changes.get(name) or {}
        cells = []
        for m in metrics:
            value = values.get(m)
            cell = f"{value:.4f}" if isinstance(value, (int, float)) else ""
            if isinstance(change.get(m), (int, float)):
                cell += f" ({change[m]:+.2f}%)"
            cells.append(cell)
        lines.append(f"| {_code(os.path.basename(str(name)))} | " + " | ".join(cells) + " |")
    if changes:
        lines += ["", f"In brackets: the change against `{evaluation.get('baseline_model')}` on the same data."]
    return lines


def loading_lines(model_id: str, library_name: str) -> list[str]:
    lines = []
    if library_name == "sentence-transformers":
        lines += ["```python", "from sentence_transformers import SentenceTransformer", "",
                  f"model = SentenceTransformer({model_id!r})",
                  'embeddings = model.encode(["What is the capital of France?"], normalize_embeddings=True)',
                  "```", ""]
    lines += ["With transformers alone (pool as the folder's `1_Pooling/config.json` says: the last token for "
              "Qwen3-Embedding, the mean for BERT-style encoders):", "",
              "```python", "from transformers import AutoModel, AutoTokenizer", "",
              f"tokenizer = AutoTokenizer.from_pretrained({model_id!r})",
              f"model = AutoModel.from_pretrained({model_id!r})", "```"]
    return lines


__all__ = ["model_card", "write_model_card", "folder_model_card"]
