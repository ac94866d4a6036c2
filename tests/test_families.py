"""Family adapters: ModernBERT as a third family end to end, a new family as one adapter, and sentence-transformers
Dense modules."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel

import gaprune
from conftest import hooked_inputs
from gaprune.calibration import prune_block_by_block
from gaprune.checkpoint import PROBE_SENTENCE
from gaprune.errors import InputError
from gaprune.families import BERT, Family, Units, UnitSlice, register, unregister
from gaprune.layers import detect_family, select_parameters, transformer_blocks
from gaprune.modeling import is_encoder, load_embedder
from gaprune.spec import CalibrationSpec
from gaprune.structure import remove_units, unit_plan
from gaprune.toy_models import build_bert, build_modernbert, build_qwen3

TEXTS = ["acid reacts with a base", "the river flows north", "benzene is an aromatic ring", PROBE_SENTENCE]


@pytest.fixture(scope="module")
def modernbert_dir(tmp_path_factory, chem_triples, web_triples):
    corpus = [t[k] for t in chem_triples + web_triples for k in ("query", "positive", "negative")]
    return build_modernbert(str(tmp_path_factory.mktemp("modernbert") / "tiny-modernbert"), extra_text=corpus)


def sentence_transformer_embeddings(folder: str, texts=TEXTS) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer
    return torch.tensor(SentenceTransformer(folder, device="cpu").encode(texts, normalize_embeddings=True))


def test_modernbert_is_an_encoder_of_its_own_family_and_embeds_like_sentence_transformers(modernbert_dir):
    embedder = load_embedder(modernbert_dir, "cpu")
    assert detect_family(dict(embedder.model.named_parameters())) == "modernbert"
    assert is_encoder(embedder.model.config) and embedder.tokenizer.padding_side == "right"
    assert embedder.pooling == "mean" and len(transformer_blocks(embedder.model)) == 2
    torch.testing.assert_close(embedder.encode(TEXTS, progress=False), sentence_transformer_embeddings(modernbert_dir),
                               atol=1e-5, rtol=0)


def test_the_families_signatures_exclude_each_other(tmp_path, qwen3_dir, bert_dir, modernbert_dir):
    for folder, family in ((qwen3_dir, "qwen3"), (bert_dir, "bert"), (modernbert_dir, "modernbert")):
        assert detect_family(dict(load_embedder(folder, "cpu").model.named_parameters())) == family


def test_modernbert_layer_types_take_whole_fused_tensors(modernbert_dir):
    model = load_embedder(modernbert_dir, "cpu").model
    def selected(*layer_types):
        return sorted({name.split(".", 2)[2] for name in select_parameters(model.named_parameters(), layer_types)})
    assert selected("mlp") == ["mlp.Wi.weight", "mlp.Wo.weight"]
    assert selected("attention") == ["attn.Wo.weight", "attn.Wqkv.weight"]
    assert selected("attn_q", "attn_k", "attn_v") == ["attn.Wqkv.weight"]
    assert selected("mlp_down") == ["mlp.Wo.weight"]
    assert list(select_parameters(model.named_parameters(), ["embed"])) == ["embeddings.tok_embeddings.weight"]


@pytest.mark.parametrize("layer_types, part", [(["attn_q"], "attn_q is only part of the fused attn.Wqkv"),
                                               (["attn_q", "attn_v"], "attn_q and attn_v are only part"),
                                               (["mlp_gate"], "mlp_gate is only part of the fused mlp.Wi")])
def test_a_fused_fine_type_is_refused_in_one_line(modernbert_dir, layer_types, part):
    model = load_embedder(modernbert_dir, "cpu").model
    with pytest.raises(InputError) as caught:
        select_parameters(model.named_parameters(), layer_types)
    assert part in str(caught.value) and "\n" not in str(caught.value)


def test_half_of_modernbert_mlp_weights_are_pruned_exactly(modernbert_dir):
    embedder = load_embedder(modernbert_dir, "cpu")
    mlp = select_parameters(embedder.model.named_parameters(), ["mlp"])
    total = sum(p.numel() for p in mlp.values())
    result = gaprune.prune(embedder, gaprune.PruneSpec(scorer="magnitude", sparsity=0.5))
    assert result.masked == total // 2
    assert sum(int((p == 0).sum()) for p in mlp.values()) == total // 2


def test_fisher_and_alignment_scoring_run_on_modernbert(tmp_path, modernbert_dir, data_files):
    embedder = load_embedder(modernbert_dir, "cpu")
    fisher = gaprune.fisher(embedder, data_files["chem"], str(tmp_path), batch_size=2, max_samples=4)
    names = list(json.load(open(fisher.path))["summary_statistics"])
    mlp = select_parameters(embedder.model.named_parameters(), ["mlp"])
    assert set(mlp) <= set(names)
    result = gaprune.prune(embedder, gaprune.PruneSpec(scorer="domain_fisher", sparsity=0.5),
                           gaprune.ScoreFiles(domain_fisher=fisher.path))
    assert result.masked == sum(p.numel() for p in mlp.values()) // 2
    alignment = gaprune.alignment(embedder, data_files["general"], data_files["chem"], str(tmp_path), max_samples=4)
    assert os.path.isfile(alignment.path)


def test_calibration_sees_each_modernbert_layer_s_inputs_block_by_block(modernbert_dir):
    embedder = load_embedder(modernbert_dir, "cpu")
    candidates = select_parameters(embedder.model.named_parameters(), ["linear"])
    texts = {"domain": TEXTS[:2], "general": TEXTS[2:]}
    seen = {}

    def prune_layers(inputs):
        for name, layer in inputs.items():
            seen[name] = layer.sides["domain"].input_sq + layer.sides["general"].input_sq
            with torch.no_grad():
                candidates[name][:, ::2] = 0
    prune_block_by_block(embedder, candidates, texts, prune_layers, batch_size=2)
    expected = hooked_inputs(embedder.model, list(candidates), embedder, texts)
    assert set(seen) == set(candidates) == set(expected)  # Wqkv, attn.Wo, Wi, mlp.Wo of both blocks
    for name in candidates:
        torch.testing.assert_close(seen[name], expected[name].square().sum(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scorer", ["wanda", "sparsegpt"])
def test_wanda_and_sparsegpt_prune_modernbert(modernbert_dir, data_files, scorer):
    embedder = load_embedder(modernbert_dir, "cpu")
    mlp = select_parameters(embedder.model.named_parameters(), ["mlp"])
    spec = gaprune.PruneSpec(scorer=scorer, sparsity=0.5,
                             calibration=CalibrationSpec(domain_data=data_files["chem"], samples=4))
    gaprune.prune(embedder, spec)
    for name, weight in mlp.items():  # each row loses half of its inputs
        assert int((weight == 0).sum()) == weight.shape[0] * (weight.shape[1] // 2), name


def test_mixed_attention_types_are_refused_for_calibration(tmp_path, data_files):
    folder = build_modernbert(str(tmp_path / "mixed"), global_attn_every_n_layers=2)  # full, then sliding
    spec = gaprune.PruneSpec(scorer="wanda", sparsity=0.5,
                             calibration=CalibrationSpec(domain_data=data_files["chem"], samples=2))
    with pytest.raises(InputError, match="mixes attention types"):
        gaprune.prune(load_embedder(folder, "cpu"), spec)


def test_modernbert_channels_pair_the_input_and_gate_rows(modernbert_dir):
    """Channel c is rows c and c + I of Wi and column c of Wo: channels whose Wo columns are zero write nothing,
    and removing them (with the right Wi rows) leaves the embeddings as they were."""
    embedder = load_embedder(modernbert_dir, "cpu")
    plan = unit_plan(embedder.model, "channels")
    assert plan.units == 64 and plan.config_field == "intermediate_size"
    removed = {}
    with torch.no_grad():
        for index, layer in enumerate(plan.layers):
            channels = torch.randperm(64, generator=torch.Generator().manual_seed(index))[:16].sort().values
            embedder.model.layers[index].mlp.Wo.weight[:, channels] = 0
            removed[layer.layer] = channels
    before = embedder.encode(TEXTS, progress=False)
    remove_units(embedder.model, plan, removed)
    assert embedder.model.config.intermediate_size == 48
    assert embedder.model.layers[0].mlp.Wi.weight.shape[0] == 96
    torch.testing.assert_close(embedder.encode(TEXTS, progress=False), before, atol=1e-5, rtol=0)


def test_modernbert_without_channels_reloads_with_the_same_embeddings(tmp_path, modernbert_dir):
    embedder = load_embedder(modernbert_dir, "cpu")
    result = gaprune.prune(embedder, gaprune.PruneSpec(scorer="magnitude", structure="channels", sparsity=0.25))
    assert (result.units_before, result.units_after) == (64, 48)
    in_memory = embedder.encode(TEXTS, progress=False)
    folder = str(tmp_path / "pruned")
    gaprune.save_model(embedder, folder)
    model = AutoModel.from_pretrained(folder)
    assert model.config.intermediate_size == 48
    assert sum(p.numel() for p in model.parameters()) == result.params_after < result.params_before
    torch.testing.assert_close(load_embedder(folder, "cpu").encode(TEXTS, progress=False), in_memory,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(sentence_transformer_embeddings(folder), in_memory, atol=1e-5, rtol=0)


def test_modernbert_heads_are_refused_in_one_line(modernbert_dir):
    with pytest.raises(InputError) as caught:
        unit_plan(load_embedder(modernbert_dir, "cpu").model, "heads")
    message = str(caught.value)
    assert message.startswith("--structure heads is not available for modernbert-family models") and "\n" not in message


class ToyBlock(torch.nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.ffn = torch.nn.ModuleDict({"fc_in": torch.nn.Linear(width, inner), "fc_out": torch.nn.Linear(inner, width)})


class ToyModel(torch.nn.Module):
    """A model of a family gaprune does not ship: ``trunk.N.ffn.fc_in`` / ``fc_out``."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="toy", intermediate_size=8)
        self.trunk = torch.nn.ModuleList([ToyBlock(4, 8), ToyBlock(4, 8)])


