"""Greedy generation speed of this project's compiled sampler against its peers, on CPU.

    python bench/generate_speed.py [--shape 124M] [--batch-sizes 1,8] [--prompt-len 32]
        [--new-tokens 128] [--reps 3] [--peers hf,kerashub,kerashub-xla,openai,llamacpp]
        [--openai-repo PATH] [--llamacpp-types f32,f16,q8_0] [--converter PATH]
        [--ours-xla default|on|off|both|none] [--ours-direct]
        [--ours-dtypes float32,bfloat16,int8,float16]
        [--threads N] [--json out.json]

Systems (fp32 unless --ours-dtypes adds bfloat16, int8 or float16; same GPT-2 shape, same prompt tokens, greedy, no
early stop):
  ours          gpt2.sample_sequence(model, context, N, temperature=0) on the random-weight
                checkpoint of the shape (written once to bench/.cache/<shape>/ by the project's
                own writer, loaded with gpt2.load_model). `--ours-xla on/off/both` passes
                jit_compile=True/False when sample_sequence accepts it (checked with
                inspect.signature at run time); `default` passes nothing. Both measure the
                compiled loop (GPT2_DIRECT_TOKENS=0).
  ours-direct   (--ours-direct) the uncompiled sampler short jobs start on (gpt2.sampling.direct):
                the same call with GPT2_DIRECT_TOKENS set past the run's tokens.
  hf            Hugging Face transformers GPT2LMHeadModel(GPT2Config(shape)).generate, PyTorch CPU,
                random init, do_sample=False, min_new_tokens = max_new_tokens = N, torch's
                default thread count, under torch.inference_mode().
  kerashub      KerasHub GPT2CausalLM(GPT2Backbone(shape), preprocessor=None), TF backend,
                random init, compile(sampler="greedy", jit_compile=False), generate() fed
                {token_ids, padding_mask} of length P + N with stop_token_ids=None.
  kerashub-xla  the same with compile(jit_compile=True).
  llamacpp-T    (--peers llamacpp, not in the default peers) llama.cpp through llama-cpp-python on
                a GGUF file of our random checkpoint, one row per --llamacpp-types T (f32, f16,
                q8_0): our `--to hf` export converted by llama.cpp's convert_hf_to_gguf.py (made once
                by llamacpp_gguf.py into bench/.cache/<shape>-gguf/). Batch 1: Llama.generate(temp=0)
                after llm.reset() (no reuse of the previous call's cache); larger batches: one
                llama_batch of all sequences per llama_decode (low-level API), argmax per row.
                Threads: --threads, else the cores. n_ctx cells per sequence.
  openai        OpenAI's TF1 src/model.py + src/sample.py (from --openai-repo) in
                tf.compat.v1 graph mode, sample_sequence(..., temperature=1, top_k=1) (= greedy),
                our random checkpoint restored with tf.compat.v1.train.Saver. UNTESTED here: no
                checkout of openai/gpt-2 exists on the machine it was written on.
A peer whose package is missing is reported as skipped, not as an error.

Method
  Timing.  Every system runs in its own worker subprocess (this script with --_worker), one
  per (system, batch size), driven over a pipe. For each batch size the workers are started one
  after another (so load and compile never overlap another system's work); each makes its
  first calls right away (compile included: "first call s" is the first N-token generate call
  of a fresh process after the model is built/loaded). Then the timed repetitions run
  INTERLEAVED: rep 1 of every system, rep 2 of every system, ... (the starting system rotates
  each rep), so slow drift of the shared machine hits all systems alike. Idle workers block on
  their pipe and use no CPU.

  Each rep times two complete generate calls with the same prompt: T(N) with N new tokens and
  T(1) with one new token. Steady-state cost per decode step is

      ms/step = (T(N) - T(1)) / (N - 1)

  The difference cancels what every call pays once (argument conversion, dispatch, prompt
  prefill, the first token, output copies), which systems split very differently between
  "per call" and "per step"; what remains is the cost of the N - 1 extra decode steps as each
  system really runs them, including per-step Python overhead (HF) and work that grows with the
  requested length (KerasHub prefills and attends over the whole padded P + N sequence; ours
  rounds its cache up to a multiple of 64 slots). Total time / N would instead charge the
  prefill to every step and favour long generations. Min and median over reps are reported
  (min = least disturbed by the other load on the machine). End-to-end throughput is reported
  separately: tokens/s = batch * N / T(N) (median T(N)), prefill and call overhead included.
  "1-token call ms" is median T(1): the fixed cost per call (prefill + one step + overhead).

  Memory.  Peak RSS is the worker process's own peak (VmHWM) at the end of its run (framework
  import + model + compile + all reps for that batch size): one process per system and batch
  size, so the figure is that system's own and not shared with the others. The workers of one
  batch size are alive together, so the machine needs roughly the sum of their peaks.

  Lower bound.  A batch-1 decode step must read every weight once (all but wpe, of which it
  needs one row): ms/step >= fp32 weight bytes / memory read bandwidth. The bandwidth is the
  best of 5 parallel sums (one thread per core) over a 1 GiB float32 buffer, measured in this
  driver before any worker starts. Larger batches read the same weights, so the bound holds for
  them too, but they become compute-bound long before.

  Threads.  By default every framework picks its own thread count (here: 2 = the cores).
  PyTorch's OpenMP pool degrades far more than TensorFlow's when another process takes a core
  (HF at batch 8 measured 450-900 ms/step with 2 threads next to one busy process, 130 ms/step
  with 1 thread), so on a shared machine compare --threads 1 runs, or runs on an idle machine.

  Ratios "(1.23x)" are the figure divided by this project's figure at the same batch size (for
  ms/step and memory > 1 is worse; for tokens/s > 1 is better). The baseline is "ours"
  (with --ours-xla both: "ours-xla").
"""

