"""Batched greedy generation with a KV cache: transformers' greedy search, one row at a time or
several left-padded, finished rows leaving the batch."""

from __future__ import annotations

import copy

import pytest
import torch

from model.generation import generate_answers, greedy_generate, input_only_token_ids, left_pad
from utils.tokenizer import IMAGE_TOKEN, SEG_TOKEN


@pytest.fixture
def backbone(tiny_llava):
    """The tiny LLaVA with LLaMA weights large enough for answers to depend on the prompt."""
    backbone, tokenizer, _ = tiny_llava
    backbone = copy.deepcopy(backbone)  # the fixture is shared by the session
    with torch.no_grad():
        for parameter in backbone.language_model.model.layers.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.3)
    return backbone.eval(), tokenizer


def _prompts(tokenizer, backbone) -> list[torch.Tensor]:
    image = [backbone.image_token_id] * backbone.num_image_tokens
    texts = ["USER: red square ASSISTANT:", "USER: the largest blue object on the left ASSISTANT:",
             "USER: what is it? ASSISTANT:"]  # fmt: skip
    return [
        torch.tensor([tokenizer.bos_token_id, *image, *tokenizer(t, add_special_tokens=False)
                      ["input_ids"]])
        for t in texts
    ]  # fmt: skip


def test_left_pad_puts_every_prompt_at_the_end():
    ids, mask = left_pad([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_input_only_tokens_are_never_written(tiny_llava):
    _, tokenizer, _ = tiny_llava
    ids = input_only_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in ids
    assert tokenizer.convert_tokens_to_ids(SEG_TOKEN) not in ids
    assert tokenizer.unk_token_id not in ids  # the tiny tokenizer has no <im_start>, <ref>


def test_one_row_is_transformers_greedy_search(backbone):
    backbone, tokenizer = backbone
    pixels = torch.randn(1, 3, 32, 32)
    for prompt in _prompts(tokenizer, backbone):
        first = torch.zeros(1, dtype=torch.long)
        ours = generate_answers(backbone, tokenizer, [prompt], pixels, first, 8)[0]
        embeds = backbone.embed_inputs(prompt[None], pixels, first)
        theirs = backbone.language_model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=8, do_sample=False, num_beams=1, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, suppress_tokens=input_only_token_ids(tokenizer),
        )[0]  # fmt: skip
        assert ours.tolist() == theirs.tolist()
        assert len(ours) == 8  # (a random model never writes </s>: eight tokens)


def test_batch_equals_rows_alone_and_finished_rows_leave(backbone):
    backbone, tokenizer = backbone
    pixels = torch.randn(2, 3, 32, 32)
    prompts = _prompts(tokenizer, backbone)
    image_index = torch.tensor([0, 1, 1])
    alone = [
        generate_answers(backbone, tokenizer, [p], pixels, image_index[i : i + 1], 6)[0].tolist()
        for i, p in enumerate(prompts)
    ]
    # The second row's first token ends it (and any row starting alike): they must leave the
    # batch after one step.
    eos = alone[1][0]
    finished_first = sum(answer[0] == eos for answer in alone)
    assert finished_first < 3
    calls = []
    hook = backbone.language_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["inputs_embeds"].shape[0]),
        with_kwargs=True,
    )
    try:
        input_ids, mask = left_pad(prompts, tokenizer.pad_token_id)
        embeds = backbone.embed_inputs(input_ids, pixels, image_index)
        together = greedy_generate(
            backbone.language_model, embeds, mask, 6, eos, input_only_token_ids(tokenizer)
        )
    finally:
        hook.remove()
    expected = [answer[: answer.index(eos) + 1] if eos in answer else answer for answer in alone]
    assert [a.tolist() for a in together] == expected
    assert len(expected[1]) == 1
    assert calls[:2] == [3, 3 - finished_first]  # finished rows are not run again
    with pytest.raises(ValueError, match="left-padded"):
        greedy_generate(backbone.language_model, embeds, mask.flip(1), 6, eos)
