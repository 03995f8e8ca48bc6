"""Prompt templates, the ``llava_v1`` conversation format, and tokenisation with answer-only labels.

Questions and answers follow LISA / LLM-Seg (reference §4). A conversation is rendered as::

    {system} USER: {question} ASSISTANT: {answer}</s>USER: ... ASSISTANT: ...</s>

The single ``<image>`` in the first question is expanded to ``num_image_tokens`` placeholder tokens
(wrapped in ``<im_start>``/``<im_end>`` when the checkpoint uses them), so the model finds image and
``[SEG]`` positions from the ids alone. Labels are ``-100`` everywhere except the assistant answers
and their ``</s>``. A conversation longer than ``max_length`` is never truncated (that could cut a
``[SEG]`` and misalign the targets): :class:`SequenceTooLong` is raised and the caller drops it.

Two tokenizations (the checkpoint's ``tokenization`` setting): ``hf`` tokenises the rendered text
with the ``transformers`` tokenizer; ``llava_legacy`` reproduces upstream's slow LLaMA tokenizer
token for token (:mod:`utils.legacy_tokenizer`), which checkpoints trained upstream need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.data.references import REF_MARKER, parse_references, strip_references
from utils.legacy_tokenizer import LegacyLlamaTokenizer
from utils.tokenizer import IMAGE_END_TOKEN, IMAGE_START_TOKEN, IMAGE_TOKEN, REF_TOKEN, SEG_TOKEN

IGNORE_INDEX = -100

SHORT_QUESTION_TEMPLATES = (
    IMAGE_TOKEN + "\nCan you segment the {class_name} in this image?",
    IMAGE_TOKEN + "\nPlease segment the {class_name} in this image.",
    IMAGE_TOKEN + "\nWhat is {class_name} in this image? Please respond with segmentation mask.",
    IMAGE_TOKEN + "\n What is {class_name} in this image? Please output segmentation mask.",
)
LONG_QUESTION_TEMPLATES = (
    IMAGE_TOKEN + "\n{sent} Please respond with segmentation mask.",
    IMAGE_TOKEN + "\n{sent} Please output segmentation mask.",
)
ANSWER_TEMPLATES = (
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
)
# Evaluation is teacher-forced with a fixed prompt and answer, as upstream (whose validation
# prompts, unlike its training ones, have a space after the newline).
VALIDATION_LONG_QUESTION = IMAGE_TOKEN + "\n {sent} Please output segmentation mask."
VALIDATION_SHORT_QUESTION = (
    IMAGE_TOKEN + "\n What is {class_name} in this image? Please output segmentation mask."
)
VALIDATION_ANSWER = "[SEG]."


@dataclass(frozen=True)
class ConversationFormat:
    """A chat format: system prompt, role names and separators."""

    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str


CONVERSATION_FORMATS = {
    "llava_v1": ConversationFormat(
        system=(
            "A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions."
        ),
        roles=("USER", "ASSISTANT"),
        sep=" ",
        sep2="</s>",
    ),
    "llava_llama_2": ConversationFormat(
        system="You are a helpful language and vision assistant.",
        roles=("USER", "ASSISTANT"),
        sep=" ",
        sep2="</s>",
    ),
}


def answer_start(encoded: EncodedConversation) -> int:
    """Index of the first token the model is trained to write (the first label): free
    generation starts there. Depending on the tokenizer, the prompt may end with a token that
    belongs to neither turn, e.g. the space of "ASSISTANT: " before an added token such as
    ``[SEG]``; training never asks the model to write it, so neither does generation."""
    labelled = (encoded.labels != IGNORE_INDEX).nonzero()
    if len(labelled) == 0:
        raise ValueError("the conversation has no answer tokens")
    return int(labelled[0])


def conversation_format(name: str) -> ConversationFormat:
    try:
        return CONVERSATION_FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown conversation format {name!r}; expected {sorted(CONVERSATION_FORMATS)}"
        ) from None


class SequenceTooLong(ValueError):
    """A tokenised conversation exceeds ``max_length``; it is dropped, never truncated."""


@dataclass
class EncodedConversation:
    """One tokenised conversation.

    Attributes:
        input_ids: ``(L,)`` token ids, ``<image>`` expanded.
        labels: ``(L,)`` ids on answer tokens, ``-100`` elsewhere.
        num_seg: how many ``[SEG]`` tokens it holds (= target rows it needs).
        text: the rendered prompt before image expansion (for logs and visualisations).
        num_turns: how many ``(question, answer)`` turns it holds.
        ref_rounds: for each ``<ref>`` token, in id order, the round (1-based turn) whose mask
            it stands for (SegLLM references, see :mod:`utils.data.references`).
        seg_turns: for each ``[SEG]`` token, in id order, the turn (1-based) it answers.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    num_seg: int
    text: str
    num_turns: int = 1
    ref_rounds: tuple[int, ...] = ()
    seg_turns: tuple[int, ...] = ()


