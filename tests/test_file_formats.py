"""The files users keep between stages do not change with the code: today's writers give what gaprune 0.1.0
wrote (tests/fixtures/format_v0, from tests/fixtures/make_format_v0.py at commit d4751a5), and today's
readers take the old files to the same mask."""

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from gaprune.features import fisher, gradient
from gaprune.model import SparseModel

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "format_v0")
MODEL = os.path.join(FIXTURES, "model", "tiny-bert")  # shipped: the toy tokenizer's training is not deterministic
FIXTURE_ARGS = ["--max_samples", "6", "--batch_size", "2", "--sparsify_layers", "mlp"]
PRUNE_ARGS = ["--unstructured_pct", "0.5", "--unstructured_scoring", "aligned_saliency"]
# values that name where and when a file was written, not what it holds
LOCAL_KEYS = {"timestamp", "model_name", "model_path", "data_path", "domain_data_path", "general_data_path",
              "tensor_file", "general_fisher_scores", "domain_fisher_scores", "alignment_scores"}


def fixture(pattern: str) -> str:
    (path,) = glob.glob(os.path.join(FIXTURES, pattern))
    return path


def assert_same(new, old, where="$"):
    """Same keys in the same order, same types, equal values (floats to rounding), local paths aside."""
    assert type(new) is type(old) or {type(new), type(old)} <= {int, float}, where
    if isinstance(old, dict):
        assert list(new) == list(old), where
        for key in old:
            if not (key in LOCAL_KEYS and isinstance(old[key], str)):
                assert_same(new[key], old[key], f"{where}.{key}")
    elif isinstance(old, list):
        assert len(new) == len(old), where
        for index, (a, b) in enumerate(zip(new, old)):
            assert_same(a, b, f"{where}[{index}]")
    elif isinstance(old, float):
        assert new == pytest.approx(old, rel=1e-3, abs=1e-9), where
    else:
        assert new == old, where


def assert_same_files(new_json: str, old_json: str) -> None:
    with open(new_json) as a, open(old_json) as b:
        new, old = json.load(a), json.load(b)
    assert_same(new, old)
    if "tensor_file" in old.get("metadata", {}):
        new_arrays = load_file(os.path.join(os.path.dirname(new_json), new["metadata"]["tensor_file"]))
        old_arrays = load_file(os.path.join(os.path.dirname(old_json), old["metadata"]["tensor_file"]))
        assert list(new_arrays) == list(old_arrays)
        for name in old_arrays:
            torch.testing.assert_close(new_arrays[name], old_arrays[name], rtol=1e-3, atol=1e-9)


def summary_of(results_json: str) -> str:
    folder, name = os.path.split(results_json)
    summary = name.replace("_fisher_complete_scores_", "_fisher_summary_").replace("alignment_scores_",
                                                                                    "alignment_summary_")
    return os.path.join(folder, summary)


def test_todays_writers_give_the_files_of_version_0_1(tmp_path, data_files):
    common = ["--model_name", MODEL, *FIXTURE_ARGS, "--output_dir", str(tmp_path), "--dtype", "float32"]
    written = {
        "general-example_fisher_complete_scores_*.json":
            fisher.main([*common, "--data_path", data_files["general"]]),
        "chem-example_fisher_complete_scores_*.json": fisher.main([*common, "--data_path", data_files["chem"]]),
        "tiny-bert/alignment_scores_*.json": gradient.main([
            *common, "--general_data_path", data_files["general"], "--domain_data_path", data_files["chem"],
            "--alignment_mode", "local_cosine"]),
    }
    for pattern, new in written.items():
        old = fixture(pattern)
        assert_same_files(new, old)
        assert_same_files(summary_of(new), summary_of(old))


def test_version_0_1_score_files_prune_to_the_same_mask(tmp_path):
    folder = SparseModel.main([
        "--model_path", MODEL, "--output_dir", str(tmp_path), *PRUNE_ARGS,
        "--general_fisher_scores", fixture("general-example_fisher_complete_scores_*.json"),
        "--domain_fisher_scores", fixture("chem-example_fisher_complete_scores_*.json"),
        "--alignment_scores", fixture("tiny-bert/alignment_scores_*.json")])
    for name in ("evaluation_config.json", "unstructured_prune_stats.json"):
        assert_same_files(os.path.join(folder, name), os.path.join(FIXTURES, name))
