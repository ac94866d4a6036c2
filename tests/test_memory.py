"""The memory plan's parts by hand, and --accumulate_on auto choosing host memory when the GPU is too small."""

import os

import pytest
import torch

from gaprune.data import load_triples
from gaprune.fisher_information import fisher_information
from gaprune.layers import select_parameters
from gaprune.memory import (DEVICE_SHARE, MemoryPlan, activation_bytes_per_token, alignment_plan, fisher_plan,
                            pinned_bytes, pinned_layout, pinned_total, sharded_sums)
from gaprune.modeling import load_embedder


@pytest.fixture(scope="module")
def tiny(qwen3_dir, data_files):
    embedder = load_embedder(qwen3_dir, "cpu", "float32")
    selected = select_parameters(embedder.model.named_parameters(), ["mlp"])
    return embedder, selected, load_triples(data_files["chem"]), load_triples(data_files["general"])


def test_fisher_plan_parts_by_hand(tiny):
    embedder, selected, chem, _ = tiny
    numel = sum(p.numel() for p in embedder.model.parameters())
    config = embedder.model.config
    head_dim = config.head_dim
    per_layer = 4 * (4 * config.hidden_size + 4 * config.num_attention_heads * head_dim
                     + 4 * config.num_key_value_heads * head_dim + 4 * config.intermediate_size) + 8 * config.hidden_size
    assert activation_bytes_per_token(config, 4) == per_layer * config.num_hidden_layers + 8 * config.hidden_size
    tokens = 0
    for start in range(0, len(chem), 3):  # batches of 3: each field padded to its longest text
        batch = chem[start:start + 3]
        tokens = max(tokens, sum(len(batch) * max(len(embedder.tokenizer(r[k])["input_ids"]) for r in batch)
                                 for k in ("query", "positive", "negative")))
    plan = fisher_plan(embedder, selected, chem, 3, runtime_rss=1000)
    dense_gradients = numel - embedder.model.embed_tokens.weight.numel()  # the embedding's are sparse
    assert plan.device == {"runtime": 1000, "model": 4 * numel, "gradients": 4 * dense_gradients,
                           "sums": 4 * sum(p.numel() for p in selected.values()),
                           "activations": tokens * activation_bytes_per_token(config, 4)}
    assert plan.accumulate_on == "device" and plan.host == {}
    assert f"= {plan.device_total / 1024 ** 3:.2f} GB" in plan.line()


def test_alignment_plan_holds_two_gradients_and_two_sums_per_parameter(tiny):
    embedder, selected, chem, general = tiny
    numel = sum(p.numel() for p in embedder.model.parameters())
    plain = alignment_plan(embedder, selected, general, chem, 2, with_fisher=False)
    both = alignment_plan(embedder, selected, general, chem, 2, with_fisher=True)
    assert plain.device["gradients"] == 2 * 4 * (numel - embedder.model.embed_tokens.weight.numel())
    assert plain.device["sums"] == 2 * 4 * numel
    assert both.device["sums"] - plain.device["sums"] == 2 * 4 * sum(p.numel() for p in selected.values())


def test_auto_moves_the_sums_to_the_host_only_when_the_gpu_would_be_too_full(tiny):
    embedder, selected, chem, general = tiny
    roomy = alignment_plan(embedder, selected, general, chem, 2, False, capacity=10 ** 12)
    assert roomy.accumulate_on == "device" and roomy.host == {}
    total = roomy.device_total
    tight = alignment_plan(embedder, selected, general, chem, 2, False, capacity=int(total / DEVICE_SHARE) - 1)
    assert tight.accumulate_on == "cpu"
    gradients = roomy.device["gradients"] // 2
    assert tight.host["sums"] == roomy.device["sums"]
    assert gradients <= tight.host["pinned gradients"] < 2 * gradients
    assert "sums" not in tight.device and "; host sums" in tight.line()
    forced = fisher_plan(embedder, selected, chem, 1, "device", capacity=1)
    assert forced.accumulate_on == "device"  # an explicit choice is kept
    on_host = fisher_plan(embedder, selected, chem, 1, "cpu", capacity=10 ** 12)  # fisher.py stages the selected
    assert on_host.host["pinned gradients"] == pinned_total(list(selected.values())) < tight.host["pinned gradients"]