def render(turns: list[tuple[str, str | None]], fmt: ConversationFormat) -> tuple[str, list]:
    """Render ``(question, answer)`` turns; return the text and the answers' character spans.

    An answer of ``None`` leaves the assistant turn open (a generation prompt).
    """
    text = fmt.system + fmt.sep
    spans = []
    for question, answer in turns:
        text += f"{fmt.roles[0]}: {question}{fmt.sep}{fmt.roles[1]}:"
        if answer is None:
            break
        text += " "
        start = len(text)
        text += answer + fmt.sep2
        spans.append((start, len(text)))
    return text, spans


def image_placeholder(num_image_tokens: int, use_im_start_end: bool) -> str:
    """The text that stands for one image in the LLM's input."""
    tokens = IMAGE_TOKEN * num_image_tokens
    return IMAGE_START_TOKEN + tokens + IMAGE_END_TOKEN if use_im_start_end else tokens


def encode_conversation(
    tokenizer,
    turns: list[tuple[str, str | None]],
    num_image_tokens: int,
    fmt: ConversationFormat = CONVERSATION_FORMATS["llava_v1"],
    use_im_start_end: bool = True,
    max_length: int | None = None,
    legacy: LegacyLlamaTokenizer | None = None,
    references: str = "tokens",
    ref_placement: str = "inline",
    label_answer_space: bool = False,
) -> EncodedConversation:
    """Tokenise a conversation about one image, labelling only the answers.

    Args:
        tokenizer: a fast tokenizer holding ``<image>`` and ``[SEG]``.
        turns: ``(question, answer)`` pairs; the first question holds one ``<image>``.
        num_image_tokens: placeholder tokens per image (``model.num_image_tokens``).
        fmt: the conversation format.
        use_im_start_end: wrap the image in ``<im_start>``/``<im_end>`` (LLaVA-v1 checkpoints).
        max_length: raise :class:`SequenceTooLong` beyond this many tokens.
        legacy: tokenise as upstream's slow LLaMA tokenizer did (``tokenization:
            llava_legacy``) instead of with ``tokenizer`` itself (``hf``).
        references: what a question's ``[REF:k]`` markers become: ``tokens`` (one ``<ref>`` per
            named round; the tokenizer must hold ``<ref>``) or ``strip`` (removed; the words
            "instance k" stay: a single-round model, or SegLLM without history).
        ref_placement: ``inline`` (``<ref>`` where the marker stands) or ``turn_start``
            (SegLLM's place, before the question's text).
        label_answer_space: also label a lone whitespace token an answer starts with (``hf``
            tokenization puts one before an added token such as ``[SEG]`` or ``[REJ]``: without
            a label the model never learns to write it, so free generation cannot begin such
            an answer). Models trained with ``--rejection`` use it; the default keeps the
            labels every earlier run trained with.
    Raises:
        ValueError: a marker names no earlier round, or ``<ref>`` is missing from the vocabulary.
    """
    turns, ref_rounds = _resolve_references(tokenizer, turns, references, ref_placement)
    encoded = _encode_turns(tokenizer, turns, num_image_tokens, fmt, use_im_start_end, max_length,
                            legacy, label_answer_space)  # fmt: skip
    encoded.ref_rounds = ref_rounds
    encoded.seg_turns = tuple(
        index
        for index, (_, answer) in enumerate(turns, 1)
        for _ in range((answer or "").count(SEG_TOKEN))
    )
    ref_id = tokenizer.convert_tokens_to_ids(REF_TOKEN) if ref_rounds else None
    if ref_rounds and int((encoded.input_ids == ref_id).sum()) != len(ref_rounds):
        raise ValueError(
            f"{len(ref_rounds)} references but {int((encoded.input_ids == ref_id).sum())} "
            f"{REF_TOKEN} tokens after tokenising: {encoded.text!r}"
        )
    if len(encoded.seg_turns) != encoded.num_seg:
        raise ValueError(
            f"the answers hold {len(encoded.seg_turns)} {SEG_TOKEN} but the ids "
            f"{encoded.num_seg}: {encoded.text!r}"
        )
    return encoded


