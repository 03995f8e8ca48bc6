"""A seeded synthetic reasoning-segmentation dataset in ReasonSeg's format, for the built-in demo.

Scenes hold 3-6 flat-coloured shapes (circle, ring, square, triangle, hexagon, star, cross) of
several colours, sizes, rotations and positions over textured backgrounds, some overlapping. Each
image comes with one query whose answer is unique in its scene (see
`prepare_datasets.synthetic.queries`): attribute, function, geometry, comparison or spatial, in
short (phrase) or long (sentence) form, with several phrasings. Query types and forms are
balanced within every split.

Usage::

    python -m prepare_datasets.prepare_synthetic --out_dir dataset --seed 0

Written (the layout `utils/data/reason_seg.py` reads, so ``--dataset_dir dataset`` works)::

    <out_dir>/reason_seg/ReasonSeg/{train,val,test}/<split>_<index>.jpg + <split>_<index>.json
    <out_dir>/reason_seg/ReasonSeg/synthetic_config.json   the resolved config
    <out_dir>/reason_seg/ReasonSeg/synthetic_stats.json    counts per split and query type

Each json has ReasonSeg's keys ``text`` (phrasings of the one query), ``is_sentence`` and
``shapes`` (labelme polygons, label ``target``, in pixel coordinates, outlining the target's
*visible* region: an occluded object is marked where the picture shows it; holes are spliced into
the outline through the object, so the polygons rasterise exactly to the visible mask with
ReasonSeg's reader), plus ``query_type``, ``query_subtype``, ``target`` and ``reference``
(indices into ``objects``), ``objects`` (the scene in drawing order, later on top, with measured
areas, boxes and centroids), ``background`` and ``image_size`` ``[height, width]``. With
``--extra_queries N`` it also holds ``extra_queries``: up to ``N`` further queries about the same
picture, each about another object, with the same query fields (``text``, ``is_sentence``,
``shapes``, ``query_type``, ...). Training asks several of them about one picture in one step
(`utils/data/reason_seg.py`), so only the words tell the targets apart; evaluation reads the
main query only, so the splits stay standard ReasonSeg.

With ``--conversations`` every json also holds ``conversation``: 2-5 rounds about the picture
(SegLLM style, `prepare_datasets.synthetic.conversations`), each ``{"text": str,
"is_sentence", "shapes", "target", "query_type", "references": [k, ...], "relation",
"candidates_without_reference"}``. Round 1 is a single-round query; every later round names an
earlier round's object as "object k [REF:k]" with a relation
(`prepare_datasets.synthetic.relations`) that singles out one object given object k and at least
two (``candidates_without_reference``) without it. A scene where no round 2 is possible gets no
``conversation`` (counted in the statistics). ``--extra_conversations N`` adds up to ``N`` further
conversations about the same picture under ``extra_conversations`` (each drawn as the first, so
round 1 asks about varied objects): training reads every one, evaluation the first only.

``--no_target_queries F`` / ``--multi_target_queries F`` (default 0) add queries about nothing
in the scene (``"no_target": true``, empty ``shapes``) or about every object sharing a colour or
shape (every target's polygons in ``shapes``, each with ``group_id``: its object's index), both
with ``"targets": [...]`` and ``"target": null`` (`prepare_datasets.synthetic.target_sets`): an
extra query of a fraction F of the train pictures, the *main* query of a fraction F of the
val/test pictures (so evaluation sees them). They come from generators of their own, so
everything else stays as without the options.

Deterministic: every image draws from its own generator seeded by ``(seed, split, index)``, so a
rerun writes byte-identical files. Extra queries, then the conversation, are drawn last, so the
picture and the main query do not depend on ``--extra_queries`` or ``--conversations``. Each split
is written to a temporary folder and swapped into place when complete, so an interrupted run never
leaves a half-written split.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from prepare_datasets.synthetic.conversations import (
    ConversationRound,
    build_conversation,
    conversation_stats,
    count_conversation,
)
from prepare_datasets.synthetic.queries import (
    QUERY_TYPES,
    Query,
    candidate_queries,
    choose_query,
    phrase_query,
)
from prepare_datasets.synthetic.relations import scene_layout
from prepare_datasets.synthetic.scenes import (
    BACKGROUNDS,
    SHAPES,
    ObjectGeometry,
    SceneObject,
    exact_polygons,
    measure_objects,
    render_image,
    render_masks,
    sample_objects,
    scene_is_clear,
)
from prepare_datasets.synthetic.target_sets import (
    MULTI_TARGET,
    NO_TARGET,
    PhrasedTargetSet,
    TargetSetPlan,
    target_set_candidates,
    target_set_kinds,
)
from utils.cli import run_cli
from utils.config import save_config

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MIN_RADIUS, MAX_RADIUS = 0.08, 0.2  # object circumradius range, fractions of the image side
MAX_ATTEMPTS = 500  # scenes tried per image before giving up (a handful are needed in practice)


@dataclass
class SyntheticConfig:
    """Generate the synthetic ReasonSeg-format dataset of the built-in demo."""

    out_dir: str = field(
        default="dataset",
        metadata={"help": "dataset root (the --dataset_dir of training); writes reason_seg/..."},
    )
    seed: int = field(default=0, metadata={"help": "seed; the same seed gives identical files"})
    num_train: int = field(default=500, metadata={"help": "images in the train split"})
    num_val: int = field(default=100, metadata={"help": "images in the val split"})
    num_test: int = field(default=100, metadata={"help": "images in the test split"})
    image_size: int = field(default=160, metadata={"help": "image side in pixels (square)"})
    min_objects: int = field(default=3, metadata={"help": "fewest objects in a scene"})
    max_objects: int = field(default=6, metadata={"help": "most objects in a scene"})
    texts_per_query: int = field(default=3, metadata={"help": "phrasings stored in 'text'"})
    extra_queries: int = field(
        default=0,
        metadata={
            "help": "further queries about the same scene, each with another target, stored under "
            "'extra_queries' (training asks several of them about one picture; evaluation reads "
            "the main query only)"
        },
    )
    conversations: bool = field(
        default=False,
        metadata={
            "help": "also write a 2-5 round 'conversation' per image whose later rounds name an "
            "earlier round's object ('object k [REF:k]')"
        },
    )
    extra_conversations: int = field(
        default=0,
        metadata={
            "help": "with --conversations: further conversations about the same picture under "
            "'extra_conversations' (training reads them all; evaluation the first only)"
        },
    )
    no_target_queries: float = field(
        default=0.0,
        metadata={"help": "fraction of pictures with a query about something absent: an extra "
                  "query in train, the main query in val/test"},
    )  # fmt: skip
    multi_target_queries: float = field(
        default=0.0,
        metadata={"help": "fraction of pictures with a query for every object sharing a colour "
                  "or shape: an extra query in train, the main query in val/test"},
    )  # fmt: skip
    overlap_probability: float = field(
        default=0.5, metadata={"help": "fraction of scenes whose objects may overlap"}
    )
    jpeg_quality: int = field(default=95, metadata={"help": "JPEG quality (4:4:4 chroma)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar per split"})
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace split folders that an earlier synthetic run did not write "
                  "(e.g. real ReasonSeg data)"},
    )  # fmt: skip

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("num_train", "num_val", "num_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not 64 <= self.image_size <= 1024:
            raise ValueError(f"--image_size must be in [64, 1024], got {self.image_size}")
        if not 2 <= self.min_objects <= self.max_objects <= len(SHAPES) + 1:
            raise ValueError(
                "need 2 <= --min_objects <= --max_objects <= "
                f"{len(SHAPES) + 1}, got {self.min_objects} and {self.max_objects}"
            )
        if self.extra_queries < 0:
            raise ValueError(f"--extra_queries must be >= 0, got {self.extra_queries}")
        if self.extra_conversations < 0:
            raise ValueError(f"--extra_conversations must be >= 0, got {self.extra_conversations}")
        if self.extra_conversations and not self.conversations:
            raise ValueError("--extra_conversations needs --conversations")
        if self.texts_per_query < 1:
            raise ValueError(f"--texts_per_query must be >= 1, got {self.texts_per_query}")
        for name in ("no_target_queries", "multi_target_queries"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        if self.no_target_queries + self.multi_target_queries > 1.0:
            raise ValueError("--no_target_queries + --multi_target_queries must be at most 1 (a "
                             "val/test picture has one main query)")  # fmt: skip
        if not 0.0 <= self.overlap_probability <= 1.0:
            raise ValueError(
                f"--overlap_probability must be in [0, 1], got {self.overlap_probability}"
            )
        if not 50 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg_quality must be in [50, 100], got {self.jpeg_quality}")


@dataclass
class PhrasedQuery:
    """A query with its form, phrasings and the labelme polygons of its target's visible region."""

    query: Query
    is_sentence: bool
    texts: list[str]
    polygons: list[np.ndarray]

    def to_record(self) -> dict:
        """The query's ReasonSeg fields (``text``, ``is_sentence``, ``shapes``) and its labels."""
        return {
            "text": self.texts,
            "is_sentence": self.is_sentence,
            "shapes": [
                {"label": "target", "points": polygon.tolist(), "shape_type": "polygon"}
                for polygon in self.polygons
            ],
            "query_type": self.query.query_type,
            "query_subtype": self.query.subtype,
            "target": self.query.target,
            "reference": self.query.reference,
        }


