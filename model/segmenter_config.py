"""The options that load an export into a :class:`~model.inference.Segmenter`.

``chat.py`` and ``app.py`` both serve an export with a proposal source: their configs extend
:class:`SegmenterConfig`, so the flags (``--model_dir``, ``--proposals``, ``--sam_checkpoint``,
``--precision``, ``--mask_head`` ...) are spelt and defaulted once, and :func:`build_segmenter`
is the one place that turns them into a model, a proposal source and inference settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.export import load_exported
from model.inference import (
    MODES,
    TEMPLATES,
    GeneratedProposals,
    InferenceSettings,
    Segmenter,
    StoreProposals,
)
from prepare_datasets.proposals.generator import GeneratorConfig, build_generator
from utils.device import resolve_device, resolve_dtype


@dataclass
class SegmenterConfig:
    """An export folder, its proposal source and how queries are asked."""

    model_dir: str = field(default="", metadata={"help": "export folder (model.export / convert)"})
    mode: str = field(
        default="free",
        metadata={"help": "free: the model answers; teacher_forced: answer fixed to '[SEG].'",
                  "choices": list(MODES)},
    )  # fmt: skip
    template: str = field(
        default="long",
        metadata={"help": "long: '<q> Please output segmentation mask.'; short: 'What is <q> in "
                  "this image? ...'; raw: the query as written", "choices": list(TEMPLATES)},
    )  # fmt: skip
    max_new_tokens: int = field(default=128, metadata={"help": "free mode: answer length cap"})
    proposals: str = field(
        default="sam",
        metadata={"help": "sam / sam_reference (SAM everything on the fly), store (read a "
                  "prepared store), weightfree (demo backend, no weights)",
                  "choices": ["sam", "sam_reference", "store", "weightfree"]},
    )  # fmt: skip
    proposal_store: str = field(default="", metadata={"help": "store file or split folder"})
    sam_checkpoint: str = field(default="", metadata={"help": "SAM weights (sam_vit_h_4b8939.pth)"})
    sam_model_type: str = field(default="vit_h", metadata={"choices": ["vit_h", "vit_l", "vit_b"]})
    points_per_side: int = field(default=32, metadata={"help": "SAM prompt grid side"})
    pred_iou_thresh: float = field(default=0.88, metadata={"help": "SAM proposal filter"})
    stability_score_thresh: float = field(default=0.95, metadata={"help": "SAM proposal filter"})
    selection: str = field(
        default="",
        metadata={"help": "argmax, iop, hybrid, topk_iop (default: the export's)"},
    )
    iop_threshold: float | None = field(default=None, metadata={"help": "default: export's"})
    selection_top_k: int | None = field(default=None, metadata={"help": "default: export's"})
    precision: str = field(
        default="bf16", metadata={"help": "model dtype", "choices": ["fp32", "bf16", "fp16"]}
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "8-bit LLM (bitsandbytes, CUDA)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "4-bit LLM (bitsandbytes, CUDA)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    vision_tower: str = field(default="", metadata={"help": "override the export's CLIP path"})
    dinov2: str = field(default="", metadata={"help": "override the export's DINOv2 path"})
    mask_head: str = field(
        default="",
        metadata={"help": "which head's mask of an export with the SAM head: proposals, sam, "
                  "combined (both heads); default the export's first"},
    )  # fmt: skip


def build_segmenter(config: SegmenterConfig) -> Segmenter:
    """Load the export and the proposal source ``config`` names."""
    if not config.model_dir:
        raise ValueError("--model_dir is required (an export folder)")
    device = resolve_device(config.device)
    exported = load_exported(
        config.model_dir, device, resolve_dtype(config.precision), config.load_in_8bit,
        config.load_in_4bit, vision_tower=config.vision_tower, dinov2=config.dinov2,
    )  # fmt: skip
    if config.mask_head == "sam":  # LISA's head reads no proposals
        source = None
    elif config.proposals == "store":
        if not config.proposal_store:
            raise ValueError("--proposals store needs --proposal_store")
        source = StoreProposals(config.proposal_store)
    else:
        generator = build_generator(
            GeneratorConfig(
                backend=config.proposals, vision_pretrained=config.sam_checkpoint or None,
                model_type=config.sam_model_type, device=str(device),
                points_per_side=config.points_per_side, pred_iou_thresh=config.pred_iou_thresh,
                stability_score_thresh=config.stability_score_thresh,
            )
        )  # fmt: skip
        source = GeneratedProposals(generator, config.proposals)
    chosen = exported.manifest.selection
    settings = InferenceSettings(
        mode=config.mode,
        template=config.template,
        max_new_tokens=config.max_new_tokens,
        strategy=config.selection or chosen.strategy,
        threshold=chosen.threshold if config.iop_threshold is None else config.iop_threshold,
        top_k=chosen.top_k if config.selection_top_k is None else config.selection_top_k,
        mask_head=config.mask_head,
    )
    return Segmenter(exported, source, settings)
