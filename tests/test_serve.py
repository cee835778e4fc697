"""serve/: the engine (streamed decoding, stop strings, JSON mode), the OpenAI-compatible app and the chat loop."""

from __future__ import annotations

import io
import json

import pytest

from conftest import make_model

BOOL_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


@pytest.fixture
def engine(tokenizer):
    from minigiant.serve import Engine

    return Engine(make_model(len(tokenizer), seed=3), tokenizer, "tiny")


def greedy_answer(engine, ids, max_tokens):
    from minigiant.generate import sample_continuations

    (tokens, stop), = sample_continuations(engine.model, [ids], engine.pad, engine.stops, max_tokens, 0.0, 0)
    return engine.tokenizer.decode(tokens, skip_special_tokens=True), tokens, stop


def sse_events(body: str) -> list:
    events = [line[len("data: "):] for line in body.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def test_stream_equals_the_batched_decoder_and_counts_tokens(engine):
    from minigiant.serve import Sampling

    ids = engine.chat_ids([{"role": "user", "content": "Where is the time machine?"}])
    pieces = list(engine.stream(ids, Sampling(max_tokens=12, temperature=0)))
    text, tokens, stop = greedy_answer(engine, ids, 12)
    assert "".join(p.text for p in pieces) == text
    assert all(p.finish_reason is None for p in pieces[:-1])
    last = pieces[-1]
    assert (last.prompt_tokens, last.completion_tokens) == (len(ids), len(tokens))
    assert last.finish_reason == ("stop" if stop is not None else "length")


def test_stop_string_cuts_the_answer_and_is_never_streamed(engine):
    from minigiant.serve import Sampling

    ids = engine.chat_ids([{"role": "user", "content": "Tell me about the Eloi."}])
    sampling = Sampling(max_tokens=40, temperature=1.0, seed=5)
    text = "".join(p.text for p in engine.stream(ids, sampling))
    middle = len(text) // 2
    stop = next(text[i : i + 3] for i in range(middle, len(text) - 3) if text[i : i + 3].isprintable() and "\ufffd" not in text[i : i + 3])
    pieces = list(engine.stream(ids, Sampling(max_tokens=40, temperature=1.0, seed=5, stop=["never there", stop])))
    assert "".join(p.text for p in pieces) == text[: text.index(stop)]
    assert pieces[-1].finish_reason == "stop" and len(pieces) > 2  # streamed in pieces, not all at the end


def test_sampling_is_reproducible_with_a_seed(engine):
    from minigiant.serve import Sampling

    ids = engine.text_ids("The Time Traveller")
    answers = ["".join(p.text for p in engine.stream(ids, Sampling(max_tokens=10, temperature=1.0, seed=seed))) for seed in (1, 1, 2)]
    assert answers[0] == answers[1] != answers[2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_mode_answers_parse_and_match_the_schema(engine, seed):
    from minigiant.serve import Sampling

    ids = engine.chat_ids([{"role": "user", "content": "Is it ok?"}])
    pieces = list(engine.stream(ids, Sampling(max_tokens=80, temperature=1.0, seed=seed, json=BOOL_SCHEMA)))
    assert pieces[-1].finish_reason == "stop"
    answer = json.loads("".join(p.text for p in pieces))
    assert set(answer) == {"ok"} and isinstance(answer["ok"], bool)
    # the same random model without the constraint does not write JSON
    free = "".join(p.text for p in engine.stream(ids, Sampling(max_tokens=80, temperature=1.0, seed=seed)))
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)


def test_bad_settings_and_prompts_over_the_context_are_refused(engine):
    from minigiant.errors import ConfigError
    from minigiant.serve import Sampling

    for bad in (Sampling(max_tokens=0), Sampling(temperature=-1), Sampling(top_p=0), Sampling(stop=[""])):
        with pytest.raises(ConfigError):
            next(engine.stream([1, 2, 3], bad))
    with pytest.raises(ConfigError, match="context of 512 tokens"):
        next(engine.stream([5] * 500, Sampling(max_tokens=20)))


@pytest.fixture
def client(engine):
    from fastapi.testclient import TestClient

    from minigiant.serve.app import create_app

    return TestClient(create_app(engine))


def test_models_and_health(client):
    assert client.get("/health").json() == {"status": "ok", "model": "tiny"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]


def test_chat_completion_matches_the_engine_and_its_stream(client, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Who is Weena?"}]}]
    request = {"model": "anything", "messages": messages, "max_tokens": 15, "temperature": 0}
    body = client.post("/v1/chat/completions", json=request).json()
    ids = engine.chat_ids([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Weena?"}])
    text, tokens, stop = greedy_answer(engine, ids, 15)
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert body["choices"][0]["finish_reason"] == ("stop" if stop is not None else "length")
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(tokens), "total_tokens": len(ids) + len(tokens)}

    streamed = client.post("/v1/chat/completions", json={**request, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert content == text
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]] == [body["choices"][0]["finish_reason"]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == body["usage"]


def test_text_completion_and_json_response_format(client, engine):
    body = client.post("/v1/completions", json={"prompt": "The Time Traveller", "max_tokens": 8, "temperature": 0}).json()
    text, _, _ = greedy_answer(engine, engine.text_ids("The Time Traveller"), 8)
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == text
    events = sse_events(client.post("/v1/completions", json={"prompt": "The Time Traveller", "max_tokens": 8, "temperature": 0, "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in events) == text

    schema = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": BOOL_SCHEMA}}
    answer = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "ok?"}], "response_format": schema, "max_tokens": 80, "seed": 0}).json()
    assert isinstance(json.loads(answer["choices"][0]["message"]["content"])["ok"], bool)


@pytest.mark.parametrize("change, message", [
    ({"n": 2}, "n must be 1"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"temperature": -0.5}, "temperature"),
    ({"tools": [{"type": "function"}]}, "tools are not supported"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "yaml"}}, "response_format type"),
    ({"max_tokens": 600}, "context of 512 tokens"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}}, "the JSON schema cannot be used"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}, "required": ["a"]}}}},
     "unknown type 'nonsense'"),
])
def test_unsupported_or_bad_requests_get_an_openai_error(client, change, message):
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **change}
    response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_chat_loop_keeps_the_conversation_and_resets(engine):
    from minigiant.serve import Sampling
    from minigiant.serve.chat import chat_loop

    out = io.StringIO()
    messages = chat_loop(engine, Sampling(max_tokens=5, temperature=0), "Be kind.", ["Hello", "", "/what", "And you?", "/exit", "never read"], out)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == "And you?"
    # the second answer was given with the first turn in the prompt
    first_ids = engine.chat_ids(messages[:2])
    second = "".join(p.text for p in engine.stream(engine.chat_ids(messages[:4]), Sampling(max_tokens=5, temperature=0)))
    assert messages[4]["content"] == second and len(engine.chat_ids(messages[:4])) > len(first_ids)
    assert "unknown command '/what'" in out.getvalue()

    after_reset = chat_loop(engine, Sampling(max_tokens=5, temperature=0), None, ["Hello", "/reset", "Again"], io.StringIO())
    assert [m["content"] for m in after_reset if m["role"] == "user"] == ["Again"]


