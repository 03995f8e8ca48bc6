"""ProposalScorer: upstream's parameter structure and sizes, pooling and scoring by hand."""

from __future__ import annotations

import pytest
import torch

from model.heads.proposal_scorer import ProposalScorer, ProposalScorerConfig

SMALL = ProposalScorerConfig(feature_dim=12, embed_dim=16, num_heads=2, mlp_dim=24, map_size=8)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_real_sizes_match_upstream_parameter_counts():
    scorer = ProposalScorer(ProposalScorerConfig())
    # Reference counts of upstream's modules (lisa_dino_conv, 2 x LISA_TwoWayAttentionBlock,
    # lisa_final_attn, lisa_iou_head, lisa_embedding_head).
    assert _count(scorer.feature_proj) == 1024 * 256 + 256
    assert _count(scorer.blocks) == 2 * (
        3 * (4 * (256 * 256 + 256)) + 4 * 2 * 256 + 2 * 256 * 2048 + 2048 + 256
    )
    assert _count(scorer.blocks) / 1e6 == pytest.approx(3.68, abs=0.005)
    assert _count(scorer.final_attn) == 4 * (256 * 256 + 256)
    assert _count(scorer.iop_head) == 256 * 128 + 128 + 128 + 1
    assert _count(scorer.embedding_head) == 256 * 2048 + 2048 + 2048 * 256 + 256


def test_parameter_names_follow_the_upstream_structure():
    names = set(ProposalScorer(SMALL).state_dict())
    for block in range(2):
        for attention in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                assert f"blocks.{block}.{attention}.{proj}.weight" in names
        for part in ("mlp.lin1", "mlp.lin2", "norm1", "norm2", "norm3", "norm4"):
            assert f"blocks.{block}.{part}.weight" in names
    for key in (
        "feature_proj.weight",
        "final_attn.q_proj.weight",
        "final_norm.bias",
        "iop_head.0.weight",
        "iop_head.2.bias",
        "embedding_head.0.weight",
        "embedding_head.2.bias",
    ):
        assert key in names
    assert not any(name.startswith("blocks.2") for name in names)


def test_project_features_gives_fp32_grids():
    scorer = ProposalScorer(SMALL).to(torch.bfloat16)
    maps = scorer.project_features(torch.randn(3, 12, 4, 4, dtype=torch.bfloat16))
    assert maps.shape == (3, 16, 4, 4)
    assert maps.dtype == torch.float32


