"""ReasonSeg loading, sample encoding and mixing on a native-format fixture."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from model.builder import build_llm_seg, tiny_llm_seg_config
from tests.data_fixtures import write_reason_seg
from utils.data.builders import build_encoder
from utils.data.conversation import CONVERSATION_FORMATS
from utils.data.mixing import (
    MixedTrainingDataset,
    ResumableSampler,
    parse_mixture,
)
from utils.data.reason_seg import (
    ReasonSegSource,
    load_reason_seg_split,
    reason_seg_eval_record,
)
from utils.data.samples import SampleEncoder, collate
from utils.text_files import DatasetFormatError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("rs")
    write_reason_seg(root, "train", 4, seed=0)
    write_reason_seg(root, "val", 2, seed=1)
    return root / "dataset", root / "sam_masks"


@pytest.fixture(scope="module")
def encoder(tiny_checkpoints):
    config = tiny_llm_seg_config(tiny_checkpoints)
    model, tokenizer = build_llm_seg(config)

    class Settings:  # the DataConfig + model fields build_encoder reads
        vision_tower = config.vision_tower
        dino_image_size = config.dino_image_size
        proposal_map_size = config.proposal_map_size
        model_max_length = config.model_max_length
        top_k_proposals = 50
        proposal_order = "area"
        antialias = True
        conv_type = "llava_v1"

    return build_encoder(Settings, tokenizer, model.num_image_tokens), model


def test_items_and_eval_record(dataset):
    items = load_reason_seg_split(*dataset, "train_val")
    assert len(items) == 6
    record = reason_seg_eval_record(items[0])
    assert record.groups == ("long",)  # img_000 has is_sentence true
    (turns,) = record.conversations
    assert turns == [("<image>\n the red object that stands out Please output segmentation mask.",
                      "[SEG].")]  # fmt: skip
    masks = record.masks(48, 56)
    assert masks.shape == (1, 48, 56)
    assert masks.sum() == 14 * 14  # the 14x14 red square, polygon from its corners


def test_encoded_sample_targets_by_hand(dataset, encoder):
    sample_encoder, model = encoder
    items = load_reason_seg_split(*dataset, "val")
    sample = sample_encoder(reason_seg_eval_record(items[0]))
    # proposals: red square, blue square, their union, background; red = the target
    assert sample.proposal_masks.shape == (4, 32, 32)
    assert sample.proposal_ious.shape == (1, 4)
    area = {k: int(sample.proposal_binary[k].sum()) for k in range(4)}
    red = next(k for k in range(4) if sample.proposal_ious[0, k] > 0.99)
    assert area[red] == 196
    for k in range(4):
        inter = float((sample.proposal_binary[k] & sample.proposal_binary[red]).sum())
        expected_iou = inter / (area[k] + 196 - inter)
        assert sample.proposal_ious[0, k].item() == pytest.approx(expected_iou, abs=1e-6)
        assert sample.proposal_iops[0, k].item() == pytest.approx(inter / area[k], abs=1e-6)
    batch, _ = collate([sample], pad_token_id=0)
    assert batch.validate(model.seg_token_id) == [1]


def test_training_records_are_reproducible_and_rank_distinct(dataset, encoder):
    sample_encoder, _ = encoder
    source = ReasonSegSource(load_reason_seg_split(*dataset, "train"), num_queries=3)
    a = MixedTrainingDataset([(source, 1.0)], sample_encoder, length=8, seed=5)
    b = MixedTrainingDataset([(source, 1.0)], sample_encoder, length=8, seed=5)
    for index in range(4):
        sa, sb = a[index], b[index]
        assert sa.record.image_path == sb.record.image_path
        assert [c.input_ids.tolist() for c in sa.conversations] == [
            c.input_ids.tolist() for c in sb.conversations
        ]
        assert len(sa.conversations) == 2  # both texts of the image (3 asked, 2 exist)
    rank0 = list(ResumableSampler(4, rank=0, world_size=2))
    rank1 = list(ResumableSampler(4, rank=1, world_size=2))
    assert rank0 == [0, 2, 4, 6]
    assert rank1 == [1, 3, 5, 7]
    assert list(ResumableSampler(4, rank=1, world_size=2, start=3)) == [7]


def test_extra_queries_give_each_round_its_own_target(dataset, encoder, tmp_path):
    sample_encoder, _ = encoder
    folder = tmp_path / "reason_seg" / "ReasonSeg" / "train"
    folder.mkdir(parents=True)
    src = dataset[0] / "reason_seg" / "ReasonSeg" / "val"
    (folder / "img_000.jpg").write_bytes((src / "img_000.jpg").read_bytes())
    record = json.loads((src / "img_000.json").read_text())
    pixels = np.asarray(Image.open(folder / "img_000.jpg"), dtype=np.int32)
    rows, columns = np.nonzero((pixels[..., 2] > 150) & (pixels[..., 0] < 100))  # blue square
    corners = [[int(columns.min()), int(rows.min())], [int(columns.max()), int(rows.min())]]
    corners += [[int(columns.max()), int(rows.max())], [int(columns.min()), int(rows.max())]]
    blue = {"text": ["blue square"], "is_sentence": False, "shapes": [{"label": "target",
            "points": corners}], "query_type": "attribute"}  # fmt: skip
    record["extra_queries"] = [blue]
    (folder / "img_000.json").write_text(json.dumps(record))
    sam_masks = tmp_path / "sam_masks" / "reason_seg" / "ReasonSeg" / "train"
    sam_masks.parent.mkdir(parents=True)
    sam_masks.symlink_to(dataset[1] / "reason_seg" / "ReasonSeg" / "val")
    (item,) = load_reason_seg_split(tmp_path, tmp_path / "sam_masks", "train")
    assert [q.texts for q in item.extra_queries] == [["blue square"]]
    assert "extra_queries" not in item.extra
    # Evaluation reads the main query only.
    assert reason_seg_eval_record(item).queries == [record["text"][0]]
    evaluated = sample_encoder(reason_seg_eval_record(item))
    red = evaluated.proposal_binary[evaluated.proposal_ious[0].argmax()]
    source = ReasonSegSource([item], num_queries=3)
    for seed in range(4):
        sample = sample_encoder(source.sample_record(random.Random(seed)))
        queries = sample.record.queries
        assert sorted(q in record["text"] for q in queries) == [False, True]  # one of each
        # Each round's best proposal is its own query's square (the red one for the main query).
        best = sample.proposal_ious.argmax(dim=1)
        assert (sample.proposal_ious.max(dim=1).values > 0.9).all()
        main_round = 1 - queries.index("blue square")
        assert torch.equal(sample.proposal_binary[best[main_round]], red)
        assert not torch.equal(sample.proposal_binary[best[1 - main_round]], red)
    # Malformed extra queries are named by file and index.
    record["extra_queries"] = [blue, {"text": ["x"], "is_sentence": True}]
    (folder / "img_000.json").write_text(json.dumps(record))
    with pytest.raises(
        DatasetFormatError, match=r"img_000\.json: extra_queries\[1\]: field 'shapes'"
    ):
        load_reason_seg_split(tmp_path, None, "train")
    bad_points = {**blue, "shapes": [{"label": "target", "points": 3}]}
    for extra, message in (
        ({**blue, "text": 5}, r"extra_queries\[0\]: field 'text' must be a non-empty list"),
        ({**blue, "text": {"a": 1}}, r"extra_queries\[0\]: field 'text' must be a non-empty list"),
        (bad_points, r"extra_queries\[0\]: shapes\[0\]\.points must be a list of \[x, y\]"),
    ):
        record["extra_queries"] = [extra]
        (folder / "img_000.json").write_text(json.dumps(record))
        with pytest.raises(DatasetFormatError, match=r"img_000\.json: " + message):
            load_reason_seg_split(tmp_path, None, "train")
    record["extra_queries"] = {"text": "x"}
    (folder / "img_000.json").write_text(json.dumps(record))
    with pytest.raises(DatasetFormatError, match=r"field 'extra_queries' must be a list"):
        load_reason_seg_split(tmp_path, None, "train")


def test_mixture_parsing_errors():
    assert parse_mixture("a||b", "9,3") == [("a", 0.75), ("b", 0.25)]
    with pytest.raises(ValueError, match="2 families .* 1 rates"):
        parse_mixture("a||b", "9")


def test_malformed_json_names_the_file(dataset, tmp_path):
    folder = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    folder.mkdir(parents=True)
    src = dataset[0] / "reason_seg" / "ReasonSeg" / "val"
    (folder / "img_000.jpg").write_bytes((src / "img_000.jpg").read_bytes())
    (folder / "img_000.json").write_text('{"text": ["x"], "shapes": [')
    with pytest.raises(DatasetFormatError, match=r"img_000\.json: invalid JSON"):
        load_reason_seg_split(tmp_path, dataset[1], "val")
    (folder / "img_000.json").write_text(json.dumps({"text": [], "shapes": [], "is_sentence": 0}))
    with pytest.raises(DatasetFormatError, match=r"img_000\.json: field 'text'"):
        load_reason_seg_split(tmp_path, dataset[1], "val")
    (folder / "img_000.json").unlink()
    with pytest.raises(DatasetFormatError, match=r"1 images without their json .*\(img_000\.jpg\)"):
        load_reason_seg_split(tmp_path, dataset[1], "val")


def test_training_skips_unusable_images_and_counts_them(dataset, encoder, tmp_path, caplog):
    sample_encoder, _ = encoder
    items = load_reason_seg_split(*dataset, "train")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")
    items[0].image_path = broken  # unreadable
    items[1].image_path = items[1].image_path.with_name("not_in_store.jpg")
    items[1].image_path.write_bytes(items[2].image_path.read_bytes())
    source = ReasonSegSource(items)
    train = MixedTrainingDataset([(source, 1.0)], sample_encoder, length=16, seed=0)
    names = {train[i].record.image_path.name for i in range(16)}
    assert names <= {"img_002.jpg", "img_003.jpg"}
    assert train.skipped["unreadable image"] > 0
    assert train.skipped["not in the proposal store"] > 0
    assert "broken.jpg" in caplog.text
    items[1].image_path.unlink()


def test_overlong_conversations_are_dropped_not_cut(dataset, encoder):
    sample_encoder, _ = encoder
    short = SampleEncoder(
        sample_encoder.tokenizer,
        CONVERSATION_FORMATS["llava_v1"],
        type(sample_encoder.settings)(**{**vars(sample_encoder.settings), "model_max_length": 20}),
    )
    items = load_reason_seg_split(*dataset, "val")
    assert short(reason_seg_eval_record(items[0])) is None
    assert short.num_dropped == 1