def test_sharded_sums_deal_the_largest_first_to_the_least_held_rank():
    params = [torch.zeros(n) for n in (10, 40, 30, 20, 5)]
    embedding = torch.zeros(7)
    # one array per parameter and two more per selected one: 30, 120, 30, 20, 5 elements; the embedding's 7 stay
    # on every rank
    owners, held = sharded_sums([*params, embedding], params[:2], 1, 2, 2, [embedding])
    assert owners == [1, 0, 1, 1, 1, None]
    assert held == [7 + 120, 7 + 30 + 30 + 20 + 5]
    assert sharded_sums([*params, embedding], params[:2], 1, 2, 1, [embedding])[1] == [7 + 205]
    assert sharded_sums(params, params[:2], 0, 1, 2)[0] == [1, 0, None, None, None]  # fisher.py: the selected only


def test_auto_shards_the_sums_across_ranks_before_moving_them_to_the_host(tiny):
    embedder, selected, chem, general = tiny
    roomy = alignment_plan(embedder, selected, general, chem, 2, True, capacity=10 ** 12, ranks=2)
    assert roomy.accumulate_on == "device"
    params = [p for p in embedder.model.parameters() if p.requires_grad]
    owners, held = sharded_sums(params, list(selected.values()), 2, 2, 2, [embedder.model.embed_tokens.weight])
    largest = max(p.numel() for p, owner in zip(params, owners) if owner is not None)
    shard = 4 * (max(held) + largest)  # the sums of the rank holding the most, and one tensor being reduced
    assert shard < roomy.device["sums"] / 1.5
    capacity = int((roomy.device_total - roomy.device["sums"] + shard) / DEVICE_SHARE) + 1
    tight = alignment_plan(embedder, selected, general, chem, 2, True, capacity=capacity, ranks=2)
    assert tight.accumulate_on == "sharded" and tight.device["sums"] == shard
    chosen = {id(p) for p in selected.values()}
    sent = sum(p.numel() for p, owner in zip(params, owners) if id(p) in chosen and owner == 1)
    assert 0 < sent < sum(p.numel() for p in selected.values())
    # rank 0 receives what rank 1 finished: the element-wise array and the two one-pass Fisher arrays
    assert tight.host == {"arrays received by rank 0": 4 * 3 * sent}
    assert "sums sharded across 2 ranks" in tight.line()
    alone = alignment_plan(embedder, selected, general, chem, 2, True, capacity=capacity, ranks=1)
    assert alone.accumulate_on == "cpu"  # one process cannot shard
    asked = alignment_plan(embedder, selected, general, chem, 2, True, "sharded", capacity=capacity, ranks=1)
    assert asked.accumulate_on == "device" and asked.device["sums"] == roomy.device["sums"]
    tighter = alignment_plan(embedder, selected, general, chem, 2, True, capacity=capacity - 2 ** 20, ranks=2)
    assert tighter.accumulate_on == "cpu"


def test_unknown_accumulation_place_is_refused(tiny):
    embedder, _, chem, _ = tiny
    with pytest.raises(ValueError, match="accumulate_on"):
        fisher_information(embedder, chem[:2], 1, ["mlp"], accumulate_on="disk")


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_of_the_scoring_stages_follows_the_cpu(monkeypatch, capsys, tmp_path, qwen3_dir, data_files, native):
    """fisher.py --dtype auto computes in bfloat16 on a CPU with native bfloat16 and in float32 elsewhere; the
    other stages stay float32 on any CPU."""
    from gaprune import modeling
    from gaprune.features import fisher

    monkeypatch.setattr(modeling, "cpu_has_native_bfloat16", lambda: native)
    path = fisher.main(["--model_name", qwen3_dir, "--data_path", data_files["chem"], "--max_samples", "2",
                        "--output_dir", str(tmp_path), "--device", "cpu"])
    import json
    assert json.load(open(path))["metadata"]["compute_dtype"] == ("bfloat16" if native else "float32")
    assert load_embedder(qwen3_dir, "cpu").model.dtype == torch.float32


