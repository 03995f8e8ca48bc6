"""Benchmark: seconds per sample of ``eval.py --mode free`` against teacher-forced evaluation.

The model is the built-in demo's (:func:`model.presets.demo_llm_seg_config`: LLaMA 2 x 128 with
LoRA, tiny CLIP, DINOv2 at 224, 64 x 64 proposal maps, geometry embedding), randomly
initialised in-process and written in the real layouts (nothing is downloaded); the data is the
demo's: a synthetic ReasonSeg val split of 128-px pictures with weight-free proposals, made by
the demo's own prepare scripts. Timing does not depend on the weight values, only on how long
the answers are, so the answers are scripted (a logits processor forces each one): ``[SEG].``,
the teacher's answer, ``Sure, the segmentation result is [SEG].``, the longest answer of the
training templates, and the worst case: an answer cut at ``max_new_tokens`` (32), its
``[SEG]`` last.

Both modes run the whole evaluation loop (reading and encoding every sample, the model, mask
selection, metrics, ``metrics.json`` and the CSV). Teacher-forced evaluation scores one sample
per forward whatever the batch (:func:`model.evaluation.evaluate` has no batch size); free
evaluation writes ``--batch_sizes`` answers per forward. The table gives the median over
``--repeats`` runs after a warm-up, the two modes alternating, and the median of ``free / tf``
over those pairs: the issue's target is at most 2.

    python benchmarks/bench_free_eval.py --samples 32 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval as eval_script  # noqa: E402
from model.builder import LLMSegConfig, build_llm_seg, setup_trainable  # noqa: E402
from model.evaluation import SelectionSettings, evaluate  # noqa: E402
from model.free_evaluation import GenerationSettings, evaluate_free  # noqa: E402
from model.presets import demo_llm_seg_config, read_query_texts, write_demo_checkpoints  # noqa: E402
from prepare_datasets import prepare_reason_seg, prepare_synthetic  # noqa: E402
from utils.data.builders import build_encoder, build_eval_dataset  # noqa: E402

ANSWERS = ("[SEG].", "Sure, the segmentation result is [SEG].", "Sure, it is ... [SEG].")
MAX_NEW_TOKENS = 32
CPU = torch.device("cpu")


class Script(LogitsProcessor):
    """Forces every row to write ``ids``, then ``</s>`` (a trained model's answer)."""

    def __init__(self, ids: list[int], eos: int) -> None:
        self.ids, self.eos = list(ids), eos

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1]
        out = torch.full_like(scores, -torch.inf)
        out[:, self.ids[step] if step < len(self.ids) else self.eos] = 0
        return out


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The ids of ``answer``; ``...`` repeats the words before it until the answer fills
    :data:`MAX_NEW_TOKENS` (no room left for ``</s>``)."""
    if "..." not in answer:
        return tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    head, tail = (tokenizer(" " + part.strip(), add_special_tokens=False)["input_ids"]
                  for part in answer.split("..."))  # fmt: skip
    room = MAX_NEW_TOKENS - len(tail)
    return (head * room)[:room] + tail


def build(root: Path, samples: int):
    """The demo's val split (``samples`` pictures with proposals), model and dataset."""
    dataset_dir, masks_dir = root / "dataset", root / "sam_masks"
    prepare_synthetic.main(prepare_synthetic.SyntheticConfig(
        out_dir=str(dataset_dir), num_train=0, num_val=samples, num_test=0, image_size=128,
        progress=False,
    ))  # fmt: skip
    prepare_reason_seg.main(prepare_reason_seg.ReasonSegPrepareConfig(
        dataset_dir=str(dataset_dir), sam_masks_dir=str(masks_dir), backend="weightfree",
        splits="val", fsync=False,
    ))  # fmt: skip
    checkpoints = write_demo_checkpoints(root / "checkpoints", read_query_texts(dataset_dir, "val"))
    config = demo_llm_seg_config(checkpoints)
    model, tokenizer = build_llm_seg(config, CPU, torch.float32)
    setup_trainable(model, config)  # LoRA wrappers, as eval.py --checkpoint evaluates them
    data = eval_script.EvalConfig(
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(LLMSegConfig)},
        dataset_dir=str(dataset_dir), sam_masks_dir=str(masks_dir),
    )  # fmt: skip
    encoder = build_encoder(data, tokenizer, model.num_image_tokens)
    return model.eval(), tokenizer, build_eval_dataset(data, encoder, "ReasonSeg|val")


def paired(forced, free, repeats: int) -> tuple[float, float, float]:
    """``(teacher-forced s, free s, median of free / tf)``: the two runs alternate after a
    warm-up of each, so a machine whose speed drifts affects both alike."""
    forced(), free()
    times, ratios = {"forced": [], "free": []}, []
    for _ in range(repeats):
        pair = []
        for name, run in (("forced", forced), ("free", free)):
            started = time.perf_counter()
            run()
            pair.append(time.perf_counter() - started)
            times[name].append(pair[-1])
        ratios.append(pair[1] / pair[0])
    return (
        statistics.median(times["forced"]),
        statistics.median(times["free"]),
        (statistics.median(ratios)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=32, help="val pictures evaluated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_sizes", default="1,8", help="free mode: answers per forward")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo's 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    selection = SelectionSettings("argmax")  # the demo's
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model, tokenizer, dataset = build(root, args.samples)
        forced = functools.partial(
            evaluate, model, dataset, selection, CPU, torch.float32, tokenizer.pad_token_id,
            root / "tf",
        )  # fmt: skip
        for answer in ANSWERS:
            ids = answer_ids(tokenizer, answer)
            script = [Script(ids, tokenizer.eos_token_id)]
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                free = functools.partial(
                    evaluate_free, model, dataset, tokenizer, selection, CPU, torch.float32,
                    root / "free", GenerationSettings(MAX_NEW_TOKENS, batch_size),
                    logits_processor=script,
                )  # fmt: skip
                seconds = paired(forced, free, args.repeats)
                tokens = min(len(ids) + 1, MAX_NEW_TOKENS)  # + </s>, unless cut
                rows.append((answer, tokens, batch_size, *seconds))
    print(f"demo model, {args.samples} val samples, {args.threads} thread(s), "
          f"median of {args.repeats}; teacher-forced: one sample per forward")  # fmt: skip
    print(f"{'answer':<42}{'tokens':>7}{'batch':>7}{'tf s/sample':>13}{'free s/sample':>15}"
          f"{'free / tf':>11}")  # fmt: skip
    for answer, tokens, batch_size, forced_s, free_s, ratio in rows:
        print(f"{answer:<42}{tokens:>7}{batch_size:>7}{forced_s / args.samples:>13.4f}"
              f"{free_s / args.samples:>15.4f}{ratio:>11.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
