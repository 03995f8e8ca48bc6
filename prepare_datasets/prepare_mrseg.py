"""Multi-round referring conversations in SegLLM's MRSeg format, generated from refCOCO/+/g.

Reads (LISA's layout) ``<dataset_dir>/refer_seg/<dataset>/refs(<split_by>).p`` + ``instances.json``
for refcoco, refcoco+ (``unc``) and refcocog (``umd``), all three whatever ``--datasets`` says
(every val/test image of any of them is held out of train); writes, readable unmodified by
:func:`utils.data.mrseg.load_mrseg`::

    <out_dir>/mr_<name>_train.json   from the train refs of --datasets, held-out images excluded
    <out_dir>/mr_<name>_val.json     from refCOCO (unc) val images only
    <out_dir>/prepare_mrseg_config.json   (out_dir: <dataset_dir>/mrseg, beside upstream's files)

One conversation per (dataset, image) with >= 2 referred annotations, of 2..``--max_rounds``
rounds. Round 1 is a referring expression of one of the image's refs ("Segment {sentence}.").
Round k >= 2 draws a query type (then falls back to another one that has a candidate):

- ``expression`` (~30%): another ref's expression, no reference;
- ``relational`` (~60%): "Segment the {cat} {relation} instance {j}." about an earlier round j;
- ``copy`` (~5%): "Segment instance {j} again." (the only round whose target may repeat);
- ``chain`` (~5%, k >= 3): a relational query about round k-1, "Segment the {cat} {relation} it.".

Relations (:func:`relation_answers`, from COCO boxes and areas, among the non-crowd instances of
the target's category other than the reference A): left/right/above/below (centre offset > 0.1
of the image width/height, boxes overlapping on the other axis), ``next_to`` (the nearest centre,
the runner-up >= 1.3x as far), ``other`` (exactly two of A's category), larger/smaller (area
>= 1.5x / <= 1/1.5x A's); emitted only when exactly one instance satisfies it (unique answer).

References as SegLLM writes them: ``[MASK-ENCODE:<img>|<ds>|<id>][BOX-ENCODE:<img>|<ds>|<id>]``
before the text, ``"ind": [j]`` (``[-1]`` without one, as upstream's demos), gpt turns
``[MASK-DECODE:relational:<ref id>:<tgt id>:<img>:<ds>]`` / ``[MASK-DECODE:none:none:<tgt>:...]``.
Round j is always the latest round with its target (the reader resolves an id to that round).
Records also carry ``conv_id`` and ``relations`` (per round: type, relation, reference, unique).

Deterministic: each conversation draws from a generator seeded by (seed, split, dataset, image).
Files are written through a temporary file and one rename; train and val share no image (checked
before writing).

    python -m prepare_datasets.prepare_mrseg --dataset_dir ./dataset --max_rounds 6 --seed 0
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from prepare_datasets.conversations.relations import (
    RELATION_PHRASES,
    ImageGroup,
    Instance,
    unique_answer,
)
from utils.annotations import annotation_mask, load_json, load_refs_pickle
from utils.cli import run_cli
from utils.config import save_config
from utils.text_files import DatasetFormatError

logger = logging.getLogger(__name__)

SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
VAL_DATASET = "refcoco"  # val conversations come from refCOCO (unc) val images only
IMAGE_FOLDER = "coco/train2014"  # the tag image folder (the reader maps it to LISA's layout)
QUERY_WEIGHTS = {"expression": 0.30, "relational": 0.60, "copy": 0.05, "chain": 0.05}
NO_REFERENCE_IND = [-1]
SPLITS = ("train", "val")


@dataclass
class MRSegPrepareConfig:
    """Generate multi-round MRSeg conversations from refCOCO/+/g (see the module doc)."""

    dataset_dir: str = field(default="dataset", metadata={"help": "dataset root (refer_seg/...)"})
    out_dir: str | None = field(
        default=None, metadata={"help": "output folder (default <dataset_dir>/mrseg)"}
    )
    name: str = field(
        default="refcoco_gen", metadata={"help": "files are mr_<name>_{train,val}.json"}
    )
    datasets: str = field(
        default="refcoco||refcoco+||refcocog",
        metadata={"help": "refer datasets whose train refs make the train file ('||' or ',')"},
    )
    max_rounds: int = field(default=6, metadata={"help": "most rounds per conversation (>= 2)"})
    seed: int = field(default=0, metadata={"help": "seed; the same seed gives identical files"})
    limit: int = field(default=0, metadata={"help": "at most this many images per split (0: all)"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing output files"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar per split"})

    def dataset_names(self) -> list[str]:
        return [n.strip() for n in re.split(r"\|\||,", self.datasets) if n.strip()]

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        names = self.dataset_names()
        unknown = sorted(set(names) - set(SPLIT_BY))
        if not names or unknown:
            raise ValueError(f"--datasets must name some of {sorted(SPLIT_BY)}, got {unknown}")
        if self.max_rounds < 2:
            raise ValueError(f"--max_rounds must be >= 2, got {self.max_rounds}")
        for name in ("seed", "limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not re.fullmatch(r"[\w+.-]+", self.name):
            raise ValueError(f"--name must be a plain file-name part, got {self.name!r}")


@dataclass
class ReferData:
    """One refer dataset as read: refs (with their file), images and annotations by id."""

    name: str
    refs_path: Path
    refs: list[dict]
    images: dict[int, dict]
    annotations: dict[int, dict]
    categories: dict[int, str]
    instances_path: Path


@dataclass
class Round:
    """A generated round; ``reference_round`` is 1-based (None without a reference)."""

    query_type: str
    text: str
    target: int
    reference_round: int | None = None
    relation: str | None = None


@dataclass
class SplitStats:
    """What one split's generation produced and skipped."""

    conversations: int = 0
    rounds: Counter = field(default_factory=Counter)  # rounds per conversation -> count
    query_types: Counter = field(default_factory=Counter)
    relations: Counter = field(default_factory=Counter)
    fallbacks: int = 0  # rounds whose drawn query type had no candidate
    skipped: Counter = field(default_factory=Counter)  # reason -> images


