"""HTTP transport to a remote OpenAI-compatible completions server (vLLM, llama.cpp, alignserve).

Everything that touches the network for remote mode lives here: the bounded retries with
backoff, the mapping of network faults onto ``RemoteError`` (502 / 504 in the API, naming the
base URL), the start-up probe that checks the remote's tokenizer against ours and finds out what
the remote can do (token-id prompts, logprobs and how many top alternatives, token ids in
logprobs), and the conversion of the remote's logprob tokens back into our token ids.

Only the legacy ``/v1/completions`` API is used: it takes the prompt as token ids, so the remote
continues exactly the token sequence we built, and returns per-token logprobs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from ..engine.primitives import EngineError
from ..engine.scheduler import QueueFull

log = logging.getLogger("alignserve.remote")

PROBE_TEXT = "Steer me, please: naïve café — 42 tokens ✓ 日本語!\n  indented\tline"
# statuses of a remote that may answer if asked again (idempotent completions only)
RETRY_STATUSES = (502, 503, 504)


class RemoteError(EngineError):
    """The base model's server failed: unreachable, too slow, a 5xx, or an unusable answer.

    ``status`` is the HTTP status the API answers with: 502 (bad gateway: connection refused or
    reset, a 5xx or malformed answer) or 504 (gateway timeout). ``code`` is the OpenAI error
    ``code`` (``base_unreachable``, ``base_timeout``, ``base_error``). The message names the base
    URL so an operator sees which server failed.
    """

    def __init__(self, status: int, message: str, code: str = "base_error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class RemoteQueueFull(QueueFull):
    """The remote answered 429; the server passes it on as its own 429 (``QueueFull``)."""


@dataclass
class RemoteCaps:
    """What the remote supports, found by the start-up probe."""

    logprobs: bool = True          # returns per-token logprobs
    max_logprobs: int = 0          # top alternatives per token it returns (0 = none)
    token_ids: bool = False        # accepts return_tokens_as_token_ids (vLLM): exact ids
    max_model_len: int | None = None


class TokenMap:
    """Our token ids for the remote's logprob tokens.

    vLLM returns ``"token_id:N"`` with ``return_tokens_as_token_ids``; other servers (alignserve
    itself) return each token's decoded text, which names one id except for the few byte-level
    pieces of an incomplete UTF-8 character (all decode to U+FFFD). ``exact`` returns None for
    those; ``display`` returns a representative (same text, so shown logprobs are unchanged).
    """

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.by_text: dict[str, list[int]] = {}
        for i in range(len(tok)):
            self.by_text.setdefault(tok.decode([i]), []).append(i)

    def exact(self, s: str) -> int | None:
        if s.startswith("token_id:"):
            return int(s[9:])
        ids = self.by_text.get(s)
        return ids[0] if ids is not None and len(ids) == 1 else None

    def display(self, s: str) -> int:
        if s.startswith("token_id:"):
            return int(s[9:])
        ids = self.by_text.get(s)
        if ids:
            return ids[0]
        enc = self.tok(s, add_special_tokens=False).input_ids
        return int(enc[0]) if enc else 0


class RemoteHTTP:
    """POSTs to ``{base_url}/v1/completions`` with retries, and streams its SSE answers.

    Connection failures and 502/503/504 answers are retried ``retries`` times with exponential
    backoff (``backoff_s``, doubled each time): completions are idempotent. A read timeout is
    not retried (the remote may still be working) and becomes a 504. A remote 429 becomes
    ``RemoteQueueFull``; any other non-2xx a 502 carrying the remote's message. A streamed call
    is retried only before its first byte arrived.
    """

    def __init__(self, base_url: str, model: str | None, api_key: str | None = None,
                 timeout_s: float = 600.0, connect_timeout_s: float = 5.0, retries: int = 2,
                 backoff_s: float = 0.25) -> None:
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.retries = retries
        self.backoff_s = backoff_s
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- plumbing ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.base_url + "/v1/completions"

    async def reachable(self, timeout_s: float = 2.0) -> tuple[bool, str | None]:
        """(whether ``GET /v1/models`` on the base answers 2xx within ``timeout_s``, the
        reason when not); no retries: this is for ``/health``."""
        try:
            r = await self.client().get(self.base_url + "/v1/models", timeout=timeout_s)
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if r.status_code // 100 != 2:
            return False, f"GET /v1/models answered {r.status_code}"
        return True, None

    def client(self) -> httpx.AsyncClient:
        """One connection pool per event loop (the probe and the server run in different ones)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = httpx.AsyncClient(timeout=self.timeout, headers=self.headers,
                                             limits=httpx.Limits(max_connections=256,
                                                                 max_keepalive_connections=64))
            self._loop = loop
        return self._client

    def body(self, **kw: Any) -> dict[str, Any]:
        return {"model": self.model, **{k: v for k, v in kw.items() if v is not None}}

    def _fault(self, exc: BaseException) -> RemoteError:
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return RemoteError(504, f"the base model server at {self.base_url} did not answer "
                                    f"in time ({type(exc).__name__})", "base_timeout")
        reason = str(exc) or type(exc).__name__
        return RemoteError(502, f"the base model server at {self.base_url} is unreachable: "
                                f"{reason}", "base_unreachable")

    def _status_error(self, status: int, text: str) -> EngineError:
        try:
            msg = json.loads(text)["error"]["message"]
        except Exception:  # noqa: BLE001 - any non-JSON body
            msg = text[:300]
        if status == 429:
            return RemoteQueueFull(f"the base model server at {self.base_url} is busy: {msg}")
        return RemoteError(502, f"the base model server at {self.base_url} answered {status}: "
                                f"{msg}", "base_error")

    @staticmethod
    def _retryable(exc: BaseException) -> bool:
        return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout,
                                httpx.RemoteProtocolError)) or (
            isinstance(exc, _Status) and exc.status in RETRY_STATUSES)

    async def _sleep(self, attempt: int) -> None:
        await asyncio.sleep(self.backoff_s * (2 ** attempt))

    # ---- calls -------------------------------------------------------------------------------
    async def complete(self, **kw: Any) -> dict[str, Any]:
        """One non-streamed completion (``kw`` are the body's fields); the parsed JSON."""
        body = self.body(**kw)
        for attempt in range(self.retries + 1):
            try:
                r = await self.client().post(self.url, json=body)
                if r.status_code != 200:
                    raise _Status(r.status_code, r.text)
                out = r.json()
                if not isinstance(out, dict) or not isinstance(out.get("choices"), list):
                    raise RemoteError(502, f"the base model server at {self.base_url} sent an "
                                           "answer without choices", "base_error")
                return out
            except (httpx.HTTPError, _Status) as exc:
                if attempt < self.retries and self._retryable(exc):
                    log.warning("base %s: %s; retrying", self.base_url, exc)
                    await self._sleep(attempt)
                    continue
                if isinstance(exc, _Status):
                    raise self._status_error(exc.status, exc.text) from None
                raise self._fault(exc) from None
            except ValueError:  # invalid JSON
                raise RemoteError(502, f"the base model server at {self.base_url} sent invalid "
                                       "JSON", "base_error") from None
        raise AssertionError("unreachable")

    async def stream(self, **kw: Any) -> AsyncIterator[dict[str, Any]]:
        """A streamed completion's chunks (parsed ``data:`` lines, ``[DONE]`` excluded).

        An error object inside the stream (after the remote's 200) becomes a 502."""
        body = self.body(stream=True, **kw)
        for attempt in range(self.retries + 1):
            got_any = False
            try:
                async with self.client().stream("POST", self.url, json=body) as r:
                    if r.status_code != 200:
                        raise _Status(r.status_code, (await r.aread()).decode(errors="replace"))
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        got_any = True
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            return
                        chunk = json.loads(payload)
                        if "error" in chunk:
                            err = chunk["error"]
                            msg = err.get("message") if isinstance(err, dict) else str(err)
                            raise RemoteError(502, f"the base model server at {self.base_url} "
                                                   f"failed mid-stream: {msg}", "base_error")
                        yield chunk
                return
            except (httpx.HTTPError, _Status) as exc:
                if not got_any and attempt < self.retries and self._retryable(exc):
                    log.warning("base %s: %s; retrying", self.base_url, exc)
                    await self._sleep(attempt)
                    continue
                if isinstance(exc, _Status):
                    raise self._status_error(exc.status, exc.text) from None
                if got_any:
                    raise RemoteError(502, f"the base model server at {self.base_url} broke "
                                           f"off the stream: {exc or type(exc).__name__}",
                                      "base_unreachable") from None
                raise self._fault(exc) from None
            except ValueError:
                raise RemoteError(502, f"the base model server at {self.base_url} sent an "
                                       "invalid stream chunk", "base_error") from None


