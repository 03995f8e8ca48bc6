"""The synthetic ReasonSeg generator: determinism, unique answers, balance, masks vs the picture."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from prepare_datasets.prepare_synthetic import (
    SyntheticConfig,
    generate_sample,
    main,
    query_schedule,
)
from prepare_datasets.synthetic.queries import QUERY_TYPES, candidate_queries
from prepare_datasets.synthetic.scenes import (
    COLOUR_RGB,
    SHAPES,
    SceneObject,
    mask_to_polygons,
    measure_objects,
    render_masks,
)
from utils.data.reason_seg import load_reason_seg_split
from utils.masks import labelme_to_mask

SIZE = 128
# Written by hand from the query wording, independently of the generator's tables.
SHAPES_ANSWERING = {
    "roll": {"circle", "ring"},
    "thread": {"ring"},
    "plus": {"cross"},
    "roof": {"triangle"},
    "sky": {"star"},
    "tile": {"square"},
    "honeycomb": {"hexagon"},
    "three_corners": {"triangle"},
    "four_corners": {"square"},
    "six_corners": {"hexagon"},
    "five_points": {"star"},
    "four_arms": {"cross"},
    "no_corners": {"circle", "ring"},
    "hole": {"ring"},
    "solid_round": {"circle"},
}


def small_config(out_dir, seed=7, **overrides) -> SyntheticConfig:
    values = dict(num_train=20, num_val=10, num_test=10, image_size=SIZE, progress=False)
    values.update(overrides)
    return SyntheticConfig(out_dir=str(out_dir), seed=seed, **values)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("synthetic")
    summary = main(small_config(out_dir, extra_queries=2))
    return out_dir, summary


def queries_of(record) -> list[dict]:
    """The main query and each extra one, as records with the scene's fields."""
    scene = {k: v for k, v in record.items() if k != "extra_queries"}
    return [scene] + [{**scene, **extra} for extra in record.get("extra_queries", [])]


def records(root: Path, split: str):
    for json_path in sorted((root / split).glob("*.json")):
        yield json_path, json.loads(json_path.read_text())


def all_records(root: Path):
    for split in ("train", "val", "test"):
        yield from records(root, split)


def scene_from_record(record) -> list[SceneObject]:
    return [
        SceneObject(
            o["shape"], o["colour"], tuple(o["rgb"]), *o["center"], o["radius"], o["rotation"]
        )
        for o in record["objects"]
    ]


def fill_polygons(shapes, height, width) -> np.ndarray:
    """The brief's rasteriser: cv2.fillPoly, largest area first, 1 = target, 255 = ignore."""
    drawn = []
    for shape in shapes:
        points = np.asarray(shape["points"], dtype=np.int32)
        canvas = np.zeros((height, width), np.uint8)
        cv2.fillPoly(canvas, [points], 1)
        drawn.append((int(canvas.sum()), points, 255 if "ignore" in shape["label"] else 1))
    mask = np.zeros((height, width), np.uint8)
    for _, points, value in sorted(drawn, key=lambda d: -d[0]):
        cv2.fillPoly(mask, [points], value)
    return mask


def test_same_seed_gives_identical_bytes_and_other_seed_differs(dataset, tmp_path):
    first_dir, first = dataset
    main(small_config(tmp_path / "again", extra_queries=2))
    second_root = tmp_path / "again" / "reason_seg" / "ReasonSeg"
    files = sorted(p.relative_to(first.root) for p in first.root.glob("*/*.j*"))
    assert len(files) == 2 * 40
    assert files == sorted(p.relative_to(second_root) for p in second_root.glob("*/*.j*"))
    assert (first.root / "synthetic_stats.json").read_bytes() == (
        second_root / "synthetic_stats.json"
    ).read_bytes()
    for name in files:
        assert (first.root / name).read_bytes() == (second_root / name).read_bytes(), name
    main(small_config(tmp_path / "other", seed=8, num_train=0, num_test=0))
    other = tmp_path / "other" / "reason_seg" / "ReasonSeg" / "val"
    changed = [
        (first.root / "val" / p.name).read_bytes() != p.read_bytes() for p in other.iterdir()
    ]
    assert all(changed)


