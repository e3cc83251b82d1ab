"""Hardening: API keys, server-level caps, a full queue, timeouts, disconnects, /metrics, fuzzing.

Two servers of their own on loopback, each started with the flags its tests need: ``guarded``
(API keys, a small batch and queue, a candidate cap) and ``fuzzed`` (tiny outputs and a 2 s
request timeout, so thousands of random inputs finish quickly and a slow one ends in 408).
"""

from __future__ import annotations

import gc
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, ROOT, ServerProc, wait_idle

KEY, FILE_KEY = "k-one", "k-from-file"
CHAT = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]
LONG_STREAM = {"model": MODEL, "messages": CHAT, "max_tokens": 600, "ignore_eos": True,
               "stream": True}


def _start(extra: list[str]) -> ServerProc:
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    return ServerProc(extra)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# one key per line\n\n{FILE_KEY}\n")
    srv = _start(["--slots", "4", "--max-len", "1024", "--max-tokens", "600", "--max-n", "4",
                  "--max-waiting", "1", "--max-candidates", "4", "--api-key", KEY,
                  "--api-keys-file", str(keys)])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[ServerProc]:
    srv = _start(["--slots", "24", "--max-len", "256", "--max-tokens", "8", "--max-n", "2",
                  "--max-waiting", "8", "--request-timeout", "2", "--body-timeout", "1"])
    yield srv
    srv.stop()


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _wait_health(url: str, ok: Callable[[dict], bool], within: float) -> dict:
    """Poll /health until ``ok(health)``; returns that health, fails after ``within`` s."""
    t0 = time.monotonic()
    while True:
        h = httpx.get(url + "/health", timeout=5).json()
        if ok(h):
            return h
        assert time.monotonic() - t0 < within, f"/health never reached the state: {h}"
        time.sleep(0.02)



