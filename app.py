"""A web page for an exported LLM-Seg / SegLLM: upload a picture, ask, see the mask.

Export a training run first (``python -m model.export``; the built-in demo writes
``OUT_DIR/export``), then::

    python app.py --model_dir demo_out/export                  # http://127.0.0.1:7860
    python app.py --model_dir exported/llmseg --sam_checkpoint sam_vit_h_4b8939.pth --precision bf16

The page: a picture (upload, or one of ``--examples``), a query, Run -> the picture with the mask
blended in, the mask as a PNG, the model's answer and the proposals it chose with their scores.
Every Run is a round of the visitor's conversation (kept per browser session in ``gr.State``,
never in module globals): the history gallery shows "round k"; a model exported with SegLLM parts
(``--mask_encoder``) can refer to earlier rounds, chosen in the reference list or written
``[REF:k]`` in the query, and each round reuses the session's image features and KV cache
(:class:`~model.multi_round_inference.MultiRoundSession`); a single-round model answers each
round on its own. A new picture starts a new conversation; Clear history starts over.

Inference runs through one queue (``--concurrency_limit``, default from the device: one round at
a time on the CPU), so visitors never race on the model. Bad input (not an image, an empty
query, a reference to a round that does not exist, references asked of a single-round model) is
a message on the page; a picture larger than ``--max_image_side`` is shrunk, and the page says
so. Binds 127.0.0.1 unless ``--host`` says otherwise; ``--share`` makes a public gradio link.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from model.evaluation import outline_masks, overlay
from model.inference import ProposalScore, Segmenter
from model.multi_round_inference import MultiRoundSession
from model.segmenter_config import SegmenterConfig, build_segmenter
from utils.cli import run_cli
from utils.data.conversation import VALIDATION_ANSWER
from utils.data.images import ImageReadError, load_rgb_image
from utils.data.references import REF_MARKER, format_reference, parse_references
from utils.logging_setup import setup_logging
from utils.masks import resize_longest_side

logger = logging.getLogger("app")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TABLE_HEADERS = ["proposal", "chosen", "cosine", "IoP", "area"]
TABLE_ROWS = 10  # the chosen proposals, then the best-scoring others
OUTLINE = (0, 255, 255)  # cyan: the mask stays visible on an object of the mask's own colour


@dataclass
class AppConfig(SegmenterConfig):
    """Serve a web page that segments pictures from text with an exported model."""

    proposals: str = field(
        default="auto",
        metadata={"help": "auto: sam with --sam_checkpoint, store with --proposal_store, else "
                  "weightfree (the demo's backend, meant for its synthetic pictures)",
                  "choices": ["auto", "sam", "sam_reference", "store", "weightfree"]},
    )  # fmt: skip
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0: all)"})
    port: int = field(default=7860, metadata={"help": "port (0: a free one)"})
    share: bool = field(default=False, metadata={"help": "also publish a gradio.live link"})
    examples: str = field(default="", metadata={"help": "folder of example pictures to offer"})
    max_image_side: int = field(default=1024, metadata={"help": "larger pictures are shrunk"})
    concurrency_limit: int = field(
        default=0, metadata={"help": "rounds run at once (0: 1 on the CPU, 2 on a GPU)"}
    )
    out_dir: str = field(default="", metadata={"help": "where masks are written (default: temp)"})


@dataclass
class ShownRound:
    """One answered round as the page shows it."""

    index: int
    query: str
    picture: np.ndarray  # (H, W, 3) uint8 overlay
    mask: np.ndarray  # (H, W) bool


@dataclass
class Conversation:
    """One visitor's conversation about one picture (the value of the page's ``gr.State``).

    ``session`` is the SegLLM conversation for a model with SegLLM parts, else None (each round
    is then answered on its own).
    """

    image: np.ndarray
    digest: str
    key: str
    session: MultiRoundSession | None
    rounds: list[ShownRound] = field(default_factory=list)


def resolve_proposals(config: AppConfig) -> tuple[AppConfig, str]:
    """``config`` with ``--proposals auto`` resolved, and a notice for the page (or "")."""
    if config.proposals != "auto":
        return config, ""
    if config.sam_checkpoint:
        config.proposals = "sam"
        return config, ""
    if config.proposal_store:
        config.proposals = "store"
        return config, "Proposals come from the prepared store: only its pictures work."
    config.proposals = "weightfree"
    return config, (
        "Proposals come from the weight-free demo backend (no --sam_checkpoint): good for the "
        "demo's synthetic pictures, not for photos."
    )


def default_concurrency(segmenter: Segmenter) -> int:
    """Rounds at once: 1 on the CPU (parallel rounds only slow each other), 2 on a GPU."""
    return 1 if segmenter.device.type == "cpu" else 2


def parse_colour(text: str) -> tuple[int, int, int]:
    """``#rrggbb`` or ``rgb(r, g, b)`` / ``rgba(...)`` from the colour picker; red otherwise."""
    text = (text or "").strip()
    try:
        if text.startswith("#") and len(text) == 7:
            return tuple(int(text[i : i + 2], 16) for i in (1, 3, 5))
        if text.startswith("rgb"):
            values = text[text.index("(") + 1 : text.index(")")].split(",")[:3]
            return tuple(int(float(v)) for v in values)
    except ValueError:
        pass
    return (255, 0, 0)


