"""gRefCOCO (generalised referring expressions: no-target and multi-target), in LISA's layout.

Files: ``<refer_root>/grefcoco/grefs(unc).json`` (LISA's ``G_REFER`` also takes a
``grefs(unc).p`` pickle, read here when there is no json) + ``instances.json`` (COCO format);
images under ``<refer_root>/images/mscoco/images/train2014/``, proposals in
``<sam_masks_dir>/coco2014`` (keys = file names), as refCOCO's (:mod:`utils.data.refer_seg`
gives ``refer_root``). A ref is ``{"ref_id", "image_id", "split", "ann_id": [ids] (or one id),
"no_target": bool, "sentences": [{"sent_id", "sent", ...}], "file_name", "category_id"}``;
``ann_id == [-1]`` marks a query that refers to nothing.

As the authors' loader (ReLA's ``load_grefcoco_json`` and dataset mapper) does:

* one sample per sentence; a ref without sentences gives none;
* the target of a sentence is the union of its ref's annotations that are not ``iscrowd``; a
  no-target ref's is all zero;
* the image is found by ``image_id`` in ``instances.json`` (the refs' own ``file_name`` carries
  a ``_<n>`` suffix that is not on disk).

The result is one :class:`~utils.data.refer_seg.ReferImage` per image (its sentences in ref
order, with ``sentence_ids`` and ``no_target``), so evaluation (``refer_eval_record``,
``--val_dataset "grefcoco|unc|val"``) and the refer_seg training family (``--refer_seg_data
"refcoco||grefcoco"``: a no-target sentence's round answers the rejection sentence and has no
mask row, :mod:`utils.data.rejection`; it needs ``--rejection answer`` or ``token``; a
multi-target sentence's round answers one ``[SEG]`` for the union, or with
``--multi_target_answer per_instance`` one per annotation in ``ann_id`` order,
:mod:`utils.data.multi_target`) reuse the refer code. ``eval.py --pred_dir`` scores
``<sent_id>.png`` per sentence (:mod:`utils.grefcoco_scoring`).

Bad input stops the build with one line naming the file: a missing or malformed grefs/instances
file, a ref pointing to an unknown image or annotation, an annotation of another image, ``-1``
mixed with real ids, a ``no_target`` flag contradicting ``ann_id``, a sentence without
``sent_id`` or a ``sent_id`` used twice in the split.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

from utils.annotations import coco_images, load_json, load_refs_pickle
from utils.data.dataset_files import keep_available, open_proposal_store
from utils.data.refer_seg import ReferImage, refer_root
from utils.text_files import DatasetFormatError

logger = logging.getLogger(__name__)

GREFCOCO = "grefcoco"
NO_TARGET_ID = -1


def parse_grefcoco_spec(spec: str) -> tuple[str, str]:
    """``(split_by, split)`` of ``--val_dataset`` ``grefcoco|unc|val``, ``grefcoco|val`` or
    ``grefcoco`` (defaults: ``unc``, ``val``, the split the authors released)."""
    parts = spec.split("|")
    split_by = parts[1] if len(parts) == 3 else "unc"
    split = parts[-1] if len(parts) > 1 else "val"
    return split_by, split


def grefs_path(folder: Path, split_by: str) -> Path:
    """``grefs(<split_by>).json``, else ``grefs(<split_by>).p``, in ``folder`` (the json path when
    neither exists, so the error names the released file)."""
    json_path = folder / f"grefs({split_by}).json"
    pickle_path = folder / f"grefs({split_by}).p"
    return pickle_path if pickle_path.is_file() and not json_path.is_file() else json_path


def _load_grefs(path: Path) -> list:
    if path.suffix == ".json":
        refs = load_json(path, "gRefCOCO refs")
    else:
        try:
            refs = load_refs_pickle(path)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
            raise DatasetFormatError(f"{path}: not a gRefCOCO refs pickle ({error})") from None
    if not isinstance(refs, list):
        raise DatasetFormatError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def _annotation_ids(ref: dict, path: Path, index: int) -> tuple[list[int], bool]:
    """The ref's annotation ids and whether it has no target (``ann_id == [-1]``)."""
    raw = ref.get("ann_id")
    try:
        ids = [int(a) for a in (raw if isinstance(raw, list) else [raw])]
    except (TypeError, ValueError):
        raise DatasetFormatError(f"{path}: refs[{index}] needs ann_id (a list of ids)") from None
    no_target = NO_TARGET_ID in ids
    if no_target and len(ids) != 1:
        raise DatasetFormatError(f"{path}: refs[{index}] mixes ann_id -1 with ids {ids}")
    if not ids:
        raise DatasetFormatError(f"{path}: refs[{index}] has an empty ann_id (no target is [-1])")
    if "no_target" in ref and bool(ref["no_target"]) != no_target:
        raise DatasetFormatError(
            f"{path}: refs[{index}] has no_target={ref['no_target']} but ann_id {ids}"
        )
    return ([] if no_target else ids), no_target


