"""Every accepted request field does what it says (on the real model, over HTTP with the
``openai`` client), and candidate-restricted strategies sample only what they scored."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import MODEL

REPEAT = " ".join(["red"] * 6)  # a prompt that invites greedy repetition
GREEDY = dict(model=MODEL, temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _complete(oai, prompt: str = REPEAT, **kw):
    args = {**GREEDY, **kw}
    extra = {k: args.pop(k) for k in ("repetition_penalty", "min_tokens", "stop_token_ids",
                                      "no_repeat_ngram_size", "alignment") if k in args}
    return oai.completions.create(prompt=prompt, logprobs=0, extra_body=extra or None, **args)


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty", "repetition_penalty"])
def test_penalty_changes_repetitive_greedy_output(oai, field):
    plain = _complete(oai).choices[0].text
    assert plain.count("red") >= 4, plain  # the precondition: greedy repeats
    neutral = 0.0 if field != "repetition_penalty" else 1.0
    assert _complete(oai, **{field: neutral}).choices[0].text == plain
    penalised = _complete(oai, **{field: 2.0}).choices[0].text
    assert penalised != plain
    assert penalised.count("red") < plain.count("red"), penalised


@pytest.mark.parametrize("alignment", [
    None, {"strategy": "vas", "top_k": 8, "values": "q", "weights": {"sentiment": 4}}])
def test_no_repeat_ngram_size_stops_greedy_loops(oai, tok, alignment):
    """Greedy on a repetitive prompt loops; with no_repeat_ngram_size 2 no token bigram of the
    answer occurs twice (plain and guided: the ban acts in the one sampler every strategy
    uses), and 0 changes nothing."""
    kw = {"max_tokens": 24} if alignment is None else {"max_tokens": 24, "alignment": alignment}
    plain = _complete(oai, **kw).choices[0].logprobs.tokens
    bigrams = list(zip(plain, plain[1:]))
    assert len(set(bigrams)) < len(bigrams), plain  # the precondition: it repeats
    assert _complete(oai, no_repeat_ngram_size=0, **kw).choices[0].logprobs.tokens == plain
    toks = _complete(oai, no_repeat_ngram_size=2, **kw).choices[0].logprobs.tokens
    assert len(toks) >= 8, toks  # may end early (EOS) once the loop is banned
    assert len(set(zip(toks, toks[1:]))) == len(toks) - 1, toks


def test_plus_100_bias_forces_its_token(oai, tok):
    for t in (1000, 1001):
        res = _complete(oai, logit_bias={str(t): 100})
        toks = res.choices[0].logprobs.tokens
        assert len(toks) == 12 and set(toks) == {tok.decode([t])}, toks
    assert _complete(oai, logit_bias={"1000": 100}).choices[0].text != \
        _complete(oai, logit_bias={"1001": 100}).choices[0].text


def test_minus_100_bias_forbids_a_token(oai, tok):
    prompt = "The capital of France is"
    plain = _complete(oai, prompt=prompt).choices[0].text
    ids = tok(prompt + plain, add_special_tokens=False).input_ids
    first = ids[len(tok(prompt, add_special_tokens=False).input_ids)]
    banned = _complete(oai, prompt=prompt, logit_bias={str(first): -100})
    toks = banned.choices[0].logprobs.tokens
    assert toks and tok.decode([first]) not in toks, (tok.decode([first]), toks)


def test_min_tokens_and_stop_token_ids(oai, tok):
    msgs = [{"role": "user", "content": "Say only the word yes."}]
    plain = oai.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=40)
    assert plain.choices[0].finish_reason == "stop"
    n = plain.usage.completion_tokens
    assert n < 30, n
    longer = oai.chat.completions.create(model=MODEL, messages=msgs, temperature=0,
                                         max_tokens=40, extra_body={"min_tokens": n + 5})
    assert longer.usage.completion_tokens >= n + 5
    ids = tok(plain.choices[0].message.content, add_special_tokens=False).input_ids
    assert len(ids) >= 2
    cut = oai.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=40,
                                      extra_body={"stop_token_ids": [ids[1]]})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == tok.decode(ids[:1])


@pytest.mark.parametrize("body,param", [
    ({"logit_bias": {"999999": 5}}, "logit_bias"),
    ({"logit_bias": {"10": 101}}, "logit_bias"),
    ({"logit_bias": {"ten": 1}}, "logit_bias"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
    ({"no_repeat_ngram_size": 65}, "no_repeat_ngram_size"),
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"stream_options": {"continuous_usage_stats": True}, "stream": True},
     "stream_options.continuous_usage_stats"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: true
    ({"logprobs": 2, "alignment": {"strategy": "best_of_n", "weights": {"sentiment": 1}}},
     "logprobs"),
])
def test_completion_fields_refused_with_400_naming_them(server, body, param):
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"audio": {"voice": "x"}}, "audio"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"stream_options": {"include_usage": False}, "stream": False}, "stream_options"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages.0.name"),
    ({"logprobs": True, "top_logprobs": 2,
      "alignment": {"strategy": "deal", "weights": {"sentiment": 1}}}, "top_logprobs"),
    ({"alignment": {"strategy": "args", "weights": {"sentiment": 1},
                    "transform": "log_sigmoid"}}, "alignment.transform"),
    ({"alignment": {"strategy": "vas", "weights": {"concise": 1},
                    "reward_options": {"concise": {"target_words": 5}}}},
     "alignment.reward_options"),
])
def test_chat_fields_refused_with_400_naming_them(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_fields_without_effect_are_accepted(oai):
    msgs = [{"role": "user", "content": "Name a color."}]
    plain = oai.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=6)
    same = oai.chat.completions.create(
        model=MODEL, messages=msgs + [], temperature=0, max_tokens=6, user="u1",
        metadata={"k": "v"}, store=False, service_tier="auto", parallel_tool_calls=False,
        response_format={"type": "text"}, tool_choice="none")
    assert same.choices[0].message.content == plain.choices[0].message.content
    # an assistant message echoed back from a response (null output fields) is fine
    prev = plain.choices[0].message.model_dump()
    r = oai.chat.completions.create(model=MODEL, messages=msgs + [prev, msgs[0]],
                                    temperature=0, max_tokens=4)
    assert r.choices[0].message.content


ONE_CANDIDATE = {
    "args": {"top_k": 1, "weights": {"sentiment": 2}},
    "vas": {"top_k": 1, "weights": {"sentiment": 3}},
    "cd": {"top_k": 1, "weights": {"sentiment": 3}},
    "transfer_qstar": {"top_k": 1, "rollout": 3, "weights": {"sentiment": 1}},
    "best_of_n": {"n": 1, "weights": {"sentiment": 1}},
    "cd_block": {"k": 1, "block": 5, "weights": {"sentiment": 1}},
    "deal": {"beams": 1, "top_k": 1, "lookahead": 0, "weights": {"sentiment": 1}},
}


@pytest.fixture(scope="module")
def greedy_answer(oai):
    msgs = [{"role": "user", "content": "Say hello in three words."}]
    res = oai.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=60)
    # EOS must fall inside the budget and mid-block (not on a multiple of cd_block's 5)
    assert res.choices[0].finish_reason == "stop"
    assert res.usage.completion_tokens % 5 != 0, res.usage.completion_tokens
    return msgs, res


@pytest.mark.parametrize("strategy", sorted(ONE_CANDIDATE))
def test_one_candidate_is_exactly_greedy(oai, greedy_answer, strategy):
    msgs, plain = greedy_answer
    res = oai.chat.completions.create(
        model=MODEL, messages=msgs, temperature=0, max_tokens=60,
        extra_body={"alignment": {"strategy": strategy, **ONE_CANDIDATE[strategy]}})
    assert res.choices[0].message.content == plain.choices[0].message.content
    assert res.usage.completion_tokens == plain.usage.completion_tokens
    assert res.choices[0].finish_reason == plain.choices[0].finish_reason


BIASED = {
    "sample": None,
    "args": {"top_k": 3, "weights": {"sentiment": 2}},
    "vas": {"top_k": 3, "weights": {"sentiment": 3}},
    "cd": {"top_k": 3, "weights": {"sentiment": 3}},
    "genarm": {"weights": {"sentiment": 1}},
    "transfer_qstar": {"top_k": 2, "rollout": 2, "weights": {"sentiment": 1}},
    "best_of_n": {"n": 2, "weights": {"sentiment": 1}},
    "cd_block": {"k": 2, "block": 2, "weights": {"sentiment": 1}},
    # DeAL ranks expansions by reward alone: the bias acts on which tokens are expanded
    "deal": {"beams": 2, "top_k": 1, "lookahead": 1, "weights": {"sentiment": 1}},
}


@pytest.mark.parametrize("strategy", sorted(BIASED))
def test_every_strategy_applies_logit_bias(oai, tok, strategy):
    extra = {"alignment": {"strategy": strategy, **BIASED[strategy]}} if BIASED[strategy] \
        else {}
    res = oai.completions.create(model=MODEL, prompt="Tell me about your day.", temperature=0,
                                 max_tokens=4, logit_bias={"1000": 100}, extra_body=extra or None)
    assert res.choices[0].text == tok.decode([1000] * 4)


def test_unknown_top_level_field_names_itself(oai):
    with pytest.raises(openai.BadRequestError) as ei:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                    max_tokens=2, extra_body={"some_future_field": 1})
    assert ei.value.body["param"] == "some_future_field"


@pytest.mark.parametrize("path,body,param,allowed", [
    ("/v1/completions", {"max_tokens": 1_000_000_000}, "max_tokens", "between 0 and 512"),
    ("/v1/chat/completions", {"max_tokens": 1_000_000_000}, "max_tokens", "between 1 and 512"),
    ("/v1/chat/completions", {"max_completion_tokens": 10**9}, "max_completion_tokens",
     "between 1 and 512"),
    ("/v1/chat/completions", {"n": 9}, "n", "between 1 and 8"),
    ("/v1/completions", {"n": 9}, "n", "between 1 and 8"),
    ("/v1/completions", {"logit_bias": {"999999": 5}}, "logit_bias", "[0, "),
    ("/v1/chat/completions", {"alignment": {"strategy": "vas", "top_k": 65,
                                            "weights": {"sentiment": 1}}},
     "alignment.top_k", "64"),
])
def test_range_errors_name_the_field_the_real_range_and_invalid_value(server, path, body, param,
                                                                       allowed):
    base = {"model": MODEL, "max_tokens": 4}
    base.update({"prompt": "Hi"} if path == "/v1/completions"
                else {"messages": [{"role": "user", "content": "hi"}]})
    r = httpx.post(server.url + path, json={**base, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, "invalid_value"), err
    assert allowed in err["message"], err
    if path == "/v1/chat/completions" and param.startswith("max_"):
        # the lower bound quoted is really refused, and really the lowest accepted
        below = httpx.post(server.url + path, json={**base, param: 0}, timeout=60)
        assert below.status_code == 400 and below.json()["error"]["param"] == param
        assert httpx.post(server.url + path, json={**base, param: 1}, timeout=60).is_success


@pytest.mark.parametrize("ctype,status", [
    ("text/plain", 415),
    ("application/x-www-form-urlencoded", 415),  # curl -d without -H
    ("application/json", 200),
    ("application/json; charset=utf-8", 200),
    ("application/vnd.api+json", 200),
    (None, 415),  # no content type: FastAPI reads no JSON (cross-site request forgery)
])
def test_body_must_be_declared_json(server, ctype, status):
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    headers = {} if ctype is None else {"content-type": ctype}
    r = httpx.post(server.url + "/v1/completions", content=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    if status == 415:
        err = r.json()["error"]
        assert err["code"] == "unsupported_media_type", err
        assert "application/json" in err["message"], err
        assert f"got '{ctype or 'none'}'" in err["message"], err
