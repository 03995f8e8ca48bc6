"""SegLLM on the proposal model: references to earlier rounds, mask encoding, mask-aware decoding.

Conversations are hand-built records with ``[REF:k]`` markers, encoded by the real sample encoder
(image file, proposal store) and run through a tiny multi-round model (``--mask_encoder pooled``).
"""

from __future__ import annotations

import dataclasses
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from model.builder import build_llm_seg, setup_trainable, tiny_llm_seg_config
from model.evaluation import SelectionSettings, evaluate
from model.export import load_exported, save_export
from model.export_manifest import ExportManifest, ExportPreprocessing, describe_model
from tests.utils.data.loader_fixtures import write_store
from utils.data.builders import build_encoder
from utils.data.images import masked_crop
from utils.data.mixing import EvaluationDataset
from utils.data.references import parse_references, strip_references
from utils.data.samples import SegmentationRecord, collate
from utils.proposal_store import ProposalReader
from utils.tokenizer import REF_TOKEN

HEIGHT, WIDTH = 20, 30


def box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


# Five objects; the proposals are exactly these boxes plus the background.
OBJECTS = {
    "red": box(12, 2, 18, 8),
    "left": box(2, 2, 8, 8),
    "right": box(22, 2, 28, 8),
    "below": box(12, 12, 18, 18),
    "corner": box(24, 13, 29, 19),
}
THREE_ROUNDS = [
    ("<image>\nSegment the red box.", "It is [SEG]."),
    ("Segment the box left of instance 1 [REF:1].", "[SEG]."),
    ("The box under instance 1 [REF:1], not like instance 2 [REF:2].", "Sure, [SEG]."),
]


def _settings(config) -> SimpleNamespace:
    return SimpleNamespace(
        vision_tower=config.vision_tower, dino_image_size=config.dino_image_size,
        proposal_map_size=config.proposal_map_size, model_max_length=config.model_max_length,
        top_k_proposals=50, proposal_order="area", antialias=True, conv_type="llava_v1",
    )  # fmt: skip


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """An image with the five boxes and a proposal store holding them (+ background)."""
    return write_scene(tmp_path_factory.mktemp("scene"))


def write_scene(root):
    """Write ``scene.png`` (the five boxes) and ``store/`` (them + the background) into ``root``."""
    pixels = np.full((HEIGHT, WIDTH, 3), 60, np.uint8)
    for index, mask in enumerate(OBJECTS.values()):
        pixels[mask.astype(bool)] = (40 * index + 50, 200 - 30 * index, 90)
    Image.fromarray(pixels).save(root / "scene.png")
    masks = np.stack([*OBJECTS.values(), 1 - np.maximum.reduce(list(OBJECTS.values()))])
    write_store(root / "store", {"scene.png": masks})
    return root


def record(scene, turns, targets: list[str], name="scene") -> SegmentationRecord:
    stacked = np.stack([OBJECTS[t] for t in targets])
    return SegmentationRecord(
        image_path=scene / "scene.png",
        conversations=[list(turns)],
        masks=lambda height, width: stacked,
        proposals=ProposalReader(scene / "store"),
        proposal_key="scene.png",
        name=name,
        dataset="test",
    )


@pytest.fixture(scope="module")
def multi_round(tiny_checkpoints):
    """``(config, model, tokenizer, encoder)`` of a tiny multi-round model, set up to train."""
    torch.manual_seed(0)
    config = tiny_llm_seg_config(tiny_checkpoints, mask_encoder="pooled")
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    return config, model, tokenizer, build_encoder(_settings(config), tokenizer, 16)


