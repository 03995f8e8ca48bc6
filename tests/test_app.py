"""app.py served on 127.0.0.1 with tiny exports, driven through its API with gradio_client."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import app  # noqa: E402
from model.builder import build_llm_seg, setup_trainable, tiny_llm_seg_config  # noqa: E402
from model.export import save_export  # noqa: E402
from model.export_manifest import ExportManifest, describe_model  # noqa: E402


def write_export(tiny_checkpoints, folder: Path, **options) -> Path:
    """A tiny merged export whose LoRA / SegLLM parts are non-zero (a 'trained' model)."""
    torch.manual_seed(5)
    config = tiny_llm_seg_config(tiny_checkpoints, **options)
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or name.startswith(("mask_encoder.", "proposal_scorer.relation")):
                parameter.normal_(0, 0.1)
    manifest = ExportManifest("merged", config, describe_model(model, tokenizer))
    save_export(model, tokenizer, manifest, folder)
    return folder


def write_scene(path: Path, size=(96, 128)) -> Path:
    """Three flat boxes on grey: the weight-free backend proposes each of them."""
    image = np.full((*size, 3), 200, np.uint8)
    image[10:40, 10:50] = (220, 30, 30)
    image[50:90, 60:100] = (30, 30, 220)
    image[20:60, 80:120] = (30, 200, 30)
    Image.fromarray(image).save(path)
    return path


@pytest.fixture(scope="module")
def exports(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("app_exports")
    return {
        "multi": write_export(tiny_checkpoints, root / "multi", mask_encoder="pooled"),
        "single": write_export(tiny_checkpoints, root / "single"),
    }


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    return write_scene(tmp_path_factory.mktemp("app_scene") / "scene.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_dir: Path, tmp_path: Path, **overrides):
    """Start the app on a free port of 127.0.0.1; returns ``(page, url)``."""
    fields = dict(
        model_dir=str(model_dir), proposals="weightfree", precision="fp32", device="cpu",
        mode="teacher_forced", selection="argmax", port=free_port(), out_dir=str(tmp_path),
    )  # fmt: skip
    fields.update(overrides)
    return app.main(app.AppConfig(**fields), block=False)


@pytest.fixture(scope="module")
def multi_url(exports, tmp_path_factory):
    page, url = serve(exports["multi"], tmp_path_factory.mktemp("multi_out"))
    assert url.startswith("http://127.0.0.1:")
    yield url
    page.close()


@pytest.fixture(scope="module")
def single_url(exports, tmp_path_factory):
    page, url = serve(exports["single"], tmp_path_factory.mktemp("single_out"))
    yield url
    page.close()


def ask(client: Client, image: Path, query: str, references=(), colour="#ff0000"):
    """One Run: ``(overlay, mask, answer, table, gallery, chooser, status)``."""
    return client.predict(handle_file(str(image)), query, list(references), colour, api_name="/run")


def captions(gallery) -> list[str]:
    return [entry["caption"] for entry in gallery]


def test_single_round_overlay_answer_and_proposals(single_url, scene):
    client = Client(single_url, verbose=False)
    overlay, mask_file, answer, table, gallery, chooser, status = ask(client, scene, "the red box")
    picture = np.asarray(Image.open(scene).convert("RGB")).astype(int)
    shown = np.asarray(Image.open(overlay).convert("RGB")).astype(int)
    mask = np.asarray(Image.open(mask_file)) > 0
    assert shown.shape == picture.shape
    assert mask.shape == picture.shape[:2]
    assert mask.any()
    changed = np.abs(shown - picture).sum(axis=2) > 0
    assert changed[mask].mean() > 0.9  # blended with red (and outlined) where the mask is
    assert not changed[~_grown(mask)].any()  # untouched away from the mask
    assert answer == "[SEG]."
    rows = table["data"]
    assert rows
    assert rows[0][1] == "yes"
    assert table["headers"] == app.TABLE_HEADERS
    assert captions(gallery) == ["round 1: the red box"]
    assert chooser["choices"] == []  # a single-round model offers no references
    assert "Round 1 answered" in status


def _grown(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown by two pixels (the outline is drawn on its border)."""
    grown = mask.copy()
    for axis in (0, 1):
        for shift in (-2, -1, 1, 2):
            grown |= np.roll(mask, shift, axis=axis)
    return grown