import argparse
import hashlib
import importlib.util
import inspect
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llamacpp_gguf  # noqa: E402

import _common  # noqa: E402

PEERS = ("hf", "kerashub", "kerashub-xla", "openai", "llamacpp")
DEFAULT_PEERS = ("hf", "kerashub", "kerashub-xla", "openai")
OURS_VARIANTS = {"default": [("ours", None)], "on": [("ours-xla", True)], "off": [("ours-noxla", False)],
                 "both": [("ours-xla", True), ("ours-noxla", False)], "none": []}


# ============================================================================= workers
# Each setup function builds one system and returns (run, info): run(n) makes one generate call
# for n new tokens on the spec's prompt and returns the full int tokens [batch, P + n] as numpy.

def set_tf_threads(tf, threads):
    """--threads N: TF intra- and inter-op pools of N threads (must run before TF's first op)."""
    if not threads:
        return "TF default threads"
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    return f"TF {threads} intra-op, {threads} inter-op threads"


def setup_ours(spec):
    import numpy as np

    _common.use_repo_checkout()
    try:
        import gpt2
    except ImportError as error:
        raise _common.Skip(f"cannot import gpt2 ({error})") from None
    for name in ("load_model", "sample_sequence"):
        if not hasattr(gpt2, name):
            raise _common.Skip(f"gpt2.{name} does not exist yet")
    import tensorflow as tf

    threads = set_tf_threads(tf, spec["threads"])
    kwargs = {"temperature": 0.0}
    direct = spec["xla"] == "direct"
    os.environ["GPT2_DIRECT_TOKENS"] = str(10**12) if direct else "0"  # read at each call
    if spec["xla"] is not None and not direct:
        params = inspect.signature(gpt2.sample_sequence).parameters
        option = next((p for p in ("jit_compile", "xla") if p in params), None)
        if option is None:
            raise _common.Skip("gpt2.sample_sequence has no jit_compile option; use --ours-xla default")
        kwargs[option] = spec["xla"]
    rss_import = _common.current_rss_bytes()
    start = time.perf_counter()
    model = gpt2.load_model(spec["model_dir"], dtype=spec.get("dtype") or "float32")
    if spec.get("dtype"):
        kwargs["dtype"] = spec["dtype"]
    load_s = time.perf_counter() - start
    context = np.asarray(spec["prompt"], np.int32)

    options = {k: v for k, v in kwargs.items() if k != "dtype"}

    def run(n):
        return np.asarray(gpt2.sample_sequence(model, context, n, **options))

    return run, dict(load_s=load_s, rss_import=rss_import, params=int(model.count_params()),
                     versions=f"tensorflow {tf.__version__}", threads=threads,
                     options=", ".join(f"{k}={v}" for k, v in kwargs.items()))


