r"""Make the upstream tokenization reference: ``tokenizer/`` and ``reference_ids.json``.

What it pins down: how upstream LISA (transformers 4.31.0) and LLM-Seg (transformers 4.29.0)
turned a llava_v1 conversation into ``input_ids`` and training ``labels`` with the *slow*
sentencepiece ``LlamaTokenizer`` (legacy mode), ``tokenizer_image_token`` (``<image>`` -> -200)
and LISA's ``collate_fn`` label masking. The cases come from ``cases.json`` beside this file.

``cases.json`` has two lists. ``cases``: single- and multi-turn LISA/LLM-Seg prompts (their text is
also in the sentencepiece training corpus). ``multi_round_cases``: SegLLM multi-round conversations
whose later questions hold ``<ref>`` tokens, written in (``turns``; each case also has ``markers``,
the same turns with the project's ``[REF:k]`` markers, and ``ref_placement``, which are for the
project's test and are not read here). They are tokenized with ``<ref>`` added to the loaded
tokenizer as the project adds it, ``add_tokens(["<ref>"], special_tokens=True)`` after ``[SEG]``
(so it gets the next id); that tokenizer is never saved, and these cases are not in the training
corpus, so ``tokenizer/`` is the same with or without them.

Files it produces (all beside this file):

* ``tokenizer/``: a tiny LLaMA-style tokenizer folder as 4.31.0's ``save_pretrained`` writes one
  (``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json``,
  ``added_tokens.json``, no ``tokenizer.json``), laid out like LISA-7B-v1's: the sentencepiece
  vocabulary (unk 0, bos 1, eos 2, 256 byte pieces, BPE pieces), then ``<im_patch>``,
  ``<im_start>``, ``<im_end>`` (added as special tokens, as LLaVA-v1 did) and ``[SEG]`` (a plain
  added token, as LISA did); pad = unk. The sentencepiece model is trained here, deterministically,
  on an English corpus built in this script (single thread, no shuffling, no sampling).
* ``reference_ids.json``: per case the rendered prompt, ``input_ids``, token strings, ``labels``
  (``null`` for a generation prompt), ``label_mismatch`` and ``seg_positions``; plus the special ids
  and the transformers versions that produced identical results. ``multi_round_cases`` entries
  also hold ``ref_placement``, ``ref_id`` (the id ``<ref>`` got) and ``ref_positions`` (the
  indices of ``<ref>`` in ``input_ids``).

How to rerun (from this folder; any throwaway venvs, never the project's venv)::

    python3 -m venv /tmp/tokref431
    /tmp/tokref431/bin/pip install transformers==4.31.0 "tokenizers<0.14" \
        sentencepiece==0.2.3 protobuf
    # trains, saves tokenizer/, writes reference_ids.json (transformers_versions = [4.31.0])
    /tmp/tokref431/bin/python make_reference.py build

    python3 -m venv /tmp/tokref429
    /tmp/tokref429/bin/pip install transformers==4.29.0 "tokenizers<0.14" \
        sentencepiece==0.2.3 protobuf
    # recomputes with 4.29.0, fails unless identical, then adds 4.29.0 to transformers_versions
    /tmp/tokref429/bin/python make_reference.py check --record

Other commands (they write nothing):

* ``make_reference.py check``: recompute with the installed transformers (4.29/4.31) and compare.
* ``make_reference.py spm-check``: reproduce every ``input_ids``/``labels`` with the
  ``sentencepiece`` package alone (the algorithm in :func:`spm_encode`); needs only sentencepiece.
* ``make_reference.py compare``: with transformers >= 5, load ``tokenizer/`` with ``AutoTokenizer``
  and print where its ids differ from the reference (used for README.md).

``build`` must run under transformers 4.31.0 (the version that saved LISA-7B-v1's folder); it
refuses anything else. Re-running ``build`` gives byte-identical files (checked by training twice).
No torch is needed.
"""

# ruff: noqa: T201  (a command-line script: it reports with print)
from __future__ import annotations

