"""LISA's SAM head: decoding equal to segment_anything's own Sam, losses by hand, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

import chat
from model.backbones.sam import load_sam
from model.builder import build_llm_seg, setup_trainable, tiny_llm_seg_config
from model.evaluation import SelectionSettings, combine_heads, evaluate
from model.export import load_exported, save_export
from model.export_manifest import ExportManifest, describe_model
from model.heads.losses import dice_loss, sigmoid_bce_loss
from model.heads.sam_decoder import SamMaskHead
from model.inference import build_question
from tests.model.test_multi_round import _settings, record, write_scene
from utils.data.builders import build_encoder
from utils.data.images import preprocess_for_dinov2
from utils.data.mixing import EvaluationDataset
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


def test_combined_mask_snaps_the_sam_mask_to_agreeing_proposals():
    sam_mask = torch.zeros(8, 8, dtype=torch.bool)
    sam_mask[1:6, 1:6] = True
    proposals = torch.zeros(3, 4, 4, dtype=torch.bool)  # store resolution: half the image
    proposals[0, 0:3, 0:3] = True  # 9 cells, inside the SAM mask (downsampled) mostly
    proposals[1, 2:4, 2:4] = True  # 4 cells, 1 inside: disagrees
    combined = combine_heads(sam_mask, proposals)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[0:6, 0:6] = True  # proposal 0 at the image size
    assert torch.equal(combined, expected)
    assert torch.equal(combine_heads(sam_mask, proposals[1:]), sam_mask)  # none agrees
    assert torch.equal(combine_heads(sam_mask, proposals[:0]), sam_mask)


def test_both_heads_evaluate_side_by_side_and_export(tiny_checkpoints, scene, tmp_path):
    torch.manual_seed(1)
    config = tiny_llm_seg_config(
        tiny_checkpoints, mask_head="both", sam_checkpoint=str(tiny_checkpoints.sam)
    )
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    model.eval()
    encoder = build_encoder(_settings(config), tokenizer, 16, model.sam_image_size)
    turns = [("<image>\\nSegment the red box.", "[SEG].")]
    records = [record(scene, turns, [t], name=t) for t in ("red", "left")]
    results = evaluate(
        model, EvaluationDataset(records, encoder), SelectionSettings("argmax"),
        torch.device("cpu"), torch.float32, 0, tmp_path / "eval",
    )  # fmt: skip
    assert results["head"] == "proposals"
    assert set(results["heads"]) == {"proposals", "sam", "combined"}
    assert results["giou"] == results["heads"]["proposals"]["giou"]
    # The SAM head's gIoU by hand: logits > 0 against each target.
    ious = []
    for sample in (encoder(r) for r in records):
        with torch.no_grad():
            mask = model.score(collate([sample], 0)[0]).sam_logits[0][0] > 0
        target = sample.masks[0] == 1
        union = (mask | target).sum()
        ious.append(float((mask & target).sum() / union) if union else 1.0)
    assert results["heads"]["sam"]["giou"] == pytest.approx(sum(ious) / 2, abs=1e-6)
    rows = (tmp_path / "eval" / "per_image.csv").read_text().splitlines()
    assert len(rows) == 1 + 6  # two images x three heads
    assert rows[0].endswith(",head")

    manifest = ExportManifest("merged", config, describe_model(model, tokenizer))
    batch = collate([encoder(records[0])], 0)[0]
    with torch.no_grad():
        expected = model.score(batch).sam_logits[0]
    save_export(model, tokenizer, manifest, tmp_path / "export")
    loaded = load_exported(tmp_path / "export")
    assert loaded.model.mask_head == "both"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.score(batch).sam_logits[0], expected)
    # chat.py with only the SAM head's mask: no proposal source at all.
    image = scene / "scene.png"
    record_out = chat.main(chat.ChatConfig(
        model_dir=str(tmp_path / "export"), image=str(image), query="the red box",
        mode="teacher_forced", mask_head="sam", precision="fp32", device="cpu",
        out_dir=str(tmp_path / "chat"),
    ))  # fmt: skip
    assert record_out["selection"]["mask_head"] == "sam"
    assert record_out["proposal_source"] == "none (SAM head)"
    saved = torch.from_numpy(np.asarray(Image.open(tmp_path / "chat" / record_out["mask"])) > 0)
    sample = encoder(record(scene, [(build_question("the red box", "long"), "[SEG].")], ["red"]))
    with torch.no_grad():
        logits = loaded.model.score(collate([sample], 0)[0]).sam_logits[0][0]
    assert torch.equal(saved, logits > 0)


def test_train_sam_encoder_option(tiny_checkpoints, scene):
    config = tiny_llm_seg_config(
        tiny_checkpoints, mask_head="sam", sam_checkpoint=str(tiny_checkpoints.sam),
        train_sam_encoder=True,
    )  # fmt: skip
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    model.train()
    model(_batch(model, tokenizer, config, scene)).loss.backward()
    grads = [p.grad for p in model.sam_head.image_encoder.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in model.sam_head.prompt_encoder.parameters())


def test_embedding_cache_returns_what_a_fresh_pass_gives(tiny_checkpoints):
    head = SamMaskHead(load_sam(tiny_checkpoints.sam), cache_size=2)
    pixels = torch.randn(3, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    fresh = head.embed_images(pixels)  # no keys: no caching
    assert head.cache.entries == {}
    first = head.embed_images(pixels[:2], ["a", "b"])
    again = head.embed_images(pixels[:2], ["a", "b"])
    assert (head.cache.misses, head.cache.hits) == (2, 2)
    assert torch.equal(first, fresh[:2])
    assert torch.equal(again, fresh[:2])  # exactly the fresh encoder pass
    head.embed_images(pixels[2:], ["c"])  # least recently used ("a") leaves
    assert list(head.cache.entries) == ["b", "c"]
    head.image_encoder.requires_grad_(True)  # a trained encoder changes: never cached
    head.embed_images(pixels[:1], ["d"])
    assert "d" not in head.cache.entries
