"""Building LLM-Seg from local checkpoint folders, and preparing it for training.

``build_llm_seg`` loads LLaVA (any supported layout), the CLIP tower and DINOv2 from local paths
(nothing touches the network) and creates the freshly initialised text projection and proposal
scorer. ``setup_trainable`` reproduces upstream's training set-up: LoRA (r 8, alpha 16, dropout
0.05) on the *language model's* ``q_proj``/``v_proj`` only (the scorer's attention layers have the
same names and must not get LoRA), ``embed_tokens``/``lm_head``/text projection/scorer fully
trainable, CLIP, projector and DINOv2 frozen.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from model.backbones.dinov2 import DINOV2_ARCHS, load_dinov2
from model.backbones.features import DinoFeatureExtractor
from model.backbones.llava_checkpoint import load_llava
from model.backbones.sam import load_sam
from model.heads.losses import LossConfig
from model.heads.proposal_scorer import ProposalScorer, ProposalScorerConfig
from model.heads.sam_decoder import SamMaskHead
from model.llm_seg import MASK_HEADS, LLMSegModel
from model.mask_encoder import MASK_ENCODERS, build_mask_encoder
from model.tiny import TinyCheckpoints
from utils.data.images import DEFAULT_DINO_IMAGE_SIZE
from utils.data.rejection import REJ_TOKEN, REJECTION_MODES, check_rejection_mode
from utils.device import PRECISIONS, attention_implementation, resolve_dtype
from utils.legacy_tokenizer import TOKENIZATIONS
from utils.tokenizer import IMAGE_START_TOKEN, REF_TOKEN, SEG_TOKEN, add_llm_seg_tokens

logger = logging.getLogger(__name__)

# Upstream spellings an entry point may accept too (``utils.config.parse_config(aliases=...)``).
CONFIG_ALIASES = {"iop_loss_weight": ["--regression_loss_weight", "--regression-loss-weight"]}


@dataclass
class LLMSegConfig:
    """Where LLM-Seg's weights come from and how it is sized, trained and weighted."""

    version: str = field(
        default="",
        metadata={"help": "local LLaVA folder: LLaVA-Lightning-7B-v1, LLaVA-1.5 or llava-hf"},
    )
    vision_tower: str = field(
        default="",
        metadata={"help": "local CLIP folder (default: the LLaVA config's mm_vision_tower)"},
    )
    dinov2: str = field(
        default="",
        metadata={"help": "facebook/dinov2-large folder or hub dinov2_vitl14_pretrain.pth"},
    )
    dinov2_arch: str = field(
        default="",
        metadata={
            "help": "hub .pth architecture (default: inferred)",
            "choices": ["", *DINOV2_ARCHS],
        },
    )
    dino_image_size: int = field(
        default=DEFAULT_DINO_IMAGE_SIZE, metadata={"help": "DINOv2 input side (pad target)"}
    )
    out_dim: int = field(default=256, metadata={"help": "[SEG] embedding / scorer width"})
    scorer_heads: int = field(default=8, metadata={"help": "scorer attention heads"})
    scorer_mlp_dim: int = field(default=2048, metadata={"help": "scorer block MLP width"})
    scorer_depth: int = field(default=2, metadata={"help": "scorer two-way blocks"})
    scorer_embedding_hidden_dim: int = field(
        default=2048,
        metadata={"help": "hidden width of the scorer's embedding head (upstream's 2048; it runs "
                  "on every proposal of every round)"},
    )  # fmt: skip
    scorer_iop_hidden_dim: int = field(
        default=128, metadata={"help": "hidden width of the scorer's IoP head (upstream's 128)"}
    )
    proposal_map_size: int = field(
        default=256, metadata={"help": "side of the proposal weight maps fed to the scorer"}
    )
    mask_geometry_embedding: bool = field(
        default=False,
        metadata={"help": "add a mask-geometry embedding (size, place, box, outline) to the "
                  "pooled proposal features; not in the paper (see model/heads/mask_geometry.py)"},
    )  # fmt: skip
    model_max_length: int = field(default=512, metadata={"help": "tokenizer length limit"})
    tokenization: str = field(
        default="auto",
        metadata={"help": "prompt tokenization: llava_legacy (upstream's slow LLaMA tokenizer, "
                  "token for token), hf (transformers), auto (llava_legacy when the tokenizer "
                  "folder has a sentencepiece tokenizer.model)",
                  "choices": ["auto", *TOKENIZATIONS]},
    )  # fmt: skip
    mask_head: str = field(
        default="proposals",
        metadata={"help": "which mask head(s) the [SEG] embedding drives: proposals (LLM-Seg's "
                  "scorer), sam (LISA's SAM mask decoder) or both (trained jointly, each "
                  "evaluated)", "choices": list(MASK_HEADS)},
    )  # fmt: skip
    sam_checkpoint: str = field(
        default="",
        metadata={"help": "SAM weights for the SAM head (sam_vit_h_4b8939.pth, or a custom size "
                  "with its architecture JSON beside it)"},
    )  # fmt: skip
    sam_model_type: str = field(
        default="vit_h", metadata={"help": "SAM size of an official checkpoint (vit_h/l/b)"}
    )
    train_sam_encoder: bool = field(
        default=False,
        metadata={"help": "train the SAM head's image encoder too (frozen in LISA; for tiny "
                  "random SAMs such as the demo's)"},
    )  # fmt: skip
    sam_embedding_cache: int = field(
        default=0,
        metadata={"help": "SAM head: image embeddings kept in memory across steps and epochs "
                  "(a frozen encoder's pass is reused; ViT-H: 4 MB each); 0: none"},
    )  # fmt: skip
    sam_embedding_store: str = field(
        default="",
        metadata={"help": "SAM head: precomputed image embeddings of this SAM "
                  "(python -m prepare_datasets.prepare_sam_embeddings); others are computed"},
    )  # fmt: skip
    bce_loss_weight: float = field(default=2.0, metadata={"help": "SAM head: mask BCE weight"})
    dice_loss_weight: float = field(default=0.5, metadata={"help": "SAM head: mask Dice weight"})
    mask_encoder: str = field(
        default="none",
        metadata={"help": "SegLLM multi-round: how an earlier round's mask is written at its "
                  "<ref> token (pooled: CLIP patch grid pooled by the mask + box/area; crop_cls: "
                  "SegLLM's masked crop through CLIP, its CLS + box); none: single-round "
                  "LLM-Seg", "choices": list(MASK_ENCODERS)},
    )  # fmt: skip
    ref_dropout: float = field(
        default=0.5,
        metadata={"help": "training probability of dropping a reference embedding (the plain "
                  "<ref> token stays), as SegLLM"},
    )  # fmt: skip
    rejection: str = field(
        default="none",
        metadata={"help": "how the model answers a query about nothing (no-target data needs "
                  "one): answer (a rejection sentence, LM-trained), token (a [REJ] token, as "
                  "GSVA); none: always [SEG], as LISA and LLM-Seg",
                  "choices": list(REJECTION_MODES)},
    )  # fmt: skip
    ref_loss_weight: float = field(
        default=0.5, metadata={"help": "weight of the <ref> states' reference-selection loss"}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (0 disables LoRA)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(
        default="q_proj,v_proj", metadata={"help": "comma-separated LLM linear layer names"}
    )
    ce_loss_weight: float = field(default=1.0, metadata={"help": "LM cross-entropy weight"})
    align_loss_weight: float = field(default=1.0, metadata={"help": "alignment (KL) weight"})
    iop_loss_weight: float = field(
        default=1.0, metadata={"help": "IoP regression weight (upstream regression_loss_weight)"}
    )
    align_temperature: float = field(default=0.05, metadata={"help": "alignment temperature"})
    iop_loss_scale: float = field(default=50.0, metadata={"help": "IoP regression scale"})
    train_dinov2: bool = field(
        default=False,
        metadata={"help": "train DINOv2 too (frozen in the paper; for tiny random encoders)"},
    )
    train_language_model: bool = field(
        default=False,
        metadata={"help": "train every LLM weight, not only LoRA + embeddings (not in the paper; "
                  "for tiny random LLMs)"},
    )  # fmt: skip
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "recompute LLM activations in backward"}
    )
    precision: str = field(
        default="bf16", metadata={"help": "parameter dtype", "choices": list(PRECISIONS)}
    )

    def loss_config(self) -> LossConfig:
        return LossConfig(
            ce_weight=self.ce_loss_weight,
            align_weight=self.align_loss_weight,
            iop_weight=self.iop_loss_weight,
            temperature=self.align_temperature,
            iop_scale=self.iop_loss_scale,
            ref_weight=self.ref_loss_weight,
            bce_weight=self.bce_loss_weight,
            dice_weight=self.dice_loss_weight,
        )

    def scorer_config(self, feature_dim: int) -> ProposalScorerConfig:
        return ProposalScorerConfig(
            feature_dim=feature_dim,
            embed_dim=self.out_dim,
            num_heads=self.scorer_heads,
            mlp_dim=self.scorer_mlp_dim,
            depth=self.scorer_depth,
            embedding_hidden_dim=self.scorer_embedding_hidden_dim,
            iop_hidden_dim=self.scorer_iop_hidden_dim,
            map_size=self.proposal_map_size,
            geometry_embedding=self.mask_geometry_embedding,
            relation_features=self.multi_round,
        )

    @property
    def multi_round(self) -> bool:
        """SegLLM parts (``<ref>``, mask encoder, relation features) are built."""
        return self.mask_encoder != "none"


