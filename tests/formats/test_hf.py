"""Hugging Face GPT-2 folders: reading both naming styles (single file, sharded, float16 and
bfloat16), converting to and from OpenAI's layout bit for bit, and the one-line errors.

The folders are built here from the tiny OpenAI fixture with the `safetensors` package itself,
independently of gpt2.formats.hf's writer, in the layouts found in the wild.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import gpt2
from gpt2 import convert
from gpt2.formats import base, hf
from gpt2.formats.base import CheckpointError

import paths  # tests/paths.py: the folders the tests read
from paths import TINY_MODEL

safetensors_numpy = pytest.importorskip("safetensors.numpy")
ml_dtypes = pytest.importorskip("ml_dtypes")

ATOL = 1e-4
ROOT = paths.ROOT
HUB_CONFIG = {  # the keys of the hub's original gpt2 config.json, at the fixture's shape
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 64, "n_embd": 32, "n_head": 4,
    "n_layer": 2, "n_positions": 64, "resid_pdrop": 0.1, "summary_activation": None,
    "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
    "summary_use_proj": True, "vocab_size": 50257,
}


@pytest.fixture(scope="module")
def fixture_tensors():
    """OpenAI name -> float32 array of the tiny fixture, straight from its checkpoint."""
    reader = tf.train.load_checkpoint(TINY_MODEL)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def hub_tensors(fixture_tensors, prefix="", dtype=np.float32):
    """The fixture under Hugging Face names: Conv1D weights without the leading axis."""
    names = hf.hf_names(gpt2.HParams.from_json(os.path.join(TINY_MODEL, "hparams.json")))
    return {prefix + names[name]: np.ascontiguousarray(value.reshape(hf.hf_shape(list(value.shape))).astype(dtype))
            for name, value in fixture_tensors.items()}


def make_folder(path, tensors, config=None, shards=1, vocab=True):
    """Writes a Hugging Face folder: config.json, weights (sharded if shards > 1), BPE files."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(HUB_CONFIG if config is None else config, f)
    if shards == 1:
        safetensors_numpy.save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {name: tensors[name] for name in names[i::shards]}
            safetensors_numpy.save_file(part, os.path.join(path, file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    if vocab:
        shutil.copyfile(os.path.join(TINY_MODEL, "encoder.json"), os.path.join(path, "vocab.json"))
        shutil.copyfile(os.path.join(TINY_MODEL, "vocab.bpe"), os.path.join(path, "merges.txt"))
    return str(path)


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory, fixture_tensors):
    """The hub's original naming, with the causal-mask buffers the old files carry."""
    tensors = hub_tensors(fixture_tensors)
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((64, 64), np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    return make_folder(tmp_path_factory.mktemp("hub") / "gpt2", tensors)


def assert_weights_equal(model, fixture_tensors, cast=None):
    for name, variable in base.model_variables(model).items():
        expected = fixture_tensors[name] if cast is None else fixture_tensors[name].astype(cast).astype(np.float32)
        assert variable.dtype == "float32"
        np.testing.assert_array_equal(variable.numpy(), expected.reshape(variable.shape), err_msg=name)


def test_hub_folder_gives_the_reference_logits(hub_folder, reference):
    model = gpt2.load_model(hub_folder)
    assert model.hparams == gpt2.HParams(n_vocab=50257, n_ctx=64, n_embd=32, n_head=4, n_layer=2)
    for case in ("len1", "len40", "batch2"):
        logits = model(np.array(reference["inputs"][case]))["logits"].numpy()[:, -1]
        expected = np.load(os.path.join(TINY_MODEL, "reference", f"last_logits_{case}.npy"))
        np.testing.assert_allclose(logits, expected, rtol=0, atol=ATOL)
    logits = model(np.array(reference["inputs"]["len7"]))["logits"].numpy()
    expected = np.load(os.path.join(TINY_MODEL, "reference", "logits_len7_all.npy"))
    np.testing.assert_allclose(logits, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("lm_head", [False, True])
def test_save_pretrained_names_with_or_without_a_tied_lm_head(tmp_path, fixture_tensors, lm_head):
    tensors = hub_tensors(fixture_tensors, prefix="transformer.")
    if lm_head:
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    folder = make_folder(tmp_path / "saved", tensors, config=hf.config_from_hparams(gpt2.PRESETS["124M"]) | {
        "n_embd": 32, "n_head": 4, "n_layer": 2, "n_positions": 64})
    assert_weights_equal(gpt2.load_model(folder), fixture_tensors)


def test_sharded_folder(tmp_path, fixture_tensors):
    folder = make_folder(tmp_path / "sharded", hub_tensors(fixture_tensors, "transformer."), shards=3)
    assert len([name for name in os.listdir(folder) if name.endswith(".safetensors")]) == 3
    assert_weights_equal(gpt2.load_model(folder), fixture_tensors)


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_half_precision_weights_are_cast_to_float32(tmp_path, fixture_tensors, dtype):
    dtype = getattr(ml_dtypes, dtype) if isinstance(dtype, str) else dtype
    folder = make_folder(tmp_path / "half", hub_tensors(fixture_tensors, dtype=dtype))
    assert_weights_equal(gpt2.load_model(folder), fixture_tensors, cast=dtype)


def test_by_name_under_models_dir_and_without_bpe_files(tmp_path, fixture_tensors):
    make_folder(tmp_path / "my-gpt2", hub_tensors(fixture_tensors), vocab=False)
    assert gpt2.load_model("my-gpt2", models_dir=str(tmp_path)).hparams.n_layer == 2
    assert gpt2.checkpoint.read_hparams(str(tmp_path / "my-gpt2")).n_ctx == 64
    assert gpt2.checkpoint.check_model_dir(str(tmp_path / "my-gpt2")).n_embd == 32


def test_encoder_comes_from_vocab_json_and_merges_txt(hub_folder, tmp_path):
    from encoder import encoder_files_for_model_dir, encoder_for_model_dir, get_encoder

    assert encoder_files_for_model_dir(hub_folder) == (
        os.path.join(hub_folder, "vocab.json"), os.path.join(hub_folder, "merges.txt"))
    enc = encoder_for_model_dir(hub_folder)
    assert enc is not get_encoder()  # its own files, not the bundled ones
    assert enc.encode("Hello, my name is") == get_encoder().encode("Hello, my name is") == [15496, 11, 616, 1438, 318]
    os.makedirs(tmp_path / "bare")
    assert encoder_for_model_dir(str(tmp_path / "bare")) is get_encoder()


def read_checkpoint(folder):
    reader = tf.train.load_checkpoint(folder)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def test_openai_to_hf_to_openai_is_bit_exact(tmp_path, fixture_tensors, capsys):
    hf_dir, back = str(tmp_path / "hf"), str(tmp_path / "back")
    assert convert.main(["--to", "hf", TINY_MODEL, hf_dir]) == 0
    assert convert.main(["--to", "openai", hf_dir, back]) == 0
    assert capsys.readouterr().out.count("wrote ") == 2

    assert sorted(os.listdir(hf_dir)) == [
        "config.json", "generation_config.json", "merges.txt", "model.safetensors", "vocab.json"]
    with safetensors_numpy.safe_open(os.path.join(hf_dir, "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(hub_tensors(fixture_tensors, "transformer."))  # no lm_head
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["n_positions"], config["n_embd"], config["n_head"], config["n_layer"], config["vocab_size"]) == (
        64, 32, 4, 2, 50257)
    with open(os.path.join(hf_dir, "generation_config.json"), encoding="utf-8") as f:
        generation = json.load(f)
    assert generation["bos_token_id"] == generation["eos_token_id"] == 50256

    for ours, original in (("vocab.json", "encoder.json"), ("merges.txt", "vocab.bpe")):
        with open(os.path.join(hf_dir, ours), "rb") as a, open(os.path.join(TINY_MODEL, original), "rb") as b:
            assert a.read() == b.read()
    assert {"encoder.json", "vocab.bpe", "hparams.json", "checkpoint"} <= set(os.listdir(back))
    with open(os.path.join(back, "hparams.json"), encoding="utf-8") as a, \
            open(os.path.join(TINY_MODEL, "hparams.json"), encoding="utf-8") as b:
        assert json.load(a) == json.load(b)
    written = read_checkpoint(back)
    assert {name: value.shape for name, value in written.items()} == {
        name: value.shape for name, value in fixture_tensors.items()}
    for name, value in fixture_tensors.items():
        assert written[name].dtype == value.dtype and written[name].tobytes() == value.tobytes(), name


def test_hub_folder_to_openai_layout(hub_folder, tmp_path, fixture_tensors):
    convert.convert(hub_folder, str(tmp_path / "openai"), "openai")
    written = read_checkpoint(str(tmp_path / "openai"))
    assert all(written[name].tobytes() == value.tobytes() for name, value in fixture_tensors.items())
    with open(os.path.join(hub_folder, "vocab.json"), "rb") as a, open(tmp_path / "openai" / "encoder.json", "rb") as b:
        assert a.read() == b.read()


def test_convert_refuses_a_full_destination_unless_overwrite(tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert convert.main(["--to", "hf", TINY_MODEL, str(dst)]) == 1
    assert "folder is not empty; choose a new folder or pass --overwrite" in capsys.readouterr().err
    assert os.listdir(dst) == ["keep.txt"]
    assert convert.main(["--to", "hf", TINY_MODEL, str(dst), "--overwrite"]) == 0
    assert "keep.txt" not in os.listdir(dst) and "model.safetensors" in os.listdir(dst)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no staging left
    assert convert.main(["--to", "openai", str(dst), str(dst), "--overwrite"]) == 1
    assert "is the source folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert.main(["--to", "openai", str(dst), str(empty)]) == 0


def edited(fixture_tensors, edit, prefix=""):
    tensors = hub_tensors(fixture_tensors, prefix)
    edit(tensors)
    return tensors


def drop_and_add(tensors):
    del tensors["h.1.mlp.c_fc.bias"], tensors["ln_f.weight"]
    tensors["h.0.attn.extra"] = np.zeros(3, np.float32)
    tensors["h.0.attn.c_attn.weight"] = np.zeros((1, 32, 96), np.float32)


def untie(tensors):
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1


@pytest.mark.parametrize("case, build, message", [
    ("other model", lambda t: dict(config=HUB_CONFIG | {"model_type": "llama"}),
     "config.json: model_type is 'llama', not 'gpt2': only GPT-2 models can be loaded"),
    ("options", lambda t: dict(config=HUB_CONFIG | {"activation_function": "relu", "layer_norm_epsilon": 1e-6}),
     "unsupported GPT-2 options: activation_function 'relu' (GPT-2 uses 'gelu_new'), "
     "layer_norm_epsilon 1e-06 (GPT-2 uses 1e-05)"),
    ("tensors", lambda t: dict(tensors=edited(t, drop_and_add)),
     "model.safetensors: does not match "),
    ("untied", lambda t: dict(tensors=edited(t, untie, "transformer.")),
     "lm_head.weight differs from transformer.wte.weight: GPT-2 ties its output layer"),
    ("integers",
     lambda t: dict(tensors=edited(t, lambda d: d.update({"wpe.weight": d["wpe.weight"].astype(np.int32)}))),
     "not floating point: wpe.weight I32"),
])
def test_bad_folders_give_one_line_errors(tmp_path, fixture_tensors, case, build, message):
    spec = build(fixture_tensors)
    folder = make_folder(tmp_path / case, spec.get("tensors", hub_tensors(fixture_tensors)), spec.get("config"))
    with pytest.raises(CheckpointError) as error:
        gpt2.load_model(folder)
    assert message in str(error.value) and "\n" not in str(error.value)
    if case == "tensors":
        assert "missing ['h.1.mlp.c_fc.bias', 'ln_f.weight']" in str(error.value)
        assert "unexpected ['h.0.attn.extra']" in str(error.value)
        assert "wrong shape: h.0.attn.c_attn.weight [1, 32, 96] (expected [32, 96])" in str(error.value)


def test_folders_without_readable_safetensors(tmp_path, fixture_tensors, hub_folder):
    folder = tmp_path / "pt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HUB_CONFIG))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: only safetensors weights are read "
                                              r"\(pytorch_model.bin is a pickle, which can run code when loaded, "
                                              r"and reading it would need torch\)"):
        gpt2.load_model(str(folder))

    sharded = make_folder(tmp_path / "sharded", hub_tensors(fixture_tensors), shards=2)
    os.remove(os.path.join(sharded, "model.safetensors.index.json"))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not found; the sharded weights need"):
        gpt2.load_model(sharded)

    truncated = tmp_path / "truncated"
    shutil.copytree(hub_folder, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable safetensors file .*download it again"):
        gpt2.load_model(str(truncated))

    (truncated / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        gpt2.load_model(str(truncated))


def test_missing_safetensors_package_is_one_line(hub_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors raises ImportError
    with pytest.raises(CheckpointError) as error:
        gpt2.load_model(hub_folder)
    assert str(error.value) == (
        "reading Hugging Face folders needs the safetensors package: pip install 'gpt2-tf2[hf]'")
    assert gpt2.checkpoint.read_hparams(hub_folder).n_layer == 2  # config.json alone needs no package


def test_generate_cli_on_a_hub_folder(hub_folder, reference, capsys, monkeypatch, tiny_model, fixture_tensors):
    """generate.py --model HF_FOLDER --temperature 0 gives the reference greedy text. The folder
    is really loaded (and checked); sampling then runs on the session's tiny model, which holds
    the same weights and whose compiled sampler the other tests share."""
    from gpt2 import generate_cli

    loaded = []

    def load(model_dir, load_model, **options):
        loaded.append(load_model(model_dir, dtype=options["dtype"]))
        assert_weights_equal(loaded[-1], fixture_tensors)
        return tiny_model

    monkeypatch.setattr(generate_cli, "_load_model", load)
    case = reference["greedy"]["cases"][0]
    code = generate_cli.main(["--model", hub_folder, "--prompt", case["prompt_text"], "--temperature", "0",
                              "--length", "20"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert len(loaded) == 1 and case["new_text"] + "\n" in out


def test_help_and_hf_module_need_neither_tensorflow_nor_safetensors():
    script = (
        "import sys; import gpt2.formats.hf, gpt2.convert; "
        "code = gpt2.convert.main(['--help'])\n"
        "assert code == 0, code\n"
        "assert 'tensorflow' not in sys.modules and 'safetensors' not in sys.modules, 'imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--overwrite" in result.stdout and "default: off" in result.stdout


# --- issue 24 item 15: hostile config.json and index files ------------------------------------------


def test_item15_deeply_nested_or_huge_config_json_is_refused(hub_folder, tmp_path):
    folder = tmp_path / "deep"
    shutil.copytree(hub_folder, folder)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError) as error:
        gpt2.checkpoint.read_hparams(str(folder))
    assert str(error.value) == f"{folder / 'config.json'}: not a usable JSON file (nested too deeply)"
    (folder / "config.json").write_text(json.dumps(HUB_CONFIG | {"padding": " " * (hf.MAX_CONFIG_BYTES)}))
    with pytest.raises(CheckpointError) as error:
        gpt2.load_model(str(folder))
    too_large = "larger than 1 MiB, too large for this file; is it the right file?"
    assert str(error.value) == f"{folder / 'config.json'}: {too_large}"
    (folder / "config.json").write_text(json.dumps(HUB_CONFIG | {"padding": " " * (hf.MAX_CONFIG_BYTES // 2)}))
    assert gpt2.checkpoint.read_hparams(str(folder)).n_layer == 2  # big but within the cap


@pytest.mark.parametrize("shard", ["../../outside.safetensors", "/etc/passwd", "sub/model.safetensors",
                                   "..\\outside.safetensors", "model.bin", 7])
def test_item15_index_shards_outside_the_folder_are_refused(tmp_path, fixture_tensors, shard):
    folder = make_folder(tmp_path / "sharded", hub_tensors(fixture_tensors), shards=2)
    index_path = os.path.join(folder, "model.safetensors.index.json")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError) as error:
        gpt2.load_model(folder)
    assert str(error.value) == (
        f"{index_path}: shard {shard!r} is not a .safetensors file name in the folder (no paths allowed); "
        "refusing the index"
    )
    with open(index_path, "w", encoding="utf-8") as f:
        f.write('{"weight_map": ' * 50_000 + "{}" + "}" * 50_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        gpt2.load_model(folder)


# --- issue 24 item 19: config.json as transformers writes it --------------------------------------

# transformers 5.25.0 (configuration only, no torch), recorded:
#   GPT2Config(n_embd=768, n_head=12, n_layer=12, n_positions=1024, n_ctx=1024, vocab_size=50257).to_diff_dict()
# plus "architectures" and "dtype", which GPT2LMHeadModel.save_pretrained adds.
TRANSFORMERS_124M_CONFIG = {
    "activation_function": "gelu_new", "add_cross_attention": False, "attn_pdrop": 0.1, "bos_token_id": 50256,
    "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_inner": None, "n_layer": 12,
    "n_positions": 1024, "pad_token_id": None, "reorder_and_upcast_attn": False, "resid_pdrop": 0.1,
    "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True, "summary_activation": None,
    "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
    "summary_use_proj": True, "tie_word_embeddings": True, "transformers_version": "5.25.0", "use_cache": True,
    "vocab_size": 50257,
    "architectures": ["GPT2LMHeadModel"], "dtype": "float32",
}


def test_item19_config_json_holds_every_key_transformers_writes(tmp_path):
    config = hf.config_from_hparams(gpt2.PRESETS["124M"])
    assert sorted(config) == sorted(TRANSFORMERS_124M_CONFIG)
    assert config == TRANSFORMERS_124M_CONFIG
    assert json.dumps(config, sort_keys=True) == json.dumps(TRANSFORMERS_124M_CONFIG, sort_keys=True)  # types too

    # What the converter writes: the same keys, at the folder's shape, n_ctx included
    # (llama.cpp's convert_hf_to_gguf.py reads hparams["n_ctx"] for GPT-2).
    hf_dir = str(tmp_path / "hf")
    assert convert.main(["--to", "hf", TINY_MODEL, hf_dir]) == 0
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        written = json.load(f)
    shape = {"n_ctx": 64, "n_positions": 64, "n_embd": 32, "n_head": 4, "n_layer": 2}
    assert written == TRANSFORMERS_124M_CONFIG | shape
    assert hf.read_hparams(hf_dir) == gpt2.HParams.from_json(os.path.join(TINY_MODEL, "hparams.json"))
