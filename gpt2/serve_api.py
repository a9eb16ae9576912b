"""Request validation and per-choice text handling for the HTTP server (no HTTP, no TensorFlow).

`parse_generate` / `parse_completions` turn a decoded JSON body into a `Plan` (the rows to
sample and how to report them) or raise `ApiError` naming the offending field. `ChoiceText`
turns a row's tokens into text as they arrive: it holds back partial UTF-8 and any tail that
could be the start of a stop string, and decides `finish_reason`.
"""

import math

from gpt2.sampling.settings import row_seeds
from gpt2.serve_batching import Row

DEFAULT_GENERATE_LENGTH = 64  # /generate "length" when omitted
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_ROWS_PER_REQUEST = 128  # prompts x n (OpenAI caps n at 128)
MAX_STOP_STRINGS = 4


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
    return ApiError(400, message, param=param, code=code)


# ----------------------------------------------------------------------------- field checks

def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_field(body, name, default, low=None, high=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise bad(f"'{name}' must be an integer, got {value!r}", name)
    if low is not None and value < low:
        raise bad(f"'{name}' must be >= {low}, got {value}", name)
    if high is not None and value > high:
        raise bad(f"'{name}' must be <= {high}, got {value}", name)
    return value


def _number_field(body, name, default):
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise bad(f"'{name}' must be a number, got {value!r}", name)
    return float(value)


def _sampling(body, top_k_default=0):
    temperature = _number_field(body, "temperature", 1.0)
    if temperature < 0:
        raise bad(f"'temperature' must be >= 0 (0 = greedy), got {temperature:g}", "temperature")
    top_p = _number_field(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise bad(f"'top_p' must be in (0, 1] (1 = off), got {top_p:g}", "top_p")
    top_k = _int_field(body, "top_k", top_k_default, low=0)
    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2 ** 64):
        raise bad(f"'seed' must be an integer in [0, 2**64), got {seed!r}", "seed")
    return temperature, top_k, top_p, seed


def _bool_field(body, name):
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {value!r}", name)
    return value


def _check_fields(body, known):
    """The body must be a JSON object with no fields outside `known`."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _reject_unknown(body, known)


def _required_string(body, name):
    value = body.get(name)
    if not isinstance(value, str):
        raise bad(f"'{name}' is required and must be a string" if value is None else
                  f"'{name}' must be a string, got {type(value).__name__}", name)
    return value


def _reject_unknown(body, known):
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise bad(f"unrecognized request argument: {unknown[0]!r} (supported: {', '.join(sorted(known))})",
                  unknown[0])


def _check_context(prompt_tokens, length, n_ctx, length_name, prompt_name):
    if len(prompt_tokens) >= n_ctx:
        raise bad(f"the prompt is {len(prompt_tokens)} tokens; this model's context is {n_ctx} tokens, "
                  f"so a prompt can have at most {n_ctx - 1}", prompt_name, "context_length_exceeded")
    if len(prompt_tokens) + length > n_ctx:
        raise bad(f"this model's maximum context length is {n_ctx} tokens, however you requested "
                  f"{len(prompt_tokens) + length} tokens ({len(prompt_tokens)} in the prompt; {length} for "
                  f"the completion); reduce the prompt or '{length_name}' (at most {n_ctx - len(prompt_tokens)} "
                  f"for this prompt)", length_name, "context_length_exceeded")


class Plan:
    """What to run for one request and how to answer it.

    rows: gpt2.serve_batching.Row per choice (choice i = prompt i // n, sample i % n).
    prompt_texts: per prompt (for echo); prompt_lengths: tokens per prompt; stops: stop strings.
    """

    def __init__(self, rows, n, prompt_texts, prompt_lengths, stops=(), echo=False, stream=False,
                 include_usage=False):
        self.rows = rows
        self.n = n
        self.prompt_texts = prompt_texts
        self.prompt_lengths = prompt_lengths
        self.stops = list(stops)
        self.echo = echo
        self.stream = stream
        self.include_usage = include_usage


# ----------------------------------------------------------------------------- /generate

GENERATE_FIELDS = ("text", "length", "temperature", "top_k", "top_p", "seed")


def parse_generate(body, enc, n_ctx):
    """/generate: {"text", "length"?, "temperature"?, "top_k"?, "top_p"?, "seed"?}."""
    _check_fields(body, GENERATE_FIELDS)
    text = _required_string(body, "text")
    length = _int_field(body, "length", DEFAULT_GENERATE_LENGTH, low=1)
    temperature, top_k, top_p, seed = _sampling(body)
    tokens = enc.encode(text) if text else [enc.eot_token]
    _check_context(tokens, length, n_ctx, "length", "text")
    row = Row(tokens, length, temperature, top_k, top_p, row_seeds(seed, 1)[0])
    return Plan([row], 1, [text], [len(tokens)])


# ----------------------------------------------------------------------------- /v1/completions

COMPLETION_FIELDS = (
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
    "stream_options", "echo", "logprobs", "best_of", "presence_penalty", "frequency_penalty",
    "logit_bias", "suffix", "user",
)


def _prompts(body, enc):
    """The `prompt` field -> list of (text, tokens). A string, a list of strings, a list of token
    ids or a list of such lists; missing or "" starts from <|endoftext|> (OpenAI's behaviour)."""
    prompt = body.get("prompt")
    vocab = enc.vocab_size

    def from_tokens(ids, where):
        if not ids:
            return "", [enc.eot_token]
        if not all(_is_int(t) and 0 <= t < vocab for t in ids):
            raise bad(f"{where} must hold token ids in [0, {vocab})", "prompt")
        return enc.decode(ids), list(ids)

    def from_text(text):
        return text, (enc.encode(text) if text else [enc.eot_token])

    if prompt is None:
        return [from_text("")]
    if isinstance(prompt, str):
        return [from_text(prompt)]
    if not isinstance(prompt, list) or not prompt:
        raise bad("'prompt' must be a string, a non-empty list of strings, a list of token ids or "
                  "a list of token id lists", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [from_text(p) for p in prompt]
    if all(_is_int(t) for t in prompt):
        return [from_tokens(prompt, "'prompt'")]
    if all(isinstance(p, list) for p in prompt):
        return [from_tokens(p, f"'prompt[{i}]'") for i, p in enumerate(prompt)]
    raise bad("'prompt' must be a string, a list of strings, a list of token ids or a list of token "
              "id lists (not a mix)", "prompt")


def _stops(body):
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"'stop' allows at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise bad("'stop' strings must not be empty", "stop")
    return stops


def _unsupported(body, name, allowed):
    value = body.get(name)
    if value is not None and value not in allowed:
        raise bad(f"'{name}' is not supported by this server (got {value!r})", name, "unsupported_parameter")


def parse_completions(body, enc, n_ctx, model_ids):
    """OpenAI's legacy completions request -> Plan (raises ApiError)."""
    _check_fields(body, COMPLETION_FIELDS)
    model = _required_string(body, "model")
    if model not in model_ids:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_ids[0]!r}",
                       "model", "model_not_found")
    prompts = _prompts(body, enc)
    max_tokens = _int_field(body, "max_tokens", DEFAULT_MAX_TOKENS, low=1)
    n = _int_field(body, "n", 1, low=1, high=MAX_ROWS_PER_REQUEST)
    if len(prompts) * n > MAX_ROWS_PER_REQUEST:
        raise bad(f"{len(prompts)} prompts x n={n} is {len(prompts) * n} completions; at most "
                  f"{MAX_ROWS_PER_REQUEST} per request", "n")
    temperature, top_k, top_p, seed = _sampling(body)
    stops = _stops(body)
    stream = _bool_field(body, "stream")
    echo = _bool_field(body, "echo")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("'stream_options' must be an object with only 'include_usage'", "stream_options")
        include_usage = options.get("include_usage") is True
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise bad("'best_of' is not supported by this server (only best_of = n)", "best_of", "unsupported_parameter")
    _unsupported(body, "logprobs", ())
    _unsupported(body, "suffix", ())
    _unsupported(body, "presence_penalty", (0, 0.0))
    _unsupported(body, "frequency_penalty", (0, 0.0))
    _unsupported(body, "logit_bias", ({},))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("'user' must be a string", "user")
    for _, tokens in prompts:
        _check_context(tokens, max_tokens, n_ctx, "max_tokens", "prompt")
    seeds = row_seeds(seed, len(prompts) * n)
    rows = [Row(tokens, max_tokens, temperature, top_k, top_p, seeds[p * n + j])
            for p, (_, tokens) in enumerate(prompts) for j in range(n)]
    return Plan(rows, n, [text for text, _ in prompts], [len(tokens) for _, tokens in prompts],
                stops, echo, stream, include_usage)


# ----------------------------------------------------------------------------- output text

class ChoiceText:
    """One choice's text, built token by token.

    feed(tokens) returns the text that is now final. A row ends at <|endoftext|> or at a stop
    string (finish_reason "stop": the text ends before the stop string) or after max_tokens
    tokens ("length"). Text that might be the beginning of a stop string, and bytes of an
    unfinished UTF-8 character, are held back until they are decided. `tokens` counts the
    tokens consumed (not <|endoftext|>).
    """

    def __init__(self, enc, max_tokens, stops=()):
        self._decoder = enc.stream_decoder()
        self._eot = enc.eot_token
        self._stops = list(stops)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._max_tokens = max_tokens
        self._pending = ""
        self.tokens = 0
        self.finish_reason = None

    @property
    def finished(self):
        return self.finish_reason is not None

    def feed(self, tokens):
        out = []
        for token in tokens:
            if self.finished:
                break
            if token == self._eot:
                self._pending += self._decoder.flush()
                self._finish("stop", out)
                break
            self.tokens += 1
            self._pending += self._decoder.push([int(token)])
            if self.tokens >= self._max_tokens:
                self._pending += self._decoder.flush()
                self._finish("length", out)
                break
            if self._stopped(out):
                break
        if not self.finished and len(self._pending) > self._hold:
            cut = len(self._pending) - self._hold
            out.append(self._pending[:cut])
            self._pending = self._pending[cut:]
        return "".join(out)

    def end(self):
        """The row ended without a reason seen in its tokens (e.g. abandoned): release the rest."""
        if not self.finished:
            self._pending += self._decoder.flush()
            out = []
            self._finish("length", out)
            return "".join(out)
        return ""

    def _stopped(self, out):
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut < 0:
            return False
        out.append(self._pending[:cut])
        self._pending = ""
        self.finish_reason = "stop"
        return True

    def _finish(self, reason, out):
        if not self._stopped(out):
            out.append(self._pending)
            self._pending = ""
            self.finish_reason = reason