import argparse
import difflib
import io
import json
import random
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = HERE / "cases.json"
TOKENIZER_DIR = HERE / "tokenizer"
REFERENCE = HERE / "reference_ids.json"

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
IM_PATCH, IM_START, IM_END, SEG = "<im_patch>", "<im_start>", "<im_end>", "[SEG]"
REF = "<ref>"  # SegLLM's placeholder for an earlier round's mask (multi_round_cases only)
MODEL_MAX_LENGTH = 512  # LISA / LLM-Seg train with model_max_length=512, right padding
VOCAB_SIZE = 1000
UPSTREAM_VERSIONS = ("4.29.0", "4.31.0")


def dump_json(obj, indent: int = 0) -> str:
    """JSON with one level of indentation per nesting, lists of scalars kept on one line."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k)}: {dump_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}" if items else "{}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        items = [f"{inner}{dump_json(v, indent + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(obj, ensure_ascii=False)


def write_reference(ref: dict) -> None:
    REFERENCE.write_text(dump_json(ref) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- corpus and training


def training_corpus(cases: dict) -> list[str]:
    """Deterministic English corpus: the case texts, the template, and generated sentences.

    Accents: 'é' is frequent (it gets its own piece), 'ü' and 'ñ' and curly quotes are rare (below
    the character coverage, so they are encoded with byte fallback).
    """
    fmt = cases["conversation_format"]
    # the template is frequent (as chat text is in LLaMA's data), so its words get merged pieces
    # (only "cases": adding multi_round_cases must not change the model)
    lines = [fmt["system"], " ".join(f"{r}:" for r in fmt["roles"])] * 40
    for case in cases["cases"]:
        for question, answer in case["turns"]:
            lines.append(question.replace(IMAGE_TOKEN, ""))
            if answer is not None:
                lines.append(answer)
    # no newline in the corpus: like LLaMA, "\n" then has no piece and is byte <0x0A>
    lines = [" ".join(line.split("\n")) for line in lines]
    nouns = [
        "man", "woman", "dog", "cat", "car", "bicycle", "cup", "plate", "sky", "tree",
        "traffic light", "camera lens", "zebra", "umbrella", "street", "grass", "frisbee",
        "fridge", "door", "window", "table", "chair", "bottle", "phone", "boat", "bus",
    ]  # fmt: skip
    subjects = ["the " + noun for noun in nouns]
    verbs = [
        "is holding",
        "is next to",
        "is behind",
        "is in front of",
        "looks at",
        "stands on",
        "is left of",
        "is right of",
        "is under",
        "is above",
        "covers",
        "opens",
    ]
    adjectives = [
        "red",
        "green",
        "blue",
        "yellow",
        "white",
        "black",
        "small",
        "large",
        "old",
        "new",
        "wet",
        "dry",
        "open",
        "closed",
        "bright",
        "dark",
        "leftmost",
        "rightmost",
    ]
    templates = [
        "What is {s} in this image? Please output segmentation mask.",
        "Can you segment {s} in this image?",
        "Please segment {s} in this image.",
        "{S} {v} {s2}.",
        "The {a} one {v} {s2}, and it is {a2}.",
        "Sure, the segmentation result is [SEG].",
        "Sure, it is [SEG]. It is {a}.",
        "What helps someone {v2}? Please respond with segmentation mask.",
        "There are {n} {a} things, {m} of them near {s}.",
        "In {y}, {s} was {a}; now it is {a2}!",
        "Is it {a}? Yes: {s} is {a} (mostly).",
        "The café near {s} is {a}; the café owner said it's {a2}.",
    ]
    verbs2 = ["see at night", "open a door", "get a cold drink", "cross the street", "sit down"]
    rng = random.Random(20240131)
    for _ in range(1500):
        s, s2 = rng.choice(subjects), rng.choice(subjects)
        lines.append(
            rng.choice(templates).format(
                s=s,
                S=s[0].upper() + s[1:],
                s2=s2,
                v=rng.choice(verbs),
                v2=rng.choice(verbs2),
                a=rng.choice(adjectives),
                a2=rng.choice(adjectives),
                n=rng.randint(0, 99),
                m=rng.randint(0, 9),
                y=rng.randint(1900, 2030),
            )
        )
    # rare characters: a few times only, below character_coverage -> byte fallback
    lines += ["Über café “quoted” text — it’s jalapeño.", "naïve résumé, déjà vu"]
    lines += ["0 1 2 3 4 5 6 7 8 9 10 100 2nd 3rd 1st 42 2024"]
    lines += ["a, b. c; d: e! f? (g) [h] \"i\" 'j' - k / l"]
    assert not any("\n" in line for line in lines)
    return lines


def train_sentencepiece(cases: dict) -> bytes:
    """Train the BPE sentencepiece model with LLaMA's settings; return the serialized model."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_corpus(cases)),
        model_writer=out,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        split_by_unicode_script=True,
        split_by_number=True,
        split_by_whitespace=True,
        max_sentencepiece_length=16,
        character_coverage=0.9995,
        required_chars="".join(chr(c) for c in range(33, 127)),  # all printable ASCII, as LLaMA
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    return out.getvalue()


