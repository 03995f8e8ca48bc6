"""What an export folder is: its files, and ``export_config.json`` (the manifest) that describes it.

:class:`ExportManifest` holds the model's :class:`~model.builder.LLMSegConfig`, what the weights
imply (:class:`ExportArchitecture`, recorded so a loader can check it), the selection the model
was validated with, the data settings inference must repeat, and where it came from.
:func:`read_manifest` reads and checks one (exports from before a setting existed get its
historical value); :mod:`model.export` writes and loads the folders.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from model.builder import LLMSegConfig
from model.llm_seg import LLMSegModel
from utils.checkpoint import CheckpointError
from utils.tokenizer import IMAGE_START_TOKEN

EXPORT_FORMAT = "llm-seg-export"
# 2: the model's rejection mode and the data's ref_placement (version 1 reads as none / the flag)
# 3: the scorer's head widths (scorer_embedding_hidden_dim, scorer_iop_hidden_dim; older exports
#    read as upstream's 2048 and 128)
EXPORT_FORMAT_VERSION = 3
MANIFEST = "export_config.json"
CONVERSION_REPORT = "conversion_report.json"  # written by the converters of upstream checkpoints
LLM_DIR = "llm"
PROJECTOR_FILE = "vision_projector.safetensors"
HEAD_FILE = "proposal_head.safetensors"
ADAPTER_FILE = "adapter.safetensors"
EXPORT_KINDS = ("merged", "adapter")
# The heads LLMSegModel adds around LLaVA (and SegLLM's mask encoder); the merged kind stores
# them in HEAD_FILE.
HEAD_PREFIXES = (
    "text_projection.", "proposal_scorer.", "mask_encoder.", "sam_head.mask_decoder.",
    "sam_prompt_groups.",
)  # fmt: skip


@dataclass
class ExportArchitecture:
    """What the weights imply, recorded so a loader can check it (and a reader can see it)."""

    hidden_size: int
    vocab_size: int
    num_image_tokens: int
    seg_token_id: int
    image_token_id: int
    use_im_start_end: bool
    projector_type: str
    vision_select_layer: int
    vision_select_feature: str
    dino_feature_dim: int


@dataclass
class ExportSelection:
    """The mask selection the model was validated with (see :mod:`model.heads.selection`)."""

    strategy: str = "iop"
    threshold: float = 0.5
    top_k: int = 5


@dataclass
class ExportPreprocessing:
    """Data settings inference must repeat (the sizes live in :class:`LLMSegConfig`)."""

    conv_type: str = "llava_v1"
    top_k_proposals: int = 50
    proposal_order: str = "area"
    antialias: bool = True
    # SegLLM: where a <ref> stands; "" in exports from before it was recorded (the flag decides)
    ref_placement: str = ""


@dataclass
class ExportManifest:
    """Contents of ``export_config.json``."""

    kind: str
    model: LLMSegConfig
    architecture: ExportArchitecture
    selection: ExportSelection = field(default_factory=ExportSelection)
    preprocessing: ExportPreprocessing = field(default_factory=ExportPreprocessing)
    source: dict = field(default_factory=dict)
    format: str = EXPORT_FORMAT
    format_version: int = EXPORT_FORMAT_VERSION

    def encoder_fields(self) -> dict:
        """The model / data config fields a sample encoder needs (``build_encoder``'s)."""
        sizes = (
            "vision_tower", "dino_image_size", "proposal_map_size", "model_max_length",
            "tokenization", "mask_encoder", "rejection",
        )  # fmt: skip
        fields = {name: getattr(self.model, name) for name in sizes}
        preprocessing = {k: v for k, v in dataclasses.asdict(self.preprocessing).items() if v != ""}
        return {**fields, **preprocessing}


def _from_dict(cls, data: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(f"{where}: unknown {cls.__name__} fields {unknown}")
    return cls(**data)


def read_manifest(folder: str | os.PathLike) -> ExportManifest:
    """Read and check ``<folder>/export_config.json``."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder}: not an LLM-Seg export (no {MANIFEST})")
    data = json.loads(path.read_text())
    if data.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path}: format is {data.get('format')!r}, not {EXPORT_FORMAT!r}")
    if data.get("format_version", 0) > EXPORT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {data['format_version']} is newer than this code "
            f"({EXPORT_FORMAT_VERSION}); update the code"
        )
    parts = {
        "model": LLMSegConfig,
        "architecture": ExportArchitecture,
        "selection": ExportSelection,
        "preprocessing": ExportPreprocessing,
    }
    model = data.setdefault("model", {})
    if "tokenization" not in model:
        # Exports made before the setting existed: converted ones hold upstream's weights,
        # trained with the slow LLaMA tokenizer; this project's training used transformers'.
        converted = (Path(folder) / CONVERSION_REPORT).is_file()
        model["tokenization"] = "llava_legacy" if converted else "hf"
    for name, cls in parts.items():
        data[name] = _from_dict(cls, data.get(name, {}), f"{path} [{name}]")
    manifest = _from_dict(ExportManifest, data, str(path))
    if manifest.kind not in EXPORT_KINDS:
        raise CheckpointError(f"{path}: unknown kind {manifest.kind!r}; expected {EXPORT_KINDS}")
    return manifest


def describe_model(model: LLMSegModel, tokenizer) -> ExportArchitecture:
    """The :class:`ExportArchitecture` of a built model."""
    backbone = model.backbone
    return ExportArchitecture(
        hidden_size=backbone.hidden_size,
        vocab_size=backbone.language_model.get_input_embeddings().weight.shape[0],
        num_image_tokens=model.num_image_tokens,
        seg_token_id=model.seg_token_id,
        image_token_id=backbone.image_token_id,
        use_im_start_end=IMAGE_START_TOKEN in tokenizer.get_vocab(),
        projector_type="linear" if isinstance(backbone.projector, nn.Linear) else "mlp2x_gelu",
        vision_select_layer=backbone.vision_select_layer,
        vision_select_feature=backbone.vision_select_feature,
        dino_feature_dim=model.dino.feature_dim if model.dino is not None else 0,
    )
