"""Multi-round conversations about a synthetic scene (SegLLM style), for ``--conversations``.

Round 1 asks one of the single-round queries (:mod:`prepare_datasets.synthetic.queries`). Every
later round names an earlier round's object as "object k" followed by the marker ``[REF:k]``
(1-based round index, :mod:`utils.data.references`) and asks for the object in a relation to it
(:mod:`prepare_datasets.synthetic.relations`): "the object directly left of object 1 [REF:1]".
The answer is unique given object k, and at least two objects of the scene could be meant without
it, so only the earlier round's mask answers the round. A round may name any earlier round,
including one that itself referred (a chain: round 3 about round 2's answer). Every round asks
about an object no earlier round asked about.

Per image: the number of rounds (2-5) is drawn first, then round 1 among the queries whose target
has at least one relation to follow with, then each later round: a relation name uniformly among
those still available (so frequent ones do not drown rare ones), then one of its
``(earlier round, answer)`` pairs uniformly, then a short or long phrasing. The conversation ends
early when no relation leads to a new object.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from prepare_datasets.synthetic.queries import (
    QUERY_TYPES,
    Query,
    candidate_queries,
    choose_query,
    parse_templates,
    phrase_query,
)
from prepare_datasets.synthetic.relations import RelationOption, SceneLayout, relation_options
from utils.data.references import format_reference

MIN_ROUNDS, MAX_ROUNDS = 2, 5
REFERRING = "referring"  # the query_type of a later round

# "relation | S (noun phrase without article) or L (sentence) | text"; {ref} becomes
# "object k [REF:k]" and {what} "object" or "<colour> object". Keywords stay apart ("left",
# "right", "above", "below", "closest"/"nearest", "touch", "same colour", "same kind",
# "larger than", "smaller than") so a reader of the words alone can tell the relations apart.
_TEMPLATE_TABLE = """
left_of | S | object directly left of {ref}
left_of | S | shape just to the left of {ref}
left_of | S | first thing on the left side of {ref}
left_of | L | Which object is directly to the left of {ref}?
left_of | L | Find the shape that sits just left of {ref}.
left_of | L | Look at {ref}; which object is next to it on its left?
right_of | S | object directly right of {ref}
right_of | S | shape just to the right of {ref}
right_of | S | first thing on the right side of {ref}
right_of | L | Which object is directly to the right of {ref}?
right_of | L | Find the shape that sits just right of {ref}.
right_of | L | Look at {ref}; which object is next to it on its right?
above | S | object directly above {ref}
above | S | shape just above {ref}
above | S | first thing sitting above {ref}
above | L | Which object is directly above {ref}?
above | L | Find the shape that sits just above {ref}.
above | L | Look at {ref}; which object is the first one above it?
below | S | object directly below {ref}
below | S | shape just beneath {ref}
below | S | first thing underneath {ref}
below | L | Which object is directly below {ref}?
below | L | Find the shape that sits just beneath {ref}.
below | L | Look at {ref}; which object is the first one underneath it?
closest | S | object closest to {ref}
closest | S | shape nearest to {ref}
closest | S | neighbour closest to {ref}
closest | L | Which object is the closest one to {ref}?
closest | L | Find the shape whose centre is nearest to {ref}.
closest | L | Of all the other objects, which one is closest to {ref}?
touching | S | object touching {ref}
touching | S | shape that touches {ref}
touching | S | thing that is touching {ref}
touching | L | Which object is touching {ref}?
touching | L | Find the shape that touches {ref}.
touching | L | One object touches {ref}; which is it?
same_colour | S | other shape with the same colour as {ref}
same_colour | S | other object painted the same colour as {ref}
same_colour | S | object of the same colour as {ref}
same_colour | L | Which other object has the same colour as {ref}?
same_colour | L | Find the other shape painted in the same colour as {ref}.
same_colour | L | Another object has the same colour as {ref}; which one?
same_kind | S | other object of the same kind as {ref}
same_kind | S | other shape of the same kind as {ref}
same_kind | S | object of the same kind as {ref}
same_kind | L | Which other object is of the same kind as {ref}?
same_kind | L | Find the other shape of the same kind as {ref}.
same_kind | L | Another object is the same kind of shape as {ref}; which one?
larger | S | smallest {what} that is larger than {ref}
larger | S | smallest {what} larger than {ref}
larger | S | next {what} up in size that is larger than {ref}
larger | L | Which is the smallest {what} that is still larger than {ref}?
larger | L | Find the smallest {what} larger than {ref}.
larger | L | Going up in size from {ref}, which {what} that is larger than it comes next?
smaller | S | largest {what} that is smaller than {ref}
smaller | S | largest {what} smaller than {ref}
smaller | S | next {what} down in size that is smaller than {ref}
smaller | L | Which is the largest {what} that is still smaller than {ref}?
smaller | L | Find the largest {what} smaller than {ref}.
smaller | L | Going down in size from {ref}, which {what} that is smaller than it comes next?
"""


TEMPLATES = parse_templates(_TEMPLATE_TABLE)


@dataclass
class ConversationRound:
    """One round of a conversation.

    Attributes:
        text: the question; a later round's holds "object k [REF:k]".
        is_sentence: long sentence (True) or short phrase (False).
        polygons: labelme polygons of the target's visible region, ``(V, 2)`` int32 each.
        target: index of the answer in the scene's object list.
        query_type: round 1's query type, :data:`REFERRING` for later rounds.
        references: the earlier rounds named (1-based), empty for round 1.
        relation: the relation to the referenced round's object (later rounds only).
        candidates_without_reference: the objects the words could mean with object k unknown.
    """

    text: str
    is_sentence: bool
    polygons: list[np.ndarray]
    target: int
    query_type: str
    references: list[int]
    relation: str | None = None
    candidates_without_reference: int | None = None

    def to_record(self) -> dict:
        """The round's json fields (plain Python types only)."""
        return {
            "text": self.text,
            "is_sentence": self.is_sentence,
            "shapes": [
                {"label": "target", "points": polygon.tolist(), "shape_type": "polygon"}
                for polygon in self.polygons
            ],
            "target": self.target,
            "query_type": self.query_type,
            "references": list(self.references),
            "relation": self.relation,
            "candidates_without_reference": self.candidates_without_reference,
        }


