"""Score files, written and read here alone.

fisher.py writes ``<d>_fisher_complete_scores_<ts>.json`` (metadata, mean score per parameter, shapes,
per-layer statistics) and ``<d>_fisher_summary_<ts>.json``; gradient.py writes
``<model>/alignment_scores_<model>_<ts>.json`` (metadata, losses, alignment and conflict rate per
parameter) and ``alignment_summary_<model>_<ts>.json``. Beside each results JSON sits one safetensors
file of float32 per-weight arrays, named in ``metadata.tensor_file``; gradient.py's local/row cosine
arrays sit in the same file under ``cosine::<param>``. The reader also takes the published code's
folders of float16 ``.npy`` files.
"""

from __future__ import annotations

import logging
import math
import os
from datetime import datetime
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open

from gaprune.errors import InputError, first_line
from gaprune.fileio import (atomic_files, domain_name, model_dirname, read_json, release_stem, unique_stem, write_json,
                            write_tensors)
from gaprune.layers import layer_key, strip_prefix
from gaprune.results import FILE_KINDS, AlignmentResult, FisherResult

log = logging.getLogger(__name__)

COSINE_PREFIX = "cosine::"  # gradient.py --alignment_mode local_cosine/row_cosine arrays, beside the published ones


def tensor_file_for(json_path: str) -> str:
    return os.path.splitext(json_path)[0] + ".safetensors"


def fisher_paths(output_dir: str, data_path: str, stamp: str) -> list[str]:
    """The results JSON, its arrays and the summary JSON of fisher.py."""
    stem = os.path.join(output_dir, f"{domain_name(data_path)}_fisher")
    results = f"{stem}_complete_scores_{stamp}.json"
    return [results, tensor_file_for(results), f"{stem}_summary_{stamp}.json"]


def alignment_paths(output_dir: str, model_name: str, stamp: str) -> list[str]:
    """The results JSON, its arrays and the summary JSON of gradient.py, in ``<output_dir>/<model>/``."""
    model = model_dirname(model_name)
    results = os.path.join(output_dir, model, f"alignment_scores_{model}_{stamp}.json")
    summary = os.path.join(output_dir, model, f"alignment_summary_{model}_{stamp}.json")
    return [results, tensor_file_for(results), summary]


def _write_result(paths: list[str], tensors: Mapping[str, torch.Tensor], tensor_dtype: torch.dtype,
                  tensor_metadata: dict, results: dict, summary: dict) -> None:
    """Arrays, summary, then the results JSON (the file users pass on) last; all or nothing at the final names."""
    json_path, tensor_path, summary_path = paths
    try:
        with atomic_files(tensor_path, summary_path, json_path) as (tensor_tmp, summary_tmp, json_tmp):
            write_tensors(tensor_tmp, tensors, tensor_dtype, tensor_metadata)
            write_json(summary_tmp, summary)
            write_json(json_tmp, results)
    finally:
        release_stem(paths)


def per_layer_statistics(mean_scores: Mapping[str, float]) -> dict[str, dict]:
    """Mean, std (at least 1e-12) and count of the parameters' mean scores, per layer."""
    groups: dict[str, list[float]] = {}
    for name, score in mean_scores.items():
        groups.setdefault(layer_key(name, fallback_parts=1), []).append(score)
    return {layer: {"mean": float(np.mean(s)), "std": max(float(np.std(s)), 1e-12), "count": len(s)}
            for layer, s in groups.items()}


def ranked_parameters(mean_scores: Mapping[str, float]) -> list[tuple[str, float]]:
    """Parameters by mean Fisher score, most important first."""
    return sorted(mean_scores.items(), key=lambda item: item[1], reverse=True)


