"""Free-generation evaluation (``eval.py --mode free``): the model writes its own answers.

Every validation query gets the prompt the teacher-forced evaluation reads (the records'
``VALIDATION_LONG_QUESTION`` / ``VALIDATION_SHORT_QUESTION``), its answer left open; the model
answers greedily, several queries per forward with a KV cache, up to ``max_new_tokens`` or
``</s>`` (:mod:`model.generation`, shared with ``chat.py``). Prompt + written answer are then
scored in one teacher-forced pass, as chat's free mode (:mod:`model.inference`) does, so a
written ``[SEG]`` is scored exactly as a given one. A query's mask is the union of the masks of
every ``[SEG]`` its answer holds; an answer without ``[SEG]`` rejects (as
:mod:`utils.data.rejection` defines it, read from the ids): an empty mask, which gRefCOCO's
N-acc counts as a right rejection on a no-target query and T-acc as a wrong one otherwise.

Metrics and files are the teacher-forced ones (:func:`model.evaluation.evaluate`: gIoU, cIoU,
per group, per mask head, gRefCOCO's section), plus ``mode: "free"``, ``max_new_tokens``,
``num_answers`` and ``answers``: the fractions of answers with no, one and several ``[SEG]``.
The per-image CSV gains each query's ``answer`` and ``num_seg``. Single-round sets only (each
conversation one question answered by one ``[SEG]``); a multi-round conversation is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model.evaluation import (
    HEAD_MASKS,
    SelectionSettings,
    gather_rows,
    head_masks,
    score_sample,
    score_unusable,
    summarize,
    write_results,
)
from model.generation import generate_answers
from utils.data.conversation import (
    IGNORE_INDEX,
    EncodedConversation,
    answer_start,
)
from utils.data.samples import EncodedSample, SegmentationRecord, collate
from utils.device import collective_device
from utils.distributed import is_main_process, rank, world_size
from utils.grefcoco_metrics import GRefCOCOMetrics
from utils.metrics import MultiRoundMetrics, SegmentationMetrics

logger = logging.getLogger(__name__)

ANSWER_KINDS = ("no_seg", "one_seg", "several_seg")  # by how many [SEG] an answer holds


@dataclass
class GenerationSettings:
    """How answers are written: at most ``max_new_tokens`` each, ``batch_size`` per forward."""

    max_new_tokens: int = 32
    batch_size: int = 8


def open_prompts(sample: EncodedSample, encoder) -> list[torch.Tensor]:
    """The prompt of each of ``sample``'s conversations with its answer left open.

    Args:
        sample: an encoded evaluation sample (its conversations: the ones the encoder kept).
        encoder: the dataset's :class:`~utils.data.samples.SampleEncoder`.
    Returns:
        one ``(L_c,)`` id tensor per conversation, ``<image>`` expanded, ending where the
        answer's labels start (:func:`~utils.data.conversation.answer_start`).
    Raises:
        ValueError: a conversation that is not one question answered by one ``[SEG]``.
    """
    prompts = []
    for conversation in sample.conversations:
        if conversation.num_turns != 1 or conversation.num_seg != 1:
            raise ValueError(
                f"{sample.record.image_path}: free generation scores single-round conversations "
                f"(one question, one [SEG]); this one has {conversation.num_turns} turns and "
                f"{conversation.num_seg} [SEG]: --mode"
            )
        prompts.append(conversation.input_ids[: answer_start(conversation)])
    return prompts


def write_answers(
    model, tokenizer, samples: Sequence[EncodedSample], prompts: Sequence[Sequence[torch.Tensor]],
    device: torch.device, dtype: torch.dtype, generation: GenerationSettings,
    logits_processor: Sequence | None = None,
) -> list[list[torch.Tensor]]:  # fmt: skip
    """Greedy answers to every prompt of ``samples``, ``generation.batch_size`` per forward.

    Returns:
        per sample, per conversation, the ``(T,)`` answer ids (``</s>`` included when written).
    """
    flat = [(i, prompt) for i, sample_prompts in enumerate(prompts) for prompt in sample_prompts]
    clip_pixels = torch.stack([s.clip_pixels for s in samples]).to(device, dtype)
    vision = model.backbone.vision_features(clip_pixels)  # CLIP once for every slice
    written: list[torch.Tensor] = []
    for start in range(0, len(flat), generation.batch_size):
        rows = flat[start : start + generation.batch_size]
        written += generate_answers(
            model.backbone, tokenizer, [prompt for _, prompt in rows], clip_pixels,
            torch.tensor([i for i, _ in rows]), generation.max_new_tokens, logits_processor,
            vision,
        )  # fmt: skip
    answers, offset = [], 0
    for sample_prompts in prompts:
        answers.append(written[offset : offset + len(sample_prompts)])
        offset += len(sample_prompts)
    return answers


def score_answers(
    model, samples: Sequence[EncodedSample], prompts, answers, pad_token_id: int,
    device: torch.device, dtype: torch.dtype,
):  # fmt: skip
    """One teacher-forced pass over every prompt + written answer (right-padded rows).

    Returns:
        the model's :class:`~model.llm_seg.LLMSegOutput`: per sample (image) ``(R_i, K_i)``
        scores, ``R_i`` the ``[SEG]`` its answers hold, conversation by conversation.
    """
    rewritten = []
    for sample, sample_prompts, sample_answers in zip(samples, prompts, answers):
        conversations = []
        for prompt, answer in zip(sample_prompts, sample_answers):
            ids = torch.cat([prompt, answer])
            num_seg = int((answer == model.seg_token_id).sum())
            conversations.append(
                EncodedConversation(ids, torch.full_like(ids, IGNORE_INDEX), num_seg, "")
            )
        rewritten.append(dataclasses.replace(sample, conversations=conversations))
    batch, _ = collate(rewritten, pad_token_id)
    # No targets: the [SEG]s are the model's own, they need not match the ground-truth rows.
    batch = dataclasses.replace(
        batch, labels=None, proposal_ious=None, proposal_iops=None, target_masks=None
    )
    return model.score(batch.to(device, dtype))


def answer_masks(
    sample: EncodedSample, output, image: int, seg_counts: Sequence[int],
    selection: SelectionSettings, head: str,
) -> list[tuple[torch.Tensor, int]]:  # fmt: skip
    """``(mask (H, W) bool, proposals selected)`` per conversation of ``sample``, image
    ``image`` of ``output``: the union of the masks of the ``seg_counts[c]`` ``[SEG]`` its
    answer wrote (in order), all false without any."""
    height, width = sample.masks.shape[1:]
    view = dataclasses.replace(
        output,
        similarities=output.similarities[image : image + 1],
        iop_scores=output.iop_scores[image : image + 1],
        sam_logits=output.sam_logits[image : image + 1],
    )
    # head_masks makes one mask per row of sample.masks, at its size: one row per [SEG].
    rows = sample.masks.new_zeros((1, height, width)).expand(sum(seg_counts), -1, -1)
    per_seg = head_masks(dataclasses.replace(sample, masks=rows), view, selection, head)
    masks, start = [], 0
    for count in seg_counts:
        own, start = per_seg[start : start + count], start + count
        union = torch.zeros((height, width), dtype=torch.bool)
        for mask, _ in own:
            union |= mask
        masks.append((union, sum(selected for _, selected in own)))
    return masks


@dataclass
class FreePrediction:
    """What the model wrote and segmented for one sample.

    Attributes:
        sample: the encoded sample.
        answers: per conversation, the answer text (``[SEG]`` kept, ``</s>`` dropped).
        seg_counts: per conversation, how many ``[SEG]`` its answer holds.
        masks_by_head: per mask head, per conversation ``(mask (H, W) bool, selected)``.
    """

    sample: EncodedSample
    answers: list[str]
    seg_counts: list[int]
    masks_by_head: dict[str, list[tuple[torch.Tensor, int]]]


@torch.no_grad()
def predict_free(
    model, tokenizer, samples: Sequence[EncodedSample], encoder, selection: SelectionSettings,
    device: torch.device, dtype: torch.dtype, generation: GenerationSettings,
    logits_processor: Sequence | None = None,
) -> list[FreePrediction]:  # fmt: skip
    """Write answers to every conversation of ``samples`` and turn their ``[SEG]`` into masks
    (every head of the model; ``encoder``: the dataset's, for the prompts)."""
    if not samples:
        return []
    heads = HEAD_MASKS[getattr(model, "mask_head", "proposals")]
    prompts = [open_prompts(sample, encoder) for sample in samples]
    answers = write_answers(
        model, tokenizer, samples, prompts, device, dtype, generation, logits_processor
    )
    output = score_answers(model, samples, prompts, answers, tokenizer.pad_token_id, device, dtype)
    predictions = []
    for image, (sample, sample_answers) in enumerate(zip(samples, answers)):
        seg_counts = [int((answer == model.seg_token_id).sum()) for answer in sample_answers]
        predictions.append(
            FreePrediction(
                sample,
                [tokenizer.decode(a, skip_special_tokens=True).strip() for a in sample_answers],
                seg_counts,
                {h: answer_masks(sample, output, image, seg_counts, selection, h) for h in heads},
            )
        )
    return predictions


def _groups(dataset, indices, batch_size: int) -> Iterator[list]:
    """Dataset items in groups holding about ``batch_size`` conversations each."""
    group, conversations = [], 0
    for index in indices:
        item = dataset[index]
        group.append(item)
        conversations += len(item.conversations) if isinstance(item, EncodedSample) else 0
        if conversations >= batch_size:
            yield group
            group, conversations = [], 0
    if group:
        yield group


@torch.no_grad()
def evaluate_free(
    model, dataset, tokenizer, selection: SelectionSettings, device: torch.device,
    dtype: torch.dtype, out_dir: str | os.PathLike, generation: GenerationSettings | None = None,
    visualize: int = 0, prefix: str = "", logits_processor: Sequence | None = None,
) -> dict:  # fmt: skip
    """Score ``dataset`` on the model's own answers; write ``metrics.json`` + ``per_image.csv``.

    Args:
        model: an ``LLMSegModel`` (unwrapped).
        dataset: an ``EvaluationDataset`` (its ``encoder`` gives the prompts); this rank takes
            ``rank::world_size``.
        tokenizer: the model's tokenizer (``</s>``, padding, decoding the answers).
        selection, device, dtype, out_dir, visualize, prefix: as :func:`~model.evaluation.evaluate`.
        generation: answer length and batch size (default: :class:`GenerationSettings`).
        logits_processor: ``transformers`` logits processors applied while writing.
    Returns:
        :func:`~model.evaluation.evaluate`'s metrics plus ``mode``, ``max_new_tokens``,
        ``num_answers`` and ``answers`` (fractions of :data:`ANSWER_KINDS`); for a model trained
        with ``--rejection``, as teacher-forced, ``rejection`` and ``num_rejected`` (answers
        without ``[SEG]``).
    """
    generation = generation or GenerationSettings()
    out_dir = Path(out_dir)
    was_training = model.training
    model.eval()
    heads = HEAD_MASKS[getattr(model, "mask_head", "proposals")]
    metrics = {head: SegmentationMetrics() for head in heads}
    no_target_metrics = GRefCOCOMetrics()  # used by records that flag no-target rows
    rows: list[dict] = []
    kinds = [0] * len(ANSWER_KINDS)
    no_proposals = 0
    indices = tqdm(range(rank(), len(dataset), world_size()), desc="evaluate (free)",
                   disable=not is_main_process(), mininterval=5)  # fmt: skip
    for group in _groups(dataset, indices, generation.batch_size):
        for record in (item for item in group if isinstance(item, SegmentationRecord)):
            for head in heads:  # its prompt did not fit: every target scored as empty
                unusable = score_unusable(
                    record, metrics[head], MultiRoundMetrics(), False, head,
                    no_target_metrics if head == heads[0] else None,
                )  # fmt: skip
                rows += [{**row, "answer": "", "num_seg": 0} for row in unusable]
        samples = [item for item in group if isinstance(item, EncodedSample)]
        if "proposals" in heads:
            no_proposals += sum(sample.proposal_masks.shape[0] == 0 for sample in samples)
        predictions = predict_free(
            model, tokenizer, samples, dataset.encoder, selection, device, dtype, generation,
            logits_processor,
        )  # fmt: skip
        for prediction in predictions:
            drawn = visualize < 0 or len(rows) < visualize
            scored = score_sample(
                prediction.sample, prediction.masks_by_head, metrics,
                out_dir / "vis" if drawn else None, None, no_target_metrics,
            )  # fmt: skip
            answers = len(prediction.answers)
            for k, row in enumerate(scored):  # head by head, then conversation by conversation
                row["answer"] = prediction.answers[k % answers]
                row["num_seg"] = prediction.seg_counts[k % answers]
            rows += scored
            for count in prediction.seg_counts:
                kinds[min(count, 2)] += 1
    if no_proposals:
        logger.warning("%d images had no proposals and were scored as empty masks", no_proposals)
    results = summarize(metrics, no_target_metrics, rows, heads, selection, dataset)
    results["mode"] = "free"
    results["max_new_tokens"] = generation.max_new_tokens
    kinds = _all_reduce(kinds)
    results["num_answers"], results["answers"] = sum(kinds), _answer_fractions(kinds)
    if getattr(model, "rejection", "none") != "none":  # as teacher-forced: rejected queries
        results["rejection"] = model.rejection
        results["num_rejected"] = kinds[0]
    all_rows = gather_rows(rows)
    write_results(results, all_rows, out_dir, prefix)
    model.train(was_training)
    return results


def _all_reduce(counts: list[int]) -> list[int]:
    """``counts`` summed over ranks."""
    if world_size() == 1:
        return counts
    totals = torch.tensor(counts, dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(totals)
    return [int(v) for v in totals.tolist()]


def _answer_fractions(kinds: list[int]) -> dict:
    """``{kind: fraction of the answers}`` (``None`` without answers)."""
    total = sum(kinds)
    return {kind: (n / total if total else None) for kind, n in zip(ANSWER_KINDS, kinds)}
