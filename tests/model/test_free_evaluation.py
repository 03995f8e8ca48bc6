"""Free-generation evaluation on tiny models: a model that writes the teacher's answer scores
exactly as teacher forcing, answers without [SEG] reject, several [SEG] are united, mixed answers
keep their own masks, and batched answers equal one-by-one answers."""

from __future__ import annotations

import copy
import csv
import dataclasses

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor

import eval as eval_script
from model.builder import LLMSegConfig, build_llm_seg, tiny_llm_seg_config
from model.evaluation import SelectionSettings, evaluate
from model.free_evaluation import (
    GenerationSettings,
    evaluate_free,
    open_prompts,
    predict_free,
    write_answers,
)
from model.heads.losses import language_model_loss
from tests.data_fixtures import write_reason_seg
from tests.utils.data.test_grefcoco import write_grefcoco
from utils.batch import LLMSegBatch
from utils.data.builders import build_encoder, build_eval_dataset
from utils.data.conversation import VALIDATION_ANSWER, VALIDATION_LONG_QUESTION
from utils.data.rejection import REJECTION_SENTENCE
from utils.data.samples import collate

CPU = torch.device("cpu")
ARGMAX = SelectionSettings("argmax")  # always one proposal: masks are never empty by chance


class Script(LogitsProcessor):
    """Forces every row to write ``ids`` and then ``</s>``."""

    def __init__(self, ids: list[int], eos: int) -> None:
        self.ids, self.eos = list(ids), eos

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1]
        out = torch.full_like(scores, -torch.inf)
        out[:, self.ids[step] if step < len(self.ids) else self.eos] = 0
        return out


class StopAfterEven(LogitsProcessor):
    """Greedy, but a row whose last written token is even ends there: answers of different
    lengths decided by each row's own tokens (a row-local rule, the same batched or alone)."""

    def __init__(self, eos: int) -> None:
        self.eos = eos

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == 0:
            return scores
        stop = input_ids[:, -1] % 2 == 0
        scores[stop] = -torch.inf
        scores[stop, self.eos] = 0
        return scores


class ByFirstToken(LogitsProcessor):
    """Greedy first token; then the script ``scripts[first token % len(scripts)]`` and
    ``</s>``: answers that differ from row to row, each decided by the row alone."""

    def __init__(self, scripts: list[list[int]], eos: int) -> None:
        self.scripts, self.eos = scripts, eos

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == 0:
            return scores
        out = torch.full_like(scores, -torch.inf)
        for row, first in enumerate(input_ids[:, 0].tolist()):
            script = self.scripts[first % len(self.scripts)]
            step = input_ids.shape[1] - 1
            out[row, script[step] if step < len(script) else self.eos] = 0
        return out


def _varied(model):
    """A copy of ``model`` whose answers and [SEG] embeddings depend on the whole prompt."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.backbone.language_model.model.layers.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.3)
        for parameter in model.text_projection.parameters():
            parameter.normal_(0, 1)
    return model


def _chat_masks(model, sample, prompt, answer) -> list[torch.Tensor]:
    """The masks of each [SEG] of ``prompt + answer``, scored alone as chat scores a query
    (``model.predict_masks`` on a one-row batch)."""
    input_ids = torch.cat([prompt, answer])[None]
    batch = LLMSegBatch(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=None,
        clip_pixels=sample.clip_pixels[None], dino_pixels=sample.dino_pixels[None],
        image_index=torch.zeros(1, dtype=torch.long), proposal_masks=[sample.proposal_masks],
    )  # fmt: skip
    results = model.predict_masks(
        batch, [sample.proposal_binary], "argmax", output_sizes=[tuple(sample.masks.shape[1:])]
    )[0]
    return [result.mask for result in results]


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory):
    """A tiny model, its tokenizer, and ReasonSeg (4 images) and gRefCOCO (2 images, 6
    sentences, 2 without target) evaluation sets."""
    root = tmp_path_factory.mktemp("free_eval")
    config = tiny_llm_seg_config(tiny_checkpoints)
    torch.manual_seed(0)
    model, tokenizer = build_llm_seg(config)
    model.eval()
    reason_dir, reason_masks = write_reason_seg(root / "reason", "val", 4, seed=1)
    write_grefcoco(root / "gref" / "dataset", root / "gref" / "sam_masks")
    datasets = {}
    for name, spec, dataset_dir, masks_dir in (
        ("reason", "ReasonSeg|val", reason_dir, reason_masks),
        ("gref", "grefcoco|unc|val", root / "gref" / "dataset", root / "gref" / "sam_masks"),
    ):
        data = eval_script.EvalConfig(
            **{f.name: getattr(config, f.name) for f in dataclasses.fields(LLMSegConfig)},
            dataset_dir=str(dataset_dir), sam_masks_dir=str(masks_dir), val_dataset=spec,
        )  # fmt: skip
        datasets[name] = build_eval_dataset(
            data, build_encoder(data, tokenizer, model.num_image_tokens), spec
        )
    return model, tokenizer, datasets


def _samples(dataset) -> list:
    return [dataset[i] for i in range(len(dataset))]


def _teacher_answer(sample, encoder) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(prompt, teacher's answer ids)`` per conversation: the forced sequence after the
    open prompt (here ``[SEG] ▁ . </s>``: the prompt ends with the space before ``[SEG]``)."""
    pairs = []
    for prompt, conversation in zip(open_prompts(sample, encoder), sample.conversations):
        assert torch.equal(conversation.input_ids[: len(prompt)], prompt)
        pairs.append((prompt, conversation.input_ids[len(prompt) :]))
    return pairs


