"""LLM-Seg's three losses, computed in fp32 whatever the model's dtype.

* **LM cross-entropy** on the answer tokens (shifted, ``-100`` ignored).
* **Alignment** (RegionCLIP-style): per ``[SEG]`` round, ``KL(q || p)`` summed over the ``K``
  proposals, with ``p = softmax(cos / tau)`` (the scorer's cosines) and ``q = softmax(IoU / tau)``
  (the targets), ``tau = 0.05``. Upstream computes ``softmax(...).log()`` in bf16, which can give
  ``-inf``; here it is ``log_softmax`` in fp32.
* **IoP regression**: ``mean_k[(p - t)^2 * exp(t - 1)] * 50`` ("as if 50 proposals"): proposals
  that lie mostly inside the target weigh more.

Alignment and regression are averaged over rounds, then over images (see
:func:`model.llm_seg.LLMSegModel.forward`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LossConfig:
    """Loss weights and constants (upstream: ``--ce/align/regression_loss_weight``, all 1.0)."""

    ce_weight: float = 1.0
    align_weight: float = 1.0
    iop_weight: float = 1.0
    temperature: float = 0.05
    iop_scale: float = 50.0
    ref_weight: float = 0.5  # SegLLM: each <ref> state selects its referenced mask (auxiliary)
    bce_weight: float = 2.0  # LISA's SAM-head mask losses
    dice_weight: float = 0.5


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all supervised positions of the batch.

    Args:
        logits: ``(B, L, V)``.
        labels: ``(B, L)`` with ``IGNORE_INDEX`` where there is no loss.
    Returns:
        A scalar (fp32). With no supervised position at all it is an exact, graph-connected 0
        rather than ``0 / 0``.
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    if not (shifted_labels != IGNORE_INDEX).any():
        return shifted_logits.sum() * 0
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def alignment_loss(
    similarity: torch.Tensor, target_iou: torch.Tensor, temperature: float = 0.05
) -> torch.Tensor:
    """``KL(softmax(IoU / tau) || softmax(cos / tau))`` summed over proposals, mean over rounds.

    Args:
        similarity: ``(R, K)`` cosines in ``[-1, 1]``.
        target_iou: ``(R, K)`` IoU of every proposal with the round's target mask.
        temperature: ``tau``.
    Returns:
        A scalar (fp32), ``>= 0``; 0 for ``K = 1``.
    """
    if similarity.shape != target_iou.shape:
        raise ValueError(
            f"similarity {tuple(similarity.shape)} and IoU targets {tuple(target_iou.shape)} differ"
        )
    log_p = F.log_softmax(similarity.float() / temperature, dim=-1)
    log_q = F.log_softmax(target_iou.float() / temperature, dim=-1)
    per_round = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(dim=-1)
    return per_round.mean()


def iop_regression_loss(
    predicted_iop: torch.Tensor, target_iop: torch.Tensor, scale: float = 50.0
) -> torch.Tensor:
    """Weighted squared error ``mean((p - t)^2 * exp(t - 1)) * scale`` over all ``(R, K)``.

    Args:
        predicted_iop: ``(R, K)`` IoP-head outputs in ``[0, 1]``.
        target_iop: ``(R, K)`` ``|P ∩ G| / |P|`` targets.
        scale: upstream's 50.
    """
    if predicted_iop.shape != target_iop.shape:
        raise ValueError(
            f"IoP predictions {tuple(predicted_iop.shape)} and targets "
            f"{tuple(target_iop.shape)} differ"
        )
    target = target_iop.float()
    weights = torch.exp(target - 1)
    return ((predicted_iop.float() - target) ** 2 * weights).mean() * scale


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """LISA's mask BCE: per-mask mean binary cross-entropy of the logits, summed over masks.

    Args:
        logits: ``(R, H, W)`` mask logits.
        targets: ``(R, H, W)`` in {0, 1}.
    Returns:
        The *sum* over the ``R`` masks (fp32); the caller divides by the number of masks of the
        batch, as LISA does.
    """
    per_pixel = F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), reduction="none"
    )
    return per_pixel.flatten(1).mean(dim=1).sum()


def dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, scale: float = 1000.0, eps: float = 1e-6
) -> torch.Tensor:
    """LISA's mask Dice loss: ``1 - (2 Σ p t / s + eps) / (Σ p / s + Σ t / s + eps)`` per mask,
    ``p = sigmoid(logits)``, ``s`` the scale (1000), summed over masks (see
    :func:`sigmoid_bce_loss`)."""
    probabilities = logits.float().sigmoid().flatten(1) / scale
    targets = targets.float().flatten(1) / scale
    numerator = 2 * (probabilities * targets * scale).sum(dim=1)
    denominator = probabilities.sum(dim=1) + targets.sum(dim=1)
    return (1 - (numerator + eps) / (denominator + eps)).sum()