def test_layout_is_read_by_the_reason_seg_loader(dataset):
    out_dir, summary = dataset
    items = load_reason_seg_split(out_dir, None, "train_val_test")
    assert len(items) == 40
    assert {item.extra["query_type"] for item in items} == set(QUERY_TYPES)
    assert all(len(item.texts) == 3 and len(set(item.texts)) == 3 for item in items)
    image = Image.open(items[0].image_path)
    assert (image.format, image.size, image.mode) == ("JPEG", (SIZE, SIZE), "RGB")
    saved = json.loads((summary.root / "synthetic_config.json").read_text())
    assert (saved["seed"], saved["image_size"]) == (7, SIZE)
    stats = json.loads((summary.root / "synthetic_stats.json").read_text())
    assert stats == summary.stats
    assert stats["val"]["images"] == 10


def test_every_split_has_every_query_type_and_balanced_forms(dataset):
    root = dataset[1].root
    for split, count in (("train", 20), ("val", 10), ("test", 10)):
        recs = [record for _, record in records(root, split)]
        assert len(recs) == count
        types = [r["query_type"] for r in recs]
        assert sorted(set(types)) == sorted(QUERY_TYPES), split
        assert (
            max(types.count(t) for t in QUERY_TYPES) - min(types.count(t) for t in QUERY_TYPES) <= 1
        )
        long = sum(r["is_sentence"] for r in recs)
        assert abs(2 * long - count) <= 1, split
        for r in recs:
            # Long forms are sentences; short forms are phrases that a template prefixes with "the".
            for text in r["text"]:
                assert text[-1] in ".?" if r["is_sentence"] else text[0].islower(), text


def test_query_schedule_pairs_each_type_with_both_forms():
    schedule = query_schedule(np.random.default_rng(0), 10)
    assert sorted(schedule) == sorted((t, s) for t in QUERY_TYPES for s in (False, True))


def _overlap(a, b, axis):
    return min(a[axis + 2], b[axis + 2]) - max(a[axis], b[axis]) >= 0


def _named_reference(text, objects):
    named = [i for i, o in enumerate(objects) if f"the {o['shape']}" in text]
    named += [i for i, o in enumerate(objects) if f"the {o['colour']} object" in text]
    return named


def satisfying(record) -> list[int]:
    """Indices of the objects that answer the record's query, re-derived from the scene."""
    objects, text, subtype = record["objects"], record["text"][0], record["query_subtype"]
    indices = range(len(objects))
    if subtype == "colour":
        named = [c for c in COLOUR_RGB if c in re.findall(r"[a-z]+", text.lower())]
        assert len(named) == 1, text
        return [i for i in indices if objects[i]["colour"] == named[0]]
    if subtype in SHAPES_ANSWERING:
        return [i for i in indices if objects[i]["shape"] in SHAPES_ANSWERING[subtype]]
    if subtype in ("largest", "smallest"):
        sign = 1 if subtype == "largest" else -1
        best = [
            i
            for i in indices
            if all(
                sign * (objects[i][key] - objects[j][key]) > 0
                for j in indices
                if j != i
                for key in ("visible_area", "full_area")
            )
        ]
        return best
    centroids = np.array([o["visible_centroid"] for o in objects])
    if subtype in ("leftmost", "rightmost", "topmost", "bottommost"):
        axis = 0 if subtype in ("leftmost", "rightmost") else 1
        values = centroids[:, axis] * (-1 if subtype in ("leftmost", "topmost") else 1)
        return [i for i in indices if values[i] == values.max()]
    reference = _named_reference(text, objects)
    assert reference == [record["reference"]], text
    ref = reference[0]
    axis, sign = {"above": (1, -1), "below": (1, 1), "left_of": (0, -1), "right_of": (0, 1)}[
        subtype
    ]
    boxes = [o["visible_bbox"] for o in objects]
    return [
        i
        for i in indices
        if i != ref
        and sign * (centroids[i, axis] - centroids[ref, axis]) > 0
        and _overlap(boxes[i], boxes[ref], 1 - axis)
    ]


