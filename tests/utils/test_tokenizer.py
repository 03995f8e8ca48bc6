from utils.tokenizer import (
    IMAGE_END_TOKEN,
    IMAGE_START_TOKEN,
    IMAGE_TOKEN,
    SEG_TOKEN,
    add_llm_seg_tokens,
    load_tokenizer,
    train_tiny_tokenizer,
)


def test_tiny_tokenizer_behaves_like_llama():
    tokenizer = train_tiny_tokenizer()
    ids = tokenizer("Sure, it is [SEG].").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_tokens_to_ids(SEG_TOKEN) in ids
    assert tokenizer.pad_token == tokenizer.unk_token
    assert tokenizer.padding_side == "right"
    assert (
        tokenizer.decode(ids, skip_special_tokens=True).replace(" .", ".") == "Sure, it is [SEG]."
    )


def test_image_token_is_one_id_and_never_split():
    tokenizer = train_tiny_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = tokenizer(IMAGE_TOKEN * 5 + " hello").input_ids
    assert ids[1:6] == [image_id] * 5


def test_add_tokens_is_idempotent(tmp_path):
    tokenizer = train_tiny_tokenizer()
    before = len(tokenizer)
    assert add_llm_seg_tokens(tokenizer, use_im_start_end=True) == 2
    assert add_llm_seg_tokens(tokenizer, use_im_start_end=True) == 0
    assert len(tokenizer) == before + 2
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.get_vocab() == tokenizer.get_vocab()
    special = {t.content for t in loaded.added_tokens_decoder.values() if t.special}
    assert {IMAGE_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN} <= special
    assert SEG_TOKEN not in special  # a normal added token, as upstream
