import json
import os

import pytest
import torch
from safetensors import safe_open

import reference
from conftest import last_line
from gaprune.features import gradient
from gaprune.fisher_information import fisher_information
from gaprune.gradient_alignment import gradient_alignment
from gaprune.gradient_sums import gradient_dot, gradient_norms
from gaprune.modeling import load_embedder


def run_gradient(capsys, model_dir, files, out_dir, *extra):
    path = gradient.main(["--model_name", model_dir, "--general_data_path", files["general"],
                          "--domain_data_path", files["chem"], "--output_dir", str(out_dir), *extra])
    stdout = capsys.readouterr().out
    assert last_line(stdout) == path
    return path, stdout


def reference_alignment(model_dir, general, domain, batch_size, max_samples, seed=42, dtype=torch.float32):
    """Seeded shuffled half-batches (torch.randperm: general first, then domain), written out plainly."""
    model, tokenizer, encoder = reference.load(model_dir, dtype)
    g_half, d_half = batch_size // 2, batch_size - batch_size // 2
    generator = torch.Generator().manual_seed(seed)
    g_order = torch.randperm(len(general), generator=generator).tolist()
    d_order = torch.randperm(len(domain), generator=generator).tolist()
    steps = min(len(general) // g_half, len(domain) // d_half, max_samples // batch_size)
    names = [n for n, _ in model.named_parameters()]
    sum_g = {n: 0 for n in names}
    sum_d = {n: 0 for n in names}
    seen = {n: 0 for n in names}
    conflicts = {n: 0 for n in names}
    for s in range(steps):
        g_batch = [general[i] for i in g_order[s * g_half:(s + 1) * g_half]]
        d_batch = [domain[i] for i in d_order[s * d_half:(s + 1) * d_half]]
        gg = reference.grads(model, reference.batch_loss(model, tokenizer, encoder, g_batch))
        dd = reference.grads(model, reference.batch_loss(model, tokenizer, encoder, d_batch))
        for n in names:
            sum_g[n] = sum_g[n] + gg[n]
            sum_d[n] = sum_d[n] + dd[n]
            if gg[n].norm() > 0 and dd[n].norm() > 0:
                seen[n] += 1
                conflicts[n] += float(torch.dot(gg[n].flatten(), dd[n].flatten())) < 0
    avg_g = {n: sum_g[n] / steps for n in names}
    avg_d = {n: sum_d[n] / steps for n in names}
    return steps, avg_g, avg_d, {n: conflicts[n] / seen[n] if seen[n] else 0.0 for n in names}


@pytest.mark.parametrize("batch_size", [2, 4])
def test_alignment_conflict_rates_and_elementwise_arrays_exact_in_float64(model_dir, chem_triples, web_triples,
                                                                          batch_size):
    # float64, so that near-orthogonal per-step gradients get the same cosine sign in both implementations
    embedder = load_embedder(model_dir, "cpu", "float32")
    embedder.model.double()
    result = gradient_alignment(embedder, web_triples, chem_triples, batch_size, 8, ["mlp"])
    steps, avg_g, avg_d, rates = reference_alignment(model_dir, web_triples, chem_triples, batch_size, 8,
                                                     dtype=torch.float64)
    assert result.processed_batches == steps == 8 // batch_size
    assert result.total_samples_processed == steps * batch_size
    for name, value in result.alignment_scores.items():
        if name.endswith("attention.self.key.bias"):
            # softmax ignores a shift shared by all keys, so this gradient is zero up to rounding noise
            continue
        assert value == pytest.approx(reference.cosine(avg_g[name], avg_d[name]), abs=1e-9)
        assert result.conflict_rates[name] == pytest.approx(rates[name])
    assert len(result.elementwise) == (4 if "bert" in model_dir else 6)
    for name in sorted(result.elementwise)[:2]:
        unit = (avg_g[name] / avg_g[name].norm()) * (avg_d[name] / avg_d[name].norm())
        torch.testing.assert_close(result.elementwise[name], reference.mean_filter_3x3(unit), rtol=1e-9, atol=1e-15)


def test_embedding_alignment_and_one_pass_fisher_from_sparse_gradients(model_dir, chem_triples, web_triples):
    """The embedding's sparse per-step gradients give the dense reference's alignment, conflict rate and
    smoothed element-wise array, and a one-pass Fisher equal to fisher_information on the drawn triples."""
    embedder = load_embedder(model_dir, "cpu", "float32")
    embedder.model.double()
    result = gradient_alignment(embedder, web_triples, chem_triples, 2, 8, ["embed"], with_fisher=True)
    steps, avg_g, avg_d, rates = reference_alignment(model_dir, web_triples, chem_triples, 2, 8,
                                                     dtype=torch.float64)
    [name] = result.elementwise
    assert result.alignment_scores[name] == pytest.approx(reference.cosine(avg_g[name], avg_d[name]), abs=1e-9)
    assert result.conflict_rates[name] == pytest.approx(rates[name])
    unit = (avg_g[name] / avg_g[name].norm()) * (avg_d[name] / avg_d[name].norm())
    torch.testing.assert_close(result.elementwise[name], reference.mean_filter_3x3(unit), rtol=1e-9, atol=1e-15)
    drawn = torch.randperm(len(web_triples), generator=torch.Generator().manual_seed(42))[:steps].tolist()
    separate = fisher_information(embedder, [web_triples[i] for i in drawn], 1, ["embed"])
    torch.testing.assert_close(result.fisher["general"].per_weight[name], separate.per_weight[name],
                               rtol=1e-9, atol=0)


def test_sparse_gradients_meet_dense_ones_row_by_row():
    torch.manual_seed(0)
    dense_a, dense_b = torch.zeros(6, 3, dtype=torch.float64), torch.zeros(6, 3, dtype=torch.float64)
    dense_a[[0, 2, 5]] = torch.randn(3, 3, dtype=torch.float64)
    dense_b[[2, 3, 5]] = torch.randn(3, 3, dtype=torch.float64)
    sparse_a, sparse_b = dense_a.to_sparse(1), dense_b.to_sparse(1)
    expected = torch.dot(dense_a.flatten(), dense_b.flatten())
    for a, b in ((sparse_a, sparse_b), (dense_a, sparse_b), (sparse_a, dense_b)):
        assert gradient_dot(a, b, torch.float64).item() == pytest.approx(expected.item(), rel=1e-12)
    assert gradient_dot(torch.zeros(6, 3, dtype=torch.float64).to_sparse(1), sparse_b, torch.float64).item() == 0
    torch.testing.assert_close(gradient_norms([sparse_a, dense_b], torch.float64),
                               torch.stack([dense_a.norm(), dense_b.norm()]))


def test_cli_alignment_scores_and_arrays(capsys, tmp_path, model_dir, data_files, chem_triples, web_triples):
    json_path, stdout = run_gradient(capsys, model_dir, data_files, tmp_path, "--batch_size", "4",
                                     "--max_samples", "8", "--sparsify_layers", "mlp", "--dtype", "float32")
    result = json.load(open(json_path))
    steps, avg_g, avg_d, _ = reference_alignment(model_dir, web_triples, chem_triples, 4, 8)
    assert result["metadata"]["processed_batches"] == steps == 2
    for name, value in result["alignment_scores"].items():
        if not name.endswith("attention.self.key.bias"):  # zero gradient up to rounding noise
            assert value == pytest.approx(reference.cosine(avg_g[name], avg_d[name]), abs=1e-5)
    folder = os.path.dirname(json_path)
    with safe_open(os.path.join(folder, result["metadata"]["tensor_file"]), framework="pt") as handle:
        arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    assert sorted(arrays) == sorted(n for n in result["alignment_scores"] if n.endswith("weight") and (
        "mlp" in n or "intermediate" in n or ("output.dense" in n and "attention" not in n)))
    assert all(a.dtype == torch.float32 for a in arrays.values())
    name = sorted(arrays)[0]
    unit = (avg_g[name] / avg_g[name].norm()) * (avg_d[name] / avg_d[name].norm())
    torch.testing.assert_close(arrays[name], reference.mean_filter_3x3(unit), rtol=1e-4,
                               atol=1e-4 * float(unit.abs().max()))
    assert "Alignment statistics" in stdout and "Top 10 parameters by |alignment|" in stdout


def test_conflicting_data_gives_negative_alignment(capsys, tmp_path, qwen3_dir, data_files, chem_triples):
    # Domain triples with positive and negative swapped pull the gradient the opposite way.
    swapped = [dict(t, positive=t["negative"], negative=t["positive"]) for t in chem_triples]
    path = tmp_path / "swapped.json"
    path.write_text(json.dumps(swapped))
    files = {"general": data_files["chem"], "chem": str(path)}
    json_path, _ = run_gradient(capsys, qwen3_dir, files, tmp_path / "out", "--batch_size", "2",
                                "--max_samples", "24", "--seed", "3")
    result = json.load(open(json_path))
    mean_alignment = sum(result["alignment_scores"].values()) / len(result["alignment_scores"])
    assert mean_alignment < 0
    assert max(result["conflict_rates"].values()) > 0.5


def test_output_files_and_keys_and_seeded_repeatability(capsys, tmp_path, qwen3_dir, data_files):
    first, _ = run_gradient(capsys, qwen3_dir, data_files, tmp_path / "a", "--batch_size", "4", "--max_samples", "12")
    second, _ = run_gradient(capsys, qwen3_dir, data_files, tmp_path / "b", "--batch_size", "4", "--max_samples", "12")
    name = os.path.basename(first)
    assert os.path.dirname(first) == str(tmp_path / "a" / "tiny-qwen3")
    assert name.startswith("alignment_scores_tiny-qwen3_") and name.endswith(".json")
    ts = name[len("alignment_scores_tiny-qwen3_"):-len(".json")]
    assert sorted(os.listdir(os.path.dirname(first))) == sorted(
        [name, name.replace(".json", ".safetensors"), f"alignment_summary_tiny-qwen3_{ts}.json"])

    a, b = json.load(open(first)), json.load(open(second))
    assert set(a) == {"metadata", "losses", "alignment_scores", "conflict_rates"}
    assert {"timestamp", "model_name", "batch_size", "max_samples", "use_distributed", "processed_batches",
            "total_samples_processed", "general_data_size", "domain_data_size", "domain_data_path",
            "general_data_path", "tensor_file"} <= set(a["metadata"])
    assert a["metadata"]["use_distributed"] is True
    assert a["losses"]["mixed"] is None and a["losses"]["general"] > 0
    for key in ("losses", "alignment_scores", "conflict_rates"):
        assert a[key] == b[key]
    tensors_a = open(os.path.join(os.path.dirname(first), a["metadata"]["tensor_file"]), "rb").read()
    tensors_b = open(os.path.join(os.path.dirname(second), b["metadata"]["tensor_file"]), "rb").read()
    assert tensors_a == tensors_b

    summary = json.load(open(os.path.join(os.path.dirname(first), f"alignment_summary_tiny-qwen3_{ts}.json")))
    stats = summary["alignment_statistics"]
    values = list(a["alignment_scores"].values())
    assert summary["total_parameters"] == len(values)
    assert stats["positive_aligned_count"] == sum(v > 0.1 for v in values)
    assert stats["negative_aligned_count"] == sum(v < -0.1 for v in values)
    assert stats["max"] == pytest.approx(max(values)) and stats["min"] == pytest.approx(min(values))


def test_other_seed_changes_the_pairing(capsys, tmp_path, qwen3_dir, data_files):
    first, _ = run_gradient(capsys, qwen3_dir, data_files, tmp_path / "a", "--max_samples", "6")
    other, _ = run_gradient(capsys, qwen3_dir, data_files, tmp_path / "b", "--max_samples", "6", "--seed", "7")
    assert json.load(open(first))["losses"] != json.load(open(other))["losses"]


def test_cosine_alignment_modes_exact_and_in_range(qwen3_dir, chem_triples, web_triples):
    embedder = load_embedder(qwen3_dir, "cpu", "float32")
    embedder.model.double()
    local = gradient_alignment(embedder, web_triples, chem_triples, 4, 8, ["mlp"], alignment_mode="local_cosine")
    rows = gradient_alignment(embedder, web_triples, chem_triples, 4, 8, ["mlp"], alignment_mode="row_cosine")
    product = gradient_alignment(embedder, web_triples, chem_triples, 4, 8, ["mlp"])
    _, avg_g, avg_d, _ = reference_alignment(qwen3_dir, web_triples, chem_triples, 4, 8, dtype=torch.float64)
    assert product.cosine == {} and set(local.cosine) == set(rows.cosine) == set(product.elementwise)
    for name in product.elementwise:  # the published arrays are the same in every mode
        torch.testing.assert_close(local.elementwise[name], product.elementwise[name], rtol=0, atol=0)
    name = sorted(local.cosine)[0]
    g, d = avg_g[name], avg_d[name]
    torch.testing.assert_close(local.cosine[name], reference.window_cosine_3x3(g, d), rtol=1e-9, atol=1e-12)
    expected_rows = torch.stack([torch.dot(g[i], d[i]) / (g[i].norm() * d[i].norm()) for i in range(g.shape[0])])
    torch.testing.assert_close(rows.cosine[name], expected_rows, rtol=1e-9, atol=1e-12)
    for cosine in (*local.cosine.values(), *rows.cosine.values()):
        assert cosine.abs().max() <= 1
    # unlike the published product (~1/numel), the cosine spreads over the range
    assert local.cosine[name].abs().mean() > 0.1
    assert product.elementwise[name].abs().max() < 0.01


def test_cli_alignment_mode_adds_cosine_arrays(capsys, tmp_path, qwen3_dir, data_files):
    plain, _ = run_gradient(capsys, qwen3_dir, data_files, tmp_path / "a", "--max_samples", "8")
    with_cosine, stdout = run_gradient(capsys, qwen3_dir, data_files, tmp_path / "b", "--max_samples", "8",
                                       "--alignment_mode", "row_cosine")
    assert "row_cosine arrays" in stdout
    meta = json.load(open(with_cosine))["metadata"]
    assert meta["alignment_mode"] == "row_cosine"

    def arrays(json_path):
        tensor_file = os.path.join(os.path.dirname(json_path), json.load(open(json_path))["metadata"]["tensor_file"])
        with safe_open(tensor_file, framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}

    a, b = arrays(plain), arrays(with_cosine)
    assert set(b) == set(a) | {"cosine::" + name for name in a}
    for name, value in a.items():
        assert torch.equal(b[name], value)
        assert list(b["cosine::" + name].shape) == [value.shape[0]]


def test_one_pass_fisher_files_in_bfloat16(capsys, tmp_path, qwen3_dir, data_files):
    """--score_dtype bfloat16 stores the one-pass Fisher arrays as fisher.py --score_dtype bfloat16 does: the
    float32 arrays rounded; without --fisher_output_dir it has nothing to apply to and is refused."""
    files = {}
    for dtype in ("float32", "bfloat16"):
        run_gradient(capsys, qwen3_dir, data_files, tmp_path / dtype, "--max_samples", "8",
                     "--fisher_output_dir", str(tmp_path / f"fisher-{dtype}"), "--score_dtype", dtype)
        folder = tmp_path / f"fisher-{dtype}"
        files[dtype] = sorted(str(folder / name) for name in os.listdir(folder)
                              if "complete" in name and name.endswith(".json"))
    assert len(files["bfloat16"]) == 2
    for full, half in zip(files["float32"], files["bfloat16"]):
        assert json.load(open(half))["metadata"]["score_dtype"] == "bfloat16"
        full_arrays, half_arrays = (os.path.join(os.path.dirname(path),
                                                 json.load(open(path))["metadata"]["tensor_file"])
                                    for path in (full, half))
        with safe_open(full_arrays, framework="pt") as a, safe_open(half_arrays, framework="pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for name in a.keys():
                assert b.get_tensor(name).dtype == torch.bfloat16
                assert torch.equal(b.get_tensor(name), a.get_tensor(name).to(torch.bfloat16))
    with pytest.raises(SystemExit) as stop:
        gradient.main(["--model_name", qwen3_dir, "--output_dir", str(tmp_path), "--score_dtype", "bfloat16"])
    assert stop.value.code == 2
    assert "--score_dtype sets the dtype of the --fisher_output_dir files" in capsys.readouterr().err


def test_default_general_data_is_the_file_sample_py_writes():
    """[fix] The published default, data/sample/general-example.json, is a file no stage writes. sample.py names
    its output <input stem>-output.json in data/sample/ (its own defaults: data/chem-example.json ->
    data/sample/chem-example-output.json; example_usage.sh and the published README sample the general
    data the same way), so the defaults of gradient.py name the two files sampling leaves behind."""
    from gaprune.features import sample

    def sampled(path):
        return f"data/sample/{os.path.splitext(os.path.basename(path))[0]}-output.json"

    sample_defaults = sample.build_parser().parse_args([])
    assert sample_defaults.output_file == sampled(sample_defaults.input_file)
    defaults = gradient.build_parser().parse_args(["--model_name", "m"])
    assert defaults.domain_data_path == sample_defaults.output_file
    assert defaults.general_data_path == sampled("data/general-example.json") == \
        "data/sample/general-example-output.json"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.isfile(os.path.join(repo, "data", "general-example.json"))
    script = open(os.path.join(repo, "example_usage.sh")).read()
    assert 'GENERAL_SAMPLE="data/sample/$(basename "${GENERAL_DATA%.json}")-output.json"' in script
