"""Tests of the GPT-2 byte-level BPE encoder package (``encoder``)."""

import json
import os
import random
import re
import shutil
import time

import numpy as np
import pytest
import regex

from encoder import EOT_TEXT, PRETOKEN_PATTERN, Encoder, bpe_merge, bytes_to_unicode, get_encoder, pretokenizer
from encoder.pretokenizer import SAFE_CUT, pretokenize

import paths  # tests/paths.py: the folders the tests read

DATA_DIR = os.path.join(paths.TESTS, "data")
CASES_PATH = os.path.join(DATA_DIR, "bpe", "cases.jsonl")
EOT_AS_TEXT = [27, 91, 437, 1659, 5239, 91, 29]
WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2007\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


@pytest.fixture(scope="module")
def enc():
    return get_encoder()


@pytest.fixture(scope="module")
def cases():
    with open(CASES_PATH, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def reference_bpe(word, ranks):
    """Slow, literal BPE: merge all non-overlapping occurrences of the lowest-ranked pair, repeat."""
    word = list(word)
    while len(word) > 1:
        ranked = [(ranks[pair], pair) for pair in zip(word, word[1:]) if pair in ranks]
        if not ranked:
            break
        first, second = min(ranked)[1]
        merged, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def random_text(rng, length):
    """Random text mixing all planes (no surrogates), controls, whitespace runs, contractions, specials."""
    pools = [
        lambda: rng.choice(WHITESPACE) * rng.randint(1, 3),
        lambda: chr(rng.randrange(0, 32)),
        lambda: chr(rng.randrange(32, 127)),
        lambda: rng.choice(["'s", "'S", "'t", "'re", "'VE", "'m", "'ll", "'d", "'", "''"]),
        lambda: rng.choice("aeiou  stnrlAB") * rng.randint(1, 4),
        lambda: chr(rng.randrange(0x80, 0x800)),
        lambda: chr(rng.choice([rng.randrange(0x800, 0xD800), rng.randrange(0xE000, 0x10000)])),
        lambda: chr(rng.randrange(0x10000, 0x110000)),
        lambda: rng.choice([EOT_TEXT, "😀", "👨‍👩‍👧", "🇫🇷", "e\u0301", "12345", "３４", "..."]),
        lambda: rng.choice(["\r\n", "\n\n", "  ", " \n", "\t "]) * rng.randint(1, 3),
    ]
    return "".join(rng.choice(pools)() for _ in range(length))


def random_split(rng, text, max_size):
    pieces, start = [], 0
    while start < len(text):
        size = rng.randint(1, max_size)
        pieces.append(text[start : start + size])
        start += size
    return pieces


# --- exact GPT-2 ids ---------------------------------------------------------------------------------


def test_cases_encode_to_exact_ids_and_decode_back(enc, cases):
    assert len(cases) > 100
    for case in cases:
        assert enc.encode(case["text"]) == case["ids"], case["text"][:80]
        assert enc.decode(case["ids"]) == case["text"]


def test_basics(enc):
    assert enc.eot_token == 50256
    assert enc.vocab_size == 50257
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("") == []
    assert enc.decode([]) == ""


def test_contractions_are_case_sensitive(enc):
    assert [enc.decode([i]) for i in enc.encode("it's")] == ["it", "'s"]
    assert [enc.decode([i]) for i in enc.encode("IT'S")] == ["IT", "'", "S"]


def test_byte_to_unicode_table():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[0] == "Ā"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


def test_random_unicode_round_trip(enc):
    rng = random.Random(1234)
    for _ in range(3000):
        text = random_text(rng, rng.randint(0, 30))
        assert enc.decode(enc.encode(text)) == text


def test_random_unicode_matches_tiktoken(enc):
    tiktoken = pytest.importorskip("tiktoken")
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(DATA_DIR, "tiny-model", "vocab.bpe"),
        encoder_json_file=os.path.join(DATA_DIR, "tiny-model", "encoder.json"),
    )
    reference = tiktoken.Encoding(
        "gpt2", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT_TEXT: 50256}
    )
    rng = random.Random(99)
    for _ in range(500):
        text = random_text(rng, rng.randint(0, 60))
        assert enc.encode(text) == reference.encode_ordinary(text), repr(text)
        assert enc.encode(text, allow_special=True) == reference.encode(text, allowed_special="all"), repr(text)


