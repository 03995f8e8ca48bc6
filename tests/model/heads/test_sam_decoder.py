"""LISA's SAM head: decoding equal to segment_anything's own Sam, losses by hand, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from model.backbones.sam import load_sam
from model.builder import build_llm_seg, setup_trainable, tiny_llm_seg_config
from model.heads.losses import dice_loss, sigmoid_bce_loss
from model.heads.sam_decoder import SamMaskHead
from tests.model.test_multi_round import _settings, record, write_scene
from utils.data.builders import build_encoder
from utils.data.images import preprocess_for_dinov2
from utils.data.samples import collate


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return write_scene(tmp_path_factory.mktemp("scene"))


def test_decoding_equals_sams_own_forward(tiny_checkpoints):
    torch.manual_seed(0)
    sam = load_sam(tiny_checkpoints.sam)
    head = SamMaskHead(load_sam(tiny_checkpoints.sam))
    image = np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    resized = transform.apply_image(image)
    point = transform.apply_coords(np.array([[[20.0, 15.0]]]), image.shape[:2])
    batched = [{
        "image": torch.from_numpy(resized).permute(2, 0, 1).contiguous().float(),
        "original_size": image.shape[:2],
        "point_coords": torch.from_numpy(point).float(),
        "point_labels": torch.ones(1, 1),
    }]  # fmt: skip
    with torch.no_grad():
        (expected,) = sam(batched, multimask_output=False)
        pixels, resized_hw = preprocess_for_dinov2(image, head.image_size)
        embedding = head.embed_images(pixels[None])[0]
        sparse, _ = sam.prompt_encoder(points=(batched[0]["point_coords"], torch.ones(1, 1)),
                                       boxes=None, masks=None)  # fmt: skip
        low_res = head.decode(embedding, sparse)
        logits = head.postprocess(low_res, resized_hw, image.shape[:2])
    torch.testing.assert_close(low_res, expected["low_res_logits"][:, 0], atol=1e-5, rtol=1e-5)
    assert logits.shape == (1, 40, 70)
    upstream = sam.postprocess_masks(expected["low_res_logits"], resized.shape[:2], (40, 70))
    torch.testing.assert_close(logits, upstream[:, 0], atol=1e-5, rtol=1e-5)
    assert torch.equal(logits > 0, expected["masks"][:, 0])


def test_bce_and_dice_by_hand():
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]]])
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    p = torch.sigmoid(logits)
    bce = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    torch.testing.assert_close(sigmoid_bce_loss(logits, targets), bce)
    numerator = 2 * (p * targets).sum() / 1000 + 1e-6
    denominator = (p.sum() + targets.sum()) / 1000 + 1e-6
    torch.testing.assert_close(dice_loss(logits, targets), 1 - numerator / denominator)
    # Summed over masks (the caller divides by the batch's mask count, as LISA).
    two = torch.cat([logits, logits]), torch.cat([targets, targets])
    torch.testing.assert_close(sigmoid_bce_loss(*two), 2 * bce)


@pytest.fixture
def sam_model(tiny_checkpoints):
    torch.manual_seed(0)
    config = tiny_llm_seg_config(
        tiny_checkpoints, mask_head="sam", sam_checkpoint=str(tiny_checkpoints.sam)
    )
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    return model, tokenizer, config


def _batch(model, tokenizer, config, scene, targets=("red",)):
    encoder = build_encoder(_settings(config), tokenizer, 16, model.sam_image_size)
    turns = [("<image>\nSegment the red box.", "It is [SEG].")]
    return collate([encoder(record(scene, turns, list(targets)))], 0)[0]


def test_gradients_reach_exactly_decoder_projection_lora_and_embeddings(sam_model, scene):
    model, tokenizer, config = sam_model
    batch = _batch(model, tokenizer, config, scene)
    assert batch.sam_pixels.shape == (1, 3, 256, 256)
    assert batch.target_masks[0].shape == (1, 20, 30)
    model.train()
    output = model(batch)
    assert output.similarities == []  # the proposal head does not run
    assert output.sam_logits[0].shape == (1, 20, 30)
    assert output.align_loss is None
    total = output.ce_loss + 2.0 * output.bce_loss + 0.5 * output.dice_loss
    torch.testing.assert_close(output.loss, total)
    output.loss.backward()
    reached = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters()
               if p.grad is not None and p.grad.abs().sum() > 0}  # fmt: skip
    assert {"sam_head.mask_decoder", "text_projection.0", "text_projection.2"} <= reached
    assert any("lora_" in n for n, p in model.named_parameters() if p.grad is not None)
    frozen = ("sam_head.image_encoder", "sam_head.prompt_encoder", "proposal_scorer", "dino",
              "backbone.vision_tower", "backbone.projector")  # fmt: skip
    assert not [
        n for n, p in model.named_parameters() if p.grad is not None and n.startswith(frozen)
    ]
    model.zero_grad()


def test_overfit_one_batch_with_the_sam_head(sam_model, scene):
    model, tokenizer, config = sam_model
    batch = _batch(model, tokenizer, config, scene)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(150):
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        mask = model.score(batch).sam_logits[0][0] > 0
    target = batch.target_masks[0][0].bool()
    iou = (mask & target).sum() / (mask | target).sum()
    assert iou >= 0.9
