"""The uncompiled sampler short jobs start on (gpt2.sampling.direct) and the rule that picks it:
same tokens as the compiled loop and OpenAI's fixture, and compiling once its budget is spent."""

import os
import subprocess
import sys

import numpy as np
import pytest

import gpt2
from gpt2 import reference as reference_path
from gpt2.sampling import api, choose, direct

import paths  # tests/paths.py: the folders the tests read

TESTS = paths.TESTS
REPO = os.path.dirname(TESTS)
TINY_MODEL = os.path.join(TESTS, "data", "tiny-model")


@pytest.fixture
def direct_budget(monkeypatch):
    """The library's real rule (conftest turns the uncompiled sampler off for the other tests)."""
    monkeypatch.delenv("GPT2_DIRECT_TOKENS", raising=False)


@pytest.fixture
def fresh_model():
    """A model of its own: the budget of steps is counted per model."""
    return gpt2.load_model(TINY_MODEL)


def test_greedy_equals_the_reference_and_the_compiled_loop(direct_budget, fresh_model, reference):
    cases = [(case["prompt_ids"], case["all_ids"]) for case in reference["greedy"]["cases"]]
    for prompt, expected in cases:
        quick = gpt2.sample_sequence(fresh_model, [prompt], len(expected) - len(prompt), temperature=0)
        np.testing.assert_array_equal(quick[0], expected)
    assert not api.pools_of(fresh_model), "a short greedy job compiled a program"
    for prompt, expected in cases:
        compiled = gpt2.sample_sequence(fresh_model, [prompt], len(expected) - len(prompt), temperature=0,
                                        jit_compile=True)
        np.testing.assert_array_equal(compiled[0], expected)


def test_the_fast_paths_equal_the_reference_path(direct_budget, fresh_model, reference):
    """gpt2/reference.py (a full forward pass per token, no cache) is the oracle: the uncompiled
    sampler and the compiled loop, with and without XLA, make its greedy tokens exactly, with
    and without penalties; its own seeded draws repeat with the seed and keep to top-k."""
    prompts = [case["prompt_ids"] for case in reference["greedy"]["cases"]]  # three lengths
    settings = [gpt2.SamplingSettings(temperature=0),
                gpt2.SamplingSettings(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, logit_bias={13: 2})]
    expected = [reference_path.generate(fresh_model, prompt, 12, rule) for rule in settings for prompt in prompts]
    runs = [{}, {"jit_compile": True}, {"jit_compile": False}]  # uncompiled first: no pool exists yet
    for options in runs:
        got = [api.sample_rows(fresh_model, [prompt], 12, settings=[rule], **options)[0].tolist()
               for rule in settings for prompt in prompts]
        assert got == expected, options
        assert bool(api.pools_of(fresh_model)) == bool(options)
    drawn = reference_path.generate(fresh_model, prompts[0], 12, gpt2.SamplingSettings(top_k=3), rng=5)
    assert drawn == reference_path.generate(fresh_model, prompts[0], 12, gpt2.SamplingSettings(top_k=3), rng=5)
    assert reference_path.generate(fresh_model, prompts[0], 12, gpt2.SamplingSettings(top_k=1), rng=5) == expected[0]


def test_seeded_sampling_equals_the_compiled_loop_with_every_setting(direct_budget, fresh_model, reference):
    prompt = reference["inputs"]["len7"][0]
    settings = dict(temperature=[1.0, 0.7, 1.3, 0.0], top_k=[0, 5, 40, 0], top_p=[1.0, 0.9, 0.5, 1.0],
                    presence_penalty=[0.0, 0.5, 0.0, 1.0], frequency_penalty=[0.0, 0.0, 0.3, 0.5],
                    repetition_penalty=[1.0, 1.3, 1.0, 1.2], logit_bias=[None, {13: 5.0}, None, {11: -100.0}],
                    seeds=[5, 6, 7, 8])
    quick = api.sample_rows(fresh_model, [prompt] * 4, 24, **settings)
    assert not api.pools_of(fresh_model)
    compiled = api.sample_rows(fresh_model, [prompt] * 4, 24, jit_compile=True, **settings)
    for row_quick, row_compiled in zip(quick, compiled):
        np.testing.assert_array_equal(row_quick, row_compiled)


