"""The TensorFlow-free sampling settings: defaults, validation messages, per-row packing, seeds."""

import subprocess
import sys

import numpy as np
import pytest

from gpt2.sampling import settings as settings_lib
from gpt2.sampling.settings import (
    SamplingSettings,
    SettingsError,
    check_length,
    check_prompt,
    check_seed,
    check_window_keep,
    pack_rows,
    row_seeds,
)


def test_defaults_are_off():
    s = SamplingSettings()
    assert (s.temperature, s.top_k, s.top_p, s.presence_penalty, s.frequency_penalty, s.repetition_penalty,
            s.logit_bias) == (1.0, 0, 1.0, 0.0, 0.0, 1.0, ())
    assert SamplingSettings(temperature=0).greedy


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.5, "temperature must be a finite number >= 0 and <= 100 (0 = greedy), got -0.5"),
    ("temperature", float("inf"), "temperature must be a finite number >= 0"),
    ("temperature", True, "temperature must be a finite number >= 0"),
    ("temperature", "1", "temperature must be a finite number >= 0"),
    ("top_k", -1, "top_k must be an integer >= 0 (0 = off), got -1"),
    ("top_k", 2.5, "top_k must be an integer >= 0"),
    ("top_p", 1.01, "top_p must be a number in [0, 1]"),
    ("top_p", float("nan"), "top_p must be a number in [0, 1]"),
    ("presence_penalty", 2.5, "presence_penalty must be a number in [-2, 2] (0 = off), got 2.5"),
    ("frequency_penalty", -3, "frequency_penalty must be a number in [-2, 2]"),
    ("repetition_penalty", 0, "repetition_penalty must be a finite number > 0, in [0.01, 100] (1 = off), got 0"),
    ("logit_bias", {"x": 1}, "logit_bias keys must be token ids (integers >= 0), got 'x'"),
    ("logit_bias", {-1: 1}, "logit_bias keys must be token ids"),
    ("logit_bias", {1: 200}, "logit_bias values must be numbers in [-100, 100], got 200 for token 1"),
    ("logit_bias", [1, 2], "logit_bias must map token ids to biases"),
    ("logit_bias", {i: 1 for i in range(1025)}, "logit_bias allows at most 1024 tokens, got 1025"),
])
def test_every_bad_value_names_its_field(field, value, message):
    with pytest.raises(SettingsError) as error:
        SamplingSettings(**{field: value})
    assert error.value.field == field
    assert message in str(error.value)


def test_values_are_normalised():
    s = SamplingSettings(temperature=1, top_k=40.0, top_p=0, logit_bias={"50256": -100, 3: 1})
    assert s.top_k == 40 and isinstance(s.top_k, int) and s.top_p == 0.0
    assert s.logit_bias == ((3, 1.0), (50256, -100.0))
    assert hash(s) == hash(SamplingSettings(temperature=1.0, top_k=40, top_p=0.0, logit_bias={3: 1, 50256: -100}))
    with pytest.raises(SettingsError, match=r"logit_bias token ids must be in \[0, 100\)"):
        s.check_vocab(100)


def test_packing_turns_huge_top_k_off():
    packed = pack_rows([SamplingSettings(top_k=2**64), SamplingSettings(top_k=40, logit_bias={2: 5})], 10)
    assert packed["top_k"].tolist() == [0, 0]  # 40 >= n_vocab 10 is off too
    assert packed["top_k"].dtype == np.int32
    assert packed["logit_bias"][1].tolist() == [0, 0, 5, 0, 0, 0, 0, 0, 0, 0]
    assert packed["logit_bias"][0].sum() == 0


