"""SAM's mask decoder for many point prompts on one image, without repeating shared work.

``segment_anything``'s ``MaskDecoder`` serves one prompt per batch row: it copies the image
embedding once per prompt and runs every image-side projection (``(HW, 256) x (256, 128)``
matrices) for each of them. For "segment everything" (1024 prompts on one image) most of that is
either identical across prompts or can be regrouped into much smaller products. This module
evaluates the same decoder, with the same weights, as:

- *once per image*: the image tokens (embedding + the "no mask" dense embedding), their
  positional encoding, and every first-layer projection of them (the first block's keys do not
  depend on the prompt yet);
- *per prompt*, attention reassociated so that no ``(prompts, HW, 128)`` projection is formed:
  ``softmax(q W_k X^T) X W_v^T = softmax((q W_k) X^T) (P X) W_v^T`` (the key bias adds a constant
  per query row, which softmax ignores; value rows are mixed by weights that sum to one, so the
  value bias passes through), and the image-to-token output projection is folded into the seven
  token values. With 7 tokens and 8 heads this halves the multiply-adds of each image-side
  attention and removes most of the memory traffic, which dominates on CPUs;
- *only for the tokens that are read*: the final token-to-image attention runs for the IoU token
  and the requested mask tokens, not for the single-mask and prompt tokens;
- *only for prompts that will be kept*: the transposed-convolution upscaling and the
  hypernetwork product that produce the low-resolution mask logits. The predicted IoU comes from
  the token outputs alone, so the caller can filter on it first.

The results equal ``MaskDecoder``'s up to float32 rounding (reassociated sums), which the tests
and ``benchmarks/bench_proposals.py`` check against the reference generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock


@dataclass
class ImageTokens:
    """Prompt-independent decoder inputs of one image, computed by `BatchedMaskDecoder.encode`.

    Attributes:
        tokens: ``(HW, C)`` image embedding plus the dense "no mask" prompt embedding.
        positional: ``(HW, C)`` dense positional encoding of the embedding grid.
        first_keys: ``(HW, Ci)`` first block's token-to-image key projection of
            ``tokens + positional``.
        first_values: ``(HW, Ci)`` first block's token-to-image value projection of ``tokens``.
        first_queries: ``(HW, Ci)`` first block's image-to-token query projection of
            ``tokens + positional``.
        grid: ``(h, w)`` of the embedding grid (64 x 64 for SAM at 1024 px).
    """

    tokens: torch.Tensor
    positional: torch.Tensor
    first_keys: torch.Tensor
    first_values: torch.Tensor
    first_queries: torch.Tensor
    grid: tuple[int, int]


@dataclass
class DecodedPrompts:
    """Decoder outputs of a batch of B prompts before the (costly) mask upscaling.

    Attributes:
        token_outputs: ``(B, 1 + M, C)`` final IoU token and the M requested mask tokens.
        image_outputs: ``(B, HW, C)`` image tokens after the two-way transformer.
        iou_predictions: ``(B, num_mask_tokens)`` predicted IoU of every mask token.
        mask_tokens: the M mask-token indices whose outputs ``token_outputs`` holds.
    """

    token_outputs: torch.Tensor
    image_outputs: torch.Tensor
    iou_predictions: torch.Tensor
    mask_tokens: list[int]


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(..., num_heads * d)`` -> ``(..., num_heads, d)``."""
    return x.unflatten(-1, (num_heads, x.shape[-1] // num_heads))


def _tokens_to_shared_image(
    attention: Attention, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Tokens of every prompt attend to projected image tokens that all prompts share.

    Args:
        queries: ``(B, T, C)`` token queries (with positional encoding).
        keys, values: ``(HW, Ci)`` already projected image keys / values.

    Returns:
        ``(B, T, C)`` attention output (after ``out_proj``).
    """
    batch, num_tokens, _ = queries.shape
    num_heads = attention.num_heads
    q = _heads(attention.q_proj(queries), num_heads)  # (B, T, H, d)
    q = q.permute(2, 0, 1, 3).flatten(1, 2)  # (H, B*T, d)
    k = _heads(keys, num_heads).permute(1, 2, 0)  # (H, d, HW)
    v = _heads(values, num_heads).transpose(0, 1)  # (H, HW, d)
    logits = torch.bmm(q, k) / math.sqrt(q.shape[-1])
    out = torch.bmm(logits.softmax(dim=-1), v)  # (H, B*T, d)
    out = out.unflatten(1, (batch, num_tokens)).permute(1, 2, 0, 3).flatten(2)
    return attention.out_proj(out)


def _tokens_to_image(
    attention: Attention, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Tokens attend to per-prompt image tokens, without projecting the image tokens.

    Args:
        queries: ``(B, T, C)`` token queries (with positional encoding).
        keys: ``(B, HW, C)`` image tokens with positional encoding (unprojected).
        values: ``(B, HW, C)`` image tokens (unprojected).

    Returns:
        ``(B, T, C)`` attention output (after ``out_proj``).
    """
    num_heads = attention.num_heads
    q = _heads(attention.q_proj(queries), num_heads)  # (B, T, H, d)
    scale = 1.0 / math.sqrt(q.shape[-1])
    key_weight = _heads(attention.k_proj.weight.t(), num_heads)  # (C, H, d)
    # Fold the key projection into the queries: (B, H*T, C); its bias is softmax-invariant.
    folded = torch.einsum("bthd,chd->bhtc", q, key_weight).flatten(1, 2) * scale
    weights = torch.bmm(folded, keys.transpose(1, 2)).softmax(dim=-1)  # (B, H*T, HW)
    mixed = torch.bmm(weights, values).unflatten(1, (num_heads, q.shape[1]))  # (B, H, T, C)
    value_weight = _heads(attention.v_proj.weight.t(), num_heads)  # (C, H, d)
    out = torch.einsum("bhtc,chd->bthd", mixed, value_weight).flatten(2) + attention.v_proj.bias
    return attention.out_proj(out)


def _image_to_tokens(
    attention: Attention,
    image_queries: torch.Tensor,
    queries_projected: bool,
    keys: torch.Tensor,
    values: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    """Image tokens attend to the prompt tokens; returns ``residual + attention output``.

    Args:
        image_queries: ``(HW, Ci)`` projected queries shared by all prompts
            (``queries_projected=True``) or ``(B, HW, C)`` unprojected per-prompt image tokens
            with positional encoding.
        keys: ``(B, T, C)`` tokens with positional encoding; values: ``(B, T, C)`` tokens.
        residual: ``(HW, C)`` or ``(B, HW, C)`` image tokens the output is added to.

    Returns:
        ``(B, HW, C)``.
    """
    num_heads = attention.num_heads
    batch, num_tokens, _ = keys.shape
    k = _heads(attention.k_proj(keys), num_heads)  # (B, T, H, d)
    scale = 1.0 / math.sqrt(k.shape[-1])
    # Logits are laid out (B, H, T, HW): the softmax over the T tokens then runs along a
    # contiguous HW axis instead of over a length-7 innermost axis.
    if queries_projected:
        q = _heads(image_queries, num_heads).transpose(0, 1)  # (H, HW, d)
        logits = torch.bmm(k.permute(2, 0, 1, 3).flatten(1, 2), q.transpose(1, 2))
        logits = logits.unflatten(1, (batch, num_tokens)).transpose(0, 1) * scale
    else:
        # Fold the query projection into the token keys: (B, H*T, C) plus a bias per key.
        query_weight = _heads(attention.q_proj.weight.t(), num_heads)  # (C, H, d)
        folded = torch.einsum("bthd,chd->bhtc", k, query_weight).flatten(1, 2) * scale
        bias = torch.einsum("bthd,hd->bht", k, _heads(attention.q_proj.bias, num_heads)) * scale
        logits = torch.baddbmm(bias.flatten(1).unsqueeze(2), folded, image_queries.transpose(1, 2))
        logits = logits.unflatten(1, (num_heads, num_tokens))  # (B, H, T, HW)
    weights = logits.softmax(dim=2).flatten(1, 2)  # (B, H*T, HW)
    # Fold the output projection into the token values; each head's weights sum to one, so the
    # output bias is spread evenly over the heads.
    v = _heads(attention.v_proj(values), num_heads)  # (B, T, H, d)
    out_weight = _heads(attention.out_proj.weight, num_heads)  # (C, H, d)
    folded_values = torch.einsum("bthd,chd->bhtc", v, out_weight).flatten(1, 2)
    folded_values = folded_values + attention.out_proj.bias / num_heads  # (B, H*T, C)
    return torch.baddbmm(
        residual.expand(batch, *residual.shape[-2:]), weights.transpose(1, 2), folded_values
    )


def _activate_(activation: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``activation(x)``, in place for GELU: these maps are MBs per prompt, and a fresh output
    costs a page fault per 4 KB on CPUs."""
    if isinstance(activation, torch.nn.GELU):
        return torch.ops.aten.gelu_(x, approximate=activation.approximate)
    return activation(x)


class BatchedMaskDecoder:
    """Evaluates ``sam.mask_decoder`` for many point prompts on one image.

    Args:
        sam: a ``segment_anything`` SAM (any size); its weights are used as they are.
    """

    def __init__(self, sam: Sam) -> None:
        self.decoder = sam.mask_decoder
        self.prompt_encoder = sam.prompt_encoder
        self.transformer = sam.mask_decoder.transformer
        self.layers: list[TwoWayAttentionBlock] = list(self.transformer.layers)
        if not self.layers:
            raise ValueError("the SAM mask decoder has no transformer blocks")

    @torch.inference_mode()
    def encode(self, image_embedding: torch.Tensor) -> ImageTokens:
        """Prompt-independent inputs from the ``(1, C, h, w)`` image-encoder output."""
        height, width = image_embedding.shape[-2:]
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        tokens = (image_embedding + dense)[0].flatten(1).t()  # (HW, C)
        positional = self.prompt_encoder.get_dense_pe()[0].flatten(1).t()
        first = self.layers[0]
        with_pe = tokens + positional
        return ImageTokens(
            tokens=tokens,
            positional=positional,
            first_keys=first.cross_attn_token_to_image.k_proj(with_pe),
            first_values=first.cross_attn_token_to_image.v_proj(tokens),
            first_queries=first.cross_attn_image_to_token.q_proj(with_pe),
            grid=(height, width),
        )

    @torch.inference_mode()
    def decode(
        self,
        image: ImageTokens,
        sparse_embeddings: torch.Tensor,
        mask_tokens: list[int] | None = None,
    ) -> DecodedPrompts:
        """Run the two-way transformer and the IoU head for B prompts.

        Args:
            image: from :meth:`encode`.
            sparse_embeddings: ``(B, P, C)`` prompt-encoder point embeddings.
            mask_tokens: the mask tokens whose masks may be asked for later (default: all).
                The final attention only runs for them and the IoU token: the other tokens'
                final outputs are never used.
        """
        if mask_tokens is None:
            mask_tokens = list(range(self.decoder.num_mask_tokens))
        batch = sparse_embeddings.shape[0]
        output_tokens = torch.cat([self.decoder.iou_token.weight, self.decoder.mask_tokens.weight])
        point_embedding = torch.cat(
            [output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_embeddings], dim=1
        )
        queries = point_embedding
        keys: torch.Tensor | None = None  # per-prompt image tokens, once they depend on the prompt
        keys_pe: torch.Tensor | None = None
        for block in self.layers:
            if block.skip_first_layer_pe:
                queries = block.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + point_embedding
                queries = queries + block.self_attn(q=q, k=q, v=queries)
            queries = block.norm1(queries)

            q = queries + point_embedding
            if keys is None:
                attn_out = _tokens_to_shared_image(
                    block.cross_attn_token_to_image, q, image.first_keys, image.first_values
                )
            else:
                keys_pe = keys + image.positional
                attn_out = _tokens_to_image(block.cross_attn_token_to_image, q, keys_pe, keys)
            queries = block.norm2(queries + attn_out)
            queries = block.norm3(queries + block.mlp(queries))

            q = queries + point_embedding
            if keys is None:
                keys = _image_to_tokens(
                    block.cross_attn_image_to_token,
                    image.first_queries,
                    True,
                    q,
                    queries,
                    image.tokens,
                )
            else:
                keys = _image_to_tokens(
                    block.cross_attn_image_to_token, keys_pe, False, q, queries, keys
                )
            keys = block.norm4(keys)

        rows = [0] + [1 + i for i in mask_tokens]  # IoU token, then the requested mask tokens
        queries = queries[:, rows]
        q = queries + point_embedding[:, rows]
        attn_out = _tokens_to_image(
            self.transformer.final_attn_token_to_image, q, keys + image.positional, keys
        )
        queries = self.transformer.norm_final_attn(queries + attn_out)
        iou_predictions = self.decoder.iou_prediction_head(queries[:, 0, :])
        return DecodedPrompts(queries, keys, iou_predictions, list(mask_tokens))

    @torch.inference_mode()
    def mask_logits(
        self,
        decoded: DecodedPrompts,
        image: ImageTokens,
        prompt_index: torch.Tensor,
        mask_tokens: list[int],
    ) -> torch.Tensor:
        """Low-resolution mask logits of the chosen prompts and mask tokens.

        ``output_upscaling`` is two stride-2, kernel-2 transposed convolutions, i.e. every
        embedding cell independently becomes a 2 x 2 block of outputs. We run each as one matrix
        product over (cell, channel) rows, keep the sub-pixel offsets in the channel axis (so
        the LayerNorm over channels is a contiguous ``layer_norm``), and interleave the offsets
        into the image only for the final few masks.

        Args:
            decoded: from :meth:`decode`.
            image: from :meth:`encode` (for the grid size).
            prompt_index: ``(B',)`` long indices of the prompts to upscale.
            mask_tokens: which of the ``num_mask_tokens`` masks to return (``[1, 2, 3]`` for
                SAM's multimask output); all must be in ``decoded.mask_tokens``.

        Returns:
            ``(B', len(mask_tokens), 4h, 4w)`` logits (256 x 256 for SAM at 1024 px).
        """
        height, width = image.grid
        up1, norm, act1, up2, act2 = self.decoder.output_upscaling
        src = decoded.image_outputs[prompt_index]  # (B', HW, C)
        batch = src.shape[0]
        x = torch.nn.functional.linear(src, *self._upscale_weights(up1))  # (B', HW, 4*C1)
        x = torch.nn.functional.layer_norm(
            x.unflatten(-1, (4, -1)), norm.weight.shape, norm.weight, norm.bias, norm.eps
        )
        x = _activate_(act1, x)
        x = _activate_(act2, torch.nn.functional.linear(x, *self._upscale_weights(up2)))
        tokens = decoded.token_outputs[prompt_index]
        rows = [1 + decoded.mask_tokens.index(i) for i in mask_tokens]
        hyper = torch.stack(
            [
                self.decoder.output_hypernetworks_mlps[i](tokens[:, row, :])
                for i, row in zip(mask_tokens, rows)
            ],
            dim=1,
        )  # (B', M, C2)
        masks = torch.bmm(hyper, x.reshape(batch, -1, hyper.shape[-1]).transpose(1, 2))
        # (B', M, [i, j, a, c, a2, c2]) -> (B', M, 4i + 2a + a2, 4j + 2c + c2)
        masks = masks.view(batch, -1, height, width, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
        return masks.reshape(batch, -1, 4 * height, 4 * width)

    @staticmethod
    def _upscale_weights(conv: torch.nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
        """A kernel-2 stride-2 transposed conv as a ``linear`` weight ``(4*out, in)`` and bias.

        Output features are ordered (row offset, column offset, out channel).
        """
        weight = conv.weight.permute(2, 3, 1, 0).flatten(0, 2)  # (2*2*out, in)
        return weight, conv.bias.repeat(4)
