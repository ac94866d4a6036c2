import json
import os

import pytest

from conftest import last_line
from gaprune import checkpoint
from gaprune.model import SparseModel, retrain
from gaprune.modelcard import folder_model_card, model_card, write_model_card

BASE = "sentence-transformers/all-MiniLM-L6-v2"

UNSTRUCTURED = {  # evaluation_config.json as SparseModel.py writes it (aligned_saliency, 50% of the MLP, SparseGPT-free)
    "model_path": BASE, "batch_size": 4, "sparsify_layers": ["mlp"], "pruning_method": "unstructured_aligned_saliency",
    "meta": {
        "unstructured_pruning": {"unstructured_pct": 0.5, "unstructured_scoring": "aligned_saliency",
                                 "layer_budget_strategy": "global", "rho_min": 0.05, "rho_max": 0.95, "beta": 1.0,
                                 "compression_weight": 0.5, "score_postproc": "none", "score_temperature": 1.0,
                                 "fusion_alpha": 0.0, "fusion_beta": 1.0, "alignment_weight": 0.0,
                                 "domain_weight": 1.0, "general_weight": 1.0, "fisher_norm": "global"},
        "score_files": {"general_fisher_scores": "output/fisher/g.json", "domain_fisher_scores": "output/fisher/d.json",
                        "alignment_scores": "output/gradient/a.json"},
        "mask_accounting": {"total_params_before": 22713216, "total_params_after": 19893120,
                            "masked_params": 2359296, "masked_ratio": 0.10387, "zero_params_counted": 2820096,
                            "unstructured_masked_params_reported": 2359296, "zero_params_before": 460800,
                            "newly_zeroed_params": 2359296}}}
UNSTRUCTURED_STATS = {"method": "aligned_saliency", "total_params_considered": 4718592, "masked_params": 2359296,
                      "actual_mask_ratio": 0.5, "per_param": {}}
CHANNELS = {
    "model_path": BASE, "batch_size": 4, "structure": "channels", "sparsify_layers": ["mlp"],
    "pruning_method": "channels_domain_fisher",
    "meta": {"structured_pruning": {"structure": "channels", "share": 0.25, "scoring": "domain_fisher"},
             "score_files": {"general_fisher_scores": None, "domain_fisher_scores": "d.json", "alignment_scores": None},
             "size": {"params_before": 22713216, "params_after": 20943360,
                      "intermediate_size": {"before": 1536, "after": 1152}}}}


def header(card: str) -> dict:
    """The YAML header as key: value lines, lists as '- item' lines under their key."""
    lines = card.splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    fields, key = {}, None
    for line in lines[1:end]:
        if line.startswith("- "):
            fields[key].append(line[2:].strip('"'))
        else:
            key, _, value = line.partition(": ")
            key = key.rstrip(":")
            fields[key] = value.strip('"') if value else []
    return fields


def test_unstructured_card_header_and_body():
    card = model_card(UNSTRUCTURED, UNSTRUCTURED_STATS)
    fields = header(card)
    assert fields["base_model"] == BASE
    assert fields["library_name"] == "sentence-transformers"
    assert fields["pipeline_tag"] == "sentence-similarity"
    assert {"gaprune", "pruned", "aligned_saliency", "unstructured"} <= set(fields["tags"])
    body = card[card.index("---", 3):]
    assert "50.00%" in body and "2,359,296 of 4,718,592 candidate weights" in body
    assert "--unstructured_scoring aligned_saliency" in body and "--alignment_weight 0.0" in body
    assert "--beta" not in body  # coefficients at their defaults are left out
    assert "output/fisher/d.json" in body and "Not evaluated" in body
    assert "SentenceTransformer('path/to/this/folder')" in body and "AutoModel.from_pretrained" in body
    assert "Made with gaprune" in body


