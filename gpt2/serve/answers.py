"""What the answers are made of (TensorFlow-free): a job's token events turned into each choice's
text, and OpenAI's `logprobs` and `usage` objects.

`Answer(plan, enc).follow(job)` reads an engine job's events into one ChoiceText per row and
yields each piece of final text as it becomes final; the rest are pure functions of a Plan
(gpt2.serve.protocol) and what an Answer collected.

Shapes: T = 5 alternatives per token (the sampler's and the scorer's).

Every number in an answer is finite (JSON has no NaN or infinity): a log-probability that is not
(a token with probability 0 in float32) is written as -9999.0, OpenAI's value for "very unlikely".
"""

import math

from gpt2.serve.protocol import ApiError, ChoiceText

UNLIKELY_LOGPROB = -9999.0  # OpenAI's stand-in for a token too unlikely to have a value


def finite_logprob(value):
    """A log-probability as a finite float (non-finite -> UNLIKELY_LOGPROB)."""
    value = float(value)
    return value if math.isfinite(value) else UNLIKELY_LOGPROB


class Answer:
    """What a job's events make, row by row: a ChoiceText (`choices`), the pieces of final text
    (`texts`) and, when the plan asks for logprobs, each token's (logprob, top ids [T], top
    logprobs [T]) (`infos`)."""

    def __init__(self, plan, enc):
        self.choices = [ChoiceText(enc, plan.max_tokens, plan.stops, plan.trim) for _ in plan.rows]
        self.texts = [[] for _ in plan.rows]
        self.infos = [[] for _ in plan.rows]

    def follow(self, job, wait=1.0):
        """Reads the job's events until every choice is finished. Yields (index, text, ids, infos)
        as row `index` gets final text or tokens (`ids` the tokens consumed since its last piece,
        `infos` theirs), and None after `wait` seconds without an event. An engine error event
        raises ApiError."""
        sent = [0] * len(self.choices)  # tokens of each row already yielded
        unfinished = len(self.choices)
        while unfinished:
            event = job.get(timeout=wait)
            if event is None:
                yield None
                continue
            if event[0] == "error":
                _, status, message, code = event
                raise ApiError(status, message, code=code, type_="server_error")
            _, index, ids, row_infos, row_done = event
            choice = self.choices[index]
            if choice.finished:
                continue
            if row_infos:
                self.infos[index] += row_infos
            text = choice.feed(ids)
            if row_done and not choice.finished:
                text += choice.end()
            if choice.finished:
                job.mark_unneeded(index)
                unfinished -= 1
            self.texts[index].append(text)
            start, sent[index] = sent[index], choice.tokens
            yield index, text, choice.ids[start:], self.infos[index][start:choice.tokens]


def usage(plan, choices):
    """OpenAI's usage: prompt tokens (each prompt once) and the tokens the choices consumed."""
    prompt_tokens = sum(len(tokens) for tokens in plan.prompt_tokens)
    completion_tokens = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _text(enc, token):
    return enc.decode([int(token)])


def completion_logprobs(enc, plan, prompt, ids, infos, scores=None, offset=None):
    """OpenAI's legacy logprobs object for a choice of prompt `prompt`: with `scores` (echo), the
    prompt's tokens first (the first one's values null), then the sampled `ids` with their
    `infos`. top_logprobs hold the plan's number of alternatives plus the chosen token.
    text_offset counts characters from the start of the prompt (as OpenAI's does, echoed or not)
    unless `offset` gives the first token's (a stream's later chunks). None unless the plan asks."""
    if plan.logprobs is None:
        return None
    entries = []
    if scores is not None:
        score = scores[prompt]
        for k, token in enumerate(plan.prompt_tokens[prompt]):
            alternatives = list(zip(score.top_ids[k].tolist(), score.top_logprobs[k].tolist()))
            entries.append((token, None, None) if k == 0 else (token, finite_logprob(score.logprobs[k]), alternatives))
    for token, (logprob, top_ids, top_logprobs) in zip(ids, infos):
        entries.append((token, finite_logprob(logprob), list(zip(top_ids.tolist(), top_logprobs.tolist()))))
    if offset is None:
        offset = 0 if scores is not None else len(plan.prompt_texts[prompt])
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token, logprob, alternatives in entries:
        text = _text(enc, token)
        tokens.append(text)
        token_logprobs.append(logprob)
        offsets.append(offset)
        offset += len(text)
        if alternatives is None:
            top.append(None)
            continue
        best = {}
        for alternative, value in alternatives[:plan.logprobs]:
            best.setdefault(_text(enc, alternative), finite_logprob(value))
        best.setdefault(text, logprob)
        top.append(best)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(enc, plan, ids, infos):
    """Chat's logprobs: {"content": [{token, logprob, bytes, top_logprobs}]} for `ids`; None unless the plan asks."""
    if plan.logprobs is None:
        return None

    def entry(token, logprob):
        return {"token": _text(enc, token), "logprob": finite_logprob(logprob),
                "bytes": list(enc.decode_bytes([int(token)]))}

    return {"content": [
        {**entry(token, logprob),
         "top_logprobs": [entry(t, v) for t, v in zip(top_ids.tolist()[:plan.logprobs], top_values.tolist())]}
        for token, (logprob, top_ids, top_values) in zip(ids, infos)
    ]}
