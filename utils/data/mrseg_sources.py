"""Where the masks and images of SegLLM's MRSeg tags are: annotation sources and image paths.

A tag's ``<dataset>`` field is a key of :data:`ANNOTATION_FILES` (upstream's registry,
``register_dataset.py``); the mask id is looked up in that key's file, in either of the two
forms the released files have:

- COCO format (``{"images": [...], "annotations": [...]}``: refCOCO/+/g, PACO-LVIS, LVIS): the
  id is the annotation ``id``; the annotation must belong to the conversation's image (its
  image's ``file_name``, or the basename of ``coco_url`` as in LVIS v1, which has no
  ``file_name``); the size is the image record's ``height`` x ``width``;
- a JSON object ``key -> COCO RLE`` (``{"size": [H, W], "counts": str | list}``, or a list of
  them, merged; Visual Genome, PASCAL Panoptic Parts): the id is the key (``str(mask_id)``);
  the size is the RLE's. Nothing in the file ties a key to an image, so only the size is
  checked against the image (when the masks are drawn).

Which form a file has is read from the file, not from the key: upstream registers
``pascal_labels_val.json`` as its ``pascal_eval`` entry but loads that copy with the COCO API
(only ``pascal`` is listed as a key dict), which cannot look up the string keys; no upstream eval
script uses it. Here the val file is read in the form it has (the train file's key -> RLE form
expected), so an eval conversation file of PASCAL's can be read.

Train or eval annotations: upstream switches every key to its ``_eval`` file when evaluating.
Here the choice follows the conversation file (its ids come from one split's annotations): a
stem with a ``val``, ``test`` or ``eval`` part (``mr_paco_val``: upstream's eval files) reads
the eval files, every other stem (``mr_paco``, ``mr_lvis``: the training mix) the train files;
:func:`annotation_split`. Keys without an eval file (refCOCO, Visual Genome) read one file.

Layout under ``--dataset_dir`` (LISA's where it has the data, upstream's folder names else)::

    refer_seg/{refcoco,refcoco+,refcocog}/instances.json     refcoco, refcoco+, refcocog
    refer_seg/images/mscoco/images/train2014/               coco/train2014 (store coco2014)
    vlpart/paco/annotations/paco_lvis_v1_{train,val}.json   paco_lvis
    lvis/lvis_v1_{train,val}.json                           lvis
    coco/{train2017,val2017}/                               coco/train2017, coco/val2017 (coco2017)
    vg/vg_masks_train_new.json                              visual_genome (train and eval)
    vg/VG_100K/, vg/VG_100K_2/                              [vg/]VG_100K[_2] (store vg)
    pascal/pascal_labels.json, pascal_labels_val.json       pascal
    vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/        pascal[/VOCdevkit/VOC2010/JPEGImages]
                                                            (store voc2010)

Image paths (:func:`resolve_image`): upstream's rewrites ``val2014`` -> ``train2014``,
``new_`` -> ``''`` and, for a path containing ``VG_100K``, the ``vg/`` folder in front
(upstream prefixes its image folder with ``vg``; a path already starting with ``vg/`` keeps
it), applied to the IMAGE256 path too; then the folder maps through :data:`IMAGE_FOLDERS`, and
``coco/val2017`` falls back to ``coco/train2017`` when the file is missing there (upstream's
missing-file rewrite; LVIS val holds images of both). PASCAL's images are VOC2010's, which LISA
keeps (and ``prepare_voc2010`` reads for the ``voc2010`` store) in
``vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages``; upstream's ``images_folder/pascal`` is the
unpacked VOC tar, so a tag may name ``pascal/<file>`` or ``pascal/VOCdevkit/VOC2010/JPEGImages/
<file>`` (the released files were not available to check which): both read LISA's folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from utils.annotations import load_json
from utils.text_files import DatasetFormatError


@dataclass(frozen=True)
class AnnotationFiles:
    """A ``<dataset>`` key's annotation files, relative to ``--dataset_dir``."""

    train: str
    eval: str


def _same(path: str) -> AnnotationFiles:
    return AnnotationFiles(path, path)


