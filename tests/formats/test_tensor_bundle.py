"""gpt2.formats.bundle: the streaming checkpoint writer, checked by TensorFlow reading what it wrote
(TensorFlow verifies every block and tensor CRC) and its CRC32C against a slow byte-by-byte one."""

import numpy as np
import pytest
import tensorflow as tf

from gpt2.formats.bundle import BundleWriter, crc32c


def slow_crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def test_crc32c_known_values():
    # RFC 3720 (iSCSI) appendix B.4 and the common check value.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(b"") == 0


@pytest.mark.parametrize("size", [1, 3, 4, 5, 63, 64, 255, 4097, 70_001])
def test_crc32c_matches_the_slow_one_across_lane_and_chunk_sizes(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    expected = slow_crc32c(data)
    assert crc32c(data) == expected
    assert crc32c(data, chunk_bytes=1000) == expected
    assert crc32c(data[size // 2:], crc=crc32c(data[: size // 2])) == expected


def test_tensorflow_reads_the_bundle_bit_exactly(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "model/wte": rng.standard_normal((1000, 48), dtype=np.float32),
        "half": rng.standard_normal((7, 3)).astype(np.float16),
        "double": rng.standard_normal(5),
        "scalar": np.float32(3.5),
        "transposed": rng.standard_normal((4, 6), dtype=np.float32).T,
        **{f"model/h{i}/ln_1/g": np.full(3, i, np.float32) for i in range(40)},  # > one restart interval
    }
    prefix = str(tmp_path / "model.ckpt")
    with BundleWriter(prefix) as writer:
        for name, value in tensors.items():
            writer.add(name, value)
    reader = tf.train.load_checkpoint(prefix)
    assert reader.get_variable_to_shape_map() == {name: list(np.shape(v)) for name, v in tensors.items()}
    for name, value in tensors.items():
        (restored,) = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[name], shape_and_slices=[""],
                                           dtypes=[tf.as_dtype(np.asarray(value).dtype)])
        np.testing.assert_array_equal(restored.numpy(), value)


def test_unsupported_dtype_or_repeated_name_is_refused(tmp_path):
    with BundleWriter(str(tmp_path / "x")) as writer:
        writer.add("a", np.zeros(2, np.float32))
        with pytest.raises(ValueError, match="already added"):
            writer.add("a", np.zeros(2, np.float32))
        with pytest.raises(ValueError, match="unsupported"):
            writer.add("b", np.zeros(2, np.int32))
