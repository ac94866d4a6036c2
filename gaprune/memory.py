"""A stage's peak memory, estimated before it runs, and what was really used, measured after.

The scoring stages hold: the model; one set of gradients (gradient.py holds two: the general side's
while the domain side's backward runs), embeddings not counted (their gradients are sparse: the rows of
the batch's tokens); float32 sums (fisher.py: one array per selected weight; gradient.py: two per
parameter, plus two per selected weight with --fisher_output_dir); and the activations autograd keeps
for one batch, which grow with the batch's padded tokens. The sums can live in host memory instead
(``--accumulate_on cpu``) or be sharded across the torchrun ranks (``sharded``: each tensor's sums on one
rank); ``auto`` keeps them beside the model while the device stays under ``DEVICE_SHARE`` full, else shards
them when there are several ranks and that fits, else moves them to the host.

On a CPU the plan counts resident memory, and a checkpoint converted while loading (a bfloat16 file
computed in float32) is read whole: its mapped file and the converted copy peak together while loading,
before any gradient, sum or activation exists, so the plan takes the larger of the two phases.

Calibrated pruning (Wanda, SparseGPT, reconstruction) has a plan of its own, ``CalibrationPlan``.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from gaprune.data import TRIPLE_KEYS, batched
from gaprune.families import family_of_names
from gaprune.layers import embedding_weights, transformer_blocks
from gaprune.modeling import Embedder, is_encoder

log = logging.getLogger(__name__)
GB = 1024 ** 3
DEVICE_SHARE = 0.9  # auto keeps the sums on the GPU while the plan stays under this share of its memory
WORKING_PARTS = ("gradients", "sums", "activations")  # allocated after loading, while scoring
SCORE_CACHE_SHARE = 0.25  # of the available host memory, that masking may keep scores in
PINNED_BLOCK = 1 << 30  # bytes per pinned block of gradients (a power of two, as the allocator rounds)


def process_rss() -> int:
    """Resident memory of this process now (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def peak_rss() -> int:
    """The process's peak resident memory so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def pinned_bytes(size: int) -> int:
    """What a pinned block of ``size`` bytes holds: PyTorch's pinned allocator rounds it up to a power of two."""
    return 1 << (size - 1).bit_length() if size > 0 else 0


def pinned_layout(sizes: Sequence[int], block: int = PINNED_BLOCK) -> tuple[list[int], list[tuple[int, int]]]:
    """Pack tensors of ``sizes`` (bytes) into pinned blocks: returns each block's used bytes and each tensor's
    (block, offset). One block rounded up to a power of two would waste up to half of it (Qwen3-8B's 12.9 GB of
    gradients would pin 16 GB); bins of ``block`` bytes (or the largest tensor's power of two), filled largest
    first, waste only their gaps and the rounding of their used bytes, which stays within each bin."""
    capacity = max(block, pinned_bytes(max(sizes, default=0)))
    used: list[int] = []
    places: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        bin_ = next((b for b, taken in enumerate(used) if taken + sizes[index] <= capacity), len(used))
        if bin_ == len(used):
            used.append(0)
        places[index] = (bin_, used[bin_])
        used[bin_] += sizes[index]
    return used, places


def pinned_layouts(tensors: Sequence[torch.Tensor]) -> Iterator[tuple[list[torch.Tensor], list[int],
                                                                         list[tuple[int, int]]]]:
    """For each dtype (a block holds one): its tensors in their order, and their pinned_layout."""
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        yield (group, *pinned_layout([t.numel() * t.element_size() for t in group]))


def pinned_total(tensors: Sequence[torch.Tensor]) -> int:
    """The pinned memory that host copies of ``tensors`` take, blocks rounded as the allocator rounds them."""
    return sum(pinned_bytes(size) for _, used, _ in pinned_layouts(tensors) for size in used)


def sharded_sums(params: Sequence[torch.Tensor], selected: Sequence[torch.Tensor], arrays_all: int,
                 arrays_selected: int, ranks: int,
                 sparse: Sequence[torch.Tensor] = ()) -> tuple[list[int | None], list[int]]:
    """Sums sharded across ``ranks``, ``arrays_all`` per parameter and ``arrays_selected`` more per selected one:
    the rank holding each of ``params``' sums, and the float32 elements each rank then holds. Tensors are dealt
    largest first to the rank holding the least so far (ties to the lowest rank: every rank computes the same
    owners). ``sparse`` tensors (embeddings: their gradients are the batch's rows) and tensors without sums get
    None: every rank keeps its own sums of those, added across ranks at the end."""
    chosen, sparse_ids = {id(p) for p in selected}, {id(p) for p in sparse}
    sizes = [p.numel() * (arrays_all + arrays_selected * (id(p) in chosen)) for p in params]
    owners: list[int | None] = [None] * len(params)
    held = [sum(size for p, size in zip(params, sizes) if id(p) in sparse_ids)] * ranks
    for index in sorted(range(len(params)), key=lambda i: -sizes[i]):
        if sizes[index] and id(params[index]) not in sparse_ids:
            owners[index] = rank = min(range(ranks), key=held.__getitem__)
            held[rank] += sizes[index]
    return owners, held


def activation_bytes_per_token(config, dtype_bytes: int) -> int:
    """What autograd keeps per token for the backward pass: per layer the inputs and outputs of the norms,
    projections, attention and MLP activation in the model's dtype (norms also as float32)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    query = heads * head_dim
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    per_layer = dtype_bytes * (4 * hidden + 4 * query + 4 * kv + 4 * config.intermediate_size) + 4 * 2 * hidden
    return per_layer * config.num_hidden_layers + dtype_bytes * 2 * hidden


def activation_gradient_bytes_per_token(config, dtype_bytes: int, length: int, gated_mlp: bool,
                                        qk_norms: bool) -> int:
    """What autograd keeps per token of texts padded to ``length`` when only the activations take gradients
    (every weight frozen, so no linear layer keeps its input), per layer: the two norms' inputs and float32
    statistics; sdpa's queries, keys and values (grouped keys and values expanded to every head), output,
    float32 log-sum-exp and the padded batch's attention mask (Qwen3 also keeps q and k before its q/k norms);
    the MLP's activation inputs (``gated_mlp``: gate, up and their activation; BERT: the GELU's input). Then
    the final norm's input. (The rotary tables, one per position, are left out.)"""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    attention = 4 * heads * head_dim + length + (heads + kv_heads) * head_dim * qk_norms
    mlp = (3 if gated_mlp else 1) * config.intermediate_size
    statistics = 4 * (2 + heads + (heads + kv_heads) * qk_norms)
    per_layer = dtype_bytes * (2 * hidden + attention + mlp) + statistics
    return per_layer * config.num_hidden_layers + dtype_bytes * hidden


