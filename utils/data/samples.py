"""From a dataset record to model-ready tensors, and from samples to a typed batch.

Every dataset family (reason_seg, refer_seg, sem_seg, vqa, LLM-Seg40K) only has to produce a
:class:`SegmentationRecord`: an image, its conversations and one ground-truth mask per ``[SEG]``.
:class:`SampleEncoder` does the rest the same way for all of them (image streams, proposals and
targets, tokenisation), and :func:`collate` stacks samples into an ``LLMSegBatch``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils.batch import LLMSegBatch, ReferenceInputs
from utils.data.conversation import (
    IGNORE_INDEX,
    VALIDATION_SHORT_QUESTION,
    ConversationFormat,
    EncodedConversation,
    SequenceTooLong,
    encode_conversation,
)
from utils.data.images import (
    load_rgb_image,
    mask_geometry,
    mask_to_clip_grid,
    masked_crop,
    preprocess_for_clip,
    preprocess_for_dinov2,
)
from utils.data.rejection import (
    REJECTION_SENTENCE,
    RejectionProbe,
    rejection_probe,
    token_rejection_answer,
)
from utils.legacy_tokenizer import LegacyLlamaTokenizer
from utils.masks import proposal_weight_maps
from utils.proposal_store import ProposalReader, build_proposal_sample
from utils.tokenizer import REF_TOKEN, SEG_TOKEN

logger = logging.getLogger(__name__)

Turns = list[tuple[str, str]]


class MissingProposalsError(KeyError):
    """The proposal store has no entry for an image (not prepared, or it failed preparation)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class SegmentationRecord:
    """One image with its conversations, as a dataset family produces it.

    Attributes:
        image_path: the image file.
        conversations: each a list of ``(question, answer)`` turns; answers hold the ``[SEG]``s.
        masks: called with the image's ``(height, width)``, returns ``(R, H, W)`` uint8 in
            {0, 1, 255}, one mask per ``[SEG]`` in conversation order (rasterised only once the
            image size is known); ``None`` for text-only (VQA) samples.
        proposals: the split's proposal store (``None`` for VQA).
        proposal_key: this image's key in the store.
        name: a short unique name (image stem) for logs, CSVs and pictures.
        dataset: which dataset it came from.
        groups: evaluation groups the image is reported under besides the total (ReasonSeg
            ``short``/``long``, a query type, ...).
        queries: the query text of each conversation, for visualisations.
        no_target: per mask row, whether its query refers to nothing (gRefCOCO); ``None`` for
            sets without such queries. Evaluation then also reports N-acc and T-acc.
        prediction_names: per mask row, the stem of its ``--pred_dir`` PNG (refer sets: the
            sentence's ``sent_id``, one PNG per expression); ``None``: ``name`` for every row.
    """

    image_path: Path
    conversations: list[Turns]
    masks: Callable[[int, int], np.ndarray] | None
    proposals: ProposalReader | None
    proposal_key: str
    name: str
    dataset: str
    groups: tuple[str, ...] = ()
    queries: list[str] = field(default_factory=list)
    no_target: tuple[bool, ...] | None = None
    prediction_names: tuple[str, ...] | None = None


@dataclass
class EncodedSample:
    """A :class:`SegmentationRecord` turned into tensors (one image, C conversations)."""

    record: SegmentationRecord
    conversations: list[EncodedConversation]
    clip_pixels: torch.Tensor  # (3, S, S)
    dino_pixels: torch.Tensor  # (3, D, D)
    resized_hw: tuple[int, int]  # image size inside the padded DINOv2 input
    proposal_masks: torch.Tensor  # (K, M, M) float weight maps
    proposal_ious: torch.Tensor  # (R, K)
    proposal_iops: torch.Tensor  # (R, K)
    proposal_binary: torch.Tensor  # (K, h, w) bool at the store resolution
    masks: torch.Tensor  # (R, H, W) uint8 ground truth at the image resolution
    # SegLLM references, one per <ref> token in conversation order (N = 0 without any)
    reference_rows: torch.Tensor | None = None  # (N,) the mask row each reference copies
    reference_clip_maps: torch.Tensor | None = None  # (N, g, g)
    reference_geometry: torch.Tensor | None = None  # (N, 5)
    reference_maps: torch.Tensor | None = None  # (N, M, M)
    reference_crops: torch.Tensor | None = None  # (N, 3, S, S) for the crop_cls mask encoder
    sam_pixels: torch.Tensor | None = None  # (3, S, S) for the SAM mask-decoder head
    sam_resized_hw: tuple[int, int] | None = None  # the image's size inside sam_pixels


