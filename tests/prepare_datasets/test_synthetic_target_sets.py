"""Synthetic no-target and multi-target queries: answers re-derived from the scene, placement,
determinism, and what the ReasonSeg reader makes of them."""

import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from prepare_datasets.prepare_synthetic import SyntheticConfig, main
from prepare_datasets.synthetic.scenes import COLOUR_RGB, SHAPES, SceneObject, render_masks
from prepare_datasets.synthetic.target_sets import (
    MULTI_TARGET,
    NO_TARGET,
    multi_target_candidates,
    no_target_candidates,
    target_set_kinds,
)
from utils.data.builders import eval_records
from utils.data.reason_seg import ReasonSegSource, instance_shapes, load_reason_seg_split
from utils.data.rejection import REJECTION_SENTENCE
from utils.masks import labelme_to_mask

SIZE = 128
# Written by hand from the query wording, independently of the generator's tables: the shapes
# a reader could take each function/geometry phrasing to mean.
SHAPES_FITTING = {
    "roll": {"circle", "ring"},
    "thread": {"ring"},
    "plus": {"cross"},
    "roof": {"triangle"},
    "sky": {"star"},
    "tile": {"square"},
    "honeycomb": {"hexagon"},
    "three_corners": {"triangle"},
    "four_corners": {"square", "cross"},  # "four right angles": a cross has some too
    "six_corners": {"hexagon"},
    "five_points": {"star"},
    "four_arms": {"cross"},
    "no_corners": {"circle", "ring"},
    "hole": {"ring"},
    "solid_round": {"circle"},
}
# Shape words as a reader takes them: a ring is a kind of circle.
SHAPE_WORDS = {s: {s} for s in SHAPES} | {"circle": {"circle", "ring"}}
PLURAL = {"circles": "circle", "rings": "ring", "squares": "square", "triangles": "triangle",
          "hexagons": "hexagon", "stars": "star", "crosses": "cross"}  # fmt: skip


def config(out_dir, **overrides) -> SyntheticConfig:
    values = dict(seed=5, num_train=20, num_val=10, num_test=10, image_size=SIZE, progress=False)
    values.update(overrides)
    return SyntheticConfig(out_dir=str(out_dir), **values)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(root with 0.3/0.3, root without)``, both with one extra query per picture."""
    with_sets = main(config(tmp_path_factory.mktemp("sets"), extra_queries=1,
                            no_target_queries=0.3, multi_target_queries=0.3)).root  # fmt: skip
    plain = main(config(tmp_path_factory.mktemp("plain"), extra_queries=1)).root
    return with_sets, plain


def queries(record) -> list[dict]:
    """The main query and the extra ones, each with the scene's fields."""
    scene = {k: record[k] for k in ("objects", "background", "image_size")}
    main_query = {k: v for k, v in record.items() if k != "extra_queries"}
    return [main_query] + [{**scene, **extra} for extra in record.get("extra_queries", [])]


def all_queries(root: Path, split: str):
    for path in sorted((root / split).glob("*.json")):
        for index, query in enumerate(queries(json.loads(path.read_text()))):
            yield path, index, query


def fitting_objects(query) -> list[int]:
    """The objects the query's words describe, read from its first phrasing like a person would:
    its function/geometry subtype's shapes, else every colour and shape word it names."""
    objects, subtype = query["objects"], query["query_subtype"]
    if subtype in SHAPES_FITTING:
        return [i for i, o in enumerate(objects) if o["shape"] in SHAPES_FITTING[subtype]]
    words = re.findall(r"[a-z]+", query["text"][0].lower())
    colours = [w for w in words if w in COLOUR_RGB]
    shapes = [PLURAL.get(w, w) for w in words if PLURAL.get(w, w) in SHAPES]
    assert len(colours) <= 1, query["text"]
    assert len(shapes) <= 1, query["text"]
    assert colours + shapes, query["text"]
    return [
        i
        for i, o in enumerate(objects)
        if all(o["colour"] == c for c in colours)
        and all(o["shape"] in SHAPE_WORDS[s] for s in shapes)
    ]


def scene(record) -> list[SceneObject]:
    return [
        SceneObject(
            o["shape"], o["colour"], tuple(o["rgb"]), *o["center"], o["radius"], o["rotation"]
        )
        for o in record["objects"]
    ]