def test_the_attended_prefix_grows_in_steps_with_the_same_tokens(direct_budget, monkeypatch, fresh_model, reference):
    """Each step attends over the filled cache slots rounded up to direct.PREFIX; with a small
    PREFIX a job crosses that rounding many times (the tiny model's context is only 64)."""
    monkeypatch.setattr(direct, "PREFIX", 8)
    prompt = reference["inputs"]["len7"][0]
    settings = dict(temperature=[0.0, 1.0], seeds=[3, 4])
    quick = api.sample_rows(fresh_model, [prompt] * 2, 50, **settings)
    assert not api.pools_of(fresh_model)
    compiled = api.sample_rows(fresh_model, [prompt] * 2, 50, jit_compile=True, **settings)
    for row_quick, row_compiled in zip(quick, compiled):
        np.testing.assert_array_equal(row_quick, row_compiled)


def test_caches_of_any_job_size_share_one_instantiated_step(fresh_model):
    """The step's cache variables are declared [None, D] whatever the job's size: TensorFlow
    instantiates a function again for every new declared shape of a resource input (measured:
    0.2-0.5 s and about 10 MiB kept per prompt length when each job's variables had their own)."""
    import tensorflow as tf

    sampler = direct.sampler_for(fresh_model)
    hp = fresh_model.hparams
    for rows, slots in ((1, 5), (3, 40)):
        caches = sampler.new_caches(rows, slots)
        for handle in caches.values():  # the handle's declared shape is what the kernel cache keys on
            assert f"Shape: [?,{hp.head_dim}]" in repr(handle)
        value = tf.raw_ops.ReadVariableOp(resource=caches["k0"], dtype=sampler.cache_dtype)
        assert value.shape == (rows * hp.n_head * slots, hp.head_dim) and not np.any(value.numpy())
        sampler.free_caches(caches)


def test_every_block_runs_one_out_of_line_layer_function(fresh_model):
    """TensorFlow keeps kernels for every op of an instantiated graph: the step calls one layer
    function, marked not to be inlined, for all its blocks, so it holds one layer's (124M's
    generate.py peaked about 11 MiB higher with the blocks inlined)."""
    sampler = direct.sampler_for(fresh_model)
    graph = sampler.step.get_concrete_function().graph
    calls = [op for op in graph.get_operations() if op.type in ("PartitionedCall", "StatefulPartitionedCall")]
    names = {op.get_attr("f").name for op in calls}
    assert len(calls) == fresh_model.hparams.n_layer and len(names) == 1
    (layer,) = [f for f in graph.as_graph_def().library.function if f.signature.name in names]
    assert layer.attr["_noinline"].b
    assert sampler._layer.experimental_get_tracing_count() == 1


def test_the_uncompiled_sampler_runs_inside_a_distribution_strategy_scope(direct_budget, fresh_model, reference):
    """Its caches are plain resources, so a strategy's scope (which turns tf.Variables into
    distributed ones) does not change them."""
    import tensorflow as tf

    case = reference["greedy"]["cases"][0]
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        quick = gpt2.sample_sequence(fresh_model, [case["prompt_ids"]], len(case["all_ids"]) - len(case["prompt_ids"]),
                                     temperature=0)
    np.testing.assert_array_equal(quick[0], case["all_ids"])


