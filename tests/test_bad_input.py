"""Bad input and abandoned requests (issue #18), on a real server with the real model.

* Text that is not valid Unicode (a lone UTF-16 surrogate, legal in JSON) anywhere in a body is a
  400 naming the field, and the next request on the same keep-alive connection succeeds; a real
  500 (a fault injected into an in-process server) keeps the connection usable too.
* Strict types: a string, boolean, null, list or fractional value where the published schema
  says number / integer / boolean is a 400 naming the field, for every such field of the request
  bodies, every strategy's ``alignment`` options, the weights and the reward options; an integer
  where a float is expected is fine (OpenAI accepts ``temperature: 1``).
* Abandoned requests leave the queue at once: with every slot busy, 70 clients that give up
  while waiting never fill the queue (no 429), and one more request then completes; a stream
  closed before its first event (or before its generator even started) is cancelled and counted.

The exhaustive sweeps cover every field and value class; two hypothesis fuzzers then put
surrogates and wrong types at random places in random valid bodies.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import json
import re
import socket
import threading
import time
import typing
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import MODEL, ROOT, ServerProc, wait_idle

HOLD_TOKENS = 2000  # the slot holder's length: far longer than any test below takes


@pytest.fixture(scope="module")
def small() -> Iterator[ServerProc]:
    """2 KV slots and 12 waiting places, so a single long stream makes everything else wait."""
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    srv = ServerProc(["--slots", "2", "--max-len", str(HOLD_TOKENS + 64), "--max-tokens",
                      str(HOLD_TOKENS), "--max-n", "2", "--max-waiting", "12"])
    yield srv
    srv.stop()


def _raw(body: dict) -> bytes:
    """JSON text as a client would send it: non-ASCII escaped, so a lone surrogate travels as the
    legal JSON escape ``\\ud800``."""
    return json.dumps(body, ensure_ascii=True).encode()


def _post(c: httpx.Client, path: str, body: dict, **kw: Any) -> httpx.Response:
    return c.post(path, content=_raw(body), headers={"content-type": "application/json"}, **kw)


def _local_port(r: httpx.Response) -> int:
    """The client-side port of the connection that carried ``r`` (same port = same connection)."""
    return r.extensions["network_stream"].get_extra_info("client_addr")[1]


def _next_on_same_connection(c: httpx.Client, r: httpx.Response) -> None:
    """The request right after ``r`` goes out on the same keep-alive connection and succeeds
    (right after: uvicorn itself closes a connection idle for 5 s)."""
    h = c.get("/health")
    assert h.status_code == 200, h.text
    assert _local_port(h) == _local_port(r), "the server dropped the keep-alive connection"



def _wait_health(url: str, within: float, **want: int) -> dict:
    t0 = time.monotonic()
    while True:
        h = httpx.get(url + "/health", timeout=10).json()
        if all(h[k] == v for k, v in want.items()):
            return h
        assert time.monotonic() - t0 < within, f"/health never showed {want} in {within} s: {h}"
        time.sleep(0.05)


def _metric(url: str, pattern: str) -> float:
    """The sum of the samples whose name and labels match ``pattern`` (a regex)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{pattern} ([0-9.e+-]+)$", text, re.M))


DISCONNECTS = "alignserve_client_disconnects_total"


# ---- valid templates ------------------------------------------------------------------------
# Each is answered with 200 as it stands (checked below), so a 400 for a mutated copy that names
# the mutated field is caused by the mutation. Reward options cover every text-taking reward;
# the judge's question is validated though its weight is 0 (the judge never runs; options for
# a reward absent from the weights would be refused).
ALIGN = {"strategy": "best_of_n", "n": 2, "transform": "identity",
         "weights": {"keywords": 1, "concise": 0.5, "regex": 0.25, "json": 0.1, "judge": 0},
         "reward_options": {"keywords": {"keywords": ["hi", "good day"]},
                            "concise": {"target_words": 5},
                            "regex": {"pattern": "h[a-z]", "flags": "i"},
                            "json": {"required_keys": ["a"]},
                            "judge": {"question": "Is it polite?"}}}
