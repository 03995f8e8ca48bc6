"""Hand-built :class:`LLMSegBatch` objects for the model tests.

Each conversation row is ``<s> <im_start> <image>*N <im_end> USER text ASSISTANT answer </s>``
where the answer holds that row's ``[SEG]`` tokens at chosen offsets. Proposals are random
rectangles on an ``M x M`` grid and every ``[SEG]`` gets its own random rectangle target, whose
IoU/IoP with each proposal are computed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.heads.losses import IGNORE_INDEX
from utils.batch import LLMSegBatch
from utils.tokenizer import IMAGE_END_TOKEN, IMAGE_START_TOKEN, IMAGE_TOKEN, SEG_TOKEN


@dataclass
class BatchSpec:
    """What to put in a batch.

    Attributes:
        rows: per image, per conversation row, the number of ``[SEG]`` tokens in the answer.
        proposals: per image, the number of proposals ``K_i``.
        map_size: side of the proposal weight maps.
        clip_size, dino_size: square input sides.
        zero_area: indices (per image) of proposals left empty.
    """

    rows: list[list[int]]
    proposals: list[int]
    map_size: int = 32
    clip_size: int = 32
    dino_size: int = 112
    zero_area: tuple[int, ...] = ()


def random_rectangles(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``(count, size, size)`` float masks, each one random axis-aligned rectangle."""
    masks = torch.zeros(count, size, size)
    for k in range(count):
        y0, x0 = torch.randint(0, size - 4, (2,), generator=generator).tolist()
        h, w = torch.randint(3, size // 2, (2,), generator=generator).tolist()
        masks[k, y0 : y0 + h, x0 : x0 + w] = 1.0
    return masks


def iou_iop_targets(proposals: torch.Tensor, targets: torch.Tensor):
    """Exact ``(R, K)`` IoU and IoP of binary proposals ``(K, M, M)`` vs targets ``(R, M, M)``."""
    p = proposals.flatten(1).bool()
    g = targets.flatten(1).bool()
    inter = (g[:, None] & p[None]).sum(-1).float()
    union = (g[:, None] | p[None]).sum(-1).float()
    area = p.sum(-1).float()[None]
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    iop = torch.where(area > 0, inter / area.clamp_min(1), torch.zeros_like(inter))
    return iou, iop


_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "circle")


def _row_ids(tokenizer, num_image_tokens: int, num_segs: int, row: int):
    ids = tokenizer.convert_tokens_to_ids
    prompt = [tokenizer.bos_token_id, ids(IMAGE_START_TOKEN)]
    prompt += [ids(IMAGE_TOKEN)] * num_image_tokens + [ids(IMAGE_END_TOKEN)]
    prompt += tokenizer(" USER: segment the red one" + " please" * row, add_special_tokens=False)[
        "input_ids"
    ]
    prompt += tokenizer(" ASSISTANT:", add_special_tokens=False)["input_ids"]
    answer = tokenizer(" Sure,", add_special_tokens=False)["input_ids"]
    for s in range(num_segs):
        # Vary where [SEG] sits (a different number of words before each one) and what it
        # follows: a tiny random LLM barely mixes context, so the word before [SEG] is what
        # tells its rounds apart at initialisation.
        words = " it is" * (1 + (row + s) % 3) + " the " + _WORDS[(3 * row + s) % len(_WORDS)]
        answer += tokenizer(words, add_special_tokens=False)["input_ids"]
        answer.append(ids(SEG_TOKEN))
    answer += tokenizer(".", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, answer


def make_batch(tokenizer, num_image_tokens: int, spec: BatchSpec, seed: int = 0) -> LLMSegBatch:
    """A complete, consistent batch following ``spec`` (rows are grouped by image)."""
    generator = torch.Generator().manual_seed(seed)
    sequences, image_index = [], []
    for image, rows in enumerate(spec.rows):
        for row, num_segs in enumerate(rows):
            sequences.append(_row_ids(tokenizer, num_image_tokens, num_segs, row + 3 * image))
            image_index.append(image)
    length = max(len(p) + len(a) for p, a in sequences)
    batch_size = len(sequences)
    input_ids = torch.full((batch_size, length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
    for b, (prompt, answer) in enumerate(sequences):
        full = torch.tensor(prompt + answer)
        input_ids[b, : len(full)] = full
        attention_mask[b, : len(full)] = 1
        labels[b, len(prompt) : len(full)] = torch.tensor(answer)

    masks, ious, iops = [], [], []
    for rows, count in zip(spec.rows, spec.proposals):
        proposals = random_rectangles(count, spec.map_size, generator)
        for k in spec.zero_area:
            if k < count:
                proposals[k] = 0
        targets = random_rectangles(sum(rows), spec.map_size, generator)
        for r in range(targets.shape[0] if count else 0):
            # Most targets are close to one proposal (shifted by a pixel), as for real GT masks.
            if torch.rand((), generator=generator) < 0.8:
                source = proposals[torch.randint(0, count, (), generator=generator)]
                targets[r] = torch.roll(source, shifts=1, dims=1)
        iou, iop = iou_iop_targets(proposals, targets)
        masks.append(proposals)
        ious.append(iou)
        iops.append(iop)
    num_images = len(spec.rows)
    return LLMSegBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        clip_pixels=torch.randn(num_images, 3, spec.clip_size, spec.clip_size, generator=generator),
        dino_pixels=torch.randn(num_images, 3, spec.dino_size, spec.dino_size, generator=generator),
        image_index=torch.tensor(image_index),
        proposal_masks=masks,
        proposal_ious=ious,
        proposal_iops=iops,
    )
