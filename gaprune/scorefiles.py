"""Score files: JSON results beside one safetensors file of per-weight arrays, all written atomically."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import struct
from datetime import datetime
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open

from gaprune.data import read_json
from gaprune.errors import InputError
from gaprune.layers import strip_prefix


log = logging.getLogger(__name__)

SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COSINE_PREFIX = "cosine::"  # gradient.py --alignment_mode local_cosine/row_cosine arrays, beside the published ones
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def timestamp(now: datetime | None = None) -> str:
    return (now or datetime.now()).strftime("%Y%m%d_%H%M%S")


def domain_name(data_path: str) -> str:
    """data/sample/chem-example-output.json -> chem-example-output (cut at the first '_', then the first '.')."""
    return os.path.basename(data_path).split("_")[0].split(".")[0]


def model_dirname(model_name: str) -> str:
    """The last path part of a model name or folder, with characters outside [A-Za-z0-9_-] replaced by '_'."""
    last = os.path.basename(os.path.normpath(model_name))
    return re.sub(r"[^A-Za-z0-9_-]", "_", last)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary name beside ``path``; rename it to ``path`` on success, remove it on failure."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, on failure it is removed."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        os.makedirs(tmp, exist_ok=True)
        yield tmp
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def write_json(path: str, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def write_tensors(path: str, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file one tensor at a time, so only one tensor is ever copied to host memory."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        for tensor in tensors.values():
            host = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
            handle.write(host.view(torch.uint8).numpy().tobytes() if host.numel() else b"")


def tensor_file_for(json_path: str) -> str:
    return os.path.splitext(json_path)[0] + ".safetensors"


class ScoreArrays:
    """Per-weight arrays of a fisher.py or gradient.py result, read one tensor at a time.

    Reads this project's files (``metadata.tensor_file``, safetensors) and the published code's
    folders of float16 ``.npy`` files (``<json base>_tensors/``, ``alignment_elementwise_<...>_tensors/``).
    Names match with any leading ``model.`` removed.
    """

    def __init__(self, json_path: str, kind: str):
        self.path, self.kind = json_path, kind
        data = read_json(json_path, f"{kind} score file")
        required = "complete_scores" if kind == "fisher" else "alignment_scores"
        if not isinstance(data, dict) or required not in data or "metadata" not in data:
            raise InputError(f"{json_path} is not a {kind} score file (no 'metadata' / '{required}')")
        metadata = data["metadata"]
        self.model_name = metadata.get("model_name")
        if kind == "fisher":
            shapes = {n: v.get("shape") for n, v in data["complete_scores"].items() if isinstance(v, dict)}
        else:
            shapes = metadata.get("parameter_shapes") or {}
        self.shapes = {strip_prefix(n): s for n, s in shapes.items() if s is not None}
        folder = os.path.dirname(json_path)
        self.alignment_mode = metadata.get("alignment_mode", "product")
        self._tensor_path = None
        self._npy_folder = None
        self._cosine: dict[str, str] = {}
        if metadata.get("tensor_file"):
            tensor_path = os.path.join(folder, metadata["tensor_file"])
            if not os.path.isfile(tensor_path):
                raise InputError(f"{json_path} names the tensor file {metadata['tensor_file']}, which is missing")
            self._tensor_path = tensor_path
            with safe_open(tensor_path, framework="pt") as handle:
                keys = list(handle.keys())
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
        """Every candidate present with the model's shape, else a clear error naming the parameter and file."""
        for name, shape in model_shapes.items():
            key = strip_prefix(name)
            if key not in self._names:
                raise InputError(f"{self.path} has no {self.kind} scores for {key} "
                                 f"(computed with other --sparsify_layers, or on another model?)")
            recorded = self.shapes.get(key)
            if recorded is None:
                recorded = self._array_shape(key)
            if list(recorded) != list(shape):
                raise InputError(f"{self.path}: {key} has shape {list(recorded)} but the model's is {list(shape)}; "
                                 f"the scores come from another model ({self.model_name})")
            if self._cosine:
                if key not in self._cosine:
                    raise InputError(f"{self.path} has no {self.alignment_mode} array for {key}")
                with safe_open(self._tensor_path, framework="pt") as handle:
                    cosine_shape = handle.get_slice(self._cosine[key]).get_shape()
                if list(cosine_shape) not in (list(shape), list(shape[:1])):
                    raise InputError(f"{self.path}: the {self.alignment_mode} array of {key} has shape "
                                     f"{list(cosine_shape)}, which fits neither {list(shape)} nor {list(shape[:1])}")

    def _array_shape(self, key: str) -> list[int]:
        if self._tensor_path is not None:
            with safe_open(self._tensor_path, framework="pt") as handle:
                return handle.get_slice(self._names[key]).get_shape()
        return list(np.load(os.path.join(self._npy_folder, self._names[key]), mmap_mode="r").shape)

    def get(self, name: str, cosine: bool = False) -> torch.Tensor:
        """The array of one parameter; with ``cosine``, its local_cosine / row_cosine array instead."""
        if cosine:
            if not self._cosine:
                raise InputError(f"{self.path} has only the published element-wise alignment; this scorer needs "
                                 f"a cosine in [-1, 1]: rerun gradient.py with --alignment_mode local_cosine "
                                 f"(or row_cosine), or set --alignment_weight 0")
            with safe_open(self._tensor_path, framework="pt") as handle:
                return handle.get_tensor(self._cosine[strip_prefix(name)]).float()
        key = self._names[strip_prefix(name)]
        if self._tensor_path is not None:
            # opened per read: the memory map is released with each tensor instead of growing with the file
            with safe_open(self._tensor_path, framework="pt") as handle:
                return handle.get_tensor(key).float()
        return torch.from_numpy(np.load(os.path.join(self._npy_folder, key)).astype(np.float32))


SCORE_SIDES = {"domain_fisher": "fisher", "general_fisher": "fisher", "alignment": "alignment"}


def open_score_files(paths: Mapping[str, str | None], candidate_shapes: Mapping[str, Sequence[int]],
                     device: torch.device) -> Callable[[str, str], torch.Tensor | None]:
    """Open and check the given score files (side -> JSON path or None) against the candidates;
    return ``array(side, name)``: that side's array on ``device``, or None where no file was given."""
    arrays = {side: ScoreArrays(path, SCORE_SIDES[side]) if path else None for side, path in paths.items()}
    for side, scores in arrays.items():
        if scores is None:
            log.info("no %s file: %s", side.replace("_", " "),
                     "alignment is 0 everywhere" if side == "alignment" else "that side is 1.0 everywhere")
        else:
            scores.check(candidate_shapes)

    def array(side: str, name: str) -> torch.Tensor | None:
        """side: domain_fisher, general_fisher, alignment (the published product) or alignment_cosine."""
        cosine = side == "alignment_cosine"
        scores = arrays.get("alignment" if cosine else side)
        return None if scores is None else scores.get(name, cosine).to(device)

    return array