def batch_tokens(embedder: Embedder, batches: Sequence[Sequence[dict]]) -> int:
    """The most padded tokens one batch puts through the model (queries, positives and negatives each padded
    to their longest text, capped at the model's max length)."""
    most = 0
    for batch in filter(None, batches):
        tokens = 0
        for key in TRIPLE_KEYS:
            lengths = embedder.tokenizer([record[key] for record in batch], truncation=True,
                                         max_length=embedder.max_length)["input_ids"]
            tokens += len(batch) * max(len(ids) for ids in lengths)
        most = max(most, tokens)
    return most


@dataclass
class MemoryPlan:
    """Bytes by part on the compute device (``device``) and in host memory (``host``)."""

    stage: str
    device_name: str
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    capacity: int | None = None  # the GPU's memory; None on the CPU
    accumulate_on: str = "device"
    ranks: int = 1  # torchrun processes, among which sharded sums are split
    loading: int = 0  # host: a checkpoint converted while loading, its file mapped until the copy is made
    advice: str = "try --accumulate_on cpu (or sharded under torchrun) or a smaller --batch_size"  # when too large

    @property
    def device_total(self) -> int:
        """The peak: the mapped file of ``loading`` is gone before the working parts exist, so the larger counts."""
        working = sum(self.device.get(part, 0) for part in WORKING_PARTS)
        return sum(self.device.values()) + max(0, self.loading - working)

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    def line(self) -> str:
        def parts(items: dict[str, int]) -> str:
            return " + ".join(f"{name} {_gb(value)}" for name, value in items.items() if value)
        place = f"sharded across {self.ranks} ranks" if self.accumulate_on == "sharded" else f"on {self.accumulate_on}"
        text = f"memory plan ({self.stage}, sums {place}): {self.device_name} " \
               f"{parts(self.device)} = {_gb(self.device_total)} GB"
        if self.capacity:
            text += f" of {self.capacity / GB:.0f} GB"
        if self.loading:
            text += f" (while loading: the checkpoint mapped {_gb(self.loading)} in place of " \
                    f"{' + '.join(WORKING_PARTS)})"
        if self.host and self.device_name != "host":
            text += f"; host {parts(self.host)} = {_gb(self.host_total)} GB"
        return text


