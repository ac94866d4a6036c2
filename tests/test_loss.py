import math

import torch

from gaprune.loss import info_nce
from gaprune.modeling import pool


def test_info_nce_matches_hand_written_formula():
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    p = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    n = torch.tensor([[0.0, -1.0], [1.0, 1.0]])
    docs = [p[0], p[1], n[0], n[1]]
    expected = 0.0
    for i in range(2):
        logits = [20 * float(q[i] @ d) / (float(q[i].norm()) * float(d.norm())) for d in docs]
        expected += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    expected /= 2
    assert math.isclose(info_nce(q, p, n).item(), expected, rel_tol=1e-6)


def test_info_nce_is_near_zero_when_each_query_equals_its_positive_only():
    q = torch.eye(3)
    assert info_nce(q, q.clone(), -q).item() < 1e-6


def test_pooling_modes():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(hidden, left, "lasttoken"), hidden[:, -1])
    assert torch.equal(pool(hidden, right, "lasttoken"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    assert torch.equal(pool(hidden, right, "cls"), hidden[:, 0])
    assert torch.allclose(pool(hidden, right, "mean"), torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))
