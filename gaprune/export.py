"""Export that stacks with pruning: a model folder as ONNX (float32), optionally int8 by onnxruntime's dynamic
quantization, and an embedder that runs the exported file so that evaluate.py measures it.

The graph holds the whole embedding: the transformer, the pooling, any sentence-transformers Dense modules and
the L2 normalisation; input_ids and attention_mask in, ``sentence_embedding`` out. It needs the optional extra
(``pip install -e .[onnx]``: onnx, onnxruntime and onnxscript, torch.onnx's exporter).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from typing import Sequence

import torch
import torch.nn.functional as F

from gaprune.errors import InputError
from gaprune.modeling import Embedder, load_tokenizer

EXTRA = ("onnx", "onnxruntime", "onnxscript")
FLOAT_FILE, INT8_FILE, RECORD_FILE = "model.onnx", "model_int8.onnx", "onnx_export.json"


def check_extra() -> None:
    """One line naming what is missing when the onnx extra is not installed."""
    missing = [name for name in EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(f"export needs {', '.join(missing)}: pip install -e .[onnx]")


class _Embedding(torch.nn.Module):
    """The embedder as one module: token ids and mask in, the L2-normalised sentence embedding out."""

    def __init__(self, embedder: Embedder):
        super().__init__()
        self.embedder, self.model = embedder, embedder.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = {"input_ids": input_ids, "attention_mask": attention_mask}
        return F.normalize(self.embedder.embed_tokens(tokens).float(), dim=-1)


@torch.no_grad()
def export_onnx(embedder: Embedder, folder: str, int8: bool = False) -> dict[str, str]:
    """Write ``folder``/model.onnx (float32, on the CPU), with ``int8`` also model_int8.onnx (weights of the
    matrix products in int8, activations quantized on the fly), the tokenizer, and onnx_export.json (the pooling,
    the max length, the files). Returns the files by kind."""
    check_extra()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    module = _Embedding(embedder).to("cpu", torch.float32).eval()
    sample = embedder.tokenize(["an example text for the exporter", "a second, longer example text to export"])
    args = (sample["input_ids"].cpu(), sample["attention_mask"].cpu())
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    os.makedirs(folder, exist_ok=True)
    files = {"float32": os.path.join(folder, FLOAT_FILE)}
    with contextlib.redirect_stdout(sys.stderr):  # the exporter's progress lines: stdout is for results
        torch.onnx.export(module, args, files["float32"], input_names=["input_ids", "attention_mask"],
                          output_names=["sentence_embedding"], dynamo=True, external_data=False,
                          dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}})
    if int8:
        files["int8"] = os.path.join(folder, INT8_FILE)
        quantize_dynamic(files["float32"], files["int8"], weight_type=QuantType.QInt8)
    embedder.tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, RECORD_FILE), "w", encoding="utf-8") as handle:
        json.dump({"source": embedder.name, "pooling": embedder.pooling, "max_length": embedder.max_length,
                   "padding_side": embedder.tokenizer.padding_side, "dimension": embedder.dimension,
                   "files": {kind: os.path.basename(path) for kind, path in files.items()}}, handle, indent=2)
    return files


class OnnxEmbedder:
    """An exported .onnx file run by onnxruntime, with the tokenizer saved beside it: ``encode`` as Embedder's,
    so evaluate.py scores the exported (and int8) model as it scores a folder."""

    def __init__(self, path: str, max_length: int | None = None):
        check_extra()
        import onnxruntime

        folder = os.path.dirname(os.path.abspath(path))
        record_path = os.path.join(folder, RECORD_FILE)
        if not os.path.isfile(record_path):
            raise InputError(f"{path} has no {RECORD_FILE} beside it: export it with gaprune/model/export.py")
        with open(record_path, encoding="utf-8") as handle:
            record = json.load(handle)
        self.name, self.pooling, self.dimension = path, record["pooling"], record["dimension"]
        self.max_length = max_length or record["max_length"]
        self.tokenizer = load_tokenizer(folder, record["padding_side"])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def encode(self, texts: Sequence[str], batch_size: int = 32, desc: str = "embedding",
               progress: bool = True) -> torch.Tensor:
        rows = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="np")
            feed = {"input_ids": batch["input_ids"].astype("int64"),
                    "attention_mask": batch["attention_mask"].astype("int64")}
            rows.append(torch.from_numpy(self.session.run(None, feed)[0]))
        return torch.cat(rows) if rows else torch.zeros(0, self.dimension)
