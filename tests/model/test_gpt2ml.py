"""GPT2-ML (imcaspar/gpt2-ml, Grover's model) from a tiny random checkpoint in their exact layout
(global_step and Adafactor slots included): loading, logits against a float64 NumPy reference of
their forward pass written here from their train/modeling.py, the cache, and every sampler."""

import os
import shutil

import numpy as np
import pytest

import gpt2
from gpt2 import reference as reference_path
from gpt2.checkpoint import CheckpointError
from gpt2.formats import gpt2ml
from gpt2.model import GPT2ML
from gpt2.sampling import api

from gpt2ml_support import HPARAMS, numpy_forward, random_weights

PROMPT = [5, 17, 3, 42, 8, 260, 0]  # n_vocab >= 256: the samplers filter among 256 candidates


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gpt2ml"))
    weights = random_weights(HPARAMS)
    gpt2ml.write_checkpoint(HPARAMS, path, weights.__getitem__, step=220000, slots=True)
    return path, weights


@pytest.fixture(scope="module")
def model(folder):
    return gpt2.load_model(folder[0])


def test_their_layout_loads_by_name(folder, model):
    path, weights = folder
    assert sorted(os.listdir(path)) == ["config.json", "model.ckpt-220000.data-00000-of-00001",
                                        "model.ckpt-220000.index"]
    assert isinstance(model, GPT2ML) and model.hparams == HPARAMS
    variables = model.checkpoint_variables()
    assert list(variables) == list(gpt2ml.variable_shapes(HPARAMS))  # Keras paths are their names
    for name, variable in variables.items():
        np.testing.assert_array_equal(variable.numpy(), weights[name])


def test_logits_equal_a_float64_reference_of_their_forward_pass(folder, model):
    expected = numpy_forward(folder[1], PROMPT)
    got = model(np.array([PROMPT], np.int32))["logits"].numpy()[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_cached_one_token_steps_equal_the_full_pass(model):
    full = model(np.array([PROMPT], np.int32))
    out = model(np.array([PROMPT[:3]], np.int32))
    past, logits = out["present"], [out["logits"].numpy()[0]]
    for token in PROMPT[3:]:
        out = model(np.array([[token]], np.int32), past=past)
        past = np.concatenate([past, out["present"]], axis=-2)
        logits.append(out["logits"].numpy()[0])
    np.testing.assert_allclose(np.concatenate(logits), full["logits"].numpy()[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(past, full["present"].numpy(), atol=1e-5, rtol=0)


def test_every_sampler_makes_the_plain_forward_pass_greedy_tokens(model, monkeypatch):
    expected = reference_path.generate(model, PROMPT, 10)
    for options in ({"jit_compile": True}, {"jit_compile": False}):
        assert api.sample_rows(model, [PROMPT], 10, temperature=0, **options)[0].tolist() == expected, options
    monkeypatch.delenv("GPT2_DIRECT_TOKENS", raising=False)  # the uncompiled sampler (conftest turns it off)
    fresh = gpt2.load_model(model.source_dir)  # its budget of uncompiled steps is counted per model
    assert api.sample_rows(fresh, [PROMPT], 10, temperature=0)[0].tolist() == expected
    assert not api.pools_of(fresh), "the uncompiled sampler did not run"


def test_an_unexpected_variable_is_a_one_line_error(tmp_path, folder):
    gpt2ml.write_checkpoint(HPARAMS, str(tmp_path), folder[1].__getitem__, slots=True,
                            extra={"newslm/layer00/surprise": np.zeros([3], np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected \['newslm/layer00/surprise'\]") as error:
        gpt2.load_model(str(tmp_path))
    assert "\n" not in str(error.value)


def test_the_prefix_comes_from_a_state_file_or_the_highest_step(tmp_path, folder):
    path = str(tmp_path)
    for step in (1000, 2000):
        gpt2ml.write_checkpoint(HPARAMS, path, folder[1].__getitem__, step=step)
    assert gpt2ml.checkpoint_prefix(path) == os.path.join(path, "model.ckpt-2000")
    with open(os.path.join(path, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "model.ckpt-1000"\n')
    assert gpt2ml.checkpoint_prefix(path) == os.path.join(path, "model.ckpt-1000")


def test_config_argument_and_the_preset(tmp_path, folder):
    path = str(tmp_path)
    gpt2ml.write_checkpoint(HPARAMS, path, folder[1].__getitem__)
    config = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 24,
              "max_position_embeddings": 40, "vocab_size": 9999}  # vocab_size is not used: word_embed's rows are
    os.remove(os.path.join(path, "config.json"))
    assert gpt2.load_model(path, config=config).hparams == HPARAMS
    with pytest.raises(CheckpointError, match="built-in 1.5B preset") as error:  # a bare folder: the 1.5B shape
        gpt2.load_model(path)
    assert "\n" not in str(error.value)


def test_a_gpt2ml_folder_gets_its_wordpiece_tokenizer(tmp_path):
    import encoder
    from encoder.wordpiece import WordPieceEncoder

    (tmp_path / "clue-vocab.txt").write_text("[PAD]\n[UNK]\n[SEP]\n宇\n宙\nab\n##c\n", encoding="utf-8")
    for tokenizer in (encoder.get_encoder(str(tmp_path)), encoder.encoder_for_model_dir(str(tmp_path))):
        assert isinstance(tokenizer, WordPieceEncoder)
        assert tokenizer.encode("宇宙 ABC") == [3, 4, 5, 6]
        assert tokenizer.decode([3, 4, 5, 6]) == "宇宙abc"



def test_generate_prints_chinese_with_sep_as_end_and_pad_banned(tmp_path, folder, capsys):
    """generate.py on a GPT2-ML folder: its WordPiece tokenizer, [SEP] (102) as the end of text,
    and a ban (logit bias -100) on [PAD] (0), as their demo never draws it."""
    import encoder
    from gpt2 import generate_cli
    from gpt2.sampling import settings as settings_lib

    path = tmp_path / "gpt2ml"
    shutil.copytree(folder[0], path)
    vocab = ["[PAD]", *[f"[unused{i}]" for i in range(99)], "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"宇宙的意义是"]
    vocab += [chr(0x4E00 + i) for i in range(HPARAMS.n_vocab - len(vocab))]
    (path / "clue-vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    argv = ["--model", str(path), "--prompt", "宇宙的意义是", "--length", "12", "--seed", "1"]
    assert generate_cli.main(argv) == 0
    text = capsys.readouterr().out.split("SAMPLE 1", 1)[1].splitlines()[1]
    assert text and all("\u4e00" <= ch <= "\u9fff" or ch in "[]#abcdefghijklmnopqrstuvwxyz0123456789" for ch in text)

    enc = encoder.get_encoder(str(path))
    assert (enc.eot_token, enc.never_drawn) == (102, (0,))
    args = generate_cli.build_parser().parse_args(argv)
    sampler = generate_cli._Sampler(args, enc, HPARAMS, settings_lib, enc.eot_token, stream=False)
    assert sampler.settings.logit_bias == ((0, -100.0),)
    args = generate_cli.build_parser().parse_args([*argv, "--logit-bias", "0=5"])  # the user's own word wins
    assert generate_cli._Sampler(args, enc, HPARAMS, settings_lib, 102, stream=False).settings.logit_bias == ((0, 5.0),)
