"""LLMSegModel end to end on tiny models: shapes, [SEG] gathering, gradients, overfitting."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from model.builder import build_llm_seg, merge_lora_weights, setup_trainable, tiny_llm_seg_config
from model.tiny import TinySizes, write_tiny_checkpoints
from tests.model.batches import BatchSpec, make_batch
from utils.batch import LLMSegBatch
from utils.tokenizer import SEG_TOKEN

TWO_IMAGES = BatchSpec(rows=[[1], [1, 2, 0]], proposals=[4, 7])


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


def test_two_images_one_and_three_conversations(tiny_model, tiny_config):
    model, tokenizer = tiny_model
    setup_trainable(model, tiny_config)
    batch = make_batch(tokenizer, model.num_image_tokens, TWO_IMAGES)
    assert batch.input_ids.shape[0] == 4  # 1 + 3 conversation rows
    out = model.train()(batch)

    # Image 0: 1 row with 1 [SEG]; image 1: rows with 1, 2 and 0 (VQA) [SEG] -> R = (1, 3).
    assert [s.shape for s in out.similarities] == [(1, 4), (3, 7)]
    assert [s.shape for s in out.iop_scores] == [(1, 4), (3, 7)]
    assert [e.shape for e in out.seg_embeddings] == [(1, 32), (3, 32)]
    assert out.logits.shape == (*batch.input_ids.shape, len(tokenizer))
    for value in (out.loss, out.ce_loss, out.align_loss, out.iop_loss):
        assert value.shape == ()
        assert _finite(value)
    assert torch.allclose(out.loss, out.ce_loss + out.align_loss + out.iop_loss)
    for similarity, iop in zip(out.similarities, out.iop_scores):
        assert similarity.abs().max() <= 1 + 1e-5
        assert ((iop >= 0) & (iop <= 1)).all()


def test_loss_weights_and_averaging(tiny_model, tiny_config):
    model, tokenizer = tiny_model
    model.loss_config = tiny_config.loss_config()
    model.loss_config.align_weight, model.loss_config.iop_weight = 2.0, 0.5
    batch = make_batch(tokenizer, model.num_image_tokens, TWO_IMAGES)
    out = model.score(batch)
    assert torch.allclose(out.loss, out.ce_loss + 2.0 * out.align_loss + 0.5 * out.iop_loss)
    # Alignment: per round KL, mean over rounds, then over images (by hand).
    per_image = []
    for similarity, ious in zip(out.similarities, batch.proposal_ious):
        p = torch.softmax(similarity.double() / 0.05, -1)
        q = torch.softmax(ious.double() / 0.05, -1)
        per_image.append((q * (q.log() - p.log())).sum(-1).mean())
    assert torch.allclose(out.align_loss.double(), torch.stack(per_image).mean(), atol=1e-5)


@pytest.mark.parametrize("clip_image_size", [32, 24])
def test_seg_hidden_state_is_the_one_before_each_seg(tmp_path, clip_image_size):
    # 16 and 9 image tokens (never upstream's 256); [SEG] at several positions per row.
    sizes = dataclasses.replace(TinySizes(), clip_image_size=clip_image_size)
    model, tokenizer = build_llm_seg(
        tiny_llm_seg_config(write_tiny_checkpoints(tmp_path, sizes=sizes))
    )
    assert model.num_image_tokens == (clip_image_size // 8) ** 2
    spec = BatchSpec(rows=[[2, 0], [3]], proposals=[3, 5], clip_size=clip_image_size)
    batch = make_batch(tokenizer, model.num_image_tokens, spec)
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    with torch.no_grad():
        hidden = model.backbone(
            batch.input_ids, batch.attention_mask, batch.clip_pixels, batch.image_index
        ).hidden_states
        embeddings = model.seg_embeddings(batch, hidden)

    expected: list[list[torch.Tensor]] = [[], []]
    positions = []
    for row in range(batch.input_ids.shape[0]):
        for pos in range(batch.input_ids.shape[1]):
            if batch.input_ids[row, pos] == seg_id:
                positions.append((row, pos))
                image = int(batch.image_index[row])
                expected[image].append(model.text_projection(hidden[row, pos - 1]))
    assert len({pos for _, pos in positions}) >= 3  # genuinely varied positions
    assert [e.shape[0] for e in embeddings] == [2, 3]
    for got, want in zip(embeddings, expected):
        assert torch.allclose(got, torch.stack(want), atol=1e-6)


def test_seg_in_padding_is_ignored_and_position_zero_rejected(tiny_model):
    model, tokenizer = tiny_model
    batch = make_batch(tokenizer, model.num_image_tokens, BatchSpec(rows=[[1, 1]], proposals=[3]))
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    padded = batch.attention_mask == 0
    assert padded.any()
    batch.input_ids[padded] = seg_id
    assert batch.seg_counts(seg_id) == [2]
    model.score(batch)  # still 2 [SEG] for 2 target rows
    batch.input_ids[0, 0] = seg_id
    batch.proposal_ious[0] = batch.proposal_iops[0] = torch.rand(3, 3)
    with pytest.raises(ValueError, match="position 0"):
        model.score(batch)


def test_gradients_reach_exactly_the_trainable_parameters(tiny_model, tiny_config):
    model, tokenizer = tiny_model
    setup_trainable(model, tiny_config)
    batch = make_batch(tokenizer, model.num_image_tokens, TWO_IMAGES)
    model.train()(batch).loss.backward()

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    for prefix in (
        "text_projection.",
        "proposal_scorer.feature_proj.",
        "proposal_scorer.iop_head.",
    ):
        assert any(n.startswith(prefix) for n in nonzero), prefix
    assert any("lora_B" in n for n in nonzero)  # lora_A's grad is 0 while lora_B starts at 0
    assert any(n.endswith("embed_tokens.weight") for n in nonzero)
    assert any(n.endswith("lm_head.weight") for n in nonzero)
    frozen_prefixes = ("backbone.vision_tower.", "backbone.projector.", "dino.")
    assert not any(n.startswith(frozen_prefixes) for n in trainable)
    assert not any(
        n.startswith("backbone.language_model.model.layers") and "lora_" not in n for n in trainable
    )


def test_overfitting_one_batch_aligns_seg_with_best_proposal(tiny_model, tiny_config):
    model, tokenizer = tiny_model
    setup_trainable(model, dataclasses.replace(tiny_config, lora_dropout=0.0))
    batch = make_batch(tokenizer, model.num_image_tokens, TWO_IMAGES, seed=3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    first = None
    for _ in range(50):
        out = model(batch)
        first = first if first is not None else out.align_loss.item()
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    final = model.eval().score(batch)
    assert final.align_loss.item() <= 0.2 * first
    for similarity, ious in zip(final.similarities, batch.proposal_ious):
        picked = ious.gather(1, similarity.argmax(-1, keepdim=True)).squeeze(1)
        assert torch.equal(picked, ious.max(-1).values)  # the best proposal (ties allowed)
        assert (ious.max(-1).values > 0).all()  # ... and a real one, not an all-zero row


def test_edge_cases_have_no_nan(tiny_config):
    # K = 1, K = 0 and zero-area proposals, in bf16.
    model, tokenizer = build_llm_seg(tiny_config, dtype=torch.bfloat16)
    setup_trainable(model, tiny_config)
    spec = BatchSpec(rows=[[1], [2], [1, 1]], proposals=[1, 0, 5], zero_area=(0, 3))
    batch = make_batch(tokenizer, model.num_image_tokens, spec).to("cpu", torch.bfloat16)
    assert batch.proposal_ious[0].dtype == torch.float32  # targets stay fp32
    out = model.train()(batch)
    assert [s.shape for s in out.similarities] == [(1, 1), (2, 0), (2, 5)]
    assert _finite(out.loss, out.ce_loss, out.align_loss, out.iop_loss, *out.similarities)
    assert _finite(*out.iop_scores)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads
    assert _finite(*grads)


def test_no_seg_anywhere_gives_only_the_lm_loss(tiny_model, tiny_config):
    model, tokenizer = tiny_model
    setup_trainable(model, tiny_config)
    batch = make_batch(tokenizer, model.num_image_tokens, BatchSpec(rows=[[0, 0]], proposals=[4]))
    out = model.train()(batch)
    assert out.similarities[0].shape == (0, 4)
    assert out.align_loss.item() == 0
    assert out.iop_loss.item() == 0
    assert torch.allclose(out.loss, out.ce_loss)
    out.loss.backward()  # still a valid graph


def test_count_mismatch_is_a_clear_error(tiny_model):
    model, tokenizer = tiny_model
    batch = make_batch(tokenizer, model.num_image_tokens, TWO_IMAGES)
    batch.proposal_ious[1] = batch.proposal_ious[1][:2]
    with pytest.raises(ValueError, match=r"image 1 has 3 \[SEG\] tokens but proposal_ious has 2"):
        model.score(batch)
    batch = make_batch(tokenizer, model.num_image_tokens, TWO_IMAGES)
    batch.proposal_iops[0] = batch.proposal_iops[0][:, :3]
    with pytest.raises(ValueError, match="image 0 has 4 proposals but proposal_iops has 3"):
        model.score(batch)


def test_scoring_without_labels_or_targets_and_predict_masks(tiny_model):
    model, tokenizer = tiny_model
    batch = make_batch(tokenizer, model.num_image_tokens, TWO_IMAGES)
    unlabeled = LLMSegBatch(
        **{**batch.__dict__, "labels": None, "proposal_ious": None, "proposal_iops": None}
    )
    out = model.score(unlabeled)
    assert out.loss is None
    assert out.ce_loss is None
    assert out.align_loss is None
    assert [s.shape for s in out.similarities] == [(1, 4), (3, 7)]

    full_size = [m > 0.5 for m in batch.proposal_masks]
    results = model.predict_masks(
        unlabeled, full_size, strategy="argmax", output_sizes=[(40, 50), (32, 32)]
    )
    assert [len(r) for r in results] == [1, 3]
    assert results[0][0].mask.shape == (40, 50)
    assert results[1][2].mask.shape == (32, 32)
    best = int(out.similarities[1][2].argmax())
    assert results[1][2].selected == [best]
    assert torch.equal(results[1][2].mask, full_size[1][best])


def test_gradient_checkpointing_gives_the_same_loss_and_grads(tiny_model, tiny_config):
    model, tokenizer = tiny_model
    setup_trainable(model, dataclasses.replace(tiny_config, lora_dropout=0.0))
    batch = make_batch(tokenizer, model.num_image_tokens, TWO_IMAGES)
    results = []
    for enabled in (False, True):
        model.set_gradient_checkpointing(enabled)
        assert model.gradient_checkpointing == enabled
        model.zero_grad()
        loss = model.train()(batch).loss
        loss.backward()
        results.append((loss.detach(), model.text_projection[0].weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_lora_merge_keeps_outputs(tiny_model, tiny_config):
    model, tokenizer = tiny_model
    setup_trainable(model, tiny_config)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)  # make the adapters matter
    batch = make_batch(tokenizer, model.num_image_tokens, TWO_IMAGES)
    before = model.eval().score(batch)
    assert merge_lora_weights(model) == 4  # 2 layers x (q_proj, v_proj)
    assert not any("lora_" in n for n in model.state_dict())
    after = model.score(batch)
    assert torch.allclose(before.logits, after.logits, atol=1e-5)
    assert math.isclose(before.loss.item(), after.loss.item(), rel_tol=1e-5)


def test_extra_embeddings_hook_writes_placeholders(tiny_model):
    model, tokenizer = tiny_model
    backbone = model.backbone
    batch = make_batch(tokenizer, model.num_image_tokens, BatchSpec(rows=[[1, 1]], proposals=[2]))
    plain = backbone.embed_inputs(batch.input_ids, batch.clip_pixels, batch.image_index)
    extra_mask = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    extra_mask[0, -3] = extra_mask[1, 20] = True
    extra = torch.randn(2, backbone.hidden_size)
    with torch.no_grad():
        written = backbone.embed_inputs(
            batch.input_ids, batch.clip_pixels, batch.image_index, extra, extra_mask
        )
    assert torch.equal(written[0, -3], extra[0])
    assert torch.equal(written[1, 20], extra[1])
    assert torch.equal(written[~extra_mask], plain[~extra_mask])
    with pytest.raises(ValueError, match="marks 2 positions but 1"):
        backbone.embed_inputs(
            batch.input_ids, batch.clip_pixels, batch.image_index, extra[:1], extra_mask
        )