def test_answers_are_re_derived_from_the_scene(runs):
    kinds, subtypes = {NO_TARGET: 0, MULTI_TARGET: 0}, set()
    for split in ("train", "val", "test"):
        for path, index, query in all_queries(runs[0], split):
            kind = query["query_type"]
            if kind not in kinds:
                assert "no_target" not in query
                assert "targets" not in query
                continue
            kinds[kind] += 1
            subtypes.add((kind, query["query_subtype"]))
            assert query["target"] is None
            # Main query in val/test, an extra query (after the ordinary one) in train.
            assert (index == 0) == (split != "train"), (path.name, index)
            if kind == NO_TARGET:
                assert query["no_target"] is True
                assert query["shapes"] == []
                assert query["targets"] == []
                assert fitting_objects(query) == [], (path.name, query["text"])
                continue
            assert "no_target" not in query
            targets = query["targets"]
            assert len(targets) >= 2
            assert fitting_objects(query) == targets, path.name
            # The polygons rasterise to exactly the union of the targets' visible regions.
            _, visible = render_masks(scene(query), SIZE, SIZE)
            union = visible[targets].any(axis=0)
            assert np.array_equal(labelme_to_mask(query["shapes"], SIZE, SIZE) == 1, union)
    assert kinds[NO_TARGET] == 6 + 3 + 3  # round(0.3 x 20) train, round(0.3 x 10) val and test
    assert 3 + 3 < kinds[MULTI_TARGET] <= 6 + 3 + 3  # a train scene may offer none
    assert {s for k, s in subtypes if k == NO_TARGET} >= {"colour", "shape", "colour_shape"}
    assert {s for k, s in subtypes if k == MULTI_TARGET} == {"colour", "shape"}


def test_everything_else_is_as_without_the_options(runs):
    with_sets, plain = runs
    stats = json.loads((with_sets / "synthetic_stats.json").read_text())
    assert stats["val"]["no_target_queries"] == stats["val"]["query_types"][NO_TARGET] == 3
    assert stats["val"]["multi_target_queries"] == 3
    assert (
        "no_target_queries" not in json.loads((plain / "synthetic_stats.json").read_text())["val"]
    )
    for split in ("train", "val", "test"):
        for path in sorted((plain / split).glob("*.json")):
            record = json.loads((with_sets / split / path.name).read_text())
            same_picture = (with_sets / split / path.with_suffix(".jpg").name).read_bytes() == (
                path.with_suffix(".jpg").read_bytes()
            )
            expected = json.loads(path.read_text())
            if split == "train":  # the picture and its queries, plus at most one more query
                extras, plain_extras = (
                    record.pop("extra_queries", []),
                    expected.pop("extra_queries", []),
                )
                assert extras[: len(plain_extras)] == plain_extras, path.name
                assert len(extras) - len(plain_extras) in (0, 1)
                assert same_picture
                assert record == expected, path.name
            elif record["query_type"] == NO_TARGET:  # same picture, another main query
                assert same_picture
                assert record["objects"] == expected["objects"], path.name
            elif record["query_type"] != MULTI_TARGET:  # redrawn until a scene offers one
                assert same_picture
                assert record == expected, path.name


def test_same_seed_same_bytes(runs, tmp_path):
    again = main(config(tmp_path, extra_queries=1, num_train=0, no_target_queries=0.3,
                        multi_target_queries=0.3)).root  # fmt: skip
    names = sorted(p.name for p in (again / "val").iterdir())
    assert names == sorted(p.name for p in (runs[0] / "val").iterdir())
    for name in names:
        assert (again / "val" / name).read_bytes() == (runs[0] / "val" / name).read_bytes(), name


def test_reader_flags_no_target_rows_in_evaluation(runs):
    dataset_dir = runs[0].parent.parent
    settings = SimpleNamespace(dataset_dir=dataset_dir, sam_masks_dir=None)
    records = eval_records(settings, "ReasonSeg|val", with_proposals=False)
    truth = {p.stem: json.loads(p.read_text()) for p in (runs[0] / "val").glob("*.json")}
    flagged = [r.name for r in records if r.no_target == (True,)]
    assert sorted(flagged) == sorted(n for n, t in truth.items() if t["query_type"] == NO_TARGET)
    assert all(r.no_target in ((True,), (False,)) for r in records)
    for record in records:
        (mask,) = record.masks(SIZE, SIZE)
        query = truth[record.name]
        assert record.conversations[0][0][1] == "[SEG]."
        if query["query_type"] == NO_TARGET:
            assert not mask.any()
        elif query["query_type"] == MULTI_TARGET:
            _, visible = render_masks(scene(query), SIZE, SIZE)
            assert np.array_equal(mask == 1, visible[query["targets"]].any(axis=0))
    # A set without no-target queries keeps no_target=None.
    plain = SimpleNamespace(dataset_dir=runs[1].parent.parent, sam_masks_dir=None)
    assert {r.no_target for r in eval_records(plain, "ReasonSeg|val", with_proposals=False)} == {
        None
    }


def test_reader_trains_rejections_without_mask_rows(runs):
    items = load_reason_seg_split(runs[0].parent.parent, None, "train")
    source = ReasonSegSource(items, num_queries=3)
    assert source.num_no_target == 6
    rejections = 0
    for seed in range(40):
        record = source.sample_record(random.Random(seed))
        answers = [turns[0][1] for turns in record.conversations]
        rejecting = [a == REJECTION_SENTENCE for a in answers]
        assert all(r or "[SEG]" in a for r, a in zip(rejecting, answers))
        rejections += sum(rejecting)
        masks = record.masks(SIZE, SIZE)
        assert masks.shape == (len(answers) - sum(rejecting), SIZE, SIZE)
        assert all(mask.any() for mask in masks)  # every row left is a real target
    assert rejections > 0


