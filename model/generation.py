"""Greedy answers to a batch of prompts with a KV cache (free generation in chat and evaluation).

Prompts of different lengths are **left**-padded, so every row's next token is at the last
column; position ids count each row's real tokens only (``cumsum(mask) - 1``), so a padded row
sees exactly what it would see alone and batched answers equal one-by-one answers. The prompt
runs once (prefill); each step then runs one token per row against the cache. A row that writes
``</s>`` is finished: it leaves the batch and the cache (``DynamicCache.batch_select_indices``),
so later steps only cost the rows still writing. :func:`greedy_generate` is ``transformers``'
greedy search (``do_sample=False, num_beams=1``, the same logits processors contract) written
out, so that finished rows can leave the batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import LlamaModel

from utils.tokenizer import IMAGE_END_TOKEN, IMAGE_START_TOKEN, IMAGE_TOKEN, REF_TOKEN

# transformers 5 renamed ``past_key_values`` to ``cache`` (in arguments and outputs) in a minor
# release; both spellings are supported so any 5.x works (as in model.multi_round_inference).
CACHE_ARGUMENT = (
    "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
)
# Tokens that only ever stand in the input (where images and earlier masks are written): a
# random or weak model must not "answer" with them, and a written one would break the scoring.
INPUT_ONLY_TOKENS = (IMAGE_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN, REF_TOKEN)


def input_only_token_ids(tokenizer) -> list[int]:
    """The ids of :data:`INPUT_ONLY_TOKENS` the tokenizer holds (missing ones map to ``<unk>``,
    which stays allowed)."""
    ids = tokenizer.convert_tokens_to_ids(list(INPUT_ONLY_TOKENS))
    return sorted({i for i in ids if i is not None and i != tokenizer.unk_token_id})


def left_pad(
    prompts: Sequence[torch.Tensor], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(L_b,)`` id tensors into ``(ids (B, L), attention_mask (B, L))``, padded on the
    left (``L = max L_b``)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = prompt
        mask[row, length - len(prompt) :] = 1
    return ids, mask


@torch.no_grad()
def greedy_generate(
    language_model,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    suppress_ids: Sequence[int] = (),
    logits_processor: Sequence | None = None,
) -> list[torch.Tensor]:
    """Greedy answers after left-padded prompt embeddings.

    Args:
        language_model: a ``transformers`` causal LM (``.model``, ``.lm_head``,
            ``.get_input_embeddings()``), e.g. ``LlamaForCausalLM``.
        embeds: ``(B, L, hidden)`` prompt embeddings, left-padded.
        attention_mask: ``(B, L)``, 1 for real tokens (each row's real tokens at the end).
        max_new_tokens: at most this many tokens per answer.
        eos_token_id: ends an answer (kept in it).
        suppress_ids: tokens never written.
        logits_processor: ``transformers`` logits processors, called as
            ``processor(ids (b, t), scores (b, vocab) fp32)`` with the ``t`` tokens written so
            far by the ``b`` rows still writing.
    Returns:
        ``B`` tensors ``(T_b,)`` of answer ids on the CPU, ``</s>`` included when written.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: every row's last column is a real token")
    device = embeds.device
    attention_mask = attention_mask.to(device)
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    active = torch.arange(embeds.shape[0], device=device)  # batch row of each row still writing
    written = torch.zeros((embeds.shape[0], 0), dtype=torch.long, device=device)
    answers: list[list[int]] = [[] for _ in range(embeds.shape[0])]
    suppress = torch.tensor(list(suppress_ids), dtype=torch.long, device=device)
    inputs, cache = embeds, None
    for step in range(max_new_tokens):
        outputs = language_model.model(
            inputs_embeds=inputs, attention_mask=attention_mask, position_ids=positions,
            use_cache=True, **{CACHE_ARGUMENT: cache},
        )  # fmt: skip
        cache = getattr(outputs, CACHE_ARGUMENT)
        scores = language_model.lm_head(outputs.last_hidden_state[:, -1]).float()
        if len(suppress):
            scores[:, suppress] = -torch.inf
        for processor in logits_processor or ():
            scores = processor(written, scores)
        tokens = scores.argmax(dim=-1)
        for row, token in zip(active.tolist(), tokens.tolist()):
            answers[row].append(token)
        written = torch.cat([written, tokens[:, None]], dim=1)
        writing = tokens != eos_token_id
        if step == max_new_tokens - 1 or not bool(writing.any()):
            break
        if not bool(writing.all()):  # finished rows leave the batch and the cache
            keep = writing.nonzero().flatten()
            cache.batch_select_indices(keep)
            active, written, tokens = active[keep], written[keep], tokens[keep]
            attention_mask, positions = attention_mask[keep], positions[keep]
        inputs = language_model.get_input_embeddings()(tokens[:, None])
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], 1)
        positions = positions[:, -1:] + 1
    return [torch.tensor(answer, dtype=torch.long) for answer in answers]


@torch.no_grad()
def generate_answers(
    backbone,
    tokenizer,
    prompts: Sequence[torch.Tensor],
    clip_pixels: torch.Tensor,
    image_index: torch.Tensor,
    max_new_tokens: int,
    logits_processor: Sequence | None = None,
    vision_features: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Greedy answers of a LLaVA backbone to prompts about images, all in one batch.

    Args:
        backbone: a :class:`~model.backbones.llava.LlavaBackbone`.
        tokenizer: its tokenizer (``</s>``, padding and the input-only tokens).
        prompts: ``B`` tensors ``(L_b,)`` of ids, ``<image>`` expanded, ending where the answer
            begins (after ``ASSISTANT:``).
        clip_pixels: ``(I, 3, S, S)`` CLIP inputs, on the model's device.
        image_index: ``(B,)`` the image each prompt shows.
        max_new_tokens, logits_processor: see :func:`greedy_generate`.
        vision_features: CLIP's features of ``clip_pixels`` when already computed
            (:meth:`~model.backbones.llava.LlavaBackbone.vision_features`).
    Returns:
        ``B`` tensors ``(T_b,)`` of answer ids (``</s>`` included when written).
    """
    device = clip_pixels.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = left_pad(prompts, pad)
    embeds = backbone.embed_inputs(
        input_ids.to(device), clip_pixels, image_index.to(device), vision_features=vision_features
    )
    return greedy_generate(
        backbone.language_model, embeds, attention_mask, max_new_tokens,
        tokenizer.eos_token_id, input_only_token_ids(tokenizer), logits_processor,
    )  # fmt: skip
