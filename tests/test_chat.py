"""chat.py on a tiny exported model: batch modes, free generation, no-[SEG], bad inputs."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor

import chat
import eval as eval_script
from model.builder import LLMSegConfig, build_llm_seg, setup_trainable, tiny_llm_seg_config
from model.export import save_export
from model.export_manifest import ExportManifest, describe_model
from model.inference import NO_SEG_NOTE, build_question
from tests.data_fixtures import write_reason_seg
from utils.data.builders import build_encoder, build_eval_dataset
from utils.data.conversation import VALIDATION_ANSWER
from utils.data.images import ImageReadError
from utils.data.samples import collate
from utils.proposal_store import ProposalReader

QUERY = "the red object that stands out"


class Script(LogitsProcessor):
    """Forces greedy decoding to write ``ids`` (then end of sequence): a 'trained' answer."""

    def __init__(self, ids: list[int], eos: int) -> None:
        self.ids, self.eos = list(ids), eos

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1]  # generation from embeddings: only the new tokens are here
        forced = self.ids[step] if step < len(self.ids) else self.eos
        out = torch.full_like(scores, -torch.inf)
        out[:, forced] = 0
        return out


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory):
    """A tiny merged export (LoRA with non-zero B) and a 3-image ReasonSeg split with a store."""
    root = tmp_path_factory.mktemp("chat")
    config = tiny_llm_seg_config(tiny_checkpoints)
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    manifest = ExportManifest("merged", config, describe_model(model, tokenizer))
    save_export(model, tokenizer, manifest, root / "export")
    dataset_dir, masks_dir = write_reason_seg(root / "data", "val", 3, seed=1)
    images = dataset_dir / "reason_seg" / "ReasonSeg" / "val"
    store = masks_dir / "reason_seg" / "ReasonSeg" / "val"
    return root, images, store, (dataset_dir, masks_dir)


def _config(root: Path, store: Path, **overrides) -> chat.ChatConfig:
    fields = dict(
        model_dir=str(root / "export"), proposals="store", proposal_store=str(store),
        precision="fp32", device="cpu", out_dir=str(root / "out"), mode="teacher_forced",
    )  # fmt: skip
    fields.update(overrides)
    return chat.ChatConfig(**fields)


def test_batch_folder_writes_files_and_scores_like_eval(setup, tiny_checkpoints, tmp_path):
    root, images, store, data = setup
    out = tmp_path / "folder"
    summary = chat.main(_config(root, store, input=str(images), query=QUERY, out_dir=str(out)))
    assert summary == {"written": 3, "failed": []}
    stored = ProposalReader(store)
    for stem in ("img_000", "img_001", "img_002"):
        record = json.loads((out / f"{stem}.json").read_text())
        assert (record["query"], record["answer"], record["num_seg_tokens"]) == (QUERY, "[SEG].", 1)
        (round_,) = record["rounds"]
        assert len(round_["proposals"]) == record["num_proposals"] == 4
        # iop selection: exactly the proposals whose IoP > 0.5
        chosen = sorted(p["index"] for p in round_["proposals"] if p["iop"] > 0.5)
        assert sorted(round_["selected"]) == chosen
        mask = np.asarray(Image.open(out / record["mask"])) > 0
        expected = stored.get(f"{stem}.jpg").decode(chosen).any(axis=0) if chosen else 0 * mask
        np.testing.assert_array_equal(mask, expected)
        overlay = Image.open(out / record["overlay"])
        # 48 x 56 pictures are enlarged by 6 (short side >= 256) so the answer stays legible.
        assert overlay.width == 56 * 6
        assert overlay.height > 48 * 6
        pixels = np.asarray(overlay.convert("RGB"))
        if mask.any():  # the mask's outline is cyan, visible on a red object
            assert ((pixels == (0, 255, 255)).all(axis=2)).any()
    assert json.loads((out / "chat_config.json").read_text())["mode"] == "teacher_forced"

    # The same numbers as eval.py's pipeline for img_000 (a sentence query: the same prompt).
    record = json.loads((out / "img_000.json").read_text())
    segmenter = setup_segmenter(root, store)
    model = tiny_llm_seg_config(tiny_checkpoints)
    eval_config = eval_script.EvalConfig(
        **{f.name: getattr(model, f.name) for f in dataclasses.fields(LLMSegConfig)},
        dataset_dir=str(data[0]),
        sam_masks_dir=str(data[1]),
    )
    encoder = build_encoder(eval_config, segmenter.tokenizer, segmenter.model.num_image_tokens)
    sample = build_eval_dataset(eval_config, encoder, "ReasonSeg|val")[0]
    assert (sample.record.name, sample.record.queries[0]) == ("img_000", QUERY)
    scores = segmenter.model.score(collate([sample], segmenter.tokenizer.pad_token_id)[0])
    cosines = [p["cosine"] for p in record["rounds"][0]["proposals"]]  # eval's order: by area
    torch.testing.assert_close(scores.similarities[0][0], torch.tensor(cosines))
    iops = [p["iop"] for p in record["rounds"][0]["proposals"]]
    torch.testing.assert_close(scores.iop_scores[0][0], torch.tensor(iops))


def setup_segmenter(root, store, **overrides):
    return chat.build_segmenter(_config(root, store, **overrides))


def test_free_generation_of_seg_matches_teacher_forcing(setup, tmp_path):
    root, images, store, _ = setup
    segmenter = setup_segmenter(root, store, mode="free")
    question = build_question(QUERY, "long")
    closed, _ = segmenter.encode(question, VALIDATION_ANSWER)
    prompt, _ = segmenter.open_prompt(question)  # ends where the answer's labels start
    assert torch.equal(closed[: len(prompt)], prompt)
    eos = segmenter.tokenizer.eos_token_id
    segmenter.logits_processor = [Script(closed[len(prompt) :].tolist(), eos)]
    config = _config(root, store, mode="free", image=str(images / "img_001.jpg"), query=QUERY)
    free = chat.main(dataclasses.replace(config, out_dir=str(tmp_path / "free")), segmenter)
    forced = chat.main(
        dataclasses.replace(config, mode="teacher_forced", out_dir=str(tmp_path / "tf"))
    )
    # (the tiny tokenizer decodes an added token followed by "." with a space between)
    assert free["answer"].replace(" ", "") == "[SEG]."
    assert free["num_seg_tokens"] == 1
    assert free["rounds"] == forced["rounds"]
    assert free["prompt"].endswith("ASSISTANT:")

    # Two [SEG]s in a generated answer: two rounds, one mask each.
    ids = segmenter.tokenizer(" Sure, [SEG] and [SEG].", add_special_tokens=False)["input_ids"]
    segmenter.logits_processor = [Script(ids, eos)]
    two = chat.main(dataclasses.replace(config, out_dir=str(tmp_path / "two")), segmenter)
    assert two["answer"] == segmenter.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert two["answer"].count("[SEG]") == 2
    assert [r["mask"] for r in two["rounds"]] == ["img_001_mask_0.png", "img_001_mask_1.png"]
    union = np.asarray(Image.open(tmp_path / "two" / two["mask"])) > 0
    parts = [np.asarray(Image.open(tmp_path / "two" / r["mask"])) > 0 for r in two["rounds"]]
    np.testing.assert_array_equal(union, parts[0] | parts[1])


def test_show_prompt_prints_and_records_the_whole_sequence(setup, tmp_path, capsys):
    root, images, store, _ = setup
    config = _config(root, store, image=str(images / "img_000.jpg"), query=QUERY)
    plain = chat.main(dataclasses.replace(config, out_dir=str(tmp_path / "plain")))
    assert "prompt_ids" not in plain
    record = chat.main(
        dataclasses.replace(config, out_dir=str(tmp_path / "shown"), show_prompt=True)
    )
    segmenter = setup_segmenter(root, store)
    input_ids, _ = segmenter.encode(build_question(QUERY, "long"), VALIDATION_ANSWER)
    image_id = segmenter.model.backbone.image_token_id
    assert record["prompt_ids"].count(-200) == 1  # the image as upstream writes it
    expanded = []
    for token_id in record["prompt_ids"]:
        expanded += (
            [image_id] * segmenter.model.num_image_tokens if token_id == -200 else [token_id]
        )
    assert expanded == input_ids.tolist()  # exactly what the model read, answer included
    assert record["prompt_ids"][-1] == segmenter.tokenizer.eos_token_id
    assert len(record["prompt_tokens"]) == len(record["prompt_ids"])
    assert record["prompt_tokens"][record["prompt_ids"].index(-200)] == "<image>"
    assert record["prompt_text"].endswith("ASSISTANT: [SEG].</s>")
    assert QUERY in record["prompt_text"]
    assert record["selection"]["tokenization"] == "hf"  # the tiny kit's tokenizer is not LLaMA's
    shown = json.loads((tmp_path / "shown" / "img_000.json").read_text())
    assert shown["prompt_ids"] == record["prompt_ids"]
    printed = capsys.readouterr().out
    assert f"prompt tokens ({len(record['prompt_ids'])}):" in printed
    assert "<image>(-200)" in printed


def test_answer_without_seg_gives_an_explained_empty_mask(setup, tmp_path):
    root, images, store, _ = setup
    image = str(images / "img_002.jpg")
    # The tiny random model answers on its own (it does not emit [SEG]) ...
    config = _config(root, store, mode="free", image=image, query=QUERY, max_new_tokens=6)
    record = chat.main(dataclasses.replace(config, out_dir=str(tmp_path / "random")))
    assert "[SEG]" not in record["answer"].replace(f"[{NO_SEG_NOTE}]", "")
    # ... and a scripted refusal: same path.
    segmenter = setup_segmenter(root, store, mode="free")
    refusal = segmenter.tokenizer("I see no such object.", add_special_tokens=False)["input_ids"]
    segmenter.logits_processor = [Script(refusal, segmenter.tokenizer.eos_token_id)]
    scripted = chat.main(dataclasses.replace(config, out_dir=str(tmp_path / "scripted")), segmenter)
    for out, rec in (("random", record), ("scripted", scripted)):
        assert rec["num_seg_tokens"] == 0
        assert rec["rounds"] == []
        assert rec["note"] == NO_SEG_NOTE
        assert rec["answer"].endswith(f"[{NO_SEG_NOTE}]")
        assert rec["mask_area"] == 0
        mask = np.asarray(Image.open(tmp_path / out / rec["mask"]))
        assert mask.shape == (48, 56)
        assert not mask.any()
        assert (tmp_path / out / rec["overlay"]).is_file()
    assert rec["answer"].startswith("I see no such object.")


def test_bad_inputs_give_clear_errors(setup, tmp_path):
    root, images, store, _ = setup
    with pytest.raises(ImageReadError, match="missing.jpg: image file not found"):
        chat.main(_config(root, store, image=str(tmp_path / "missing.jpg"), query=QUERY))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageReadError, match="broken.jpg: unreadable image"):
        chat.main(_config(root, store, image=str(broken), query=QUERY))
    with pytest.raises(FileNotFoundError, match="not a folder or an existing .jsonl"):
        chat.main(_config(root, store, input=str(tmp_path / "nothing"), query=QUERY))
    with pytest.raises(ValueError, match="give the query with --query"):
        chat.main(_config(root, store, input=str(images)))

    # A jsonl: a good line, a missing image, an image the store does not know.
    other = tmp_path / "other.png"
    Image.fromarray(np.zeros((48, 56, 3), np.uint8)).save(other)
    pairs = tmp_path / "pairs.jsonl"
    lines = [
        {"image": str(images / "img_000.jpg"), "query": QUERY, "id": "good"},
        {"image": "missing.jpg", "query": QUERY},
        {"image": "other.png", "query": QUERY},
    ]
    pairs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "batch"
    summary = chat.main(_config(root, store, input=str(pairs), out_dir=str(out)))
    assert summary["written"] == 1
    assert (out / "good_mask.png").is_file()
    errors = {Path(f["image"]).name: f["error"] for f in summary["failed"]}
    assert "image file not found" in errors["missing.jpg"]
    assert "no proposals for 'other.png'" in errors["other.png"]
    assert json.loads((out / "summary.json").read_text()) == summary

    pairs.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: expected"):
        chat.main(_config(root, store, input=str(pairs)))
    with pytest.raises(RuntimeError, match="bitsandbytes"):
        chat.build_segmenter(_config(root, store, load_in_8bit=True))
    with pytest.raises(ValueError, match="query may not contain"):
        chat.main(_config(root, store, image=str(images / "img_000.jpg"), query="a [SEG] b"))


def test_proposals_on_the_fly(setup, tiny_checkpoints, tmp_path):
    root, images, store, _ = setup
    image = str(images / "img_000.jpg")
    weightfree = chat.main(
        _config(root, store, proposals="weightfree", image=image, query=QUERY,
                out_dir=str(tmp_path / "wf"))
    )  # fmt: skip
    assert weightfree["num_proposals"] > 0
    assert weightfree["proposal_source"] == "weightfree"
    # The tiny random SAM: thresholds off so its (random) masks survive.
    sam = chat.main(
        _config(root, store, proposals="sam", sam_checkpoint=str(tiny_checkpoints.sam),
                points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                image=image, query=QUERY, out_dir=str(tmp_path / "sam"))
    )  # fmt: skip
    assert sam["num_proposals"] > 0
    assert len(sam["rounds"][0]["proposals"]) == sam["num_proposals"]
    with pytest.raises(ValueError, match="needs SAM weights"):
        chat.build_segmenter(_config(root, store, proposals="sam"))


def test_interactive_prompt_and_bf16(setup, monkeypatch, tmp_path, capsys):
    root, images, store, _ = setup
    answers = f"{images / 'img_000.jpg'}\n{QUERY}\n{tmp_path / 'nope.jpg'}\n{QUERY}\n\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(answers))
    config = _config(root, store, out_dir=str(tmp_path / "repl"), precision="bf16")
    records = chat.main(config)
    assert len(records) == 1
    assert (tmp_path / "repl" / records[0]["mask"]).is_file()
    printed = capsys.readouterr().out
    assert "Answer: [SEG]." in printed
    assert "nope.jpg: image file not found" in printed
    # bf16 scores close to the fp32 ones
    fp32 = chat.main(_config(root, store, image=str(images / "img_000.jpg"), query=QUERY,
                             out_dir=str(tmp_path / "fp32")))  # fmt: skip
    got = [p["cosine"] for p in records[0]["rounds"][0]["proposals"]]
    want = [p["cosine"] for p in fp32["rounds"][0]["proposals"]]
    np.testing.assert_allclose(got, want, atol=0.05)
