"""Synthetic queries whose answer is not one object: *no-target* and *multi-target* queries.

A no-target query names something the scene does not hold, phrased like the single-target
queries of :mod:`prepare_datasets.synthetic.queries`, so only the picture tells a model that the
answer is "nothing" (the data convention of :mod:`utils.data.rejection`):

- ``colour``: a colour no object has ("the purple object"), in the attribute queries' words;
- ``shape``: a kind of shape absent from the scene ("the star");
- ``colour_shape``: a colour and a shape that are both in the scene, never on one object
  ("the red star" beside a red circle and a blue star: the hardest kind);
- a function or geometry subtype ("the shape with a hole in the middle") whose shapes are absent.

A multi-target query asks for every object sharing a property that at least two objects have
("every blue object", "all the circles"); its ground truth is the union of their visible regions.
Each of its polygons carries labelme's ``group_id``: the index of the object it outlines, so a
reader can also rasterise every target on its own (``--multi_target_answer per_instance``).

Shape words that a reader could take for each other count as the same shape here: a ring is a
kind of circle to many readers, so "the circle" is never a no-target query beside a ring and
"all the circles" is never asked beside one; "the object with four right angles" is not asked
beside a cross, which has right angles too. Named shapes of multi-target queries must be at
least 90% visible (as single-target shape queries), so their form can be seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from prepare_datasets.synthetic.queries import (
    FUNCTION_SHAPES,
    GEOMETRY_SHAPES,
    SHAPE_SUBTYPES,
    SHAPE_VISIBLE_FRACTION,
    TEMPLATES,
    choose_query,
    parse_templates,
)
from prepare_datasets.synthetic.scenes import COLOURS, SHAPES, ObjectGeometry, SceneObject

NO_TARGET, MULTI_TARGET = "no_target", "multi_target"
KINDS = (NO_TARGET, MULTI_TARGET)

# Shapes a reader may call by the other's name (see the module docstring).
CONFUSABLE = {"circle": ("ring",), "ring": ("circle",)}
# Shapes that also fit a function/geometry query's words besides those that answer it.
ALSO_FITS = {"four_corners": ("cross",)}
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}

# Same table format as queries.py: "subtype | S (noun phrase, no article) or L | text", with
# {colour}, {shape} and {shapes} (the plural) filled in. No-target ``colour`` and function or
# geometry subtypes reuse the single-target phrasings of queries.py.
_TEMPLATE_TABLE = """
shape | S | {shape}
shape | S | {shape} in the picture
shape | S | object shaped like a {shape}
shape | L | Where is the {shape} in this picture?
shape | L | Find the {shape} in the image.
shape | L | Which object here is a {shape}?
colour_shape | S | {colour} {shape}
colour_shape | S | {shape} painted {colour}
colour_shape | S | {shape} whose colour is {colour}
colour_shape | L | Where is the {colour} {shape} in this picture?
colour_shape | L | Find the {shape} that has been painted {colour}.
colour_shape | L | Which object is a {colour} {shape}?
all_colour | S | {colour} objects
all_colour | S | shapes painted {colour}
all_colour | S | things whose colour is {colour}
all_colour | L | Which objects in this picture are {colour}?
all_colour | L | Find every shape that has been painted {colour}.
all_colour | L | Several things here are {colour}; please show me all of them.
all_shape | S | {shapes}
all_shape | S | {shape} shapes
all_shape | S | objects shaped like a {shape}
all_shape | L | Where are all the {shapes} in this picture?
all_shape | L | Find every {shape} in the image.
all_shape | L | There is more than one {shape} here; please show me all of them.
"""


SET_TEMPLATES = {**TEMPLATES, **parse_templates(_TEMPLATE_TABLE)}
# A multi-target query's subtype in the json is "colour"/"shape"; its phrasings are these.
_MULTI_TEMPLATE_KEYS = {"colour": "all_colour", "shape": "all_shape"}


@dataclass(frozen=True)
class TargetSetQuery:
    """A query answered by no object or by several.

    Attributes:
        kind: :data:`NO_TARGET` or :data:`MULTI_TARGET`.
        subtype: ``colour``, ``shape``, ``colour_shape`` or a function/geometry subtype.
        targets: indices of the objects that answer it (empty for a no-target query).
        colour, shape: the colour and shape it names, if any.
    """

    kind: str
    subtype: str
    targets: tuple[int, ...]
    colour: str | None = None
    shape: str | None = None


def _fits_shape(obj: SceneObject, shape: str) -> bool:
    return obj.shape == shape or obj.shape in CONFUSABLE.get(shape, ())


def no_target_candidates(objects: list[SceneObject]) -> list[TargetSetQuery]:
    """Every no-target query of the scene (there always are some: 8 colours, at most 7 objects)."""
    colours = {o.colour for o in objects}
    queries = [
        TargetSetQuery(NO_TARGET, "colour", (), colour=c) for c, _ in COLOURS if c not in colours
    ]
    present = [s for s in SHAPES if any(_fits_shape(o, s) for o in objects)]
    queries += [TargetSetQuery(NO_TARGET, "shape", (), shape=s) for s in SHAPES if s not in present]
    for colour, _ in COLOURS:
        for shape in present:
            if colour in colours and not any(
                o.colour == colour and _fits_shape(o, shape) for o in objects
            ):
                queries.append(TargetSetQuery(NO_TARGET, "colour_shape", (), colour, shape))
    for subtype, _ in FUNCTION_SHAPES + GEOMETRY_SHAPES:
        fitting = SHAPE_SUBTYPES[subtype] + ALSO_FITS.get(subtype, ())
        if not any(o.shape in fitting for o in objects):
            queries.append(TargetSetQuery(NO_TARGET, subtype, ()))
    return queries


def multi_target_candidates(
    objects: list[SceneObject],
    geometry: list[ObjectGeometry],
    polygons: list[list[np.ndarray] | None],
) -> list[TargetSetQuery]:
    """Every multi-target query of the scene: a colour or a shape that two or more objects have.

    Args:
        polygons: each object's exact labelme polygons (``None`` where none rasterise exactly:
            a query with such a target is not offered).
    """
    queries = []
    for colour, _ in COLOURS:
        targets = tuple(i for i, o in enumerate(objects) if o.colour == colour)
        if len(targets) >= 2 and all(polygons[i] is not None for i in targets):
            queries.append(TargetSetQuery(MULTI_TARGET, "colour", targets, colour=colour))
    for shape in SHAPES:
        targets = tuple(i for i, o in enumerate(objects) if _fits_shape(o, shape))
        if len(targets) < 2 or any(objects[i].shape != shape for i in targets):
            continue  # "all the circles" beside a ring is ambiguous
        if all(
            polygons[i] is not None and geometry[i].visible_fraction >= SHAPE_VISIBLE_FRACTION
            for i in targets
        ):
            queries.append(TargetSetQuery(MULTI_TARGET, "shape", targets, shape=shape))
    return queries


def target_set_candidates(
    kind: str,
    objects: list[SceneObject],
    geometry: list[ObjectGeometry],
    polygons: list[list[np.ndarray] | None],
) -> list[TargetSetQuery]:
    """:func:`no_target_candidates` or :func:`multi_target_candidates`, by ``kind``."""
    if kind == NO_TARGET:
        return no_target_candidates(objects)
    if kind == MULTI_TARGET:
        return multi_target_candidates(objects, geometry, polygons)
    raise ValueError(f"unknown target-set kind {kind!r}; expected one of {KINDS}")


def phrase_target_set(
    rng: np.random.Generator, query: TargetSetQuery, is_sentence: bool, num_texts: int
) -> list[str]:
    """``num_texts`` different phrasings of ``query`` (short noun phrases or long sentences)."""
    key = _MULTI_TEMPLATE_KEYS[query.subtype] if query.kind == MULTI_TARGET else query.subtype
    templates = SET_TEMPLATES[(key, is_sentence)]
    order = rng.permutation(len(templates))[: min(num_texts, len(templates))]
    shape = query.shape or ""
    return [
        templates[int(k)].format(colour=query.colour, shape=shape, shapes=PLURALS.get(shape, ""))
        for k in order
    ]


@dataclass
class PhrasedTargetSet:
    """A :class:`TargetSetQuery` with its form, phrasings and its targets' labelme polygons
    (``owners``: the object index of each polygon, in ``polygons`` order)."""

    query: TargetSetQuery
    is_sentence: bool
    texts: list[str]
    polygons: list[np.ndarray]
    owners: list[int]

    def to_record(self) -> dict:
        """The query's ReasonSeg fields: ``shapes`` holds every target's polygons (the reader
        unions them), each with ``group_id``, its object's index; a no-target query has none
        and ``"no_target": true``."""
        record = {
            "text": self.texts,
            "is_sentence": self.is_sentence,
            "shapes": [
                {
                    "label": "target",
                    "points": polygon.tolist(),
                    "shape_type": "polygon",
                    "group_id": owner,
                }
                for polygon, owner in zip(self.polygons, self.owners, strict=True)
            ],
            "query_type": self.query.kind,
            "query_subtype": self.query.subtype,
            "target": None,
            "targets": list(self.query.targets),
            "reference": None,
        }
        if self.query.kind == NO_TARGET:
            record["no_target"] = True
        return record


def draw_target_set(
    rng: np.random.Generator,
    candidates: list[TargetSetQuery],
    polygons: list[list[np.ndarray] | None],
    is_sentence: bool | None,
    num_texts: int,
) -> PhrasedTargetSet:
    """One of ``candidates``, phrased (``is_sentence=None``: short or long at random)."""
    query = choose_query(rng, candidates)  # a subtype uniformly, then a query of it
    if is_sentence is None:
        is_sentence = bool(rng.random() < 0.5)
    texts = phrase_target_set(rng, query, is_sentence, num_texts)
    target_polygons = [p for i in query.targets for p in polygons[i]]
    owners = [i for i in query.targets for _ in polygons[i]]
    return PhrasedTargetSet(query, is_sentence, texts, target_polygons, owners)


# 4th seed word of a picture's no/multi-target generator; never 0, as numpy pads seeds with
# zeros, so [seed, split, index, 0] would be the picture's own generator.
TARGET_SET_STREAM = 1


@dataclass
class TargetSetPlan:
    """A no-target or multi-target query to give one picture.

    Attributes:
        kind: :data:`NO_TARGET` or :data:`MULTI_TARGET`.
        as_main: replace the main query (val/test) instead of adding an extra query (train).
        rng: the query's own generator, so the rest of the picture does not depend on it.
    """

    kind: str
    as_main: bool
    rng: np.random.Generator

    @classmethod
    def for_picture(
        cls, kind: str | None, as_main: bool, seed: int, split_code: int, index: int
    ) -> TargetSetPlan | None:
        """The plan of picture ``index`` of a split (``None`` when ``kind`` is)."""
        if kind is None:
            return None
        rng = np.random.default_rng([seed, split_code, index, TARGET_SET_STREAM])
        return cls(kind, as_main, rng)

    def draw(
        self,
        candidates: list[TargetSetQuery],
        polygons: list[list[np.ndarray] | None],
        is_sentence: bool,
        num_texts: int,
    ) -> PhrasedTargetSet:
        """One of ``candidates``, phrased: in the picture's scheduled form (``is_sentence``)
        as its main query, in a random form as an extra query."""
        form = is_sentence if self.as_main else None
        return draw_target_set(self.rng, candidates, polygons, form, num_texts)


def target_set_kinds(
    rng: np.random.Generator, count: int, no_target_fraction: float, multi_target_fraction: float
) -> list[str | None]:
    """Per picture :data:`NO_TARGET`, :data:`MULTI_TARGET` or ``None``: each fraction of
    ``count`` (rounded half up) at random places, never both on one picture. Draws nothing from
    ``rng`` when both counts are 0 (so the output stays as without the options)."""
    kinds: list[str | None] = [None] * count
    num_no_target = math.floor(no_target_fraction * count + 0.5)
    num_multi = min(math.floor(multi_target_fraction * count + 0.5), count - num_no_target)
    if num_no_target + num_multi == 0:
        return kinds
    order = [int(k) for k in rng.permutation(count)]
    for k in order[:num_no_target]:
        kinds[k] = NO_TARGET
    for k in order[num_no_target : num_no_target + num_multi]:
        kinds[k] = MULTI_TARGET
    return kinds