@dataclass
class SyntheticSample:
    """One generated image with its query.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB picture.
        objects: the scene in drawing order (later objects on top).
        geometry: measured visible region of each object.
        background: the background texture's kind.
        query: the query; ``query.target`` indexes ``objects``.
        is_sentence: long sentence (True) or short phrase (False).
        texts: phrasings of the query.
        polygons: labelme polygons of the target's visible region, ``(V, 2)`` int32 each.
        extra_queries: further queries about the scene, each with a target of its own (none is
            the main query's target, no two share one).
        conversation: the multi-round conversation (``--conversations``), ``None`` without one.
        extra_conversations: further conversations about the scene (``--extra_conversations``).
        main_target_set: a no-target or multi-target query replacing the main query (val/test).
        extra_target_sets: such queries stored after the extra queries (train).
    """

    image: np.ndarray
    objects: list[SceneObject]
    geometry: list[ObjectGeometry]
    background: str
    query: Query
    is_sentence: bool
    texts: list[str]
    polygons: list[np.ndarray]
    extra_queries: list[PhrasedQuery] = field(default_factory=list)
    conversation: list[ConversationRound] | None = None
    extra_conversations: list[list[ConversationRound]] = field(default_factory=list)
    main_target_set: PhrasedTargetSet | None = None
    extra_target_sets: list[PhrasedTargetSet] = field(default_factory=list)

    def to_record(self) -> dict:
        """The ReasonSeg json of this sample (plain Python types only)."""
        objects = []
        for obj, geo in zip(self.objects, self.geometry):
            objects.append(
                {
                    "shape": obj.shape,
                    "colour": obj.colour,
                    "rgb": list(obj.rgb),
                    "center": [obj.center_x, obj.center_y],
                    "radius": obj.radius,
                    "rotation": obj.rotation,
                    "full_area": geo.full_area,
                    "visible_area": geo.visible_area,
                    "visible_bbox": list(geo.bbox),
                    "visible_centroid": [round(c, 2) for c in geo.centroid],
                }
            )
        main_query = self.main_target_set or PhrasedQuery(
            self.query, self.is_sentence, self.texts, self.polygons
        )
        record = {
            **main_query.to_record(),
            "objects": objects,
            "background": self.background,
            "image_size": list(self.image.shape[:2]),
        }
        extras = [*self.extra_queries, *self.extra_target_sets]
        if extras:
            record["extra_queries"] = [extra.to_record() for extra in extras]
        if self.conversation is not None:
            record["conversation"] = [round_.to_record() for round_ in self.conversation]
        if self.extra_conversations:
            record["extra_conversations"] = [
                [round_.to_record() for round_ in conversation]
                for conversation in self.extra_conversations
            ]
        return record