def _sentences(ref: dict, path: Path, index: int) -> list[tuple[int, str]]:
    """``(sent_id, text)`` of every sentence of a ref (none for a ref without sentences)."""
    try:
        return [(int(s["sent_id"]), str(s["sent"]).strip()) for s in ref.get("sentences") or []]
    except (KeyError, TypeError, ValueError):
        raise DatasetFormatError(f"{path}: refs[{index}] needs sentences[].sent_id/sent") from None


def load_grefcoco_split(
    dataset_dir: str | Path,
    sam_masks_dir: str | Path | None,
    split: str = "val",
    split_by: str = "unc",
    strict: bool = False,
) -> list[ReferImage]:
    """Parse the refs of ``split`` into one :class:`ReferImage` per image (see the module doc).

    Args:
        dataset_dir: ``--dataset_dir`` (``refer_seg/grefcoco`` or ``grefcoco`` under it).
        sam_masks_dir: proposal store root, or ``None`` to skip proposals.
        split: the refs' ``split`` field (train, val, testA, testB).
        split_by: ``unc`` (the released split).
        strict: evaluation behaviour for missing files (see :mod:`utils.data.dataset_files`).
    Returns:
        Images sorted by id; ``sentences[i]``, ``sentence_ids[i]``, ``no_target[i]`` and
        ``segmentations[i]`` (the non-crowd annotations' segmentation fields) describe one sample.
    """
    root = refer_root(dataset_dir, GREFCOCO)
    refs_path = grefs_path(root / GREFCOCO, split_by)
    refs = _load_grefs(refs_path)
    instances_path = root / GREFCOCO / "instances.json"
    instances = load_json(instances_path, "gRefCOCO instances")
    try:
        images = coco_images(instances, str(instances_path))
        annotations = {int(a["id"]): a for a in instances["annotations"]}
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetFormatError(f"{instances_path}: not a COCO-format file ({error!r})") from None
    by_image: dict[int, list[tuple[int, str, bool, list]]] = {}
    sent_ids: set[int] = set()
    num_refs = 0
    for index, ref in enumerate(refs):
        if not isinstance(ref, dict) or ref.get("split") != split:
            continue
        num_refs += 1
        try:
            image_id = int(ref["image_id"])
        except (KeyError, TypeError, ValueError):
            raise DatasetFormatError(f"{refs_path}: refs[{index}] needs image_id") from None
        ann_ids, no_target = _annotation_ids(ref, refs_path, index)
        unknown = [a for a in ann_ids if a not in annotations]
        if image_id not in images or unknown:
            raise DatasetFormatError(
                f"{refs_path}: refs[{index}] points to image {image_id} / annotations {ann_ids}, "
                f"not all in {instances_path}"
            )
        if any(int(annotations[a].get("image_id", image_id)) != image_id for a in ann_ids):
            raise DatasetFormatError(
                f"{refs_path}: refs[{index}] names annotations {ann_ids} of another image than "
                f"{image_id} ({instances_path})"
            )
        segmentations = [
            annotations[a].get("segmentation") or []
            for a in ann_ids
            if not annotations[a].get("iscrowd", 0)
        ]
        for sent_id, text in _sentences(ref, refs_path, index):
            if sent_id in sent_ids:
                raise DatasetFormatError(f"{refs_path}: sent_id {sent_id} is used twice")
            sent_ids.add(sent_id)
            by_image.setdefault(image_id, []).append((sent_id, text, no_target, segmentations))
    if not by_image:
        known = sorted({str(r.get("split")) for r in refs if isinstance(r, dict)})
        raise DatasetFormatError(
            f"{refs_path}: no sentences in split {split!r} ({num_refs} refs; splits: {known})"
        )
    image_dir = root / "images" / "mscoco/images/train2014"
    proposals = open_proposal_store(sam_masks_dir, "coco2014")
    items = [
        _image(image_id, images[image_id], samples, image_dir, proposals, instances_path)
        for image_id, samples in sorted(by_image.items())
    ]
    items = keep_available(
        items, f"{GREFCOCO}|{split_by}|{split}", lambda i: i.image_path, proposals,
        lambda i: i.proposal_key, strict=strict,
    )  # fmt: skip
    num_no_target = sum(sum(i.no_target) for i in items)
    logger.info(
        "grefcoco(%s) %s: %d images, %d sentences (%d no-target)",
        split_by, split, len(items), sum(len(i.sentences) for i in items), num_no_target,
    )  # fmt: skip
    return items


def _image(image_id: int, info: dict, samples: list, image_dir: Path, proposals, source: Path):
    try:
        file_name, height, width = str(info["file_name"]), int(info["height"]), int(info["width"])
    except (KeyError, TypeError, ValueError):
        message = f"{source}: image {image_id} needs file_name, height and width"
        raise DatasetFormatError(message) from None
    return ReferImage(
        dataset=GREFCOCO,
        image_path=image_dir / file_name,
        proposal_key=Path(file_name).name,
        height=height,
        width=width,
        sentences=[text for _, text, _, _ in samples],
        segmentations=[segs for _, _, _, segs in samples],
        proposals=proposals,
        sentence_ids=[sent_id for sent_id, _, _, _ in samples],
        no_target=[flag for _, _, flag, _ in samples],
    )