CHAT = {"model": MODEL, "max_tokens": 2, "seed": 1, "temperature": 1, "top_p": 0.9, "top_k": 8,
        "stop": ["\n\n", "END"], "user": "user-1", "logprobs": True, "top_logprobs": 2,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Say hi."}]}],
        "logit_bias": {"1000": -1}}
COMPLETION = {"model": MODEL, "prompt": ["Hello there", "Good morning"], "max_tokens": 2,
              "stop": "END", "seed": 2, "echo": True, "logprobs": 1, "ignore_eos": True}
TEMPLATES: dict[str, tuple[str, dict]] = {
    "chat": ("/v1/chat/completions", CHAT),
    "chat_aligned": ("/v1/chat/completions", {**CHAT, "logprobs": False, "top_logprobs": None,
                                              "alignment": ALIGN}),
    "completion": ("/v1/completions", COMPLETION),
    "completion_aligned": ("/v1/completions", {**COMPLETION, "prompt": "Hello there",
                                               "logprobs": 0, "alignment": ALIGN}),
}


def _paths(v: Any, path: tuple = ()) -> Iterator[tuple[tuple, str]]:
    """Every string in a JSON value: (path, "value") for string values, (path + (key,), "key")
    for dictionary keys (the path of the key's value)."""
    if isinstance(v, str):
        yield path, "value"
    elif isinstance(v, dict):
        for k, x in v.items():
            yield path + (k,), "key"
            yield from _paths(x, path + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, path + (i,))


def _get(v: Any, path: tuple) -> Any:
    for p in path:
        v = v[p]
    return v


def _with(body: dict, path: tuple, value: Any, kind: str = "value") -> dict:
    """A deep copy of ``body`` with the value (or, for ``kind="key"``, the key) at ``path``
    replaced by ``value``."""
    out = json.loads(json.dumps(body))
    parent = _get(out, path[:-1])
    if kind == "key":
        parent[value] = parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return out


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _expect_400(r: httpx.Response, param: str | None, prefix: bool = False) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error", err
    if prefix:  # unions report a member tag after the field name (``stop.str``)
        assert err["param"] == param or str(err["param"]).startswith(f"{param}."), err
    else:
        assert err["param"] == param, err
    return err


# ---- 1. text that is not Unicode ------------------------------------------------------------
def test_templates_are_valid(small):
    with httpx.Client(base_url=small.url, timeout=120) as c:
        for name, (path, body) in TEMPLATES.items():
            r = _post(c, path, {k: v for k, v in body.items() if v is not None})
            assert r.status_code == 200, (name, r.text)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_lone_surrogate_in_every_text_field_is_a_400_naming_it(small, template):
    """Every string of the template, value or key, in turn holds a lone surrogate: the 400
    names that field (for a key: the object holding it) and the connection stays usable."""
    path, body = TEMPLATES[template]
    body = {k: v for k, v in body.items() if v is not None}
    cases = list(_paths(body))
    assert len(cases) >= 10
    with httpx.Client(base_url=small.url, timeout=120) as c:
        for where, kind in cases:
            bad = "ok \ud800 text" if kind == "value" else "\udfff-key"
            r = _post(c, path, _with(body, where, bad, kind))
            want = _dotted(where if kind == "value" else where[:-1]) or None
            err = _expect_400(r, want)
            assert "not valid Unicode" in err["message"] and err["code"] == "invalid_value"
            _next_on_same_connection(c, r)
        # and a generation right after a 400 goes out on the same connection
        ok = _post(c, path, body)
        assert ok.status_code == 200, ok.text
        assert _local_port(ok) == _local_port(r)