def build_llm_seg(
    config: LLMSegConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
):
    """Load and assemble LLM-Seg from local files.

    Args:
        config: paths and sizes.
        device: where the model goes.
        dtype: parameter dtype; defaults to ``config.precision``.
    Returns:
        ``(model, tokenizer)``: an :class:`~model.llm_seg.LLMSegModel` in eval mode with every
        parameter trainable (call :func:`setup_trainable` for training), and the tokenizer
        holding ``[SEG]`` and ``<image>``.
    """
    for name in ("version", "dinov2") if config.mask_head != "sam" else ("version",):
        if not getattr(config, name):
            raise ValueError(f"LLMSegConfig.{name} is required: a local checkpoint path")
    device = torch.device(device)
    dtype = dtype or resolve_dtype(config.precision)
    backbone, tokenizer, _ = load_llava(
        config.version,
        vision_tower=config.vision_tower or None,
        dtype=dtype,
        attn_implementation=attention_implementation(device, dtype),
        model_max_length=config.model_max_length,
    )
    dino = scorer = None
    if config.mask_head != "sam":  # the proposal head: DINOv2 features + the scorer
        dinov2 = load_dinov2(config.dinov2, dtype, arch=config.dinov2_arch or None)
        dino = DinoFeatureExtractor(dinov2)
        scorer = ProposalScorer(config.scorer_config(dino.feature_dim))
    elif config.multi_round:
        raise ValueError(
            "SegLLM's mask encoder needs the proposal head's relation features: use --mask_head "
            "proposals or both with --mask_encoder"
        )
    mask_encoder, ref_token_id = build_multi_round_parts(config, backbone, tokenizer)
    add_rejection_token(config.rejection, backbone, tokenizer)
    sam_head = None
    if config.mask_head != "proposals":
        if not config.sam_checkpoint:
            raise ValueError(f"--mask_head {config.mask_head} needs --sam_checkpoint")
        sam = load_sam(config.sam_checkpoint, config.sam_model_type)
        sam_head = SamMaskHead(sam, config.sam_embedding_cache, config.sam_embedding_store).to(
            dtype
        )
    model = LLMSegModel(
        backbone,
        dino,
        scorer,
        seg_token_id=tokenizer.convert_tokens_to_ids(SEG_TOKEN),
        loss_config=config.loss_config(),
        mask_encoder=mask_encoder,
        ref_token_id=ref_token_id,
        ref_dropout=config.ref_dropout,
        sam_head=sam_head,
        mask_head=config.mask_head,
    )
    for part in (model.text_projection, scorer, mask_encoder, model.sam_prompt_groups):
        if part is not None:
            part.to(dtype)
    configure_rejection(model, tokenizer, config.rejection)
    heads = [
        f"DINOv2 {dino.grid_size(config.dino_image_size)}^2 grid of {dino.feature_dim}-d features"
        if dino is not None else "",
        f"SAM head at {sam_head.image_size} px" if sam_head is not None else "",
    ]  # fmt: skip
    logger.info(
        "LLM-Seg: %d image tokens, [SEG] id %d, %s",
        model.num_image_tokens, model.seg_token_id, ", ".join(h for h in heads if h),
    )  # fmt: skip
    return model.to(device).eval(), tokenizer


