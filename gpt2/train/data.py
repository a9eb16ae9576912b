"""Training data: text files, folders, globs and token files -> one token array -> shuffled windows.

Text files are UTF-8; a literal `<|endoftext|>` in them is the end-of-text token, and documents
(files) are joined with it. `.npy` files hold a 1-D array of token ids and `.npz` files one or
more (gpt-2-simple's `encode_dataset` output: `arr_0`, `arr_1`, ... joined in that order). With
a cache folder the joined tokens are written there once (keyed by the files' paths, sizes and
times and by the vocabulary) and read back as a memory map, so re-runs do not re-encode and a
corpus larger than memory works.

Windows: `s` consecutive tokens. In epoch e, window i starts at token o_e + i * (s - 1), so
every next-token pair of the epoch is in exactly one window; the offset o_e in [0, s - 1) moves
the window boundaries from epoch to epoch (a small corpus is not learnt at fixed positions only).
The order is a fixed function of (seed, position): `numpy.random.default_rng([seed, e])` draws
epoch e's offset and the permutation its windows are visited in, and stream position k is the
k-th window over the epochs one after another. Resuming needs only the position.

Shapes: n = tokens in the corpus, w = windows, s = window length (seq_len), b = windows per batch,
a = micro-batches per optimizer step (accumulation).

TensorFlow is imported only by the functions that build tf.data datasets.
"""

import glob
import hashlib
import json
import os
import zipfile

import numpy as np

TOKEN_SUFFIXES = (".npy", ".npz")
TEXT_CHUNK_CHARS = 1 << 20
COPY_CHUNK_TOKENS = 1 << 24


class DatasetError(ValueError):
    """A dataset that cannot be used: the message names the file or setting and what to do."""