def test_gradients_of_the_selected_layers_only_give_the_same_arrays(capsys, tmp_path, qwen3_dir, data_files):
    """--gradients selected: the MLP arrays are those of a full run, the reports name only the MLP weights, and
    the plan holds no gradient or sum for the embedding matrix."""
    import json
    from safetensors.torch import load_file
    from gaprune.features import fisher, gradient

    def arrays(path):
        return load_file(os.path.join(os.path.dirname(path), json.load(open(path))["metadata"]["tensor_file"]))
    common = ["--model_name", qwen3_dir, "--max_samples", "6", "--batch_size", "2", "--sparsify_layers", "mlp",
              "--dtype", "float32"]
    runs = {}
    for mode in ("all", "selected"):
        out = str(tmp_path / mode)
        runs[mode] = (fisher.main([*common, "--data_path", data_files["chem"], "--output_dir", out, "--gradients", mode]),
                      gradient.main([*common, "--general_data_path", data_files["general"], "--domain_data_path",
                                     data_files["chem"], "--output_dir", out, "--gradients", mode]))
    capsys.readouterr()
    for full, selected in zip(runs["all"], runs["selected"]):
        a, b = arrays(full), arrays(selected)
        assert sorted(a) == sorted(b) and all(torch.equal(a[name], b[name]) for name in a)
    fisher_summary = json.load(open(runs["selected"][0]))["summary_statistics"]
    assert sorted(fisher_summary) == sorted(n for n in arrays(runs["all"][0]))  # the MLP weights, nothing else
    full_summary = json.load(open(runs["all"][0]))["summary_statistics"]
    assert "embed_tokens.weight" in full_summary and all(
        fisher_summary[n]["mean_score"] == full_summary[n]["mean_score"] for n in fisher_summary)
    assert sorted(json.load(open(runs["selected"][1]))["alignment_scores"]) == sorted(fisher_summary)


def test_the_plan_shrinks_with_gradients_of_the_selected_layers(tiny):
    """Inside gradients_of(..., "selected") only the MLP takes gradients; afterwards every flag is as before."""
    from gaprune.layers import gradients_of

    embedder, selected, chem, general = tiny
    full = alignment_plan(embedder, selected, general, chem, 2, False)
    frozen_by_user = embedder.model.layers[0].self_attn.q_proj.weight
    frozen_by_user.requires_grad_(False)
    try:
        with gradients_of(embedder.model, ["mlp"], "selected") as frozen:
            narrow = alignment_plan(embedder, selected, general, chem, 2, False)
        assert not frozen_by_user.requires_grad  # restored as the caller left it, not switched on
        assert all(p.requires_grad for p in embedder.model.parameters() if p is not frozen_by_user)
    finally:
        frozen_by_user.requires_grad_(True)
    frozen += frozen_by_user.numel()  # the plan without it counted it as taking gradients
    assert frozen == sum(p.numel() for p in embedder.model.parameters()) - sum(p.numel() for p in selected.values())
    sparse = embedder.model.embed_tokens.weight.numel()  # frozen too, but its gradients were never dense
    assert full.device["gradients"] - narrow.device["gradients"] == 2 * 4 * (frozen - sparse)
    assert full.device["sums"] - narrow.device["sums"] == 2 * 4 * frozen


def test_gradients_of_the_embedding_alone(capsys, tmp_path, bert_dir, data_files):
    """Only the embedding matrix takes gradients: the model family is still read from every name."""
    import json
    from gaprune.features import fisher

    path = fisher.main(["--model_name", bert_dir, "--data_path", data_files["chem"], "--max_samples", "2",
                        "--sparsify_layers", "embed", "--gradients", "selected", "--output_dir", str(tmp_path)])
    assert list(json.load(open(path))["summary_statistics"]) == ["embeddings.word_embeddings.weight"]


def test_a_checkpoint_converted_while_loading_is_counted(qwen3_dir, data_files):
    """A float32 checkpoint computed in bfloat16 on a CPU: the mapped file peaks beside the converted copy while
    loading, in place of the working parts (gradients, sums, activations) that come after."""
    embedder = load_embedder(qwen3_dir, "cpu", "bfloat16")
    selected = select_parameters(embedder.model.named_parameters(), ["mlp"])
    plan = fisher_plan(embedder, selected, load_triples(data_files["chem"]), 1, runtime_rss=3 * 1024 ** 3)
    numel = sum(p.numel() for p in embedder.model.parameters())
    assert plan.loading == 4 * numel and plan.device["model"] == 2 * numel
    working = plan.device["gradients"] + plan.device["sums"] + plan.device["activations"]
    assert plan.device_total == 3 * 1024 ** 3 + 2 * numel + max(4 * numel, working)
    assert "while loading: the checkpoint mapped" in plan.line()


