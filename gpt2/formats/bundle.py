"""Writes TensorFlow's checkpoint format one tensor at a time, without TensorFlow.

`tf.raw_ops.SaveV2` needs every tensor in memory at once; `BundleWriter` takes one numpy array at a
time and streams it to disk, so writing a checkpoint holds one tensor (the 1558M model's largest is
322 MB of its 6.2 GB).

A checkpoint with prefix P (TensorFlow calls it a tensor bundle) is two files:
- `P.data-00000-of-00001`: the tensors' raw little-endian bytes, back to back;
- `P.index`: a LevelDB-format table mapping sorted keys to values. The empty key holds a
  BundleHeaderProto (one shard, little-endian), each tensor name a BundleEntryProto (dtype, shape,
  offset and size in the data file, masked CRC32C of the bytes, which TensorFlow checks on reading).
  The table is data blocks, an empty meta-index block and an index block, each followed by a type
  byte (0: uncompressed) and the masked CRC32C of block + type, then a 48-byte footer.

CRC32C (Castagnoli) over gigabytes is computed with numpy: the bytes are split into many lanes
whose CRC registers advance in step (one vectorized table lookup per 4-byte word of every lane),
then the lane registers are chained. A CRC register update is linear over GF(2), so "advance the
register past n zero bytes" is a linear map of 32 bits, kept as two 65536-entry tables (one per
16-bit half of the register).
"""

import os
import struct

import numpy as np

DATA_SUFFIX = ".data-00000-of-00001"
_DTYPES = {"float32": 1, "float64": 2, "int64": 9, "bfloat16": 14, "float16": 19}  # TensorFlow's DataType enum
_TABLE_MAGIC = 0xDB4775248B80FB57
_RESTART_INTERVAL = 16


# --- CRC32C ------------------------------------------------------------------------------------

