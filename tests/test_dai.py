import math

import pytest
import torch

from gaprune.masking import all_finite, kth_smallest, prune_lowest, uniform_allocation
from gaprune.scorers import score_function as make_score_fn
from gaprune.coefficients import DAIConfig
from gaprune.scoring import dai_score


def softplus(x):
    return math.log1p(math.exp(x))


def expected_dai(w, fd, fg, a, cfg):
    """The DAI formula written out element by element in float64."""
    raw = [(fd[i] * abs(w[i]) - cfg.beta * fg[i] * abs(w[i])) * min(max(1 + 0.2 * a[i], 0.8), 1.2)
           + cfg.compression_weight * math.sqrt(abs(w[i]) + 1e-8) for i in range(len(w))]
    s = [softplus(r) for r in raw]
    n = len(s)
    mean = sum(s) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in s) / (n - 1))
    if std < 1e-6:
        mean_abs = sum(abs(x) for x in w) / n
        s = [s[i] * (0.5 + 0.5 * abs(w[i]) / (mean_abs + 1e-8)) for i in range(n)]
        mean = sum(s) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in s) / (n - 1))
    if cfg.score_postproc == "zscore_sigmoid":
        s = [1 / (1 + math.exp(-((x - mean) / (std + 1e-8)) / max(1e-6, cfg.score_temperature))) for x in s]
    elif cfg.score_postproc == "minmax":
        s = [(x - min(s)) / (max(s) - min(s) + 1e-8) for x in s]
    elif cfg.score_postproc == "rank":
        order = sorted(range(n), key=lambda i: s[i])
        ranks = [0] * n
        for r, i in enumerate(order):
            ranks[i] = (r + 1) / n
        s = ranks
    if cfg.fusion_alpha != 0 or cfg.fusion_beta != 1:
        s = [cfg.fusion_alpha * fd[i] * abs(w[i]) + cfg.fusion_beta * s[i] for i in range(n)]
    return s


W = [[0.5, -1.5, 0.02], [-0.3, 2.0, 0.0]]
FD = [[2.0, 0.1, 30.0], [1.0, 0.5, 4.0]]
FG = [[1.0, 0.2, 1.0], [3.0, 0.1, 0.0]]
A = [[1.5, -0.4, 0.0], [-2.0, 0.9, 0.3]]


@pytest.mark.parametrize("cfg", [
    DAIConfig(),
    DAIConfig(score_postproc="zscore_sigmoid", score_temperature=0.5),
    DAIConfig(score_postproc="minmax"),
    DAIConfig(score_postproc="rank"),
    DAIConfig(beta=0.3, compression_weight=2.0),
    DAIConfig(score_postproc="minmax", fusion_alpha=0.7, fusion_beta=0.5),
    DAIConfig(fusion_alpha=0.0, fusion_beta=2.0),
])
def test_dai_score_matches_the_formula(cfg):
    t = lambda x: torch.tensor(x, dtype=torch.float32)
    got = dai_score(t(W), t(FD), t(FG), t(A), cfg)
    flat = lambda x: [v for row in x for v in row]
    expected = expected_dai(flat(W), flat(FD), flat(FG), flat(A), cfg)
    assert got.shape == (6,)
    for g, e in zip(got.tolist(), expected):
        assert g == pytest.approx(e, rel=1e-5, abs=1e-6)


def test_missing_sides_reduce_to_magnitude_and_flat_scores_fall_back():
    w = torch.tensor([0.1, -0.4, 0.2, 0.9])
    # no Fisher file on either side (1.0) and no alignment (0): the score is a function of |w| alone
    scores = dai_score(w, 1.0, 1.0, 0.0, DAIConfig())
    assert torch.argsort(scores).tolist() == torch.argsort(w.abs()).tolist()
    # no magnitude term and equal Fisher sides: every raw score is 0, softplus(0) = ln 2 everywhere
    flat = dai_score(w, 1.0, 1.0, 0.0, DAIConfig(compression_weight=0.0))
    expected = [math.log(2) * (0.5 + 0.5 * abs(x) / (0.4 + 1e-8)) for x in w.tolist()]
    assert flat.tolist() == pytest.approx(expected, rel=1e-6)