@pytest.mark.parametrize("field,body", [
    ("prompt", {"model": MODEL, "prompt": "\ud800", "max_tokens": 1}),
    ("messages.0.content", {"model": MODEL, "max_tokens": 1,
                            "messages": [{"role": "user", "content": "hi \udbff there"}]}),
    ("stop.0", {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "stop": ["\ud800"]}),
    ("alignment.reward_options.keywords.keywords.0",
     {"model": MODEL, "prompt": "Hi", "max_tokens": 1,
      "alignment": {"strategy": "deal", "weights": {"keywords": 1},
                    "reward_options": {"keywords": {"keywords": ["\udc00"]}}}}),
    ("alignment.reward_options.regex.pattern",
     {"model": MODEL, "prompt": "Hi", "max_tokens": 1,
      "alignment": {"strategy": "best_of_n", "weights": {"regex": 1},
                    "reward_options": {"regex": {"pattern": "a\ud800"}}}}),
    ("alignment.reward_options.judge.question",
     {"model": MODEL, "prompt": "Hi", "max_tokens": 1,
      "alignment": {"strategy": "best_of_n", "weights": {"judge": 1},
                    "reward_options": {"judge": {"question": "Good?\ud800"}}}}),
])
def test_issue_examples_then_a_completion_on_the_same_connection(small, field, body):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    with httpx.Client(base_url=small.url, timeout=120) as c:
        r = _post(c, path, body)
        _expect_400(r, field)
        ok = _post(c, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] >= 1
        assert _local_port(ok) == _local_port(r)


def test_bytes_that_are_not_utf8_are_a_400_and_keep_the_connection(small):
    """Not JSON text at all (a raw 0xff byte inside a string): a 400, never a 500."""
    with httpx.Client(base_url=small.url, timeout=60) as c:
        r = c.post("/v1/completions", headers={"content-type": "application/json"},
                   content=b'{"model": "' + MODEL.encode() + b'", "prompt": "a\xff b"}')
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
        _next_on_same_connection(c, r)


