"""Tiny native-format datasets for the loader tests, with masks simple enough to check by hand.

Images are random pixels (their content does not matter to a loader); targets are axis-aligned
boxes. COCO polygons ``[x0, y0, x1, y0, x1, y1, x0, y1]`` rasterise (pycocotools) to pixels
``x0 <= x < x1``, ``y0 <= y < y1``, so :func:`box` gives the expected mask of :func:`polygon`.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from tests.data_fixtures import proposals_from_masks
from utils.proposal_store import H5StoreWriter, ImageProposals, name_sort_key

HEIGHT, WIDTH = 20, 30


def write_image(path: Path, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_png(path: Path, array: np.ndarray, palette: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette:
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    image.save(path)
    return path


def box(x0: int, y0: int, x1: int, y1: int, height: int = HEIGHT, width: int = WIDTH):
    """``(H, W)`` uint8 mask of pixels ``x0 <= x < x1``, ``y0 <= y < y1``."""
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def polygon(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rle(mask: np.ndarray) -> dict:
    """A COCO compressed RLE with ``str`` counts (as json files hold it)."""
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode("ascii")}


def write_store(store_dir: Path, images: dict[str, int | np.ndarray]) -> None:
    """A proposal store: per key, ``(K, H, W)`` masks, or an int K for K full-image proposals
    of the default size (0 gives an image with zero proposals)."""
    with H5StoreWriter(store_dir / "masks.h5") as writer:
        for key in sorted(images, key=name_sort_key):
            value = images[key]
            if isinstance(value, int) and value == 0:
                writer.add(key, ImageProposals.empty(HEIGHT, WIDTH))
                continue
            if isinstance(value, int):
                value = np.ones((value, HEIGHT, WIDTH), bool)
            writer.add(key, proposals_from_masks(np.asarray(value, bool)))


def write_ade20k(root: Path, masks_dir: Path) -> dict[str, np.ndarray]:
    """Four ADE20K images: ``a`` (wall + sky + unlabelled), ``b`` (only unlabelled), ``c``
    (label PNG missing), ``d`` (not in the store). Returns the raw label maps."""
    labels = {}
    raw = np.zeros((HEIGHT, WIDTH), np.uint8)
    raw[:10] = 1  # wall (class 0)
    raw[10:, :15] = 3  # sky (class 2); the rest stays 0 = unlabelled
    labels["a"] = raw
    labels["b"] = np.zeros((HEIGHT, WIDTH), np.uint8)
    for index, name in enumerate("abcd"):
        write_image(root / "ade20k/images/training" / f"{name}.jpg", seed=index)
        if name in labels:
            write_png(root / "ade20k/annotations/training" / f"{name}.png", labels[name])
    write_png(root / "ade20k/annotations/training/d.png", labels["a"])
    write_store(masks_dir / "ade20k", {"a.jpg": 2, "b.jpg": 2, "c.jpg": 2})
    return labels


def write_cocostuff(root: Path, masks_dir: Path) -> np.ndarray:
    """One COCO-Stuff image: person (0), building-other (95, has '-'), tree (168), 255."""
    raw = np.full((HEIGHT, WIDTH), 255, np.uint8)
    raw[:5] = 0
    raw[5:10] = 95
    raw[10:15] = 168
    write_png(root / "cocostuff/train2017/000000000009.png", raw)
    write_image(root / "coco/train2017/000000000009.jpg")
    write_store(masks_dir / "coco2017", {"000000000009.jpg": 3})
    return raw


MAPILLARY_LABELS = [
    {"name": "construction--flat--curb", "readable": "Curb"},
    {"name": "nature--sky", "readable": "Sky"},
    {"name": "void--unlabeled", "readable": "Unlabeled"},
]


def write_mapillary(root: Path, masks_dir: Path) -> np.ndarray:
    """One Mapillary image with a palette label PNG: curb (0), sky (1), unlabeled (2)."""
    folder = root / "mapillary"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config_v2.0.json").write_text(json.dumps({"labels": MAPILLARY_LABELS}))
    raw = np.full((HEIGHT, WIDTH), 2, np.uint8)
    raw[:, :10] = 0
    raw[:, 10:20] = 1
    write_png(folder / "training/v2.0/labels/street.png", raw, palette=True)
    write_image(folder / "training/images/street.jpg")
    write_store(masks_dir / "mapillary", {"street.jpg": 2})
    return raw


def write_part_json(path: Path, file_name: str, categories: list[dict], boxes: list) -> None:
    """A COCO-format part json: one image, an annotation per ``(category_id, box)``."""
    annotations = [
        {"id": i + 1, "image_id": 1, "category_id": c, "segmentation": [polygon(*b)], "area": 1}
        for i, (c, b) in enumerate(boxes)
    ]
    data = {
        "images": [{"id": 1, "file_name": file_name, "height": HEIGHT, "width": WIDTH},
                   {"id": 2, "file_name": "unannotated.jpg", "height": HEIGHT, "width": WIDTH}],
        "annotations": annotations,
        "categories": categories,
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


PACO_BOXES = [(1, (0, 0, 10, 10)), (2, (10, 5, 30, 20))]
PASCAL_BOXES = [(5, (2, 3, 12, 8))]


def write_paco_lvis(root: Path, masks_dir: Path, store: bool = True) -> None:
    categories = [{"id": 1, "name": "car_(automobile):wheel"}, {"id": 2, "name": "trash_can"}]
    write_part_json(
        root / "vlpart/paco/annotations/paco_lvis_v1_train.json",
        "train2017/000000000042.jpg", categories, PACO_BOXES,
    )  # fmt: skip
    write_image(root / "coco/train2017/000000000042.jpg")
    if store:
        write_store(masks_dir / "coco2017", {"000000000042.jpg": 2})


def write_pascal_part(root: Path, masks_dir: Path) -> None:
    folder = root / "vlpart/pascal_part"
    write_part_json(folder / "train.json", "2008_000001.jpg", [{"id": 5, "name": "dog:head"}],
                    PASCAL_BOXES)  # fmt: skip
    write_image(folder / "VOCdevkit/VOC2010/JPEGImages/2008_000001.jpg")
    write_store(masks_dir / "voc2010", {"2008_000001.jpg": 2})


def write_refer(root: Path, masks_dir: Path, name: str = "refcoco", split_by: str = "unc"):
    """refCOCO-style: image 1 (train) with refs 10 (ann 7: left box, two sentences) and 11
    (ann 8: two overlapping polygons, right part); image 2 (val) with ref 12 (ann 9: RLE)."""
    images_dir = root / "refer_seg/images/mscoco/images/train2014"
    files = {1: "COCO_train2014_000000000001.jpg", 2: "COCO_train2014_000000000002.jpg"}
    for image_id, file_name in files.items():
        write_image(images_dir / file_name, seed=image_id)
    annotations = [
        {"id": 7, "image_id": 1, "category_id": 1, "segmentation": [polygon(0, 0, 10, 10)]},
        {"id": 8, "image_id": 1, "category_id": 1,
         "segmentation": [polygon(10, 0, 20, 10), polygon(15, 5, 30, 20)]},
        {"id": 9, "image_id": 2, "category_id": 1, "segmentation": rle(box(5, 5, 25, 15))},
    ]  # fmt: skip
    instances = {
        "images": [{"id": i, "file_name": f, "height": HEIGHT, "width": WIDTH}
                   for i, f in files.items()],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "box"}],
    }  # fmt: skip
    refs = [
        {"ref_id": 10, "ann_id": 7, "image_id": 1, "split": "train",
         "sentences": [{"sent": "The Left Box ", "sent_id": 21},
                       {"sent": "box on the left", "sent_id": 22}]},
        {"ref_id": 11, "ann_id": 8, "image_id": 1, "split": "train",
         "sentences": [{"sent": "right shape", "sent_id": 23}]},
        {"ref_id": 12, "ann_id": 9, "image_id": 2, "split": "val",
         "sentences": [{"sent": "Middle Strip", "sent_id": 31},
                       {"sent": "the strip", "sent_id": 32}]},
    ]  # fmt: skip
    folder = root / "refer_seg" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=2))
    write_store(masks_dir / "coco2014", {f: 2 for f in files.values()})


def refer_expected_masks() -> dict[str, np.ndarray]:
    """Sentence -> expected mask of :func:`write_refer`."""
    left, strip = box(0, 0, 10, 10), box(5, 5, 25, 15)
    right = np.maximum(box(10, 0, 20, 10), box(15, 5, 30, 20))
    return {"The Left Box": left, "box on the left": left, "right shape": right,
            "Middle Strip": strip, "the strip": strip}  # fmt: skip


def write_refclef(root: Path, masks_dir: Path) -> None:
    """refCLEF: one SAIAPR image ``25/images/25001.jpg`` with one train ref."""
    file_name = "25/images/25001.jpg"
    write_image(root / "refer_seg/images/saiapr_tc-12" / file_name)
    folder = root / "refer_seg/refclef"
    folder.mkdir(parents=True, exist_ok=True)
    instances = {
        "images": [{"id": 25001, "file_name": file_name, "height": HEIGHT, "width": WIDTH}],
        "annotations": [{"id": 1, "image_id": 25001, "segmentation": [polygon(0, 10, 30, 20)]}],
    }
    refs = [{"ann_id": 1, "image_id": 25001, "split": "train", "sentences": [{"sent": "sky"}]}]
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs))
    write_store(masks_dir / "saiapr", {file_name: 2})


def write_vqa(root: Path, entries: list[dict] | None = None) -> list[dict]:
    """``llava_dataset/llava_instruct_150k.json`` with COCO images for every entry."""
    entries = entries if entries is not None else [
        {"id": "1", "image": "000000000101.jpg", "conversations": [
            {"from": "human", "value": "What colour is it?\n<image>"},
            {"from": "gpt", "value": "It is grey."},
            {"from": "human", "value": "Why?"},
            {"from": "gpt", "value": "Random pixels."},
        ]},
        {"id": "2", "image": "000000000102.jpg", "conversations": [
            {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": "Noise."},
            {"from": "human", "value": "Unanswered?"},
        ]},
    ]  # fmt: skip
    for index, entry in enumerate(entries):
        write_image(root / "coco/train2017" / entry["image"], seed=100 + index)
    path = root / "llava_dataset/llava_instruct_150k.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))
    return entries


def write_llmseg40k(root: Path, masks_dir: Path) -> dict[str, np.ndarray]:
    """LLM-Seg40K splits: train (a COCO image with an RLE and a PNG target, an EgoObjects image
    with an RLE), validation (PNG targets next to the json), test (RLE). Returns the expected
    masks by record name."""
    folder = root / "LLM-Seg40K"
    coco, ego = "000000000042.jpg", "ego_0001.jpg"
    write_image(root / "coco/train2017" / coco)
    write_image(root / "ego_objects/images" / ego, seed=3)
    masks = {"000000000042_0": box(0, 0, 10, 10), "000000000042_1": box(5, 5, 20, 15),
             "ego_0001_0": box(20, 0, 30, 20)}  # fmt: skip
    write_png(root / "llmseg_masks/q1.png", masks["000000000042_1"] * 255)
    train = {
        coco: {"from_dataset": "coco", "qa_pairs": [
            {"question": "Which part holds the cup?", "answer": "x",
             "rle_seg": rle(masks["000000000042_0"])},
            {"question": "Where would you sit?", "answer": "y",
             "segmentation_path": "llmseg_masks/q1.png"},
        ]},
        ego: {"from_dataset": "ego_objects", "qa_pairs": [
            {"question": "What can be opened?", "answer": "z",
             "rle_seg": rle(masks["ego_0001_0"])},
        ]},
    }  # fmt: skip
    write_png(folder / "val_masks/v.png", masks["000000000042_1"] * 7)
    validation = {coco: {"from_dataset": "coco", "qa_pairs": [
        {"question": "Where would you sit?", "answer": "", "segmentation_path": "val_masks/v.png"},
    ]}}  # fmt: skip
    test = {ego: train[ego]}
    folder.mkdir(parents=True, exist_ok=True)
    for split, data in (("train", train), ("validation", validation), ("test", test)):
        (folder / f"{split}.json").write_text(json.dumps(data))
    write_store(masks_dir / "coco2017", {coco: 2})
    write_store(masks_dir / "ego_objects", {ego: 2})
    return masks
