"""GPT2-ML's tokenizer: BERT's WordPiece ("FullTokenizer", lower-cased), TensorFlow-free.

GPT2-ML (imcaspar/gpt2-ml) tokenizes with BERT's tokenizer and ``clue-vocab.txt``; this module gives the same
ids for the same text and vocabulary file, behind the interface of the GPT-2 :class:`encoder.Encoder`
(``encode``, ``decode``, ``decode_bytes``, ``encode_iter``, ``encode_file``, ``stream_decoder``,
``eot_token``, ``vocab_size``).

Encoding, in BERT's order:
  1. clean: drop NUL, U+FFFD and control characters (categories Cc, Cf; but tab, LF and CR are whitespace);
     every whitespace character (space, tab, LF, CR, category Zs) becomes a space;
  2. put spaces around each CJK ideograph (:func:`is_cjk`), then split on whitespace (``str.split``);
  3. each word: lower-case, strip accents (NFD, drop category Mn), split off each punctuation character
     (:func:`is_punctuation`: ASCII symbols and Unicode P* categories);
  4. each piece: greedy longest-match-first WordPiece, later pieces looked up with a ``##`` prefix; a
     piece longer than 200 characters or with an unmatched rest is one ``[UNK]``.
No special tokens are added. Decoding is GPT2-ML's demo's: the tokens joined without spaces, then every
``[UNK]`` and every ``##`` removed from the joined text (``[CLS]``, ``[SEP]``, ``[PAD]`` stay as written).

Vocabulary files have one token per line; lines are split on "\\n" only (bert-base-chinese-vocab.txt has a
U+2028 entry, which ``str.splitlines`` would treat as a line break) and each is stripped of surrounding
whitespace as BERT's ``load_vocab`` does; the id of a token is its line number from 0, and for a token
written on two lines the later line's id is the one encoding gives.
"""

import operator
import os
import unicodedata

import numpy as np

from encoder.encoder import CACHE_MAX_CHARS, CACHE_MAX_ENTRIES, encode_with_special, id_list, read_text_chunks

PAD_TEXT = "[PAD]"
UNK_TEXT = "[UNK]"
SEP_TEXT = "[SEP]"  # GPT2-ML's end of text: its samplers stop at [SEP]
CONTINUATION = "##"  # prefix of a vocabulary entry that continues a word
# BERT's limit (google-research/bert and GPT2-ML's copy: 200; Hugging Face's BertTokenizer uses 100).
MAX_WORD_CHARS = 200

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# GPT2-ML's vocabulary files, in the order a model folder's are looked for; the first is also bundled.
VOCAB_FILE_NAMES = ("clue-vocab.txt", "bert-base-chinese-vocab.txt")
BUNDLED_VOCAB = os.path.join(PACKAGE_DIR, VOCAB_FILE_NAMES[0])

# The CJK ideograph blocks BERT splits off one by one (its _is_chinese_char), as inclusive ranges.
CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
_WHITESPACE = " \t\n\r"


def is_cjk(char):
    """True for a character of a CJK ideograph block (``CJK_RANGES``); kana and hangul are not."""
    cp = ord(char)
    return any(low <= cp <= high for low, high in CJK_RANGES)


def is_whitespace(char):
    """BERT's whitespace: space, tab, LF, CR and category Zs."""
    return char in _WHITESPACE or unicodedata.category(char) == "Zs"


def is_control(char):
    """BERT's control characters: categories Cc and Cf, except tab, LF and CR (whitespace)."""
    return char not in _WHITESPACE and unicodedata.category(char) in ("Cc", "Cf")


def is_punctuation(char):
    """BERT's punctuation: every printable ASCII character that is not a letter or digit, and category P*."""
    if char.isascii():
        return 33 <= ord(char) <= 126 and not char.isalnum()
    return unicodedata.category(char).startswith("P")


