"""Answers to queries about nothing: how a no-target round is written, read and decided.

A LISA-style model always answers ``[SEG]``, so "segment the giraffe" on a kitchen photo gets a
confident wrong mask. With ``--rejection`` (a model setting, saved in exports) it may answer
without one:

==========  ===============================================================================
mode        a no-target round's answer
==========  ===============================================================================
``none``    (default) none: every round answers ``[SEG]``, as LISA and LLM-Seg
``answer``  the sentence :data:`REJECTION_SENTENCE`, trained by the LM loss (SESAME/READ)
``token``   an answer template with ``[REJ]`` for ``[SEG]`` ("It is [REJ]."): a token of its
            own, added to the tokenizer (GSVA)
==========  ===============================================================================

Data convention, the same for every dataset family:

- training records write a no-target round's answer as :data:`REJECTION_SENTENCE`, with no
  ``[SEG]`` and so no mask row; the sample encoder rewrites it in ``token`` mode
  (:func:`token_rejection_answer`);
- evaluation records answer every round with the validation answer ``[SEG].`` and give a
  no-target round an all-zero mask row and ``no_target[row] = True``; the model's decision is
  read where that ``[SEG]`` stands (:func:`rejection_probe`, :func:`rejection_decisions`) or,
  in free generation, from the answer it writes (no ``[SEG]``: a rejection).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from utils.data.conversation import ANSWER_TEMPLATES, VALIDATION_ANSWER
from utils.tokenizer import SEG_TOKEN

REJ_TOKEN = "[REJ]"
REJECTION_MODES = ("none", "answer", "token")
REJECTION_SENTENCE = "Sorry, there is no such object in the image."
REJECTION_TOKEN_ANSWER = REJ_TOKEN + "."


def check_rejection_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`REJECTION_MODES`, else ``ValueError`` naming the flag."""
    if mode not in REJECTION_MODES:
        raise ValueError(f"--rejection must be one of {', '.join(REJECTION_MODES)}, got {mode!r}")
    return mode


def token_rejection_answer(question: str) -> str:
    """The ``token`` mode's answer to a no-target ``question``: one of the answer templates with
    ``[REJ]`` where ``[SEG]`` stands, chosen by the question's text (deterministic), so target
    and no-target answers begin alike and the choice is made at the ``[SEG]``/``[REJ]`` slot."""
    template = ANSWER_TEMPLATES[zlib.crc32(question.encode("utf-8")) % len(ANSWER_TEMPLATES)]
    return template.replace(SEG_TOKEN, REJ_TOKEN)


def rejection_answer(mode: str) -> str:
    """The answer a no-target round is trained to give in ``mode`` (not ``none``)."""
    if check_rejection_mode(mode) == "none":
        raise ValueError("--rejection none has no rejection answer: no-target data needs "
                         "--rejection answer or token")  # fmt: skip
    return REJECTION_SENTENCE if mode == "answer" else REJECTION_TOKEN_ANSWER


@dataclass(frozen=True)
class RejectionProbe:
    """Where a teacher-forced sequence shows the model's choice between answering ``[SEG]`` and
    rejecting: the rejecting answer's first token that differs from the validation answer's
    (``token_id``), read ``offset`` tokens before the ``[SEG]`` (0: right before it)."""

    token_id: int
    offset: int


def rejection_probe(
    encode: Callable[[str], object], mode: str, seg_token_id: int
) -> RejectionProbe:
    """The :class:`RejectionProbe` of a tokenization.

    Args:
        encode: the encoded conversation (``input_ids`` and ``labels``) of one fixed question
            followed by a given answer, encoded exactly as evaluation encodes.
        mode: ``answer`` or ``token``.
        seg_token_id: id of ``[SEG]``.
    Raises:
        ValueError: the answers part before ``[SEG]``, or at a token training never labels
            (the model was never taught to choose there).
    """
    accepted = encode(VALIDATION_ANSWER).input_ids.tolist()
    rejecting = encode(rejection_answer(mode) if mode == "answer" else REJECTION_TOKEN_ANSWER)
    rejecting_ids, rejecting_labels = rejecting.input_ids.tolist(), rejecting.labels.tolist()
    seg = accepted.index(seg_token_id)
    diverge = next(
        (i for i, (a, b) in enumerate(zip(accepted, rejecting_ids)) if a != b),
        min(len(accepted), len(rejecting_ids)),
    )
    if diverge > seg or diverge >= len(rejecting_ids) or rejecting_labels[diverge] < 0:
        raise ValueError(f"the rejection answer cannot be told from {VALIDATION_ANSWER!r} at a "
                         "trained token before its [SEG] in this tokenization")  # fmt: skip
    return RejectionProbe(token_id=rejecting_ids[diverge], offset=seg - diverge)


def rejection_decisions(
    logits: torch.Tensor, seg_positions: torch.Tensor, probe: RejectionProbe
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced no-target decisions, one per ``[SEG]``.

    The validation answer starts with ``[SEG]``, so the logits just before the point where a
    rejecting answer would part from it are the model's choice of how to answer; the round is
    rejected when the rejecting token is more likely than not there.

    Args:
        logits: ``(L, vocab)`` of one sequence.
        seg_positions: ``(R,)`` positions of its ``[SEG]`` tokens.
        probe: from :func:`rejection_probe`.
    Returns:
        ``(rejected (R,) bool, probability (R,) float32)``.
    """
    before = logits[seg_positions - 1 - probe.offset].float()
    probability = torch.softmax(before, dim=-1)[:, probe.token_id]
    return probability > 0.5, probability