def phrase_reference(
    rng: np.random.Generator, option: RelationOption, round_index: int, is_sentence: bool
) -> str:
    """One phrasing of ``option`` naming earlier round ``round_index`` (1-based) as object k."""
    templates = TEMPLATES[(option.relation.name, is_sentence)]
    template = templates[int(rng.integers(len(templates)))]
    ref = f"object {round_index} {format_reference([round_index])}"
    colour = option.relation.colour
    return template.format(ref=ref, what=f"{colour} object" if colour else "object")


def _first_round(
    rng: np.random.Generator, queries: list[Query], polygons: list
) -> ConversationRound:
    types = sorted({q.query_type for q in queries}, key=QUERY_TYPES.index)
    chosen_type = types[int(rng.integers(len(types)))]
    query = choose_query(rng, [q for q in queries if q.query_type == chosen_type])
    is_sentence = bool(rng.random() < 0.5)
    text = phrase_query(rng, query, is_sentence, 1)[0]
    return ConversationRound(
        text, is_sentence, polygons[query.target], query.target, query.query_type, []
    )


def build_conversation(
    rng: np.random.Generator,
    objects: list,
    geometry: list,
    layout: SceneLayout,
    polygons: list[list[np.ndarray] | None],
) -> list[ConversationRound] | None:
    """A conversation of 2-5 rounds about the scene, or ``None`` when no round 2 is possible.

    Args:
        rng: the image's generator (the round count is always drawn, so the number of draws
            before it never depends on the scene).
        objects, geometry: the scene and its measured :class:`ObjectGeometry`.
        layout: the scene's :class:`SceneLayout`.
        polygons: per object, its exact labelme polygons, or ``None`` if it has none (never a
            target then).
    """
    num_rounds = int(rng.integers(MIN_ROUNDS, MAX_ROUNDS + 1))
    options = [
        o
        for o in relation_options(layout)
        if polygons[o.reference] is not None and polygons[o.target] is not None
    ]
    followed = {o.reference for o in options}
    queries = [
        q
        for query_type in QUERY_TYPES
        for q in candidate_queries(query_type, objects, geometry, layout.side)
        if q.target in followed
    ]
    if not queries:
        return None
    rounds = [_first_round(rng, queries, polygons)]
    while len(rounds) < num_rounds:
        round_of = {r.target: index + 1 for index, r in enumerate(rounds)}
        open_options = [o for o in options if o.reference in round_of and o.target not in round_of]
        names = sorted({o.relation.name for o in open_options})
        if not names:
            break
        name = names[int(rng.integers(len(names)))]
        matching = [o for o in open_options if o.relation.name == name]
        option = matching[int(rng.integers(len(matching)))]
        is_sentence = bool(rng.random() < 0.5)
        k = round_of[option.reference]
        rounds.append(
            ConversationRound(
                phrase_reference(rng, option, k, is_sentence),
                is_sentence,
                polygons[option.target],
                option.target,
                REFERRING,
                [k],
                name,
                option.candidates,
            )
        )
    return rounds


def count_conversation(counts: Counter, conversation: list[ConversationRound] | None) -> None:
    """Add one image's conversation (or its absence) to ``counts``."""
    if conversation is None:
        counts["omitted"] += 1
        return
    counts["conversations"] += 1
    counts[f"rounds/{len(conversation)}"] += 1
    for round_ in conversation[1:]:
        counts[f"relation/{round_.relation}"] += 1
        # A chain: the named round itself referred to an earlier one.
        counts["chained_rounds"] += any(conversation[k - 1].references for k in round_.references)


def conversation_stats(counts: Counter) -> dict:
    """The statistics entries of a split's conversations, from :func:`count_conversation`."""

    def by_prefix(prefix: str) -> dict[str, int]:
        return {
            key[len(prefix) :]: value
            for key, value in sorted(counts.items())
            if key.startswith(prefix)
        }

    return {
        "conversations": counts["conversations"],
        "conversations_omitted": counts["omitted"],
        "conversation_rounds": by_prefix("rounds/"),
        "relations": by_prefix("relation/"),
        "chained_rounds": counts["chained_rounds"],
    }