# tag <dataset> key -> its annotation files under --dataset_dir (see the module doc)
ANNOTATION_FILES = {
    "refcoco": _same("refer_seg/refcoco/instances.json"),
    "refcoco+": _same("refer_seg/refcoco+/instances.json"),
    "refcocog": _same("refer_seg/refcocog/instances.json"),
    "paco_lvis": AnnotationFiles(
        "vlpart/paco/annotations/paco_lvis_v1_train.json",
        "vlpart/paco/annotations/paco_lvis_v1_val.json",
    ),
    "lvis": AnnotationFiles("lvis/lvis_v1_train.json", "lvis/lvis_v1_val.json"),
    "visual_genome": _same("vg/vg_masks_train_new.json"),
    "pascal": AnnotationFiles("pascal/pascal_labels.json", "pascal/pascal_labels_val.json"),
}
VOC2010_IMAGES = "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages"  # LISA's, as prepare_voc2010
# tag image folder (after the rewrites) -> (folder under --dataset_dir, proposal store)
IMAGE_FOLDERS = {
    "coco/train2014": ("refer_seg/images/mscoco/images/train2014", "coco2014"),
    "coco/train2017": ("coco/train2017", "coco2017"),
    "coco/val2017": ("coco/val2017", "coco2017"),
    "vg/VG_100K": ("vg/VG_100K", "vg"),
    "vg/VG_100K_2": ("vg/VG_100K_2", "vg"),
    "pascal": (VOC2010_IMAGES, "voc2010"),
    "pascal/VOCdevkit/VOC2010/JPEGImages": (VOC2010_IMAGES, "voc2010"),
}
MISSING_FILE_FALLBACK = {"coco/val2017": "coco/train2017"}
SPLITS = ("train", "eval")
EVAL_STEM_PARTS = ("val", "test", "eval")


def annotation_split(stem: str) -> str:
    """``"eval"`` for a conversation file stem with a ``val``/``test``/``eval`` part (split on
    ``_``, e.g. ``mr_paco_val``), else ``"train"`` (``mr_paco``, ``mr_refcoco_hard``)."""
    return "eval" if set(stem.lower().split("_")) & set(EVAL_STEM_PARTS) else "train"


def resolve_image(dataset_dir: Path, tag_path: str, where: str) -> tuple[Path, str]:
    """``(image file, proposal store)`` of a tag image path (upstream's rewrites applied).

    Raises:
        DatasetFormatError: the folder is not in :data:`IMAGE_FOLDERS` (``where`` names the
            conversation file, conversation and turn).
    """
    rewritten = tag_path.replace("val2014", "train2014").replace("new_", "")
    if "VG_100K" in rewritten and not rewritten.startswith("vg/"):
        rewritten = "vg/" + rewritten.lstrip("/")
    folder, _, name = rewritten.rpartition("/")
    if folder not in IMAGE_FOLDERS:
        raise DatasetFormatError(
            f"{where}: image {tag_path!r} is in an unknown folder; known: {sorted(IMAGE_FOLDERS)}"
        )
    local, store = IMAGE_FOLDERS[folder]
    path = dataset_dir / local / name
    if folder in MISSING_FILE_FALLBACK and not path.is_file():
        fallback = dataset_dir / IMAGE_FOLDERS[MISSING_FILE_FALLBACK[folder]][0] / name
        path = fallback if fallback.is_file() else path
    return path, store


@dataclass
class _CocoFile:
    """A COCO-format file: ``annotation id -> annotation``, ``image id -> image``."""

    path: Path
    annotations: dict
    images: dict


@dataclass
class _KeyedRLEFile:
    """A ``key -> COCO RLE`` file (Visual Genome, PASCAL)."""

    path: Path
    masks: dict


def _image_name(image: dict) -> str:
    """An image record's file name: ``file_name``, else the basename of ``coco_url`` (LVIS)."""
    return Path(str(image.get("file_name") or image.get("coco_url") or "")).name


