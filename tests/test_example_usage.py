"""example_usage.sh end to end on a tiny model: the final folder reloads with the requested MLP sparsity."""

import json
import os
import re
import shutil
import subprocess

import pytest
from safetensors.torch import load_file
from transformers import AutoConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("sparsity", ["0.5"])
def test_example_usage_runs_every_stage(tmp_path, qwen3_dir, data_files, sparsity):
    shutil.copy(os.path.join(REPO, "example_usage.sh"), tmp_path)
    os.makedirs(tmp_path / "data")
    shutil.copy(data_files["chem"], tmp_path / "data" / "chem-example.json")
    shutil.copy(data_files["general"], tmp_path / "data" / "general-example.json")
    env = dict(os.environ, MODEL=qwen3_dir, DEVICE="cpu", SPARSITY=sparsity, SAMPLE_SIZE="6", MAX_SAMPLES="6",
               BATCH_SIZE="2", RETRAIN_STEPS="2", VALIDATION_SIZE="4")
    proc = subprocess.run(["bash", str(tmp_path / "example_usage.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("sample general data", "sample domain data", "Fisher information, general",
                  "Fisher information, domain", "gradient alignment", "pruning (unstructured, dai)", "retraining",
                  "evaluation of output/model/tiny-qwen3_dai_prune_50%", "evaluation of output/retrain/"):
        assert f"==> {stage}" in proc.stderr
    folder = re.search(r"Pruned model: (.*)", proc.stdout).group(1)
    assert folder == "output/model/tiny-qwen3_dai_prune_50%"
    weights = load_file(os.path.join(tmp_path, folder, "model.safetensors"))
    mlp = [w for n, w in weights.items() if "mlp" in n]
    zeros = sum(int((w == 0).sum()) for w in mlp)
    assert zeros == int(sum(w.numel() for w in mlp) * 0.5)
    assert len(os.listdir(tmp_path / "output" / "fisher")) == 6  # two results, each JSON + arrays + summary
    assert sorted(os.listdir(tmp_path / "data" / "sample")) == [  # the samples and the validation splits
        "chem-example-output-validation.json", "chem-example-output.json", "general-example-output-validation.json",
        "general-example-output.json"]
    assert "Validation split: 4 records" in proc.stderr and "not a held-out measurement" not in proc.stderr
    report = json.load(open(tmp_path / "output" / "eval" / "tiny-qwen3_dai_prune_50%_eval.json", encoding="utf-8"))
    assert "data/sample/chem-example-output-validation.json" in json.dumps(report)
    assert re.search(r"Retrained model: output/retrain/tiny-qwen3_dai_prune_50%_retrained_2steps", proc.stdout)
    assert sorted(os.listdir(tmp_path / "output" / "eval")) == [
        "tiny-qwen3_dai_prune_50%_eval.json", "tiny-qwen3_dai_prune_50%_retrained_2steps_eval.json"]


def test_example_usage_one_pass_removes_channels_then_retrains_and_evaluates(tmp_path, qwen3_dir, data_files):
    shutil.copy(os.path.join(REPO, "example_usage.sh"), tmp_path)
    env = dict(os.environ, MODEL=qwen3_dir, DEVICE="cpu", SAMPLE_SIZE="6", MAX_SAMPLES="6", BATCH_SIZE="2",
               RETRAIN_STEPS="2", STRUCTURE="channels", SCORER="aligned_saliency", ONE_PASS="1",
               VALIDATION_SIZE="0")
    proc = subprocess.run(["bash", str(tmp_path / "example_usage.sh")],
                          env=dict(env, GENERAL_DATA=data_files["general"], DOMAIN_DATA=data_files["chem"]),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "==> pruning (channels, aligned_saliency)" in proc.stderr
    assert "==> gradient alignment and Fisher information, one pass" in proc.stderr  # ONE_PASS: no fisher.py runs
    assert "==> Fisher information, general" not in proc.stderr
    assert len(os.listdir(tmp_path / "output" / "fisher")) == 6  # both sides' files, which the pruning read
    pruned = re.search(r"Pruned model: (.*)", proc.stdout).group(1)
    retrained = re.search(r"Retrained model: (.*)", proc.stdout).group(1)
    assert pruned == "output/model/tiny-qwen3_aligned_saliency_channels_50%"
    for folder in (pruned, retrained):
        assert AutoConfig.from_pretrained(os.path.join(tmp_path, folder)).intermediate_size == 64  # of 128
    assert len(os.listdir(tmp_path / "output" / "eval")) == 2


def test_example_usage_stops_at_the_first_failing_stage(tmp_path, qwen3_dir):
    shutil.copy(os.path.join(REPO, "example_usage.sh"), tmp_path)
    env = dict(os.environ, MODEL=qwen3_dir, DEVICE="cpu")
    proc = subprocess.run(["bash", str(tmp_path / "example_usage.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "example_usage.sh: data file not found: data/general-example.json" in proc.stderr
    assert "==> " not in proc.stderr  # checked before the first stage
    assert not os.path.exists(tmp_path / "output")


def test_example_usage_shares_the_stages_out_with_nproc(tmp_path, qwen3_dir, data_files):
    """NPROC=2: sampling, both Fisher runs, the alignment and the evaluation run under torchrun (gloo on the
    CPU), gradient.py with --no-use_distributed; the mask is one process's, up to weights at the threshold whose
    scores differ in the last bits (the sums are added in another order: 14 of 8M weights swapped on MiniLM).
    No validation split: k-means on 8 of these templated queries meets near-ties, where the last bits of the
    ranks' embeddings pick other records than one process."""
    shutil.copy(os.path.join(REPO, "example_usage.sh"), tmp_path)
    env = dict(os.environ, MODEL=qwen3_dir, DEVICE="cpu", SAMPLE_SIZE="6", MAX_SAMPLES="6", BATCH_SIZE="2",
               VALIDATION_SIZE="0", GENERAL_DATA=data_files["general"], DOMAIN_DATA=data_files["chem"])
    proc = subprocess.run(["bash", str(tmp_path / "example_usage.sh")], env=dict(env, NPROC="2"),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("rank 1 of 2 (gloo)") == 6  # two samplings, two Fisher runs, gradient, evaluation
    shared = load_file(os.path.join(tmp_path, re.search(r"Pruned model: (.*)", proc.stdout).group(1),
                                    "model.safetensors"))
    alone_dir = tmp_path / "alone"
    os.makedirs(alone_dir)
    shutil.copy(os.path.join(REPO, "example_usage.sh"), alone_dir)
    proc = subprocess.run(["bash", str(alone_dir / "example_usage.sh")], env=dict(env, EVALUATE="0"),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = load_file(os.path.join(alone_dir, re.search(r"Pruned model: (.*)", proc.stdout).group(1),
                                   "model.safetensors"))
    mlp = [name for name in alone if "mlp" in name]
    assert sum(int((alone[n] == 0).sum()) for n in mlp) == sum(int((shared[n] == 0).sum()) for n in mlp)
    swapped = sum(int(((alone[n] == 0) != (shared[n] == 0)).sum()) for n in mlp)
    assert swapped <= 0.001 * sum(alone[n].numel() for n in mlp)


def test_example_usage_refuses_a_bad_nproc(tmp_path, qwen3_dir, data_files):
    shutil.copy(os.path.join(REPO, "example_usage.sh"), tmp_path)
    env = dict(os.environ, MODEL=qwen3_dir, NPROC="0", GENERAL_DATA=data_files["general"],
               DOMAIN_DATA=data_files["chem"])
    proc = subprocess.run(["bash", str(tmp_path / "example_usage.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "NPROC must be a whole number of at least 1, got '0'" in proc.stderr
