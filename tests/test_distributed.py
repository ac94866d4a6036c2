"""torchrun (2 CPU processes on gloo) against one process, and the one-pass calibration against three runs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from gaprune.features import fisher, gradient, sample
from gaprune.model import SparseModel, compare, evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def arrays(json_path: str) -> dict[str, np.ndarray]:
    data = json.load(open(json_path))
    return load_file(os.path.join(os.path.dirname(json_path), data["metadata"]["tensor_file"]))


def torchrun(module: str, args: list[str], nproc: int = 2, logged: str | list[str] = "", device: str = "cpu") -> str:
    """Run ``python -m module args`` under torchrun on the CPU (gloo) or one GPU per process (nccl); the path
    rank 0 printed last. ``logged``: a line (or lines) rank 0 must have logged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", module, *args, "--device", device, "--dtype", "float32"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    backend = "nccl" if device == "cuda" else "gloo"
    assert f"rank {nproc - 1} of {nproc} ({backend})" in done.stderr  # really shared out
    for line in [logged] if isinstance(logged, str) else logged:
        assert line in done.stderr, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def assert_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rtol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        scale = np.abs(b[name]).max()
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=rtol * scale, err_msg=name)


def assert_fisher_files_close(folder: str, reference: str, rtol: float = 1e-5) -> None:
    """The one-pass Fisher arrays of each side in ``folder`` against ``reference``'s."""
    for side in ("general", "chem"):
        [path, expected] = [next(os.path.join(f, name) for name in os.listdir(f) if name.startswith(side)
                                 and "complete" in name and name.endswith(".json")) for f in (folder, reference)]
        assert_close(arrays(path), arrays(expected), rtol)


PLACES = {"device": "sums on device", "sharded": "sums sharded across 2 ranks: rank 0 holds"}  # and what is logged


@pytest.mark.parametrize("place", PLACES)
def test_torchrun_fisher_equals_one_process(capsys, tmp_path, qwen3_dir, data_files, place):
    """5 triples in batches of 2: the ranks take 2 and 1 batches (sharded, rank 1 reduces zeros for the third)."""
    common = ["--model_name", qwen3_dir, "--data_path", data_files["chem"], "--max_samples", "5", "--batch_size", "2"]
    single = fisher.main([*common, "--output_dir", str(tmp_path / "one"), "--device", "cpu", "--dtype", "float32"])
    capsys.readouterr()
    shared = torchrun("gaprune.features.fisher", [*common, "--output_dir", str(tmp_path / "two"),
                                                  "--accumulate_on", place], logged=PLACES[place])
    assert os.path.dirname(shared) == str(tmp_path / "two") and len(os.listdir(tmp_path / "two")) == 3  # rank 0 only
    assert_close(arrays(shared), arrays(single))
    one, two = json.load(open(single)), json.load(open(shared))
    for name, value in one["summary_statistics"].items():
        assert two["summary_statistics"][name]["mean_score"] == pytest.approx(value["mean_score"], rel=1e-5)
    assert two["metadata"]["num_samples"] == 5
    assert two["metadata"]["first_batch_loss"] == pytest.approx(one["metadata"]["first_batch_loss"], rel=1e-6)
    assert two["metadata"]["mean_loss"] == pytest.approx(one["metadata"]["mean_loss"], rel=1e-5)


@pytest.mark.parametrize("place, device", [
    ("device", "cpu"), ("sharded", "cpu"),
    pytest.param("sharded", "cuda", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"))])
def test_torchrun_alignment_and_one_pass_fisher_equal_one_process(capsys, tmp_path, qwen3_dir, data_files, place,
                                                                   device):
    """5 steps: the ranks take 3 and 2. Sharded, with per-row cosines: arrays of another shape sent to rank 0
    (on GPUs through nccl, whose kernels add in their own order: 1e-4)."""
    mode = "row_cosine" if place == "sharded" else "local_cosine"
    rtol = 1e-4 if device == "cuda" else 1e-5
    common = ["--model_name", qwen3_dir, "--general_data_path", data_files["general"], "--domain_data_path",
              data_files["chem"], "--max_samples", "10", "--batch_size", "2", "--alignment_mode", mode,
              "--no-use_distributed"]
    single = gradient.main([*common, "--output_dir", str(tmp_path / "one"), "--fisher_output_dir",
                            str(tmp_path / "one-fisher"), "--device", device, "--dtype", "float32"])
    capsys.readouterr()
    shared = torchrun("gaprune.features.gradient", [*common, "--output_dir", str(tmp_path / "two"),
                                                    "--fisher_output_dir", str(tmp_path / "two-fisher"),
                                                    "--accumulate_on", place], logged=PLACES[place], device=device)
    assert_close(arrays(shared), arrays(single), rtol)
    one, two = json.load(open(single)), json.load(open(shared))
    for key in ("alignment_scores", "conflict_rates"):
        for name, value in one[key].items():
            assert two[key][name] == pytest.approx(value, rel=rtol, abs=1e-6), (key, name)
    assert_fisher_files_close(tmp_path / "two-fisher", tmp_path / "one-fisher", rtol)


def test_torchrun_gathering_makes_one_loss_of_both_ranks(tmp_path, qwen3_dir, data_files):
    """With --use_distributed (the published default) each step's loss spans both ranks' half-batches:
    5 steps do not split evenly, so the last is dropped, and the in-batch negatives double the loss's
    candidates, so the mean loss differs from the one-process run over the same steps. Sharded sums (their
    reductions after the gathers of every step) give the same files."""
    common = ["--model_name", qwen3_dir, "--general_data_path", data_files["general"], "--domain_data_path",
              data_files["chem"], "--max_samples", "10", "--batch_size", "2"]
    gathered_path = torchrun("gaprune.features.gradient", [*common, "--output_dir", str(tmp_path / "g")])
    gathered = json.load(open(gathered_path))
    alone = json.load(open(torchrun("gaprune.features.gradient",
                                    [*common, "--output_dir", str(tmp_path / "a"), "--no-use_distributed"])))
    assert alone["metadata"]["processed_batches"] == 5
    assert gathered["metadata"]["processed_batches"] == 4
    assert gathered["losses"]["general"] != pytest.approx(alone["losses"]["general"], rel=1e-3)
    sharded = torchrun("gaprune.features.gradient", [*common, "--output_dir", str(tmp_path / "s"),
                                                     "--accumulate_on", "sharded"], logged=PLACES["sharded"])
    assert_close(arrays(sharded), arrays(gathered_path))
    assert json.load(open(sharded))["alignment_scores"] == pytest.approx(gathered["alignment_scores"], rel=1e-5,
                                                                         abs=1e-6)


def test_one_pass_equals_fisher_runs_at_the_published_batch_sizes(capsys, tmp_path, qwen3_dir, data_files):
    """gradient.py --batch_size 2 draws every one of the 12 triples of each file once (max_samples 24):
    its per-side Fisher equals fisher.py --batch_size 1 over the same file."""
    passed = gradient.main(["--model_name", qwen3_dir, "--general_data_path", data_files["general"],
                            "--domain_data_path", data_files["chem"], "--max_samples", "24", "--batch_size", "2",
                            "--output_dir", str(tmp_path / "g"), "--fisher_output_dir", str(tmp_path / "f1")])
    assert "Domain Fisher scores (same pass, 12 triples)" in capsys.readouterr().out
    assert json.load(open(passed))["metadata"]["processed_batches"] == 12
    for side, data in (("general", data_files["general"]), ("chem", data_files["chem"])):
        separate = fisher.main(["--model_name", qwen3_dir, "--data_path", data, "--batch_size", "1",
                                "--output_dir", str(tmp_path / "f3")])
        [same] = [f for f in os.listdir(tmp_path / "f1") if f.startswith(side) and "complete" in f and f.endswith(".json")]
        one_pass = json.load(open(tmp_path / "f1" / same))
        assert_close(arrays(str(tmp_path / "f1" / same)), arrays(separate))
        reference = json.load(open(separate))
        assert one_pass["metadata"]["num_samples"] == reference["metadata"]["num_samples"] == 12
        assert one_pass["metadata"]["mean_loss"] == pytest.approx(reference["metadata"]["mean_loss"], rel=1e-5)
        for name, value in reference["summary_statistics"].items():
            assert one_pass["summary_statistics"][name]["mean_score"] == pytest.approx(value["mean_score"], rel=1e-5)


def test_torchrun_sample_and_evaluate_equal_one_process(capsys, tmp_path, qwen3_dir, data_files):
    """Each rank embeds its share (7 texts: 4 + 3) and all ranks get every row: the same k-means subset and
    the same retrieval metrics as one process."""
    common = ["--input_file", data_files["general"], "--model_name", qwen3_dir, "--target_sample_size", "5",
              "--batch_size", "2"]
    single = sample.main([*common, "--output_file", str(tmp_path / "one.json"), "--device", "cpu", "--dtype", "float32"])
    shared = torchrun("gaprune.features.sample", [*common, "--output_file", str(tmp_path / "two.json")])
    assert json.load(open(shared)) == json.load(open(single))
    common = ["--model_path", qwen3_dir, "--data_paths", data_files["chem"], "--max_samples", "7", "--batch_size", "2"]
    single = evaluate.main([*common, "--output_file", str(tmp_path / "one-eval.json"), "--device", "cpu", "--dtype", "float32"])
    capsys.readouterr()
    shared = torchrun("gaprune.model.evaluate", [*common, "--output_file", str(tmp_path / "two-eval.json")])
    one, two = (json.load(open(path))["results"][data_files["chem"]]["metrics"] for path in (single, shared))
    assert one.keys() == two.keys()
    for metric, value in one.items():
        assert two[metric] == pytest.approx(value, abs=1e-6), metric


@pytest.mark.parametrize("structure", ["unstructured", "channels"])
def test_torchrun_compare_equals_one_process(capsys, tmp_path, qwen3_dir, data_files, structure):
    """Every rank prunes (rank 0's weights given to all) and encodes its share of the held-out texts: the same
    rows as one process, calibrated SparseGPT and a seeded random mask included."""
    unstructured = structure == "unstructured"
    scorers = ["magnitude", "random", "sparsegpt"] if unstructured else ["magnitude"]
    calibration = ["--calibration_data", data_files["chem"], "--calibration_samples", "4"] if unstructured else []
    common = ["--model_path", qwen3_dir, "--domain_data_paths", data_files["chem"], "--general_data_paths",
              data_files["general"], "--max_samples", "7", "--batch_size", "2", "--structure", structure,
              "--sparsity", "0.5", "--scorers", *scorers, *calibration]
    single = compare.main([*common, "--output_dir", str(tmp_path / "one"), "--device", "cpu", "--dtype", "float32"])
    capsys.readouterr()
    shared = torchrun("gaprune.model.compare", [*common, "--output_dir", str(tmp_path / "two")],
                      logged="calibration shared among 2 ranks: this rank runs 1 batches" if unstructured else "")
    assert len(os.listdir(tmp_path / "two")) == 2  # rank 0 alone wrote
    one, two = (json.load(open(path))["rows"] for path in (single, shared))
    assert [row["method"] for row in two] == [row["method"] for row in one] and len(one) == len(scorers) + 1
    for a, b in zip(one, two):
        for side in ("domain", "general"):
            for metric, value in a[side].items():
                assert b[side][metric] == pytest.approx(value, abs=1e-6), (a["method"], side, metric)


@pytest.mark.parametrize("samples, batch, share, weighting, target", [
    (4, 4, 3, "uniform", "own"), (4, 4, 3, "loss_gradient", "own"), (3, 9, 1, "uniform", "own"),
    (4, 4, 3, "uniform", "dense")])
def test_torchrun_sparsegpt_shares_its_calibration_and_equals_one_process(capsys, tmp_path, qwen3_dir, data_files,
                                                                          samples, batch, share, weighting, target):
    """SparseModel.py under torchrun: the ranks share the calibration batches, sum their statistics before each
    layer is pruned, and rank 0 alone saves the same checkpoint. 24 texts in batches of 4: 3 batches each,
    unequal between the sides (rank 0: 2 domain, 1 general), also with each token weighted by the loss's
    gradients (the ranks then share the loss's batches of triples too: rank 0 the domain one, rank 1 the
    general one); 18 texts in batches of 9: rank 0 holds the domain batch only, rank 1 the general one; and
    towards the dense model's outputs (each rank's dense hidden states, the cross statistics summed)."""
    common = ["--model_path", qwen3_dir, "--unstructured_pct", "0.5", "--unstructured_scoring", "sparsegpt",
              "--calibration_data", data_files["chem"], "--general_calibration_data", data_files["general"],
              "--calibration_samples", str(samples), "--calibration_batch_size", str(batch),
              "--calibration_weighting", weighting, "--reconstruction_target", target]
    single = SparseModel.main([*common, "--output_dir", str(tmp_path / "one"), "--device", "cpu", "--dtype",
                               "float32"])
    capsys.readouterr()
    shared = torchrun("gaprune.model.SparseModel", [*common, "--output_dir", str(tmp_path / "two")],
                      logged=[f"calibration shared among 2 ranks: this rank runs {share} batches"]
                      + (["loss gradients shared among 2 ranks: this rank runs 1 of 2 batches"]
                         if weighting == "loss_gradient" else []))
    assert len(os.listdir(tmp_path / "two")) == 1  # rank 0 alone saved
    one, two = (load_file(os.path.join(folder, "model.safetensors")) for folder in (single, shared))
    assert sorted(one) == sorted(two)
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)
        assert np.array_equal(two[name] == 0, one[name] == 0), name  # the same mask


LOSS_GRADIENT_WEIGHTS = """
import logging, sys, torch
from gaprune import distributed
from gaprune.calibration import loss_gradient_weights
from gaprune.data import load_triples, triple_texts
from gaprune.layers import select_parameters
from gaprune.modeling import load_embedder

model_dir, chem, general, out = sys.argv[1:]
logging.basicConfig(level=logging.INFO)
world = distributed.init_from_env("cpu")
embedder = load_embedder(model_dir, "cpu", "float32")
texts = {"domain": triple_texts(load_triples(chem, 4)), "general": triple_texts(load_triples(general, 5))}
weights = loss_gradient_weights(embedder, texts, list(select_parameters(embedder.model.named_parameters(), ["mlp"])),
                                batch_size=2)
ragged = world.gather_ragged(torch.full((1 + 2 * world.rank, 2), float(world.rank)))  # rank 1 has more rows
if world.is_main:
    torch.save({"weights": weights, "ragged": ragged}, out)
distributed.shutdown()
"""


def test_torchrun_loss_gradient_weights_equal_one_process(tmp_path, qwen3_dir, data_files):
    """The ranks share the loss's batches of triples in contiguous blocks (2 domain and 3 general batches:
    rank 0 runs both domain ones and the first general one, rank 1 the other two) and every rank then holds
    every weight: rank 0's equal one process's exactly, text by text. World.gather_ragged keeps every rank's
    rows, in rank order, when a later rank has more of them."""
    script = tmp_path / "weights.py"
    script.write_text(LOSS_GRADIENT_WEIGHTS)
    args = [qwen3_dir, data_files["chem"], data_files["general"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    for nproc, out in ((1, "one.pt"), (2, "two.pt")):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(nproc), str(script), *args, str(tmp_path / out)], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "loss gradients shared among 2 ranks: this rank runs 3 of 5 batches" in done.stderr, done.stderr[-3000:]
    one, two = (torch.load(tmp_path / out) for out in ("one.pt", "two.pt"))
    assert one["ragged"].tolist() == [[0.0, 0.0]]
    assert two["ragged"].tolist() == [[0.0, 0.0]] + [[1.0, 1.0]] * 3
    one, two = one["weights"], two["weights"]
    assert list(one) == list(two) == ["domain", "general"]
    for side in one:
        assert list(one[side]) == list(two[side])
        for name, per_text in one[side].items():
            assert len(per_text) == 3 * (4 if side == "domain" else 5)
            for expected, got in zip(per_text, two[side][name]):
                assert torch.equal(got, expected), (side, name)


def test_one_pass_fisher_refuses_gathered_embeddings(qwen3_dir, chem_triples, web_triples):
    """With embeddings gathered across ranks, all_gather's backward adds every rank's share into each
    rank's gradients: they are no longer one half-batch's own, so the one-pass Fisher would be wrong."""
    from gaprune.distributed import World
    from gaprune.errors import InputError
    from gaprune.gradient_alignment import gradient_alignment
    from gaprune.modeling import load_embedder

    embedder = load_embedder(qwen3_dir, "cpu", "float32")
    with pytest.raises(InputError, match="--no-use_distributed with --fisher_output_dir"):
        gradient_alignment(embedder, web_triples, chem_triples, 2, 8, ["mlp"], distributed=True, with_fisher=True,
                           world=World(0, 2))