@dataclass
class MRSegSummary:
    """What :func:`main` wrote: the file of each split and its statistics."""

    files: dict[str, Path]
    stats: dict[str, SplitStats]


# ---- relations --------------------------------------------------------------------------------


def _box_and_area(annotation: dict, height: int, width: int) -> tuple[tuple, float]:
    """``(x0, y0, x1, y1)`` and area from ``bbox``/``area``, else measured on the mask."""
    if "bbox" in annotation and "area" in annotation:
        x, y, w, h = (float(v) for v in annotation["bbox"])
        return (x, y, x + w, y + h), float(annotation["area"])
    ys, xs = np.nonzero(annotation_mask(annotation, height, width))
    if not len(xs):
        return (0.0, 0.0, 0.0, 0.0), 0.0
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return box, float(len(xs))


def load_refer(dataset_dir: str | Path, name: str) -> ReferData:
    """Read ``refer_seg/<name>/refs(<split_by>).p`` and ``instances.json``.

    Raises:
        FileNotFoundError: either file is missing (the message names it).
        DatasetFormatError: a file that is not a refs pickle / COCO-format instances file.
    """
    folder = Path(dataset_dir) / "refer_seg" / name
    refs_path = folder / f"refs({SPLIT_BY[name]}).p"
    try:  # a missing file is a FileNotFoundError naming it
        refs = load_refs_pickle(refs_path)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise DatasetFormatError(f"{refs_path}: not a refer refs pickle ({error})") from None
    for index, ref in enumerate(refs):
        if not isinstance(ref, dict) or not {"image_id", "ann_id", "split", "sentences"} <= set(
            ref
        ):
            message = f"{refs_path}: refs[{index}] needs image_id, ann_id, split and sentences"
            raise DatasetFormatError(message)
    instances_path = folder / "instances.json"
    instances = load_json(instances_path, f"{name} instances")
    try:
        images = {int(i["id"]): i for i in instances["images"]}
        annotations = {int(a["id"]): a for a in instances["annotations"]}
        categories = {int(c["id"]): str(c["name"]) for c in instances["categories"]}
    except (KeyError, TypeError, ValueError) as error:
        message = f"{instances_path}: not a COCO-format file with categories ({error!r})"
        raise DatasetFormatError(message) from None
    return ReferData(name, refs_path, refs, images, annotations, categories, instances_path)


def _clean_sentence(sentence: str) -> str:
    # brackets would read as tags to SegLLM's parser; a trailing period is added by the template
    text = " ".join(str(sentence).replace("[", "(").replace("]", ")").split())
    return text.rstrip(" .")


