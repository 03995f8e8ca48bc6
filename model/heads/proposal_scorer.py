"""The proposal scorer: which SAM mask proposals does a ``[SEG]`` embedding point at?

For one image with ``K`` proposals and ``R`` ``[SEG]`` tokens:

1. DINOv2 patch features ``(C, G, G)`` go through a 1x1 conv to ``E = 256`` channels and are
   bilinearly upsampled (in fp32) to the proposal map size ``M = 256``.
2. Each proposal's soft weight map ``(M, M)`` averages those features into one ``E``-vector
   (mask-average pooling), giving ``(K, E)``. Steps 1 and 2 are computed together
   (:meth:`ProposalScorer.pool`): the upsampling is linear, so the weight maps are brought down
   to the ``G x G`` grid by its transpose and the upsampled features are never built.
3. A small two-way transformer lets the proposals (queries, expanded to ``(R, K, E)``) attend to
   each other and to their ``[SEG]`` embedding (one key per round, ``(R, 1, E)``), and lets the
   ``[SEG]`` token attend back to the proposals. It is SAM's ``TwoWayAttentionBlock`` without
   positional encodings and without attention downsampling; the blocks are post-norm.
4. A final proposals -> ``[SEG]`` attention with a residual and LayerNorm, then two heads: the
   IoP head (sigmoid, "how much of this proposal lies inside the target") and the embedding head,
   whose output is compared by cosine with the *original* ``[SEG]`` embedding.

The parameter structure is exactly upstream's, so its checkpoints map name for name:

=================================================  =========================================
upstream (``model.model.*``)                       here (``ProposalScorer``)
=================================================  =========================================
``lisa_dino_conv``                                 ``feature_proj``
``lisa_attention_layers.{i}.self_attn``            ``blocks.{i}.self_attn``
``lisa_attention_layers.{i}.cross_attn_token_to_image``  ``blocks.{i}.cross_attn_token_to_image``
``lisa_attention_layers.{i}.cross_attn_image_to_token``  ``blocks.{i}.cross_attn_image_to_token``
``lisa_attention_layers.{i}.mlp.lin1`` / ``lin2``  ``blocks.{i}.mlp.lin1`` / ``lin2``
``lisa_attention_layers.{i}.norm1`` .. ``norm4``   ``blocks.{i}.norm1`` .. ``norm4``
``lisa_final_attn``                                ``final_attn``
``lisa_norm_final_attn``                           ``final_norm``
``lisa_iou_head`` (``0``, ``2``)                   ``iop_head`` (``0``, ``2``)
``lisa_embedding_head`` (``0``, ``2``)             ``embedding_head`` (``0``, ``2``)
``text_hidden_fcs.0`` (``0``, ``2``)               ``LLMSegModel.text_projection`` (``0``, ``2``)
=================================================  =========================================

Every attention is ``segment_anything``'s ``Attention`` (``q_proj``/``k_proj``/``v_proj``/
``out_proj``), which is why LoRA must be restricted to the language model.

Option (off by default, so the paper's model and its checkpoints are unchanged):
``geometry_embedding`` adds a :class:`~model.heads.mask_geometry.MaskGeometryEmbedding` of each
proposal's weight map (size, centroid, box, box-normalised shape, rotation-invariant outline) to
its pooled feature, in :meth:`ProposalScorer.proposal_features`; its parameters live under
``geometry_embedding.*``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock
from torch import nn

from model.heads.mask_geometry import MaskGeometryEmbedding, radial_shape_descriptors
from model.heads.padded_attention import two_way_block
from model.heads.reference_relations import (
    FIRST_VERSION_FEATURES,
    RELATION_FEATURES,
    reference_relations,
)


@dataclass
class ProposalScorerConfig:
    """Sizes of the proposal scorer; defaults are upstream's (DINOv2 ViT-L/14 features)."""

    feature_dim: int = 1024  # DINOv2 width; taken from the DINOv2 config when building
    embed_dim: int = 256  # also the [SEG] text-projection output size
    num_heads: int = 8
    mlp_dim: int = 2048
    depth: int = 2
    iop_hidden_dim: int = 128
    embedding_hidden_dim: int = 2048
    map_size: int = 256  # side of the proposal weight maps and the upsampled features
    pool_eps: float = 1e-8  # guards empty proposals in the mask-average pooling
    geometry_embedding: bool = False  # add a mask-geometry embedding (not in the paper)
    geometry_grid: int = 8  # side of its box-normalised shape thumbnail
    relation_features: bool = False  # SegLLM: proposals see their relation to referenced masks