def test_the_plan_peaks_in_the_larger_phase():
    """Loading (model + mapped file) and scoring (model + gradients, sums, activations) never overlap."""
    scoring_peak = MemoryPlan("fisher", "host", device={"runtime": 2, "model": 10, "gradients": 1, "sums": 3,
                                                        "activations": 1}, loading=4)
    assert scoring_peak.device_total == 17
    loading_peak = MemoryPlan("fisher", "host", device=dict(scoring_peak.device), loading=9)
    assert loading_peak.device_total == 21


def test_pinned_blocks_round_up_to_a_power_of_two():
    """As PyTorch's pinned host allocator does: a 4,097-byte request takes an 8,192-byte block."""
    assert [pinned_bytes(n) for n in (0, 1, 4096, 4097, 7 * 2 ** 30)] == [0, 1, 4096, 8192, 8 * 2 ** 30]


def test_pinned_layout_packs_every_tensor_once_into_few_blocks():
    """Tensors lie whole inside their block without overlapping; Qwen3-Embedding-8B's gradients (all but the
    embedding, bfloat16: 12.9 GiB) take 13 GiB of pinned blocks, where one block would be rounded up to 16."""
    from transformers import Qwen3Config, Qwen3Model
    from gaprune.toy_models import QWEN3_EMBEDDING_SHAPES

    with torch.device("meta"):
        model = Qwen3Model(Qwen3Config(**QWEN3_EMBEDDING_SHAPES["Qwen3-Embedding-8B"])).to(torch.bfloat16)
    sizes = [p.numel() * 2 for name, p in model.named_parameters() if "embed" not in name]
    used, places = pinned_layout(sizes)
    spans: dict[int, list[tuple[int, int]]] = {}
    for size, (block, offset) in zip(sizes, places):
        spans.setdefault(block, []).append((offset, offset + size))
    for block, taken in spans.items():
        taken.sort()
        assert all(end <= start for (_, end), (start, _) in zip(taken, taken[1:]))  # no overlap
        assert taken[0][0] == 0 and taken[-1][1] == used[block] <= 2 ** 30
    assert sum(used) == sum(sizes)
    total = sum(map(pinned_bytes, used))
    assert sum(sizes) <= total <= 13 * 2 ** 30 < pinned_bytes(sum(sizes)) == 16 * 2 ** 30
    assert pinned_layout([100, 7, 30]) == ([137], [(0, 0), (0, 130), (0, 100)])  # one block, largest first


def test_pinned_staging_gives_each_gradient_its_own_slot(monkeypatch):
    """The host copies of the gradients (model on another device, here "meta"; pinning needs CUDA, so plain
    memory stands in): every dense parameter gets a view of its shape and dtype that no other overlaps."""
    from gaprune.gradient_sums import PinnedStaging

    plain_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, pin_memory=False, **kwargs: plain_empty(*args, **kwargs))
    shapes = [((64, 32), torch.bfloat16), ((7,), torch.bfloat16), ((3, 5), torch.float32), ((10, 4), torch.bfloat16)]
    params = [torch.nn.Parameter(plain_empty(shape, dtype=dtype, device="meta")) for shape, dtype in shapes]
    staging = PinnedStaging(params, "cpu", sparse=params[3:])  # the last one stands for an embedding
    assert staging.device == torch.device("cpu") and staging.buffers[3] is None
    buffers = staging.buffers[:3]
    for param, buffer in zip(params, buffers):
        assert buffer.shape == param.shape and buffer.dtype == param.dtype and buffer.device.type == "cpu"
    for value, buffer in enumerate(buffers, start=1):
        buffer.fill_(value)
    assert [int(buffer.float().unique().item()) for buffer in buffers] == [1, 2, 3]


def stored_block_inputs(batches) -> int:
    """What the calibration really holds at a block boundary: each batch's hidden states and boolean attention
    mask (B x T x T; where nothing in a batch is padded sdpa needs none, and the plan still counts one)."""
    total = 0
    for batch in batches:
        hidden = batch.args[0] if batch.args else batch.kwargs["hidden_states"]
        mask = batch.args[1] if len(batch.args) > 1 else batch.kwargs["attention_mask"]
        total += hidden.nbytes + (batch.real.numel() * batch.real.shape[1] if mask is None else mask.nbytes)
    return total