TOY = Family(
    name="toy", style="Toy-style", signature=r"(^|\.)trunk\.\d+\.ffn\.", model_types=("toy",), encoder=True,
    blocks="trunk", gated_mlp=False,
    fine_types={**{t: () for t in BERT.fine_types}, "mlp_up": (r"ffn\.fc_in",), "mlp_down": (r"ffn\.fc_out",)},
    units={"channels": Units((UnitSlice("mlp_up", 0), UnitSlice("mlp_down", 1)), "intermediate_size")},
)


def test_a_new_family_is_one_adapter():
    model = ToyModel()
    with pytest.raises(InputError, match="model names look unknown"):
        select_parameters(model.named_parameters(), ["mlp"])
    register(TOY)
    try:
        assert sorted(select_parameters(model.named_parameters(), ["mlp"])) == [
            "trunk.0.ffn.fc_in.weight", "trunk.0.ffn.fc_out.weight", "trunk.1.ffn.fc_in.weight",
            "trunk.1.ffn.fc_out.weight"]
        assert transformer_blocks(model) is model.trunk and is_encoder(model.config)
        plan = unit_plan(model, "channels")
        assert [layer.layer for layer in plan.layers] == ["trunk.0", "trunk.1"] and plan.units == 8
        assert plan.layers[0].slices == {"trunk.0.ffn.fc_in.weight": 0, "trunk.0.ffn.fc_in.bias": 0,
                                         "trunk.0.ffn.fc_out.weight": 1}
        remove_units(model, plan, {"trunk.0": torch.tensor([1, 5]), "trunk.1": torch.tensor([0, 7])})
        assert model.config.intermediate_size == 6 and model.trunk[1].ffn["fc_out"].in_features == 6
        with pytest.raises(InputError, match="--structure heads is not available for toy-family models"):
            unit_plan(model, "heads")
    finally:
        unregister("toy")