# ---- a real 500 keeps the connection --------------------------------------------------------
@pytest.fixture(scope="module")
def inproc(model_dir):
    """The real app over a real engine in this process, so a fault can be injected into it."""
    import uvicorn

    from alignserve.engine.api import EngineClient
    from alignserve.engine.scheduler import Engine, EngineConfig
    from alignserve.server.app import create_app

    engine = Engine(EngineConfig(model_dir=model_dir, slots=2, max_len=256))
    client = EngineClient(engine, None)
    app = create_app(client, MODEL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "in-process server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", client, app
    server.should_exit = True
    thread.join(10)
    engine.shutdown()


def test_a_real_500_answers_in_openai_shape_and_keeps_the_connection(inproc):
    url, client, app = inproc
    real_encode = client.encode

    def encode(text: str) -> list[int]:
        if "BOOM" in text:
            raise RuntimeError("injected fault")
        return real_encode(text)

    client.encode = encode
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            bad = _post(c, "/v1/completions", {"model": MODEL, "prompt": "BOOM", "max_tokens": 1})
            assert bad.status_code == 500, bad.text
            err = bad.json()["error"]
            assert err["type"] == "server_error" and err["message"] == \
                "internal error: RuntimeError"
            ok = _post(c, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            assert ok.status_code == 200, ok.text
            assert _local_port(ok) == _local_port(bad)
    finally:
        client.__dict__.pop("encode", None)


def test_a_fault_inside_a_stream_ends_it_cleanly_and_keeps_the_connection(inproc):
    url, _, app = inproc
    metrics = app.state.metrics

    def broken(*_: Any) -> None:
        raise RuntimeError("injected fault")

    metrics.observe_result = broken  # runs inside the SSE generator, after the 200 went out
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}
            with c.stream("POST", "/v1/completions", content=_raw(body),
                          headers={"content-type": "application/json"}) as s:
                lines = [ln for ln in s.iter_lines() if ln]
                port = _local_port(s)
            assert s.status_code == 200
            assert lines[-1] == "data: [DONE]", lines
            assert json.loads(lines[-2][6:])["error"]["type"] == "server_error", lines
            del metrics.observe_result
            ok = _post(c, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            assert ok.status_code == 200, ok.text
            assert _local_port(ok) == port
    finally:
        metrics.__dict__.pop("observe_result", None)
    wait_idle(url, within=10)


# ---- streams that end before their generator runs: the ASGI app driven directly ----------------
def _drive(app: Any, path: str, body: dict, mode: str,
           check: Callable[[], None], settled: Callable[[], bool]) -> None:
    """Call the ASGI app once, as a server would, for a client that is gone at once.

    ``receive`` gives the body first. ``mode``: ``"gone"`` (ASGI 2.3, as uvicorn: then
    ``http.disconnect`` at once); ``"stuck"`` (2.3: the first body chunk never leaves, as when
    the client stopped reading and flow control holds the send, and the disconnect arrives
    once the response has started); ``"refused"`` (2.4, as servers that report a gone client
    by failing ``send``: the response start raises ``OSError``, so the body generator never
    starts). ``check`` runs right after the app returns; the loop then lives on until
    ``settled()`` (the engine's last event for the request needs a running loop to land in).
    """
    data = _raw(body)
    started = asyncio.Event()
    calls = 0

    async def receive() -> dict:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": data, "more_body": False}
        if mode == "stuck":
            await started.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            if mode == "refused":
                raise OSError("connection reset by peer")
            started.set()
        elif mode == "stuck" and message.get("body"):
            await asyncio.Event().wait()  # never set: cancelled when the disconnect arrives

    spec = "2.4" if mode == "refused" else "2.3"
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(data)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}

    async def main() -> None:
        await asyncio.wait_for(app(scope, receive, send), 60)
        check()
        t0 = time.monotonic()
        while not settled():
            assert time.monotonic() - t0 < 10, "the cancelled request never ended"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
    asyncio.run(main())


@pytest.mark.parametrize("path,mode", [
    ("/v1/completions", "gone"),          # gone before the first event
    ("/v1/chat/completions", "stuck"),    # gone while the first chunk (the role) was sent
    ("/v1/completions", "refused"),       # gone before the SSE generator ever started
])
def test_stream_gone_before_its_first_event_is_cancelled_and_counted(inproc, path, mode):
    """Closing the generator cannot cancel here (a never-started generator runs no
    ``finally``; one stuck at its first ``yield`` is closed only by the garbage collector): the
    response itself cancels the engine request, synchronously, and counts the disconnect."""
    url, client, app = inproc
    metrics = app.state.metrics
    real_start = client.start
    submitted: list = []

    def start(inp: Any) -> Any:
        out = real_start(inp)
        submitted.append(out[0])
        return out

    client.start = start
    try:
        body = {"model": MODEL, "max_tokens": 200, "ignore_eos": True, "stream": True}
        body.update({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path
                    else {"prompt": "Once upon a time"})
        before = metrics.disconnects

        def check() -> None:  # synchronously, as the response returns: no waiting on the GC
            assert len(submitted) == 1
            assert submitted[0].cancelled, "the engine request was left running for nobody"
            assert metrics.disconnects - before == 1

        _drive(app, path, body, mode, check, lambda: submitted[0].done)
        assert client.engine.running == 0 and client.engine.queue_depth == 0
    finally:
        client.__dict__.pop("start", None)


# ---- 2. strict types ------------------------------------------------------------------------
def _kind(annotation: Any) -> tuple[str | None, bool]:
    """('integer' | 'number' | 'boolean' | None, nullable) of a pydantic field annotation."""
    args = typing.get_args(annotation) or (annotation,)
    types = {a for a in args if a is not type(None)}
    kind = {frozenset({int}): "integer", frozenset({float}): "number",
            frozenset({bool}): "boolean"}.get(frozenset(types))
    return kind, type(None) in args


WRONG = {  # values of the wrong type for each kind (null added where the field is not nullable)
    "integer": ["1", "1e1", 1.5, 2.0, True, [1], {"v": 1}],
    "number": ["1", "1e1", "0.5", True, False, [0.5], {"v": 1}],
    "boolean": [1, 0, "true", "false", [True], {"v": True}],
}


def _scalar_fields(model: Any) -> list[tuple[str, str, bool]]:
    out = []
    for name, f in model.model_fields.items():
        kind, nullable = _kind(f.annotation)
        if kind is not None:
            out.append((name, kind, nullable))
    return out


def _type_cases() -> list[tuple[str, dict, str, Any, str, bool]]:
    """(path, body, expected param, wrong value, kind, nullable) for every scalar field the API
    takes: both request bodies, ``stream_options``, every strategy's options, the weights and
    the integer reward option."""
    from alignserve.decoders import STRATEGIES
    from alignserve.decoders.aligned import AlignedDecoder
    from alignserve.server.schemas import ChatCompletionRequest, CompletionRequest, StreamOptions

    base_chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                 "max_tokens": 1}
    base_cmpl = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    cases = []
    for path, model, base in (("/v1/chat/completions", ChatCompletionRequest, base_chat),
                              ("/v1/completions", CompletionRequest, base_cmpl)):
        for name, kind, nullable in _scalar_fields(model):
            for v in WRONG[kind] + ([] if nullable else [None]):
                cases.append((path, {**base, name: v}, name, v, kind, nullable))
        for name, kind, nullable in _scalar_fields(StreamOptions):
            for v in WRONG[kind] + ([] if nullable else [None]):
                cases.append((path, {**base, "stream": True, "stream_options": {name: v}},
                              f"stream_options.{name}", v, kind, nullable))
    for sname, cls in sorted(STRATEGIES.items()):
        if not issubclass(cls, AlignedDecoder):
            continue
        spec = {"strategy": sname, "weights": {"vader": 1}}
        for name, kind, nullable in _scalar_fields(cls.Options):
            for v in WRONG[kind] + ([] if nullable else [None]):
                cases.append(("/v1/completions", {**base_cmpl, "alignment": {**spec, name: v}},
                              f"alignment.{name}", v, kind, nullable))
        for v in WRONG["number"] + [None]:
            cases.append(("/v1/completions",
                          {**base_cmpl, "alignment": {**spec, "weights": {"vader": v}}},
                          "alignment.weights.vader", v, "number", False))
    for v in WRONG["integer"] + [None]:
        cases.append(("/v1/completions", {**base_cmpl, "alignment": {
            "strategy": "best_of_n", "weights": {"concise": 1},
            "reward_options": {"concise": {"target_words": v}}}},
            "alignment.reward_options.concise.target_words", v, "integer", False))
    return cases


def test_wrong_types_in_every_numeric_and_boolean_field_are_400s_naming_it(small):
    cases = _type_cases()
    # every strategy's options and all the request bodies' scalars are in the sweep
    assert sum(p.startswith("alignment.") for _, _, p, *_ in cases) > 100, len(cases)
    assert {"temperature", "n", "seed", "logprobs", "echo", "stream",
            "stream_options.include_usage", "alignment.top_k", "alignment.batched"} <= \
        {p for _, _, p, *_ in cases}
    failures = []
    with httpx.Client(base_url=small.url, timeout=60) as c:
        for path, body, param, v, *_ in cases:
            r = _post(c, path, body)
            err = r.json().get("error") or {}
            ok = r.status_code == 400 and (err.get("param") == param
                                           or str(err.get("param")).startswith(param + "."))
            if not ok:
                failures.append((path, param, v, r.status_code, r.text[:200]))
    assert not failures, f"{len(failures)} of {len(cases)} wrong-type cases: {failures[:10]}"


def test_numbers_stay_numbers_integers_for_floats_are_fine(small):
    """The strict types refuse only wrong types: JSON integers where floats are expected
    (OpenAI accepts ``temperature: 1``), floats and integers as weights, still work."""
    with httpx.Client(base_url=small.url, timeout=120) as c:
        r = _post(c, "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "temperature": 1, "top_p": 1, "seed": 3, "n": 1, "logprobs": False,
            "stream_options": None})
        assert r.status_code == 200, r.text
        r = _post(c, "/v1/completions", {
            "model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0.7,
            "alignment": {"strategy": "best_of_n", "n": 2,
                          "weights": {"vader": 1, "concise": 0.5},
                          "reward_options": {"concise": {"target_words": 12}}}})
        assert r.status_code == 200, r.text
        assert r.json()["alignment"]["weights"] == {"vader": 1.0, "concise": 0.5}