# --- the merge loop ----------------------------------------------------------------------------------


def test_bpe_merge_matches_reference_on_random_words(enc):
    rng = random.Random(7)
    symbols = bytes_to_unicode()
    alphabets = ["abcdefghijklmnopqrstuvwxyz", "aeiou", "ab", "a", "Ġ", "ĠĊ", "0123456789", "ĠtheanisoĊ"]
    for n in range(2000):
        if n % 4 == 0:
            word = "".join(symbols[b] for b in rng.randbytes(rng.randint(1, 12)))
        else:
            alphabet = rng.choice(alphabets)
            word = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert bpe_merge(word, enc.bpe_ranks) == reference_bpe(word, enc.bpe_ranks), word
    for length in range(1, 70):
        for word in ("a" * length, "Ġ" * length, "ab" * length, "aab" * length, "0" * length):
            assert bpe_merge(word, enc.bpe_ranks) == reference_bpe(word, enc.bpe_ranks), word


def test_bpe_merge_new_pair_with_lower_rank_waits_for_the_round():
    # ("ab", "a") ranks before ("a", "b") but only appears after merging "a b": the round merging
    # "a b" must first finish (ab ab), as in OpenAI's loop, and not produce "aba b".
    ranks = {("ab", "a"): 0, ("a", "b"): 1}
    assert reference_bpe("abab", ranks) == ["ab", "ab"]
    assert bpe_merge("abab", ranks) == ["ab", "ab"]


def test_bpe_merge_matches_reference_with_random_merge_tables():
    rng = random.Random(3)
    for _ in range(60):
        vocab, ranks = ["a", "b", "c"], {}
        while len(ranks) < 25:
            pair = (rng.choice(vocab), rng.choice(vocab))
            if pair not in ranks:
                ranks[pair] = len(ranks)
                vocab.append(pair[0] + pair[1])
        shuffled = list(ranks)
        rng.shuffle(shuffled)  # ranks no longer follow creation order
        ranks = {pair: rank for rank, pair in enumerate(shuffled)}
        for _ in range(40):
            word = "".join(rng.choice("abc") for _ in range(rng.randint(1, 30)))
            assert bpe_merge(word, ranks) == reference_bpe(word, ranks), (word, ranks)


@pytest.mark.parametrize("kind", ["repeated", "random"])
def test_long_word_is_fast_and_exact(enc, kind):
    rng = random.Random(5)
    if kind == "repeated":
        text = "a" * 100_000
    else:
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(100_000))
    start = time.perf_counter()
    ids = enc.encode(text)
    assert time.perf_counter() - start < 5.0
    assert enc.decode(ids) == text
    prefix = text[:3000]
    symbols = reference_bpe(prefix, enc.bpe_ranks)
    assert enc.encode(prefix) == [enc.encoder[s] for s in symbols]


def test_cache_is_bounded(enc, monkeypatch):
    monkeypatch.setattr("encoder.encoder.CACHE_MAX_ENTRIES", 10)
    fresh = Encoder(enc.encoder, sorted(enc.bpe_ranks, key=enc.bpe_ranks.get))
    text = " ".join(f"word{i} w{i}x" for i in range(200)) + " " + "z" * 1000
    assert fresh.encode(text) == enc.encode(text)
    assert 0 < len(fresh._cache) <= 10
    assert "z" * 1000 not in fresh._cache  # long pre-tokens are not cached


# --- special tokens ----------------------------------------------------------------------------------


def test_endoftext_is_ordinary_text_by_default(enc):
    assert enc.encode(EOT_TEXT) == EOT_AS_TEXT
    assert enc.encode(EOT_TEXT, allow_special=True) == [50256]
    assert enc.decode([50256]) == EOT_TEXT


def test_allow_special_encodes_text_between_specials_normally(enc):
    text = "Hello<|endoftext|> world<|endoftext|><|endoftext|>!\n<|endoftext"
    expected = (
        enc.encode("Hello") + [50256] + enc.encode(" world") + [50256, 50256] + enc.encode("!\n<|endoftext")
    )
    assert enc.encode(text, allow_special=True) == expected
    assert enc.decode(expected) == text
    assert 50256 not in enc.encode(text)


