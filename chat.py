"""Segment images from text with an exported LLM-Seg: one image, a folder, a jsonl, or a prompt.

Export a training run (``python -m model.export``) or convert the official checkpoint
(``python -m model.convert_llmseg_checkpoint``) first, then::

    # one image; proposals from SAM on the fly
    python chat.py --model_dir exported/llmseg --sam_checkpoint sam_vit_h_4b8939.pth \\
        --image photo.jpg --query "the thing you would sit on"
    # a folder (same query for every image) or a jsonl of {"image", "query"[, "id", "key"]}
    python chat.py --model_dir exported/llmseg --proposals store \\
        --proposal_store sam_masks/reason_seg/ReasonSeg/val --input pairs.jsonl
    # interactive: asks for an image path, then a query, until an empty line
    python chat.py --model_dir exported/llmseg --sam_checkpoint sam_vit_h_4b8939.pth
    # SegLLM conversation (a multi-round export): rounds about one image, [REF:k] names the
    # mask of round k; interactive ("clear history", "exit") or a jsonl of
    # {"image": ..., "rounds": ["segment the batter", "the helmet of instance 1 [REF:1]"]}
    python chat.py --model_dir exported/segllm --multi_round --input conversations.jsonl

Per query, ``--out_dir`` receives ``<name>_mask.png`` (0/255, the union of the ``[SEG]`` masks),
``<name>_overlay.png`` (the mask in red with the answer above it) and ``<name>.json`` (answer,
selected proposals, every proposal's cosine and IoP). Without a ``[SEG]`` in the answer the mask
is empty and both the answer and the JSON say why. Batch modes write ``summary.json`` listing
any inputs that failed (unreadable image, missing proposals) with the reason. With
``--multi_round`` every conversation writes ``<out_dir>/<image stem>/round_<k>_mask.png``,
``round_<k>_overlay.png`` (this round in red, the rounds it refers to outlined in yellow) and
``round_<k>.json``; each round reuses the image features and the KV cache of the earlier ones.
Files of these names are replaced only when an earlier ``chat.py`` run wrote them (its
``chat_config.json`` in ``--out_dir``) or with ``--overwrite``; the interactive modes, whose names
are not known in advance, ask the same of any non-empty ``--out_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from model.evaluation import enlarge_small, outline_masks, overlay
from model.inference import SegmentationAnswer, Segmenter
from model.multi_round_inference import MultiRoundSession, RoundResult
from model.segmenter_config import SegmenterConfig, build_segmenter
from utils.cli import run_cli
from utils.config import save_config
from utils.data.images import ImageReadError, load_rgb_image
from utils.logging_setup import setup_logging
from utils.outputs import refuse_to_replace

logger = logging.getLogger("chat")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Per-input problems that batch modes record and skip (anything else stops the run).
INPUT_ERRORS = (ImageReadError, KeyError, ValueError)


@dataclass
class ChatConfig(SegmenterConfig):
    """Segment images from text queries with an exported LLM-Seg."""

    image: str = field(default="", metadata={"help": "one image (with --query)"})
    query: str = field(default="", metadata={"help": "the query (for --image or a folder)"})
    input: str = field(default="", metadata={"help": "batch: a folder of images or a .jsonl"})
    out_dir: str = field(default="./chat_out", metadata={"help": "where results are written"})
    multi_round: bool = field(
        default=False,
        metadata={"help": "a conversation about one image (a model exported with --mask_encoder): "
                  "[REF:k] in a query names round k's mask; interactive, or --input a jsonl "
                  "of {\"image\", \"rounds\": [...]}"},
    )  # fmt: skip
    show_prompt: bool = field(
        default=False,
        metadata={"help": "print the exact text, tokens and ids the model reads (the image as "
                  "one -200) and write them into each query's JSON"},
    )  # fmt: skip
    overwrite: bool = field(
        default=False, metadata={"help": "replace files in --out_dir chat.py did not write"}
    )


@dataclass
class ChatItem:
    """One (image, query) to run; ``name`` prefixes its output files."""

    image: Path
    query: str
    name: str
    key: str


def list_inputs(config: ChatConfig) -> list[ChatItem]:
    """The items of ``--image`` or ``--input`` (folder + ``--query``, or a jsonl)."""
    if config.image:
        if not config.query:
            raise ValueError("--image needs --query")
        image = Path(config.image)
        return [ChatItem(image, config.query, image.stem, image.name)]
    source = Path(config.input)
    if source.is_dir():
        if not config.query:
            raise ValueError(f"--input {source} is a folder: give the query with --query")
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"--input {source}: no images ({', '.join(IMAGE_SUFFIXES)})")
        names = [p.stem for p in images]
        return [
            ChatItem(p, config.query, p.stem if names.count(p.stem) == 1 else p.name, p.name)
            for p in images
        ]
    if source.suffix == ".jsonl" and source.is_file():
        return _read_jsonl(source)
    raise FileNotFoundError(f"--input {source}: not a folder or an existing .jsonl file")


def _read_jsonl(path: Path) -> list[ChatItem]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, query = Path(record["image"]), str(record["query"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f'{path}:{number}: expected {{"image": ..., "query": ...}} ({error})'
            ) from None
        image = image if image.is_absolute() else path.parent / image
        name = str(record.get("id", f"{number:05d}_{image.stem}"))
        items.append(ChatItem(image, query, name, str(record.get("key", image.name))))
    if not items:
        raise ValueError(f"{path}: no (image, query) lines")
    return items


def _save_png(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def _captioned(image: np.ndarray, caption: str) -> np.ndarray:
    """``image`` below a white band holding ``caption`` (wrapped to the image width)."""
    scale = max(image.shape[1] / 800, 0.35)
    chars = max(int(image.shape[1] / (10 * scale)), 10)
    lines = [caption[i : i + chars] for i in range(0, min(len(caption), 4 * chars), chars)]
    line_height = int(22 * scale) + 4
    band = np.full((line_height * len(lines) + 6, image.shape[1], 3), 255, np.uint8)
    for row, text in enumerate(lines):
        origin = (4, line_height * (row + 1))
        cv2.putText(band, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, (0, 0, 0),
                    max(int(scale), 1), cv2.LINE_AA)  # fmt: skip
    return np.concatenate([band, image])


def write_answer(
    item: ChatItem,
    image: np.ndarray,
    answer: SegmentationAnswer,
    out_dir: Path,
    seconds: float,
    proposal_source: str,
    show_prompt: bool = False,
) -> dict:
    """Write the mask, overlay and JSON of one answer; return the JSON record.

    ``show_prompt`` adds ``prompt_text``, ``prompt_tokens`` and ``prompt_ids`` (the whole
    sequence the model read) to the JSON.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_file, overlay_file = f"{item.name}_mask.png", f"{item.name}_overlay.png"
    _save_png(answer.mask.astype(np.uint8) * 255, out_dir / mask_file)
    # Small pictures enlarged as the evaluator's are; a cyan outline stays visible on red objects.
    big, big_mask = enlarge_small(image, answer.mask)
    shown = overlay(big, big_mask, (255, 0, 0), outline=(0, 255, 255))
    caption = f"Q: {item.query} | A: {answer.answer}"
    _save_png(_captioned(shown, caption), out_dir / overlay_file)
    round_masks = []
    if len(answer.rounds) > 1:  # one file per [SEG] besides the union
        for index, round_ in enumerate(answer.rounds):
            round_masks.append(f"{item.name}_mask_{index}.png")
            _save_png(round_.mask.astype(np.uint8) * 255, out_dir / round_masks[-1])
    record = {
        "image": str(item.image),
        "query": item.query,
        "mode": answer.mode,
        "prompt": answer.prompt,
        "answer": answer.answer,
        "num_seg_tokens": len(answer.rounds),
        "note": answer.note,
        "image_size": list(image.shape[:2]),
        "mask_area": int(answer.mask.sum()),
        "proposal_source": proposal_source,
        "num_proposals": answer.num_proposals,
        "selection": answer.settings,
        "rounds": [
            {"selected": r.selected, "mask_area": int(r.mask.sum()),
             "mask": round_masks[i] if round_masks else mask_file,
             "proposals": [asdict(p) for p in r.proposals]}
            for i, r in enumerate(answer.rounds)
        ],
        "mask": mask_file,
        "overlay": overlay_file,
        "seconds": round(seconds, 3),
    }  # fmt: skip
    if show_prompt:
        record["prompt_text"] = answer.prompt_text
        record["prompt_tokens"] = answer.prompt_tokens
        record["prompt_ids"] = answer.prompt_ids
    tmp = out_dir / f"{item.name}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out_dir / f"{item.name}.json")
    return record