def test_kth_smallest_matches_concatenation_with_ties_and_negatives():
    torch.manual_seed(0)
    parts = [torch.randn(1000) * 5, torch.full((300,), 0.25), torch.randn(77) - 3, torch.tensor([-0.0, 0.0, 1e-30])]
    everything = torch.cat(parts)
    for k in (1, 2, 500, 700, 1000, 1100, 1300, 1379, len(everything)):
        th = kth_smallest(lambda: iter(parts), k)
        assert th.value == torch.kthvalue(everything, k).values.item()
        assert th.below == int((everything < th.value).sum())
        assert 1 <= th.ties_to_take <= int((everything == th.value).sum())


def test_kth_smallest_at_the_ends_of_the_float_range():
    """The largest finite scores fall in the top bins of the int32 keys, the most negative in the bottom ones."""
    extremes = torch.tensor([3.4e38, 3.3e38, 3.39e38, -3.4e38, -1e38, 1.0, 0.0])
    for k in range(1, len(extremes) + 1):
        assert kth_smallest(lambda: iter([extremes]), k).value == torch.kthvalue(extremes, k).values.item()


def fresh(values):
    return {name: torch.tensor(v, dtype=torch.float32).clone() for name, v in values.items()}


def test_global_budget_zeroes_exactly_k_lowest_with_ties_and_existing_zeros():
    torch.manual_seed(1)
    weights = {"layers.0.mlp.up_proj.weight": torch.randn(40, 30), "layers.1.mlp.up_proj.weight": torch.randn(20, 50)}
    weights["layers.0.mlp.up_proj.weight"][:3] = 0.0  # 90 zeros already
    weights["layers.1.mlp.up_proj.weight"][:, :5] = 0.7  # 100 tied magnitudes
    original = {n: w.clone() for n, w in weights.items()}
    score_fn = lambda name, w: dai_score(original[name], 1.0, 1.0, 0.0, DAIConfig())
    all_scores = torch.cat([score_fn(n, w) for n, w in original.items()])
    total = all_scores.numel()
    for pct in (0.0, 0.3, 0.5, 0.71, 1.0):
        pruned = {n: w.clone() for n, w in original.items()}
        result = prune_lowest(pruned, score_fn, pct)
        k = int(total * pct)
        assert result.masked == k
        masked = torch.cat([((p == 0) & (o != 0)).flatten() for p, o in zip(pruned.values(), original.values())])
        zeros_before = sum(int((o == 0).sum()) for o in original.values())
        zeros_after = sum(int((p == 0).sum()) for p in pruned.values())
        assert zeros_after - zeros_before == result.newly_zeroed
        assert result.newly_zeroed == int(masked.sum())
        if k:
            threshold = torch.kthvalue(all_scores, k).values.item()
            assert all(p["score_stats"]["threshold"] == threshold for p in result.per_param.values())
            # everything strictly below the threshold is gone; nothing above it is
            changed = torch.cat([(p != o).flatten() for p, o in zip(pruned.values(), original.values())])
            assert bool((all_scores[changed] <= threshold).all())
            assert bool((torch.cat([p.flatten() for p in pruned.values()])[all_scores < threshold] == 0).all())


def test_uniform_allocation_rounding_and_rho_bounds():
    sizes = {"layers.0": 100, "layers.1": 300, "layers.2": 200}
    # k = 301: shares 50.17, 150.5, 100.33 -> floors 50, 150, 100; remainder 1 to the largest layer
    assert uniform_allocation(sizes, 301, 0.0, 1.0) == {"layers.0": 50, "layers.1": 151, "layers.2": 100}
    # clamped to [floor(0.3 n), floor(0.4 n)]
    assert uniform_allocation(sizes, 120, 0.3, 0.4) == {"layers.0": 30, "layers.1": 90, "layers.2": 60}
    assert uniform_allocation(sizes, 590, 0.0, 0.9) == {"layers.0": 90, "layers.1": 270, "layers.2": 180}