# --- decoding errors and inputs ------------------------------------------------------------------------


def test_decode_accepts_numpy(enc):
    ids = enc.encode("numpy ids ✓")
    for dtype in (np.int32, np.int64, np.uint16):
        assert enc.decode(np.array(ids, dtype=dtype)) == "numpy ids ✓"
    assert enc.decode([np.int64(i) for i in ids]) == "numpy ids ✓"
    assert enc.decode(iter(ids)) == "numpy ids ✓"
    assert enc.decode(tuple(ids)) == "numpy ids ✓"


@pytest.mark.parametrize("bad", [-1, 50257, 10**20, np.int64(60000)])
def test_decode_rejects_out_of_vocabulary_ids(enc, bad):
    with pytest.raises(ValueError, match=rf"invalid token id {int(bad)}: not in the vocabulary"):
        enc.decode([15496, bad, 995])


@pytest.mark.parametrize("bad", [1.0, "3", None, np.float32(2)])
def test_decode_rejects_non_integer_ids(enc, bad):
    with pytest.raises(ValueError, match=r"invalid token id .*: ids must be integers"):
        enc.decode(iter([15496, bad]))


def test_decode_rejects_float_arrays_and_single_ids(enc):
    with pytest.raises(ValueError, match="integer array"):
        enc.decode(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="single id"):
        enc.decode(15496)


def test_decode_partial_utf8_uses_replacement_char(enc):
    text = "é€😀 中文"
    ids = enc.encode(text)
    for end in range(len(ids) + 1):
        enc.decode(ids[:end])
    first_byte = enc.encoder[bytes_to_unicode()["😀".encode()[0]]]
    assert enc.decode([first_byte]) == "\ufffd"
    assert enc.decode(enc.encode("a") + [first_byte]) == "a\ufffd"


# --- streaming decoder ---------------------------------------------------------------------------------


def test_stream_decoder_holds_back_incomplete_characters(enc):
    emoji_bytes = "😀".encode()
    byte_ids = [enc.encoder[bytes_to_unicode()[b]] for b in emoji_bytes]
    dec = enc.stream_decoder()
    assert dec.push(enc.encode("hi ")) == "hi "
    assert dec.push(byte_ids[:1]) == ""
    assert dec.push(np.int64(byte_ids[1])) == ""
    assert dec.push(byte_ids[2:]) == "😀"
    assert dec.push(byte_ids[:2]) == ""
    assert dec.flush() == "\ufffd"
    assert dec.push([15496]) == "Hello"  # reusable after flush
    assert dec.flush() == ""


def test_stream_decoder_equals_decode(enc):
    rng = random.Random(11)
    byte_ids = [enc.encoder[c] for c in bytes_to_unicode().values()]
    for n in range(600):
        if n % 3:
            ids = enc.encode(random_text(rng, rng.randint(0, 30)))
        else:  # arbitrary byte soup, including invalid UTF-8
            ids = [rng.choice(byte_ids) for _ in range(rng.randint(0, 20))]
        dec = enc.stream_decoder()
        pushed = [dec.push(piece) for piece in random_split(rng, ids, 4)] if ids else []
        assert "".join(pushed) + dec.flush() == enc.decode(ids)


# --- chunked encoding ------------------------------------------------------------------------------------


def concat(arrays):
    return [int(i) for array in arrays for i in array]


def test_encode_iter_equals_whole_encode(enc, cases):
    rng = random.Random(21)
    texts = ["\n".join(c["text"] for c in cases), "".join(c["text"] for c in cases), "\n\n foo  bar \t\n x"]
    texts += [random_text(rng, 3000) for _ in range(3)]
    for text in texts:
        for allow_special in (False, True):
            whole = enc.encode(text, allow_special)
            for max_size in (1, 2, 7, 100):
                chunks = random_split(rng, text, max_size)
                assert concat(enc.encode_iter(chunks, allow_special)) == whole


def test_naive_cut_inside_whitespace_would_change_tokens(enc):
    # Why the cut rule matters: "\n\n" + " foo" is not what you get by encoding "\n\n " and "foo".
    assert enc.encode("\n\n foo") != enc.encode("\n\n ") + enc.encode("foo")
    assert concat(enc.encode_iter(["\n\n ", "foo"])) == enc.encode("\n\n foo")