def expand_paths(specs):
    """The files of `specs` (paths, folders searched recursively skipping hidden names, glob
    patterns), in order; DatasetError for a path that does not exist or a pattern matching nothing."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    files = []
    for spec in map(os.fspath, specs):
        if os.path.isfile(spec):
            files.append(spec)
        elif os.path.isdir(spec):
            files += _walk(spec)
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise DatasetError(f"{spec}: no files match this pattern")
            for match in matches:
                files += _walk(match) if os.path.isdir(match) else [match]
        else:
            raise DatasetError(f"{spec}: no such file or folder")
    return files


def _walk(folder):
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    return found


def load_tokens(specs, encoder, cache_dir=None, progress=False):
    """All documents of `specs` (see `expand_paths`), joined with `encoder.eot_token`, as TokenData
    (uint16 [n]); with `cache_dir` written there once and read back as a read-only memory map.
    DatasetError for unreadable, binary or non-UTF-8 files, bad token files and empty data."""
    specs = [specs] if isinstance(specs, (str, os.PathLike)) else list(specs)
    files = expand_paths(specs)
    if not files:
        raise DatasetError(f"{' '.join(map(os.fspath, specs))}: no files found")
    n_vocab = encoder.vocab_size
    key = _cache_key(files, encoder)
    if cache_dir is None:
        tokens = np.concatenate(list(_documents(files, encoder, n_vocab, progress)) or [np.zeros(0, np.uint16)])
        return TokenData(tokens, key, files)
    path = os.path.join(cache_dir, f"tokens-{key[:16]}.npy")
    if not os.path.isfile(path):
        _write_cache(path, _documents(files, encoder, n_vocab, progress))
    return TokenData(np.load(path, mmap_mode="r"), key, files)


class TokenData:
    """A 1-D token array (`tokens`, uint16 or a memory map of it), a `fingerprint` string that
    identifies its content and the `files` it came from (empty for arrays given directly)."""

    def __init__(self, tokens, fingerprint=None, files=()):
        tokens = np.asarray(tokens) if not isinstance(tokens, np.memmap) else tokens
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise DatasetError(f"token data must be a 1-D integer array, got {tokens.dtype} of shape {tokens.shape}")
        self.tokens = tokens
        self.fingerprint = fingerprint or _array_fingerprint(tokens)
        self.files = list(files)

    def __len__(self):
        return len(self.tokens)

    def check_ids(self, n_vocab, name="dataset"):
        """Raises DatasetError if a token id is not below n_vocab (the model's vocabulary)."""
        chunks = [self.tokens[i:i + COPY_CHUNK_TOKENS] for i in range(0, len(self.tokens), COPY_CHUNK_TOKENS)]
        smallest = min((int(chunk.min()) for chunk in chunks), default=0)
        largest = max((int(chunk.max()) for chunk in chunks), default=0)
        if smallest < 0 or largest >= n_vocab:
            raise DatasetError(f"the {name} holds token ids {smallest}..{largest}, but the model's "
                               f"vocabulary is 0..{n_vocab - 1}")


def as_token_data(dataset, encoder, cache_dir=None, progress=False):
    """`dataset` as TokenData: TokenData as is, an integer array, or path(s) for `load_tokens`."""
    if isinstance(dataset, TokenData):
        return dataset
    if isinstance(dataset, np.ndarray):
        return TokenData(dataset)
    return load_tokens(dataset, encoder, cache_dir, progress)


def _array_fingerprint(tokens):
    digest = hashlib.sha256(str(tokens.dtype).encode())
    for start in range(0, len(tokens), COPY_CHUNK_TOKENS):
        digest.update(np.ascontiguousarray(tokens[start:start + COPY_CHUNK_TOKENS]).tobytes())
    return digest.hexdigest()


def _cache_key(files, encoder):
    """sha256 of the files' real paths, sizes and modification times and of the vocabulary."""
    digest = hashlib.sha256(b"gpt2-train-tokens-v1\n")
    for path in files:
        stat = os.stat(path)
        digest.update(json.dumps([os.path.realpath(path), stat.st_size, stat.st_mtime_ns]).encode())
    digest.update(json.dumps(sorted(encoder.encoder.items())).encode())
    ranks = getattr(encoder, "bpe_ranks", None)  # GPT2-ML's WordPiece has no merges: its vocabulary is all
    if ranks is not None:
        digest.update(json.dumps(sorted(ranks, key=ranks.get)).encode())
    return digest.hexdigest()


def _documents(files, encoder, n_vocab, progress):
    """Yields uint16 token arrays of all files, with an end-of-text token between documents."""
    eot = np.array([encoder.eot_token], np.uint16)
    bar = _progress_bar(files, progress)
    try:
        for number, path in enumerate(files):
            if number:
                yield eot
            if path.endswith(TOKEN_SUFFIXES):
                yield _read_token_file(path, n_vocab)
            else:
                for ids in encoder.encode_iter(_text_chunks(path, bar), allow_special=True):
                    yield np.asarray(ids, np.uint16)
    finally:
        if bar is not None:
            bar.close()


def _progress_bar(files, progress):
    total = sum(os.path.getsize(p) for p in files if not p.endswith(TOKEN_SUFFIXES))
    if not progress or total < (1 << 20):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="encoding the dataset", leave=False)


def _text_chunks(path, bar=None):
    """The text of a UTF-8 file in chunks; DatasetError for unreadable, binary or non-UTF-8 files."""
    from encoder import read_text_chunks

    try:
        hint = "--dataset takes UTF-8 text files or .npy/.npz token files"
        for chunk in read_text_chunks(path, "utf-8", TEXT_CHUNK_CHARS, hint=hint):
            if "\x00" in chunk:
                raise DatasetError(f"{path}: binary file (it holds NUL bytes); --dataset takes UTF-8 "
                                   "text files or .npy/.npz token files")
            if bar is not None:
                bar.update(len(chunk.encode("utf-8")))
            yield chunk
    except DatasetError:
        raise
    except ValueError as error:  # not UTF-8: the message names the file and the byte
        raise DatasetError(str(error)) from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error.strerror or error})") from None