def read_picture(payload, max_side: int) -> tuple[np.ndarray, str, list[str]]:
    """``(image, name, notices)`` of the uploaded file; raises :class:`gr.Error` when it is
    missing or not a picture, shrinks one larger than ``max_side``."""
    if not payload:
        raise gr.Error("Upload a picture (or pick an example) first.")
    path = payload.get("path") if isinstance(payload, dict) else str(payload)
    name = (payload.get("orig_name") if isinstance(payload, dict) else None) or Path(path).name
    try:
        image = load_rgb_image(path)
    except ImageReadError:
        raise gr.Error(f"{name} is not a picture this page can read (PNG, JPEG ...).") from None
    notices = []
    if max(image.shape[:2]) > max_side:
        height, width = image.shape[:2]
        image = resize_longest_side(image, max_side)
        notices.append(
            f"The picture ({width}x{height}) was shrunk to {image.shape[1]}x{image.shape[0]}."
        )
    return image, name, notices


def named_rounds(query: str, chosen: list[str], index: int) -> tuple[str, list[int]]:
    """The query with the rounds picked in the list appended as ``[REF:k]``, and every round
    it names; raises :class:`gr.Error` for a round that is not an earlier one."""
    picked = sorted({int(label.split()[-1]) for label in chosen or []})
    written = [int(v) for m in REF_MARKER.finditer(query) for v in m.group(1).split(",")]
    missing = [k for k in picked if k not in written]
    if missing:
        query = f"{query} {format_reference(missing)}"
    try:
        parsed = parse_references(query, index) if REF_MARKER.search(query) else None
    except ValueError:
        bad = [k for k in written + picked if not 1 <= k < index]
        raise gr.Error(
            f"Round {bad[0] if bad else '?'} does not exist yet: round {index} can refer to "
            f"rounds 1..{index - 1}."
            if index > 1
            else "Round 1 cannot refer to earlier rounds."
        ) from None
    return query, list(parsed.references) if parsed else []


def proposal_rows(proposals: list[ProposalScore]) -> list[list]:
    """The table: chosen proposals first, then the best cosines, :data:`TABLE_ROWS` at most."""
    ordered = sorted(proposals, key=lambda p: (not p.selected, -p.cosine))[:TABLE_ROWS]
    return [
        [p.index, "yes" if p.selected else "", round(p.cosine, 3), round(p.iop, 3), p.area]
        for p in ordered
    ]


def answer_round(segmenter: Segmenter, conversation: Conversation, query: str):
    """Run one round; returns ``(mask, answer text, proposals, note)``."""
    if conversation.session is not None:
        result = conversation.session.ask(query)
        note = "" if result.mask.any() else "No proposal was chosen, so the mask is empty."
        return result.mask, VALIDATION_ANSWER, result.scores.proposals, note
    answer = segmenter(conversation.image, query, conversation.key)
    proposals = [p for round_ in answer.rounds for p in round_.proposals]
    return answer.mask, answer.answer, proposals, answer.note