class _LazyTable(dict):
    """A ``str.translate`` table computed on first use of each character by ``rule(char) -> str``."""

    def __init__(self, rule):
        super().__init__()
        self._rule = rule

    def __missing__(self, cp):
        value = self[cp] = self._rule(chr(cp))
        return value


def _clean_char(char):
    if char in ("\0", "\ufffd") or is_control(char):
        return ""
    if is_whitespace(char):
        return " "
    return f" {char} " if is_cjk(char) else char


# Steps 1-2 (clean, space out CJK ideographs) and the punctuation split of step 3, as translate tables.
_CLEAN = _LazyTable(_clean_char)
_SPLIT_PUNCTUATION = _LazyTable(lambda char: f" {char} " if is_punctuation(char) else char)


def _normalize(word):
    """Step 3 before the punctuation split: lower case, then NFD with the nonspacing marks dropped."""
    word = word.lower()
    if word.isascii():
        return word
    return "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")


def basic_tokenize(text):
    """BERT's basic tokenizer (steps 1-3 above): the list of pieces WordPiece then splits."""
    return [piece for word in text.translate(_CLEAN).split() for piece in _pieces(word)]


def _pieces(word):
    return _normalize(word).translate(_SPLIT_PUNCTUATION).split()


def _is_cut_char(char):
    """True if text may be cut right after ``char`` without changing its tokens (see ``encode_iter``)."""
    return _CLEAN[ord(char)] in (" ", f" {char} ") or unicodedata.category(char) in ("Zl", "Zp")


