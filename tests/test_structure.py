"""Structured pruning: whole MLP channels and query heads removed, a smaller standard checkpoint."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel

import gaprune
from conftest import fail, last_line, listing
from gaprune.checkpoint import PROBE_SENTENCE
from gaprune.cli import run
from gaprune.errors import InputError
from gaprune.model import SparseModel, compare, retrain
from gaprune.modeling import load_embedder
from gaprune.structure import lowest_units, remove_units, unit_plan, units_to_remove
from gaprune.toy_models import build_qwen3

TEXTS = ["acid reacts with a base", "the river flows north", "benzene is an aromatic ring"]


def channel_tensors(model, layer: int) -> tuple[torch.Tensor, ...]:
    """(tensors written row-wise, tensor read column-wise) of one layer's MLP channels."""
    if hasattr(model, "layers"):
        mlp = model.layers[layer].mlp
        return (mlp.gate_proj.weight, mlp.up_proj.weight), mlp.down_proj.weight
    block = model.encoder.layer[layer]
    return (block.intermediate.dense.weight, block.intermediate.dense.bias), block.output.dense.weight


def test_removing_channels_that_write_nothing_keeps_the_embeddings(model_dir):
    embedder = load_embedder(model_dir, "cpu")
    plan = unit_plan(embedder.model, "channels")
    removed = {}
    with torch.no_grad():
        for index, layer in enumerate(plan.layers):
            channels = torch.randperm(plan.units, generator=torch.Generator().manual_seed(index))[:plan.units // 4]
            channel_tensors(embedder.model, index)[1][:, channels] = 0  # down-projection columns
            removed[layer.layer] = channels.sort().values
    before = embedder.encode(TEXTS, progress=False)
    remove_units(embedder.model, plan, removed)
    assert embedder.model.config.intermediate_size == plan.units - plan.units // 4
    assert channel_tensors(embedder.model, 0)[1].shape[1] == plan.units - plan.units // 4
    torch.testing.assert_close(embedder.encode(TEXTS, progress=False), before, atol=1e-5, rtol=0)


def test_removing_query_heads_that_write_nothing_keeps_the_embeddings(qwen3_dir):
    embedder = load_embedder(qwen3_dir, "cpu")
    plan = unit_plan(embedder.model, "heads")
    assert (plan.units, plan.groups, plan.width) == (4, 2, 16)  # 4 query heads over 2 key/value heads
    removed = {}
    with torch.no_grad():
        for index, layer in enumerate(plan.layers):
            heads = torch.tensor([index % 2, 2 + (index + 1) % 2])  # one head of each key/value group
            o_proj = embedder.model.layers[index].self_attn.o_proj.weight
            for head in heads:
                o_proj[:, head * 16:(head + 1) * 16] = 0
            removed[layer.layer] = heads
    before = embedder.encode(TEXTS, progress=False)
    remove_units(embedder.model, plan, removed)
    assert embedder.model.config.num_attention_heads == 2
    assert embedder.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    torch.testing.assert_close(embedder.encode(TEXTS, progress=False), before, atol=1e-5, rtol=0)


def test_head_scores_sum_the_query_rows_and_output_columns_of_each_head(qwen3_dir):
    embedder = load_embedder(qwen3_dir, "cpu")
    attention = [layer.self_attn for layer in embedder.model.layers]
    expected = []
    for attn in attention:  # magnitude: sum of |w| over head h's 16 rows of q_proj and 16 columns of o_proj
        q, o = attn.q_proj.weight.detach().abs(), attn.o_proj.weight.detach().abs()
        sums = torch.tensor([q[h * 16:(h + 1) * 16].sum() + o[:, h * 16:(h + 1) * 16].sum() for h in range(4)])
        expected.append(sorted([int(torch.argmin(sums[:2])), 2 + int(torch.argmin(sums[2:]))]))
    result = gaprune.prune(embedder, gaprune.PruneSpec(scorer="magnitude", structure="heads", sparsity=0.5))
    assert [result.removed[f"layers.{i}"] for i in range(2)] == expected


def test_lowest_units_takes_the_same_count_from_each_group():
    scores = torch.tensor([5.0, 1.0, 3.0, 2.0, 0.5, 0.6, 9.0, 8.0])
    assert lowest_units(scores, 2).tolist() == [4, 5]
    assert lowest_units(scores, 2, groups=2).tolist() == [1, 4]  # one from [0, 4) and one from [4, 8)
    assert lowest_units(torch.zeros(4), 2).tolist() == [0, 1]  # ties: the lower index


def test_channels_removed_are_the_lowest_domain_fisher_saliency_sums(capsys, tmp_path, model_dir, score_files):
    files = score_files["bert" if "bert" in model_dir else "qwen3"]
    folder = SparseModel.main(["--model_path", model_dir, "--output_dir", str(tmp_path),
                               "--domain_fisher_scores", files["domain"], "--structure", "channels",
                               "--structured_pct", "0.25", "--unstructured_scoring", "domain_fisher"])
    assert last_line(capsys.readouterr().out) == folder
    assert os.path.basename(folder) == f"{os.path.basename(model_dir)}_domain_fisher_channels_25%"
    stats = json.load(open(os.path.join(folder, "structured_prune_stats.json")))

    dense = load_embedder(model_dir, "cpu").model
    data = json.load(open(files["domain"]))
    fisher = safe_open(os.path.join(os.path.dirname(files["domain"]), data["metadata"]["tensor_file"]), "pt")
    plan = unit_plan(dense, "channels")
    for index, layer in enumerate(plan.layers):
        expected = torch.zeros(plan.units, dtype=torch.float64)
        for name, axis in layer.slices.items():
            weight = dict(dense.named_parameters())[name].detach()
            if weight.dim() == 2:
                saliency = fisher.get_tensor(name).reshape(weight.shape) * weight.square()
                expected += saliency.sum(dim=1 - axis).double()
        lowest = sorted(torch.argsort(expected, stable=True)[:plan.units // 4].tolist())
        assert stats["per_layer"][layer.layer]["removed"] == lowest
    assert stats["units_per_layer_after"] == plan.units - plan.units // 4


def test_saved_channel_pruned_model_loads_with_plain_libraries_and_embeds_the_same(tmp_path, model_dir,
                                                                                  score_files):
    files = score_files["bert" if "bert" in model_dir else "qwen3"]
    embedder = load_embedder(model_dir, "cpu")
    result = gaprune.prune(embedder, gaprune.PruneSpec(scorer="aligned_saliency", structure="channels", sparsity=0.5),
                           gaprune.ScoreFiles(general_fisher=files["general"], domain_fisher=files["domain"]))
    in_memory = embedder.encode(TEXTS + [PROBE_SENTENCE], progress=False)
    folder = str(tmp_path / "pruned")
    gaprune.save_model(embedder, folder)

    model = AutoModel.from_pretrained(folder)
    assert model.config.intermediate_size == result.units_after == result.units_before // 2
    assert sum(p.numel() for p in model.parameters()) == result.params_after < result.params_before
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(folder, device="cpu")
    torch.testing.assert_close(torch.tensor(st.encode(TEXTS + [PROBE_SENTENCE], normalize_embeddings=True)),
                               in_memory, atol=1e-5, rtol=0)
    torch.testing.assert_close(load_embedder(folder, "cpu").encode(TEXTS + [PROBE_SENTENCE], progress=False),
                               in_memory, atol=1e-5, rtol=0)


def test_heads_cli_writes_a_smaller_qwen3_and_records_what_went(capsys, tmp_path, qwen3_dir, score_files):
    files = score_files["qwen3"]
    folder = SparseModel.main(["--model_path", qwen3_dir, "--output_dir", str(tmp_path), "--structure", "heads",
                               "--structured_pct", "0.5", "--unstructured_scoring", "aligned_saliency",
                               "--general_fisher_scores", files["general"], "--domain_fisher_scores", files["domain"]])
    out = capsys.readouterr().out
    assert "Removed 2 of 4 heads in each of 2 layers (num_attention_heads 4 -> 2)" in out
    config = json.load(open(os.path.join(folder, "config.json")))
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 2, 16)
    stats = json.load(open(os.path.join(folder, "structured_prune_stats.json")))
    for layer in stats["per_layer"].values():  # one head from each key/value group
        assert len(layer["removed"]) == 2 and layer["removed"][0] < 2 <= layer["removed"][1]
    evaluation = json.load(open(os.path.join(folder, "evaluation_config.json")))
    assert evaluation["structure"] == "heads" and evaluation["meta"]["size"]["num_attention_heads"] == {
        "before": 4, "after": 2}
    assert AutoModel.from_pretrained(folder).layers[1].self_attn.o_proj.weight.shape == (64, 32)


def test_retrain_fine_tunes_the_smaller_model(capsys, tmp_path, qwen3_dir, data_files):
    pruned = SparseModel.main(["--model_path", qwen3_dir, "--output_dir", str(tmp_path / "pruned"),
                               "--structure", "channels", "--structured_pct", "0.5", "--unstructured_scoring",
                               "magnitude"])
    before = load_embedder(pruned, "cpu").model.state_dict()
    folder = retrain.main(["--model_path", pruned, "--data_path", data_files["chem"], "--steps", "2",
                           "--batch_size", "4", "--lr", "1e-3", "--warmup_steps", "0",
                           "--output_dir", str(tmp_path / "retrained")])
    model = AutoModel.from_pretrained(folder)
    assert model.config.intermediate_size == 64
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, before[n])]
    assert any("mlp" in n for n in changed)
    assert json.load(open(os.path.join(folder, "retrain_config.json")))["held_zero_weights"] == 0




