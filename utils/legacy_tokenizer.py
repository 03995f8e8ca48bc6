"""Upstream's prompt tokenization, token for token: the LLaVA-v1 era slow LLaMA tokenizer.

LLM-Seg (transformers 4.29), LISA (4.31) and the LLaVA-v1 / 1.5 bases under them were trained
with the *slow*, sentencepiece-based ``LlamaTokenizer`` in its legacy mode. transformers 5 reads
the same ``tokenizer.model`` into a different tokenizer, and the same prompt gets other ids:

- ``USER: <im_start>`` gains a ``▁`` before ``<im_start>`` (upstream: none);
- ``<im_end>\\n the thing`` keeps the newline as ``<0x0A>`` (upstream strips it);
- ``ASSISTANT: [SEG].`` gains a ``▁`` before ``[SEG]`` (upstream: ``:`` then ``[SEG]``), so the
  hidden state before ``[SEG]`` (the ``[SEG]`` embedding) is taken from another token.

:class:`LegacyLlamaTokenizer` reproduces upstream's ids with ``sentencepiece`` alone:

1. the prompt is split at ``<image>`` (as LLaVA's ``tokenizer_image_token``); each chunk is
   tokenized on its own with a leading ``<s>``, and the chunks are joined with the image
   placeholder, keeping one ``<s>`` at the start;
2. a chunk is split at the tokenizer's added tokens (``[SEG]``, ``<im_start>``, ``<im_end>``,
   ``<im_patch>``, later ``<ref>``/``[REJ]``; longest match first) and at ``<s>``, ``</s>``,
   ``<unk>``; whitespace is stripped on both sides of each added token but not around ``<s>``,
   ``</s>``, ``<unk>`` (the slow tokenizer declares those with ``lstrip=rstrip=False``);
3. every remaining non-empty text piece is encoded by the sentencepiece model on its own, so
   each piece gets the model's dummy ``▁`` prefix.

Every token also gets its character span in the prompt, so answer labels and ``[SEG]`` positions
come from the same pieces as the ids. The setting that selects this is ``tokenization``:
``llava_legacy`` (this module) or ``hf`` (plain ``transformers``), see :func:`resolve_tokenization`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from utils.tokenizer import IMAGE_TOKEN

TOKENIZATIONS = ("llava_legacy", "hf")
SENTENCEPIECE_FILE = "tokenizer.model"

Span = tuple[int, int]


def sentencepiece_file(tokenizer) -> Path | None:
    """The ``tokenizer.model`` a ``transformers`` tokenizer was loaded from, if any."""
    candidates = [getattr(tokenizer, "vocab_file", None)]
    name = getattr(tokenizer, "name_or_path", "")
    if name:
        candidates.append(Path(name) / SENTENCEPIECE_FILE)
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def resolve_tokenization(tokenization: str, source) -> str:
    """The concrete tokenization for ``tokenization`` (``auto``, ``llava_legacy`` or ``hf``).

    ``auto`` is ``llava_legacy`` when ``source`` (a tokenizer folder, or a loaded tokenizer)
    has a sentencepiece ``tokenizer.model`` (LLaMA-based LLaVA bases, LLM-Seg and LISA were
    trained that way), else ``hf``.

    Raises:
        ValueError: an unknown name, or ``llava_legacy`` without a ``tokenizer.model``.
    """
    if isinstance(source, (str, os.PathLike)):
        has_model = (Path(source) / SENTENCEPIECE_FILE).is_file()
        where = str(source)
    else:
        has_model = sentencepiece_file(source) is not None
        where = getattr(source, "name_or_path", "") or "the tokenizer"
    if tokenization == "auto":
        return "llava_legacy" if has_model else "hf"
    if tokenization not in TOKENIZATIONS:
        raise ValueError(f"unknown tokenization {tokenization!r}; expected auto or {TOKENIZATIONS}")
    if tokenization == "llava_legacy" and not has_model:
        raise ValueError(
            f"tokenization llava_legacy needs the sentencepiece model {SENTENCEPIECE_FILE} in "
            f"{where}"
        )
    return tokenization


@dataclass
class EncodedPrompt:
    """A prompt's ids and, per id, the ``(start, end)`` characters of the prompt it stands for
    (image placeholders get an empty span at the ``<image>`` position)."""

    ids: list[int]
    spans: list[Span]


class LegacyLlamaTokenizer:
    """Upstream's slow-``LlamaTokenizer`` tokenization (see the module doc).

    Args:
        model_file: the sentencepiece ``tokenizer.model``.
        added_tokens: every added token (``[SEG]``, ``<im_start>``, ...) -> id, as in the
            ``transformers`` tokenizer that owns the model (its embedding rows).
        bos, eos, unk: the sentencepiece special tokens (split off, never stripped around).
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        added_tokens: dict[str, int],
        bos: str = "<s>",
        eos: str = "</s>",
        unk: str = "<unk>",
    ):
        self.model_file = Path(model_file)
        self.model_proto = self.model_file.read_bytes()
        self.processor = _processor(self.model_proto)
        self.bos_id = self.processor.piece_to_id(bos)
        self.keep_spaces = {bos, eos, unk}
        self.token_ids = {
            bos: self.bos_id,
            eos: self.processor.piece_to_id(eos),
            unk: self.processor.piece_to_id(unk),
            **{t: i for t, i in added_tokens.items() if t != IMAGE_TOKEN},
        }
        # Longest first: at one position the longest added token wins, as the slow tokenizer's
        # trie does.
        ordered = sorted(self.token_ids, key=len, reverse=True)
        self.pattern = re.compile("|".join(re.escape(token) for token in ordered))

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn get a copy: the processor is rebuilt from bytes.
        return {k: v for k, v in self.__dict__.items() if k != "processor"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.processor = _processor(self.model_proto)

    @classmethod
    def from_tokenizer(cls, tokenizer, model_file: str | os.PathLike | None = None):
        """The legacy tokenizer of a ``transformers`` tokenizer loaded from a sentencepiece
        folder; added-token ids are taken from it, so ids match the model's embedding rows.

        Raises:
            FileNotFoundError: no ``tokenizer.model`` beside it (and none given).
        """
        model_file = Path(model_file) if model_file else sentencepiece_file(tokenizer)
        if model_file is None or not model_file.is_file():
            raise FileNotFoundError(
                f"tokenization llava_legacy needs the sentencepiece model {SENTENCEPIECE_FILE} "
                f"of the tokenizer {getattr(tokenizer, 'name_or_path', '') or '(in memory)'}"
            )
        added = {token.content: index for index, token in tokenizer.added_tokens_decoder.items()}
        return cls(model_file, added, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token)

    def _pieces(self, text: str, start: int, end: int) -> list[tuple[int, int, bool]]:
        """``(start, end, is_token)`` pieces of ``text[start:end]`` after the slow tokenizer's
        splitting and whitespace stripping; empty text pieces are dropped."""
        pieces = []
        position = start
        for match in self.pattern.finditer(text, start, end):
            if match.start() > position:
                pieces.append([position, match.start(), False])
            pieces.append([match.start(), match.end(), True])
            position = match.end()
        if position < end:
            pieces.append([position, end, False])
        for index, (first, last, is_token) in enumerate(pieces):
            if not is_token or text[first:last] in self.keep_spaces:
                continue
            if index > 0 and not pieces[index - 1][2]:
                left = pieces[index - 1]
                left[1] = left[0] + len(text[left[0] : left[1]].rstrip())
            if index + 1 < len(pieces) and not pieces[index + 1][2]:
                right = pieces[index + 1]
                right[0] = right[1] - len(text[right[0] : right[1]].lstrip())
        return [(a, b, t) for a, b, t in pieces if b > a]

    def _encode_text(self, text: str, start: int, end: int) -> EncodedPrompt:
        """One text piece through sentencepiece (dummy prefix included), spans in ``text``."""
        piece = text[start:end]
        from sentencepiece import sentencepiece_pb2

        proto = self.processor.encode(piece, out_type="serialized_proto")
        parsed = sentencepiece_pb2.SentencePieceText.FromString(proto)
        byte_to_char = _byte_to_char(piece)
        ids, spans = [], []
        for token in parsed.pieces:
            ids.append(token.id)
            spans.append((start + byte_to_char[token.begin], start + byte_to_char[token.end]))
        return EncodedPrompt(ids, spans)

    def encode(self, text: str, start: int = 0, end: int | None = None) -> EncodedPrompt:
        """``<s>`` + the tokens of ``text[start:end]`` (no ``<image>`` in it), with spans."""
        end = len(text) if end is None else end
        ids, spans = [self.bos_id], [(start, start)]
        for first, last, is_token in self._pieces(text, start, end):
            if is_token:
                ids.append(self.token_ids[text[first:last]])
                spans.append((first, last))
            else:
                encoded = self._encode_text(text, first, last)
                ids += encoded.ids
                spans += encoded.spans
        return EncodedPrompt(ids, spans)

    def encode_prompt(
        self, text: str, image_token_id: int, num_image_tokens: int = 1
    ) -> EncodedPrompt:
        """A whole prompt as ``tokenizer_image_token`` encodes it: split at ``<image>``, each
        chunk with its own ``<s>``, one ``<s>`` kept; each ``<image>`` becomes
        ``num_image_tokens`` ids ``image_token_id`` (upstream: one ``-200``)."""
        ids: list[int] = []
        spans: list[Span] = []
        start = 0
        for index, chunk in enumerate(text.split(IMAGE_TOKEN)):
            if index:
                ids += [image_token_id] * num_image_tokens
                spans += [(start - len(IMAGE_TOKEN), start - len(IMAGE_TOKEN))] * num_image_tokens
            encoded = self.encode(text, start, start + len(chunk))
            skip = 1 if index else 0  # one <s> for the whole prompt
            ids += encoded.ids[skip:]
            spans += encoded.spans[skip:]
            start += len(chunk) + len(IMAGE_TOKEN)
        return EncodedPrompt(ids, spans)


def _processor(model_proto: bytes):
    import sentencepiece  # needed only once a legacy tokenizer is used

    return sentencepiece.SentencePieceProcessor(model_proto=model_proto)


def _byte_to_char(text: str) -> list[int]:
    """Index ``b`` -> the character holding UTF-8 byte ``b`` (and ``len(text)`` at the end)."""
    table = []
    for index, char in enumerate(text):
        table += [index] * len(char.encode("utf-8"))
    table.append(len(text))
    return table
