"""Narrow weights (weight-only, float32 arithmetic): int8 (a float32 scale per output channel, a
quarter of the bytes) and float16 (half): the same numbers as float32 run on the widened weights,
logits within a stated bound of float32, greedy decoding that follows float32 away from near ties,
clear refusals, and generate.py --dtype. The server's no-compile-after-start-up check with each
narrow dtype is the one slow test; float16's compiled (XLA) loop is checked by the greedy test."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import requests
import tensorflow as tf

import gpt2
from gpt2.layers import NarrowKernel, dequantize_int8, narrow_matmul, quantize_int8
from gpt2.sampling import api
from gpt2.sampling.decoder import Decoder
from gpt2.sampling.direct import sampler_for

from model_support import naive_greedy
from paths import TINY_MODEL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# On the fixture (random weights of std 0.3-0.4, larger than GPT-2's, so errors grow faster) the
# logits stay within this share of the largest float32 logit: int8 4% (measured: 2.9%; bfloat16's:
# 2.2%), float16 0.4% (measured: 0.18%; its 10 mantissa bits round each weight within 0.05%).
RELATIVE_TOLERANCE = {"int8": 0.04, "float16": 0.004}
# Teacher-forced greedy agreement with float32 on the fixture's sequences (measured: int8 94%, float16 100%).
GREEDY_AGREEMENT = {"int8": 0.9, "float16": 0.97}
BYTES = {"int8": 1, "float16": 2}


@pytest.fixture(scope="module", params=["int8", "float16"])
def narrow_model(request):
    return gpt2.load_model(TINY_MODEL, dtype=request.param)


def widened(narrow):
    """A float32 model holding `narrow`'s weights widened (int8: q * scale): the reference a narrow
    model is held to (and a fast one: eager float32 products)."""
    model = gpt2.load_model(TINY_MODEL)
    model_variables = model.checkpoint_variables()
    for name, holder in narrow.checkpoint_variables().items():
        if isinstance(holder, NarrowKernel):
            model_variables[name].assign(holder.value)
    return model


@pytest.fixture(scope="module")
def dequantized(narrow_model):
    return widened(narrow_model)


def test_quantize_round_trip_is_within_half_a_step_per_channel():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((130, 64)).astype(np.float32) * rng.uniform(0.01, 3, (130, 1)).astype(np.float32)
    rows[5] = 0  # a channel of zeros
    q, scale = (t.numpy() for t in quantize_int8(rows))
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (130,)
    expected = np.abs(rows).max(1) / 127
    expected[5] = 1
    np.testing.assert_allclose(scale, expected, rtol=1e-6)
    assert np.abs(q).max() == 127 and np.all(q[5] == 0)
    error = np.abs(dequantize_int8(q, scale).numpy() - rows)
    assert np.all(error <= scale[:, None] / 2 * (1 + 1e-5))
    # (x @ q^T) * scale equals x @ (q * scale)^T: one row, several (two 64-channel chunks and a
    # partial one), in TensorFlow and under XLA.
    for n in (1, 3):
        x = rng.standard_normal((n, 64)).astype(np.float32)
        reference = x.astype(np.float64) @ (q.astype(np.float64) * scale[:, None]).T
        np.testing.assert_allclose(narrow_matmul(x, q, scale).numpy(), reference, rtol=1e-5, atol=1e-5)
        compiled = tf.function(lambda x: narrow_matmul(x, q, scale), jit_compile=True)
        np.testing.assert_allclose(compiled(x).numpy(), reference, rtol=1e-5, atol=1e-5)


def test_float16_matmul_is_exact_on_the_rounded_weights():
    """float16 kernels have no scale: x @ q^T with q widened exactly, one row and several (two
    64-channel chunks and a partial one), in TensorFlow and under XLA."""
    rng = np.random.default_rng(1)
    q = (rng.standard_normal((130, 64)) * 3).astype(np.float16)
    for n in (1, 3):
        x = rng.standard_normal((n, 64)).astype(np.float32)
        reference = x.astype(np.float64) @ q.astype(np.float64).T
        np.testing.assert_allclose(narrow_matmul(x, q).numpy(), reference, rtol=1e-5, atol=1e-5)
        compiled = tf.function(lambda x: narrow_matmul(x, q), jit_compile=True)
        np.testing.assert_allclose(compiled(x).numpy(), reference, rtol=1e-5, atol=1e-5)


def test_weights_are_narrow_and_fewer_bytes(tiny_model, narrow_model):
    dtype = narrow_model.weight_dtype
    kinds = {v.path.rsplit("/", 1)[-1]: v.dtype for v in narrow_model.weights}
    assert kinds["w"] == kinds["wte"] == dtype and kinds["b"] == kinds["g"] == kinds["wpe"] == "float32"
    assert kinds.get("w_scale") == ("float32" if dtype == "int8" else None)
    assert narrow_model.default_jit_compile and narrow_model.compute_dtype == "float32"
    size = lambda model: sum(int(np.prod(v.shape)) * BYTES.get(v.dtype, 4) for v in model.weights)
    narrow = sum(int(np.prod(v.shape)) for v in narrow_model.weights if v.dtype == dtype)
    assert narrow / sum(int(np.prod(v.shape)) for v in tiny_model.weights) > 0.8  # most weights
    assert size(narrow_model) < (0.2 + 0.25 * BYTES[dtype]) * size(tiny_model)


def test_logits_are_float32_on_the_widened_weights_and_close_to_float32(tiny_model, narrow_model, dequantized,
                                                                         reference):
    """The narrow model computes what float32 does with each weight replaced by its widened value
    (1e-4), and stays within RELATIVE_TOLERANCE of the float32 checkpoint's logits."""
    for case in ("len7", "len40", "batch2"):
        tokens = np.array(reference["inputs"][case])
        full = tiny_model(tokens)["logits"].numpy()
        low = narrow_model(tokens)["logits"].numpy()
        assert low.dtype == np.float32
        np.testing.assert_allclose(low, dequantized(tokens)["logits"].numpy(), atol=1e-4, rtol=1e-4)
        assert np.abs(low - full).max() <= RELATIVE_TOLERANCE[narrow_model.weight_dtype] * np.abs(full).max()


