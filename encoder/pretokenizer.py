"""GPT-2's pre-tokenizer, with its character classes pinned to one Unicode version.

OpenAI's pattern cuts text into pre-tokens using three character classes: letters (\\p{L}), numbers
(\\p{N}) and white space (\\s). The `regex` module takes them from its own Unicode database, which
each release updates: a character assigned in a newer Unicode (e.g. U+18FA9) becomes a letter, and
the text around it splits differently ("\\U00018FA9'd" is one piece or two), so the token ids would
depend on the installed `regex`. Here the classes are those of Unicode 16.0.0 (the ranges in
`encoder/unicode_tables.py`, the version tiktoken 0.14 uses), whatever `regex` is installed:

- `PRETOKEN_PATTERN` spells the classes out as code-point ranges. It is the definition, but slow:
  `regex` tests a character against such a class range by range.
- `pretokenize(text)` returns the same pieces at the speed of the \\p pattern. Once per process, the
  installed `regex`'s classes of all code points are compared with the pinned ones. Text without a
  code point where they differ (any ASCII text, and nearly all other) goes through the \\p pattern
  as it is; otherwise those code points are first replaced by ASCII stand-ins of their pinned class
  ('a', '0', '\\t', '!': the pattern only looks at classes, and at ASCII characters that no
  stand-in equals where it matters), and the pieces are cut from the original text where the
  pattern cut the stand-in text.
"""

import functools

import numpy as np
import regex

from encoder.unicode_tables import LETTER, NUMBER, UNICODE_VERSION, WHITE_SPACE

__all__ = ["PRETOKEN_PATTERN", "SAFE_CUT", "UNICODE_VERSION", "pretokenize"]


def _class_body(spans):
    def char(code):
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"

    return "".join(char(a) if a == b else f"{char(a)}-{char(b)}" for a, b in spans)


_L, _N, _W = _class_body(LETTER), _class_body(NUMBER), _class_body(WHITE_SPACE)

# OpenAI's pre-tokenizer, case-sensitive on purpose ("'S" is not split like "'s"), with \p{L}, \p{N}
# and \s (and \S as [^\s]) spelled out in Unicode 16.0.0.
PRETOKEN_PATTERN = regex.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{_L}]+| ?[{_N}]+| ?[^{_W}{_L}{_N}]+|[{_W}]+(?![^{_W}])|[{_W}]+"
)
# A position between a non-whitespace char and a whitespace char is always a pre-token boundary that
# does not depend on the text on either side of it (see Encoder.encode_iter). REVERSE: find the last.
SAFE_CUT = regex.compile(rf"(?r)[^{_W}](?=[{_W}])")

_FAST_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_INSTALLED_CLASSES = regex.compile(r"(\p{L}+)|(\p{N}+)|(\s+)")  # the same classes, for _fixes
# Stand-in code point per class: 0 = keep the character, 1 other, 2 letter, 3 number, 4 white space.
_STAND_INS = np.array([0, ord("!"), ord("a"), ord("0"), ord("\t")], np.uint32)


@functools.cache
def _fixes():
    """(table, first): table is uint8 [0x110000], 0 where the installed `regex` puts a code point in
    its pinned class, else 1 + the pinned class (the index of its stand-in); first is the lowest code
    point with a fix. Computed once: about 0.1 s."""
    pinned = np.zeros(0x110000, np.uint8)
    for cls, spans in ((1, LETTER), (2, NUMBER), (3, WHITE_SPACE)):
        for first, last in spans:
            pinned[first:last + 1] = cls
    codes = np.arange(0x110000, dtype=np.uint32)
    codes[0xD800:0xE000] = ord("!")  # surrogates cannot be decoded; they are "other" in both
    everything = codes.tobytes().decode("utf-32-le")
    installed = np.zeros(0x110000, np.uint8)
    for match in _INSTALLED_CLASSES.finditer(everything):
        installed[match.start():match.end()] = match.lastindex
    table = np.where(installed != pinned, pinned + 1, 0).astype(np.uint8)
    differing = np.flatnonzero(table)
    return table, int(differing[0]) if len(differing) else 0x110000


def pretokenize(text):
    """The pre-tokens of `text`: `PRETOKEN_PATTERN.findall(text)`, computed faster (see above)."""
    if text.isascii():
        return _FAST_PATTERN.findall(text)
    table, first = _fixes()
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    if codes.max() < first:
        return _FAST_PATTERN.findall(text)
    fixes = table[codes]
    if not fixes.any():
        return _FAST_PATTERN.findall(text)
    stand_in_text = np.where(fixes, _STAND_INS[fixes], codes).tobytes().decode("utf-32-le", "surrogatepass")
    return [text[match.start():match.end()] for match in _FAST_PATTERN.finditer(stand_in_text)]
