"""The relation features a referring round's proposals get (model/heads/reference_relations.py)."""

from __future__ import annotations

import math

import torch

from model.heads.proposal_scorer import ProposalScorer, ProposalScorerConfig
from model.heads.reference_relations import (
    FIRST_VERSION_FEATURES,
    RELATION_FEATURES,
    reference_relations,
    round_relations,
)

SIZE = 32
NAMES = ["exists", "iou", "iop", "dx", "dy", "area", "distance", "contact", "appearance", "shape"]


def square(x0: int, y0: int, side: int) -> torch.Tensor:
    grid = torch.zeros(SIZE, SIZE)
    grid[y0 : y0 + side, x0 : x0 + side] = 1
    return grid


def disc(cx: float, cy: float, radius: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    return (((xs - cx) ** 2 + (ys - cy) ** 2) <= radius**2).float()


def features(*rows: tuple[float, float]) -> torch.Tensor:
    return torch.tensor(rows)


def test_each_relation_reads_what_its_name_says():
    reference = square(12, 12, 6)  # x, y in [12, 18)
    proposals = torch.stack(
        [
            reference,  # the reference itself
            square(18, 12, 6),  # touching it on the right
            square(2, 12, 6),  # apart, on the left
            disc(15.0, 27.0, 3.0),  # below, a disc
            square(12, 0, 10),  # above, larger
        ]
    )
    appearance = features((1, 0), (1, 0), (0, 1), (1, 1), (-1, 0))
    rows = reference_relations(proposals, reference[None], appearance, features((1, 0)))
    assert rows.shape == (1, 5, RELATION_FEATURES)
    value = {name: rows[0, :, i] for i, name in enumerate(NAMES)}
    torch.testing.assert_close(value["exists"], torch.ones(5))
    assert value["iou"][0] == 1
    assert value["iop"][0] == 1
    assert value["iou"][1:].max() == 0
    # Offsets: proposal minus reference, in the map frame; right > 0, left < 0, below y > 0.
    assert math.isclose(value["dx"][1], 6 / SIZE, abs_tol=1e-5)
    assert math.isclose(value["dx"][2], -10 / SIZE, abs_tol=1e-5)
    assert value["dy"][3] > 0 > value["dy"][4]
    assert value["area"][4] > 0 > value["area"][3]
    torch.testing.assert_close(value["distance"], torch.hypot(value["dx"], value["dy"]))
    # Contact: the touching square (and the reference) yes, the one 4 pixels away no.
    assert value["contact"][0] == 1
    assert value["contact"][1] > 0.2
    assert value["contact"][2] == 0
    # Appearance: the cosine of the pooled features.
    torch.testing.assert_close(
        value["appearance"], torch.tensor([1.0, 1.0, 0.0, 1 / math.sqrt(2), -1.0])
    )
    # Shape: the other squares are alike, the disc is not.
    assert value["shape"][0] == 1
    assert value["shape"][1] > 0.95
    assert value["shape"][2] > 0.95
    assert value["shape"][3] < value["shape"][1] - 0.1


def test_rounds_average_their_references_and_rounds_without_any_get_zeros():
    relations = torch.arange(2 * 3 * RELATION_FEATURES, dtype=torch.float32).view(2, 3, -1)
    assignment = torch.tensor([[True, False], [True, True], [False, False]])
    rows = round_relations(relations, assignment)
    torch.testing.assert_close(rows[0], relations[0])
    torch.testing.assert_close(rows[1], relations.mean(dim=0))
    assert rows[2].abs().sum() == 0


def test_the_scorer_pools_appearance_from_its_own_features():
    scorer = ProposalScorer(
        ProposalScorerConfig(
            feature_dim=3, embed_dim=8, num_heads=2, mlp_dim=16, depth=1, iop_hidden_dim=8,
            embedding_hidden_dim=16, map_size=SIZE, relation_features=True,
        )
    )  # fmt: skip
    with torch.no_grad():
        scorer.feature_proj.weight.zero_()
        scorer.feature_proj.bias.zero_()
        scorer.feature_proj.weight[:3, :3, 0, 0] = torch.eye(3)
    dino = torch.zeros(1, 3, 4, 4)
    dino[0, 0, :, :2] = 1  # left half "red"
    dino[0, 1, :, 2:] = 1  # right half "blue"
    feature_map = scorer.project_features(dino)[0]
    left_a, left_b, right = square(1, 4, 6), square(2, 20, 6), square(24, 12, 6)
    rows = scorer.relations(feature_map, torch.stack([left_b, right]), left_a[None])
    appearance = rows[0, :, NAMES.index("appearance")]
    assert appearance[0] > 0.99
    assert appearance[1] < 0.01


def test_a_first_version_save_loads_and_scores_as_it_did():
    config = ProposalScorerConfig(
        feature_dim=3, embed_dim=8, num_heads=2, mlp_dim=16, depth=1, iop_hidden_dim=8,
        embedding_hidden_dim=16, map_size=SIZE, relation_features=True,
    )  # fmt: skip
    torch.manual_seed(0)
    scorer = ProposalScorer(config)
    state = scorer.state_dict()
    old_weight = torch.randn(8, FIRST_VERSION_FEATURES)
    state["relation_embedding.weight"] = old_weight
    scorer.load_state_dict(state)
    weight = scorer.relation_embedding.weight.detach()
    assert weight.shape == (8, RELATION_FEATURES)
    torch.testing.assert_close(weight[:, :FIRST_VERSION_FEATURES], old_weight)
    assert weight[:, FIRST_VERSION_FEATURES:].abs().sum() == 0
    # The further relations then change nothing: scores equal those of the first six alone.
    pooled, seg = torch.randn(4, 8), torch.randn(1, 8)
    relations = torch.randn(1, 4, RELATION_FEATURES)
    first_six = relations.clone()
    first_six[..., FIRST_VERSION_FEATURES:] = torch.randn(1, 4, 4)
    with torch.no_grad():
        a = scorer.score(pooled, seg, relations).similarity
        b = scorer.score(pooled, seg, first_six).similarity
    torch.testing.assert_close(a, b)
