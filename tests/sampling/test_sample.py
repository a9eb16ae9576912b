"""The compiled sampler: OpenAI's semantics, greedy references, distributions, batching, retracing."""

import numpy as np
import pytest

import gpt2
from encoder import get_encoder
from gpt2 import reference as reference_path
from gpt2.sampling.api import pools_of, sample_rows

EOT = 50256


def greedy_cases(reference):
    return reference["greedy"]["cases"]


def test_greedy_matches_reference_tokens_and_text(tiny_model, reference):
    enc = get_encoder()
    for case in greedy_cases(reference):
        out = gpt2.sample_sequence(tiny_model, [case["prompt_ids"]], 20, temperature=0)
        assert out.dtype == np.int32 and out.shape == (1, len(case["all_ids"]))
        assert out[0].tolist() == case["all_ids"]
        assert enc.decode(out[0]) == case["full_text"]
        assert enc.decode(out[0, len(case["prompt_ids"]):]) == case["new_text"]


def test_top_k_1_equals_greedy(tiny_model, reference):
    for case in greedy_cases(reference):
        out = gpt2.sample_sequence(tiny_model, [case["prompt_ids"]], 20, top_k=1, seed=7)
        assert out[0].tolist() == case["all_ids"]


def test_without_xla_greedy_and_sampling_work_too(tiny_model, reference):
    case = greedy_cases(reference)[0]
    out = gpt2.sample_sequence(tiny_model, [case["prompt_ids"]], 20, temperature=0, jit_compile=False)
    assert out[0].tolist() == case["all_ids"]
    out = gpt2.sample_sequence(tiny_model, [case["prompt_ids"]], 20, top_k=1, seed=3, jit_compile=False)
    assert out[0].tolist() == case["all_ids"]
    draws = gpt2.sample_sequence(tiny_model, [case["prompt_ids"]] * 50, 1, top_k=3, seed=4, jit_compile=False)
    logits = tiny_model(np.array([case["prompt_ids"]]))["logits"].numpy()[0, -1]
    assert set(draws[:, -1].tolist()) <= set(np.argsort(-logits)[:3].tolist())


def test_only_the_loop_without_xla_keeps_its_layer_function_out_of_line(tiny_model):
    """Without XLA, TensorFlow keeps kernels for every op of a program: the blocks call one layer
    function marked not to be inlined (bfloat16 124M: 73-280 MiB less). Under XLA the attribute
    is left off, so compiled programs and the compilation cache's keys do not change."""
    import tensorflow as tf

    from gpt2.sampling.pool import Pool

    for xla in (False, True):
        pool = Pool(tiny_model, 2, jit_compile=xla)  # traced, not run: nothing is compiled
        library = pool._run.get_concrete_function(tf.TensorSpec([], tf.int32)).graph.as_graph_def().library
        layers = [f for f in library.function if "_layer" in f.signature.name]
        assert layers and all(f.attr["_noinline"].b is not xla for f in layers), xla


def test_text_helper(tiny_model, reference):
    enc = get_encoder()
    cases = greedy_cases(reference)
    texts = gpt2.generate(tiny_model, enc, [c["prompt_text"] for c in cases], length=20, temperature=0)
    assert texts == [c["new_text"] for c in cases]


def test_streaming_callback_sees_every_token(tiny_model, reference):
    case = greedy_cases(reference)[1]
    seen = []
    out = gpt2.sample_sequence(tiny_model, [case["prompt_ids"]], 20, temperature=0,
                               callback=lambda step, tokens: seen.append((step, tokens.tolist())))
    assert out[0].tolist() == case["all_ids"]
    assert seen == [(i, [t]) for i, t in enumerate(case["new_ids"])]