def test_reference_markers_parse_and_validate():
    parsed = parse_references("the cup left of instance 2 [REF:2] and [REF:1, 2]", 3)
    assert parsed.text == f"the cup left of instance 2 {REF_TOKEN} and {REF_TOKEN * 2}"
    assert parsed.references == (2, 1, 2)
    first = parse_references("the cup [REF:1] now", 2, "turn_start")
    assert first == parse_references("the cup [REF:1] now", 2, "turn_start")
    assert first.text == f"{REF_TOKEN}the cup now"
    assert strip_references("the hat of instance 1 [REF:1].") == "the hat of instance 1."
    assert strip_references("[REF:1] the hat [REF:1] now") == "the hat now"
    for query, round_index in (("[REF:2]", 2), ("[REF:0]", 2), ("[REF:3]", 2)):
        with pytest.raises(ValueError, match="not an earlier round"):
            parse_references(query, round_index)
    with pytest.raises(ValueError, match=r"write references as \[REF:k\]"):
        parse_references(f"the {REF_TOKEN}", 2)


def test_ref_tokens_rows_and_maps_follow_the_markers(scene, multi_round):
    config, model, tokenizer, encoder = multi_round
    sample = encoder(record(scene, THREE_ROUNDS, ["red", "left", "below"]))
    (conversation,) = sample.conversations
    ref_id = tokenizer.convert_tokens_to_ids(REF_TOKEN)
    positions = (conversation.input_ids == ref_id).nonzero().flatten().tolist()
    assert len(positions) == 3
    assert conversation.ref_rounds == (1, 1, 2)
    assert conversation.seg_turns == (1, 2, 3)
    assert (conversation.labels[positions] == -100).all()  # input only, never a label
    # Each <ref> sits where its marker stood: between its round's question words.
    segs = (conversation.input_ids == model.seg_token_id).nonzero().flatten().tolist()
    assert segs[0] < positions[0] < segs[1] < positions[1] < positions[2] < segs[2]
    assert sample.reference_rows.tolist() == [0, 0, 1]
    red = torch.from_numpy(OBJECTS["red"]).float()
    assert torch.equal(
        sample.reference_geometry[0], torch.tensor([12 / 30, 2 / 20, 18 / 30, 8 / 20, 36 / 600])
    )
    assert sample.reference_maps.shape == (3, config.proposal_map_size, config.proposal_map_size)
    assert sample.reference_clip_maps.shape == (3, 4, 4)
    assert float(sample.reference_clip_maps[0].sum()) > 0
    # The referenced masks are the ground truth of the rounds they name.
    assert torch.equal(sample.masks[0].float(), red)
    batch, _ = collate([sample], tokenizer.pad_token_id)
    assert batch.references.count == 3
    assert torch.equal(batch.references.ious[0], sample.proposal_ious[[0, 0, 1]])
    # A round that names itself or a later round is refused.
    bad = [THREE_ROUNDS[0], ("Segment instance 2 [REF:2].", "[SEG].")]
    with pytest.raises(ValueError, match="refers to round 2, which is not an earlier round"):
        encoder(record(scene, bad, ["red", "left"]))