def setup_hf(spec):
    import numpy as np

    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        raise _common.Skip("transformers/torch not installed (see bench/README.md)")
    os.environ.setdefault("USE_TF", "0")
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    hp = spec["hparams"]
    rss_import = _common.current_rss_bytes()
    start = time.perf_counter()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=hp["n_vocab"], n_positions=hp["n_ctx"], n_embd=hp["n_embd"],
                        n_layer=hp["n_layer"], n_head=hp["n_head"])
    model = GPT2LMHeadModel(config).eval()
    load_s = time.perf_counter() - start
    ids = torch.from_numpy(np.asarray(spec["prompt"], np.int64))
    mask = torch.ones_like(ids)

    def run(n):
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, do_sample=False, num_beams=1,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=config.eos_token_id)
        return out.numpy()

    return run, dict(load_s=load_s, rss_import=rss_import,
                     params=sum(p.numel() for p in model.parameters()),
                     versions=f"torch {torch.__version__}, transformers {transformers.__version__}",
                     threads=f"torch {torch.get_num_threads()} intra-op threads",
                     options=f"attn_implementation={model.config._attn_implementation}")


def setup_kerashub(spec):
    import numpy as np

    if importlib.util.find_spec("keras_hub") is None:
        raise _common.Skip("keras-hub not installed (see bench/README.md)")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import keras_hub
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise _common.Skip(f"Keras backend is {keras.backend.backend()!r}, not tensorflow")
    threads = set_tf_threads(tf, spec["threads"])
    hp = spec["hparams"]
    rss_import = _common.current_rss_bytes()
    start = time.perf_counter()
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=hp["n_vocab"], num_layers=hp["n_layer"], num_heads=hp["n_head"],
        hidden_dim=hp["n_embd"], intermediate_dim=4 * hp["n_embd"],
        max_sequence_length=hp["n_ctx"], dropout=0.0,
    )
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    lm.compile(sampler="greedy", jit_compile=spec["xla"])
    load_s = time.perf_counter() - start
    prompt = np.asarray(spec["prompt"], np.int32)
    batch, prompt_len = prompt.shape
    inputs = {}

    def run(n):
        if n not in inputs:  # built outside the timed region after the first call for each n
            token_ids = np.zeros((batch, prompt_len + n), np.int32)
            token_ids[:, :prompt_len] = prompt
            padding_mask = np.zeros((batch, prompt_len + n), bool)
            padding_mask[:, :prompt_len] = True
            inputs[n] = {"token_ids": token_ids, "padding_mask": padding_mask}
        out = lm.generate(inputs[n], stop_token_ids=None)
        return np.asarray(out["token_ids"])

    return run, dict(load_s=load_s, rss_import=rss_import, params=int(backbone.count_params()),
                     versions=f"keras-hub {keras_hub.__version__}, keras {keras.__version__}, "
                              f"tensorflow {tf.__version__}",
                     threads=threads, options=f"jit_compile={lm.jit_compile}")