def read_vocab(path):
    """Reads a WordPiece vocabulary file: the list of tokens, token id = index.

    Lines are split on "\\n" only and stripped (BERT's ``load_vocab``); a final newline ends the last line.
    Raises a one-line ``ValueError`` naming the file when it is not UTF-8 or lacks [PAD], [UNK] or [SEP].
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    tokens = [line.strip() for line in lines]
    for required in (PAD_TEXT, UNK_TEXT, SEP_TEXT):
        if required not in tokens:
            raise ValueError(f"{path}: no {required} line; not a BERT WordPiece vocabulary (one token per line)")
    return tokens


class WordPieceEncoder:
    """GPT2-ML's tokenizer: ``encode(text) -> list[int]`` and ``decode(ids) -> str`` (see the module docstring).

    Build it with :func:`get_wordpiece_encoder` (cached) or :meth:`from_file`; the constructor takes the
    token list (id = index).  ``pad_token``, ``unk_token`` and ``sep_token`` are the ids of [PAD], [UNK] and
    [SEP]; ``eot_token`` is [SEP], GPT2-ML's end of text.  An encoder may be shared between threads.
    """

    def __init__(self, tokens):
        self.tokens = list(tokens)
        # {token: id}; a token on two lines gets the later id (BERT's load_vocab fills a dict in line order).
        self.encoder = {token: i for i, token in enumerate(self.tokens)}
        self.pad_token = self.encoder[PAD_TEXT]
        self.unk_token = self.encoder[UNK_TEXT]
        self.sep_token = self.encoder[SEP_TEXT]
        self.eot_token = self.sep_token
        self.never_drawn = (self.pad_token,)  # the samplers ban it, as GPT2-ML's demo does
        self.normalizes_text = True  # decode(encode(text)) is lower-cased, without whitespace
        self._longest = max(map(len, self.encoder))  # no longer substring can match
        self._cache = {}  # word (after step 2) -> tuple of ids

    @classmethod
    def from_file(cls, path):
        """Loads a vocabulary file (uncached; errors are one line naming the file)."""
        return cls(read_vocab(path))

    @property
    def vocab_size(self):
        """Number of ids (lines of the vocabulary file): 8021 for clue-vocab.txt."""
        return len(self.tokens)

    # ------------------------------------------------------------------ encoding

    def encode(self, text, allow_special=False):
        """Returns the token ids of ``text``; no special tokens are added.

        By default a literal ``[SEP]`` in the text is ordinary text ("[", "sep", "]"), as in BERT's tokenizer;
        with ``allow_special=True`` each literal ``[SEP]`` becomes ``sep_token`` and the text between them is
        encoded on its own.
        """
        return encode_with_special(text, SEP_TEXT if allow_special else None, self.sep_token, self._encode_ordinary)

    def tokenize(self, text):
        """The tokens (vocabulary strings) of ``text``, as BERT's ``FullTokenizer.tokenize`` returns them."""
        return [self.tokens[i] for i in self.encode(text)]

    def _encode_ordinary(self, text):
        cache, ids = self._cache, []
        for word in text.translate(_CLEAN).split():
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = tuple(i for piece in _pieces(word) for i in self._wordpiece(piece))
                if len(word) <= CACHE_MAX_CHARS:
                    if len(cache) >= CACHE_MAX_ENTRIES:
                        cache.clear()
                    cache[word] = word_ids
            ids += word_ids
        return ids

    def _wordpiece(self, piece):
        """Greedy longest-match-first WordPiece of one piece: its ids, or ``(unk_token,)``."""
        n = len(piece)
        if n > MAX_WORD_CHARS:
            return (self.unk_token,)
        lookup, ids, start = self.encoder.get, [], 0
        while start < n:
            prefix = CONTINUATION if start else ""
            for end in range(min(n, start + self._longest), start, -1):
                token_id = lookup(prefix + piece[start:end])
                if token_id is not None:
                    break
            else:
                return (self.unk_token,)
            ids.append(token_id)
            start = end
        return ids

    def clear_cache(self):
        """Empties the per-word cache (e.g. to measure cold-cache speed)."""
        self._cache.clear()

    def encode_iter(self, text_chunks, allow_special=False):
        """Encodes text given as consecutive chunks (any sizes), yielding lists of ids as they become final.

        The concatenated output equals ``encode("".join(text_chunks), allow_special)``: the text is cut only
        right after a character that ends a word whatever follows (whitespace, U+2028/U+2029, a CJK
        ideograph), and no step looks across a word boundary; ``[SEP]`` holds none of these characters.
        Text without such a character (one huge word) is held until one comes.
        """
        pending = ""
        for chunk in text_chunks:
            cut = next((i + 1 for i in range(len(chunk) - 1, -1, -1) if _is_cut_char(chunk[i])), 0)
            if cut:
                pending += chunk[:cut]
                yield self.encode(pending, allow_special)
                pending = chunk[cut:]
            else:
                pending += chunk
        if pending:
            yield self.encode(pending, allow_special)

    def encode_file(self, path, allow_special=False, chunk_chars=1 << 20, dtype=np.int32, encoding="utf-8"):
        """Encodes a text file chunk by chunk, yielding 1-D numpy arrays of ids (``dtype``); their
        concatenation equals ``encode(text)`` of the whole file. The file is read as
        :meth:`encoder.Encoder.encode_file` reads it (``encoding``; a UTF-8 byte order mark is not text)."""
        if chunk_chars < 1:
            raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
        chunks = read_text_chunks(path, encoding, chunk_chars)
        for ids in self.encode_iter(chunks, allow_special):
            yield np.asarray(ids, dtype=dtype)

    # ------------------------------------------------------------------ decoding

    def convert_ids_to_tokens(self, ids):
        """The vocabulary strings of token ids (see :meth:`decode` for accepted ids and errors)."""
        ids = id_list(ids)
        indices = []
        for token_id in ids:
            try:
                index = operator.index(token_id)
            except TypeError:
                kind = type(token_id).__name__
                raise ValueError(f"invalid token id {token_id!r} ({kind}): ids must be integers") from None
            if not 0 <= index < len(self.tokens):
                raise ValueError(f"invalid token id {index}: not in the vocabulary (ids 0..{len(self.tokens) - 1})")
            indices.append(index)
        return [self.tokens[i] for i in indices]

    def decode(self, ids):
        """Returns the text of token ids (any iterable of ints, numpy ints or a 1-D integer array).

        GPT2-ML's demo's rule: tokens joined without spaces, then ``[UNK]`` and ``##`` removed from the whole.
        Raises ``ValueError`` naming the id if an id is not in the vocabulary or not an integer.
        """
        return "".join(self.convert_ids_to_tokens(ids)).replace(UNK_TEXT, "").replace(CONTINUATION, "")

    def decode_bytes(self, ids):
        """The UTF-8 bytes of :meth:`decode` (every token is whole characters)."""
        return self.decode(ids).encode("utf-8")

    def stream_decoder(self):
        """Returns a :class:`WordPieceStreamDecoder` for text produced token by token."""
        return WordPieceStreamDecoder(self)


