"""Selection strategies on hand-made scores."""

from __future__ import annotations

import pytest
import torch

from model.heads.selection import select_mask, select_proposals

SIMILARITY = torch.tensor([0.1, 0.9, 0.3, 0.8, -0.2, 0.5])
IOP = torch.tensor([0.7, 0.2, 0.6, 0.55, 0.9, 0.1])


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("argmax", [1]),
        ("iop", [0, 2, 3, 4]),
        ("hybrid", [0, 1, 2, 3, 4]),
        ("topk_iop", [2, 3]),
    ],
)
def test_strategies(strategy, expected):
    top_k = 4  # top 4 by cosine: 1, 3, 5, 2; of those IoP > 0.5: 2, 3
    assert select_proposals(SIMILARITY, IOP, strategy, threshold=0.5, top_k=top_k) == expected


def test_threshold_and_top_k():
    assert select_proposals(SIMILARITY, IOP, "iop", threshold=0.65) == [0, 4]
    assert select_proposals(SIMILARITY, IOP, "topk_iop", top_k=2) == [3]
    assert select_proposals(SIMILARITY, IOP, "topk_iop", top_k=100) == [0, 2, 3, 4]


def test_masks_are_unions_and_resized_with_nearest():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, 0, :2] = True
    masks[1, 3, 3] = True
    masks[2, 1, 1] = True
    result = select_mask(
        torch.tensor([0.9, 0.1, 0.2]), torch.tensor([0.8, 0.7, 0.1]), masks, "hybrid"
    )
    assert result.selected == [0, 1]
    assert torch.equal(result.mask, masks[0] | masks[1])
    big = select_mask(
        torch.tensor([0.9, 0.1, 0.2]),
        torch.tensor([0.8, 0.7, 0.1]),
        masks,
        "hybrid",
        output_size=(8, 12),
    )
    assert big.mask.shape == (8, 12)
    assert big.mask.dtype == torch.bool
    assert torch.equal(big.mask[::2, ::3], result.mask)  # exact 2x / 3x nearest upscaling
    assert big.mask.sum() == result.mask.sum() * 6


def test_empty_cases_give_a_defined_empty_mask():
    masks = torch.ones(2, 5, 6, dtype=torch.bool)
    nothing = select_mask(torch.tensor([0.3, 0.2]), torch.tensor([0.1, 0.4]), masks, "iop")
    assert nothing.selected == []
    assert nothing.mask.shape == (5, 6)
    assert not nothing.mask.any()
    for strategy in ("argmax", "iop", "hybrid", "topk_iop"):
        empty = select_mask(
            torch.zeros(0), torch.zeros(0), torch.zeros(0, 5, 6), strategy, output_size=(10, 3)
        )
        assert empty.selected == []
        assert empty.mask.shape == (10, 3)
        assert not empty.mask.any()


def test_soft_masks_and_bad_input():
    soft = torch.tensor([[[0.2, 0.7]]])
    assert select_mask(torch.tensor([1.0]), torch.tensor([1.0]), soft, "argmax").mask.tolist() == [
        [False, True]
    ]
    with pytest.raises(ValueError, match="unknown selection strategy 'best'"):
        select_proposals(SIMILARITY, IOP, "best")
    with pytest.raises(ValueError, match=r"must be \(K, H, W\)"):
        select_mask(SIMILARITY, IOP, torch.zeros(2, 4, 4), "argmax")
