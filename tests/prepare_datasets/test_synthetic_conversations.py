"""Multi-round conversations of the synthetic generator (``--conversations``): determinism, the
files without the option unchanged, and every referring round re-derived from its words, the
scene in the json and the referenced round's target."""

import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from prepare_datasets.prepare_synthetic import SyntheticConfig, main
from prepare_datasets.synthetic.conversations import MAX_ROUNDS, MIN_ROUNDS, REFERRING
from prepare_datasets.synthetic.queries import QUERY_TYPES, SHAPE_VISIBLE_FRACTION, SIZE_RATIO
from prepare_datasets.synthetic.relations import (
    CLOSEST_RATIO,
    DIRECTION_MARGIN,
    DIRECTION_OVERLAP,
    NEAR_PIXELS,
    NEAREST_GAP,
    RELATIONS,
    Relation,
    relation_answer,
    relation_candidates,
    scene_layout,
)
from prepare_datasets.synthetic.scenes import COLOUR_RGB, SceneObject, measure_objects, render_masks
from utils.data.conversation_split import load_conversation_split
from utils.data.references import REF_MARKER, parse_references
from utils.masks import labelme_to_mask

SIZE = 128
# sha256 of val_00000.json .. val_00019.json as the generator wrote them before --conversations
# existed (seed 3, 128 px, --extra_queries 2): the option's default must not change a byte.
PLAIN_VAL_DIGEST = "836cdb27918422b6a262dedc763481e0e43727c8638a6e49c1144a33781f1108"
# Written by hand from the template wording: the first keyword found names the relation.
KEYWORDS = (
    ("same colour", "same_colour"),
    ("same kind", "same_kind"),
    ("larger than", "larger"),
    ("smaller than", "smaller"),
    ("touch", "touching"),
    ("left", "left_of"),
    ("right", "right_of"),
    ("above", "above"),
    ("below", "below"),
    ("beneath", "below"),
    ("underneath", "below"),
    ("closest", "closest"),
    ("nearest", "closest"),
)
DIRECTIONS = {"left_of": (0, -1), "right_of": (0, 1), "above": (1, -1), "below": (1, 1)}


