"""Request validation for the HTTP server: JSON bodies in, `Plan`s out (no HTTP, no TensorFlow).

`Protocol(enc, n_ctx, model_ids, ...)` knows the served model's limits; its `parse_generate`,
`parse_completions` and `parse_chat` turn a decoded JSON body into a `Plan` (the rows to decode and
how to answer) or raise `ApiError` naming the offending field. Every row's sampling settings are a
`gpt2.SamplingSettings`, so each rule and message is the library's; a `SettingsError` becomes a
400 whose `param` is its field. Prompts are checked by byte length before they are encoded
(a token is at most `max_token_bytes` bytes), then encoded incrementally up to the context.

Every text -> ids step goes through the served model's tokenizer (`enc`: GPT-2's BPE, or GPT2-ML's
WordPiece), and so do stop strings (`stop_text`): a WordPiece decoding drops whitespace and lower-cases,
so chat's "\nUser:" is looked for as the model's text shows it ("user:"). Each row bans the tokens
the tokenizer declares `never_drawn` (GPT2-ML's [PAD]) unless the request's logit_bias sets them
(SamplingSettings.banning, generate.py's rule).
"""

import dataclasses
import math

from gpt2.sampling.settings import (
    Row,
    SamplingSettings,
    SettingsError,
    check_length,
    check_seed,
    is_int,
    row_seeds,
    shown,
)
from gpt2.serve import chat

DEFAULT_GENERATE_LENGTH = 64  # /generate "length" when omitted
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_MAX_TOKENS_LIMIT = 2048  # --max-tokens-limit: generation may run past the context
DEFAULT_MAX_REQUEST_ROWS = 32  # --max-request-rows: prompts x n in one request
CHAT_HISTORY_MODES = ("error", "truncate")  # --chat-history: what a chat too long for the context gets
MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 5  # OpenAI's limit for the legacy completions' logprobs
MAX_TOP_LOGPROBS = 5  # what the sampler reports per token (chat's top_logprobs up to this)

