import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import last_line, listing
from gaprune.cli import run
from gaprune.model import SparseModel, retrain
from gaprune.modeling import load_embedder
from gaprune.retraining import sparse_finetune, zero_masks
from gaprune.spec import RetrainSpec


@pytest.fixture(scope="session")
def pruned_dir(tmp_path_factory, qwen3_dir):
    out = tmp_path_factory.mktemp("pruned")
    return SparseModel.main(["--model_path", qwen3_dir, "--output_dir", str(out), "--unstructured_pct", "0.5"])


def test_zeros_stay_zero_and_the_loss_falls_on_a_fixed_batch(pruned_dir, chem_triples):
    embedder = load_embedder(pruned_dir, "cpu", "float32")
    params = dict(embedder.model.named_parameters())
    mlp = {n: p for n, p in params.items() if "mlp" in n}
    masks = zero_masks(mlp)
    before = {n: p.detach().clone() for n, p in params.items()}
    zeros = sum(int(m.sum()) for m in masks.values())
    assert zeros == int(sum(p.numel() for p in mlp.values()) * 0.5)
    result = sparse_finetune(embedder, chem_triples[:4], RetrainSpec(steps=8, lr=3e-3, batch_size=4, warmup_steps=0),
                             masks)
    assert result.losses[-1] < result.losses[0] * 0.8
    for name, mask in masks.items():
        assert int((params[name][mask] == 0).sum()) == int(mask.sum())  # every held zero is still zero
        assert bool((params[name][~mask] != before[name][~mask]).any())  # the rest trained


def test_on_step_is_called_once_per_step_with_its_loss_and_training_mode_is_restored(bert_dir, chem_triples):
    embedder = load_embedder(bert_dir, "cpu", "float32")
    calls, modes = [], []

    def on_step(step: int, loss: float) -> None:
        calls.append((step, loss))
        modes.append(embedder.model.training)
        embedder.model.eval()  # as a caller evaluating during training does; training mode comes back after it

    result = sparse_finetune(embedder, chem_triples[:4], RetrainSpec(steps=5, lr=1e-3, batch_size=4, warmup_steps=0,
                                                                     general_ratio=0.0), {}, on_step=on_step)
    assert calls == list(enumerate(result.losses, start=1))
    assert modes == [True] * 5
    assert not embedder.model.training


def test_retrain_cli_saves_a_folder_that_reloads(capsys, tmp_path, pruned_dir, data_files):
    folder = retrain.main(["--model_path", pruned_dir, "--data_path", data_files["chem"], "--output_dir",
                           str(tmp_path), "--steps", "3", "--batch_size", "4", "--lr", "1e-3", "--warmup_steps", "1",
                           "--general_data_path", data_files["general"], "--general_ratio", "0.5"])
    stdout = capsys.readouterr().out
    assert last_line(stdout) == folder and folder.endswith("_retrained_3steps")
    config = json.load(open(os.path.join(folder, "retrain_config.json")))
    assert len(config["loss_curve"]) == 3
    assert config["held_zero_weights"] == config["held_zero_weights_after"] > 0
    saved, pruned = load_file(os.path.join(folder, "model.safetensors")), load_file(os.path.join(pruned_dir, "model.safetensors"))
    for name, weight in pruned.items():
        if "mlp" in name:
            assert bool((saved[name][weight == 0] == 0).all())
    first = load_embedder(folder, "cpu", "float32")
    second = load_embedder(folder, "cpu", "float32")
    with torch.no_grad():
        torch.testing.assert_close(first.embed(["a test sentence"]), second.embed(["a test sentence"]))
    assert not torch.equal(saved["layers.0.mlp.up_proj.weight"], pruned["layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "must be at least 1"),
    (["--model_path", "NOT_A_MODEL"], "is not a model folder"),
    (["--data_path", "BAD_DATA"], "has no 'positive' field"),
])
def test_retrain_bad_input(capsys, tmp_path, pruned_dir, data_files, argv, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"query": "q", "negative": "n"}]))
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    base = {"--model_path": pruned_dir, "--data_path": data_files["chem"], "--output_dir": str(tmp_path / "out")}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = {"NOT_A_MODEL": str(not_a_model), "BAD_DATA": str(bad)}.get(value, value)
    with pytest.raises(SystemExit) as exit_info:
        run(retrain.main, [x for pair in base.items() for x in pair])
    assert exit_info.value.code != 0
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and "Loading" not in l]
    assert len(err) == 1 and message in err[0]
    assert listing(tmp_path / "out") == []
