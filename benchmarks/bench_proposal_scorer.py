"""Benchmark: one training step of the proposal scorer, image by image vs batched.

"per image" is the scorer as upstream runs it: the projected DINOv2 grid bilinearly upsampled
to the proposal map size, mask-average pooling there, and one pass of the selection transformer
per image. "batched" is :class:`~model.heads.proposal_scorer.ProposalScorer` as the model runs
it: pooling on the feature grid (:meth:`~model.heads.proposal_scorer.ProposalScorer.pool`) and
one padded pass for every image (:meth:`~model.heads.proposal_scorer.ProposalScorer.score_many`).
Both compute the same scores; the table gives the median seconds of forward + backward over
``--repeats`` runs for the paper's sizes and the built-in demo's, and the ratio.

    python benchmarks/bench_proposal_scorer.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.heads.proposal_scorer import ProposalScorer, ProposalScorerConfig  # noqa: E402

SIZES = {
    "paper (E 256, M 256, G 16)": ProposalScorerConfig(),
    "demo (E 64, M 64, G 16)": ProposalScorerConfig(
        feature_dim=32,
        embed_dim=64,
        num_heads=4,
        mlp_dim=128,
        map_size=64,
        geometry_embedding=True,
    ),  # fmt: skip
}


def inputs(config: ProposalScorerConfig, images: int, rounds: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(images, config.feature_dim, 16, 16, generator=generator)
    size = config.map_size
    masks = [
        (torch.rand(k, size, size, generator=generator) > 0.7).float()
        for k in torch.randint(15, 51, (images,), generator=generator).tolist()
    ]
    segs = [torch.randn(rounds, config.embed_dim, generator=generator) for _ in range(images)]
    return features, masks, segs


def per_image(scorer: ProposalScorer, features, masks, segs) -> torch.Tensor:
    projected = scorer.feature_proj(features)
    size = (scorer.config.map_size,) * 2
    upsampled = F.interpolate(projected, size=size, mode="bilinear", align_corners=False)
    total = projected.new_zeros(())
    for feature_map, image_masks, image_segs in zip(upsampled, masks, segs):
        weights = image_masks.flatten(1)
        pooled = weights @ feature_map.flatten(1).T
        pooled = pooled / (weights.sum(dim=1, keepdim=True) + scorer.config.pool_eps)
        if scorer.geometry_embedding is not None:
            pooled = pooled + scorer.geometry_embedding(image_masks)
        scores = scorer.score(pooled, image_segs)
        total = total + scores.similarity.sum() + scores.iop.sum()
    return total


def batched(scorer: ProposalScorer, features, masks, segs) -> torch.Tensor:
    prepared, _ = scorer.prepare(scorer.project_features(features), masks)
    scores = scorer.score_many(prepared, segs)
    return sum(s.similarity.sum() + s.iop.sum() for s in scores)


def timed(step, scorer, data, repeats: int) -> float:
    seconds = []
    for _ in range(repeats + 1):  # the first run warms up
        scorer.zero_grad()
        started = time.perf_counter()
        step(scorer, *data).backward()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="[SEG] tokens per image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.images} images, {args.rounds} rounds each, 15-50 proposals, median of "
          f"{args.repeats}, forward + backward")  # fmt: skip
    print(f"{'sizes':<28} {'per image':>10} {'batched':>10} {'speed-up':>9} {'max |diff|':>11}")
    for name, config in SIZES.items():
        torch.manual_seed(0)
        scorer = ProposalScorer(config)
        data = inputs(config, args.images, args.rounds)
        with torch.no_grad():
            difference = (per_image(scorer, *data) - batched(scorer, *data)).abs().item()
        slow = timed(per_image, scorer, data, args.repeats)
        fast = timed(batched, scorer, data, args.repeats)
        print(f"{name:<28} {slow:10.3f} {fast:10.3f} {slow / fast:8.1f}x {difference:11.2e}")


if __name__ == "__main__":
    main()
