"""What a GPT-2 SavedModel holds: the weights, three signatures and the BPE files.

`ServingModule(model)` is a tf.Module whose functions become the SavedModel's signatures
(`python -m gpt2.export` writes it; every input has a leading batch axis, so TF Serving's row
format works):

* `serving_default` = `generate(tokens, lengths, max_new_tokens, temperature, top_k, top_p, seed)`:
  the compiled decode loop of `gpt2.sampling.decoder` (prompt ingestion, the key/value cache, the
  window sliding past n_ctx, one random stream per row), with `gpt2.sample_sequence`'s semantics:
  a row with seed `s` draws what `sample_sequence` draws for a row whose seed is `s` (the library
  derives its rows' seeds with `gpt2.sampling.settings.row_seeds`). Returns `tokens` [b, n] (the
  new tokens, padded with PAD_TOKEN past a row's `num_tokens`) and `num_tokens` [b].
* `logits(tokens)` -> `logits` [b, s, V].
* `score(tokens, lengths)` -> `token_logprobs` [b, s - 1]: log p(token t + 1 | tokens <= t) as
  `gpt2.score` gives it, 0 where t + 1 >= the row's length.

Generation pads the request's rows to one of a few batch sizes B (`batch_sizes`; groups of the
largest when there are more rows) and calls `decode`: the decoder's loop run until every row is
done (`Decoder.run_to_end`), compiled with XLA by default. It is traced for each B with static
shapes (a trace with an unknown batch axis compiled into a program about 3x slower), and its
shapes depend only on B, so XLA compiles it once per batch size, whatever the prompt lengths,
lengths asked for and settings.
`logits` and `score` are not compiled with XLA (they would compile once per input shape).

Inputs are checked in the graph (batch axes agree, prompt widths within the context, lengths in
range, token ids in the vocabulary, settings in range): a bad request fails with
InvalidArgumentError "assertion failed: [<what is wrong>]" and the server stays up.

Shapes: b = batch, B = a batch size of the decode loop, P = prompt width, n = max(max_new_tokens),
N = the export's max_new_tokens, s = sequence, V = n_vocab.
"""

import functools

import tensorflow as tf

from gpt2.sampling import decoder as decoder_lib
from gpt2.sampling.api import POOL_SIZES, pool_size_for
from gpt2.sampling.settings import FLOAT_RULES, SamplingSettings, default_window_keep, pack_rows
from gpt2.scoring import target_logprobs

PAD_TOKEN = 50256  # <|endoftext|>: fills `tokens` past each row's num_tokens (a GPT2-ML export: [SEP])

GENERATE_SIGNATURE = [tf.TensorSpec([None, None], tf.int32, name="tokens")] + [
    tf.TensorSpec([None], dtype, name=name) for name, dtype in [
        ("lengths", tf.int32), ("max_new_tokens", tf.int32), ("temperature", tf.float32), ("top_k", tf.int32),
        ("top_p", tf.float32), ("seed", tf.int32)]]
LOGITS_SIGNATURE = GENERATE_SIGNATURE[:1]  # tokens
SCORE_SIGNATURE = GENERATE_SIGNATURE[:2]  # tokens, lengths