def test_stop_token_and_streaming_equal_the_compiled_loop(direct_budget, fresh_model, reference):
    prompt = reference["inputs"]["len7"][0]
    greedy = api.sample_rows(fresh_model, [prompt], 12, temperature=0)[0]
    stop = int(greedy[4])  # rows stop at the first occurrence of this token
    options = dict(temperature=[0.0, 1.0], seeds=[1, 2], stop_token=stop)
    quick = api.sample_rows(fresh_model, [prompt] * 2, 12, **options)
    streamed = list(api.stream_rows(fresh_model, [prompt] * 2, 12, **options))
    assert not api.pools_of(fresh_model)
    compiled = api.sample_rows(fresh_model, [prompt] * 2, 12, jit_compile=True, **options)
    compiled_streamed = list(api.stream_rows(fresh_model, [prompt] * 2, 12, jit_compile=True, **options))
    assert quick[0][-1] == stop and len(quick[0]) == list(greedy).index(stop) + 1
    for a, b in zip(quick, compiled):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.array(streamed), np.array(compiled_streamed))


def test_short_jobs_run_uncompiled_until_the_budget_is_spent(monkeypatch, fresh_model, reference):
    monkeypatch.setenv("GPT2_DIRECT_TOKENS", "20")
    prompt = reference["inputs"]["len7"][0]
    first = gpt2.sample_sequence(fresh_model, [prompt], 8, temperature=0)
    gpt2.sample_sequence(fresh_model, [prompt], 12, temperature=0)  # 20 steps: still within
    assert not api.pools_of(fresh_model)
    again = gpt2.sample_sequence(fresh_model, [prompt], 8, temperature=0)  # 28: compiles
    assert len(api.pools_of(fresh_model)) == 1
    np.testing.assert_array_equal(first, again)
    monkeypatch.setenv("GPT2_DIRECT_TOKENS", "1000")  # a compiled pool, once there, is used
    gpt2.sample_sequence(fresh_model, [prompt], 8, temperature=0)
    assert api._plan(fresh_model, 1, [len(prompt)], 8) == "compiled"