def test_chat_drops_the_oldest_turns_when_the_context_is_full(engine):
    from minigiant.serve.chat import fit_to_context

    turn = "word " * 60
    messages = [{"role": "system", "content": "Be kind."}]
    for i in range(6):
        messages += [{"role": "user", "content": f"{i} {turn}"}, {"role": "assistant", "content": turn}]
    messages.append({"role": "user", "content": "last"})
    kept, ids = fit_to_context(engine, messages, 64)
    assert ids == engine.chat_ids(kept)
    assert len(engine.chat_ids(kept)) + 64 <= engine.context < len(engine.chat_ids(messages)) + 64
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last" and kept[1]["role"] == "user"
    assert kept[1:] == messages[len(messages) - len(kept) + 1 :]


def test_cli_chat_reads_stdin_and_serve_refuses_a_bad_port(tiny_model_dir, monkeypatch, capsys):
    from minigiant.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/exit\n"))
    assert main(["chat", str(tiny_model_dir), "--max-tokens", "4", "--temperature", "0"]) == 0
    assert "chatting with tiny" in capsys.readouterr().out
    assert main(["serve", str(tiny_model_dir), "--port", "70000"]) != 0
    assert "port must be in 1-65535" in capsys.readouterr().err
    assert main(["chat", str(tiny_model_dir), "--temperature", "-1"]) != 0


def test_json_mode_with_the_models_ngram_ban_still_parses(engine):
    from minigiant.serve import Sampling

    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "boolean"}}}, "required": ["a"]}
    ids = engine.chat_ids([{"role": "user", "content": "Answers?"}])
    answers = []
    for n in (0, 2):
        engine.decoding["answer_no_repeat_ngram_size"] = n  # as a model's generation_config.json would ask
        pieces = list(engine.stream(ids, Sampling(max_tokens=120, temperature=0, json=schema)))
        assert pieces[-1].finish_reason == "stop"
        answers.append("".join(p.text for p in pieces))
        assert all(isinstance(x, bool) for x in json.loads(answers[-1])["a"])
    assert answers[0] != answers[1]  # the ban was in force
    assert "  " not in answers[0] + answers[1]  # one whitespace character at a time


def test_a_stream_closed_midway_frees_the_engine(engine):
    from minigiant.serve import Sampling

    pieces = engine.stream(engine.text_ids("The Time Traveller"), Sampling(max_tokens=50, temperature=1.0, seed=0))
    next(pieces)
    assert engine._lock.locked()  # one request at a time
    pieces.close()  # what the server does when the client goes away
    assert not engine._lock.locked()


def test_a_json_answer_the_enforcer_gave_up_on_is_an_error_not_a_stop(engine, monkeypatch):
    """lm-format-enforcer, when a schema defeats it mid-answer, logs and allows only the end token; the engine
    must not report that cut answer as a finished JSON value."""
    from minigiant.errors import ConfigError
    from minigiant.serve import Sampling

    brace = engine.tokenizer.encode("{", add_special_tokens=False)[0]
    monkeypatch.setattr(engine, "_allowed_tokens", lambda schema: lambda prompt, tokens: [brace] if not tokens else sorted(engine.stops))
    with pytest.raises(ConfigError, match="could not be kept to this JSON schema"):
        list(engine.stream(engine.chat_ids([{"role": "user", "content": "hi"}]), Sampling(max_tokens=8, json={"type": "object"})))