def setup_openai(spec):
    """OpenAI's original TF1 sampler. UNTESTED: written without a checkout of openai/gpt-2."""
    import types

    import numpy as np

    repo = spec.get("openai_repo")
    if not repo:
        raise _common.Skip("no --openai-repo")
    src = os.path.join(repo, "src")
    if not all(os.path.isfile(os.path.join(src, f)) for f in ("model.py", "sample.py")):
        raise _common.Skip(f"{src} has no model.py/sample.py")
    import tensorflow as tf

    threads = set_tf_threads(tf, spec["threads"])
    tf1 = tf.compat.v1
    tf1.disable_v2_behavior()  # graph mode, and TF1 shapes (their code uses `x.shape[-1].value`)
    # Their modules say `import tensorflow as tf` (TF1 API) and
    # `from tensorflow.contrib.training import HParams`: import them against tf.compat.v1 and a
    # minimal HParams stand-in, then put the real modules back.

    class HParams:
        def __init__(self, **values):
            self.__dict__.update(values)

        def override_from_dict(self, values):
            self.__dict__.update(values)
            return self

    training = types.ModuleType("tensorflow.contrib.training")
    training.HParams = HParams
    contrib = types.ModuleType("tensorflow.contrib")
    contrib.training = training
    saved = {k: sys.modules.get(k) for k in ("tensorflow", "tensorflow.contrib", "tensorflow.contrib.training",
                                            "model", "sample")}
    sys.modules.update({"tensorflow": tf1, "tensorflow.contrib": contrib, "tensorflow.contrib.training": training})
    sys.modules.pop("model", None)
    sys.modules.pop("sample", None)
    sys.path.insert(0, src)
    try:
        import model as oa_model
        import sample as oa_sample
    finally:
        sys.path.remove(src)
        for k in ("tensorflow", "tensorflow.contrib", "tensorflow.contrib.training"):
            if saved[k] is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = saved[k]

    rss_import = _common.current_rss_bytes()
    start = time.perf_counter()
    hparams = oa_model.default_hparams()
    hparams.override_from_dict(spec["hparams"])
    prompt = np.asarray(spec["prompt"], np.int32)
    batch = prompt.shape[0]
    graph = tf1.Graph()
    with graph.as_default():
        context = tf1.placeholder(tf.int32, [batch, None])
        accepted = inspect.signature(oa_sample.sample_sequence).parameters
        outputs = {}
        for n in sorted({spec["new_tokens"], 1}):
            kwargs = dict(hparams=hparams, length=n, context=context, batch_size=batch, temperature=1, top_k=1)
            outputs[n] = oa_sample.sample_sequence(**{k: v for k, v in kwargs.items() if k in accepted})
        saver = tf1.train.Saver()
    n = spec["threads"] or 0  # graph-mode sessions take their thread pools from ConfigProto
    sess = tf1.Session(graph=graph, config=tf1.ConfigProto(intra_op_parallelism_threads=n,
                                                           inter_op_parallelism_threads=n))
    saver.restore(sess, tf1.train.latest_checkpoint(spec["model_dir"]))
    load_s = time.perf_counter() - start
    with graph.as_default():
        params = int(sum(np.prod(v.shape.as_list()) for v in tf1.global_variables()))

    def run(n):
        return np.asarray(sess.run(outputs[n], feed_dict={context: prompt}))

    return run, dict(load_s=load_s, rss_import=rss_import, params=params,
                     versions=f"tensorflow {tf.__version__} (compat.v1 graph mode), UNTESTED path",
                     threads=threads, options="temperature=1, top_k=1")


