"""The three losses against hand computations, and their numerical safety."""

from __future__ import annotations

import math

import pytest
import torch

from model.heads.losses import (
    IGNORE_INDEX,
    alignment_loss,
    iop_regression_loss,
    language_model_loss,
)


def test_language_model_loss_is_shifted_and_ignores_minus_100():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 4, 0]])
    # Position t's logits predict label t+1: pairs (b, t) -> label[b, t+1] where supervised.
    pairs = [(0, 0, 3), (0, 1, 1), (1, 1, 4), (1, 2, 0)]
    expected = sum(-torch.log_softmax(logits[b, t], -1)[y] for b, t, y in pairs) / len(pairs)
    assert torch.allclose(language_model_loss(logits, labels), expected, atol=1e-6)


def test_language_model_loss_without_supervision_is_zero_not_nan():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    loss = language_model_loss(logits, torch.full((1, 3), IGNORE_INDEX))
    assert loss.item() == 0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_alignment_loss_matches_kl_by_hand():
    similarity = torch.tensor([[0.2, -0.1, 0.5], [0.9, 0.0, 0.3]])
    ious = torch.tensor([[0.1, 0.0, 0.8], [0.3, 0.6, 0.0]])
    per_round = []
    for s, u in zip(similarity.double(), ious.double()):
        p = torch.exp(s / 0.05) / torch.exp(s / 0.05).sum()
        q = torch.exp(u / 0.05) / torch.exp(u / 0.05).sum()
        per_round.append(sum(qk * math.log(qk / pk) for qk, pk in zip(q, p)))
    expected = sum(per_round) / 2
    assert alignment_loss(similarity, ious).item() == pytest.approx(float(expected), rel=1e-5)


def test_alignment_loss_properties():
    ious = torch.tensor([[0.1, 0.7, 0.3]])
    assert alignment_loss(ious.clone(), ious).item() == pytest.approx(0.0, abs=1e-6)
    assert alignment_loss(torch.tensor([[0.3]]), torch.tensor([[0.9]])).item() == 0.0  # K = 1
    with pytest.raises(ValueError, match="differ"):
        alignment_loss(torch.zeros(1, 3), torch.zeros(1, 2))


def test_alignment_loss_is_finite_where_upstream_gives_inf():
    # In half precision softmax(cos / 0.05) underflows to 0 for far-apart cosines (e^-40);
    # upstream then takes log(0) = -inf. log_softmax in fp32 stays finite.
    similarity = torch.tensor([[1.0, -1.0, -1.0]], dtype=torch.float16, requires_grad=True)
    ious = torch.tensor([[0.0, 1.0, 0.9]])
    upstream = torch.nn.functional.kl_div(
        torch.softmax(similarity.detach() / 0.05, -1).log(),
        torch.softmax(ious / 0.05, -1).half(),
        reduction="sum",
    )
    assert not torch.isfinite(upstream)
    loss = alignment_loss(similarity, ious)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(40.0, rel=0.01)  # (1 - (-1)) / 0.05, almost all of q
    loss.backward()
    assert torch.isfinite(similarity.grad.float()).all()


def test_iop_regression_loss_by_hand():
    predicted = torch.tensor([[0.2, 0.9], [0.5, 0.0]])
    target = torch.tensor([[0.0, 1.0], [0.5, 0.4]])
    terms = [(0.2 - 0.0) ** 2 * math.exp(-1), (0.9 - 1.0) ** 2 * 1.0, 0.0, 0.4**2 * math.exp(-0.6)]
    expected = sum(terms) / 4 * 50
    assert iop_regression_loss(predicted, target).item() == pytest.approx(expected, rel=1e-5)
    assert iop_regression_loss(predicted, target, scale=1.0).item() == pytest.approx(expected / 50)
    with pytest.raises(ValueError, match="differ"):
        iop_regression_loss(predicted, target[:1])
