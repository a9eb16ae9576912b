"""The server on a tiny random GPT2-ML folder (their layout, tests/gpt2ml_support.py) over loopback
HTTP: completions and chat through the model's WordPiece tokenizer, [SEP] as the end of text, [PAD]
banned in every request row unless the request's logit_bias sets it, stop strings as the model's
text shows them, and the playground's streamed request in Chinese."""

import json

import pytest

from gpt2.serve import chat
from gpt2.serve.protocol import ChoiceText, Protocol

from gpt2ml_support import write_folder
from serve_support import MODEL_ID, Running, sse_events

PROMPT = "宇宙的意义是"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import encoder
    from gpt2.checkpoint import load_model
    from gpt2.serve.engine import Engine

    folder = str(tmp_path_factory.mktemp("gpt2ml"))
    write_folder(folder)
    model, enc = load_model(folder), encoder.encoder_for_model_dir(folder)
    engine = Engine(model, max_batch=2, max_queue=16, stop_token=enc.eot_token, jit_compile=False, steps_per_run=2)
    engine.warm_up(log_fn=lambda message: None)
    engine.start()
    proto = Protocol(enc, model.hparams.n_ctx, (MODEL_ID,), n_vocab=model.hparams.n_vocab, max_tokens_limit=64)
    server = Running(engine=engine, protocol=proto)
    yield server, model, enc
    server.stop()
    engine.shutdown(1)


def greedy(model, enc, text, length):
    """The library's greedy tokens with generate.py's rule ([PAD] banned, [SEP] ends the row)."""
    from gpt2.sampling import api

    row = api.sample_rows(model, [enc.encode(text)], length, temperature=0, logit_bias={enc.pad_token: -100},
                          stop_token=enc.eot_token, jit_compile=False)[0].tolist()
    return row[:row.index(enc.eot_token)] if enc.eot_token in row else row


def test_completions_in_chinese_with_the_pad_ban_in_every_row(served):
    server, model, enc = served
    r = server.post("/v1/completions", {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == enc.decode(greedy(model, enc, PROMPT, 12)) and choice["text"]
    assert all("\u4e00" <= ch <= "\u9fff" or ch in "，。：！？abc12:" or ch.isalpha() for ch in choice["text"])
    assert r.json()["usage"]["prompt_tokens"] == len(enc.encode(PROMPT)) == 6

    plan = server.app.protocol.parse_completions({"model": MODEL_ID, "prompt": PROMPT, "n": 2})
    assert [row.settings.logit_bias for row in plan.rows] == [((0, -100.0),)] * 2
    plan = server.app.protocol.parse_completions({"model": MODEL_ID, "prompt": PROMPT, "logit_bias": {"0": 3}})
    assert plan.rows[0].settings.logit_bias == ((0, 3.0),)  # the request's own word wins
    tokens = server.post("/tokenize", {"prompt": PROMPT}).json()["tokens"]
    assert tokens == enc.encode(PROMPT) and server.post("/detokenize", {"tokens": tokens}).json()["prompt"] == PROMPT
    info = server.get("/tokenizer_info").json()
    assert (info["eos_token"], info["pad_token"], info["unk_token"]) == ("[SEP]", "[PAD]", "[UNK]")


def test_chat_goes_through_the_model_tokenizer_and_stops_at_its_turn_markers(served):
    server, model, enc = served
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": PROMPT + "？"}], "max_tokens": 8,
            "temperature": 0, "stop": ["B 12"]}
    plan = server.app.protocol.parse_chat(body)
    assert plan.stops == ["user:", "assistant:", "system:", "b12"]  # as decoded WordPiece text shows them
    assert plan.prompt_tokens == [enc.encode(chat.render(body["messages"]))]
    assert enc.decode(plan.prompt_tokens[0]) == "user:宇宙的意义是？assistant:"
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    expected = ChoiceText(enc, 8, plan.stops, trim=True)
    expected_text = expected.feed(greedy(model, enc, chat.render(body["messages"]), 8)) + expected.end()
    assert r.json()["choices"][0]["message"]["content"] == expected_text

    choice = ChoiceText(enc, 20, plan.stops, trim=True)  # the model starting a next turn ends the answer
    text = choice.feed(enc.encode("宇宙。User: 的")) + choice.end()
    assert (text, choice.finish_reason) == ("宇宙。", "stop")


def test_the_playground_streams_chinese(served):
    server, model, enc = served
    page = server.get("/")
    assert page.status_code == 200 and "charset=utf-8" in page.headers["Content-Type"]
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # what the playground's page sends
    r = server.post("/v1/completions", body, stream=True)
    assert r.status_code == 200
    events = sse_events(r.content.decode("utf-8"))
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == enc.decode(greedy(model, enc, PROMPT, 10)) and any("\u4e00" <= ch <= "\u9fff" for ch in text)
    assert json.dumps(events[-1]["usage"])
