"""Latency histograms on /metrics, SSE keep-alive heartbeats, and the engine's import direction.

One server of its own (fresh counters, so counts are exact) with ``--sse-heartbeat 0.05``: a
Best-of-N stream on it is silent for far longer than 50 ms while its candidates are generated
and scored, so heartbeats must appear there.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from conftest import MODEL, ROOT, ServerProc, wait_idle

from alignserve.server.sse import HEARTBEAT, with_heartbeat

BON = {"strategy": "best_of_n", "n": 4, "weights": {"vader": 1.0}}


@pytest.fixture(scope="module")
def beating() -> Iterator[ServerProc]:
    srv = ServerProc(["--slots", "8", "--max-len", "512", "--max-tokens", "64",
                      "--sse-heartbeat", "0.05"])
    yield srv
    srv.stop()


def _samples(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _buckets(s: dict[str, float], metric: str, labels: str) -> list[tuple[float, float]]:
    """``(upper bound, cumulative count)`` of one histogram series, in bucket order."""
    rows = []
    for name, v in s.items():
        m = re.fullmatch(rf'{metric}_bucket\{{(.*)\}}', name)
        if m is None:
            continue
        le = re.search(r'le="([^"]+)"', m.group(1))
        rest = re.sub(r',?le="[^"]+"', "", m.group(1)).strip(",")
        if rest == labels and le is not None:
            rows.append((float(le.group(1)), v))
    return sorted(rows)


def _check_histogram(s: dict[str, float], metric: str, labels: str, count: float) -> None:
    rows = _buckets(s, metric, labels)
    assert rows and rows[-1][0] == float("inf"), (metric, labels, rows)
    cum = [v for _, v in rows]
    assert cum == sorted(cum), (metric, rows)  # cumulative buckets never decrease
    assert rows[-1][1] == s[f"{metric}_count{{{labels}}}"] == count, (metric, rows)


def test_metrics_histograms_after_a_few_requests(beating):
    url = beating.url
    with httpx.Client(base_url=url, timeout=300) as c:
        for i in range(3):
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": f"Count {i}:",
                                                "max_tokens": 5, "ignore_eos": True, "seed": i})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 5
        r = c.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 6, "seed": 1, "alignment": BON})
        assert r.status_code == 200, r.text
        returned = r.json()["usage"]["completion_tokens"]
        generated = r.json()["alignment"]["tokens_generated"]
    s = _samples(url)
    cmp = 'endpoint="/v1/completions",strategy="sample"'
    chat = 'endpoint="/v1/chat/completions",strategy="best_of_n"'
    for metric in ("alignserve_time_to_first_token_seconds", "alignserve_request_latency_seconds",
                   "alignserve_queue_time_seconds", "alignserve_prompt_tokens",
                   "alignserve_generation_tokens"):
        _check_histogram(s, metric, cmp, 3)
        _check_histogram(s, metric, chat, 1)
    # 5 tokens each: every one of the 3 requests lands in the (4, 8] bucket
    gen = dict(_buckets(s, "alignserve_generation_tokens", cmp))
    assert gen[4.0] == 0 and gen[8.0] == 3
    assert s[f"alignserve_generation_tokens_sum{{{cmp}}}"] == 15
    # up to 4 gaps between 5 output deltas per request, at least one
    itl = s[f"alignserve_inter_token_latency_seconds_count{{{cmp}}}"]
    assert 3 <= itl <= 12
    _check_histogram(s, "alignserve_inter_token_latency_seconds", cmp, itl)
    # end to end is never shorter than the first token, nor the queue wait
    for lab in (cmp, chat):
        e2e = s[f"alignserve_request_latency_seconds_sum{{{lab}}}"]
        assert 0 < s[f"alignserve_time_to_first_token_seconds_sum{{{lab}}}"] <= e2e
        assert 0 <= s[f"alignserve_queue_time_seconds_sum{{{lab}}}"] <= e2e
    # guidance cost: plain sampling returns all it generates; Best-of-4 about four times that
    _check_histogram(s, "alignserve_guidance_cost_ratio", 'strategy="sample"', 3)
    assert s['alignserve_guidance_cost_ratio_sum{strategy="sample"}'] == 3.0
    _check_histogram(s, "alignserve_guidance_cost_ratio", 'strategy="best_of_n"', 1)
    assert s['alignserve_guidance_cost_ratio_sum{strategy="best_of_n"}'] == pytest.approx(
        generated / returned)
    assert generated / returned > 1
    # today's counters are still there, under their names
    req = 'alignserve_requests_total{code="200",endpoint="/v1/completions",strategy="sample"}'
    assert s[req] == 3
    assert s['alignserve_tokens_returned_total{strategy="sample"}'] == 15


def test_cancelled_stream_counts_what_it_generated(beating):
    """A streamed ARGS request whose client hangs up after 5 tokens: its tokens (at least the
    streamed ones) and its reward calls are on /metrics, though it never finished."""
    url = beating.url
    key = 'alignserve_tokens_generated_total{strategy="args"}'
    before = _samples(url)
    got = 0
    with httpx.Client(base_url=url, timeout=300) as c, c.stream(
            "POST", "/v1/completions", json={
                "model": MODEL, "prompt": "Once upon a time", "max_tokens": 60, "seed": 2,
                "ignore_eos": True, "stream": True,
                "alignment": {"strategy": "args", "top_k": 3, "weights": {"vader": 1}}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                got += 1
            if got == 5:
                break
    deadline = time.time() + 60
    while time.time() < deadline:
        s = _samples(url)
        if s.get(key, 0) > before.get(key, 0):
            break
        time.sleep(0.2)
    gen = s.get(key, 0) - before.get(key, 0)
    fwd = (s.get('alignserve_guidance_forwards_total{strategy="args"}', 0)
           - before.get('alignserve_guidance_forwards_total{strategy="args"}', 0))
    ret = (s.get('alignserve_tokens_returned_total{strategy="args"}', 0)
           - before.get('alignserve_tokens_returned_total{strategy="args"}', 0))
    assert 5 <= gen < 60 and 5 <= ret <= gen, (gen, ret)
    assert fwd >= 3 * 5, fwd  # one reward call per candidate per token, 3 candidates
    assert s["alignserve_client_disconnects_total"] >= 1


def test_best_of_n_stream_sends_keep_alive_comments(beating):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about rain."}],
            "max_tokens": 24, "seed": 3, "stream": True, "alignment": BON,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", beating.url + "/v1/chat/completions", json=body,
                      timeout=300) as r:
        raw = "".join(r.iter_text())
    assert r.status_code == 200
    events = [e for e in raw.split("\n\n") if e]
    beats = [e for e in events if e.startswith(":")]
    assert beats and all(e + "\n\n" == HEARTBEAT for e in beats), events[:5]
    data = [e for e in events if not e.startswith(":")]
    assert all(e.startswith("data: ") for e in data) and data[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in data[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks
                   if ch["choices"])
    assert text  # the answer arrives whole after the heartbeats
    first_content = next(i for i, e in enumerate(events)
                         if e.startswith("data: ") and '"content": "' in e
                         and '"content": ""' not in e)
    assert any(e.startswith(":") for e in events[:first_content])


def test_openai_client_ignores_the_heartbeats(beating):
    from openai import OpenAI

    oai = OpenAI(base_url=beating.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    stream = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=12,
        seed=5, stream=True, extra_body={"alignment": BON})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text


def test_with_heartbeat_beats_only_when_idle_and_closes_what_it_wraps():
    closed: list[str] = []

    async def slow() -> object:
        try:
            yield "data: a\n\n"
            await asyncio.sleep(0.25)
            yield "data: b\n\n"
            await asyncio.sleep(10)  # never reached: closed while waiting here
            yield "data: c\n\n"
        finally:
            closed.append("inner")

    async def main() -> list[str]:
        out = []
        agen = with_heartbeat(slow(), 0.04)
        async for chunk in agen:
            out.append(chunk)
            if out.count(HEARTBEAT) >= 2 and chunk == HEARTBEAT and "data: b\n\n" in out:
                break
        await agen.aclose()
        return out

    out = asyncio.run(main())
    assert out[0] == "data: a\n\n"
    i = out.index("data: b\n\n")
    assert 3 <= out[1:i].count(HEARTBEAT) <= 7  # ~0.25 s of silence at 0.04 s
    assert closed == ["inner"]

    async def passthrough() -> list[str]:
        async def fast():  # noqa: ANN202
            for x in ("data: 1\n\n", "data: 2\n\n"):
                yield x
        return [c async for c in with_heartbeat(fast(), 0.0)]

    assert asyncio.run(passthrough()) == ["data: 1\n\n", "data: 2\n\n"]


def test_engine_does_not_import_the_strategies():
    code = ("import sys, alignserve.engine.api, alignserve.engine.scheduler; "
            "print([m for m in sys.modules if m.startswith('alignserve.decoders')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def _hang_up_when(url: str, body: dict, ready: Callable[[dict[str, float]], bool]) -> None:
    """POST ``body`` to /v1/completions from a raw socket and close it (the client hangs up)
    as soon as ``ready(/metrics samples)``: a hang-up at a chosen point, not after a timeout
    that a fast machine might beat."""
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        deadline = time.time() + 120
        while not ready(_samples(url)):
            assert time.time() < deadline, "the request never reached the hang-up point"
            time.sleep(0.02)
    wait_idle(url, within=60)


def test_cancelled_non_streamed_request_counts_what_it_generated(beating):
    """A non-streamed ARGS request whose client hangs up mid-generation (after a few engine
    steps): the tokens generated up to the cancel and its reward calls are on /metrics, as
    generated and discarded tokens; none counts as returned, since no answer went out."""
    url = beating.url
    lab = '{strategy="args"}'
    before = _samples(url)
    steps0 = before["alignserve_engine_steps_total"]
    _hang_up_when(url, {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 64,
                        "seed": 2, "ignore_eos": True,
                        "alignment": {"strategy": "args", "top_k": 3, "weights": {"vader": 1}}},
                  lambda s: s["alignserve_engine_steps_total"] >= steps0 + 4)
    s = _samples(url)

    def delta(name: str) -> float:
        return s.get(f"{name}{lab}", 0) - before.get(f"{name}{lab}", 0)

    gen = delta("alignserve_tokens_generated_total")
    assert 1 <= gen < 64, gen
    assert delta("alignserve_tokens_returned_total") == 0
    assert delta("alignserve_tokens_discarded_total") == gen
    assert delta("alignserve_guidance_forwards_total") >= 3  # 3 candidates scored per token
    assert s["alignserve_client_disconnects_total"] > before.get(
        "alignserve_client_disconnects_total", 0)


def test_several_prompts_ended_early_count_the_finished_prompt(beating):
    """Two prompts in one non-streamed ARGS completion; the first stops early (greedy counting
    reaches the stop string "9"), and the client hangs up as soon as /metrics shows it finished,
    while the second still runs. No answer went out, so the finished prompt's tokens count as
    generated (and discarded), beside the second prompt's one token per engine step; they used
    to be lost."""
    url = beating.url
    lab = '{strategy="args"}'
    hist = '{endpoint="/v1/completions",strategy="args"}'
    before = _samples(url)
    count = f"alignserve_generation_tokens_count{hist}"
    _hang_up_when(url, {
        "model": MODEL, "prompt": ["1, 2, 3, 4,", "Once upon a time"], "max_tokens": 64,
        "temperature": 0, "stop": ["9"], "ignore_eos": True,
        "alignment": {"strategy": "args", "top_k": 3, "weights": {"vader": 1}}},
        lambda s: s.get(count, 0) > before.get(count, 0))  # the first prompt finished
    s = _samples(url)
    first = s[f"alignserve_generation_tokens_sum{hist}"] - before.get(
        f"alignserve_generation_tokens_sum{hist}", 0)  # the finished prompt's tokens
    steps = s["alignserve_engine_steps_total"] - before["alignserve_engine_steps_total"]
    gen = (s[f"alignserve_tokens_generated_total{lab}"]
           - before.get(f"alignserve_tokens_generated_total{lab}", 0))
    assert first >= 6, first  # " 5, 6, 7, 8," at least
    assert steps < 64 + 4  # the second prompt was cut short
    # the second prompt made one token per step (its prefill step included) until the cancel
    assert gen >= steps + first - 4, (gen, steps, first)
    assert s[f"alignserve_tokens_returned_total{lab}"] == before.get(
        f"alignserve_tokens_returned_total{lab}", 0)


def test_progress_bars_write_whole_lines_to_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long work's progress bars (training, eval, frontier) redirected to a file: one line
    per redraw at most every LOG_INTERVAL_S, no carriage returns, the final count once."""
    import io

    import alignserve.progress as progress

    log = io.StringIO()  # not a terminal
    for _ in progress.progress_bar(range(500), desc="work", file=log):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0].startswith("work:   0%") and len(lines) == 2, lines  # 30 s never passed
    assert lines[-1].startswith("work: 100%") and "500/500" in lines[-1]
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    log = io.StringIO()
    bar = progress.progress_bar(total=3, desc="steps", file=log, mininterval=0, miniters=1)
    for _ in range(3):
        bar.update(1)
    bar.close()
    counts = [re.search(r"\| (\d/3) ", line)[1] for line in log.getvalue().splitlines()]
    # every update a line (close may redraw the last count once more, with a fresher rate)
    assert counts[:4] == ["0/3", "1/3", "2/3", "3/3"] and set(counts[4:]) <= {"3/3"}, counts
    assert progress.progress_bar(range(2), file=io.StringIO(), disable=True).disable


def test_library_bars_are_off_when_stderr_is_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' own bars ("Loading weights") would put carriage returns into a log."""
    import io

    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    import alignserve.progress as progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    try:
        progress.quiet_library_bars()
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar()
        enable_progress_bars()
