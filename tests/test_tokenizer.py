"""QWenTokenizer against the token ids of qwen-spec.md section 5 and round-trip properties."""
import base64
import hashlib
import random
import shutil

import pytest

from qwen_int4.tokenizer import (
    VOCAB_SHA256,
    AutoTokenizer,
    QWenTokenizer,
    StreamingDetokenizer,
    load_vocab,
    packaged_vocab_file,
)

SPEC_VECTORS = [
    ("\n", [198]),
    ("\n\n", [271]),
    ("system", [8948]),
    ("user", [872]),
    ("assistant", [77091]),
    ("You are a helpful assistant.", [2610, 525, 264, 10950, 17847, 13]),
    ("你好", [108386]),
    ("你好！很高兴为你提供帮助。", [108386, 6313, 112169, 106184, 99553, 100364, 1773]),
    ("Observation:", [37763, 367, 25]),
    ("Observation:\n", [37763, 367, 510]),
    ("\nObservation:", [198, 37763, 367, 25]),
    ("Human:", [33975, 25]),
    ("Thought:", [84169, 25]),
    ("Action:", [2512, 25]),
    ("Action Input:", [2512, 5571, 25]),
    ("Final Answer:", [19357, 21806, 25]),
    (" A", [362]), (" B", [425]), (" C", [356]), (" D", [422]),
    ("A", [32]), ("B", [33]), ("C", [34]), ("D", [35]),
    ("12345", [16, 17, 18, 19, 20]),
    ("Panda", [47, 9817]),
    (" Panda", [72410]),
]


@pytest.mark.parametrize("text,ids", SPEC_VECTORS)
def test_spec_vectors(tokenizer, text, ids):
    assert tokenizer.encode(text) == ids
    assert tokenizer.decode(ids) == text


def test_special_token_settings(tokenizer):
    text = 'print("<|endoftext|>")'
    assert tokenizer.encode(text, allowed_special=set()) == [1350, 9639, 91, 8691, 723, 427, 91, 82598]
    assert tokenizer.encode(text) == [1350, 445, 151643, 899]
    mixed = 'print("<|extra_0|>")<|endoftext|>'
    assert tokenizer.encode(mixed, allowed_special={"<|endoftext|>"}) == [
        1350, 9639, 91, 15460, 62, 15, 91, 82598, 151643]
    with pytest.raises(ValueError, match="disallowed special token"):
        tokenizer.encode(text, allowed_special=set(), disallowed_special="all")
    with pytest.raises(ValueError, match="unknown special tokens"):
        tokenizer.encode(text, allowed_special={"<|bogus|>"})
    # every allowed_special setting round-trips the text
    for allowed in ("all", set(), {"<|endoftext|>"}, {"<|extra_0|>"}):
        assert tokenizer.decode(tokenizer.encode(mixed, allowed_special=allowed)) == mixed


def test_decode_split_character(tokenizer):
    assert tokenizer.decode([51461]) == " \ufffd"
    assert tokenizer.decode([51461, 117]) == " 根"
    assert tokenizer.decode([51461], errors="ignore") == " "


def test_ids_and_specials(tokenizer):
    assert len(tokenizer) == 151851
    assert (tokenizer.eod_id, tokenizer.im_start_id, tokenizer.im_end_id) == (151643, 151644, 151645)
    assert tokenizer.convert_tokens_to_ids("<|extra_0|>") == 151646
    assert tokenizer.convert_tokens_to_ids("<|extra_204|>") == 151850
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", b"system"]) == [151644, 8948]
    assert tokenizer.convert_ids_to_tokens([151645, 8948]) == ["<|im_end|>", b"system"]
    assert tokenizer.decode([151644, 8948, 151645], skip_special_tokens=True) == "system"
    with pytest.raises(KeyError, match="not a token"):
        tokenizer.convert_tokens_to_ids(b"\xff\xfe\xfd not a token")


@pytest.mark.parametrize("bad", [151851, 151935, 200000, -1])
def test_out_of_range_ids(tokenizer, bad):
    with pytest.raises(ValueError, match=f"unknown token id {bad}"):
        tokenizer.decode([1, bad])
    with pytest.raises(ValueError):
        tokenizer.convert_ids_to_tokens(bad)


def test_padding_ids_named_as_padding(tokenizer):
    with pytest.raises(ValueError, match="embedding padding"):
        tokenizer.decode([151900])


def test_non_string_input(tokenizer):
    with pytest.raises(TypeError, match="str"):
        tokenizer.encode(123)
    with pytest.raises(TypeError, match="ints"):
        tokenizer.decode(["a"])


ROUND_TRIP_TEXTS = [
    "中文测试：今天天气很好，我们去公园散步吧。",
    "The quick brown fox jumps over the lazy dog. It's 3.14159!",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}\n\n\nclass A:\n\tpass\n",
    "emoji 👩‍👩‍👧‍👦 🇨🇳 🤖✨ mixed 中文 and english",
    " " * 37 + "\n" * 5 + "\t \t" + " " * 100 + "x" + "\r\n\r\n" + " " * 3,
    "e\u0301 composed",  # NFC turns e + combining acute into é
    "<|im_start|>user\nhello<|im_end|>",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tokenizer, text):
    import unicodedata

    for allowed in ("all", set()):
        ids = tokenizer.encode(text, allowed_special=allowed)
        assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_nfc_normalisation(tokenizer):
    assert tokenizer.encode("e\u0301") == tokenizer.encode("\u00e9")


