"""Depth pruning: whole transformer blocks scored (each block scorer against a hand computation), removed, and
saved as a standard shallower checkpoint."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

import gaprune
from conftest import fail, listing
from gaprune.blocks import BLOCK_SCORERS, BlockContext, lowest_blocks, remove_blocks
from gaprune.data import triple_texts
from gaprune.layers import transformer_blocks
from gaprune.loss import info_nce
from gaprune.model import SparseModel
from gaprune.modeling import load_embedder
from gaprune.options import BLOCK_MEASURES
from gaprune.scorers import SCORERS
from gaprune.toy_models import build_bert, build_qwen3

TEXTS = ["What is the boiling point of ethanol?", "A buffer resists changes of pH.",
         "Tennis is played in sets.", "Trains leave every hour from the main station."]


@pytest.fixture(scope="module")
def deep_qwen3(tmp_path_factory):
    return build_qwen3(str(tmp_path_factory.mktemp("deep") / "qwen3-4"), num_layers=4, extra_text=TEXTS)


@pytest.fixture(scope="module")
def deep_bert(tmp_path_factory):
    return build_bert(str(tmp_path_factory.mktemp("deep") / "bert-4"), num_layers=4, extra_text=TEXTS)


def make_identity(model, index: int, family: str) -> None:
    """Block ``index`` passes its input through: zero output projections (Qwen3's pre-norm residual block is
    then exactly the identity); a BERT block also needs identity LayerNorms, fed by an identity LayerNorm."""
    blocks = transformer_blocks(model)
    with torch.no_grad():
        if family == "qwen3":
            blocks[index].self_attn.o_proj.weight.zero_()
            blocks[index].mlp.down_proj.weight.zero_()
            return
        block, before = blocks[index], blocks[index - 1]
        for linear in (block.attention.output.dense, block.output.dense):
            linear.weight.zero_()
            linear.bias.zero_()
        for norm in (block.attention.output.LayerNorm, block.output.LayerNorm, before.output.LayerNorm):
            norm.weight.fill_(1.0)
            norm.bias.zero_()


@pytest.mark.parametrize("family", ["qwen3", "bert"])
def test_removing_an_identity_block_leaves_the_embeddings_and_the_saved_folder_reloads(tmp_path, deep_qwen3,
                                                                                       deep_bert, family):
    embedder = load_embedder(deep_qwen3 if family == "qwen3" else deep_bert, "cpu")
    make_identity(embedder.model, 2, family)
    before = embedder.encode(TEXTS, progress=False)
    remove_blocks(embedder.model, [2])
    after = embedder.encode(TEXTS, progress=False)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert embedder.model.config.num_hidden_layers == len(transformer_blocks(embedder.model)) == 3
    folder = str(tmp_path / "shallow")
    gaprune.save_model(embedder, folder)
    assert AutoConfig.from_pretrained(folder).num_hidden_layers == 3
    reloaded = load_embedder(folder, "cpu")  # AutoModel underneath: block 3 is now called block 2
    torch.testing.assert_close(reloaded.encode(TEXTS, progress=False), after, atol=1e-6, rtol=0)
    assert isinstance(AutoModel.from_pretrained(folder), torch.nn.Module)
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(folder, device="cpu")
    torch.testing.assert_close(torch.tensor(st.encode(TEXTS, normalize_embeddings=True)), after, atol=1e-5, rtol=0)


def test_qwen3_per_layer_config_follows_the_kept_blocks(deep_qwen3):
    embedder = load_embedder(deep_qwen3, "cpu")
    config = embedder.model.config
    config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config.max_window_layers = 3
    remove_blocks(embedder.model, [0, 2])
    assert config.layer_types == ["sliding_attention", "sliding_attention"]
    assert config.max_window_layers == 1  # of the kept blocks 1 and 3, one was below 3
    assert [block.self_attn.layer_idx for block in transformer_blocks(embedder.model)] == [0, 1]
    with pytest.raises(ValueError, match="cannot remove blocks"):
        remove_blocks(embedder.model, [0, 1])


def test_block_influence_is_one_minus_the_cosine_of_each_block_s_input_and_output(deep_bert):
    embedder = load_embedder(deep_bert, "cpu")
    texts = {"domain": TEXTS[:2], "general": TEXTS[2:]}
    scores = BLOCK_SCORERS["block_influence"].score(BlockContext(embedder, texts, 0.25, batch_size=2), frozenset())
    expected = torch.zeros(4, dtype=torch.float64)
    for side, weight in (("domain", 0.75), ("general", 0.25)):
        tokens = embedder.tokenize(texts[side])
        with torch.no_grad():
            hidden = embedder.model(**tokens, output_hidden_states=True).hidden_states  # BERT: no final norm
        mask = tokens["attention_mask"].double()
        for i in range(4):
            cosine = F.cosine_similarity(hidden[i].double(), hidden[i + 1].double(), dim=-1)
            expected[i] += weight * float(((1 - cosine) * mask).sum() / mask.sum())
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), expected, atol=1e-5, rtol=0)


def test_skipping_a_block_measures_what_removing_it_does(deep_qwen3, chem_triples):
    embedder = load_embedder(deep_qwen3, "cpu")
    texts = triple_texts(chem_triples[:4])
    context = BlockContext(embedder, {"domain": texts}, 0.0, batch_size=4)
    dense = embedder.encode(texts, progress=False)
    drift = BLOCK_SCORERS["skip_drift"].score(context, frozenset())
    loss = BLOCK_SCORERS["skip_loss"].score(context, frozenset())

    def loss_of(model_embedder):
        with torch.no_grad():
            q, p, n = (model_embedder.embed([t[k] for t in chem_triples[:4]]) for k in ("query", "positive", "negative"))
            return float(info_nce(q, p, n))
    dense_loss = loss_of(embedder)
    for index in range(4):
        shallow = copy.deepcopy(embedder)
        remove_blocks(shallow.model, [index])
        expected = float((1 - (shallow.encode(texts, progress=False) * dense).sum(-1)).mean())
        assert drift[index] == pytest.approx(expected, abs=1e-5)
        assert loss[index] == pytest.approx(loss_of(shallow) - dense_loss, abs=1e-4)
    chosen, at_choice = lowest_blocks(BLOCK_SCORERS["greedy_drift"], context, 2)
    first = min(range(4), key=lambda i: (drift[i], -i))  # greedy's first pick is skip_drift's lowest
    assert first in chosen and at_choice[first] == pytest.approx(drift[first])
    second = [i for i in chosen if i != first][0]  # measured with the first already gone
    shallow = copy.deepcopy(embedder)
    remove_blocks(shallow.model, sorted([first, second]))
    assert at_choice[second] == pytest.approx(
        float((1 - (shallow.encode(texts, progress=False) * dense).sum(-1)).mean()), abs=1e-5)


def test_a_weight_scorer_sums_its_scores_over_each_block(deep_bert):
    embedder = load_embedder(deep_bert, "cpu")
    sums = BLOCK_SCORERS["magnitude"].score(BlockContext(embedder, {}, 0.0), frozenset())
    blocks = transformer_blocks(embedder.model)
    expected = [sum(float(p.detach().abs().double().sum()) for p in block.parameters() if p.dim() >= 2)
                for block in blocks]
    assert sums == pytest.approx(expected, rel=1e-6)
    measures = {name for name, entry in BLOCK_SCORERS.items() if entry.needs_texts}
    assert measures == set(BLOCK_MEASURES)
    assert set(BLOCK_SCORERS) - measures == {name for name, s in SCORERS.items() if not s.needs_activations}


def test_sparse_model_removes_layers_and_records_them(capsys, tmp_path, deep_qwen3, data_files):
    folder = SparseModel.main(["--model_path", deep_qwen3, "--output_dir", str(tmp_path), "--structure", "layers",
                               "--num_layers_removed", "2", "--calibration_data", data_files["chem"],
                               "--general_calibration_data", data_files["general"], "--calibration_samples", "4"])
    assert os.path.basename(folder) == "qwen3-4_block_influence_layers_minus2"
    stats = json.load(open(os.path.join(folder, "structured_prune_stats.json")))
    assert (stats["layers_before"], stats["layers_after"], len(stats["removed_layers"])) == (4, 2, 2)
    lowest = sorted(range(4), key=lambda i: (stats["layer_scores"][i], -i))[:2]
    assert stats["removed_layers"] == sorted(lowest)
    assert AutoConfig.from_pretrained(folder).num_hidden_layers == 2
    config = json.load(open(os.path.join(folder, "evaluation_config.json")))
    assert config["meta"]["size"]["num_hidden_layers"] == {"before": 4, "after": 2}
    assert "2 whole transformer layers" in open(os.path.join(folder, "README.md")).read()
    assert f"Removed layers {stats['removed_layers']} of 4" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--num_layers_removed", "4"], "--num_layers_removed 4 leaves no layer of 4"),
    (["--structured_pct", "0.1"], "--structured_pct 0.1 removes no layer of 4"),
    (["--num_layers_removed", "1", "--structured_pct", "0.5"], "give one"),
    (["--num_layers_removed", "1", "--sparsify_layers", "attention"], "--sparsify_layers applies to weights"),
    (["--num_layers_removed", "1", "--block_scoring", "wanda"], "--block_scoring takes block_influence"),
])
def test_impossible_depth_requests_are_one_line_before_any_work(capsys, tmp_path, deep_qwen3, data_files, extra,
                                                                message):
    line = fail(capsys, SparseModel.main, ["--model_path", deep_qwen3, "--output_dir", str(tmp_path), "--structure",
                                           "layers", "--calibration_data", data_files["chem"], *extra])
    assert message in line and listing(tmp_path) == []


def test_measured_block_scorers_need_calibration_texts_and_weight_sums_do_not(capsys, tmp_path, deep_qwen3):
    line = fail(capsys, SparseModel.main, ["--model_path", deep_qwen3, "--output_dir", str(tmp_path), "--structure",
                                           "layers", "--num_layers_removed", "1"])
    assert "--block_scoring block_influence measures the layers on calibration texts" in line
    folder = SparseModel.main(["--model_path", deep_qwen3, "--output_dir", str(tmp_path), "--structure", "layers",
                               "--num_layers_removed", "1", "--block_scoring", "magnitude"])
    assert json.load(open(os.path.join(folder, "structured_prune_stats.json")))["scoring"] == "magnitude"
