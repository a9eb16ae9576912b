"""HParams bounds (issue 10 item 15): absurd shapes are refused before anything is allocated, and
every message stays one short line however many problems an hparams.json has."""

import json

import pytest

from gpt2.hparams import GPT2ML_PRESETS, LIMITS, MAX_PARAMETERS, PRESETS, HParams


def test_released_shapes_are_well_inside_the_limits():
    largest = PRESETS["1558M"]
    assert largest.parameter_count == 1_557_611_200
    for shape in (largest, GPT2ML_PRESETS["1.5B"]):  # GPT2-ML's also has n_inner
        for name, limit in LIMITS.items():
            assert not hasattr(shape, name) or limit >= 16 * getattr(shape, name)
    assert MAX_PARAMETERS >= 40 * largest.parameter_count


def test_a_million_layers_is_refused_in_one_short_line():
    with pytest.raises(ValueError) as info:
        HParams(n_layer=1_000_000)
    assert str(info.value) == "hparams: n_layer must be at most 1024, got 1000000"


def test_too_many_weights_is_refused():
    with pytest.raises(ValueError, match="more than the 68,719,476,736 allowed"):
        HParams(n_embd=65536, n_head=64, n_layer=1024)


def test_many_problems_list_the_first_three_and_a_count(tmp_path):
    values = {"n_vocab": True, "n_ctx": 10**5000, "n_embd": "x" * 10_000, "n_head": 0, "n_layer": -1}
    with pytest.raises(ValueError) as info:
        HParams.from_dict(values, source="h.json")
    message = str(info.value)
    assert message.startswith("h.json: n_vocab must be a positive integer, got True; ")
    assert "an integer of 16610 bits" in message and message.endswith("; and 2 more")
    assert len(message) < 300

    unknown = {f"key{i}": i for i in range(100_000)}
    with pytest.raises(ValueError) as info:
        HParams.from_dict(dict(unknown, **PRESETS["124M"].__dict__), source="h.json")
    message = str(info.value)
    assert "unknown keys ['key0', 'key1', 'key10'] and 99997 more" in message and len(message) < 300


def test_oversized_or_deeply_nested_files_are_one_line_errors(tmp_path):
    path = tmp_path / "hparams.json"
    path.write_text(json.dumps({"n_vocab": 50257, "padding": " " * 100_000}))
    with pytest.raises(ValueError, match="too big for an hparams file"):
        HParams.from_json(str(path))
    path.write_text("[" * 60_000)
    with pytest.raises(ValueError, match="not valid JSON") as info:
        HParams.from_json(str(path))
    assert "\n" not in str(info.value)
    path.write_text('{"n_vocab": ' + "9" * 5000 + "}")
    with pytest.raises(ValueError, match="not valid JSON") as info:
        HParams.from_json(str(path))
    assert len(str(info.value)) < 300
