import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModel

from conftest import fail, last_line, listing, published_layout
from gaprune.features import fisher, gradient
from gaprune.model import SparseModel
from gaprune.modeling import load_embedder
from gaprune.toy_models import build_qwen3


def family_of(model_dir):
    return "bert" if "bert" in model_dir else "qwen3"


def prune(capsys, model_dir, files, out_dir, *extra):
    folder = SparseModel.main(["--model_path", model_dir, "--output_dir", str(out_dir),
                               "--general_fisher_scores", files["general"], "--domain_fisher_scores", files["domain"],
                               "--alignment_scores", files["alignment"], *extra])
    stdout = capsys.readouterr().out
    assert last_line(stdout) == folder
    return folder, stdout


def saved_weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_pruned_checkpoint_reloads_with_the_printed_embedding_and_true_counts(capsys, tmp_path, model_dir,
                                                                             score_files):
    folder, stdout = prune(capsys, model_dir, score_files[family_of(model_dir)], tmp_path, "--unstructured_pct", "0.5")
    assert os.path.basename(folder) == f"{os.path.basename(model_dir)}_dai_prune_50%"
    assert listing(tmp_path) == [os.path.basename(folder)]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling",
                 "evaluation_config.json", "unstructured_prune_stats.json"):
        assert os.path.exists(os.path.join(folder, name)), name

    weights = saved_weights(folder)
    original = load_file(os.path.join(model_dir, "model.safetensors"))
    config = json.load(open(os.path.join(folder, "evaluation_config.json")))
    accounting = config["meta"]["mask_accounting"]
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert accounting["zero_params_counted"] == zeros
    assert accounting["total_params_before"] == sum(w.numel() for w in weights.values())
    assert accounting["total_params_after"] == accounting["total_params_before"] - zeros
    assert accounting["zero_params_before"] + accounting["newly_zeroed_params"] == zeros

    stats = json.load(open(os.path.join(folder, "unstructured_prune_stats.json")))
    assert stats["masked_params"] == int(stats["total_params_considered"] * 0.5) == accounting["masked_params"]
    card = open(os.path.join(folder, "README.md"), encoding="utf-8").read()  # the model card, from the records
    assert card.startswith("---\n") and "- dai\n" in card and f"{stats['masked_params']:,}" in card
    assert set(stats["per_param"]) == {n for n, w in weights.items() if w.dim() == 2 and (
        "mlp" in n or "intermediate" in n or re.search(r"layer\.\d+\.output\.dense", n))}
    for name, w in weights.items():
        if name not in stats["per_param"]:
            assert torch.equal(w, original[name]), f"{name} is not a candidate but changed"
        else:
            assert int(((w == 0) & (original[name] != 0)).sum()) <= stats["per_param"][name]["masked"]

    # the printed embedding is the reloaded model's embedding
    printed = [float(x) for x in re.search(r"\[(.*), \.\.\.\]", stdout).group(1).split(", ")]
    reloaded = load_embedder(folder, "cpu", "float32")
    with torch.no_grad():
        emb = torch.nn.functional.normalize(reloaded.embed(["What is the capital of France?"]), dim=-1)[0]
    assert emb[:8].tolist() == pytest.approx(printed, abs=2e-6)
    assert isinstance(AutoModel.from_pretrained(folder), torch.nn.Module)


def test_sentence_transformers_loads_the_pruned_folder(capsys, tmp_path, model_dir, score_files):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    folder, _ = prune(capsys, model_dir, score_files[family_of(model_dir)], tmp_path, "--unstructured_pct", "0.3")
    texts = ["What is the capital of France?", "Benzene is an aromatic ring."]
    st = sentence_transformers.SentenceTransformer(folder, device="cpu")
    ours = load_embedder(folder, "cpu", "float32")
    with torch.no_grad():
        expected = torch.nn.functional.normalize(ours.embed(texts), dim=-1)
    got = torch.nn.functional.normalize(torch.as_tensor(st.encode(texts)), dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layers, expect", [
    (["attention"], r"(self_attn\.[qkvo]_proj|attention\.self\.(query|key|value)|attention\.output\.dense)\.weight"),
    (["linear"], r"(_proj|attention\.self\.|attention\.output\.dense|intermediate\.dense|layer\.\d+\.output\.dense)\.?"),
    (["mlp_up", "attn_q"], r"(up_proj|intermediate\.dense|q_proj|attention\.self\.query)\.weight"),
])
def test_layer_selections_touch_only_their_tensors(capsys, tmp_path, model_dir, score_files, layers, expect):
    files = score_files[family_of(model_dir)]
    folder, _ = prune(capsys, model_dir, files, tmp_path, "--unstructured_pct", "0.4", "--sparsify_layers", *layers)
    stats = json.load(open(os.path.join(folder, "unstructured_prune_stats.json")))
    assert stats["per_param"], "nothing selected"
    for name in stats["per_param"]:
        assert re.search(expect, name), name
    weights, original = saved_weights(folder), load_file(os.path.join(model_dir, "model.safetensors"))
    changed = {n for n in weights if not torch.equal(weights[n], original[n])}
    assert changed <= set(stats["per_param"])


