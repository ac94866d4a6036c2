"""Recovery by distillation: the loss against the teacher's cached embeddings, retrain.py's teacher, and index
compatibility (a pruned model's queries against documents embedded by the dense model)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import gaprune
from conftest import fail
from gaprune.data import load_triples, triple_texts
from gaprune.errors import InputError
from gaprune.evaluation import evaluate_triples
from gaprune.loss import distillation_loss, info_nce
from gaprune.model import SparseModel, evaluate, retrain
from gaprune.modeling import load_embedder
from gaprune.retraining import step_loss, teacher_embeddings
from gaprune.spec import RetrainSpec
from gaprune.toy_models import build_bert


def test_distillation_loss_against_a_hand_computation():
    student, teacher = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    cosines = torch.tensor([24 / 25, 0.0])
    assert float(distillation_loss(student, teacher)) == pytest.approx(float((1 - cosines).mean()))
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    assert float(distillation_loss(student, teacher, "mse")) == pytest.approx(float(((s - t) ** 2).sum(-1).mean()))
    assert float(distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)


def test_cached_teacher_embeddings_equal_a_fresh_pass_and_the_step_loss_adds_them(qwen3_dir, bert_dir, chem_triples):
    teacher = load_embedder(bert_dir, "cpu")
    cached = teacher_embeddings(teacher, chem_triples[:3], batch_size=2)
    texts = triple_texts(chem_triples[:3])
    assert list(cached) == list(dict.fromkeys(texts))
    fresh = F.normalize(teacher.embed([texts[4]]).float(), dim=-1)[0]
    torch.testing.assert_close(cached[texts[4]], fresh, atol=1e-5, rtol=0)

    student = load_embedder(bert_dir, "cpu")
    spec = RetrainSpec(distill_weight=2.0)
    batch = chem_triples[:3]
    with torch.no_grad():
        embedded = [student.embed([t[key] for t in batch]) for key in ("query", "positive", "negative")]
        target = torch.stack([cached[t[key]] for key in ("query", "positive", "negative") for t in batch])
        expected = info_nce(*embedded) + 2.0 * distillation_loss(torch.cat(embedded), target)
        assert float(step_loss(student, batch, spec, cached)) == pytest.approx(float(expected), rel=1e-5)
        assert float(step_loss(student, batch, RetrainSpec())) == pytest.approx(float(info_nce(*embedded)), rel=1e-5)


def test_distillation_keeps_the_student_nearer_the_teacher(tmp_path, bert_dir, data_files):
    folder = SparseModel.main(["--model_path", bert_dir, "--output_dir", str(tmp_path), "--structure", "channels",
                               "--structured_pct", "0.5", "--unstructured_scoring", "magnitude"])
    teacher = load_embedder(bert_dir, "cpu")
    texts = triple_texts(load_triples(data_files["chem"]))
    reference = teacher.encode(texts, progress=False)
    closeness = {}
    for weight in (0.0, 20.0):
        student = load_embedder(folder, "cpu")
        spec = RetrainSpec(steps=12, lr=2e-3, batch_size=4, warmup_steps=0, distill_weight=weight)
        gaprune.retrain(student, spec, data_files["chem"], teacher=teacher if weight else None)
        closeness[weight] = float((student.encode(texts, progress=False) * reference).sum(-1).mean())
    assert closeness[20.0] > closeness[0.0] + 0.01, closeness


def test_retrain_takes_the_recorded_dense_model_as_teacher(capsys, tmp_path, bert_dir, data_files):
    folder = SparseModel.main(["--model_path", bert_dir, "--output_dir", str(tmp_path / "model"), "--structure",
                               "channels", "--structured_pct", "0.5", "--unstructured_scoring", "magnitude"])
    out = retrain.main(["--model_path", folder, "--data_path", data_files["chem"], "--steps", "2", "--batch_size", "4",
                        "--distill_weight", "1.0", "--output_dir", str(tmp_path / "retrain")])
    settings = json.load(open(os.path.join(out, "retrain_config.json")))["settings"]
    assert settings["distill_weight"] == 1.0 and settings["teacher_model"] == "auto"
    capsys.readouterr()
    line = fail(capsys, retrain.main, ["--model_path", bert_dir, "--data_path", data_files["chem"], "--steps", "1",
                                       "--distill_weight", "1.0", "--output_dir", str(tmp_path / "again")])
    assert "--teacher_model auto needs the dense model recorded" in line
    with pytest.raises(InputError, match="learns from a teacher's embeddings"):
        gaprune.retrain(bert_dir, RetrainSpec(distill_weight=1.0), data_files["chem"])
    with pytest.raises(InputError, match="--distill_loss takes cosine, mse"):
        RetrainSpec(distill_weight=1.0, distill_loss="kl")


def test_index_compatibility_embeds_the_documents_with_the_index_model(capsys, tmp_path, bert_dir, qwen3_dir,
                                                                       data_files, chem_triples, web_triples):
    triples = load_triples(data_files["chem"])
    model = load_embedder(bert_dir, "cpu")
    other = load_embedder(build_bert(str(tmp_path / "other"), seed=1, extra_text=triple_texts(chem_triples)), "cpu")
    same = evaluate_triples(model, triples, index_embedder=model)["metrics"]
    assert same == evaluate_triples(model, triples)["metrics"]
    assert evaluate_triples(model, triples, index_embedder=other)["metrics"] != same  # another space altogether
    with pytest.raises(InputError, match="the index model embeds in 64 dimensions and the model in 32"):
        evaluate_triples(model, triples, index_embedder=load_embedder(qwen3_dir, "cpu"))
    path = evaluate.main(["--model_path", bert_dir, "--data_paths", data_files["chem"], "--index_model", bert_dir,
                          "--output_file", str(tmp_path / "eval.json")])
    report = json.load(open(path))
    assert report["index_compatibility"][data_files["chem"]]["metrics"] == report["results"][data_files["chem"]][
        "metrics"]
    assert "old index" in capsys.readouterr().out
