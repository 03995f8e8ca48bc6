"""Building the training mixture and the evaluation sets from command-line strings.

``--dataset "sem_seg||refer_seg||reason_seg" --sample_rates "9,3,1"`` picks training families;
``--val_dataset "ReasonSeg|val"`` (or ``ReasonSeg|test``, ``refcoco|unc|val``, ``grefcoco|unc|val``,
``LLMSeg40K|validation``) picks the evaluation set. Each family registers a builder here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from utils.data.conversation import conversation_format
from utils.data.conversation_split import load_conversation_split
from utils.data.dataset_files import check_proposal_coverage
from utils.data.grefcoco import GREFCOCO, load_grefcoco_split, parse_grefcoco_spec
from utils.data.images import clip_image_processor
from utils.data.llmseg40k import LLMSeg40KSource, llmseg40k_eval_record, load_llmseg40k_split
from utils.data.mixing import EvaluationDataset, MixedTrainingDataset, parse_mixture
from utils.data.mrseg import load_mrseg
from utils.data.multi_round import DEFAULT_MAX_ROUNDS, MultiRoundSource, load_multi_round_train
from utils.data.multi_target import MULTI_TARGET_ANSWERS
from utils.data.reason_seg import (
    ReasonSegSource,
    load_reason_seg_split,
    reason_seg_eval_records,
)
from utils.data.refer_seg import SPLIT_BY, load_refer_split, load_refer_train, refer_eval_record
from utils.data.samples import EncoderSettings, SampleEncoder
from utils.data.sem_seg import SemSegSource, load_sem_seg_datasets
from utils.data.vqa import VQASource, load_vqa
from utils.legacy_tokenizer import resolve_tokenization

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where the data is and how samples are drawn and encoded."""

    dataset_dir: str = field(default="./dataset", metadata={"help": "dataset root"})
    sam_masks_dir: str = field(default="./sam_masks", metadata={"help": "proposal store root"})
    dataset: str = field(
        default="sem_seg||refer_seg||reason_seg",
        metadata={"help": "training families, '||'-joined"},
    )
    sample_rates: str = field(default="9,3,1", metadata={"help": "family sampling weights"})
    sem_seg_data: str = field(
        default="ade20k||cocostuff||pascal_part||paco_lvis||mapillary",
        metadata={"help": "semantic segmentation datasets"},
    )
    refer_seg_data: str = field(
        default="refclef||refcoco||refcoco+||refcocog", metadata={"help": "referring datasets"}
    )
    false_premise_fraction: float = field(
        default=0.0,
        metadata={"help": "refer_seg training: probability that a sentence is replaced by one of "
                  "another image naming a category absent from this one, answered with the "
                  "rejection sentence (needs --rejection answer or token)"},
    )  # fmt: skip
    multi_target_answer: str = field(
        default="union",
        metadata={"help": "training rounds of a multi-target query (gRefCOCO refs of several "
                  "annotations, ReasonSeg jsons' targets lists): union (one [SEG], the union "
                  "mask) or per_instance (one [SEG] per instance: '[SEG], [SEG] and [SEG].')",
                  "choices": list(MULTI_TARGET_ANSWERS)},
    )  # fmt: skip
    vqa_data: str = field(default="llava_instruct_150k", metadata={"help": "VQA dataset"})
    reason_seg_data: str = field(default="ReasonSeg|train", metadata={"help": "ReasonSeg split"})
    llmseg40k_data: str = field(default="LLMSeg40K|train", metadata={"help": "LLM-Seg40K split"})
    llmseg40k_dir: str = field(
        default="LLM-Seg40K",
        metadata={"help": "folder of the LLM-Seg40K split jsons, relative to --dataset_dir"},
    )
    multi_round_data: str = field(
        default="mr_refcoco||mr_refcoco+||mr_refcocog",
        metadata={"help": "multi_round family: MRSeg conversation files under mrseg/"},
    )
    max_rounds: int = field(
        default=DEFAULT_MAX_ROUNDS,
        metadata={"help": "multi_round training: rounds kept per conversation (SegLLM's 6)"},
    )
    conversations_per_sample: int = field(
        default=1,
        metadata={"help": "multi_round training: conversations about one picture per sample "
                  "(1: one conversation; N: a picture and up to N of its conversations, "
                  "whose picture-side work is then shared)"},
    )  # fmt: skip
    skip_missing: bool = field(
        default=False,
        metadata={"help": "evaluation: score the images that have their annotation and list the "
                  "unpaired files in metrics.json (default: stop, naming them)"},
    )  # fmt: skip
    history: str = field(
        default="gt",
        metadata={"help": "what a [REF:k] reference reads: gt (the ground-truth mask), "
                  "predicted (the model's own earlier prediction; evaluation only), none "
                  "(removed: the words only, the single-round baseline)",
                  "choices": ["gt", "predicted", "none"]},
    )  # fmt: skip
    ref_placement: str = field(
        default="inline",
        metadata={"help": "where a reference's <ref> token goes: inline (where [REF:k] stands) "
                  "or turn_start (SegLLM's place)", "choices": ["inline", "turn_start"]},
    )  # fmt: skip
    val_dataset: str = field(default="ReasonSeg|val", metadata={"help": "evaluation set"})
    num_classes_per_sample: int = field(
        default=3, metadata={"help": "queries (conversations) per training image"}
    )
    conv_type: str = field(
        default="llava_v1",
        metadata={"help": "conversation format", "choices": ["llava_v1", "llava_llama_2"]},
    )
    top_k_proposals: int = field(default=50, metadata={"help": "proposals kept per image"})
    proposal_order: str = field(
        default="area",
        metadata={"help": "which proposals are kept", "choices": ["area", "predicted_iou"]},
    )
    antialias: bool = field(default=True, metadata={"help": "antialias proposal weight maps"})