def split_images(refer: ReferData, split: str) -> list[ImageGroup]:
    """One :class:`ImageGroup` per image of ``split``'s refs, sorted by image id."""
    expressions: dict[int, dict[int, list[str]]] = {}
    for index, ref in enumerate(refer.refs):
        if ref["split"] != split:
            continue
        try:
            image_id, ann_id = int(ref["image_id"]), int(ref["ann_id"])
            sentences = [_clean_sentence(s["sent"]) for s in ref["sentences"]]
        except (KeyError, TypeError, ValueError):
            message = f"{refer.refs_path}: refs[{index}] needs int ids and sentences[].sent"
            raise DatasetFormatError(message) from None
        annotation = refer.annotations.get(ann_id, {})
        if image_id not in refer.images or int(annotation.get("image_id", -1)) != image_id:
            raise DatasetFormatError(
                f"{refer.refs_path}: refs[{index}] points to image {image_id} / annotation "
                f"{ann_id}, not an annotation of that image in {refer.instances_path}"
            )
        by_ann = expressions.setdefault(image_id, {})
        by_ann.setdefault(ann_id, []).extend(s for s in sentences if s)
    by_image: dict[int, list[dict]] = {}
    for annotation in refer.annotations.values():
        by_image.setdefault(int(annotation["image_id"]), []).append(annotation)
    groups = []
    for image_id in sorted(expressions):
        image = refer.images[image_id]
        try:
            height, width = int(image["height"]), int(image["width"])
            file_name = str(image["file_name"])
        except (KeyError, TypeError, ValueError):
            message = f"{refer.instances_path}: image {image_id} needs file_name, height, width"
            raise DatasetFormatError(message) from None
        instances = {}
        for annotation in sorted(by_image.get(image_id, []), key=lambda a: int(a["id"])):
            category = refer.categories.get(int(annotation.get("category_id", -1)))
            if category is None:
                raise DatasetFormatError(
                    f"{refer.instances_path}: annotation {annotation['id']} has category "
                    f"{annotation.get('category_id')!r}, not in its categories"
                )
            crowd, ann_id = bool(annotation.get("iscrowd", 0)), int(annotation["id"])
            instances[ann_id] = Instance(
                ann_id, category, *_box_and_area(annotation, height, width), crowd
            )
        kept = {a: s for a, s in expressions[image_id].items() if s}
        groups.append(ImageGroup(refer.name, image_id, file_name, width, height, kept, instances))
    return groups


def held_out_images(refers: list[ReferData]) -> set[str]:
    """File names of every image in a non-train split (val, test, testA, testB) of any of
    ``refers`` (refCOCOg's umd splits differ from refCOCO's unc ones)."""
    held_out = set()
    for refer in refers:
        ids = {int(r["image_id"]) for r in refer.refs if r.get("split") != "train"}
        held_out |= {Path(str(refer.images[i]["file_name"])).name for i in ids if i in refer.images}
    return held_out


# ---- generation -------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _latest_rounds(rounds: list[Round]) -> list[int]:
    """1-based rounds that are the latest with their target (what a reference id resolves to)."""
    latest = {r.target: k for k, r in enumerate(rounds, start=1)}
    return sorted(latest.values())


def _relational_options(group: ImageGroup, rounds: list[Round], sources: list[int]) -> list:
    """``(round j, relation, target id)`` with a unique answer not targeted yet."""
    used = {r.target for r in rounds}
    by_category: dict[str, list[Instance]] = {}
    for instance in group.instances.values():
        if not instance.crowd:
            by_category.setdefault(instance.category, []).append(instance)
    options = []
    for j in sources:
        reference = group.instances[rounds[j - 1].target]
        for relation in RELATION_PHRASES:
            for category in sorted(by_category):
                answer = unique_answer(
                    relation, reference, by_category[category], group.width, group.height
                )
                if answer is not None and answer not in used:
                    options.append((j, relation, answer))
    return options


def _round_options(group: ImageGroup, rounds: list[Round]) -> dict[str, list]:
    used, k, sources = {r.target for r in rounds}, len(rounds) + 1, _latest_rounds(rounds)
    has_copy = any(r.query_type == "copy" for r in rounds)
    return {
        "expression": [a for a in sorted(group.expressions) if a not in used],
        "relational": _relational_options(group, rounds, sources),
        "copy": [] if has_copy else sources,
        "chain": _relational_options(group, rounds, [k - 1]) if k >= 3 else [],
    }


