"""Hostile but realistic input, by root cause: one `error:` line, no traceback, nothing new at the final
names, and for the silent cases the right result."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import fail, listing, no_temporaries, published_layout
from gaprune import api, evaluation, fileio
from gaprune.features import fisher, gradient, sample
from gaprune.model import SparseModel, compare, evaluate, retrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))






@pytest.fixture(scope="module")
def bert_scores(tmp_path_factory, bert_dir, data_files):
    out = tmp_path_factory.mktemp("scores")
    common = ["--model_name", bert_dir, "--max_samples", "4", "--batch_size", "2", "--output_dir", str(out),
              "--sparsify_layers", "mlp"]
    return {"general": fisher.main([*common, "--data_path", data_files["general"]]),
            "domain": fisher.main([*common, "--data_path", data_files["chem"]]),
            "alignment": gradient.main([*common, "--general_data_path", data_files["general"], "--domain_data_path",
                                        data_files["chem"], "--alignment_mode", "local_cosine"])}


def copy_result(json_path: str, folder) -> str:
    """A copy of a results JSON and its arrays in ``folder``, to damage."""
    os.makedirs(folder, exist_ok=True)
    data = json.load(open(json_path))
    shutil.copy(os.path.join(os.path.dirname(json_path), data["metadata"]["tensor_file"]), folder)
    target = os.path.join(folder, os.path.basename(json_path))
    shutil.copy(json_path, target)
    return target


def tensor_path(json_path: str) -> str:
    return os.path.join(os.path.dirname(json_path), json.load(open(json_path))["metadata"]["tensor_file"])


def prune_args(bert_dir, out, general, domain, alignment, *extra):
    return ["--model_path", bert_dir, "--output_dir", str(out), "--general_fisher_scores", general,
            "--domain_fisher_scores", domain, "--alignment_scores", alignment, "--unstructured_pct", "0.5",
            "--unstructured_scoring", "aligned_saliency", *extra]


# 1. what a library raises on a bad file or path becomes one line ------------------------------------------

@pytest.mark.parametrize("damage, message", [
    (lambda p: open(p, "wb").write(b"garbage, not safetensors"), "is not a readable safetensors file"),
    (lambda p: open(p, "r+b").truncate(os.path.getsize(p) // 2), "is not a readable safetensors file"),
])
def test_damaged_tensor_file(capsys, tmp_path, bert_dir, bert_scores, damage, message):
    domain = copy_result(bert_scores["domain"], tmp_path / "scores")
    damage(tensor_path(domain))
    out = tmp_path / "out"
    line = fail(capsys, SparseModel.main, prune_args(bert_dir, out, bert_scores["general"], domain,
                                                     bert_scores["alignment"]))
    assert message in line and os.path.basename(tensor_path(domain)) in line
    assert listing(out) == []


@pytest.mark.parametrize("damage", [
    lambda p: open(p, "r+b").truncate(os.path.getsize(p) - 7),  # the array's last bytes are gone
    lambda p: open(p, "wb").write(b"\x93NUMPY garbage"),  # the header itself is damaged
])
def test_damaged_npy_in_a_published_score_folder(capsys, tmp_path, bert_dir, bert_scores, damage):
    domain = published_layout(bert_scores["domain"], tmp_path / "scores")
    arrays = os.path.splitext(domain)[0] + "_tensors"
    damaged = os.path.join(arrays, sorted(os.listdir(arrays))[0])
    damage(damaged)
    out = tmp_path / "out"
    line = fail(capsys, SparseModel.main, prune_args(bert_dir, out, bert_scores["general"], domain,
                                                     bert_scores["alignment"]))
    assert "is not a readable .npy array" in line and os.path.basename(damaged) in line
    assert listing(out) == []


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(metadata=["not", "an", "object"]), "is not a fisher score file"),
    (lambda d: d.update(complete_scores="nothing"), "is not a fisher score file"),
    (lambda d: next(iter(d["complete_scores"].values())).update(shape="64x32"), "shapes must be lists"),
])
def test_score_json_with_wrong_types(capsys, tmp_path, bert_dir, bert_scores, edit, message):
    domain = copy_result(bert_scores["domain"], tmp_path / "scores")
    data = json.load(open(domain))
    edit(data)
    json.dump(data, open(domain, "w"))
    line = fail(capsys, SparseModel.main, prune_args(bert_dir, tmp_path / "out", bert_scores["general"], domain,
                                                     bert_scores["alignment"]))
    assert message in line


def test_tensor_file_of_another_model(capsys, tmp_path, bert_dir, bert_scores):
    """The JSON's shapes fit the model, but its tensor file holds another model's arrays."""
    domain = copy_result(bert_scores["domain"], tmp_path / "scores")
    arrays = {name: torch.ones(3, 5) for name in load_file(tensor_path(domain))}
    save_file(arrays, tensor_path(domain))
    line = fail(capsys, SparseModel.main, prune_args(bert_dir, tmp_path / "out", bert_scores["general"], domain,
                                                     bert_scores["alignment"]))
    assert "has shape [3, 5] but the model's is" in line


@pytest.mark.parametrize("remove, message", [
    (["tokenizer.json", "tokenizer_config.json", "vocab.txt"], "tokenizer"),
    (["model.safetensors"], "cannot load the model weights"),
])
def test_model_folder_with_files_missing(capsys, tmp_path, bert_dir, data_files, remove, message):
    model = tmp_path / "model"
    shutil.copytree(bert_dir, model)
    for name in remove:
        if os.path.exists(model / name):
            os.remove(model / name)
    out = tmp_path / "out"
    line = fail(capsys, fisher.main, ["--model_name", str(model), "--data_path", data_files["chem"],
                                      "--output_dir", str(out)])
    assert message in line and str(model) in line
    assert listing(out) == []


def test_model_with_truncated_weights(capsys, tmp_path, bert_dir, data_files):
    model = tmp_path / "model"
    shutil.copytree(bert_dir, model)
    with open(model / "model.safetensors", "r+b") as handle:
        handle.truncate(os.path.getsize(model / "model.safetensors") // 3)
    line = fail(capsys, fisher.main, ["--model_name", str(model), "--data_path", data_files["chem"],
                                      "--output_dir", str(tmp_path / "out")])
    assert "cannot load the model weights" in line


@pytest.mark.parametrize("kind", ["file", "dangling link"])
def test_output_dir_that_cannot_be_a_folder(capsys, tmp_path, bert_dir, data_files, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("a file")
    else:
        os.symlink(tmp_path / "nowhere", out)
    line = fail(capsys, fisher.main, ["--model_name", bert_dir, "--data_path", data_files["chem"],
                                      "--output_dir", str(out)])
    assert str(out) in line and ("is a file" in line or "link to nothing" in line)


def test_output_file_that_is_a_folder(capsys, tmp_path, bert_dir, data_files):
    line = fail(capsys, evaluate.main, ["--model_path", bert_dir, "--data_paths", data_files["chem"],
                                        "--output_file", str(tmp_path)])
    assert "is a folder, not a file" in line
    line = fail(capsys, sample.main, ["--model_name", bert_dir, "--input_file", data_files["chem"],
                                      "--output_file", str(tmp_path), "--target_sample_size", "2"])
    assert "is a folder, not a file" in line


def test_an_output_file_that_is_an_input_is_refused(capsys, tmp_path, bert_dir, data_files):
    data = tmp_path / "chem.json"
    shutil.copy(data_files["chem"], data)
    before = data.read_bytes()
    line = fail(capsys, evaluate.main, ["--model_path", bert_dir, "--data_paths", str(data), "--output_file",
                                        str(tmp_path / "." / "chem.json")])
    assert "is an input of this run" in line
    line = fail(capsys, sample.main, ["--model_name", bert_dir, "--input_file", str(data), "--output_file",
                                      str(data), "--target_sample_size", "2"])
    assert "is an input of this run" in line
    assert data.read_bytes() == before


@pytest.mark.parametrize("texts, message", [
    ({"query": "", "positive": "", "negative": ""}, "record 0 field 'query' is empty"),
    ({"query": "acid", "positive": "  ", "negative": "base"}, "record 0 field 'positive' is empty"),
])
def test_blank_texts_are_refused(capsys, tmp_path, bert_dir, texts, message):
    data = tmp_path / "blank.json"
    data.write_text(json.dumps([texts] * 4))
    line = fail(capsys, fisher.main, ["--model_name", bert_dir, "--data_path", str(data), "--output_dir",
                                      str(tmp_path / "out")])
    assert message in line and listing(tmp_path / "out") == []


def test_paths_of_the_wrong_kind_say_what_they_are(capsys, tmp_path, bert_dir, data_files, bert_scores):
    line = fail(capsys, fisher.main, ["--model_name", bert_dir, "--data_path", str(tmp_path), "--output_dir",
                                      str(tmp_path / "out")])
    assert "is a folder, not a file" in line
    line = fail(capsys, fisher.main, ["--model_name", os.path.join(bert_dir, "config.json"), "--data_path",
                                      data_files["chem"], "--output_dir", str(tmp_path / "out")])
    assert "is a file; give the model's folder" in line
    line = fail(capsys, SparseModel.main, prune_args(bert_dir, tmp_path / "out", tensor_path(bert_scores["general"]),
                                                     bert_scores["domain"], bert_scores["alignment"]))
    assert "holds the arrays; give the results .json written beside it" in line
    jsonl = tmp_path / "triples.jsonl"
    jsonl.write_text("\n".join(json.dumps(t) for t in json.load(open(data_files["chem"]))))
    line = fail(capsys, fisher.main, ["--model_name", bert_dir, "--data_path", str(jsonl), "--output_dir",
                                      str(tmp_path / "out")])
    assert "JSON Lines? give one JSON list of records" in line
    assert listing(tmp_path / "out") == []


def test_os_errors_become_one_line_naming_the_path(capsys, tmp_path):
    def full_disk(argv):
        raise OSError(28, "No space left on device", str(tmp_path / "x.json"))
    line = fail(capsys, full_disk, [])
    assert line == f"error: No space left on device: {tmp_path / 'x.json'}"


# 2. every argument and output location is checked before the first forward pass ------------------------------

@pytest.mark.parametrize("scorer, message", [
    ("aligned_saliency:fisher_norm=bogus", "fisher_norm must be one of"),
    ("dai:score_postproc=bogus", "score_postproc must be one of"),
    ("dai:beta=nan", "beta must be a finite number"),
])
def test_compare_overrides_fail_before_the_dense_run(capsys, tmp_path, bert_dir, data_files, bert_scores,
                                                     scorer, message, monkeypatch):
    monkeypatch.setattr(evaluation, "evaluate_triples", lambda *a, **k: pytest.fail("evaluated before checking"))
    line = fail(capsys, compare.main, ["--model_path", bert_dir, "--domain_data_paths", data_files["chem"],
                                       "--general_data_paths", data_files["general"], "--domain_fisher_scores",
                                       bert_scores["domain"], "--general_fisher_scores", bert_scores["general"],
                                       "--scorers", scorer, "--output_dir", str(tmp_path / "out")])
    assert message in line


def test_unwritable_output_fails_before_fisher_runs(capsys, tmp_path, bert_dir, data_files, monkeypatch):
    monkeypatch.setattr(api, "fisher_information", lambda *a, **k: pytest.fail("computed before checking"))
    (tmp_path / "blocker").write_text("")
    line = fail(capsys, fisher.main, ["--model_name", bert_dir, "--data_path", data_files["chem"],
                                      "--output_dir", str(tmp_path / "blocker" / "inside")])
    assert "cannot be created" in line


# 3. non-finite numbers never give a silent wrong mask --------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_fisher_values(capsys, tmp_path, bert_dir, bert_scores, value):
    domain = copy_result(bert_scores["domain"], tmp_path / "scores")
    arrays = load_file(tensor_path(domain))
    name = next(iter(arrays))
    arrays[name].view(-1)[: arrays[name].numel() // 3] = value
    save_file(arrays, tensor_path(domain))
    out = tmp_path / "out"
    line = fail(capsys, SparseModel.main, prune_args(bert_dir, out, bert_scores["general"], domain,
                                                     bert_scores["alignment"]))
    assert "non-finite" in line and name in line
    assert listing(out) == []


@pytest.mark.parametrize("side, damage, message", [
    ("domain", lambda a: -a, "negative value(s)"),  # Fisher scores are means of squares
    ("alignment", lambda a: a + 1.5, "outside [-1, 1]"),  # the local_cosine array
    ("general", lambda a: (a * 1e6).int(), "holds int32 values"),
])
def test_impossible_values_in_score_files(capsys, tmp_path, bert_dir, bert_scores, side, damage, message):
    files = dict(bert_scores)
    files[side] = copy_result(bert_scores[side], tmp_path / "scores")
    arrays = load_file(tensor_path(files[side]))
    name = next(n for n in arrays if (n.startswith("cosine::") if side == "alignment" else True))
    arrays[name] = damage(arrays[name])
    save_file(arrays, tensor_path(files[side]))
    out = tmp_path / "out"
    line = fail(capsys, SparseModel.main, prune_args(bert_dir, out, files["general"], files["domain"],
                                                     files["alignment"]))
    assert message in line and tensor_path(files[side]) in line and name in line
    assert listing(out) == []


@pytest.mark.parametrize("flag", [["--beta", "nan"], ["--unstructured_pct", "inf"], ["--alignment_weight=-inf"]])
def test_non_finite_flags(capsys, tmp_path, bert_dir, bert_scores, flag):
    line = fail(capsys, SparseModel.main, [*prune_args(bert_dir, tmp_path / "out", bert_scores["general"],
                                                       bert_scores["domain"], bert_scores["alignment"]), *flag])
    assert "finite number" in line


# 4. overwriting is atomic ---------------------------------------------------------------------------------

def make_folder(path, files):
    os.makedirs(path, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)


def test_replace_swaps_in_one_step_and_a_crash_after_it_keeps_the_new_folder(tmp_path, monkeypatch):
    target = tmp_path / "model"
    make_folder(target, {"weights": "old"})
    monkeypatch.setattr(fileio.shutil, "rmtree", lambda path: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed right after the swap, before the old folder is deleted
        with fileio.atomic_dir(str(target)) as tmp:
            (tmp_path / os.path.basename(tmp) / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"


def test_a_crash_before_the_swap_keeps_the_old_folder(tmp_path, monkeypatch):
    target = tmp_path / "model"
    make_folder(target, {"weights": "old"})
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_dir(str(target)) as tmp:
            (tmp_path / os.path.basename(tmp) / "weights").write_text("new")
    assert (target / "weights").read_text() == "old"
    assert listing(tmp_path) == ["model"]


def test_fallback_without_exchange_and_user_files_are_named(tmp_path, monkeypatch, caplog):
    target = tmp_path / "model"
    make_folder(target, {"weights": "old", "my_notes.txt": "mine"})
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    with fileio.atomic_dir(str(target)) as tmp:
        (tmp_path / os.path.basename(tmp) / "weights").write_text("new")
    assert listing(target) == ["weights"] and (target / "weights").read_text() == "new"
    assert "my_notes.txt" in caplog.text
    assert listing(tmp_path) == ["model"]


def test_fisher_writes_its_results_json_last(tmp_path, bert_dir, data_files, monkeypatch):
    """A failure while writing (a full disk) leaves no file at a final name, neither arrays nor JSON."""
    from gaprune import scorefiles

    def disk_full(path, obj):
        raise OSError(28, "No space left on device", path)
    monkeypatch.setattr(scorefiles, "write_json", disk_full)
    with pytest.raises(OSError):
        fisher.main(["--model_name", bert_dir, "--data_path", data_files["chem"], "--output_dir", str(tmp_path),
                     "--max_samples", "2"])
    assert listing(tmp_path) == []


# 5. no silent wrong work -------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio, batch, message", [("0.75", "2", "leaves no domain triple"),
                                                   ("0.1", "4", "rounds to no general triple")])
def test_retrain_batch_mix_that_rounds_away_a_side(capsys, tmp_path, bert_dir, data_files, ratio, batch, message):
    line = fail(capsys, retrain.main, ["--model_path", bert_dir, "--data_path", data_files["chem"],
                                       "--general_data_path", data_files["general"], "--general_ratio", ratio,
                                       "--batch_size", batch, "--output_dir", str(tmp_path / "out")])
    assert message in line
    assert listing(tmp_path / "out") == []


@pytest.mark.parametrize("lr", ["nan", "inf"])
def test_retrain_non_finite_learning_rate(capsys, tmp_path, bert_dir, data_files, lr):
    line = fail(capsys, retrain.main, ["--model_path", bert_dir, "--data_path", data_files["chem"], "--lr", lr,
                                       "--output_dir", str(tmp_path / "out")])
    assert "finite number" in line


def test_two_runs_in_one_second_keep_both_results(tmp_path, bert_dir, data_files):
    from datetime import datetime

    from gaprune import api
    from gaprune.scorefiles import save_fisher
    result = api.fisher(bert_dir, data_files["chem"], batch_size=2, max_samples=2)
    now = datetime(2026, 1, 1, 12, 0, 0)
    first = save_fisher(result, str(tmp_path), data_files["chem"], bert_dir, now=now)
    second = save_fisher(result, str(tmp_path), data_files["chem"], bert_dir, now=now)
    assert first != second and os.path.isfile(first) and os.path.isfile(second)
    assert second.endswith("_20260101_120000_1.json")
    assert no_temporaries(tmp_path)


def run_example(tmp_path, env_extra, cwd=None):
    env = dict(os.environ, DEVICE="cpu", **env_extra)
    return subprocess.run(["bash", os.path.join(REPO, "example_usage.sh")], env=env, capture_output=True, text=True,
                          cwd=cwd or tmp_path)


@pytest.mark.parametrize("env, message", [({"RETRAIN_STEPS": "abc"}, "RETRAIN_STEPS must be a whole number"),
                                          ({"SPARSITY": "1.5"}, "SPARSITY must be a number between 0 and 1"),
                                          ({"GENERAL_DATA": "nowhere.json"}, "data file not found"),
                                          ({"BATCH_SIZE": "1"}, "BATCH_SIZE must be at least 2"),
                                          ({"MAX_SAMPLES": "2"}, "MAX_SAMPLES (2) must be at least BATCH_SIZE (4)"),
                                          ({"RETRAIN_STEPS": "1", "RETRAIN_BATCH_SIZE": "2"},
                                           "RETRAIN_BATCH_SIZE must be at least 3"),
                                          ({"STRUCTURE": "rows"}, "STRUCTURE must be unstructured, channels, heads or layers"),
                                          ({"SCORER": "bogus"}, "SCORER must be one of")])
def test_example_usage_checks_settings_before_any_stage(tmp_path, env, message):
    proc = run_example(tmp_path, env)
    assert proc.returncode != 0 and message in proc.stderr and "==> " not in proc.stderr


def test_example_usage_takes_relative_paths_from_the_caller(tmp_path, data_files):
    os.makedirs(tmp_path / "a")
    shutil.copy(data_files["general"], tmp_path / "a" / "train.json")
    proc = run_example(tmp_path, {"GENERAL_DATA": "a/train.json", "DOMAIN_DATA": "b/train.json"})
    assert "data file not found: b/train.json" in proc.stderr  # a/train.json was found from the caller's folder


# 6. mixed-up inputs are pointed out ------------------------------------------------------------------------

def test_score_files_from_another_model_or_the_same_side_twice(capsys, tmp_path, bert_dir, bert_scores, caplog):
    domain = copy_result(bert_scores["domain"], tmp_path / "scores")
    data = json.load(open(domain))
    data["metadata"]["model_name"] = "Qwen/Qwen3-Embedding-4B"
    json.dump(data, open(domain, "w"))
    SparseModel.main(prune_args(bert_dir, tmp_path / "out", bert_scores["general"], domain, bert_scores["alignment"]))
    assert "computed on Qwen/Qwen3-Embedding-4B" in caplog.text
    SparseModel.main(prune_args(bert_dir, tmp_path / "out2", bert_scores["domain"], bert_scores["domain"],
                                bert_scores["alignment"]))
    assert "the same file is given as domain and general" in caplog.text


# 7. a checkpoint reloads as gaprune embedded it -------------------------------------------------------------

def test_a_folder_without_sentence_transformers_files_gets_its_pooling_written(tmp_path, model_dir):
    from sentence_transformers import SentenceTransformer

    from gaprune.checkpoint import save_model
    from gaprune.modeling import load_embedder
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("modules.json", "1_Pooling", "2_Normalize"))
    embedder = load_embedder(str(bare))
    save_model(embedder, str(tmp_path / "saved"))
    texts = ["What is the pKa of acetic acid?", "Paris is the capital of France."]
    ours = embedder.encode(texts)
    theirs = torch.as_tensor(SentenceTransformer(str(tmp_path / "saved"), device="cpu").encode(texts))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    pooling = json.load(open(tmp_path / "saved" / "1_Pooling" / "config.json"))
    assert pooling["pooling_mode_lasttoken" if "qwen3" in model_dir else "pooling_mode_mean_tokens"]


def test_scale_flags_fail_in_one_line(capsys, tmp_path, bert_dir, data_files):
    """The one-pass folder that is a file, and an unknown place for the sums: one line each, nothing written."""
    taken = tmp_path / "taken"
    taken.write_text("a file")
    common = ["--model_name", bert_dir, "--general_data_path", data_files["general"], "--domain_data_path",
              data_files["chem"], "--output_dir", str(tmp_path / "out")]
    line = fail(capsys, gradient.main, [*common, "--fisher_output_dir", str(taken)])
    assert "--fisher_output_dir" in line and "is a file" in line
    line = fail(capsys, fisher.main, ["--model_name", bert_dir, "--data_path", data_files["chem"],
                                      "--accumulate_on", "disk"])
    assert "--accumulate_on" in line and "disk" in line
    assert listing(tmp_path / "out") == []