def format_prompt(answer: SegmentationAnswer) -> str:
    """The text, tokens and ids the model read, for the terminal (``--show_prompt``)."""
    pairs = " ".join(f"{token}({token_id})" for token, token_id in
                     zip(answer.prompt_tokens, answer.prompt_ids))  # fmt: skip
    tokenization = answer.settings.get("tokenization", "")
    return (
        f"prompt text ({tokenization}): {answer.prompt_text!r}\n"
        f"prompt tokens ({len(answer.prompt_ids)}): {pairs}\n"
    )


def _source_name(segmenter: Segmenter) -> str:
    return segmenter.proposals.name if segmenter.proposals is not None else "none (SAM head)"


def run_item(segmenter: Segmenter, item: ChatItem, out_dir: Path, show_prompt=False) -> dict:
    """Segment one item and write its files."""
    started = time.time()
    image = load_rgb_image(item.image)
    answer = segmenter(image, item.query, item.key)
    elapsed = time.time() - started
    if show_prompt:
        sys.stdout.write(format_prompt(answer))
    return write_answer(item, image, answer, out_dir, elapsed, _source_name(segmenter), show_prompt)


def run_batch(segmenter: Segmenter, items: list[ChatItem], out_dir: Path, show_prompt=False):
    """Every item, with a progress bar; failures are recorded in ``summary.json`` and skipped."""
    done, failed = [], []
    for item in tqdm(items, desc="chat", unit="query"):
        try:
            done.append(run_item(segmenter, item, out_dir, show_prompt)["mask"])
        except INPUT_ERRORS as error:
            logger.error("%s: %s", item.image, error)
            failed.append({"image": str(item.image), "query": item.query, "error": str(error)})
    summary = {"written": len(done), "failed": failed}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if failed:
        logger.warning("%d of %d inputs failed; see %s", len(failed), len(items), out_dir)
    return summary


