"""Wanda, SparseGPT and reconstruction on one layer against hand computation, and block-by-block calibration."""

import copy

import pytest
import torch

from conftest import hooked_inputs
from gaprune.calibration import prune_block_by_block
from gaprune.errors import InputError
from gaprune.layers import select_parameters, transformer_blocks
from gaprune.modeling import load_embedder
from gaprune.patterns import Pattern, lowest_in_groups, parse_pattern
from gaprune.pruners import dense_target_weight, hessian_group_order, sparsegpt, wanda_mask

TEXTS = {"domain": ["acid reacts with a base in water", "benzene is aromatic", "salt"],
         "general": ["the river flows north", "a cat sat on the mat"]}


def correlated_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, width, generator=generator) @ torch.randn(width, width, generator=generator) * 0.3


def test_wanda_mask_by_hand():
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 0.1, -0.2, 1.0]])
    input_sq = torch.tensor([4.0, 1.0, 0.25, 16.0])  # input norms 2, 1, 0.5, 4
    # |W| * norm: row 0 = [2, 2, 1.5, 2], row 1 = [8, 0.1, 0.1, 4]
    mask = wanda_mask(weight, input_sq, 0.5)
    assert mask.tolist() == [[True, False, True, False],  # 1.5, then the first of the tied 2s
                             [False, True, True, False]]
    assert wanda_mask(weight, input_sq, 0.5, Pattern(1, 2)).tolist() == [[True, False, True, False],
                                                                          [False, True, True, False]]


@pytest.mark.parametrize("text", ["2:4", "4:8"])
def test_n_m_patterns_prune_exactly_n_of_every_m(text):
    pattern = parse_pattern(text)
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    inputs = correlated_inputs(64, 16, 1)
    for mask in (wanda_mask(weight, inputs.square().sum(0), 0.5, pattern),
                 lowest_in_groups(weight.abs(), pattern.n, pattern.m),
                 sparsegpt(weight, inputs.T @ inputs, pattern=pattern, block_size=8)[1]):
        assert (mask.view(6, -1, pattern.m).sum(-1) == pattern.n).all()
    new, mask = sparsegpt(weight, inputs.T @ inputs, pattern=pattern, block_size=8)
    assert ((new == 0).view(6, -1, pattern.m).sum(-1) == pattern.n).all()


def test_hessian_group_order_prunes_the_strongest_groups_first():
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    inputs = correlated_inputs(64, 16, 1)
    hessian = inputs.T @ inputs
    pattern = Pattern(2, 4)
    energy = torch.diag(hessian).view(4, 4).sum(1)
    order = hessian_group_order(hessian, 4)
    assert order.view(4, 4)[:, 0].tolist() == [4 * g for g in torch.argsort(energy, descending=True).tolist()]
    new, mask = sparsegpt(weight, hessian, pattern=pattern, block_size=8, group_order="hessian")
    assert (mask.view(6, 4, 4).sum(-1) == 2).all() and torch.equal(new == 0, mask)
    # the same as SparseGPT run by hand on the columns in that order, put back in place
    by_hand, hand_mask = sparsegpt(weight[:, order], hessian[order][:, order], pattern=pattern, block_size=8)
    assert torch.equal(mask[:, order], hand_mask) and torch.allclose(new[:, order], by_hand)
    natural, natural_mask = sparsegpt(weight, hessian, pattern=pattern, block_size=8)
    assert not torch.equal(mask, natural_mask)  # the order matters once the inputs correlate
    # a shuffle of the groups does not change which weights go: the order depends on the energy alone
    shuffle = torch.tensor([2, 0, 3, 1]).repeat_interleave(4) * 4 + torch.arange(4).repeat(4)
    _, shuffled = sparsegpt(weight[:, shuffle], hessian[shuffle][:, shuffle], pattern=pattern, block_size=8,
                            group_order="hessian")
    assert torch.equal(shuffled, mask[:, shuffle])
    # groups never straddle a block, whatever M: 2:3 on 384 columns with the default block of 128
    wide = correlated_inputs(512, 384, 2)
    _, mask_2_3 = sparsegpt(torch.randn(4, 384), wide.T @ wide, pattern=Pattern(2, 3), group_order="hessian")
    assert (mask_2_3.view(4, -1, 3).sum(-1) == 2).all()
    # uncorrelated inputs: no OBS update crosses columns, so the order changes nothing
    diagonal = torch.diag(torch.diag(hessian))
    assert torch.equal(sparsegpt(weight, diagonal, pattern=pattern, group_order="hessian")[1],
                       sparsegpt(weight, diagonal, pattern=pattern)[1])


def test_patterns_that_do_not_fit_are_refused():
    with pytest.raises(InputError, match="N:M with 0 < N < M"):
        parse_pattern("4:2")
    with pytest.raises(InputError, match="multiple of 4"):
        lowest_in_groups(torch.ones(2, 6), 2, 4)