@dataclass
class EncoderSettings:
    """How records become tensors (shared by training and evaluation)."""

    num_image_tokens: int
    clip_processor: object
    dino_image_size: int = 896
    top_k: int = 50
    proposal_order: str = "area"
    map_size: int = 256
    antialias: bool = True
    use_im_start_end: bool = True
    model_max_length: int = 512
    tokenization: str = "hf"  # or "llava_legacy" (utils.legacy_tokenizer)
    # [REF:k] markers: "tokens" (<ref> + the round's mask), "strip" (words only), "auto"
    # (tokens when the tokenizer holds <ref>)
    references: str = "auto"
    ref_placement: str = "inline"  # or "turn_start" (SegLLM's)
    reference_crops: bool = False  # CLIP inputs of the masked crops (the crop_cls encoder)
    sam_image_size: int = 0  # SAM's input side when the model has a SAM head (0: none)
    # the model's --rejection: "token" writes no-target answers as "[REJ]." (utils.data.rejection)
    rejection: str = "none"


class SampleEncoder:
    """Turns :class:`SegmentationRecord` s into :class:`EncodedSample` s.

    A conversation longer than ``model_max_length`` that holds ``[SEG]`` is dropped whole with
    its masks (never truncated: a cut could lose a ``[SEG]`` and misalign the targets). A
    text-only dialogue (VQA) is cut at the last turn boundary that fits instead, as that keeps
    more of the data than dropping it (upstream cuts at a token, mid-answer); it is dropped only
    when its first turn alone is too long. ``num_dropped`` and ``num_truncated`` count them. A
    record whose conversations are all dropped returns ``None``.
    """

    def __init__(self, tokenizer, fmt: ConversationFormat, settings: EncoderSettings):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.settings = settings
        self.num_dropped = 0
        self.num_truncated = 0
        self._probes: dict[str, RejectionProbe] = {}
        self.legacy = (
            LegacyLlamaTokenizer.from_tokenizer(tokenizer)
            if settings.tokenization == "llava_legacy"
            else None
        )
        self.references = settings.references
        if self.references == "auto":
            self.references = "tokens" if REF_TOKEN in tokenizer.get_vocab() else "strip"

    def rejection_probe(self, mode: str) -> RejectionProbe:
        """Where this encoding shows a ``mode`` (answer/token) model's choice to reject
        (:func:`~utils.data.rejection.rejection_probe`), worked out once per mode."""
        if mode not in self._probes:
            question = VALIDATION_SHORT_QUESTION.format(class_name="it")
            self._probes[mode] = rejection_probe(
                lambda answer: self._encode([(question, answer)]),
                mode,
                self.tokenizer.convert_tokens_to_ids(SEG_TOKEN),
            )
        return self._probes[mode]

    def _encode(self, turns: Turns) -> EncodedConversation:
        if self.settings.rejection == "token":
            turns = [
                (
                    question,
                    token_rejection_answer(question) if answer == REJECTION_SENTENCE else answer,
                )
                for question, answer in turns
            ]
        return encode_conversation(
            self.tokenizer,
            turns,
            self.settings.num_image_tokens,
            self.fmt,
            self.settings.use_im_start_end,
            self.settings.model_max_length,
            legacy=self.legacy,
            references=self.references,
            ref_placement=self.settings.ref_placement,
            label_answer_space=self.settings.rejection != "none",
        )

    def encode_text_dialogue(self, turns: Turns) -> EncodedConversation:
        """The longest leading run of ``turns`` (whole turns) that fits ``model_max_length``.

        Raises:
            SequenceTooLong: not even the first turn fits.
        """
        for count in range(len(turns), 0, -1):
            try:
                return self._encode(turns[:count])
            except SequenceTooLong:
                if count == 1:
                    raise
        raise ValueError("a dialogue needs at least one turn")

    def _encode_conversations(
        self, record: SegmentationRecord
    ) -> tuple[list[EncodedConversation], list[int]]:
        """Encoded conversations and, for each kept one, the mask rows it owns."""
        kept, rows, next_row = [], [], 0
        for turns in record.conversations:
            text_only = not any(answer and SEG_TOKEN in answer for _, answer in turns)
            try:
                if text_only:
                    encoded = self.encode_text_dialogue(turns)
                    self.num_truncated += encoded.num_turns < len(turns)
                else:
                    encoded = self._encode(turns)
            except SequenceTooLong as error:
                self.num_dropped += 1
                logger.info("dropping a conversation of %s: %s", record.image_path, error)
                next_row += sum(answer.count("[SEG]") for _, answer in turns if answer)
                continue
            kept.append(encoded)
            rows.extend(range(next_row, next_row + encoded.num_seg))
            next_row += encoded.num_seg
        return kept, rows

    def __call__(self, record: SegmentationRecord) -> EncodedSample | None:
        conversations, rows = self._encode_conversations(record)
        if not conversations:
            return None
        image = load_rgb_image(record.image_path)
        height, width = image.shape[:2]
        if record.masks is None:
            masks = np.zeros((0, height, width), np.uint8)
        else:
            masks = record.masks(height, width)
        total_seg = sum(a.count("[SEG]") for turns in record.conversations for _, a in turns if a)
        if masks.shape != (total_seg, height, width):
            raise ValueError(
                f"{record.image_path}: {total_seg} [SEG] answers need masks of shape "
                f"{(total_seg, height, width)}, got {masks.shape}"
            )
        masks = torch.from_numpy(np.ascontiguousarray(masks[rows]))
        reference_rows = _reference_rows(conversations, record)
        dino_pixels, resized_hw = preprocess_for_dinov2(image, self.settings.dino_image_size)
        sam_inputs = {}
        if self.settings.sam_image_size:  # the same preprocessing at SAM's size, as LISA's
            sam_pixels, sam_resized = preprocess_for_dinov2(image, self.settings.sam_image_size)
            sam_inputs = {"sam_pixels": sam_pixels, "sam_resized_hw": sam_resized}
        if record.proposals is not None:
            try:
                stored = record.proposals.get(record.proposal_key)
            except KeyError as error:
                raise MissingProposalsError(error.args[0]) from None
            proposals = build_proposal_sample(
                stored,
                masks if len(masks) else None,
                top_k=self.settings.top_k,
                order=self.settings.proposal_order,
                size=self.settings.map_size,
                antialias=self.settings.antialias,
            )
            weight_maps, ious, iops, binary = (
                proposals.weight_maps,
                proposals.iou,
                proposals.iop,
                proposals.masks,
            )
        else:
            size = self.settings.map_size
            weight_maps = torch.zeros((0, size, size))
            ious = iops = torch.zeros((len(masks), 0))
            binary = torch.zeros((0, height, width), dtype=torch.bool)
        return EncodedSample(
            record=record,
            conversations=conversations,
            clip_pixels=preprocess_for_clip(self.settings.clip_processor, image),
            dino_pixels=dino_pixels,
            resized_hw=resized_hw,
            proposal_masks=weight_maps,
            proposal_ious=ious,
            proposal_iops=iops,
            proposal_binary=binary,
            masks=masks,
            **self._reference_inputs(masks, reference_rows, image),
            **sam_inputs,
        )

    def encode_reference_masks(
        self, masks: torch.Tensor, image: np.ndarray | None = None
    ) -> dict[str, torch.Tensor]:
        """:func:`encode_reference_masks` with this encoder's settings (``image`` is needed for
        the crops of the ``crop_cls`` encoder)."""
        settings = self.settings
        return encode_reference_masks(
            masks, settings.clip_processor, settings.num_image_tokens, settings.map_size,
            settings.antialias, image if settings.reference_crops else None,
        )  # fmt: skip

    def _reference_inputs(self, masks: torch.Tensor, rows: list[int], image) -> dict:
        if not rows:
            return {}
        inputs = self.encode_reference_masks(masks[rows], image)
        return {"reference_rows": torch.tensor(rows, dtype=torch.long), **inputs}