@pytest.mark.parametrize("extra, message", [
    (["--structure", "channels", "--structured_pct", "0.001"], "a share of 0.001 removes no channels (128 per layer)"),
    (["--structure", "channels", "--structured_pct", "1"], "needs --structured_pct between 0 and 1"),
    (["--structure", "heads", "--structured_pct", "0.3"], "removes no heads (4 per layer, 2 per key/value group)"),
    (["--structured_pct", "0.5"], "--structured_pct needs --structure channels or heads"),
    (["--structure", "channels", "--structured_pct", "0.5", "--unstructured_pct", "0.5"], "cannot be combined"),
])
def test_bad_structure_requests(capsys, tmp_path, qwen3_dir, extra, message):
    line = fail(capsys, SparseModel.main, ["--model_path", qwen3_dir, "--output_dir", str(tmp_path / "out"),
                         "--unstructured_scoring", "magnitude", *extra])
    assert message in line
    assert listing(tmp_path / "out") == []


def test_heads_of_a_bert_and_channels_of_an_unknown_family(capsys, tmp_path, bert_dir):
    line = fail(capsys, SparseModel.main, ["--model_path", bert_dir, "--output_dir", str(tmp_path), "--structure",
                                           "heads", "--structured_pct", "0.5", "--unstructured_scoring", "magnitude"])
    assert "not available for bert-family models" in line
    model = torch.nn.Module()
    model.add_module("blocks", torch.nn.ModuleList([torch.nn.Linear(4, 4)]))
    with pytest.raises(InputError, match="Qwen3/Llama-style or BERT-style parameter names"):
        unit_plan(model, "channels")


