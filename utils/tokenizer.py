"""Tokenizer set-up: the special tokens LLM-Seg adds, and an offline-trained tiny tokenizer.

Real runs load the LLaVA checkpoint's LLaMA tokenizer from its folder. Tests and the demo use
:func:`train_tiny_tokenizer`, a byte-pair tokenizer trained in memory in a second, that behaves
like LLaMA's (``<s>`` prepended, ``</s>`` as end of turn, ``<unk>`` as padding, right padding).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
IMAGE_START_TOKEN = "<im_start>"
IMAGE_END_TOKEN = "<im_end>"
SEG_TOKEN = "[SEG]"
REF_TOKEN = "<ref>"  # SegLLM: where an earlier round's mask is written into the input

# Enough text for a tiny tokenizer to cover the prompt templates and the usual query words.
DEFAULT_CORPUS = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
    "USER: ASSISTANT: Can you segment the object in this image? Please segment the thing. "
    "What is the red one in this image? Please respond with segmentation mask. "
    "Please output segmentation mask. It is [SEG]. Sure, [SEG]. Sure, it is [SEG]. "
    "Sure, the segmentation result is [SEG]. the largest smallest leftmost rightmost object "
    "above below left right of circle square triangle star ring cross red green blue yellow "
    "purple orange white black something that could roll down a slope shape with three corners",
)


def train_tiny_tokenizer(
    corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 400, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Train a LLaMA-like BPE tokenizer in memory, with ``<image>`` and ``[SEG]`` already added.

    Args:
        corpus: texts to learn merges from (every printable ASCII character is always covered).
        vocab_size: target vocabulary size before the added tokens.
        model_max_length: recorded in the tokenizer config, as LISA/LLM-Seg set 512.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=[chr(c) for c in range(32, 127)] + ["\u2581"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        padding_side="right",
        model_max_length=model_max_length,
    )
    add_llm_seg_tokens(wrapped, use_im_start_end=False)
    return wrapped


def add_llm_seg_tokens(
    tokenizer: PreTrainedTokenizerBase, use_im_start_end: bool, use_ref: bool = False
) -> int:
    """Add the tokens LLM-Seg needs that ``tokenizer`` lacks; return how many were added.

    ``[SEG]`` is a normal added token (as upstream), ``<image>`` and the optional
    ``<im_start>``/``<im_end>`` are special, and so is SegLLM's ``<ref>`` (``use_ref``: the
    placeholder an earlier round's mask embedding is written at). The model must resize its
    embeddings afterwards.
    """
    vocab = tokenizer.get_vocab()
    added = 0
    if SEG_TOKEN not in vocab:
        added += tokenizer.add_tokens([SEG_TOKEN], special_tokens=False)
    special = [IMAGE_TOKEN] + ([IMAGE_START_TOKEN, IMAGE_END_TOKEN] if use_im_start_end else [])
    special += [REF_TOKEN] if use_ref else []
    missing = [token for token in special if token not in vocab]
    if missing:
        added += tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return added


def load_tokenizer(path: str, model_max_length: int = 512) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder offline with LLM-Seg's settings (right padding, pad = unk)."""
    tokenizer = AutoTokenizer.from_pretrained(
        path, model_max_length=model_max_length, padding_side="right", local_files_only=True
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer
