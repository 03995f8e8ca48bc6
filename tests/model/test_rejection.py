"""No-target answers (``--rejection answer|token``): the token, the training answers, the
teacher-forced decision, and a model trained to reject the absent object and segment the
present one."""

from __future__ import annotations

import csv
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from model.builder import build_llm_seg, setup_trainable, tiny_llm_seg_config
from model.evaluation import SelectionSettings, evaluate, write_rows_csv
from model.export import load_exported, save_export
from model.export_manifest import ExportManifest, describe_model
from model.free_evaluation import evaluate_free
from model.inference import InferenceSettings, Segmenter, StoreProposals
from tests.model.test_multi_round import OBJECTS, _settings, _train, write_scene
from utils.data.builders import build_encoder
from utils.data.conversation import ANSWER_TEMPLATES
from utils.data.mixing import EvaluationDataset
from utils.data.rejection import (
    REJ_TOKEN,
    REJECTION_SENTENCE,
    RejectionProbe,
    check_rejection_mode,
    rejection_answer,
    rejection_decisions,
    rejection_probe,
    token_rejection_answer,
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


def _encoded(ids: list[int], answer_from: int) -> SimpleNamespace:
    """An encoded conversation whose labels start at ``answer_from``."""
    labels = [-100] * answer_from + ids[answer_from:]
    return SimpleNamespace(input_ids=torch.tensor(ids), labels=torch.tensor(labels))


def test_probe_finds_where_the_answers_part():
    seg = 9
    answers = {"[SEG].": _encoded([1, 2, 3, 4, seg, 5], 4),
               REJECTION_SENTENCE: _encoded([1, 2, 3, 4, 6, 7, 5], 4)}  # fmt: skip
    assert rejection_probe(answers.get, "answer", seg) == RejectionProbe(6, 0)
    # The answers part one token before [SEG] (a space token that only [SEG]. has).
    answers = {"[SEG].": _encoded([1, 2, 3, 8, seg, 5], 3),
               REJECTION_SENTENCE: _encoded([1, 2, 3, 6, 7, 5], 3)}  # fmt: skip
    assert rejection_probe(answers.get, "answer", seg) == RejectionProbe(6, 1)
    answers = {"[SEG].": _encoded([1, 2, seg, 5], 2), "[REJ].": _encoded([1, 2, 11, 5], 2)}
    assert rejection_probe(answers.get, "token", seg) == RejectionProbe(11, 0)
    # Parting where training teaches nothing (an unlabelled token) cannot be read.
    answers = {"[SEG].": _encoded([1, 2, seg, 5], 3), "[REJ].": _encoded([1, 2, 11, 5], 3)}
    with pytest.raises(ValueError, match="at a trained token"):
        rejection_probe(answers.get, "token", seg)
    answers = {"[SEG].": _encoded([1, 2, seg, 5], 2), "[REJ].": _encoded([1, 2, seg, 5, 3], 2)}
    with pytest.raises(ValueError, match="cannot be told from"):
        rejection_probe(answers.get, "token", seg)


def test_token_answers_follow_the_templates():
    answers = {token_rejection_answer(f"<image>\nSegment the thing number {i}.") for i in range(60)}
    assert answers == {t.replace("[SEG]", "[REJ]") for t in ANSWER_TEMPLATES}
    assert token_rejection_answer("q") == token_rejection_answer("q")  # deterministic


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
    expected = token_rejection_answer(ABSENT) if mode == "token" else REJECTION_SENTENCE
    assert expected.replace(" ", "") in answer.replace(" ", "")
    # The whole answer is labelled, the space before an added [REJ] included.
    start = int((conversation.labels >= 0).nonzero()[0])
    assert tokenizer.decode(conversation.input_ids[start - 1 : start]).strip().endswith(":")
    probe = encoder.rejection_probe(mode)
    assert probe.token_id in conversation.labels.tolist()


# Enough steps for the LM to tell the two questions apart at the answer's first choice.
@pytest.mark.parametrize(("mode", "steps"), [("token", 150), ("answer", 150)])
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
    # Every template, as training data answers over many queries: the present object with
    # [SEG], the absent one (token mode) with [REJ] in the same place.
    training = [record(scene, PRESENT, answer, "red") for answer in ANSWER_TEMPLATES]
    if mode == "token":
        training += [record(scene, ABSENT, a.replace("[SEG]", "[REJ]")) for a in ANSWER_TEMPLATES]
    else:
        training.append(record(scene, ABSENT, REJECTION_SENTENCE))
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
    # Free generation: the model writes its own answers, rejecting the absent object.
    free = evaluate_free(
        model, EvaluationDataset(records, encoder), tokenizer, SelectionSettings("argmax"),
        torch.device("cpu"), torch.float32, tmp_path / "free",
    )  # fmt: skip
    assert (free["n_acc"], free["t_acc"], free["num_rejected"]) == (1.0, 1.0, 1)
    assert free["grefcoco"]["giou"] == pytest.approx(1.0)
    with open(tmp_path / "free" / "per_image.csv") as handle:
        answers = {row["name"]: row["answer"] for row in csv.DictReader(handle)}
    assert "[SEG]" in answers["red"]
    assert "[SEG]" not in answers["absent"]
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
