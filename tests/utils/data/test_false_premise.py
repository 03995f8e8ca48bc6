"""False-premise refer_seg training samples (``--false_premise_fraction``) on a refCOCO-format
fixture whose images hold different categories."""

import json
import pickle
import random
from types import SimpleNamespace

import numpy as np
import pytest

from tests.utils.data.loader_fixtures import (
    HEIGHT,
    WIDTH,
    box,
    polygon,
    write_image,
    write_store,
)
from tests.utils.data.test_sem_seg import asked_name
from utils.data.builders import TRAIN_SOURCES
from utils.data.conversation import ANSWER_TEMPLATES, SHORT_QUESTION_TEMPLATES
from utils.data.refer_seg import ReferSegSource, load_refer_split
from utils.data.rejection import REJECTION_SENTENCE

PERSON, DOG, CAR, CAT = 1, 2, 3, 4
# image id -> annotations (id, category, box); only some are referred to
ANNOTATIONS = {
    1: [(101, PERSON, (0, 0, 10, 10)), (102, DOG, (20, 0, 30, 10))],
    2: [(201, CAR, (5, 5, 25, 15))],
    3: [(301, PERSON, (0, 10, 10, 20)), (302, CAT, (20, 10, 30, 20))],  # the cat is not referred
    4: [(401, CAT, (10, 0, 20, 20))],
}
# ref: (image id, annotation id, sentences)
REFS = [
    (1, 101, ["man on the left", "person"]),
    (1, 102, ["dog on the right"]),
    (2, 201, ["red car", "the car"]),
    (3, 301, ["woman"]),
    (4, 401, ["the cat", "kitten"]),
]
CATEGORY_OF = {
    s: next(c for a, c, _ in ANNOTATIONS[i] if a == ann) for i, ann, ss in REFS for s in ss
}
MASK_OF = {
    s: box(*next(b for a, _, b in ANNOTATIONS[i] if a == ann)) for i, ann, ss in REFS for s in ss
}


def file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


@pytest.fixture
def refer(tmp_path):
    root, masks = tmp_path / "dataset", tmp_path / "sam_masks"
    for image_id in ANNOTATIONS:
        write_image(root / "refer_seg/images/mscoco/images/train2014" / file_name(image_id))
    instances = {
        "images": [{"id": i, "file_name": file_name(i), "height": HEIGHT, "width": WIDTH}
                   for i in ANNOTATIONS],
        "annotations": [{"id": a, "image_id": i, "category_id": c, "segmentation": [polygon(*b)]}
                        for i, anns in ANNOTATIONS.items() for a, c, b in anns],
        "categories": [{"id": c, "name": n} for c, n in
                       ((PERSON, "person"), (DOG, "dog"), (CAR, "car"), (CAT, "cat"))],
    }  # fmt: skip
    refs = [
        {"ref_id": k, "ann_id": ann, "image_id": i, "split": "train",
         "sentences": [{"sent": s, "sent_id": 10 * k + j} for j, s in enumerate(sentences)]}
        for k, (i, ann, sentences) in enumerate(REFS)
    ]  # fmt: skip
    folder = root / "refer_seg/refcoco"
    folder.mkdir(parents=True)
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    write_store(masks / "coco2014", {file_name(i): 2 for i in ANNOTATIONS})
    return root, masks


def test_categories_come_from_every_annotation_of_the_image(refer):
    images = load_refer_split(*refer, "refcoco", "train")
    assert [sorted(i.categories) for i in images] == [[1, 2], [3], [1, 4], [4]]
    assert images[0].sentence_categories == [PERSON, PERSON, DOG]


def test_replaced_queries_name_absent_categories_at_the_asked_rate(refer):
    images = load_refer_split(*refer, "refcoco", "train")
    source = ReferSegSource({"refcoco": images}, num_sentences=3, false_premise_fraction=0.4)
    own = {i.image_path.name: set(i.sentences) for i in images}
    annotated = {file_name(i): {c for _, c, _ in anns} for i, anns in ANNOTATIONS.items()}
    rounds = rejected = 0
    for seed in range(300):
        record = source.sample_record(random.Random(seed))
        masks = record.masks(HEIGHT, WIDTH)
        targets = []
        for query, ((question, answer),) in zip(record.queries, record.conversations):
            assert asked_name(question) == query.lower()
            rounds += 1
            if answer == REJECTION_SENTENCE:
                rejected += 1
                # from another image, of a category annotated nowhere in this one
                assert query not in own[record.image_path.name]
                assert CATEGORY_OF[query] not in annotated[record.image_path.name], query
            else:
                assert "[SEG]" in answer
                assert query in own[record.image_path.name]
                targets.append(query)
        assert len(masks) == len(targets)  # one row per [SEG], none for a rejection
        for query, mask in zip(targets, masks):
            assert np.array_equal(mask, MASK_OF[query])
        assert record.no_target is None
    assert rounds > 500
    assert abs(rejected / rounds - 0.4) < 0.06
    # deterministic for a seeded rng
    first, again = (source.sample_record(random.Random(7)) for _ in range(2))
    assert (first.queries, first.conversations) == (again.queries, again.conversations)


def test_fraction_zero_draws_as_before(refer):
    """At 0 the samples are exactly those of the algorithm before the option (replayed here)."""
    images = load_refer_split(*refer, "refcoco", "train")
    source = ReferSegSource({"refcoco": images}, num_sentences=2, false_premise_fraction=0.0)
    for seed in range(20):
        record = source.sample_record(random.Random(seed))
        rng = random.Random(seed)
        rng.randrange(1)  # the dataset
        image = images[rng.randrange(len(images))]
        rows = rng.sample(range(len(image.sentences)), min(2, len(image.sentences)))
        expected = []
        for row in rows:
            text = image.sentences[row].lower()
            expected.append([(rng.choice(SHORT_QUESTION_TEMPLATES).format(class_name=text),
                              rng.choice(ANSWER_TEMPLATES))])  # fmt: skip
        assert record.conversations == expected


def test_flag_reaches_the_source_and_bad_values_name_it(refer):
    config = SimpleNamespace(dataset_dir=refer[0], sam_masks_dir=refer[1],
                             refer_seg_data="refcoco", num_classes_per_sample=3,
                             false_premise_fraction=0.25)  # fmt: skip
    assert TRAIN_SOURCES["refer_seg"](config).false_premise_fraction == 0.25
    images = load_refer_split(*refer, "refcoco", "train")
    with pytest.raises(ValueError, match=r"--false_premise_fraction must be in \[0, 1\], got 1.5"):
        ReferSegSource({"refcoco": images}, false_premise_fraction=1.5)
