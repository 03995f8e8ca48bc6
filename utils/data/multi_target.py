"""Answers to queries about several objects ("all the cups"): one ``[SEG]`` or one per instance.

``--multi_target_answer`` (a data setting, :class:`~utils.data.builders.DataConfig`) chooses how
a *training* round of a multi-target query answers:

================  ==============================================================================
mode              a multi-target round's answer and mask rows
================  ==============================================================================
``union``         (default) one ``[SEG]`` whose target is the union of the instances, as before
``per_instance``  one ``[SEG]`` per instance, in instance order, each with that instance's mask
                  row: the drawn answer template with its ``[SEG]`` written as an English list,
                  ``[SEG] and [SEG]`` or ``[SEG], [SEG] and [SEG]`` ("Sure, it is [SEG], [SEG]
                  and [SEG].")
================  ==============================================================================

Multi-target queries are gRefCOCO refs with several non-crowd annotations (instances in
``ann_id`` order, :mod:`utils.data.refer_seg`) and ReasonSeg-format queries with ``"targets":
[i, j, ...]`` (the synthetic data's ``--multi_target_queries``; instances in ``targets`` order,
each made of the shapes whose ``group_id`` is its object index, :mod:`utils.data.reason_seg`).
Single-target and no-target rounds are the same in both modes, and so is every evaluation
record: one ``[SEG].`` per query with the union as its target. Free-generation evaluation
(``eval.py --mode free``) unions every ``[SEG]`` an answer holds, so a per-instance model is
scored by the union of its masks; teacher-forced evaluation reads the one ``[SEG]`` it is given.
"""

from __future__ import annotations

from utils.tokenizer import SEG_TOKEN

MULTI_TARGET_ANSWERS = ("union", "per_instance")


def check_multi_target_answer(mode: str) -> str:
    """``mode`` if it is one of :data:`MULTI_TARGET_ANSWERS`, else ``ValueError`` naming the
    flag."""
    if mode not in MULTI_TARGET_ANSWERS:
        raise ValueError(
            f"--multi_target_answer must be one of {', '.join(MULTI_TARGET_ANSWERS)}, got {mode!r}"
        )
    return mode


def per_instance_answer(answer: str, count: int) -> str:
    """``answer`` (holding one ``[SEG]``) with its ``[SEG]`` written ``count`` times as an
    English list: ``[SEG] and [SEG]``, ``[SEG], [SEG] and [SEG]``, ... (``count <= 1``:
    ``answer`` unchanged)."""
    if count <= 1:
        return answer
    if answer.count(SEG_TOKEN) != 1:
        raise ValueError(f"a per-instance answer is made from one with one {SEG_TOKEN}: {answer!r}")
    listed = ", ".join([SEG_TOKEN] * (count - 1)) + " and " + SEG_TOKEN
    return answer.replace(SEG_TOKEN, listed)