@dataclass
class SyntheticSummary:
    """What :func:`main` wrote: the ReasonSeg root and per-split counts (as in the stats file)."""

    root: Path
    stats: dict[str, dict]


def query_schedule(rng: np.random.Generator, count: int) -> list[tuple[str, bool]]:
    """``(query_type, is_sentence)`` for each of ``count`` images, balanced and shuffled.

    Every block of 10 holds each of the 5 types once short and once long, so per split the type
    counts differ by at most 1, short/long by at most 1, and ``count >= 5`` covers every type.
    """
    schedule = [(QUERY_TYPES[i % 5], bool((i // 5 + i % 5) % 2)) for i in range(count)]
    return [schedule[int(k)] for k in rng.permutation(count)]


def generate_sample(
    rng: np.random.Generator,
    query_type: str,
    is_sentence: bool,
    config: SyntheticConfig,
    plan: TargetSetPlan | None = None,
) -> SyntheticSample:
    """Draw scenes until one is clear and has a unique-answer query of ``query_type`` (and, with
    a ``plan`` replacing the main query, a query of its kind), then add ``plan``'s query.

    Raises:
        RuntimeError: if :data:`MAX_ATTEMPTS` scenes fail (it means the settings are too tight).
    """
    size = config.image_size
    for _ in range(MAX_ATTEMPTS):
        num_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
        allow_overlap = bool(rng.random() < config.overlap_probability)
        # Crowded scenes get smaller objects (the same total area budget), else most of them
        # would fail to place or to stay visible and scenes would skew towards 3 objects.
        largest = max(MAX_RADIUS * math.sqrt(config.min_objects / num_objects), MIN_RADIUS + 0.04)
        radius_range = (MIN_RADIUS, largest)
        objects = sample_objects(rng, size, size, num_objects, allow_overlap, radius_range)
        if objects is None:
            continue
        full_masks, visible_masks = render_masks(objects, size, size)
        geometry = measure_objects(full_masks, visible_masks)
        if not scene_is_clear(objects, visible_masks, geometry):
            continue
        candidates = candidate_queries(query_type, objects, geometry, size)
        if not candidates:
            continue
        query = choose_query(rng, candidates)
        polygons = exact_polygons(visible_masks[query.target])
        if polygons is None:
            continue
        if plan is not None:
            object_polygons = [exact_polygons(mask) for mask in visible_masks]
            set_candidates = target_set_candidates(plan.kind, objects, geometry, object_polygons)
            if plan.as_main and not set_candidates:
                continue
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        image = render_image(rng, objects, full_masks, background)
        texts = phrase_query(rng, query, is_sentence, config.texts_per_query)
        # Drawn last, so the main query and the picture do not depend on --extra_queries.
        extras = extra_scene_queries(
            rng,
            objects,
            geometry,
            visible_masks,
            query.target,
            config.extra_queries,
            config.texts_per_query,
        )
        sample = SyntheticSample(
            image, objects, geometry, background, query, is_sentence, texts, polygons, extras
        )
        if config.conversations:
            sample.conversation = scene_conversation(rng, objects, geometry, visible_masks)
        if sample.conversation is not None:
            # Drawn after the first, which stays the same for any --extra_conversations.
            for _ in range(config.extra_conversations):
                extra = scene_conversation(rng, objects, geometry, visible_masks)
                if extra is not None:
                    sample.extra_conversations.append(extra)
        if plan is not None and set_candidates:
            drawn = plan.draw(set_candidates, object_polygons, is_sentence, config.texts_per_query)
            sample.main_target_set = drawn if plan.as_main else None
            sample.extra_target_sets = [] if plan.as_main else [drawn]
        return sample
    raise RuntimeError(
        f"no clear scene with a unique {query_type} query in {MAX_ATTEMPTS} attempts "
        f"(image_size={size}, objects {config.min_objects}-{config.max_objects})"
    )


def scene_conversation(
    rng: np.random.Generator,
    objects: list[SceneObject],
    geometry: list[ObjectGeometry],
    visible_masks: np.ndarray,
) -> list[ConversationRound] | None:
    """A multi-round conversation about the scene (``None`` if no round 2 is possible); see
    :func:`prepare_datasets.synthetic.conversations.build_conversation`.

    Args:
        visible_masks: ``(N, H, W)`` bool visible region of each object.
    """
    layout = scene_layout(objects, geometry, visible_masks)
    polygons = [exact_polygons(mask) for mask in visible_masks]
    return build_conversation(rng, objects, geometry, layout, polygons)


def extra_scene_queries(
    rng: np.random.Generator,
    objects: list[SceneObject],
    geometry: list[ObjectGeometry],
    visible_masks: np.ndarray,
    main_target: int,
    count: int,
    texts_per_query: int,
) -> list[PhrasedQuery]:
    """Up to ``count`` further unique-answer queries about the scene, each about another object.

    Each one draws a query type uniformly among those that still have a query about an object
    not asked for yet, then a query with :func:`choose_query`, and a random form (short or long).
    Asked together about one picture, they can only be told apart by their words.

    Args:
        visible_masks: ``(N, H, W)`` bool visible region of each object.
    """
    if count == 0:
        return []
    side = min(visible_masks.shape[1:])
    candidates = [
        query
        for query_type in QUERY_TYPES
        for query in candidate_queries(query_type, objects, geometry, side)
    ]
    used, extras = {main_target}, []
    while len(extras) < count:
        open_queries = [q for q in candidates if q.target not in used]
        types = sorted({q.query_type for q in open_queries})
        if not types:
            break
        query_type = types[int(rng.integers(len(types)))]
        query = choose_query(rng, [q for q in open_queries if q.query_type == query_type])
        used.add(query.target)
        polygons = exact_polygons(visible_masks[query.target])
        if polygons is None:
            continue
        is_sentence = bool(rng.random() < 0.5)
        texts = phrase_query(rng, query, is_sentence, texts_per_query)
        extras.append(PhrasedQuery(query, is_sentence, texts, polygons))
    return extras


def _jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    # 4:4:4 chroma keeps the flat colours clean at object borders.
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def write_split(root: Path, split: str, count: int, config: SyntheticConfig) -> dict:
    """Generate ``count`` images of ``split`` into ``root/<split>``; return its statistics."""
    split_code = SPLITS.index(split)
    schedule_rng = np.random.default_rng([config.seed, split_code])
    schedule = query_schedule(schedule_rng, count)
    fractions = (config.no_target_queries, config.multi_target_queries)
    kinds = target_set_kinds(schedule_rng, count, *fractions)  # drawn after: the schedule stays
    partial = root / f".{split}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    types, subtypes, forms, overlaps, objects = Counter(), Counter(), Counter(), 0, 0
    extra_queries, conversations, extra_conversations, target_sets = 0, Counter(), 0, Counter()
    bar = tqdm(schedule, desc=f"synthetic {split}", unit="img", disable=not config.progress)
    for index, (query_type, is_sentence) in enumerate(bar):
        rng = np.random.default_rng([config.seed, split_code, index])
        plan = TargetSetPlan.for_picture(
            kinds[index], split != "train", config.seed, split_code, index
        )
        sample = generate_sample(rng, query_type, is_sentence, config, plan)
        stem = f"{split}_{index:05d}"
        (partial / f"{stem}.jpg").write_bytes(_jpeg_bytes(sample.image, config.jpeg_quality))
        (partial / f"{stem}.json").write_text(json.dumps(sample.to_record()) + "\n")
        main = sample.main_target_set.query if sample.main_target_set else None
        main_type = main.kind if main else query_type
        types[main_type] += 1
        subtypes[f"{main_type}/{main.subtype if main else sample.query.subtype}"] += 1
        for drawn in filter(None, [sample.main_target_set, *sample.extra_target_sets]):
            target_sets[drawn.query.kind] += 1
        forms["long" if is_sentence else "short"] += 1
        overlaps += any(g.visible_area < g.full_area for g in sample.geometry)
        objects += len(sample.objects)
        extra_queries += len(sample.extra_queries)
        if config.conversations:
            count_conversation(conversations, sample.conversation)
            extra_conversations += len(sample.extra_conversations)
    final = root / split
    if final.exists():
        stale = root / f".{split}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale)
    else:
        os.replace(partial, final)
    stats = {
        "images": count,
        "query_types": dict(sorted(types.items())),
        "query_subtypes": dict(sorted(subtypes.items())),
        "forms": dict(sorted(forms.items())),
        "scenes_with_overlap": overlaps,
        "mean_objects": round(objects / max(count, 1), 3),
        "extra_queries": extra_queries,
    }
    if config.no_target_queries or config.multi_target_queries:
        stats["no_target_queries"] = target_sets[NO_TARGET]
        stats["multi_target_queries"] = target_sets[MULTI_TARGET]
    if config.conversations:
        stats.update(conversation_stats(conversations))
    if config.extra_conversations:
        stats["extra_conversations"] = extra_conversations
    return stats


def _refuse_foreign_data(root: Path, overwrite: bool) -> None:
    """Split folders are replaced only when an earlier synthetic run wrote them (its
    ``synthetic_config.json`` sits beside them) or with ``--overwrite``."""
    if overwrite or (root / "synthetic_config.json").is_file():
        return
    occupied = [root / s for s in SPLITS if (root / s).is_dir() and any((root / s).iterdir())]
    if occupied:
        names = ", ".join(str(p) for p in occupied)
        raise FileExistsError(
            f"{names}: not written by prepare_synthetic and would be replaced; choose another "
            "--out_dir or give --overwrite: --out_dir"
        )


def main(config: SyntheticConfig) -> SyntheticSummary:
    """Write every split, the resolved config and the statistics; return where they are."""
    config.validate()
    root = Path(config.out_dir) / "reason_seg" / "ReasonSeg"
    _refuse_foreign_data(root, config.overwrite)
    root.mkdir(parents=True, exist_ok=True)
    save_config(config, root / "synthetic_config.json")
    counts = {"train": config.num_train, "val": config.num_val, "test": config.num_test}
    stats = {split: write_split(root, split, counts[split], config) for split in SPLITS}
    stats_path = root / "synthetic_stats.json"
    tmp = stats_path.with_name(stats_path.name + ".tmp")
    tmp.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(tmp, stats_path)
    for split in SPLITS:
        entry = stats[split]
        types = " ".join(f"{name}={entry['query_types'].get(name, 0)}" for name in QUERY_TYPES)
        logger.info(
            "%s: %d images (%s; short=%d long=%d; %d with overlap)",
            split,
            entry["images"],
            types,
            entry["forms"].get("short", 0),
            entry["forms"].get("long", 0),
            entry["scenes_with_overlap"],
        )
        if config.conversations:
            logger.info(
                "%s: %d conversations (%d scenes without one), rounds %s, relations %s",
                split,
                entry["conversations"],
                entry["conversations_omitted"],
                entry["conversation_rounds"],
                entry["relations"],
            )
    logger.info("synthetic ReasonSeg written to %s", root)
    return SyntheticSummary(root, stats)


if __name__ == "__main__":
    run_cli(main, SyntheticConfig, aliases={"out_dir": ["--dataset_dir"]})
