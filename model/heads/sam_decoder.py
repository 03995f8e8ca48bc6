"""LISA's head: the ``[SEG]`` embedding prompts SAM's mask decoder directly.

Beside the proposal scorer, the second head reading the same projected ``[SEG]`` embeddings
(``--mask_head sam|both``). As LISA:

- SAM's image encoder (frozen) embeds the image once (``ResizeLongestSide`` to SAM's input side,
  ImageNet mean/std on 0-255, zero padding bottom/right:
  :func:`~utils.data.images.preprocess_for_dinov2` at SAM's size gives exactly that input);
- the prompt encoder (frozen) gives its "no mask" dense embedding and positional grid; the
  ``[SEG]`` embedding is the one sparse prompt token;
- the mask decoder (trained) predicts one mask per ``[SEG]`` (``multimask_output=False``), whose
  low-resolution logits are upsampled to SAM's input, cropped to the resized image and resized
  to the original size (SAM's ``postprocess_masks``); the mask is ``logits > 0``.

The loss (:func:`~model.heads.losses.sigmoid_bce_loss`, :func:`~model.heads.losses.dice_loss`)
compares those original-size logits with the ground truth, as LISA does.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import nn

from utils.embedding_store import EmbeddingStore, content_key, encoder_fingerprint


class EmbeddingCache:
    """A least-recently-used store of SAM image embeddings, kept on the CPU, optionally backed by
    a precomputed :class:`~utils.embedding_store.EmbeddingStore` (``--sam_embedding_store``).

    ``capacity`` entries (0: off); a ViT-H embedding is 4 MB in fp32, so 256 entries take 1 GB.
    Keys are image files; the store is looked up by the file's content.
    """

    def __init__(self, capacity: int = 0, store: EmbeddingStore | None = None) -> None:
        self.capacity = capacity
        self.store = store
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = self.store_hits = 0

    @property
    def enabled(self) -> bool:
        return bool(self.capacity) or self.store is not None

    def get(self, key: str) -> torch.Tensor | None:
        embedding = self.entries.get(key)
        if embedding is None and self.store is not None and os.path.isfile(key):
            embedding = self.store.get(content_key(key))
            if embedding is not None:
                self.store_hits += 1
                self.put(key, embedding)
                return embedding
        if embedding is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return embedding

    def put(self, key: str, embedding: torch.Tensor) -> None:
        self.entries[key] = embedding.detach().cpu()
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


class SamMaskHead(nn.Module):
    """SAM's encoders (frozen) and mask decoder (trainable), prompted by ``[SEG]`` embeddings.

    Args:
        sam: a ``segment_anything`` SAM at any size (``model.backbones.sam.load_sam``); its
            prompt width must equal the ``[SEG]`` text projection's output width.
        cache_size: image embeddings kept in memory (:class:`EmbeddingCache`; 0: none).
        store: a store of this encoder's embeddings (``prepare_datasets.prepare_sam_embeddings``);
            one made by another encoder is refused.
    """

    def __init__(self, sam: Sam, cache_size: int = 0, store: str | os.PathLike = "") -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.image_encoder.requires_grad_(False)
        self.prompt_encoder.requires_grad_(False)
        self.cache = EmbeddingCache(
            cache_size,
            EmbeddingStore(store, encoder_fingerprint(self.image_encoder, self.image_size))
            if store
            else None,
        )

    @property
    def image_size(self) -> int:
        """SAM's square input side (1024 for the released models)."""
        return self.image_encoder.img_size

    @property
    def prompt_dim(self) -> int:
        return self.prompt_encoder.embed_dim

    def train(self, mode: bool = True) -> SamMaskHead:
        # The frozen encoders never leave eval mode.
        super().train(mode)
        self.image_encoder.eval()
        self.prompt_encoder.eval()
        return self

    def embed_images(self, sam_pixels: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        """``(I, 3, S, S)`` preprocessed images -> ``(I, C, g, g)`` image embeddings (without
        gradients unless the encoder was made trainable, ``--train_sam_encoder``).

        With ``keys`` (one per image, e.g. its path) and a frozen encoder, embeddings come from
        and go to :attr:`cache`: the frozen encoder pass of an image serves every later epoch.
        """
        parameters = list(self.image_encoder.parameters())
        trainable = any(p.requires_grad for p in parameters)
        if trainable or keys is None or not self.cache.enabled:
            with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
                return self.image_encoder(sam_pixels.to(parameters[0].dtype))
        found = [self.cache.get(key) for key in keys]
        missing = [i for i, embedding in enumerate(found) if embedding is None]
        if missing:
            index = torch.tensor(missing, device=sam_pixels.device)
            with torch.no_grad():
                fresh = self.image_encoder(
                    sam_pixels.index_select(0, index).to(parameters[0].dtype)
                )
            for i, embedding in zip(missing, fresh):
                found[i] = embedding
                self.cache.put(keys[i], embedding)
        return torch.stack([e.to(device=sam_pixels.device) for e in found])

    def decode(self, image_embedding: torch.Tensor, seg_embeddings: torch.Tensor) -> torch.Tensor:
        """Low-resolution mask logits for ``R`` prompts on one image.

        Args:
            image_embedding: ``(C, g, g)`` from :meth:`embed_images`.
            seg_embeddings: ``(R, C)`` projected ``[SEG]`` embeddings (one sparse token each), or
                ``(R, T, C)`` sparse token sequences (e.g. SAM's own point prompts).
        Returns:
            ``(R, 4g, 4g)`` logits.
        """
        sparse_none, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
        dtype = self.mask_decoder.iou_token.weight.dtype
        tokens = seg_embeddings if seg_embeddings.ndim == 3 else seg_embeddings.unsqueeze(1)
        sparse = torch.cat([sparse_none.expand(len(tokens), -1, -1), tokens], dim=1)
        low_res, _ = self.mask_decoder(
            image_embeddings=image_embedding.unsqueeze(0).to(dtype),
            image_pe=self.prompt_encoder.get_dense_pe().to(dtype),
            sparse_prompt_embeddings=sparse.to(dtype),
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=False,
        )
        return low_res[:, 0]

    def postprocess(
        self, low_res: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int]
    ) -> torch.Tensor:
        """``(R, h, w)`` logits -> ``(R, H, W)`` fp32 logits at the original size: upsampled to
        SAM's input, cropped to the resized image, resized to ``original_hw`` (SAM's
        ``postprocess_masks``)."""
        side = self.image_size
        masks = F.interpolate(
            low_res.float().unsqueeze(1), (side, side), mode="bilinear", align_corners=False
        )
        masks = masks[..., : resized_hw[0], : resized_hw[1]]
        masks = F.interpolate(masks, tuple(original_hw), mode="bilinear", align_corners=False)
        return masks[:, 0]

    def forward(
        self,
        sam_pixels: torch.Tensor,
        seg_embeddings: list[torch.Tensor],
        resized_hw: list[tuple[int, int]],
        original_hw: list[tuple[int, int]],
        image_keys: list[str] | None = None,
    ) -> list[torch.Tensor]:
        """Mask logits for every image's ``[SEG]`` embeddings (images without any are skipped:
        empty ``(0, H, W)``).

        Args:
            sam_pixels: ``(I, 3, S, S)``.
            seg_embeddings: ``I`` tensors ``(R_i, C)``.
            resized_hw, original_hw: per image, its size inside SAM's input and its own size.
            image_keys: per image, a name for the embedding cache (``None``: no caching).
        Returns:
            ``I`` tensors ``(R_i, H_i, W_i)`` fp32 logits.
        """
        needed = [i for i, segs in enumerate(seg_embeddings) if len(segs)]
        keys = None if image_keys is None else [image_keys[i] for i in needed]
        logits = [
            sam_pixels.new_zeros((0, *original_hw[i]), dtype=torch.float32)
            for i in range(len(seg_embeddings))
        ]
        if not needed:
            return logits
        index = torch.tensor(needed, device=sam_pixels.device)
        embeddings = self.embed_images(sam_pixels.index_select(0, index), keys)
        for embedding, i in zip(embeddings, needed):
            low_res = self.decode(embedding, seg_embeddings[i])
            logits[i] = self.postprocess(low_res, resized_hw[i], original_hw[i])
        return logits
