"""`python -m gpt2.serve` / `gpt2-serve`: serve one GPT-2 model over HTTP.

    python -m gpt2.serve --model 124M [--models-dir models] [--host 127.0.0.1] [--port 5000]
    python -m gpt2.serve --model 355M --draft-model 124M      # or --prompt-lookup: speculative decoding

Start-up: the address is claimed first (a taken port fails at once), then every program requests
use is compiled (before the weights are read, so the compiler's memory is free again when they
need theirs), the weights are loaded, and only then does the port accept connections. SIGTERM
or Ctrl-C: no new requests (503), waiting rows fail, running rows get --shutdown-grace seconds to
finish (then are cut short), answers are written, and the process exits 0.

--help answers without importing TensorFlow.
"""

import logging
import os
import signal
import sys
import threading
import time

from gpt2.cli import EXIT_ERROR, EXIT_OK, Parser, add_model_arguments, fail, main_of, number, positive_int
from gpt2.generate_cli import add_speculative_arguments, draft_folder
from gpt2.runtime import import_tensorflow
from gpt2.serve import api, httpd, protocol
from gpt2.serve.engine import DEFAULT_STEPS_PER_RUN, DEFAULT_STREAM_STEPS_PER_RUN, Engine
from gpt2.serve.httpd import Limits

log = logging.getLogger("gpt2.serve")

DEFAULTS = Limits()
_seconds = number(float, lambda v: 0 < v < 1e6, "seconds > 0")
_grace = number(float, lambda v: 0 <= v < 1e6, "seconds >= 0")


def build_parser():
    parser = Parser(
        prog="gpt2-serve",
        description="Serve a GPT-2 model over HTTP: OpenAI-compatible /v1/completions, /v1/chat/completions "
                    "and /v1/models, POST /generate, GET /health, and a playground page at /.",
    )
    add = parser.add_argument
    add_model_arguments(parser, required=True, role="the model to serve")
    add("--host", default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 = all interfaces)")
    add("--port", type=int, default=5000, help="port, 0..65535 (default: 5000; 0 = any free port)")
    add("--api-key", default=None,
        help="require 'Authorization: Bearer KEY' (default: $GPT2_API_KEY; neither = no key)")
    add("--model-id", help="model id in /v1/models and responses (default: the model's folder name)")
    add("--served-model-name", action="append", default=[], metavar="NAME",
        help="also accept NAME as a request's model (repeatable), e.g. gpt-3.5-turbo for clients that send a "
             "fixed name; responses keep --model-id")
    add("--chat-history", choices=protocol.CHAT_HISTORY_MODES, default="error",
        help="a chat longer than the context: 'error' answers 400 (default); 'truncate' drops the oldest "
             "non-system messages and caps max_tokens to what fits, saying so in an X-Chat-History header")
    limits = parser.add_argument_group("batching and limits")
    limits.add_argument("--max-batch", type=positive_int, default=8,
                        help="rows decoded together (slots of the compiled pool; default: 8)")
    limits.add_argument("--max-queue", type=positive_int, default=128,
                        help="rows (prompts x n) allowed to wait for a slot before answering 503 (default: 128)")
    limits.add_argument("--max-request-rows", type=positive_int, default=protocol.DEFAULT_MAX_REQUEST_ROWS,
                        help=f"prompts x n in one request (default: {protocol.DEFAULT_MAX_REQUEST_ROWS})")
    limits.add_argument("--max-tokens-limit", type=positive_int, default=protocol.DEFAULT_MAX_TOKENS_LIMIT,
                        help="largest max_tokens / length a request may ask for; generation may run past the "
                             f"context, the window slides (default: {protocol.DEFAULT_MAX_TOKENS_LIMIT})")
    limits.add_argument("--steps-per-run", type=positive_int, default=DEFAULT_STEPS_PER_RUN,
                        help="decode steps per compiled call; new requests join between calls "
                             f"(default: {DEFAULT_STEPS_PER_RUN})")
    limits.add_argument("--stream-steps-per-run", type=positive_int, default=DEFAULT_STREAM_STEPS_PER_RUN,
                        help="decode steps per compiled call while a streamed request is running: 1 sends each "
                             f"token as it is made (default: {DEFAULT_STREAM_STEPS_PER_RUN})")
    limits.add_argument("--max-body-bytes", type=positive_int, default=DEFAULTS.max_body_bytes,
                        help=f"largest request body (default: {DEFAULTS.max_body_bytes})")
    limits.add_argument("--max-connections", type=positive_int, default=DEFAULTS.max_connections,
                        help=f"open connections; more get 503 and are closed (default: {DEFAULTS.max_connections})")
    limits.add_argument("--max-connections-per-address", type=positive_int, default=None, metavar="N",
                        help="open connections from one client address (IPv6: one /64); an eighth of "
                             "--max-connections is kept for addresses holding none. Behind a reverse proxy every "
                             "connection comes from its address: set this to --max-connections there (default: a "
                             "quarter of --max-connections)")
    for name, what in (("first_byte", "a new connection may wait before it sends its request"),
                       ("header", "to send a request line and headers"), ("body", "to send a request body"),
                       ("idle", "a kept-alive connection may idle")):
        limits.add_argument(f"--{name.replace('_', '-')}-timeout", type=_seconds,
                            default=getattr(DEFAULTS, f"{name}_timeout"), help=f"seconds {what} (default: %(default)g)")
    limits.add_argument("--shutdown-grace", type=_grace, default=10.0,
                        help="seconds running requests get to finish on SIGTERM / Ctrl-C (default: 10)")
    add_speculative_arguments(parser.add_argument_group(
        "speculative decoding (a request row decoded alone, prompt + max_tokens within the context, without "
        "logprobs, greedy or unseeded: greedy text as without it, sampled text from the same distribution; "
        "when other requests arrive its current step ends and it continues in the batch)"))
    access = parser.add_argument_group("browsers")
    access.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="answer CORS requests from this origin, e.g. http://localhost:3000 (repeatable; "
                             "'*' = any; default: none)")
    access.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="also accept this Host header name (repeatable). Without an API key on a loopback "
                             "address only localhost/127.0.0.1/::1 are accepted (DNS rebinding); with "
                             "--allowed-host the check applies to any address")
    access.add_argument("--no-playground", action="store_true", help="do not serve the playground page at /")
    add("--dtype", choices=("float32", "bfloat16", "int8", "float16"), default="float32",
        help="bfloat16 and float16 hold the weights in half the memory, int8 in a quarter (per-channel scales), "
             "with slightly different numbers; float16 is the fast one on CPUs without bfloat16 (default: float32)")
    add("--no-xla", action="store_true", help="compile without XLA: faster start-up, slower generation "
                                              "(bfloat16 never uses XLA: it is slower there on CPUs)")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="info logs one line per request (default: info)")
    return parser


