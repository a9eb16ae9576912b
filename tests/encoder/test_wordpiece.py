"""Tests of GPT2-ML's tokenizer (``encoder.wordpiece``): BERT's lower-cased WordPiece and the demo's decoding.

GPT2-ML's clue-vocab.txt is not in this repository, so the tests build a small vocabulary laid out as BERT's
(ids 0..103: [PAD], [unused1..99], [UNK]=100, [CLS], [SEP]=102, [MASK]) and check the tokenizer against
ids derived by hand and against a slow, literal reference of BERT's FullTokenizer written below.
"""

import os
import random
import re
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from encoder import wordpiece
from encoder.wordpiece import (
    WordPieceEncoder,
    basic_tokenize,
    get_wordpiece_encoder,
    is_wordpiece_folder,
    read_vocab,
)

import paths  # tests/paths.py: the folders the tests read

ROOT = paths.ROOT
SPECIALS = ["[PAD]", *(f"[unused{i}]" for i in range(1, 100)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BODY = [
    "!", "#", ".", ",", "0", "1", "2", "##0", "##5", "a",  # 104..113
    "e", "gp", "##t", "the", "cafe", "hello", "##llo", "he", "world", "##s",  # 114..123
    "你", "好", "世", "界", "宇", "宙", "的", "意", "义", "是",  # 124..133
    "，", "。", "！", "？", "“", "”", "《", "》", "、", "\u2028",  # 134..143 (U+2028: a line of its own)
    "20", "##20", "##", "[", "]", "sep", "gpt", "##2", "a", "\u8c48",  # 144..153 ("a" again; U+8C48 豈)
]
VOCAB_LINES = SPECIALS + BODY
# BERT's _is_chinese_char blocks, written out again for the reference.
CJK = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
       (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)]

FUZZ_ALPHABET = list("abeghlostpGPTHELLO0125 !#.,-'[]") + [
    "你", "好", "世", "界", "宇", "宙", "年", "，", "。", "！", "？", "“", "”", "《", "》", "、",
    "é", "É", "\u0301", "\u3000", "\xa0", "\t", "\n", "\r", "\u2028", "\u2029", "\x0b", "\x85", "\u200b", "\x00",
    "\ufffd", "カ", "한", "😀", "\uf900",
    "Σ", "Α", "İ", "ß", "\U00020000", "\ud800", "##", "[UNK]", "[SEP]",
]


def write_vocab(path, lines, newline="\n"):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("".join(line + newline for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    return write_vocab(tmp_path_factory.mktemp("wordpiece") / "clue-vocab.txt", VOCAB_LINES)


@pytest.fixture(scope="module")
def enc(vocab_file):
    return WordPieceEncoder.from_file(vocab_file)


def joined(id_lists):
    return [i for ids in id_lists for i in ids]


def reference_ids(text, lines):
    """Slow, literal BERT FullTokenizer(do_lower_case=True): clean, CJK split, lower + strip accents,
    punctuation split, greedy longest-match-first WordPiece trying every end; ids from a dict filled in
    line order (a repeated token keeps its last line)."""
    vocab = {}
    for i, line in enumerate(lines):
        vocab[line.strip()] = i
    spaced = []
    for ch in text:
        cp, cat = ord(ch), unicodedata.category(ch)
        if cp == 0 or cp == 0xFFFD or (ch not in "\t\n\r" and cat in ("Cc", "Cf")):
            continue
        if ch in " \t\n\r" or cat == "Zs":
            spaced.append(" ")
        elif any(low <= cp <= high for low, high in CJK):
            spaced.append(" " + ch + " ")
        else:
            spaced.append(ch)
    pieces = []
    for word in "".join(spaced).split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        current = ""
        for c in word:
            cp = ord(c)
            if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 \
                    or unicodedata.category(c).startswith("P"):
                pieces += [current, c]
                current = ""
            else:
                current += c
        pieces.append(current)
    tokens = []
    for piece in " ".join(pieces).split():
        if len(piece) > 200:
            tokens.append("[UNK]")
            continue
        found, start = [], 0
        while start < len(piece):
            for end in range(len(piece), start, -1):
                candidate = ("##" if start else "") + piece[start:end]
                if candidate in vocab:
                    found.append(candidate)
                    start = end
                    break
            else:
                found = ["[UNK]"]
                break
        tokens += found
    return [vocab[t] for t in tokens]


def reference_decode(ids, lines):
    """GPT2-ML's demo: ''.join(convert_ids_to_tokens(ids)).replace('[UNK]', '').replace('##', '')."""
    return "".join(lines[i].strip() for i in ids).replace("[UNK]", "").replace("##", "")


HAND_CASES = [
    ("宇宙的意义是", [128, 129, 130, 131, 132, 133]),
    ("你好，世界！", [124, 125, 134, 126, 127, 136]),
    ("“你好”《世界》、", [138, 124, 125, 139, 140, 126, 127, 141, 142]),
    ("Hello, World!", [119, 107, 122, 104]),
    ("GPT2 是 2020 年", [150, 151, 133, 144, 145, 100]),  # gpt ##2; 20 ##20; 年 is not in the vocabulary
    ("GPT2是2020年", [150, 151, 133, 144, 145, 100]),
    ("Café CAFÉ cafe\u0301", [118, 118, 118]),  # accents stripped (precomposed and combining)
    ("hellos hellollo helloo", [119, 123, 119, 120, 100]),  # an unmatched rest makes the whole word [UNK]
    ("a", [152]),  # "a" is on lines 113 and 152: the later id
    ("😀 ab", [100, 100]),
    ("[SEP]", [147, 149, 148]),  # no special tokens from text
    ("\uf900", [153]),  # a CJK compatibility ideograph: NFD gives U+8C48
    ("\u200b你\x00好\ufffd\x0b", [124, 125]),  # control characters, NUL and U+FFFD dropped
    ("", []),
    (" \t\n\u3000\xa0", []),
]


@pytest.mark.parametrize("text, ids", HAND_CASES)
def test_encode_gives_hand_derived_ids(enc, text, ids):
    assert enc.encode(text) == ids
    assert reference_ids(text, VOCAB_LINES) == ids


def test_special_ids_and_sizes(enc):
    assert (enc.pad_token, enc.unk_token, enc.sep_token, enc.eot_token) == (0, 100, 102, 102)
    assert enc.vocab_size == len(VOCAB_LINES) == 154
    assert enc.tokenize("GPT2是2020年") == ["gpt", "##2", "是", "20", "##20", "[UNK]"]


def test_allow_special_turns_literal_sep_into_the_sep_id(enc):
    assert enc.encode("你好[SEP]世界", allow_special=True) == [124, 125, 102, 126, 127]
    assert enc.encode("你好[SEP]世界") == [124, 125, 147, 149, 148, 126, 127]


def test_basic_tokenize_splits_cjk_and_punctuation_and_strips_accents():
    assert basic_tokenize("Héllo，世界! GPT-2's\u2028x\x0by\u200bz") == \
        ["hello", "，", "世", "界", "!", "gpt", "-", "2", "'", "s", "xyz"]


def test_words_over_200_characters_are_one_unk(enc):
    assert enc.encode("e" + "0" * 199) == [114] + [111] * 199
    assert enc.encode("e" + "0" * 200) == [100]
    assert enc.encode("e" * 201 + " 你") == [100, 124]


def test_matches_reference_on_random_text(enc):
    rng = random.Random(26)
    for _ in range(400):
        text = "".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randrange(0, 40)))
        assert enc.encode(text) == reference_ids(text, VOCAB_LINES), repr(text)
    long_word = "e" + "0" * 250
    assert enc.encode(long_word) == reference_ids(long_word, VOCAB_LINES) == [100]


def test_decode_as_the_demo_does(enc):
    assert enc.decode([124, 125, 100, 119, 120, 101, 102, 0]) == "你好hellollo[CLS][SEP][PAD]"
    assert enc.decode([105, 105]) == ""  # "#" "#" joined is "##": removed, as the demo's replace does
    assert enc.decode([105, 146]) == "#"
    assert enc.decode([143]) == ""  # the U+2028 line is stripped to ""
    assert enc.decode([]) == ""
    assert enc.decode(np.array([124, 125], np.int64)) == "你好"
    assert enc.decode((np.int32(128), 129)) == "宇宙"
    assert enc.decode_bytes([124, 123]) == "你s".encode()


@pytest.mark.parametrize("text, decoded", [
    ("宇宙的意义是", "宇宙的意义是"),
    ("你好，世界！“宇宙”", "你好，世界！“宇宙”"),
    ("Hello, World! GPT2是2020年", "hello,world!gpt2是2020"),  # lower case, no spaces, [UNK] dropped
    ("Café hellos", "cafehellos"),
    ("", ""),
])
def test_round_trips_as_the_demo_decodes(enc, text, decoded):
    ids = enc.encode(text)
    assert enc.decode(ids) == reference_decode(ids, VOCAB_LINES) == decoded


def test_decode_refuses_bad_ids_with_one_line_errors(enc):
    for ids, message in [([154], "invalid token id 154: not in the vocabulary (ids 0..153)"),
                         ([-1], "invalid token id -1"), ([1.5], "ids must be integers"), (["3"], "integers"),
                         (5, "single id"), (np.zeros((1, 2), np.int32), "1-D integer array")]:
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            enc.decode(ids)
        assert "\n" not in str(e.value)


def test_stream_decoder_equals_decode_for_any_pushes(enc):
    rng = random.Random(2)
    tricky = [100, 105, 146, 147, 148, 149, 119, 120, 124, 143, 101, 102]  # [UNK], "#", "##", "[", "]", "sep", ...
    decoder = enc.stream_decoder()
    for _ in range(300):
        ids = [rng.choice(tricky) for _ in range(rng.randrange(0, 12))]
        pieces, i = [], 0
        while i < len(ids):
            n = rng.randrange(1, 4)
            pieces.append(decoder.push(ids[i:i + n] if n > 1 else ids[i]))
            i += n
        assert "".join(pieces) + decoder.flush() == enc.decode(ids) == reference_decode(ids, VOCAB_LINES), ids
    # a "[" is held until it cannot begin [UNK]; "#" "#" vanish
    assert decoder.push([147]) == "" and decoder.push([149]) == "[sep" and decoder.flush() == ""
    assert decoder.push([105]) == "" and decoder.push([105]) == "" and decoder.push([124]) == "你"


def test_encode_iter_and_encode_file_equal_encode(enc, tmp_path):
    rng = random.Random(3)
    text = "宇宙的意义是，Hello World!\r\n你好 hellos  Café\u2028GPT2是2020年。" * 20
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, 30)))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert joined(enc.encode_iter(chunks)) == enc.encode(text)
    for _ in range(100):
        text = "".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randrange(0, 40)))
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(0, 8)))) if text else []
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert joined(enc.encode_iter(chunks, allow_special=True)) == enc.encode(text, True), repr(text)
    assert joined(enc.encode_iter(["hel", "lo", "llo wor", "ld"])) == [119, 120, 122]
    assert joined(enc.encode_iter(["a[SE", "P]b"], allow_special=True)) == enc.encode("a[SEP]b", True)
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    arrays = list(enc.encode_file(str(path), chunk_chars=7))
    assert np.concatenate(arrays).tolist() == enc.encode(text) and arrays[0].dtype == np.int32