def test_a_gqa_share_rounds_to_whole_heads_per_group(tmp_path):
    folder = build_qwen3(str(tmp_path / "gqa"), num_heads=8, num_kv_heads=2)
    plan = unit_plan(load_embedder(folder, "cpu").model, "heads")
    assert units_to_remove(plan, 0.5) == 4 and units_to_remove(plan, 0.3) == 2  # 1 of 4 per group


def test_compare_ranks_channel_pruning_scorers(capsys, tmp_path, bert_dir, data_files, score_files):
    files = score_files["bert"]
    path = compare.main(["--model_path", bert_dir, "--domain_data_paths", data_files["chem"], "--general_data_paths",
                         data_files["general"], "--domain_fisher_scores", files["domain"], "--structure", "channels",
                         "--sparsity", "0.25", "0.5", "--scorers", "magnitude", "domain_fisher",
                         "--output_dir", str(tmp_path)])
    rows = json.load(open(path))["rows"]
    assert [(r["method"], r["sparsity"]) for r in rows] == [
        ("dense", 0.0), ("magnitude", 0.25), ("domain_fisher", 0.25), ("magnitude", 0.5), ("domain_fisher", 0.5)]
    assert [r["units_after"] for r in rows[1:]] == [48, 48, 32, 32]  # of 64 channels per layer
    assert rows[1]["mask_agreement_with_magnitude"] == 1.0
    dense = load_embedder(bert_dir, "cpu")
    assert rows[3]["params_after"] == sum(p.numel() for p in dense.model.parameters()) - 2 * 32 * (2 * 32 + 1)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(compare.main, ["--model_path", bert_dir, "--domain_data_paths", data_files["chem"],
                           "--general_data_paths", data_files["general"], "--structure", "channels", "--sparsity",
                           "0.001", "--scorers", "magnitude", "--output_dir", str(tmp_path / "bad")])
    assert "removes no channels" in capsys.readouterr().err
