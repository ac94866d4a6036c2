import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

import reference
from conftest import last_line
from gaprune.features import fisher
from gaprune.fisher_information import fisher_information
from gaprune.modeling import load_embedder


def run_fisher(capsys, model_dir, data_path, out_dir, *extra):
    path = fisher.main(["--model_name", model_dir, "--data_path", data_path, "--output_dir", str(out_dir), *extra])
    stdout = capsys.readouterr().out
    assert last_line(stdout) == path
    return path, stdout


def read_arrays(json_path):
    meta = json.load(open(json_path))["metadata"]
    tensor_path = os.path.join(os.path.dirname(json_path), meta["tensor_file"])
    with safe_open(tensor_path, framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def reference_fisher(model_dir, triples, batch_size, padding=True, dtype=torch.float32):
    model, tokenizer, encoder = reference.load(model_dir, dtype)
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for start in range(0, len(triples), batch_size):
        loss = reference.batch_loss(model, tokenizer, encoder, triples[start:start + batch_size], padding)
        for name, grad in reference.grads(model, loss).items():
            total[name] += grad ** 2
    return {name: value / len(triples) + 1e-8 for name, value in total.items()}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_fisher_arrays_equal_summed_squared_gradients(capsys, tmp_path, model_dir, data_files, chem_triples,
                                                      batch_size):
    json_path, _ = run_fisher(capsys, model_dir, data_files["chem"], tmp_path, "--batch_size", str(batch_size),
                              "--max_samples", "7", "--sparsify_layers", "mlp", "attention", "--dtype", "float32")
    arrays = read_arrays(json_path)
    expected = reference_fisher(model_dir, chem_triples[:7], batch_size)
    assert arrays, "no per-weight arrays written"
    for name, array in arrays.items():
        assert array.dtype == torch.float32
        # float32 gradients carry ~1e-7 of their scale as rounding noise, so near-zero entries get an
        # absolute allowance tied to the array's scale; the float64 test below checks every entry.
        torch.testing.assert_close(array, expected[name], rtol=1e-5, atol=1e-5 * float(expected[name].max()))
    result = json.load(open(json_path))
    for name, stats in result["summary_statistics"].items():
        assert stats["mean_score"] == pytest.approx(float(expected[name].double().mean()), rel=1e-5)


def test_fisher_is_exact_per_entry_in_float64(model_dir, chem_triples):
    embedder = load_embedder(model_dir, "cpu", "float32")
    embedder.model.double()
    result = fisher_information(embedder, chem_triples[:5], 2, ["linear"])
    expected = reference_fisher(model_dir, chem_triples[:5], 2, dtype=torch.float64)
    for name, array in result.per_weight.items():
        torch.testing.assert_close(array.double(), expected[name], rtol=1e-9, atol=0)
        assert result.mean_scores[name] == pytest.approx(float(expected[name].mean()), rel=1e-6)
    for name, value in result.mean_scores.items():  # scalar-only parameters (norms, embeddings) too
        assert value == pytest.approx(float(expected[name].mean()), rel=1e-5)


def test_fisher_json_layout_and_statistics(capsys, tmp_path, qwen3_dir, data_files):
    json_path, stdout = run_fisher(capsys, qwen3_dir, data_files["chem"], tmp_path, "--batch_size", "2",
                                   "--max_samples", "4")
    name = os.path.basename(json_path)
    assert name.startswith("chem-example_fisher_complete_scores_") and name.endswith(".json")
    ts = name[len("chem-example_fisher_complete_scores_"):-len(".json")]
    assert len(ts) == 15 and ts[8] == "_"
    assert sorted(os.listdir(tmp_path)) == sorted([name, name.replace(".json", ".safetensors"),
                                                   f"chem-example_fisher_summary_{ts}.json"])
    result = json.load(open(json_path))
    assert set(result) == {"metadata", "summary_statistics", "complete_scores", "per_layer_statistics"}
    meta = result["metadata"]
    assert meta["method"] == "chem-example_fisher"
    assert meta["model_name"] == qwen3_dir
    assert meta["tensor_file"] == name.replace(".json", ".safetensors")
    assert meta["total_parameters"] == len(result["summary_statistics"]) == len(result["complete_scores"])
    assert "First batch loss:" in stdout and "Top 10 most important" in stdout and "least important" in stdout

    arrays = read_arrays(json_path)
    selected = {n for n in result["complete_scores"] if any(p in n for p in ("_proj",))}
    assert set(arrays) == selected  # attention + mlp, 2-D only
    for name, array in arrays.items():
        assert list(array.shape) == result["complete_scores"][name]["shape"]
        assert result["summary_statistics"][name]["mean_score"] == pytest.approx(float(array.double().mean()), rel=1e-6)

    means = {n: s["mean_score"] for n, s in result["summary_statistics"].items()}
    layer0 = [m for n, m in means.items() if n.startswith("layers.0.")]
    stats = result["per_layer_statistics"]["layers.0"]
    assert stats["count"] == len(layer0)
    assert stats["mean"] == pytest.approx(np.mean(layer0), rel=1e-9)
    assert stats["std"] == pytest.approx(max(np.std(layer0), 1e-12), rel=1e-9)
    assert set(result["per_layer_statistics"]) == {"embed_tokens", "layers.0", "layers.1", "norm"}
    assert result["per_layer_statistics"]["norm"]["std"] == 1e-12  # one parameter: std floored

    summary = json.load(open(tmp_path / f"chem-example_fisher_summary_{ts}.json"))
    assert len(summary["most_important"]) == 10 and len(summary["least_important"]) == 5


def test_bert_layer_keys_and_mlp_patterns(capsys, tmp_path, bert_dir, data_files):
    json_path, _ = run_fisher(capsys, bert_dir, data_files["chem"], tmp_path, "--max_samples", "2",
                              "--sparsify_layers", "mlp")
    result = json.load(open(json_path))
    assert sorted(read_arrays(json_path)) == [f"encoder.layer.{i}.{m}.dense.weight"
                                              for i in (0, 1) for m in ("intermediate", "output")]
    assert {"encoder.layer.0", "encoder.layer.1", "embeddings"} <= set(result["per_layer_statistics"])


def test_score_dtype_bfloat16_halves_the_file(capsys, tmp_path, qwen3_dir, data_files):
    json_path, _ = run_fisher(capsys, qwen3_dir, data_files["chem"], tmp_path, "--max_samples", "2",
                              "--score_dtype", "bfloat16")
    assert all(a.dtype == torch.bfloat16 for a in read_arrays(json_path).values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dynamic_padding_gives_the_same_fisher_as_padding_to_512(model_dir, chem_triples, dtype):
    embedder = load_embedder(model_dir, "cpu", "float32")
    embedder.model.to(dtype)
    dynamic = fisher_information(embedder, chem_triples[:4], 2, ["mlp", "attention"])
    embedder.padding = "max_length"
    padded = fisher_information(embedder, chem_triples[:4], 2, ["mlp", "attention"])
    # Right-padded encoders keep their positions, so in float64 padding changes only rounding. Left-padded
    # decoders shift their positions; RoPE is relative, but transformers computes its angles in float32.
    exact = dtype == torch.float64 and embedder.pooling != "lasttoken"
    for name, array in dynamic.per_weight.items():
        if exact:
            torch.testing.assert_close(array, padded.per_weight[name], rtol=1e-9, atol=0)
        else:
            torch.testing.assert_close(array, padded.per_weight[name], rtol=1e-4, atol=1e-5 * float(array.max()))


def test_embedding_fisher_from_sparse_gradients_equals_the_dense_one(model_dir, chem_triples):
    """While scoring, embeddings give sparse gradients (the batch's token rows); selected, the embedding's
    per-weight Fisher is still the summed dense squared gradients, and the layers' flags come back."""
    embedder = load_embedder(model_dir, "cpu", "float32")
    embedder.model.double()
    result = fisher_information(embedder, chem_triples[:5], 2, ["embed"])
    expected = reference_fisher(model_dir, chem_triples[:5], 2, dtype=torch.float64)
    [name] = result.per_weight
    assert "embed" in name or "word_embeddings" in name
    torch.testing.assert_close(result.per_weight[name].double(), expected[name], rtol=1e-9, atol=0)
    rows_seen = (expected[name] > 1e-8).any(dim=1)
    assert 0 < rows_seen.sum() < len(rows_seen)  # some vocabulary rows untouched, some not
    embeddings = [m for m in embedder.model.modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings and not any(m.sparse for m in embeddings)