def test_request_values():
    assert check_length(5.0) == 5
    with pytest.raises(SettingsError, match="max_tokens must be an integer >= 1, got 0"):
        check_length(0, "max_tokens")
    with pytest.raises(SettingsError, match="max_tokens must be at most 100, got 101"):
        check_length(101, "max_tokens", limit=100)
    assert check_seed(None) is None and check_seed(2**64 - 1) == 2**64 - 1
    for bad in (-1, 2**64, 1.5, "3", True):
        with pytest.raises(SettingsError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
            check_seed(bad)
    assert check_prompt([1, 2], 10, 4) == [1, 2]
    with pytest.raises(SettingsError, match=r"prompt has token ids outside the vocabulary \[0, 10\): \[10\]"):
        check_prompt([1, 10], 10, 4)
    with pytest.raises(SettingsError, match="prompt is 5 tokens, more than the model's context of 4"):
        check_prompt([1] * 5, 10, 4)
    assert check_window_keep(None, 1024) == 512
    with pytest.raises(SettingsError, match=r"window_keep must be an integer in \[1, 1023\]"):
        check_window_keep(1024, 1024)


def test_row_seeds_depend_on_seed_and_row_only():
    assert row_seeds(7, 5)[:3].tolist() == row_seeds(7, 3).tolist()
    assert row_seeds(7, 3).dtype == np.int32
    assert row_seeds(None, 2).tolist() != row_seeds(None, 2).tolist()


def test_settings_need_no_tensorflow():
    code = ("import sys; from gpt2.sampling.settings import SamplingSettings; import gpt2.sampling; "
            "SamplingSettings(top_k=3); assert 'tensorflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("field, value", [
    ("repetition_penalty", 1e-300), ("repetition_penalty", 0.0099), ("repetition_penalty", 100.5),
    ("repetition_penalty", 1e300), ("repetition_penalty", 10**400), ("temperature", 100.5), ("temperature", 1e300),
    ("temperature", 10**400), ("temperature", -1e-300), ("presence_penalty", 10**400), ("frequency_penalty", -1e300),
    ("top_p", 10**400), ("logit_bias", {1: 10**400}), ("logit_bias", {1: float("-inf")}),
])
def test_item4_float_settings_outside_their_bounds_are_refused(field, value):
    """Issue 24 item 4: repetition_penalty 1e-300 (0 in float32) made NaN logits; every float
    setting now has a range, and integers too large for a float are refused, not an OverflowError."""
    with pytest.raises(SettingsError) as error:
        SamplingSettings(**{field: value})
    assert error.value.field == field and len(str(error.value)) < 200


def test_item4_the_bounds_keep_float32_finite():
    """The accepted extremes, applied in float32 as the sampler does (a slow NumPy reference of
    the penalties, bias, log-softmax and temperature), to logits far beyond GPT-2's (+-1000),
    give finite log-probabilities and a finite distribution."""
    low, high = settings_lib.REPETITION_PENALTY_LIMITS
    assert SamplingSettings(repetition_penalty=low).repetition_penalty == low
    assert SamplingSettings(repetition_penalty=high, temperature=settings_lib.TEMPERATURE_LIMIT).temperature == 100
    logits = np.linspace(-1000, 1000, 4001, dtype=np.float32)
    counts = np.arange(4001, dtype=np.float32) % 3 * 1000  # a token may have been made 2000 times
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):  # overflow or NaN: fail
        for rp in (low, high):
            for penalty in (-settings_lib.PENALTY_LIMIT, settings_lib.PENALTY_LIMIT):
                for bias in (-settings_lib.LOGIT_BIAS_LIMIT, settings_lib.LOGIT_BIAS_LIMIT):
                    x = np.where(logits > 0, logits / np.float32(rp), logits * np.float32(rp))
                    x = x - np.float32(penalty) * (counts > 0) - np.float32(penalty) * counts + np.float32(bias)
                    shifted = x - x.max()
                    log_probs = shifted - np.log(np.exp(shifted).sum(dtype=np.float32))
                    assert np.isfinite(log_probs).all()
                    for temperature in (settings_lib.TEMPERATURE_LIMIT, 1e-3):
                        probs = np.exp(shifted / np.float32(temperature))
                        assert np.isfinite(probs).all() and probs.sum() >= 1


def test_item5_logit_bias_key_of_thousands_of_digits_is_a_settings_error():
    """Issue 24 item 5: int() of a key over 4300 digits raised ValueError (a 500 in the server)."""
    for key in ("1" * 4301, "9" * 19, 10**19):
        with pytest.raises(SettingsError, match="logit_bias keys must be token ids") as error:
            SamplingSettings(logit_bias={key: 1})
        assert len(str(error.value)) < 200
    assert SamplingSettings(logit_bias={"0" * 30 + "7": 1}).logit_bias == ((7, 1.0),)


def test_item6_integer_settings_refuse_bools():
    """Issue 24 item 6: True is an int in Python; no integer setting takes it as 1."""
    for call in (lambda: SamplingSettings(top_k=True), lambda: check_length(True), lambda: check_seed(False),
                 lambda: check_window_keep(True, 64), lambda: SamplingSettings(logit_bias={True: 1}),
                 lambda: check_prompt([True], 10, 4)):
        with pytest.raises(SettingsError):
            call()
