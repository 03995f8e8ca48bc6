"""A LLaVA backbone composed from ``transformers`` parts: LLaMA + CLIP vision tower + projector.

Images enter the language model the way ``transformers``' own Llava does it: the prompt holds one
``<image>`` token per visual feature, and the projected CLIP patch features are written into the
input embeddings at exactly those positions (``masked_scatter``). Every later position, including
``[SEG]``, is therefore found from the token ids alone, with no hard-coded offset.

On-disk layouts are read and written by :mod:`model.backbones.llava_checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPVisionModel, LlamaForCausalLM

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
SELECT_FEATURES = ("patch", "cls_patch")


def build_projector(projector_type: str, vision_hidden: int, text_hidden: int) -> nn.Module:
    """LLaVA's vision-to-text projector.

    ``linear`` is LLaVA-v1's single ``nn.Linear`` (keys ``weight``/``bias``); ``mlp2x_gelu`` is
    LLaVA-1.5's ``Linear -> GELU -> Linear`` (keys ``0.*`` and ``2.*``).
    """
    if projector_type == "linear":
        return nn.Linear(vision_hidden, text_hidden)
    if projector_type == "mlp2x_gelu":
        return nn.Sequential(
            nn.Linear(vision_hidden, text_hidden), nn.GELU(), nn.Linear(text_hidden, text_hidden)
        )
    raise ValueError(f"unknown projector type {projector_type!r}; expected {PROJECTOR_TYPES}")


@dataclass
class LlavaOutput:
    """Output of :meth:`LlavaBackbone.forward`.

    Attributes:
        logits: ``(B, L, vocab)`` next-token logits.
        hidden_states: ``(B, L, hidden)`` final (normalised) hidden states of the language model.
    """

    logits: torch.Tensor
    hidden_states: torch.Tensor


class LlavaBackbone(nn.Module):
    """LLaMA causal LM that reads CLIP image features at its ``<image>`` token positions.

    Args:
        language_model: a ``LlamaForCausalLM`` whose vocabulary contains the image token.
        vision_tower: a ``CLIPVisionModel``.
        projector: maps CLIP features ``(…, vision_hidden)`` to ``(…, text_hidden)``.
        image_token_id: id of the ``<image>`` placeholder token.
        vision_select_layer: which CLIP hidden-state layer to use (LLaVA uses -2).
        vision_select_feature: ``patch`` drops the CLS token (LLaVA), ``cls_patch`` keeps it.
    """

    def __init__(
        self,
        language_model: LlamaForCausalLM,
        vision_tower: CLIPVisionModel,
        projector: nn.Module,
        image_token_id: int,
        vision_select_layer: int = -2,
        vision_select_feature: str = "patch",
    ) -> None:
        super().__init__()
        if vision_select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"unknown vision_select_feature {vision_select_feature!r}; "
                f"expected {SELECT_FEATURES}"
            )
        self.language_model = language_model
        self.vision_tower = vision_tower
        self.projector = projector
        self.image_token_id = image_token_id
        self.vision_select_layer = vision_select_layer
        self.vision_select_feature = vision_select_feature

    @property
    def num_image_tokens(self) -> int:
        """How many ``<image>`` tokens one image occupies, from the vision config."""
        config = self.vision_tower.config
        patches = (config.image_size // config.patch_size) ** 2
        return patches + (1 if self.vision_select_feature == "cls_patch" else 0)

    @property
    def hidden_size(self) -> int:
        return self.language_model.config.hidden_size

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP's selected-layer features, before the projector (what SegLLM's pooled mask
        encoder pools).

        Args:
            pixel_values: ``(I, 3, S, S)`` CLIP-preprocessed images.
        Returns:
            ``(I, num_image_tokens, C_clip)`` in the tower's dtype.
        """
        tower_trainable = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(tower_trainable and torch.is_grad_enabled()):
            dtype = next(self.vision_tower.parameters()).dtype
            outputs = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True)
            features = outputs.hidden_states[self.vision_select_layer]
            if self.vision_select_feature == "patch":
                features = features[:, 1:]
        return features

    def encode_images(
        self, pixel_values: torch.Tensor, vision_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """CLIP features projected into the LLM's embedding space.

        Args:
            pixel_values: ``(I, 3, S, S)`` CLIP-preprocessed images.
            vision_features: their :meth:`vision_features`, when already computed.
        Returns:
            ``(I, num_image_tokens, hidden)`` in the projector's dtype.
        """
        if vision_features is None:
            vision_features = self.vision_features(pixel_values)
        projector_dtype = next(self.projector.parameters()).dtype
        return self.projector(vision_features.to(projector_dtype))

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        image_index: torch.Tensor,
        extra_embeddings: torch.Tensor | None = None,
        extra_mask: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features written at the ``<image>`` positions.

        Args:
            input_ids: ``(B, L)``; each row holds either 0 or exactly ``num_image_tokens`` image
                tokens.
            pixel_values: ``(I, 3, S, S)``, one entry per distinct image in the batch.
            image_index: ``(B,)`` which image each row shows (several rows, i.e. several
                conversations, may share one image, which is encoded once).
            extra_embeddings: optional ``(N, hidden)`` vectors written, in row-major order, at
                the ``N`` true positions of ``extra_mask`` (e.g. SegLLM's mask-encoding
                placeholders), after the image features.
            extra_mask: ``(B, L)`` bool placeholder positions for ``extra_embeddings``.
            vision_features: ``(I, num_image_tokens, C_clip)`` :meth:`vision_features` of
                ``pixel_values`` when the caller already has them (CLIP then runs once).
        Returns:
            ``(B, L, hidden)`` input embeddings.
        """
        embeds = self._embed_images(input_ids, pixel_values, image_index, vision_features)
        if extra_embeddings is None and extra_mask is None:
            return embeds
        if extra_embeddings is None or extra_mask is None:
            raise ValueError("extra_embeddings and extra_mask must be given together")
        if int(extra_mask.sum()) != extra_embeddings.shape[0]:
            raise ValueError(
                f"extra_mask marks {int(extra_mask.sum())} positions but "
                f"{extra_embeddings.shape[0]} extra embeddings were given"
            )
        return embeds.masked_scatter(extra_mask.unsqueeze(-1), extra_embeddings.to(embeds.dtype))

    def _embed_images(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        image_index: torch.Tensor,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = self.language_model.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.image_token_id
        counts = image_mask.sum(dim=1)
        rows = counts > 0
        bad = ((counts != 0) & (counts != self.num_image_tokens)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"rows {bad} hold {counts[bad].tolist()} image tokens; each row needs 0 or "
                f"{self.num_image_tokens} (expand '<image>' with model.num_image_tokens)"
            )
        if not rows.any():
            return embeds
        features = self.encode_images(pixel_values, vision_features)[image_index[rows]]
        features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_index: torch.Tensor | None = None,
        extra_embeddings: torch.Tensor | None = None,
        extra_mask: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> LlavaOutput:
        """Run the language model over text with images inserted.

        Args:
            input_ids: ``(B, L)`` token ids with expanded ``<image>`` placeholders.
            attention_mask: ``(B, L)``, 1 for real tokens.
            pixel_values: ``(I, 3, S, S)`` CLIP inputs.
            image_index: ``(B,)`` image of each row; defaults to ``arange(B)``.
            extra_embeddings, extra_mask, vision_features: see :meth:`embed_inputs`.
        """
        if image_index is None:
            image_index = torch.arange(input_ids.shape[0], device=input_ids.device)
        embeds = self.embed_inputs(
            input_ids, pixel_values, image_index, extra_embeddings, extra_mask, vision_features
        )
        outputs = self.language_model.model(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
        )
        hidden = outputs.last_hidden_state
        logits = self.language_model.lm_head(hidden)
        return LlavaOutput(logits=logits, hidden_states=hidden)
