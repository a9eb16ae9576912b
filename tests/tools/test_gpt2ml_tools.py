"""Scoring and export with a tiny random GPT2-ML folder (tests/gpt2ml_support.py): gpt2.perplexity,
gpt2.score and `python -m gpt2.evaluate` against a float64 NumPy reference of their forward pass
(evaluate asks the folder for its shape and tokenizer: WordPiece, [SEP] prepended), and
`python -m gpt2.export`, whose generation pads with [SEP] and never draws [PAD]."""

import json
import os

import numpy as np
import pytest

import gpt2
from gpt2 import evaluate, export

from gpt2ml_support import HPARAMS, numpy_forward, pad_loving, random_weights, write_folder

TEXT = "宇宙的意义是，宇宙的意义是。\nB 12！"


def reference_nll(weights, tokens):
    """Per-token NLL of tokens[1:] under their forward pass, float64."""
    logits = numpy_forward(weights, tokens[:-1])
    logits = logits - logits.max(-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -logprobs[np.arange(len(tokens) - 1), tokens[1:]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gpt2ml"))
    return path, write_folder(path)


@pytest.fixture(scope="module")
def model(folder):
    return gpt2.load_model(folder[0])


def test_score_and_perplexity_equal_the_reference(folder, model):
    import encoder

    enc = encoder.encoder_for_model_dir(folder[0])
    tokens = [enc.eot_token, *enc.encode(TEXT)]
    assert len(tokens) <= HPARAMS.n_ctx + 1 and enc.unk_token not in tokens
    nll = reference_nll(folder[1], tokens)
    np.testing.assert_allclose(-gpt2.score(model, [tokens])[0], nll, atol=1e-4, rtol=0)
    result = gpt2.perplexity(model, tokens)
    assert result.tokens == len(tokens) - 1
    np.testing.assert_allclose(result.mean_nll, nll.mean(), atol=1e-5, rtol=0)


def test_evaluate_reads_the_folders_shape_and_tokenizer(folder, model, monkeypatch, tmp_path, capsys):
    import encoder

    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    monkeypatch.setattr(evaluate, "_load_model", lambda model_dir, load_model: model)
    assert evaluate.main(["--model", folder[0], "--json", str(path)]) == 0
    got = json.loads(capsys.readouterr().out)
    enc = encoder.encoder_for_model_dir(folder[0])
    nll = reference_nll(folder[1], [102, *enc.encode(TEXT)])  # [SEP], the end of text, first
    assert got["tokens"] == len(nll)
    np.testing.assert_allclose(got["nll"], nll.mean(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["bits_per_byte"], nll.sum() / np.log(2) / len(TEXT.encode()), rtol=1e-5)


@pytest.mark.slow  # traces the export's generation loop (about 50 s on 2 busy cores)
def test_export_pads_with_sep_and_bans_pad_in_the_graph(tmp_path):
    """A folder whose greedy next token is [PAD] after any prompt: the export draws it never, and
    its logits signature shows it is the argmax."""
    import tensorflow as tf

    source = tmp_path / "gpt2ml"
    weights = pad_loving(random_weights())
    write_folder(source, weights=weights)
    prompt = [104, 105, 106]  # 宇宙的
    assert np.argmax(numpy_forward(weights, prompt)[-1]) == 0
    target = export.export_model(str(source), str(tmp_path / "out"), jit_compile=False, max_new_tokens=6,
                                 batch_sizes=[2])
    assert os.listdir(os.path.join(target, "assets")) == ["clue-vocab.txt"]
    loaded = tf.saved_model.load(target)
    logits = loaded.signatures["logits"](tokens=tf.constant([prompt], tf.int32))["logits"].numpy()
    np.testing.assert_allclose(logits[0], numpy_forward(weights, prompt), atol=1e-4, rtol=0)
    out = loaded.signatures["serving_default"](
        tokens=tf.constant([prompt, prompt], tf.int32), lengths=tf.constant([3, 3]),
        max_new_tokens=tf.constant([6, 3]), temperature=tf.constant([0.0, 0.0]), top_k=tf.constant([0, 0]),
        top_p=tf.constant([1.0, 1.0]), seed=tf.constant([1, 2]))
    tokens, counts = out["tokens"].numpy(), out["num_tokens"].numpy()
    assert counts.tolist() == [6, 3] and 0 not in tokens
    assert tokens[1, 3:].tolist() == [102] * 3  # past num_tokens: [SEP]
    library = gpt2.load_model(str(source))
    expected = gpt2.sample_sequence(library, [prompt], 6, temperature=0, logit_bias={0: -100})[0, 3:]
    assert tokens[0].tolist() == expected.tolist()


def test_random_checkpoint_in_their_layout(tmp_path, monkeypatch, capsys):
    from gpt2 import checkpoint

    monkeypatch.setitem(checkpoint.GPT2ML_RANDOM, "gpt2ml-1.5B", HPARAMS)  # the real one is 5.5 GB
    assert checkpoint.main(["--random", "gpt2ml-1.5B", str(tmp_path), "--seed", "3"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.ckpt-220000.data-00000-of-00001",
                                            "model.ckpt-220000.index"]
    import tensorflow as tf

    names = tf.train.load_checkpoint(str(tmp_path / "model.ckpt-220000")).get_variable_to_shape_map()
    assert "global_step" in names and "newslm/layer01/intermediate/kernel/adafactor_vr" in names
    model = gpt2.load_model(str(tmp_path))
    assert model.hparams == HPARAMS
    norm = model.checkpoint_variables()["newslm/layer00/LayerNorm_mlp_ln0/gamma"].numpy()
    kernel = model.checkpoint_variables()["newslm/layer00/query_layer/kernel"].numpy()
    assert (norm == 1).all() and 0.015 < kernel.std() < 0.025