# ---- API keys -------------------------------------------------------------------------------
@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/models"), ("GET", "/v1/heads"), ("GET", "/metrics"), ("GET", "/openapi.json"),
    ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/nope"),
])
def test_every_endpoint_needs_a_key(guarded, method, path):
    body = {"model": MODEL, "prompt": "x", "messages": CHAT, "max_tokens": 1}
    for headers in ({}, _auth("wrong"), {"Authorization": KEY}, {"Authorization": "Basic x"}):
        r = httpx.request(method, guarded.url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
        assert r.headers["www-authenticate"] == "Bearer"


def test_keys_from_flag_and_file_work_and_health_and_page_are_open(guarded):
    for key in (KEY, FILE_KEY):
        r = httpx.get(guarded.url + "/v1/models", headers=_auth(key), timeout=30)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL
    assert httpx.get(guarded.url + "/health").status_code == 200
    page = httpx.get(guarded.url + "/")
    assert page.status_code == 200 and 'id="apikey"' in page.text  # the page asks for the key
    assert httpx.get(guarded.url + "/static/app.js").status_code == 200


def test_keys_file_without_keys_refuses_to_start(tmp_path: Path):
    from alignserve.cli import build_parser
    from alignserve.server.main import api_keys

    empty = tmp_path / "keys.txt"
    empty.write_text("# nothing here\n\n")
    args = build_parser().parse_args(["serve", "--api-keys-file", str(empty)])
    with pytest.raises(ValueError, match="no keys"):
        api_keys(args)
    args = build_parser().parse_args(["serve", "--api-key", "a", "--api-key", "b"])
    assert api_keys(args) == ["a", "b"]


def test_serve_refuses_limits_out_of_range_before_loading_the_model(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """A limit flag out of range is an error naming the flag and its range, not a server that
    answers every request with 413 (--max-body-bytes 0) or 408 (--body-timeout 0)."""
    import alignserve.cli as cli

    def no_model(*a: object) -> None:
        raise AssertionError("the model was loaded for a command that should have failed")

    monkeypatch.setattr(cli, "resolve_model", no_model)
    assert cli.main(["serve", "--max-body-bytes", "0", "--body-timeout", "0",
                     "--request-timeout", "-1", "--sse-heartbeat", "nan", "--slots", "0",
                     "--max-candidates", "0"]) == 2
    err = capsys.readouterr().err
    for msg in ("--max-body-bytes must be >= 1", "--body-timeout must be > 0",
                "--request-timeout must be > 0", "--sse-heartbeat must be >= 0",
                "--slots must be >= 1", "--max-candidates must be >= 1"):
        assert msg in err, err
    from alignserve.cli import build_parser, serve_flag_errors

    defaults = build_parser().parse_args(["serve"])
    assert serve_flag_errors(defaults) == []  # the defaults, unset optional flags included
    edge = build_parser().parse_args(["serve", "--max-waiting", "0", "--sse-heartbeat", "0",
                                      "--body-timeout", "0.5", "--max-body-bytes", "1"])
    assert serve_flag_errors(edge) == []


# ---- limits ---------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,field", [
    ("best_of_n", "n"), ("cd_block", "k"), ("cd_block", "block"), ("args", "top_k"),
    ("deal", "beams"), ("deal", "lookahead"), ("transfer_qstar", "rollout"),
])
def test_candidate_cap_names_the_field(guarded, strategy, field):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2,
            "alignment": {"strategy": strategy, "weights": {"vader": 1}, field: 5}}
    r = httpx.post(guarded.url + "/v1/completions", json=body, headers=_auth(), timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == f"alignment.{field}" and "at most 4" in err["message"]


def test_at_the_cap_runs_and_counts_discarded_tokens(guarded):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "ignore_eos": True, "seed": 1,
            "alignment": {"strategy": "best_of_n", "n": 4, "weights": {"vader": 1}}}
    r = httpx.post(guarded.url + "/v1/completions", json=body, headers=_auth(), timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["alignment"]["tokens_generated"] == 12


def test_full_queue_answers_429_with_retry_after(guarded):
    """4 slots, 1 waiting place: a stream holding every slot, one waiting, the next is 429.

    A stream's 200 and its first line (the role chunk) go out when it is queued, before the
    engine admits it, so the test waits on /health for each state it needs: A running (else B
    would find A still in the waiting place and be the 429), then B waiting. A's line iterator
    is kept: dropping it (``next(a.iter_lines())``) closes the response, which hangs up the
    connection, and the server rightly cancels A; the test used to race that cancel."""
    url, hdr = guarded.url, _auth()
    with httpx.Client(timeout=60, headers=hdr) as c:
        with c.stream("POST", url + "/v1/chat/completions", json={**LONG_STREAM, "n": 4}) as a:
            assert a.status_code == 200
            lines = a.iter_lines()
            next(lines)
            gc.collect()  # nothing the test still holds may end A
            _wait_health(url, lambda h: h["running"] == 1 and h["waiting"] == 0, within=30)
            with c.stream("POST", url + "/v1/chat/completions", json=LONG_STREAM) as b:
                assert b.status_code == 200
                seen = _wait_health(url, lambda h: h["waiting"] == 1, within=30)
                r = c.post(url + "/v1/chat/completions",
                           json={"model": MODEL, "messages": CHAT, "max_tokens": 2})
            del lines
    wait_idle(url, within=10)  # both streams left early: their slots and queue place free
    assert r.status_code == 429, (r.text, "health before C:", seen)
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"


def test_disconnect_mid_stream_frees_the_slot_at_once(guarded):
    url = guarded.url
    with httpx.Client(timeout=60, headers=_auth()) as c:
        with c.stream("POST", url + "/v1/chat/completions", json=LONG_STREAM) as r:
            lines = r.iter_lines()
            got = [ln for ln in (next(lines) for _ in range(6)) if ln.startswith("data: ")]
            assert len(got) >= 3
            assert httpx.get(url + "/health").json()["running"] == 1
    wait_idle(url, within=5)  # one engine step (~0.1 s idle; seconds on a loaded 2-core box)
    text = httpx.get(url + "/metrics", headers=_auth()).text
    assert re.search(r"^alignserve_client_disconnects_total [1-9]", text, re.M), text


def test_disconnect_while_waiting_for_a_non_streamed_answer_frees_the_slot(guarded):
    url = guarded.url
    body = {k: v for k, v in LONG_STREAM.items() if k not in ("stream", "stream_options")}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, headers=_auth(), timeout=3)
    wait_idle(url, within=5)  # the server noticed the hang-up and cancelled the request