def add_rejection_token(mode: str, backbone, tokenizer) -> None:
    """``[REJ]`` added to the tokenizer (embeddings resized) in ``token`` mode; a no-op for a
    tokenizer that has it and for the other modes."""
    if check_rejection_mode(mode) != "token" or REJ_TOKEN in tokenizer.get_vocab():
        return
    tokenizer.add_tokens([REJ_TOKEN], special_tokens=False)  # a normal token, as [SEG]
    embeddings = backbone.language_model.get_input_embeddings()
    if len(tokenizer) > embeddings.weight.shape[0]:
        backbone.language_model.resize_token_embeddings(len(tokenizer))


def configure_rejection(model: LLMSegModel, tokenizer, mode: str) -> None:
    """Record the rejection mode on ``model`` (``model.rejection``, which evaluation reads)."""
    if check_rejection_mode(mode) == "token" and REJ_TOKEN not in tokenizer.get_vocab():
        raise ValueError(f"--rejection token needs {REJ_TOKEN} in the tokenizer")
    model.rejection = mode


def build_multi_round_parts(config: LLMSegConfig, backbone, tokenizer):
    """SegLLM's parts when ``config.mask_encoder`` asks for them: ``<ref>`` added to the
    tokenizer (embeddings resized; a no-op for a tokenizer that has it) and the mask encoder
    (projector initialised from LLaVA's). Returns ``(mask_encoder, ref_token_id)``, both
    ``None`` for single-round LLM-Seg."""
    if not config.multi_round:
        return None, None
    if not 0 <= config.ref_dropout < 1:
        raise ValueError(f"--ref_dropout must be in [0, 1), got {config.ref_dropout}")
    add_llm_seg_tokens(
        tokenizer, use_im_start_end=IMAGE_START_TOKEN in tokenizer.get_vocab(), use_ref=True
    )
    embeddings = backbone.language_model.get_input_embeddings()
    if len(tokenizer) > embeddings.weight.shape[0]:
        backbone.language_model.resize_token_embeddings(len(tokenizer))
    encoder = build_mask_encoder(config.mask_encoder, backbone.projector, backbone.hidden_size)
    return encoder, tokenizer.convert_tokens_to_ids(REF_TOKEN)


