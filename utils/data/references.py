"""References to earlier rounds of a conversation: the ``[REF:k]`` markers users write.

A multi-round conversation (SegLLM) asks about one image round after round; a later query may
refer to the mask an earlier round produced: "the helmet of instance 1 [REF:1]". The marker names
earlier rounds by 1-based index (``[REF:1,3]`` names two); the words ("instance k", "object k")
stay in the text. Every record keeps the markers in its question text, whatever its source
(SegLLM's CLI syntax, MRSeg's ``MASK-ENCODE`` tags, the synthetic generator); the sample encoder
turns each named round into one ``<ref>`` placeholder token where the marker stands (or at the
start of the turn, as SegLLM places them), and the model writes that round's mask embedding there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from utils.tokenizer import REF_TOKEN

REF_MARKER = re.compile(r"\[REF:\s*(\d+(?:\s*,\s*\d+)*)\s*\]")
# A marker with the spaces before it: removing it leaves "instance 2." from "instance 2 [REF:2]."
_MARKER_AND_SPACE = re.compile(r"\s*" + REF_MARKER.pattern)
REF_PLACEMENTS = ("inline", "turn_start")


@dataclass(frozen=True)
class ParsedQuery:
    """A query with its ``[REF:k]`` markers resolved.

    Attributes:
        text: the query with every marker replaced by one ``<ref>`` per named round (``inline``)
            or with the markers removed and the ``<ref>`` tokens put first (``turn_start``).
        references: the named rounds, 1-based, in the order of their ``<ref>`` tokens.
    """

    text: str
    references: tuple[int, ...]


def format_reference(rounds: tuple[int, ...] | list[int]) -> str:
    """The marker naming ``rounds`` (1-based): ``[REF:1]``, ``[REF:1,3]``."""
    return "[REF:" + ",".join(str(int(r)) for r in rounds) + "]"


def parse_references(query: str, round_index: int, placement: str = "inline") -> ParsedQuery:
    """Resolve the ``[REF:k]`` markers of the query of round ``round_index`` (1-based).

    Args:
        query: the user's text, markers included.
        round_index: which round the query opens; every reference must name an earlier one.
        placement: ``inline`` (``<ref>`` where the marker stands) or ``turn_start``.
    Raises:
        ValueError: a marker names round 0, the round itself or a later one, or ``<ref>``
            appears in the text as written; the message quotes the query.
    """
    if placement not in REF_PLACEMENTS:
        raise ValueError(f"unknown reference placement {placement!r}; expected {REF_PLACEMENTS}")
    if REF_TOKEN in query:
        raise ValueError(f"write references as [REF:k], not {REF_TOKEN}: {query!r}")
    references: list[int] = []

    def replace(match: re.Match) -> str:
        rounds = [int(v) for v in match.group(1).split(",")]
        for k in rounds:
            if not 1 <= k < round_index:
                raise ValueError(
                    f"round {round_index} refers to round {k}, which is not an earlier round "
                    f"(1..{round_index - 1}): {query!r}"
                )
        references.extend(rounds)
        return REF_TOKEN * len(rounds) if placement == "inline" else ""

    text = (REF_MARKER if placement == "inline" else _MARKER_AND_SPACE).sub(replace, query)
    if placement == "turn_start" and references:
        text = REF_TOKEN * len(references) + re.sub(r"\s{2,}", " ", text).strip()
    return ParsedQuery(text, tuple(references))


def strip_references(query: str) -> str:
    """The query without its markers (what a single-round model reads: the words only)."""
    return re.sub(r"\s{2,}", " ", _MARKER_AND_SPACE.sub("", query)).strip()
