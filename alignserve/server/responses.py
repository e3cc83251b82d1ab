"""Pieces of OpenAI response bodies built from an engine result: usage, logprobs, and the
``alignment`` summary this server adds (strategy info, tokens generated, guidance cost)."""

from __future__ import annotations

from typing import Any

from ..engine.api import EngineClient


def usage_of(res: dict) -> dict:
    return {"prompt_tokens": res["prompt_tokens"], "completion_tokens": res["completion_tokens"],
            "total_tokens": res["prompt_tokens"] + res["completion_tokens"]}


def alignment_summary(res: dict) -> dict:
    st = res["stats"]
    return {**res["info"], "tokens_generated": st.tokens_generated,
            "guidance_forwards": st.guidance_forwards, "candidates_scored": st.candidates_scored,
            "time_s": round(res["elapsed_s"], 4), **st.extra}


def top_map(client: EngineClient,
            top: list[tuple[int, float]] | None) -> dict[str, float] | None:
    """Top alternatives as the completions API's ``{token string: logprob}``."""
    if top is None:
        return None
    return {client.token_str(t): lp for t, lp in top}


def completion_logprobs(client: EngineClient, ch: dict, prompt_lp: list | None,
                        prompt_chars: int) -> dict:
    """The completions API's ``logprobs`` object for one choice (echoed prompt first)."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = 0
    for tid, lp, top in (prompt_lp or []):
        s = client.token_str(tid)
        tokens.append(s)
        lps.append(lp)
        tops.append(top_map(client, top))
        offsets.append(pos)
        pos += len(s)
    pos = prompt_chars
    for info in ch["infos"]:
        s = client.token_str(info.token)
        tokens.append(s)
        lps.append(info.logprob)
        tops.append(top_map(client, info.top))
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}


def stream_logprobs(client: EngineClient, info: Any) -> dict:
    """The completions API's ``logprobs`` object for one streamed token."""
    return {"tokens": [client.token_str(info.token)], "token_logprobs": [info.logprob],
            "top_logprobs": [top_map(client, info.top)], "text_offset": [0]}


def chat_logprobs(client: EngineClient, infos: list) -> list[dict]:
    """The chat API's ``logprobs.content`` list."""
    out = []
    for info in infos:
        s = client.token_str(info.token)
        out.append({"token": s, "logprob": info.logprob, "bytes": list(s.encode()),
                    "top_logprobs": [
                        {"token": client.token_str(t), "logprob": lp,
                         "bytes": list(client.token_str(t).encode())}
                        for t, lp in (info.top or [])]})
    return out
