"""LLMSegBatch: device/dtype moves, [SEG] counting and validation messages."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.tiny import build_tiny_llava
from tests.model.batches import BatchSpec, make_batch
from utils.tokenizer import SEG_TOKEN


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_llava()[1]


@pytest.fixture
def batch(tokenizer):
    return make_batch(tokenizer, 16, BatchSpec(rows=[[2, 0], [1], [0]], proposals=[3, 0, 2]))


def test_to_casts_floats_but_keeps_ids_and_targets(batch):
    moved = batch.to("cpu", torch.bfloat16)
    assert moved.input_ids.dtype == torch.long
    assert moved.image_index.dtype == torch.long
    assert moved.clip_pixels.dtype == moved.dino_pixels.dtype == torch.bfloat16
    assert all(m.dtype == torch.bfloat16 for m in moved.proposal_masks)
    assert all(t.dtype == torch.float32 for t in moved.proposal_ious + moved.proposal_iops)
    assert batch.clip_pixels.dtype == torch.float32  # the original is untouched
    assert batch.to("cpu").clip_pixels.dtype == torch.float32


def test_seg_counts_per_image(batch, tokenizer):
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    assert batch.num_images == 3
    assert batch.seg_counts(seg_id) == [2, 1, 0]
    assert batch.validate(seg_id) == [2, 1, 0]
    assert [t.shape for t in batch.proposal_ious] == [(2, 3), (1, 0), (0, 2)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": torch.zeros(1, 3, dtype=torch.long)}, "labels is"),
        ({"image_index": torch.tensor([0, 0, 1, 3])}, "points outside the 3 images"),
        ({"image_index": torch.tensor([0, 1])}, "image_index is"),
        ({"dino_pixels": torch.zeros(2, 3, 112, 112)}, "dino_pixels holds 2 images"),
        ({"proposal_masks": [torch.zeros(3, 32, 32)] * 2}, "proposal_masks has 2 entries"),
        ({"proposal_masks": [torch.zeros(3, 32, 16)] * 3}, r"must be \(K, M, M\)"),
        ({"proposal_ious": [torch.zeros(2, 3), torch.zeros(1, 0)]}, "proposal_ious has 2 entries"),
        ({"proposal_iops": [torch.zeros(2, 3), torch.zeros(1, 0), torch.zeros(2)]}, r"\(R, K\)"),
        (
            {"proposal_iops": [torch.zeros(2, 3), torch.zeros(1, 0), torch.zeros(1, 2)]},
            "image 2 has 0 .SEG. tokens but proposal_iops has 1 rows",
        ),
    ],
)
def test_validation_names_the_field(batch, tokenizer, change, message):
    broken = dataclasses.replace(batch, **change)
    with pytest.raises(ValueError, match=message):
        broken.validate(tokenizer.convert_tokens_to_ids(SEG_TOKEN))