def save_fisher(result: FisherResult, output_dir: str, data_path: str, model_name: str,
                score_dtype: str = "float32", now: datetime | None = None) -> str:
    """Write a fisher.py result: per-weight arrays, results JSON and summary JSON; return the results JSON."""
    now = now or datetime.now()
    paths = unique_stem(lambda stamp: fisher_paths(output_dir, data_path, stamp), now)
    json_path, tensor_path = paths[:2]
    method = f"{domain_name(data_path)}_fisher"
    layers = per_layer_statistics(result.mean_scores)
    metadata = {
        "method": method,
        "timestamp": now.isoformat(),
        "total_parameters": len(result.mean_scores),
        "total_weights": int(sum(np.prod(s) for s in result.shapes.values())),
        "model_name": model_name,
        "data_path": data_path,
        "num_samples": result.num_samples,
        "batch_size": result.batch_size,
        "sparsify_layers": list(result.layer_types),
        "compute_dtype": result.compute_dtype,
        "score_dtype": score_dtype,
        "first_batch_loss": result.first_loss,
        "mean_loss": result.mean_loss,
        "tensor_file": os.path.basename(tensor_path),
    }
    ranked = ranked_parameters(result.mean_scores)
    _write_result(paths, result.per_weight, getattr(torch, score_dtype), {"model_name": model_name, "method": method},
                  results={
                      "metadata": metadata,
                      "summary_statistics": {name: {"mean_score": m} for name, m in result.mean_scores.items()},
                      "complete_scores": {name: {"shape": shape, "in_tensor_file": name in result.per_weight}
                                          for name, shape in result.shapes.items()},
                      "per_layer_statistics": layers},
                  summary={"metadata": metadata, "per_layer_statistics": layers,
                           "most_important": dict(ranked[:10]), "least_important": dict(ranked[-5:])})
    return json_path


def alignment_statistics(scores: Mapping[str, float]) -> dict[str, float | int]:
    """Mean, max, min, std of the per-parameter alignments, and how many lie above 0.1 and below -0.1."""
    values = np.array(list(scores.values()), dtype=np.float64)
    return {"mean": float(values.mean()), "max": float(values.max()), "min": float(values.min()),
            "std": float(values.std()), "positive_aligned_count": int((values > 0.1).sum()),
            "negative_aligned_count": int((values < -0.1).sum())}


def save_alignment(result: AlignmentResult, output_dir: str, model_name: str, general_data_path: str,
                   domain_data_path: str, use_distributed: bool, now: datetime | None = None) -> str:
    """Write a gradient.py result: element-wise (and cosine) arrays, results JSON and summary JSON;
    return the results JSON."""
    now = now or datetime.now()
    paths = unique_stem(lambda stamp: alignment_paths(output_dir, model_name, stamp), now)
    json_path, tensor_path = paths[:2]
    metadata = {
        "timestamp": now.isoformat(),
        "model_name": model_name,
        "batch_size": result.batch_size,
        "max_samples": result.max_samples,
        "use_distributed": use_distributed,
        "processed_batches": result.processed_batches,
        "total_samples_processed": result.total_samples_processed,
        "general_data_size": result.general_data_size,
        "domain_data_size": result.domain_data_size,
        "domain_data_path": domain_data_path,
        "general_data_path": general_data_path,
        "seed": result.seed,
        "alignment_mode": result.alignment_mode,
        "sparsify_layers": list(result.layer_types),
        "compute_dtype": result.compute_dtype,
        "tensor_file": os.path.basename(tensor_path),
        "parameter_shapes": result.shapes,
    }
    arrays = result.elementwise
    if result.cosine:
        arrays = {**arrays, **{COSINE_PREFIX + name: a for name, a in result.cosine.items()}}
    summary = {
        "timestamp": metadata["timestamp"],
        "model_name": model_name,
        "total_parameters": len(result.alignment_scores),
        "processed_batches": result.processed_batches,
        "total_samples_processed": result.total_samples_processed,
        "alignment_statistics": alignment_statistics(result.alignment_scores),
        "losses": result.losses,
        "conflict_rates": result.conflict_rates,
    }
    _write_result(paths, arrays, torch.float32, {"model_name": model_name, "method": "alignment_elementwise"},
                  results={"metadata": metadata, "losses": result.losses, "alignment_scores": result.alignment_scores,
                           "conflict_rates": result.conflict_rates},
                  summary=summary)
    return json_path


