"""Pruning to a budget: the cost model against a hand count, the plan that removes the least importance
among those meeting the budget, and a pruned folder that meets it by its own config."""

import json
import os

import pytest
import torch

import gaprune
from conftest import fail, listing
from gaprune.budget import Plan, Shape, choose, plan_grid
from gaprune.errors import InputError
from gaprune.model import SparseModel
from gaprune.modeling import load_embedder
from gaprune.toy_models import build_qwen3

TEXTS = ["What is the boiling point of ethanol?", "A buffer resists changes of pH.", "Tennis is played in sets."]


def test_the_cost_model_counts_a_block_by_hand():
    qwen = Shape(blocks=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, gated=True)
    # q and o: 64x64 each, k and v: 64x32 each; attention: 2 x 2 x L x 64; MLP: 3 matrices 64x128
    assert qwen.block_flops(128, 10) == 2 * (64 * 64 * 2 + 64 * 32 * 2) + 2 * 2 * 10 * 64 + 2 * 3 * 64 * 128
    assert qwen.block_params(100) == 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 100
    bert = Shape(blocks=2, hidden=32, intermediate=64, heads=4, kv_heads=4, head_dim=8, gated=False)
    assert bert.block_flops(64, 1) == 2 * 32 * 32 * 4 + 2 * 2 * 1 * 32 + 2 * 2 * 32 * 64