def saved_for_backward(embedder, tokens) -> int:
    """The bytes autograd keeps for one forward pass of ``tokens`` with gradients of the activations only (each
    tensor once, however many nodes save it; the weights it saves are the model's own)."""
    from gaprune.calibration import _activation_gradients_only

    weights = {p.data_ptr() for p in embedder.model.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            saved[(tensor.data_ptr(), tensor.nbytes)] = tensor.nbytes
        return tensor
    with _activation_gradients_only(embedder.model), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        embedder.embed_tokens(tokens)
    return sum(saved.values())


@pytest.mark.parametrize("pooled", ["qwen3", "bert"])
def test_calibration_plan_counts_what_calibration_holds(qwen3_dir, bert_dir, data_files, pooled):
    """The hidden states at a block boundary (each batch's input and sdpa's boolean mask, on the busiest rank, and
    one batch's output; every rank runs every batch when there are fewer batches than ranks), the token weights
    and the loss-gradient graph, against what the calibration code really builds; the statistics and
    SparseGPT's working copies by hand."""
    from gaprune.calibration import _first_block_inputs, layer_widths, loss_gradient_weights
    from gaprune.layers import transformer_blocks
    from gaprune.data import triple_texts
    from gaprune.distributed import World
    from gaprune.memory import plan_calibration

    embedder = load_embedder({"qwen3": qwen3_dir, "bert": bert_dir}[pooled], "cpu", "float32")
    texts = {"domain": triple_texts(load_triples(data_files["chem"], 5)),
             "general": triple_texts(load_triples(data_files["general"], 3))}
    names = list(select_parameters(embedder.model.named_parameters(), ["mlp"]))
    widths = layer_widths(embedder.model, names)
    config = embedder.model.config
    for ranks in (1, 2):  # 6 batches
        plan = plan_calibration(embedder, widths, texts, 4, hessian=True, weighted=True, world_size=ranks)
        held = [_first_block_inputs(embedder, texts, 4, World(rank, ranks))[0] for rank in range(ranks)]
        output = max(batch.real.numel() * config.hidden_size * 4 for batch in held[0] + held[-1])
        assert plan.hidden_states == max(stored_block_inputs(batches) for batches in held) + output
    alone = plan_calibration(embedder, widths, texts, 4, hessian=True, weighted=True, world_size=1)
    assert plan_calibration(embedder, widths, texts, 4, True, True, world_size=8).hidden_states == alone.hidden_states
    weights = loss_gradient_weights(embedder, texts, names, batch_size=4)
    assert plan.token_weights == 4 * sum(w.numel() for side in weights.values() for per_text in side.values()
                                         for w in per_text)
    fields = [embedder.tokenize(side_texts[start + key:start + 12:3])
              for side_texts in texts.values() for start in range(0, len(side_texts), 12) for key in range(3)]
    largest = max(fields, key=lambda tokens: tokens["input_ids"].numel())
    outputs = largest["input_ids"].numel() * 4 * sum(out for *_, out in widths)  # held by the hooks; and dL/dy
    measured = saved_for_backward(embedder, largest) + 2 * outputs
    assert 0.95 * measured <= plan.graph <= 1.05 * measured, (measured, plan.graph)  # rotary tables left out
    hidden, inner = config.hidden_size, config.intermediate_size
    # each layer its own statistics on both sides; the largest stage: the two that read the block's input, or
    # the down projection alone
    assert plan.statistics == max(4 * 2 * 2 * (hidden * hidden + hidden), 4 * 2 * (inner * inner + inner))
    assert plan.pruner == max(4 * (4 * width ** 2 + 2 * width * out) for width, out in ((hidden, inner), (inner, hidden)))
    uniform = plan_calibration(embedder, widths, texts, 4, hessian=True, weighted=False)
    assert (uniform.token_weights, uniform.graph) == (0, 0)
    assert uniform.statistics == max(4 * 2 * (width * width + width) for width in (hidden, inner))  # one per stage
    calibrating = plan.hidden_states + plan.block_run + plan.statistics + plan.pruner
    assert plan.device_total == plan.model + plan.token_weights + max(plan.graph, calibrating)
    # --reconstruction_target dense: the dense hidden states of every batch, the copy of a block, one batch's input
    # to the widest layer (as taken, and in float32; float32 here), X_dense^T X beside X^T X in every statistic,
    # and W* beside SparseGPT's copies
    dense = plan_calibration(embedder, widths, texts, 4, hessian=True, weighted=False, dense_targets=True)
    batches = _first_block_inputs(embedder, texts, 4, World(0, 1))[0]
    block = sum(p.numel() * 4 for p in transformer_blocks(embedder.model)[0].parameters())
    most = max(batch.real.numel() for batch in batches)
    assert dense.dense_model == sum(batch.real.numel() for batch in batches) * hidden * 4 + block + most * inner * 8
    assert dense.statistics == max(4 * 2 * (2 * width * width + width) for width in (hidden, inner))
    assert dense.pruner == max(4 * (4 * width ** 2 + 3 * width * out) for width, out in ((hidden, inner), (inner, hidden)))
    assert dense.device_total == (uniform.device_total + dense.dense_model + dense.statistics - uniform.statistics
                                  + dense.pruner - uniform.pruner)
    assert "dense model" in dense.line() and "dense model" not in uniform.line()


def test_calibration_plan_takes_a_stage_as_the_layers_of_one_module_reading_one_width(bert_dir, data_files):
    """BERT's attention and MLP: query/key/value read one input; the attention output and the intermediate
    layer are as wide but stages of their own."""
    from gaprune.calibration import layer_widths
    from gaprune.data import triple_texts
    from gaprune.memory import plan_calibration

    embedder = load_embedder(bert_dir, "cpu", "float32")
    names = list(select_parameters(embedder.model.named_parameters(), ["attention"]))
    texts = {"domain": triple_texts(load_triples(data_files["chem"], 2))}
    hidden = embedder.model.config.hidden_size
    plan = plan_calibration(embedder, layer_widths(embedder.model, names), texts, 4, hessian=True, weighted=True)
    assert plan.statistics == 3 * 4 * (hidden * hidden + hidden)  # query, key, value; one side


def test_calibration_plan_of_a_side_without_texts(qwen3_dir, data_files):
    """A side given no texts counts nothing (the calibration itself then reports what is missing)."""
    from gaprune.calibration import layer_widths
    from gaprune.data import triple_texts
    from gaprune.memory import plan_calibration

    embedder = load_embedder(qwen3_dir, "cpu", "float32")
    widths = layer_widths(embedder.model, list(select_parameters(embedder.model.named_parameters(), ["mlp"])))
    domain = triple_texts(load_triples(data_files["chem"], 2))
    plans = [plan_calibration(embedder, widths, texts, 4, hessian=True, weighted=True)
             for texts in ({"domain": domain}, {"domain": domain, "general": []}, {"domain": []})]
    assert plans[0] == plans[1]
    assert (plans[2].hidden_states, plans[2].token_weights, plans[2].graph) == (0, 0, 0)
    from gaprune.errors import InputError
    from gaprune.pruning import Calibration, prune_calibrated
    from gaprune.spec import CalibrationSpec, PruneSpec

    candidates = select_parameters(embedder.model.named_parameters(), ["mlp"])
    wanda = PruneSpec(scorer="wanda", sparsity=0.5, calibration=CalibrationSpec(domain_data=domain))
    result = prune_calibrated(embedder, candidates, wanda, Calibration({"domain": domain, "general": []}, 0.0))
    assert result.masked == sum(p.numel() for p in candidates.values()) // 2
    with pytest.raises(InputError, match="no calibration texts"):
        prune_calibrated(embedder, candidates, wanda, Calibration({"domain": []}, 0.0))


def test_calibrated_pruning_logs_its_plan_and_warns_when_it_cannot_fit(caplog, monkeypatch, tmp_path, qwen3_dir,
                                                                      data_files):
    from gaprune import pruning
    from gaprune.model import SparseModel

    monkeypatch.setattr(pruning, "gpu_capacity", lambda device: 1000)  # a GPU of 1000 bytes
    with caplog.at_level("INFO"):
        SparseModel.main(["--model_path", qwen3_dir, "--output_dir", str(tmp_path), "--unstructured_pct", "0.5",
                          "--unstructured_scoring", "wanda", "--calibration_data", data_files["chem"],
                          "--calibration_samples", "3", "--device", "cpu"])
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory plan (calibration)")]
    assert " model " in line and "hidden states" in line and line.endswith("of 0 GB")
    assert any("the calibration plan needs" in r.getMessage() and "lower --calibration_samples" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
