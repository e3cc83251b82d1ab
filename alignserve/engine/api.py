"""The engine's front door for the HTTP layer: text in, text and plain numbers out.

The server speaks JSON; the engine speaks token ids and tensors. This module sits between them
so the HTTP layer never touches a tensor: it tokenizes prompts (applying the chat template),
builds an ``EngineRequest`` with the strategy the server built (any ``Strategy``; the engine never
imports ``alignserve.decoders``), bridges the engine thread's events into an
asyncio queue, and turns token ids into the strings OpenAI's logprob objects expect.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .primitives import EngineError
from .sampling import SamplingParams
from .scheduler import Engine, EngineRequest
from .strategy import Strategy


class ContextLengthError(EngineError):
    """The prompt (plus the requested tokens) does not fit the context window."""


@dataclass
class GenerationInput:
    prompt_ids: list[int]
    prompt_text: str
    params: SamplingParams
    n: int = 1
    alignment: dict[str, Any] | None = None
    prompt_logprobs: bool = False
    decoder: Strategy | None = None  # built by the caller (the server) from ``alignment``


class TextClient:
    """The text side every engine client shares: tokenization with the served tokenizer
    (``self.tok``), the context window and the vocabulary (``self.engine.max_len``,
    ``self.engine.base.config.vocab_size``). ``EngineClient`` (in-process) and
    ``alignserve.remote.client.RemoteEngineClient`` (a base served elsewhere) build on it."""

    tok: Any
    engine: Any
    # whether a request often fails before its first output (a base model served elsewhere
    # may be down); the HTTP layer then awaits a stream's first event before its 200
    fails_before_output: bool = False

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    async def dependency_health(self) -> dict[str, Any] | None:
        """What ``/health`` reports about components outside this process (None: none)."""
        return None

    # ---- requests (subclasses define ``start`` and may refine ``on_done``) ------------------
    def start(self, inp: GenerationInput, stream: bool = True) -> tuple[Any, asyncio.Queue]:
        """Validate and submit ``inp``; (request, its event queue). Raises before any output
        exists, so the HTTP layer can still answer with a 4xx status."""
        raise NotImplementedError

    def on_done(self, req: Any, result: dict[str, Any]) -> None:
        """Hook: complete a request's ``done`` result before it is yielded."""

    async def events(self, req: Any, q: asyncio.Queue) -> AsyncIterator[tuple]:
        """Yield a started request's events; cancels it if the consumer stops early."""
        try:
            while True:
                ev = await q.get()
                if ev[0] == "done":
                    self.on_done(req, ev[1])
                yield ev
                if ev[0] in ("done", "error"):
                    return
        finally:
            if not req.done:
                self.engine.cancel(req)

    async def stream(self, inp: GenerationInput) -> AsyncIterator[tuple]:
        req, q = self.start(inp)
        async for ev in self.events(req, q):
            yield ev

    async def run(self, inp: GenerationInput) -> dict[str, Any]:
        """The whole result of a non-streamed request; raises its error."""
        req, q = self.start(inp, stream=False)
        async for ev in self.events(req, q):
            if ev[0] == "done":
                return ev[1]
            if ev[0] == "error":
                raise ev[1]
        raise EngineError("generation ended without a result")

    # ---- tokenization ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        if not getattr(self.tok, "chat_template", None):
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def token_str(self, token_id: int) -> str:
        return self.tok.decode([token_id])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def validate_vocab(self, ids: list[int]) -> None:
        v = self.engine.base.config.vocab_size
        bad = [i for i in ids if not 0 <= i < v]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {v})")

    # ---- generation ------------------------------------------------------------------------
    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > self.max_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_len} tokens; the prompt has "
                f"{n_prompt} tokens and max_tokens is {max_tokens}. Shorten the prompt or lower "
                "max_tokens.")


class EngineClient(TextClient):
    def __init__(self, engine: Engine, resources: Any = None) -> None:
        self.engine = engine
        # a tokenizer of our own: HF fast tokenizers may raise "Already borrowed" when the HTTP
        # thread encodes while the engine thread decodes with the same instance
        self.tok = copy.deepcopy(engine.tokenizer)
        self.resources = resources

    def start(self, inp: GenerationInput,
              stream: bool = True) -> tuple[EngineRequest, asyncio.Queue]:
        """Submit ``inp`` with its strategy ``inp.decoder``; raises (EngineError, QueueFull)
        before any output exists, so the HTTP layer can still answer with a 4xx status. The
        engine emits the same events either way, so ``stream`` changes nothing here (the
        remote client passes a non-streamed request through as one call)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        decoder = inp.decoder
        if decoder is None:
            raise ValueError("GenerationInput.decoder is not set: build the strategy first")
        need = sum(decoder.slots_needed(inp.n).values())
        if need > self.engine.base.cache.slots:
            raise EngineError(f"this request needs {need} KV-cache slots but the server has "
                              f"{self.engine.base.cache.slots}; lower n or the strategy's "
                              "branch count")
        req = EngineRequest(prompt_ids=inp.prompt_ids, params=inp.params, decoder=decoder,
                            n=inp.n, prompt_text=inp.prompt_text, resources=self.resources,
                            callback=lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        self.engine.submit(req)
        return req, q

    def on_done(self, req: EngineRequest, result: dict[str, Any]) -> None:
        """The ``done`` result also carries ``queue_s``: seconds from submission to admission."""
        if req.admitted_at:
            result["queue_s"] = req.admitted_at - req.submitted_at
