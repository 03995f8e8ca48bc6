"""No-target answers (``--rejection answer|token``): the token, the training answers, the
teacher-forced decision, and a model trained to reject the absent object and segment the
present one."""

from __future__ import annotations

import csv
import random

import numpy as np
import pytest
import torch
from PIL import Image

from model.builder import build_llm_seg, setup_trainable, tiny_llm_seg_config
from model.evaluation import SelectionSettings, evaluate, write_rows_csv
from model.export import load_exported, save_export
from model.export_manifest import ExportManifest, describe_model
from model.inference import InferenceSettings, Segmenter, StoreProposals
from tests.model.test_multi_round import OBJECTS, _settings, _train, write_scene
from utils.data.builders import build_encoder
from utils.data.mixing import EvaluationDataset
from utils.data.rejection import (
    REJ_TOKEN,
    REJECTION_SENTENCE,
    RejectionProbe,
    check_rejection_mode,
    rejection_answer,
    rejection_decisions,
    rejection_probe,
)
from utils.data.samples import SegmentationRecord, collate
from utils.proposal_store import ProposalReader
from utils.tokenizer import SEG_TOKEN

PRESENT = "<image>\nSegment the red box."
ABSENT = "<image>\nSegment the purple star."


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return write_scene(tmp_path_factory.mktemp("scene"))


def record(scene, question, answer, target=None, no_target=None) -> SegmentationRecord:
    """One round on the scene; ``target`` names the object (``None``: no mask row)."""
    if target is None:
        masks = np.zeros((answer.count(SEG_TOKEN), *OBJECTS["red"].shape), np.uint8)
    else:
        masks = OBJECTS[target][None]
    return SegmentationRecord(
        image_path=scene / "scene.png",
        conversations=[[(question, answer)]],
        masks=lambda height, width: masks,
        proposals=ProposalReader(scene / "store"),
        proposal_key="scene.png",
        name="absent" if target is None else target,
        dataset="test",
        queries=[question.split("\n")[-1]],
        no_target=no_target,
    )


def test_modes_and_answers():
    assert check_rejection_mode("token") == "token"
    with pytest.raises(ValueError, match="--rejection must be one of none, answer, token"):
        check_rejection_mode("maybe")
    assert rejection_answer("answer") == REJECTION_SENTENCE
    assert rejection_answer("token") == "[REJ]."
    with pytest.raises(ValueError, match="--rejection none has no rejection answer"):
        rejection_answer("none")


def test_decision_reads_the_position_before_the_answers_part():
    logits = torch.zeros(6, 10)
    logits[1, 7] = 5.0  # before the [SEG] at 2: the rejecting token is likely
    logits[3, 7] = -5.0  # before the [SEG] at 4: it is not
    rejected, probability = rejection_decisions(logits, torch.tensor([2, 4]), RejectionProbe(7, 0))
    assert rejected.tolist() == [True, False]
    assert torch.allclose(probability, torch.softmax(logits[[1, 3]], -1)[:, 7])
    # A tokenization that puts a shared token (a space) before [SEG]: read one earlier.
    rejected, _ = rejection_decisions(logits, torch.tensor([3, 5]), RejectionProbe(7, 1))
    assert rejected.tolist() == [True, False]


def test_probe_finds_where_the_answers_part():
    seg = 9
    answers = {"[SEG].": [1, 2, 3, 4, seg, 5], REJECTION_SENTENCE: [1, 2, 3, 4, 6, 7, 5]}
    assert rejection_probe(answers.get, "answer", seg) == RejectionProbe(6, 0)
    answers = {"[SEG].": [1, 2, 3, 8, seg, 5], REJECTION_SENTENCE: [1, 2, 3, 6, 7, 5]}
    assert rejection_probe(answers.get, "answer", seg) == RejectionProbe(6, 1)
    answers = {"[SEG].": [1, 2, seg, 5], "[REJ].": [1, 2, 11, 5]}
    assert rejection_probe(answers.get, "token", seg) == RejectionProbe(11, 0)
    answers = {"[SEG].": [1, 2, seg, 5], "[REJ].": [1, 2, seg, 5, 3]}
    with pytest.raises(ValueError, match="cannot be told from"):
        rejection_probe(answers.get, "token", seg)