def build_encoder(
    config, tokenizer, num_image_tokens: int, sam_image_size: int = 0
) -> SampleEncoder:
    """The sample encoder for a model with ``num_image_tokens`` and a tokenizer.

    ``config`` carries the :class:`DataConfig` fields plus the model's ``vision_tower``,
    ``dino_image_size``, ``proposal_map_size``, ``model_max_length`` and ``tokenization``
    (``auto`` when absent: see :func:`~utils.legacy_tokenizer.resolve_tokenization`).
    ``sam_image_size``: SAM's input side for a model with the SAM head (``model.sam_image_size``).
    """
    settings = EncoderSettings(
        num_image_tokens=num_image_tokens,
        clip_processor=clip_image_processor(*_clip_folder_and_size(config)),
        dino_image_size=config.dino_image_size,
        top_k=config.top_k_proposals,
        proposal_order=config.proposal_order,
        map_size=config.proposal_map_size,
        antialias=config.antialias,
        use_im_start_end="<im_start>" in tokenizer.get_vocab(),
        model_max_length=config.model_max_length,
        tokenization=resolve_tokenization(getattr(config, "tokenization", "auto"), tokenizer),
        references="strip" if getattr(config, "history", "gt") == "none" else "auto",
        ref_placement=getattr(config, "ref_placement", "inline"),
        reference_crops=getattr(config, "mask_encoder", "none") == "crop_cls",
        sam_image_size=sam_image_size,
        rejection=getattr(config, "rejection", "none"),
    )
    return SampleEncoder(tokenizer, conversation_format(config.conv_type), settings)


def _clip_folder_and_size(config) -> tuple[Path, int]:
    """The folder holding CLIP's preprocessing and CLIP's input side (224 for ViT-L/14).

    ``--vision-tower`` when given; else the LLaVA config's ``mm_vision_tower`` (original layout)
    or the LLaVA folder itself (``transformers`` layout, which embeds the vision config).
    """
    folder = Path(config.vision_tower) if config.vision_tower else None
    if folder is None:
        raw = json.loads((Path(config.version) / "config.json").read_text())
        folder = Path(config.version) if "vision_config" in raw else Path(raw["mm_vision_tower"])
    clip_config = folder / "config.json"
    if not clip_config.is_file():
        raise FileNotFoundError(f"vision tower {folder}: no config.json (set --vision-tower)")
    raw = json.loads(clip_config.read_text())
    return folder, raw.get("vision_config", raw).get("image_size", 224)


