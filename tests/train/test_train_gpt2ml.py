"""Fine-tuning a tiny random GPT2-ML folder (their layout, tests/gpt2ml_support.py): train.py writes
the result back in THEIR layout (model.ckpt-N with their variable names and global_step,
config.json, the vocabulary file, the `checkpoint` state file naming it) that gpt2.load_model reads
again; a resume continues it; LoRA adapts all six projections of each block."""

import os

import numpy as np
import pytest
import tensorflow as tf

import gpt2
from gpt2.formats import gpt2ml
from gpt2.train import lora
from gpt2.train.cli import main
from gpt2.train.state import holds_model
from gpt2.train.trainer import finetune

from gpt2ml_support import HPARAMS, VOCAB_FILE, write_folder

TEXT = "宇宙的意义是，宇宙的意义是。user：system！" * 20
SETTINGS = {"batch_size": 2, "seq_len": 16, "learning_rate": 1e-2, "progress": False}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2ml") / "released"
    write_folder(path)
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def their_names(prefix):
    """{name: value} of a checkpoint as their TF1 code's Saver would read it."""
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def test_train_py_writes_their_layout_that_loads_again(source, corpus, tmp_path, capsys):
    output = str(tmp_path / "out")
    args = ["--model", source, "--dataset", corpus, "--output", output, "--save-every", "2", "--batch-size", "2",
            "--seq-len", "16", "--learning-rate", "1e-2", "--no-progress"]
    assert main([*args, "--steps", "3"]) == 0, capsys.readouterr().err
    files = set(os.listdir(output)) - {"train_state", "token_cache"}
    assert files == {"checkpoint", "config.json", VOCAB_FILE, "model.ckpt-3.index",
                     "model.ckpt-3.data-00000-of-00001"}  # step 2's files are gone
    assert 'model_checkpoint_path: "model.ckpt-3"' in open(os.path.join(output, "checkpoint")).read()
    assert holds_model(output) and not any(name.startswith(".") for name in os.listdir(output))
    saved = their_names(os.path.join(output, "model.ckpt-3"))
    assert set(saved) == {*gpt2ml.variable_shapes(HPARAMS), "global_step"} and int(saved["global_step"]) == 3
    for name, shape in gpt2ml.variable_shapes(HPARAMS).items():
        assert list(saved[name].shape) == shape and saved[name].dtype == np.float32, name
    before, after = gpt2.load_model(source), gpt2.load_model(output)
    assert after.hparams == HPARAMS
    for name, variable in after.checkpoint_variables().items():
        np.testing.assert_array_equal(variable.numpy(), saved[name])
    changed = [name for name, variable in before.checkpoint_variables().items()
               if not np.array_equal(variable.numpy(), saved[name])]
    assert len(changed) == len(saved) - 1  # every weight trained

    assert main([*args, "--steps", "4", "--resume"]) == 0, capsys.readouterr().err
    assert {name for name in os.listdir(output) if name.startswith("model.ckpt")} == {
        "model.ckpt-4.index", "model.ckpt-4.data-00000-of-00001"}
    assert main([*args, "--steps", "4"]) == 1 and "already holds a model" in capsys.readouterr().err


def test_lora_adapts_every_projection_of_their_block(source, corpus, tmp_path):
    model = gpt2.load_model(source)
    output = str(tmp_path / "lora")
    result = finetune(model, corpus, output, source_dir=source, steps=2, lora_rank=2, **SETTINGS)
    assert result.step == 2
    paths = [path for path, _ in lora.projections(model)]
    assert paths == [f"layer{i:02d}/{name}" for i in range(HPARAMS.n_layer) for name in lora.ML_TARGETS]
    base, saved = their_names(gpt2ml.checkpoint_prefix(source)), their_names(os.path.join(output, "model.ckpt-2"))
    adapted = {f"newslm/{path}/kernel" for path in paths}
    for name in gpt2ml.variable_shapes(HPARAMS):
        assert np.array_equal(base[name], saved[name]) != (name in adapted), name  # only the kernels changed
    for name, variable in model.checkpoint_variables().items():  # the base weights are back after the save
        np.testing.assert_array_equal(variable.numpy(), base[name])
    np.testing.assert_allclose(gpt2.load_model(output)(np.array([[104, 105, 106]]))["logits"],
                               model(np.array([[104, 105, 106]]))["logits"], atol=1e-5)


def test_holds_model_counts_every_format(tmp_path):
    for files in (["config.json", "model.ckpt-5.index"], ["model.safetensors"], ["hparams.json"]):
        folder = tmp_path / files[0].replace(".", "-")
        folder.mkdir()
        for name in files:
            (folder / name).write_bytes(b"")
        assert holds_model(str(folder)), files
    assert not holds_model(str(tmp_path)) and not holds_model(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{}")  # a config alone is no model
    assert not holds_model(str(tmp_path))