def setup_llamacpp(spec):
    """llama.cpp through llama-cpp-python on a GGUF file made from our Hugging Face export
    (llamacpp_gguf.py). Batch 1: Llama.generate(temp=0), what a user of the package calls. Batch
    > 1: the package's low-level API, one llama_batch holding every sequence each step (one
    llama_decode per step, sequence i in KV stream i), greedy argmax over each row's logits."""
    import itertools

    import numpy as np

    if importlib.util.find_spec("llama_cpp") is None or not spec.get("gguf"):
        raise _common.Skip(spec.get("gguf_missing") or "llama-cpp-python not installed (see bench/README.md)")
    import llama_cpp

    prompt = np.asarray(spec["prompt"], np.int64)
    batch, prompt_len = prompt.shape
    threads = spec["threads"] or os.cpu_count()
    n_ctx = spec["hparams"]["n_ctx"]
    rss_import = _common.current_rss_bytes()
    start = time.perf_counter()
    if batch == 1:
        llm = llama_cpp.Llama(spec["gguf"], n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                              verbose=False)
        load_s = time.perf_counter() - start
        tokens = prompt[0].tolist()

        def run(n):
            llm.reset()  # no prefix reuse: every call prefills its prompt, as the other systems do
            new = itertools.islice(llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0), n)
            return np.asarray([tokens + list(new)])

        params, how = llm._model.n_params(), "batch 1: Llama.generate(temp=0)"
    else:
        llama_cpp.llama_backend_init()
        model = llama_cpp.llama_model_load_from_file(spec["gguf"].encode(), llama_cpp.llama_model_default_params())
        if not model:
            raise RuntimeError(f"llama.cpp could not load {spec['gguf']}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = batch * n_ctx  # n_ctx cells per sequence
        cparams.n_seq_max = batch
        cparams.n_batch = max(512, batch * prompt_len)
        cparams.n_threads = cparams.n_threads_batch = threads
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError("llama.cpp could not make a context")
        memory = llama_cpp.llama_get_memory(ctx)
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        lbatch = llama_cpp.llama_batch_init(batch * prompt_len, 0, 1)
        load_s = time.perf_counter() - start

        def decode(entries):  # entries: (token, position, sequence, wants logits)
            for i, (token, pos, seq, logits) in enumerate(entries):
                lbatch.token[i], lbatch.pos[i], lbatch.n_seq_id[i] = token, pos, 1
                lbatch.seq_id[i][0], lbatch.logits[i] = seq, logits
            lbatch.n_tokens = len(entries)
            code = llama_cpp.llama_decode(ctx, lbatch)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code}")
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(batch * n_vocab,))
            return logits.reshape(batch, n_vocab).argmax(axis=1)  # outputs in entry order = sequence order

        def run(n):
            llama_cpp.llama_memory_clear(memory, True)
            nxt = decode([(int(prompt[s, p]), p, s, p == prompt_len - 1)
                          for s in range(batch) for p in range(prompt_len)])
            out = [nxt]
            for step in range(1, n):
                nxt = decode([(int(nxt[s]), prompt_len + step - 1, s, True) for s in range(batch)])
                out.append(nxt)
            return np.concatenate([prompt, np.stack(out, axis=1)], axis=1)

        params, how = llama_cpp.llama_model_n_params(model), f"batch {batch}: one llama_batch of {batch} sequences"
    return run, dict(load_s=load_s, rss_import=rss_import, params=int(params),
                     versions=f"llama-cpp-python {llama_cpp.__version__}", threads=f"llama.cpp {threads} threads",
                     options=f"{os.path.basename(spec['gguf'])}, {how}, n_ctx {n_ctx} per sequence")


SETUPS = {"ours": setup_ours, "hf": setup_hf, "kerashub": setup_kerashub, "openai": setup_openai,
          "llamacpp": setup_llamacpp}


def worker_setup(spec):
    """One system in this worker process (see _common.serve_worker): "first" makes the first
    N-token and 1-token calls, "rep" one timed pair."""
    run, info = SETUPS[spec["kind"]](spec)
    info["rss_loaded"] = _common.current_rss_bytes()
    prompt_len = len(spec["prompt"][0])
    batch = len(spec["prompt"])
    n_new = spec["new_tokens"]
    seen = {}

    def timed(n):
        start = time.perf_counter()
        out = run(n)
        seconds = time.perf_counter() - start
        if out.shape != (batch, prompt_len + n):
            raise RuntimeError(f"{n} new tokens: got output shape {out.shape}, "
                               f"expected {(batch, prompt_len + n)} (early stop?)")
        if not (out[:, :prompt_len] == spec["prompt"]).all():
            raise RuntimeError("output does not start with the prompt")
        digest = hashlib.sha1(out.astype("int64").tobytes()).hexdigest()
        if seen.setdefault(n, digest) != digest:
            print(f"note: {spec['kind']}: greedy output for n={n} changed between calls", file=sys.stderr)
        return seconds

    handlers = {"first": lambda: dict(first_s=timed(n_new), first_1_s=timed(1)),
                "rep": lambda: dict(t_n=timed(n_new), t_1=timed(1))}
    return handlers, info