def build_tokenizer_folder(cases: dict) -> None:
    """Train, then save the folder exactly as transformers 4.31.0 does for LISA-7B-v1."""
    from transformers import LlamaTokenizer

    model = train_sentencepiece(cases)
    if train_sentencepiece(cases) != model:
        raise SystemExit("sentencepiece training is not deterministic")
    if TOKENIZER_DIR.exists():
        shutil.rmtree(TOKENIZER_DIR)
    scratch = HERE / "_scratch_spm"
    scratch.mkdir(exist_ok=True)
    try:
        (scratch / "tokenizer.model").write_bytes(model)
        tok = LlamaTokenizer(
            vocab_file=str(scratch / "tokenizer.model"),
            model_max_length=MODEL_MAX_LENGTH,
            padding_side="right",
        )
        # LLaVA-v1 (the LLaVA-Lightning base): <im_patch>, then <im_start>/<im_end>, all special
        tok.add_tokens([IM_PATCH], special_tokens=True)
        tok.add_tokens([IM_START, IM_END], special_tokens=True)
        # LISA: pad = unk, then a plain (non-special) [SEG]
        tok.pad_token = tok.unk_token
        tok.add_tokens(SEG)
        tok.save_pretrained(str(TOKENIZER_DIR))
    finally:
        shutil.rmtree(scratch)
    (TOKENIZER_DIR / "tokenizer.json").unlink(missing_ok=True)


# --------------------------------------------------------------------------- upstream algorithm


def render_prompt(fmt: dict, turns: list, use_im_start_end: bool) -> str:
    """llava_v1 (SeparatorStyle.TWO), then LISA's <image> -> <im_start><image><im_end>."""
    seps = [fmt["sep"], fmt["sep2"]]
    text = fmt["system"] + seps[0]
    i = 0
    for question, answer in turns:
        for role, message in ((fmt["roles"][0], question), (fmt["roles"][1], answer)):
            text += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
            i += 1
    if use_im_start_end:
        text = text.replace(IMAGE_TOKEN, IM_START + IMAGE_TOKEN + IM_END)
    return text


def image_token_ids(prompt: str, encode, bos_id: int) -> list[int]:
    """LLaVA's tokenizer_image_token: chunks at <image>, each encoded with BOS, one BOS kept."""
    chunks = [encode(chunk) for chunk in prompt.split(IMAGE_TOKEN)]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == bos_id else 0
    ids = [chunks[0][0]] if offset else []
    for k, chunk in enumerate(chunks):
        if k:
            ids.extend(([IMAGE_TOKEN_INDEX] * (offset + 1))[offset:])
        ids.extend(chunk[offset:])
    return ids