def _is_shape(value) -> bool:
    return isinstance(value, list) and all(isinstance(n, int) and n >= 0 for n in value)


class ScoreArrays:
    """Per-weight arrays of a fisher.py or gradient.py result, read one tensor at a time.

    Reads this project's files (``metadata.tensor_file``, safetensors) and the published code's
    folders of float16 ``.npy`` files (``<json base>_tensors/``, ``alignment_elementwise_<...>_tensors/``).
    Names match with any leading ``model.`` removed. Everything read is checked where it is read: the
    JSON's structure, the arrays' shapes in the tensor file itself, and that every value is finite.
    """

    def __init__(self, json_path: str, kind: str):
        self.path, self.kind = json_path, kind
        if json_path.endswith(".safetensors"):
            raise InputError(f"{json_path} holds the arrays; give the results .json written beside it")
        data = read_json(json_path, f"{kind} score file")
        required = "complete_scores" if kind == "fisher" else "alignment_scores"
        if not isinstance(data, dict) or not isinstance(data.get(required), dict) \
                or not isinstance(data.get("metadata"), dict):
            raise InputError(f"{json_path} is not a {kind} score file (no 'metadata' / '{required}' objects)")
        metadata = data["metadata"]
        self.metadata = metadata
        self.model_name = metadata.get("model_name")
        if kind == "fisher":
            shapes = {n: v.get("shape") for n, v in data["complete_scores"].items() if isinstance(v, dict)}
        else:
            shapes = metadata.get("parameter_shapes") or {}
        if not isinstance(shapes, dict) or not all(s is None or _is_shape(s) for s in shapes.values()):
            raise InputError(f"{json_path}: parameter shapes must be lists of whole numbers")
        self.shapes = {strip_prefix(n): s for n, s in shapes.items() if s is not None}
        self.alignment_mode = metadata.get("alignment_mode", "product")
        self._tensor_path = None
        self._npy_folder = None
        self._cosine: dict[str, str] = {}
        tensor_file = metadata.get("tensor_file")
        if tensor_file:
            if not isinstance(tensor_file, str):
                raise InputError(f"{json_path}: metadata.tensor_file must be a file name")
            self._tensor_path = os.path.join(os.path.dirname(json_path), tensor_file)
            if not os.path.isfile(self._tensor_path):
                raise InputError(f"{json_path} names the tensor file {tensor_file}, which is missing")
            keys = self._read_tensor_file(lambda handle: list(handle.keys()))
            self._names = {strip_prefix(n): n for n in keys if not n.startswith(COSINE_PREFIX)}
            self._cosine = {strip_prefix(n.removeprefix(COSINE_PREFIX)): n for n in keys if n.startswith(COSINE_PREFIX)}
        else:
            self._npy_folder = self._published_folder(json_path, kind)
            self._names = {}
            for file in os.listdir(self._npy_folder):
                if file.endswith(".npy"):
                    self._names[strip_prefix(file[:-4])] = file
            if self.shapes:  # published files name parameters with '.' or '_' separators
                by_underscore = {n.replace(".", "_"): n for n in self.shapes}
                self._names = {by_underscore.get(n, n): f for n, f in self._names.items()}

    def _read_tensor_file(self, read: Callable):
        """``read(handle)`` on the safetensors file, opened per read (its memory map is released with each
        tensor instead of growing with the file); a damaged file is an InputError naming it."""
        try:
            with safe_open(self._tensor_path, framework="pt") as handle:
                return read(handle)
        except Exception as err:  # safetensors raises its own error types for a damaged file
            raise InputError(f"{self._tensor_path} is not a readable safetensors file: {first_line(err)}") from None

    def _read_npy(self, key: str, mmap: bool) -> np.ndarray:
        path = os.path.join(self._npy_folder, self._names[key])
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise InputError(f"{path} is not a readable .npy array: {first_line(err)}") from None

    @staticmethod
    def _published_folder(json_path: str, kind: str) -> str:
        base = os.path.splitext(json_path)[0]
        folder = base + "_tensors"
        if kind == "alignment":
            head, name = os.path.split(base)
            folder = os.path.join(head, name.replace("alignment_scores_", "alignment_elementwise_", 1) + "_tensors")
        if not os.path.isdir(folder):
            raise InputError(f"{json_path} has no per-weight arrays: no metadata.tensor_file and no folder {folder}")
        return folder

    def check(self, model_shapes: Mapping[str, Sequence[int]]) -> None:
        """Every candidate present with the model's shape, in the JSON and in the arrays themselves."""
        for name, shape in model_shapes.items():
            key = strip_prefix(name)
            if key not in self._names:
                raise InputError(f"{self.path} has no {self.kind} scores for {key} "
                                 f"(computed with other --sparsify_layers, or on another model?)")
            for recorded in (self.shapes.get(key), self._array_shape(key)):
                if recorded is not None and list(recorded) != list(shape):
                    raise InputError(f"{self.path}: {key} has shape {list(recorded)} but the model's is "
                                     f"{list(shape)}; the scores come from another model ({self.model_name})")
            if self._cosine:
                if key not in self._cosine:
                    raise InputError(f"{self.path} has no {self.alignment_mode} array for {key}")
                cosine_shape = self._read_tensor_file(lambda handle: handle.get_slice(self._cosine[key]).get_shape())
                if list(cosine_shape) not in (list(shape), list(shape[:1])):
                    raise InputError(f"{self.path}: the {self.alignment_mode} array of {key} has shape "
                                     f"{list(cosine_shape)}, which fits neither {list(shape)} nor {list(shape[:1])}")

    def _array_shape(self, key: str) -> list[int]:
        if self._tensor_path is not None:
            return self._read_tensor_file(lambda handle: handle.get_slice(self._names[key]).get_shape())
        return list(self._read_npy(key, mmap=True).shape)

    def require_cosine(self) -> None:
        if not self._cosine:
            raise InputError(f"{self.path} has only the published element-wise alignment; this scorer needs "
                             f"a cosine in [-1, 1]: rerun gradient.py with --alignment_mode local_cosine "
                             f"(or row_cosine), or set --alignment_weight 0")

    def get(self, name: str, cosine: bool = False) -> torch.Tensor:
        """The float32 array of one parameter; with ``cosine``, its local_cosine / row_cosine array instead.
        Checked as it is read (check_values): a NaN would silently leave weights out of the mask, and a
        negative Fisher value or a cosine outside [-1, 1] comes from no computation of ours."""
        key = strip_prefix(name)
        if cosine:
            self.require_cosine()
            stored = self._cosine[key]
            array = self._read_tensor_file(lambda handle: handle.get_tensor(stored))
            where = f"{self._tensor_path}: the {self.alignment_mode} array {stored}"
        elif self._tensor_path is not None:
            stored = self._names[key]
            array = self._read_tensor_file(lambda handle: handle.get_tensor(stored))
            where = f"{self._tensor_path}: the {self.kind} array {stored}"
        else:
            loaded = self._read_npy(key, mmap=False)
            where = f"{os.path.join(self._npy_folder, self._names[key])}: the {self.kind} array of {key}"
            if not np.issubdtype(loaded.dtype, np.floating):
                raise InputError(f"{where} holds {loaded.dtype} values; {self.kind} scores are floating-point")
            array = torch.from_numpy(np.asarray(loaded, dtype=np.float32))
        if not array.is_floating_point():
            raise InputError(f"{where} holds {str(array.dtype).removeprefix('torch.')} values; "
                             f"{self.kind} scores are floating-point")
        array = array.float()
        check_values(array, where, fisher=self.kind == "fisher" and not cosine, cosine=cosine)
        return array