def _read_token_file(path, n_vocab):
    """The token ids of a .npy file (1-D) or .npz file (its arrays joined in numeric order) as uint16."""
    try:
        if path.endswith(".npy"):
            arrays = [np.load(path, mmap_mode="r", allow_pickle=False)]
        else:
            with np.load(path, allow_pickle=False) as npz:
                names = sorted(npz.files, key=lambda n: (len(n), n))  # arr_2 before arr_10
                arrays = [npz[name] for name in names]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DatasetError(f"{path}: cannot read token ids ({message})") from None
    for array in arrays:
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise DatasetError(f"{path}: expected 1-D integer token ids, got {array.dtype} of shape {array.shape}")
        if len(array) and (int(array.min()) < 0 or int(array.max()) >= n_vocab):
            raise DatasetError(f"{path}: token ids must be in 0..{n_vocab - 1}, found "
                               f"{int(array.min())}..{int(array.max())}")
    if not arrays:
        return np.zeros(0, np.uint16)
    return np.concatenate([np.asarray(a, np.uint16) for a in arrays])


def _write_cache(path, pieces):
    """Writes the concatenated `pieces` as a .npy file, via temporary files and os.replace."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    raw, staged = path + ".raw.tmp", path + ".tmp"
    try:
        count = 0
        with open(raw, "wb") as f:
            for piece in pieces:
                f.write(np.ascontiguousarray(piece, np.uint16).tobytes())
                count += len(piece)
        source = np.memmap(raw, np.uint16, mode="r", shape=(count,)) if count else np.zeros(0, np.uint16)
        target = np.lib.format.open_memmap(staged, mode="w+", dtype=np.uint16, shape=(count,))
        for start in range(0, count, COPY_CHUNK_TOKENS):
            target[start:start + COPY_CHUNK_TOKENS] = source[start:start + COPY_CHUNK_TOKENS]
        target.flush()
        del source, target
        os.replace(staged, path)
    finally:
        for leftover in (raw, staged):
            if os.path.exists(leftover):
                os.remove(leftover)


def split_validation(data, fraction, seq_len):
    """(train, validation) TokenData: the last `fraction` of the tokens is held out."""
    n = len(data)
    held_out = int(round(n * fraction))
    train = TokenData(data.tokens[: n - held_out], f"{data.fingerprint}[:-{held_out}]", data.files)
    val = TokenData(data.tokens[n - held_out:], f"{data.fingerprint}[-{held_out}:]", data.files)
    for part, name in ((train, "training"), (val, "validation")):
        if len(part) < seq_len:
            raise DatasetError(
                f"--val-fraction {fraction} leaves the {name} set {len(part)} tokens, shorter than one "
                f"window of {seq_len} tokens; change --val-fraction, lower --seq-len or add data"
            )
    return train, val


class Windows:
    """The shuffled window stream of a token array (see the module docstring)."""

    def __init__(self, data, seq_len, seed=0, name="dataset"):
        if seq_len < 2:
            raise DatasetError(f"seq_len must be at least 2, got {seq_len}")
        n = len(data.tokens)
        if n == 0:
            raise DatasetError(f"the {name} is empty (no tokens); give text files with some text in them")
        if n < seq_len:
            raise DatasetError(
                f"the {name} has {n} tokens, fewer than one window of --seq-len {seq_len}; "
                "lower --seq-len or add data"
            )
        self.tokens = data.tokens
        self.seq_len = seq_len
        self.seed = seed
        self.stride = seq_len - 1
        self._max_offset = min(self.stride - 1, n - seq_len)
        self.count = (n - seq_len) // self.stride + 1  # windows of epoch 0 (offset 0)
        self._epoch_ends = []  # stream position where each epoch drawn so far ends
        self._epochs = {}  # epoch -> (offset, order), the last few used

    def _epoch(self, epoch):
        """(offset, order of window indices) of `epoch`."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self._max_offset + 1))
            count = (len(self.tokens) - offset - self.seq_len) // self.stride + 1
            if len(self._epochs) > 4:
                self._epochs.clear()
            self._epochs[epoch] = offset, rng.permutation(count)
        return self._epochs[epoch]

    def _locate(self, position):
        """(epoch, index within the epoch) of stream `position`."""
        while not self._epoch_ends or self._epoch_ends[-1] <= position:
            start = self._epoch_ends[-1] if self._epoch_ends else 0
            self._epoch_ends.append(start + len(self._epoch(len(self._epoch_ends))[1]))
        epoch = int(np.searchsorted(self._epoch_ends, position, side="right"))
        return epoch, position - (self._epoch_ends[epoch - 1] if epoch else 0)

    def starts(self, position, count):
        """Token offsets of the windows at stream positions position..position+count-1, int64 [count]."""
        starts = np.empty(count, np.int64)
        for i in range(count):
            epoch, index = self._locate(position + i)
            offset, order = self._epoch(epoch)
            starts[i] = offset + order[index] * self.stride
        return starts

    def batch(self, position, count):
        """The windows at stream positions position..position+count-1 as int32 [count, s]."""
        return self.gather(self.starts(position, count))

    def gather(self, starts):
        """Windows starting at token offsets `starts` [b] as int32 [b, s]."""
        return np.asarray(self.tokens[starts[:, None] + np.arange(self.seq_len)], np.int32)

    def in_order(self, count):
        """The first `count` windows (at most all of them) in corpus order, int32 [<=count, s]."""
        count = min(count, self.count)
        return self.gather(np.arange(count, dtype=np.int64) * self.stride)