def test_reference_embeddings_replace_the_ref_tokens(scene, multi_round):
    _, model, tokenizer, encoder = multi_round
    batch, _ = collate([encoder(record(scene, THREE_ROUNDS, ["red", "left", "below"]))], 0)
    model.eval()
    with torch.no_grad():
        vision = model.backbone.vision_features(batch.clip_pixels)
        encoded = model.mask_encoder(vision, batch.references)
        extra, positions = model._reference_inputs(batch, vision)
        embeds = model.backbone.embed_inputs(
            batch.input_ids, batch.clip_pixels, batch.image_index, extra, positions, vision
        )
        plain = model.backbone.embed_inputs(batch.input_ids, batch.clip_pixels, batch.image_index)
    assert torch.equal(extra, encoded)  # eval: nothing dropped, nothing rescaled
    torch.testing.assert_close(embeds[positions], encoded)
    assert not torch.allclose(plain[positions], encoded)
    assert torch.equal(embeds[~positions], plain[~positions])  # only the <ref> rows change
    # Pooled by hand: the mask-weighted mean of the CLIP patches, projected, plus geometry.
    weights = batch.references.clip_maps[0].flatten()
    pooled = (weights[:, None] * vision[0]).sum(0) / (weights.sum() + 1e-6)
    expected = model.mask_encoder.projector(pooled) + model.mask_encoder.geometry(
        batch.references.geometry[0]
    )
    torch.testing.assert_close(encoded[0], expected)
    # An empty mask gets the null embedding; a count mismatch is an error naming both counts.
    empty = dataclasses.replace(
        batch.references, clip_maps=torch.zeros_like(batch.references.clip_maps)
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model.mask_encoder(vision, empty), model.mask_encoder.null_embedding.expand(3, -1)
        )
    with pytest.raises(ValueError, match="marks 3 positions but 2 extra embeddings"):
        model.backbone.embed_inputs(
            batch.input_ids, batch.clip_pixels, batch.image_index, extra[:2], positions
        )
    short = dataclasses.replace(
        batch.references, image_index=batch.references.image_index[:2],
        clip_maps=batch.references.clip_maps[:2],
    )  # fmt: skip
    with pytest.raises(ValueError, match="3 <ref> tokens but 2 references"):
        model(dataclasses.replace(batch, references=short))


def test_reference_dropout_rate(scene, multi_round):
    _, model, tokenizer, encoder = multi_round
    sample = encoder(record(scene, THREE_ROUNDS, ["red", "left", "below"]))
    batch, _ = collate([sample] * 8, tokenizer.pad_token_id)  # 24 references
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        vision = model.backbone.vision_features(batch.clip_pixels)
        kept = sum(int(model._reference_inputs(batch, vision)[1].sum()) for _ in range(100))
    assert 0.45 < kept / 2400 < 0.55  # ref_dropout 0.5
    model.eval()


def test_gradients_reach_the_new_parts_and_the_aux_loss_needs_references(scene, multi_round):
    _, model, tokenizer, encoder = multi_round
    with_refs = encoder(record(scene, THREE_ROUNDS, ["red", "left", "below"]))
    single = encoder(record(scene, [THREE_ROUNDS[0]], ["red"], name="single"))
    model.train()
    model.ref_dropout = 0.0  # every reference written, so every new part is used
    model.zero_grad()
    output = model(collate([with_refs, single], tokenizer.pad_token_id)[0])
    assert output.ref_loss is not None
    assert torch.isfinite(output.ref_loss)
    assert output.ref_similarities[0].shape == (3, 6)
    assert output.ref_similarities[1].shape == (0, 6)
    output.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name in ("mask_encoder.projector.weight", "mask_encoder.geometry.weight",
                 "proposal_scorer.relation_embedding.weight"):  # fmt: skip
        assert grads[name] is not None, name
        assert grads[name].abs().sum() > 0, name
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen == []
    assert not any(n.startswith(("backbone.vision_tower", "dino")) for n in grads)
    model.zero_grad()
    # Without any reference: no reference loss, no relation features, no mask encoder work.
    output = model(collate([single], tokenizer.pad_token_id)[0])
    assert output.ref_loss is None
    model.ref_dropout = 0.5
    model.eval()


