"""Generic file handling: JSON in and out, atomic files and folders, timestamps and folder names."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
from datetime import datetime
from typing import Any, Iterator, Mapping

import torch

from gaprune.errors import InputError


def read_json(path: str, what: str = "file") -> Any:
    """Parse a JSON file; a missing, malformed or non-UTF-8 file is an InputError naming ``what`` and the path."""
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None


def _temporary_name(path: str) -> str:
    folder = os.path.dirname(path) or "."
    return os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary name beside ``path``; rename it to ``path`` on success, remove it on failure."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, on failure it is removed."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _temporary_name(path)
    try:
        os.makedirs(tmp, exist_ok=True)
        yield tmp
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def write_json(path: str, obj: Any) -> None:
    """Indented UTF-8 JSON (non-ASCII kept as is), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


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


def timestamp(now: datetime | None = None) -> str:
    """%Y%m%d_%H%M%S, the suffix of every file name the stages write."""
    return (now or datetime.now()).strftime("%Y%m%d_%H%M%S")


def domain_name(data_path: str) -> str:
    """data/sample/chem-example-output.json -> chem-example-output (cut at the first '_', then the first '.')."""
    return os.path.basename(data_path).split("_")[0].split(".")[0]


def model_dirname(model_name: str) -> str:
    """The last path part of a model name or folder, with characters outside [A-Za-z0-9_-] replaced by '_'."""
    last = os.path.basename(os.path.normpath(model_name))
    return re.sub(r"[^A-Za-z0-9_-]", "_", last)