@pytest.mark.parametrize("mode", ["none", "answer", "token"])
def test_the_model_and_encoder_know_the_rejecting_token(scene, tiny_checkpoints, mode):
    config = tiny_llm_seg_config(tiny_checkpoints, rejection=mode)
    model, tokenizer = build_llm_seg(config)
    embeddings = model.backbone.language_model.get_input_embeddings().weight
    assert embeddings.shape[0] >= len(tokenizer)
    assert (REJ_TOKEN in tokenizer.get_vocab()) == (mode == "token")
    assert model.rejection == mode
    if mode == "none":
        return
    encoder = build_encoder(_settings(config), tokenizer, model.num_image_tokens)
    probe = encoder.rejection_probe(mode)
    if mode == "token":
        assert probe.token_id == tokenizer.convert_tokens_to_ids(REJ_TOKEN)
    # Teacher-forcing the rejecting answer puts the probe's token where the probe reads.
    sample = encoder(record(scene, ABSENT, "[SEG].", None))
    ids = sample.conversations[0].input_ids
    seg = int((ids == model.seg_token_id).nonzero())
    rejecting = encoder._encode([(ABSENT, rejection_answer(mode))]).input_ids
    assert int(rejecting[seg - probe.offset]) == probe.token_id
    assert torch.equal(rejecting[: seg - probe.offset], ids[: seg - probe.offset])


@pytest.mark.parametrize("mode", ["answer", "token"])
def test_training_answers_carry_the_rejection_and_no_mask(scene, tiny_checkpoints, mode):
    config = tiny_llm_seg_config(tiny_checkpoints, rejection=mode)
    model, tokenizer = build_llm_seg(config)
    encoder = build_encoder(_settings(config), tokenizer, model.num_image_tokens)
    encoder.settings.rejection = mode
    sample = encoder(record(scene, ABSENT, REJECTION_SENTENCE))
    (conversation,) = sample.conversations
    assert conversation.num_seg == 0
    assert sample.masks.shape[0] == 0
    answer = tokenizer.decode(conversation.labels[conversation.labels >= 0])
    expected = "[REJ]." if mode == "token" else REJECTION_SENTENCE
    assert expected in answer.replace(" .", ".")
    probe = encoder.rejection_probe(mode)
    assert probe.token_id in conversation.labels.tolist()


