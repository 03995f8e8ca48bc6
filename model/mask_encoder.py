"""SegLLM's mask encoding: an earlier round's mask written back into the LLM's input.

Each ``<ref>`` token of a question stands for the mask of an earlier round ("the helmet of
instance 1"); :class:`PooledMaskEncoder` turns that mask into the one input embedding written at
the ``<ref>`` position (replacing the token's own embedding, not added to it):

    ref = projector(sum_p w(p) F(p) / sum_p w(p)) + Linear(box, area)

where ``F`` is the pre-projector CLIP patch grid LLaVA already computes for the image (no extra
encoder pass), ``w`` the fraction of each patch the mask covers (in CLIP's frame), ``projector``
a trainable copy of LLaVA's CLIP -> LLM projector (so the embedding starts in the space image
tokens live in), and the box and area are normalised to the image. An empty mask gets a learned
null embedding. SegLLM itself crops the masked object and runs CLIP again for its CLS token, and
adds a box token through ``Linear(4, d)``: the pooled form keeps the idea (appearance + where)
at the cost of one matrix product.

In training the model drops each reference embedding with probability ``ref_dropout`` (SegLLM:
0.5), keeping the plain ``<ref>`` embedding there, so "instance k" in the text stays usable on
its own; nothing is rescaled at evaluation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from utils.batch import ReferenceInputs

MASK_ENCODERS = ("none", "pooled", "crop_cls")
GEOMETRY_FEATURES = 5  # x0, y0, x1, y1, area


class PooledMaskEncoder(nn.Module):
    """Earlier masks -> LLM input embeddings (see the module docstring).

    Args:
        projector: LLaVA's CLIP -> LLM projector; a trainable copy is kept.
        hidden_size: the LLM's embedding width.
        pool_eps: guards the pooling of near-empty masks.
    """

    def __init__(self, projector: nn.Module, hidden_size: int, pool_eps: float = 1e-6) -> None:
        super().__init__()
        self.projector = copy.deepcopy(projector)
        self.geometry = nn.Linear(GEOMETRY_FEATURES, hidden_size)
        # Zero: a new reference starts as its pooled appearance; where it is is learned.
        nn.init.zeros_(self.geometry.weight)
        nn.init.zeros_(self.geometry.bias)
        self.null_embedding = nn.Parameter(torch.zeros(hidden_size))
        self.pool_eps = pool_eps

    @property
    def dtype(self) -> torch.dtype:
        return self.geometry.weight.dtype

    def forward(
        self, vision_features: torch.Tensor, references: ReferenceInputs, backbone=None
    ) -> torch.Tensor:
        """Encode ``N`` reference masks.

        Args:
            vision_features: ``(I, g * g, C)`` pre-projector CLIP patch features of the batch's
                images (:meth:`~model.backbones.llava.LlavaBackbone.vision_features`).
            references: ``clip_maps (N, g, g)``, ``geometry (N, 5)``, ``image_index (N,)``.
            backbone: unused (the ``crop_cls`` encoder runs its vision tower).
        Returns:
            ``(N, hidden)`` embeddings, in this module's dtype.
        """
        weights = references.clip_maps.flatten(1).float()  # (N, g*g)
        if weights.shape[1] != vision_features.shape[1]:
            raise ValueError(
                f"reference maps have {weights.shape[1]} cells but CLIP gives "
                f"{vision_features.shape[1]} patches per image"
            )
        features = vision_features[references.image_index].float()  # (N, g*g, C)
        mass = weights.sum(dim=1, keepdim=True)
        pooled = torch.einsum("np,npc->nc", weights, features) / (mass + self.pool_eps)
        embeddings = self.projector(pooled.to(self.dtype))
        embeddings = embeddings + self.geometry(references.geometry.to(self.dtype))
        empty = (mass.squeeze(1) <= self.pool_eps).unsqueeze(1)
        return torch.where(empty, self.null_embedding.unsqueeze(0), embeddings)


class CropClsMaskEncoder(PooledMaskEncoder):
    """SegLLM's own mask encoding (``--mask_encoder crop_cls``): the referenced object cropped
    out (background zeroed, cropped to its box, padded square at the top left), through the
    frozen CLIP tower once more, its CLS token at LLaVA's select layer through a trainable copy
    of the projector, plus the box through a linear layer (SegLLM: ``Linear(4, d)`` on the box in
    its 1024 frame; here normalised to the image). It costs one CLIP pass per reference."""

    def __init__(self, projector: nn.Module, hidden_size: int) -> None:
        super().__init__(projector, hidden_size)
        self.box = nn.Linear(4, hidden_size)
        nn.init.zeros_(self.box.weight)
        nn.init.zeros_(self.box.bias)
        del self.geometry  # the box token replaces the box/area geometry token

    @property
    def dtype(self) -> torch.dtype:
        return self.box.weight.dtype

    def forward(
        self, vision_features: torch.Tensor, references: ReferenceInputs, backbone=None
    ) -> torch.Tensor:
        """Encode ``N`` reference masks from ``references.crop_pixels (N, 3, S, S)`` with
        ``backbone``'s vision tower; an empty mask gets the null embedding."""
        if references.crop_pixels is None or backbone is None:
            raise ValueError("the crop_cls mask encoder needs reference crops and the backbone")
        tower = backbone.vision_tower
        with torch.no_grad():
            outputs = tower(
                references.crop_pixels.to(next(tower.parameters()).dtype), output_hidden_states=True
            )
            cls = outputs.hidden_states[backbone.vision_select_layer][:, 0]
        embeddings = self.projector(cls.to(self.dtype)) + self.box(
            references.geometry[:, :4].to(self.dtype)
        )
        empty = (references.clip_maps.flatten(1).sum(1) <= self.pool_eps).unsqueeze(1)
        return torch.where(empty, self.null_embedding.unsqueeze(0), embeddings)


def build_mask_encoder(kind: str, projector: nn.Module, hidden_size: int) -> PooledMaskEncoder:
    """The mask encoder ``--mask_encoder`` names (``pooled`` or ``crop_cls``)."""
    if kind == "pooled":
        return PooledMaskEncoder(projector, hidden_size)
    if kind == "crop_cls":
        return CropClsMaskEncoder(projector, hidden_size)
    raise ValueError(f"unknown --mask_encoder {kind!r}; expected one of {MASK_ENCODERS}")