def _api_key(parser, args):
    if args.api_key is not None:
        key, source = args.api_key, "--api-key"
    else:
        key, source = os.environ.get("GPT2_API_KEY"), "$GPT2_API_KEY"
        if key is None:
            return None
    if not key.strip():
        parser.error(f"{source} is empty: give a key, or leave it out to serve without one")
    if any(c.isspace() for c in key):
        parser.error(f"{source} must not contain whitespace")
    return key


def check_args(parser, args):
    """One clear line (and exit 2) for values argparse's types cannot judge alone; returns the
    API key (None = no key)."""
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    if (args.max_connections_per_address or 0) > args.max_connections:
        parser.error(f"--max-connections-per-address ({args.max_connections_per_address}) must not exceed "
                     f"--max-connections ({args.max_connections})")
    if args.max_request_rows > args.max_queue:
        parser.error(f"--max-request-rows ({args.max_request_rows}) must not exceed --max-queue ({args.max_queue})")
    for name in args.served_model_name:
        if not name.strip():
            parser.error("--served-model-name must not be empty")
    for origin in args.cors_origin:
        if origin != "*" and "://" not in origin:
            parser.error(f"--cors-origin {origin!r} must be an origin like http://localhost:3000 (or '*')")
    return _api_key(parser, args)


def main(argv=None):
    """Runs the command line `argv` (default: sys.argv[1:]) until SIGTERM / Ctrl-C; the exit code."""
    parser = build_parser()

    def body(args):
        api_key = check_args(parser, args)  # a usage error: printed, exit 2
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s",
                            stream=sys.stderr)
        return _serve(args, api_key)

    return main_of(parser, argv, body)


