"""The Keras GPT-2 against reference values computed with OpenAI's own model code."""

import os

import numpy as np
import pytest
import tensorflow as tf

import gpt2
from gpt2.formats import base

from paths import TINY_MODEL

ATOL = 1e-4


def reference_array(name):
    return np.load(os.path.join(TINY_MODEL, "reference", name + ".npy"))


@pytest.mark.parametrize("case", ["len1", "len7", "len40", "batch2"])
def test_last_logits_match_reference(tiny_model, reference, case):
    logits = tiny_model(np.array(reference["inputs"][case]))["logits"].numpy()
    np.testing.assert_allclose(logits[:, -1], reference_array(f"last_logits_{case}"), rtol=0, atol=ATOL)
    np.testing.assert_allclose(logits[:, -1], reference["last_logits"][case], rtol=0, atol=ATOL)


def test_logits_at_every_position(tiny_model, reference):
    logits = tiny_model(np.array(reference["inputs"]["len7"]))["logits"].numpy()
    np.testing.assert_allclose(logits, reference_array("logits_len7_all"), rtol=0, atol=ATOL)
    expected = reference["len7_all_positions"]
    np.testing.assert_allclose(logits[0, :, :64], expected["logits_first64"], rtol=0, atol=ATOL)
    logsumexp = tf.reduce_logsumexp(logits[0].astype(np.float64), axis=-1).numpy()
    np.testing.assert_allclose(logsumexp, expected["logsumexp"], rtol=0, atol=ATOL)


def test_loss_matches_reference(tiny_model, reference):
    tokens = np.array(reference["inputs"]["len40"])
    assert float(tiny_model.loss(tokens)) == pytest.approx(reference["loss_len40"]["value"], abs=1e-5)
    per_position = reference["len40_per_position"]
    logits = tiny_model(tokens)["logits"].numpy()[0]
    target = logits[np.arange(39), tokens[0, 1:]]
    np.testing.assert_allclose(target, per_position["target_logit"], rtol=0, atol=ATOL)


def test_incremental_decoding_with_past(tiny_model, reference):
    ids = np.array([reference["incremental"]["ids"]])
    first = tiny_model(ids[:, :6])
    second = tiny_model(ids[:, 6:], past=first["present"])
    np.testing.assert_allclose(first["present"], reference_array("incr_present_after6"), rtol=0, atol=ATOL)
    np.testing.assert_allclose(second["present"], reference_array("incr_present_of_next4"), rtol=0, atol=ATOL)
    pieces = np.concatenate([first["logits"], second["logits"]], axis=1)
    np.testing.assert_allclose(pieces, reference_array("incr_6then4_logits"), rtol=0, atol=ATOL)
    whole = tiny_model(ids)["logits"].numpy()
    np.testing.assert_allclose(whole, reference_array("incr_full10_logits"), rtol=0, atol=ATOL)
    np.testing.assert_allclose(pieces, whole, rtol=0, atol=ATOL)


def test_present_has_openai_layout(tiny_model):
    hp = tiny_model.hparams
    out = tiny_model(np.zeros([3, 5], np.int32))
    assert out["present"].shape == (3, hp.n_layer, 2, hp.n_head, 5, hp.head_dim)
    assert out["logits"].shape == (3, 5, hp.n_vocab)


def test_batch_rows_equal_rows_alone(tiny_model, reference):
    batch = np.array(reference["inputs"]["batch2"])
    together = tiny_model(batch)["logits"].numpy()
    for i in range(len(batch)):
        alone = tiny_model(batch[i : i + 1])["logits"].numpy()
        np.testing.assert_allclose(together[i], alone[0], rtol=0, atol=ATOL)


def test_hidden_states_on_request(tiny_model):
    hp = tiny_model.hparams
    out = tiny_model(np.array([[1, 2, 3]]), return_hidden_states=True)
    assert len(out["hidden_states"]) == hp.n_layer + 1
    assert all(h.shape == (1, 3, hp.n_embd) for h in out["hidden_states"])
    final = tiny_model.logits(tiny_model.ln_f(out["hidden_states"][-1]))
    np.testing.assert_allclose(final, out["logits"], rtol=0, atol=1e-5)
    assert "hidden_states" not in tiny_model(np.array([[1, 2, 3]]))