COSINE_TOLERANCE = 1e-3  # a cosine stored in float32 or bfloat16 may round a little past +-1


def check_values(array: torch.Tensor, where: str, fisher: bool = False, cosine: bool = False) -> None:
    """Every value finite; with ``fisher`` none below 0 (means of squared gradients); with ``cosine`` all in
    [-1, 1] up to COSINE_TOLERANCE. One min/max pass (a NaN carries through both) unless something is wrong;
    an InputError starting with ``where`` (the file and the array) otherwise."""
    if not array.numel():
        return
    low, high = (float(v) for v in torch.aminmax(array))
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int((~torch.isfinite(array)).sum())
        raise InputError(f"{where} holds {bad} non-finite value(s) (NaN or inf)")
    if fisher and low < 0:
        raise InputError(f"{where} holds {int((array < 0).sum())} negative value(s) (down to {low:.3g}); "
                         f"Fisher scores are means of squared gradients, never below 0")
    if cosine and (low < -1 - COSINE_TOLERANCE or high > 1 + COSINE_TOLERANCE):
        outside = int(((array < -1 - COSINE_TOLERANCE) | (array > 1 + COSINE_TOLERANCE)).sum())
        raise InputError(f"{where} holds {outside} value(s) outside [-1, 1] (from {low:.3g} to {high:.3g}); "
                         f"a cosine lies in [-1, 1]")