def test_encode_iter_only_cuts_where_pretokens_are_unaffected():
    rng = random.Random(8)
    for _ in range(200):
        text = random_text(rng, 40)
        for cut in range(1, len(text)):
            if regex.fullmatch(r"\S\s", text[cut - 1 : cut + 1]):
                pieces = PRETOKEN_PATTERN.findall(text[:cut]) + PRETOKEN_PATTERN.findall(text[cut:])
                assert pieces == PRETOKEN_PATTERN.findall(text), (text, cut)


def test_encode_file_equals_whole_encode(enc, cases, tmp_path):
    rng = random.Random(4)
    text = "\r\n".join(c["text"] for c in cases[:80]) + EOT_TEXT.join(random_text(rng, 300) for _ in range(4))
    path = tmp_path / "data.txt"
    path.write_text(text, encoding="utf-8", newline="")
    for allow_special in (False, True):
        whole = enc.encode(text, allow_special)
        for chunk_chars in (1, 2, 3, 5, 13, 1 << 20):
            arrays = list(enc.encode_file(path, allow_special, chunk_chars=chunk_chars))
            assert all(a.dtype == np.int32 and a.ndim == 1 for a in arrays)
            assert concat(arrays) == whole
    assert concat(enc.encode_file(path, dtype=np.uint16)) == enc.encode(text)


# --- loading ----------------------------------------------------------------------------------------------


def test_get_encoder_is_cached_and_reads_model_dirs(enc):
    assert get_encoder() is enc
    tiny = get_encoder("tiny-model", models_dir=DATA_DIR)
    assert tiny is get_encoder("tiny-model", DATA_DIR + os.sep)
    assert tiny.encode("Hello world") == [15496, 995]
    assert tiny.eot_token == 50256


def write_model(tmp_path, encoder_json=None, vocab_bpe=None):
    model_dir = tmp_path / "models" / "x"
    model_dir.mkdir(parents=True)
    if encoder_json is not None:
        (model_dir / "encoder.json").write_text(encoder_json, encoding="utf-8")
    if vocab_bpe is not None:
        (model_dir / "vocab.bpe").write_text(vocab_bpe, encoding="utf-8")
    return str(tmp_path / "models")


def small_vocab(*extra):
    tokens = list(bytes_to_unicode().values()) + list(extra) + [EOT_TEXT]
    return json.dumps({t: i for i, t in enumerate(tokens)})