def test_rounds_without_references_score_as_the_single_round_model(scene, tiny_checkpoints):
    torch.manual_seed(0)
    single_config = tiny_llm_seg_config(tiny_checkpoints)
    single, single_tokenizer = build_llm_seg(single_config)
    torch.manual_seed(0)
    multi, multi_tokenizer = build_llm_seg(
        dataclasses.replace(single_config, mask_encoder="pooled")
    )
    assert REF_TOKEN not in single_tokenizer.get_vocab()
    # The same heads (the multi-round model draws its extra parts from the same random stream).
    multi.text_projection.load_state_dict(single.text_projection.state_dict())
    missing = multi.proposal_scorer.load_state_dict(
        single.proposal_scorer.state_dict(), strict=False
    )
    assert missing.missing_keys == ["relation_embedding.weight"]
    records = [record(scene, [THREE_ROUNDS[0]], ["red"])]
    outputs = []
    for model, tokenizer, config in (
        (single, single_tokenizer, single_config),
        (multi, multi_tokenizer, dataclasses.replace(single_config, mask_encoder="pooled")),
    ):
        encoder = build_encoder(_settings(config), tokenizer, 16)
        outputs.append(model.score(collate([encoder(r) for r in records], 0)[0]))
    torch.testing.assert_close(outputs[1].similarities[0], outputs[0].similarities[0])
    torch.testing.assert_close(outputs[1].iop_scores[0], outputs[0].iop_scores[0])
    # A single-round model reads references as words only ("strip"), never as <ref>.
    encoder = build_encoder(_settings(single_config), single_tokenizer, 16)
    sample = encoder(record(scene, THREE_ROUNDS, ["red", "left", "below"]))
    assert sample.reference_rows is None
    assert "The box under instance 1, not like instance 2." in sample.conversations[0].text


def _train(model, batch, steps: int, lr: float = 3e-3) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    model.eval()


def test_history_decides_an_ambiguous_target(scene, tiny_checkpoints, tmp_path):
    """Two conversations with the same words on the same image: round 1's target differs
    (``red`` vs ``corner``), and round 2 asks for "the box left of instance 1". Only the
    referenced mask tells the two round-2 targets apart (``left`` vs ``below``... by where
    instance 1 is), so after overfitting GT history picks both and no history cannot."""
    torch.manual_seed(0)
    config = tiny_llm_seg_config(tiny_checkpoints, mask_encoder="pooled", ref_dropout=0.0)
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    turns = [
        ("<image>\nSegment the box I mean.", "[SEG]."),
        ("Segment the box next to instance 1 [REF:1].", "[SEG]."),
    ]
    targets = [["red", "left"], ["corner", "right"]]
    encoder = build_encoder(_settings(config), tokenizer, 16)
    samples = [encoder(record(scene, turns, t, name=f"c{i}")) for i, t in enumerate(targets)]
    batch = collate(samples, tokenizer.pad_token_id)[0]
    random.seed(0)
    _train(model, batch, steps=150)
    expected = [int(ious[1].argmax()) for ious in batch.proposal_ious]  # IoU 1: the target
    assert expected[0] != expected[1]
    picked = [int(s[1].argmax()) for s in model.score(batch).similarities]
    assert picked == expected  # history gt: both round-2 targets
    stripped = dataclasses.replace(encoder.settings, references="strip")
    no_history = type(encoder)(tokenizer, encoder.fmt, stripped)
    batch = collate([no_history(record(scene, turns, t)) for t in targets], 0)[0]
    picked = [int(s[1].argmax()) for s in model.score(batch).similarities]
    assert picked[0] == picked[1]  # the same words on the same image: one answer for both
    assert picked != expected

    # The evaluator reports it per round, with each history.
    records = [record(scene, turns, t, name=f"c{i}") for i, t in enumerate(targets)]
    results = {}
    for history, sample_encoder in (("gt", encoder), ("none", no_history), ("predicted", encoder)):
        results[history] = evaluate(
            model, EvaluationDataset(records, sample_encoder), SelectionSettings("argmax"),
            torch.device("cpu"), torch.float32, 0, tmp_path / history, history=history,
        )  # fmt: skip
    gt, none = results["gt"], results["none"]
    assert [r["round"] for r in gt["per_round"]] == [1, 2]
    assert [r["count"] for r in gt["per_round"]] == [2, 2]
    assert gt["per_round"][1]["giou"] == pytest.approx(1.0)  # both round-2 targets exactly
    assert none["per_round"][1]["giou"] <= 0.5  # one answer for both: at most one is right
    assert gt["rounds_2plus"] == {k: v for k, v in gt["per_round"][1].items() if k != "round"}
    assert gt["history"] == "gt"
    saved = json.loads((tmp_path / "predicted" / "metrics.json").read_text())
    assert saved["history"] == "predicted"
    assert saved["per_round"][1]["count"] == 2


