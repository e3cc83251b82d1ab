"""Remote mode: the engine client for a base model served elsewhere (issue #14).

``RemoteEngineClient`` has ``EngineClient``'s public surface (``encode``, ``chat_prompt``,
``token_str``, ``decode``, ``validate_vocab``, ``check_fits``, ``max_len``, ``start`` /
``events`` / ``stream`` / ``run``, ``resources`` and ``engine``), so the HTTP layer serves it
unchanged; the base model's work goes to an OpenAI-compatible completions server (vLLM,
llama.cpp's server, another alignserve) and the strategies in ``alignserve.remote.strategies``
run here with local rewards. ``engine`` is a small facade with what ``/health`` and
``/metrics`` read.

Faults of the remote surface as ``RemoteError`` (status 502 or 504, the base URL in the
message); a remote 429 as ``RemoteQueueFull``. A request whose consumer goes away is cancelled,
and with it its in-flight remote calls (their connections close, which a remote alignserve or
vLLM treats as a client disconnect).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..decoders import build_decoder
from ..decoders.aligned import AlignmentError
from ..engine.api import GenerationInput, TextClient
from ..engine.primitives import EngineError
from ..engine.scheduler import eos_ids_from_config
from .backbone import LocalBackbone
from .guided import run_deal, run_genarm, run_value_guided
from .http import RemoteCaps, RemoteError, RemoteHTTP, RemoteQueueFull, TokenMap
from .strategies import (
    RemoteCtx,
    prompt_logprobs,
    run_best_of_n,
    run_cd_block,
    run_sample,
    run_token_level,
)

__all__ = ["RemoteEngineClient", "RemoteError", "RemoteQueueFull"]

NO_BACKBONE = ("its heads (ARMs and value heads other than lexical ones) read hidden states, "
               "and this server has no local "
               "backbone model (start it with --local-backbone DIR, a model folder with the "
               "base's tokenizer that the heads were trained on, or with a --tokenizer folder "
               "that holds the model's weights)")
NO_LEXICAL = ("this server has no local backbone model and no lexical value head loaded (they "
              "read token ids only; pass --heads DIR with lexical heads, or start it with "
              "--local-backbone DIR for heads that read hidden states)")
NO_LEXICAL_ARM = ("this server has no local backbone model and no lexical ARM loaded (they "
                  "read the base's log-probs only; pass --heads DIR with lexical ARMs, or start "
                  "it with --local-backbone DIR for ARMs that read hidden states)")
TOKEN_LEVEL = ("args", "transfer_qstar")
HEAD_GUIDED = ("vas", "cd", "genarm")
TOP_K_CAPPED = ("args", "transfer_qstar", "vas", "cd")  # alignment.top_k <= the remote's top-n


@dataclass(eq=False)
class RemoteRequest:
    """A started request: its task, and ``done`` once it ended (the HTTP layer reads it)."""

    inp: GenerationInput
    task: asyncio.Task | None = None
    done: bool = False
    started: float = field(default_factory=time.perf_counter)


class RemoteEngineFacade:
    """What the HTTP layer reads from ``client.engine``: live counts, sizes and ``cancel``."""

    def __init__(self, vocab_size: int, slots: int, max_len: int) -> None:
        self.base = SimpleNamespace(config=SimpleNamespace(vocab_size=vocab_size),
                                    cache=SimpleNamespace(slots=slots))
        self.max_len = max_len
        self.live: set[RemoteRequest] = set()
        self.queue_depth = 0  # queueing happens on the remote
        self.last_step_s = 0.0  # the last remote request's wall time
        self.step_count = 0     # remote requests finished

    @property
    def running(self) -> int:
        return len(self.live)

    def cancel(self, req: RemoteRequest) -> None:
        if req.task is not None and not req.task.done():
            req.task.cancel()

    def shutdown(self) -> None:
        for r in list(self.live):
            self.cancel(r)


class RemoteEngineClient(TextClient):
    """``EngineClient`` over a remote base model (see the module docstring).

    ``tokenizer`` is a loaded Hugging Face tokenizer equal to the remote's (``probe`` checks it);
    ``caps`` are the remote's capabilities from that probe; ``resources`` the local reward
    registry. ``slots`` bounds the concurrent samples one request may ask for (as the KV-cache
    slots do in-process). ``backbone`` is the local model the value heads and ARMs read
    (``vas``, ``cd``, ``genarm``), or None: ``vas`` / ``cd`` may then weight lexical value
    heads only (they read token ids) and ``genarm`` lexical ARMs only (they read the remote's
    log-probs); each is unavailable when no such head is loaded.
    """

    fails_before_output = True  # the base server's faults show on a request's first call

    def __init__(self, http: RemoteHTTP, tokenizer: Any, caps: RemoteCaps, resources: Any,
                 max_len: int, eos_ids: set[int], slots: int = 32,
                 request_timeout_s: float = 600.0, vocab_size: int | None = None,
                 backbone: LocalBackbone | None = None) -> None:
        self.http = http
        self.backbone = backbone
        self.tok = tokenizer
        self.caps = caps
        self.resources = resources
        self.eos_ids = set(eos_ids)
        self.request_timeout_s = request_timeout_s
        self.tmap = TokenMap(tokenizer)
        self.engine = RemoteEngineFacade(vocab_size or len(tokenizer), slots, max_len)

    # ---- capabilities ------------------------------------------------------------------------
    def unavailable_strategies(self) -> dict[str, str]:
        """Strategies this deployment cannot run, each with the reason (for ``/v1/heads`` and
        the 400 at request time)."""
        out: dict[str, str] = {}
        if self.backbone is None:
            if not self.lexical_heads("arm"):
                out["genarm"] = NO_LEXICAL_ARM
            if not self.lexical_heads():
                out.update({s: NO_LEXICAL for s in ("vas", "cd")})
        if not self.caps.logprobs or self.caps.max_logprobs < 1:
            why = f"the base model server at {self.http.base_url} returns no top logprobs"
            out.update({s: why for s in (*TOKEN_LEVEL, *HEAD_GUIDED, "deal")})
        return out

    async def dependency_health(self) -> dict[str, Any] | None:
        """The base model server's reachability, probed at most every 2 s (cached)."""
        now = time.monotonic()
        cached = getattr(self, "_health", None)
        if cached is None or now - cached[0] > 2.0:
            ok, why = await self.http.reachable()
            cached = (now, {"url": self.http.base_url, "reachable": ok, "error": why})
            self._health = cached
        return {"base": cached[1]}

    def lexical_heads(self, kind: str = "value") -> list[str]:
        """The loaded lexical value heads (``kind`` "arm": lexical ARMs): without a local
        backbone, the only heads VAS / CD (GenARM) can weight (they read token ids or the
        base's log-probs, not hidden states)."""
        heads = getattr(self.resources, "heads", {}) if self.resources is not None else {}
        return sorted(n for n, h in heads.items() if h.runner == "tokens" and h.kind == kind)

    def check_request(self, dec: Any, inp: GenerationInput) -> None:
        """400s (``AlignmentError``) for what remote mode cannot do as asked."""
        name = dec.name
        why = self.unavailable_strategies().get(name)
        if why is not None:
            raise AlignmentError("alignment.strategy",
                                 f"strategy {name!r} is not available on this server: {why}")
        opt = getattr(dec, "opt", None)
        if name == "best_of_n" and opt is not None and dec.prunes and opt.keep is not None:
            raise AlignmentError("alignment.keep", "early rejection (keep < 1) is not "
                                 "available in remote mode: the base server returns whole "
                                 "samples; set keep to 1 or leave it unset")
        if inp.params.no_repeat_ngram_size:
            raise AlignmentError("no_repeat_ngram_size", "no_repeat_ngram_size is not available "
                                 "in remote mode: the base model server samples the tokens "
                                 "and has no such option; leave it at 0")
        if (name in ("vas", "cd") and self.backbone is None and opt is not None
                and opt.values == "q"):
            by_reward = [w for w, v in dec.weights.items() if v and w not in self.resources.heads]
            if by_reward:  # in-process these would read Q-heads; here only lexical heads load
                raise AlignmentError("alignment.values", f"values='q' reads the Q-heads of "
                                     f"{by_reward}, which read hidden states, and this server "
                                     "has no local backbone model (--local-backbone DIR); "
                                     "leave values unset, or weight the lexical value heads "
                                     f"{self.lexical_heads()} by name")
        if name in HEAD_GUIDED and self.backbone is None:
            kind = "arm" if name == "genarm" else "value"
            for w, v in dec.weights.items():
                head = self.resources.heads_for(w, kind)
                if v and (head is None or head.runner != "tokens"):
                    what = "ARMs" if kind == "arm" else "value heads"
                    raise AlignmentError(f"alignment.weights.{w}", f"{w!r} {NO_BACKBONE}; "
                                         f"without one only the lexical {what} "
                                         f"{self.lexical_heads(kind)} can be weighted")
        placed = getattr(dec, "backbones", [])
        if name in HEAD_GUIDED and placed:
            raise AlignmentError("alignment.weights", f"heads placed on a partial backbone "
                                 f"({', '.join(placed)}) are not available in remote mode: the "
                                 "local backbone gives final hidden states only; use "
                                 "base-placed heads")
        if name in TOP_K_CAPPED and opt is not None and opt.top_k > self.caps.max_logprobs:
            raise AlignmentError("alignment.top_k", f"alignment.top_k must be at most "
                                 f"{self.caps.max_logprobs} here: the base model server "
                                 f"returns at most {self.caps.max_logprobs} top logprobs")
        if inp.params.top_logprobs > self.caps.max_logprobs:
            raise EngineError(f"top logprobs must be at most {self.caps.max_logprobs}: the base "
                              "model server returns no more")
        total = inp.n * max(getattr(opt, "n", 1), getattr(opt, "k", 1)) if opt else inp.n
        if total > self.engine.base.cache.slots:
            raise EngineError(f"this request needs {total} concurrent samples but the server "
                              f"allows {self.engine.base.cache.slots}; lower n or the "
                              "strategy's branch count")

    # ---- generation --------------------------------------------------------------------------
    def start(self, inp: GenerationInput, stream: bool = True
              ) -> tuple[RemoteRequest, asyncio.Queue]:
        """Validate and start a request; raises (AlignmentError, EngineError) before any
        output exists, so the HTTP layer can still answer with a 4xx status."""
        name = (inp.alignment or {}).get("strategy", "sample")
        why = self.unavailable_strategies().get(name) if isinstance(name, str) else None
        if why is not None:  # before the strategy binds its weights to heads we do not load
            raise AlignmentError("alignment.strategy",
                                 f"strategy {name!r} is not available on this server: {why}")
        dec = build_decoder(inp.alignment, prompt_logprobs=inp.prompt_logprobs,
                            registry=self.resources)
        self.check_request(dec, inp)
        q: asyncio.Queue = asyncio.Queue()
        req = RemoteRequest(inp)
        ctx = RemoteCtx(self.http, self.caps, self.tmap, self.tok, list(inp.prompt_ids),
                        inp.prompt_text, inp.params, inp.n, self.eos_ids, self.resources,
                        lambda c, text, info: q.put_nowait(("delta", c, text, info)))
        req.task = asyncio.ensure_future(self._drive(req, ctx, dec, q, stream))
        self.engine.live.add(req)
        return req, q

    async def _drive(self, req: RemoteRequest, ctx: RemoteCtx, dec: Any, q: asyncio.Queue,
                     stream: bool) -> None:
        try:
            async with asyncio.timeout(self.request_timeout_s):
                jobs = [self._strategy(ctx, dec, stream)]
                if req.inp.prompt_logprobs:
                    jobs.append(prompt_logprobs(ctx))
                await asyncio.gather(*jobs)
                if dec.name != "sample":  # rewards of the answer, at every weight
                    await ctx.report(dec)
            for c in range(ctx.n):
                ctx.finish(c, "stop")
            q.put_nowait(("done", self._result(req, ctx)))
        except asyncio.CancelledError:
            q.put_nowait(("error", EngineError("cancelled")))
            raise
        except TimeoutError:
            from ..engine.scheduler import RequestTimeout

            q.put_nowait(("error", RequestTimeout(
                f"request exceeded the {self.request_timeout_s:.0f} s timeout")))
        except Exception as exc:  # noqa: BLE001 - every failure ends the request as an event
            q.put_nowait(("error", exc))
        finally:
            req.done = True
            self.engine.live.discard(req)
            self.engine.step_count += 1
            self.engine.last_step_s = time.perf_counter() - req.started

    async def _strategy(self, ctx: RemoteCtx, dec: Any, stream: bool) -> None:
        ctx.info["strategy"] = dec.name
        if dec.name == "sample" or getattr(dec, "plain", False):
            if dec.name != "sample":
                dec.plain_info(ctx.info, ctx.n)
            await run_sample(ctx, stream)
        elif ctx.params.max_tokens == 0:
            for c in range(ctx.n):
                ctx.finish(c, "length")
        elif dec.name == "best_of_n":
            await run_best_of_n(ctx, dec)
        elif dec.name == "cd_block":
            await run_cd_block(ctx, dec)
        elif dec.name in TOKEN_LEVEL:
            await run_token_level(ctx, dec, self.engine.base.config.vocab_size)
        elif dec.name in ("vas", "cd"):  # backbone None: lexical heads only (check_request)
            await run_value_guided(ctx, dec, self.backbone, self.engine.base.config.vocab_size)
        elif dec.name == "genarm":  # backbone None: lexical ARMs only (check_request)
            await run_genarm(ctx, dec, self.backbone, self.engine.base.config.vocab_size)
        elif dec.name == "deal":
            await run_deal(ctx, dec, self.engine.base.config.vocab_size)
        else:  # check_request refused it already
            raise AlignmentError("alignment.strategy", f"{dec.name} is not available here")
        ctx.info["remote_calls"] = ctx.remote_calls

    @staticmethod
    def _result(req: RemoteRequest, ctx: RemoteCtx) -> dict[str, Any]:
        completion = sum(len(st.tokens) for st in ctx.choices)
        if ctx.completion_tokens is not None:
            completion = int(ctx.completion_tokens)
        return {
            "request_id": "",
            "choices": [{"text": st.text, "finish_reason": st.finish_reason,
                         "tokens": st.tokens, "infos": st.infos} for st in ctx.choices],
            "prompt_tokens": len(req.inp.prompt_ids),
            "completion_tokens": completion,
            "prompt_logprobs": ctx.prompt_logprobs,
            "stats": ctx.stats,
            "info": ctx.info,
            "elapsed_s": time.perf_counter() - req.started,
        }



def eos_ids_of(folder: Path, tokenizer: Any) -> set[int]:
    """EOS ids from the tokenizer folder's generation / model config, else the tokenizer's."""
    ids = eos_ids_from_config(folder)
    if not ids and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def vocab_size_of(folder: Path, tokenizer: Any) -> int:
    p = Path(folder) / "config.json"
    if p.is_file():
        v = json.loads(p.read_text()).get("vocab_size")
        if isinstance(v, int):
            return max(v, len(tokenizer))
    return len(tokenizer)