def load_error(models_dir, error_type):
    with pytest.raises(error_type) as info:
        get_encoder("x", models_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_files_name_the_file_and_how_to_download(tmp_path):
    models_dir = write_model(tmp_path, encoder_json=small_vocab())
    message = load_error(models_dir, FileNotFoundError)
    assert message.startswith(os.path.join(models_dir, "x", "vocab.bpe") + ": not found")
    assert "download_model.py x" in message
    with pytest.raises(FileNotFoundError, match=r"models[/\\]124M[/\\]encoder\.json: not found .* 124M"):
        get_encoder("124M", models_dir=str(tmp_path / "models"))


def test_small_model_files_load(tmp_path):
    models_dir = write_model(tmp_path, small_vocab("ab"), "#version: 0.2\na b\n")
    assert get_encoder("x", models_dir).encode("abab") == [256, 256]


@pytest.mark.parametrize(
    "encoder_json, vocab_bpe, expected",
    [
        ("{not json", "#version: 0.2\n", r"encoder\.json: not valid JSON \(Expecting"),
        ("[1, 2]", "#version: 0.2\n", r"encoder\.json: expected a JSON object"),
        ('{"a": "1"}', "#version: 0.2\n", r"encoder\.json: expected a JSON object"),
        ('{"a": 1}', "#version: 0.2\n", r"encoder\.json: missing required token"),
        (small_vocab("ab"), "#version: 0.2\na b\nab\n", r"vocab\.bpe:3: expected two space-separated symbols"),
        (small_vocab("ab"), "#version: 0.2\na b\n\nb c\n", r"vocab\.bpe:3: expected two"),
        (small_vocab("ab"), "a b\n", r"vocab\.bpe:1: expected a '#version"),
        (small_vocab("ab"), "#version: 0.2\na b\nb c\n", r"vocab\.bpe:3: merge result 'bc' is not in"),
        ('{"中": 0}', "#version: 0.2\n", r"encoder\.json: missing required token"),
        (small_vocab("中"), "#version: 0.2\n", r"encoder\.json: token '中' is not made of byte-level BPE symbols"),
        ('{"a": 1, "b": 1}', "#version: 0.2\n", r"encoder\.json: two tokens share the same id"),
        (small_vocab(), "", r"vocab\.bpe:1: expected a '#version"),
    ],
)
def test_malformed_files_give_one_line_value_errors(tmp_path, encoder_json, vocab_bpe, expected):
    message = load_error(write_model(tmp_path, encoder_json, vocab_bpe), ValueError)
    assert message.startswith(os.path.join(tmp_path, "models", "x", ""))
    assert re.search(expected, message), message


def test_non_utf8_file_is_a_value_error(tmp_path):
    models_dir = write_model(tmp_path, small_vocab(), None)
    (tmp_path / "models" / "x" / "vocab.bpe").write_bytes(b"#version: 0.2\n\xff\xfe\n")
    assert "vocab.bpe: not valid UTF-8" in load_error(models_dir, ValueError)


def test_encoder_can_be_built_from_parsed_data():
    vocab = json.loads(small_vocab("ab", "abab"))
    tiny = Encoder(vocab, [("a", "b"), ("ab", "ab")])
    assert tiny.encode("ababa") == [vocab["abab"], vocab["a"]]
    assert tiny.decode(tiny.encode("ababa")) == "ababa"


# --- the pre-tokenizer's Unicode version (issue 10 item 20) ------------------------------------------


def text_around(rng, chars, count):
    """Random short texts putting `chars` next to letters, digits, contractions and spaces."""
    contexts = ["{}'d", " {}1", "a{}", "{} {}", "'{}s", "{}{}'re", "1{}", "\t{}\n", "{}!"]
    return [rng.choice(contexts).format(rng.choice(chars), rng.choice(chars)) for _ in range(count)]


def test_newly_assigned_characters_split_as_in_unicode_16(enc):
    # U+18FA9 is unassigned in Unicode 16.0 (so not a letter): "'" joins it, as in tiktoken 0.14.
    assert PRETOKEN_PATTERN.findall("\U00018FA9'd") == ["\U00018FA9'", "d"]
    assert pretokenize("\U00018FA9'd") == ["\U00018FA9'", "d"]
    assert enc.encode("\U00018FA9'd") == [172, 246, 122, 102, 6, 67]  # tiktoken 0.14 gives the same
    for pattern in (PRETOKEN_PATTERN.pattern, SAFE_CUT.pattern):
        assert "\\p" not in pattern and "\\s" not in pattern and "\\S" not in pattern


def test_pretokenize_equals_the_pinned_pattern_where_regex_disagrees():
    table, first = pretokenizer._fixes()
    differing = [chr(c) for c in np.flatnonzero(table)] or ["\u00e9"]
    rng = random.Random(20)
    texts = text_around(rng, differing, 2000) + [random_text(rng, 40) + rng.choice(differing) for _ in range(300)]
    for text in texts:
        assert pretokenize(text) == PRETOKEN_PATTERN.findall(text), repr(text)


@pytest.fixture
def another_regex_database(monkeypatch):
    """The installed `regex` as if its Unicode database differed: 'é' and '丁' not letters, the
    unassigned U+18FA9 and the number '①' letters."""
    letter = r"(?:(?![\u00e9\u4e01])\p{L}|[\U00018fa9\u2460])"
    monkeypatch.setattr(pretokenizer, "_FAST_PATTERN", regex.compile(
        rf"(?s)'s|'t|'re|'ve|'m|'ll|'d| ?{letter}+| ?\p{{N}}+| ?(?:(?!\s|{letter}|\p{{N}}).)+|\s+(?!\S)|\s+"))
    monkeypatch.setattr(pretokenizer, "_INSTALLED_CLASSES", regex.compile(rf"({letter}+)|(\p{{N}}+)|(\s+)"))
    pretokenizer._fixes.cache_clear()
    yield
    pretokenizer._fixes.cache_clear()


def test_ids_do_not_depend_on_the_regex_database(another_regex_database):
    rng = random.Random(21)
    chars = ["\u00e9", "\u4e01", "\U00018fa9", "\u2460", "a", "1", " ", "'", "d", "\u0558"]
    for text in text_around(rng, chars, 3000):
        assert pretokenize(text) == PRETOKEN_PATTERN.findall(text), repr(text)
    assert pretokenize("caf\u00e9 \u2460\u2460 \U00018FA9'd") == ["caf\u00e9", " \u2460\u2460", " \U00018FA9'", "d"]


def test_newly_assigned_characters_match_tiktoken(enc):
    tiktoken = pytest.importorskip("tiktoken")
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    letters = tiktoken.Encoding("letters", pat_str=r"\p{L}", mergeable_ranks={bytes([b]): b for b in range(256)},
                                special_tokens={})
    table, _ = pretokenizer._fixes()
    differing = [chr(c) for c in np.flatnonzero(table)]
    # Letters new in Unicode 15.0, 15.1 and 16.0 (Kawi, CJK extension I, Garay) and ones regex may know.
    probes = ["\U00011F04", "\U0002EBF0", "\U00010D50", *differing[::97]]
    pinned = [bool(PRETOKEN_PATTERN.fullmatch(f"a{c}")) for c in probes]
    if [bool(letters.encode_ordinary(c)) for c in probes] != pinned:
        pytest.skip(f"tiktoken {tiktoken.__version__} uses another Unicode version than {pretokenizer.UNICODE_VERSION}")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(DATA_DIR, "tiny-model", "vocab.bpe"),
        encoder_json_file=os.path.join(DATA_DIR, "tiny-model", "encoder.json"),
    )
    reference = tiktoken.Encoding("gpt2", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks, special_tokens={})
    chars = probes + differing[::13] + ["a", "1", " ", "'"]
    for text in ["\U00018FA9'd", *text_around(random.Random(22), chars, 4000)]:
        assert enc.encode(text) == reference.encode_ordinary(text), repr(text)


