"""Byte-level BPE encoder, token for token identical to OpenAI's GPT-2 encoder.

Text is split into pre-tokens by GPT-2's regex (its character classes pinned to Unicode 16.0.0, see
pretokenizer.py), each pre-token's UTF-8 bytes are mapped to printable
unicode characters (the byte-to-unicode table), and the BPE merges of ``vocab.bpe`` are applied in rank
order: each round merges every non-overlapping occurrence, left to right, of the lowest-ranked adjacent
pair.  The merge loop uses a heap over a linked list of symbols, O(n log n) per pre-token, so very long
words without spaces stay fast.
"""

from __future__ import annotations

import codecs
import hashlib
import heapq
import itertools
import json
import operator
import os
from collections.abc import Iterable

import numpy as np

# OpenAI's pre-tokenizer with its character classes pinned to Unicode 16.0.0, so that ids do not
# depend on the installed `regex` release (see pretokenizer.py).
from encoder.pretokenizer import PRETOKEN_PATTERN, SAFE_CUT, pretokenize  # noqa: F401 (re-exported)

EOT_TEXT = "<|endoftext|>"

# OpenAI's GPT-2 BPE files (the copies in this package; every released model has the same two): their
# (size, sha256), and the sha256 of their parsed content (see _content_sha256), so that a copy differing
# only in line endings or JSON layout (e.g. checked out with CRLF line endings) is still recognised.
OPENAI_VOCAB_SIZE = 50257
OPENAI_FILES = {
    "encoder.json": (1042301, "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "vocab.bpe": (456318, "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
OPENAI_CONTENT_SHA256 = {
    "encoder.json": "179cad62d906b7217f1c9431ece06e7a78a7721f9580960147a6c1ea0a53fc65",
    "vocab.bpe": "04e3597d7996f292ca9b8b7285ca4d58a6ae171ac47d73fc7140ceb0c7a6bbc0",
}


# Pre-tokens are BPE-encoded once and cached.  The cache is bounded (cleared when full): over hundreds of
# MB of text or in a long-running server the set of distinct pre-tokens keeps growing, while a flat
# dict keeps the hit path a single lookup and frequent words re-enter the cache at once after a clear.
CACHE_MAX_ENTRIES = 1 << 16
# Longer pre-tokens are rare, seldom repeat and would make the cache's memory unbounded: not cached.
CACHE_MAX_CHARS = 256


def id_list(ids):
    """Token ids as a list or tuple: a 1-D integer array or any iterable of ids (a single id, a
    common slip, is refused with a one-line ValueError)."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be a 1-D integer array, got {ids.dtype} of shape {ids.shape}")
        return ids.tolist()
    if isinstance(ids, (int, np.integer)):
        raise ValueError(f"decode expects a sequence of token ids, got the single id {ids!r}")
    return ids if isinstance(ids, (list, tuple)) else list(ids)


def encode_with_special(text, special_text, special_id, encode_ordinary):
    """encode_ordinary(text), or with `special_text` given, each literal `special_text` as
    `special_id` and the text between them encoded on its own (both tokenizers' allow_special)."""
    if special_text is None:
        return encode_ordinary(text)
    ids = []
    for n, piece in enumerate(text.split(special_text)):
        if n:
            ids.append(special_id)
        ids += encode_ordinary(piece)
    return ids


def bytes_to_unicode():
    """GPT-2's byte-to-unicode table: a dict mapping each byte value 0..255 to a printable character.

    Bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the
    other 68 bytes (controls, space, soft hyphen, ...) map, in increasing order, to chr(256), chr(257), ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    table = {b: chr(b) for b in [*printable, *range(ord("®"), ord("ÿ") + 1)]}
    extra = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(extra)
            extra += 1
    return table


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}
# str.translate table turning a latin-1 decoded byte string into its byte-unicode form.
_LATIN1_TO_SYMBOLS = [BYTE_TO_UNICODE[b] for b in range(256)]


def bpe_merge(word, ranks):
    """Applies the BPE merges to ``word`` (a string of byte-unicode symbols) and returns the symbol list.

    ``ranks`` maps a symbol pair to its merge rank (lower merges first).  Result is exactly that of
    OpenAI's loop: in each round take the lowest-ranked adjacent pair and merge all its occurrences,
    left to right and non-overlapping ("aaa" -> "aa a"); stop when no adjacent pair has a rank.

    Implementation: symbols form a linked list indexed by their start offset; a heap holds
    (rank, start) of candidate pairs.  Entries popped for one rank come out left to right, which is
    exactly a round; pairs created during a round are pushed only when it ends, so a new pair cannot
    jump ahead of the round's remaining occurrences.  Stale heap entries are skipped: an entry is
    current iff the pair now starting at ``start`` still has that rank (ranks identify pairs uniquely).
    """
    n = len(word)
    sym = [*word, None]  # sym[i]: symbol starting at offset i, None once merged into its left neighbour
    nxt = list(range(1, n + 2))
    prv = list(range(-1, n))
    heap = []
    for i in range(n - 1):
        rank = ranks.get((word[i], word[i + 1]))
        if rank is not None:
            heap.append((rank, i))
    heapq.heapify(heap)
    while heap:
        round_rank = heap[0][0]
        created = []
        while heap and heap[0][0] == round_rank:
            _, i = heapq.heappop(heap)
            left = sym[i]
            j = nxt[i]
            if left is None or ranks.get((left, sym[j])) != round_rank:
                continue
            sym[i] = left + sym[j]
            sym[j] = None
            k = nxt[j]
            nxt[i] = k
            prv[k] = i
            h = prv[i]
            if h >= 0:
                rank = ranks.get((sym[h], sym[i]))
                if rank is not None:
                    created.append((rank, h))
            rank = ranks.get((sym[i], sym[k]))
            if rank is not None:
                created.append((rank, i))
        for entry in created:
            heapq.heappush(heap, entry)
    return [s for s in sym if s is not None]


class Encoder:
    """GPT-2 byte-level BPE: ``encode(text) -> list[int]`` and ``decode(ids) -> str``.

    Build it with :func:`get_encoder` (cached) or :meth:`from_files`; the constructor takes the parsed
    vocabulary (``{token: id}``) and the merge list (pairs of symbols, in rank order).  An encoder may be
    shared between threads.
    """

    def __init__(self, encoder, merges):
        self.encoder = dict(encoder)
        # The pairs' symbols as the vocabulary's own string objects (every symbol of a merge is a
        # token), not 100k copies of them: a few MiB less for as long as the encoder lives.
        symbol = {token: token for token in self.encoder}
        self.bpe_ranks = {(symbol.get(a, a), symbol.get(b, b)): rank for rank, (a, b) in enumerate(merges)}
        self.eot_token = self.encoder[EOT_TEXT]
        self._bytes_by_id = {i: bytes(UNICODE_TO_BYTE[c] for c in tok) for tok, i in self.encoder.items()}
        self._cache = {}

    @classmethod
    def from_files(cls, encoder_json, vocab_bpe):
        """Loads ``encoder.json`` and ``vocab.bpe`` (uncached; errors are one line naming the file).

        Files named as OpenAI's with OpenAI's vocabulary size must be OpenAI's files (their known size
        and sha256, or the same content); any other pair must have one merge per token beyond the 256
        bytes and the special tokens (``<...>`` tokens no merge makes), as BPE implies.
        """
        vocab = read_encoder_json(encoder_json)
        merges = read_vocab_bpe(vocab_bpe)
        for line_number, (a, b) in enumerate(merges, start=2):
            if a + b not in vocab:
                raise ValueError(f"{vocab_bpe}:{line_number}: merge result {a + b!r} is not in {encoder_json}")
        if len(vocab) == OPENAI_VOCAB_SIZE:
            _check_openai_file(encoder_json, "encoder.json", vocab)
            _check_openai_file(vocab_bpe, "vocab.bpe", merges)
        _check_merge_count(encoder_json, vocab_bpe, vocab, merges)
        return cls(vocab, merges)

    @property
    def vocab_size(self):
        """Number of tokens in the vocabulary (50257 for GPT-2)."""
        return len(self.encoder)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Returns the token ids of ``text``.

        By default ``<|endoftext|>`` in the text is ordinary text (7 tokens), as in OpenAI's encoder;
        with ``allow_special=True`` each literal ``<|endoftext|>`` becomes ``eot_token`` and the text
        between them is encoded on its own.
        """
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # lone surrogates -> U+FFFD
        return encode_with_special(text, EOT_TEXT if allow_special else None, self.eot_token, self._encode_ordinary)

    def _encode_ordinary(self, text):
        cached, encode_piece = self._cache.get, self._encode_piece
        # Pre-tokens are never empty, so their id tuples are never empty (falsy only when not cached).
        pieces = pretokenize(text)
        return list(itertools.chain.from_iterable([cached(p) or encode_piece(p) for p in pieces]))

    def _encode_piece(self, piece):
        symbols = piece.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_SYMBOLS)
        piece_ids = tuple(map(self.encoder.__getitem__, bpe_merge(symbols, self.bpe_ranks)))
        if len(piece) <= CACHE_MAX_CHARS:
            if len(self._cache) >= CACHE_MAX_ENTRIES:
                self._cache.clear()
            self._cache[piece] = piece_ids
        return piece_ids

    def clear_cache(self):
        """Empties the per-pre-token BPE cache (e.g. to measure cold-cache speed)."""
        self._cache.clear()

    def encode_iter(self, text_chunks, allow_special=False):
        """Encodes text given as consecutive chunks (any sizes), yielding lists of ids as they become final.

        The concatenated output equals ``encode("".join(text_chunks), allow_special)``: the text is only
        cut right after a non-whitespace character followed by whitespace.  No pre-token spans such a
        point, and the pre-tokens on either side never look across it (a whitespace run is matched
        from its start, ``\\s+(?!\\S)`` only looks ahead, and the run starts after the cut), nor can a
        ``<|endoftext|>`` span it.  Text without such a point (e.g. one huge word) is held until one comes.
        """
        pending = ""
        for chunk in text_chunks:
            searched_from = max(len(pending) - 1, 0)
            pending += chunk
            match = SAFE_CUT.search(pending, searched_from)
            if match:
                cut = match.end()
                yield self.encode(pending[:cut], allow_special)
                pending = pending[cut:]
        if pending:
            yield self.encode(pending, allow_special)

    def encode_file(self, path, allow_special=False, chunk_chars=1 << 20, dtype=np.int32, encoding="utf-8"):
        """Encodes a text file chunk by chunk, yielding 1-D numpy arrays of ids (``dtype``).

        Reads ``chunk_chars`` bytes at a time (see :func:`read_text_chunks`: line endings are kept as
        they are, a UTF-8 byte order mark at the start is not text), so memory is bounded by the chunk
        size (plus any whitespace-free stretch, see :meth:`encode_iter`); the concatenated arrays
        equal ``encode(text)`` of the whole file.  Bytes that are not ``encoding`` raise a one-line
        ``ValueError`` naming the file and the byte offset.
        """
        if chunk_chars < 1:
            raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
        for ids in self.encode_iter(read_text_chunks(path, encoding, chunk_chars), allow_special):
            yield np.asarray(ids, dtype=dtype)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Returns the text of token ids (any iterable of ints, numpy ints or a 1-D integer array).

        Bytes that are not valid UTF-8 (e.g. ids ending inside a multi-byte character) become U+FFFD.
        Raises ``ValueError`` naming the id if an id is not in the vocabulary or not an integer.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids):
        """Returns the raw bytes of token ids (see :meth:`decode` for accepted ids and errors)."""
        ids = id_list(ids)
        table = self._bytes_by_id
        try:
            data = b"".join([table[operator.index(i)] for i in ids])
        except (KeyError, TypeError):
            for i in ids:
                self._check_id(i)
            raise
        if bool in set(map(type, ids)):  # True and False are ints to Python, but never token ids
            for i in ids:
                self._check_id(i)
        return data

    def _check_id(self, token_id):
        """Raises ``ValueError`` if ``token_id`` is not an id of this vocabulary."""
        try:
            if isinstance(token_id, (bool, np.bool_)):
                raise TypeError
            index = operator.index(token_id)
        except TypeError:
            kind = type(token_id).__name__
            raise ValueError(f"invalid token id {token_id!r} ({kind}): ids must be integers") from None
        if index not in self._bytes_by_id:
            raise ValueError(f"invalid token id {index}: not in the vocabulary (ids 0..{max(self._bytes_by_id)})")

    def stream_decoder(self):
        """Returns a :class:`StreamDecoder` for text produced token by token."""
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental decoding: ``push(ids)`` returns only complete UTF-8 text, ``flush()`` the rest.

    Bytes of a character split across tokens are held back until the character is complete, so text
    can be shown as it is sampled.  ``"".join(pushes) + flush()`` equals ``encoder.decode(all_ids)``.
    After ``flush()`` the decoder is empty and can be reused.
    """

    def __init__(self, encoder):
        self._encoder = encoder
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids):
        """Adds token ids (an iterable or a single id) and returns the newly completed text."""
        if isinstance(ids, (int, np.integer, np.bool_)):
            ids = [ids]
        return self._utf8.decode(self._encoder.decode_bytes(ids))

    def flush(self):
        """Returns the held-back bytes (incomplete characters become U+FFFD) and resets the decoder."""
        return self._utf8.decode(b"", final=True)


UTF8_BOM = codecs.BOM_UTF8
ENCODING_HINT = "give the file's encoding with --encoding (e.g. --encoding latin-1)"


def read_text_chunks(path, encoding="utf-8", chunk_bytes=1 << 20, hint=ENCODING_HINT):
    """Yields the text of a file in pieces, read ``chunk_bytes`` bytes at a time and decoded
    incrementally, so memory stays bounded.

    Line endings are kept as they are ("\\r\\n" stays "\\r\\n").  A UTF-8 byte order mark at the
    start of a UTF-8 file is dropped (it marks the encoding; it is not text).  Bytes that are not
    valid ``encoding`` raise a one-line ``ValueError`` naming the file, the byte offset and ``hint``.
    """
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r}") from None
    decoder = codecs.getincrementaldecoder(name)()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            end = not block
            if offset == 0 and name == "utf-8":
                while len(block) < len(UTF8_BOM) and UTF8_BOM.startswith(block):  # a short first read
                    more = f.read(chunk_bytes)
                    if not more:
                        break
                    block += more
                if block.startswith(UTF8_BOM):
                    block, offset = block[len(UTF8_BOM):], len(UTF8_BOM)
            held = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=end)
            except UnicodeDecodeError as error:
                where = "at the end of the file" if end else f"at byte {offset - held + error.start}"
                label = "UTF-8" if name == "utf-8" else encoding
                raise ValueError(f"{path}: not {label} text ({error.reason} {where}); {hint}") from None
            offset += len(block)
            if text:
                yield text
            if end:
                return


def _read_text(path):
    """Returns a UTF-8 file's text; invalid UTF-8 is a one-line ``ValueError`` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _content_sha256(name, parsed):
    """sha256 of a parsed encoder.json (sorted compact JSON) or vocab.bpe (merges, one "a b" a line)."""
    if name == "encoder.json":
        text = json.dumps(parsed, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    else:
        text = "\n".join(f"{a} {b}" for a, b in parsed)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_openai_file(path, name, parsed):
    """Refuses a file named as OpenAI's BPE file `name` that is neither it nor the same content."""
    if os.path.basename(path) != name:
        return
    known_size, known_sha256 = OPENAI_FILES[name]
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if (len(data), digest) == (known_size, known_sha256):
        return
    if _content_sha256(name, parsed) == OPENAI_CONTENT_SHA256[name]:
        return
    raise ValueError(
        f"{path}: {len(data)} bytes (sha256 {digest[:16]}...), but OpenAI's GPT-2 {name} is {known_size} bytes "
        f"(sha256 {known_sha256[:16]}...): the file is damaged or edited; download the model again or copy "
        f"{os.path.join(PACKAGE_DIR, name)}"
    )


def _check_merge_count(encoder_json, vocab_bpe, vocab, merges):
    """Refuses merges that are not one per token beyond the 256 bytes and the special tokens."""
    made = {a + b for a, b in merges}
    unmade = [token for token in vocab if token not in made and token not in UNICODE_TO_BYTE]
    special = [token for token in unmade if len(token) > 1 and token.startswith("<") and token.endswith(">")]
    expected = len(vocab) - len(UNICODE_TO_BYTE) - len(special)
    if len(merges) == expected:
        return
    orphans = [token for token in unmade if token not in special]
    why = f"{len(orphans)} tokens (e.g. {orphans[0]!r}) are made by no merge" if orphans else "merges repeat"
    raise ValueError(
        f"{vocab_bpe}: {len(merges)} merges, but the {len(vocab)} tokens of {encoder_json} imply {expected} "
        f"(256 bytes and {len(special)} special tokens need none) and {why}: the file is truncated or belongs "
        f"to another vocabulary"
    )


def read_encoder_json(path):
    """Reads ``encoder.json`` (``{token: id}``); raises a one-line ``ValueError`` naming the file."""
    try:
        vocab = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: not a usable JSON file (nested too deeply)") from None
    if not isinstance(vocab, dict) or not all(
        isinstance(token, str) and type(i) is int and i >= 0 for token, i in vocab.items()
    ):
        raise ValueError(f"{path}: expected a JSON object mapping token strings to non-negative integer ids")
    if len(set(vocab.values())) != len(vocab):
        raise ValueError(f"{path}: two tokens share the same id")
    for token in [*BYTE_TO_UNICODE.values(), EOT_TEXT]:
        if token not in vocab:
            raise ValueError(f"{path}: missing required token {token!r}")
    symbols = set(UNICODE_TO_BYTE)
    for token in vocab:
        if not symbols.issuperset(token):
            raise ValueError(f"{path}: token {token!r} is not made of byte-level BPE symbols")
    return vocab


def read_vocab_bpe(path):
    """Reads ``vocab.bpe``: a ``#version`` header line, then one merge (two symbols) per line, by rank.

    Returns the list of merges as pairs; raises a one-line ``ValueError`` with file and line number.
    """
    lines = _read_text(path).split("\n")
    if not lines[0].startswith("#version"):
        raise ValueError(f"{path}:1: expected a '#version: ...' header line, got {lines[0][:40]!r}")
    if lines[-1] == "":
        lines.pop()  # the file ends with a newline
    merges = []
    for line_number, line in enumerate(lines[1:], start=2):
        pair = tuple(line.split())
        if len(pair) != 2:
            raise ValueError(f"{path}:{line_number}: expected two space-separated symbols, got {line[:40]!r}")
        merges.append(pair)
    return merges


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# A model folder's BPE files: OpenAI's names, then Hugging Face's names for the same two files
# (vocab.json is encoder.json, merges.txt is vocab.bpe with its #version line).
MODEL_DIR_FILES = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))
_loaded = {}  # ((real path, size, mtime_ns) of encoder.json, of vocab.bpe) -> Encoder


