"""Upstream's tokenization reproduced token for token (``tokenization: llava_legacy``).

The reference ids in ``tests/data/upstream_tokenization/`` were made by transformers 4.31.0 and
4.29.0 (slow ``LlamaTokenizer``, legacy mode, LLaVA's ``tokenizer_image_token`` and LISA's label
arithmetic) from a tiny sentencepiece tokenizer saved the way LISA's folder is
(``make_reference.py`` there says how). Here transformers 5 loads the same folder and the
project's encoder must give the same ids, labels and ``[SEG]`` positions. The multi-round cases
(SegLLM) add ``<ref>``: upstream tokenized ``<ref>`` written into the text, the project encodes the
same turns written with ``[REF:k]`` markers.
"""

import json
import pickle
from pathlib import Path

import pytest

from utils.data.conversation import CONVERSATION_FORMATS, encode_conversation
from utils.legacy_tokenizer import (
    LegacyLlamaTokenizer,
    resolve_tokenization,
    sentencepiece_file,
)
from utils.tokenizer import IMAGE_TOKEN, REF_TOKEN, SEG_TOKEN, add_llm_seg_tokens, load_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data" / "upstream_tokenization"
REFERENCE = json.loads((DATA / "reference_ids.json").read_text())
_CASES_FILE = json.loads((DATA / "cases.json").read_text())
CASES = {c["name"]: c for c in _CASES_FILE["cases"]}
MULTI_ROUND_CASES = {c["name"]: c for c in _CASES_FILE["multi_round_cases"]}
NUM_IMAGE_TOKENS = 3
UPSTREAM_IMAGE_ID = -200


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = load_tokenizer(str(DATA / "tokenizer"))
    add_llm_seg_tokens(tokenizer, use_im_start_end=True)
    return tokenizer


@pytest.fixture(scope="module")
def ref_tokenizer():
    """The fixture folder with ``<ref>`` added as a SegLLM model adds it."""
    tokenizer = load_tokenizer(str(DATA / "tokenizer"))
    add_llm_seg_tokens(tokenizer, use_im_start_end=True, use_ref=True)
    return tokenizer


def _collapse_image(values: list[int], image_positions: list[int], placeholder: int) -> list[int]:
    """Our ``num_image_tokens`` image ids -> upstream's single ``-200`` placeholder."""
    first, last = image_positions[0], image_positions[-1]
    return values[:first] + [placeholder] + values[last + 1 :]


def encode_like_upstream(tokenizer, case: dict, legacy, turns=None, **options):
    """``(ids, labels, seg_positions)`` of a reference case, image collapsed to ``-200``.

    ``turns`` default to the case's in ``cases.json``; ``options`` go to ``encode_conversation``.
    """
    if turns is None:
        turns = CASES[case["name"]]["turns"]
    turns = [tuple(turn) for turn in turns]
    encoded = encode_conversation(
        tokenizer, turns, NUM_IMAGE_TOKENS, CONVERSATION_FORMATS["llava_v1"],
        case["use_im_start_end"], legacy=legacy, **options,
    )  # fmt: skip
    ids, labels = encoded.input_ids.tolist(), encoded.labels.tolist()
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    positions = [i for i, t in enumerate(ids) if t == image_id]
    assert len(positions) == NUM_IMAGE_TOKENS
    ids = _collapse_image(ids, positions, UPSTREAM_IMAGE_ID)
    labels = _collapse_image(labels, positions, -100)
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    seg_positions = [i for i in range(len(ids) - 1) if ids[i + 1] == seg_id]
    return ids, labels, seg_positions


def test_a_tokenizer_model_only_folder_loads_with_upstream_ids(tokenizer):
    assert not (DATA / "tokenizer" / "tokenizer.json").exists()
    assert sentencepiece_file(tokenizer) == DATA / "tokenizer" / "tokenizer.model"
    special = REFERENCE["special_ids"]
    for token in ("<im_patch>", "<im_start>", "<im_end>", "[SEG]"):
        assert tokenizer.convert_tokens_to_ids(token) == special[token]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (special["bos"], special["eos"])
    # <image> is ours (upstream used -200): added after every upstream row.
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == special["len_tokenizer"]