def _counter(url: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def test_tiny_timeout_is_a_clean_408_or_error_chunk(fuzzed):
    """A request past --request-timeout ends in a 408 (or, streamed, an error chunk), and the
    tokens its rollouts generated before it are on /metrics (as discarded, none returned)."""
    slow = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True,
            "alignment": {"strategy": "transfer_qstar", "top_k": 16, "rollout": 128,
                          "weights": {"vader": 1}}}
    lab = '{strategy="transfer_qstar"}'
    before = {k: _counter(fuzzed.url, f"alignserve_tokens_{k}_total{lab}")
              for k in ("generated", "returned")}
    r = httpx.post(fuzzed.url + "/v1/completions", json=slow, timeout=60)
    assert r.status_code == 408, r.text
    assert r.json()["error"]["code"] == "timeout"
    wait_idle(fuzzed.url, within=10)
    assert _counter(fuzzed.url, f"alignserve_tokens_returned_total{lab}") == before["returned"]
    with httpx.stream("POST", fuzzed.url + "/v1/completions", json={**slow, "stream": True},
                      timeout=60) as s:
        lines = [ln for ln in s.iter_lines() if ln]
    assert s.status_code == 200 and lines[-1] == "data: [DONE]"
    assert '"code": "timeout"' in lines[-2]
    wait_idle(fuzzed.url, within=10)
    # 2 x 2 s of rollouts: their tokens are counted though neither request got an answer
    assert _counter(fuzzed.url, f"alignserve_tokens_generated_total{lab}") > before["generated"]


# ---- /metrics -------------------------------------------------------------------------------
SAMPLE_LINE = re.compile(r'^[a-z_]+(\{([a-z_]+="[^"]*",?)+\})? -?[0-9.e+-]+$')