def _draw_type(rng: np.random.Generator, options: dict[str, list]) -> tuple[str | None, bool]:
    """A query type by :data:`QUERY_WEIGHTS`; if it has no option, another one that has
    (weights renormalised). Returns ``(type or None, fell_back)``."""
    types = list(QUERY_WEIGHTS)
    weights = np.array([QUERY_WEIGHTS[t] for t in types])
    drawn = types[int(rng.choice(len(types), p=weights / weights.sum()))]
    if options[drawn]:
        return drawn, False
    open_types = [i for i, t in enumerate(types) if options[t]]
    if not open_types:
        return None, True
    sub = weights[open_types] / weights[open_types].sum()
    return types[open_types[int(rng.choice(len(open_types), p=sub))]], True


def _make_round(rng, group: ImageGroup, rounds: list[Round], query_type: str, options) -> Round:
    if query_type == "expression":
        target = _pick(rng, options)
        sentence = _pick(rng, group.expressions[target])
        return Round("expression", f"Segment {sentence}.", target)
    if query_type == "copy":
        j = _pick(rng, options)
        return Round("copy", f"Segment instance {j} again.", rounds[j - 1].target, j)
    # draw the relation first, so frequent relations (left/right) do not crowd out the others
    relation = _pick(rng, sorted({o[1] for o in options}))
    j, _, target = _pick(rng, [o for o in options if o[1] == relation])
    category, phrase = group.instances[target].category, RELATION_PHRASES[relation]
    about = "it" if query_type == "chain" else f"instance {j}"
    return Round(query_type, f"Segment the {category} {phrase} {about}.", target, j, relation)


def generate_rounds(
    rng: np.random.Generator, group: ImageGroup, max_rounds: int
) -> tuple[list[Round], int]:
    """Rounds of one conversation (possibly fewer than drawn when no query is left) and the
    number of fallbacks to another query type."""
    num_rounds = int(rng.integers(2, max_rounds + 1))
    rounds = [_make_round(rng, group, [], "expression", sorted(group.expressions))]
    fallbacks = 0
    while len(rounds) < num_rounds:
        options = _round_options(group, rounds)
        query_type, fell_back = _draw_type(rng, options)
        if query_type is None:
            break
        fallbacks += fell_back
        rounds.append(_make_round(rng, group, rounds, query_type, options[query_type]))
    return rounds, fallbacks


def conversation_record(group: ImageGroup, rounds: list[Round]) -> dict:
    """The MRSeg record of a conversation: SegLLM's tags, ``conv_id`` and ``relations``."""
    image, dataset = f"{IMAGE_FOLDER}/{Path(group.file_name).name}", group.dataset
    turns, relations = [], []
    for k, round_ in enumerate(rounds, start=1):
        prefix = f"[IMAGE256:{image}]" if k == 1 else ""
        info = {"round": k, "type": round_.query_type, "target_id": round_.target}
        if round_.reference_round is None:
            human = {"from": "human", "value": prefix + round_.text, "ind": NO_REFERENCE_IND}
            decode = f"[MASK-DECODE:none:none:{round_.target}:{image}:{dataset}]"
        else:
            reference = rounds[round_.reference_round - 1].target
            encode = f"{image}|{dataset}|{reference}"
            value = f"{prefix}[MASK-ENCODE:{encode}][BOX-ENCODE:{encode}]{round_.text}"
            human = {"from": "human", "value": value, "ind": [round_.reference_round]}
            decode = f"[MASK-DECODE:relational:{reference}:{round_.target}:{image}:{dataset}]"
            info.update(reference_round=round_.reference_round, reference_id=reference)
            if round_.relation is not None:
                info.update(relation=round_.relation, unique=True)
        turns += [human, {"from": "gpt", "value": decode}]
        relations.append(info)
    return {
        "task": "segmentation",
        "base": "[null]",
        "conv_id": f"{dataset}_{group.image_id}",
        "conversations": turns,
        "relations": relations,
    }