def config(out_dir, **overrides) -> SyntheticConfig:
    values = dict(seed=3, num_train=30, num_val=20, num_test=10, image_size=SIZE, progress=False)
    values.update(overrides)
    return SyntheticConfig(out_dir=str(out_dir), extra_queries=2, **values)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same dataset written with and without --conversations."""
    base = tmp_path_factory.mktemp("conversations")
    with_option = main(config(base / "with", conversations=True)).root
    without = main(config(base / "without")).root
    return with_option, without


def all_records(root: Path):
    for json_path in sorted(root.glob("*/*.json")):
        yield json_path, json.loads(json_path.read_text())


def visible_masks(record) -> np.ndarray:
    objects = [
        SceneObject(
            o["shape"], o["colour"], tuple(o["rgb"]), *o["center"], o["radius"], o["rotation"]
        )
        for o in record["objects"]
    ]
    return render_masks(objects, SIZE, SIZE)[1]


def chessboard_distances(masks: np.ndarray) -> np.ndarray:
    """``(N, N)``: the smallest chessboard distance from a pixel of mask i to one of mask j."""
    count = len(masks)
    distances = np.full((count, count), np.inf)
    for i in range(count):
        to_i = cv2.distanceTransform((~masks[i]).astype(np.uint8), cv2.DIST_C, 3)
        for j in range(count):
            if j != i:
                distances[i, j] = to_i[masks[j]].min()
    return distances


def expected_answer(objects, distances, relation, colour, ref) -> int | None:
    """The module docstring's definitions, written again from the json's fields."""
    others = [i for i in range(len(objects)) if i != ref]
    centre = np.array([o["visible_centroid"] for o in objects])
    box = np.array([o["visible_bbox"] for o in objects])
    visible = np.array([o["visible_area"] for o in objects], dtype=float)
    full = np.array([o["full_area"] for o in objects], dtype=float)
    if relation in DIRECTIONS:
        axis, sign = DIRECTIONS[relation]
        across = 1 - axis

        def overlap(i):  # pixels shared across, over the narrower box's pixels
            shared = min(box[i, across + 2], box[ref, across + 2]) - max(
                box[i, across], box[ref, across]
            )
            narrower = min(
                box[i, across + 2] - box[i, across], box[ref, across + 2] - box[ref, across]
            )
            return (shared + 1) / (narrower + 1)

        offset = sign * (centre[:, axis] - centre[ref, axis])
        beyond = sorted(
            (i for i in others if offset[i] > 0 and overlap(i) > 0), key=lambda i: offset[i]
        )
        if (
            not beyond
            or offset[beyond[0]] <= DIRECTION_MARGIN * SIZE
            or overlap(beyond[0]) < DIRECTION_OVERLAP
        ):
            return None
        if len(beyond) > 1 and offset[beyond[1]] < offset[beyond[0]] + NEAREST_GAP * SIZE:
            return None
        return beyond[0]
    if relation == "closest":
        far = sorted(others, key=lambda i: np.hypot(*(centre[i] - centre[ref])))
        d = [np.hypot(*(centre[i] - centre[ref])) for i in far]
        return far[0] if len(far) == 1 or d[1] >= CLOSEST_RATIO * d[0] else None
    if relation == "touching":
        near = [i for i in others if distances[ref, i] <= NEAR_PIXELS]
        return near[0] if len(near) == 1 and distances[ref, near[0]] <= 1 else None
    if relation in ("same_colour", "same_kind"):
        key = "colour" if relation == "same_colour" else "shape"
        same = [i for i in others if objects[i][key] == objects[ref][key]]
        if len(same) != 1:
            return None
        if (
            key == "shape"
            and min(visible[[same[0], ref]] / full[[same[0], ref]]) < SHAPE_VISIBLE_FRACTION
        ):
            return None
        return same[0]
    sign = 1 if relation == "larger" else -1
    bigger = [
        i
        for i in others
        if colour in (None, objects[i]["colour"])
        and (sign * (visible[i] - visible[ref]) > 0 or sign * (full[i] - full[ref]) > 0)
    ]
    if not bigger:
        return None
    first = min(bigger, key=lambda i: sign * visible[i])
    ratio = SIZE_RATIO**sign

    def clearly(a, b):
        return (
            sign * visible[a] >= sign * visible[b] * ratio
            and sign * full[a] >= sign * full[b] * ratio
        )

    if not clearly(first, ref) or not all(clearly(i, first) for i in bigger if i != first):
        return None
    return first


def test_same_seed_gives_identical_bytes_with_conversations(runs, tmp_path):
    root = runs[0]
    again = main(config(tmp_path, conversations=True)).root
    files = sorted(p.relative_to(root) for p in root.glob("*/*.j*"))
    assert len(files) == 2 * 60
    assert files == sorted(p.relative_to(again) for p in again.glob("*/*.j*"))
    for name in files + [Path("synthetic_stats.json")]:
        assert (root / name).read_bytes() == (again / name).read_bytes(), name


def test_without_the_option_files_match_the_generator_before_it(tmp_path):
    root = main(config(tmp_path, num_train=0, num_test=0)).root
    digest = hashlib.sha256()
    for path in sorted((root / "val").glob("*.json")):
        digest.update(path.read_bytes())
    assert digest.hexdigest() == PLAIN_VAL_DIGEST


def test_the_option_only_appends_the_conversation(runs):
    with_option, without = runs
    for path, _ in all_records(without):
        other = with_option / path.parent.name / path.name
        assert path.with_suffix(".jpg").read_bytes() == other.with_suffix(".jpg").read_bytes()
        text, plain = other.read_text(), path.read_text()
        if "conversation" in json.loads(text):
            # Same bytes up to the closing brace, then the new key.
            assert text.startswith(plain.rstrip()[:-1] + ', "conversation": ['), path.name
        else:
            assert text == plain, path.name
    stats, plain_stats = (json.loads((r / "synthetic_stats.json").read_text()) for r in runs)
    new_keys = {"conversations", "conversations_omitted", "conversation_rounds", "relations"}
    for split, entry in stats.items():
        assert {k: v for k, v in entry.items() if k not in new_keys | {"chained_rounds"}} == (
            plain_stats[split]
        )


def check_conversation(path, record, conversation) -> tuple[set, int, int]:
    """Assert every round of ``conversation`` against the scene of ``record``; return the
    relations seen, the chained rounds and the referring rounds."""
    relations, chains, referring = set(), 0, 0
    assert MIN_ROUNDS <= len(conversation) <= MAX_ROUNDS, path.name
    objects, distances = record["objects"], chessboard_distances(visible_masks(record))
    first = conversation[0]
    assert (first["references"], first["relation"]) == ([], None)
    assert first["candidates_without_reference"] is None
    assert first["query_type"] in QUERY_TYPES
    assert not REF_MARKER.search(first["text"])
    targets = [first["target"]]
    for number, round_ in enumerate(conversation[1:], start=2):
        text = round_["text"]
        (k,) = [int(m) for m in REF_MARKER.findall(text)]
        assert f"object {k} [REF:{k}]" in text, text
        assert 1 <= k < number, text
        assert round_["references"] == [k] == list(parse_references(text, number).references)
        relation = next(name for word, name in KEYWORDS if word in text.lower())
        assert (round_["query_type"], round_["relation"]) == (REFERRING, relation), text
        named = [c for c in COLOUR_RGB if c in re.findall(r"[a-z]+", text.lower())]
        colour = named[0] if named else None
        reference = conversation[k - 1]["target"]
        answer = expected_answer(objects, distances, relation, colour, reference)
        assert answer == round_["target"], (path.name, text)
        assert round_["target"] not in targets, (path.name, text)
        targets.append(round_["target"])
        # Without object k, at least two objects of the scene fit the words.
        answers = {
            expected_answer(objects, distances, relation, colour, other)
            for other in range(len(objects))
        }
        assert len(answers - {None}) == round_["candidates_without_reference"] >= 2, text
        if round_["is_sentence"]:
            assert (text[0].isupper(), text[-1] in ".?") == (True, True), text
        else:
            assert (text[0].islower(), text[-1]) == (True, "]"), text
        relations.add(relation)
        referring += 1
        chains += bool(conversation[k - 1]["references"])
    return relations, chains, referring


def test_every_referring_round_resolves_to_its_target(runs):
    relations, chains, referring = set(), 0, 0
    for path, record in all_records(runs[0]):
        conversation = record.get("conversation")
        if conversation is None:
            continue
        seen, chained, count = check_conversation(path, record, conversation)
        relations |= seen
        chains += chained
        referring += count
    assert relations == set(RELATIONS) - {"touching"} or relations == set(RELATIONS)
    assert chains >= 10
    assert referring >= 60


def test_round_shapes_rasterise_to_the_visible_target(runs):
    for path, record in all_records(runs[0]):
        masks = visible_masks(record)
        for round_ in record.get("conversation", []):
            assert all(s["label"] == "target" for s in round_["shapes"])
            drawn = labelme_to_mask(round_["shapes"], SIZE, SIZE) == 1
            assert np.array_equal(drawn, masks[round_["target"]]), (path.name, round_["text"])


def test_statistics_count_the_conversations(runs):
    root = runs[0]
    stats = json.loads((root / "synthetic_stats.json").read_text())
    for split, entry in stats.items():
        recs = [r for p, r in all_records(root) if p.parent.name == split]
        convos = [r["conversation"] for r in recs if "conversation" in r]
        assert entry["conversations"] == len(convos)
        assert (
            entry["conversations_omitted"]
            == len(recs) - len(convos)
            == entry["images"] - len(convos)
        )
        histogram = {}
        for convo in convos:
            histogram[str(len(convo))] = histogram.get(str(len(convo)), 0) + 1
        assert entry["conversation_rounds"] == dict(sorted(histogram.items()))
        counted = {}
        for round_ in (r for convo in convos for r in convo[1:]):
            counted[round_["relation"]] = counted.get(round_["relation"], 0) + 1
        assert entry["relations"] == dict(sorted(counted.items()))
    assert sum(entry["conversations"] for entry in stats.values()) >= 50


def test_the_conversation_loader_reads_every_conversation(runs):
    root = runs[0]
    dataset_dir = root.parents[1]
    records = load_conversation_split(dataset_dir, None, "val")
    expected = [json.loads(p.read_text()) for p in sorted((root / "val").glob("*.json"))]
    expected = [r["conversation"] for r in expected if "conversation" in r]
    assert [len(r.conversations[0]) for r in records] == [len(c) for c in expected]
    assert records[0].queries == [round_["text"] for round_ in expected[0]]


def _layout(*specs):
    """A 100 px scene from ``(shape, colour, x, y, radius)``, drawn in order."""
    objects = [SceneObject(s, c, COLOUR_RGB[c], x, y, r, 0.0) for s, c, x, y, r in specs]
    full, visible = render_masks(objects, 100, 100)
    return scene_layout(objects, measure_objects(full, visible), visible)


def test_relations_on_a_hand_made_row():
    # Three circles in a row, left to right, growing; a red square over the middle one, 3 px to
    # the right of its centre.
    layout = _layout(
        ("circle", "blue", 15, 60, 8),
        ("circle", "blue", 50, 50, 12),
        ("circle", "green", 85, 50, 14),
        ("square", "red", 53, 40, 6),
    )
    assert relation_answer(layout, Relation("left_of"), 1) == 0
    # Right of 1: the square is the nearest, but not clearly beyond (3 px), so no answer.
    assert relation_answer(layout, Relation("right_of"), 1) is None
    assert relation_answer(layout, Relation("right_of"), 0) == 1  # the nearest to the right
    assert relation_answer(layout, Relation("left_of"), 0) is None
    assert relation_answer(layout, Relation("right_of"), 3) == 2
    assert relation_candidates(layout, Relation("right_of")) == 2  # 1 (from 0) and 2 (from 3)
    assert relation_answer(layout, Relation("above"), 1) == 3
    assert relation_answer(layout, Relation("touching"), 3) == 1  # the square overlaps circle 1
    assert relation_answer(layout, Relation("touching"), 0) is None
    assert relation_answer(layout, Relation("same_colour"), 0) == 1
    assert relation_answer(layout, Relation("same_kind"), 3) is None  # the only square
    assert relation_candidates(layout, Relation("same_colour")) == 2
    # Next larger: 0 -> 1 -> 2 (each >= 1.3x); blue only: 0 -> 1, and nothing above 1.
    assert relation_answer(layout, Relation("larger"), 0) == 1
    assert relation_answer(layout, Relation("larger"), 1) == 2
    assert relation_answer(layout, Relation("larger", "blue"), 1) is None
    assert relation_answer(layout, Relation("smaller", "blue"), 2) == 1
    # Blue and just larger: 1 (given 0) or 0 (given the small square).
    assert relation_answer(layout, Relation("larger", "blue"), 3) == 0
    assert relation_candidates(layout, Relation("larger", "blue")) == 2
    assert relation_answer(layout, Relation("closest"), 1) == 3


def test_extra_conversations_keep_the_first_and_resolve_like_it(runs, tmp_path):
    root = main(config(tmp_path, conversations=True, extra_conversations=2)).root
    extras, varied_first_rounds = 0, 0
    for path, record in all_records(runs[0]):
        other = json.loads((root / path.parent.name / path.name).read_text())
        assert {k: v for k, v in other.items() if k != "extra_conversations"} == record
        for conversation in other.get("extra_conversations", []):
            check_conversation(path, other, conversation)
            varied_first_rounds += conversation[0]["target"] != record["conversation"][0]["target"]
            extras += 1
    assert "extra_conversations" not in json.dumps([r for _, r in all_records(runs[0])])
    assert extras >= 100
    assert varied_first_rounds >= extras // 3
    stats = json.loads((root / "synthetic_stats.json").read_text())
    assert sum(entry["extra_conversations"] for entry in stats.values()) == extras
    # Training reads every conversation of a json; evaluation the first only.
    dataset_dir = root.parents[1]
    first = load_conversation_split(dataset_dir, None, "train")
    every = load_conversation_split(dataset_dir, None, "train", extra_conversations=True)
    train_extras = sum(
        len(json.loads(p.read_text()).get("extra_conversations", []))
        for p in (root / "train").glob("*.json")
    )
    assert len(every) == len(first) + train_extras > len(first)
    assert {r.image_path for r in every} == {r.image_path for r in first}


def test_extra_conversations_need_conversations(tmp_path):
    with pytest.raises(ValueError, match="--extra_conversations needs --conversations"):
        config(tmp_path, extra_conversations=1).validate()