SETTING_FIELDS = ("temperature", "top_k", "top_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "logit_bias")


class ApiError(Exception):
    """An error answered as JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, type_="invalid_request_error", headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_
        self.headers = headers or {}

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message, param=None, code=None):
    """A 400 invalid_request_error."""
    return ApiError(400, message, param=param, code=code)


@dataclasses.dataclass
class Plan:
    """What to run for one request and how to answer it.

    rows: one gpt2.sampling.settings.Row per choice (choice i = prompt i // n, sample i % n); empty when only the prompt
    is echoed (max_tokens 0). prompt_texts, prompt_tokens: per prompt. stops: stop strings.
    logprobs: None or the number of alternatives per token (completions 0..5, chat 0..5).
    trim: strip the choice text's surrounding whitespace (chat). headers: extra response headers
    (X-Chat-History when --chat-history truncate changed the request). seeded: the request gave a
    seed (its sampled rows must repeat whatever else runs: the engine keeps them in the pool).
    """

    kind: str
    rows: list
    n: int
    prompt_texts: list
    prompt_tokens: list
    max_tokens: int
    stops: list = dataclasses.field(default_factory=list)
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    logprobs: int = None
    trim: bool = False
    headers: dict = dataclasses.field(default_factory=dict)
    seeded: bool = False


# ----------------------------------------------------------------------------- field checks

def _fields(body, known):
    """The body must be a JSON object with no fields outside `known`."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise bad(f"unrecognized request argument: {shown(unknown[0])} (supported: {', '.join(sorted(known))})",
                  unknown[0])


def _string(body, name, required=False):
    value = body.get(name)
    if value is None and required:
        raise bad(f"'{name}' is required and must be a string", name)
    if value is not None and not isinstance(value, str):
        raise bad(f"'{name}' must be a string, got {type(value).__name__}", name)
    return value


def _int(body, name, default, low=None, high=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        rule = "an integer" + (f" in [{low}, {high}]" if high is not None else f" >= {low}" if low is not None else "")
        raise bad(f"'{name}' must be {rule}, got {shown(value)}", name)
    return value


def _bool(body, name):
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {shown(value)}", name)
    return value


def _checked(check, *args, **kwargs):
    """check(*args, **kwargs), a SettingsError becoming a 400 naming its field."""
    try:
        return check(*args, **kwargs)
    except SettingsError as error:
        raise bad(str(error), error.field) from None


def _settings(body, n_vocab):
    """(SamplingSettings from the body's sampling fields (absent or null = the default), checked
    against the model's `n_vocab`; the seed (None = fresh))."""
    settings = _checked(SamplingSettings, **{name: body[name] for name in SETTING_FIELDS if body.get(name) is not None})
    return _checked(settings.check_vocab, n_vocab), _checked(check_seed, body.get("seed"))


def _stops(body):
    """The `stop` field: a string or up to 4 strings; "" and null are ignored (as OpenAI does)."""
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"'stop' allows at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return [s for s in stops if s]


def _stream(body):
    """(stream, include_usage) from 'stream' and 'stream_options'."""
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if (not isinstance(options, dict) or set(options) - {"include_usage"}
            or not isinstance(options.get("include_usage", False), (bool, type(None)))):
        raise bad("'stream_options' must be an object with only 'include_usage' (true or false)", "stream_options")
    return stream, options.get("include_usage") is True


def _user(body):
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("'user' must be a string", "user")


def _unsupported(body, name, allowed=(None,), why="is not supported by this server"):
    value = body.get(name)
    if value not in allowed:
        raise bad(f"'{name}' {why} (got {shown(value)})", name, "unsupported_parameter")


# ----------------------------------------------------------------------------- the protocol

class Protocol:
    """Validates requests for one served model.

    enc: the model's Encoder; n_ctx, n_vocab: the model's context and vocabulary; model_ids: the
    names a request's `model` may use (the first is reported); max_tokens_limit: the largest
    max_tokens / length (generation may run past n_ctx: the window slides); max_request_rows:
    prompts x n allowed in one request; chat_history: "error" (a chat longer than the context is a
    400) or "truncate" (see `_fit_chat`).
    """

    def __init__(self, enc, n_ctx, model_ids, n_vocab=None, max_tokens_limit=DEFAULT_MAX_TOKENS_LIMIT,
                 max_request_rows=DEFAULT_MAX_REQUEST_ROWS, chat_history="error"):
        if chat_history not in CHAT_HISTORY_MODES:
            raise ValueError(f"chat_history must be one of {CHAT_HISTORY_MODES}, got {chat_history!r}")
        self.chat_history = chat_history
        self.enc = enc
        self.n_ctx = n_ctx
        self.n_vocab = n_vocab or enc.vocab_size
        self.model_ids = tuple(dict.fromkeys(model_ids))
        self.max_tokens_limit = max_tokens_limit
        self.max_request_rows = max_request_rows
        self.max_token_bytes = max(len(enc.decode_bytes([i])) for i in range(enc.vocab_size))
        self.never_drawn = tuple(getattr(enc, "never_drawn", ()))
        self.max_prompt_bytes = n_ctx * self.max_token_bytes

    # ------------------------------------------------------------------ prompts

    def encode(self, text, param="prompt"):
        """A text prompt -> token ids ("" = <|endoftext|>), refused before any BPE work when its
        UTF-8 is longer than n_ctx tokens could be, and encoded only as far as the context."""
        if not text:
            return [self.enc.eot_token]
        if len(text) > self.max_prompt_bytes or len(text.encode("utf-8", "surrogatepass")) > self.max_prompt_bytes:
            raise bad(f"'{param}' is over {self.max_prompt_bytes} bytes of UTF-8, more than this model's "
                      f"context of {self.n_ctx} tokens can hold; shorten it", param, "context_length_exceeded")
        step = 4 * self.n_ctx  # characters per piece: about a context's worth of English
        chunks = (text[i:i + step] for i in range(0, len(text), step))
        tokens = []
        for ids in self.enc.encode_iter(chunks):
            tokens += ids
            if len(tokens) > self.n_ctx:
                raise self._too_long(f"'{param}' is more than {self.n_ctx} tokens", param)
        return tokens

    def _too_long(self, what, param):
        return bad(f"{what}; this model's context is {self.n_ctx} tokens: shorten it", param, "context_length_exceeded")

    def _token_prompt(self, ids, where):
        if not ids:
            return "", [self.enc.eot_token]
        if not all(is_int(t) and 0 <= t < self.n_vocab for t in ids):
            raise bad(f"{where} must hold token ids in [0, {self.n_vocab})", "prompt")
        if len(ids) > self.n_ctx:
            raise self._too_long(f"{where} is {len(ids)} tokens", "prompt")
        return self.enc.decode(ids), [int(t) for t in ids]

    def prompts(self, prompt):
        """The completions `prompt` field -> [(text, tokens)]: a string, a list of strings, a list
        of token ids or a list of such lists; missing or "" starts from <|endoftext|> (as OpenAI)."""
        if prompt is None:
            return [("", self.encode(""))]
        if isinstance(prompt, str):
            return [(prompt, self.encode(prompt))]
        if not isinstance(prompt, list) or not prompt:
            raise bad("'prompt' must be a string, a non-empty list of strings, a list of token ids or "
                      "a list of token id lists", "prompt")
        if len(prompt) > self.max_request_rows and not all(is_int(t) for t in prompt):
            raise bad(f"'prompt' has {len(prompt)} prompts; at most {self.max_request_rows} per request", "prompt")
        if all(isinstance(p, str) for p in prompt):
            return [(p, self.encode(p, f"prompt[{i}]")) for i, p in enumerate(prompt)]
        if all(is_int(t) for t in prompt):
            return [self._token_prompt(prompt, "'prompt'")]
        if all(isinstance(p, list) for p in prompt):
            return [self._token_prompt(p, f"'prompt[{i}]'") for i, p in enumerate(prompt)]
        raise bad("'prompt' must be a string, a list of strings, a list of token ids or a list of token "
                  "id lists (not a mix)", "prompt")

    # ------------------------------------------------------------------ requests (shared parts, then parse_*)

    def _model(self, body):
        model = _string(body, "model", required=True)
        if model not in self.model_ids:
            raise ApiError(404, f"the model {shown(model)} does not exist; this server serves {self.model_ids[0]!r} "
                           "(start it with --served-model-name NAME to accept another name)", "model",
                           "model_not_found")

    def _max_tokens(self, body, name, default, low=1):
        value = body.get(name)
        if value is None:
            return default
        if low == 0 and is_int(value) and value == 0:
            return 0
        try:
            return check_length(value, name, limit=self.max_tokens_limit)
        except SettingsError as error:
            raise bad(str(error) + (" (--max-tokens-limit)" if is_int(value) and value > 1 else ""), name) from None

    def _n(self, body, prompts):
        n = _int(body, "n", 1, low=1)
        if len(prompts) * n > self.max_request_rows:
            raise bad(f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} completions; at most "
                      f"{self.max_request_rows} per request", "n")
        return n

    def stop_text(self, stops):
        """Stop strings as the model's decoded text shows them: decode(encode(s)) for a tokenizer
        whose decoding normalises text (WordPiece: lower-cased, no whitespace; those that vanish
        are dropped); GPT-2's byte-level BPE gives back every string as it is, so they stay."""
        if not getattr(self.enc, "normalizes_text", False):
            return list(stops)
        return [text for text in (self.enc.decode(self.enc.encode(s)) for s in stops) if text]

    def _plan(self, kind, prompts, n, settings, seed, max_tokens, stops=(), logprobs=None, **fields):
        """The Plan of `prompts` [(text, tokens)] x n rows (none when max_tokens is 0)."""
        rows = []
        if max_tokens:
            settings = settings.banning(self.never_drawn)
            seeds = row_seeds(seed, len(prompts) * n)
            rows = [Row(tokens, settings, int(seeds[p * n + j]), max_tokens, logprobs=logprobs is not None)
                    for p, (_, tokens) in enumerate(prompts) for j in range(n)]
        return Plan(kind, rows, n, [text for text, _ in prompts], [tokens for _, tokens in prompts], max_tokens,
                    self.stop_text(stops), logprobs=logprobs, seeded=seed is not None, **fields)

    GENERATE_FIELDS = ("text", "length", "seed", *SETTING_FIELDS)

    def parse_generate(self, body):
        """/generate: {"text", "length"?: 64, sampling settings?, "seed"?} -> Plan."""
        _fields(body, self.GENERATE_FIELDS)
        text = _string(body, "text", required=True)
        length = self._max_tokens(body, "length", DEFAULT_GENERATE_LENGTH)
        settings, seed = _settings(body, self.n_vocab)
        prompts = [(text, self.encode(text, "text"))]
        return self._plan("generate", prompts, 1, settings, seed, length)

    COMPLETION_FIELDS = (
        "model", "prompt", "max_tokens", "n", "stop", "seed", "stream", "stream_options", "echo", "logprobs",
        "best_of", "suffix", "user", *SETTING_FIELDS,
    )

    def parse_completions(self, body):
        """OpenAI's legacy completions request -> Plan (raises ApiError)."""
        _fields(body, self.COMPLETION_FIELDS)
        self._model(body)
        echo = _bool(body, "echo")
        max_tokens = self._max_tokens(body, "max_tokens", DEFAULT_MAX_TOKENS, low=0 if echo else 1)
        settings, seed = _settings(body, self.n_vocab)
        stops = _stops(body)
        stream, include_usage = _stream(body)
        logprobs = _int(body, "logprobs", None, low=0, high=MAX_LOGPROBS)
        prompts = self.prompts(body.get("prompt"))
        n = self._n(body, prompts)
        best_of = _int(body, "best_of", None, low=1)  # an integer, never a bool (True == 1 in Python)
        if best_of is not None and best_of != n:
            raise bad("'best_of' is not supported by this server (only best_of = n)", "best_of",
                      "unsupported_parameter")
        _unsupported(body, "suffix", (None, ""))
        _user(body)
        return self._plan("completion", prompts, n, settings, seed, max_tokens, stops, logprobs, echo=echo,
                          stream=stream, include_usage=include_usage)

    CHAT_FIELDS = (
        "model", "messages", "max_tokens", "max_completion_tokens", "n", "stop", "seed", "stream",
        "stream_options", "logprobs", "top_logprobs", "user", "response_format", "tools", "tool_choice",
        "parallel_tool_calls", "functions", "function_call", "store", "metadata", "service_tier",
        *SETTING_FIELDS,
    )

    def parse_chat(self, body):
        """OpenAI's chat completions request -> Plan: the messages go through `chat.render`, and
        generation stops at the next turn marker (see gpt2.serve.chat)."""
        _fields(body, self.CHAT_FIELDS)
        self._model(body)
        try:
            turns = chat.turns(body.get("messages"))
        except ValueError as error:
            raise bad(str(error), "messages") from None
        if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
            raise bad("give 'max_tokens' or 'max_completion_tokens', not both", "max_tokens")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        headers = {}
        if self.chat_history == "truncate":
            text, tokens, max_tokens, headers = self._fit_chat(turns, body, name)
        else:
            text = chat.transcript([turn for _, turn in turns])
            tokens = self.encode(text, "messages")
            room = max(min(self.n_ctx - len(tokens), self.max_tokens_limit), 1)
            max_tokens = self._max_tokens(body, name, room)
        settings, seed = _settings(body, self.n_vocab)
        stops = _stops(body)
        stream, include_usage = _stream(body)
        logprobs = None
        if _bool(body, "logprobs"):
            logprobs = _int(body, "top_logprobs", 0, low=0, high=MAX_TOP_LOGPROBS)
        elif body.get("top_logprobs") is not None:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        prompts = [(text, tokens)]
        n = self._n(body, prompts)
        _user(body)
        if body.get("tools") or body.get("functions"):
            raise bad("tools and functions are not supported by this server (GPT-2 is a base model)",
                      "tools" if body.get("tools") else "functions", "unsupported_parameter")
        _unsupported(body, "tool_choice", (None, "none", "auto"))
        _unsupported(body, "function_call", (None, "none", "auto"))
        response_format = body.get("response_format")
        if response_format is not None and response_format != {"type": "text"}:
            raise bad("only 'response_format': {\"type\": \"text\"} is supported", "response_format",
                      "unsupported_parameter")
        return self._plan("chat", prompts, n, settings, seed, max_tokens, chat.STOPS + stops, logprobs, stream=stream,
                          include_usage=include_usage, trim=True, headers=headers)

    def _fit_chat(self, turns, body, name):
        """--chat-history truncate: the oldest turns that are not system turns are dropped (the
        last message never is) until the prompt leaves room for the answer: max_tokens, but at
        most half the context; then max_tokens is capped to what fits (and to --max-tokens-limit:
        a larger value is capped rather than refused). Returns (text, tokens, max_tokens, headers),
        headers saying what changed (X-Chat-History: dropped_messages=D, max_tokens=M)."""
        requested = body.get(name)
        if requested is not None:
            requested = _checked(check_length, requested, name)
        answer = min(requested or self.n_ctx, max(self.n_ctx // 2, 1))
        budget = self.n_ctx - answer  # tokens the prompt may take
        separator = len(self.enc.encode(chat.SEPARATOR + chat.MARKERS["user"])) - len(
            self.enc.encode(chat.MARKERS["user"]))
        last = len(turns) - 1
        keep = [is_system or i == last for i, (is_system, _) in enumerate(turns)]
        used = len(self.enc.encode(chat.MARKERS["assistant"]))
        used += sum(len(self.encode(text, "messages")) + separator for (_, text), kept in zip(turns, keep) if kept)
        for i in range(last - 1, -1, -1):  # newest first; the first that does not fit ends the history
            if keep[i]:
                continue
            text = turns[i][1]
            room = budget - used - separator
            if room <= 0 or len(text.encode("utf-8", "surrogatepass")) > room * self.max_token_bytes:
                break  # more bytes than `room` tokens can hold: no BPE work spent on it
            cost = len(self.enc.encode(text)) + separator
            if used + cost > budget:
                break
            keep[i], used = True, used + cost
        kept = [i for i in range(len(turns)) if keep[i]]
        while True:
            text = chat.transcript([turns[i][1] for i in kept])
            try:
                tokens = self.encode(text, "messages")
            except ApiError:
                tokens = None
            optional = [i for i in kept if not turns[i][0] and i != last]
            if tokens is not None and len(tokens) < self.n_ctx or not optional:
                break
            kept.remove(optional[0])  # the estimate was short (it never is for GPT-2's BPE): one more
        if tokens is None or len(tokens) >= self.n_ctx:
            raise self._too_long("the system messages and the last message leave no room for an answer", "messages")
        fits = self.n_ctx - len(tokens)
        max_tokens = min(requested or fits, fits, self.max_tokens_limit)
        dropped = len(turns) - len(kept)
        headers = {}
        if dropped or (requested is not None and max_tokens < requested):
            headers["X-Chat-History"] = f"dropped_messages={dropped}, max_tokens={max_tokens}"
            headers["Access-Control-Expose-Headers"] = "X-Chat-History"  # browsers may read it (with CORS)
        return text, tokens, max_tokens, headers

    def parse_tokenize(self, body):
        """vLLM's /tokenize: {"prompt", "add_special_tokens"?, "model"?} -> token ids. Special
        tokens written out in the text (<|endoftext|>) are recognised, as Hugging Face tokenizers do."""
        _fields(body, ("prompt", "add_special_tokens", "model"))
        _bool(body, "add_special_tokens")
        _string(body, "model")
        text = _string(body, "prompt", required=True)
        if len(text.encode("utf-8", "surrogatepass")) > 4 * self.max_prompt_bytes:
            raise bad(f"'prompt' is over {4 * self.max_prompt_bytes} bytes", "prompt")
        return self.enc.encode(text, allow_special=True)

    def parse_detokenize(self, body):
        """vLLM's /detokenize: {"tokens", "model"?} -> token ids to decode."""
        _fields(body, ("tokens", "model"))
        _string(body, "model")
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(is_int(t) and 0 <= t < self.n_vocab for t in tokens):
            raise bad(f"'tokens' must be a list of token ids in [0, {self.n_vocab})", "tokens")
        if len(tokens) > 64 * self.n_ctx:
            raise bad(f"'tokens' has {len(tokens)} ids; at most {64 * self.n_ctx}", "tokens")
        return tokens


# ----------------------------------------------------------------------------- output text

class ChoiceText:
    """One choice's text, built token by token.

    feed(tokens) returns the text that is now final. A row ends at <|endoftext|> or at a stop
    string (finish_reason "stop": the text ends before the stop string) or after max_tokens
    tokens ("length"). Text that might be the beginning of a stop string, and bytes of an
    unfinished UTF-8 character, are held back until they are decided. `ids` holds the tokens
    consumed (not <|endoftext|>). With trim (chat), leading whitespace is dropped and trailing
    whitespace held back until more text follows (dropped at the end).
    """

    def __init__(self, enc, max_tokens, stops=(), trim=False):
        self._decoder = enc.stream_decoder()
        self._eot = enc.eot_token
        self._stops = list(stops)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._max_tokens = max_tokens
        self._pending = ""
        self._trim = trim
        self._started = False  # trim: some non-whitespace text was emitted
        self._spaces = ""  # trim: whitespace held back
        self.ids = []
        self.finish_reason = None

    @property
    def tokens(self):
        return len(self.ids)

    @property
    def finished(self):
        return self.finish_reason is not None

    def feed(self, tokens):
        out = []
        for token in tokens:
            if self.finished:
                break
            if token == self._eot:
                self._finish("stop", out)
                break
            self.ids.append(int(token))
            self._pending += self._decoder.push([int(token)])
            if len(self.ids) >= self._max_tokens:
                self._finish("length", out)
                break
            if self._stopped(out):
                break
        if not self.finished and len(self._pending) > self._hold:
            cut = len(self._pending) - self._hold
            out.append(self._pending[:cut])
            self._pending = self._pending[cut:]
        return self._trimmed("".join(out))

    def end(self, reason="length"):
        """The row ended without a reason seen in its tokens (e.g. cancelled): release the rest."""
        if self.finished:
            return ""
        out = []
        self._finish(reason, out)
        return self._trimmed("".join(out))

    def _trimmed(self, text):
        if not self._trim:
            return text
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        body = text.rstrip()
        if self.finished:  # trailing whitespace is dropped
            text, self._spaces = (self._spaces + body if body else ""), ""
        elif body:  # whitespace before this text goes out with it; this text's trailing whitespace waits
            text, self._spaces = self._spaces + body, text[len(body):]
        else:
            text, self._spaces = "", self._spaces + text
        return text

    def _stopped(self, out):
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut < 0:
            return False
        out.append(self._pending[:cut])
        self._pending = ""
        self.finish_reason = "stop"
        return True

    def _finish(self, reason, out):
        self._pending += self._decoder.flush()
        if not self._stopped(out):
            out.append(self._pending)
            self._pending = ""
            self.finish_reason = reason
