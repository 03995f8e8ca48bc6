"""Benchmark: the cost of round k of a multi-round session, with the KV cache and without it.

A :class:`~model.multi_round_inference.MultiRoundSession` with ``use_cache=True`` runs only the
new round's tokens; with ``use_cache=False`` it re-runs the whole conversation every round (what
SegLLM's demos do). The model is a randomly initialised one of a chosen size, written in the real
on-disk layouts (no weights are downloaded): LLaMA ``--hidden`` wide and ``--layers`` deep, CLIP at
224 px with 14-px patches (256 image tokens, as LLaVA), a multi-round (``pooled`` mask encoder)
export; the image is synthetic with a store of box proposals. Timing does not depend on the
weight values.

For each mode the table gives the median seconds of every round over ``--repeats`` sessions;
the last line reads ``ratio_cached=<round R / round 1> ratio_full=<round R / round 1>``: the
cached ratio should stay near 1 (the issue's target: <= 1.5 at round 6) while the full
re-forward grows with the history.

    python benchmarks/bench_multi_round.py --rounds 6 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.builder import build_llm_seg, tiny_llm_seg_config  # noqa: E402
from model.export import load_exported, save_export  # noqa: E402
from model.export_manifest import ExportManifest, describe_model
from model.inference import InferenceSettings, Segmenter, StoreProposals  # noqa: E402
from model.multi_round_inference import MultiRoundSession  # noqa: E402
from model.tiny import TinySizes, write_tiny_checkpoints  # noqa: E402
from utils.masks import encode_rles  # noqa: E402
from utils.proposal_store import H5StoreWriter, ImageProposals  # noqa: E402

QUERIES = [
    "the red box on the left of the picture",
    "Segment the box right of instance 1 [REF:1].",
    "The box under instance 2 [REF:2].",
    "The one between instance 1 [REF:1] and instance 3 [REF:3].",
    "Segment the box above instance 4 [REF:4].",
    "And the largest box that does not touch instance 5 [REF:5].",
    "The box like instance 1 [REF:1] but smaller.",
    "Segment instance 2 [REF:2] again.",
]


def write_scene(root: Path, size: int = 320) -> tuple[Path, Path]:
    """A synthetic picture with 12 boxes and a store holding them as proposals."""
    rng = np.random.default_rng(0)
    pixels = np.full((size, size, 3), 90, np.uint8)
    masks = []
    for _ in range(12):
        x0, y0 = rng.integers(0, size - 60, 2)
        w, h = rng.integers(20, 60, 2)
        mask = np.zeros((size, size), bool)
        mask[y0 : y0 + h, x0 : x0 + w] = True
        pixels[mask] = rng.integers(0, 255, 3)
        masks.append(mask)
    Image.fromarray(pixels).save(root / "scene.png")
    stack = np.stack(masks)
    count = len(masks)
    proposals = ImageProposals(
        height=size, width=size, rle_counts=encode_rles(stack), area=stack.sum((1, 2)),
        bbox=np.zeros((count, 4)), predicted_iou=np.ones(count), stability_score=np.ones(count),
        point_coords=np.zeros((count, 2)),
    )  # fmt: skip
    with H5StoreWriter(root / "store" / "masks.h5") as writer:
        writer.add("scene.png", proposals)
    return root / "scene.png", root / "store"


def build_export(root: Path, hidden: int, layers: int) -> Path:
    sizes = TinySizes(
        text_hidden=hidden, text_layers=layers, text_heads=max(hidden // 64, 1),
        text_intermediate=hidden * 3, clip_image_size=224, clip_patch_size=14,
    )  # fmt: skip
    checkpoints = write_tiny_checkpoints(root / "checkpoints", sizes=sizes)
    config = tiny_llm_seg_config(checkpoints, mask_encoder="pooled", scorer_mlp_dim=64)
    model, tokenizer = build_llm_seg(config)
    manifest = ExportManifest("merged", config, describe_model(model, tokenizer))
    return save_export(model, tokenizer, manifest, root / "export")


def run(export: Path, image: Path, store: Path, rounds: int, use_cache: bool) -> list[float]:
    segmenter = Segmenter(
        load_exported(export), StoreProposals(store), InferenceSettings(strategy="argmax")
    )
    pixels = np.asarray(Image.open(image).convert("RGB"))
    session = MultiRoundSession(segmenter, pixels, image.name, use_cache=use_cache)
    session.ask(QUERIES[0])  # warm-up: the image features are computed in round 1 only once
    session.clear()
    seconds = []
    for query in QUERIES[:rounds]:
        started = time.perf_counter()
        session.ask(query)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512, help="LLaMA width")
    parser.add_argument("--layers", type=int, default=8, help="LLaMA depth")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if not 2 <= args.rounds <= len(QUERIES):
        parser.error(f"--rounds must be in 2..{len(QUERIES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        image, store = write_scene(root)
        export = build_export(root, args.hidden, args.layers)
        table = {}
        for mode, use_cache in (("cached", True), ("full", False)):
            runs = [run(export, image, store, args.rounds, use_cache) for _ in range(args.repeats)]
            table[mode] = [statistics.median(r[k] for r in runs) for k in range(args.rounds)]
    print(f"LLaMA {args.hidden} x {args.layers}, 256 image tokens, median of {args.repeats}")
    print("round  " + "  ".join(f"{k + 1:>7d}" for k in range(args.rounds)))
    for mode, seconds in table.items():
        print(f"{mode:<6} " + "  ".join(f"{s:7.3f}" for s in seconds))
    ratios = {mode: seconds[-1] / seconds[0] for mode, seconds in table.items()}
    print(f"ratio_cached={ratios['cached']:.2f} ratio_full={ratios['full']:.2f}")


if __name__ == "__main__":
    main()