@pytest.mark.parametrize("kind", ["merged", "adapter"])
def test_exports_carry_the_multi_round_parts(scene, tiny_checkpoints, tmp_path, kind):
    torch.manual_seed(3)
    config = tiny_llm_seg_config(tiny_checkpoints, mask_encoder="pooled")
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    with torch.no_grad():  # trained-looking weights in every SegLLM part
        for name, parameter in model.named_parameters():
            if "lora_B" in name or name.startswith(("mask_encoder.", "proposal_scorer.relation")):
                parameter.normal_(0, 0.1)
    model.eval()
    encoder = build_encoder(_settings(config), tokenizer, 16)
    batch = collate([encoder(record(scene, THREE_ROUNDS, ["red", "left", "below"]))], 0)[0]
    expected = model.score(batch)
    manifest = ExportManifest(kind, config, describe_model(model, tokenizer))
    save_export(model, tokenizer, manifest, tmp_path / kind)
    loaded = load_exported(tmp_path / kind)
    assert loaded.model.mask_encoder is not None
    assert loaded.tokenizer.convert_tokens_to_ids(REF_TOKEN) == loaded.model.ref_token_id
    assert loaded.manifest.model.mask_encoder == "pooled"
    fields = loaded.manifest.encoder_fields()  # what eval.py --model_dir encodes with
    assert fields["mask_encoder"] == "pooled"
    assert "ref_placement" not in fields  # not recorded (as in older exports): the flag decides
    recorded = dataclasses.replace(
        loaded.manifest, preprocessing=ExportPreprocessing(ref_placement="turn_start")
    )
    assert recorded.encoder_fields()["ref_placement"] == "turn_start"
    got = loaded.model.score(batch)
    for want, have in zip(
        expected.similarities + expected.ref_similarities, got.similarities + got.ref_similarities
    ):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-4)


def test_masked_crop_by_hand():
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    mask[1, 2] = False
    crop = masked_crop(image, mask)
    assert crop.shape == (3, 3, 3)  # the 2 x 3 box padded to a square, content top left
    np.testing.assert_array_equal(crop[:2, :3][mask[1:3, 2:5]], image[1:3, 2:5][mask[1:3, 2:5]])
    assert not crop[0, 0].any()  # the background inside the box is zeroed
    assert not crop[2].any()  # the padding
    assert masked_crop(image, np.zeros((4, 6), bool)).shape == (1, 1, 3)