def encoder():
    from encoder import get_encoder

    return get_encoder("tiny-model", os.path.dirname(TINY_MODEL))


def greedy_follows(model, case, out, length):
    """How many of `out`'s new tokens are `model`'s greedy ones (the dequantized model's: the narrow
    model's own), checked up to its first near tie."""
    expected, margins = naive_greedy(model, case["prompt_ids"], length)
    clear = next((i for i, margin in enumerate(margins) if margin < 1e-3), length)
    start = len(case["prompt_ids"])
    assert list(out[: start + clear]) == expected[: start + clear]
    return clear


def test_greedy_agrees_with_float32_and_the_sampler_with_the_model(tiny_model, narrow_model, dequantized,
                                                                    reference, monkeypatch):
    """Teacher-forced on the fixture's greedy sequences, the narrow model picks float32's token at
    GREEDY_AGREEMENT of positions (the fixture's smallest greedy margin is 0.024; int8's logit
    error 0.3, float16's 0.02). The sampler gives the model's own greedy tokens up to its first
    near tie: int8 the uncompiled sampler (short jobs; its compiled loop is checked by the server
    test), float16 the compiled loop, which is XLA's (where its speed comes from)."""
    monkeypatch.delenv("GPT2_DIRECT_TOKENS", raising=False)
    dtype = narrow_model.weight_dtype
    assert api.direct_tokens(narrow_model) == api.DIRECT_TOKENS // 4 == 64  # 3 x 20 tokens stay uncompiled
    if dtype == "float16":
        monkeypatch.setenv("GPT2_DIRECT_TOKENS", "0")  # always compile
    agree, followed = [], 0
    for case in reference["greedy"]["cases"]:
        ids = np.array([case["all_ids"]])
        agree.extend(narrow_model(ids)["logits"].numpy()[0].argmax(-1)
                     == tiny_model(ids)["logits"].numpy()[0].argmax(-1))
        out = gpt2.sample_sequence(narrow_model, [case["prompt_ids"]], 20, temperature=0)[0]
        followed += greedy_follows(dequantized, case, out, 20)
    pools = api._pools.get(narrow_model, {})
    assert list(pools) == ([(1, True)] if dtype == "float16" else [])  # (slots, jit_compile)
    assert np.mean(agree) >= GREEDY_AGREEMENT[dtype] and followed >= 40


def test_the_cache_is_16_bit_for_float16_weights_and_float32_otherwise(tiny_model, narrow_model):
    """float16 weights: both samplers hold keys and values in float16 (half the bytes; attention
    widens them); int8 and float32 models keep a float32 cache."""
    expected = tf.float16 if narrow_model.weight_dtype == "float16" else tf.float32
    for model, dtype in ((narrow_model, expected), (tiny_model, tf.float32)):
        assert model.cache_dtype == dtype
        spec = Decoder(model, 1).state_spec()
        assert spec["k0"][1] == spec["v0"][1] == dtype
        assert sampler_for(model).cache_dtype == dtype
    assert Decoder(narrow_model, 1).cache_bytes() * 4 == Decoder(tiny_model, 1).cache_bytes() * expected.size


def test_speculative_decoding_verifies_with_narrow_logits(narrow_model):
    """A verification pass (several positions' logits at once) on a narrow embedding: the same
    greedy tokens as plain decoding (regression: the several-rows product took wte as a float tensor)."""
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3]  # prompt lookup proposes 4, 1, 2, ...
    plain = gpt2.sample_sequence(narrow_model, [prompt], 20, temperature=0, jit_compile=False)
    lookup = gpt2.PromptLookup()
    faster = gpt2.sample_sequence(narrow_model, [prompt], 20, temperature=0, jit_compile=False, draft=lookup)
    np.testing.assert_array_equal(faster, plain)
    assert lookup.stats.rounds > 0  # some passes verified drafts