# ============================================================================= driver

def ms_per_step(rep, n):
    return 1000 * (rep["t_n"] - rep["t_1"]) / (n - 1)


def run_batch(systems, batch, args, model_dir, hparams, prompt):
    """Starts one worker per system, makes the first calls, runs interleaved reps. Returns workers."""
    workers = []
    for name, kind, xla, dtype in systems:
        spec = dict(kind=kind, xla=xla, dtype=dtype, model_dir=model_dir, hparams=hparams, prompt=prompt[:batch],
                    new_tokens=args.new_tokens, openai_repo=args.openai_repo, threads=args.threads)
        if kind == "llamacpp":
            spec.update(dtype=None, gguf=args.ggufs.get(dtype), gguf_missing=args.gguf_missing)
        env = {"KERAS_BACKEND": "tensorflow"} if kind == "kerashub" else {}
        if kind == "ours":  # "first call" = a cold compile, as the peers' (see bench/startup.py)
            env["GPT2_CACHE_DIR"] = "off"
        worker = _common.Worker(__file__, _common.log_path(__file__, f"{name}-b{batch}"), name, env, args.timeout)
        worker.first, worker.reps = {}, []
        workers.append(worker)
        ready = worker.start(spec)
        if ready:
            first = worker.request("first")
            if first:
                worker.first = first
                print(f"  {name:13s} b={batch}: ready in {ready['load_s']:.1f} s "
                      f"({ready['params'] / 1e6:.1f}M params), first call {first['first_s']:.1f} s",
                      flush=True)
        if worker.status:
            print(f"  {name:13s} b={batch}: {worker.status}", flush=True)
    live = [w for w in workers if not w.status]
    for rep in range(args.reps):
        order = live[rep % len(live):] + live[: rep % len(live)] if live else []
        for worker in order:
            time.sleep(args.settle)  # let the previous system's thread pools go idle
            answer = worker.request("rep")
            if answer:
                worker.reps.append(answer)
                print(f"  rep {rep + 1}/{args.reps} {worker.name:13s} b={batch}: "
                      f"T(N)={answer['t_n']:.2f} s, T(1)={answer['t_1']:.3f} s, "
                      f"{ms_per_step(answer, args.new_tokens):.1f} ms/step", flush=True)
            elif worker.status:
                print(f"  {worker.name:13s} b={batch}: {worker.status}", flush=True)
    for worker in workers:
        worker.finish()
    return workers


def summarize(worker, batch, n):
    steps = [ms_per_step(r, n) for r in worker.reps]
    t_n = _common.median([r["t_n"] for r in worker.reps])
    return dict(
        ms_min=min(steps) if steps else None, ms_median=_common.median(steps) if steps else None,
        tokens_per_s=(batch * n / t_n) if steps else None,
        call1_ms=1000 * _common.median([r["t_1"] for r in worker.reps]) if steps else None,
        first_s=worker.first.get("first_s"),
        peak_mib=worker.peak_rss / _common.MiB if worker.peak_rss else None,
    )


