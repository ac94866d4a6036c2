"""MTEB on gaprune models: the local task of a triple file scores what evaluate_triples scores."""

import importlib.util

import pytest

from conftest import CHEM
from gaprune.evaluation import evaluate_triples
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