@pytest.mark.parametrize("name", [c["name"] for c in REFERENCE["cases"]])
def test_ids_labels_and_seg_positions_equal_upstream(tokenizer, name):
    case = next(c for c in REFERENCE["cases"] if c["name"] == name)
    legacy = LegacyLlamaTokenizer.from_tokenizer(tokenizer)
    ids, labels, seg_positions = encode_like_upstream(tokenizer, case, legacy)
    assert ids == case["input_ids"]
    assert seg_positions == case["seg_positions"]
    if case["labels"] is not None:
        assert not case["label_mismatch"]
        assert labels == case["labels"]


@pytest.mark.parametrize("name", [c["name"] for c in REFERENCE["multi_round_cases"]])
def test_multi_round_references_equal_upstream(ref_tokenizer, name):
    """``[REF:k]`` markers -> ``<ref>`` ids, labels, ``[SEG]`` and ``<ref>`` positions exactly as
    upstream's tokenizer gave for the same turns with ``<ref>`` written in."""
    case = next(c for c in REFERENCE["multi_round_cases"] if c["name"] == name)
    ref_id = ref_tokenizer.convert_tokens_to_ids(REF_TOKEN)
    # Upstream has no <image> row (it writes -200), so its <ref> comes one id earlier than ours,
    # which follows <image>: the same token, compared as such.
    assert ref_id == case["ref_id"] + 1
    assert ref_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == case["ref_id"]
    legacy = LegacyLlamaTokenizer.from_tokenizer(ref_tokenizer)
    ids, labels, seg_positions = encode_like_upstream(
        ref_tokenizer, case, legacy, turns=MULTI_ROUND_CASES[name]["markers"],
        references="tokens", ref_placement=case["ref_placement"],
    )  # fmt: skip
    ids = [case["ref_id"] if t == ref_id else t for t in ids]
    labels = [case["ref_id"] if t == ref_id else t for t in labels]
    ref_id = case["ref_id"]
    assert ids == case["input_ids"]
    assert seg_positions == case["seg_positions"]
    assert [i for i, t in enumerate(ids) if t == ref_id] == case["ref_positions"]
    if case["labels"] is not None:
        assert not case["label_mismatch"]
        assert labels == case["labels"]


def test_plain_transformers_tokenization_differs_where_upstream_strips(tokenizer):
    """Without the legacy encoder, transformers 5 puts a ``▁`` before ``<im_start>`` and
    ``[SEG]`` and keeps the newline: the [SEG] embedding would come from another token."""
    case = next(c for c in REFERENCE["cases"] if c["name"] == "reasonseg_val_long")
    ids, _, seg_positions = encode_like_upstream(tokenizer, case, legacy=None)
    assert ids != case["input_ids"]
    assert seg_positions != case["seg_positions"]
    underline = tokenizer.convert_tokens_to_ids("\u2581")
    assert ids[seg_positions[0]] == underline  # the state before [SEG] is a bare "▁"
    assert case["tokens"][case["seg_positions"][0]] == ":"  # upstream's is ":"


def test_resolve_tokenization(tokenizer, tmp_path):
    assert resolve_tokenization("auto", DATA / "tokenizer") == "llava_legacy"
    assert resolve_tokenization("auto", tokenizer) == "llava_legacy"
    assert resolve_tokenization("auto", tmp_path) == "hf"
    assert resolve_tokenization("hf", DATA / "tokenizer") == "hf"
    with pytest.raises(ValueError, match="llava_legacy needs the sentencepiece model"):
        resolve_tokenization("llava_legacy", tmp_path)
    with pytest.raises(ValueError, match="unknown tokenization 'slow'"):
        resolve_tokenization("slow", tmp_path)


def test_legacy_tokenizer_survives_pickling_for_dataloader_workers(tokenizer):
    legacy = LegacyLlamaTokenizer.from_tokenizer(tokenizer)
    copy = pickle.loads(pickle.dumps(legacy))
    text = "USER: <im_start><image><im_end>\n the caf\u00e9\u2019s door ASSISTANT: [SEG].</s>"
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert copy.encode_prompt(text, image_id, 2) == legacy.encode_prompt(text, image_id, 2)


def test_without_a_sentencepiece_model_legacy_is_refused(tiny_checkpoints):
    tiny = load_tokenizer(str(tiny_checkpoints.llava))
    assert sentencepiece_file(tiny) is None
    assert resolve_tokenization("auto", tiny) == "hf"
    with pytest.raises(FileNotFoundError, match="needs the sentencepiece model tokenizer.model"):
        LegacyLlamaTokenizer.from_tokenizer(tiny)