def test_structured_card_counts_units_and_parameters():
    card = model_card(CHANNELS, None, model_id="me/minilm-chem-channels")
    assert {"channels", "domain_fisher"} <= set(header(card)["tags"])
    assert "`intermediate_size` 1,536 -> 1,152 per layer (25.00% removed)" in card
    assert "22,713,216 -> 20,943,360 (7.8% fewer)" in card
    assert "--structure channels --structured_pct 0.25 --unstructured_scoring domain_fisher" in card
    assert "SentenceTransformer('me/minilm-chem-channels')" in card


@pytest.mark.parametrize("evaluation", [None, {}, {"results": {}}])
def test_no_evaluation_is_said_so(evaluation):
    assert "Not evaluated when this card was written" in model_card(UNSTRUCTURED, None, evaluation)


def test_evaluation_figures_from_either_shape():
    report = {"baseline_model": BASE,
              "results": {"data/chem.json": {"metrics": {"ndcg@10": 0.5388, "mrr@10": 0.5, "recall@1": 0.4,
                                                         "recall@10": 0.8}}},
              "change_percent": {"data/chem.json": {"ndcg@10": -4.51, "mrr@10": None, "recall@1": -1.0,
                                                    "recall@10": 0.0}}}
    card = model_card(UNSTRUCTURED, None, report)
    assert "| `chem.json` | 0.5388 (-4.51%) | 0.5000 |" in card and BASE in card
    single = model_card(UNSTRUCTURED, None, {"metrics": {"ndcg@10": 0.6}, "num_queries": 3})
    assert "| `evaluation` | 0.6000 |" in single


def test_local_base_model_stays_out_of_the_header():
    config = dict(UNSTRUCTURED, model_path="/tmp/some/model")
    card = model_card(config)
    assert "base_model" not in header(card) and "`/tmp/some/model`" in card


def test_write_model_card_replaces_a_readme(tmp_path):
    (tmp_path / "README.md").write_text("---\nlibrary_name: sentence-transformers\n---\nwritten by the saver\n")
    path = write_model_card(str(tmp_path), model_card(UNSTRUCTURED))
    assert path == str(tmp_path / "README.md")
    assert "written by the saver" not in open(path).read()
    assert sorted(os.listdir(tmp_path)) == ["README.md"]


def test_card_from_a_real_pruned_folder(tmp_path, qwen3_dir):
    folder = SparseModel.main(["--model_path", qwen3_dir, "--output_dir", str(tmp_path), "--unstructured_pct", "0.5"])
    card = folder_model_card(folder)
    assert "dai" in header(card)["tags"]
    stats = json.load(open(os.path.join(folder, "unstructured_prune_stats.json")))
    assert f"{stats['masked_params']:,} of {stats['total_params_considered']:,} candidate weights (50.00%)" in card


def test_retrain_writes_the_card_over_the_savers_readme(capsys, tmp_path, qwen3_dir, data_files, monkeypatch):
    pruned = SparseModel.main(["--model_path", qwen3_dir, "--output_dir", str(tmp_path / "pruned"),
                               "--unstructured_pct", "0.5"])
    save = checkpoint.save_model

    def save_with_readme(embedder, folder):  # as sentence-transformers' own save does
        save(embedder, folder)
        with open(os.path.join(folder, "README.md"), "w") as handle:
            handle.write("generic card\n")

    monkeypatch.setattr(checkpoint, "save_model", save_with_readme)
    folder = retrain.main(["--model_path", pruned, "--data_path", data_files["chem"], "--output_dir",
                           str(tmp_path / "re"), "--steps", "2", "--batch_size", "4", "--warmup_steps", "0"])
    assert last_line(capsys.readouterr().out) == folder
    card = open(os.path.join(folder, "README.md")).read()
    assert "generic card" not in card
    assert "retrained" in header(card)["tags"] and "pruned" in header(card)["tags"]
    assert "retrained for 2 steps" in card and "## Retraining" in card
    assert f"retrained from `{pruned}`" in card
    assert f"`{qwen3_dir}`" in card  # the base model is the pruned folder's base, not the pruned folder
    assert "pruned weights still zero" in card
