"""Reasoning queries about a synthetic scene, each with exactly one answer, in short and long forms.

Five query types, each needing more than the name of the target's class:

- attribute (colour): the only object of a colour ("the red one");
- function (roll, thread, plus, roof, sky, tile, honeycomb): what the shape could be used as
  ("something that could roll down a slope");
- geometry (three_corners, four_corners, six_corners, five_points, four_arms, no_corners, hole,
  solid_round): corners, sides and holes ("the shape with exactly three corners");
- comparison (largest, smallest): visible and full area, with a margin;
- spatial (leftmost, rightmost, topmost, bottommost, above, below, left_of, right_of): positions,
  with margins ("the object directly above the star").

Uniqueness is checked by construction with margins: every candidate query is derived from the
measured scene, and a query is only offered when exactly one object satisfies a *loose* version of
its condition and that object also satisfies a *strict* version (e.g. "the object above the star":
exactly one object lies above the star's centre with any horizontal overlap, and that one overlaps
by at least 40%, sits clearly higher, and its bottom edge stays above the star's centre).
Shape-based queries need their target (and a reference named by its shape) at least 90% visible,
so its corners can be counted in the picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prepare_datasets.synthetic.scenes import ObjectGeometry, SceneObject

QUERY_TYPES = ("attribute", "function", "geometry", "comparison", "spatial")

# Subtype -> the shapes that answer it (a query is unique when exactly one object's shape is in it).
FUNCTION_SHAPES = (
    ("roll", ("circle", "ring")),
    ("thread", ("ring",)),
    ("plus", ("cross",)),
    ("roof", ("triangle",)),
    ("sky", ("star",)),
    ("tile", ("square",)),
    ("honeycomb", ("hexagon",)),
)
GEOMETRY_SHAPES = (
    ("three_corners", ("triangle",)),
    ("four_corners", ("square",)),
    ("six_corners", ("hexagon",)),
    ("five_points", ("star",)),
    ("four_arms", ("cross",)),
    ("no_corners", ("circle", "ring")),
    ("hole", ("ring",)),
    ("solid_round", ("circle",)),
)
SHAPE_SUBTYPES = dict(FUNCTION_SHAPES + GEOMETRY_SHAPES)

SHAPE_VISIBLE_FRACTION = 0.9  # shape-based targets/references must be this unoccluded
SIZE_RATIO = 1.3  # "largest"/"smallest": margin over the runner-up, on visible and full area
EXTREME_MARGIN = 0.08  # "leftmost" etc.: centroid margin over the runner-up, fraction of the side
RELATION_OVERLAP = 0.4  # "above X" etc.: overlap across the direction, fraction of narrower one
RELATION_GAP = 0.06  # "above X" etc.: centroid gap along the direction, fraction of the side

# One phrasing per line: "subtype | S (short noun phrase, no article, since templates such as
# "Can you segment the {} in this image?" add it) or L (long sentence) | text", where {colour}
# and {ref} are filled in. A plain table reads better than nested literals for 150 strings.
_TEMPLATE_TABLE = """
colour | S | {colour} object
colour | S | {colour} shape
colour | S | thing painted {colour}
colour | S | only {colour} item
colour | L | Which object in this picture is {colour}?
colour | L | Find the shape that has been painted {colour}.
colour | L | Exactly one thing here is {colour}; please show me where it is.
colour | L | I am looking for the object whose colour is {colour}. Which one is it?
roll | S | thing that could roll down a slope
roll | S | object that could be used as a wheel
roll | S | shape that would roll away if pushed
roll | L | Which object could roll down a slope if you let go of it?
roll | L | If these shapes were put on a ramp, which one would roll away?
roll | L | Something here could serve as a wheel for a toy car. Which is it?
thread | S | thing you could thread onto a string
thread | S | object you could slip over a finger
thread | S | shape you could hang on a hook through its middle
thread | L | Which object could be threaded onto a string like a bead?
thread | L | I want something I could slip over my finger. Which object would work?
thread | L | Which shape could you hang on a hook through the gap in its middle?
plus | S | symbol used for adding numbers
plus | S | shape like the sign on a first aid kit
plus | S | thing that could mark a hospital on a map
plus | L | Which shape looks like the symbol we use to add two numbers?
plus | L | Find the object that resembles the sign on a first aid kit.
plus | L | Which of these could mark a hospital on a map?
roof | S | shape of a roof seen from the side
roof | S | thing shaped like a slice of pizza
roof | S | shape of a warning sign by the road
roof | L | Which object has the shape of a house roof seen from the side?
roof | L | Find the shape that looks like a slice of pizza.
roof | L | Which object could be a warning sign at the side of a road?
sky | S | thing that twinkles in the night sky
sky | S | shape of a sheriff badge
sky | S | shape you draw to give a top rating
sky | L | Which object looks like something that twinkles in the night sky?
sky | L | Find the shape a sheriff might wear as a badge.
sky | L | Which shape would you draw to give a film a top rating?
tile | S | shape like a sticky note
tile | S | shape of one face of a dice
tile | S | shape of a box seen from the front
tile | L | Which object has the shape of a sticky note?
tile | L | Find the shape that looks like one face of a dice.
tile | L | Which object looks like a box seen straight from the front?
honeycomb | S | shape of a cell in a honeycomb
honeycomb | S | shape of a nut that fits on a bolt
honeycomb | S | shape of a pencil seen from its end
honeycomb | L | Which object has the shape of a cell in a honeycomb?
honeycomb | L | Find the shape that looks like a nut you would screw onto a bolt.
honeycomb | L | Which object looks like a pencil seen from its end?
three_corners | S | shape with exactly three corners
three_corners | S | figure with three straight sides
three_corners | S | object made of three edges
three_corners | L | Which shape has exactly three corners?
three_corners | L | Find the figure that is made of three straight sides.
three_corners | L | Count the corners: which object has three of them?
four_corners | S | shape with four equal sides
four_corners | S | figure with exactly four corners
four_corners | S | object with four right angles
four_corners | L | Which shape has four equal sides?
four_corners | L | Find the figure with exactly four corners.
four_corners | L | Which object has four right angles?
six_corners | S | shape with six corners
six_corners | S | figure with six straight sides
six_corners | S | object with six equal edges
six_corners | L | Which shape has exactly six corners?
six_corners | L | Find the figure that is made of six straight sides.
six_corners | L | Count the edges: which object has six of them?
five_points | S | shape with five points
five_points | S | figure with five sharp tips
five_points | S | object with five spikes
five_points | L | Which shape has five points sticking out?
five_points | L | Find the figure with five sharp tips.
five_points | L | Which object has exactly five spikes around its centre?
four_arms | S | shape with four equal arms
four_arms | S | figure with twelve corners
four_arms | S | object made of two crossing bars
four_arms | L | Which shape has four arms of equal length?
four_arms | L | Find the figure that has twelve corners.
four_arms | L | Which object looks like two bars crossing each other in the middle?
no_corners | S | shape with no corners
no_corners | S | figure without any straight edges
no_corners | S | object with a curved outline and no corners
no_corners | L | Which shape has no corners at all?
no_corners | L | Find the figure that has no straight edges.
no_corners | L | Which object has only a curved outline, without a single corner?
hole | S | shape with a hole in the middle
hole | S | figure you can see through at its centre
hole | S | object with an empty centre
hole | L | Which shape has a hole in the middle?
hole | L | Find the figure you could look through at its centre.
hole | L | Which object has an empty centre where the background shows?
solid_round | S | round shape without a hole
solid_round | S | solid figure with no corners
solid_round | S | object that is round and filled in
solid_round | L | Which shape is round and has no hole in it?
solid_round | L | Find the solid figure that has no corners.
solid_round | L | Which object is perfectly round and completely filled in?
largest | S | largest object
largest | S | biggest shape
largest | S | object that covers the most area
largest | L | Which object is the largest in this picture?
largest | L | Find the biggest shape in the image.
largest | L | Of all the objects here, which one covers the most area?
smallest | S | smallest object
smallest | S | tiniest shape
smallest | S | object that covers the least area
smallest | L | Which object is the smallest in this picture?
smallest | L | Find the tiniest shape in the image.
smallest | L | Of all the objects here, which one covers the least area?
leftmost | S | leftmost object
leftmost | S | object furthest to the left
leftmost | S | shape closest to the left edge
leftmost | L | Which object is furthest to the left?
leftmost | L | Find the shape that is closest to the left edge of the picture.
leftmost | L | Looking from left to right, which object comes first?
rightmost | S | rightmost object
rightmost | S | object furthest to the right
rightmost | S | shape closest to the right edge
rightmost | L | Which object is furthest to the right?
rightmost | L | Find the shape that is closest to the right edge of the picture.
rightmost | L | Looking from left to right, which object comes last?
topmost | S | highest object
topmost | S | topmost shape
topmost | S | object nearest the top edge
topmost | L | Which object is the highest in the picture?
topmost | L | Find the shape that is closest to the top edge of the image.
topmost | L | Looking from top to bottom, which object comes first?
bottommost | S | lowest object
bottommost | S | bottommost shape
bottommost | S | object nearest the bottom edge
bottommost | L | Which object is the lowest in the picture?
bottommost | L | Find the shape that is closest to the bottom edge of the image.
bottommost | L | Looking from top to bottom, which object comes last?
above | S | object directly above the {ref}
above | S | shape just over the {ref}
above | S | thing sitting above the {ref}
above | L | Which object is directly above the {ref}?
above | L | Find the shape that sits just over the {ref}.
above | L | Look at the {ref}; which object is right above it?
below | S | object directly below the {ref}
below | S | shape underneath the {ref}
below | S | thing beneath the {ref}
below | L | Which object is directly below the {ref}?
below | L | Find the shape that sits underneath the {ref}.
below | L | Look at the {ref}; which object is right below it?
left_of | S | object to the left of the {ref}
left_of | S | shape just left of the {ref}
left_of | S | thing on the left side of the {ref}
left_of | L | Which object is to the left of the {ref}?
left_of | L | Find the shape that sits just left of the {ref}.
left_of | L | Look at the {ref}; which object is next to it on its left?
right_of | S | object to the right of the {ref}
right_of | S | shape just right of the {ref}
right_of | S | thing on the right side of the {ref}
right_of | L | Which object is to the right of the {ref}?
right_of | L | Find the shape that sits just right of the {ref}.
right_of | L | Look at the {ref}; which object is next to it on its right?
"""


def parse_templates(table: str) -> dict[tuple[str, bool], tuple[str, ...]]:
    """``(key, is_sentence) -> phrasings`` of a ``"key | S or L | text"`` table, in table order
    (the query, relation and target-set tables all use it)."""
    templates: dict[tuple[str, bool], list[str]] = {}
    for line in table.strip().splitlines():
        subtype, form, text = (part.strip() for part in line.split("|"))
        templates.setdefault((subtype, form == "L"), []).append(text)
    return {key: tuple(texts) for key, texts in templates.items()}


TEMPLATES = parse_templates(_TEMPLATE_TABLE)

SUBTYPES = {
    "attribute": ("colour",),
    "function": tuple(name for name, _ in FUNCTION_SHAPES),
    "geometry": tuple(name for name, _ in GEOMETRY_SHAPES),
    "comparison": ("largest", "smallest"),
    "spatial": (
        "leftmost",
        "rightmost",
        "topmost",
        "bottommost",
        "above",
        "below",
        "left_of",
        "right_of",
    ),
}
# Relations: (centroid axis along the direction, sign: -1 = smaller coordinate than the reference).
_RELATIONS = {"above": (1, -1), "below": (1, 1), "left_of": (0, -1), "right_of": (0, 1)}
_EXTREMES = {"leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "bottommost": (1, 1)}


@dataclass(frozen=True)
class Query:
    """One reasoning query about a scene.

    Attributes:
        query_type: one of :data:`QUERY_TYPES`.
        subtype: one of ``SUBTYPES[query_type]``.
        target: index of the answer in the scene's object list.
        colour: the colour named by an attribute query.
        reference: index of the object a spatial relation refers to.
        reference_phrase: how that object is named ("star", "blue object").
    """

    query_type: str
    subtype: str
    target: int
    colour: str | None = None
    reference: int | None = None
    reference_phrase: str | None = None


def _unique(indices: list[int]) -> int | None:
    return indices[0] if len(indices) == 1 else None


def _shape_queries(query_type, pairs, objects, geometry) -> list[Query]:
    queries = []
    for subtype, shapes in pairs:
        target = _unique([i for i, o in enumerate(objects) if o.shape in shapes])
        if target is not None and geometry[target].visible_fraction >= SHAPE_VISIBLE_FRACTION:
            queries.append(Query(query_type, subtype, target))
    return queries


def _comparison_queries(geometry: list[ObjectGeometry]) -> list[Query]:
    queries = []
    for subtype, sign in (("largest", 1), ("smallest", -1)):
        order = sorted(range(len(geometry)), key=lambda i: -sign * geometry[i].visible_area)
        first, second = geometry[order[0]], geometry[order[1]]
        ratios = (first.visible_area / second.visible_area, first.full_area / second.full_area)
        if all((r if sign > 0 else 1.0 / r) >= SIZE_RATIO for r in ratios):
            queries.append(Query("comparison", subtype, order[0]))
    return queries


def _overlap(geo_a: ObjectGeometry, geo_b: ObjectGeometry, axis: int) -> float:
    """Overlap of two visible boxes along ``axis`` (0 = x), as a fraction of the narrower box."""
    low = max(geo_a.bbox[axis], geo_b.bbox[axis])
    high = min(geo_a.bbox[axis + 2], geo_b.bbox[axis + 2])
    narrower = min(geo_a.bbox[axis + 2] - geo_a.bbox[axis], geo_b.bbox[axis + 2] - geo_b.bbox[axis])
    return (high - low + 1) / (narrower + 1)


def _reference_phrases(objects, geometry) -> list[tuple[int, str]]:
    """Objects that can be named uniquely, with their names: by shape, or by colour."""
    phrases = []
    for index, obj in enumerate(objects):
        same_shape = sum(o.shape == obj.shape for o in objects)
        if same_shape == 1 and geometry[index].visible_fraction >= SHAPE_VISIBLE_FRACTION:
            phrases.append((index, obj.shape))
        if sum(o.colour == obj.colour for o in objects) == 1:
            phrases.append((index, f"{obj.colour} object"))
    return phrases


def _spatial_queries(objects, geometry, side: int) -> list[Query]:
    queries = []
    count = len(objects)
    for subtype, (axis, sign) in _EXTREMES.items():
        order = sorted(range(count), key=lambda i: sign * -geometry[i].centroid[axis])
        best, runner_up = geometry[order[0]], geometry[order[1]]
        margin = abs(best.centroid[axis] - runner_up.centroid[axis])
        edge = axis + (2 if sign > 0 else 0)  # bbox index of the edge on that side
        edges = [sign * geometry[i].bbox[edge] for i in range(count)]
        extreme_edge = edges[order[0]] > max(e for i, e in enumerate(edges) if i != order[0])
        if margin >= EXTREME_MARGIN * side and extreme_edge:
            queries.append(Query("spatial", subtype, order[0]))
    for reference, phrase in _reference_phrases(objects, geometry):
        ref = geometry[reference]
        for subtype, (axis, sign) in _RELATIONS.items():
            across = 1 - axis
            offsets = [sign * (g.centroid[axis] - ref.centroid[axis]) for g in geometry]
            loose = [
                i
                for i in range(count)
                if i != reference and offsets[i] > 0 and _overlap(geometry[i], ref, across) > 0
            ]
            target = _unique(loose)
            if target is None:
                continue
            # The target's edge facing the reference must not pass the reference's centre.
            facing = geometry[target].bbox[axis + (2 if sign < 0 else 0)]
            clearly_beyond = sign * (facing - ref.centroid[axis]) >= 0
            if (
                clearly_beyond
                and offsets[target] >= RELATION_GAP * side
                and _overlap(geometry[target], ref, across) >= RELATION_OVERLAP
            ):
                queries.append(Query("spatial", subtype, target, None, reference, phrase))
    return queries


def candidate_queries(
    query_type: str, objects: list[SceneObject], geometry: list[ObjectGeometry], side: int
) -> list[Query]:
    """All queries of ``query_type`` that have exactly one answer in this scene.

    Args:
        objects: the scene, in drawing order.
        geometry: the measured :class:`ObjectGeometry` of each object.
        side: the shorter image side in pixels (margins are fractions of it).
    """
    if query_type == "attribute":
        queries = []
        for colour in sorted({o.colour for o in objects}):
            target = _unique([i for i, o in enumerate(objects) if o.colour == colour])
            if target is not None:
                queries.append(Query("attribute", "colour", target, colour=colour))
        return queries
    if query_type == "function":
        return _shape_queries("function", FUNCTION_SHAPES, objects, geometry)
    if query_type == "geometry":
        return _shape_queries("geometry", GEOMETRY_SHAPES, objects, geometry)
    if query_type == "comparison":
        return _comparison_queries(geometry)
    if query_type == "spatial":
        return _spatial_queries(objects, geometry, side)
    raise ValueError(f"unknown query type {query_type!r}; expected one of {QUERY_TYPES}")


def choose_query(rng: np.random.Generator, candidates: list[Query]) -> Query:
    """A subtype uniformly among those available, then one of its queries uniformly.

    Choosing the subtype first keeps rare subtypes (e.g. "below the star") from being drowned by
    frequent ones (e.g. colour queries, of which a scene often has several).
    """
    subtypes = sorted({q.subtype for q in candidates})
    subtype = subtypes[int(rng.integers(len(subtypes)))]
    matching = [q for q in candidates if q.subtype == subtype]
    return matching[int(rng.integers(len(matching)))]


def phrase_query(
    rng: np.random.Generator, query: Query, is_sentence: bool, num_texts: int
) -> list[str]:
    """``num_texts`` different phrasings of ``query`` (short noun phrases or long sentences)."""
    templates = TEMPLATES[(query.subtype, is_sentence)]
    num_texts = min(num_texts, len(templates))
    order = rng.permutation(len(templates))[:num_texts]
    return [
        templates[int(k)].format(colour=query.colour, ref=query.reference_phrase) for k in order
    ]
