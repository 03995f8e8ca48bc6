"""Relations between the objects of a synthetic scene, for multi-round conversations.

A later round of a conversation names an earlier round's object ("object k") and asks for the
object in some relation to it. Each relation below maps a reference object to at most one answer,
read off the measured scene (what the json's ``objects`` hold: visible centroids rounded to 0.01
px, inclusive visible boxes, visible and full areas, colour and shape names) and, for contact, the
visible masks. ``None`` means the relation does not single out one object for that reference.

- ``left_of`` / ``right_of`` / ``above`` / ``below`` ("the object directly left of object k"):
  among the other objects whose visible centroid lies beyond the reference's in that direction
  and whose visible box overlaps the reference's across it, the nearest (along the direction).
  It must be offset by more than ``DIRECTION_MARGIN`` of the image side, overlap across by at least
  ``DIRECTION_OVERLAP`` of the narrower box, and the runner-up must be ``NEAREST_GAP`` of the side
  farther.
- ``closest`` ("the one closest to object k"): the other object with the nearest visible centroid;
  the runner-up must be at least ``CLOSEST_RATIO`` times as far.
- ``touching`` ("the object touching object k"): the only other object whose visible region lies
  within ``NEAR_PIXELS`` of the reference's, and it touches it (8-adjacent or overlapping visible
  pixels; visible regions are disjoint, so an occluding neighbour touches).
- ``same_colour`` ("the other shape with the same colour as object k"): exactly one other object
  has the reference's colour name.
- ``same_kind`` ("the other object of the same kind as object k"): exactly one other object has
  the reference's shape, and both are at least ``SHAPE_VISIBLE_FRACTION`` visible.
- ``larger`` / ``smaller``, optionally with a colour ("the smallest red object that is larger than
  object k"): among the other objects (of that colour) larger than the reference by visible or
  full area, the smallest (for ``smaller``: the largest of those smaller). It must be larger by
  ``SIZE_RATIO`` on both areas, and every other such object larger than it by ``SIZE_RATIO`` on
  both. (The plain "the red object larger than object k", unique, would always be the largest red
  object, so it would never need the reference.)

A relation is only asked when it is ambiguous without the reference: evaluating it for every
choice of reference in the scene yields at least two different answers
(:func:`relation_candidates`).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from prepare_datasets.synthetic.queries import SHAPE_VISIBLE_FRACTION, SIZE_RATIO
from prepare_datasets.synthetic.scenes import ObjectGeometry, SceneObject

DIRECTIONS = {"left_of": (0, -1), "right_of": (0, 1), "above": (1, -1), "below": (1, 1)}
COMPARISONS = {"larger": 1, "smaller": -1}
RELATIONS = (*DIRECTIONS, "closest", "touching", "same_colour", "same_kind", *COMPARISONS)

DIRECTION_MARGIN = 0.06  # centroid offset along the direction, fraction of the image side
DIRECTION_OVERLAP = 0.4  # overlap across the direction, fraction of the narrower visible box
NEAREST_GAP = 0.08  # the runner-up in the direction is this much farther, fraction of the side
CLOSEST_RATIO = 1.3  # "closest": the runner-up is at least this many times as far
NEAR_PIXELS = 4  # "touching": no other object's visible region within this many pixels


@dataclass(frozen=True)
class SceneLayout:
    """What the relations read of a scene of ``N`` objects.

    Attributes:
        colours, shapes: the objects' colour and shape names.
        centroids: ``(N, 2)`` visible centroids ``x, y`` as stored in the json (rounded to 0.01).
        boxes: ``(N, 4)`` inclusive visible boxes ``x0, y0, x1, y1``.
        visible_areas, full_areas: ``(N,)`` pixel counts.
        touching: ``(N, N)`` bool, visible regions 8-adjacent (or overlapping).
        near: ``(N, N)`` bool, visible regions within :data:`NEAR_PIXELS` of each other.
        side: the shorter image side in pixels (margins are fractions of it).
    """

    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    centroids: np.ndarray
    boxes: np.ndarray
    visible_areas: np.ndarray
    full_areas: np.ndarray
    touching: np.ndarray
    near: np.ndarray
    side: int

    @property
    def count(self) -> int:
        return len(self.colours)


@dataclass(frozen=True)
class Relation:
    """A relation to a referenced object: one of :data:`RELATIONS`, with the colour that
    ``larger``/``smaller`` may name (``None``: any object)."""

    name: str
    colour: str | None = None


@dataclass(frozen=True)
class RelationOption:
    """A relation whose answer given ``reference`` is exactly ``target`` while, without the
    reference, ``candidates`` (>= 2) different objects could be meant."""

    relation: Relation
    reference: int
    target: int
    candidates: int


def _within(masks: np.ndarray, pixels: int) -> np.ndarray:
    """``(N, N)`` bool: mask ``j`` has a pixel within ``pixels`` (chessboard) of mask ``i``."""
    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), dtype=np.uint8)
    count = len(masks)
    result = np.zeros((count, count), dtype=bool)
    for i in range(count):
        grown = cv2.dilate(masks[i].astype(np.uint8), kernel).astype(bool)
        for j in range(count):
            result[i, j] = i != j and bool((grown & masks[j]).any())
    return result


def scene_layout(
    objects: list[SceneObject], geometry: list[ObjectGeometry], visible_masks: np.ndarray
) -> SceneLayout:
    """The :class:`SceneLayout` of a scene from its objects, geometry and ``(N, H, W)`` bool
    visible masks."""
    return SceneLayout(
        colours=tuple(o.colour for o in objects),
        shapes=tuple(o.shape for o in objects),
        centroids=np.array([[round(c, 2) for c in g.centroid] for g in geometry], dtype=float),
        boxes=np.array([g.bbox for g in geometry], dtype=float),
        visible_areas=np.array([g.visible_area for g in geometry], dtype=float),
        full_areas=np.array([g.full_area for g in geometry], dtype=float),
        touching=_within(visible_masks, 1),
        near=_within(visible_masks, NEAR_PIXELS),
        side=min(visible_masks.shape[1:]),
    )


def _overlap_fraction(box_a: np.ndarray, box_b: np.ndarray, axis: int) -> float:
    """Overlap of two inclusive boxes along ``axis`` (0 = x), as a fraction of the narrower one;
    <= 0 when they do not overlap."""
    low, high = max(box_a[axis], box_b[axis]), min(box_a[axis + 2], box_b[axis + 2])
    narrower = min(box_a[axis + 2] - box_a[axis], box_b[axis + 2] - box_b[axis])
    return (high - low + 1) / (narrower + 1)


def _direction_answer(layout: SceneLayout, reference: int, axis: int, sign: int) -> int | None:
    offsets = sign * (layout.centroids[:, axis] - layout.centroids[reference, axis])
    ref_box = layout.boxes[reference]
    beyond = [
        i
        for i in range(layout.count)
        if i != reference
        and offsets[i] > 0
        and _overlap_fraction(layout.boxes[i], ref_box, 1 - axis) > 0
    ]
    if not beyond:
        return None
    beyond.sort(key=lambda i: offsets[i])
    nearest = beyond[0]
    if offsets[nearest] <= DIRECTION_MARGIN * layout.side:
        return None
    if _overlap_fraction(layout.boxes[nearest], ref_box, 1 - axis) < DIRECTION_OVERLAP:
        return None
    if len(beyond) > 1 and offsets[beyond[1]] - offsets[nearest] < NEAREST_GAP * layout.side:
        return None
    return nearest


def _closest_answer(layout: SceneLayout, reference: int) -> int | None:
    distances = np.linalg.norm(layout.centroids - layout.centroids[reference], axis=1)
    others = sorted((i for i in range(layout.count) if i != reference), key=lambda i: distances[i])
    if len(others) > 1 and distances[others[1]] < CLOSEST_RATIO * distances[others[0]]:
        return None
    return others[0]


def _only(indices: list[int]) -> int | None:
    return indices[0] if len(indices) == 1 else None


def _comparison_answer(
    layout: SceneLayout, reference: int, sign: int, colour: str | None
) -> int | None:
    visible, full = sign * layout.visible_areas, sign * layout.full_areas

    def clearly_beyond(a: int, b: int) -> bool:  # a larger (sign 1) than b by the margin
        return visible[a] >= visible[b] * SIZE_RATIO**sign and full[a] >= full[b] * SIZE_RATIO**sign

    beyond = [
        i
        for i in range(layout.count)
        if i != reference
        and colour in (None, layout.colours[i])
        and (visible[i] > visible[reference] or full[i] > full[reference])
    ]
    if not beyond:
        return None
    target = min(beyond, key=lambda i: visible[i])
    if not clearly_beyond(target, reference):
        return None
    return target if all(clearly_beyond(i, target) for i in beyond if i != target) else None


def relation_answer(layout: SceneLayout, relation: Relation, reference: int) -> int | None:
    """The one object in ``relation`` to object ``reference``, or ``None`` (see module doc)."""
    name, others = relation.name, [i for i in range(layout.count) if i != reference]
    if name in DIRECTIONS:
        return _direction_answer(layout, reference, *DIRECTIONS[name])
    if name == "closest":
        return _closest_answer(layout, reference)
    if name == "touching":
        near = [i for i in others if layout.near[reference, i]]
        return near[0] if len(near) == 1 and layout.touching[reference, near[0]] else None
    if name == "same_colour":
        return _only([i for i in others if layout.colours[i] == layout.colours[reference]])
    if name == "same_kind":
        target = _only([i for i in others if layout.shapes[i] == layout.shapes[reference]])
        visible = layout.visible_areas / layout.full_areas >= SHAPE_VISIBLE_FRACTION
        return target if target is not None and visible[target] and visible[reference] else None
    if name in COMPARISONS:
        return _comparison_answer(layout, reference, COMPARISONS[name], relation.colour)
    raise ValueError(f"unknown relation {name!r}; expected one of {RELATIONS}")


def relation_candidates(layout: SceneLayout, relation: Relation) -> int:
    """How many different objects ``relation`` singles out over every choice of reference: the
    objects a reader could mean when the reference is unknown."""
    answers = {relation_answer(layout, relation, k) for k in range(layout.count)}
    return len(answers - {None})


def relation_options(layout: SceneLayout) -> list[RelationOption]:
    """Every ``(relation, reference)`` of the scene with a unique answer that is ambiguous
    without the reference, in a fixed order (relation, colour, reference)."""
    relations = [Relation(name) for name in RELATIONS if name not in COMPARISONS]
    colours = [None, *sorted(set(layout.colours))]
    relations += [Relation(name, colour) for name in COMPARISONS for colour in colours]
    options = []
    for relation in relations:
        answers = [relation_answer(layout, relation, k) for k in range(layout.count)]
        candidates = len(set(answers) - {None})
        if candidates < 2:
            continue
        for reference, target in enumerate(answers):
            if target is not None:
                options.append(RelationOption(relation, reference, target, candidates))
    return options