# ---- the fuzzers ----------------------------------------------------------------------------
def test_fuzz_surrogates_and_wrong_types_anywhere(small):
    """Hypothesis puts a lone surrogate into a random string (value or key) of a random valid
    body, or a wrong-typed value into a random scalar field: always a 400 naming the place,
    never a 5xx, and the next request goes out on the same keep-alive connection."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    type_cases = _type_cases()
    strings = [(t, where, kind) for t, (_, body) in sorted(TEMPLATES.items())
               for where, kind in _paths({k: v for k, v in body.items() if v is not None})]
    c = httpx.Client(base_url=small.url, timeout=60)

    @st.composite
    def surrogate_text(draw: Any) -> str:
        s = draw(st.text(max_size=12))
        i = draw(st.integers(0, len(s)))
        return s[:i] + chr(draw(st.integers(0xD800, 0xDFFF))) + s[i:]

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=st.sampled_from(strings), text=surrogate_text())
    def surrogate(case: tuple, text: str) -> None:
        template, where, kind = case
        path, body = TEMPLATES[template]
        body = {k: v for k, v in body.items() if v is not None}
        r = _post(c, path, _with(body, where, text, kind))
        _expect_400(r, _dotted(where if kind == "value" else where[:-1]) or None)
        _next_on_same_connection(c, r)

    def wrong_for(kind: str, nullable: bool) -> st.SearchStrategy:
        """Values of every JSON type but the field's own (and integral floats for integers)."""
        options = [st.text(max_size=6), st.lists(st.integers(), max_size=2),
                   st.dictionaries(st.text(max_size=3), st.integers(), max_size=1)]
        if not nullable:
            options.append(st.none())
        if kind != "boolean":
            options.append(st.booleans())
        else:
            options += [st.integers(), st.floats(allow_nan=False)]
        if kind == "integer":
            options.append(st.floats(allow_nan=False, allow_infinity=False)
                           .filter(lambda f: abs(f) < 1e15))
        return st.one_of(options)

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data(), case=st.sampled_from(type_cases))
    def wrong_type(data: Any, case: tuple) -> None:
        path, body, param, _, kind, nullable = case
        body = json.loads(json.dumps(body))
        keys = param.split(".")
        holder = body
        for k in keys[:-1]:
            holder = holder[k]
        holder[keys[-1]] = data.draw(wrong_for(kind, nullable))
        r = _post(c, path, body)
        _expect_400(r, param, prefix=True)
        _next_on_same_connection(c, r)

    try:
        surrogate()
        wrong_type()
    finally:
        c.close()
    wait_idle(small.url, within=30)


