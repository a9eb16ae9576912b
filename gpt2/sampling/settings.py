"""Sampling settings: every option of the sampler, its default and its validation, written once.

TensorFlow-free. The library (`gpt2.sample_sequence`), generate.py and the HTTP server all build a
`SamplingSettings`, so each rule and its error message exist in one place; the server answers a
`SettingsError` with a 400 naming `error.field`.

The order the sampler applies them in, per row and step (logits: float32 [V]):

1. `repetition_penalty` (CTRL / Hugging Face): every token in the prompt or generated so far has
   its logit divided by the penalty if positive, multiplied by it if negative (1 = off).
2. `presence_penalty` and `frequency_penalty` (OpenAI): a token generated so far (not the
   prompt) loses `presence_penalty` once plus `frequency_penalty` times its count (0 = off).
3. `logit_bias` (OpenAI): {token id: bias} added to those logits.
   Log-probabilities reported with tokens are of this distribution.
4. top-k (0 = off; `top_k >= n_vocab` is off too) and top-p (1 = off; 0 keeps the most likely
   token), OpenAI's order: top-k first, then the nucleus of what is left. Filtered tokens are
   removed (-inf), whatever the temperature.
5. temperature (0 = greedy: the most likely token), then one draw from the row's random stream.

Every float setting has a bounded range (the *_LIMIT constants below), so the float32 arithmetic
above stays finite for any accepted value: no penalty rounds to 0 in float32 and none scales a
logit past float32's range (the sampler's logits are a few hundred at most).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np

MAX_LOGIT_BIAS_ENTRIES = 1024
LOGIT_BIAS_LIMIT = 100.0  # as OpenAI: a bias of -100 bans a token, +100 forces it
PENALTY_LIMIT = 2.0  # OpenAI's range for presence/frequency penalties
TEMPERATURE_LIMIT = 100.0  # [0, 100]: at 100 every token is nearly equally likely already
REPETITION_PENALTY_LIMITS = (0.01, 100.0)  # logits divided or multiplied by at most 100
SEED_LIMIT = 2**64
MAX_TOKEN_ID_DIGITS = 18  # a logit_bias key with more digits is no token id (and int() of 4300+ digits raises)
# The float settings' bounds and rules, for every place that checks them: SamplingSettings, and
# the SavedModel export's in-graph checks (gpt2/savedmodel.py). name: (low, high, rule).
FLOAT_RULES = {
    "temperature": (0.0, TEMPERATURE_LIMIT, f"a finite number >= 0 and <= {TEMPERATURE_LIMIT:g} (0 = greedy)"),
    "top_p": (0.0, 1.0, "a number in [0, 1] (1 = off, 0 = the most likely token only)"),
    **{name: (-PENALTY_LIMIT, PENALTY_LIMIT, f"a number in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}] (0 = off)")
       for name in ("presence_penalty", "frequency_penalty")},
    "repetition_penalty": (*REPETITION_PENALTY_LIMITS, f"a finite number > 0, in [{REPETITION_PENALTY_LIMITS[0]:g}, "
                                                       f"{REPETITION_PENALTY_LIMITS[1]:g}] (1 = off)"),
}
SETTING_RULES_ORDER = ("temperature", "top_k", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


class SettingsError(ValueError):
    """A sampling setting or request value that cannot be used; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def shown(value, limit=60):
    """repr(value) for an error message, cut to about `limit` characters (a request may send a
    megabyte where a number belongs; repr of an int over 4300 digits raises)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def is_int(value):
    """True for integers (Python or NumPy), not for bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_int(value):
    """An integer, or an integral float (JSON clients send 40.0); None otherwise."""
    if is_int(value) or (isinstance(value, numbers.Real) and not isinstance(value, bool)
                         and float(value).is_integer()):
        return int(value)
    return None