def _serve(args, api_key):
    started = time.perf_counter()
    limits = Limits(**{name: getattr(args, name) for name in (
        "max_connections", "max_connections_per_address", "max_body_bytes", "first_byte_timeout", "idle_timeout",
        "header_timeout", "body_timeout")})
    allowed = None
    if args.allowed_host or (api_key is None and httpd.is_loopback(args.host)):
        allowed = httpd.default_allowed_hosts(args.host, args.allowed_host)
    try:  # claim the address first, so a taken port fails now rather than after compiling
        server = httpd.Server(None, args.host, args.port, bind_and_activate=False, limits=limits, api_key=api_key,
                              cors_origins=args.cors_origin, allowed_hosts=allowed)
        server.server_bind()
    except (OSError, OverflowError) as error:
        return fail(f"cannot listen on {args.host}:{args.port}: {error}", EXIT_ERROR)

    import_tensorflow()  # quietly, before anything else imports it
    from encoder import encoder_for_model_dir
    from gpt2.checkpoint import load_model, read_hparams, resolve_model_dir
    from gpt2.sampling.api import release_free_memory
    from gpt2.sampling.speculative import DraftModel, PromptLookup

    model_dir = resolve_model_dir(args.model, args.models_dir)
    enc = encoder_for_model_dir(model_dir)
    draft, draft_name = None, None
    draft_dir = draft_folder(args, read_hparams(model_dir))
    if draft_dir:
        log.info("loading the draft model %s ...", draft_dir)
        draft = DraftModel(load_model(draft_dir, dtype=args.dtype), tokens=args.draft_tokens)
        draft_name = args.draft_model
    elif args.prompt_lookup:
        draft, draft_name = PromptLookup(tokens=args.draft_tokens), "prompt-lookup"
    engines = []

    def compile_first(model):
        """Compiles every program before the weights are read (see the module docstring and gpt2.load_model)."""
        jit = False if args.no_xla else model.default_jit_compile
        log.info("compiling (%s, %s) ...", args.dtype, "XLA" if jit else "no XLA")
        engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue, stop_token=enc.eot_token,
                        jit_compile=jit, steps_per_run=args.steps_per_run,
                        stream_steps_per_run=args.stream_steps_per_run, draft=draft, draft_name=draft_name)
        engine.warm_up()
        release_free_memory()
        engines.append(engine)

    model = load_model(model_dir, dtype=args.dtype, before_weights=compile_first)
    engine, = engines
    log.info("loaded %s (compiled and read) in %.1f s", model_dir, time.perf_counter() - started)
    folder_name = os.path.basename(os.path.normpath(model_dir))
    model_id = args.model_id or folder_name
    proto = protocol.Protocol(enc, model.hparams.n_ctx, model_names(args, model_id, folder_name),
                              n_vocab=model.hparams.n_vocab, max_tokens_limit=args.max_tokens_limit,
                              max_request_rows=args.max_request_rows, chat_history=args.chat_history)
    server.app = api.App(engine, proto, model_id, playground=not args.no_playground, heartbeat=limits.heartbeat)
    engine.start()
    server.server_activate()
    if not httpd.is_loopback(args.host) and api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach this port can use it", args.host)
    host = f"[{args.host}]" if ":" in args.host else args.host
    log.info("ready in %.1f s", time.perf_counter() - started)
    speculating = f", speculative decoding with {draft_name}" if draft_name else ""
    print(f"gpt2-serve: serving {model_id} on http://{host}:{server.port} (max batch {args.max_batch}, "
          f"queue {args.max_queue} rows{speculating})", flush=True)
    serve_until_signalled(server, engine, args.shutdown_grace)
    return EXIT_OK


def model_names(args, model_id, folder_name):
    """The names a request's `model` may use: the id first (the one reported), then --model,
    the folder's name and each --served-model-name."""
    return tuple(dict.fromkeys((model_id, args.model, folder_name, *args.served_model_name)))


def serve_until_signalled(server, engine, grace):
    """Serves until SIGTERM or SIGINT, then shuts down in order (see the module docstring)."""
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():  # a second signal: leave now
            os._exit(1)
        stop.set()

    for name in ("SIGTERM", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)
    httpd.start_in_thread(server)
    while not stop.wait(0.5):
        pass
    log.info("shutting down: new requests get 503, running rows have %g s to finish", grace)
    server.app.draining = True
    server.shutdown()
    engine.shutdown(grace)
    server.wait_idle(10)
    server.server_close()
    log.info("stopped")