def test_invalid_utf8_bytes(tokenizer):
    # find single-byte tokens for 0xff / a lone continuation byte: they exist in byte-level BPE
    ids = [tokenizer.convert_tokens_to_ids(b) for b in (b"a", b"\xff", b"\x80", b"b", b"\xe4\xbd")]
    assert tokenizer.decode(ids) == b"a\xff\x80b\xe4\xbd".decode("utf-8", "replace")
    assert tokenizer.decode(ids, errors="ignore") == "ab"
    with pytest.raises(UnicodeDecodeError):
        tokenizer.decode(ids, errors="strict")


def test_hf_call_padding(tokenizer):
    tok = QWenTokenizer(pad_token="<|extra_0|>")
    enc = tok(["你好", "hello world, how are you"], padding="longest")
    assert enc.input_ids[0][-1] == 108386
    n = len(enc.input_ids[1])
    assert len(enc.input_ids[0]) == n and enc.input_ids[0][: n - 1] == [151646] * (n - 1)
    assert enc.attention_mask[0] == [0] * (n - 1) + [1]
    assert enc.attention_mask[1] == [1] * n
    single = tok("你好")
    assert single["input_ids"] == [108386] and single["attention_mask"] == [1]
    pt = tok(["a b", "c"], padding=True, return_tensors="pt")
    assert tuple(pt.input_ids.shape) == (2, 2) and pt.attention_mask.tolist() == [[1, 1], [0, 1]]
    tok.padding_side = "right"
    assert tok(["a b", "c"], padding=True)["input_ids"][1] == [66, 151646]


def test_pad_token_rules(tokenizer):
    tok = QWenTokenizer()
    with pytest.raises(ValueError, match="no pad token"):
        tok(["a", "b c"], padding="longest")
    with pytest.raises(ValueError, match="unknown special tokens is not supported"):
        tok.pad_token = "<pad>"
    tok.pad_token = "<|extra_0|>"
    assert tok.pad_token_id == 151646
    tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    assert tok.eos_token_id == 151643
    with pytest.raises(ValueError, match="not supported"):
        tok.add_tokens(["hello"])


def test_from_pretrained_dir(tmp_path):
    # a model directory with the vocabulary, and one without (falls back to the packaged copy)
    shutil.copy(packaged_vocab_file(), tmp_path / "qwen.tiktoken")
    tok = AutoTokenizer.from_pretrained(tmp_path, pad_token="<|extra_0|>", padding_side="left", trust_remote_code=True)
    assert tok.vocab_file == tmp_path / "qwen.tiktoken" and tok.pad_token_id == 151646
    empty = tmp_path / "empty"
    empty.mkdir()
    assert AutoTokenizer.from_pretrained(empty).vocab_file == packaged_vocab_file()


def test_vocab_file_checked(tmp_path):
    src = packaged_vocab_file().read_bytes()
    assert hashlib.sha256(src).hexdigest() == VOCAB_SHA256
    lines = src.splitlines()
    assert len(lines) == 151643
    # one token changed: parses, but the hash is wrong
    tampered = tmp_path / "tampered.tiktoken"
    tampered.write_bytes(b"\n".join([base64.b64encode(b"\x00zz-not-a-token") + b" 0"] + lines[1:]) + b"\n")
    with pytest.raises(ValueError, match="not Qwen's qwen.tiktoken"):
        load_vocab(tampered)
    # malformed lines name the line
    for bad_line, msg in [(b"!!notbase64 5", "malformed"), (b"IQ==", "malformed"), (b"IQ== x", "malformed"),
                          (b"IQ== 5", "repeated"), (b"IQ== 7", "out of order")]:
        path = tmp_path / "bad.tiktoken"
        path.write_bytes(b"\n".join(lines[:5] + [bad_line] + lines[6:]))
        with pytest.raises(ValueError, match=f"bad.tiktoken:6: .*{msg}"):
            QWenTokenizer(path)


def _stream(tokenizer, ids, **kw):
    detok = StreamingDetokenizer(tokenizer, **kw)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


def test_streaming_never_splits_characters(tokenizer):
    text = "中文🤖👩‍👩‍👧 emoji and 根 text"
    ids = tokenizer.encode(text)
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert _stream(tokenizer, [51461, 117]) == [" ", "根", ""]  # the space is complete, 根 waits for its last byte


def test_streaming_property_random_ids(tokenizer):
    rng = random.Random(1234)
    for trial in range(200):
        n = rng.randint(1, 40)
        ids = [rng.randrange(len(tokenizer)) for _ in range(n)]
        if trial % 3 == 0:  # bias towards byte-level tokens, which split characters most often
            ids = [rng.randrange(256) if rng.random() < 0.7 else i for i in ids]
        for errors in ("replace", "ignore"):
            for skip in (False, True):
                pieces = _stream(tokenizer, ids, errors=errors, skip_special_tokens=skip)
                assert "".join(pieces) == tokenizer.decode(ids, errors=errors, skip_special_tokens=skip)


def test_batch_decode(tokenizer):
    assert tokenizer.batch_decode([[108386], [8948, 198]]) == ["你好", "system\n"]