def encode_reference_masks(
    masks: torch.Tensor,
    clip_processor,
    num_image_tokens: int,
    map_size: int,
    antialias: bool = True,
    image: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """What the model reads of each mask a ``<ref>`` stands for (ground truth in training, the
    model's own earlier predictions in autoregressive evaluation and in a chat session).

    Args:
        masks: ``(N, H, W)`` at the image resolution (nonzero and not 255 = the object).
        clip_processor: the vision tower's image processor (its resize/crop frame).
        num_image_tokens: CLIP patches per image (a square grid).
        map_size: side of the proposal weight maps.
        image: ``(H, W, 3)`` uint8 RGB: also make ``reference_crops`` (the ``crop_cls``
            encoder's CLIP inputs, :func:`~utils.data.images.masked_crop`).
    Returns:
        ``reference_clip_maps (N, g, g)``, ``reference_geometry (N, 5)``,
        ``reference_maps (N, M, M)`` (and ``reference_crops (N, 3, S, S)`` with ``image``).
    """
    grid = math.isqrt(num_image_tokens)
    if grid * grid != num_image_tokens:
        raise ValueError(
            f"references need a square CLIP patch grid; {num_image_tokens} image tokens are not "
            "one (a CLS token too?)"
        )
    if len(masks) == 0:
        return {
            "reference_clip_maps": torch.zeros((0, grid, grid)),
            "reference_geometry": torch.zeros((0, 5)),
            "reference_maps": torch.zeros((0, map_size, map_size)),
        }
    binary = ((masks > 0) & (masks != 255)).numpy()
    inputs = {
        "reference_clip_maps": torch.stack(
            [mask_to_clip_grid(m, clip_processor, grid) for m in binary]
        ),
        "reference_geometry": torch.stack([mask_geometry(m) for m in binary]),
        "reference_maps": proposal_weight_maps(torch.from_numpy(binary), map_size, antialias),
    }
    if image is not None:
        inputs["reference_crops"] = torch.stack(
            [preprocess_for_clip(clip_processor, masked_crop(image, m)) for m in binary]
        )
    return inputs


def _reference_rows(conversations: list[EncodedConversation], record) -> list[int]:
    """For every ``<ref>`` of the kept conversations, in order, the (kept) mask row of the round
    it names: the first ``[SEG]`` of that round's answer.

    Raises:
        ValueError: a referenced round has no ``[SEG]`` (its mask is not known).
    """
    rows, offset = [], 0
    for conversation in conversations:
        for round_index in conversation.ref_rounds:
            if round_index not in conversation.seg_turns:
                raise ValueError(
                    f"{record.image_path}: a question refers to round {round_index}, whose answer "
                    f"has no {SEG_TOKEN}: {conversation.text!r}"
                )
            rows.append(offset + conversation.seg_turns.index(round_index))
        offset += conversation.num_seg
    return rows


def collate_batch(samples: list[EncodedSample], pad_token_id: int) -> LLMSegBatch:
    """:func:`collate` without the samples (for DataLoader workers: only tensors travel)."""
    return collate(samples, pad_token_id)[0]


def collate(samples: list[EncodedSample], pad_token_id: int) -> tuple[LLMSegBatch, list]:
    """Stack encoded samples into one batch (right padding, as LLaMA's tokenizer pads).

    Returns:
        ``(batch, samples)``; the samples ride along for evaluation (GT masks, binary
        proposals, names), since the model does not need them.
    """
    rows = [(i, conv) for i, sample in enumerate(samples) for conv in sample.conversations]
    length = max(len(conv.input_ids) for _, conv in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (_, conv) in enumerate(rows):
        n = len(conv.input_ids)
        input_ids[row, :n] = conv.input_ids
        labels[row, :n] = conv.labels
        attention_mask[row, :n] = 1
    batch = LLMSegBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        clip_pixels=torch.stack([s.clip_pixels for s in samples]),
        dino_pixels=torch.stack([s.dino_pixels for s in samples]),
        image_index=torch.tensor([i for i, _ in rows], dtype=torch.long),
        proposal_masks=[s.proposal_masks for s in samples],
        proposal_ious=[s.proposal_ious for s in samples],
        proposal_iops=[s.proposal_iops for s in samples],
        references=collate_references(samples),
        **collate_sam_inputs(samples),
    )
    return batch, samples


def collate_sam_inputs(samples: list[EncodedSample]) -> dict:
    """The SAM head's inputs and targets (nothing when the samples have no SAM pixels)."""
    if any(s.sam_pixels is None for s in samples):
        return {}
    return {
        "sam_pixels": torch.stack([s.sam_pixels for s in samples]),
        "sam_resized_hw": [tuple(s.sam_resized_hw) for s in samples],
        "image_sizes": [tuple(s.masks.shape[1:]) for s in samples],
        "target_masks": [(s.masks == 1).to(torch.uint8) for s in samples],
        "image_keys": [str(s.record.image_path) for s in samples],
    }


def collate_references(samples: list[EncodedSample]) -> ReferenceInputs | None:
    """The samples' references in batch order (samples, then their ``<ref>`` order), with each
    reference's IoU target row copied from the round it names; ``None`` without any."""
    counts = [0 if s.reference_rows is None else len(s.reference_rows) for s in samples]
    if not any(counts):
        return None
    present = [s for s in samples if s.reference_rows is not None]
    ious = []
    for sample in samples:
        if sample.reference_rows is None:
            ious.append(sample.proposal_ious.new_zeros((0, sample.proposal_ious.shape[1])))
        else:
            ious.append(sample.proposal_ious[sample.reference_rows])
    return ReferenceInputs(
        clip_maps=torch.cat([s.reference_clip_maps for s in present]),
        geometry=torch.cat([s.reference_geometry for s in present]),
        proposal_maps=torch.cat([s.reference_maps for s in present]),
        crop_pixels=(
            torch.cat([s.reference_crops for s in present])
            if all(s.reference_crops is not None for s in present)
            else None
        ),
        image_index=torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(counts)),
        ious=ious,
        rows=torch.cat([s.reference_rows for s in present]),
    )