def test_uniform_budget_prunes_each_layers_share():
    torch.manual_seed(2)
    weights = {"layers.0.mlp.up_proj.weight": torch.randn(10, 10), "layers.0.mlp.down_proj.weight": torch.randn(10, 10),
               "layers.1.mlp.up_proj.weight": torch.randn(10, 40) * 10}
    original = {n: w.clone() for n, w in weights.items()}
    score_fn = lambda name, w: dai_score(original[name], 1.0, 1.0, 0.0, DAIConfig())
    result = prune_lowest(weights, score_fn, 0.5, "uniform", 0.05, 0.95)
    # 300 of 600 weights: each layer its size's share, 100 of layer 0's 200 and 200 of layer 1's 400
    assert result.per_layer_allocations["layers.0"]["allocated"] == 100
    assert result.per_layer_allocations["layers.1"]["allocated"] == 200
    assert result.per_layer_allocations["layers.0"]["masked"] == 100
    assert int((weights["layers.1.mlp.up_proj.weight"] == 0).sum()) == 200
    # with a global budget the larger-magnitude layer 1 would keep almost everything
    global_weights = {n: w.clone() for n, w in original.items()}
    global_result = prune_lowest(global_weights, score_fn, 0.5)
    assert global_result.per_layer_allocations["layers.1"]["masked"] < 200


# Two tensors with Fisher arrays, a per-weight cosine for the first and a per-row cosine for the second.
NEW_W = {"a": torch.tensor([[0.5, -1.5, 0.02], [-0.3, 2.0, 0.1]]), "b": torch.tensor([[0.2, -0.1], [1.0, 0.4]])}
NEW_FD = {"a": torch.tensor([[2.0, 0.1, 30.0], [1.0, 0.5, 4.0]]), "b": torch.tensor([[0.3, 8.0], [0.2, 0.6]])}
NEW_FG = {"a": torch.tensor([[1.0, 0.2, 1.0], [3.0, 0.1, 0.5]]), "b": torch.tensor([[5.0, 0.1], [0.4, 0.2]])}
NEW_S = {"a": torch.tensor([[0.9, -0.4, 0.0], [-1.0, 0.3, 0.5]]), "b": torch.tensor([-0.5, 0.8])}


def new_arrays(side, name):
    table = {"domain_fisher": NEW_FD, "general_fisher": NEW_FG, "alignment_cosine": NEW_S}[side]
    return table[name].clone()


