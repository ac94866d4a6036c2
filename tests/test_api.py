"""The Python API and the scorer registry, as a notebook user would call them."""

import os

import pytest
import torch
from safetensors.torch import load_file

import gaprune
from gaprune.data import load_triples, triple_texts
from gaprune.errors import InputError
from gaprune.features import fisher as fisher_script
from gaprune.layers import select_parameters
from gaprune.pruners import BLOCK_SIZE
from gaprune.scorers import SCORERS, Scorer, get_scorer
from gaprune.scoring import magnitude


def test_the_readme_example_runs_the_stages_and_masks_exactly_k(tmp_path, qwen3_dir, data_files):
    model = gaprune.load_embedder(qwen3_dir)
    general = gaprune.fisher(model, data_files["general"], str(tmp_path), batch_size=2, max_samples=6)
    domain = gaprune.fisher(model, data_files["chem"], str(tmp_path), batch_size=2, max_samples=6)
    alignment = gaprune.alignment(model, data_files["general"], data_files["chem"], str(tmp_path), max_samples=6,
                                  alignment_mode="local_cosine")
    assert all(os.path.isfile(r.path) for r in (general, domain, alignment))
    mlp = {n: p for n, p in model.model.named_parameters() if "mlp" in n}
    zeros_before = sum(int((p == 0).sum()) for p in mlp.values())
    spec = gaprune.PruneSpec(scorer="aligned_saliency", sparsity=0.5)
    scores = gaprune.ScoreFiles(general_fisher=general.path, domain_fisher=domain.path, alignment=alignment.path)
    result = gaprune.prune(model, spec, scores)
    total = sum(p.numel() for p in mlp.values())
    assert result.masked == total // 2
    assert sum(int((p == 0).sum()) for p in mlp.values()) == zeros_before + result.newly_zeroed
    metrics = gaprune.evaluate(model, data_files["chem"])["metrics"]
    assert 0 < metrics["ndcg@10"] <= 1


def test_the_api_and_the_script_write_the_same_fisher_arrays(tmp_path, capsys, bert_dir, data_files):
    args = ["--model_name", bert_dir, "--data_path", data_files["chem"], "--batch_size", "2", "--max_samples", "4"]
    script_json = fisher_script.main([*args, "--output_dir", str(tmp_path / "script")])
    api_json = gaprune.fisher(bert_dir, data_files["chem"], str(tmp_path / "api"), batch_size=2, max_samples=4).path
    script_arrays = load_file(script_json.removesuffix(".json") + ".safetensors")
    api_arrays = load_file(api_json.removesuffix(".json") + ".safetensors")
    assert list(script_arrays) == list(api_arrays)
    for name in script_arrays:
        torch.testing.assert_close(api_arrays[name], script_arrays[name], rtol=0, atol=0)


def test_a_scorer_is_one_registry_entry(monkeypatch, bert_dir):
    """A new scorer (here: prune the largest weights first) needs nothing but its entry."""
    entry = Scorer("inverse_magnitude", "-|w|", lambda context: lambda name, weight: -magnitude(weight))
    monkeypatch.setitem(SCORERS, entry.name, entry)
    model = gaprune.load_embedder(bert_dir)
    mlp = select_parameters(model.model.named_parameters(), ["mlp"])
    largest = max(float(p.detach().abs().max()) for p in mlp.values())
    result = gaprune.prune(model, gaprune.PruneSpec(scorer="inverse_magnitude", sparsity=0.1))
    assert result.masked == int(sum(p.numel() for p in mlp.values()) * 0.1)
    assert all(float(p.detach().abs().max()) < largest for p in mlp.values())  # the largest weight went first


def test_every_registered_scorer_declares_its_files():
    assert list(SCORERS) == ["dai", "dai_paper", "aligned_saliency", "random", "magnitude", "domain_fisher",
                             "general_fisher", "wanda", "sparsegpt"]
    assert [s.name for s in SCORERS.values() if s.needs_activations] == ["wanda", "sparsegpt"]
    assert [s.name for s in SCORERS.values() if s.updates_weights] == ["sparsegpt"]
    config = gaprune.DAIConfig()
    assert get_scorer("domain_fisher").required_files(config) == ("domain_fisher",)
    assert get_scorer("aligned_saliency").required_files(config) == ("domain_fisher", "general_fisher")
    assert get_scorer("aligned_saliency").reads_cosine(config)
    assert not get_scorer("aligned_saliency").reads_cosine(gaprune.DAIConfig(alignment_weight=0))
    with pytest.raises(InputError, match="needs --general_fisher_scores"):
        get_scorer("general_fisher").check(config, {"domain_fisher"})
    with pytest.raises(InputError, match="unknown scorer 'obc'"):
        get_scorer("obc")


def test_sparsegpt_takes_each_layer_share_from_the_fisher_ranking(qwen3_dir, data_files, score_files):
    """layer_shares: aligned_saliency decides how many weights each layer loses, SparseGPT which ones."""
    files = score_files["qwen3"]
    config = gaprune.DAIConfig(alignment_weight=0)
    scores = gaprune.ScoreFiles(general_fisher=files["general"], domain_fisher=files["domain"])
    ranked = gaprune.prune(gaprune.load_embedder(qwen3_dir, "cpu"),
                           gaprune.PruneSpec(scorer="aligned_saliency", sparsity=0.5, config=config), scores)
    calibration = gaprune.CalibrationSpec(domain_data=triple_texts(load_triples(data_files["chem"], 4)))
    embedder = gaprune.load_embedder(qwen3_dir, "cpu")
    sparsegpt = gaprune.PruneSpec(scorer="sparsegpt", sparsity=0.5, config=config, calibration=calibration,
                                  layer_shares="aligned_saliency")
    result = gaprune.prune(embedder, sparsegpt, scores)
    weights = dict(embedder.model.named_parameters())
    shares = {name: info["ratio"] for name, info in ranked.per_param.items()}
    assert len({round(share, 3) for share in shares.values()}) > 2 and result.diagnostics["layer_shares"] == \
        "aligned_saliency"
    for name, share in shares.items():
        rows, columns = weights[name].shape  # SparseGPT's count: int(share * weights) of each block of columns
        expected = sum(int(rows * min(BLOCK_SIZE, columns - start) * share) for start in range(0, columns, BLOCK_SIZE))
        assert result.per_param[name]["masked"] == int((weights[name] == 0).sum()) == expected, name
    with pytest.raises(InputError, match="needs --domain_fisher_scores"):
        gaprune.prune(embedder, sparsegpt, gaprune.ScoreFiles(general_fisher=files["general"]))
    with pytest.raises(InputError, match="not of magnitude"):  # a score-based mask has a budget of its own
        gaprune.PruneSpec(scorer="magnitude", sparsity=0.5, layer_shares="aligned_saliency")
    with pytest.raises(InputError, match="takes uniform or a score-based scorer"):
        gaprune.PruneSpec(scorer="sparsegpt", sparsity=0.5, calibration=calibration, layer_shares="wanda")
