"""Fine-tuning speed and memory: this project's training step beside its peers, and a memory table.

    python bench/train_speed.py speed [--shape 124M] [--seq-len 256]
        [--batch-size 4] [--steps 5] [--reps 3] [--peers hf,kerashub] [--ours fp32,xla,bf16]
    python bench/train_speed.py memory [--shapes 124M,355M,774M,1558M]
        [--options full,recompute,lora,lora+recompute,bf16] [--steps 2]

Systems (fp32, same GPT-2 shape, random token windows, AdamW lr 1e-4, weight decay 0.01, global
norm clipping 1.0, no dropout):
  ours             gpt2.train.Trainer(...).step() on the random-weight checkpoint of the shape
                   (bench/.cache/<shape>/, or --models-dir/<shape>); ours-xla: the step compiled
                   with XLA; ours-bf16: mixed_bfloat16 (bfloat16 matmuls, float32 weights; not
                   the same precision as the fp32 peers, shown for what the option gains).
  hf               Hugging Face transformers GPT2LMHeadModel(GPT2Config(shape)) on PyTorch CPU, a
                   plain loop: model(ids, labels=ids).loss, backward, clip_grad_norm_, AdamW.step.
  kerashub         KerasHub GPT2CausalLM(GPT2Backbone(shape), preprocessor=None).fit on a
                   tf.data dataset of (token_ids, padding_mask) -> next tokens, compiled with
                   KerasHub's defaults (jit_compile="auto": XLA on TensorFlow).

Method. Each system runs in its own worker process (this script with --_worker), driven over a
pipe. Workers start one after another; each takes one step right away (tracing/compiling:
"first step s"). Then the timed reps run interleaved (rep 1 of every system, rep 2 of every
system, ...), each rep `--steps` optimizer steps, so drift of the shared machine hits all alike.
tokens/s = steps * batch * seq_len / rep time (median and best rep). Peak RSS is the worker's
own peak RSS (VmHWM) at exit. The workers are alive together (at 124M, batch 4 x 256: about 5 GiB each, so
about 20 GiB with the defaults): run it on an otherwise idle machine (under a memory lock such as `flock` if it is
shared).

Memory mode runs one worker per (shape, option), one after another: load, `--steps` steps,
peak RSS. full = every weight trains; recompute = gradient checkpointing per block; lora = rank
8 adapters only; bf16 = mixed_bfloat16 (needs the model's dtype policies). A run whose
estimated need is above the memory available is skipped, not started.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

PEERS = ("hf", "kerashub")
OPTIONS = ("full", "recompute", "lora", "lora+recompute", "bf16")
GiB = 1 << 30


# ============================================================================= workers
# Each setup returns step(n): n optimizer steps, returning the last loss (a float).

def setup_ours(spec):
    import numpy as np

    _common.use_repo_checkout()
    import gpt2
    from gpt2.train.trainer import TrainConfig, Trainer

    option = spec.get("option", "full")
    load_options = {}
    if option == "bf16":
        import inspect

        if "dtype" not in inspect.signature(gpt2.load_model).parameters:
            raise _common.Skip("gpt2.load_model has no dtype policies yet")
        load_options["dtype"] = "mixed_bfloat16"
    model = gpt2.load_model(spec["model_dir"], **load_options)
    tokens = np.random.default_rng(0).integers(0, spec["hparams"]["n_vocab"], 1 << 20)
    config = TrainConfig(steps=1 << 30, batch_size=spec["batch_size"], seq_len=spec["seq_len"],
                         learning_rate=1e-4, weight_decay=0.01, clip_norm=1.0, save_every=0,
                         lora_rank=8 if "lora" in option else 0, recompute="recompute" in option,
                         jit_compile=bool(spec.get("xla")), progress=False)
    trainer = Trainer(model, tokens, config=config)

    def step(n):
        for _ in range(n):
            loss, _ = trainer.step()
        return loss

    return step, {"params": int(model.count_params()), "trained": int(sum(np.prod(v.shape) for v in trainer.variables))}


def setup_hf(spec):
    import importlib.util

    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        raise _common.Skip("transformers/torch not installed (see bench/README.md)")
    os.environ.setdefault("USE_TF", "0")
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hp = spec["hparams"]
    config = GPT2Config(vocab_size=hp["n_vocab"], n_positions=hp["n_ctx"], n_embd=hp["n_embd"], n_layer=hp["n_layer"],
                        n_head=hp["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)

    def step(n):
        for _ in range(n):
            ids = torch.randint(0, hp["n_vocab"], (spec["batch_size"], spec["seq_len"]), generator=generator)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step, {"params": sum(p.numel() for p in model.parameters()),
                  "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                              f"{torch.get_num_threads()} threads"}


def setup_kerashub(spec):
    import importlib.util

    if importlib.util.find_spec("keras_hub") is None:
        raise _common.Skip("keras-hub not installed (see bench/README.md)")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import keras_hub
    import tensorflow as tf

    hp = spec["hparams"]
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=hp["n_vocab"], num_layers=hp["n_layer"], num_heads=hp["n_head"], hidden_dim=hp["n_embd"],
        intermediate_dim=4 * hp["n_embd"], max_sequence_length=hp["n_ctx"], dropout=0.0)
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    lm.compile(optimizer=keras.optimizers.AdamW(1e-4, weight_decay=0.01, global_clipnorm=1.0),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), weighted_metrics=[])
    batch, seq = spec["batch_size"], spec["seq_len"]

    def window(_):
        tokens = tf.random.uniform([batch, seq + 1], 0, hp["n_vocab"], tf.int32)
        return {"token_ids": tokens[:, :-1], "padding_mask": tf.ones([batch, seq], tf.bool)}, tokens[:, 1:]

    dataset = tf.data.Dataset.range(1 << 30).map(window).prefetch(2)

    def step(n):
        history = lm.fit(dataset, steps_per_epoch=n, epochs=1, verbose=0)
        return float(history.history["loss"][-1])

    return step, {"params": int(backbone.count_params()),
                  "versions": f"keras-hub {keras_hub.__version__}, jit_compile={lm.jit_compile}"}


SETUPS = {"ours": setup_ours, "hf": setup_hf, "kerashub": setup_kerashub}


def worker_setup(spec):
    """One system in this worker process (see _common.serve_worker): one step right away (tracing,
    compiling), then "rep" takes `steps` timed steps."""
    started = time.perf_counter()
    step, info = SETUPS[spec["kind"]](spec)
    info["setup_s"] = time.perf_counter() - started
    started = time.perf_counter()
    info["first_loss"] = step(1)
    info["first_s"] = time.perf_counter() - started

    def rep():
        started = time.perf_counter()
        loss = step(spec["steps"])
        return dict(seconds=time.perf_counter() - started, loss=loss)

    return {"rep": rep}, info


# ============================================================================= driver

def start_worker(name, spec, log_name):
    """A worker of this script for one system, started and ready (or with its status set)."""
    worker = _common.Worker(__file__, _common.log_path(__file__, log_name), name,
                            dict(KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2"), timeout=7200)
    worker.reps = []
    worker.start(spec)
    return worker


def model_dir_for(shape, models_dir):
    """A random-weight checkpoint of `shape`: --models-dir/<shape> if given (written there if
    missing), else the benchmarks' cache."""
    return _common.cached_checkpoint(shape, root=models_dir or _common.CACHE_DIR)