class ServingModule(tf.Module):
    """The exported object: `generate`, `logits` and `score` tf.functions over `model`'s weights,
    and the BPE files (`encoder_files`: encoder.json, vocab.bpe) as assets, which `gpt2.export` copies.

    max_new_tokens: the largest a request may ask for. jit_compile: compile the decode loop with
    XLA (TF Serving then needs `--xla_cpu_compilation_enabled=true`). batch_sizes: the decode loop's
    (default: `default_batch_sizes`; rows are padded and grouped as the module docstring says).
    pad_token: what fills `tokens` past a row's num_tokens (GPT-2's <|endoftext|>, GPT2-ML's [SEP]).
    never_drawn: tokens never drawn (GPT2-ML's [PAD]): a logit bias of -100, as SamplingSettings.banning.
    """

    def __init__(self, model, max_new_tokens, encoder_files=(), jit_compile=True, batch_sizes=None,
                 pad_token=PAD_TOKEN, never_drawn=()):
        super().__init__(name="gpt2")
        hparams = model.hparams
        self.n_ctx, self.n_vocab = hparams.n_ctx, hparams.n_vocab
        self.pad_token = int(pad_token)
        banned = SamplingSettings().banning(never_drawn)
        self.logit_bias = tf.constant(pack_rows([banned], self.n_vocab)["logit_bias"][0]) if never_drawn else None
        self.max_new_tokens = int(max_new_tokens)
        self.batch_sizes = tuple(sorted(set(batch_sizes or default_batch_sizes(model))))
        if self.max_new_tokens < 1 or self.batch_sizes[0] < 1:
            raise ValueError(f"max_new_tokens and batch sizes must be >= 1, got {max_new_tokens} and "
                             f"{list(self.batch_sizes)}")
        self.weights = list(model.weights)  # tracked (saved); the model object itself is not
        self.assets = [tf.saved_model.Asset(path) for path in encoder_files]
        # A plain object: the model is used, not tracked.
        self._decoder = decoder_lib.Decoder(model, xla=jit_compile)
        self.decode = tf.function(self._decode, jit_compile=jit_compile, autograph=False)
        self.generate = tf.function(self._generate, input_signature=GENERATE_SIGNATURE, autograph=False)
        self.logits = tf.function(self._logits, input_signature=LOGITS_SIGNATURE, autograph=False)
        self.score = tf.function(self._score, input_signature=SCORE_SIGNATURE, autograph=False)

    def signatures(self):
        """The `signatures=` argument of tf.saved_model.save."""
        return {"serving_default": self.generate, "logits": self.logits, "score": self.score}

    # ------------------------------------------------------------------ generation

    def _decode(self, state, tokens):
        """The decoder's loop to the end; tokens: int32 [B, N] of pad_token. Returns (tokens with
        each row's new tokens first, num_tokens int32 [B], whether every row finished)."""
        state, tokens = self._decoder.run_to_end(state, tokens)
        return tokens, state["generated"], tf.reduce_all(state["done"] | ~state["active"])

    def _generate(self, tokens, lengths, max_new_tokens, temperature, top_k, top_p, seed):
        batch, width = tf.shape(tokens)[0], tf.shape(tokens)[1]
        valid = tf.range(width)[None, :] < lengths[:, None]
        per_row = {"lengths": lengths, "max_new_tokens": max_new_tokens, "temperature": temperature,
                   "top_k": top_k, "top_p": top_p, "seed": seed}
        checks = [_same_batch(batch, per_row)] + [
            _check(width <= self.n_ctx, f"prompts must be at most n_ctx = {self.n_ctx} tokens long "
                                        "(tokens.shape[1] is larger)"),
            _check(_all((lengths >= 1) & (lengths <= width)),
                   "lengths must be between 1 and the prompt width tokens.shape[1]"),
            self._check_ids(tokens, valid, "tokens"),
            _check(_all((max_new_tokens >= 1) & (max_new_tokens <= self.max_new_tokens)),
                   f"max_new_tokens must be between 1 and {self.max_new_tokens}"),
            _check(_all(top_k >= 0), "top_k must be >= 0 (0 = off)"),
            *[_check(_all(tf.math.is_finite(value) & (value >= low) & (value <= high)), f"{name} must be {rule}")
              for name, value in (("temperature", temperature), ("top_p", top_p))
              for low, high, rule in [FLOAT_RULES[name]]],
        ]
        with tf.control_dependencies(checks):
            rows = {name: tf.identity(value) for name, value in {"tokens": tokens, **per_row}.items()}
        out_width = tf.maximum(tf.reduce_max(max_new_tokens), 0)
        largest = self.batch_sizes[-1]

        # Rows go in groups of at most the largest bucket, each padded to the smallest bucket
        # that holds it (one compiled program per bucket).
        def group(start, new_tokens, num_tokens):
            size = tf.minimum(largest, batch - start)
            part = {name: value[start : start + size] for name, value in rows.items()}
            bucket = tf.reduce_sum(tf.cast(tf.constant(self.batch_sizes) < size, tf.int32))
            branches = [functools.partial(self._generate_bucket, slots, part, size, out_width)
                        for slots in self.batch_sizes]
            part_tokens, part_num = tf.switch_case(bucket, branches)
            index = (start + tf.range(size))[:, None]
            return (start + size, tf.tensor_scatter_nd_update(new_tokens, index, part_tokens[:size]),
                    tf.tensor_scatter_nd_update(num_tokens, index, part_num[:size]))

        _, new_tokens, num_tokens = tf.while_loop(
            lambda start, *_: start < batch, group,
            (tf.constant(0), tf.fill([batch, out_width], self.pad_token), tf.zeros([batch], tf.int32)))
        return {"tokens": new_tokens, "num_tokens": num_tokens}

    def _generate_bucket(self, slots, rows, size, width):
        """Generates for the `size` rows of `rows` padded to `slots` rows (a static shape, which
        XLA needs to compile a fast program). Returns (tokens [slots, width], num_tokens [slots])."""
        rows = {name: tf.pad(value, [[0, slots - size]] + [[0, 0]] * (value.shape.rank - 1))
                for name, value in rows.items()}
        rows = {name: tf.ensure_shape(value, [slots] + value.shape[1:]) for name, value in rows.items()}
        settings = {  # as gpt2.sampling.settings.pack_rows makes them; no penalties, the never_drawn bans
            "temperature": rows["temperature"], "top_k": tf.where(rows["top_k"] >= self.n_vocab, 0, rows["top_k"]),
            "top_p": rows["top_p"], "repetition_penalty": tf.ones([slots]),
        }
        if self.logit_bias is not None:
            settings["logit_bias"] = tf.tile(self.logit_bias[None], [slots, 1])
        state = self._decoder.start_state(
            rows["tokens"], tf.maximum(rows["lengths"], 1), settings, rows["seed"], rows["max_new_tokens"],
            stop_token=tf.fill([slots], -1), window_keep=tf.fill([slots], default_window_keep(self.n_ctx)),
            want_logprobs=tf.zeros([slots], tf.bool))
        spec = self._decoder.state_spec(slots)
        state = {name: tf.ensure_shape(value, spec[name][0]) for name, value in state.items()}
        state["active"] = tf.range(slots) < size  # padding rows never run
        new_tokens, num_tokens, finished = self.decode(state, tf.fill([slots, self.max_new_tokens], self.pad_token))
        # Every iteration ingests or decodes something; the loop stops early only if one did not.
        with tf.control_dependencies([_check(finished, "the decoder made no progress; this is a bug")]):
            return new_tokens[:, :width], tf.identity(num_tokens)

    # ------------------------------------------------------------------ logits and score

    def _logits(self, tokens):
        checks = [
            _check(tf.shape(tokens)[1] <= self.n_ctx,
                   f"tokens must be at most n_ctx = {self.n_ctx} tokens long"),
            self._check_ids(tokens, tf.ones_like(tokens, tf.bool), "tokens"),
        ]
        with tf.control_dependencies(checks):
            tokens = tf.identity(tokens)
        return {"logits": self._decoder.model(tokens, training=False)["logits"]}

    def _score(self, tokens, lengths):
        batch, width = tf.shape(tokens)[0], tf.shape(tokens)[1]
        valid = tf.range(width)[None, :] < lengths[:, None]
        checks = [
            _same_batch(batch, {"lengths": lengths}),
            _check(width <= self.n_ctx + 1, f"tokens must be at most n_ctx + 1 = {self.n_ctx + 1} long "
                                            "(the context plus the predicted last token)"),
            _check(_all((lengths >= 0) & (lengths <= width)), "lengths must be between 0 and tokens.shape[1]"),
            self._check_ids(tokens, valid, "tokens"),
        ]
        with tf.control_dependencies(checks):
            tokens = tf.where(valid, tokens, 0)  # padding may hold any id
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logprobs, _, _ = target_logprobs(self._decoder.model, inputs, targets)
        return {"token_logprobs": tf.where(valid[:, 1:], logprobs, 0.0)}

    def _check_ids(self, tokens, valid, name):
        return _check(_all(~valid | ((tokens >= 0) & (tokens < self.n_vocab))),
                      f"{name} must be token ids in [0, {self.n_vocab})")


def default_batch_sizes(model):
    """The library's pool sizes (gpt2.sampling.api): 1, 2, 4, 8, and 16 to 64 while their
    key/value cache stays within 1 GiB (124M: up to 8)."""
    return sorted({pool_size_for(model, rows) for rows in POOL_SIZES})


def _all(condition):
    return tf.reduce_all(condition)


def _check(condition, message):
    """An assertion op: InvalidArgumentError "assertion failed: [message]" unless condition."""
    return tf.debugging.Assert(condition, [message])


def _same_batch(batch, per_row):
    """Every [b] input has the batch size of `tokens`."""
    same = tf.reduce_all(tf.stack([tf.equal(tf.shape(value)[0], batch) for value in per_row.values()]))
    return _check(same, f"{', '.join(per_row)} must each have one value per row of tokens")