def gpu_capacity(device: torch.device) -> int | None:
    """What this process can use of its GPU: what is free plus what it already holds (the model)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_allocated(device)


def _available_host_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _auto_place(plan: MemoryPlan, beside: int, sharded: int, ranks: int) -> str:
    """Where auto puts the sums on a GPU: beside the model while the plan stays under ``DEVICE_SHARE`` of it,
    else sharded when there are several ranks and that fits, else in host memory."""
    plan.device["sums"] = sharded
    shard_fits = ranks > 1 and plan.device_total <= DEVICE_SHARE * plan.capacity
    plan.device["sums"] = beside
    return "device" if plan.device_total <= DEVICE_SHARE * plan.capacity else "sharded" if shard_fits else "cpu"


def plan_scoring(stage: str, embedder: Embedder, selected: dict[str, torch.Tensor], batches: Sequence[Sequence[dict]],
                 sum_arrays_all: int, sum_arrays_selected: int, gradient_copies: int,
                 accumulate_on: str = "auto", runtime_rss: int = 0, capacity: int | None = None,
                 ranks: int = 1, result_arrays: int = 1) -> MemoryPlan:
    """The plan of a scoring stage: ``sum_arrays_all`` float32 arrays the size of every parameter and
    ``sum_arrays_selected`` the size of the selected ones; ``gradient_copies`` sets of gradients alive at
    once. Where the device would be over ``DEVICE_SHARE`` full, ``accumulate_on`` auto becomes sharded when
    ``ranks`` > 1 and that fits, else cpu. Sharded, rank 0 receives the ``result_arrays`` per selected weight
    that the other ranks finished into host memory.
    ``runtime_rss``: the process's resident memory before the model was loaded (Python, torch, the data),
    counted on a CPU run. ``capacity``: plan for a GPU of that many bytes (default: the model's GPU, if any)."""
    model = embedder.model
    device = embedder.device
    dtype_bytes = model.dtype.itemsize
    trainable = [p for p in model.parameters() if p.requires_grad]
    numel_all = sum(p.numel() for p in trainable)
    embeddings = {id(p) for p in embedding_weights(model)}  # sparse gradients: the batch's token rows only
    dense = [p for p in trainable if id(p) not in embeddings]
    numel_dense_gradients = sum(p.numel() for p in dense)
    numel_selected = sum(p.numel() for p in selected.values())
    sum_bytes = 4 * (sum_arrays_all * numel_all + sum_arrays_selected * numel_selected)
    capacity = capacity or gpu_capacity(device)
    on_gpu = capacity is not None
    plan = MemoryPlan(stage, "cuda" if on_gpu else "host", capacity=capacity, ranks=ranks)
    plan.device = {
        "model": sum(p.numel() * p.element_size() for p in model.parameters()),
        "gradients": gradient_copies * numel_dense_gradients * dtype_bytes,
        "sums": sum_bytes,
        "activations": batch_tokens(embedder, batches) * activation_bytes_per_token(model.config, dtype_bytes),
    }
    beside = plan.device["sums"]
    owners, held = sharded_sums(trainable, list(selected.values()), sum_arrays_all, sum_arrays_selected, ranks,
                                embedding_weights(model))
    reduce_buffer = max((p.numel() for p, owner in zip(trainable, owners) if owner is not None), default=0)
    sharded = 4 * (max(held) + reduce_buffer) if ranks > 1 else beside  # one rank: sharding is summing beside
    if not on_gpu:
        plan.device = {"runtime": runtime_rss, **plan.device}
        source = embedder.source_dtype
        if isinstance(source, torch.dtype) and source != model.dtype:  # converted: the whole file is read once
            plan.loading = sum(p.numel() for p in model.parameters()) * source.itemsize
        accumulate_on = "device" if accumulate_on == "auto" else accumulate_on
    elif accumulate_on == "auto":
        accumulate_on = _auto_place(plan, beside, sharded, ranks)
    if accumulate_on == "sharded" and ranks == 1:
        log.info("--accumulate_on sharded needs several torchrun processes on a backend for the model's device "
                 "(nccl for CUDA, gloo for the CPU): the sums stay beside the model")
        accumulate_on = "device"
    plan.accumulate_on = accumulate_on
    chosen = {id(p) for p in selected.values()}
    if accumulate_on == "sharded":
        plan.device["sums"] = sharded
        sent = sum(p.numel() for p, owner in zip(trainable, owners) if id(p) in chosen and owner not in (None, 0))
        (plan.host if on_gpu else plan.device)["arrays received by rank 0"] = 4 * result_arrays * sent
    if not on_gpu:
        return plan
    if accumulate_on == "cpu":
        # fisher.py stages the selected gradients only
        staged = dense if sum_arrays_all else [p for p in dense if id(p) in chosen]
        plan.host = {"sums": plan.device.pop("sums"), "pinned gradients": pinned_total(staged)}
    return plan


def score_cache_bytes() -> int:
    """Host memory that masking may keep scores in between its passes: a quarter of what is available now
    (0 where unknown). Qwen3-Embedding-4B's MLP scores take 10.8 GB."""
    return int((_available_host_memory() or 0) * SCORE_CACHE_SHARE)


def warn_if_too_large(plan: MemoryPlan | CalibrationPlan) -> None:
    """Warn when the plan exceeds the GPU, or when the host parts of every process on this node exceed the
    host memory available now (torchrun's processes on one machine share it; with sharded sums only rank 0
    has host parts)."""
    if plan.capacity and plan.device_total > plan.capacity:
        log.warning("the %s plan needs %.1f GB on the GPU, which has %.1f GB for this process: expect "
                    "out-of-memory; %s", plan.stage, plan.device_total / GB, plan.capacity / GB, plan.advice)
    if not plan.host:
        return
    processes = 1 if plan.accumulate_on == "sharded" else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available = _available_host_memory()
    if available is not None and processes * plan.host_total > available:
        log.warning("the plan's host memory (%s) needs %.1f GB for %d process(es) on this machine, and %.1f GB are "
                    "available", ", ".join(plan.host), processes * plan.host_total / GB, processes, available / GB)


def fisher_plan(embedder: Embedder, selected: dict[str, torch.Tensor], triples: Sequence[dict], batch_size: int,
                accumulate_on: str = "auto", runtime_rss: int = 0, capacity: int | None = None,
                ranks: int = 1) -> MemoryPlan:
    return plan_scoring("fisher", embedder, selected, batched(triples, min(batch_size, len(triples))), 0, 1, 1,
                        accumulate_on, runtime_rss, capacity, ranks)


def alignment_plan(embedder: Embedder, selected: dict[str, torch.Tensor], general: Sequence[dict],
                   domain: Sequence[dict], batch_size: int, with_fisher: bool,
                   accumulate_on: str = "auto", runtime_rss: int = 0, capacity: int | None = None,
                   ranks: int = 1, cosine: bool = False) -> MemoryPlan:
    """gradient.py's plan: its longest half-batches are taken from the longest triples of each side.
    ``cosine``: an --alignment_mode that adds a cosine array to the element-wise one."""
    def longest(records: Sequence[dict], size: int) -> list[dict]:
        return sorted(records, key=lambda r: -sum(len(r[k]) for k in TRIPLE_KEYS))[:size]
    halves = [longest(general, batch_size // 2), longest(domain, batch_size - batch_size // 2)]
    return plan_scoring("gradient" + (" + fisher" if with_fisher else ""), embedder, selected, halves, 2,
                        2 if with_fisher else 0, 2, accumulate_on, runtime_rss, capacity, ranks,
                        1 + cosine + 2 * with_fisher)


@dataclass
class CalibrationPlan:
    """Calibrated pruning's peak (Wanda, SparseGPT, --reconstruct), in bytes on the compute device. The model
    and the token weights stay throughout; the loss-gradient pass (its graph) is over before the block-by-block
    pass (the hidden states at one block boundary, one block running on one batch, one stage's statistics,
    the pruner's working copies) begins, so the larger of the two phases counts."""

    device_name: str
    model: int
    hidden_states: int  # every batch's input to a block (with its attention mask), and one batch's output
    block_run: int  # one batch through one block: what it allocates on the way, the layer input in float32
    statistics: int  # per side: X^T X (with a Hessian) and sum x^2, for the layers of the largest stage
    pruner: int  # SparseGPT on the largest layer: H's copies and factors, float32 weight copies
    dense_model: int = 0  # --reconstruction_target dense: the dense hidden states, a block's copy, one layer input
    token_weights: int = 0  # --calibration_weighting loss_gradient: a weight per real token and layer
    graph: int = 0  # ...and one field of a batch of triples: its autograd graph, the layers' outputs and gradients
    capacity: int | None = None
    stage: str = "calibration"
    advice: str = "lower --calibration_samples, --calibration_max_length or --calibration_batch_size"
    host: dict[str, int] = field(default_factory=dict)  # nothing: all of it is on the compute device
    host_total: int = 0

    @property
    def device_total(self) -> int:
        calibrating = self.hidden_states + self.dense_model + self.block_run + self.statistics + self.pruner
        return self.model + self.token_weights + max(self.graph, calibrating)

    def line(self) -> str:
        weighted = f" + token weights {_gb(self.token_weights)}" if self.token_weights else ""
        dense = f" + dense model {_gb(self.dense_model)}" if self.dense_model else ""
        calibrating = (f"hidden states {_gb(self.hidden_states)}{dense} + block run {_gb(self.block_run)} + statistics "
                       f"{_gb(self.statistics)} + pruner {_gb(self.pruner)}")
        phases = f"max(loss-gradient graph {_gb(self.graph)}, {calibrating})" if self.graph else calibrating
        text = f"memory plan (calibration): {self.device_name} model {_gb(self.model)}{weighted} + {phases} " \
               f"= {_gb(self.device_total)} GB"
        return text + (f" of {self.capacity / GB:.0f} GB" if self.capacity else "")


def _gb(value: int) -> str:
    return f"{value / GB:.2f}"


def plan_calibration(embedder: Embedder, layers: Sequence[tuple[int, str, int, int]], texts: dict[str, Sequence[str]],
                     batch_size: int, hessian: bool, weighted: bool, world_size: int = 1,
                     capacity: int | None = None, dense_targets: bool = False) -> CalibrationPlan:
    """The plan of calibrated pruning. ``layers``: (block, parent module, inputs, outputs) of each candidate layer
    (``calibration.layer_widths``); ``texts`` by side, in batches of ``batch_size`` (texts for the block pass,
    triples for the loss-gradient pass). Under torchrun each of ``world_size`` ranks holds the hidden states of
    its share of the batches (the busiest rank counts). A stage is taken as the candidates of one parent module
    with inputs of one width (q/k/v, gate/up; with an attention output projection as wide as q/k/v's input,
    an upper bound); with token weights each layer keeps its own statistics, else a stage shares one.
    ``dense_targets``: the dense model runs beside the pruned one (its hidden states without their masks, which
    both share; a copy of the largest block with candidates; one batch's input to a layer, with its float32
    copies) and every statistic adds x_dense x^T."""
    model = embedder.model
    config = model.config
    dtype_bytes = model.dtype.itemsize
    lengths = [[len(ids) for ids in embedder.tokenizer(list(side_texts), truncation=True,
                                                       max_length=embedder.max_length)["input_ids"]]
               for side_texts in texts.values() if side_texts]
    batches = [side[start:start + batch_size] for side in lengths for start in range(0, len(side), batch_size)]
    tokens = [len(batch) * max(batch) for batch in batches]  # padded to the batch's longest text
    stored = [count * (config.hidden_size * dtype_bytes + max(batch)) for count, batch in zip(tokens, batches)]
    ranks = world_size if len(batches) >= world_size else 1  # fewer batches than ranks: every rank runs them all
    most = max(tokens, default=0)
    hidden = max(sum(stored[rank::ranks]) for rank in range(ranks)) + most * config.hidden_size * dtype_bytes
    states = max(sum(tokens[rank::ranks]) for rank in range(ranks)) * config.hidden_size * dtype_bytes
    widest = max(width for _, _, width, _ in layers)
    block_run = most * (activation_bytes_per_token(config, dtype_bytes) // config.num_hidden_layers + 2 * 4 * widest)
    stages: dict[tuple[int, str, int], int] = {}
    for block, parent, width, _ in layers:
        stages[block, parent, width] = stages.get((block, parent, width), 0) + 1
    squares = (hessian, dense_targets).count(True)  # X^T X, X_dense^T X
    statistics = max(4 * len(lengths) * (squares * width * width + width) * (count if weighted else 1)
                     for (_, _, width), count in stages.items())
    # H blended (and, in Hessian group order, permuted) beside the dampened copy and its factor or inverse;
    # the float32 weight being updated and its result (and W*, with dense targets)
    copies = 3 if dense_targets else 2
    pruner = max(4 * (4 * width * width + copies * width * out) for _, _, width, out in layers) if hessian else 0
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = CalibrationPlan("cuda" if capacity else "host", model_bytes, hidden, block_run, statistics, pruner,
                           capacity=capacity)
    if dense_targets:
        blocks = transformer_blocks(model)
        copied = max(sum(p.numel() * p.element_size() for p in blocks[block].parameters()) for block, *_ in layers)
        kept = most * widest * (dtype_bytes + 4 * (2 if weighted else 1))  # as taken, in float32, weighted
        plan.dense_model = states + copied + kept
    if weighted:
        plan.token_weights = 4 * len(layers) * sum(map(sum, lengths))
        fields = [side[start + key:start + 3 * batch_size:3]  # one field of a batch of triples
                  for side in lengths for start in range(0, len(side), 3 * batch_size) for key in range(3)]
        outputs = 2 * sum(out for _, _, _, out in layers) * dtype_bytes  # each candidate's y and dL/dy, per token
        gated_mlp, qk_norms = _mlp_and_norms(model)
        plan.graph = max((len(one) * max(one) * (activation_gradient_bytes_per_token(config, dtype_bytes, max(one),
                                                                                      gated_mlp, qk_norms)
                                                 + outputs) for one in fields), default=0)
    return plan


def _mlp_and_norms(model: torch.nn.Module) -> tuple[bool, bool]:
    """Whether the model's MLP is gated (its family says; a family gaprune does not know: decoders are) and
    whether it has q/k norms (Qwen3)."""
    family = family_of_names(name for name, _ in model.named_parameters())
    if family is None:
        return not is_encoder(model.config), False
    return family.gated_mlp, any(family.matches(name, ["norm_qk"]) for name, _ in model.named_parameters())


def measured_line(plan: MemoryPlan | CalibrationPlan, device: torch.device) -> str:
    """The peak really used against the plan's estimate."""
    if device.type == "cuda":
        peak, planned, where = torch.cuda.max_memory_allocated(device), plan.device_total, "GPU"
    else:
        peak, planned, where = peak_rss(), plan.device_total + plan.host_total, "resident"
    return (f"memory used ({plan.stage}): peak {where} {peak / GB:.2f} GB against {planned / GB:.2f} GB planned "
            f"({(peak - planned) / planned:+.0%})")
