"""Visual question answering (LLaVA-Instruct-150k), mixed in as LISA does: text answers only.

File: ``<dataset_dir>/llava_dataset/<--vqa_data>.json``, a list of
``{"image": "000000123.jpg", "conversations": [{"from": "human"|"gpt", "value": str}, ...]}``
with images in ``<dataset_dir>/coco/train2017/``. Each sample is one whole dialogue rendered in
the active conversation template: the ``<image>`` token is moved to the start of the first
question (as LLaVA's ``preprocess_multimodal``), a leading assistant message and a trailing
unanswered question are dropped. There is no ``[SEG]``, so records carry no masks and no
proposals, and the model gives these rows only the language-model loss (upstream's VQA rows
crash its mask loss instead). A dialogue longer than ``--model_max_length`` is cut at the last
turn boundary that fits (never inside an answer) and dropped only when its first turn alone is
too long (:class:`~utils.data.samples.SampleEncoder`). At start-up
:meth:`VQASource.report_lengths` logs which share of the dialogues is kept whole, cut or dropped
(on a fixed sample of up to 1000 for the 150k set).

Behaviour on bad input: a missing or malformed json (not a list, an entry without ``image`` or
``conversations``, roles that do not alternate, a ``[SEG]`` in the text) stops the run when the
dataset is built, naming the file and the entry. Entries whose image file is missing are skipped
and counted in one warning.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from utils.annotations import load_json
from utils.data.conversation import SequenceTooLong
from utils.data.dataset_files import keep_available
from utils.data.samples import SegmentationRecord
from utils.text_files import DatasetFormatError
from utils.tokenizer import IMAGE_TOKEN, SEG_TOKEN

logger = logging.getLogger(__name__)

ROLES = ("human", "gpt")
REPORT_SAMPLE_SIZE = 1000


@dataclass
class VQAItem:
    """One dialogue about one image: ``turns`` are ``(question, answer)`` pairs, the first
    question starting with ``<image>\\n``."""

    image_path: Path
    turns: list[tuple[str, str]]


def vqa_turns(messages: list, source: str) -> list[tuple[str, str]]:
    """``(question, answer)`` pairs of a LLaVA ``conversations`` list (see the module doc).

    Raises:
        DatasetFormatError: malformed messages, non-alternating roles, no complete turn, or a
            ``[SEG]`` token in the text (``source`` names the file and entry).
    """
    if not isinstance(messages, list):
        raise DatasetFormatError(f"{source}: 'conversations' must be a list")
    texts, roles = [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            raise DatasetFormatError(f"{source}: conversations[{index}] needs a string 'value'")
        if message.get("from") not in ROLES:
            raise DatasetFormatError(
                f"{source}: conversations[{index}] 'from' is {message.get('from')!r}, "
                f"expected one of {ROLES}"
            )
        if SEG_TOKEN in message["value"]:
            raise DatasetFormatError(f"{source}: conversations[{index}] contains {SEG_TOKEN}")
        texts.append(message["value"].replace(IMAGE_TOKEN, "").strip())
        roles.append(message["from"])
    start = 1 if roles and roles[0] == "gpt" else 0  # upstream skips a leading assistant turn
    texts, roles = texts[start:], roles[start:]
    for index, role in enumerate(roles):
        if role != ROLES[index % 2]:
            raise DatasetFormatError(
                f"{source}: roles must alternate human/gpt; message {index + start} is {role!r}"
            )
    turns = list(zip(texts[0::2], texts[1::2]))
    if not turns:
        raise DatasetFormatError(f"{source}: no question with an answer")
    turns[0] = (f"{IMAGE_TOKEN}\n{turns[0][0]}", turns[0][1])
    return turns


def load_vqa(dataset_dir: str | Path, name: str = "llava_instruct_150k") -> list[VQAItem]:
    """Parse and validate ``llava_dataset/<name>.json``; entries without an image are skipped."""
    path = Path(dataset_dir) / "llava_dataset" / f"{name}.json"
    data = load_json(path, "VQA conversations")
    if not isinstance(data, list):
        raise DatasetFormatError(f"{path}: expected a json list, found {type(data).__name__}")
    image_dir = Path(dataset_dir) / "coco" / "train2017"
    items = []
    for index, entry in enumerate(data):
        source = f"{path} entry {index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise DatasetFormatError(f"{source}: needs a string 'image'")
        turns = vqa_turns(entry.get("conversations"), source)
        items.append(VQAItem(image_dir / entry["image"], turns))
    items = keep_available(items, name, lambda i: i.image_path, None)
    logger.info("%s: %d dialogues", name, len(items))
    return items


def vqa_record(item: VQAItem, dataset: str = "llava_instruct_150k") -> SegmentationRecord:
    """The dialogue as one conversation; no masks, no proposals."""
    return SegmentationRecord(
        image_path=item.image_path,
        conversations=[list(item.turns)],
        masks=None,
        proposals=None,
        proposal_key="",
        name=item.image_path.stem,
        dataset=dataset,
        queries=[item.turns[0][0].replace(IMAGE_TOKEN, "").strip()],
    )


class VQASource:
    """Training source: a random dialogue."""

    name = "vqa"

    def __init__(self, items: list[VQAItem], dataset: str = "llava_instruct_150k"):
        if not items:
            raise ValueError("vqa training source has no dialogues")
        self.items = items
        self.dataset = dataset

    def sample_record(self, rng: random.Random) -> SegmentationRecord:
        return vqa_record(self.items[rng.randrange(len(self.items))], self.dataset)

    def report_lengths(self, encoder, sample_size: int = REPORT_SAMPLE_SIZE) -> dict[str, int]:
        """Tokenise up to ``sample_size`` dialogues (a fixed sample) with ``encoder`` and log how
        many fit whole, are cut at a turn boundary, or are dropped (first turn too long).

        Returns:
            ``{"checked", "whole", "truncated", "dropped"}`` counts.
        """
        items = self.items
        if len(items) > sample_size:
            items = random.Random(0).sample(items, sample_size)
        counts = {"checked": len(items), "whole": 0, "truncated": 0, "dropped": 0}
        for item in items:
            try:
                encoded = encoder.encode_text_dialogue(item.turns)
            except SequenceTooLong:
                counts["dropped"] += 1
                continue
            counts["whole" if encoded.num_turns == len(item.turns) else "truncated"] += 1
        checked = max(counts["checked"], 1)
        logger.info(
            "%s: of %d dialogues%s, %.1f%% fit --model_max_length whole, %.1f%% are cut at a "
            "turn boundary, %.1f%% are dropped (first turn too long)",
            self.dataset, counts["checked"],
            f" (a sample of {len(self.items)})" if len(items) < len(self.items) else "",
            100 * counts["whole"] / checked, 100 * counts["truncated"] / checked,
            100 * counts["dropped"] / checked,
        )  # fmt: skip
        return counts