def upsampling_matrix(size: int, grid: int, device: torch.device | None = None) -> torch.Tensor:
    """``(M, G)`` matrix ``A`` of 1-d linear upsampling from ``G`` to ``M`` samples as
    ``F.interpolate(..., mode="bilinear", align_corners=False)`` does it per axis."""
    basis = torch.eye(grid, device=device, dtype=torch.float32).unsqueeze(1)  # (G, 1, G)
    rows = F.interpolate(basis, size=size, mode="linear", align_corners=False)  # (G, 1, M)
    return rows[:, 0].T


@dataclass
class ProposalScores:
    """The scorer's verdict on one image's proposals, one row per ``[SEG]`` (round).

    Attributes:
        similarity: ``(R, K)`` fp32 cosine between each proposal embedding and the ``[SEG]``
            embedding (the alignment loss and ``argmax`` selection use it).
        iop: ``(R, K)`` fp32 IoP-head output in ``[0, 1]``.
        proposal_embeddings: ``(R, K, E)`` embedding-head output.
    """

    similarity: torch.Tensor
    iop: torch.Tensor
    proposal_embeddings: torch.Tensor


class ProposalScorer(nn.Module):
    """Scores mask proposals against ``[SEG]`` embeddings (see the module docstring)."""

    def __init__(self, config: ProposalScorerConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.feature_proj = nn.Conv2d(config.feature_dim, dim, kernel_size=1)
        self.blocks = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=dim,
                num_heads=config.num_heads,
                mlp_dim=config.mlp_dim,
                activation=nn.ReLU,
                attention_downsample_rate=1,
                skip_first_layer_pe=False,
            )
            for _ in range(config.depth)
        )
        self.final_attn = Attention(dim, config.num_heads, downsample_rate=1)
        self.final_norm = nn.LayerNorm(dim)
        self.iop_head = nn.Sequential(
            nn.Linear(dim, config.iop_hidden_dim),
            nn.ReLU(),
            nn.Linear(config.iop_hidden_dim, 1),
            nn.Sigmoid(),
        )
        self.embedding_head = nn.Sequential(
            nn.Linear(dim, config.embedding_hidden_dim),
            nn.ReLU(),
            nn.Linear(config.embedding_hidden_dim, dim),
        )
        self.geometry_embedding = (
            MaskGeometryEmbedding(dim, config.geometry_grid) if config.geometry_embedding else None
        )
        self.relation_embedding = None
        if config.relation_features:
            # No bias and zero weights: rounds without a reference score exactly as before, and
            # a new model starts from the single-round scorer.
            self.relation_embedding = nn.Linear(RELATION_FEATURES, dim, bias=False)
            nn.init.zeros_(self.relation_embedding.weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.feature_proj.weight.dtype

    def project_features(self, dino_features: torch.Tensor) -> torch.Tensor:
        """1x1 conv to ``E`` channels.

        Upstream then upsamples bilinearly to the proposal map size ``M`` and pools there;
        :meth:`pool` gives the same averages without building the ``(E, M, M)`` maps.

        Args:
            dino_features: ``(I, C, G, G)`` DINOv2 patch grids.
        Returns:
            ``(I, E, G, G)`` float32 (pooling runs in fp32: upstream's 1e-8 guard and 65k-pixel
            sums are not safe in bf16).
        """
        return self.feature_proj(dino_features.to(self.dtype)).float()

    def pool(self, feature_map: torch.Tensor, proposal_masks: torch.Tensor) -> torch.Tensor:
        """Mask-average pooling over the features bilinearly upsampled to the map size:
        ``f_k = sum_p w_k(p) U(F)(p) / (sum_p w_k(p) + eps)``.

        Bilinear upsampling is linear and separable, ``U(F) = A F A^T`` with the ``(M, G)``
        interpolation matrix ``A``, so the sum equals ``sum_q (A^T w_k A)(q) F(q)``: the weight
        map is brought down to the feature grid instead of the features up to ``M x M``. For
        the paper's sizes (``M = 256``, ``G = 16``, ``E = 256``) that is about 14 times fewer
        multiplications per proposal and no ``(E, 256, 256)`` map per image, nor its gradient.

        Args:
            feature_map: ``(E, G, G)`` from :meth:`project_features`.
            proposal_masks: ``(K, M, M)`` weight maps in ``[0, 1]``; an all-zero map pools to 0.
        Returns:
            ``(K, E)`` float32.
        """
        size = self.config.map_size
        if proposal_masks.shape[-2:] != (size, size):
            raise ValueError(
                f"proposal maps are {tuple(proposal_masks.shape[-2:])} but the scorer pools at "
                f"{(size, size)} (ProposalScorerConfig.map_size)"
            )
        weights = proposal_masks.float()
        down = upsampling_matrix(size, feature_map.shape[-1], weights.device).T  # (G, M)
        on_grid = down @ weights @ down.T  # (K, G, G)
        pooled = on_grid.flatten(1) @ feature_map.flatten(1).float().T  # (K, E)
        return pooled / (weights.flatten(1).sum(dim=1, keepdim=True) + self.config.pool_eps)

    def proposal_features(
        self, feature_map: torch.Tensor, proposal_masks: torch.Tensor
    ) -> torch.Tensor:
        """What the selection transformer sees of each proposal: its pooled feature, plus its
        mask-geometry embedding when ``config.geometry_embedding`` is on.

        Args:
            feature_map: ``(E, G, G)`` from :meth:`project_features`.
            proposal_masks: ``(K, M, M)`` weight maps.
        Returns:
            ``(K, E)`` float32.
        """
        features, _ = self.prepare(feature_map.unsqueeze(0), [proposal_masks])
        return features[0]

    def relations(
        self, feature_map: torch.Tensor, proposal_masks: torch.Tensor, reference_maps: torch.Tensor
    ) -> torch.Tensor:
        """``(N, K, 10)`` relation features of the proposals to ``N`` referenced masks
        (:func:`~model.heads.reference_relations.reference_relations`; appearance from this
        scorer's pooling of ``feature_map``).

        Args:
            feature_map: ``(E, G, G)`` from :meth:`project_features`.
            proposal_masks: ``(K, M, M)`` weight maps.
            reference_maps: ``(N, M, M)`` the referenced masks in the same frame.
        """
        return reference_relations(
            proposal_masks,
            reference_maps,
            self.pool(feature_map, proposal_masks),
            self.pool(feature_map, reference_maps.to(feature_map.dtype)),
        )

    def prepare(
        self,
        feature_maps: torch.Tensor,
        proposal_masks: list[torch.Tensor],
        reference_maps: list[torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """:meth:`proposal_features` and :meth:`relations` for several images at once: the
        geometry embedding runs once over all proposals, and each map's outline descriptors
        are computed once and serve both.

        Args:
            feature_maps: ``(I, E, G, G)`` from :meth:`project_features`.
            proposal_masks: ``I`` tensors ``(K_i, M, M)``.
            reference_maps: ``I`` tensors ``(N_i, M, M)`` (``N_i`` may be 0), or ``None``.
        Returns:
            per image the ``(K_i, E)`` features and the ``(N_i, K_i, 10)`` relations (``None``
            where the image has no reference).
        """
        counts = [masks.shape[0] for masks in proposal_masks]
        pooled = [self.pool(fm, masks) for fm, masks in zip(feature_maps, proposal_masks)]
        relations: list[torch.Tensor | None] = [None] * len(proposal_masks)
        has_references = reference_maps is not None and any(len(r) for r in reference_maps)
        if not proposal_masks or (self.geometry_embedding is None and not has_references):
            return pooled, relations
        all_masks = torch.cat(proposal_masks)
        outlines = radial_shape_descriptors(all_masks)  # (sum K, D)
        features = pooled
        if self.geometry_embedding is not None:
            geometry = self.geometry_embedding(all_masks, outline=outlines).float()
            features = [p + g for p, g in zip(pooled, geometry.split(counts))]
        if has_references:
            reference_outlines = radial_shape_descriptors(torch.cat(reference_maps))
            parts = zip(
                feature_maps,
                proposal_masks,
                reference_maps,
                pooled,
                outlines.split(counts),
                reference_outlines.split([len(r) for r in reference_maps]),
            )
            for i, (fm, masks, refs, pool, outline, ref_outline) in enumerate(parts):
                if len(refs):
                    ref_pool = self.pool(fm, refs.to(fm.dtype))
                    relations[i] = reference_relations(
                        masks, refs, pool, ref_pool, outline, ref_outline
                    )
        return features, relations

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A save of the first relation version has a (E, 6) projection: its further columns
        # load as zeros, so the model scores exactly as it did.
        key = prefix + "relation_embedding.weight"
        saved = state_dict.get(key)
        if saved is not None and saved.shape[-1] == FIRST_VERSION_FEATURES:
            padding = saved.new_zeros((saved.shape[0], RELATION_FEATURES - FIRST_VERSION_FEATURES))
            state_dict[key] = torch.cat([saved, padding], dim=1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def score(
        self,
        pooled: torch.Tensor,
        seg_embeddings: torch.Tensor,
        relations: torch.Tensor | None = None,
    ) -> ProposalScores:
        """Run the selection transformer and both heads for one image.

        Args:
            pooled: ``(K, E)`` proposal features (:meth:`proposal_features`).
            seg_embeddings: ``(R, E)`` projected ``[SEG]`` hidden states.
            relations: ``(R, K, 10)`` each proposal's relation to the masks round ``r`` refers
                to (:mod:`model.heads.reference_relations`); needs ``relation_features``.
        Returns:
            :class:`ProposalScores` with ``(R, K)`` similarity and IoP.
        """
        return self.score_many([pooled], [seg_embeddings], [relations])[0]

    def score_many(
        self,
        pooled: list[torch.Tensor],
        seg_embeddings: list[torch.Tensor],
        relations: list[torch.Tensor | None] | None = None,
    ) -> list[ProposalScores]:
        """:meth:`score` for several proposal sets in one pass of the transformer.

        The rounds of all sets are stacked, each set padded to the largest ``K`` and its padding
        masked (:mod:`model.heads.padded_attention`), so every row scores as it would alone;
        many small images cost one pass instead of one each.

        Args:
            pooled: ``S`` tensors ``(K_s, E)``.
            seg_embeddings: ``S`` tensors ``(R_s, E)``.
            relations: ``S`` entries, ``(R_s, K_s, 10)`` or ``None``.
        Returns:
            ``S`` :class:`ProposalScores` with ``(R_s, K_s)`` fields.
        """
        relations = relations if relations is not None else [None] * len(pooled)
        if not len(pooled) == len(seg_embeddings) == len(relations):
            raise ValueError("score_many needs one proposal set, [SEG] set and relation entry each")
        if any(r is not None for r in relations) and self.relation_embedding is None:
            raise ValueError("relation features need ProposalScorerConfig.relation_features")
        results: list[ProposalScores | None] = [None] * len(pooled)
        live = []
        for s, (features, segs) in enumerate(zip(pooled, seg_embeddings)):
            if segs.shape[0] == 0 or features.shape[0] == 0:
                results[s] = self._empty_scores(features, segs)
            else:
                live.append(s)
        if not live:
            return results
        sizes = [pooled[s].shape[0] for s in live]
        rounds = [seg_embeddings[s].shape[0] for s in live]
        width = max(sizes)
        queries = []
        for s, size in zip(live, sizes):
            rows = pooled[s].to(self.dtype).unsqueeze(0).expand(seg_embeddings[s].shape[0], -1, -1)
            if relations[s] is not None:
                rows = rows + self.relation_embedding(relations[s].to(self.dtype))
            queries.append(F.pad(rows, (0, 0, 0, width - size)))
        queries = torch.cat(queries)  # (sum R, K_max, E)
        keys = torch.cat([seg_embeddings[s] for s in live]).to(self.dtype).unsqueeze(1)
        mask = None
        if min(sizes) < width:
            real = torch.tensor(sizes, device=queries.device).repeat_interleave(
                torch.tensor(rounds, device=queries.device)
            )
            mask = torch.arange(width, device=queries.device) < real[:, None]  # (sum R, K_max)
        for block in self.blocks:
            queries, keys = two_way_block(block, queries, keys, mask)
        queries = self.final_norm(queries + self.final_attn(q=queries, k=keys, v=keys))
        iop = self.iop_head(queries).squeeze(-1).float()  # (sum R, K_max)
        embeddings = self.embedding_head(queries)  # (sum R, K_max, E)
        texts = torch.cat([seg_embeddings[s] for s in live]).float()
        similarity = F.cosine_similarity(embeddings.float(), texts.unsqueeze(1), dim=-1)
        parts = zip(similarity.split(rounds), iop.split(rounds), embeddings.split(rounds))
        for s, size, (sim, prob, emb) in zip(live, sizes, parts):
            results[s] = ProposalScores(
                similarity=sim[:, :size], iop=prob[:, :size], proposal_embeddings=emb[:, :size]
            )
        return results

    def _empty_scores(self, pooled: torch.Tensor, seg_embeddings: torch.Tensor) -> ProposalScores:
        """``(R, 0)`` or ``(0, K)`` scores, still connected to the graph for the losses."""
        num_rounds, num_proposals = seg_embeddings.shape[0], pooled.shape[0]
        empty = seg_embeddings.float().sum() * 0 + pooled.float().sum() * 0
        zeros = empty.expand(num_rounds, num_proposals)
        embeddings = empty.expand(num_rounds, num_proposals, self.config.embed_dim)
        return ProposalScores(similarity=zeros, iop=zeros, proposal_embeddings=embeddings)

    def forward(
        self,
        dino_features: torch.Tensor,
        proposal_masks: list[torch.Tensor],
        seg_embeddings: list[torch.Tensor],
    ) -> list[ProposalScores]:
        """Score every image's proposals against that image's ``[SEG]`` embeddings.

        Args:
            dino_features: ``(I, C, G, G)``.
            proposal_masks: ``I`` tensors ``(K_i, M, M)``.
            seg_embeddings: ``I`` tensors ``(R_i, E)``.
        Returns:
            ``I`` :class:`ProposalScores` with ``(R_i, K_i)`` fields.
        """
        if not len(proposal_masks) == len(seg_embeddings) == dino_features.shape[0]:
            raise ValueError(
                f"{dino_features.shape[0]} feature grids, {len(proposal_masks)} proposal sets and "
                f"{len(seg_embeddings)} [SEG] sets: one of each per image is needed"
            )
        features, _ = self.prepare(self.project_features(dino_features), proposal_masks)
        return self.score_many(features, seg_embeddings)