def test_gradients_flow_to_every_weight(tiny_model, reference):
    tokens = np.array(reference["inputs"]["len7"])
    with tf.GradientTape() as tape:
        loss = tiny_model.loss(tokens)
    grads = tape.gradient(loss, tiny_model.trainable_variables)
    assert len(grads) == len(tiny_model.trainable_variables) == 4 + 12 * tiny_model.hparams.n_layer
    assert all(g is not None and np.any(tf.convert_to_tensor(g).numpy() != 0) for g in grads)


def test_dropout_only_when_training(reference):
    model = gpt2.load_model(TINY_MODEL)
    dropped = gpt2.GPT2(model.hparams, dropout=0.5)
    for source, target in zip(model.weights, dropped.weights):
        target.assign(source)
    tokens = np.array(reference["inputs"]["len7"])
    inference = dropped(tokens)["logits"].numpy()
    np.testing.assert_allclose(inference, model(tokens)["logits"], rtol=0, atol=1e-6)
    assert np.abs(dropped(tokens, training=True)["logits"].numpy() - inference).max() > 1e-2


def test_loss_survives_keras_compile():
    model = gpt2.GPT2(gpt2.HParams(n_vocab=10, n_ctx=8, n_embd=8, n_head=2, n_layer=1))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    assert float(model.loss(np.array([[1, 2, 3]]))) > 0


@pytest.mark.parametrize(
    "name, params",
    [("124M", 124_439_808), ("355M", 354_823_168), ("774M", 774_030_080), ("1558M", 1_557_611_200)],
)
def test_preset_parameter_counts(name, params):
    hp = gpt2.PRESETS[name]
    count = sum(int(np.prod(shape)) for shape in base.variable_shapes(hp).values())
    assert count == params


def test_hparams_validation():
    with pytest.raises(ValueError, match="n_embd \\(10\\) must be divisible by n_head \\(3\\)"):
        gpt2.HParams(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="n_layer must be a positive integer"):
        gpt2.HParams(n_layer=0)
    with pytest.raises(ValueError, match=r"unknown keys \['n_embed'\]"):
        gpt2.HParams.from_dict({"n_vocab": 1, "n_ctx": 1, "n_embed": 4, "n_embd": 4, "n_head": 1, "n_layer": 1})
    with pytest.raises(ValueError, match=r"missing keys \['n_layer'\]"):
        gpt2.HParams.from_dict({"n_vocab": 1, "n_ctx": 1, "n_embd": 4, "n_head": 1})


def test_more_positions_than_the_context_is_one_line(tiny_model):
    with pytest.raises(ValueError,
                       match=r"^65 positions do not fit the model's context of 64 tokens; shorten the input"):
        tiny_model(np.zeros([1, 65], np.int32))
    past = tiny_model(np.zeros([1, 60], np.int32))["present"]
    with pytest.raises(ValueError, match="^66 positions do not fit"):
        tiny_model(np.zeros([1, 6], np.int32), past=past)


def test_variable_paths_are_openai_names(tiny_model):
    names = set(base.model_variables(tiny_model))
    assert {v.path for v in tiny_model.weights} == names


def test_every_driver_runs_the_one_block_step(tiny_model, reference, monkeypatch):
    """The model's forward pass, the compiled loop (with or without XLA) and the uncompiled
    sampler all run `layers.block`, so a block variant is written once (issue 25, one step)."""
    from gpt2 import layers
    from gpt2.sampling.direct import DirectSampler
    from gpt2.sampling.pool import Pool

    real, calls = layers.block, []
    monkeypatch.setattr(layers, "block", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    tiny_model(np.array(reference["inputs"]["len7"]))
    assert len(calls) == tiny_model.hparams.n_layer
    for trace in (lambda: Pool(tiny_model, 1, jit_compile=False), lambda: Pool(tiny_model, 1, jit_compile=True),
                  lambda: DirectSampler(tiny_model).step.get_concrete_function()):
        calls.clear()
        trace()  # traced, not run
        assert calls, trace