def speed(args):
    hparams = _common.PRESET_SHAPES[args.shape]
    model_dir = model_dir_for(args.shape, args.models_dir)
    variants = {"fp32": ("ours", False, "full"), "xla": ("ours-xla", True, "full"),
                "bf16": ("ours-bf16", False, "bf16")}
    systems = [variants[v] for v in args.ours] + [(peer, None, None) for peer in args.peers]
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"# GPT-2 {args.shape} training, batch {args.batch_size} x seq {args.seq_len}, {args.steps} steps "
          f"per rep, {args.reps} reps, {os.cpu_count()} cores\n", flush=True)
    workers = []
    for name, xla, option in systems:
        spec = dict(kind=name if option is None else "ours", xla=xla, option=option, model_dir=model_dir,
                    hparams=hparams, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps)
        worker = start_worker(name, spec, f"speed-{name}")
        print(f"  {name}: " + (worker.status or f"ready in {worker.info['setup_s']:.1f} s, first step "
                                                f"{worker.info['first_s']:.1f} s"), flush=True)
        workers.append(worker)
    live = [w for w in workers if not w.status]
    for rep in range(args.reps):
        for worker in live[rep % len(live):] + live[:rep % len(live)] if live else []:
            if worker.status:  # died in an earlier rep (e.g. killed for memory)
                continue
            time.sleep(1.0)
            answer = worker.request("rep")
            if answer:
                worker.reps.append(answer["seconds"])
                print(f"  rep {rep + 1} {worker.name}: {tokens / answer['seconds']:.0f} tokens/s "
                      f"(loss {answer['loss']:.3f})", flush=True)
    for worker in workers:
        worker.finish()
    best_ours = max((tokens / _common.median(w.reps) for w in workers if w.reps and w.name in ("ours", "ours-xla")),
                    default=None)
    rows = []
    for worker in workers:
        if not worker.reps:
            rows.append([worker.name, worker.status or "-", "", "", "", ""])
            continue
        median = tokens / _common.median(worker.reps)
        rows.append([worker.name, _common.with_ratio(median, best_ours, "{:.0f}"),
                     f"{tokens / min(worker.reps):.0f}", f"{worker.info['first_s']:.1f}",
                     f"{worker.peak_rss / _common.MiB:.0f}" if worker.peak_rss else "-",
                     worker.info.get("versions", "")])
    print(f"\n## GPT-2 {args.shape} training steps, batch {args.batch_size} x {args.seq_len} tokens "
          f"(x) = ratio to our faster fp32 variant\n")
    print(_common.markdown_table(["system", "tokens/s median", "tokens/s best", "first step s", "peak RSS MiB",
                                  "notes"], rows, align="lrrrrl"))
    return [dict(system=w.name, status=w.status, info=w.info, reps=w.reps, peak_rss=w.peak_rss) for w in workers]