def test_sparsegpt_update_is_least_squares_when_the_pruned_columns_come_first():
    """With the mask fixed and the pruned columns before the kept ones, the OBS update of every row is the
    least-squares fit of the dense output by the kept inputs (here across blocks of 4 columns)."""
    inputs = correlated_inputs(300, 12, 0).double()
    weight = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.zeros(5, 12, dtype=torch.bool)
    mask[:, :6] = True
    new, _ = sparsegpt(weight, inputs.T @ inputs, mask=mask, block_size=4, dampening=0.0)
    reference = torch.linalg.lstsq(inputs[:, 6:], inputs @ weight.T).solution.T
    assert (new[:, :6] == 0).all()
    torch.testing.assert_close(new[:, 6:], reference, atol=1e-8, rtol=1e-8)


def test_sparsegpt_unstructured_takes_its_share_of_every_block_and_updates_the_rest():
    inputs = correlated_inputs(200, 24, 3)
    weight = torch.randn(10, 24, generator=torch.Generator().manual_seed(4))
    new, mask = sparsegpt(weight, inputs.T @ inputs, 0.5, block_size=8)
    assert [int(mask[:, start:start + 8].sum()) for start in (0, 8, 16)] == [40, 40, 40]
    assert torch.equal(new == 0, mask)
    assert (new[~mask] != weight[~mask]).float().mean() > 0.9  # the kept weights absorbed the error
    # with the mask fixed, the lazy block updates give what one block over all columns gives
    blocked, _ = sparsegpt(weight.double(), (inputs.T @ inputs).double(), mask=mask, block_size=8)
    whole, _ = sparsegpt(weight.double(), (inputs.T @ inputs).double(), mask=mask, block_size=24)
    torch.testing.assert_close(blocked, whole, atol=1e-10, rtol=1e-10)


def test_a_fixed_mask_is_kept_as_given_even_where_an_input_never_fired():
    inputs = correlated_inputs(100, 8, 5)
    inputs[:, 3] = 0  # a dead input
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(6))
    mask = lowest_in_groups(weight.abs(), 2, 4)
    mask[:, 3] = False
    new, _ = sparsegpt(weight, inputs.T @ inputs, mask=mask, block_size=4)
    assert torch.equal(new == 0, mask) and torch.equal(new[:, 3], weight[:, 3])
    free, free_mask = sparsegpt(weight, inputs.T @ inputs, 0.5, block_size=4)  # SparseGPT's own mask prunes it
    assert free_mask[:, 3].all() and (free[:, 3] == 0).all()


@pytest.mark.parametrize("seed", range(5))
def test_reconstruction_never_increases_the_output_error(seed):
    inputs = correlated_inputs(256, 32, seed)
    weight = torch.randn(24, 32, generator=torch.Generator().manual_seed(100 + seed))
    for mask in (wanda_mask(weight, torch.ones(32), 0.5),  # magnitude per row
                 torch.rand(24, 32, generator=torch.Generator().manual_seed(seed)) < 0.6,
                 lowest_in_groups(weight.abs(), 2, 4)):
        new, kept_mask = sparsegpt(weight, inputs.T @ inputs, mask=mask, block_size=8)
        assert torch.equal(kept_mask, mask) and (new[mask] == 0).all()
        reconstructed = ((new - weight) @ inputs.T).norm()
        mask_only = ((weight.masked_fill(mask, 0) - weight) @ inputs.T).norm()
        assert reconstructed < mask_only