def _warn_on_mixed_up_files(arrays: Mapping[str, ScoreArrays | None], model_name: str | None) -> None:
    """Warn where what the files say about themselves contradicts the run."""
    given = {side: scores for side, scores in arrays.items() if scores is not None}
    for side, scores in given.items():
        if model_name and scores.model_name and model_dirname(str(scores.model_name)) != model_dirname(model_name):
            log.warning("%s was computed on %s, but the model being pruned is %s", scores.path, scores.model_name,
                        model_name)
    domain, general = given.get("domain_fisher"), given.get("general_fisher")
    if domain and general:
        if os.path.realpath(domain.path) == os.path.realpath(general.path):
            log.warning("the same file is given as domain and general Fisher scores: %s", domain.path)
        elif domain.metadata.get("data_path") and isinstance(general.metadata.get("data_path"), str) and \
                os.path.realpath(str(domain.metadata["data_path"])) == os.path.realpath(general.metadata["data_path"]):
            log.warning("the domain and general Fisher files were computed on the same data: %s",
                        domain.metadata["data_path"])


def open_score_files(paths: Mapping[str, str | None], candidate_shapes: Mapping[str, Sequence[int]],
                     device: torch.device, need_cosine: bool = False,
                     model_name: str | None = None) -> Callable[[str, str], torch.Tensor | None]:
    """Open and check the given score files (side -> JSON path or None) against the candidates, and that a
    given alignment file holds cosine arrays when ``need_cosine``; return ``array(side, name)``: that
    side's array on ``device`` (side "alignment_cosine": the cosine array), or None where no file was given."""
    arrays = {side: ScoreArrays(path, FILE_KINDS[side]) if path else None for side, path in paths.items()}
    for side, scores in arrays.items():
        if scores is None:
            log.info("no %s file: %s", side.replace("_", " "),
                     "alignment is 0 everywhere" if side == "alignment" else "that side is 1.0 everywhere")
        else:
            scores.check(candidate_shapes)
    if need_cosine and arrays.get("alignment") is not None:
        arrays["alignment"].require_cosine()
    _warn_on_mixed_up_files(arrays, model_name)

    def array(side: str, name: str) -> torch.Tensor | None:
        """side: domain_fisher, general_fisher, alignment (the published product) or alignment_cosine."""
        cosine = side == "alignment_cosine"
        scores = arrays.get("alignment" if cosine else side)
        return None if scores is None else scores.get(name, cosine).to(device)

    return array
