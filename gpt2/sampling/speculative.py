"""Exact speculative decoding on the uncompiled sampler (`gpt2.sampling.direct.DirectSampler`).

A draft proposes the next few tokens cheaply; the model checks them all in one step over those
tokens (`DirectSampler.logits`: the same model step a plain decode runs, over k + 1 positions),
and the token choice at each position (`DirectSampler.choose`: the same settings code) says how
many to keep. Each round keeps the accepted drafts plus one token of the model's own, so it
makes 1 to k + 1 tokens for one pass of the model over the weights. Drafts: `DraftModel` (a
smaller model) or `PromptLookup` (copied from the context). Limits: see `check`.

Exactness:
- Greedy: a draft is kept while it equals the model's own choice at its position, and the first
  difference is replaced by that choice, so the tokens are those of plain decoding.
- Sampling: p = the model's distribution at a position and q = the draft's, both after every
  setting of the row (penalties over the tokens before it, logit bias, temperature, top-k, top-p;
  `choose.distribution`); a prompt-lookup draft is a point mass (q = 1 on its token). A draft x
  is kept with probability min(1, p(x) / q(x)); at the first rejection the token is drawn from
  max(0, p - q), normalised; after k kept drafts the model's own draw at the next position is
  added. Each token is then distributed as p (Leviathan et al. 2023; Chen et al. 2023). The
  acceptance tests and draft draws use a NumPy stream seeded by the row's seed, so a seeded call
  repeats, but its tokens are not those of plain seeded sampling (the same distribution only).

Draft length adapts within [1, the draft's `tokens`]: one more after a round that kept every
draft, fewer after a rejection. When a single draft token is rejected outright, the next 1, 4,
16 ... PAUSE_LIMIT rounds are plain steps, so a draft that never agrees costs a few tries, not
a draft step per token.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from gpt2.sampling import direct
from gpt2.sampling.pool import sampling_rows
from gpt2.sampling.settings import SettingsError

PAUSE_LIMIT = 256  # most plain steps between tries after a draft was rejected outright
DEFAULT_TOKENS = 8  # most draft tokens per round
START_TOKENS = 4  # draft tokens of the first round


@dataclasses.dataclass
class Stats:
    """What a draft did, summed over every call it served: rounds (model steps over drafts),
    plain steps (no draft), drafted tokens, accepted tokens and tokens made."""

    rounds: int = 0
    plain: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class DraftModel:
    """A smaller model with the same vocabulary (124M for 355M) proposes the drafts, token by token
    on its own uncompiled sampler and cache. model: a loaded GPT2, or a model folder (loaded with
    `load_options`, e.g. dtype). tokens: most drafts per round."""

    def __init__(self, model, tokens: int = DEFAULT_TOKENS, **load_options) -> None:
        if isinstance(model, (str, os.PathLike)):
            from gpt2.checkpoint import load_model

            model = load_model(model, **load_options)
        self.model = model
        self.tokens = _at_least_one(tokens, "draft tokens")
        self.stats = Stats()

    def start(self, target, slots):
        hp, own = target.hparams, self.model.hparams
        if own.n_vocab != hp.n_vocab:
            raise SettingsError("draft", f"the draft model's vocabulary ({own.n_vocab} tokens) differs from the "
                                         f"model's ({hp.n_vocab}); use a draft model of the same family")
        if slots > own.n_ctx:
            raise SettingsError("draft", f"the draft model's context ({own.n_ctx}) is shorter than prompt + length "
                                         f"({slots})")
        return _ModelDrafter(self.model, slots)


class PromptLookup:
    """Drafts copied from the context: after the most recent earlier occurrence of its last n
    tokens (n = ngram, then shorter), the tokens that followed. tokens: most drafts per round."""

    def __init__(self, ngram: int = 3, tokens: int = DEFAULT_TOKENS) -> None:
        self.ngram = _at_least_one(ngram, "PromptLookup ngram")
        self.tokens = _at_least_one(tokens, "draft tokens")
        self.stats = Stats()

    def start(self, target, slots):
        return self

    def propose(self, context, count, row, rng, sampling):
        """Up to `count` drafts after `context` (a list of ids), and None: a point-mass draft."""
        if count < 1 or len(context) < 2:
            return [], None
        ids = np.asarray(context, np.int64)
        for n in range(min(self.ngram, len(ids) - 1), 0, -1):
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # start i: ids[i:i+n], i+n < len
            found = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if len(found):
                start = int(found[-1]) + n
                return ids[start:start + count].tolist(), None
        return [], None

    def keep(self, valid):
        pass

    def close(self):
        pass


def _at_least_one(value, what):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SettingsError("draft", f"{what} must be an integer >= 1, got {value!r}")
    return value


def as_draft(draft):
    """A DraftModel or PromptLookup from what `sample_sequence(draft=...)` takes: one of them,
    the string "prompt-lookup", or a loaded model (drafting as DraftModel)."""
    if isinstance(draft, (DraftModel, PromptLookup)):
        return draft
    if draft == "prompt-lookup":
        return PromptLookup()
    if hasattr(draft, "hparams") and hasattr(draft, "blocks"):
        return DraftModel(draft)
    raise SettingsError("draft", f"draft must be gpt2.DraftModel(model), gpt2.PromptLookup() or 'prompt-lookup', "
                                 f"got {type(draft).__name__}")


class _ModelDrafter:
    """One call's draft model state: its cache and how many context tokens it holds."""

    def __init__(self, model, slots):
        self.sampler = direct.sampler_for(model)
        self.slots = tf.constant(slots, tf.int32)
        self.caches = self.sampler.new_caches(1, slots)
        self.fed = 0  # context tokens whose keys and values the cache holds

    def propose(self, context, count, row, rng, sampling):
        """`count` drafts after `context`, drawn from the draft model's distribution after the
        row's settings (greedy: its choice), and that distribution, float64 [count, V] (None
        when greedy)."""
        drafts, probs = [], []
        tokens = context[self.fed:]
        for _ in range(count):
            logits = self.sampler.logits(np.array([tokens], np.int32), tf.constant(self.fed, tf.int32), self.slots,
                                         self.caches, tf.constant(1, tf.int32))[0]
            self.fed += len(tokens)
            draft_ids = tf.constant(drafts, tf.int32, [len(drafts)])
            if sampling:
                q = _normalised(self.sampler.choose_with_probs(logits, row, draft_ids)[1].numpy()[0])
                token = _draw(q, rng)
                probs.append(q)
            else:
                token = int(self.sampler.choose(logits, row, draft_ids)[0].numpy()[0])
            drafts.append(token)
            tokens = [token]
        return drafts, (np.stack(probs) if probs else None)

    def keep(self, valid):
        """The context's first `valid` tokens are what the cache holds (the rest is rewritten)."""
        self.fed = min(self.fed, valid)

    def close(self):
        self.sampler.free_caches(self.caches)


