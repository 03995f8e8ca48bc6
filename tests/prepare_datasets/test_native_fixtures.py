"""Native-format fixtures run through prepare -> h5 -> json -> reader, targets checked by hand."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from prepare_datasets import (
    prepare_ade20k,
    prepare_coco2017,
    prepare_reason_seg,
    prepare_refcoco,
)
from prepare_datasets.convert_h5_to_json import ConvertConfig
from prepare_datasets.convert_h5_to_json import main as convert_main
from prepare_datasets.proposals.runner import run_prepare
from tests.prepare_datasets.fixtures import BoxGenerator, write_image
from utils.masks import encode_rles
from utils.proposal_store import ProposalReader, build_proposal_sample
from utils.text_files import DatasetFormatError

# Proposals (besides the whole image, index 0) are these inclusive boxes x0, y0, x1, y1.
BOXES = [(10, 5, 29, 24), (10, 5, 19, 24)]


def run_and_convert(module, config, tmp_path):
    summaries = run_prepare(config, module.split_jobs(config), generator=BoxGenerator(BOXES))
    assert all(s.merged and not s.failures for s in summaries)
    convert_main(ConvertConfig(sam_masks_dir=config.sam_masks_dir))
    return summaries


def both_readers(store_dir):
    h5, js = ProposalReader(store_dir / "masks.h5"), ProposalReader(store_dir / "masks.json")
    assert h5.names() == sorted(js.names())
    return h5, js


def check_targets(readers, key, gt, expected_iou, expected_iop, top_k=50):
    for reader in readers:
        sample = build_proposal_sample(reader.get(key), gt, top_k=top_k)
        assert torch.allclose(sample.iou, torch.tensor(expected_iou), atol=1e-6)
        assert torch.allclose(sample.iop, torch.tensor(expected_iop), atol=1e-6)
        assert sample.weight_maps.shape == (sample.masks.shape[0], 256, 256)


def test_reason_seg_labelme(tmp_path):
    root = tmp_path / "dataset"
    folder = root / "reason_seg/ReasonSeg/val"
    write_image(folder / "a.jpg", height=40, width=60)
    shapes = [
        {"label": "target", "points": [[10, 5], [29, 5], [29, 24], [10, 24]]},  # 400 px
        {"label": "ignore", "points": [[20, 15], [29, 15], [29, 24], [20, 24]]},  # 100 px inside
        {"label": "flag", "points": [[0, 0], [5, 0], [5, 5]]},
    ]
    (folder / "a.json").write_text(
        json.dumps({"text": ["x"], "is_sentence": True, "shapes": shapes})
    )
    config = prepare_reason_seg.ReasonSegPrepareConfig(
        dataset_dir=str(root), sam_masks_dir=str(tmp_path / "masks"), splits="val", fsync=False
    )
    run_and_convert(prepare_reason_seg, config, tmp_path)
    readers = both_readers(tmp_path / "masks/reason_seg/ReasonSeg/val")
    (target,) = list(prepare_reason_seg.iter_targets(config))
    assert target.key == "a.jpg"
    assert (target.masks == 1).sum() == 300
    assert (target.masks == 255).sum() == 100
    # Area order: whole image (2400 px), the target box (400), its left half (200, all target).
    check_targets(
        readers,
        "a.jpg",
        target.masks,
        [[300 / 2400, 300 / 400, 200 / 300]],
        [[300 / 2400, 300 / 400, 1.0]],
    )
    check_targets(
        readers,
        "a.jpg",
        target.masks,
        [[300 / 2400, 300 / 400]],
        [[300 / 2400, 300 / 400]],
        top_k=2,
    )


def test_refcoco_refs_pickle_and_instances(tmp_path):
    root = tmp_path / "dataset"
    images = root / "refer_seg/images/mscoco/images/train2014"
    used, unused = "COCO_train2014_000000000001.jpg", "COCO_train2014_000000000002.jpg"
    write_image(images / used, height=50, width=80)
    write_image(images / unused, height=50, width=80)
    for name in ("refcoco", "refcoco+"):
        folder = root / "refer_seg" / name
        folder.mkdir(parents=True)
        instances = {
            "images": [{"id": 1, "file_name": used, "height": 50, "width": 80}],
            "annotations": [
                {
                    "id": 7,
                    "image_id": 1,
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]],
                }
            ],  # x10-29 y5-24
            "categories": [{"id": 1, "name": "box"}],
        }
        (folder / "instances.json").write_text(json.dumps(instances))
        refs = [
            {
                "ref_id": 0,
                "ann_id": 7,
                "image_id": 1,
                "split": "val",
                "category_id": 1,
                "file_name": "COCO_train2014_000000000001_7.jpg",
                "sentences": [{"sent": "the box on the left"}],
            }
        ]
        (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    config = prepare_refcoco.RefCocoPrepareConfig(
        dataset_dir=str(root),
        sam_masks_dir=str(tmp_path / "masks"),
        refer_datasets="refcoco,refcoco+",
        fsync=False,
    )
    run_and_convert(prepare_refcoco, config, tmp_path)
    readers = both_readers(tmp_path / "masks/coco2014")
    assert readers[0].names() == [used]  # the unreferenced image is not processed
    targets = list(prepare_refcoco.iter_targets(config))
    assert len(targets) == 2  # one per refer dataset
    assert targets[0].masks.sum() == 400
    check_targets(
        readers, used, targets[0].masks, [[400 / 4000, 1.0, 0.5]], [[400 / 4000, 1.0, 1.0]]
    )


def test_refs_pickle_with_code_is_refused(tmp_path):
    folder = tmp_path / "refer_seg/refcoco"
    folder.mkdir(parents=True)
    (folder / "refs(unc).p").write_bytes(pickle.dumps([np.float64(1.0)]))
    (folder / "instances.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetFormatError, match=r"refs pickle \(refusing to load numpy"):
        prepare_refcoco.load_refer(tmp_path, "refcoco")


def test_ade20k_image_annotation_pair(tmp_path):
    root = tmp_path / "dataset"
    write_image(root / "ade20k/images/training/ADE_train_00000001.jpg", height=30, width=40)
    label = np.zeros((30, 40), np.uint8)
    label[5:25, 10:30] = 12  # exactly proposal 1 (the box x10-29, y5-24)
    label[5:25, 10:20] = 3  # exactly proposal 2, cut out of class 12
    ann = root / "ade20k/annotations/training"
    ann.mkdir(parents=True)
    Image.fromarray(label).save(ann / "ADE_train_00000001.png")
    config = prepare_ade20k.Ade20kPrepareConfig(
        dataset_dir=str(root), sam_masks_dir=str(tmp_path / "masks"), fsync=False
    )
    run_and_convert(prepare_ade20k, config, tmp_path)
    readers = both_readers(tmp_path / "masks/ade20k")
    (target,) = list(prepare_ade20k.iter_targets(config))
    assert target.masks.shape == (2, 30, 40)  # classes 3 and 12; 0 is not a target
    # Proposals by area: image (1200), box (400), left half (200).
    check_targets(
        readers,
        "ADE_train_00000001.jpg",
        target.masks,
        [[200 / 1200, 200 / 400, 1.0], [200 / 1200, 200 / 400, 0.0]],
        [[200 / 1200, 0.5, 1.0], [200 / 1200, 0.5, 0.0]],
    )


def test_coco_instances_file(tmp_path):
    root = tmp_path / "dataset"
    images = root / "coco/train2017"
    write_image(images / "000000000009.jpg", height=30, width=40)
    write_image(images / "000000000010.jpg", height=30, width=40)
    mask = np.zeros((30, 40), bool)
    mask[5:25, 20:30] = True  # the right half of the box proposal
    rle = {"size": [30, 40], "counts": encode_rles(mask[None])[0].decode()}
    instances = {
        "images": [{"id": 9, "file_name": "000000000009.jpg", "height": 30, "width": 40}],
        "annotations": [
            {"id": 1, "image_id": 9, "category_id": 2, "segmentation": rle, "iscrowd": 0}
        ],
    }
    (root / "paco.json").write_text(json.dumps(instances))
    config = prepare_coco2017.Coco2017PrepareConfig(
        dataset_dir=str(root),
        sam_masks_dir=str(tmp_path / "masks"),
        annotation_files="paco.json",
        fsync=False,
    )
    run_and_convert(prepare_coco2017, config, tmp_path)
    readers = both_readers(tmp_path / "masks/coco2017")
    assert readers[0].names() == ["000000000009.jpg"]
    (target,) = list(prepare_coco2017.iter_targets(config))
    check_targets(
        readers,
        "000000000009.jpg",
        target.masks,
        [[200 / 1200, 0.5, 0.0]],
        [[200 / 1200, 0.5, 0.0]],
    )


def test_json_records_follow_upstream_schema(tmp_path):
    root = tmp_path / "dataset"
    write_image(root / "ade20k/images/training/x.jpg", height=12, width=16)
    config = prepare_ade20k.Ade20kPrepareConfig(
        dataset_dir=str(root), sam_masks_dir=str(tmp_path / "masks"), fsync=False
    )
    run_and_convert(prepare_ade20k, config, tmp_path)
    (record,) = json.loads((tmp_path / "masks/ade20k/masks.json").read_text())
    assert record["image"] == "x.jpg"
    assert record["target_size"] == [12, 16]
    first = record["masks"][0]
    assert set(first) == {
        "segmentation",
        "area",
        "bbox",
        "predicted_iou",
        "point_coords",
        "stability_score",
        "crop_box",
    }
    assert first["segmentation"]["size"] == [12, 16]
    assert isinstance(first["segmentation"]["counts"], str)
    assert first["area"] == 192
    assert first["crop_box"] == [0, 0, 16, 12]
    assert len(first["point_coords"]) == 1