def test_uniform_budget_and_postprocessing_flags(capsys, tmp_path, qwen3_dir, score_files):
    folder, _ = prune(capsys, qwen3_dir, score_files["qwen3"], tmp_path, "--unstructured_pct", "0.5",
                      "--layer_budget_strategy", "uniform", "--score_postproc", "rank")
    stats = json.load(open(os.path.join(folder, "unstructured_prune_stats.json")))
    for layer in stats["per_layer_allocations"].values():
        assert layer["masked"] == layer["allocated"] == layer["size"] // 2


def test_no_score_files_is_magnitude_pruning(capsys, tmp_path, qwen3_dir):
    folder = SparseModel.main(["--model_path", qwen3_dir, "--output_dir", str(tmp_path), "--unstructured_pct", "0.5"])
    weights, original = saved_weights(folder), load_file(os.path.join(qwen3_dir, "model.safetensors"))
    stats = json.load(open(os.path.join(folder, "unstructured_prune_stats.json")))
    magnitudes = torch.cat([original[n].abs().flatten() for n in stats["per_param"]])
    kept = torch.cat([original[n].abs().flatten()[weights[n].flatten() != 0] for n in stats["per_param"]])
    assert kept.min() >= torch.kthvalue(magnitudes, stats["masked_params"]).values


def test_published_npy_score_folders_are_accepted(capsys, tmp_path, qwen3_dir, score_files):
    """Scores in the published layout (float16 .npy per parameter) give the mask of the same values."""
    converted = {side: published_layout(path, tmp_path) for side, path in score_files["qwen3"].items()}
    ours, _ = prune(capsys, qwen3_dir, converted, tmp_path / "npy", "--unstructured_pct", "0.5")
    stats = json.load(open(os.path.join(ours, "unstructured_prune_stats.json")))
    assert stats["masked_params"] == int(stats["total_params_considered"] * 0.5)


def test_show_layer_types_prints_and_writes_nothing(capsys, tmp_path, bert_dir):
    assert SparseModel.main(["--model_path", bert_dir, "--output_dir", str(tmp_path / "out"),
                             "--show_layer_types"]) is None
    out = capsys.readouterr().out
    assert re.search(r"mlp\s+4 tensors", out) and "bert naming" in out
    assert listing(tmp_path / "out") == []


# --- bad input ---------------------------------------------------------------------------------



@pytest.fixture(scope="session")
def other_model_scores(tmp_path_factory, data_files, chem_triples):
    model = build_qwen3(str(tmp_path_factory.mktemp("other") / "wider-qwen3"), hidden_size=32, intermediate_size=96,
                        extra_text=[t["query"] for t in chem_triples])
    return fisher.main(["--model_name", model, "--max_samples", "2", "--data_path", data_files["chem"],
                        "--output_dir", str(tmp_path_factory.mktemp("other-scores"))])