def test_stalled_body_is_a_408_and_the_server_goes_on(fuzzed):
    """A client that declares a body and stops sending it gets 408 after --body-timeout
    (1 s here) instead of holding the connection; the server keeps answering."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(fuzzed.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     b'{"model":')
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(4096)  # the socket timeout (30 s) fails a server that never answers
            if not data:
                break
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert b"connection: close" in head.lower(), head  # the unread rest cannot hold it open
    err = json.loads(body)["error"]
    assert err["code"] == "timeout" and "within 1 s" in err["message"], err
    assert "9 bytes received" in err["message"]
    r = httpx.post(fuzzed.url + "/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_metrics_prometheus_text(guarded):
    r = httpx.get(guarded.url + "/metrics", headers=_auth())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for line in r.text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ \S", line), line
            continue
        assert SAMPLE_LINE.match(line), line
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    req = 'alignserve_requests_total{code="%s",endpoint="%s",strategy="%s"}'
    assert samples[req % (401, "/v1/models", "-")] >= 1
    assert samples[req % (429, "/v1/chat/completions", "sample")] >= 1
    assert samples[req % (200, "/v1/completions", "best_of_n")] >= 1
    assert samples[req % (400, "/v1/completions", "cd_block")] >= 2
    assert samples['alignserve_tokens_generated_total{strategy="best_of_n"}'] >= 12
    assert samples['alignserve_tokens_discarded_total{strategy="best_of_n"}'] >= 9
    assert samples['alignserve_guidance_forwards_total{strategy="best_of_n"}'] >= 1
    for gauge in ("alignserve_queue_depth", "alignserve_running_requests",
                  "alignserve_step_latency_seconds"):
        assert gauge in samples
    assert samples["alignserve_step_latency_seconds"] > 0


# ---- fuzzing --------------------------------------------------------------------------------
def _towards_valid(body: dict) -> None:
    """Nudge a random body past the cheap rejections (unknown model, n or max_tokens over the
    server's caps, best_of, a random alignment dict) so the fuzzer reaches generation too."""
    body["model"] = MODEL
    for field, cap in (("max_tokens", 8), ("max_completion_tokens", 8), ("n", 2)):
        v = body.get(field)
        if isinstance(v, int) and not isinstance(v, bool) and v > cap:
            body[field] = cap
    for field in ("best_of", "top_logprobs", "stop", "suffix"):
        body.pop(field, None)
    if body.get("stream") is not True:  # stream_options need a stream
        body.pop("stream_options", None)
    for m in body.get("messages") or []:
        if isinstance(m, dict) and not isinstance(m.get("content"), str | None):
            m["content"] = "hi"
    if isinstance(body.get("alignment"), dict) and "strategy" not in body["alignment"]:
        body.pop("alignment")


def test_schemathesis_no_500(fuzzed):
    """Schema-driven random requests (valid and invalid) to every operation: never a 5xx and
    never a hang. Half the bodies are nudged towards validity (``_towards_valid``) so the
    generation path sees them, not only the 404 for an unknown model. Derandomized: the same
    examples on every run (hypothesis seeds from the test's name), so the verdict is stable."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    url = fuzzed.url
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    ops = [res.ok() for res in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/health"}
    seen: dict[tuple[str, int], int] = {}
    session = __import__("requests").Session()
    for op in ops:
        post = op.method.upper() == "POST"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            examples = (30 if mode is GenerationMode.POSITIVE else 15) if post else 5

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode), real=st.booleans())
            def check(case, real: bool) -> None:
                if real and isinstance(case.body, dict):
                    _towards_valid(case.body)
                resp = case.call(base_url=url, session=session, timeout=30)
                key = (case.path, resp.status_code)
                seen[key] = seen.get(key, 0) + 1
                assert resp.status_code < 500, (case.method, case.path, case.body, resp.text)

            try:
                check()
            except Unsatisfiable:
                # an operation with no parameters and no body has no invalid input to send
                assert mode is GenerationMode.NEGATIVE and not post, op.path
    print(sorted(seen.items()))
    posts = ("/v1/completions", "/v1/chat/completions")
    assert any((p, 200) in seen for p in posts), seen  # generation ran, not only rejections
    assert all((p, 400) in seen for p in posts), seen
    wait_idle(url, within=5)


def test_launcher_never_takes_another_server_for_its_own(guarded, monkeypatch):
    """free_port is racy between processes: when the port it picked is already served by
    another alignserve, the new server fails to bind and ServerProcess says so instead of
    answering with the other server's /health."""
    from alignserve.server import launch

    monkeypatch.setattr(launch, "free_port", lambda host="127.0.0.1": guarded.port)
    with pytest.raises(RuntimeError, match="exited|did not answer"):
        launch.ServerProcess(["--slots", "2", "--max-len", "128"], timeout=120)
    assert httpx.get(guarded.url + "/health", headers=_auth()).status_code == 200


def test_ray_ingress_holds_bodies_to_the_same_limits():
    """The Ray ingress reads bodies through the gate's reader (no Ray needed here): a declared
    or chunked body over the limit is 413, one that stalls is 408, each closing the connection."""
    import asyncio

    from alignserve.server.state import ServerLimits
    from alignserve.serving_ray.ingress import Ingress

    ingress = Ingress([], ServerLimits(max_body_bytes=10, body_timeout_s=0.2))

    async def forward(headers: list, messages: list) -> tuple[int, bytes | None, dict]:
        sent: list[dict] = []
        pending = iter(messages)

        async def receive() -> dict:
            for m in pending:
                return m
            await asyncio.sleep(30)  # a client that stops sending
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions",
                 "headers": headers}
        await asyncio.wait_for(ingress.forward(scope, receive, send), 10)
        return (sent[0]["status"], dict(sent[0]["headers"]).get(b"connection"),
                json.loads(sent[1]["body"])["error"])

    chunk = {"type": "http.request", "body": b"x" * 8, "more_body": True}
    declared = asyncio.run(forward([(b"content-length", b"50")], []))
    chunked = asyncio.run(forward([], [chunk, chunk]))
    stalled = asyncio.run(forward([(b"content-length", b"9")], [chunk]))
    assert declared[:2] == (413, b"close") and "of 50 bytes" in declared[2]["message"]
    assert chunked[:2] == (413, b"close") and chunked[2]["code"] == "request_too_large"
    assert stalled[:2] == (408, b"close") and "8 bytes received" in stalled[2]["message"]