def test_what_the_uncompiled_sampler_leaves_to_the_compiled_loop(direct_budget, fresh_model):
    n_ctx = fresh_model.hparams.n_ctx
    plan = api._plan
    assert plan(fresh_model, 2, [5, 5], 10) == "direct"
    assert plan(fresh_model, 2, [5, 6], 10) == "compile"  # prompts of different lengths
    assert plan(fresh_model, 1, [n_ctx - 5], 6) == "compile"  # the window would slide
    assert plan(fresh_model, 9, [5] * 9, 10) == "compile"  # more rows than 8
    assert plan(fresh_model, 1, [5], 10, jit_compile=False) == "compile"  # a loop asked for by name
    assert plan(fresh_model, 1, [5], 10, logprobs=True) == "compile"
    assert plan(fresh_model, 1, [5], api.DIRECT_TOKENS + 1) == "compile"
    assert plan(fresh_model, 8, [5] * 8, api.DIRECT_TOKENS // 8 + 1) == "compile"  # the budget counts every row


def test_a_prompt_of_the_whole_context_keeps_only_the_last_logits(direct_budget, fresh_model):
    """The uncompiled sampler never makes logits for every prompt position ([b, n_ctx, V])."""
    n_ctx = fresh_model.hparams.n_ctx
    prompt = list(np.random.default_rng(0).integers(0, 50257, n_ctx - 1))
    quick = gpt2.sample_sequence(fresh_model, [prompt], 1, temperature=0)
    logits = fresh_model(np.array([prompt]))["logits"].numpy()[0, -1]
    assert quick[0, -1] == np.argmax(logits)
    graph = direct.sampler_for(fresh_model).step.get_concrete_function().graph
    vocab_sized = [op.name for op in graph.get_operations()
                   if op.type in ("MatMul", "BatchMatMulV2") and op.outputs[0].shape.rank == 3]
    assert not vocab_sized


def test_a_bad_budget_is_one_line(monkeypatch, fresh_model):
    monkeypatch.setenv("GPT2_DIRECT_TOKENS", "lots")
    with pytest.raises(ValueError, match="GPT2_DIRECT_TOKENS must be a whole number"):
        gpt2.sample_sequence(fresh_model, [[1, 2]], 2)


def numpy_gumbel_noise(seed, counter, ids):
    """choose.gumbel_noise in Python integers and float64: seed, counter int32 [b]; ids [b, n]."""
    def lowbias32(x):
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    out = np.zeros(np.shape(ids))
    for r, (s, c) in enumerate(zip(np.asarray(seed, np.int32).view(np.uint32).tolist(),
                                   np.asarray(counter, np.int32).view(np.uint32).tolist())):
        key = lowbias32((lowbias32(s ^ 0x5BD1E995) + c * 0x9E3779B9) & 0xFFFFFFFF)
        for j, token in enumerate(np.asarray(ids[r], np.int32).view(np.uint32).tolist()):
            mixed = lowbias32((token * 0x85EBCA6B + key) & 0xFFFFFFFF)
            high, low = lowbias32(mixed ^ key), lowbias32((mixed + 0x2C1B3C6D) & 0xFFFFFFFF)
            v = (high + (low + 0.5) / 2**32) / 2**32
            out[r, j] = -np.log(-np.log1p(-v))
    return out


def test_gumbel_noise_is_the_same_under_xla_and_numpy():
    import tensorflow as tf

    seed = np.array([0, 1, -1, 2**31 - 1, -(2**31), 12345], np.int32)
    counter = np.array([0, 1, 2, 3, 1000, 2**31 - 1], np.int32)
    ids = np.array([[0, 1, 2, 50256, -1, -197]] * 6, np.int32)
    plain = choose.gumbel_noise(tf.constant(seed), tf.constant(counter), tf.constant(ids)).numpy()
    compiled = tf.function(choose.gumbel_noise, jit_compile=True)(tf.constant(seed), tf.constant(counter),
                                                                  tf.constant(ids)).numpy()
    expected = numpy_gumbel_noise(seed, counter, ids)
    np.testing.assert_allclose(plain, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(compiled, expected, rtol=1e-6, atol=1e-6)
    # One row's noise over 50257 tokens is standard Gumbel: mean (Euler's gamma), variance
    # (pi^2 / 6) and the deciles of its CDF exp(-exp(-g)).
    noise = choose.gumbel_noise(tf.constant([7]), tf.constant([3]), tf.range(50257)[None]).numpy()[0]
    assert abs(noise.mean() - 0.5772) < 0.02 and abs(noise.var() - np.pi**2 / 6) < 0.05
    counts = np.histogram(np.exp(-np.exp(-noise)), bins=10, range=(0, 1))[0]
    assert np.abs(counts - 5025.7).max() < 300
    # Both tails are finite and exact: the extreme bits give -log(-log(1 - v)) of v = 2^-65 and 1 - 2^-65.
    extremes = tf.constant([0, 0, 2**32 - 1, 2**31], tf.uint32), tf.constant([0, 1, 2**32 - 1, 0], tf.uint32)
    v = np.array([0.5, 1.5, 2**64 - 0.5, 2**63 + 0.5]) / 2**64
    exact = -np.log(np.array([-np.log1p(-v[0]), -np.log1p(-v[1]), 65 * np.log(2), -np.log1p(-v[3])]))
    for function in (choose.gumbel_of_bits, tf.function(choose.gumbel_of_bits, jit_compile=True)):
        np.testing.assert_allclose(function(*extremes).numpy(), exact, rtol=1e-6)


def test_a_short_generate_run_compiles_nothing(tmp_path):
    """generate.py with a short length prints its text without "compiling" and fills no cache."""
    env = {k: v for k, v in os.environ.items() if k != "GPT2_DIRECT_TOKENS"}
    env["GPT2_CACHE_DIR"] = str(tmp_path / "cache")
    run = subprocess.run([sys.executable, "generate.py", "--model", TINY_MODEL, "--prompt", "Hello there",
                          "--length", "8", "--seed", "3", "--nsamples", "2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "compiling" not in run.stderr, run.stderr
    assert run.stdout.count("SAMPLE") == 2, run.stdout
    cached = [name for _, _, files in os.walk(tmp_path / "cache") for name in files]
    assert not cached, cached