@pytest.mark.parametrize("layer_types", [["mlp"], ["linear"]])
def test_each_layer_is_calibrated_on_the_outputs_of_the_pruned_layers_before_it(model_dir, layer_types):
    embedder = load_embedder(model_dir, "cpu")
    candidates = select_parameters(embedder.model.named_parameters(), layer_types)
    seen = {}

    def prune_layers(inputs):
        for name, layer in inputs.items():
            seen[name] = layer.sides["domain"].input_sq + layer.sides["general"].input_sq
            with torch.no_grad():
                candidates[name][:, ::2] = 0  # prune every other input column
    prune_block_by_block(embedder, candidates, TEXTS, prune_layers, batch_size=2)
    # the pruned model run as a whole sees, at every layer, what block-by-block calibration saw there
    expected = {name: inputs.square().sum(0)
                for name, inputs in hooked_inputs(embedder.model, list(candidates), embedder, TEXTS).items()}
    assert len(transformer_blocks(embedder.model)) == 2 and set(seen) == set(candidates)
    for name in candidates:
        torch.testing.assert_close(seen[name], expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_dense_targets_pair_each_token_s_dense_and_pruned_inputs(model_dir, weighted):
    """With dense_targets, a layer's cross statistics are sum over tokens of w_t x_dense x~^T: its inputs in the
    dense model against those in the pruned one (q/k/v, gate/up and down/output layers alike), each token
    weighted as in H (w_t = 1, or each layer's own token weights), while the pruned path, hence x~ and H, stays
    what it is without them."""
    embedder = load_embedder(model_dir, "cpu")
    candidates = select_parameters(embedder.model.named_parameters(), ["linear"])
    dense_model = copy.deepcopy(embedder.model)
    generator = torch.Generator().manual_seed(0)
    lengths = {side: [int(embedder.tokenize([text])["attention_mask"].sum()) for text in side_texts]
               for side, side_texts in TEXTS.items()}
    token_weights = {side: {name: [torch.rand(n, generator=generator) for n in side_lengths] for name in candidates}
                     for side, side_lengths in lengths.items()} if weighted else None
    seen = {}

    def prune_layers(inputs):
        for name, layer in inputs.items():
            seen[name] = (sum(side.cross for side in layer.sides.values()),
                          sum(side.hessian for side in layer.sides.values()))
            with torch.no_grad():
                candidates[name][:, ::2] = 0
    prune_block_by_block(embedder, candidates, TEXTS, prune_layers, hessian=True, batch_size=2,
                         token_weights=token_weights, dense_targets=True)
    dense = hooked_inputs(dense_model, list(candidates), embedder, TEXTS)
    pruned = hooked_inputs(embedder.model, list(candidates), embedder, TEXTS)
    assert set(seen) == set(candidates)
    changed = 0
    for name in candidates:
        cross, hessian = seen[name]
        weights = (torch.cat([w for side in token_weights.values() for w in side[name]]) if weighted
                   else torch.ones(len(pruned[name])))
        torch.testing.assert_close(cross, (dense[name] * weights.unsqueeze(1)).T @ pruned[name], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hessian, (pruned[name] * weights.unsqueeze(1)).T @ pruned[name], rtol=1e-4,
                                   atol=1e-4)
        changed += not torch.allclose(dense[name], pruned[name], atol=1e-3)
    assert changed >= len(candidates) - 4  # all but the first block's first layers read pruned outputs


def test_cross_calibration_blends_per_token_means(bert_dir):
    embedder = load_embedder(bert_dir, "cpu")
    candidates = select_parameters(embedder.model.named_parameters(), ["mlp_up"])
    name = next(iter(candidates))
    blends = {}

    def record(share):
        def prune_layers(inputs):
            if name in inputs:
                layer = inputs[name]
                domain, general = layer.sides["domain"], layer.sides["general"]
                blends[share] = (layer.input_sq, layer.hessian, domain, general)
        return prune_layers
    for share in (0.0, 0.25, 1.0):
        prune_block_by_block(embedder, candidates, TEXTS, record(share), general_share=share, hessian=True)
    _, _, domain, general = blends[0.25]
    torch.testing.assert_close(blends[0.0][0], domain.input_sq / domain.tokens)
    torch.testing.assert_close(blends[1.0][1], general.hessian / general.tokens)
    torch.testing.assert_close(blends[0.25][0], 0.75 * domain.input_sq / domain.tokens
                               + 0.25 * general.input_sq / general.tokens)
    torch.testing.assert_close(torch.diag(blends[0.25][1]), blends[0.25][0])  # diag of X^T X = sum of x^2


def test_dense_target_update_is_least_squares_against_the_dense_outputs():
    """With the mask fixed, pruned columns first and no dampening, SparseGPT from dense_target_weight gives each
    row the least-squares fit of the dense layer's outputs on the dense inputs X by the kept columns of the
    pruned inputs X~; with X~ = X the dense target is the weight itself."""
    dense_inputs = correlated_inputs(300, 12, 0).double()
    inputs = dense_inputs + 0.3 * correlated_inputs(300, 12, 7).double()  # what earlier pruned layers left
    weight = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hessian, cross = inputs.T @ inputs, dense_inputs.T @ inputs
    mask = torch.zeros(5, 12, dtype=torch.bool)
    mask[:, :6] = True
    target = dense_target_weight(weight, hessian, cross, dampening=0.0)
    new, _ = sparsegpt(target, hessian, mask=mask, block_size=4, dampening=0.0)
    reference = torch.linalg.lstsq(inputs[:, 6:], dense_inputs @ weight.T).solution.T
    assert (new[:, :6] == 0).all()
    torch.testing.assert_close(new[:, 6:], reference, atol=1e-8, rtol=1e-8)
    own, _ = sparsegpt(weight, hessian, mask=mask, block_size=4, dampening=0.0)
    assert not torch.allclose(own, new, atol=1e-3)  # the own-output target fits X~ W^T instead
    # unpruned, the dense target is the dense model's fit: the weight itself when nothing changed before the layer
    gram = dense_inputs.T @ dense_inputs
    torch.testing.assert_close(dense_target_weight(weight, gram, gram), weight, atol=1e-10, rtol=1e-10)
    dead = dense_inputs.clone()
    dead[:, 4] = 0  # an input that never fired keeps its weight too
    torch.testing.assert_close(dense_target_weight(weight, dead.T @ dead, dead.T @ dead), weight, atol=1e-10,
                               rtol=1e-10)
    # dampening pulls towards W: with X~ = X and any lambda, still W
    torch.testing.assert_close(dense_target_weight(weight, hessian, hessian, dampening=0.5), weight, atol=1e-10,
                               rtol=1e-10)