def first_token_draws(model, prompt, draws, seed=0, **settings):
    """`draws` independent samples of the first new token after `prompt`."""
    rows = 400
    out = [gpt2.sample_sequence(model, [prompt] * rows, 1, seed=seed + i, **settings)[:, -1]
           for i in range(draws // rows)]
    return np.concatenate(out)


def last_logits(reference, case):
    return np.asarray(reference["last_logits"][case][0], np.float64)


def test_top_k_never_leaves_the_k_largest(tiny_model, reference):
    prompt = reference["inputs"]["len7"][0]
    logits = last_logits(reference, "len7")
    for k in (1, 5, 40):
        draws = first_token_draws(tiny_model, prompt, 2000, top_k=k)
        allowed = set(np.argsort(-logits)[:k].tolist())
        assert set(draws.tolist()) <= allowed
        assert len(set(draws.tolist())) == k  # each of the k is reachable


def nucleus(logits, p):
    """OpenAI's top-p set (gpt2.reference.process): sorted tokens until the cumulative probability passes p."""
    kept = reference_path.process(logits, gpt2.SamplingSettings(top_p=p), [], [])
    return set(np.flatnonzero(np.isfinite(kept)).tolist())


def test_top_p_never_leaves_the_nucleus(tiny_model, reference):
    prompt = reference["inputs"]["len7"][0]
    logits = last_logits(reference, "len7")
    for temperature, p in ((0.25, 0.5), (0.5, 0.9), (1.0, 0.01)):
        draws = first_token_draws(tiny_model, prompt, 2000, temperature=temperature, top_p=p)
        allowed = nucleus(logits / temperature, p)
        assert set(draws.tolist()) <= allowed


def test_top_k_then_top_p_per_row_in_a_batch(tiny_model, reference):
    prompt = reference["inputs"]["len7"][0]
    logits = last_logits(reference, "len7")
    settings = dict(temperature=[0.5, 0.5, 0], top_k=[3, 0, 0], top_p=[1.0, 0.3, 1.0], seeds=[1, 2, 3])
    seen = [set(), set(), set()]
    for i in range(60):
        settings["seeds"] = [3 * i, 3 * i + 1, 3 * i + 2]
        for row, tokens in enumerate(sample_rows(tiny_model, [prompt] * 3, 1, **settings)):
            seen[row].add(int(tokens[0]))
    assert seen[0] <= set(np.argsort(-logits)[:3].tolist())
    assert seen[1] <= nucleus(logits / 0.5, 0.3)
    assert seen[2] == {int(np.argmax(logits))}


def test_plain_sampling_follows_the_softmax(tiny_model, reference):
    """Chi-square over 10 bins of equal probability mass, 10,000 draws at temperature 1."""
    prompt = reference["inputs"]["len7"][0]
    logits = last_logits(reference, "len7")
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    bin_of_token = np.empty(len(probs), int)
    bin_of_token[order] = np.minimum((np.cumsum(probs[order]) - probs[order] / 2) * 10, 9).astype(int)
    expected_mass = np.bincount(bin_of_token, weights=probs, minlength=10)
    draws = first_token_draws(tiny_model, prompt, 10000, seed=1000)
    observed = np.bincount(bin_of_token[draws], minlength=10)
    expected = expected_mass * len(draws)
    chi_square = float(np.sum((observed - expected) ** 2 / expected))
    assert chi_square < 27.88, (chi_square, observed, expected)  # df 9, p = 0.001


def test_block_then_token_draws_follow_a_peaked_softmax():
    """choose.vocabulary_choice (a block by mass, then a token) on logits with a long tail, a
    partial last block and a block of -inf: chi-square over ~20 bins against the softmax, on both
    the plain graph and XLA; removed tokens never come."""
    import tensorflow as tf

    from gpt2.sampling import choose

    logits = np.random.RandomState(0).standard_normal(1000) * 3.0  # 3 blocks of 256 and one of 232
    logits[512:768] = -np.inf
    logits[900] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    bin_of_token = np.empty(len(probs), int)
    bin_of_token[order] = np.minimum((np.cumsum(probs[order]) - probs[order] / 2) * 20, 19).astype(int)
    _, bin_of_token = np.unique(bin_of_token, return_inverse=True)  # the bins a heavy token left empty go
    expected = np.bincount(bin_of_token, weights=probs)
    df = len(expected) - 1
    critical = df * (1 - 2 / (9 * df) + 3.09 * np.sqrt(2 / (9 * df))) ** 3  # p = 0.001 (Wilson-Hilferty)
    rows = 20000
    batch = tf.constant(np.tile(logits.astype(np.float32), (rows, 1)))

    def draw(batch, seed, counter):
        return choose.vocabulary_choice(batch, lambda ids: choose.gumbel_noise(seed, counter, ids))

    seeds, counters = tf.range(rows) // 7, tf.range(rows) % 7
    for function in (tf.function(draw), tf.function(draw, jit_compile=True)):
        draws = function(batch, seeds, counters).numpy()
        assert np.all(np.isfinite(logits[draws]))
        observed = np.bincount(bin_of_token[draws], minlength=len(expected))
        chi_square = float(np.sum((observed - expected * rows) ** 2 / (expected * rows)))
        assert chi_square < critical, (chi_square, critical, observed, expected * rows)


def test_same_seed_same_output_and_fresh_seeds_differ(tiny_model):
    prompt = [[464, 3139, 286]] * 2
    a = gpt2.sample_sequence(tiny_model, prompt, 15, seed=123, top_k=40)
    b = gpt2.sample_sequence(tiny_model, prompt, 15, seed=123, top_k=40)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1])  # rows draw from their own streams
    unseeded = [gpt2.sample_sequence(tiny_model, prompt, 15).tolist() for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_seeded_row_does_not_depend_on_its_batch(tiny_model, reference):
    prompts = [c["prompt_ids"] for c in greedy_cases(reference)]
    together = sample_rows(tiny_model, prompts, 12, temperature=1.0, seeds=[11, 22, 33])
    for i, prompt in enumerate(prompts):
        alone = sample_rows(tiny_model, [prompt], 12, temperature=1.0, seeds=[[11, 22, 33][i]])
        np.testing.assert_array_equal(together[i], alone[0])


def test_ragged_batch_equals_each_row_alone(tiny_model, reference):
    cases = greedy_cases(reference)
    rows = [cases[0]["prompt_ids"], reference["inputs"]["len40"][0][:23], cases[2]["prompt_ids"][:2]]
    assert len({len(r) for r in rows}) == 3
    together = gpt2.sample_sequence(tiny_model, rows, 20, temperature=0)
    for row, out in zip(rows, together):
        alone = gpt2.sample_sequence(tiny_model, [row], 20, temperature=0)[0]
        assert out.tolist() == alone.tolist()
    assert together[0].tolist() == cases[0]["all_ids"]


def test_stop_token_ends_rows_and_the_loop(tiny_model, reference):
    a, b = greedy_cases(reference)[:2]
    stop = a["new_ids"][4]
    assert stop not in a["new_ids"][:4] and stop not in b["new_ids"]
    out = gpt2.sample_sequence(tiny_model, [a["prompt_ids"]], 20, temperature=0, stop_token=stop)
    assert out[0].tolist() == a["prompt_ids"] + a["new_ids"][:5]
    rows = gpt2.sample_sequence(tiny_model, [a["prompt_ids"], b["prompt_ids"]], 20, temperature=0,
                                stop_token=stop)
    assert rows[0].tolist() == a["prompt_ids"] + a["new_ids"][:5]
    assert rows[1].tolist() == b["all_ids"]
    seen = []
    gpt2.sample_sequence(tiny_model, [a["prompt_ids"]], 20, temperature=0, stop_token=stop,
                         callback=lambda step, tokens: seen.append(step))
    assert seen == [0, 1, 2, 3, 4]


def traces(model):
    """(number of pools, their total trace count): new shapes or settings must change neither."""
    pools = pools_of(model)
    return len(pools), sum(pool.tracing_count() for pool in pools)


def test_trace_count_stays_bounded(tiny_model):
    gpt2.sample_sequence(tiny_model, [[1, 2, 3]], 5, temperature=0)
    before = traces(tiny_model)
    for prompt_len, length, settings in [
        (1, 5, dict(temperature=0)), (7, 20, dict(top_k=3, seed=1)), (20, 9, dict(top_p=0.5)),
        (31, 30, dict(temperature=0.7, top_k=10, top_p=0.9, seed=2)), (12, 1, dict(stop_token=EOT)),
    ]:
        gpt2.sample_sequence(tiny_model, [list(range(1, prompt_len + 1))], length, **settings)
    assert traces(tiny_model) == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(length=0), "length must be an integer >= 1, got 0"),
        (dict(length=-3), "length must be an integer >= 1, got -3"),
        (dict(length=2.5), "length must be an integer >= 1, got 2.5"),
        (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(top_p=1.5), r"top_p must be a number in \[0, 1\]"),
        (dict(repetition_penalty=0), "repetition_penalty must be a finite number > 0"),
        (dict(presence_penalty=3), r"presence_penalty must be a number in \[-2, 2\]"),
        (dict(logit_bias={50257: 1}), r"logit_bias token ids must be in \[0, 50257\)"),
        (dict(logit_bias={1: 101}), r"logit_bias values must be numbers in \[-100, 100\]"),
        (dict(window_keep=64), r"window_keep must be an integer in \[1, 63\]"),
    ],
)
def test_invalid_settings_are_clear_errors(tiny_model, reference, kwargs, message):
    args = dict(length=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        gpt2.sample_sequence(tiny_model, reference["inputs"]["len7"], **args)


def test_invalid_prompts_are_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gpt2.sample_sequence(tiny_model, [[1], []], 5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gpt2.sample_sequence(tiny_model, [[1, 50257]], 5)
    with pytest.raises(ValueError, match="prompt 0 is 65 tokens, more than the model's context of 64"):
        gpt2.sample_sequence(tiny_model, [[1] * 65], 5)


# ----------------------------------------------------------------------------- past the context

def naive_greedy(model, prompt, length, keep, **settings):
    """The oracle: gpt2.reference.generate, greedy with a full forward pass over the window for
    every token (past n_ctx the window becomes its last `keep` tokens); `settings`: penalties and
    logit bias as SamplingSettings takes them."""
    return reference_path.generate(model, prompt, length, gpt2.SamplingSettings(temperature=0, **settings), None, keep)


@pytest.mark.parametrize("keep", [None, 10])
def test_greedy_past_the_context_equals_the_naive_window_rule(tiny_model, reference, keep):
    n_ctx = tiny_model.hparams.n_ctx
    prompt = reference["inputs"]["len40"][0]
    out = gpt2.sample_sequence(tiny_model, [prompt], 100, temperature=0, window_keep=keep)
    expected = naive_greedy(tiny_model, prompt, 100, keep or n_ctx // 2)
    assert out[0, len(prompt):].tolist() == expected


def test_window_slides_in_batches_ragged_and_streamed(tiny_model, reference):
    cases = greedy_cases(reference)
    prompts = [reference["inputs"]["len40"][0], cases[0]["prompt_ids"], reference["inputs"]["len40"][0][:63]]
    together = gpt2.sample_sequence(tiny_model, prompts, 70, temperature=0, window_keep=20)
    for prompt, row in zip(prompts, together):
        assert row[len(prompt):].tolist() == naive_greedy(tiny_model, prompt, 70, 20)
    steps = list(gpt2.stream(tiny_model, [prompts[0]], 70, temperature=0, window_keep=20))
    assert [int(s[0]) for s in steps] == together[0][len(prompts[0]):].tolist()


def test_prompts_either_side_of_the_small_ingest_pass_equal_the_reference(tiny_model, reference):
    """The loop ingests SMALL_CHUNK or fewer waiting tokens in a narrow pass, more in a CHUNK-wide one:
    prompts of SMALL_CHUNK and SMALL_CHUNK + 1 tokens, together in a batch and past the context, give
    the naive rule's tokens."""
    from gpt2.sampling.decoder import SMALL_CHUNK

    text = reference["inputs"]["len40"][0]
    prompts = [text[:SMALL_CHUNK], text[:SMALL_CHUNK + 1], text[:1]]
    assert [len(p) for p in prompts] == [SMALL_CHUNK, SMALL_CHUNK + 1, 1]
    together = gpt2.sample_sequence(tiny_model, prompts, 40, temperature=0, window_keep=SMALL_CHUNK + 1)
    for prompt, row in zip(prompts, together):
        assert row[len(prompt):].tolist() == naive_greedy(tiny_model, prompt, 40, SMALL_CHUNK + 1)


def test_stop_token_past_the_context(tiny_model, reference):
    prompt = reference["inputs"]["len40"][0]
    expected = naive_greedy(tiny_model, prompt, 60, 32)
    first = next(i for i, token in enumerate(expected) if i >= 30 and token not in expected[:i])
    assert len(prompt) + first > tiny_model.hparams.n_ctx  # the stop comes after a slide
    out = gpt2.sample_sequence(tiny_model, [prompt], 60, temperature=0, stop_token=expected[first])
    assert out[0, len(prompt):].tolist() == expected[: first + 1]


# ----------------------------------------------------------------------------- repetition control

@pytest.mark.parametrize("settings", [
    dict(presence_penalty=1.5), dict(frequency_penalty=0.8), dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7),
    dict(presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={13: 2.5, 7: -1.0}),
])
def test_penalties_equal_their_numpy_formulas(tiny_model, reference, settings):
    prompt = reference["inputs"]["len7"][0]
    expected = naive_greedy(tiny_model, prompt, 30, 32, **settings)
    out = gpt2.sample_sequence(tiny_model, [prompt], 30, temperature=0, **settings)
    assert out[0, len(prompt):].tolist() == expected
    assert expected != naive_greedy(tiny_model, prompt, 30, 32)  # the settings changed something


def test_logit_bias_forces_and_bans_tokens(tiny_model, reference):
    prompt = reference["inputs"]["len7"][0]
    forced = gpt2.sample_sequence(tiny_model, [prompt], 10, seed=3, logit_bias={"4242": 100})
    assert forced[0, len(prompt):].tolist() == [4242] * 10
    greedy = gpt2.sample_sequence(tiny_model, [prompt], 10, temperature=0)[0, len(prompt):].tolist()
    banned = gpt2.sample_sequence(tiny_model, [prompt], 10, temperature=0, logit_bias={greedy[0]: -100})
    assert banned[0, len(prompt)] != greedy[0]


def test_settings_object_and_per_row_settings(tiny_model, reference):
    prompt = reference["inputs"]["len7"][0]
    rows = [gpt2.SamplingSettings(temperature=0), gpt2.SamplingSettings(temperature=0, repetition_penalty=1.3)]
    out = sample_rows(tiny_model, [prompt, prompt], 30, settings=rows)
    assert out[0].tolist() == naive_greedy(tiny_model, prompt, 30, 32)
    assert out[1].tolist() == naive_greedy(tiny_model, prompt, 30, 32, repetition_penalty=1.3)


# ----------------------------------------------------------------------------- the generator

def test_stream_yields_steps_and_stops_when_the_consumer_stops(tiny_model, reference):
    case = greedy_cases(reference)[0]
    steps = gpt2.stream(tiny_model, [case["prompt_ids"]] * 2, 20, temperature=0)
    first = [next(steps) for _ in range(3)]
    assert [s.tolist() for s in first] == [[t, t] for t in case["new_ids"][:3]]
    pool = next(p for p in pools_of(tiny_model) if p.slots == 2 and p.jit_compile)
    assert pool.lock.locked()  # the decode is suspended, holding its pool
    steps.close()
    assert not pool.lock.locked() and not pool.active.any()
    out = gpt2.sample_sequence(tiny_model, [case["prompt_ids"]] * 2, 20, temperature=0)
    assert out[0].tolist() == case["all_ids"]


def test_sampling_while_a_stream_is_open_uses_another_pool(tiny_model, reference):
    case = greedy_cases(reference)[0]
    steps = gpt2.stream(tiny_model, [case["prompt_ids"]], 20, temperature=0)
    assert int(next(steps)[0]) == case["new_ids"][0]
    out = gpt2.sample_sequence(tiny_model, [case["prompt_ids"]], 20, temperature=0)
    assert out[0].tolist() == case["all_ids"]
    assert [int(s[0]) for s in steps] == case["new_ids"][1:]


# ----------------------------------------------------------------------------- hostile values

def test_huge_top_k_is_off_not_wrapped(tiny_model, reference):
    prompt = [reference["inputs"]["len7"][0]] * 8
    plain = gpt2.sample_sequence(tiny_model, prompt, 5, seed=5)
    for top_k in (50257, 2**32 + 1, 2**63, 10**300):
        np.testing.assert_array_equal(gpt2.sample_sequence(tiny_model, prompt, 5, seed=5, top_k=top_k), plain)


@pytest.mark.parametrize("temperature", [2e-9, 1e-20, 1e-38, 1e-45])
def test_tiny_temperatures_are_greedy_and_respect_filters(tiny_model, reference, temperature):
    case = greedy_cases(reference)[0]
    for settings in (dict(), dict(top_k=1), dict(top_k=3), dict(top_p=0.5), dict(top_k=300, top_p=0.9)):
        out = gpt2.sample_sequence(tiny_model, [case["prompt_ids"]] * 2, 20, temperature=temperature, seed=1,
                                   **settings)
        assert out[0].tolist() == case["all_ids"] and out[1].tolist() == case["all_ids"], settings


def test_trace_count_stays_bounded_with_slides_and_penalties(tiny_model, reference):
    prompt = reference["inputs"]["len40"][0]
    gpt2.sample_sequence(tiny_model, [prompt], 5, temperature=0)
    before = traces(tiny_model)
    gpt2.sample_sequence(tiny_model, [prompt], 90, temperature=0, window_keep=7, presence_penalty=1.0)
    gpt2.sample_sequence(tiny_model, [prompt[:3]], 70, top_k=5, seed=2, repetition_penalty=1.5,
                         logit_bias={5: 3.0}, frequency_penalty=-1.0)
    assert traces(tiny_model) == before
