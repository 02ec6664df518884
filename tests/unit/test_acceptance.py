"""The validation metrics on hand-built logits: losses, acceptance, chained acceptance."""

import math

import pytest
import torch

from mtp_megatron.training.evaluate import (
    CHAINED_CORRECT,
    CHAINED_TOKENS,
    CORRECT,
    TOKENS,
    head_statistics,
    shift_left,
    summarize,
    vocab_parallel_argmax,
)

V = 5
LN2 = math.log(2.0)


def _logits(predictions):
    """[s, b=1, V] logits whose softmax puts 1/2 on each prediction (ln 4 vs 0 on 4 others):
    the cross entropy is ln 2 where the prediction is right and ln 8 where it is wrong."""
    out = torch.zeros(len(predictions), 1, V)
    for i, p in enumerate(predictions):
        out[i, 0, p] = math.log(4.0)
    return out


def _case():
    labels = torch.tensor([[1, 2, 3, 4]])  # labels[i] = token i + 1
    mask = torch.ones(1, 4)
    heads = [
        _logits([1, 2, 0, 4]),  # main: right at 0, 1, 3
        _logits([2, 0, 4, 1]),  # depth 1 targets [2, 3, 4, -]: right at 0, 2
        _logits([3, 4, 2, 2]),  # depth 2 targets [3, 4, -, -]: right at 0, 1
    ]
    return heads, labels, mask


def test_shift_left_drops_the_wrapped_positions():
    x = torch.tensor([[1, 2, 3, 4]])
    assert shift_left(x, 0).tolist() == [[1, 2, 3, 4]]
    assert shift_left(x, 1).tolist() == [[2, 3, 4, 0]]
    assert shift_left(x, 3).tolist() == [[4, 0, 0, 0]]


def test_hand_built_counts():
    stats = head_statistics(*_case())
    assert stats[:, TOKENS].tolist() == [4, 3, 2]
    assert stats[:, CORRECT].tolist() == [3, 2, 2]
    # chained over depths 1..k at positions where all k targets exist: depth 1 and 2
    # are both right only at position 0, of positions {0, 1}.
    assert stats[1:, CHAINED_CORRECT].tolist() == [2, 1]
    assert stats[1:, CHAINED_TOKENS].tolist() == [3, 2]


def test_hand_built_metrics():
    metrics = summarize(head_statistics(*_case()))
    assert metrics["lm loss"] == pytest.approx((3 * LN2 + 3 * LN2) / 4)  # ln 8 = 3 ln 2
    assert metrics["lm PPL"] == pytest.approx(math.exp(1.5 * LN2))
    assert metrics["lm accuracy"] == pytest.approx(0.75)
    assert metrics["mtp_1 loss"] == pytest.approx((2 * LN2 + 3 * LN2) / 3)
    assert metrics["mtp_1 acceptance"] == pytest.approx(2 / 3)
    assert metrics["mtp_2 loss"] == pytest.approx(LN2)
    assert metrics["mtp_2 acceptance"] == pytest.approx(1.0)
    assert metrics["chained_2 acceptance"] == pytest.approx(0.5)
    assert "chained_1 acceptance" not in metrics


def test_loss_mask_is_shifted_with_the_labels():
    heads, labels, _ = _case()
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])  # position 2's label is padding
    stats = head_statistics(heads, labels, mask)
    # main: positions 0, 1, 3 count; depth 1 uses mask[i + 1] -> positions 0, 2;
    # depth 2 uses mask[i + 2] -> position 1 only.
    assert stats[:, TOKENS].tolist() == [3, 2, 1]
    assert stats[:, CORRECT].tolist() == [3, 2, 1]
    assert stats[2, CHAINED_TOKENS].item() == 0  # no position has both targets
    assert math.isnan(summarize(stats)["chained_2 acceptance"])


def test_matches_torch_cross_entropy_on_random_logits():
    torch.manual_seed(0)
    s, b, v = 16, 3, 11
    logits = torch.randn(s, b, v)
    labels = torch.randint(0, v, (b, s))
    mask = (torch.rand(b, s) > 0.2).float()
    stats = head_statistics([logits], labels, mask)
    ce = torch.nn.functional.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")
    assert stats[0, 0].item() == pytest.approx((ce * mask).sum().item(), rel=1e-6)
    right = (logits.argmax(-1).t() == labels).float() * mask
    assert stats[0, CORRECT].item() == right.sum().item()


def test_argmax_ties_go_to_the_lowest_id():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0]])
    assert vocab_parallel_argmax(logits).tolist() == [1]
