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
  read where that ``[SEG]`` stands (:func:`rejection_decisions`) or, in free generation, from
  the answer it writes (:func:`answer_rejects`).
"""

from __future__ import annotations

import torch

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


def rejection_first_token(tokenizer, mode: str) -> int:
    """The id of the token a rejecting answer starts with in ``mode``: ``[REJ]``, or the first
    token of :data:`REJECTION_SENTENCE` as it follows ``ASSISTANT:``."""
    if mode == "token":
        return tokenizer.convert_tokens_to_ids(REJ_TOKEN)
    # Tokenised after a word, as it stands in the conversation (SentencePiece marks the space).
    with_prefix = tokenizer("ASSISTANT: " + REJECTION_SENTENCE, add_special_tokens=False)
    alone = tokenizer("ASSISTANT:", add_special_tokens=False)
    return with_prefix["input_ids"][len(alone["input_ids"])]


def rejection_decisions(
    logits: torch.Tensor, seg_positions: torch.Tensor, rejection_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced no-target decisions, one per ``[SEG]``.

    The validation answer starts with ``[SEG]``, so the logits one position before it are the
    model's choice of how to begin the answer; the round is rejected when the rejecting answer's
    first token is more likely than not there.

    Args:
        logits: ``(L, vocab)`` of one sequence.
        seg_positions: ``(R,)`` positions of its ``[SEG]`` tokens.
        rejection_token_id: from :func:`rejection_first_token`.
    Returns:
        ``(rejected (R,) bool, probability (R,) float32)``.
    """
    before = logits[seg_positions - 1].float()
    probability = torch.softmax(before, dim=-1)[:, rejection_token_id]
    return probability > 0.5, probability
