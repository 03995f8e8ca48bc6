import pytest

from utils.data.conversation import (
    CONVERSATION_FORMATS,
    IGNORE_INDEX,
    SequenceTooLong,
    encode_conversation,
    render,
)
from utils.tokenizer import IMAGE_TOKEN, SEG_TOKEN, train_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tiny_tokenizer()
    tok.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    return tok


def test_render_llava_v1():
    text, spans = render([("<image>\nWhat?", "Sure, [SEG].")], CONVERSATION_FORMATS["llava_v1"])
    assert text.endswith("questions. USER: <image>\nWhat? ASSISTANT: Sure, [SEG].</s>")
    ((start, end),) = spans
    assert text[start:end] == "Sure, [SEG].</s>"


def test_labels_cover_answers_only(tokenizer):
    turns = [
        (IMAGE_TOKEN + "\nPlease segment the red one.", "Sure, it is [SEG]."),
        ("And the blue one?", "[SEG]."),
    ]
    encoded = encode_conversation(tokenizer, turns, num_image_tokens=16)
    ids = encoded.input_ids.tolist()
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(image_id) == 16
    assert encoded.num_seg == 2
    labelled = [i for i, label in enumerate(encoded.labels.tolist()) if label != IGNORE_INDEX]
    answer_text = tokenizer.decode([ids[i] for i in labelled])
    assert answer_text.replace(" ", "") == "Sure,itis[SEG].</s>[SEG].</s>"
    # every [SEG] is supervised, no image token is
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    for i, token in enumerate(ids):
        if token == seg_id:
            assert encoded.labels[i] == seg_id
        if token == image_id:
            assert encoded.labels[i] == IGNORE_INDEX


def test_too_long_is_dropped_not_truncated(tokenizer):
    turns = [(IMAGE_TOKEN + "\nx", "[SEG].")]
    with pytest.raises(SequenceTooLong, match="> max_length 20"):
        encode_conversation(tokenizer, turns, num_image_tokens=16, max_length=20)


def test_image_token_must_appear_once(tokenizer):
    with pytest.raises(ValueError, match="exactly one <image>"):
        encode_conversation(tokenizer, [("no image", "[SEG].")], num_image_tokens=4)


def test_without_start_end_tokens(tokenizer):
    encoded = encode_conversation(
        tokenizer, [(IMAGE_TOKEN + "\nq", "[SEG].")], num_image_tokens=3, use_im_start_end=False
    )
    assert tokenizer.convert_tokens_to_ids("<im_start>") not in encoded.input_ids.tolist()
