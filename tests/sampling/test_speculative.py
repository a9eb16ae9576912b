"""Speculative decoding (gpt2/sampling/speculative.py) on the tiny model: greedy output equal to
plain decoding token for token, sampled output from the plain distribution (a chi-square test
against gpt2/reference.py's float64 settings), and one-line refusals of what it does not do."""

import numpy as np
import pytest

import gpt2
from gpt2 import reference
from gpt2.sampling import api, direct, speculative
from gpt2.sampling.settings import Row, SamplingSettings, SettingsError

import paths  # tests/paths.py

# Two tokens after PROMPT; its last token (13) occurred earlier, followed by 1110, which prompt
# lookup proposes.
PROMPT = [464, 3290, 13, 1110, 318, 257, 13]
CHI2_CRITICAL = 26.12  # chi-square, 8 degrees of freedom (3 x 3 cells), p = 0.001
DRAWS = 150


@pytest.fixture(scope="module")
def draft_model():
    """The tiny model with noise on its embeddings and MLPs: it agrees with the model on some
    tokens, not all (about 40% of greedy drafts)."""
    model = gpt2.load_model(paths.TINY_MODEL)
    rng = np.random.default_rng(0)
    for variable in model.weights:
        if "wte" in variable.path or "c_fc" in variable.path:
            value = variable.numpy()
            variable.assign(value + rng.normal(0, 0.1 * value.std(), value.shape).astype(np.float32))
    return model


def plain(model, prompt, length, settings, stop_token=None):
    """The uncompiled sampler's tokens, without a draft."""
    row = Row.checked(prompt, settings, 0, length, model.hparams.n_vocab, model.hparams.n_ctx, stop_token)
    return [token for produced in direct.decode_rows(model, [row]) for _, token, _ in produced]


def test_greedy_equals_plain_decoding(tiny_model, draft_model):
    rules = [SamplingSettings(temperature=0),
             SamplingSettings(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, logit_bias={13: 2.0})]
    for rule in rules:
        expected = plain(tiny_model, PROMPT, 30, rule)
        for draft in (speculative.DraftModel(draft_model, tokens=6), speculative.PromptLookup(ngram=2)):
            got = gpt2.sample_sequence(tiny_model, [PROMPT], 30, settings=rule, draft=draft)[0, len(PROMPT):]
            assert got.tolist() == expected, (rule, type(draft).__name__)
            assert draft.stats.drafted > draft.stats.accepted, draft.stats
            if isinstance(draft, speculative.DraftModel):  # the model's text never repeats: no lookup accepted
                assert draft.stats.accepted > 0, draft.stats
    stop = expected[10]
    streamed = [int(step[0]) for step in gpt2.stream(tiny_model, [PROMPT], 30, temperature=0, stop_token=stop,
                                                      draft="prompt-lookup")]
    assert streamed == plain(tiny_model, PROMPT, 30, SamplingSettings(temperature=0), stop)


def expected_pairs(model, settings):
    """{(first, second): probability} of the first two tokens after PROMPT, from the reference
    path's float64 settings."""
    def probs(generated):
        logits = model(np.array([PROMPT + generated], np.int32))["logits"].numpy()[0, -1].astype(np.float64)
        return reference.softmax(reference.process(logits, settings, PROMPT, generated))

    first, pairs = probs([]), {}
    for a in np.flatnonzero(first > 0):
        second = probs([int(a)])
        for b in np.flatnonzero(second > 0):
            pairs[int(a), int(b)] = first[a] * second[b]
    return pairs


@pytest.mark.slow
def test_sampling_keeps_the_distribution(tiny_model, draft_model):
    """Seeded draws of two tokens with a draft model and with prompt lookup, against the exact
    distribution: fixed seeds, so the statistic is the same on every run (no flaky test)."""
    logits = tiny_model(np.array([PROMPT], np.int32))["logits"].numpy()[0, -1]
    bias = float(np.sort(logits)[-1] - logits[1110]) - 0.3  # the looked-up token among the top 3
    settings = SamplingSettings(top_k=3, temperature=1.5, presence_penalty=2.0, logit_bias={1110: bias})
    expected = expected_pairs(tiny_model, settings)
    assert len(expected) == 9 and min(expected.values()) * DRAWS > 5
    for draft in (speculative.DraftModel(draft_model), speculative.PromptLookup()):
        counts = {}
        for seed in range(DRAWS):
            pair = gpt2.sample_sequence(tiny_model, [PROMPT], 2, settings=settings, seed=seed, draft=draft)[0, -2:]
            counts[tuple(pair.tolist())] = counts.get(tuple(pair.tolist()), 0) + 1
        assert set(counts) <= set(expected), counts
        chi2 = sum((counts.get(cell, 0) - DRAWS * p) ** 2 / (DRAWS * p) for cell, p in expected.items())
        assert chi2 < CHI2_CRITICAL, (type(draft).__name__, chi2, counts)
        stats = draft.stats  # accepted and rejected drafts both tested
        assert stats.accepted >= 5 and stats.drafted - stats.accepted >= 5, stats


def test_what_it_refuses(tiny_model, draft_model):
    cases = [
        (lambda: gpt2.sample_sequence(tiny_model, [PROMPT, PROMPT], 4, draft="prompt-lookup"), "one prompt"),
        (lambda: gpt2.sample_sequence(tiny_model, [PROMPT], 60, draft="prompt-lookup"), "within the context"),
        (lambda: gpt2.sample_sequence(tiny_model, [PROMPT], 4, jit_compile=True, draft="prompt-lookup"),
         "jit_compile"),
        (lambda: list(api.decode_rows(tiny_model, [Row(PROMPT, SamplingSettings(), 0, 4, logprobs=True)],
                                      draft="prompt-lookup")), "log-probabilities"),
        (lambda: gpt2.sample_sequence(tiny_model, [PROMPT], 4, draft="lookup"), "gpt2.PromptLookup"),
        (lambda: speculative.PromptLookup(ngram=0), "ngram"),
        (lambda: speculative.DraftModel(draft_model, tokens=0), "draft tokens"),
    ]
    for call, words in cases:
        with pytest.raises(SettingsError, match=words) as error:
            call()
        assert "\n" not in str(error.value)


def test_generate_py_options(tiny_model, monkeypatch, capsys):
    """--prompt-lookup and --draft-model print plain greedy decoding's text."""
    from encoder import encoder_for_model_dir
    from gpt2 import generate_cli

    monkeypatch.setattr(generate_cli, "_load_model", lambda *args, **options: tiny_model)
    enc = encoder_for_model_dir(paths.TINY_MODEL)
    prompt = "Hello world, hello world, hello"
    expected = enc.decode(plain(tiny_model, enc.encode(prompt), 20, SamplingSettings(temperature=0)))
    for option in (["--prompt-lookup"], ["--draft-model", paths.TINY_MODEL, "--draft-tokens", "3"]):
        code = generate_cli.main(["--model", paths.TINY_MODEL, "--prompt", prompt, "--length", "20",
                                  "--temperature", "0", *option])
        out = capsys.readouterr().out
        assert code == 0 and out.splitlines()[1] == expected, option