def test_heads_enter_the_cost_model_and_the_plan_by_hand():
    qwen = Shape(blocks=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, gated=True)
    # 2 of 4 query heads: q and o shrink to 64x32, attention to 2 x 2 x L x 32
    assert qwen.block_flops(128, 10, heads=2) == 2 * (64 * 32 * 2 + 64 * 32 * 2) + 2 * 2 * 10 * 32 + 2 * 3 * 64 * 128
    assert qwen.block_params(128, heads=2) == 64 * 32 * 2 + 64 * 32 * 2 + 3 * 64 * 128
    shape = Shape(blocks=2, hidden=64, intermediate=32, heads=8, kv_heads=2, head_dim=8, gated=True)
    channels = [torch.full((32,), 10.0, dtype=torch.float64) for _ in range(2)]  # channels are dear
    # per block: [0, the lowest head of each group, the two lowest of each group, ...]: heads are cheap
    heads = [torch.tensor([0.0, 0.2, 0.5], dtype=torch.float64) for _ in range(2)]
    plans = plan_grid(shape, [100.0, 100.0], channels, 16, head_importance=heads)
    assert sorted({p.heads_removed for p in plans}) == [0, 2, 4]  # up to half of every group, a group at a time
    chosen = choose(plans, 1.05, None)
    assert (chosen.blocks_removed, chosen.channels_removed) == ([], 0) and chosen.heads_removed > 0
    expected = 2 * shape.block_flops(32, 16) / (2 * shape.block_flops(32, 16, 8 - chosen.heads_removed))
    assert chosen.speedup == pytest.approx(expected) and chosen.removed_importance == pytest.approx(
        2 * float(heads[0][chosen.heads_removed // 2]))


def test_the_plan_removes_the_least_importance_that_meets_the_budget():
    shape = Shape(blocks=3, hidden=8, intermediate=32, heads=2, kv_heads=2, head_dim=4, gated=False)
    blocks = [5.0, 1.0, 9.0]  # block 1 is the cheapest to lose
    channels = [torch.arange(32, dtype=torch.float64) * 0.01 for _ in range(3)]  # 0.00, 0.01, ... per block
    plans = plan_grid(shape, blocks, channels, sequence_length=4)
    assert min(plans, key=lambda p: p.speedup).speedup == 1.0
    assert all(p.blocks_removed in ([], [1], [0, 1]) for p in plans)  # the least important blocks go first
    chosen = choose(plans, 1.4, None)
    assert chosen.speedup >= 1.4
    assert chosen.removed_importance == min(p.removed_importance for p in plans if p.speedup >= 1.4)
    for plan in plans:  # importance of a plan: its blocks, and the lowest channels of every kept block
        kept = [b for b in range(3) if b not in plan.blocks_removed]
        expected = sum(blocks[b] for b in plan.blocks_removed) + sum(
            float(channels[b][:plan.channels_removed].sum()) for b in kept)
        assert plan.removed_importance == pytest.approx(expected)
    with pytest.raises(InputError, match="no plan meets the budget; the most the grid reaches is"):
        choose(plans, 100.0, None)
    assert choose([Plan([], 8, 1.5, 0.5, 1.0), Plan([0], 0, 1.5, 0.5, 1.0)], 1.5, None).blocks_removed == []


def test_a_budget_prunes_layers_and_channels_that_meet_it(tmp_path, chem_triples):
    folder = build_qwen3(str(tmp_path / "q4"), num_layers=4, intermediate_size=128,
                         extra_text=[t["query"] for t in chem_triples])
    embedder = load_embedder(folder, "cpu")
    dense = Shape.of(embedder.model.config, gated=True)
    spec = gaprune.PruneSpec(scorer="magnitude", target_speedup=1.8, sequence_length=64)
    result = gaprune.prune(embedder, spec)
    config = embedder.model.config
    assert config.num_hidden_layers == 4 - len(result.plan.blocks_removed)
    assert config.intermediate_size == 128 - result.plan.channels_removed
    assert config.num_attention_heads == dense.heads - result.plan.heads_removed
    assert result.plan.heads_removed > 0  # on this model the least importance goes with some query heads
    assert config.num_key_value_heads == dense.kv_heads  # the same count from every key/value group
    from gaprune.modelcard import model_card
    from gaprune.pruning import budget_records
    card = model_card(*budget_records(folder, 4, spec, gaprune.ScoreFiles(), result).values())
    assert (f"- query heads: `num_attention_heads` {dense.heads} -> {config.num_attention_heads} per layer" in card
            and f"and {result.plan.heads_removed} query heads of every remaining layer" in card)
    achieved = (dense.blocks * dense.block_flops(128, 64)) / (
        config.num_hidden_layers * dense.block_flops(config.intermediate_size, 64, config.num_attention_heads))
    assert achieved == pytest.approx(result.plan.speedup) and achieved >= 1.8
    in_memory = embedder.encode(TEXTS, progress=False)
    gaprune.save_model(embedder, str(tmp_path / "saved"))
    torch.testing.assert_close(load_embedder(str(tmp_path / "saved"), "cpu").encode(TEXTS, progress=False),
                               in_memory, atol=1e-5, rtol=0)


def test_sparse_model_to_a_budget_records_the_plan_and_refuses_what_no_plan_reaches(capsys, tmp_path, qwen3_dir):
    folder = SparseModel.main(["--model_path", qwen3_dir, "--output_dir", str(tmp_path / "out"), "--target_speedup",
                               "1.5", "--unstructured_scoring", "magnitude", "--budget_sequence_length", "32"])
    assert os.path.basename(folder) == "tiny-qwen3_magnitude_budget_1.5x"
    stats = json.load(open(os.path.join(folder, "structured_prune_stats.json")))
    assert stats["predicted_speedup"] >= 1.5 and stats["measured_speedup"] > 0 and stats["structure"] == "budget"
    assert "pruned to a budget" in open(os.path.join(folder, "README.md")).read()
    capsys.readouterr()
    for extra, message in ((["--target_speedup", "40"], "--target_speedup 40 is beyond any plan"),
                           (["--target_params", "1.5"], "--target_params must be between 0 and 1"),
                           (["--target_speedup", "2", "--structure", "channels", "--structured_pct", "0.5"],
                            "--structure does not apply"),
                           (["--target_speedup", "2", "--unstructured_scoring", "wanda"], "not wanda")):
        line = fail(capsys, SparseModel.main, ["--model_path", qwen3_dir, "--output_dir", str(tmp_path / "no"),
                                               *extra])
        assert message in line
    assert not os.path.exists(tmp_path / "no") or listing(tmp_path / "no") == []


def test_with_calibration_texts_a_budget_removes_layers_in_the_measured_order(tmp_path, chem_triples, web_triples):
    from gaprune.blocks import BLOCK_SCORERS, BlockContext
    from gaprune.data import triple_texts

    folder = build_qwen3(str(tmp_path / "q4"), num_layers=4, intermediate_size=128,
                         extra_text=[t["query"] for t in chem_triples + web_triples])
    domain, general = triple_texts(chem_triples[:4]), triple_texts(web_triples[:4])
    embedder = load_embedder(folder, "cpu")
    influence = BLOCK_SCORERS["block_influence"].score(BlockContext(embedder, {"domain": domain, "general": general},
                                                                    0.5, 8), frozenset())
    order = sorted(range(4), key=lambda i: (influence[i], -i))
    spec = gaprune.PruneSpec(scorer="magnitude", target_speedup=1.8, sequence_length=64,
                             calibration=gaprune.CalibrationSpec(domain_data=domain, general_data=general))
    assert spec.uses_texts and spec.notes() == []
    result = gaprune.prune(embedder, spec)
    removed = result.plan.blocks_removed
    assert removed and removed == sorted(order[:len(removed)])
    blind = gaprune.PruneSpec(scorer="magnitude", target_speedup=1.8)
    assert "removes layers by magnitude's weight sums" in blind.notes()[0]


def test_a_budget_takes_any_measured_block_scorer_for_its_layer_order():
    texts = gaprune.CalibrationSpec(domain_data=TEXTS)
    spec = gaprune.PruneSpec(scorer="magnitude", target_speedup=1.5, block_scorer="skip_drift", calibration=texts)
    assert spec.uses_texts and spec.block_scorer == "skip_drift"
    with pytest.raises(InputError, match="--block_scoring orders a budget's layers by a measurement"):
        gaprune.PruneSpec(scorer="magnitude", target_speedup=1.5, block_scorer="magnitude", calibration=texts)
    with pytest.raises(InputError, match="choose whole layers; give --structure layers"):
        gaprune.PruneSpec(scorer="magnitude", sparsity=0.5, block_scorer="skip_drift")
