"""VQA (LLaVA-Instruct) loader: dialogue parsing, bad input, encoding, a mixed batch training."""

import json
import math
import random

import pytest
import torch

from tests.data_fixtures import write_reason_seg
from tests.utils.data.loader_fixtures import write_vqa
from utils.data.conversation import IGNORE_INDEX
from utils.data.reason_seg import load_reason_seg_split, reason_seg_train_record
from utils.data.samples import collate
from utils.data.vqa import VQASource, load_vqa, vqa_record, vqa_turns
from utils.text_files import DatasetFormatError


def test_dialogues_in_the_active_template(tmp_path):
    write_vqa(tmp_path)
    first, second = load_vqa(tmp_path)
    assert first.image_path == tmp_path / "coco/train2017/000000000101.jpg"
    # <image> moves to the start of the first question, as LLaVA's preprocess_multimodal
    assert first.turns == [
        ("<image>\nWhat colour is it?", "It is grey."),
        ("Why?", "Random pixels."),
    ]
    # a leading assistant message and a trailing unanswered question are dropped
    assert second.turns == [("<image>\nDescribe the image.", "Noise.")]
    record = vqa_record(first)
    assert record.masks is None
    assert record.proposals is None
    assert record.conversations == [first.turns]
    assert record.queries == ["What colour is it?"]
    source = VQASource([first, second])
    assert {source.sample_record(random.Random(i)).name for i in range(20)} == {
        "000000000101",
        "000000000102",
    }


def test_missing_images_are_skipped_and_counted(tmp_path, caplog):
    write_vqa(tmp_path)
    (tmp_path / "coco/train2017/000000000102.jpg").unlink()
    (item,) = load_vqa(tmp_path)
    assert item.image_path.name == "000000000101.jpg"
    assert "skipping 1 of 2 entries: 1 files missing" in caplog.text
    assert "000000000102.jpg" in caplog.text


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"from": "human", "value": "<image>\nq"}, {"from": "human", "value": "again"}],
         "roles must alternate human/gpt; message 1 is 'human'"),
        ([{"from": "user", "value": "q"}], r"conversations\[0\] 'from' is 'user'"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "[SEG]."}],
         r"conversations\[1\] contains \[SEG\]"),
        ([{"from": "human", "value": "q"}], "no question with an answer"),
        ([{"from": "human"}], r"conversations\[0\] needs a string 'value'"),
    ],
)  # fmt: skip
def test_malformed_dialogues_name_the_entry(tmp_path, messages, error):
    write_vqa(tmp_path, [{"image": "000000000101.jpg", "conversations": messages}])
    with pytest.raises(DatasetFormatError, match=r"llava_instruct_150k\.json entry 0: " + error):
        load_vqa(tmp_path)
    with pytest.raises(DatasetFormatError, match="x: 'conversations' must be a list"):
        vqa_turns(None, "x")


def test_malformed_file(tmp_path):
    write_vqa(tmp_path)
    path = tmp_path / "llava_dataset/llava_instruct_150k.json"
    path.write_text(json.dumps({"image": "a.jpg"}))
    with pytest.raises(DatasetFormatError, match="llava_instruct_150k.json: expected a json list"):
        load_vqa(tmp_path)
    path.write_text(json.dumps([{"conversations": []}]))
    with pytest.raises(DatasetFormatError, match="entry 0: needs a string 'image'"):
        load_vqa(tmp_path)
    with pytest.raises(FileNotFoundError, match="other_vqa.json"):
        load_vqa(tmp_path, "other_vqa")


def test_encoded_dialogue_labels_answers_only(tmp_path, tiny_model_and_encoder):
    _, tokenizer, encoder = tiny_model_and_encoder
    write_vqa(tmp_path)
    sample = encoder(vqa_record(load_vqa(tmp_path)[0]))
    assert sample.masks.shape == (0, 20, 30)
    assert sample.proposal_masks.shape[0] == 0
    assert sample.proposal_ious.shape == (0, 0)
    (conversation,) = sample.conversations
    assert conversation.num_seg == 0
    labelled = conversation.labels[conversation.labels != IGNORE_INDEX]
    text = tokenizer.decode(labelled).replace(" ", "")
    assert text == "Itisgrey.</s>Randompixels.</s>"


def test_vqa_and_segmentation_in_one_batch_train(tmp_path, tiny_model_and_encoder):
    model, tokenizer, encoder = tiny_model_and_encoder
    write_vqa(tmp_path / "dataset")
    write_reason_seg(tmp_path, "train", 1)
    (item,) = load_reason_seg_split(tmp_path / "dataset", tmp_path / "sam_masks", "train")
    samples = [
        encoder(vqa_record(load_vqa(tmp_path / "dataset")[0])),
        encoder(reason_seg_train_record(item, random.Random(0))),
    ]
    batch, _ = collate(samples, tokenizer.pad_token_id)
    assert batch.validate(model.seg_token_id) == [0, 2]  # [SEG]s per image
    model.train()
    model.zero_grad()
    output = model(batch)
    losses = (output.ce_loss, output.align_loss, output.iop_loss)
    assert all(math.isfinite(float(v.detach())) for v in losses)
    assert output.similarities[0].shape == (0, 0)  # the VQA image: no [SEG], no proposals
    assert output.similarities[1].shape == (2, 4)
    output.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert any(
        "proposal_scorer" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items()
    )
    model.zero_grad()

    # The VQA rows carry language-model loss: their answer tokens are labelled in the batch.
    vqa_rows = (batch.image_index == 0).nonzero().flatten()
    assert (batch.labels[vqa_rows] != IGNORE_INDEX).sum() > 0
    assert torch.equal(batch.image_index, torch.tensor([0, 1, 1]))
