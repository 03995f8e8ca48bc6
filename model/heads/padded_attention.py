"""SAM's two-way attention block over a batch of padded proposal sets.

The proposal scorer runs one :class:`~segment_anything.modeling.transformer.TwoWayAttentionBlock`
stack per ``[SEG]`` token, with the image's ``K`` proposals as queries. Scoring the rounds of
several images in one pass pads every image to the largest ``K``; the padded proposals must not
be attended to, which ``segment_anything``'s ``Attention`` cannot express (it has no mask). These
functions run the same modules (same parameters, same order of operations) with a key mask on
the two attentions whose keys are proposals: the proposals' self-attention and the ``[SEG]``
token's attention back to them. Padded rows compute values nobody reads.
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock


def masked_attention(
    attention: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """``Attention.forward`` with padded keys left out of the softmax.

    Args:
        attention: the module whose projections are used.
        q: ``(B, Nq, E)`` queries.
        k, v: ``(B, Nk, E)`` keys and values.
        key_mask: ``(B, Nk)`` bool, True for real keys (each row needs one), or ``None``.
    Returns:
        ``(B, Nq, E)``.
    """
    if key_mask is None:
        return attention(q=q, k=k, v=v)
    heads = attention.num_heads

    def split(x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        return x.reshape(batch, tokens, heads, channels // heads).transpose(1, 2)

    q, k, v = split(attention.q_proj(q)), split(attention.k_proj(k)), split(attention.v_proj(v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, heads, Nq, Nk)
    logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    out = torch.softmax(logits, dim=-1) @ v
    batch, _, tokens, channels = out.shape
    return attention.out_proj(out.transpose(1, 2).reshape(batch, tokens, heads * channels))


def two_way_block(
    block: TwoWayAttentionBlock,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``block(queries, keys)`` without positional encodings (as the scorer builds it:
    ``skip_first_layer_pe=False``), with padded queries masked where they serve as keys.

    Args:
        block: the scorer's block.
        queries: ``(B, K, E)`` proposal tokens, padded.
        keys: ``(B, 1, E)`` the ``[SEG]`` token of each row.
        query_mask: ``(B, K)`` bool, True for real proposals, or ``None`` (no padding: the
            block's own forward runs).
    Returns:
        the updated ``(queries, keys)``.
    """
    if query_mask is None:
        no_position = queries.new_zeros(())
        return block(queries, keys, query_pe=no_position, key_pe=no_position)
    attended = masked_attention(block.self_attn, queries, queries, queries, query_mask)
    queries = block.norm1(queries + attended)
    queries = block.norm2(queries + block.cross_attn_token_to_image(q=queries, k=keys, v=keys))
    queries = block.norm3(queries + block.mlp(queries))
    attended = masked_attention(block.cross_attn_image_to_token, keys, queries, queries, query_mask)
    return queries, block.norm4(keys + attended)