def get_encoder(model_name: str | None = None, models_dir: str | os.PathLike = "models") -> Encoder:
    """Returns the (cached) :class:`Encoder` of a model.

    With a ``model_name`` the files are ``models_dir/model_name/{encoder.json,vocab.bpe}``; without one,
    the GPT-2 files shipped inside this package are used (all GPT-2 sizes share them).  Encoders are
    cached by the resolved file paths, so repeated calls are free and share one BPE cache.
    """
    if model_name is None:
        directory, hint = PACKAGE_DIR, "the package data is missing, reinstall the package"
    else:
        directory = os.path.join(models_dir, model_name)
        option = "" if models_dir == "models" else f" --models-dir {models_dir}"
        hint = f"download the model with python download_model.py {model_name}{option}"
        from encoder import wordpiece  # here: wordpiece imports this module

        if wordpiece.is_wordpiece_folder(directory) or _is_gpt2ml_folder(directory):  # GPT2-ML's WordPiece
            return wordpiece.get_wordpiece_encoder(directory)
    encoder_json, vocab_bpe = (os.path.join(directory, name) for name in ("encoder.json", "vocab.bpe"))
    for path in (encoder_json, vocab_bpe):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: not found — {hint}")
    return _cached_encoder(encoder_json, vocab_bpe)