def test_every_answer_is_unique_in_its_scene(dataset):
    seen, extra_types = set(), set()
    for path, record in all_records(dataset[1].root):
        queries = queries_of(record)
        for query in queries:
            assert satisfying(query) == [query["target"]], path.name
            seen.add(query["query_subtype"])
        # Extra queries ask about other objects than the main query and than each other.
        targets = [query["target"] for query in queries]
        assert len(set(targets)) == len(targets), path.name
        extra_types.update(query["query_type"] for query in queries[1:])
    assert len(seen) >= 12  # 40 images cover many subtypes, each checked above
    assert extra_types == set(QUERY_TYPES)
    stats = dataset[1].stats
    assert 40 < sum(stats[split]["extra_queries"] for split in stats) <= 2 * 40


def test_extra_queries_leave_the_picture_and_the_main_query_unchanged(dataset, tmp_path):
    main(small_config(tmp_path, num_train=0, num_test=0))
    plain, with_extras = tmp_path / "reason_seg" / "ReasonSeg" / "val", dataset[1].root / "val"
    assert sorted(p.name for p in plain.iterdir()) == sorted(p.name for p in with_extras.iterdir())
    for path in plain.glob("*.jpg"):
        assert path.read_bytes() == (with_extras / path.name).read_bytes(), path.name
    counted = 0
    for path in plain.glob("*.json"):
        record = json.loads((with_extras / path.name).read_text())
        counted += len(record.pop("extra_queries", []))
        assert json.loads(path.read_text()) == record, path.name
    assert counted == dataset[1].stats["val"]["extra_queries"] > 0