class _Status(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.text = status, text


# ---- start-up probe ------------------------------------------------------------------------
def probe(http: RemoteHTTP, tok: Any, timeout_s: float = 30.0) -> RemoteCaps:
    """Check the remote before serving; returns its capabilities.

    1. ``GET /v1/models``: the model exists (the first one is taken without ``--base-model``)
       and its context length (``max_model_len`` where the server says).
    2. The probe text as a *string* prompt with ``echo`` and ``logprobs``: the remote's
       tokenization must equal ours (else ``ValueError`` with both tokenizations).
    3. The same prompt as *token ids* with ``logprobs`` 20, 5, 1: token-id prompts must work
       (else ``ValueError``); the largest accepted count is ``max_logprobs``.

    Raises ``ValueError`` (the CLI prints it and exits 2) when the remote is unusable.
    """
    caps = RemoteCaps()
    with httpx.Client(timeout=timeout_s, headers=http.headers) as c:
        try:
            r = c.get(http.base_url + "/v1/models")
        except httpx.HTTPError as exc:
            raise ValueError(f"cannot reach the base model server at {http.base_url}: "
                             f"{exc or type(exc).__name__}") from None
        if r.status_code != 200:
            raise ValueError(f"{http.base_url}/v1/models answered {r.status_code}: "
                             f"{r.text[:300]}")
        models = r.json().get("data") or []
        ids = [m.get("id") for m in models]
        if http.model is None:
            if not ids:
                raise ValueError(f"{http.base_url} serves no models")
            http.model = ids[0]
        elif http.model not in ids:
            raise ValueError(f"{http.base_url} does not serve {http.model!r}; it serves {ids}")
        for m in models:
            if m.get("id") == http.model and isinstance(m.get("max_model_len"), int):
                caps.max_model_len = m["max_model_len"]

        def post(**kw: Any) -> httpx.Response:
            return c.post(http.url, json=http.body(**kw))

        local = list(tok(PROBE_TEXT, add_special_tokens=False).input_ids)
        base = dict(prompt=PROBE_TEXT, max_tokens=1, echo=True, logprobs=1, temperature=0.0)
        r = post(**base, return_tokens_as_token_ids=True)
        if r.status_code == 200:
            caps.token_ids = True
        else:
            r = post(**base)
        if r.status_code != 200:  # no logprobs at all? then only the token count can be checked
            r = post(prompt=PROBE_TEXT, max_tokens=1, temperature=0.0)
            if r.status_code != 200:
                raise ValueError(f"the probe completion at {http.url} failed with "
                                 f"{r.status_code}: {r.text[:300]}")
            caps.logprobs = False
            n_remote = int(r.json().get("usage", {}).get("prompt_tokens", -1))
            if n_remote != len(local):
                raise ValueError(f"tokenizer mismatch: the base server counts {n_remote} tokens "
                                 f"in the probe {PROBE_TEXT!r}, the local tokenizer "
                                 f"{len(local)}: {local}")
        else:
            _check_tokens(r.json(), local, tok, caps.token_ids)
        caps.max_logprobs = 0
        for k in (20, 5, 1) if caps.logprobs else ():
            r = post(prompt=local, max_tokens=1, logprobs=k, temperature=0.0,
                     **({"return_tokens_as_token_ids": True} if caps.token_ids else {}))
            if r.status_code == 200:
                caps.max_logprobs = k
                break
        r = post(prompt=local, max_tokens=1, temperature=0.0)
        if r.status_code != 200:
            raise ValueError(f"the base server at {http.base_url} does not accept token-id "
                             f"prompts ({r.status_code}: {r.text[:200]}); remote mode needs them")
    return caps


def _check_tokens(res: dict[str, Any], local: list[int], tok: Any, as_ids: bool) -> None:
    """The remote's echoed prompt tokens must be ours (a leading BOS of its own is allowed)."""
    ch = res["choices"][0]
    lp = ch.get("logprobs") or {}
    n_prompt = int(res.get("usage", {}).get("prompt_tokens", len(local)))
    remote = list(lp.get("tokens") or [])[:n_prompt]
    mine = [f"token_id:{i}" for i in local] if as_ids else [tok.decode([i]) for i in local]
    if remote[1:] == mine and len(remote) == len(mine) + 1:
        remote = remote[1:]  # the remote adds a BOS to string prompts; ids are sent verbatim
    if remote != mine:
        raise ValueError("tokenizer mismatch between the local --tokenizer and the base "
                         f"server on the probe {PROBE_TEXT!r}:\n  base server: {remote}\n"
                         f"  local:       {mine}")