class DemoApp:
    """The page's handlers around one loaded model (shared by every visitor, read-only)."""

    def __init__(self, segmenter: Segmenter, config: AppConfig, notice: str = "") -> None:
        self.segmenter, self.config, self.notice = segmenter, config, notice
        self.multi_round = (
            segmenter.model.mask_encoder is not None
            and segmenter.model.proposal_scorer is not None
            and segmenter.head == "proposals"
        )
        self.out_dir = Path(config.out_dir or tempfile.mkdtemp(prefix="llmseg_app_"))
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _conversation(self, image, name, state: Conversation | None, notices) -> Conversation:
        digest = hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest()
        if state is not None and state.digest == digest:
            return state
        if state is not None and state.rounds:
            notices.append("A new picture: the conversation starts over.")
        session = MultiRoundSession(self.segmenter, image, name) if self.multi_round else None
        return Conversation(image, digest, name, session)

    def run(self, payload, query, chosen, colour, state: Conversation | None):
        """Run's handler: one round; returns the page's outputs (see :meth:`outputs`)."""
        started = time.time()
        image, name, notices = read_picture(payload, self.config.max_image_side)
        query = (query or "").strip()
        if not query:
            raise gr.Error("Type a query first (e.g. 'the object you could roll down a slope').")
        conversation = self._conversation(image, name, state, notices)
        index = len(conversation.rounds) + 1
        if not self.multi_round and (chosen or REF_MARKER.search(query)):
            raise gr.Error(
                "This model has no SegLLM parts (mask encoder): it cannot refer to earlier "
                "rounds. Ask without [REF:k] and without picking rounds."
            )
        query, references = named_rounds(query, chosen, index)
        try:
            mask, answer, proposals, note = answer_round(self.segmenter, conversation, query)
        except (ValueError, KeyError) as error:  # the model's own checks, a store without it
            raise gr.Error(str(error)) from None
        picture = overlay(conversation.image, mask, parse_colour(colour), outline=OUTLINE)
        outline_masks(picture, [conversation.rounds[k - 1].mask for k in references])
        conversation.rounds.append(ShownRound(index, query, picture, mask))
        mask_file = self.out_dir / f"{conversation.digest[:12]}_round_{index}_mask.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_file)
        notices += [note] if note else []
        notices.append(f"Round {index} answered in {time.time() - started:.2f} s.")
        for notice in notices[:-1]:
            gr.Warning(notice)
        table = proposal_rows(proposals)
        return self.outputs(conversation, picture, str(mask_file), answer, table, notices)

    def clear(self, state: Conversation | None):
        """Clear history's handler: the picture stays, the rounds go."""
        if state is not None:
            state.rounds = []
            if state.session is not None:
                state.session.clear()
        return self.outputs(state, None, None, "", [], ["History cleared."])

    def outputs(self, conversation, picture, mask_file, answer, table, notices):
        rounds = conversation.rounds if conversation is not None else []
        gallery = [(r.picture, f"round {r.index}: {r.query}") for r in rounds]
        labels = [f"round {r.index}" for r in rounds] if self.multi_round else []
        status = "\n\n".join(notices)
        return (
            picture, mask_file, answer, table, gallery,
            gr.CheckboxGroup(choices=labels, value=[]), status, conversation,
        )  # fmt: skip

    def build(self) -> gr.Blocks:
        """The page."""
        limit = self.config.concurrency_limit or default_concurrency(self.segmenter)
        kind = "SegLLM (multi-round)" if self.multi_round else "LLM-Seg (single round)"
        with gr.Blocks(title="LLM-Seg demo") as page:
            gr.Markdown(f"## Reasoning segmentation\nModel: `{self.config.model_dir}` ({kind}). "
                        f"{self.notice}")  # fmt: skip
            state = gr.State(None, time_to_live=3600)
            with gr.Row():
                with gr.Column():
                    image = gr.Image(label="picture", type="filepath", elem_id="picture")
                    query = gr.Textbox(label="query", placeholder="the thing you would sit on",
                                       elem_id="query")  # fmt: skip
                    chooser = gr.CheckboxGroup(
                        label="refers to (earlier rounds; or write [REF:k] in the query)",
                        choices=[], visible=self.multi_round, elem_id="references",
                    )  # fmt: skip
                    colour = gr.ColorPicker(value="#ff0000", label="mask colour")
                    with gr.Row():
                        run = gr.Button("Run", variant="primary", elem_id="run")
                        clear = gr.Button("Clear history", elem_id="clear")
                    status = gr.Markdown(elem_id="status")
                with gr.Column():
                    shown = gr.Image(label="answer", format="png", elem_id="overlay",
                                     interactive=False)  # fmt: skip
                    answer = gr.Textbox(label="model answer", elem_id="answer")
                    mask = gr.File(label="mask (PNG)", elem_id="mask")
                    table = gr.Dataframe(headers=TABLE_HEADERS, label="proposals",
                                         interactive=False, elem_id="proposals")  # fmt: skip
            gallery = gr.Gallery(label="history", columns=4, format="png", elem_id="history",
                                 object_fit="contain", height=320)  # fmt: skip
            if self.config.examples:
                gr.Examples(examples=list_examples(self.config.examples), inputs=[image])
            outputs = [shown, mask, answer, table, gallery, chooser, status, state]
            inputs = [image, query, chooser, colour, state]
            queued = dict(concurrency_limit=limit, concurrency_id="model", preprocess=False)
            run.click(self.run, inputs, outputs, api_name="run", **queued)
            query.submit(self.run, inputs, outputs, api_name=False, **queued)
            clear.click(self.clear, [state], outputs, api_name="clear", queue=False)
        return page


def list_examples(folder: str) -> list[list[str]]:
    """The pictures of ``folder`` (at most 12), one example each."""
    pictures = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not pictures:
        raise ValueError(f"--examples {folder}: no pictures ({', '.join(IMAGE_SUFFIXES)})")
    return [[str(p)] for p in pictures[:12]]


def main(config: AppConfig, block: bool = True):
    """Load the model and serve the page.

    Args:
        config: the command line.
        block: wait until the server stops (False: return at once; tests).
    Returns:
        ``(page, url)``: the running :class:`gr.Blocks` and its local address.
    """
    setup_logging()
    started = time.time()
    config, notice = resolve_proposals(config)
    if config.examples:
        list_examples(config.examples)  # a bad folder fails before the model loads
    app = DemoApp(build_segmenter(config), config, notice)
    page = app.build()
    page.queue(default_concurrency_limit=1)
    _, url, _ = page.launch(
        server_name=config.host, server_port=config.port or None, share=config.share,
        allowed_paths=[str(app.out_dir)], prevent_thread_lock=True, quiet=True,
        show_error=True,
    )  # fmt: skip
    logger.info("serving %s at %s (ready in %.1f s)", config.model_dir, url, time.time() - started)
    if block:
        page.block_thread()
    return page, url


if __name__ == "__main__":
    run_cli(main, AppConfig, extra_errors=(KeyError, RuntimeError))
