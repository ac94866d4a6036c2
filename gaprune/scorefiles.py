"""Score files: JSON results beside one safetensors file of per-weight arrays, all written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from datetime import datetime
from typing import Iterator, Mapping

import torch


SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
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