@pytest.mark.parametrize(("size", "grid"), [(8, 4), (64, 16), (56, 16), (16, 16), (8, 3)])
def test_pooling_on_the_grid_equals_pooling_the_upsampled_features(size, grid):
    # Upstream: F.interpolate the projected features to the map size, then average under
    # each weight map. The scorer brings the maps down instead; the averages must agree.
    config = ProposalScorerConfig(**{**SMALL.__dict__, "map_size": size})
    scorer = ProposalScorer(config)
    features = scorer.project_features(torch.randn(1, 12, grid, grid))[0]
    masks = torch.rand(4, size, size) * (torch.rand(4, size, size) > 0.5)
    masks[3] = 0.0
    upsampled = torch.nn.functional.interpolate(
        features[None], size=(size, size), mode="bilinear", align_corners=False
    )[0]
    expected = torch.einsum("kyx,eyx->ke", masks, upsampled)
    expected = expected / (masks.sum(dim=(1, 2))[:, None] + config.pool_eps)
    torch.testing.assert_close(scorer.pool(features, masks), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(scorer.pool(features, masks)[3], torch.zeros(16))


def test_pooling_matches_a_hand_computation_and_empty_masks_give_zero():
    scorer = ProposalScorer(SMALL)
    features = torch.randn(16, 8, 8)
    masks = torch.zeros(3, 8, 8)
    masks[0, :2, :3] = 1.0  # 6 pixels
    masks[1] = torch.rand(8, 8)  # soft weights
    pooled = scorer.pool(features, masks)  # masks[2] stays empty
    assert pooled.shape == (3, 16)
    assert torch.allclose(pooled[0], features[:, :2, :3].mean(dim=(1, 2)), atol=1e-6)
    weighted = (features * masks[1]).sum(dim=(1, 2)) / masks[1].sum()
    assert torch.allclose(pooled[1], weighted, atol=1e-5)
    assert torch.equal(pooled[2], torch.zeros(16))
    with pytest.raises(ValueError, match="map_size"):
        scorer.pool(features, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="map_size"):
        scorer.pool(features, torch.zeros(2, 16, 16))


def test_scores_by_hand_for_the_last_step():
    # With a single key, the final proposals->[SEG] attention weight is 1, so its output is
    # out_proj(v_proj(key)) for every proposal; the heads then act on the LayerNorm of the sum.
    scorer = ProposalScorer(SMALL).eval()
    pooled, segs = torch.randn(5, 16), torch.randn(2, 16)
    captured = {}
    original = scorer.final_attn.forward

    def spy(q, k, v):
        captured["q"], captured["k"] = q, k
        return original(q=q, k=k, v=v)

    scorer.final_attn.forward = spy
    scores = scorer.score(pooled, segs)
    q, k = captured["q"], captured["k"]
    attn = scorer.final_attn.out_proj(scorer.final_attn.v_proj(k))  # (R, 1, E)
    queries = scorer.final_norm(q + attn)
    embeddings = scorer.embedding_head(queries)
    expected_sim = torch.nn.functional.cosine_similarity(embeddings, segs[:, None], dim=-1)
    assert torch.allclose(scores.similarity, expected_sim, atol=1e-5)
    assert torch.allclose(scores.iop, scorer.iop_head(queries).squeeze(-1), atol=1e-6)
    assert scores.similarity.shape == scores.iop.shape == (2, 5)
    assert scores.proposal_embeddings.shape == (2, 5, 16)


def test_proposal_order_does_not_matter():
    scorer = ProposalScorer(SMALL).eval()
    pooled, segs = torch.randn(6, 16), torch.randn(3, 16)
    order = torch.randperm(6)
    with torch.no_grad():
        plain = scorer.score(pooled, segs)
        permuted = scorer.score(pooled[order], segs)
    assert torch.allclose(plain.similarity[:, order], permuted.similarity, atol=1e-5)
    assert torch.allclose(plain.iop[:, order], permuted.iop, atol=1e-5)


@pytest.mark.parametrize(("rounds", "proposals"), [(0, 4), (3, 0), (0, 0)])
def test_empty_inputs_give_empty_scores(rounds, proposals):
    scorer = ProposalScorer(SMALL)
    scores = scorer.score(torch.randn(proposals, 16), torch.randn(rounds, 16))
    assert scores.similarity.shape == scores.iop.shape == (rounds, proposals)
    assert scores.proposal_embeddings.shape == (rounds, proposals, 16)


def test_forward_scores_every_image():
    scorer = ProposalScorer(SMALL)
    features = torch.randn(2, 12, 4, 4)
    masks = [torch.rand(3, 8, 8), torch.rand(1, 8, 8)]
    segs = [torch.randn(2, 16), torch.randn(4, 16)]
    scores = scorer(features, masks, segs)
    assert [s.similarity.shape for s in scores] == [(2, 3), (4, 1)]
    with pytest.raises(ValueError, match="one of each per image"):
        scorer(features, masks[:1], segs)


def test_score_many_pads_without_changing_any_set_s_scores():
    config = ProposalScorerConfig(**{**SMALL.__dict__, "relation_features": True})
    scorer = ProposalScorer(config).eval()
    torch.nn.init.normal_(scorer.relation_embedding.weight)
    pooled = [torch.randn(k, 16) for k in (5, 2, 3, 4)]
    segs = [torch.randn(r, 16) for r in (2, 3, 0, 1)]
    relations = [torch.randn(2, 5, 10), None, None, torch.randn(1, 4, 10)]
    with torch.no_grad():
        together = scorer.score_many(pooled, segs, relations)
        alone = [scorer.score(p, s, r) for p, s, r in zip(pooled, segs, relations)]
    for joint, single in zip(together, alone):
        assert joint.similarity.shape == single.similarity.shape
        torch.testing.assert_close(joint.similarity, single.similarity, atol=1e-5, rtol=0)
        torch.testing.assert_close(joint.iop, single.iop, atol=1e-5, rtol=0)
        torch.testing.assert_close(joint.proposal_embeddings, single.proposal_embeddings)
    assert together[2].similarity.shape == (0, 3)
    # The padding is what the mask keeps out: without it the short sets' scores change.
    unmasked = scorer.score_many([torch.cat([pooled[1], torch.zeros(3, 16)])], [segs[1]])[0]
    assert not torch.allclose(unmasked.similarity[:, :2], alone[1].similarity, atol=1e-3)


def test_score_many_passes_gradients_to_every_set_and_refuses_unusable_relations():
    scorer = ProposalScorer(SMALL)
    pooled = [torch.randn(k, 16, requires_grad=True) for k in (4, 1)]
    segs = [torch.randn(2, 16, requires_grad=True) for _ in range(2)]
    scores = scorer.score_many(pooled, segs)
    sum(s.similarity.sum() + s.iop.sum() for s in scores).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pooled + segs)
    with pytest.raises(ValueError, match="relation_features"):
        scorer.score_many(pooled, segs, [torch.zeros(2, 4, 10), None])


def test_prepare_equals_the_per_image_features_and_relations():
    config = ProposalScorerConfig(
        **{**SMALL.__dict__, "relation_features": True, "geometry_embedding": True}
    )
    scorer = ProposalScorer(config).eval()
    feature_maps = torch.randn(3, 16, 8, 8)
    masks = [(torch.rand(k, 8, 8) > 0.6).float() for k in (3, 5, 2)]
    references = [(torch.rand(n, 8, 8) > 0.5).float() for n in (1, 0, 2)]
    features, relations = scorer.prepare(feature_maps, masks, references)
    for i in range(3):
        pooled = scorer.pool(feature_maps[i], masks[i])
        expected = pooled + scorer.geometry_embedding(masks[i])
        torch.testing.assert_close(features[i], expected)
        if len(references[i]):
            expected = scorer.relations(feature_maps[i], masks[i], references[i])
            torch.testing.assert_close(relations[i], expected)
    assert relations[1] is None
    assert scorer.prepare(feature_maps, masks)[1] == [None, None, None]