def lisa_labels(
    conversation: str, input_ids: list[int], encode, bos_id: int, pad_id: int, fmt: dict
) -> tuple[list[int], bool]:
    """LISA's collate_fn target masking for one llava_v1 conversation (batch of one).

    Returns (labels, mismatch). LISA itself asserts cur_len == total_len (a crash); LLaVA's
    preprocess masks the whole sequence instead, which is what ``labels`` then holds.
    """
    target = list(input_ids)
    total_len = sum(1 for t in input_ids if t != pad_id)
    sep = fmt["sep"] + fmt["roles"][1] + ": "
    use_image = IMAGE_TOKEN in conversation

    def length(text: str) -> int:
        return len(image_token_ids(text, encode, bos_id) if use_image else encode(text))

    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for rou in conversation.split(fmt["sep2"]):
        if rou == "":
            break
        parts = rou.split(sep)
        assert len(parts) == 2, (len(parts), rou)
        parts[0] += sep
        round_len = length(rou)
        instruction_len = length(parts[0]) - 2
        end = min(cur_len + instruction_len, len(target))
        target[cur_len:end] = [IGNORE_INDEX] * max(0, end - cur_len)
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * max(0, len(target) - cur_len)
    mismatch = cur_len < MODEL_MAX_LENGTH and cur_len != total_len
    if mismatch:
        target = [IGNORE_INDEX] * len(target)
    return target, mismatch


def compute_reference(
    cases: dict,
    encode,
    bos_id: int,
    pad_id: int,
    seg_id: int,
    id_to_token,
    key: str = "cases",
    ref_id: int | None = None,
) -> list[dict]:
    """The reference entries of ``cases[key]``; ``ref_id``: the id of ``<ref>`` (multi-round)."""
    fmt = cases["conversation_format"]
    out = []
    for case in cases[key]:
        use_se = case.get("use_im_start_end", cases["use_im_start_end"])
        prompt = render_prompt(fmt, case["turns"], use_se)
        if ref_id is None:
            assert REF not in prompt, case["name"]
        assert "[REF:" not in prompt, case["name"]  # upstream never saw the project's markers
        ids = image_token_ids(prompt, encode, bos_id)
        closed = case["turns"][-1][1] is not None
        labels, mismatch = None, None
        if closed:
            labels, mismatch = lisa_labels(prompt, ids, encode, bos_id, pad_id, fmt)
        entry = {"name": case["name"], "family": case["family"], "use_im_start_end": use_se}
        if ref_id is not None:
            entry["ref_placement"] = case["ref_placement"]
        entry |= {
            "prompt": prompt,
            "input_ids": ids,
            "tokens": [IMAGE_TOKEN if t == IMAGE_TOKEN_INDEX else id_to_token(t) for t in ids],
            "labels": labels,
            "label_mismatch": mismatch,
            "seg_positions": [i for i in range(len(ids) - 1) if ids[i + 1] == seg_id],
        }
        if ref_id is not None:
            ref_positions = [i for i, t in enumerate(ids) if t == ref_id]
            assert len(ref_positions) == prompt.count(REF), case["name"]
            entry |= {"ref_id": ref_id, "ref_positions": ref_positions}
        out.append(entry)
    return out