def _byte_table():
    table = np.zeros(256, np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table[i] = c
    return table


_BYTE_TABLE = _byte_table()
_HALVES = np.arange(1 << 16, dtype=np.uint32)


class _Shift:
    """The linear map "advance a CRC register past n zero bytes", as tables of its 16-bit halves."""

    def __init__(self, low, high):
        self.low, self.high = low, high

    @classmethod
    def zero_bytes(cls, n):
        low, high = _HALVES, _HALVES << 16
        for _ in range(n):
            low = (low >> 8) ^ _BYTE_TABLE[low & 0xFF]
            high = (high >> 8) ^ _BYTE_TABLE[high & 0xFF]
        return cls(low, high)

    def __call__(self, registers):
        """Applies the map to a uint32 array (or a Python int)."""
        if isinstance(registers, int):
            return int(self.low[registers & 0xFFFF] ^ self.high[registers >> 16])
        return self.low[registers & 0xFFFF] ^ self.high[registers >> 16]

    def then(self, other):
        """The map "self, then other"."""
        return _Shift(other(self.low), other(self.high))


_WORD = _Shift.zero_bytes(4)
_POWERS = {}  # (bytes per step, k) -> _Shift for 2**k steps


def _shift(n, unit=1):
    """The map advancing past n * unit zero bytes (unit 1 or 4), by squaring."""
    result, k = None, 0
    while n:
        key = (unit, k)
        if key not in _POWERS:
            _POWERS[key] = (_Shift.zero_bytes(1) if unit == 1 else _WORD) if k == 0 else \
                _POWERS[(unit, k - 1)].then(_POWERS[(unit, k - 1)])
        if n & 1:
            result = _POWERS[key] if result is None else result.then(_POWERS[key])
        n >>= 1
        k += 1
    return result


def _raw_crc(data):
    """The CRC register after `data` (uint8 array) starting from 0, with no final inversion.

    Leading zero bytes leave a zero register unchanged, so the data is zero-padded in front to
    lanes x steps whole words. Lane k holds words [k*steps, (k+1)*steps); all lanes advance one word
    per step; then register = shift(register, steps words) ^ lane, lane by lane."""
    words = -(-len(data) // 4)
    lanes = max(1, min(1 << 14, words // 64))
    steps = -(-words // lanes)
    padded = np.zeros(lanes * steps * 4, np.uint8)
    padded[len(padded) - len(data):] = data
    columns = np.ascontiguousarray(padded.view("<u4").reshape(lanes, steps).T)
    registers = np.zeros(lanes, np.uint32)
    for column in columns:
        registers = _WORD(registers ^ column)
    chain = _shift(steps, unit=4)
    total = 0
    for register in registers.tolist():
        total = chain(total) ^ register
    return total


def crc32c(data, crc=0, chunk_bytes=1 << 25):
    """CRC32C of `data` (bytes or any numpy array, taken as its raw bytes), continuing from `crc`.
    Works through `chunk_bytes` at a time (each needs about twice that in scratch memory)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = memoryview(_contiguous(data)).cast("B")
    data = np.frombuffer(data, np.uint8)
    register = crc ^ 0xFFFFFFFF
    for start in range(0, len(data), chunk_bytes):
        chunk = data[start:start + chunk_bytes]
        register = _shift(len(chunk))(register) ^ _raw_crc(chunk)
    return register ^ 0xFFFFFFFF


def _contiguous(array):
    array = np.asarray(array)
    return array if array.flags.c_contiguous else array.copy()


def masked_crc32c(data):
    """CRC32C as LevelDB and TensorFlow store it (rotated and offset, so CRCs of CRCs stay distinct)."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# --- protocol buffers and the table ------------------------------------------------------------------

def _varint(value):
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number, value):
    """A protobuf field: ints as varints, bytes as length-delimited."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _entry_proto(dtype, shape, offset, size, crc):
    dims = b"".join(_field(2, _field(1, dim)) for dim in shape)  # TensorShapeProto.dim[].size
    fields = _field(1, dtype) + _field(2, dims) + _field(4, offset) + _field(5, size)
    return fields + _varint(6 << 3 | 5) + struct.pack("<I", crc)  # crc32c is a fixed32


def _header_proto():
    return _field(1, 1) + _field(3, _field(1, 1))  # num_shards 1, little-endian, version.producer 1


def _block(items):
    """A table block of sorted (key, value) pairs with prefix-compressed keys."""
    out, restarts, previous = bytearray(), [], b""
    for n, (key, value) in enumerate(items):
        shared = 0
        if n % _RESTART_INTERVAL:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        else:
            restarts.append(len(out))
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        previous = key
    restarts = restarts or [0]
    return bytes(out) + struct.pack(f"<{len(restarts) + 1}I", *restarts, len(restarts))


class BundleWriter:
    """Writes `prefix.index` and `prefix.data-00000-of-00001`, one tensor per `add` call; a context
    manager that writes the index when the block exits without an error. Both files are written in
    place: write into a staging folder and move them to their final names."""

    def __init__(self, prefix):
        self.prefix = prefix
        self._data = open(prefix + DATA_SUFFIX, "wb")
        self._entries = {}

    def add(self, name, array):
        """Appends `array` (float32, float64, float16 or int64 (a step counter), any shape) as tensor `name`."""
        array = _contiguous(array)
        dtype = _DTYPES.get(array.dtype.name)
        key = name.encode()
        if dtype is None:
            raise ValueError(f"cannot add {name!r}: dtype {array.dtype} is unsupported (use one of {list(_DTYPES)})")
        if key in self._entries:
            raise ValueError(f"cannot add {name!r}: a tensor of that name was already added")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        offset = self._data.tell()
        self._data.write(memoryview(array).cast("B"))
        crc = masked_crc32c(array)
        self._entries[key] = _entry_proto(dtype, array.shape, offset, array.nbytes, crc)

    def close(self):
        """Flushes the data file to disk and writes the index."""
        self._data.flush()
        os.fsync(self._data.fileno())
        self._data.close()
        items = [(b"", _header_proto()), *sorted(self._entries.items())]
        with open(self.prefix + ".index", "wb") as f:
            handles = []
            for contents in (_block(items), _block([])):  # data block, empty meta-index block
                handles.append(self._write_block(f, contents))
            index = self._write_block(f, _block([(items[-1][0], handles[0])]))
            footer = handles[1] + index
            f.write(footer + bytes(40 - len(footer)) + struct.pack("<Q", _TABLE_MAGIC))
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _write_block(f, contents):
        """Writes a block and its trailer; returns its encoded BlockHandle (offset, size)."""
        handle = _varint(f.tell()) + _varint(len(contents))
        f.write(contents + b"\0" + struct.pack("<I", masked_crc32c(contents + b"\0")))
        return handle

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is None:
            self.close()
        else:
            self._data.close()
