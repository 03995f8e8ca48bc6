"""Relations between annotated instances, for generated multi-round conversations.

"The cup left of instance 1" is only a fair question when exactly one cup fits. These functions
decide which instances of a category stand in a relation to a referenced one (left/right/above/
below with a centre offset of more than ``DIRECTION_OFFSET`` of the image side and overlap on the
other axis; "next to" = the nearest, the runner-up at least ``NEXT_TO_RATIO`` as far; "the other"
of exactly two; larger/smaller by ``SIZE_RATIO``), and whether the answer is unique
(``prepare_datasets/prepare_mrseg.py`` emits only relations with a unique answer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RELATION_PHRASES = {
    "left": "left of", "right": "right of", "above": "above", "below": "below",
    "next_to": "next to", "other": "other than", "larger": "larger than",
    "smaller": "smaller than",
}  # fmt: skip
DIRECTION_OFFSET = 0.1  # centre offset, fraction of the image width (left/right) or height
NEXT_TO_RATIO = 1.3  # the runner-up must be at least this much farther than the nearest
SIZE_RATIO = 1.5  # larger: area >= 1.5x the reference's; smaller: <= 1/1.5x


@dataclass(frozen=True)
class Instance:
    """A COCO annotation: ``box`` is ``(x0, y0, x1, y1)`` in pixels, ``area`` its mask area."""

    ann_id: int
    category: str
    box: tuple[float, float, float, float]
    area: float
    crowd: bool = False

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass
class ImageGroup:
    """The refs of one image in one split of one dataset, and all the image's instances.

    ``expressions`` maps each referred annotation id to its sentences (in ref order).
    """

    dataset: str
    image_id: int
    file_name: str
    width: int
    height: int
    expressions: dict[int, list[str]]
    instances: dict[int, Instance]


def _overlap(a0: float, a1: float, b0: float, b1: float) -> bool:
    return min(a1, b1) > max(a0, b0)


def _direction_holds(relation: str, a: Instance, b: Instance, width: int, height: int) -> bool:
    """Is B ``relation`` (left/right/above/below) of A?"""
    (ax, ay), (bx, by) = a.center, b.center
    rows_overlap = _overlap(a.box[1], a.box[3], b.box[1], b.box[3])
    columns_overlap = _overlap(a.box[0], a.box[2], b.box[0], b.box[2])
    if relation in ("left", "right"):
        offset = ax - bx if relation == "left" else bx - ax
        return offset > DIRECTION_OFFSET * width and rows_overlap
    offset = ay - by if relation == "above" else by - ay
    return offset > DIRECTION_OFFSET * height and columns_overlap


def relation_answers(
    relation: str, reference: Instance, candidates: list[Instance], width: int, height: int
) -> list[int]:
    """Annotation ids of the ``candidates`` that satisfy "the {cat} {relation} <reference>".

    Args:
        relation: a key of :data:`RELATION_PHRASES`.
        reference: instance A (the earlier round's target).
        candidates: the instances of one category (the target's); A itself is ignored.
        width, height: the image size in pixels.
    Returns:
        The satisfying ids; the relation may be emitted only when there is exactly one. For
        ``next_to`` the two nearest when the runner-up is closer than 1.3x the nearest, none with
        fewer than two candidates; for ``other`` the others of A's category when B's is A's.
    """
    others = [c for c in candidates if c.ann_id != reference.ann_id]
    if relation in ("left", "right", "above", "below"):
        return [c.ann_id for c in others if _direction_holds(relation, reference, c, width, height)]
    if relation == "larger":
        return [c.ann_id for c in others if c.area >= SIZE_RATIO * reference.area]
    if relation == "smaller":
        return [c.ann_id for c in others if c.area * SIZE_RATIO <= reference.area]
    if relation == "other":
        return [c.ann_id for c in others if c.category == reference.category]
    if relation == "next_to":
        if len(others) < 2:
            return []
        ax, ay = reference.center
        ranked = sorted((math.hypot(c.center[0] - ax, c.center[1] - ay), c.ann_id) for c in others)
        (nearest, first), (runner_up, second) = ranked[:2]
        unique = runner_up > 0 and runner_up >= NEXT_TO_RATIO * nearest
        return [first] if unique else [first, second]
    raise ValueError(f"unknown relation {relation!r}; known: {sorted(RELATION_PHRASES)}")


def unique_answer(
    relation: str, reference: Instance, candidates: list[Instance], width: int, height: int
) -> int | None:
    """The one id satisfying the relation (see :func:`relation_answers`), else None."""
    answers = relation_answers(relation, reference, candidates, width, height)
    return answers[0] if len(answers) == 1 else None


# ---- reading ----------------------------------------------------------------------------------