def _reason_seg_train(config) -> ReasonSegSource:
    name, _, split = config.reason_seg_data.partition("|")
    items = load_reason_seg_split(config.dataset_dir, config.sam_masks_dir, split or "train")
    if items:
        keys = [item.image_path.name for item in items]
        check_proposal_coverage(keys, items[0].proposals, f"ReasonSeg|{split or 'train'}")
    return ReasonSegSource(
        items, config.num_classes_per_sample, getattr(config, "multi_target_answer", "union")
    )


def _reason_seg_eval(config, parts: list[str], with_proposals: bool, skipped=None):
    split = parts[1] if len(parts) > 1 else "val"
    masks_dir = config.sam_masks_dir if with_proposals else None
    items = load_reason_seg_split(
        config.dataset_dir, masks_dir, split, getattr(config, "skip_missing", False), skipped
    )
    return reason_seg_eval_records(items)


def _sem_seg_train(config) -> SemSegSource:
    datasets = load_sem_seg_datasets(config.dataset_dir, config.sam_masks_dir, config.sem_seg_data)
    return SemSegSource(datasets, config.num_classes_per_sample)


def _refer_seg_train(config):
    return load_refer_train(
        config.dataset_dir, config.sam_masks_dir, config.refer_seg_data,
        config.num_classes_per_sample, getattr(config, "false_premise_fraction", 0.0),
        getattr(config, "multi_target_answer", "union"),
    )  # fmt: skip


def _vqa_train(config) -> VQASource:
    return VQASource(load_vqa(config.dataset_dir, config.vqa_data), config.vqa_data)


def _multi_round_train(config) -> MultiRoundSource:
    return load_multi_round_train(
        config.dataset_dir,
        config.sam_masks_dir,
        config.multi_round_data,
        config.max_rounds,
        config.conversations_per_sample,
    )


def _mrseg_eval(config, parts: list[str], with_proposals: bool):
    """``MRSeg|<file stem>`` (e.g. ``MRSeg|mr_refcoco_val``; :func:`check_val_dataset` checked
    the stem is there): every usable conversation."""
    masks_dir = config.sam_masks_dir if with_proposals else None
    return load_mrseg(config.dataset_dir, parts[1], masks_dir, strict=True)


def _conversation_eval(config, parts: list[str], with_proposals: bool):
    """``ReasonSegMR|val``: the conversations kept in a ReasonSeg-format split's jsons."""
    split = parts[1] if len(parts) > 1 and parts[1] else "val"
    masks_dir = config.sam_masks_dir if with_proposals else None
    return load_conversation_split(config.dataset_dir, masks_dir, split)


def _llmseg40k_train(config) -> LLMSeg40KSource:
    split = config.llmseg40k_data.partition("|")[2] or "train"
    questions = load_llmseg40k_split(
        config.dataset_dir, config.sam_masks_dir, split, config.llmseg40k_dir
    )
    return LLMSeg40KSource(questions)


def _refer_eval(config, parts: list[str], with_proposals: bool):
    """``refcoco|unc|val`` (dataset|split_by|split), ``refcoco|val`` or ``refcoco``."""
    name = parts[0].lower()
    split_by = parts[1] if len(parts) == 3 else SPLIT_BY[name]
    split = parts[-1] if len(parts) > 1 else "val"
    masks_dir = config.sam_masks_dir if with_proposals else None
    images = load_refer_split(config.dataset_dir, masks_dir, name, split, split_by, strict=True)
    return [refer_eval_record(image) for image in images]


def _grefcoco_eval(config, parts: list[str], with_proposals: bool):
    """``grefcoco|unc|val`` (or ``grefcoco|val``): every sentence, its rows flagged no-target."""
    split_by, split = parse_grefcoco_spec("|".join(parts))
    masks_dir = config.sam_masks_dir if with_proposals else None
    images = load_grefcoco_split(config.dataset_dir, masks_dir, split, split_by, strict=True)
    return [refer_eval_record(image) for image in images]