def _as_number(value):
    """A finite real as float; None otherwise (bools, strings, infinities, NaN, ints beyond float)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _checked(value, field, low, high, rule, convert=_as_int):
    """convert(value) if it is not None and in [low, high], else a SettingsError naming `field`."""
    number = convert(value)
    if number is None or not low <= number <= high:
        raise SettingsError(field, f"{field} must be {rule}, got {shown(value)}")
    return number


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How one row picks its tokens (the module docstring gives the order and meaning, FLOAT_RULES
    the ranges). top_k: >= 0, 0 = off. logit_bias: {token id: bias in [-100, 100]} (ids may be
    strings of digits, as JSON object keys are); stored as a sorted tuple of (id, bias) pairs.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int | str, float] | tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        for name in SETTING_RULES_ORDER:
            if name == "top_k":
                value = _checked(self.top_k, name, 0, math.inf, "an integer >= 0 (0 = off)")
            else:
                value = _checked(getattr(self, name), name, *FLOAT_RULES[name], convert=_as_number)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, n_vocab: int) -> SamplingSettings:
        """Raises SettingsError if a logit_bias token id is outside [0, n_vocab)."""
        bad = [token for token, _ in self.logit_bias if token >= n_vocab]
        if bad:
            raise SettingsError("logit_bias", f"logit_bias token ids must be in [0, {n_vocab}), got {bad[:5]}")
        return self

    def replace(self, **changes) -> SamplingSettings:
        return dataclasses.replace(self, **changes)

    def banning(self, tokens: Sequence[int]) -> SamplingSettings:
        """These settings with a bias of -LOGIT_BIAS_LIMIT (a ban) on each of `tokens` that
        logit_bias does not set (the user's own bias wins): the one rule by which a tokenizer's
        `never_drawn` tokens (GPT2-ML's [PAD]) are never drawn, in generate.py and the server."""
        chosen = {token for token, _ in self.logit_bias}
        bans = [(int(token), -LOGIT_BIAS_LIMIT) for token in tokens if int(token) not in chosen]
        if not bans:
            return self
        banned = dataclasses.replace(self)
        object.__setattr__(banned, "logit_bias", tuple(sorted([*self.logit_bias, *bans])))  # past the entry limit
        return banned


def _logit_bias(value):
    if value is None:
        return ()
    items = value.items() if isinstance(value, dict) else value
    try:
        items = list(items)
    except TypeError:
        raise SettingsError("logit_bias", f"logit_bias must map token ids to biases, got {shown(value)}") from None
    if len(items) > MAX_LOGIT_BIAS_ENTRIES:
        raise SettingsError("logit_bias", f"logit_bias allows at most {MAX_LOGIT_BIAS_ENTRIES} tokens, "
                            f"got {len(items)}")
    pairs = {}
    for item in items:
        try:
            token, bias = item
        except (TypeError, ValueError):
            raise SettingsError("logit_bias", f"logit_bias must map token ids to biases, got {shown(value)}") from None
        token_id = _as_int(token)
        if (token_id is None and isinstance(token, str) and token.isascii() and token.isdigit()
                and len(token.lstrip("0")) <= MAX_TOKEN_ID_DIGITS):
            token_id = int(token)
        if token_id is None or not 0 <= token_id < 10**MAX_TOKEN_ID_DIGITS:
            raise SettingsError("logit_bias", f"logit_bias keys must be token ids (integers >= 0), got {shown(token)}")
        number = _as_number(bias)
        if number is None or abs(number) > LOGIT_BIAS_LIMIT:
            raise SettingsError("logit_bias", f"logit_bias values must be numbers in [-{LOGIT_BIAS_LIMIT:g}, "
                                f"{LOGIT_BIAS_LIMIT:g}], got {shown(bias)} for token {token_id}")
        pairs[token_id] = number
    return tuple(sorted(pairs.items()))


# ----------------------------------------------------------------------------- request values

def check_seed(seed, field="seed"):
    """None (fresh entropy) or an integer in [0, 2**64); returns it as int or None."""
    return None if seed is None else _checked(seed, field, 0, SEED_LIMIT - 1, "an integer in [0, 2**64)")


def row_seeds(seed, count):
    """`count` int32 row seeds from one seed (None: fresh entropy). Row i's seed depends only on
    `seed` and i, so a seeded row draws the same tokens whatever it is batched with (but for the
    rare near-tie that README's Sampling section describes)."""
    return np.random.SeedSequence(check_seed(seed)).generate_state(count).view(np.int32)


def check_length(length, field="length", limit=None):
    """New tokens to generate: an integer >= 1 (and <= `limit` when given)."""
    value = _checked(length, field, 1, math.inf, "an integer >= 1")
    if limit is not None and value > limit:
        raise SettingsError(field, f"{field} must be at most {limit}, got {value}")
    return value


def check_prompt(tokens, n_vocab, n_ctx, field="prompt"):
    """A prompt of token ids: non-empty, ids in [0, n_vocab), at most n_ctx tokens (generation
    may run past the context: the window slides, see `check_window_keep`). Returns a list of int."""
    if len(tokens) == 0:
        raise SettingsError(field, f"{field} is empty; start unconditional samples from <|endoftext|> (50256)")
    if len(tokens) > n_ctx:
        raise SettingsError(field, f"{field} is {len(tokens)} tokens, more than the model's context of "
                            f"{n_ctx}; shorten it")
    ids = [_as_int(token) for token in tokens]
    bad = [token for token, token_id in zip(tokens, ids) if token_id is None or not 0 <= token_id < n_vocab]
    if bad:
        raise SettingsError(field, f"{field} has token ids outside the vocabulary [0, {n_vocab}): {bad[:5]}")
    return ids


def default_window_keep(n_ctx):
    return n_ctx // 2


def check_window_keep(window_keep, n_ctx, field="window_keep"):
    """Tokens kept when the window slides past n_ctx: an integer in [1, n_ctx - 1]; None = n_ctx // 2."""
    if window_keep is None:
        return default_window_keep(n_ctx)
    return _checked(window_keep, field, 1, n_ctx - 1, f"an integer in [1, {n_ctx - 1}]")


@dataclasses.dataclass
class Row:
    """One row to decode: the one type from where a request is made (the library's functions,
    the server's protocol) to a slot of the pool. `Row.checked` validates every field once, where
    the row is made; whoever builds a Row directly has validated its parts already.

    prompt: token ids (1..n_ctx); settings: SamplingSettings (checked against the vocabulary);
    seed: int32 (the row's random stream); max_new: tokens to make; stop_token: ends the row
    (-1 = never); window_keep: tokens kept when the window slides (None = n_ctx // 2); logprobs:
    report each token's log-probability and the top alternatives."""

    prompt: list[int]
    settings: SamplingSettings
    seed: int
    max_new: int
    stop_token: int = -1
    window_keep: int | None = None
    logprobs: bool = False

    @classmethod
    def checked(cls, prompt: Sequence[int], settings: SamplingSettings, seed: int, max_new: int, n_vocab: int,
                n_ctx: int, stop_token: int | None = None, window_keep: int | None = None, logprobs: bool = False,
                field: str = "prompt") -> Row:
        if not isinstance(settings, SamplingSettings):
            raise TypeError(f"settings must be a gpt2.SamplingSettings, got {type(settings).__name__}")
        return cls(check_prompt(prompt, n_vocab, n_ctx, field), settings.check_vocab(n_vocab), int(seed),
                   check_length(max_new), -1 if stop_token is None else int(stop_token),
                   check_window_keep(window_keep, n_ctx), bool(logprobs))


# The per-row settings the library's functions take as keywords (one value, or one per row).
SETTING_NAMES = tuple(field.name for field in dataclasses.fields(SamplingSettings))


def pack_rows(settings, n_vocab):
    """One SamplingSettings per row as NumPy arrays for the compiled sampler (one rule for turning
    settings into numbers; e.g. top_k >= n_vocab becomes 0 = off): the float settings float32 [b],
    top_k int32 [b], logit_bias float32 [b, n_vocab] (zeros unless some row has a bias)."""
    for row in settings:
        row.check_vocab(n_vocab)
    packed = {name: np.array([getattr(s, name) for s in settings], np.float32) for name in FLOAT_RULES}
    packed["top_k"] = np.array([s.top_k if s.top_k < n_vocab else 0 for s in settings], np.int32)
    packed["logit_bias"] = np.zeros([len(settings), n_vocab], np.float32)
    for row, setting in enumerate(settings):
        for token, value in setting.logit_bias:
            packed["logit_bias"][row, token] = value
    return packed