# --- issue 24 item 12: damaged BPE files are refused ------------------------------------------------------


def copy_openai_files(tmp_path, names=("encoder.json", "vocab.bpe")):
    from encoder.encoder import PACKAGE_DIR

    model_dir = tmp_path / "models" / "x"
    model_dir.mkdir(parents=True)
    for source, name in zip(("encoder.json", "vocab.bpe"), names):
        shutil.copyfile(os.path.join(PACKAGE_DIR, source), model_dir / name)
    return model_dir


def test_item12_short_vocab_bpe_is_refused(tmp_path):
    model_dir = copy_openai_files(tmp_path)
    data = (model_dir / "vocab.bpe").read_bytes()
    (model_dir / "vocab.bpe").write_bytes(data[:-109])  # the file: 109 bytes short
    message = load_error(str(tmp_path / "models"), ValueError)
    assert message.startswith(f"{model_dir / 'vocab.bpe'}: 456209 bytes (sha256 ")
    assert "but OpenAI's GPT-2 vocab.bpe is 456318 bytes (sha256 1ce1664773c50f3e...)" in message
    # One edited merge (same size) is refused too; so is an edited encoder.json.
    (model_dir / "vocab.bpe").write_bytes(data.replace(b"\nh e\n", b"\ne h\n", 1))
    assert "OpenAI's GPT-2 vocab.bpe is 456318 bytes" in load_error(str(tmp_path / "models"), ValueError)
    (model_dir / "vocab.bpe").write_bytes(data)
    vocab = json.loads((model_dir / "encoder.json").read_text(encoding="utf-8"))
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]
    (model_dir / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    assert "OpenAI's GPT-2 encoder.json is 1042301 bytes" in load_error(str(tmp_path / "models"), ValueError)


def test_item12_openai_files_with_other_line_endings_or_layout_load(tmp_path, enc):
    model_dir = copy_openai_files(tmp_path)
    crlf = (model_dir / "vocab.bpe").read_bytes().replace(b"\n", b"\r\n")
    (model_dir / "vocab.bpe").write_bytes(crlf)  # e.g. checked out on Windows with autocrlf
    vocab = json.loads((model_dir / "encoder.json").read_text(encoding="utf-8"))
    (model_dir / "encoder.json").write_text(json.dumps(vocab, indent=1), encoding="utf-8")
    loaded = get_encoder("x", str(tmp_path / "models"))
    assert loaded.bpe_ranks == enc.bpe_ranks and loaded.encoder == enc.encoder


def test_item12_merges_count_is_checked_against_the_vocabulary(tmp_path):
    from encoder import encoder_for_model_dir

    # Hugging Face's names are not OpenAI's files: the count of merges is checked instead.
    model_dir = copy_openai_files(tmp_path, names=("vocab.json", "merges.txt"))
    assert encoder_for_model_dir(str(model_dir)).encode("Hello world") == [15496, 995]
    lines = (model_dir / "merges.txt").read_bytes().split(b"\n")
    (model_dir / "merges.txt").write_bytes(b"\n".join(lines[:-11] + [b""]))  # the last 10 merges lost
    with pytest.raises(ValueError) as info:
        encoder_for_model_dir(str(model_dir))
    assert str(info.value) == (
        f"{model_dir / 'merges.txt'}: 49990 merges, but the 50257 tokens of {model_dir / 'vocab.json'} imply 50000 "
        f"(256 bytes and 1 special tokens need none) and 10 tokens (e.g. 'Commission') are made by no merge: "
        f"the file is truncated or belongs to another vocabulary"
    )
    # Small vocabularies: special tokens (<...> tokens no merge makes) need no merge; other tokens do.
    models_dir = write_model(tmp_path / "small", small_vocab("ab", "<pad>"), "#version: 0.2\na b\n")
    assert get_encoder("x", models_dir).encode("ab") == [256]
    models_dir = write_model(tmp_path / "orphan", small_vocab("ab", "cd"), "#version: 0.2\na b\n")
    assert "1 merges, but the 259 tokens" in load_error(models_dir, ValueError)
    assert "1 tokens (e.g. 'cd') are made by no merge" in load_error(models_dir, ValueError)


# --- issue 24 item 14: small errors that were still raw -------------------------------------------


@pytest.mark.parametrize("ids", [[True], [15496, False], (True,), [np.True_]])
def test_item14_decode_refuses_bools(enc, ids):
    with pytest.raises(ValueError, match=r"invalid token id (np.)?(True|False)_? \(bool_?\): ids must be integers"):
        enc.decode(ids)
    with pytest.raises(ValueError, match="ids must be integers"):
        enc.stream_decoder().push(ids[-1])


def test_item14_encode_file_names_the_file_offset_and_encoding(enc, tmp_path):
    path = tmp_path / "latin.txt"
    text = "Caf\u00e9 cr\u00e8me " * 50
    path.write_bytes(text.encode("latin-1"))
    for chunk_chars in (1, 7, 1 << 20):  # the offset is the file's, whatever the reads
        with pytest.raises(ValueError) as info:
            list(enc.encode_file(str(path), chunk_chars=chunk_chars))
        assert str(info.value) == (
            f"{path}: not UTF-8 text (invalid continuation byte at byte 3); give the file's encoding with "
            "--encoding (e.g. --encoding latin-1)"
        )
    ids = np.concatenate(list(enc.encode_file(str(path), chunk_chars=7, encoding="latin-1"))).tolist()
    assert ids == enc.encode(text)
    path.write_bytes("\u00e9".encode()[:1])  # cut inside a character at the end
    with pytest.raises(ValueError, match="at the end of the file"):
        list(enc.encode_file(str(path)))
    with pytest.raises(ValueError, match="unknown text encoding 'no-such'"):
        list(enc.encode_file(str(path), encoding="no-such"))


def test_item14_utf8_byte_order_mark_is_not_text(enc, tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfHello world\r\n")
    for chunk_chars in (1, 2, 3, 4, 1 << 20):
        ids = np.concatenate(list(enc.encode_file(str(path), chunk_chars=chunk_chars))).tolist()
        assert ids == enc.encode("Hello world\r\n")
    path.write_bytes(b"Hello\xef\xbb\xbf")  # elsewhere it is a character of the text (U+FEFF)
    assert np.concatenate(list(enc.encode_file(str(path)))).tolist() == enc.encode("Hello\ufeff")
    path.write_bytes(b"\xef\xbb\xbf\xff")
    with pytest.raises(ValueError, match="at byte 3"):
        list(enc.encode_file(str(path)))
