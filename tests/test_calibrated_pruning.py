"""Wanda, SparseGPT, N:M patterns and reconstruction through SparseModel.py and compare.py."""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import hooked_inputs, listing
from gaprune import api
from gaprune.calibration import loss_gradient_weights, prune_block_by_block
from gaprune.cli import run
from gaprune.data import load_triples, triple_texts
from gaprune.errors import InputError
from gaprune.features import gradient
from gaprune.layers import select_parameters
from gaprune.loss import info_nce
from gaprune.model import SparseModel, compare
from gaprune.modeling import load_embedder, pool
from gaprune.pruners import BLOCK_SIZE
from gaprune.pruning import Calibration
from gaprune.spec import CalibrationSpec, PruneSpec, ScoreFiles


def prune(tmp_path, model_dir, data_files, *extra) -> tuple[str, dict, dict]:
    folder = SparseModel.main(["--model_path", model_dir, "--output_dir", str(tmp_path), "--calibration_data",
                               data_files["chem"], "--calibration_samples", "6", *extra])
    return folder, load_file(os.path.join(folder, "model.safetensors")), json.load(
        open(os.path.join(folder, "unstructured_prune_stats.json")))


def first_layer_input_sq(embedder, texts, module_name) -> torch.Tensor:
    """sum over real tokens of x_j^2 at a layer of the dense model (the first block sees no pruned layer)."""
    module = embedder.model.get_submodule(module_name)
    real = {}
    handle = module.register_forward_pre_hook(
        lambda m, args: real.__setitem__("sum", real.get("sum", 0) + args[0][real["mask"]].square().sum(0)))
    with torch.no_grad():
        for start in range(0, len(texts), 8):
            tokens = embedder.tokenize(texts[start:start + 8])
            real["mask"] = tokens["attention_mask"].bool()
            embedder.model(**tokens)
    handle.remove()
    return real["sum"]