def test_bad_inputs(capsys, tmp_path, qwen3_dir, bert_dir, score_files, other_model_scores):
    out = tmp_path / "out"
    base = ["--model_path", qwen3_dir, "--output_dir", str(out)]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{ not json")
    cases = [
        (["--unstructured_pct", "1.5"], "--unstructured_pct must be between 0 and 1, got 1.5"),
        (["--unstructured_pct", "-0.1"], "--unstructured_pct must be between 0 and 1"),
        (["--unstructured_pct", "0.5", "--domain_fisher_scores", str(tmp_path / "gone.json")],
         "fisher score file not found"),
        (["--unstructured_pct", "0.5", "--domain_fisher_scores", str(bad_json)], "is not valid JSON"),
        (["--unstructured_pct", "0.5", "--domain_fisher_scores", other_model_scores],
         "has shape [96, 32] but the model's is [128, 64]"),
        (["--unstructured_pct", "0.5", "--general_fisher_scores", score_files["qwen3"]["alignment"]],
         "is not a fisher score file"),
        (["--unstructured_pct", "0.5", "--alignment_scores", score_files["bert"]["alignment"]],
         "has no alignment scores for layers.0.mlp.gate_proj.weight"),
        (["--sparsify_layers", "mlps"], "invalid choice: 'mlps'"),
        (["--unstructured_pct", "0.5", "--sparsify_layers", "layernorm"], "no parameter with 2+ dimensions matches"),
    ]
    for argv, message in cases:
        line = fail(capsys, SparseModel.main, base + argv)
        assert message in line, (argv, line)
        assert listing(out) == []
    line = fail(capsys, SparseModel.main, ["--model_path", bert_dir, "--output_dir", str(out), "--sparsify_layers",
                                           "mlp_gate", "--unstructured_pct", "0.5"])
    assert "mlp_gate" in line and listing(out) == []


def test_aligned_saliency_on_a_real_score_file(capsys, tmp_path, qwen3_dir, data_files, score_files):
    files = dict(score_files["qwen3"])
    base = ["--model_path", qwen3_dir, "--output_dir", str(tmp_path / "x"), "--unstructured_pct", "0.5",
            "--unstructured_scoring", "aligned_saliency"]
    line = fail(capsys, SparseModel.main, [*base, "--alignment_scores", files["alignment"],
                                           "--general_fisher_scores", files["general"], "--domain_fisher_scores",
                                           files["domain"]])
    assert "rerun gradient.py with --alignment_mode local_cosine" in line
    assert listing(tmp_path) == []
    line = fail(capsys, SparseModel.main, [*base, "--domain_fisher_scores", files["domain"]])
    assert "scorer aligned_saliency needs --general_fisher_scores" in line

    files["alignment"] = gradient.main(["--model_name", qwen3_dir, "--max_samples", "6", "--batch_size", "2",
                                        "--general_data_path", data_files["general"], "--domain_data_path",
                                        data_files["chem"], "--output_dir", str(tmp_path / "scores"),
                                        "--alignment_mode", "local_cosine"])
    capsys.readouterr()
    folder, _ = prune(capsys, qwen3_dir, files, tmp_path / "out", "--unstructured_pct", "0.5",
                      "--unstructured_scoring", "aligned_saliency", "--alignment_weight", "0.7")
    assert os.path.basename(folder) == "tiny-qwen3_aligned_saliency_prune_50%"
    stats = json.load(open(os.path.join(folder, "unstructured_prune_stats.json")))
    assert stats["masked_params"] == int(stats["total_params_considered"] * 0.5)
    config = json.load(open(os.path.join(folder, "evaluation_config.json")))["meta"]["unstructured_pruning"]
    assert config["alignment_weight"] == 0.7 and config["fisher_norm"] == "global"
    # the mask follows (Fd/mean + Fg/mean) w^2 (1 + 0.7 s), recomputed here from the files
    weights = saved_weights(folder)
    model = load_embedder(qwen3_dir, "cpu", "float32").model
    dense = {n: p.detach() for n, p in model.named_parameters() if re.search(r"mlp\.(gate|up|down)_proj", n)}

    def arrays(json_path, prefix=""):
        meta = json.load(open(json_path))["metadata"]
        with safe_open(os.path.join(os.path.dirname(json_path), meta["tensor_file"]), framework="pt") as handle:
            return {n: handle.get_tensor(prefix + n) for n in dense}

    fd, fg, s = arrays(files["domain"]), arrays(files["general"]), arrays(files["alignment"], "cosine::")
    mean_d = sum(float(a.double().sum()) for a in fd.values()) / sum(a.numel() for a in fd.values())
    mean_g = sum(float(a.double().sum()) for a in fg.values()) / sum(a.numel() for a in fg.values())
    scores = {n: (fd[n] / mean_d + fg[n] / mean_g) * dense[n] ** 2 * (1 + 0.7 * s[n]) for n in dense}
    everything = torch.cat([v.flatten() for v in scores.values()])
    threshold = torch.kthvalue(everything, stats["masked_params"]).values
    for n in dense:
        zeroed = weights[n] == 0
        assert bool((scores[n][zeroed] <= threshold * (1 + 1e-5)).all())
        assert bool((scores[n][~zeroed] >= threshold * (1 - 1e-5)).all())
