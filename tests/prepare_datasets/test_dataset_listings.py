"""Which images each prepare script lists, under which keys, and the report's ground truth."""

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from prepare_datasets import (
    prepare_ego_objects,
    prepare_mapillary,
    prepare_reason_seg,
    prepare_refclef,
    prepare_voc2010,
)
from tests.prepare_datasets.fixtures import write_image
from utils.config import parse_config
from utils.masks import encode_rles


def keys(jobs):
    return [sorted(item.key for item in job.images) for job in jobs]


def test_shared_cli_flags():
    config = parse_config(
        prepare_reason_seg.ReasonSegPrepareConfig,
        [
            "--dataset_dir", "/data", "--sam_masks_dir", "/out", "--vision_pretrained", "sam.pth",
            "--model_type", "vit_l", "--device", "cpu", "--num_shards", "4", "--shard_id", "3",
            "--limit", "5", "--splits", "val", "--no-fsync", "--pred_iou_thresh", "0.8",
        ],
    )  # fmt: skip
    assert (config.model_type, config.num_shards, config.shard_id, config.limit) == (
        "vit_l", 4, 3, 5,
    )  # fmt: skip
    assert config.fsync is False
    assert config.pred_iou_thresh == 0.8
    defaults = prepare_reason_seg.ReasonSegPrepareConfig()
    assert (defaults.points_per_side, defaults.pred_iou_thresh) == (32, 0.88)
    assert (defaults.stability_score_thresh, defaults.box_nms_thresh) == (0.95, 0.7)
    assert defaults.max_side == 1024
    with pytest.raises(SystemExit):
        parse_config(prepare_reason_seg.ReasonSegPrepareConfig, ["--model_type", "vit_x"])


def test_missing_folder_is_named(tmp_path):
    config = prepare_reason_seg.ReasonSegPrepareConfig(dataset_dir=str(tmp_path), splits="val")
    with pytest.raises(FileNotFoundError, match="ReasonSeg/val does not exist"):
        prepare_reason_seg.split_jobs(config)


def test_refclef_keys_are_folder_relative(tmp_path):
    root = tmp_path / "saiapr"
    for rel in ("00/images/1.jpg", "25/images/25677.jpg"):
        write_image(root / "refer_seg/images/saiapr_tc-12" / rel)
    config = prepare_refclef.RefClefPrepareConfig(dataset_dir=str(root))
    jobs = prepare_refclef.split_jobs(config)
    assert jobs[0].store_dir == "saiapr"
    assert keys(jobs) == [["00/images/1.jpg", "25/images/25677.jpg"]]
    folder = root / "refer_seg/refclef"
    folder.mkdir(parents=True)
    image = {"id": 3, "file_name": "25/images/25677.jpg", "height": 10, "width": 10}
    ann = {"id": 1, "image_id": 3, "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]}
    (folder / "instances.json").write_text(json.dumps({"images": [image], "annotations": [ann]}))
    refs = [{"ann_id": 1, "image_id": 3, "split": "val", "sentences": []}]
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs))
    (target,) = list(prepare_refclef.iter_targets(config))
    assert target.key == "25/images/25677.jpg"
    assert target.masks.sum() == 16


def test_voc2010_uses_pascal_part_images_unless_all(tmp_path):
    folder = tmp_path / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages"
    for name in ("2008_000001.jpg", "2008_000002.jpg"):
        write_image(folder / name)
    config = prepare_voc2010.Voc2010PrepareConfig(dataset_dir=str(tmp_path))
    assert keys(prepare_voc2010.split_jobs(config)) == [["2008_000001.jpg", "2008_000002.jpg"]]
    image = {"id": 1, "file_name": "2008_000002.jpg", "height": 24, "width": 32}
    ann = {"id": 5, "image_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]}
    (tmp_path / "vlpart/pascal_part/train.json").write_text(
        json.dumps({"images": [image], "annotations": [ann]})
    )
    assert keys(prepare_voc2010.split_jobs(config)) == [["2008_000002.jpg"]]
    config.all_images = True
    assert len(keys(prepare_voc2010.split_jobs(config))[0]) == 2
    (target,) = list(prepare_voc2010.iter_targets(config))
    assert target.store_dir == "voc2010"
    assert target.masks.shape == (1, 24, 32)


def test_mapillary_targets_skip_unlabeled(tmp_path):
    root = tmp_path / "mapillary"
    write_image(root / "training/images/abc.jpg", 10, 12)
    label = np.zeros((10, 12), np.uint8)
    label[:5] = 1
    label[5:, :6] = 2  # "unlabeled" in the config
    (root / "training/v2.0/labels").mkdir(parents=True)
    Image.fromarray(label).save(root / "training/v2.0/labels/abc.png")
    labels = [
        {"name": "animal--bird"},
        {"name": "construction--barrier"},
        {"name": "void--unlabeled"},
    ]
    (root / "config_v2.0.json").write_text(json.dumps({"labels": labels}))
    config = prepare_mapillary.MapillaryPrepareConfig(dataset_dir=str(tmp_path))
    assert keys(prepare_mapillary.split_jobs(config)) == [["abc.jpg"]]
    (target,) = list(prepare_mapillary.iter_targets(config))
    assert target.masks.shape == (2, 10, 12)  # classes 0 and 1; 2 is unlabeled
    assert target.masks[1].sum() == 60


def test_ego_objects_from_llmseg40k_splits(tmp_path):
    images = tmp_path / "ego_objects/images"
    for name in ("e1.jpg", "e2.jpg", "c1.jpg"):
        write_image(images / name, 6, 8)
    config = prepare_ego_objects.EgoObjectsPrepareConfig(dataset_dir=str(tmp_path))
    assert keys(prepare_ego_objects.split_jobs(config)) == [["c1.jpg", "e1.jpg", "e2.jpg"]]
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:6] = True
    rle = {"size": [6, 8], "counts": encode_rles(mask[None])[0].decode()}
    split = {
        "e1.jpg": {"from_dataset": "ego_objects", "qa_pairs": [{"question": "q", "rle_seg": rle}]},
        "c1.jpg": {"from_dataset": "coco", "qa_pairs": []},
    }
    (tmp_path / "LLM-Seg40K").mkdir()
    (tmp_path / "LLM-Seg40K/validation.json").write_text(json.dumps(split))
    assert keys(prepare_ego_objects.split_jobs(config)) == [["e1.jpg"]]
    (target,) = list(prepare_ego_objects.iter_targets(config))
    assert target.masks.sum() == 8
