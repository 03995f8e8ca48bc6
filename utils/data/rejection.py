"""Answers to queries about nothing: how a no-target round is written, read and decided.

A LISA-style model always answers ``[SEG]``, so "segment the giraffe" on a kitchen photo gets a
confident wrong mask. With ``--rejection`` (a model setting, saved in exports) it may answer
without one:

==========  ===============================================================================
mode        a no-target round's answer
==========  ===============================================================================
``none``    (default) none: every round answers ``[SEG]``, as LISA and LLM-Seg
``answer``  the sentence :data:`REJECTION_SENTENCE`, trained by the LM loss (SESAME/READ)
``token``   ``[REJ].``: a token of its own, added to the tokenizer (GSVA)
==========  ===============================================================================

Data convention, the same for every dataset family:

- training records write a no-target round's answer as :data:`REJECTION_SENTENCE`, with no
  ``[SEG]`` and so no mask row; the sample encoder rewrites it to ``[REJ].`` in ``token`` mode;
- evaluation records answer every round with the validation answer ``[SEG].`` and give a
  no-target round an all-zero mask row and ``no_target[row] = True``; the model's decision is
  read where that ``[SEG]`` stands (:func:`rejection_probe`, :func:`rejection_decisions`) or,
  in free generation, from the answer it writes (:func:`answer_rejects`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from utils.data.conversation import VALIDATION_ANSWER

REJ_TOKEN = "[REJ]"
REJECTION_MODES = ("none", "answer", "token")
REJECTION_SENTENCE = "Sorry, there is no such object in the image."
REJECTION_TOKEN_ANSWER = REJ_TOKEN + "."


def check_rejection_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`REJECTION_MODES`, else ``ValueError`` naming the flag."""
    if mode not in REJECTION_MODES:
        raise ValueError(f"--rejection must be one of {', '.join(REJECTION_MODES)}, got {mode!r}")
    return mode


def rejection_answer(mode: str) -> str:
    """The answer a no-target round is trained to give in ``mode`` (not ``none``)."""
    if check_rejection_mode(mode) == "none":
        raise ValueError("--rejection none has no rejection answer: no-target data needs "
                         "--rejection answer or token")  # fmt: skip
    return REJECTION_SENTENCE if mode == "answer" else REJECTION_TOKEN_ANSWER


def answer_rejects(answer: str, seg_token: str = "[SEG]") -> bool:
    """Whether a written answer rejects: it holds no ``[SEG]`` (a ``[REJ]``, the rejection
    sentence, or anything else without a mask)."""
    return seg_token not in answer


@dataclass(frozen=True)
class RejectionProbe:
    """Where a teacher-forced sequence shows the model's choice between answering ``[SEG]`` and
    rejecting: the rejecting answer's first token that differs from the validation answer's
    (``token_id``), read ``offset`` tokens before the ``[SEG]`` (0: right before it)."""

    token_id: int
    offset: int


def rejection_probe(
    encode: Callable[[str], list[int]], mode: str, seg_token_id: int
) -> RejectionProbe:
    """The :class:`RejectionProbe` of a tokenization.

    Args:
        encode: the input ids of one fixed question followed by a given answer, encoded exactly
            as evaluation encodes (the sample encoder: it writes ``[REJ].`` in ``token`` mode).
        mode: ``answer`` or ``token``.
        seg_token_id: id of ``[SEG]``.
    """
    accepted = list(encode(VALIDATION_ANSWER))
    rejecting = list(encode(REJECTION_SENTENCE if mode == "answer" else REJECTION_TOKEN_ANSWER))
    seg = accepted.index(seg_token_id)
    diverge = next(
        (i for i, (a, b) in enumerate(zip(accepted, rejecting)) if a != b),
        min(len(accepted), len(rejecting)),
    )
    if diverge > seg or diverge >= len(rejecting):
        raise ValueError(f"the rejection answer cannot be told from {VALIDATION_ANSWER!r} before "
                         "its [SEG] in this tokenization")  # fmt: skip
    return RejectionProbe(token_id=rejecting[diverge], offset=seg - diverge)


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