def test_saving_a_narrow_model_writes_its_widened_weights(narrow_model, reference, tmp_path):
    gpt2.checkpoint.save_checkpoint(narrow_model, tmp_path)
    tokens = np.array(reference["inputs"]["len7"])
    np.testing.assert_allclose(gpt2.load_model(str(tmp_path))(tokens)["logits"].numpy(),
                               narrow_model(tokens)["logits"].numpy(), atol=1e-4, rtol=1e-4)


def test_refusals_are_one_line_errors(narrow_model):
    from gpt2.hparams import GPT2MLHParams
    from gpt2.model import GPT2ML
    from gpt2.train import lora

    dtype = narrow_model.weight_dtype
    inference_only = f"needs trainable weights and this model holds {dtype} weights (inference only); load it with"
    with pytest.raises(ValueError, match=re.escape("training " + inference_only)):
        narrow_model(np.array([[1, 2, 3]]), training=True)
    with pytest.raises(ValueError, match=re.escape("a LoRA adapter " + inference_only)):
        lora.add_adapters(narrow_model, rank=2)
    with pytest.raises(ValueError, match=f"{dtype} weights are for GPT-2 models with the float32 dtype policy"):
        GPT2ML(GPT2MLHParams(n_vocab=30, n_ctx=8, n_embd=8, n_head=2, n_layer=1, n_inner=8), weight_dtype=dtype)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, mixed_bfloat16, int8, float16, got"):
        gpt2.load_model(TINY_MODEL, dtype="int4")


def test_float16_refuses_a_weight_beyond_its_range(tiny_model, tmp_path):
    """A weight over 65504 in magnitude (float16's largest) is refused in one line naming it,
    not loaded as inf."""
    model = gpt2.load_model(TINY_MODEL)
    weight = model.checkpoint_variables()["model/h0/mlp/c_fc/w"]
    weight.assign(tf.tensor_scatter_nd_update(weight, [[0, 1]], [-7e4]))
    gpt2.checkpoint.save_checkpoint(model, tmp_path)
    message = "model/h0/mlp/c_fc/w: a weight of magnitude 70000 does not fit float16 (at most 65504); load this"
    with pytest.raises(ValueError, match=re.escape(message)):
        gpt2.load_model(str(tmp_path), dtype="float16")


def test_generate_cli_with_dtype(capsys, narrow_model, reference, monkeypatch):
    from gpt2 import generate_cli

    dtype = narrow_model.weight_dtype

    def load(model_dir, load_model, **options):  # the module's model (its sampler is ready)
        assert options["dtype"] == dtype
        return narrow_model

    monkeypatch.setattr(generate_cli, "_load_model", load)
    monkeypatch.setenv("GPT2_DIRECT_TOKENS", "1000")  # the uncompiled sampler: nothing to compile
    case = reference["greedy"]["cases"][0]
    assert generate_cli.main(["--model", TINY_MODEL, "--dtype", dtype, "--top-k", "1", "--length", "8",
                              "--prompt", case["prompt_text"]]) == 0
    out = capsys.readouterr().out
    expected = gpt2.sample_sequence(narrow_model, [case["prompt_ids"]], 8, temperature=0)[0, len(case["prompt_ids"]):]
    assert encoder().decode(expected.tolist()) in out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_server_with_narrow_weights_compiles_nothing_after_start_up(reference, dtype):
    """The server's default for narrow weights: the XLA-compiled loop, compiled once at start-up;
    its greedy text is the narrow model's own."""
    dequantized = widened(gpt2.load_model(TINY_MODEL, dtype=dtype))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2.serve", "--model", TINY_MODEL, "--port", "0", "--dtype", dtype,
         "--max-batch", "2", "--log-level", "warning"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        match = re.search(r"serving tiny-model on (http://127\.0\.0\.1:\d+)", proc.stdout.readline())
        assert match, proc.stderr.read()[-3000:]
        url = match.group(1)
        assert requests.get(url + "/health", timeout=30).json()["compiled_programs"] == 1
        followed = 0
        for case in reference["greedy"]["cases"]:
            body = {"text": case["prompt_text"], "length": 20, "temperature": 0}
            text = requests.post(url + "/generate", json=body, timeout=120).json()["generated_text"]
            expected, margins = naive_greedy(dequantized, case["prompt_ids"], 20)
            clear = next((i for i, margin in enumerate(margins) if margin < 1e-3), 20)
            start = len(case["prompt_ids"])
            assert text.startswith(encoder().decode(expected[start: start + clear]).rstrip("\ufffd"))
            followed += clear
        assert followed >= 40
        for i, (prompt, tokens) in enumerate([("Hi", 3), ("A longer prompt of several words " * 4, 40), ("x", 1)]):
            body = {"model": "tiny-model", "prompt": [prompt] * (1 + i % 2), "max_tokens": tokens,
                    "temperature": 0.5 * i, "logprobs": i, "stream": i == 1}
            assert requests.post(url + "/v1/completions", json=body, timeout=120).status_code == 200
        body = {"model": "tiny-model", "prompt": "Hi there", "max_tokens": 0, "echo": True, "logprobs": 1}
        assert requests.post(url + "/v1/completions", json=body, timeout=120).status_code == 200
        assert requests.get(url + "/health", timeout=30).json()["compiled_programs"] == 1
    finally:
        proc.kill()
        proc.communicate()