def test_polygons_mark_exactly_the_visible_target_in_the_picture(dataset):
    root = dataset[1].root
    for path, record in (
        (path, query) for path, scene in all_records(root) for query in queries_of(scene)
    ):
        objects = scene_from_record(record)
        target = record["target"]
        _, visible = render_masks(objects, SIZE, SIZE)
        points = np.concatenate([np.asarray(s["points"]) for s in record["shapes"]])
        assert 0 <= points.min() <= points.max() < SIZE, path.name
        assert all(
            s["label"] == "target" and s["shape_type"] == "polygon" for s in record["shapes"]
        )
        assert (labelme_to_mask(record["shapes"], SIZE, SIZE) == 1).tolist() == visible[
            target
        ].tolist()
        filled = fill_polygons(record["shapes"], SIZE, SIZE) == 1
        iou = (filled & visible[target]).sum() / (filled | visible[target]).sum()
        assert visible[target].sum() > 50, path.name
        assert iou > 0.97, path.name
        assert record["objects"][target]["visible_area"] == int(visible[target].sum())
        # The picture shows the target's colour where the mask is (JPEG and noise aside).
        image = np.asarray(Image.open(path.with_suffix(".jpg")), dtype=np.float32)
        inside = cv2.erode(visible[target].astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        error = np.abs(image[inside].mean(0) - np.asarray(record["objects"][target]["rgb"]))
        assert error.max() < 6, (path.name, error)


def test_ring_hole_is_bridged_into_one_polygon_that_rasterises_exactly():
    ring = SceneObject("ring", "red", (200, 0, 0), 30.0, 30.0, 20.0, 0.0)
    mask = render_masks([ring], 64, 64)[1][0]
    assert (mask[30, 30], mask[30, 14]) == (False, True)  # hole at the centre, band around it
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 1
    shapes = [{"label": "target", "points": p.tolist()} for p in polygons]
    assert np.array_equal(labelme_to_mask(shapes, 64, 64) == 1, mask)


def _scene(*specs):
    objects = [SceneObject(s, c, COLOUR_RGB[c], x, y, r, 0.0) for s, c, x, y, r in specs]
    full, visible = render_masks(objects, 100, 100)
    return objects, measure_objects(full, visible)


def test_candidate_queries_only_offer_unique_answers():
    objects, geometry = _scene(
        ("triangle", "red", 20, 20, 12),
        ("triangle", "red", 80, 20, 12),
        ("circle", "blue", 50, 70, 25),
    )
    colours = candidate_queries("attribute", objects, geometry, 100)
    assert [(q.colour, q.target) for q in colours] == [("blue", 2)]  # two red objects: no query
    geometry_queries = {
        q.subtype: q.target for q in candidate_queries("geometry", objects, geometry, 100)
    }
    assert geometry_queries == {
        "no_corners": 2,
        "solid_round": 2,
    }  # two triangles: no three_corners
    comparison = {q.subtype for q in candidate_queries("comparison", objects, geometry, 100)}
    assert comparison == {"largest"}  # the two triangles tie for smallest
    spatial = {
        (q.subtype, q.target, q.reference)
        for q in candidate_queries("spatial", objects, geometry, 100)
    }
    assert {("leftmost", 0, None), ("rightmost", 1, None), ("bottommost", 2, None)} <= spatial
    assert not any(s[0] == "topmost" for s in spatial)  # the triangles tie
    # Neither triangle can be named uniquely (same shape, same colour), so nothing is "below" one.
    assert not any(s[0] == "below" for s in spatial)
    # Both triangles sit above the circle, so "the object above the circle" is ambiguous.
    assert not any(s[0] == "above" and s[2] == 2 for s in spatial)


def test_generation_of_one_sample_and_bad_config():
    config = small_config("unused")
    sample = generate_sample(np.random.default_rng(0), "spatial", True, config)
    assert sample.image.shape == (SIZE, SIZE, 3)
    assert sample.query.query_type == "spatial"
    assert all(text[-1] in ".?" for text in sample.texts)
    with pytest.raises(ValueError, match="--image_size"):
        main(small_config("unused", image_size=16))
    with pytest.raises(ValueError, match="--max_objects"):
        main(small_config("unused", min_objects=5, max_objects=4))
    with pytest.raises(ValueError, match="--extra_queries"):
        main(small_config("unused", extra_queries=-1))


def test_rerun_replaces_a_split_without_stale_files(tmp_path):
    main(small_config(tmp_path, num_train=0, num_val=7, num_test=0))
    main(small_config(tmp_path, num_train=0, num_val=5, num_test=0))
    val = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    assert sorted(p.name for p in val.glob("*.jpg")) == [f"val_{i:05d}.jpg" for i in range(5)]
    assert not list(val.parent.glob(".*"))  # no partial or stale folders left behind
    assert set(SHAPES) >= {o["shape"] for _, r in records(val.parent, "val") for o in r["objects"]}


def test_real_data_in_the_way_is_never_replaced_without_overwrite(tmp_path):
    val = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    val.mkdir(parents=True)
    (val / "real_0001.json").write_text("{}")  # e.g. the released ReasonSeg val split
    with pytest.raises(FileExistsError, match=f"{val}: not written by prepare_synthetic"):
        main(small_config(tmp_path, num_train=0, num_val=2, num_test=0))
    assert [p.name for p in val.iterdir()] == ["real_0001.json"]
    assert not (val.parent / "synthetic_config.json").exists()
    main(small_config(tmp_path, num_train=0, num_val=2, num_test=0, overwrite=True))
    assert sorted(p.name for p in val.glob("*.jpg")) == ["val_00000.jpg", "val_00001.jpg"]


def test_cli_in_another_process_with_other_hash_seed_writes_the_same_files(dataset, tmp_path):
    root = dataset[1].root
    command = [sys.executable, "-m", "prepare_datasets.prepare_synthetic", "--dataset_dir"]
    command += [str(tmp_path), "--seed", "7", "--num_train", "0", "--num_val", "10"]
    command += ["--num_test", "0", "--image_size", str(SIZE), "--extra_queries", "2"]
    command += ["--no-progress"]
    environment = dict(os.environ, PYTHONHASHSEED="12345")
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "val: 10 images" in done.stdout
    written = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    assert sorted(p.name for p in written.iterdir()) == sorted(
        p.name for p in (root / "val").iterdir()
    )
    for path in written.iterdir():
        assert path.read_bytes() == (root / "val" / path.name).read_bytes(), path.name