class WordPieceStreamDecoder:
    """Incremental decoding: ``push(ids)`` returns the text that is final, ``flush()`` the rest.

    ``"".join(pushes) + flush()`` equals ``encoder.decode(all_ids)``.  Held back: a tail of the joined tokens
    that may still become ``[UNK]``, and an odd ``#`` that a following ``#`` would remove.  After
    ``flush()`` the decoder is empty and can be reused.
    """

    def __init__(self, encoder):
        self._encoder = encoder
        self._raw = ""  # joined token text, a proper prefix of [UNK]
        self._hash = False  # the text so far ends with an unpaired "#" of a run of them

    def push(self, ids):
        """Adds token ids (an iterable or a single id) and returns the newly final text."""
        if isinstance(ids, (int, np.integer)):
            ids = [ids]
        raw = self._raw + "".join(self._encoder.convert_ids_to_tokens(ids))
        # [UNK] occurrences never overlap and only the last "[" can start one not yet complete.
        start = raw.rfind("[", max(len(raw) - len(UNK_TEXT) + 1, 0))
        keep = start >= 0 and UNK_TEXT.startswith(raw[start:])
        self._raw = raw[start:] if keep else ""
        return self._remove_pairs((raw[:start] if keep else raw).replace(UNK_TEXT, ""))

    def _remove_pairs(self, text):
        # "##" removal leaves a run of k "#" as k % 2 of them, so a trailing run is held as its parity.
        text = ("#" if self._hash else "") + text
        body = text.rstrip("#")
        self._hash = (len(text) - len(body)) % 2 == 1
        return body.replace(CONTINUATION, "")

    def flush(self):
        """Returns the held-back text and resets the decoder."""
        text = (("#" if self._hash else "") + self._raw).replace(CONTINUATION, "")
        self._raw, self._hash = "", False
        return text


# ---------------------------------------------------------------------------- model folders

_loaded = {}  # real vocabulary path -> WordPieceEncoder


def wordpiece_vocab_file(folder):
    """The GPT2-ML vocabulary file a model folder holds (``VOCAB_FILE_NAMES``, in that order), else None."""
    for name in VOCAB_FILE_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def is_wordpiece_folder(folder):
    """True if ``folder`` holds a GPT2-ML vocabulary file (clue-vocab.txt or bert-base-chinese-vocab.txt)."""
    return wordpiece_vocab_file(folder) is not None


def get_wordpiece_encoder(folder=None):
    """The (cached) GPT2-ML tokenizer of a model folder: its own vocabulary file, else the bundled
    clue-vocab.txt.  Cached by the file's real path."""
    path = (folder and wordpiece_vocab_file(folder)) or BUNDLED_VOCAB
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found — put GPT2-ML's tokenization/clue-vocab.txt "
                                "(from github.com/imcaspar/gpt2-ml) in the model folder")
    key = os.path.realpath(path)
    if key not in _loaded:
        _loaded[key] = WordPieceEncoder.from_file(path)
    return _loaded[key]