def _normalised(probs):
    probs = np.maximum(probs.astype(np.float64), 0.0)
    return probs / probs.sum()


def _draw(probs, rng):
    """One token drawn from float64 probabilities [V] that sum to 1."""
    cumulative = np.cumsum(probs)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), len(probs) - 1))


def check(model, requests, jit_compile=None):
    """Raises a one-line SettingsError for what speculative decoding does not do: several rows,
    the compiled loop, log-probabilities, prompt + new tokens past the context (no sliding window)."""
    if len(requests) != 1:
        raise SettingsError("draft", f"speculative decoding (draft=) decodes one prompt at a time, got "
                                     f"{len(requests)}; call it once per prompt")
    request = requests[0]
    if jit_compile:
        raise SettingsError("draft", "speculative decoding runs on the uncompiled sampler; leave jit_compile unset")
    if request.logprobs:
        raise SettingsError("draft", "speculative decoding does not report log-probabilities; drop the draft")
    if len(request.prompt) + request.max_new > model.hparams.n_ctx:
        raise SettingsError("draft", f"speculative decoding stays within the context: prompt + length is "
                                     f"{len(request.prompt) + request.max_new}, more than {model.hparams.n_ctx}")


def decode_rows(model, requests, draft):
    """Runs one `gpt2.sampling.settings.Row` to the end with `draft`, as `api.decode_rows` does:
    a generator yielding, per round, [(0, token, None), ...] for the tokens that round made."""
    draft = as_draft(draft)
    check(model, requests)
    request = requests[0]
    sampler = direct.sampler_for(model)
    n_vocab = model.hparams.n_vocab
    row = {name: tf.constant(value) for name, value in sampling_rows([request], n_vocab).items()}
    counts = np.zeros([1, n_vocab], np.int32)
    sampling = request.settings.temperature > 0
    rng = np.random.default_rng([np.uint32(np.int32(request.seed).view(np.uint32)), 0x5BEC])
    slots = len(request.prompt) + request.max_new
    slots_tensor = tf.constant(slots, tf.int32)
    caches = sampler.new_caches(1, slots)
    drafter = draft.start(model, slots)
    context, made, fed = list(request.prompt), 0, 0
    length, pause, backoff = min(START_TOKENS, draft.tokens), 0, 1
    try:
        while made < request.max_new:
            count = 0 if pause else min(length, request.max_new - made - 1)
            drafts, q = drafter.propose(context, count, row, rng, sampling) if count else ([], None)
            tokens = np.array([context[fed:] + drafts], np.int32)
            position = tf.constant(fed, tf.int32)
            if not drafts:  # a plain step
                token = int(sampler.step(tokens, position, slots_tensor, caches, row)[0].numpy()[0])
                made_now, accepted = [token], 0
                pause = max(pause - 1, 0)
                draft.stats.plain += 1
            else:
                logits = sampler.logits(tokens, position, slots_tensor, caches, tf.constant(len(drafts) + 1, tf.int32))
                choice = sampler.choose_with_probs if sampling else sampler.choose
                chosen, p = choice(logits[0], row, tf.constant(drafts, tf.int32))
                made_now = _accepted(drafts, chosen.numpy(), p.numpy() if sampling else None, q, rng)
                accepted = len(made_now) - 1
                if accepted == len(drafts):
                    length = min(length + 1, draft.tokens)
                elif accepted == 0 and length == 1:
                    pause, backoff = backoff, min(backoff * 4, PAUSE_LIMIT)
                else:
                    length = max(1, min(length - 1, accepted + 1))
                if accepted:
                    backoff = 1
                draft.stats.rounds += 1
                draft.stats.drafted += len(drafts)
                draft.stats.accepted += accepted
            fed = len(context) + accepted  # the cache holds the context and the accepted drafts
            made_now = made_now[: request.max_new - made]
            if request.stop_token in made_now:
                made_now = made_now[: made_now.index(request.stop_token) + 1]
            context += made_now
            made += len(made_now)
            drafter.keep(fed)
            np.add.at(counts[0], made_now, 1)
            row["counts"], row["generated"] = tf.constant(counts), tf.constant([made], tf.int32)
            draft.stats.tokens += len(made_now)
            yield [(0, token, None) for token in made_now]
            if made_now[-1] == request.stop_token:
                return
    finally:  # also when the caller stops early (the generator is closed)
        drafter.close()
        sampler.free_caches(caches)


def _accepted(drafts, chosen, p, q, rng):
    """The tokens a round keeps: the accepted drafts, then the model's token (the correction at
    the first rejection, else its own choice after the last draft). chosen: the model's choice
    at each of the k + 1 positions; p: its distributions [k + 1, V] when sampling (None: greedy);
    q: the draft's [k, V] (None: point masses on the drafts)."""
    kept = []
    for i, token in enumerate(drafts):
        if p is None:  # greedy: kept while it is the model's choice
            if token != int(chosen[i]):
                return kept + [int(chosen[i])]
        else:
            target = _normalised(p[i])
            proposed = 1.0 if q is None else q[i][token]
            if rng.random() * proposed >= target[token]:  # rejected: draw from max(0, p - q)
                residual = target.copy()
                if q is None:
                    residual[token] = 0.0
                else:
                    residual = np.maximum(residual - q[i], 0.0)
                total = residual.sum()
                return kept + [_draw(residual / total if total > 0 else target, rng)]
        kept.append(token)
    return kept + [int(chosen[len(drafts)])]