def test_per_instance_rows_are_each_targets_visible_region(runs):
    """Every multi-target polygon names its object (``group_id``), so per-instance training
    rows are the targets' visible regions, in ``targets`` order."""
    items = load_reason_seg_split(runs[0].parent.parent, None, "train_val")
    checked = 0
    for item in items:
        record = json.loads(item.image_path.with_suffix(".json").read_text())
        for index, query in enumerate(queries(record)):
            if query["query_type"] != MULTI_TARGET:
                continue
            assert {s["group_id"] for s in query["shapes"]} == set(query["targets"])
            parsed = item.main_query if index == 0 else item.extra_queries[index - 1]
            instances = instance_shapes(parsed, item.image_path.name)
            _, visible = render_masks(scene(query), SIZE, SIZE)
            assert len(instances) == len(query["targets"])
            for target, shapes in zip(query["targets"], instances, strict=True):
                assert np.array_equal(labelme_to_mask(shapes, SIZE, SIZE) == 1, visible[target])
            checked += 1
    assert checked >= 3
    source = ReasonSegSource(items, 3, multi_target_answer="per_instance")
    for seed in range(20):
        record = source.sample_record(random.Random(seed))
        num_seg = sum(turns[0][1].count("[SEG]") for turns in record.conversations)
        assert record.masks(SIZE, SIZE).shape == (num_seg, SIZE, SIZE)


def test_candidates_by_hand():
    def objects(*specs):
        return [SceneObject(s, c, COLOUR_RGB[c], 0.0, 0.0, 1.0, 0.0) for s, c in specs]

    scene_ = objects(("circle", "red"), ("ring", "blue"), ("star", "blue"), ("star", "red"))
    no_target = no_target_candidates(scene_)
    colours = {q.colour for q in no_target if q.subtype == "colour"}
    assert colours == set(COLOUR_RGB) - {"red", "blue"}
    # a ring is a kind of circle, so neither is "absent"; the others are
    assert {q.shape for q in no_target if q.subtype == "shape"} == set(SHAPES) - {
        "circle", "ring", "star"
    }  # fmt: skip
    # every pair of a present colour and a present shape is on some object (a blue ring is a
    # "blue circle", a red circle a "red ring")
    assert not any(q.subtype == "colour_shape" for q in no_target)
    assert not any(q.subtype in ("roll", "no_corners", "sky") for q in no_target)
    assert any(q.subtype == "three_corners" for q in no_target)
    other = no_target_candidates(objects(("circle", "red"), ("star", "blue"), ("cross", "blue")))
    pairs = {(q.colour, q.shape) for q in other if q.subtype == "colour_shape"}
    assert pairs == {("red", "star"), ("red", "cross"), ("blue", "circle"), ("blue", "ring")}
    # a cross has right angles: "the object with four right angles" is not asked beside one
    assert "four_corners" not in {q.subtype for q in other}
    assert "tile" in {q.subtype for q in other}
    geometry = [SimpleNamespace(visible_fraction=1.0)] * 4
    polygons = [[np.zeros((3, 2))]] * 4
    multi = {(q.subtype, q.targets) for q in multi_target_candidates(scene_, geometry, polygons)}
    # two stars and two blue and two red objects; circle + ring are not "all the circles"
    assert multi == {("colour", (0, 3)), ("colour", (1, 2)), ("shape", (2, 3))}
    hidden = [SimpleNamespace(visible_fraction=f) for f in (1.0, 1.0, 0.5, 1.0)]
    multi = {(q.subtype, q.targets) for q in multi_target_candidates(scene_, hidden, polygons)}
    assert ("shape", (2, 3)) not in multi  # a half-hidden star's shape cannot be seen
    assert ("colour", (1, 2)) in multi


def test_picture_choice_and_bad_fractions(tmp_path):
    kinds = target_set_kinds(np.random.default_rng(0), 10, 0.25, 0.5)
    assert kinds.count(NO_TARGET) == 3  # 2.5 rounds to 3
    assert kinds.count(MULTI_TARGET) == 5
    rng = np.random.default_rng(0)
    assert target_set_kinds(rng, 10, 0.0, 0.0) == [None] * 10
    assert rng.random() == np.random.default_rng(0).random()  # nothing drawn at 0
    with pytest.raises(ValueError, match="--no_target_queries must be in"):
        main(config(tmp_path, no_target_queries=1.5))
    with pytest.raises(ValueError, match="--no_target_queries \\+ --multi_target_queries"):
        main(config(tmp_path, no_target_queries=0.6, multi_target_queries=0.6))