def interactive(segmenter: Segmenter, out_dir: Path, show_prompt: bool = False) -> list[dict]:
    """Ask for an image path and a query until an empty line (or end of input)."""
    records, count = [], 0
    while True:
        try:
            path = input("Image path (empty line to quit): ").strip()
            if not path:
                break
            query = input("Query: ").strip()
        except EOFError:
            break
        count += 1
        item = ChatItem(Path(path), query, f"{count:03d}_{Path(path).stem}", Path(path).name)
        try:
            record = run_item(segmenter, item, out_dir, show_prompt)
        except INPUT_ERRORS as error:
            sys.stdout.write(f"error: {error}\n")
            continue
        records.append(record)
        sys.stdout.write(f"Answer: {record['answer']}\nMask: {out_dir / record['mask']}\n")
    return records


def write_round(out_dir: Path, image: np.ndarray, result: RoundResult, rounds: list) -> dict:
    """Write one round's mask, overlay and JSON into ``out_dir``; return the JSON record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"round_{result.index}"
    _save_png(result.mask.astype(np.uint8) * 255, out_dir / f"{stem}_mask.png")
    # As write_answer: small pictures enlarged, a cyan outline visible on red objects.
    big, big_mask, *references = enlarge_small(
        image, result.mask, *[rounds[k - 1].mask for k in result.references]
    )
    shown = overlay(big, big_mask, (255, 0, 0), outline=(0, 255, 255))
    outline_masks(shown, references)
    _save_png(
        _captioned(shown, f"round {result.index}: {result.query}"), out_dir / f"{stem}_overlay.png"
    )
    record = {
        "round": result.index,
        "query": result.query,
        "references": list(result.references),
        "mask": f"{stem}_mask.png",
        "overlay": f"{stem}_overlay.png",
        "mask_area": int(result.mask.sum()),
        "box": result.box,
        "selected": result.scores.selected,
        "proposals": [asdict(p) for p in result.scores.proposals],
        "cached_tokens": result.cached_tokens,
    }
    tmp = out_dir / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out_dir / f"{stem}.json")
    return record


def run_conversation(segmenter: Segmenter, image_path: Path, queries: list[str], out_dir: Path,
                     key: str = "") -> list[dict]:  # fmt: skip
    """Every round of one conversation about ``image_path``, written to ``out_dir/<stem>/``."""
    image = load_rgb_image(image_path)
    session = MultiRoundSession(segmenter, image, key or image_path.name)
    folder = out_dir / image_path.stem
    return [write_round(folder, image, session.ask(q), session.rounds) for q in queries]


def read_conversations(path: Path) -> list[tuple[Path, list[str], str]]:
    """``(image, rounds, key)`` per line of a jsonl of ``{"image", "rounds"[, "key"]}``."""
    conversations = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, rounds = Path(record["image"]), [str(q) for q in record["rounds"]]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f'{path}:{number}: expected {{"image": ..., "rounds": [...]}} ({error})'
            ) from None
        if not rounds:
            raise ValueError(f"{path}:{number}: 'rounds' is empty")
        image = image if image.is_absolute() else path.parent / image
        conversations.append((image, rounds, str(record.get("key", image.name))))
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return conversations


def interactive_multi_round(segmenter: Segmenter, out_dir: Path, image_path: str = "") -> int:
    """Ask for an image, then one query per round; ``clear history`` starts over, ``exit``
    (or an empty line) asks for a new image. Returns how many rounds were answered."""
    answered = 0
    while True:
        try:
            path = image_path or input("Image path (empty line to quit): ").strip()
        except EOFError:
            return answered
        if not path:
            return answered
        image_path = ""
        try:
            image = load_rgb_image(Path(path))
        except ImageReadError as error:
            sys.stdout.write(f"error: {error}\n")
            continue
        session = MultiRoundSession(segmenter, image, Path(path).name)
        while True:
            try:
                query = input(f"Round {len(session.rounds) + 1} ([REF:k] names round k): ").strip()
            except EOFError:
                return answered
            if query in ("", "exit"):
                break
            if query == "clear history":
                session.clear()
                sys.stdout.write("history cleared\n")
                continue
            try:
                result = session.ask(query)
            except INPUT_ERRORS as error:
                sys.stdout.write(f"error: {error}\n")
                continue
            record = write_round(out_dir / Path(path).stem, image, result, session.rounds)
            answered += 1
            sys.stdout.write(f"Mask: {out_dir / Path(path).stem / record['mask']}\n")


def check_out_dir(config: ChatConfig, names: list[str] | None) -> None:
    """Stop before the model is built if ``--out_dir`` holds files of the ``names`` this run
    writes (``None``: not known in advance, so any file) that an earlier chat.py did not write."""
    out_dir = Path(config.out_dir)
    if names is None:
        paths = sorted(out_dir.iterdir()) if out_dir.is_dir() else [out_dir]
    else:
        paths = [out_dir / name for name in ("chat_config.json", *names)]
    refuse_to_replace(
        paths, config.overwrite, "chat.py", "--out_dir", out_dir / "chat_config.json", ChatConfig
    )


def _output_names(items: list[ChatItem], batch: bool) -> list[str]:
    suffixes = (".json", "_mask.png", "_overlay.png")
    names = [f"{item.name}{suffix}" for item in items for suffix in suffixes]
    return [*names, "summary.json"] if batch else names


def main(config: ChatConfig, segmenter: Segmenter | None = None):
    """Run ``config``: one image, a batch, or the interactive prompt.

    Args:
        config: the command line.
        segmenter: an already built one (tests; default: :func:`build_segmenter`).
    Returns:
        the JSON record (one image), the summary (batch) or the records (interactive).
    """
    setup_logging()
    if config.image and config.input:
        raise ValueError("give --image or --input, not both")
    if config.multi_round:
        return _main_multi_round(config, segmenter)
    items = list_inputs(config) if (config.image or config.input) else None
    check_out_dir(config, None if items is None else _output_names(items, not config.image))
    segmenter = segmenter or build_segmenter(config)  # fails before anything is written
    out_dir = Path(config.out_dir)
    save_config(config, out_dir / "chat_config.json")
    if items is None:
        return interactive(segmenter, out_dir, config.show_prompt)
    if config.image:
        return run_item(segmenter, items[0], out_dir, config.show_prompt)
    return run_batch(segmenter, items, out_dir, config.show_prompt)


def _main_multi_round(config: ChatConfig, segmenter: Segmenter | None):
    conversations = read_conversations(Path(config.input)) if config.input else None
    folders = None if conversations is None else [image.stem for image, *_ in conversations]
    check_out_dir(config, folders)
    segmenter = segmenter or build_segmenter(config)
    if segmenter.model.mask_encoder is None:
        raise ValueError(
            f"--multi_round needs a model exported with SegLLM parts: {config.model_dir}"
        )
    out_dir = Path(config.out_dir)
    save_config(config, out_dir / "chat_config.json")
    if conversations is None:
        return interactive_multi_round(segmenter, out_dir, config.image)
    return [run_conversation(segmenter, *c[:2], out_dir, c[2]) for c in tqdm(conversations)]


if __name__ == "__main__":
    run_cli(main, ChatConfig, extra_errors=(KeyError, RuntimeError))