# ---- 3. abandoned requests ------------------------------------------------------------------
@contextlib.contextmanager
def _slot_holder(url: str) -> Iterator[None]:
    """A stream using both of the server's slots for far longer than the test takes."""
    body = {"model": MODEL, "n": 2, "max_tokens": HOLD_TOKENS, "ignore_eos": True,
            "stream": True, "messages": [{"role": "user", "content": "Tell me a long story."}]}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            _wait_health(url, 30, running=1)
            yield
    wait_idle(url, within=15)


def _abandon(url: str, i: int) -> str:
    """Send a request and give up after one second, as a client with a short timeout does;
    even requests stream, odd ones wait for a plain answer."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Question {i}?"}],
            "max_tokens": 4}
    try:
        if i % 2 == 0:
            with httpx.stream("POST", url + "/v1/chat/completions",
                              json={**body, "stream": True}, timeout=1.0) as r:
                if r.status_code != 200:
                    return f"status {r.status_code}"
                for _ in r.iter_lines():
                    pass
                return "finished"
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=1.0)
        return f"status {r.status_code}"
    except httpx.TimeoutException:
        return "abandoned"


def _live(url: str, prompt: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=300, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 3, "ignore_eos": True})


def test_abandoned_requests_leave_the_queue_at_once(small):
    """Both slots held and a live request waiting at the head of the queue (12 places): 7 waves
    of 10 clients queue behind it and give up. Each wave leaves the queue at once, although the
    head cannot move, so none of the 70 gets 429 and each counts as one disconnect; one more
    request then queues (no 429), and both live requests complete once the slots free."""
    url = small.url
    before = _metric(url, DISCONNECTS)
    live = cf.ThreadPoolExecutor(2)
    with _slot_holder(url):
        head = live.submit(_live, url, "First in line:")
        _wait_health(url, 10, waiting=1, running=1)
        with cf.ThreadPoolExecutor(10) as pool:
            for wave in range(7):
                got = list(pool.map(lambda i: _abandon(url, i), range(wave * 10, wave * 10 + 10)))
                assert got == ["abandoned"] * 10, (wave, got)
                # the server notices each hang-up (non-streamed: within its 0.5 s poll) and
                # only the live head is left waiting
                _wait_health(url, 5, waiting=1, running=1)
        t0 = time.monotonic()
        while _metric(url, DISCONNECTS) - before < 70 and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        assert _metric(url, DISCONNECTS) - before == 70
        last = live.submit(_live, url, "One more:")
        _wait_health(url, 10, waiting=2, running=1)  # queued behind the head, not refused
        assert not head.done() and not last.done()
    for fut in (head, last):  # the holder left (a disconnect too): both ran
        r = fut.result()
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
    live.shutdown()


def _raw_stream(port: int, path: str, body: dict) -> socket.socket:
    data = _raw(body)
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": HOLD_TOKENS,
        "ignore_eos": True, "stream": True}


def test_stream_closed_while_waiting_before_its_first_event_leaves_the_queue(small):
    url = small.url
    with cf.ThreadPoolExecutor(1) as live:
        with _slot_holder(url):
            head = live.submit(_live, url, "First in line:")
            _wait_health(url, 10, waiting=1)
            before = _metric(url, DISCONNECTS)
            s = _raw_stream(small.port, "/v1/completions", LONG)
            _wait_health(url, 10, waiting=2)
            s.close()  # no event was ever produced for it, and the head cannot move
            _wait_health(url, 3, waiting=1, running=1)
            assert _metric(url, DISCONNECTS) - before == 1
        assert head.result().status_code == 200


def test_stream_closed_before_the_response_starts_is_cancelled_and_counted(small):
    """The client hangs up right after sending: the handler still submits the request, and the
    SSE generator may never start. The request must be cancelled and counted all the same."""
    url = small.url
    wait_idle(url, within=15)
    started = r'alignserve_requests_total\{code="\d+",endpoint="/v1/completions",[^}]*\}'
    before, runs = _metric(url, DISCONNECTS), _metric(url, started)
    for _ in range(3):
        s = _raw_stream(small.port, "/v1/completions", LONG)
        s.close()
    t0 = time.monotonic()
    while _metric(url, started) - runs < 3 and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert _metric(url, started) - runs == 3  # all three reached the engine
    wait_idle(url, within=10)  # each would otherwise generate HOLD_TOKENS tokens
    assert _metric(url, DISCONNECTS) - before == 3


def test_stream_closed_right_after_the_headers_frees_its_slot(small):
    url = small.url
    before = _metric(url, DISCONNECTS)
    s = _raw_stream(small.port, "/v1/completions", LONG)
    assert s.recv(12).startswith(b"HTTP/1.1 200")
    _wait_health(url, 10, running=1)
    s.close()
    wait_idle(url, within=10)
    assert _metric(url, DISCONNECTS) - before == 1


def test_newcomer_findings_name_the_field_and_the_value(small):
    """What a newcomer's try-out found: a union's member tag is not part of ``param``; a user
    turn with null content, and an alignment strategy that contradicts the model alias, are
    400s naming the field; an out-of-range weight is quoted as sent, not rounded into the
    range; every 400 carries a code."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with httpx.Client(base_url=small.url, timeout=120) as c:
        err = _expect_400(_post(c, "/v1/chat/completions", {**chat, "stop": 5}), "stop")
        assert err["code"] == "invalid_value"
        err = _expect_400(_post(c, "/v1/chat/completions", {
            **chat, "messages": [{"role": "user", "content": None}]}), "messages.0")
        assert "content is required for a 'user' message" in err["message"]
        err = _expect_400(_post(c, "/v1/chat/completions", {
            **chat, "model": f"{MODEL}:genarm", "alignment": {"strategy": "vas"}}),
            "alignment.strategy")
        assert "conflicts with the model alias" in err["message"]
        err = _expect_400(_post(c, "/v1/chat/completions", {
            **chat, "alignment": {"strategy": "genarm",
                                  "weights": {"sentiment_lex_arm": 0.5000001}}}),
            "alignment.weights.sentiment_lex_arm")
        assert "must be in [0, 0.5], got 0.5000001" in err["message"]
        r = _post(c, "/v1/chat/completions", {
            **chat, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value", r.text
        # an assistant turn may still have null content (OpenAI's tool-call turns)
        ok = _post(c, "/v1/chat/completions", {**chat, "messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
            {"role": "user", "content": "Again"}]})
        assert ok.status_code == 200, ok.text
