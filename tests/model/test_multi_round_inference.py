"""The multi-round session: rounds with predicted history, KV cache equal to a full re-forward."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import chat
from model.builder import build_llm_seg, setup_trainable, tiny_llm_seg_config
from model.export import load_exported, save_export
from model.export_manifest import ExportManifest, describe_model
from model.inference import InferenceSettings, Segmenter, StoreProposals, build_question
from model.multi_round_inference import MultiRoundSession, mask_box
from tests.model.test_multi_round import _settings, record, write_scene
from utils.data.builders import build_encoder
from utils.data.samples import collate

QUERIES = [
    "the red box",
    "Segment the box left of instance 1 [REF:1].",
    "The box under instance 1 [REF:1], near instance 2 [REF:2].",
]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return write_scene(tmp_path_factory.mktemp("scene"))


@pytest.fixture(scope="module")
def exported(tiny_checkpoints, tmp_path_factory):
    """A tiny multi-round export with trained-looking SegLLM parts, and its config."""
    torch.manual_seed(5)
    config = tiny_llm_seg_config(tiny_checkpoints, mask_encoder="pooled")
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or name.startswith(("mask_encoder.", "proposal_scorer.relation")):
                parameter.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("export") / "model"
    save_export(
        model, tokenizer, ExportManifest("merged", config, describe_model(model, tokenizer)), folder
    )
    return load_exported(folder), config


def _session(exported, scene, use_cache=True) -> MultiRoundSession:
    segmenter = Segmenter(
        exported, StoreProposals(scene / "store"), InferenceSettings(strategy="argmax")
    )
    image = np.asarray(Image.open(scene / "scene.png").convert("RGB"))
    return MultiRoundSession(segmenter, image, "scene.png", use_cache=use_cache)


def test_cached_rounds_equal_a_full_reforward(exported, scene):
    loaded, config = exported
    cached, full = _session(loaded, scene), _session(loaded, scene, use_cache=False)
    for query in QUERIES:
        a, b = cached.ask(query), full.ask(query)
        torch.testing.assert_close(a.similarity, b.similarity, atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(a.mask, b.mask)
    assert [r.cached_tokens > 0 for r in cached.rounds] == [False, True, True]
    assert [r.cached_tokens for r in full.rounds] == [0, 0, 0]
    assert [r.references for r in cached.rounds] == [(), (1,), (1, 2)]
    assert cached.rounds[0].box == mask_box(cached.rounds[0].mask)

    # The same numbers as the model's own forward over the whole conversation, with the
    # session's predicted masks as the references.
    turns = [(build_question(QUERIES[0], "long"), "[SEG].")] + [(q, "[SEG].") for q in QUERIES[1:]]
    encoder = build_encoder(_settings(config), loaded.tokenizer, loaded.model.num_image_tokens)
    sample = encoder(record(scene, turns, ["red", "left", "below"]))
    predicted = torch.from_numpy(np.stack([r.mask for r in cached.rounds])).to(torch.uint8)
    inputs = encoder.encode_reference_masks(predicted[sample.reference_rows])
    sample = dataclasses.replace(sample, **inputs)
    scores = loaded.model.score(collate([sample], 0)[0])
    for round_index, result in enumerate(cached.rounds):
        torch.testing.assert_close(
            scores.similarities[0][round_index], result.similarity, atol=1e-4, rtol=1e-4
        )


def test_session_errors_and_clear(exported, scene):
    loaded, _ = exported
    session = _session(loaded, scene)
    with pytest.raises(ValueError, match="refers to round 2, which is not an earlier round"):
        session.ask("the box [REF:2]")
    session.ask(QUERIES[0])
    with pytest.raises(ValueError, match="refers to round 3"):
        session.ask("the box [REF:3]")
    assert len(session.rounds) == 1  # a refused round changes nothing
    session.clear()
    assert session.rounds == []
    first = session.ask(QUERIES[0])
    assert first.index == 1
    assert first.cached_tokens == 0


def test_a_single_round_model_refuses_references(tiny_checkpoints, scene, tmp_path):
    config = tiny_llm_seg_config(tiny_checkpoints)
    model, tokenizer = build_llm_seg(config)
    save_export(
        model,
        tokenizer,
        ExportManifest("merged", config, describe_model(model, tokenizer)),
        tmp_path / "m",
    )
    session = _session(load_exported(tmp_path / "m"), scene)
    session.ask(QUERIES[0])
    with pytest.raises(ValueError, match="no SegLLM parts"):
        session.ask(QUERIES[1])


def test_chat_multi_round_script_and_interactive(exported, scene, tmp_path, monkeypatch, capsys):
    loaded, _ = exported
    conversations = tmp_path / "conversations.jsonl"
    image = scene / "scene.png"
    conversations.write_text(json.dumps({"image": str(image), "rounds": QUERIES}) + "\n")
    base = dict(
        model_dir=str(loaded.folder), proposals="store", proposal_store=str(scene / "store"),
        precision="fp32", device="cpu", multi_round=True, selection="argmax",
    )  # fmt: skip
    (records,) = chat.main(
        chat.ChatConfig(**base, input=str(conversations), out_dir=str(tmp_path / "o"))
    )
    folder = tmp_path / "o" / "scene"
    assert [r["round"] for r in records] == [1, 2, 3]
    assert [r["references"] for r in records] == [[], [1], [1, 2]]
    session = _session(loaded, scene)
    for written, query in zip(records, QUERIES):
        expected = session.ask(query).mask
        saved = np.asarray(Image.open(folder / written["mask"])) > 0
        np.testing.assert_array_equal(saved, expected)
        assert json.loads((folder / f"round_{written['round']}.json").read_text()) == written
        shown = np.asarray(Image.open(folder / written["overlay"]).convert("RGB"))
        height, width = saved.shape
        factor = -(-256 // min(height, width))  # small pictures enlarged, as eval's overlays
        assert shown.shape[1] == width * max(factor, 1)
        assert shown.shape[0] > height * max(factor, 1)  # the caption above
        referred = [records[k - 1]["mask_area"] for k in written["references"]]
        if saved.any() and not referred:  # the mask's outline stays visible on a red object
            assert (shown == (0, 255, 255)).all(axis=2).any()
        if any(referred):  # the rounds it refers to, outlined in yellow (drawn last)
            assert (shown == (255, 220, 0)).all(axis=2).any()
    assert records[1]["cached_tokens"] > 0
    # Interactive: rounds, a bad reference (an error line, not a crash), clear history, exit.
    answers = iter([str(image), QUERIES[0], "the box [REF:5]", QUERIES[1], "clear history",
                    QUERIES[0], "exit", ""])  # fmt: skip
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    answered = chat.main(chat.ChatConfig(**base, out_dir=str(tmp_path / "i")))
    assert answered == 3
    printed = capsys.readouterr().out
    assert "error: round 2 refers to round 5" in printed
    assert "history cleared" in printed
    # A model without SegLLM parts is refused before anything is written.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected"):
        chat.main(chat.ChatConfig(**base, input=str(bad), out_dir=str(tmp_path / "b")))
    assert not (tmp_path / "b").exists()
