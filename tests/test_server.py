"""The OpenAI-compatible API, exercised with the official client against a real server."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import openai
import pytest
from conftest import MODEL

CHAT = [{"role": "user", "content": "Name three fruits."}]


def test_models_and_health(server, oai):
    ids = [m.id for m in oai.models.list().data]
    assert MODEL in ids
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok"


def test_chat_greedy_is_deterministic_and_counts_usage(oai):
    a = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    b = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content.strip()
    assert a.usage.completion_tokens <= 12
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert a.choices[0].finish_reason in ("stop", "length")


def test_completion_max_tokens_length_finish(oai):
    r = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7,
                               temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7


def test_streaming_chat_matches_non_streaming(oai):
    full = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    stream = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(parts) == full.choices[0].message.content
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert finish == full.choices[0].finish_reason


def test_streaming_completion_ends_with_done(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.status_code == 200
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)


def test_n_choices_share_prompt_and_differ(oai):
    r = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, n=3,
                                    temperature=1.0, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = {c.message.content for c in r.choices}
    assert len(texts) >= 2  # independent rows, not one sample copied


def test_seed_reproducible_and_seed_matters(oai):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
              max_tokens=16, temperature=1.0)
    a = oai.chat.completions.create(seed=123, **kw).choices[0].message.content
    b = oai.chat.completions.create(seed=123, **kw).choices[0].message.content
    c = oai.chat.completions.create(seed=124, **kw).choices[0].message.content
    assert a == b
    assert a != c


def test_stop_string_trims_output(oai):
    base = oai.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12,
                                  temperature=0).choices[0].text
    assert "6" in base, base  # the model continues the count
    r = oai.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                               stop=["6"])
    assert r.choices[0].finish_reason == "stop"
    assert "6" not in r.choices[0].text
    assert base.startswith(r.choices[0].text)


def test_chat_logprobs(oai):
    r = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                    logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for tok in content:
        assert tok.logprob <= 0
        assert len(tok.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert tok.logprob == pytest.approx(tok.top_logprobs[0].logprob, abs=1e-4)
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_echo_loglikelihood(oai):
    """echo=True, max_tokens=0 returns the prompt tokens' logprobs (lm-eval style)."""
    good = oai.completions.create(model=MODEL, prompt="The capital of France is Paris",
                                  max_tokens=0, echo=True, logprobs=1)
    bad = oai.completions.create(model=MODEL, prompt="The capital of France is banana",
                                 max_tokens=0, echo=True, logprobs=1)
    lp = good.choices[0].logprobs
    assert good.choices[0].text == "The capital of France is Paris"
    assert lp.token_logprobs[0] is None
    assert "".join(lp.tokens) == good.choices[0].text
    assert lp.token_logprobs[-1] > bad.choices[0].logprobs.token_logprobs[-1]
    assert good.usage.completion_tokens == 0


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "x", "temperature": 5}, 400, "temperature"),
        ({"prompt": "x", "n": 0}, 400, "n"),
        ({"prompt": "x", "n": 99}, 400, "n"),
        ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": [99999999]}, 400, "prompt"),
        ({"prompt": "x", "alignment": {"strategy": "nope"}}, 400, "alignment.strategy"),
        ({"model": "no-such-model", "prompt": "x"}, 404, "model"),
    ],
)
def test_bad_inputs_get_clear_4xx(server, body, status, param):
    body = {"model": MODEL, **body}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert err["message"]


def test_malformed_json_and_missing_fields(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_prompt_over_context_window(oai, server):
    with pytest.raises(openai.BadRequestError) as ei:
        oai.completions.create(model=MODEL, prompt="word " * 1500, max_tokens=10)
    assert "context length" in str(ei.value)
    # the 400 names the field that holds the prompt: `prompt` here, `messages` in chat
    for path, body, param in (
            ("/v1/completions", {"prompt": "word " * 1500}, "prompt"),
            ("/v1/chat/completions",
             {"messages": [{"role": "user", "content": "word " * 1500}]}, "messages")):
        r = httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 10, **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["param"], err["code"]) == (param, "context_length_exceeded"), err
        # without max_tokens the message is about the prompt, not an invented "max_tokens is 0"
        r = httpx.post(server.url + path, json={"model": MODEL, **body})
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded", err
        assert "leaves no room for output" in err["message"] and "max_tokens" not in err["message"]


def test_unknown_fields_are_refused_and_no_op_fields_accepted(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": CHAT, "max_tokens": 3, "temperature": 0,
        "some_future_field": {"x": 1}, "parallel_tool_calls": False})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "some_future_field"
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": CHAT, "max_tokens": 3, "temperature": 0,
        "parallel_tool_calls": False, "user": "u"})
    assert r.status_code == 200, r.text


def test_eight_concurrent_requests_equal_sequential(oai):
    prompts = ["Tell me a joke.", "What is 2+2?", "Name three colors.", "Describe Paris.",
               "Give me advice on sleep.", "Write a poem about cats.", "What is Python?",
               "Why is the sky blue?"]

    def ask(p: str) -> str:
        r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                        max_tokens=16, temperature=0)
        return r.choices[0].message.content

    sequential = [ask(p) for p in prompts]
    with cf.ThreadPoolExecutor(8) as ex:
        concurrent = list(ex.map(ask, prompts))
    assert concurrent == sequential


def test_oversized_body_is_413(server):
    body = json.dumps({"model": MODEL, "prompt": "x" * 1_100_000}).encode()
    r = httpx.post(server.url + "/v1/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_chunked_body_is_held_to_the_same_limit(server):
    """A chunked body (no Content-Length) is refused with 413 as soon as it passes
    --max-body-bytes, not read and tokenized whole; a small chunked body is served."""
    def chunks(total: int):
        yield b'{"model": "%s", "prompt": "' % MODEL.encode()
        for _ in range(total // 100_000):
            yield b"x " * 50_000
        yield b'", "max_tokens": 2}'

    r = httpx.post(server.url + "/v1/completions", content=chunks(20_000_000),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text
    assert r.headers["connection"] == "close"
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "1000000" in err["message"]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    small = [body.encode()[i:i + 7] for i in range(0, len(body), 7)]
    r = httpx.post(server.url + "/v1/completions", content=iter(small),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_empty_body_and_non_finite_numbers_get_messages_that_say_so(server):
    """No body at all says the body is missing; JSON NaN / Infinity (which Python's json and
    some clients emit) is named as not finite, not as out of range."""
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.post(server.url + path, content=b"",
                       headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400, r.text
        assert "body is missing" in r.json()["error"]["message"], r.json()
    for value, shown in ((b"NaN", "nan"), (b"Infinity", "inf"), (b"-Infinity", "-inf")):
        r = httpx.post(server.url + "/v1/completions", timeout=30,
                       headers={"content-type": "application/json"},
                       content=b'{"model": "%s", "prompt": "Hi", "max_tokens": 1, '
                               b'"temperature": %s}' % (MODEL.encode(), value))
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "temperature", err
        assert f"must be a finite number, not {shown}" in err["message"], err