def _rle_size(rle) -> tuple[int, int] | None:
    """``(H, W)`` of a COCO RLE dict or a non-empty list of same-size ones; None otherwise."""
    items = rle if isinstance(rle, list) else [rle]
    sizes = set()
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("counts"), (str, list)):
            return None
        try:
            height, width = (int(v) for v in item["size"])
        except (KeyError, TypeError, ValueError):
            return None
        sizes.add((height, width))
    return sizes.pop() if len(sizes) == 1 else None


class AnnotationSources:
    """The annotation files of one split, each read once when a tag first names its key.

    Args:
        dataset_dir: ``--dataset_dir``.
        split: ``"train"`` or ``"eval"`` (which file of :data:`ANNOTATION_FILES`).
    """

    def __init__(self, dataset_dir: Path, split: str):
        if split not in SPLITS:
            raise ValueError(f"annotation split must be one of {SPLITS}, got {split!r}")
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        self.files: dict[str, _CocoFile | _KeyedRLEFile] = {}

    def file(self, dataset: str) -> _CocoFile | _KeyedRLEFile:
        """The parsed annotation file of a ``<dataset>`` key.

        Raises:
            FileNotFoundError: the file is missing.
            DatasetFormatError: neither COCO format nor a ``key -> RLE`` object.
        """
        if dataset not in self.files:
            path = self.dataset_dir / getattr(ANNOTATION_FILES[dataset], self.split)
            data = load_json(path, f"{dataset} annotations ({self.split})")
            if isinstance(data, dict) and "annotations" in data and "images" in data:
                try:
                    annotations = {int(a["id"]): a for a in data["annotations"]}
                    images = {int(i["id"]): i for i in data["images"]}
                except (KeyError, TypeError, ValueError) as error:
                    raise DatasetFormatError(
                        f"{path}: not a COCO-format file ({error!r})"
                    ) from None
                self.files[dataset] = _CocoFile(path, annotations, images)
            elif isinstance(data, dict):
                self.files[dataset] = _KeyedRLEFile(path, data)
            else:
                raise DatasetFormatError(
                    f"{path}: expected a COCO-format file or a JSON object of key -> RLE"
                )
        return self.files[dataset]

    def target(self, dataset: str, mask_id, image_name: str, where: str):
        """``(segmentation, (H, W))`` of a mask id: a COCO ``segmentation`` (polygons, RLE or a
        list of RLEs) and the size it is annotated at.

        Args:
            dataset: the tag's ``<dataset>`` key.
            mask_id: the tag's id (int or str, :func:`~utils.data.mrseg.parse_mask_id`).
            image_name: the conversation image's file name (COCO annotations must be of it).
            where: the conversation file, conversation and turn, for errors.
        Raises:
            DatasetFormatError: the id is not in the file, its annotation is of another image,
                the image has no size, or the key's value is not a COCO RLE.
        """
        source = self.file(dataset)
        if isinstance(source, _KeyedRLEFile):
            return self._keyed_target(source, mask_id, where)
        annotation = source.annotations.get(mask_id) if isinstance(mask_id, int) else None
        if annotation is None:
            raise DatasetFormatError(
                f"{where}: mask id {mask_id!r} is not an annotation of {source.path}"
            )
        image = source.images.get(int(annotation.get("image_id", -1)), {})
        if _image_name(image) != image_name:
            found = image.get("file_name") or image.get("coco_url")
            raise DatasetFormatError(
                f"{where}: annotation {mask_id} of {source.path} belongs to image "
                f"{found!r}, not {image_name}"
            )
        try:
            size = (int(image["height"]), int(image["width"]))
        except (KeyError, TypeError, ValueError):
            message = f"{source.path}: image {image_name} needs height and width"
            raise DatasetFormatError(message) from None
        return annotation.get("segmentation") or [], size

    @staticmethod
    def _keyed_target(source: _KeyedRLEFile, mask_id, where: str):
        key = str(mask_id)
        if key not in source.masks:
            raise DatasetFormatError(f"{where}: mask id {key!r} is not a key of {source.path}")
        rle = source.masks[key]
        size = _rle_size(rle)
        if size is None:
            raise DatasetFormatError(
                f"{source.path}: mask {key!r} is not a COCO RLE "
                f"({{'size': [H, W], 'counts': ...}} or a list of same-size ones): {rle!r:.80}"
            )
        return rle, size