def add_dense_module(folder: str, in_features: int, out_features: int, seed: int = 1) -> None:
    """A sentence-transformers Dense module (tanh) between the pooling and the normalisation."""
    generator = torch.Generator().manual_seed(seed)
    os.makedirs(os.path.join(folder, "2_Dense"))
    save_file({"linear.weight": torch.randn(out_features, in_features, generator=generator) * 0.3,
               "linear.bias": torch.randn(out_features, generator=generator) * 0.1},
              os.path.join(folder, "2_Dense", "model.safetensors"))
    with open(os.path.join(folder, "2_Dense", "config.json"), "w", encoding="utf-8") as handle:
        json.dump({"in_features": in_features, "out_features": out_features, "bias": True,
                   "activation_function": "torch.nn.modules.activation.Tanh"}, handle)
    with open(os.path.join(folder, "modules.json"), encoding="utf-8") as handle:
        modules = json.load(handle)
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    modules[3].update({"idx": 3, "name": "3", "path": "3_Normalize"})
    with open(os.path.join(folder, "modules.json"), "w", encoding="utf-8") as handle:
        json.dump(modules, handle)


def test_a_dense_module_is_applied_and_kept_when_saving(tmp_path):
    folder = build_bert(str(tmp_path / "dense"))
    add_dense_module(folder, 32, 16)
    embedder = load_embedder(folder, "cpu")
    embeddings = embedder.encode(TEXTS, progress=False)
    assert embeddings.shape == (len(TEXTS), 16)
    torch.testing.assert_close(embeddings, sentence_transformer_embeddings(folder), atol=1e-5, rtol=0)
    saved = str(tmp_path / "saved")
    gaprune.save_model(embedder, saved)
    assert os.path.isfile(os.path.join(saved, "2_Dense", "model.safetensors"))
    with open(os.path.join(saved, "modules.json"), encoding="utf-8") as saved_modules, \
            open(os.path.join(folder, "modules.json"), encoding="utf-8") as source_modules:
        assert json.load(saved_modules) == json.load(source_modules)
    torch.testing.assert_close(sentence_transformer_embeddings(saved), embeddings, atol=1e-5, rtol=0)


def test_a_module_gaprune_does_not_apply_is_refused_in_one_line(tmp_path):
    folder = build_qwen3(str(tmp_path / "other"))
    with open(os.path.join(folder, "modules.json"), encoding="utf-8") as handle:
        modules = json.load(handle)
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"})
    with open(os.path.join(folder, "modules.json"), "w", encoding="utf-8") as handle:
        json.dump(modules, handle)
    with pytest.raises(InputError) as caught:
        load_embedder(folder, "cpu")
    message = str(caught.value)
    assert "sentence_transformers.models.LayerNorm (2_LayerNorm), which gaprune does not apply" in message
    assert "\n" not in message