# The sentence's first token is one of many it trains, so it needs more steps than [REJ].
@pytest.mark.parametrize(("mode", "steps"), [("token", 60), ("answer", 120)])
def test_a_rejection_trained_model_rejects_the_absent_and_segments_the_present(
    scene, tiny_checkpoints, tmp_path, mode, steps
):
    torch.manual_seed(0)
    random.seed(0)
    config = tiny_llm_seg_config(tiny_checkpoints, rejection=mode, lora_dropout=0.0)
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    encoder = build_encoder(_settings(config), tokenizer, model.num_image_tokens)
    encoder.settings.rejection = mode
    training = [record(scene, PRESENT, "[SEG].", "red"), record(scene, ABSENT, REJECTION_SENTENCE)]
    batch = collate([encoder(r) for r in training], tokenizer.pad_token_id)[0]
    _train(model, batch, steps=steps, lr=1e-2)

    # Evaluation asks both with "[SEG]." (the absent one has an empty mask row, flagged).
    records = [
        record(scene, PRESENT, "[SEG].", "red", no_target=(False,)),
        record(scene, ABSENT, "[SEG].", None, no_target=(True,)),
    ]
    results = evaluate(
        model, EvaluationDataset(records, encoder), SelectionSettings("argmax"),
        torch.device("cpu"), torch.float32, tokenizer.pad_token_id, tmp_path,
    )  # fmt: skip
    assert results["rejection"] == mode
    assert results["num_rejected"] == 1
    assert results["n_acc"] == 1.0
    assert results["t_acc"] == 1.0
    assert results["grefcoco"]["giou"] == pytest.approx(1.0)  # rejection 1, red box exactly
    with open(tmp_path / "per_image.csv") as handle:
        rows = {row["name"]: row for row in csv.DictReader(handle)}
    assert rows["absent"]["rejected"] == "1"
    assert float(rows["absent"]["rejection_probability"]) > 0.5
    assert (rows["red"]["rejected"], rows["red"]["iou"]) == ("0", "1.0")
    assert float(rows["red"]["rejection_probability"]) < 0.5

    # An export keeps the mode (and [REJ]): the loaded model decides the same way.
    for kind in ("merged",):  # (merging folds LoRA in place; the adapter path is build_llm_seg)
        manifest = ExportManifest(kind, config, describe_model(model, tokenizer))
        save_export(model, tokenizer, manifest, tmp_path / kind)
        loaded = load_exported(tmp_path / kind)
        assert loaded.model.rejection == mode
        assert loaded.manifest.encoder_fields()["rejection"] == mode  # what eval.py encodes with
        assert (REJ_TOKEN in loaded.tokenizer.get_vocab()) == (mode == "token")
        again = evaluate(
            loaded.model, EvaluationDataset(records, encoder), SelectionSettings("argmax"),
            torch.device("cpu"), torch.float32, tokenizer.pad_token_id, tmp_path / f"{kind}_eval",
        )  # fmt: skip
        assert (again["num_rejected"], again["n_acc"], again["t_acc"]) == (1, 1.0, 1.0)

    # Chat, teacher-forced: the absent object gets an empty mask and the reason.
    settings = InferenceSettings(mode="teacher_forced", template="raw", strategy="argmax")
    segmenter = Segmenter(loaded, StoreProposals(scene / "store"), settings)
    image = np.asarray(Image.open(scene / "scene.png").convert("RGB"))
    absent = segmenter(image, ABSENT.split("\n")[1], "scene.png")
    assert not absent.mask.any()
    assert "would rather answer that there is no such object" in absent.note
    assert not any(p.selected for r in absent.rounds for p in r.proposals)
    present = segmenter(image, PRESENT.split("\n")[1], "scene.png")
    assert np.array_equal(present.mask, OBJECTS["red"].astype(bool))
    assert present.note == ""


def test_without_rejection_nothing_changes(scene, tiny_checkpoints, tmp_path):
    torch.manual_seed(0)
    config = tiny_llm_seg_config(tiny_checkpoints)
    model, tokenizer = build_llm_seg(config)
    encoder = build_encoder(_settings(config), tokenizer, model.num_image_tokens)
    records = [record(scene, PRESENT, "[SEG].", "red", no_target=(False,))]
    results = evaluate(
        model, EvaluationDataset(records, encoder), SelectionSettings("argmax"),
        torch.device("cpu"), torch.float32, tokenizer.pad_token_id, tmp_path,
    )  # fmt: skip
    assert "rejection" not in results
    assert "num_rejected" not in results
    with open(tmp_path / "per_image.csv") as handle:
        assert "rejected" not in next(csv.DictReader(handle))


def test_the_csv_has_every_rows_columns(tmp_path):
    # A record that could not be scored has no rejection columns, and it may come first.
    rows = [{"name": "a", "iou": 0.0}, {"name": "b", "iou": 1.0, "rejected": 1}]
    write_rows_csv(rows, tmp_path / "rows.csv")
    with open(tmp_path / "rows.csv") as handle:
        read = list(csv.DictReader(handle))
    assert [(r["name"], r["rejected"]) for r in read] == [("a", ""), ("b", "1")]