def setup_trainable(model: LLMSegModel, config: LLMSegConfig) -> LLMSegModel:
    """Upstream's training set-up, in place: LoRA + trainable heads, frozen encoders.

    * LoRA (``config.lora_*``) on the language model's ``q_proj``/``v_proj`` only.
    * Fully trainable: ``embed_tokens``, ``lm_head``, ``text_projection``, ``proposal_scorer``
      (and SegLLM's ``mask_encoder``, the SAM head's ``mask_decoder`` when built).
    * Frozen: everything else (LLM base weights, CLIP, projector, DINOv2).
    * Gradient checkpointing as ``config.gradient_checkpointing``.

    Options outside the paper's set-up (off by default), for tiny random models: DINOv2 trains
    too (``config.train_dinov2``); every language-model weight trains
    (``config.train_language_model``, LoRA adapters included if ``lora_r > 0``).

    Returns:
        ``model`` (for chaining).
    """
    model.requires_grad_(False)
    language_model = model.backbone.language_model
    if config.lora_r > 0:
        if any(isinstance(m, LoraLayer) for m in language_model.modules()):
            raise RuntimeError("LoRA is already applied to this model")
        targets = [name.strip() for name in config.lora_target_modules.split(",") if name.strip()]
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            bias="none",
        )
        # Injected into the language model only, so CLIP's and the scorer's q_proj/v_proj stay
        # plain (upstream needed an exclusion list for the same effect).
        inject_adapter_in_model(lora, language_model)
        for name, parameter in language_model.named_parameters():
            parameter.requires_grad_("lora_" in name)
    if config.train_language_model:
        language_model.requires_grad_(True)
    if model.dino is not None:
        model.dino.set_trainable(config.train_dinov2)
    language_model.get_input_embeddings().requires_grad_(True)
    language_model.get_output_embeddings().requires_grad_(True)
    model.text_projection.requires_grad_(True)
    if model.proposal_scorer is not None:
        model.proposal_scorer.requires_grad_(True)
    if model.mask_encoder is not None:
        model.mask_encoder.requires_grad_(True)
    if model.sam_head is not None:  # LISA: SAM's encoders stay frozen, its decoder trains
        model.sam_head.mask_decoder.requires_grad_(True)
        if model.sam_prompt_groups is not None:
            model.sam_prompt_groups.requires_grad_(True)
        model.sam_head.image_encoder.requires_grad_(config.train_sam_encoder)
    model.set_gradient_checkpointing(config.gradient_checkpointing)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total
    )
    return model


def merge_lora_weights(model: torch.nn.Module) -> int:
    """Fold every LoRA adapter into its base ``nn.Linear`` and remove the adapter (for export).

    Returns:
        how many layers were merged.
    """
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
            merged += 1
    return merged


def tiny_llm_seg_config(checkpoints: TinyCheckpoints, **overrides) -> LLMSegConfig:
    """An :class:`LLMSegConfig` for :func:`model.tiny.write_tiny_checkpoints` output.

    Small scorer (32-d, 4 heads), 32x32 proposal maps, DINOv2 input 112 (an 8x8 grid), fp32, no
    gradient checkpointing: a full training step runs in well under a second on a CPU.
    """
    config = LLMSegConfig(
        version=os.fspath(checkpoints.llava),
        vision_tower=os.fspath(checkpoints.clip),
        dinov2=os.fspath(checkpoints.dinov2),
        dino_image_size=112,
        out_dim=32,
        scorer_heads=4,
        scorer_mlp_dim=64,
        proposal_map_size=32,
        precision="fp32",
        gradient_checkpointing=False,
    )
    return dataclasses.replace(config, **overrides)