def test_wanda_prunes_half_of_each_row_by_weight_times_input_norm(tmp_path, bert_dir, data_files):
    folder, weights, stats = prune(tmp_path, bert_dir, data_files, "--unstructured_scoring", "wanda",
                                   "--unstructured_pct", "0.5")
    assert os.path.basename(folder) == "tiny-bert_wanda_prune_50%"
    assert stats["layer_budget_strategy"] == "row" and stats["masked_params"] == stats["total_params_considered"] // 2
    assert stats["diagnostics"] == {}  # the default uniform shares add nothing to the published report
    dense = load_embedder(bert_dir, "cpu")
    name = "encoder.layer.0.intermediate.dense"
    input_sq = first_layer_input_sq(dense, triple_texts(load_triples(data_files["chem"], 6)), name)
    weight = dict(dense.model.named_parameters())[name + ".weight"].detach()
    metric = weight.abs() * input_sq.sqrt()
    expected = torch.zeros_like(weight, dtype=torch.bool)
    for row in range(weight.shape[0]):  # the half of each row with the smallest |W| * ||X||
        expected[row, torch.argsort(metric[row], stable=True)[:weight.shape[1] // 2]] = True
    assert torch.equal(weights[name + ".weight"] == 0, expected)
    for key, value in weights.items():  # nothing outside the candidates moves
        if "intermediate.dense.weight" not in key and not ("output.dense.weight" in key and "attention" not in key):
            assert torch.equal(value, dense.model.state_dict()[key]), key


def test_sparsegpt_2_4_zeroes_two_of_every_four_and_updates_the_rest(tmp_path, qwen3_dir, data_files):
    folder, weights, stats = prune(tmp_path, qwen3_dir, data_files, "--unstructured_scoring", "sparsegpt",
                                   "--sparsity_pattern", "2:4")
    assert os.path.basename(folder) == "tiny-qwen3_sparsegpt_prune_2of4"
    dense = load_file(os.path.join(qwen3_dir, "model.safetensors"))
    config = json.load(open(os.path.join(folder, "evaluation_config.json")))["meta"]["unstructured_pruning"]
    assert config["sparsity_pattern"] == "2:4" and config["calibration"]["texts"] == {"domain": 18}
    for name in stats["per_param"]:
        zeros = (weights[name] == 0).view(weights[name].shape[0], -1, 4).sum(-1)
        assert (zeros == 2).all(), name
        kept = weights[name] != 0
        assert (weights[name][kept] != dense[name][kept]).float().mean() > 0.9  # the kept weights were updated


def magnitude_shares(model_dir, k_share) -> dict[str, float]:
    """Each MLP weight's share of the globally smallest |w| (ties cannot occur in random float weights)."""
    dense = load_file(os.path.join(model_dir, "model.safetensors"))
    names = [n for n in dense if n.startswith("encoder.layer") and n.endswith("dense.weight") and "attention" not in n]
    everything = torch.cat([dense[n].abs().flatten() for n in names])
    threshold = everything.sort().values[int(everything.numel() * k_share) - 1]
    return {n: (dense[n].abs() <= threshold).sum().item() / dense[n].numel() for n in names}


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_layer_shares_take_each_layer_share_from_a_global_ranking(tmp_path, bert_dir, data_files, pruner):
    folder, weights, stats = prune(tmp_path, bert_dir, data_files, "--unstructured_scoring", pruner,
                                   "--unstructured_pct", "0.5", "--layer_shares", "magnitude")
    assert os.path.basename(folder) == f"tiny-bert_{pruner}_prune_50%_magnitude_shares"
    config = json.load(open(os.path.join(folder, "evaluation_config.json")))["meta"]["unstructured_pruning"]
    assert config["layer_shares"] == "magnitude"
    shares = magnitude_shares(bert_dir, 0.5)
    assert len({round(share, 3) for share in shares.values()}) > 2  # the ranking moves the budget between layers
    assert set(stats["per_param"]) == set(shares)
    for name, share in shares.items():
        rows, columns = weights[name].shape
        zeros = weights[name] == 0
        if pruner == "wanda":  # each row loses int(share * columns), the layer's share
            assert (zeros.sum(1) == int(share * columns)).all(), name
        else:  # each block of columns loses int(share * its weights)
            assert zeros.sum().item() == sparsegpt_count(rows, columns, share), name


def sparsegpt_count(rows: int, columns: int, share: float) -> int:
    return sum(int(rows * min(BLOCK_SIZE, columns - start) * share) for start in range(0, columns, BLOCK_SIZE))


def test_compare_takes_layer_shares_from_the_fisher_ranking(tmp_path, bert_dir, data_files, score_files):
    alignment = gradient.main(["--model_name", bert_dir, "--max_samples", "6", "--batch_size", "2",
                               "--general_data_path", data_files["general"], "--domain_data_path", data_files["chem"],
                               "--alignment_mode", "local_cosine", "--output_dir", str(tmp_path / "scores")])
    files = ["--domain_fisher_scores", score_files["bert"]["domain"], "--general_fisher_scores",
             score_files["bert"]["general"], "--alignment_scores", alignment]
    path = compare.main(["--model_path", bert_dir, "--domain_data_paths", data_files["chem"], "--general_data_paths",
                         data_files["general"], "--scorers", "aligned_saliency", "sparsegpt", "--sparsity", "0.6",
                         "--layer_shares", "aligned_saliency", "--calibration_data", data_files["chem"],
                         "--calibration_samples", "4", "--output_dir", str(tmp_path / "out"), *files])
    rows = json.load(open(path))["rows"]
    assert [r["method"] for r in rows] == ["dense", "aligned_saliency", "sparsegpt, aligned_saliency shares"]
    assert "layer_shares" not in rows[1] and rows[2]["layer_shares"] == "aligned_saliency"
    embedder = load_embedder(bert_dir, "cpu")  # the shares: aligned_saliency's global mask, with the cosine term
    ranked = api.prune(embedder, PruneSpec(scorer="aligned_saliency", sparsity=0.6),
                       ScoreFiles(general_fisher=score_files["bert"]["general"],
                                  domain_fisher=score_files["bert"]["domain"], alignment=alignment))
    assert ranked.masked == rows[1]["masked_params"]
    assert rows[2]["masked_params"] == sum(sparsegpt_count(*dict(embedder.model.named_parameters())[name].shape,
                                                           info["ratio"]) for name, info in ranked.per_param.items())
    with pytest.raises(InputError, match="--layer_shares sets the layer shares of wanda and sparsegpt"):
        compare.main(["--model_path", bert_dir, "--domain_data_paths", data_files["chem"], "--general_data_paths",
                      data_files["general"], "--scorers", "magnitude",
                      "--layer_shares", "magnitude", "--output_dir", str(tmp_path / "refused")])
    with pytest.raises(InputError, match="--structure channels removes whole units"):
        compare.main(["--model_path", bert_dir, "--domain_data_paths", data_files["chem"], "--general_data_paths",
                      data_files["general"], "--structure", "channels",
                      "--scorers", "magnitude", "--layer_shares", "magnitude", "--output_dir", str(tmp_path / "refused")])


def test_sparsegpt_2_4_in_hessian_group_order(tmp_path, qwen3_dir, data_files):
    folder, weights, stats = prune(tmp_path, qwen3_dir, data_files, "--unstructured_scoring", "sparsegpt",
                                   "--sparsity_pattern", "2:4", "--group_order", "hessian")
    assert os.path.basename(folder) == "tiny-qwen3_sparsegpt_prune_2of4_hessian_order"
    config = json.load(open(os.path.join(folder, "evaluation_config.json")))["meta"]["unstructured_pruning"]
    assert config["group_order"] == "hessian" and stats["diagnostics"] == {"group_order": "hessian"}
    _, natural, _ = prune(tmp_path / "natural", qwen3_dir, data_files, "--unstructured_scoring", "sparsegpt",
                          "--sparsity_pattern", "2:4")
    for name in stats["per_param"]:
        assert ((weights[name] == 0).view(weights[name].shape[0], -1, 4).sum(-1) == 2).all(), name
    assert any(not torch.equal(weights[name] == 0, natural[name] == 0) for name in stats["per_param"])


def layer_inputs(model_dir, weights, texts, name) -> torch.Tensor:
    """The inputs of one layer at the real tokens of ``texts``, in the model of ``model_dir`` with ``weights``."""
    embedder = load_embedder(model_dir, "cpu")
    embedder.model.load_state_dict(weights, strict=False)
    return hooked_inputs(embedder.model, [name], embedder, {"domain": texts}, len(texts))[name]


def test_dense_target_reproduces_the_dense_model_s_outputs(tmp_path, qwen3_dir, data_files):
    """Magnitude's mask with reconstruction towards the dense model's outputs: layers whose inputs nothing pruned
    changed (the first block's gate and up projections) get the same weights as with their own outputs as the
    target; the first down projection then fits the dense model's outputs better, ||X W^T - X~ V^T||, on the very
    same pruned inputs X~; SparseGPT takes the flag too, and both record it."""
    _, own, _ = prune(tmp_path / "own", qwen3_dir, data_files, "--unstructured_scoring", "magnitude",
                      "--unstructured_pct", "0.5", "--reconstruct")
    folder, dense, stats = prune(tmp_path / "dense", qwen3_dir, data_files, "--unstructured_scoring", "magnitude",
                                 "--unstructured_pct", "0.5", "--reconstruct", "--reconstruction_target", "dense")
    assert os.path.basename(folder) == "tiny-qwen3_magnitude_prune_50%_reconstructed_dense_target"
    config = json.load(open(os.path.join(folder, "evaluation_config.json")))["meta"]["unstructured_pruning"]
    assert config["reconstruction_target"] == "dense" and config["reconstruct"] is True
    first = "layers.0.mlp.{}_proj.weight"
    for name in (first.format("gate"), first.format("up")):
        torch.testing.assert_close(dense[name], own[name], rtol=1e-5, atol=1e-6)
    assert sum(not torch.allclose(dense[name], own[name], atol=1e-4) for name in stats["per_param"]) \
        == len(stats["per_param"]) - 2
    for name in stats["per_param"]:
        assert torch.equal(dense[name] == 0, own[name] == 0), name  # magnitude's mask either way
    down = first.format("down")
    texts = triple_texts(load_triples(data_files["chem"], 6))
    weight = load_file(os.path.join(qwen3_dir, "model.safetensors"))[down]
    target = layer_inputs(qwen3_dir, {}, texts, down) @ weight.T
    pruned_inputs = layer_inputs(qwen3_dir, dense, texts, down)
    torch.testing.assert_close(pruned_inputs, layer_inputs(qwen3_dir, own, texts, down))
    errors = {key: (target - pruned_inputs @ weights[down].T).norm().item()
              for key, weights in (("own", own), ("dense", dense))}
    assert errors["dense"] < 0.9 * errors["own"], errors
    folder, dense, stats = prune(tmp_path / "sparsegpt", qwen3_dir, data_files, "--unstructured_scoring",
                                 "sparsegpt", "--unstructured_pct", "0.5", "--reconstruction_target", "dense")
    assert os.path.basename(folder) == "tiny-qwen3_sparsegpt_prune_50%_dense_target"
    assert stats["diagnostics"] == {"reconstruction_target": "dense"}
    _, own, _ = prune(tmp_path / "sparsegpt_own", qwen3_dir, data_files, "--unstructured_scoring", "sparsegpt",
                      "--unstructured_pct", "0.5")
    for name in (first.format("gate"), first.format("up")):
        torch.testing.assert_close(dense[name], own[name], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(dense[down], own[down], atol=1e-4)
    with pytest.raises(InputError, match="sparsegpt already updates the kept weights"):  # the target applied twice
        PruneSpec(scorer="sparsegpt", sparsity=0.5, reconstruct=True, reconstruction_target="dense",
                  calibration=CalibrationSpec(domain_data=texts))


def layer_output_error(weights, dense, embedder, texts, name) -> float:
    """|| (W' - W) X || of one first-block layer on the calibration texts."""
    module = embedder.model.get_submodule(name.rpartition(".")[0])
    captured = []
    handle = module.register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        embedder.model(**embedder.tokenize(texts))
    handle.remove()
    return ((weights[name] - dense[name]) @ torch.cat(captured).T).norm().item()


def test_reconstruction_keeps_the_mask_and_lowers_the_layer_error(tmp_path, qwen3_dir, data_files):
    _, masked, _ = prune(tmp_path / "a", qwen3_dir, data_files, "--unstructured_scoring", "magnitude",
                         "--unstructured_pct", "0.5")
    folder, rebuilt, stats = prune(tmp_path / "b", qwen3_dir, data_files, "--unstructured_scoring", "magnitude",
                                   "--unstructured_pct", "0.5", "--reconstruct")
    assert os.path.basename(folder) == "tiny-qwen3_magnitude_prune_50%_reconstructed"
    assert stats["masked_params"] == stats["total_params_considered"] // 2
    dense_embedder = load_embedder(qwen3_dir, "cpu")
    dense = {k: v.detach() for k, v in dense_embedder.model.state_dict().items()}
    texts = triple_texts(load_triples(data_files["chem"], 6))
    for name in stats["per_param"]:
        assert torch.equal(masked[name] == 0, rebuilt[name] == 0), name
    for name in ("layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight"):  # inputs no pruning changed
        assert layer_output_error(rebuilt, dense, dense_embedder, texts, name) < \
            layer_output_error(masked, dense, dense_embedder, texts, name)


def hand_loss_gradient_weights(embedder, texts, names, triples_per_batch) -> dict[str, list[torch.Tensor]]:
    """Each layer's mean squared dL/dy at every real token, by an ordinary backward pass with the outputs'
    gradients retained, normalised to mean 1 over all tokens."""
    modules = {name: embedder.model.get_submodule(name.rpartition(".")[0]) for name in names}
    squares = {name: [None] * len(texts) for name in names}
    for start in range(0, len(texts), 3 * triples_per_batch):
        outputs, embeddings = [], []
        for key in range(3):
            rows = list(range(start + key, min(start + 3 * triples_per_batch, len(texts)), 3))
            captured = {}

            def retain(name, out):
                out.retain_grad()
                captured[name] = out
            handles = [module.register_forward_hook(lambda m, a, out, name=name: retain(name, out))
                       for name, module in modules.items()]
            tokens = embedder.tokenize([texts[i] for i in rows])
            embeddings.append(pool(embedder.model(**tokens).last_hidden_state, tokens["attention_mask"],
                                   embedder.pooling))
            for handle in handles:
                handle.remove()
            outputs.append((rows, tokens["attention_mask"].bool(), captured))
        embedder.model.zero_grad()
        info_nce(*embeddings).backward()
        for rows, real, captured in outputs:
            for name, out in captured.items():
                for row, index in enumerate(rows):
                    squares[name][index] = out.grad[row][real[row]].square().mean(-1)
    return {name: [v / torch.cat(values).mean() for v in values] for name, values in squares.items()}


@pytest.mark.parametrize("pooled", ["qwen3", "bert"])
def test_loss_gradient_weights_are_each_tokens_squared_output_gradient(qwen3_dir, bert_dir, data_files, pooled):
    embedder = load_embedder({"qwen3": qwen3_dir, "bert": bert_dir}[pooled], "cpu")
    texts = {"domain": triple_texts(load_triples(data_files["chem"], 5)),
             "general": triple_texts(load_triples(data_files["general"], 4))}
    mlp = list(select_parameters(embedder.model.named_parameters(), ["mlp"]))
    names = mlp[:2] + mlp[-1:]  # two of the first block, the last block's down projection
    weights = loss_gradient_weights(embedder, texts, names, batch_size=2)
    assert all(p.requires_grad and p.grad is None for p in embedder.model.parameters())  # flags restored, no grads
    for side, side_texts in texts.items():  # each side normalised on its own
        expected = hand_loss_gradient_weights(embedder, side_texts, names, 2)
        lengths = embedder.tokenize(side_texts)["attention_mask"].sum(1).tolist()
        for name in names:
            assert [len(w) for w in weights[side][name]] == lengths
            torch.testing.assert_close(torch.cat(weights[side][name]), torch.cat(expected[name]), rtol=1e-4, atol=1e-6)
            assert torch.cat(weights[side][name]).mean().item() == pytest.approx(1.0)
    if pooled == "qwen3":  # last-token pooling: in the last block only each text's last token reaches the loss
        last = f"layers.{embedder.model.config.num_hidden_layers - 1}.mlp.down_proj.weight"
        assert names[-1] == last
        for w in weights["domain"][last]:
            assert w[-1] > 0 and torch.count_nonzero(w[:-1]) == 0


def test_a_layer_no_loss_gradient_reaches_keeps_uniform_weights(caplog, monkeypatch, qwen3_dir, data_files):
    import gaprune.calibration

    embedder = load_embedder(qwen3_dir, "cpu")
    texts = triple_texts(load_triples(data_files["chem"], 3))
    name = "layers.0.mlp.up_proj.weight"
    with pytest.raises(InputError, match="need whole triples; the domain side has 8 texts"):
        loss_gradient_weights(embedder, {"domain": texts[:8]}, [name])
    monkeypatch.setattr(gaprune.calibration, "info_nce", lambda *embeddings: 0 * info_nce(*embeddings))
    weights = loss_gradient_weights(embedder, {"domain": texts}, [name])["domain"]  # every gradient is zero
    assert all(torch.equal(w, torch.ones_like(w)) for w in weights[name])
    assert f"no loss gradient reaches {name} on the domain texts" in caplog.text


@pytest.mark.parametrize("family", ["qwen3", "bert"])
def test_weighted_statistics_count_each_token_by_its_weight(qwen3_dir, bert_dir, data_files, family):
    """The first block's layers that read one input (Qwen3 gate and up, left padding; BERT query and key,
    right padding) each get their own weighted X^T X and ||X_j||^2."""
    embedder = load_embedder({"qwen3": qwen3_dir, "bert": bert_dir}[family], "cpu")
    texts = triple_texts(load_triples(data_files["chem"], 4))
    names = {"qwen3": ["layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight"],
             "bert": ["encoder.layer.0.attention.self.query.weight",
                      "encoder.layer.0.attention.self.key.weight"]}[family]
    candidates = {name: dict(embedder.model.named_parameters())[name] for name in names}
    lengths = embedder.tokenize(texts)["attention_mask"].sum(1).tolist()
    generator = torch.Generator().manual_seed(0)
    weights = {"domain": {name: [torch.rand(n, generator=generator) + 0.1 for n in lengths] for name in names}}
    seen = {}

    def keep(inputs):
        seen.update({name: (layer.hessian.clone(), layer.input_sq.clone()) for name, layer in inputs.items()})
    prune_block_by_block(embedder, candidates, {"domain": texts}, keep, hessian=True, batch_size=5,
                         token_weights=weights)
    x = []
    module = embedder.model.get_submodule(names[0].rpartition(".")[0])
    handle = module.register_forward_pre_hook(lambda m, args: x.append(args[0]))
    with torch.no_grad():
        for text in texts:  # one text at a time: no padding at all
            embedder.model(**embedder.tokenize([text]))
    handle.remove()
    inputs = torch.cat([t[0] for t in x]).double()
    for name in names:
        w = torch.cat(weights["domain"][name]).double()
        expected = (inputs * w.unsqueeze(1)).T @ inputs / len(w)
        torch.testing.assert_close(seen[name][0].double(), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(seen[name][1].double(), torch.diag(expected), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(seen[names[0]][0], seen[names[1]][0])


def test_sparsegpt_with_loss_gradient_weighting(tmp_path, qwen3_dir, data_files):
    folder, weights, stats = prune(tmp_path, qwen3_dir, data_files, "--unstructured_scoring", "sparsegpt",
                                   "--sparsity_pattern", "2:4", "--calibration_weighting", "loss_gradient")
    assert os.path.basename(folder) == "tiny-qwen3_sparsegpt_prune_2of4_loss_gradient_weighting"
    config = json.load(open(os.path.join(folder, "evaluation_config.json")))["meta"]["unstructured_pruning"]
    assert config["calibration_weighting"] == "loss_gradient"
    assert stats["diagnostics"] == {"calibration_weighting": "loss_gradient"}
    _, uniform, _ = prune(tmp_path / "uniform", qwen3_dir, data_files, "--unstructured_scoring", "sparsegpt",
                          "--sparsity_pattern", "2:4")
    for name in stats["per_param"]:
        assert ((weights[name] == 0).view(weights[name].shape[0], -1, 4).sum(-1) == 2).all(), name
    assert any(not torch.equal(weights[name] == 0, uniform[name] == 0) for name in stats["per_param"])


def test_compare_runs_the_field_with_cross_calibration(tmp_path, bert_dir, data_files):
    path = compare.main(["--model_path", bert_dir, "--domain_data_paths", data_files["chem"], "--general_data_paths",
                         data_files["general"], "--scorers", "magnitude", "wanda", "sparsegpt", "--sparsity_pattern",
                         "2:4", "--calibration_data", data_files["chem"], "--general_calibration_data",
                         data_files["general"], "--calibration_samples", "4", "--output_dir", str(tmp_path)])
    rows = json.load(open(path))["rows"]
    assert [(r["method"], r["sparsity"]) for r in rows] == [("dense", 0.0), ("magnitude", 0.5), ("wanda", 0.5),
                                                            ("sparsegpt", 0.5)]
    assert all(r["masked_params"] == 4096 and r["sparsity_pattern"] == "2:4" for r in rows[1:])
    ordered = compare.main(["--model_path", bert_dir, "--domain_data_paths", data_files["chem"],
                            "--general_data_paths", data_files["general"], "--scorers", "magnitude", "wanda",
                            "sparsegpt", "--sparsity_pattern", "2:4", "--group_order", "hessian",
                            "--calibration_data", data_files["chem"], "--calibration_samples", "4",
                            "--output_dir", str(tmp_path / "ordered")])
    rows = json.load(open(ordered))["rows"]  # the group order goes to sparsegpt alone
    assert [r["method"] for r in rows] == ["dense", "magnitude", "wanda", "sparsegpt, hessian order"]
    assert rows[3].get("group_order") == "hessian" and "group_order" not in rows[2]


def test_token_weights_measured_once_prune_as_measured_each_time(caplog, monkeypatch, tmp_path, qwen3_dir,
                                                                data_files):
    """Loss-gradient weights measured beforehand on the dense model (measure_token_weights, with the
    calibration's max length) prune exactly as weights measured inside the pruning; compare.py measures them
    once for all its rows, after a memory plan that counts the loss-gradient graph; weights measured for other
    layers are refused."""
    from gaprune import pruning
    from gaprune.pruning import measure_token_weights, prune_calibrated

    texts = {"domain": triple_texts(load_triples(data_files["chem"], 4)),
             "general": triple_texts(load_triples(data_files["general"], 4))}
    calibration = Calibration(texts, 0.5, batch_size=4, max_length=12, token_weighting="loss_gradient")
    files = CalibrationSpec(domain_data=texts["domain"], general_data=texts["general"], batch_size=4, max_length=12,
                            weighting="loss_gradient")
    pruned = []
    for measured in (False, True):
        embedder = load_embedder(qwen3_dir, "cpu", "float32")
        candidates = select_parameters(embedder.model.named_parameters(), ["mlp"])
        given = measure_token_weights(embedder, candidates, calibration) if measured else calibration
        assert (given.token_weights is not None) == measured
        prune_calibrated(embedder, candidates, PruneSpec(scorer="sparsegpt", sparsity=0.5, calibration=files), given)
        pruned.append({name: p.detach().clone() for name, p in candidates.items()})
    assert all(torch.equal(pruned[0][name], pruned[1][name]) for name in pruned[0])
    attention = select_parameters(embedder.model.named_parameters(), ["attention"])
    for other, layers in ((given, attention), (dataclasses.replace(given, batch_size=2), candidates),
                          (dataclasses.replace(given, max_length=None), candidates),
                          (dataclasses.replace(given, texts={"domain": texts["domain"]}), candidates)):
        with pytest.raises(ValueError, match="measured for other texts, batches or layers"):
            prune_calibrated(embedder, layers, PruneSpec(scorer="wanda", sparsity=0.5, calibration=files), other)

    calls = []
    measure = pruning.loss_gradient_weights
    monkeypatch.setattr(pruning, "loss_gradient_weights", lambda *a, **k: calls.append(1) or measure(*a, **k))
    caplog.clear()  # the plans of the prunings above, where an earlier test left gaprune's loggers at INFO
    with caplog.at_level("INFO"):
        path = compare.main(["--model_path", qwen3_dir, "--domain_data_paths", data_files["chem"],
                             "--general_data_paths", data_files["general"], "--scorers", "wanda", "sparsegpt",
                             "--sparsity", "0.5", "0.6", "--calibration_data", data_files["chem"],
                             "--calibration_samples", "4", "--calibration_weighting", "loss_gradient",
                             "--output_dir", str(tmp_path)])
    assert len(json.load(open(path))["rows"]) == 5 and len(calls) == 1
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory plan (calibration)")]
    assert len(plans) == 5 and "loss-gradient graph" in plans[0]  # the measurement's, then one per row
    assert not any("loss-gradient graph" in plan for plan in plans[1:])


@pytest.mark.parametrize("extra, message", [
    (["--unstructured_scoring", "wanda", "--unstructured_pct", "0.5"], "need --calibration_data"),
    (["--unstructured_scoring", "magnitude", "--sparsity_pattern", "2:4", "--unstructured_pct", "0.3"],
     "prunes 0.5 of the weights; --unstructured_pct 0.3 contradicts it"),
    (["--unstructured_scoring", "wanda", "--unstructured_pct", "0.5", "--layer_budget_strategy", "uniform"],
     "wanda takes its share of each row"),
    (["--unstructured_scoring", "wanda", "--structure", "channels", "--structured_pct", "0.5"],
     "needs a score-based scorer"),
    (["--unstructured_scoring", "magnitude", "--reconstruct", "--unstructured_pct", "0.5", "--calibration_data",
      "missing.json"], "data file not found: missing.json"),
    (["--unstructured_scoring", "sparsegpt", "--unstructured_pct", "0.5", "--calibration_data", "CHEM",
      "--calibration_mix", "0.5"], "--calibration_mix 0.5 needs both"),
    (["--unstructured_scoring", "sparsegpt", "--unstructured_pct", "0.5", "--reconstruct", "--calibration_data",
      "CHEM"], "sparsegpt already updates the kept weights"),
    (["--unstructured_scoring", "wanda", "--calibration_data", "CHEM"], "wanda at a share of 0 prunes nothing"),
    (["--unstructured_scoring", "sparsegpt", "--unstructured_pct", "0.5", "--calibration_data", "CHEM",
      "--layer_shares", "wanda"], "--layer_shares takes uniform or a score-based scorer"),
    (["--unstructured_scoring", "wanda", "--unstructured_pct", "0.5", "--calibration_data", "CHEM",
      "--layer_shares", "aligned_saliency"], "scorer aligned_saliency needs --domain_fisher_scores"),
    (["--unstructured_scoring", "sparsegpt", "--sparsity_pattern", "2:4", "--calibration_data", "CHEM",
      "--layer_shares", "magnitude"], "the 2:4 pattern fixes it in every layer"),
    (["--unstructured_scoring", "sparsegpt", "--unstructured_pct", "0.5", "--calibration_data", "CHEM",
      "--group_order", "hessian"], "--group_order orders the groups of an N:M pattern"),
    (["--unstructured_scoring", "wanda", "--sparsity_pattern", "2:4", "--calibration_data", "CHEM",
      "--group_order", "hessian"], "--group_order sets the order of sparsegpt's N:M groups, not of wanda"),
    (["--unstructured_scoring", "magnitude", "--unstructured_pct", "0.5", "--layer_shares", "magnitude"],
     "--layer_shares sets the layer shares of wanda and sparsegpt, not of magnitude"),
    (["--unstructured_scoring", "magnitude", "--unstructured_pct", "0.5", "--calibration_weighting", "loss_gradient"],
     "--calibration_weighting weighs the calibration statistics of wanda, sparsegpt and --reconstruct"),
    (["--unstructured_scoring", "wanda", "--unstructured_pct", "0.5", "--calibration_data", "CHEM",
      "--reconstruction_target", "dense"], "--reconstruction_target dense sets what updated weights reproduce"),
    (["--unstructured_scoring", "magnitude", "--structure", "channels", "--structured_pct", "0.5",
      "--reconstruction_target", "dense"], "--reconstruction_target applies to masks"),
])
def test_bad_calibrated_requests(capsys, tmp_path, bert_dir, data_files, extra, message):
    extra = [data_files["chem"] if item == "CHEM" else item for item in extra]
    with pytest.raises(SystemExit) as exit_info:
        run(SparseModel.main, ["--model_path", bert_dir, "--output_dir", str(tmp_path / "out"), *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "Traceback"))]
    assert exit_info.value.code == 1 and len(err) == 1 and message in err[0]
    assert listing(tmp_path / "out") == []