def test_bad_input_is_a_message(single_url, scene, tmp_path):
    client = Client(single_url, verbose=False)
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(AppError, match="not a picture"):
        ask(client, text, "the red box")
    with pytest.raises(AppError, match="Type a query"):
        ask(client, scene, "   ")
    with pytest.raises(AppError, match="no SegLLM parts"):
        ask(client, scene, "the box next to [REF:1]")
    # beyond --max_image_side (1024): shrunk, and the page says so
    wide = write_scene(tmp_path / "wide.png", size=(96, 2048))
    overlay, *_, status = ask(client, wide, "the red box")
    assert Image.open(overlay).size == (1024, 48)
    assert "(2048x96) was shrunk to 1024x48" in status


def test_three_rounds_with_references_then_clear(multi_url, scene):
    client = Client(multi_url, verbose=False)
    ask(client, scene, "the red box")
    *_, gallery, chooser, _ = ask(client, scene, "the box right of instance 1 [REF:1]")
    assert [c[0] for c in chooser["choices"]] == ["round 1", "round 2"]
    overlay, mask_file, answer, table, gallery, chooser, status = ask(
        client, scene, "the box between them", references=["round 1", "round 2"]
    )
    assert captions(gallery) == [
        "round 1: the red box",
        "round 2: the box right of instance 1 [REF:1]",
        "round 3: the box between them [REF:1,2]",  # the chosen rounds, as markers
    ]
    assert answer == "[SEG]."
    assert table["data"]
    assert "Round 3 answered" in status
    with pytest.raises(AppError, match="Round 5 does not exist yet"):
        ask(client, scene, "the box near [REF:5]")
    *_, gallery, chooser, status = client.predict(api_name="/clear")
    assert gallery == []
    assert chooser["choices"] == []
    assert "cleared" in status
    *_, gallery, _, _ = ask(client, scene, "the blue box")
    assert captions(gallery) == ["round 1: the blue box"]


def test_two_clients_keep_separate_histories(multi_url, scene):
    clients = [Client(multi_url, verbose=False) for _ in range(2)]
    galleries: dict[int, list] = {}

    def converse(number: int) -> None:
        queries = ["the red box", "the box right of instance 1 [REF:1]"][: number + 1]
        for query in queries:
            galleries[number] = ask(clients[number], scene, f"{query} ({number})")[4]

    threads = [threading.Thread(target=converse, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert captions(galleries[0]) == ["round 1: the red box (0)"]
    assert captions(galleries[1]) == [
        "round 1: the red box (1)",
        "round 2: the box right of instance 1 [REF:1] (1)",
    ]


def test_a_new_picture_starts_a_new_conversation(multi_url, scene, tmp_path):
    client = Client(multi_url, verbose=False)
    ask(client, scene, "the red box")
    other = write_scene(tmp_path / "other.png", size=(80, 80))
    *_, gallery, _, status = ask(client, other, "the green box")
    assert captions(gallery) == ["round 1: the green box"]
    assert "starts over" in status


def test_bad_flags_fail_before_serving(exports, tmp_path):
    with pytest.raises(ValueError, match="no pictures"):
        serve(exports["single"], tmp_path, examples=str(tmp_path))
    with pytest.raises(ValueError, match="--model_dir is required"):
        app.main(app.AppConfig(), block=False)


def test_multi_round_model_in_bf16(exports, scene, tmp_path):
    """The default precision: the [SEG] state reaches the bf16 text projection in bf16 (the
    proposal head keeps its own dtype)."""
    page, url = serve(exports["multi"], tmp_path, precision="bf16")
    try:
        client = Client(url, verbose=False)
        ask(client, scene, "the red box")
        *_, gallery, _, status = ask(client, scene, "the box right of instance 1 [REF:1]")
        assert len(gallery) == 2
        assert "Round 2 answered" in status
    finally:
        page.close()