def log_notes(paths, per_log=5):
    """Lines worth a look in the workers' stderr: our notes, retracing, Python warnings."""
    notes = []
    for path in paths:
        seen = []
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    line = line.strip()
                    if (line.startswith("note:") or "retrac" in line.lower() or "Warning:" in line) \
                            and line not in seen:
                        seen.append(line)
        except OSError:
            continue
        notes += [f"{os.path.basename(path)}: {line[:240]}" for line in seen[:per_log]]
    return notes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="124M", choices=list(_common.PRESET_SHAPES))
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                        help="comma-separated subset of " + ",".join(PEERS) + " ('' = ours only)")
    parser.add_argument("--llamacpp-types", default="f32,f16,q8_0",
                        help="GGUF weight types for the llamacpp peer, one row each (llamacpp-f32, ...)")
    parser.add_argument("--converter", help="llama.cpp's convert_hf_to_gguf.py for the llamacpp peer "
                                            "(default: $LLAMA_CPP_CONVERTER; see bench/llamacpp_gguf.py)")
    parser.add_argument("--openai-repo", help="checkout of openai/gpt-2 (for the 'openai' peer)")
    parser.add_argument("--ours-xla", default="default", choices=list(OURS_VARIANTS),
                        help="pass jit_compile=True/False to gpt2.sample_sequence (both: two rows); "
                             "default: pass nothing; none: no compiled-loop row (with --ours-direct: only "
                             "the uncompiled sampler, e.g. to keep a large model's workers within memory)")
    parser.add_argument("--ours-direct", action="store_true",
                        help="add a row for the uncompiled sampler short jobs start on (ours-direct)")
    parser.add_argument("--ours-dtypes", default="float32",
                        help="comma-separated dtypes for this project's model: float32, bfloat16, int8, float16 "
                             "(one row each; bfloat16 rows are named ours-bf16, int8 rows ours-int8, float16 "
                             "rows ours-f16)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for every system (torch.set_num_threads, TF intra/inter-op); "
                             "default 0: each framework's own default")
    parser.add_argument("--settle", type=float, default=0.5, help="pause (s) before each timed rep")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for one worker answer")
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the memory bandwidth bound")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        return _common.serve_worker(worker_setup)

    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        parser.error(f"unknown peers {unknown}; choose from {', '.join(PEERS)}")
    if args.new_tokens < 2 or args.reps < 1 or not batch_sizes or args.prompt_len < 1:
        parser.error("need --new-tokens >= 2, --reps >= 1, --prompt-len >= 1 and at least one batch size")
    hparams = _common.PRESET_SHAPES[args.shape]
    if args.prompt_len + args.new_tokens > hparams["n_ctx"]:
        parser.error(f"--prompt-len + --new-tokens must be <= n_ctx ({hparams['n_ctx']})")
    dtypes = [d.strip() for d in args.ours_dtypes.split(",") if d.strip()]
    if set(dtypes) - {"float32", "bfloat16", "int8", "float16"} or not dtypes:
        parser.error("--ours-dtypes takes float32, bfloat16, int8 and/or float16")
    variants = OURS_VARIANTS[args.ours_xla] + ([("ours-direct", "direct")] if args.ours_direct else [])
    if not variants:
        parser.error("--ours-xla none leaves no row of ours: add --ours-direct")
    suffix = {"float32": "", "bfloat16": "-bf16", "int8": "-int8", "float16": "-f16"}
    systems = [(name + suffix[dtype], "ours", xla, None if dtype == "float32" else dtype)
               for dtype in dtypes for name, xla in variants]
    systems += [(p, "kerashub" if p.startswith("kerashub") else p,
                 p.endswith("-xla") if p.startswith("kerashub") else None, None) for p in peers if p != "llamacpp"]
    gguf_types = [t.strip() for t in args.llamacpp_types.split(",") if t.strip()]
    if "llamacpp" in peers:
        if set(gguf_types) - set(llamacpp_gguf.OUTTYPES) or not gguf_types:
            parser.error(f"--llamacpp-types takes {', '.join(llamacpp_gguf.OUTTYPES)}")
        systems += [(f"llamacpp-{t}", "llamacpp", None, t) for t in gguf_types]

    import numpy as np

    print(f"# GPT-2 {args.shape} greedy generation, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, batch sizes {batch_sizes}, {args.reps} reps "
          f"({os.cpu_count()} cores, threads: {args.threads or 'framework defaults'})\n", flush=True)
    model_dir = _common.cached_checkpoint(args.shape)
    args.ggufs, args.gguf_missing = {}, None
    if "llamacpp" in peers:
        converter = llamacpp_gguf.find_converter(args.converter)
        if importlib.util.find_spec("llama_cpp") is None:
            args.gguf_missing = "llama-cpp-python not installed (see bench/README.md)"
        elif converter is None:
            args.gguf_missing = "no convert_hf_to_gguf.py: pass --converter or set LLAMA_CPP_CONVERTER"
        else:
            args.ggufs = llamacpp_gguf.make_ggufs(model_dir, gguf_types, converter)
    prompt = np.random.default_rng(0).integers(0, hparams["n_vocab"], (max(batch_sizes), args.prompt_len))
    prompt = prompt.astype(int).tolist()

    bound = None
    if not args.no_bandwidth:
        bandwidth, threads = _common.memory_bandwidth()
        weight_bytes = _common.decode_weight_bytes(hparams)
        bound = dict(bandwidth_gbs=bandwidth / 1e9, threads=threads, weight_bytes=weight_bytes,
                     ms_per_step=1000 * weight_bytes / bandwidth)
        print(f"memory read bandwidth: {bound['bandwidth_gbs']:.1f} GB/s (best of 5, {threads} threads, "
              f"1 GiB buffer) -> batch-1 lower bound {weight_bytes / 1e6:.0f} MB of fp32 weights per step "
              f"= {bound['ms_per_step']:.1f} ms/step\n", flush=True)

    log_dir = _common.log_dir(__file__)
    results, statuses, details = [], {}, {}
    for batch in batch_sizes:
        print(f"batch {batch}:", flush=True)
        workers = run_batch(systems, batch, args, model_dir, hparams, prompt)
        for worker in workers:
            if worker.status:
                statuses.setdefault(worker.name, worker.status)
            if worker.info:
                details.setdefault(worker.name,
                                   {k: worker.info.get(k) for k in ("versions", "threads", "options", "params")})
            results.append(dict(system=worker.name, batch=batch, status=worker.status, info=worker.info,
                                first=worker.first, reps=worker.reps, peak_rss=worker.peak_rss,
                                log=worker.log_path, **summarize(worker, batch, args.new_tokens)))

    baseline = systems[0][0]
    print(f"\n## GPT-2 {args.shape}, greedy, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
          f"{args.reps} reps; (x) = ratio to {baseline} at the same batch\n")
    headers = ["system", "batch", "ms/step min", "ms/step median", "tokens/s", "1-token call ms",
               "first call s", "peak RSS MiB"]
    rows = []
    for batch in batch_sizes:
        ours = next((r for r in results if r["system"] == baseline and r["batch"] == batch), {})
        for r in results:
            if r["batch"] != batch or not r["reps"]:
                continue
            rows.append([r["system"], batch,
                         _common.with_ratio(r["ms_min"], ours.get("ms_min")),
                         _common.with_ratio(r["ms_median"], ours.get("ms_median")),
                         _common.with_ratio(r["tokens_per_s"], ours.get("tokens_per_s")),
                         _common.with_ratio(r["call1_ms"], ours.get("call1_ms"), "{:.0f}"),
                         _common.with_ratio(r["first_s"], ours.get("first_s")),
                         _common.with_ratio(r["peak_mib"], ours.get("peak_mib"), "{:.0f}")])
    print(_common.markdown_table(headers, rows) if rows else "(no system ran)")
    if bound:
        print(f"\nMachine bound, batch 1: {bound['weight_bytes'] / 1e6:.0f} MB fp32 weights / "
              f"{bound['bandwidth_gbs']:.1f} GB/s read bandwidth = {bound['ms_per_step']:.1f} ms/step")
    for name, status in statuses.items():
        print(f"- {name}: {status}")
    print()
    for name, d in details.items():
        print(f"- {name}: {d['versions']}; {d['threads']}; {d['options']}; {d['params'] / 1e6:.2f}M params")
    notes = log_notes(r["log"] for r in results)
    if notes:
        print("\nFrom the worker logs:")
        for line in notes:
            print(f"- {line}")
    print(f"\nWorker logs (warnings, tracebacks): {log_dir}/")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(args=vars(args), bound=bound, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