def expected_new_scores(scoring, cfg):
    """dai_paper / aligned_saliency written out weight by weight in float64."""
    def flat(t):
        return [float(v) for v in t.flatten()]
    total = sum(w.numel() for w in NEW_W.values())
    global_mean = {side: sum(sum(flat(t[n])) for n in NEW_W) / total for side, t in (("d", NEW_FD), ("g", NEW_FG))}
    out = {}
    for name, w in NEW_W.items():
        fd, fg, ws = flat(NEW_FD[name]), flat(NEW_FG[name]), flat(w)
        cols = w.shape[1]
        s = flat(NEW_S[name]) if NEW_S[name].shape == w.shape else [float(NEW_S[name][i // cols]) for i in range(w.numel())]
        if cfg.fisher_norm == "global":
            fd = [x / global_mean["d"] for x in fd]
            fg = [x / global_mean["g"] for x in fg]
        elif cfg.fisher_norm == "tensor":
            fd = [x / (sum(fd) / len(fd)) for x in fd]
            fg = [x / (sum(fg) / len(fg)) for x in fg]
        scores = []
        for i, x in enumerate(ws):
            if scoring == "dai_paper":
                base = (fd[i] - cfg.beta * fg[i]) * abs(x) + cfg.compression_weight * math.sqrt(abs(x) + 1e-8)
            else:
                base = (cfg.domain_weight * fd[i] + cfg.general_weight * fg[i]) * x * x
            scores.append(base * (1 + cfg.alignment_weight * s[i]))
        out[name] = scores
    return out


@pytest.mark.parametrize("scoring", ["dai_paper", "aligned_saliency"])
@pytest.mark.parametrize("cfg", [
    DAIConfig(),
    DAIConfig(fisher_norm="tensor", alignment_weight=0.8),
    DAIConfig(fisher_norm="none", alignment_weight=0.0, beta=0.5, compression_weight=0.1),
    DAIConfig(domain_weight=2.0, general_weight=0.0, alignment_weight=1.0),
])
def test_new_scorers_match_their_formulas(scoring, cfg):
    score_fn = make_score_fn(scoring, new_arrays, cfg, candidates=NEW_W)
    expected = expected_new_scores(scoring, cfg)
    for name, w in NEW_W.items():
        assert score_fn(name, w).tolist() == pytest.approx(expected[name], rel=1e-5, abs=1e-7)


def test_new_scorers_without_score_files():
    absent = lambda side, name: None
    w = torch.tensor([0.1, -0.4, 0.2, 0.9])
    # dai_paper with no files: both Fisher sides 1, (1 - beta) = 0 -> the sqrt|w| term alone, no alignment factor
    score = make_score_fn("dai_paper", absent, DAIConfig(), candidates={"w": w})("w", w)
    assert score.tolist() == pytest.approx([0.5 * math.sqrt(abs(x) + 1e-8) for x in w.tolist()], rel=1e-6)
    with pytest.raises(ValueError, match="nonzero domain_weight or general_weight"):
        make_score_fn("aligned_saliency", absent, DAIConfig(domain_weight=0, general_weight=0), candidates={"w": w})("w", w)


def test_alignment_changes_the_mask_where_fisher_ties():
    # equal Fisher and magnitude everywhere: only the cosine decides, and conflicting weights go first
    w = {"t": torch.ones(2, 4)}
    arrays = {"domain_fisher": torch.ones(2, 4), "general_fisher": torch.ones(2, 4),
              "alignment_cosine": torch.tensor([[0.9, -0.8, 0.1, -0.2], [0.5, 0.0, -0.9, 0.3]])}
    score_fn = make_score_fn("aligned_saliency", lambda side, name: arrays[side].clone(), DAIConfig(alignment_weight=0.5),
                             candidates=w)
    result = prune_lowest(w, score_fn, 0.25)
    assert result.masked == 2
    assert (w["t"] == 0).nonzero().tolist() == [[0, 1], [1, 2]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("at", [0, 4097, 99_999])
def test_one_non_finite_value_anywhere_is_caught(bad, at):
    values = torch.randn(100_000)
    assert all_finite(values) and all_finite(torch.empty(0))
    values[at] = bad
    assert not all_finite(values)
    assert not all_finite(values.view(400, 250))


@pytest.mark.parametrize("strategy", ["global", "uniform"])
def test_cached_scores_give_the_same_masks_from_one_scoring_pass(strategy):
    """With room to keep the scores, every tensor is scored once instead of three times (two counting passes
    and the mask pass), and the masks and reports are the same. With room for one tensor, the global budget
    keeps the first (1 + 3 + 3 calls); the uniform one finishes each layer before the next, so it is enough."""
    torch.manual_seed(2)
    original = {f"layers.{i}.mlp.up_proj.weight": torch.randn(30, 40) for i in range(3)}
    calls = []

    def score_fn(name, weight):
        calls.append(name)
        return dai_score(weight, 1.0, 1.0, 0.0, DAIConfig())
    results, masks = {}, {}
    for cache_bytes in (0, 30 * 40 * 4, 10 ** 9):
        calls.clear()
        pruned = {n: w.clone() for n, w in original.items()}
        results[cache_bytes] = prune_lowest(pruned, score_fn, 0.4, strategy, cache_bytes=cache_bytes)
        masks[cache_bytes] = {n: p == 0 for n, p in pruned.items()}
        expected = {0: 9, 30 * 40 * 4: 7 if strategy == "global" else 3, 10 ** 9: 3}[cache_bytes]
        assert len(calls) == expected, (cache_bytes, calls)
    for cache_bytes in (30 * 40 * 4, 10 ** 9):
        assert all(torch.equal(masks[cache_bytes][n], masks[0][n]) for n in original)
        assert results[cache_bytes].per_param == results[0].per_param