def step_batches(windows, position, accumulate, batch_size, replicas=1, replica=0):
    """Yields, from stream `position` on, each optimizer step's windows for one replica.

    A step takes the next accumulate * batch_size windows: micro-batch i is windows
    [i * batch_size, (i + 1) * batch_size) of them. The replica gets rows
    [replica * r, (replica + 1) * r) of each micro-batch (r = batch_size / replicas), laid out
    int32 [r, a, s] (rows first, so tf.distribute could also split them).
    """
    rows = batch_size // replicas
    while True:
        step = windows.batch(position, accumulate * batch_size).reshape(accumulate, batch_size, -1)
        yield np.ascontiguousarray(step[:, replica * rows:(replica + 1) * rows].transpose(1, 0, 2))
        position += accumulate * batch_size


def distributed_dataset(strategy, windows, position, accumulate, batch_size):
    """The step batches as a distributed tf.data dataset of `strategy` (each input pipeline makes
    only the rows of its own replicas), prefetched in the background."""
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    spec = tf.TensorSpec([batch_size // replicas, accumulate, windows.seq_len], tf.int32)

    def dataset_fn(context):
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local

        def generate():
            streams = [step_batches(windows, position, accumulate, batch_size, replicas, first + i)
                       for i in range(local)]
            while True:  # round-robin: consecutive elements go to consecutive local replicas
                for stream in streams:
                    yield next(stream)

        return tf.data.Dataset.from_generator(generate, output_signature=spec).prefetch(2 * local)

    options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    return strategy.distribute_datasets_from_function(dataset_fn, options)


def windows_dataset(tokens, seq_len, batch_size, seed=0):
    """A tf.data dataset of shuffled int32 windows [batch_size, seq_len] that repeats forever,
    for `model.fit(...)` (pass `steps_per_epoch`). `tokens`: a 1-D integer array or TokenData."""
    import tensorflow as tf

    data = tokens if isinstance(tokens, TokenData) else TokenData(tokens)
    windows = Windows(data, seq_len, seed)

    def generate():
        for step in step_batches(windows, 0, 1, batch_size):
            yield step[:, 0]

    spec = tf.TensorSpec([batch_size, seq_len], tf.int32)
    return tf.data.Dataset.from_generator(generate, output_signature=spec).prefetch(2)