def load_upstream_tokenizer():
    """Load tokenizer/ as LISA's train_ds.py / chat.py did (slow, right padding, pad = unk)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        str(TOKENIZER_DIR), model_max_length=MODEL_MAX_LENGTH, padding_side="right", use_fast=False
    )
    tok.pad_token = tok.unk_token
    assert tok.add_tokens(SEG) == 0  # LISA re-adds [SEG]: already there
    assert tok.add_tokens([IM_START, IM_END], special_tokens=True) == 0
    return tok


def upstream_result(cases: dict) -> dict:
    import transformers

    tok = load_upstream_tokenizer()
    assert type(tok).__name__ == "LlamaTokenizer", type(tok)
    assert IMAGE_TOKEN not in tok.get_vocab()
    seg_id = tok(SEG, add_special_tokens=False).input_ids[0]  # as LISA computes seg_token_idx
    assert seg_id == tok.convert_tokens_to_ids(SEG)
    special_ids = {
        "unk": tok.unk_token_id,
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "pad": tok.pad_token_id,
        IM_PATCH: tok.convert_tokens_to_ids(IM_PATCH),
        IM_START: tok.convert_tokens_to_ids(IM_START),
        IM_END: tok.convert_tokens_to_ids(IM_END),
        SEG: seg_id,
        "sentencepiece_vocab_size": tok.vocab_size,
        "len_tokenizer": len(tok),
        IMAGE_TOKEN: IMAGE_TOKEN_INDEX,
    }
    cases_out = compute_reference(
        cases,
        lambda text: tok(text).input_ids,
        tok.bos_token_id,
        tok.pad_token_id,
        seg_id,
        tok.convert_ids_to_tokens,
    )
    # multi-round: <ref> added in memory only (tokenizer/ stays as saved), as the project adds it
    assert tok.add_tokens([REF], special_tokens=True) == 1
    ref_id = tok.convert_tokens_to_ids(REF)
    assert ref_id == special_ids["len_tokenizer"] == len(tok) - 1  # the id after [SEG]
    assert tok(REF, add_special_tokens=False).input_ids == [ref_id]
    multi_round_out = compute_reference(
        cases,
        lambda text: tok(text).input_ids,
        tok.bos_token_id,
        tok.pad_token_id,
        seg_id,
        tok.convert_ids_to_tokens,
        key="multi_round_cases",
        ref_id=ref_id,
    )
    return {
        "generated_with": transformers.__version__,
        "special_ids": special_ids,
        "cases": cases_out,
        "multi_round_cases": multi_round_out,
    }


# --------------------------------------------------------------------------- sentencepiece only


def spm_encode(
    text: str, sp, added: dict[str, int], special: dict[str, int], bos_id: int
) -> list[int]:
    """4.31 slow LlamaTokenizer (legacy) ``tokenizer(text).input_ids`` with sentencepiece alone.

    ``added``: added tokens (<im_patch>, <im_start>, <im_end>, [SEG]): they strip whitespace on
    both neighbours. ``special``: <s>, </s>, <unk>: split off too, neighbours left as they are.
    """
    names = sorted({**added, **special}, key=len, reverse=True)
    pieces = [p for p in re.split("(" + "|".join(map(re.escape, names)) + ")", text)]
    for i, piece in enumerate(pieces):
        if piece in added:
            if i + 1 < len(pieces):
                pieces[i + 1] = pieces[i + 1].lstrip()
            if i > 0:
                pieces[i - 1] = pieces[i - 1].rstrip()
    ids = [bos_id]
    for piece in pieces:
        if not piece:
            continue
        if piece in added:
            ids.append(added[piece])
        elif piece in special:
            ids.append(special[piece])
        else:
            ids.extend(sp.encode(piece))
    return ids


def spm_check(cases: dict, ref: dict) -> int:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))
    added = json.loads((TOKENIZER_DIR / "added_tokens.json").read_text())
    special = {"<unk>": sp.unk_id(), "<s>": sp.bos_id(), "</s>": sp.eos_id()}
    s = ref["special_ids"]

    def run(added: dict[str, int], **kwargs) -> list[dict]:
        return compute_reference(
            cases,
            lambda t: spm_encode(t, sp, added, special, sp.bos_id()),
            sp.bos_id(),
            s["pad"],
            added[SEG],
            lambda i: (
                sp.id_to_piece(i)
                if i < sp.get_piece_size()
                else {v: k for k, v in added.items()}[i]
            ),
            **kwargs,
        )

    bad = report_diff(ref["cases"], run(added), "sentencepiece-only")
    with_ref = {**added, REF: max(added.values()) + 1}  # <ref> takes the next id
    mine = run(with_ref, key="multi_round_cases", ref_id=with_ref[REF])
    return bad + report_diff(ref["multi_round_cases"], mine, "sentencepiece-only, multi-round")


# --------------------------------------------------------------------------- checks


def report_diff(expected: list[dict], got: list[dict], label: str) -> int:
    bad = 0
    for e, g in zip(expected, got, strict=True):
        for key in e:
            if e[key] != g.get(key):
                bad += 1
                print(f"[{label}] {e['name']}: field {key!r} differs")
    verdict = "all identical" if not bad else f"{bad} differing fields"
    print(f"[{label}] {len(expected)} cases, {verdict}")
    return bad


def compare_v5(cases: dict, ref: dict) -> None:
    """transformers >= 5: AutoTokenizer on tokenizer/, same splitting at <image>."""
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
    print(f"transformers {transformers.__version__}: {type(tok).__module__}.{type(tok).__name__}")
    print(
        "ids:",
        {t: tok.convert_tokens_to_ids(t) for t in (IM_PATCH, IM_START, IM_END, SEG)},
        "reference:",
        {t: ref["special_ids"][t] for t in (IM_PATCH, IM_START, IM_END, SEG)},
    )
    print("legacy attribute:", getattr(tok, "legacy", None), "len:", len(tok))
    id_to_token = tok.convert_ids_to_tokens
    cases_v5 = list(ref["cases"])
    if ref.get("multi_round_cases"):
        tok.add_tokens([REF], special_tokens=True)  # in memory, as for the reference
        print(
            "<ref>:",
            tok.convert_tokens_to_ids(REF),
            "reference:",
            ref["multi_round_cases"][0]["ref_id"],
        )
        cases_v5 += ref["multi_round_cases"]
    for case in cases_v5:
        ids = image_token_ids(case["prompt"], lambda t: tok(t).input_ids, tok.bos_token_id)
        toks = [IMAGE_TOKEN if t == IMAGE_TOKEN_INDEX else id_to_token(t) for t in ids]
        if ids == case["input_ids"]:
            print(f"  {case['name']}: identical")
            continue
        sm = difflib.SequenceMatcher(a=case["tokens"], b=toks, autojunk=False)
        diffs = [
            f"{op} ref[{i1}:{i2}]={case['tokens'][i1:i2]} v5[{j1}:{j2}]={toks[j1:j2]}"
            for op, i1, i2, j1, j2 in sm.get_opcodes()
            if op != "equal"
        ]
        same_strings = "same token strings, other ids" if toks == case["tokens"] else ""
        print(f"  {case['name']}: {len(case['input_ids'])} vs {len(ids)} ids {same_strings}")
        for d in diffs:
            print("     ", d)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build", "check", "spm-check", "compare"])
    parser.add_argument(
        "--record",
        action="store_true",
        help="check: add this transformers version to transformers_versions",
    )
    args = parser.parse_args()
    cases = json.loads(CASES.read_text(encoding="utf-8"))

    if args.command == "build":
        import transformers

        if transformers.__version__ != "4.31.0":
            raise SystemExit(f"build needs transformers 4.31.0, not {transformers.__version__}")
        build_tokenizer_folder(cases)
        result = upstream_result(cases)
        ref = {
            "description": "Upstream (LISA/LLM-Seg) llava_v1 prompt tokenization with the slow "
            "LlamaTokenizer of tokenizer/; see README.md and make_reference.py.",
            "transformers_versions": [result["generated_with"]],
            **result,
        }
        write_reference(ref)
        print(f"wrote {TOKENIZER_DIR} and {REFERENCE}")
        return spm_check(cases, ref)

    ref = json.loads(REFERENCE.read_text(encoding="utf-8"))
    if args.command == "check":
        import transformers

        version = transformers.__version__
        result = upstream_result(cases)
        bad = report_diff(ref["cases"], result["cases"], f"transformers {version}")
        bad += report_diff(
            ref["multi_round_cases"], result["multi_round_cases"], f"transformers {version}"
        )
        if result["special_ids"] != ref["special_ids"]:
            bad += 1
            print("special_ids differ:", result["special_ids"])
        if bad:
            return 1
        if args.record and version not in ref["transformers_versions"]:
            ref["transformers_versions"] = sorted(ref["transformers_versions"] + [version])
            write_reference(ref)
            print(f"recorded {version} in transformers_versions")
        return 0
    if args.command == "spm-check":
        return 1 if spm_check(cases, ref) else 0
    compare_v5(cases, ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
