import json
import math
import os

import pytest
import torch

from conftest import last_line
from gaprune.cli import run
from gaprune.pruning import prune_candidates
from gaprune.scorers import score_function as make_score_fn
from gaprune.coefficients import DAIConfig
from gaprune.evaluation import build_corpus, query_text, ranking_metrics, relevant_ranks
from gaprune.features import fisher
from gaprune.model import compare, evaluate
from gaprune.scorefiles import open_score_files


def test_metrics_on_hand_made_embeddings_with_known_ranks():
    # 4 documents on the unit circle; each query sits at a chosen angle, so its ranking is known
    angles = torch.tensor([0.0, 0.5, 1.0, 1.5])
    corpus = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    queries = torch.stack([corpus[0], corpus[1], corpus[3]])  # exact matches of docs 0, 1, 3
    relevant = [0, 2, 0]  # query 0 -> rank 1; query 1 -> doc 2 is 2nd closest to doc 1 (tie with doc 0: rank 2)
    ranks = relevant_ranks(queries, corpus, relevant)
    assert ranks.tolist() == [1, 2, 4]
    metrics = ranking_metrics(ranks)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 3)
    assert metrics["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)
    assert metrics["recall@1"] == pytest.approx(1 / 3)
    assert metrics["recall@10"] == 1.0
    far = ranking_metrics(torch.tensor([11, 1]))
    assert far["ndcg@10"] == 0.5 and far["mrr@10"] == 0.5 and far["recall@10"] == 0.5


def test_corpus_counts_repeated_texts_once_and_instructions():
    triples = [{"query": "q1", "positive": "a", "negative": "b"}, {"query": "q2", "positive": "b", "negative": "c"}]
    assert build_corpus(triples) == (["a", "b", "c"], [0, 1])
    text = "Instruct: Given a chemistry question, retrieve the related context.\nQuery: what is pH?"
    assert query_text(text, keep_instruction=True) == text
    assert query_text(text, keep_instruction=False) == "what is pH?"


def test_baseline_scorers_score_the_right_quantity():
    weight = torch.tensor([[0.5, -2.0], [0.1, -0.3]])
    fisher_values = torch.tensor([[1.0, 0.01], [10.0, 2.0]])
    array = lambda side, name: fisher_values.clone() if side == "domain_fisher" else None
    cfg = DAIConfig()
    assert make_score_fn("magnitude", array, cfg)("w", weight).tolist() == pytest.approx([0.5, 2.0, 0.1, 0.3])
    assert make_score_fn("domain_fisher", array, cfg)("w", weight).tolist() == pytest.approx([0.25, 0.04, 0.1, 0.18])
    first = make_score_fn("random", array, cfg, seed=3)("w", weight)
    assert torch.equal(first, make_score_fn("random", array, cfg, seed=3)("w", weight))
    assert not torch.equal(first, make_score_fn("random", array, cfg, seed=4)("w", weight))
    # Fisher saliency keeps the small weight with large Fisher that magnitude would drop
    pruned = {"w": weight.clone()}
    result = prune_candidates(pruned, array, "domain_fisher", cfg, 0.5)
    assert torch.equal(pruned["w"], weight * torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert result.diagnostics["mask_agreement_with_magnitude"] == 0.5


@pytest.fixture(scope="session")
def fisher_files(tmp_path_factory, qwen3_dir, data_files):
    out = tmp_path_factory.mktemp("fisher-eval")
    return {side: fisher.main(["--model_name", qwen3_dir, "--data_path", data_files[key], "--output_dir", str(out),
                               "--max_samples", "6", "--batch_size", "2", "--sparsify_layers", "mlp"])
            for side, key in (("general", "general"), ("domain", "chem"))}


def test_dai_diagnostics_report_magnitude_agreement_and_fisher_ratio(qwen3_dir, fisher_files):
    from gaprune.modeling import load_embedder
    from gaprune.layers import select_parameters
    embedder = load_embedder(qwen3_dir, "cpu", "float32")
    candidates = select_parameters(embedder.model.named_parameters(), ["mlp"])
    array = open_score_files({"domain_fisher": fisher_files["domain"], "general_fisher": fisher_files["general"],
                              "alignment": None}, {n: list(p.shape) for n, p in candidates.items()}, embedder.device)
    result = prune_candidates(candidates, array, "dai", DAIConfig(), 0.5)
    assert 0.5 <= result.diagnostics["mask_agreement_with_magnitude"] <= 1.0
    assert result.diagnostics["median_fisher_to_compression_ratio"] > 0


def test_evaluate_cli_reports_metrics_and_change(capsys, tmp_path, qwen3_dir, bert_dir, data_files):
    out = tmp_path / "report.json"
    path = evaluate.main(["--model_path", qwen3_dir, "--data_paths", data_files["chem"], data_files["general"],
                          "--baseline_model", bert_dir, "--output_file", str(out)])
    stdout = capsys.readouterr().out
    assert last_line(stdout) == str(out) and "ndcg@10" in stdout and "change %" in stdout
    report = json.load(open(path))
    for file in (data_files["chem"], data_files["general"]):
        ours, base = report["results"][file]["metrics"], report["baseline"][file]["metrics"]
        assert report["change_percent"][file]["ndcg@10"] == pytest.approx(
            100 * (ours["ndcg@10"] - base["ndcg@10"]) / base["ndcg@10"])
        assert report["results"][file]["query_instructions"] == "kept"  # decoder
        assert report["baseline"][file]["query_instructions"] == "stripped"  # encoder
        assert report["results"][file]["corpus_size"] == 24


def test_compare_produces_every_row_and_the_dense_row_matches_evaluate(capsys, tmp_path, qwen3_dir, data_files,
                                                                      fisher_files):
    path = compare.main(["--model_path", qwen3_dir, "--domain_data_paths", data_files["chem"],
                         "--general_data_paths", data_files["general"], "--general_fisher_scores",
                         fisher_files["general"], "--domain_fisher_scores", fisher_files["domain"],
                         "--sparsity", "0.5", "0.6", "--output_dir", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert last_line(stdout) == path
    rows = json.load(open(path))["rows"]
    assert [(r["method"], r["sparsity"]) for r in rows] == [("dense", 0.0)] + [
        (m, s) for s in (0.5, 0.6) for m in ("dai", "dai_paper", "aligned_saliency", "random", "magnitude",
                                             "domain_fisher", "general_fisher")]
    assert os.path.isfile(path.replace(".json", ".md"))
    assert "| magnitude | 60% |" in stdout
    evaluated = json.load(open(evaluate.main(["--model_path", qwen3_dir, "--data_paths", data_files["chem"],
                                              "--output_file", str(tmp_path / "dense.json")])))
    assert rows[0]["domain"] == evaluated["results"][data_files["chem"]]["metrics"]
    magnitude = next(r for r in rows if r["method"] == "magnitude" and r["sparsity"] == 0.5)
    assert magnitude["masked_params"] == int(3 * 2 * 64 * 128 * 0.5)


def test_compare_scorer_overrides_and_bad_specs(capsys, tmp_path, qwen3_dir, data_files, fisher_files):
    base = ["--model_path", qwen3_dir, "--domain_data_paths", data_files["chem"], "--general_data_paths",
            data_files["general"], "--general_fisher_scores", fisher_files["general"], "--domain_fisher_scores",
            fisher_files["domain"], "--output_dir", str(tmp_path)]
    path = compare.main(base + ["--scorers", "aligned_saliency:general_weight=0,fisher_norm=none", "domain_fisher",
                                "magnitude"])
    capsys.readouterr()
    rows = {r["method"]: r for r in json.load(open(path))["rows"]}
    custom = rows["aligned_saliency:general_weight=0,fisher_norm=none"]
    assert custom["config"]["general_weight"] == 0.0 and custom["config"]["fisher_norm"] == "none"
    # with lambda_g = 0 and raw Fisher it is the domain-Fisher saliency: same mask, same metrics
    assert custom["domain"] == rows["domain_fisher"]["domain"]
    assert custom["mask_agreement_with_magnitude"] == rows["domain_fisher"]["mask_agreement_with_magnitude"]
    assert rows["magnitude"]["mask_agreement_with_magnitude"] == 1.0
    for spec, message in (("nope", "unknown scorer 'nope'"), ("dai_paper:alpha=1", "bad override 'alpha=1'"),
                          ("dai_paper:beta=x", "bad value 'x' for beta")):
        with pytest.raises(SystemExit):
            run(compare.main, base + ["--scorers", spec])
        assert message in capsys.readouterr().err