def _cached_encoder(encoder_json, vocab_bpe):
    # Keyed by each file's size and modification time too: a file changed since it was read is read
    # (and checked) again.
    key = tuple((os.path.realpath(path), os.stat(path).st_size, os.stat(path).st_mtime_ns)
                for path in (encoder_json, vocab_bpe))
    if key not in _loaded:
        _loaded[key] = Encoder.from_files(encoder_json, vocab_bpe)
    return _loaded[key]


def encoder_files_for_model_dir(model_dir):
    """The (vocabulary, merges) file paths a model folder's encoder is built from: its own
    encoder.json + vocab.bpe (OpenAI's layout), else its vocab.json + merges.txt (Hugging Face's
    names for the same files), else the GPT-2 files shipped with this package (a folder written
    by save_checkpoint has neither pair)."""
    for names in MODEL_DIR_FILES:
        paths = tuple(os.path.join(model_dir, name) for name in names)
        if all(os.path.isfile(path) for path in paths):
            return paths
    return tuple(os.path.join(PACKAGE_DIR, name) for name in MODEL_DIR_FILES[0])


def encoder_for_model_dir(model_dir):
    """The (cached) encoder of a model folder: a GPT2-ML folder's WordPiece tokenizer (one holding
    clue-vocab.txt or bert-base-chinese-vocab.txt, see encoder.wordpiece), else the BPE encoder
    from the files `encoder_files_for_model_dir` picks."""
    from encoder import wordpiece  # here: wordpiece imports this module

    if wordpiece.is_wordpiece_folder(model_dir) or _is_gpt2ml_folder(model_dir):
        return wordpiece.get_wordpiece_encoder(model_dir)  # no vocabulary file: a one-line error saying so
    return _cached_encoder(*encoder_files_for_model_dir(model_dir))


def _is_gpt2ml_folder(model_dir):
    """True for a GPT2-ML model folder (gpt2.formats.gpt2ml.claims), whose tokenizer is never GPT-2's BPE."""
    try:
        from gpt2.formats.gpt2ml import claims
    except ImportError:  # the encoder package alone
        return False
    return claims(model_dir)
