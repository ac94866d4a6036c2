"""MTEB on gaprune models: the local task of a triple file scores what evaluate_triples scores, the scripts add
MTEB tasks to their reports, and a missing extra or an unreachable task is one line."""

import builtins
import importlib.util
import json
import os

import pytest

from conftest import CHEM, fail, last_line
from gaprune.errors import InputError
from gaprune.evaluation import evaluate_triples
from gaprune.model import compare, evaluate
from gaprune.modeling import load_embedder

needs_mteb = pytest.mark.skipif(importlib.util.find_spec("mteb") is None,
                                reason="mteb is not installed (pip install -e .[mteb])")


@pytest.fixture(scope="module")
def repeated_texts(chem_triples):
    """Triples whose texts repeat as build_corpus has to fold them: a positive that is another triple's negative,
    a positive shared by two triples, a query that stands twice with different positives."""
    triples = [dict(t) for t in chem_triples[:6]]
    triples[1]["negative"] = triples[0]["positive"]
    triples[2]["positive"] = triples[3]["positive"]
    triples[4]["query"] = triples[5]["query"]
    return triples


@needs_mteb
@pytest.mark.parametrize("family, instructions", [("qwen3", "auto"), ("qwen3", "strip"), ("bert", "auto")])
def test_local_task_scores_what_evaluate_triples_scores(qwen3_dir, bert_dir, chem_triples, repeated_texts, family,
                                                        instructions):
    from gaprune.mteb_tasks import LOCAL_PREFIX, load_tasks, run_tasks

    embedder = load_embedder({"qwen3": qwen3_dir, "bert": bert_dir}[family], "cpu", "float32")
    # up to 10 documents, so that every rank counts in nDCG@10; then a corpus with ranks past 10
    files = {"few": chem_triples[:4], "repeated": repeated_texts, "all": chem_triples}
    scores = run_tasks(embedder, load_tasks(files=files), 4, instructions)
    for name, triples in files.items():
        expected = evaluate_triples(embedder, triples, 4, instructions)["metrics"]
        found = scores[LOCAL_PREFIX + name]
        assert found["main_metric"] == "ndcg_at_10" and found["main_score"] == found["metrics"]["ndcg@10"]
        assert found["metrics"] == pytest.approx(expected, abs=1e-4), name


@needs_mteb
def test_the_qwen3_instruction_prefix_reaches_mteb_as_evaluate_py_sends_it(qwen3_dir, chem_triples):
    from gaprune.mteb_tasks import load_tasks, run_tasks

    embedder = load_embedder(qwen3_dir, "cpu", "float32")
    tasks = load_tasks(files={"chem": chem_triples[:4]})
    kept, stripped = (run_tasks(embedder, tasks, 4, mode)["local:chem"]["metrics"] for mode in ("auto", "strip"))
    assert chem_triples[0]["query"].startswith(CHEM) and kept != stripped  # the prefix matters to this model
    assert kept == pytest.approx(evaluate_triples(embedder, chem_triples[:4], 4, "keep")["metrics"], abs=1e-4)


@needs_mteb
def test_named_tasks_report_their_main_score(bert_dir):
    from mteb.mocks import MockRetrievalTask, MockSTSTask

    from gaprune.mteb_tasks import run_tasks

    scores = run_tasks(load_embedder(bert_dir, "cpu", "float32"), [MockRetrievalTask(), MockSTSTask()], 4)
    assert scores["MockRetrievalTask"]["main_metric"] == "ndcg_at_10"
    assert set(scores["MockRetrievalTask"]["metrics"]) == {"ndcg@10", "mrr@10", "recall@1", "recall@10"}
    assert scores["MockSTSTask"]["main_metric"] == "cosine_spearman" and scores["MockSTSTask"]["metrics"] == {}


@needs_mteb
def test_evaluate_mteb_local_writes_mteb_figures_beside_the_files(capsys, tmp_path, qwen3_dir, bert_dir, data_files):
    out = tmp_path / "report.json"
    path = evaluate.main(["--model_path", qwen3_dir, "--data_paths", data_files["chem"], "--baseline_model", bert_dir,
                          "--mteb_local", "--batch_size", "8", "--output_file", str(out)])
    stdout = capsys.readouterr().out
    assert last_line(stdout) == str(out) and "local:chem-example_sample.j (ndcg_at_10)" in stdout
    report = json.load(open(path))
    name = "local:" + data_files["chem"]
    for side, mteb_side in (("results", "results"), ("baseline", "baseline")):
        assert report["mteb"][mteb_side][name]["metrics"] == pytest.approx(
            report[side][data_files["chem"]]["metrics"], abs=1e-4)
    assert report["mteb"]["change_percent"][name]["ndcg@10"] == pytest.approx(
        report["change_percent"][data_files["chem"]]["ndcg@10"], abs=0.05)


@needs_mteb
def test_compare_mteb_local_adds_a_column_per_file(capsys, tmp_path, qwen3_dir, data_files):
    path = compare.main(["--model_path", qwen3_dir, "--domain_data_paths", data_files["chem"],
                         "--general_data_paths", data_files["general"], "--scorers", "magnitude", "--sparsity", "0.5",
                         "--batch_size", "8", "--mteb_local", "--output_dir", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert "| local:chem-example_sample.json | Δ vs dense | local:general-example.json | Δ vs dense |" in stdout
    dense, pruned = json.load(open(path))["rows"]
    for row in (dense, pruned):
        assert row["mteb"]["local:" + data_files["chem"]]["main_score"] == pytest.approx(row["domain"]["ndcg@10"],
                                                                                       abs=1e-4)
    assert pruned["mteb_change_percent"]["local:" + data_files["general"]] == pytest.approx(
        pruned["general_change_percent"], abs=0.05)


def test_a_missing_extra_is_one_line_before_any_model_loads(capsys, monkeypatch, tmp_path, data_files):
    real_import = builtins.__import__

    def no_mteb(name, *args, **kwargs):
        if name == "mteb" or name.startswith("mteb."):
            raise ModuleNotFoundError("No module named 'mteb'", name="mteb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mteb)
    base = ["--model_path", str(tmp_path / "no-such-model"), "--data_paths", data_files["chem"], "--output_file",
            str(tmp_path / "report.json")]
    assert fail(capsys, evaluate.main, base + ["--mteb_tasks", "SciFact"]) == \
        "error: --mteb_tasks needs the mteb extra: pip install -e .[mteb]"
    assert fail(capsys, evaluate.main, base + ["--mteb_local"]) == \
        "error: --mteb_local needs the mteb extra: pip install -e .[mteb]"
    from gaprune.mteb_tasks import load_tasks

    assert load_tasks() == []  # nothing asked: no mteb needed
    with pytest.raises(InputError, match="needs the mteb extra"):
        load_tasks(["SciFact"])


@needs_mteb
def test_a_named_task_that_cannot_load_offline_is_one_line(capsys, monkeypatch, tmp_path, data_files):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    base = ["--model_path", str(tmp_path / "no-such-model"), "--data_paths", data_files["chem"], "--output_file",
            str(tmp_path / "report.json")]
    start = time.monotonic()
    line = fail(capsys, evaluate.main, base + ["--mteb_tasks", "SciFact"])
    assert line.startswith("error: MTEB task SciFact cannot be loaded: ") and time.monotonic() - start < 10
    assert fail(capsys, evaluate.main, base + ["--mteb_tasks", "SciFakt"]) == \
        "error: MTEB task 'SciFakt' not found. Did you mean: 'SciFact'?"
    assert not os.path.exists(tmp_path / "report.json")
