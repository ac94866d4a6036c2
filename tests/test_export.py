"""Export that stacks: the ONNX graph embeds as the PyTorch model does, int8 runs, evaluate.py scores the file,
and without the extra the request is one line before any work."""

import importlib.util
import json
import os

import pytest
import torch

from conftest import fail, listing
from gaprune.data import load_triples
from gaprune.evaluation import evaluate_triples
from gaprune.model import evaluate, export
from gaprune.modeling import load_embedder

TEXTS = ["What is the boiling point of ethanol?", "A buffer resists changes of pH.", "Tennis is played in sets."]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, bert_dir):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install -e .[onnx])")
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed (pip install -e .[onnx])")
    return export.main(["--model_path", bert_dir, "--output_dir", str(tmp_path_factory.mktemp("onnx")), "--int8"])


def test_the_onnx_graph_embeds_as_the_pytorch_model_does(exported, bert_dir):
    from gaprune.export import FLOAT_FILE, OnnxEmbedder

    assert os.path.basename(exported) == "model_int8.onnx"
    model = load_embedder(bert_dir, "cpu")
    reference = model.encode(TEXTS, progress=False)
    float32 = OnnxEmbedder(os.path.join(os.path.dirname(exported), FLOAT_FILE))
    torch.testing.assert_close(float32.encode(TEXTS, batch_size=2), reference, atol=1e-4, rtol=0)
    int8 = OnnxEmbedder(exported).encode(TEXTS)
    assert int8.shape == reference.shape and float((int8 * reference).sum(-1).min()) > 0.9
    record = json.load(open(os.path.join(os.path.dirname(exported), "onnx_export.json")))
    assert record["files"] == {"float32": "model.onnx", "int8": "model_int8.onnx"} and record["pooling"] == "mean"


def test_evaluate_scores_the_exported_file(exported, tmp_path, bert_dir, data_files):
    from gaprune.export import FLOAT_FILE

    path = evaluate.main(["--model_path", os.path.join(os.path.dirname(exported), FLOAT_FILE), "--data_paths",
                          data_files["chem"], "--output_file", str(tmp_path / "eval.json")])
    metrics = json.load(open(path))["results"][data_files["chem"]]["metrics"]
    expected = evaluate_triples(load_embedder(bert_dir, "cpu"), load_triples(data_files["chem"]))["metrics"]
    assert metrics == pytest.approx(expected, abs=1e-6)


def test_export_without_the_extra_is_one_line_before_the_model_loads(monkeypatch, capsys, tmp_path, bert_dir):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    line = fail(capsys, export.main, ["--model_path", bert_dir, "--output_dir", str(tmp_path / "out")])
    assert line == "error: export needs onnxruntime: pip install -e .[onnx]" and listing(tmp_path) == []
