"""The CUDA paths against the CPU ones: sums beside the model or in pinned host memory, sparse embedding
gradients, the one pass, calibrated pruning. Skipped without a GPU (CI runs on CPUs); on a GPU machine:
``python -m pytest -q tests/test_cuda.py``."""

import pytest
import torch

from gaprune import api
from gaprune.data import triple_texts
from gaprune.fisher_information import fisher_information
from gaprune.gradient_alignment import gradient_alignment
from gaprune.layers import select_parameters
from gaprune.memory import fisher_plan, pinned_total
from gaprune.modeling import load_embedder
from gaprune.spec import CalibrationSpec, PruneSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LAYERS = ["embed", "attention", "mlp"]  # the embedding: sparse gradients, added into its rows


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        scale = b[name].abs().max().item()
        torch.testing.assert_close(a[name].cpu().double(), b[name].cpu().double(), rtol=rtol, atol=rtol * scale,
                                   msg=name)


def test_fisher_on_cuda_equals_the_cpu_with_sums_on_either_side(model_dir, chem_triples):
    on_cpu = fisher_information(load_embedder(model_dir, "cpu", "float32"), chem_triples[:6], 1, LAYERS)
    embedder = load_embedder(model_dir, "cuda", "float32")
    beside = fisher_information(embedder, chem_triples[:6], 1, LAYERS, accumulate_on="device")
    pinned = fisher_information(embedder, chem_triples[:6], 1, LAYERS, accumulate_on="cpu")
    assert all(t.is_cuda for t in beside.per_weight.values())
    assert not any(t.is_cuda for t in pinned.per_weight.values())
    close(pinned.per_weight, beside.per_weight, 1e-5)  # two runs (attention's backward may differ in the last bits)
    close(beside.per_weight, on_cpu.per_weight, 1e-3)  # other kernels (TF32 off): rounding only
    assert beside.mean_loss == pytest.approx(on_cpu.mean_loss, rel=1e-4)


def test_one_pass_on_cuda_with_host_sums_equals_the_device_sums(model_dir, chem_triples, web_triples):
    embedder = load_embedder(model_dir, "cuda", "float32")
    beside = gradient_alignment(embedder, web_triples, chem_triples, 2, 8, LAYERS, with_fisher=True)
    pinned = gradient_alignment(embedder, web_triples, chem_triples, 2, 8, LAYERS, with_fisher=True,
                                accumulate_on="cpu")
    close(pinned.elementwise, beside.elementwise, 1e-5)
    for side in ("general", "domain"):
        close(pinned.fisher[side].per_weight, beside.fisher[side].per_weight, 1e-5)
    for name, rate in beside.conflict_rates.items():  # a cosine near 0 may change sign between two runs
        assert pinned.conflict_rates[name] == pytest.approx(rate, abs=0.25), name
    on_cpu = gradient_alignment(load_embedder(model_dir, "cpu", "float32"), web_triples, chem_triples, 2, 8,
                                LAYERS, with_fisher=True)
    for name, score in on_cpu.alignment_scores.items():
        assert beside.alignment_scores[name] == pytest.approx(score, abs=1e-3), name


def test_bfloat16_on_cuda_keeps_float32_sums(qwen3_dir, chem_triples):
    embedder = load_embedder(qwen3_dir, "cuda", "bfloat16")
    result = fisher_information(embedder, chem_triples[:4], 1, LAYERS, accumulate_on="cpu")
    assert all(t.dtype == torch.float32 for t in result.per_weight.values())
    reference = fisher_information(load_embedder(qwen3_dir, "cuda", "float32"), chem_triples[:4], 1, LAYERS)
    for name, array in result.per_weight.items():  # bfloat16 gradients: a few percent per weight
        correlation = torch.corrcoef(torch.stack([array.flatten().cuda(), reference.per_weight[name].flatten()]))
        assert correlation[0, 1] > 0.98, name


def test_the_pinned_blocks_are_what_the_plan_counts(qwen3_dir, chem_triples):
    """The staging pins at least the selected gradients' bytes and at most the plan's blocks (theirs, rounded
    as PyTorch rounds them)."""
    if not hasattr(torch.cuda, "host_memory_stats"):
        pytest.skip("this PyTorch has no torch.cuda.host_memory_stats")
    embedder = load_embedder(qwen3_dir, "cuda", "bfloat16")
    layers = ["attention", "mlp"]
    selected = select_parameters(embedder.model.named_parameters(), layers)
    plan = fisher_plan(embedder, selected, chem_triples[:2], 1, accumulate_on="cpu")
    staged = [p for name, p in embedder.model.named_parameters() if name in selected]
    assert plan.host["pinned gradients"] == pinned_total(staged) > 0

    def pinned_now() -> int:
        stats = torch.cuda.host_memory_stats()
        return stats.get("reserved_bytes.current", stats.get("allocated_bytes.current", 0))
    emptied = hasattr(torch._C, "_host_emptyCache")
    if emptied:
        torch._C._host_emptyCache()  # no cached block from an earlier test to reuse
    before = pinned_now()
    fisher_information(embedder, chem_triples[:2], 1, layers, accumulate_on="cpu")
    grown = pinned_now() - before
    assert grown <= plan.host["pinned gradients"]
    if emptied:
        assert grown >= sum(p.numel() * p.element_size() for p in staged)


def test_calibrated_sparsegpt_on_cuda_matches_the_cpu(model_dir, chem_triples, web_triples):
    texts = {"domain": triple_texts(chem_triples[:4]), "general": triple_texts(web_triples[:4])}
    zeros = {}
    for device in ("cpu", "cuda"):
        embedder = load_embedder(model_dir, device, "float32")
        api.prune(embedder, PruneSpec(scorer="sparsegpt", sparsity=0.5,
                                      calibration=CalibrationSpec(domain_data=texts["domain"],
                                                                  general_data=texts["general"])))
        zeros[device] = {name: (p == 0).cpu() for name, p in
                         select_parameters(embedder.model.named_parameters(), ["mlp"]).items()}
    agree = sum(int(torch.count_nonzero(zeros["cpu"][n] == zeros["cuda"][n])) for n in zeros["cpu"])
    total = sum(m.numel() for m in zeros["cpu"].values())
    assert agree / total > 0.99  # float32 Cholesky on two devices: a few weights at the threshold may swap