def test_vocab_file_is_split_on_newlines_only(tmp_path):
    """bert-base-chinese-vocab.txt holds a U+2028 line: splitlines() would shift every later id."""
    path = write_vocab(tmp_path / "bert-base-chinese-vocab.txt", VOCAB_LINES)
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    assert len(text.splitlines()) == len(VOCAB_LINES) + 1  # the hazard
    tokens = read_vocab(path)
    assert len(tokens) == len(VOCAB_LINES) and tokens[143] == "" and tokens[144] == "20"
    crlf = WordPieceEncoder.from_file(write_vocab(tmp_path / "crlf.txt", VOCAB_LINES, newline="\r\n"))
    assert crlf.tokens == tokens and crlf.encode("2020\u2028世界") == [144, 145, 126, 127]


def test_bad_vocab_files_are_one_line_errors(tmp_path):
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"[PAD]\n\xff\n")
    with pytest.raises(ValueError, match=r"bad.txt: not valid UTF-8"):
        read_vocab(str(bad_utf8))
    no_unk = write_vocab(tmp_path / "no-unk.txt", ["[PAD]", "[SEP]", "a"])
    with pytest.raises(ValueError, match=r"no-unk.txt: no \[UNK\] line"):
        read_vocab(no_unk)


def test_model_folders(tmp_path, monkeypatch):
    assert not is_wordpiece_folder(str(tmp_path))
    older = write_vocab(tmp_path / "bert-base-chinese-vocab.txt", VOCAB_LINES[:-1])
    assert is_wordpiece_folder(str(tmp_path)) and get_wordpiece_encoder(str(tmp_path)).vocab_size == 153
    write_vocab(tmp_path / "clue-vocab.txt", VOCAB_LINES)
    first = get_wordpiece_encoder(str(tmp_path))
    assert first.vocab_size == 154 and get_wordpiece_encoder(str(tmp_path)) is first  # clue-vocab.txt first; cached
    os.remove(older)
    monkeypatch.setattr(wordpiece, "BUNDLED_VOCAB", str(tmp_path / "missing" / "clue-vocab.txt"))
    with pytest.raises(FileNotFoundError, match="clue-vocab.txt: not found — put GPT2-ML's") as e:
        get_wordpiece_encoder(str(tmp_path / "missing"))
    assert "\n" not in str(e.value)


def test_module_does_not_import_tensorflow():
    code = "import sys, encoder.wordpiece; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": ROOT})