def _llmseg40k_eval(config, parts: list[str], with_proposals: bool):
    """``LLMSeg40K|validation`` (or ``|val``) and ``LLMSeg40K|test``."""
    split = parts[1] if len(parts) > 1 else "validation"
    masks_dir = config.sam_masks_dir if with_proposals else None
    questions = load_llmseg40k_split(
        config.dataset_dir, masks_dir, split, config.llmseg40k_dir, strict=True
    )
    return [llmseg40k_eval_record(question) for question in questions]


# family name -> builder of a training RecordSource
TRAIN_SOURCES: dict[str, Callable] = {
    "sem_seg": _sem_seg_train,
    "refer_seg": _refer_seg_train,
    "vqa": _vqa_train,
    "reason_seg": _reason_seg_train,
    "llmseg40k": _llmseg40k_train,
    "multi_round": _multi_round_train,
}
# first '|' field of --val_dataset (lower-cased) -> builder of evaluation records
EVAL_SETS: dict[str, Callable] = {
    "reasonseg": _reason_seg_eval,
    **{name: _refer_eval for name in SPLIT_BY},
    GREFCOCO: _grefcoco_eval,
    "llmseg40k": _llmseg40k_eval,
    "llm-seg40k": _llmseg40k_eval,
    "mrseg": _mrseg_eval,
    "reasonsegmr": _conversation_eval,
}


def training_mixture(dataset: str, sample_rates: str) -> list[tuple[str, float]]:
    """``--dataset`` and ``--sample_rates`` parsed (:func:`~utils.data.mixing.parse_mixture`)
    and every family checked against :data:`TRAIN_SOURCES`; reads no file, so training checks
    it at start-up. Raises ``ValueError`` naming the flag."""
    mixture = parse_mixture(dataset, sample_rates)
    for name, _ in mixture:
        if name not in TRAIN_SOURCES:
            raise ValueError(
                f"unknown training family {name!r}; expected one of {sorted(TRAIN_SOURCES)}: "
                "--dataset"
            )
    return mixture


def check_val_dataset(spec: str) -> str:
    """The :data:`EVAL_SETS` key of ``--val_dataset`` ``spec`` (``ReasonSeg|val`` ->
    ``reasonseg``), checked without reading a file. Raises ``ValueError`` naming the flag."""
    parts = spec.split("|")
    key = parts[0].lower()
    if key not in EVAL_SETS:
        raise ValueError(
            f"unknown --val_dataset {spec!r}; known sets: {sorted(EVAL_SETS)}: --val_dataset"
        )
    if key == "mrseg" and (len(parts) < 2 or not parts[1]):
        raise ValueError(
            f"{spec!r} names no conversation file; give its stem, e.g. MRSeg|mr_refcoco_val: "
            "--val_dataset"
        )
    return key


def build_train_dataset(config, encoder: SampleEncoder, length: int) -> MixedTrainingDataset:
    """The training mixture of ``config.dataset`` at ``config.sample_rates``."""
    sources = []
    for name, weight in training_mixture(config.dataset, config.sample_rates):
        if weight > 0:
            source = TRAIN_SOURCES[name](config)
            if hasattr(source, "report_lengths"):
                source.report_lengths(encoder)
            sources.append((source, weight))
    return MixedTrainingDataset(sources, encoder, length, seed=config.seed)


def eval_records(config, spec: str, with_proposals: bool = True, skipped=None) -> list:
    """The evaluation records named by ``spec`` (e.g. ``ReasonSeg|val``); files left out with
    ``--skip_missing`` are appended to ``skipped`` (ReasonSeg)."""
    parts = spec.split("|")
    key = check_val_dataset(spec)
    if key == "reasonseg":
        records = _reason_seg_eval(config, parts, with_proposals, skipped)
    else:
        records = EVAL_SETS[key](config, parts, with_proposals)
    logger.info("evaluation set %s: %d images", spec, len(records))
    return records


def build_eval_dataset(
    config, encoder: SampleEncoder, spec: str, with_proposals: bool = True
) -> EvaluationDataset:
    """The evaluation dataset named by ``spec``, encoding records for the model
    (``with_proposals=False``: no proposal store is read, for a model with the SAM head only)."""
    skipped: list[str] = []
    dataset = EvaluationDataset(eval_records(config, spec, with_proposals, skipped), encoder)
    dataset.skipped = skipped
    return dataset