# Peak RSS ~ bytes per parameter * parameters + fixed GiB, fitted to the runs measured at batch
# 4 x 256 (124M, 355M; 1558M for lora+recompute): a guard against starting what cannot fit.
NEED = {"full": (29, 1.5), "bf16": (25, 1.5), "recompute": (19.5, 1.5), "lora": (15.5, 1.5),
        "lora+recompute": (6.5, 1.5)}


def estimated_bytes(hparams, option):
    """Roughly what a run of `option` needs (see NEED)."""
    per_param, fixed = NEED[option]
    return per_param * _common.param_count(hparams) + fixed * GiB


def available_bytes():
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def memory(args):
    rows, results = [], []
    print(f"# peak RSS of {args.steps} training steps, batch {args.batch_size} x seq {args.seq_len}\n", flush=True)
    for shape in args.shapes:
        hparams = _common.PRESET_SHAPES[shape]
        model_dir = None
        for option in args.options:
            need = estimated_bytes(hparams, option)
            if need > available_bytes() - GiB:
                status = f"skipped: needs about {need / GiB:.0f} GiB, {available_bytes() / GiB:.0f} GiB available"
                print(f"  {shape} {option}: {status}", flush=True)
                rows.append([shape, option, status, "", ""])
                results.append(dict(shape=shape, option=option, status=status))
                continue
            model_dir = model_dir or model_dir_for(shape, args.models_dir)
            spec = dict(kind="ours", option=option, model_dir=model_dir, hparams=hparams,
                        batch_size=args.batch_size, seq_len=args.seq_len, steps=max(args.steps - 1, 1))
            worker = start_worker(f"{shape}-{option}", spec, f"memory-{shape}-{option}")
            if not worker.status:
                answer = worker.request("rep")
                if answer:
                    worker.reps.append(answer["seconds"] / spec["steps"])
            worker.finish()
            peak = f"{worker.peak_rss / GiB:.2f}" if worker.peak_rss else "-"
            step_s = f"{worker.reps[0]:.1f}" if worker.reps else "-"
            print(f"  {shape} {option}: " + (worker.status or f"peak RSS {peak} GiB, {step_s} s/step"), flush=True)
            rows.append([shape, option, peak if not worker.status else worker.status, step_s,
                         f"{worker.info.get('trained', 0) / 1e6:.1f}M" if worker.info else ""])
            results.append(dict(shape=shape, option=option, status=worker.status, info=worker.info,
                                step_s=worker.reps, peak_rss=worker.peak_rss))
    print(f"\n## Peak RSS (GiB) while fine-tuning, batch {args.batch_size} x {args.seq_len} tokens\n")
    print(_common.markdown_table(["model", "option", "peak RSS GiB", "s/step", "trained params"], rows,
                                 align="llrrr"))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=("speed", "memory"), default="speed")
    parser.add_argument("--shape", default="124M", choices=list(_common.PRESET_SHAPES), help="speed: model shape")
    parser.add_argument("--shapes", default="124M,355M,774M,1558M", help="memory: model shapes")
    parser.add_argument("--options", default=",".join(OPTIONS), help="memory: " + ",".join(OPTIONS))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="steps per rep (speed: 5) or in all (memory: 2)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peers", default=",".join(PEERS), help="speed: subset of " + ",".join(PEERS))
    parser.add_argument("--ours", default="fp32,bf16", help="speed: our variants, subset of fp32,xla,bf16")
    parser.add_argument("--models-dir", help="take (or write) random checkpoints here, e.g. models "
                                             "(default: bench/.cache)")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        return _common.serve_worker(worker_setup)
    args.peers = [p for p in args.peers.split(",") if p]
    args.ours = [v for v in args.ours.split(",") if v]
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.options = [o for o in args.options.split(",") if o]
    unknown = sorted(set(args.peers) - set(PEERS)) + sorted(set(args.options) - set(OPTIONS)) + \
        sorted(set(args.ours) - {"fp32", "xla", "bf16"}) + \
        sorted(set(args.shapes) - set(_common.PRESET_SHAPES))
    if unknown:
        parser.error(f"unknown peers, options or shapes: {unknown}")
    args.steps = args.steps or (5 if args.mode == "speed" else 2)
    results = speed(args) if args.mode == "speed" else memory(args)
    print(f"\nWorker logs: {_common.log_dir(__file__)}/")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