def generate_split(
    groups: list[ImageGroup], split: str, config: MRSegPrepareConfig, stats: SplitStats
) -> list[dict]:
    """The records of one split (``groups`` already filtered), counting into ``stats``."""
    records = []
    codes = {name: i for i, name in enumerate(SPLIT_BY)}
    bar = tqdm(groups, desc=f"mrseg {split}", unit="img", disable=not config.progress)
    for group in bar:
        seed = [config.seed, SPLITS.index(split), codes[group.dataset], group.image_id]
        rounds, fallbacks = generate_rounds(np.random.default_rng(seed), group, config.max_rounds)
        if len(rounds) < 2:
            stats.skipped["no second round possible"] += 1
            continue
        records.append(conversation_record(group, rounds))
        stats.conversations += 1
        stats.rounds[len(rounds)] += 1
        stats.fallbacks += fallbacks
        stats.query_types.update(r.query_type for r in rounds)
        stats.relations.update(r.relation for r in rounds if r.relation)
    return records


def _eligible(groups: list[ImageGroup], held_out: set[str], stats: SplitStats, limit: int):
    kept = []
    for group in groups:
        if Path(group.file_name).name in held_out:
            stats.skipped["held-out image (a val/test image of refCOCO/+/g)"] += 1
        elif len(group.expressions) < 2:
            stats.skipped["fewer than 2 referred annotations"] += 1
        elif limit and len(kept) >= limit:
            stats.skipped["over --limit"] += 1
        else:
            kept.append(group)
    return kept


def record_images(records: list[dict]) -> set[str]:
    """The image file names of ``records``, read from their IMAGE256 tags."""
    tag = re.compile(r"\[IMAGE256:([^\]]+)\]")
    return {Path(tag.search(r["conversations"][0]["value"]).group(1)).name for r in records}


def check_disjoint(train: list[dict], val: list[dict]) -> None:
    """Raise ``RuntimeError`` (naming how many and some) if train and val share an image."""
    shared = sorted(record_images(train) & record_images(val))
    if shared:
        raise RuntimeError(
            f"{len(shared)} images are in both the train and the val conversations "
            f"(e.g. {shared[:3]}); refusing to write a leaking split"
        )


def _write_atomic(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _summary_line(split: str, stats: SplitStats) -> str:
    def ordered(counter: Counter) -> dict:
        return dict(sorted(counter.items()))

    return (
        f"{split}: {stats.conversations} conversations; rounds per conversation "
        f"{ordered(stats.rounds)}; query types {ordered(stats.query_types)}; relations "
        f"{ordered(stats.relations)}; {stats.fallbacks} fallbacks; skipped images "
        f"{ordered(stats.skipped)}"
    )


def main(config: MRSegPrepareConfig) -> MRSegSummary:
    """Generate and write both splits and the resolved config; return files and statistics.

    Raises:
        FileExistsError: an output file is non-empty and ``--overwrite`` is not given.
        FileNotFoundError / DatasetFormatError: a missing or malformed refs/instances file.
        RuntimeError: train and val would share images.
    """
    config.validate()
    out_dir = Path(config.out_dir or Path(config.dataset_dir) / "mrseg")
    files = {split: out_dir / f"mr_{config.name}_{split}.json" for split in SPLITS}
    for path in files.values():
        if path.is_file() and path.stat().st_size and not config.overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass --overwrite to replace it")
    # every dataset's refs are read: any of their val/test images must stay out of train
    refers = {name: load_refer(config.dataset_dir, name) for name in SPLIT_BY}
    held_out = held_out_images(list(refers.values()))
    stats = {split: SplitStats() for split in SPLITS}
    val_images = split_images(refers[VAL_DATASET], "val")
    val_groups = _eligible(val_images, set(), stats["val"], config.limit)
    train_groups = [g for n in config.dataset_names() for g in split_images(refers[n], "train")]
    train_groups = _eligible(train_groups, held_out, stats["train"], config.limit)
    records = {
        "train": generate_split(train_groups, "train", config, stats["train"]),
        "val": generate_split(val_groups, "val", config, stats["val"]),
    }
    check_disjoint(records["train"], records["val"])
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        _write_atomic(files[split], records[split])
    resolved = dataclasses.replace(config, out_dir=str(out_dir))
    save_config(resolved, out_dir / "prepare_mrseg_config.json")
    for split in SPLITS:
        logger.info("mrseg %s", _summary_line(split, stats[split]))
    logger.info("MRSeg conversations written to %s and %s", files["train"], files["val"])
    return MRSegSummary(files, stats)


if __name__ == "__main__":
    run_cli(main, MRSegPrepareConfig)
