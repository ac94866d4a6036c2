"""Bad input: one clear line on stderr, a non-zero exit, no traceback, nothing written."""

import json
import os
import subprocess
import sys

import pytest

from conftest import fail, listing
from gaprune.features import fisher, gradient




@pytest.fixture
def bad_files(tmp_path, chem_triples):
    files = {
        "malformed": "[{\"query\": \"a\", ",
        "not_a_list": json.dumps({"query": "a"}),
        "no_positive": json.dumps([{"query": "q", "negative": "n"}]),
        "empty": "[]",
        "not_string": json.dumps([{"query": "q", "positive": 3, "negative": "n"}]),
    }
    paths = {}
    for name, text in files.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        paths[name] = str(path)
    paths["missing"] = str(tmp_path / "nowhere.json")
    return paths


@pytest.mark.parametrize("case, message", [
    ("missing", "data file not found"),
    ("malformed", "is not valid JSON"),
    ("not_a_list", "must hold a JSON list"),
    ("no_positive", "record 0 has no 'positive' field"),
    ("empty", "holds no records"),
    ("not_string", "field 'positive' is not a string"),
])
def test_fisher_bad_data(capsys, tmp_path, qwen3_dir, bad_files, case, message):
    out = tmp_path / "out"
    line = fail(capsys, fisher.main, ["--model_name", qwen3_dir, "--data_path", bad_files[case],
                                      "--output_dir", str(out)])
    assert message in line
    assert listing(out) == []


@pytest.mark.parametrize("argv, message", [
    (["--sparsify_layers", "mlp", "bogus"], "invalid choice: 'bogus'"),
    (["--max_samples", "0"], "must be at least 1"),
    (["--batch_size", "-2"], "must be at least 1"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
])
def test_fisher_bad_flags(capsys, tmp_path, qwen3_dir, data_files, argv, message):
    out = tmp_path / "out"
    line = fail(capsys, fisher.main, ["--model_name", qwen3_dir, "--data_path", data_files["chem"],
                                      "--output_dir", str(out), *argv])
    assert message in line
    assert listing(out) == []


def test_model_path_that_does_not_exist(capsys, tmp_path, data_files):
    out = tmp_path / "out"
    line = fail(capsys, fisher.main, ["--model_name", str(tmp_path / "no-such-model"), "--data_path",
                                      data_files["chem"], "--output_dir", str(out)])
    assert "model folder not found" in line and "no-such-model" in line
    assert listing(out) == []


def test_folder_that_is_not_a_model(capsys, tmp_path, data_files):
    line = fail(capsys, fisher.main, ["--model_name", str(tmp_path), "--data_path", data_files["chem"],
                                      "--output_dir", str(tmp_path / "out")])
    assert "is not a model folder" in line


def test_no_parameter_matches_the_layer_type(capsys, tmp_path, bert_dir, data_files):
    out = tmp_path / "out"
    line = fail(capsys, fisher.main, ["--model_name", bert_dir, "--data_path", data_files["chem"],
                                      "--output_dir", str(out), "--sparsify_layers", "mlp_gate"])
    assert "no parameter with 2+ dimensions matches --sparsify_layers mlp_gate" in line
    assert listing(out) == []


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "1"], "--batch_size must be at least 2"),
    (["--max_samples", "1"], "not enough data for one step"),
    (["--use_distributed", "maybe"], "unrecognized arguments: maybe"),
])
def test_gradient_bad_flags(capsys, tmp_path, qwen3_dir, data_files, argv, message):
    out = tmp_path / "out"
    line = fail(capsys, gradient.main, ["--model_name", qwen3_dir, "--general_data_path", data_files["general"],
                                        "--domain_data_path", data_files["chem"], "--output_dir", str(out), *argv])
    assert message in line
    assert listing(out) == []


def test_gradient_missing_general_file(capsys, tmp_path, qwen3_dir, data_files, bad_files):
    line = fail(capsys, gradient.main, ["--model_name", qwen3_dir, "--general_data_path", bad_files["missing"],
                                        "--domain_data_path", data_files["chem"], "--output_dir", str(tmp_path)])
    assert "nowhere.json" in line


def test_scripts_run_as_files_and_modules_without_traceback(tmp_path, bad_files, qwen3_dir):
    for command in (["gaprune/features/fisher.py"], ["-m", "gaprune.features.fisher"]):
        proc = subprocess.run([sys.executable, *command, "--model_name", qwen3_dir, "--data_path",
                               bad_files["no_positive"], "--output_dir", str(tmp_path / "out")],
                              capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines() == [f"error: {bad_files['no_positive']}: record 0 has no 'positive' field"]
    assert listing(tmp_path / "out") == []