def test_crop_cls_encoder_trains_and_exports(scene, tiny_checkpoints, tmp_path):
    torch.manual_seed(4)
    config = tiny_llm_seg_config(tiny_checkpoints, mask_encoder="crop_cls", ref_dropout=0.0)
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    encoder = build_encoder(
        SimpleNamespace(**vars(_settings(config)), mask_encoder="crop_cls"), tokenizer, 16
    )
    sample = encoder(record(scene, THREE_ROUNDS, ["red", "left", "below"]))
    assert sample.reference_crops.shape == (3, 3, 32, 32)  # CLIP inputs of the three crops
    batch = collate([sample], 0)[0]
    model.train()
    output = model(batch)
    output.loss.backward()
    for name in ("mask_encoder.projector.weight", "mask_encoder.box.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert not any(p.grad is not None for p in model.backbone.vision_tower.parameters())
    model.zero_grad()
    model.eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("mask_encoder.box"):
                parameter.normal_(0, 0.1)
    expected = model.score(batch)
    save_export(
        model,
        tokenizer,
        ExportManifest("merged", config, describe_model(model, tokenizer)),
        tmp_path / "e",
    )
    loaded = load_exported(tmp_path / "e")
    got = loaded.model.score(batch)
    torch.testing.assert_close(got.similarities[0], expected.similarities[0], atol=1e-5, rtol=1e-4)


def test_sam_head_decodes_reference_and_target_groups(scene, tiny_checkpoints, tmp_path):
    """SegLLM with the SAM head: [SEG] -> a target prompt and a reference prompt; the latter
    re-detects the referenced mask (an auxiliary loss) only in rounds with references."""
    torch.manual_seed(6)
    config = tiny_llm_seg_config(
        tiny_checkpoints, mask_encoder="pooled", mask_head="both", ref_dropout=0.0,
        sam_checkpoint=str(tiny_checkpoints.sam),
    )  # fmt: skip
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    groups = model.sam_prompt_groups.weight
    assert torch.equal(groups, torch.cat([torch.eye(32), torch.eye(32)]))  # both start as [SEG]
    encoder = build_encoder(_settings(config), tokenizer, 16, model.sam_image_size)
    batch = collate([encoder(record(scene, THREE_ROUNDS, ["red", "left", "below"]))], 0)[0]
    assert batch.references.rows.tolist() == [0, 0, 1]
    prompts, rows = model._sam_prompts(batch, [torch.randn(3, 32)], model.round_references(batch))
    assert prompts[0].shape == (3 + 2, 32)  # three targets, two rounds with references
    assert rows[0].tolist() == [0, 0]  # round 2 re-detects round 1; round 3 its first reference
    model.train()
    with_refs = model(batch)
    assert [tuple(t.shape) for t in with_refs.sam_logits] == [(3, 20, 30)]
    with_refs.loss.backward()
    assert model.sam_prompt_groups.weight.grad.abs().sum() > 0
    model.zero_grad()
    single = collate([encoder(record(scene, [THREE_ROUNDS[0]], ["red"]))], 0)[0]
    assert model(single).ref_loss is None  # no reference, no auxiliary loss
    model.eval()
    expected = model.score(batch).sam_logits[0]
    save_export(
        model,
        tokenizer,
        ExportManifest("merged", config, describe_model(model, tokenizer)),
        tmp_path / "e",
    )
    loaded = load_exported(tmp_path / "e")
    torch.testing.assert_close(
        loaded.model.score(batch).sam_logits[0], expected, atol=1e-5, rtol=1e-4
    )


def test_an_export_with_the_first_six_relations_loads_and_scores_as_before(
    scene, tiny_checkpoints, tmp_path
):
    """Exports written before the four further relations hold a (E, 6) relation projection."""
    from safetensors.torch import load_file, save_file

    from model.export import HEAD_FILE
    from model.heads.reference_relations import FIRST_VERSION_FEATURES

    torch.manual_seed(3)
    config = tiny_llm_seg_config(tiny_checkpoints, mask_encoder="pooled")
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    key = "proposal_scorer.relation_embedding.weight"
    with torch.no_grad():  # a first-version model: the further columns unused
        weight = dict(model.named_parameters())[key]
        weight.normal_(0, 0.1)
        weight[:, FIRST_VERSION_FEATURES:] = 0
    model.eval()
    encoder = build_encoder(_settings(config), tokenizer, 16)
    batch = collate([encoder(record(scene, THREE_ROUNDS, ["red", "left", "below"]))], 0)[0]
    expected = model.score(batch)
    manifest = ExportManifest("merged", config, describe_model(model, tokenizer))
    save_export(model, tokenizer, manifest, tmp_path / "old")
    head = load_file(tmp_path / "old" / HEAD_FILE)
    stored = [k for k in head if k.endswith("relation_embedding.weight")]
    assert len(stored) == 1
    head[stored[0]] = head[stored[0]][:, :FIRST_VERSION_FEATURES].contiguous()
    save_file(head, tmp_path / "old" / HEAD_FILE)
    loaded = load_exported(tmp_path / "old")
    got = loaded.model.score(batch)
    for want, have in zip(expected.similarities, got.similarities):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-4)