@pytest.fixture(scope="module")
def answering_model(setup):
    """The tiny model with its language model overfit on the teacher's answer after each
    validation prompt (every token after the open prompt labelled), so greedy decoding writes
    ``[SEG].`` and nothing else."""
    model, tokenizer, datasets = setup
    model = copy.deepcopy(model)
    pairs = [(s, d.encoder) for d in datasets.values() for s in _samples(d)]
    batch, _ = collate([sample for sample, _ in pairs], tokenizer.pad_token_id)
    labels = torch.full_like(batch.input_ids, -100)
    row = 0
    for sample, encoder in pairs:  # collate's rows: sample by sample, conversation by conversation
        for prompt, conversation in zip(open_prompts(sample, encoder), sample.conversations):
            start, end = len(prompt), len(conversation.input_ids)
            labels[row, start:end] = conversation.input_ids[start:]
            row += 1
    language_model = model.backbone.language_model
    with torch.no_grad():  # CLIP is frozen: the input embeddings never change
        embeds = model.backbone.embed_inputs(batch.input_ids, batch.clip_pixels, batch.image_index)
    model.requires_grad_(False)
    language_model.requires_grad_(True)
    optimizer = torch.optim.Adam(language_model.parameters(), lr=1e-2)
    for _ in range(80):
        logits = language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
        loss = language_model_loss(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.requires_grad_(False)
    return model.eval()


def _csv(path) -> dict:
    with open(path) as handle:
        return {(row["name"], row["head"]): row for row in csv.DictReader(handle)}


@pytest.mark.parametrize("name", ["reason", "gref"])
def test_writing_the_teachers_answer_scores_as_teacher_forcing(setup, answering_model, name,
                                                               tmp_path):  # fmt: skip
    _, tokenizer, datasets = setup
    model, dataset = answering_model, datasets[name]
    samples = _samples(dataset)
    written = write_answers(
        model, tokenizer, samples, [open_prompts(s, dataset.encoder) for s in samples], CPU,
        torch.float32, GenerationSettings(max_new_tokens=12, batch_size=4),
    )  # fmt: skip
    for sample, answers in zip(samples, written):  # the model really writes "[SEG]." ...
        for (_, teacher), answer in zip(_teacher_answer(sample, dataset.encoder), answers):
            assert answer.tolist() == teacher.tolist()
            decoded = tokenizer.decode(answer, skip_special_tokens=True)
            assert decoded.replace(" ", "") == "[SEG]."

    forced = evaluate(model, dataset, ARGMAX, CPU, torch.float32, tokenizer.pad_token_id,
                      tmp_path / "tf")  # fmt: skip
    free = evaluate_free(
        model, dataset, tokenizer, ARGMAX, CPU, torch.float32, tmp_path / "free",
        GenerationSettings(max_new_tokens=12, batch_size=4),
    )  # fmt: skip
    # ... so its masks and numbers are the teacher-forced ones, batched or not.
    assert {k: v for k, v in free.items() if k not in ("mode", "max_new_tokens", "answers",
                                                      "num_answers")} == forced  # fmt: skip
    assert free["mode"] == "free"
    assert free["answers"] == {"no_seg": 0.0, "one_seg": 1.0, "several_seg": 0.0}
    assert free["num_answers"] == sum(len(s.conversations) for s in samples)
    if name == "gref":
        assert free["grefcoco"]["num_no_target"] == 2
        assert free["n_acc"] == forced["n_acc"] == 0.0  # argmax always answers a mask
    forced_rows, free_rows = (
        _csv(tmp_path / "tf" / "per_image.csv"),
        _csv(tmp_path / "free" / "per_image.csv"),
    )
    assert forced_rows.keys() == free_rows.keys()
    for key, row in forced_rows.items():
        assert {k: v for k, v in free_rows[key].items() if k not in ("answer", "num_seg")} == row
        assert free_rows[key]["answer"].replace(" ", "") == "[SEG]."
        assert free_rows[key]["num_seg"] == "1"
        assert row["num_selected"] == "1"  # argmax: the compared masks are never empty


def test_answers_without_seg_reject(setup, tmp_path):
    model, tokenizer, datasets = setup
    dataset = datasets["gref"]
    refusal = tokenizer(" " + REJECTION_SENTENCE, add_special_tokens=False)["input_ids"]
    script = Script(refusal, tokenizer.eos_token_id)
    forced = evaluate(model, dataset, ARGMAX, CPU, torch.float32, tokenizer.pad_token_id,
                      tmp_path / "tf")  # fmt: skip
    free = evaluate_free(model, dataset, tokenizer, ARGMAX, CPU, torch.float32, tmp_path / "free",
                         logits_processor=[script])  # fmt: skip
    # Teacher-forced, argmax always makes a mask: no query is rejected ...
    assert (forced["n_acc"], forced["t_acc"]) == (0.0, 1.0)
    # ... free, every answer refuses: every mask is empty, every query rejected.
    assert free["answers"] == {"no_seg": 1.0, "one_seg": 0.0, "several_seg": 0.0}
    assert free["num_answers"] == 6
    assert (free["n_acc"], free["t_acc"], free["num_no_target"]) == (1.0, 0.0, 2)
    assert free["grefcoco"]["giou"] == pytest.approx(2 / 6)  # the right rejections score 1
    assert (free["giou"], free["ciou"]) == (pytest.approx(2 / 6), 0.0)  # LISA's: the same
    rows = _csv(tmp_path / "free" / "per_image.csv")
    assert len(rows) == 6
    for row in rows.values():
        assert (row["answer"], row["num_seg"], row["intersection"]) == (
            REJECTION_SENTENCE, "0", "0",
        )  # fmt: skip
        assert row["num_selected"] == "0"


def test_several_seg_give_the_union_of_their_masks(setup, tmp_path):
    model, tokenizer, datasets = setup
    model = _varied(model)
    dataset = datasets["reason"]
    ids = tokenizer(" red[SEG] and blue[SEG].", add_special_tokens=False)["input_ids"]
    script = Script(ids, tokenizer.eos_token_id)
    predictions = predict_free(
        model, tokenizer, _samples(dataset), dataset.encoder, ARGMAX, CPU, torch.float32,
        GenerationSettings(max_new_tokens=12), [script],
    )  # fmt: skip
    unions = 0
    for prediction in predictions:
        assert prediction.seg_counts == [2]
        assert prediction.answers[0].count("[SEG]") == 2
        (prompt,) = open_prompts(prediction.sample, dataset.encoder)
        answer = torch.tensor(ids + [tokenizer.eos_token_id])
        first, second = _chat_masks(model, prediction.sample, prompt, answer)
        ((mask, selected),) = prediction.masks_by_head["proposals"]
        assert torch.equal(mask, first | second)
        assert selected == 2
        unions += not torch.equal(first, second)
    assert unions > 0  # some answers' two [SEG]s chose different proposals: a real union
    free = evaluate_free(model, dataset, tokenizer, ARGMAX, CPU, torch.float32, tmp_path,
                         logits_processor=[script])  # fmt: skip
    assert free["answers"] == {"no_seg": 0.0, "one_seg": 0.0, "several_seg": 1.0}


def _three_queries(dataset) -> list:
    """The ReasonSeg images, each asked three different questions (three conversations, one
    mask row each), encoded."""
    texts = ("the red object that stands out", "the blue one", "red square on grey")
    samples = []
    for record in dataset.records:
        record = dataclasses.replace(
            record,
            conversations=[[(VALIDATION_LONG_QUESTION.format(sent=t), VALIDATION_ANSWER)]
                           for t in texts],
            masks=lambda height, width, masks=record.masks: np.repeat(masks(height, width), 3, 0),
            queries=list(texts),
        )  # fmt: skip
        samples.append(dataset.encoder(record))
    return samples


def test_mixed_answers_in_one_batch_keep_their_own_masks(setup):
    """No, one and two [SEG] side by side in one batch and in one image: each query gets the
    masks of its own answer's [SEG], as if it had been scored alone."""
    model, tokenizer, datasets = setup
    model, encoder = _varied(model), datasets["reason"].encoder
    scripts = [
        tokenizer(text, add_special_tokens=False)["input_ids"]
        for text in (" I see none.", " red[SEG].", " red[SEG] and blue[SEG].")
    ]
    processor = [ByFirstToken(scripts, tokenizer.eos_token_id)]
    generation = GenerationSettings(max_new_tokens=12, batch_size=8)
    samples = _three_queries(datasets["reason"])
    predictions = predict_free(model, tokenizer, samples, encoder, ARGMAX, CPU, torch.float32,
                               generation, processor)  # fmt: skip
    prompts = [open_prompts(s, encoder) for s in samples]
    written = write_answers(model, tokenizer, samples, prompts, CPU, torch.float32, generation,
                            processor)  # fmt: skip
    distinct = 0
    for prediction, sample_prompts, answers in zip(predictions, prompts, written):
        masks = prediction.masks_by_head["proposals"]
        assert len(masks) == len(answers) == prediction.sample.masks.shape[0] == 3
        for (mask, _), prompt, answer, count in zip(
            masks, sample_prompts, answers, prediction.seg_counts
        ):
            alone = _chat_masks(model, prediction.sample, prompt, answer)
            assert len(alone) == count
            expected = torch.zeros_like(mask)
            for part in alone:
                expected |= part
            assert torch.equal(mask, expected)
            assert bool(mask.any()) == (count > 0)  # argmax: a [SEG] always has a mask
        distinct += len({tuple(m.flatten().tolist()) for m, _ in masks}) > 1
    counts = [c for p in predictions for c in p.seg_counts]
    assert set(counts) == {0, 1, 2}  # the batch really mixed the three kinds
    assert any(len(set(p.seg_counts)) > 1 for p in predictions)  # so did an image's queries
    assert distinct > 0  # and an image's queries got different masks: rows cannot be swapped


def test_batched_answers_equal_one_by_one(setup):
    model, tokenizer, datasets = setup
    model = _varied(model)
    samples = _samples(datasets["gref"]) + _samples(datasets["reason"])
    encoders = [datasets["gref"].encoder] * 2 + [datasets["reason"].encoder] * 4
    prompts = [open_prompts(s, e) for s, e in zip(samples, encoders)]
    lengths = {len(p) for sample_prompts in prompts for p in sample_prompts}
    assert len(lengths) > 3  # prompts of different lengths: the batch is padded
    stop = [StopAfterEven(tokenizer.eos_token_id)]
    batch_sizes = []
    hook = model.backbone.language_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["inputs_embeds"].shape[0]),
        with_kwargs=True,
    )
    try:
        together = write_answers(
            model,
            tokenizer,
            samples,
            prompts,
            CPU,
            torch.float32,
            GenerationSettings(max_new_tokens=10, batch_size=10),
            stop,
        )
    finally:
        hook.remove()
    alone = write_answers(model, tokenizer, samples, prompts, CPU, torch.float32,
                          GenerationSettings(max_new_tokens=10, batch_size=1), stop)  # fmt: skip
    flat_together = [a.tolist() for answers in together for a in answers]
    flat_alone = [a.tolist() for answers in alone for a in answers]
    assert flat_together == flat_alone
    assert len(flat_together) == 10
    assert len({len(a) for a in flat_together}) > 2  # rows finished at different steps
    # One forward per step for all ten rows; finished rows left the batch.
    assert batch_sizes[0] == 10
    assert batch_sizes == sorted(batch_sizes, reverse=True)
    assert batch_sizes[-1] < 10
    assert len(batch_sizes) == max(len(a) for a in flat_together)