def _resolve_references(tokenizer, turns, references: str, placement: str):
    """``(turns with markers resolved, ref_rounds)`` (see :func:`encode_conversation`)."""
    if references not in ("tokens", "strip"):
        raise ValueError(f"references must be 'tokens' or 'strip', got {references!r}")
    resolved, ref_rounds = [], []
    for index, (question, answer) in enumerate(turns, 1):
        if REF_MARKER.search(question) is None:
            resolved.append((question, answer))
            continue
        parsed = parse_references(question, index, placement)  # validates the rounds
        if references == "strip":
            resolved.append((strip_references(question), answer))
            continue
        if REF_TOKEN not in tokenizer.get_vocab():
            raise ValueError(
                f"the tokenizer has no {REF_TOKEN} token (a single-round model): references "
                f"in {question!r} need a model built with a mask encoder, or history 'none'"
            )
        resolved.append((parsed.text, answer))
        ref_rounds.extend(parsed.references)
    return resolved, tuple(ref_rounds)


def _encode_turns(
    tokenizer, turns, num_image_tokens, fmt, use_im_start_end, max_length, legacy,
    label_answer_space=False,
) -> EncodedConversation:  # fmt: skip
    text, spans = render(turns, fmt)
    if text.count(IMAGE_TOKEN) != 1:
        raise ValueError(f"a conversation needs exactly one {IMAGE_TOKEN}, got: {text!r}")
    if legacy is not None:
        input_ids, labels = _encode_legacy(
            legacy, text, spans, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), num_image_tokens,
            use_im_start_end,
        )  # fmt: skip
        return _finish(tokenizer, input_ids, labels, text, len(turns), max_length)
    expanded = text.replace(IMAGE_TOKEN, image_placeholder(num_image_tokens, use_im_start_end))
    shift = len(expanded) - len(text)
    image_at = text.index(IMAGE_TOKEN)
    spans = [(s + shift, e + shift) if s > image_at else (s, e) for s, e in spans]
    encoded = tokenizer(expanded, return_offsets_mapping=True, add_special_tokens=True)
    input_ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    offsets = encoded["offset_mapping"]
    for i, (start, end) in enumerate(offsets):
        if end > start and any(start < a_end and end > a_start for a_start, a_end in spans):
            labels[i] = input_ids[i]
    if label_answer_space:  # the space token just before an answer's first character
        starts = {a_start for a_start, _ in spans}
        for i, (start, end) in enumerate(offsets):
            if end in starts and end > start and not expanded[start:end].strip():
                labels[i] = input_ids[i]
    return _finish(tokenizer, input_ids, labels, text, len(turns), max_length)


def _finish(tokenizer, input_ids, labels, text, num_turns, max_length) -> EncodedConversation:
    if max_length is not None and len(input_ids) > max_length:
        raise SequenceTooLong(f"{len(input_ids)} tokens > max_length {max_length}")
    num_seg = int((input_ids == tokenizer.convert_tokens_to_ids(SEG_TOKEN)).sum())
    return EncodedConversation(input_ids, labels, num_seg, text, num_turns)


def _encode_legacy(
    legacy: LegacyLlamaTokenizer,
    text: str,
    answer_spans: list[tuple[int, int]],
    image_token_id: int,
    num_image_tokens: int,
    use_im_start_end: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` as upstream's slow tokenizer and ``tokenizer_image_token`` give.

    A token is labelled when its characters overlap an answer (with its ``</s>``); a token of
    no characters (the dummy ``▁`` sentencepiece puts before each piece, a byte-fallback byte)
    when it stands inside one, which is what upstream's round-length arithmetic labels.
    """
    if use_im_start_end:
        image_at = text.index(IMAGE_TOKEN)
        wrapped = IMAGE_START_TOKEN + IMAGE_TOKEN + IMAGE_END_TOKEN
        text = text.replace(IMAGE_TOKEN, wrapped)
        shift = len(wrapped) - len(IMAGE_TOKEN)
        answer_spans = [(s + shift, e + shift) if s > image_at else (s, e) for s, e in answer_spans]
    encoded = legacy.encode_prompt(text, image_token_id, num_image_tokens)
    input_ids = torch.tensor(encoded.ids, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (start, end) in enumerate(encoded.spans):
        for a_start, a_end in answer_spans:
            inside = a_start <= start < a_end if end == start else start < a_end and end > a_start
            if inside:
                labels[i] = input_ids[i]
                break
    return input_ids, labels
